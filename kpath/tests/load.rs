//! The verifier accepts the programs; attach and unload leave nothing behind. Root only.
// Tests poll the real clock with deadlines.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType, loaded_programs};
use common::{IFACE, in_sandbox};
use kpath::{AttachMode, Direction, KernelPath, LoadOptions, Proto, entries};

fn qdiscs() -> String {
    let out = Command::new("tc")
        .args(["qdisc", "show", "dev", IFACE])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn attached_ids() -> Vec<u32> {
    let (_, progs) = SchedClassifier::query_tcx(IFACE, TcAttachType::Ingress).unwrap();
    progs.iter().map(aya::programs::ProgramInfo::id).collect()
}

/// Waits until `n` programs are attached with tcx: a link whose last reference was its pin is
/// released by the kernel's deferred work (`bpf_link_put`), so the detach lags the unpin a
/// little, more on a loaded machine.
fn wait_attached(n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ids = attached_ids();
        if ids.len() == n {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {ids:?} still attached");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn loaded(ids: &[u32]) -> bool {
    loaded_programs().any(|p| p.is_ok_and(|p| ids.contains(&p.id())))
}

/// Loads, attaches the three programs to kp0 in `mode` (the delivery program normally goes
/// on the TUN; any device takes it), then unloads and checks what is left.
fn attach_and_unload(mode: AttachMode) -> AttachMode {
    in_sandbox(move |_| {
        let mut opts = LoadOptions::new("site-a");
        opts.attach = mode;
        let mut kp = KernelPath::load(&opts).expect("the verifier accepts the programs");
        assert!(!kp.adopted());
        let used = kp.attach(IFACE, Direction::Outbound).unwrap();
        assert_eq!(kp.attach(IFACE, Direction::Inbound).unwrap(), used);
        assert_eq!(kp.attach_delivery(IFACE).unwrap(), used);
        let pin_dir = kp.pin_dir().to_owned();
        assert!(pin_dir.join("kpath_flows").exists());
        let ids = if used == AttachMode::Tcx {
            let ids = attached_ids();
            assert_eq!(ids.len(), 3, "the three programs attached with tcx");
            ids
        } else {
            assert!(qdiscs().contains("clsact"), "{}", qdiscs());
            Vec::new()
        };
        kp.unload().unwrap();
        assert!(!pin_dir.exists(), "pins removed");
        assert!(
            !Path::new("/sys/fs/bpf/vipgate").exists(),
            "pin root removed"
        );
        assert!(!qdiscs().contains("clsact"), "qdisc removed: {}", qdiscs());
        wait_attached(0, "no tcx program left");
        let deadline = Instant::now() + Duration::from_secs(5);
        while loaded(&ids) {
            assert!(
                Instant::now() < deadline,
                "programs still loaded after unload"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        used
    })
}

#[test]
fn tcx_attach_and_unload_leave_nothing() {
    assert_eq!(attach_and_unload(AttachMode::Auto), AttachMode::Tcx);
}

#[test]
fn clsact_attach_and_unload_leave_nothing() {
    assert_eq!(attach_and_unload(AttachMode::Clsact), AttachMode::Clsact);
}

#[test]
fn a_restart_adopts_the_pinned_flows() {
    in_sandbox(|_| {
        let mut opts = LoadOptions::new("site-b");
        opts.max_flows = 4096;
        let mut first = KernelPath::load(&opts).unwrap();
        assert_eq!(first.flow_capacity().unwrap(), 4096);
        let [(key, rewrite), _] = entries(
            Proto::Udp,
            SocketAddrV4::new([192, 168, 1, 2].into(), 5000),
            SocketAddrV4::new([198, 51, 100, 1].into(), 6000),
            SocketAddrV4::new([203, 0, 113, 9].into(), 53),
        );
        first.insert(&key, &rewrite).unwrap();
        first.release();
        // A restart asking for another size adopts the pinned map as it is: the flows in it
        // outlive the restart, the new size waits for a stop that removes the pins.
        opts.max_flows = 8192;
        let second = KernelPath::load(&opts).unwrap();
        assert!(second.adopted());
        assert_eq!(second.flow_capacity().unwrap(), 4096);
        assert_eq!(second.keys().unwrap(), vec![key]);
        assert!(second.report(&key).unwrap().is_some());
        let adopted = second.entries().unwrap();
        assert_eq!(adopted.len(), 1);
        assert_eq!((adopted[0].0, adopted[0].1), (key, rewrite));
        second.unload().unwrap();
    });
}

/// The sync round reads every entry in one batch walk: more entries than one batch call
/// holds (4,096) all come out, each with what a lookup of its own reports.
#[test]
fn one_walk_reports_every_entry() {
    in_sandbox(|_| {
        let mut opts = LoadOptions::new("site-walk");
        opts.max_flows = 16_384;
        let mut kp = KernelPath::load(&opts).unwrap();
        assert!(kp.reports().unwrap().is_empty());
        let mut keys = Vec::new();
        for i in 0..5_000u16 {
            let [(out, out_rw), (inb, inb_rw)] = entries(
                Proto::Udp,
                SocketAddrV4::new([192, 168, 1, 2].into(), 10_000 + i),
                SocketAddrV4::new([198, 51, 100, 1].into(), 20_000 + i),
                SocketAddrV4::new([203, 0, 113, 9].into(), 53),
            );
            kp.insert(&out, &out_rw).unwrap();
            kp.insert(&inb, &inb_rw).unwrap();
            keys.extend([out, inb]);
        }
        let walked = kp.reports().unwrap();
        assert_eq!(walked.len(), 10_000);
        for key in &keys {
            assert_eq!(walked.get(key), kp.report(key).unwrap(), "{key:?}");
        }
        kp.remove(&keys[0]).unwrap();
        let walked = kp.reports().unwrap();
        assert_eq!((walked.len(), walked.get(&keys[0])), (9_999, None));
        kp.unload().unwrap();
    });
}

#[test]
fn a_restart_keeps_the_tcx_links_attached_and_swaps_the_programs_in() {
    in_sandbox(|_| {
        let mut opts = LoadOptions::new("site-c");
        opts.attach = AttachMode::Tcx;
        let mut first = KernelPath::load(&opts).unwrap();
        first.attach(IFACE, Direction::Outbound).unwrap();
        first.attach(IFACE, Direction::Inbound).unwrap();
        let before = attached_ids();
        assert_eq!(before.len(), 2);
        first.leave();
        assert_eq!(
            attached_ids(),
            before,
            "the programs stay attached while no daemon runs"
        );

        // The next run adopts the outbound link only: the inbound one is not configured any
        // more.
        let mut second = KernelPath::load(&opts).unwrap();
        assert!(second.adopted());
        second.attach(IFACE, Direction::Outbound).unwrap();
        assert_eq!(second.adopted_links(), 1);
        let during = attached_ids();
        assert_eq!(during.len(), 2, "no second link: {during:?}");
        assert!(
            !during.contains(&before[0]) || !during.contains(&before[1]),
            "the adopted link runs the new program: {before:?} -> {during:?}"
        );
        assert_eq!(second.detach_unclaimed().unwrap(), 1);
        wait_attached(1, "the unclaimed link is detached");
        let pin_dir = second.pin_dir().to_owned();
        second.unload().unwrap();
        assert!(!pin_dir.exists(), "pins removed");
        wait_attached(0, "no tcx program left");
    });
}

#[test]
fn a_dropped_loader_detaches_its_pinned_links() {
    in_sandbox(|_| {
        let mut opts = LoadOptions::new("site-d");
        opts.attach = AttachMode::Tcx;
        let mut kp = KernelPath::load(&opts).unwrap();
        kp.attach(IFACE, Direction::Outbound).unwrap();
        let pin_dir = kp.pin_dir().to_owned();
        drop(kp);
        wait_attached(0, "no tcx program left");
        let links = std::fs::read_dir(&pin_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("link_")
            })
            .count();
        assert_eq!(links, 0, "no link pin left");
    });
}

#[test]
fn a_bad_site_name_is_refused() {
    for site in ["", "..", "a/b", "x y"] {
        assert!(matches!(
            KernelPath::load(&LoadOptions::new(site)),
            Err(kpath::KpathError::SiteName(_))
        ));
    }
}

/// The daemon loads with CAP_BPF and CAP_NET_ADMIN only (no CAP_SYS_ADMIN, no CAP_PERFMON),
/// which makes the verifier refuse variable offsets into packets and ring memory: the
/// programs must load so.
#[test]
fn the_programs_load_with_the_daemons_capabilities() {
    use caps::{CapSet, Capability};
    in_sandbox(|_| {
        for cap in [Capability::CAP_SYS_ADMIN, Capability::CAP_PERFMON] {
            caps::drop(None, CapSet::Effective, cap).unwrap();
        }
        let kp = KernelPath::load(&LoadOptions::new("unprivileged"))
            .expect("the verifier accepts the programs without CAP_PERFMON");
        kp.unload().unwrap();
    });
}
