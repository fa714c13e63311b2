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
///
/// `segments[i]` is the UDP GRO segment size when the kernel coalesced several datagrams
/// of one flow into `bufs[i]` (see [`enable_udp_gro`]), else 0.
pub(crate) fn recv_batch<B: AsMut<[u8]>>(
    fd: RawFd,
    bufs: &mut [B],
    lens: &mut [usize],
    sources: &mut [Ipv4Addr],
    segments: &mut [usize],
) -> io::Result<usize> {
    let count = bufs
        .len()
        .min(lens.len())
        .min(sources.len())
        .min(segments.len())
        .min(MAX_BATCH);
    let mut controls = [[0u64; CONTROL_WORDS]; MAX_BATCH];
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
        h.msg_control = controls[i].as_mut_ptr().cast();
        h.msg_controllen = size_of::<[u64; CONTROL_WORDS]>();
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
        // Without MSG_TRUNC the kernel never reports more than it copied; clamped anyway so
        // a caller may slice bufs[i][..lens[i]] without a second check.
        lens[i] = (hdrs[i].msg_len as usize).min(bufs[i].as_mut().len());
        sources[i] = Ipv4Addr::from(u32::from_be(addrs[i].sin_addr.s_addr));
        segments[i] = 0;
        let h = &hdrs[i].msg_hdr;
        // SAFETY: the kernel filled msg_control up to msg_controllen; CMSG_* walk only that.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let size = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    segments[i] = usize::try_from(size).unwrap_or(0);
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
    }
    Ok(n)
}

/// Most datagrams one UDP GSO send carries (the kernel's UDP_MAX_SEGMENTS is 64, or 128 on
/// newer kernels).
pub(crate) const MAX_GSO_SEGMENTS: usize = 64;

/// Room for one UDP_GRO control message (and alignment), in u64 words.
const CONTROL_WORDS: usize = 8;

/// Asks the kernel to coalesce received datagrams of one flow (UDP GRO, Linux ≥ 5.0).
pub(crate) fn enable_udp_gro(socket: &Socket) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: passes a pointer to a live c_int and its exact size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Sends the concatenation of `packets` as datagrams of `segment` bytes each (the last may
/// be shorter) with one call: UDP GSO, the kernel (or the NIC) does the splitting as late as
/// possible. The packets go out as an iovec array, so they are never gathered in userspace;
/// at most [`MAX_GSO_SEGMENTS`] of them per call.
pub(crate) fn send_gso(
    fd: RawFd,
    packets: &[&[u8]],
    segment: u16,
    dst: SocketAddrV4,
) -> io::Result<usize> {
    let mut addr = sockaddr_in(dst);
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_GSO_SEGMENTS];
    let count = packets.len().min(MAX_GSO_SEGMENTS);
    for (v, p) in iov.iter_mut().zip(&packets[..count]) {
        v.iov_base = p.as_ptr() as *mut libc::c_void;
        v.iov_len = p.len();
    }
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: plain data, all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut addr).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = count;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    // SAFETY: msg_control points at `control`, large enough for one u16 control message.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
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
        let mut segs = [0; 8];
        let n = recv_batch(rx.as_raw_fd(), &mut bufs, &mut lens, &mut srcs, &mut segs).unwrap();
        assert_eq!(n, 5);
        for i in 0..5 {
            assert_eq!(&bufs[i][..lens[i]], &payloads[i][..]);
            assert_eq!(srcs[i], Ipv4Addr::LOCALHOST);
        }
        let e = recv_batch(rx.as_raw_fd(), &mut bufs, &mut lens, &mut srcs, &mut segs).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn gso_send_arrives_as_segments_or_one_gro_buffer() {
        let rx = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        rx.bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into())
            .unwrap();
        let gro = enable_udp_gro(&rx);
        let dst = rx.local_addr().unwrap().as_socket_ipv4().unwrap();
        let tx = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        let data: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        let parts: Vec<&[u8]> = data.chunks(100).collect();
        assert_eq!(send_gso(tx.as_raw_fd(), &parts, 100, dst).unwrap(), 250);
        let mut bufs = vec![vec![0u8; 1024]; 4];
        let (mut lens, mut srcs, mut segs) = ([0; 4], [Ipv4Addr::UNSPECIFIED; 4], [0; 4]);
        let mut got = Vec::new();
        while got.len() < 250 {
            let n = recv_batch(rx.as_raw_fd(), &mut bufs, &mut lens, &mut srcs, &mut segs).unwrap();
            for i in 0..n {
                let seg = if segs[i] == 0 { lens[i] } else { segs[i] };
                assert!(seg <= 100, "segment {seg} (gro {gro})");
                got.extend_from_slice(&bufs[i][..lens[i]]);
            }
        }
        assert_eq!(got, data);
    }
}
