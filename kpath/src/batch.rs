//! `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+), which aya 0.14 does not wrap: one `bpf(2)` call
//! copies out up to thousands of a hash map's entries. The sync round reads every flow entry
//! each round; with one lookup per entry those calls were about a quarter of the daemon's
//! time at high connection rates.
//!
//! The one place of this crate besides `pod` with `unsafe`: the system call itself. The
//! attribute block is `union bpf_attr`'s `batch` member as the UAPI lays it out; the buffers
//! the kernel writes into are vectors of `aya::Pod` types (any byte pattern is a value of
//! them), sized for the count passed, and outlive the call.
//!
//! Invariant: entries come out whole (the kernel copies each under its bucket's lock), but the
//! walk is not a snapshot of one instant: an entry inserted or deleted during the walk may be
//! seen or not. Callers treat an entry missing from the result as they would a missing key.

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

/// `enum bpf_cmd`'s `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: nix::libc::c_long = 24;

/// Entries asked for per call at first; a hash bucket longer than that makes the kernel answer
/// `ENOSPC`, and the walk retries that bucket with twice the room (up to [`MAX_CHUNK`]).
const FIRST_CHUNK: usize = 4096;
const MAX_CHUNK: usize = 1 << 20;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the hash map `map` (key type `K`, value type `V`, whose sizes must be the
/// map's key and value sizes: the caller's types mirror the program's), appended to `out`.
///
/// # Errors
/// The kernel refusing the walk (a map type without batch operations, a kernel before 5.6).
pub(crate) fn lookup_all<K, V>(map: BorrowedFd<'_>, out: &mut Vec<(K, V)>) -> io::Result<()>
where
    K: aya::Pod + Default,
    V: aya::Pod + Default,
{
    let mut chunk = FIRST_CHUNK;
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // The htab walk's position: a bucket index the kernel writes to `out_batch` and reads
    // back from `in_batch` (absent on the first call).
    let mut position: u32 = 0;
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_ref(&position) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is the UAPI's batch attribute block, passed with its size; it points
        // at `position` and `next` (u32, the size of the htab's batch token) and at `keys`
        // and `values`, each with room for `attr.count` elements of the map's key and value
        // sizes; all of them live until the call returns, and the kernel writes only within
        // them (at most `attr.count` entries, then the count it wrote back into `attr`).
        #[allow(unsafe_code)]
        let rc = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                size_of::<BatchAttr>(),
            )
        };
        let error = (rc < 0).then(io::Error::last_os_error);
        let got = (attr.count as usize).min(chunk);
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        match error {
            None => {
                position = next;
                first = false;
            }
            // The walk is over (the entries of this last call are in).
            Some(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(()),
            // One bucket holds more entries than `chunk`: nothing was copied; retry it.
            Some(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) && chunk < MAX_CHUNK => {
                chunk *= 2;
                keys.resize(chunk, K::default());
                values.resize(chunk, V::default());
            }
            Some(e) => return Err(e),
        }
    }
}
