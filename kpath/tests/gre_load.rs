//! The verifier accepts the GRE programs; attach (TUN egress, underlay ingress) and unload
//! leave nothing behind. Root only.
// Tests poll the real clock with deadlines.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType, loaded_programs};
use common::{IFACE, in_sandbox};
use kpath::{AttachMode, GrePath, GreProgram, GreTunnelEntry, GreTunnelStats, LoadOptions};

const TUN: &str = "gt0";

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn tcx_ids(iface: &str, hook: TcAttachType) -> Vec<u32> {
    let (_, progs) = SchedClassifier::query_tcx(iface, hook).unwrap();
    progs.iter().map(aya::programs::ProgramInfo::id).collect()
}

fn loaded(ids: &[u32]) -> bool {
    loaded_programs().any(|p| p.is_ok_and(|p| ids.contains(&p.id())))
}

fn entry(tun_ifindex: u32) -> GreTunnelEntry {
    GreTunnelEntry {
        slot: 3,
        tun_ifindex,
        l2: false,
        local: Ipv4Addr::new(10, 200, 0, 1),
        remote: Ipv4Addr::new(10, 200, 0, 2),
        key: Some(42),
        mtu: 1472,
        udp: false,
        egress: None,
    }
}

fn attach_and_unload(mode: AttachMode) -> AttachMode {
    in_sandbox(move |_| {
        sh(&["ip", "tuntap", "add", "mode", "tun", "name", TUN]);
        sh(&["ip", "link", "set", TUN, "up"]);
        let tun_ifindex = nix::net::if_::if_nametoindex(TUN).unwrap();
        let mut opts = LoadOptions::new("hq-gre");
        opts.attach = mode;
        let mut gp = GrePath::load(&opts).expect("the verifier accepts the GRE programs");
        let used = gp.attach(TUN, GreProgram::Encap).unwrap();
        assert_eq!(gp.attach(IFACE, GreProgram::Decap).unwrap(), used);
        assert_eq!(
            gp.attach(IFACE, GreProgram::Decap).unwrap(),
            used,
            "attaching twice is a no-op"
        );
        gp.insert(&entry(tun_ifindex)).unwrap();
        assert_eq!(gp.stats(3).unwrap(), GreTunnelStats::default());
        let pin_dir = gp.pin_dir().to_owned();
        assert!(pin_dir.join("gre_tx_tunnels").exists());
        let ids = if used == AttachMode::Tcx {
            let mut ids = tcx_ids(TUN, TcAttachType::Egress);
            assert_eq!(ids.len(), 1, "encap at the TUN's egress");
            ids.extend(tcx_ids(IFACE, TcAttachType::Ingress));
            assert_eq!(ids.len(), 2, "decap at the underlay's ingress");
            ids
        } else {
            assert!(sh(&["tc", "qdisc", "show", "dev", TUN]).contains("clsact"));
            assert!(sh(&["tc", "qdisc", "show", "dev", IFACE]).contains("clsact"));
            Vec::new()
        };
        gp.remove(&entry(tun_ifindex)).unwrap();
        gp.remove(&entry(tun_ifindex))
            .expect("removing an absent tunnel is no error");
        gp.unload().unwrap();
        assert!(!pin_dir.exists(), "pins removed");
        assert!(
            !Path::new("/sys/fs/bpf/vipgate").exists(),
            "pin root removed"
        );
        for dev in [TUN, IFACE] {
            let q = sh(&["tc", "qdisc", "show", "dev", dev]);
            assert!(!q.contains("clsact"), "qdisc removed from {dev}: {q}");
        }
        assert!(tcx_ids(TUN, TcAttachType::Egress).is_empty());
        assert!(tcx_ids(IFACE, TcAttachType::Ingress).is_empty());
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
fn gre_tcx_attach_and_unload_leave_nothing() {
    assert_eq!(attach_and_unload(AttachMode::Auto), AttachMode::Tcx);
}

#[test]
fn gre_clsact_attach_and_unload_leave_nothing() {
    assert_eq!(attach_and_unload(AttachMode::Clsact), AttachMode::Clsact);
}

/// A daemon killed without unloading leaves its pins; the next load empties them.
#[test]
fn a_new_load_empties_maps_left_pinned() {
    in_sandbox(|ifindex| {
        let opts = LoadOptions::new("left");
        let mut gp = GrePath::load(&opts).unwrap();
        gp.insert(&entry(ifindex)).unwrap();
        drop(gp); // detaches, keeps the pins
        let gp = GrePath::load(&opts).unwrap();
        assert!(gp.pin_dir().join("gre_rx_tunnels").exists());
        // No entry: a packet on the old TUN's ifindex is passed, not encapsulated.
        let frame = [0u8; 60];
        let run = gp.test_run(GreProgram::Encap, &frame, ifindex).unwrap();
        assert_eq!(run.action, kpath::TestRun::PASS);
        assert_eq!(gp.pass_counters().unwrap().tx_no_tunnel, 1);
        gp.unload().unwrap();
    });
}

/// The daemon loads with CAP_BPF and CAP_NET_ADMIN only (no CAP_SYS_ADMIN, no
/// CAP_PERFMON), which makes the verifier refuse variable packet offsets: the programs
/// must load so.
#[test]
fn the_programs_load_with_the_daemons_capabilities() {
    use caps::{CapSet, Capability};
    in_sandbox(|_| {
        for cap in [Capability::CAP_SYS_ADMIN, Capability::CAP_PERFMON] {
            caps::drop(None, CapSet::Effective, cap).unwrap();
        }
        let gp = GrePath::load(&LoadOptions::new("unprivileged"))
            .expect("the verifier accepts the programs without CAP_PERFMON");
        gp.unload().unwrap();
    });
}
