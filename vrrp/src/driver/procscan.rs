//! Counting running processes by name in `/proc`, for keepalived's `vrrp_track_process`.
//!
//! Bounded: one scan reads at most [`MAX_PIDS`] `/proc` entries, and of each process only the
//! first [`STAT_PREFIX`] bytes of `/proc/PID/stat` (its pid, name and state). A process that
//! exits during the scan is not counted; nothing in `/proc` makes a scan fail or panic.

use std::io::Read as _;
use std::path::Path;

/// The most `/proc` entries read in one scan (the kernel's default `pid_max` is 32768 on
/// small machines, 4194304 at most; a host with more processes than this is not one this
/// tracking is for, and the scan stays a bounded amount of work).
pub(crate) const MAX_PIDS: usize = 65_536;

/// Bytes of `/proc/PID/stat` read: the pid (at most 7 digits), the name in parentheses (at
/// most 15 bytes) and the state letter fit in 27.
const STAT_PREFIX: u64 = 64;

/// For each of `names`, how many processes under `proc` (normally `/proc`) run with that
/// name, as `/proc/PID/comm` shows it (the kernel keeps the first 15 bytes). Zombies are not
/// running.
pub(crate) fn count(proc: &Path, names: &[String]) -> Vec<u32> {
    let mut counts = vec![0u32; names.len()];
    let Ok(dir) = std::fs::read_dir(proc) else {
        return counts;
    };
    let pids = dir
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.as_encoded_bytes();
            !name.is_empty() && name.iter().all(u8::is_ascii_digit)
        })
        .take(MAX_PIDS);
    for entry in pids {
        let Some((comm, state)) = read_stat(&entry.path().join("stat")) else {
            continue;
        };
        if matches!(state, b'Z' | b'X') {
            continue;
        }
        for (name, c) in names.iter().zip(&mut counts) {
            if name.as_bytes() == comm.as_slice() {
                *c = c.saturating_add(1);
            }
        }
    }
    counts
}

/// The name and state letter from the start of a `/proc/PID/stat`: `PID (NAME) S ...`. The
/// name may hold parentheses itself, so it ends at the last `)` (what follows within the
/// prefix read is numbers).
fn read_stat(path: &Path) -> Option<(Vec<u8>, u8)> {
    let mut buf = Vec::with_capacity(STAT_PREFIX as usize);
    std::fs::File::open(path)
        .ok()?
        .take(STAT_PREFIX)
        .read_to_end(&mut buf)
        .ok()?;
    let open = buf.iter().position(|b| *b == b'(')?;
    let close = buf.iter().rposition(|b| *b == b')')?;
    let comm = buf.get(open + 1..close)?.to_vec();
    let state = *buf.get(close + 2)?;
    Some((comm, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_live_processes_by_name_and_skips_what_does_not_parse() {
        let dir = std::env::temp_dir().join(format!("vrrp-procscan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let stat = |pid: &str, text: &str| {
            std::fs::create_dir_all(dir.join(pid)).expect("dir");
            std::fs::write(dir.join(pid).join("stat"), text).expect("stat");
        };
        stat("1", "1 (vgtrackd) S 0 1 1 0 -1 4194560 0 0 0 0");
        stat("22", "22 (vgtrackd) R 1 22 22");
        stat("23", "23 (vgtrackd) Z 1 23 23");
        stat("24", "24 (we (ird) name) S 1 24");
        stat("25", "25 (truncated");
        stat("26", "");
        stat("self", "7 (vgtrackd) S 1");
        std::fs::create_dir_all(dir.join("27")).expect("a process that exited");
        let names = ["vgtrackd", "we (ird) name", "absent"].map(str::to_owned);
        assert_eq!(count(&dir, &names), [2, 1, 0]);
        assert_eq!(count(&dir.join("missing"), &names), [0, 0, 0]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn finds_this_test_process_in_proc() {
        let comm = std::fs::read_to_string("/proc/self/comm").expect("comm");
        let counts = count(Path::new("/proc"), &[comm.trim_end().to_owned()]);
        assert!(counts[0] >= 1, "{counts:?}");
    }
}
