//! UDP virtual services end to end (`proto = "udp"`, ipvsadm `-u`; `one_packet`, `-o`): the
//! topology of `lb.rs` (client, director, rs1..rs3 on br0), whose real servers also run a
//! python3 UDP responder on ports 53 and 5300 answering each datagram with their name (and
//! `ping` with `pong NAME`), silent while a flag file exists.
//!
//! Data paths: each scenario runs on the kernel path (UDP flows are installed into the eBPF
//! program's map at its next sync; an rr/wrr one-packet service's schedule too, after which
//! its datagrams and answers no longer cross the core) and on the TUN path.

use std::collections::HashMap;
use std::time::Duration;

use vipgate_tests::{Topology, vipgate_bin, wait_until};

use super::lb::{CLIENTS, Lab, VIP};

/// `addr port name silent-flag`: answers every datagram with `name` (`ping` with `pong
/// name`), and nothing while the flag file exists.
const RESPONDER_PY: &str = r#"
import os, socket, sys
addr, port, name, silent = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port))
while True:
    data, peer = s.recvfrom(2048)
    if os.path.exists(silent):
        continue
    s.sendto((b"pong " if data == b"ping" else b"") + name.encode(), peer)
"#;

/// `vip port n sources base mode`: `n` queries to `vip:port`, each answer (or `timeout`) on
/// a line; mode `fresh` sends each from a new socket (source address round robin, ports from
/// `base`), mode `one` all from one socket (`sources[0]:base`), mode `slow` as `one` with
/// 50 ms between queries. Connected sockets: an answer from anywhere but `vip:port` is not
/// read.
const QUERY_PY: &str = r#"
import socket, sys, time
vip, port, n, srcs, base, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","), int(sys.argv[5]), sys.argv[6]
def sock(src, sport):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.bind((src, sport))
    s.connect((vip, port))
    return s
def ask(s, i):
    s.send(b"query %d" % i)
    try:
        return s.recv(2048).decode()
    except OSError as e:
        return "timeout" if isinstance(e, socket.timeout) else "error"
one = sock(srcs[0], base) if mode in ("one", "slow") else None
for i in range(n):
    s = one or sock(srcs[i % len(srcs)], base + i)
    print(ask(s, i), flush=True)
    if mode == "slow":
        time.sleep(0.05)
    if not one:
        s.close()
"#;

/// A [`Lab`] whose real servers answer UDP on 53 and 5300.
struct UdpLab {
    lab: Lab,
    _responders: Vec<vipgate_tests::Proc>,
    next_port: u32,
}

impl UdpLab {
    fn new(t: Topology, services: &str, datapath: &'static str) -> UdpLab {
        let lab = Lab::new(t, 3, services, datapath);
        let script = lab.t.write("responder.py", RESPONDER_PY);
        lab.t.write("query.py", QUERY_PY);
        let mut responders = Vec::new();
        for i in 1..=3 {
            let rs = format!("rs{i}");
            for port in ["53", "5300"] {
                responders.push(
                    lab.t.spawn(
                        &rs,
                        &format!("udp-{rs}-{port}"),
                        &[
                            "python3",
                            script.to_str().unwrap_or(""),
                            &format!("10.0.0.10{i}"),
                            port,
                            &rs,
                            lab.t
                                .dir()
                                .join(format!("silent-{rs}"))
                                .to_str()
                                .unwrap_or(""),
                        ],
                    ),
                );
                wait_until(
                    Duration::from_secs(30),
                    &format!("{rs} to listen on udp {port}"),
                    || {
                        lab.t
                            .try_sh(&rs, &format!("ss -Huln 'sport = :{port}'"))
                            .is_ok_and(|out| !out.trim().is_empty())
                    },
                );
            }
        }
        UdpLab {
            lab,
            _responders: responders,
            next_port: 30_000,
        }
    }

    /// Packets the kernel sent into `nat0` (to the core) so far.
    fn nat0_tx_packets(&self) -> u64 {
        self.lab
            .t
            .sh("dir", "cat /sys/class/net/nat0/statistics/tx_packets")
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("nat0 tx_packets: {e}"))
    }

    /// The answers to `n` queries to `VIP:port` (mode `fresh` or `one`, see [`QUERY_PY`]).
    fn query(&mut self, port: u16, n: usize, mode: &str) -> Vec<String> {
        let base = self.next_port;
        self.next_port += n as u32;
        let script = self.lab.t.dir().join("query.py");
        let out = self
            .lab
            .t
            .try_sh(
                "cl",
                &format!(
                    "python3 {} {VIP} {port} {n} {CLIENTS} {base} {mode}",
                    script.display()
                ),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "query failed: {e}\nvipgate log:\n{}",
                    self.lab.vipgate.log()
                )
            });
        out.lines().map(str::to_owned).collect()
    }

    /// The service called `name` in `show lb --json`.
    fn service(&self, name: &str) -> serde_json::Value {
        let json = self.lab.json();
        json.as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no service {name} in {json}"))
    }
}

fn count(answers: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for a in answers {
        *m.entry(a.clone()).or_default() += 1;
    }
    m
}

fn backends(port: u16, weights: &[u32]) -> String {
    let items: Vec<String> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                "{{ address = \"10.0.0.10{}:{port}\", weight = {w} }}",
                i + 1
            )
        })
        .collect();
    format!("backends = [{}]\n", items.join(", "))
}

on_both_datapaths!(
    udp_flows_are_spread_by_weight_and_stick:
    udp_flows_are_spread_by_weight_and_stick_kernel,
    udp_flows_are_spread_by_weight_and_stick_tun
);

/// wrr 1:2:3 over three UDP responders: 30 fresh client sockets split exactly 5/10/15, each
/// answer comes from the VIP, the flows are listed as UDP, and a TCP check on another port
/// (the real servers' HTTP) keeps them up.
fn udp_flows_are_spread_by_weight_and_stick(t: Topology, datapath: &'static str) {
    let services = format!(
        "[[service]]\nname = \"echo\"\nlisten = \"{VIP}:5300\"\nproto = \"udp\"\nscheduler = \"wrr\"\n\
         health = {{ kind = \"tcp\", port = 80, interval = \"500ms\", timeout = \"400ms\" }}\n{}",
        backends(5300, &[1, 2, 3])
    );
    let mut lab = UdpLab::new(t, &services, datapath);
    let split = count(&lab.query(5300, 30, "fresh"));
    assert_eq!(
        (split.get("rs1"), split.get("rs2"), split.get("rs3")),
        (Some(&5), Some(&10), Some(&15)),
        "wrr 1:2:3: {split:?}"
    );
    let show = lab.lab.show();
    assert!(
        show.contains(&format!("UDP  {VIP}:5300 wrr check tcp port 80")),
        "{show}"
    );
    let echo = lab.service("echo");
    assert_eq!(echo["protocol"], "udp");
    assert_eq!(echo["one_packet"], false);
    // UDP flows count as inactive (as ipvsadm shows them) until they expire.
    let inactive: u64 = echo["backends"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["inactive"].as_u64()).sum())
        .unwrap_or(0);
    assert_eq!(inactive, 30, "{echo}");
    // One socket's datagrams stay on its flow's backend.
    let sticky = count(&lab.query(5300, 20, "one"));
    assert_eq!(sticky.len(), 1, "one flow, one backend: {sticky:?}");
    let conns = lab.lab.t.vipgate_output(
        "dir",
        &[
            "show",
            "lb",
            "--connections",
            "--service",
            "echo",
            "--control",
            &lab.lab.control,
        ],
    );
    let conns = String::from_utf8_lossy(&conns.stdout);
    assert_eq!(
        conns
            .lines()
            .filter(|l| l.starts_with("UDP ") && l.contains(&format!("{VIP}:5300")))
            .count(),
        31,
        "{conns}"
    );
    if datapath == "kernel" {
        // A flow is the kernel program's once installed (at its next 200 ms sync): the later
        // datagrams of a socket that keeps talking bypass the core.
        let answers = count(&lab.query(5300, 20, "slow"));
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert!(!answers.contains_key("timeout"), "{answers:?}");
        wait_until(
            Duration::from_secs(5),
            "the kernel path to report UDP service packets",
            || {
                lab.service("echo")["fast_path"]["packets"]
                    .as_u64()
                    .is_some_and(|p| p > 0)
            },
        );
    }
}

on_both_datapaths!(
    one_packet_spreads_the_datagrams_of_one_socket:
    one_packet_spreads_the_datagrams_of_one_socket_kernel,
    one_packet_spreads_the_datagrams_of_one_socket_tun
);

/// DNS-like: 30 datagrams from ONE client socket to a one-packet service are spread 10/10/10
/// by rr (each answer from the VIP), and no flow is made; the same to a flow service all go
/// to one backend.
fn one_packet_spreads_the_datagrams_of_one_socket(t: Topology, datapath: &'static str) {
    let services = format!(
        "[[service]]\nname = \"dns\"\nlisten = \"{VIP}:53\"\nproto = \"udp\"\none_packet = true\n\
         scheduler = \"rr\"\n{}\n\
         [[service]]\nname = \"flows\"\nlisten = \"{VIP}:5300\"\nproto = \"udp\"\nscheduler = \"rr\"\n{}",
        backends(53, &[1, 1, 1]),
        backends(5300, &[1, 1, 1])
    );
    let mut lab = UdpLab::new(t, &services, datapath);
    let kernel = datapath == "kernel";
    if kernel {
        // The kernel program holds the service's schedule from the first sync on; its
        // cursor is one for every CPU, so the rotation is exact wherever the datagrams are
        // handled (a veth's NAPI may poll a socket's first datagram on the other CPU).
        wait_until(
            Duration::from_secs(5),
            "the one-packet schedule in the kernel",
            || lab.service("dns")["fast_path"]["one_packet_services"] == 1,
        );
    }
    let nat0_before = lab.nat0_tx_packets();
    let split = count(&lab.query(53, 30, "one"));
    let nat0_crossed = lab.nat0_tx_packets() - nat0_before;
    assert_eq!(
        (split.get("rs1"), split.get("rs2"), split.get("rs3")),
        (Some(&10), Some(&10), Some(&10)),
        "one-packet rr from one socket: {split:?}"
    );
    if kernel {
        assert_eq!(nat0_crossed, 0, "no one-packet datagram crossed nat0");
        let fast = &lab.service("dns")["fast_path"];
        assert_eq!(
            (&fast["one_packet_in"], &fast["one_packet_out"]),
            (&30.into(), &30.into()),
            "the program carried them: {fast}"
        );
        // What the program carried reaches the core's counters at the next sync.
        wait_until(
            Duration::from_secs(5),
            "show lb to count the kernel's datagrams",
            || {
                lab.service("dns")["backends"]
                    .as_array()
                    .is_some_and(|b| b.iter().all(|b| b["counters"]["packets_out"] == 10))
            },
        );
    } else {
        assert!(
            nat0_crossed >= 30,
            "every datagram crossed nat0: {nat0_crossed}"
        );
    }
    let stuck = count(&lab.query(5300, 30, "one"));
    assert_eq!(stuck.len(), 1, "without one_packet one flow: {stuck:?}");
    let dns = lab.service("dns");
    assert_eq!(dns["one_packet"], true);
    let per_backend: Vec<(u64, u64, u64)> = dns["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .map(|b| {
                    (
                        b["counters"]["connections"].as_u64().unwrap_or(0),
                        b["counters"]["packets_out"].as_u64().unwrap_or(0),
                        b["inactive"].as_u64().unwrap_or(u64::MAX),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(per_backend, [(10, 10, 0); 3], "{dns}");
    let show = lab.lab.show();
    assert!(
        show.contains(&format!("UDP  {VIP}:53 rr ops  (dns)")),
        "{show}"
    );
    let conns = lab.lab.t.vipgate_output(
        "dir",
        &[
            "show",
            "lb",
            "--connections",
            "--service",
            "dns",
            "--json",
            "--control",
            &lab.lab.control,
        ],
    );
    let conns: serde_json::Value = serde_json::from_slice(&conns.stdout).unwrap_or_default();
    assert_eq!(conns["matched"], 0, "no flows: {conns}");
}

on_both_datapaths!(
    a_udp_check_takes_a_silent_backend_out_and_back:
    a_udp_check_takes_a_silent_backend_out_and_back_kernel,
    a_udp_check_takes_a_silent_backend_out_and_back_tun
);

/// `kind = "udp"`: a backend that stops answering `ping` goes down within interval x fall,
/// gets no datagrams while down, and comes back when it answers again.
fn a_udp_check_takes_a_silent_backend_out_and_back(t: Topology, datapath: &'static str) {
    let services = format!(
        "[[service]]\nname = \"dns\"\nlisten = \"{VIP}:53\"\nproto = \"udp\"\none_packet = true\n\
         scheduler = \"rr\"\n\
         health = {{ kind = \"udp\", send = \"ping\", expect = \"pong\", interval = \"500ms\", timeout = \"400ms\", rise = 2, fall = 2 }}\n{}",
        backends(53, &[1, 1])
    );
    let mut lab = UdpLab::new(t, &services, datapath);
    let all_up = |lab: &UdpLab| {
        lab.lab.backend("10.0.0.101:53").0 == "up" && lab.lab.backend("10.0.0.102:53").0 == "up"
    };
    wait_until(Duration::from_secs(10), "both backends up", || all_up(&lab));
    // On the kernel path the program follows a state change at the core's next sync (≤ 200 ms):
    // the datagrams of that moment still follow the schedule before it.
    let kernel = datapath == "kernel";
    let both = |lab: &mut UdpLab| count(&lab.query(53, 10, "one")).len() == 2;
    if kernel {
        wait_until(
            Duration::from_secs(5),
            "both backends in the schedule",
            || both(&mut lab),
        );
    } else {
        assert!(both(&mut lab));
    }

    let flag = lab.lab.t.write("silent-rs2", "");
    wait_until(Duration::from_secs(5), "the silent rs2 to go down", || {
        lab.lab.backend("10.0.0.102:53").0 == "down"
    });
    let show = lab.lab.show();
    assert!(show.contains("last: timeout"), "{show}");
    let only_rs1 = |lab: &mut UdpLab| count(&lab.query(53, 10, "one")).get("rs1") == Some(&10);
    if kernel {
        wait_until(
            Duration::from_secs(5),
            "nothing for the down backend once the schedule follows",
            || only_rs1(&mut lab),
        );
    } else {
        assert!(only_rs1(&mut lab), "nothing for the down backend");
    }

    std::fs::remove_file(&flag).expect("removing the flag");
    wait_until(Duration::from_secs(5), "rs2 back after rise checks", || {
        all_up(&lab)
    });
    if kernel {
        wait_until(Duration::from_secs(5), "rs2 back in the schedule", || {
            both(&mut lab)
        });
    } else {
        assert!(both(&mut lab));
    }
}

/// `vipgate check` as the user runs it: the file's text and the messages.
fn check(text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("vipgate-check-udp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let file = dir.join("site.toml");
    std::fs::write(&file, text).expect("writing the file");
    let out = std::process::Command::new(vipgate_bin())
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .expect("running vipgate check");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "vipgate check accepted:\n{text}");
    String::from_utf8_lossy(&out.stderr).replace(file.to_str().unwrap_or("?"), "site.toml")
        + &String::from_utf8_lossy(&out.stdout).replace(file.to_str().unwrap_or("?"), "site.toml")
}

#[test]
fn check_refuses_what_udp_services_cannot_do_with_its_position() {
    let svc = |extra: &str| {
        format!(
            "[[service]]\nname = \"dns\"\nlisten = \"{VIP}:53\"\n{extra}\nbackends = [{{ address = \"10.0.0.101:53\" }}]\n"
        )
    };
    let cases = [
        (
            svc("proto = \"sctp\""),
            "site.toml:4:9: proto must be \"tcp\" (ipvsadm -t) or \"udp\" (ipvsadm -u), not \"sctp\"",
        ),
        (
            svc("one_packet = true"),
            "site.toml:4:14: one_packet needs proto = \"udp\"",
        ),
        (
            svc("proto = \"udp\"\nforward = \"dr\""),
            "site.toml:5:11: forward = \"dr\" carries tcp services only",
        ),
        (
            svc("proto = \"udp\"\nhealth = { kind = \"http\" }"),
            "site.toml:4:9: service `dns` is udp: a tcp, http or https health check of it needs port",
        ),
        (
            svc("proto = \"udp\"\nhealth = { kind = \"udp\", expect = \"ok\" }"),
            "site.toml:2:8: service `dns`: a udp health check needs send",
        ),
        (
            svc("health = { kind = \"tcp\", send = \"x\", port = 80 }"),
            "site.toml:4:33: send needs kind = \"udp\"",
        ),
    ];
    for (text, message) in cases {
        let out = check(&text);
        assert!(
            out.contains(message),
            "want {message}\ngot {out}\nfor\n{text}"
        );
    }
}
