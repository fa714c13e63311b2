//! The lab scripts: the DESIGN.md topology comes up, is idempotent, and goes away completely.

use std::process::Command;
use std::time::Duration;
use vipgate_tests::{LabGuard, lab, netns_list, wait_until};

#[test]
fn lab_up_twice_tour_passes_and_down_restores_netns_list() {
    let p = "vtlab1";
    let guard = LabGuard::new(p);
    let before: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| !n.starts_with(p))
        .collect();
    let out = guard.lab("up");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = guard.lab("up");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("already up"));

    let hosts = [
        "isp", "inet", "hq", "web", "br", "brpc", "dir1", "dir2", "rs1", "rs2",
    ];
    let now = netns_list();
    for h in hosts {
        assert!(
            now.contains(&format!("{p}-{h}")),
            "{p}-{h} missing: {now:?}"
        );
    }
    // The web host and the real servers answer GET / with their own names.
    assert_eq!(
        guard
            .try_sh("hq", "curl -sS --max-time 5 http://192.168.101.101/")
            .unwrap()
            .trim(),
        "web"
    );
    assert_eq!(
        guard
            .try_sh("dir1", "curl -sS --max-time 5 http://10.0.0.101/")
            .unwrap()
            .trim(),
        "rs1"
    );
    assert_eq!(
        guard
            .try_sh("dir2", "curl -sS --max-time 5 http://10.0.0.102/")
            .unwrap()
            .trim(),
        "rs2"
    );
    // OpenSSH answers on the web host.
    let banner = guard
        .try_sh(
            "hq",
            "timeout 5 bash -c 'exec 3<>/dev/tcp/192.168.101.101/22; head -c 7 <&3'",
        )
        .unwrap();
    assert_eq!(banner, "SSH-2.0");
    // The isp segment is one L2 network: the internet host reaches every public router.
    for ip in [
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.11",
        "198.51.100.12",
    ] {
        guard.try_sh("inet", &format!("ping -c1 -W2 {ip}")).unwrap();
    }
    // The internet host has no route into the private LANs.
    assert!(
        guard
            .try_sh("inet", "ping -c1 -W1 192.168.101.101")
            .is_err()
    );

    let status = guard.lab("status");
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("198.51.100.200"));
    assert_eq!(status.matches("[vipgate running]").count(), 4, "{status}");

    // The tour proves every scenario: GRE, PAT (HTTP and OpenSSH), LB split, direct routing,
    // failover with a download kept by flow sync, preempt.
    let tour = guard.lab("tour");
    let text = String::from_utf8_lossy(&tour.stdout).into_owned();
    assert!(
        tour.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&tour.stderr)
    );
    assert_eq!(text.matches("[ ok ]").count(), 8, "{text}");
    // One download crosses director1's death, another its return (both kept by flow sync).
    assert!(
        text.contains("finished intact across the failover"),
        "{text}"
    );
    assert!(
        text.contains("finished intact across the fail-back"),
        "{text}"
    );
    assert!(text.contains("rs1 10, rs2 20"), "{text}");
    assert!(text.contains("rs1 5, rs2 5, failed 0"), "{text}");

    let out = guard.lab("down");
    assert!(out.status.success());
    wait_until(
        Duration::from_secs(5),
        "lab namespaces to disappear",
        || {
            netns_list()
                .into_iter()
                .filter(|n| !n.starts_with(p))
                .collect::<Vec<_>>()
                == before
                && !netns_list().iter().any(|n| n.starts_with(p))
        },
    );
    // No daemon of this lab survives, and its state directory is gone.
    let left = Command::new("pgrep")
        .args(["-f", &format!("/run/vipgate-lab/{p}/")])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    assert!(!std::path::Path::new(&format!("/run/vipgate-lab/{p}")).exists());
    // Down again is harmless too.
    assert!(guard.lab("down").status.success());
}

#[test]
fn lab_refuses_bad_prefix() {
    let out = lab(&["up", "--prefix", "bad/prefix"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--prefix must be"));
}
