//! Counting running processes by name in `/proc`, for keepalived's `vrrp_track_process`.
//!
//! Bounded: one scan reads at most [`MAX_PIDS`] `/proc` entries, and of each process only the
//! first [`STAT_PREFIX`] bytes of `/proc/PID/stat` (its pid, name and state), plus, only for a
//! process whose name matches an entry with `parameters`, at most [`MAX_CMDLINE`] bytes of
//! `/proc/PID/cmdline`. A process that exits during the scan is not counted; nothing in
//! `/proc` makes a scan fail or panic.

use std::io::Read as _;
use std::path::Path;

use super::TrackProcess;

/// The most `/proc` entries read in one scan (the kernel's default `pid_max` is 32768 on
/// small machines, 4194304 at most; a host with more processes than this is not one this
/// tracking is for, and the scan stays a bounded amount of work).
pub(crate) const MAX_PIDS: usize = 65_536;

/// Bytes of `/proc/PID/stat` read: the pid (at most 7 digits), the name in parentheses (at
/// most 15 bytes) and the state letter fit in 27.
const STAT_PREFIX: u64 = 64;

/// The longest command line compared with `parameters`: a process whose command line is
/// longer never matches an entry with parameters (it cannot be compared whole). The config
/// refuses parameters that could not fit.
pub const MAX_CMDLINE: usize = 4096;

/// For each of `processes`, how many processes under `proc` (normally `/proc`) run with its
/// name, as `/proc/PID/comm` shows it (the kernel keeps the first 15 bytes), and, where it
/// has `parameters`, with arguments that match them. Zombies are not running.
pub(crate) fn count(proc: &Path, processes: &[TrackProcess]) -> Vec<u32> {
    let mut counts = vec![0u32; processes.len()];
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
        let dir = entry.path();
        let Some((comm, state)) = read_stat(&dir.join("stat")) else {
            continue;
        };
        if matches!(state, b'Z' | b'X') {
            continue;
        }
        // Read once per process, and only when some entry needs it.
        let mut cmdline: Option<Option<Vec<u8>>> = None;
        for (p, c) in processes.iter().zip(&mut counts) {
            if p.name.as_bytes() != comm.as_slice() {
                continue;
            }
            if let Some(parameters) = &p.parameters {
                let line = cmdline.get_or_insert_with(|| read_cmdline(&dir.join("cmdline")));
                let Some(line) = line else {
                    continue;
                };
                if !p.param_match.matches(parameters, &arguments(line)) {
                    continue;
                }
            }
            *c = c.saturating_add(1);
        }
    }
    counts
}

/// The arguments after the program in a `/proc/PID/cmdline` (NUL-separated, NUL-ended).
fn arguments(cmdline: &[u8]) -> Vec<&[u8]> {
    let line = cmdline.strip_suffix(b"\0").unwrap_or(cmdline);
    if line.is_empty() {
        return Vec::new();
    }
    line.split(|b| *b == 0).skip(1).collect()
}

/// A process's command line, `None` when unreadable or longer than [`MAX_CMDLINE`].
fn read_cmdline(path: &Path) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(256);
    std::fs::File::open(path)
        .ok()?
        .take(MAX_CMDLINE as u64 + 1)
        .read_to_end(&mut buf)
        .ok()?;
    (buf.len() <= MAX_CMDLINE).then_some(buf)
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
    use crate::ParamMatch;

    fn by_name(name: &str) -> TrackProcess {
        TrackProcess {
            name: name.to_owned(),
            parameters: None,
            param_match: ParamMatch::Exact,
            quorum: 1,
            quorum_max: u32::MAX,
            delay: std::time::Duration::ZERO,
            weight: 0,
        }
    }

    fn with_parameters(name: &str, rule: ParamMatch, params: &[&str]) -> TrackProcess {
        TrackProcess {
            parameters: Some(params.iter().map(|p| (*p).to_owned()).collect()),
            param_match: rule,
            ..by_name(name)
        }
    }

    #[test]
    fn parameters_count_only_processes_whose_command_line_matches() {
        let dir = std::env::temp_dir().join(format!("vrrp-procscan-args-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let proc = |pid: &str, cmdline: &[u8]| {
            std::fs::create_dir_all(dir.join(pid)).expect("dir");
            std::fs::write(dir.join(pid).join("stat"), format!("{pid} (haproxy) S 1"))
                .expect("stat");
            std::fs::write(dir.join(pid).join("cmdline"), cmdline).expect("cmdline");
        };
        proc("10", b"/usr/sbin/haproxy\0-f\0/etc/haproxy/a.cfg\0");
        proc("11", b"/usr/sbin/haproxy\0-f\0/etc/haproxy/b.cfg\0-Ws\0");
        proc("12", b"/usr/sbin/haproxy\0");
        proc("13", b"");
        // Longer than the bound: compared with nothing, counted by name only.
        let mut long = b"/usr/sbin/haproxy\0-f\0".to_vec();
        long.resize(MAX_CMDLINE + 10, b'x');
        proc("14", &long);
        std::fs::create_dir_all(dir.join("15")).expect("dir");
        std::fs::write(dir.join("15").join("stat"), "15 (haproxy) S 1").expect("no cmdline");
        let entries = [
            by_name("haproxy"),
            with_parameters("haproxy", ParamMatch::Exact, &["-f", "/etc/haproxy/a.cfg"]),
            with_parameters(
                "haproxy",
                ParamMatch::Initial,
                &["-f", "/etc/haproxy/b.cfg"],
            ),
            with_parameters("haproxy", ParamMatch::Partial, &["-f", "/etc/haproxy/"]),
            with_parameters("haproxy", ParamMatch::Exact, &[]),
            with_parameters("haproxy", ParamMatch::Initial, &["-f"]),
        ];
        // Exact with no parameters counts both the process with none and the kernel-thread
        // style empty command line.
        assert_eq!(count(&dir, &entries), [6, 1, 1, 2, 2, 2]);
        let _ = std::fs::remove_dir_all(&dir);
    }

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
        let names = ["vgtrackd", "we (ird) name", "absent"].map(by_name);
        assert_eq!(count(&dir, &names), [2, 1, 0]);
        assert_eq!(count(&dir.join("missing"), &names), [0, 0, 0]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn finds_this_test_process_in_proc() {
        let comm = std::fs::read_to_string("/proc/self/comm").expect("comm");
        let counts = count(Path::new("/proc"), &[by_name(comm.trim_end())]);
        assert!(counts[0] >= 1, "{counts:?}");
    }
}
