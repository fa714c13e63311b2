//! The only code of the crate that needs `unsafe`: registering socket descriptors with
//! tokio, batched `sendmmsg`/`recvmmsg`, and forcing socket buffer sizes.
//!
//! Invariant: every pointer handed to the kernel points into a slice borrowed for the
//! duration of the (synchronous) call, and the message arrays live on the stack of that
//! call, so nothing outlives what it points to.
#![allow(unsafe_code)]

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};

use socket2::Socket;
use tokio::io::unix::AsyncFd;

/// Most messages one `sendmmsg`/`recvmmsg` call handles.
pub(crate) const MAX_BATCH: usize = 128;

/// Registers a socket with the tokio reactor.
pub(crate) fn register(socket: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: the AsyncFd takes ownership of the socket, so its descriptor stays open and
    // unchanged for the AsyncFd's whole life.
    unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Sends every packet to `dst` with as few `sendmmsg` calls as the kernel allows.
/// Returns how many were sent before the socket would block.
pub(crate) fn send_batch(fd: RawFd, packets: &[&[u8]], dst: SocketAddrV4) -> io::Result<usize> {
    let mut addr = sockaddr_in(dst);
    let mut iovs: [MaybeUninit<libc::iovec>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    // SAFETY: mmsghdr is plain data; all-zero is a valid (empty) value.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    let count = packets.len().min(MAX_BATCH);
    for (i, p) in packets.iter().take(count).enumerate() {
        iovs[i].write(libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        });
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&raw mut addr).cast();
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = iovs[i].as_mut_ptr();
        h.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < count {
        // SAFETY: hdrs[sent..count] point at `addr` and at iovecs describing borrowed
        // slices, all alive until this function returns.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs[sent..].as_mut_ptr(),
                (count - sent) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if sent > 0 && e.kind() == io::ErrorKind::WouldBlock {
                Ok(sent)
            } else {
                Err(e)
            };
        }
        sent += n as usize;
    }
    Ok(sent)
}

/// Receives up to `bufs.len()` datagrams without blocking; fills in each one's length and
/// IPv4 source. Errors with `WouldBlock` when nothing is queued.
pub(crate) fn recv_batch<B: AsMut<[u8]>>(
    fd: RawFd,
    bufs: &mut [B],
    lens: &mut [usize],
    sources: &mut [Ipv4Addr],
) -> io::Result<usize> {
    let count = bufs.len().min(lens.len()).min(sources.len()).min(MAX_BATCH);
    let mut iovs: [MaybeUninit<libc::iovec>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    // SAFETY: plain data, all-zero is valid.
    let mut addrs: [libc::sockaddr_in; MAX_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: plain data, all-zero is valid.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..count {
        let b = bufs[i].as_mut();
        iovs[i].write(libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        });
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&raw mut addrs[i]).cast();
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = iovs[i].as_mut_ptr();
        h.msg_iovlen = 1;
    }
    // SAFETY: every header points at a live, exclusively borrowed buffer and address slot.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        lens[i] = hdrs[i].msg_len as usize;
        sources[i] = Ipv4Addr::from(u32::from_be(addrs[i].sin_addr.s_addr));
    }
    Ok(n)
}

/// Sets SO_SNDBUFFORCE/SO_RCVBUFFORCE (root may exceed net.core.[rw]mem_max), falling
/// back to the capped ordinary options when not permitted.
pub(crate) fn force_buffers(socket: &Socket, bytes: usize) {
    let value = bytes as libc::c_int;
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        let set = |opt| {
            // SAFETY: passes a pointer to a live c_int and its exact size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const value).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            set(plain);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Protocol, Type};

    #[test]
    fn batch_roundtrip_over_loopback_udp() {
        let rx = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        rx.bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into())
            .unwrap();
        let dst = rx.local_addr().unwrap().as_socket_ipv4().unwrap();
        let tx = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        force_buffers(&tx, 1 << 20);
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        assert_eq!(send_batch(tx.as_raw_fd(), &slices, dst).unwrap(), 5);
        let mut bufs = vec![vec![0u8; 64]; 8];
        let mut lens = [0; 8];
        let mut srcs = [Ipv4Addr::UNSPECIFIED; 8];
        let n = recv_batch(rx.as_raw_fd(), &mut bufs, &mut lens, &mut srcs).unwrap();
        assert_eq!(n, 5);
        for i in 0..5 {
            assert_eq!(&bufs[i][..lens[i]], &payloads[i][..]);
            assert_eq!(srcs[i], Ipv4Addr::LOCALHOST);
        }
        let e = recv_batch(rx.as_raw_fd(), &mut bufs, &mut lens, &mut srcs).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
