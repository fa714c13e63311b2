//! Multi-port virtual services end to end (issue #19; LVS's firewall-mark services,
//! keepalived's `virtual_server fwmark` / `virtual_server_group`): one `[[service]]` on
//! several ports of the VIP, with real servers that listen on each port (python3
//! http.server answering `rsN:PORT`) behind `lb::Lab`'s director.
//!
//! Both tests run on both data paths: the kernel program moves the established flows of
//! every port as it does a single-port service's, and the TUN path carries every packet.

use std::time::Duration;

use vipgate_tests::{Proc, Topology, wait_until};

use super::lb::{CLIENTS, Lab, VIP, count};

/// `rs1` and `rs2` also serve HTTP on each of `ports`, answering `rsN:PORT` (Lab's own
/// servers on port 80 answer `rsN`).
fn serve_ports(lab: &Lab, ports: &[u16]) -> Vec<Proc> {
    let mut servers = Vec::new();
    for i in 1..=2 {
        for &port in ports {
            let rs = format!("rs{i}");
            servers.push(lab.t.http_server(
                &rs,
                &format!("10.0.0.10{i}"),
                port,
                &format!("{rs}:{port}"),
            ));
        }
    }
    servers
}

on_both_datapaths!(
    a_clients_http_and_https_reach_one_real_server:
    a_clients_http_and_https_reach_one_real_server_kernel,
    a_clients_http_and_https_reach_one_real_server_tun
);

/// The pairing: `ports = [80, 443]` with persistence, rr over two port-less real
/// servers. Each of three clients' connections to :80 and then to :443 land on the same
/// real server, on the port the client asked for; the clients spread over both servers;
/// `show lb` prints the ports and counts every connection on the port-less backends.
fn a_clients_http_and_https_reach_one_real_server(t: Topology, datapath: &'static str) {
    let service = format!(
        "[[service]]\nname = \"web\"\nlisten = \"{VIP}\"\nports = [80, 443]\nscheduler = \"rr\"\n\
         persistence = \"300s\"\n\
         backends = [{{ address = \"10.0.0.101\" }}, {{ address = \"10.0.0.102\" }}]\n"
    );
    let lab = Lab::new(t, 2, &service, datapath);
    let _servers = serve_ports(&lab, &[443]);
    let web = lab.connect(80, 6, CLIENTS);
    let tls = lab.connect(443, 6, CLIENTS);
    // Connection i comes from CLIENTS[i % 3]: each client's :80 and :443 answers name
    // one server.
    for (i, (w, s)) in web.iter().zip(&tls).enumerate() {
        assert_eq!(
            format!("{w}:443"),
            *s,
            "client {} reached {w} on :80 and {s} on :443 ({web:?} / {tls:?})",
            i % 3
        );
    }
    let spread = count(&web);
    assert!(
        spread.contains_key("rs1") && spread.contains_key("rs2"),
        "three clients spread over both servers: {spread:?}"
    );
    let text = lab.show();
    assert!(
        text.contains(&format!("TCP  {VIP}:80,443 rr persistent 300")),
        "{text}"
    );
    let json = lab.json();
    assert_eq!(
        json[0]["ports"],
        serde_json::json!([{"first": 80, "last": 80}, {"first": 443, "last": 443}]),
        "{json}"
    );
    let conns: u64 = (1..=2)
        .map(|i| lab.backend(&format!("10.0.0.10{i}:0")).4)
        .sum();
    assert_eq!(conns, 12, "show lb counts both ports' connections:\n{text}");
    // `--connections` lists them with the port the client used.
    let out = lab.t.vipgate_output(
        "dir",
        &["show", "lb", "--connections", "--control", &lab.control],
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listing.contains(&format!("{VIP}:443")),
        "{listing}"
    );
}

on_both_datapaths!(
    a_port_range_reaches_its_rports_and_a_reload_adds_a_port:
    a_port_range_reaches_its_rports_and_a_reload_adds_a_port_kernel,
    a_port_range_reaches_its_rports_and_a_reload_adds_a_port_tun
);

/// A range with an rport shift (`8000-8001` → `9000-9001`) beside a port kept as is (80):
/// each VIP port reaches its backend port. A reload that widens the range to `8000-8002`
/// (→ 9002) answers on the new port at once, as an iptables MARK rule change does under
/// ipvsadm, while a running transfer on 8000 goes on.
fn a_port_range_reaches_its_rports_and_a_reload_adds_a_port(t: Topology, datapath: &'static str) {
    let service = format!(
        "[[service]]\nname = \"range\"\nlisten = \"{VIP}\"\nports = [80, \"8000-8001\"]\n\
         rports = {{ 8000-8001 = 9000 }}\nscheduler = \"rr\"\n\
         backends = [{{ address = \"10.0.0.101\" }}, {{ address = \"10.0.0.102\" }}]\n"
    );
    let lab = Lab::new(t, 2, &service, datapath);
    let _servers = serve_ports(&lab, &[9000, 9001, 9002]);
    for (port, body) in [(80, ""), (8000, ":9000"), (8001, ":9001")] {
        let answers = count(&lab.connect(port, 4, CLIENTS));
        assert_eq!(
            (
                answers.get(&format!("rs1{body}")),
                answers.get(&format!("rs2{body}"))
            ),
            (Some(&2), Some(&2)),
            "VIP:{port} reaches each server's port {body:?} by rr: {answers:?}"
        );
    }
    // Not a port of the service (8002 yet): refused by the director's own stack.
    assert!(
        lab.t
            .try_sh("cl", &format!("curl -sS --max-time 3 http://{VIP}:8002/"))
            .is_err()
    );

    let big = lab.t.dir().join("www-rs1-9000/big.bin");
    std::fs::write(&big, vec![7u8; 4 << 20]).expect("writing the big file");
    std::fs::write(lab.t.dir().join("www-rs2-9000/big.bin"), vec![7u8; 4 << 20])
        .expect("writing the big file");
    let mut transfer = lab.t.spawn(
        "cl",
        "transfer",
        &[
            "curl",
            "-sS",
            "--limit-rate",
            "1M",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("http://{VIP}:8000/big.bin"),
        ],
    );
    wait_until(
        Duration::from_secs(10),
        "the transfer to be established",
        || {
            (1..=2)
                .map(|i| lab.backend(&format!("10.0.0.10{i}:0")).2)
                .sum::<u64>()
                == 1
        },
    );
    let text = std::fs::read_to_string(&lab.config).expect("reading the config");
    std::fs::write(&lab.config, text.replace("8000-8001", "8000-8002"))
        .expect("rewriting the config");
    lab.vipgate.signal(1); // SIGHUP
    wait_until(Duration::from_secs(10), "the reload to apply", || {
        lab.show().contains(&format!("{VIP}:80,8000-8002 rr"))
    });
    assert!(
        transfer.is_running(),
        "the transfer must still be running across the reload"
    );
    let answers = count(&lab.connect(8002, 2, CLIENTS));
    assert_eq!(
        (answers.get("rs1:9002"), answers.get("rs2:9002")),
        (Some(&1), Some(&1)),
        "the new port answers on its rport: {answers:?}"
    );
    assert_eq!(transfer.wait_exit(Duration::from_secs(30)), Some(0));
    assert_eq!(transfer.log().trim(), (4u64 << 20).to_string());
}
