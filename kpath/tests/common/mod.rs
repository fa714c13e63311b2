//! A private network and mount namespace per test: a veth pair `kp0`/`kp1` with `kp0` (10.200.0.1/24,
//! default route through it, forwarding on) and a bpffs of its own at /sys/fs/bpf, so tests
//! run in parallel and leave nothing on the host. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
#![allow(dead_code, unreachable_pub)] // each test file uses part of it

use std::process::Command;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

pub const IFACE: &str = "kp0";

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect(args[0]);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread of its own inside fresh namespaces (they vanish with the thread).
pub fn in_sandbox<T: Send + 'static>(f: impl FnOnce(u32) -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect("unshare (root?)");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("private mounts");
        mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("bpffs");
        run(&["ip", "link", "set", "lo", "up"]);
        run(&[
            "ip", "link", "add", IFACE, "type", "veth", "peer", "name", "kp1",
        ]);
        run(&["ip", "link", "set", "kp1", "up"]);
        run(&["ip", "link", "set", IFACE, "up"]);
        run(&["ip", "addr", "add", "10.200.0.1/24", "dev", IFACE]);
        run(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "10.200.0.2",
            "dev",
            IFACE,
        ]);
        std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").expect("forwarding");
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{IFACE}/forwarding"), "1")
            .expect("forwarding");
        let ifindex = nix::net::if_::if_nametoindex(IFACE).expect("ifindex");
        f(ifindex)
    })
    .join()
    .expect("sandboxed test panicked")
}
