//! PAT gateway end to end: the HQ side of the lab in namespaces, vipgate on the router, real
//! clients and servers (curl, python http.server, OpenSSH, iperf3, ping, traceroute).
//!
//! ```text
//!   pc 192.168.101.10 ─┐                       ┌─ out  198.51.100.200 (servers)
//!                      ├─ eth1 gw eth0 ── isp ─┤
//!  web 192.168.101.101 ┘  .1      .1  (bridge) └─ out2 198.51.100.201 (and .66, a "bad" host)
//! ```
//!
//! Data paths: the forwards, dynamic PAT (with two TUN queues), the ACL and unsolicited
//! inbound, and a live reload run on both (`_kernel`: established flows in the eBPF program;
//! `_tun`: every packet through `nat0`). The table flood (new flows only, which the core
//! handles on either path) and the kernel path's own transfer and unload test run on the
//! kernel path, the default.

use serde_json::Value;
use std::time::Duration;
use vipgate_tests::{Proc, Show, Topology, counter, e2e, wait_for, wait_until};

const PUBLIC: &str = "198.51.100.1";
const T: Duration = Duration::from_secs(30);

struct Hq {
    topo: Topology,
    _vipgate: Proc,
    config: String,
}

/// Builds the topology and starts `vipgate run` on gw with `[nat]` plus `extra` keys.
fn hq(t: Topology, extra: &str) -> Hq {
    let (t, path) = hq_site(t, extra);
    let vipgate = t.vipgate("gw", "vipgate", &["run", "-c", &path]);
    hq_running(t, vipgate, path)
}

/// Builds the topology and writes the site config; returns its path.
fn hq_site(mut t: Topology, extra: &str) -> (Topology, String) {
    t.hosts(&["pc", "web", "gw", "isp", "out", "out2"]);
    t.bridge("gw", "eth1").bridge("isp", "br0");
    t.veth("gw", "lpc", "pc", "eth0")
        .veth("gw", "lweb", "web", "eth0");
    t.ip("gw", "link set lpc master eth1");
    t.ip("gw", "link set lweb master eth1");
    t.veth("gw", "eth0", "isp", "pgw")
        .veth("out", "eth0", "isp", "pout")
        .veth("out2", "eth0", "isp", "pout2");
    for p in ["pgw", "pout", "pout2"] {
        t.ip("isp", &format!("link set {p} master br0"));
    }
    t.addr("pc", "eth0", "192.168.101.10/24")
        .addr("web", "eth0", "192.168.101.101/24");
    t.addr("gw", "eth1", "192.168.101.1/24")
        .addr("gw", "eth0", "198.51.100.1/24");
    t.addr("out", "eth0", "198.51.100.200/24")
        .addr("out2", "eth0", "198.51.100.201/24");
    t.addr("out2", "eth0", "198.51.100.66/24");
    t.ip("pc", "route add default via 192.168.101.1");
    t.ip("web", "route add default via 192.168.101.1");
    t.forwarding("gw");
    let sock = t.dir().join("vipgate.sock");
    let config = format!(
        r#"[daemon]
control = "{}"

[nat]
inside = ["eth1"]
outside = "eth0"
address = "{PUBLIC}"
{extra}

[[nat.acl]]
action = "deny"
src = "192.168.101.66/32"

[[nat.acl]]
action = "deny"
src = "198.51.100.66/32"

[[nat.acl]]
action = "permit"
src = "192.168.101.0/24"

[[nat.static]]
proto = "tcp"
outside_port = 8001
inside = "192.168.101.101:80"

[[nat.static]]
proto = "tcp"
outside_port = 20022
inside = "192.168.101.101:22"
"#,
        sock.display()
    );
    let path = t.write("site.toml", &config);
    (t, path.to_str().unwrap().to_owned())
}

/// Waits until `vipgate` (running the site at `path`) answers.
fn hq_running(t: Topology, vipgate: Proc, path: String) -> Hq {
    wait_until(T, "vipgate to answer show nat", || {
        t.vipgate_output("gw", &["show", "nat", "--json", "-c", &path])
            .status
            .success()
    });
    Hq {
        topo: t,
        _vipgate: vipgate,
        config: path,
    }
}

impl Hq {
    /// The gateway's part of `show nat --json`.
    fn show(&self) -> Value {
        let ctl = self.topo.dir().join("vipgate.sock");
        self.topo.show("gw", ctl, Show::Nat)[0].take()
    }

    fn show_text(&self) -> String {
        let out = self
            .topo
            .vipgate_output("gw", &["show", "nat", "-c", &self.config]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A UDP request from `host` (bound to `port`) to `dst`; returns the reply.
    fn udp(&self, host: &str, port: u16, dst: &str, dport: u16) -> Result<String, String> {
        self.topo.try_sh(
            host,
            &format!(
                "python3 -c \"import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);\
s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('',{port}));s.settimeout(2);\
s.sendto(b'hi',('{dst}',{dport}));print(s.recvfrom(100)[0].decode())\""
            ),
        )
    }

    /// A UDP server on `host:port` that answers each datagram with the sender's ip:port.
    fn udp_echo_peer(&self, host: &str, addr: &str, port: u16) -> Proc {
        let p = self.udp_echo_peer_unchecked(host, addr, port);
        wait_until(T, &format!("udp server {addr}:{port}"), || {
            self.topo
                .try_sh(
                    host,
                    &format!("ss -Hlun 'sport = :{port}' | grep -q {port}"),
                )
                .is_ok()
        });
        p
    }

    fn udp_echo_peer_unchecked(&self, host: &str, addr: &str, port: u16) -> Proc {
        let code = format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{addr}',{port}))\n\
while True:\n  d,a=s.recvfrom(100)\n  s.sendto(('%s:%d'%a).encode(),a)\n"
        );
        let script = self.topo.write(&format!("udp-{host}-{port}.py"), &code);
        self.topo.spawn(
            host,
            &format!("udp-{host}-{port}"),
            &["python3", "-u", script.to_str().unwrap()],
        )
    }
}

on_both_datapaths!(
    static_forwards_reach_web_and_sshd:
    static_forwards_reach_web_and_sshd_kernel,
    static_forwards_reach_web_and_sshd_tun
);

fn static_forwards_reach_web_and_sshd(t: Topology, datapath: &str) {
    let hq = hq(t, &format!("datapath = \"{datapath}\""));
    assert_eq!(hq.show()["datapath"], datapath);
    let t = &hq.topo;
    let _web = t.http_server("web", "192.168.101.101", 80, "hello from web");
    let body = t
        .curl("out", &format!("http://{PUBLIC}:8001/"))
        .expect("curl through the forward");
    assert_eq!(body.trim(), "hello from web");

    // A test-started OpenSSH sshd on web:22, key auth only; the client uses the public port.
    let d = t.dir().to_str().unwrap().to_owned();
    t.sh("gw", &format!("ssh-keygen -q -t ed25519 -N '' -f {d}/host_key && ssh-keygen -q -t ed25519 -N '' -f {d}/id"));
    t.sh(
        "gw",
        &format!(
            "cp {d}/id.pub {d}/authorized_keys && chmod 600 {d}/authorized_keys {d}/id {d}/host_key"
        ),
    );
    let sshd_cfg = t.write(
        "sshd_config",
        &format!(
            "ListenAddress 192.168.101.101:22\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\n\
UsePAM no\nPidFile {d}/sshd.pid\n"
        ),
    );
    t.sh("web", "mkdir -p /run/sshd");
    let _sshd = t.spawn(
        "web",
        "sshd",
        &[
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            sshd_cfg.to_str().unwrap(),
        ],
    );
    t.wait_tcp("web", "192.168.101.101", 22, T);
    let out = t.sh(
        "out",
        &format!(
            "ssh -p 20022 -i {d}/id -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
-o ConnectTimeout=5 root@{PUBLIC} 'ip -4 -o addr show dev eth0'"
        ),
    );
    assert!(
        out.contains("192.168.101.101"),
        "the command ran on web: {out}"
    );

    let v = hq.show();
    let statics: Vec<&Value> = v["translations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["listener"].is_null())
        .collect();
    assert!(
        statics
            .iter()
            .any(|t| t["inside_global"] == "198.51.100.1:8001"),
        "{v}"
    );
    assert!(
        statics
            .iter()
            .any(|t| t["inside_global"] == "198.51.100.1:20022"),
        "{v}"
    );
    assert!(hq.show_text().contains("Inside global"));
}

on_both_datapaths!(
    overload_many_hosts_eim_ping_traceroute:
    overload_many_hosts_eim_ping_traceroute_kernel,
    overload_many_hosts_eim_ping_traceroute_tun
);

fn overload_many_hosts_eim_ping_traceroute(t: Topology, datapath: &str) {
    // Two TUN queues: flows and their replies may be read on either, one table serves both
    // (on the kernel path the TUN still carries every flow's first packets, ICMP and
    // traceroute's expiring TTLs).
    let hq = hq(t, &format!("queues = 2\ndatapath = \"{datapath}\""));
    assert_eq!(hq.show()["tun_queues"], 2);
    assert_eq!(hq.show()["datapath"], datapath);
    let t = &hq.topo;
    let http = t.http_server("out", "198.51.100.200", 8080, "outside");
    let _u1 = hq.udp_echo_peer("out", "198.51.100.200", 7000);
    let _u2 = hq.udp_echo_peer("out2", "198.51.100.201", 7000);
    t.wait_tcp("out", "198.51.100.200", 8080, T);

    // Several inside hosts at once, TCP and UDP; the server sees the public address.
    for host in ["pc", "web"] {
        assert_eq!(
            t.curl(host, "http://198.51.100.200:8080/").unwrap().trim(),
            "outside"
        );
    }
    let log = wait_for(T, "http.server to log both clients", || {
        let log = http.log();
        (log.matches("GET / ").count() >= 2).then_some(log)
    });
    assert!(
        log.lines()
            .filter(|l| l.contains("GET / "))
            .all(|l| l.starts_with(PUBLIC)),
        "{log}"
    );
    let seen_pc = hq
        .udp("pc", 40000, "198.51.100.200", 7000)
        .expect("udp from pc");
    let seen_web = hq
        .udp("web", 40000, "198.51.100.200", 7000)
        .expect("udp from web");
    assert!(
        seen_pc.trim().starts_with("198.51.100.1:") && seen_web.trim().starts_with("198.51.100.1:")
    );
    assert_eq!(
        seen_pc.trim(),
        "198.51.100.1:40000",
        "port preserved for the first"
    );
    assert_ne!(seen_pc.trim(), seen_web.trim(), "no port overloading");

    // Endpoint-independent mapping: the same socket seen with the same port by both servers.
    let seen_other = hq
        .udp("pc", 40000, "198.51.100.201", 7000)
        .expect("udp to out2");
    assert_eq!(seen_other.trim(), seen_pc.trim());

    // The ports seen outside are those show nat lists.
    let v = hq.show();
    let tr = v["translations"].as_array().unwrap();
    for (inside, seen) in [
        ("192.168.101.10:40000", &seen_pc),
        ("192.168.101.101:40000", &seen_web),
    ] {
        assert!(
            tr.iter().any(|x| x["proto"] == "udp"
                && x["inside_local"] == inside
                && x["inside_global"] == seen.trim()),
            "{inside} as {seen} in {v}"
        );
    }

    // ICMP: ping, and traceroute (its answers are ICMP errors translated back).
    t.sh("pc", "ping -c 2 -W 2 198.51.100.200");
    // 3,000-byte echoes leave and come back in three fragments each, later fragments
    // translated like their first.
    let before = counter(&hq.show(), &["counters", "translated_out"]);
    t.sh("pc", "ping -c 2 -W 2 -s 3000 198.51.100.200");
    let v = hq.show();
    assert!(
        counter(&v, &["counters", "translated_out"]) >= before + 6,
        "every fragment crossed nat0: {v}"
    );
    assert_eq!(counter(&v, &["counters", "drops", "fragment"]), 0);
    let trace = t.sh("pc", "traceroute -n -q 1 -w 2 -m 5 198.51.100.200");
    let hops: Vec<&str> = trace.lines().skip(1).collect();
    assert_eq!(hops.len(), 2, "gateway then server, nothing lost: {trace}");
    assert!(
        hops[0].contains("192.168.101.1") && hops[1].contains("198.51.100.200"),
        "{trace}"
    );
    assert!(counter(&hq.show(), &["counters", "icmp_errors"]) > 0);

    // nat clear flushes the dynamic entries; the static forwards stay.
    let out = t.vipgate_output("gw", &["nat", "clear", "-c", &hq.config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = hq.show();
    assert!(
        v["translations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| !t["listener"].is_null()),
        "{v}"
    );
    assert_eq!(
        t.curl("pc", "http://198.51.100.200:8080/").unwrap().trim(),
        "outside"
    );
}

on_both_datapaths!(
    unsolicited_inbound_dropped_and_acl_denies_counted:
    unsolicited_inbound_dropped_and_acl_denies_counted_kernel,
    unsolicited_inbound_dropped_and_acl_denies_counted_tun
);

fn unsolicited_inbound_dropped_and_acl_denies_counted(t: Topology, datapath: &str) {
    let hq = hq(t, &format!("datapath = \"{datapath}\""));
    assert_eq!(hq.show()["datapath"], datapath);
    let t = &hq.topo;
    let _u1 = hq.udp_echo_peer("out", "198.51.100.200", 7000);
    let seen = hq
        .udp("pc", 41000, "198.51.100.200", 7000)
        .expect("udp out");
    let public_port: u16 = seen.trim().rsplit(':').next().unwrap().parse().unwrap();
    // pc listens on its mapped port; a stranger sends to the mapping: filtered.
    let listener = t.spawn(
        "pc",
        "pc-listen",
        &["python3", "-u", "-c", "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('',41000))\nwhile True: print(s.recvfrom(100))"],
    );
    for _ in 0..3 {
        t.sh("out2", &format!("python3 -c \"import socket;socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b'x',('{PUBLIC}',{public_port}))\""));
    }
    wait_until(T, "filtered drops", || {
        counter(&hq.show(), &["counters", "drops", "filtered"]) >= 3
    });
    assert!(
        !listener.log().contains("b'x'"),
        "stranger got through: {}",
        listener.log()
    );
    // A TCP connection to a port nobody forwards gets nowhere inside.
    assert!(
        t.try_sh(
            "out",
            &format!("curl -sS --max-time 2 http://{PUBLIC}:8080/")
        )
        .is_err()
    );

    // ACL: an inside host and an outside host denied by their rules, counted per rule.
    t.ip("pc", "addr add 192.168.101.66/24 dev eth0");
    let _web = t.http_server("web", "192.168.101.101", 80, "web");
    let _ext = t.http_server("out", "198.51.100.200", 8080, "outside");
    assert!(
        t.try_sh(
            "pc",
            "curl -sS --max-time 2 --interface 192.168.101.66 http://198.51.100.200:8080/"
        )
        .is_err()
    );
    assert!(
        t.try_sh(
            "out2",
            &format!("curl -sS --max-time 2 --interface 198.51.100.66 http://{PUBLIC}:8001/")
        )
        .is_err()
    );
    assert_eq!(
        t.curl("out2", &format!("http://{PUBLIC}:8001/"))
            .unwrap()
            .trim(),
        "web"
    );
    let v = hq.show();
    let acl = v["acl"].as_array().unwrap();
    assert!(
        acl[0]["counters"]["hits"].as_u64().unwrap() >= 1
            && acl[1]["counters"]["hits"].as_u64().unwrap() >= 1,
        "{v}"
    );
    assert!(counter(&v, &["counters", "drops", "acl_denied"]) >= 2);
    assert!(hq.show_text().contains("deny src 192.168.101.66/32"));
}

#[test]
fn table_flood_is_bounded_and_drains() {
    let hq = hq(
        e2e!(),
        "max_mappings = 64\nmax_mappings_per_host = 48\ntimeouts = { tcp_transitory = \"3s\" }",
    );
    let t = &hq.topo;
    let _iperf = t.spawn(
        "out",
        "iperf3-server",
        &["iperf3", "-s", "-B", "198.51.100.200"],
    );
    t.wait_tcp("out", "198.51.100.200", 5201, T);
    // An established transfer first.
    let transfer = t.spawn(
        "pc",
        "iperf3-client",
        &["iperf3", "-c", "198.51.100.200", "-t", "6", "-J"],
    );
    wait_until(T, "the transfer to be established", || {
        hq.show()["translations"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["established"] == true))
    });
    // Then a flood of new flows from two inside hosts: SYNs to a closed port, 300 each.
    let flood = "import socket\nfor i in range(300):\n  s=socket.socket()\n  s.setblocking(False)\n  \
try: s.connect(('198.51.100.200',9))\n  except OSError: pass\n";
    let script = t.write("flood.py", flood);
    t.sh("web", &format!("python3 {}", script.display()));
    t.sh("pc", &format!("python3 {}", script.display()));
    let v = hq.show();
    assert!(counter(&v, &["flows"]) <= 64, "{v}");
    assert!(
        counter(&v, &["counters", "drops", "table_full"])
            + counter(&v, &["counters", "drops", "host_limit"])
            > 0,
        "{v}"
    );
    assert!(
        counter(&v, &["table_bytes"]) < 256 * 1024,
        "memory stays bounded: {v}"
    );
    // The established transfer kept running through the flood.
    let mut transfer = transfer;
    let code = transfer.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "iperf3 failed: {}", transfer.log());
    let log = transfer.log();
    let json = &log[log.find('{').unwrap_or(0)..];
    let report: Value = serde_json::from_str(json).expect("iperf3 -J output");
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(bps > 1e6, "transfer kept moving: {bps} bit/s");
    // After the transitory timeout, the table drains.
    wait_until(Duration::from_secs(30), "the table to drain", || {
        counter(&hq.show(), &["flows"]) == 0
    });
}

on_both_datapaths!(
    reload_removes_a_static_forward_live:
    reload_removes_a_static_forward_live_kernel,
    reload_removes_a_static_forward_live_tun
);

/// Issue 4, live removal: two static forwards, a transfer running through one; a reload
/// removes the other. The transfer completes intact, the removed port no longer answers, and
/// `show nat` no longer lists it: nothing was restarted.
fn reload_removes_a_static_forward_live(t: Topology, datapath: &str) {
    let hq = hq(t, &format!("datapath = \"{datapath}\""));
    assert_eq!(hq.show()["datapath"], datapath);
    let t = &hq.topo;
    let d = t.dir().to_str().unwrap().to_owned();
    // web:22 answers HTTP here, so that the forward about to go is seen working first.
    let _web22 = t.http_server("web", "192.168.101.101", 22, "web on 22");
    assert_eq!(
        t.curl("out", &format!("http://{PUBLIC}:20022/"))
            .unwrap()
            .trim(),
        "web on 22"
    );
    // web:80 sends 16 MiB of a known pattern: half, then waits for `go`, then the rest.
    let sender = t.write(
        "sender.py",
        &format!(
            "import socket,os,time\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
l.bind(('192.168.101.101',80))\nl.listen(1)\nopen('{d}/listening','w').close()\nc,_=l.accept()\n\
half=(bytes(range(251))*33422)[:8*1024*1024]\nc.sendall(half)\nopen('{d}/half','w').close()\n\
while not os.path.exists('{d}/go'): time.sleep(0.05)\nc.sendall(half)\nc.close()\n"
        ),
    );
    let _sender = t.spawn(
        "web",
        "sender",
        &["python3", "-u", sender.to_str().unwrap()],
    );
    // (A probe connection would be the one connection it serves: wait for its file instead.)
    wait_until(T, "the sender to listen", || {
        std::path::Path::new(&format!("{d}/listening")).exists()
    });
    // The pattern restarts at every 8 MiB half (8 MiB is not a multiple of 251).
    let receiver = t.write(
        "receiver.py",
        &format!(
            "import socket\ns=socket.create_connection(('{PUBLIC}',8001),timeout=60)\nb=bytearray()\n\
while True:\n  d=s.recv(1<<20)\n  if not d: break\n  b+=d\n\
half=(bytes(range(251))*33422)[:8*1024*1024]\n\
print('intact' if bytes(b)==half+half else 'corrupt', len(b))\n"
        ),
    );
    let mut receiver = t.spawn(
        "out",
        "receiver",
        &["python3", "-u", receiver.to_str().unwrap()],
    );
    wait_until(T, "the first half through the forward", || {
        std::path::Path::new(&format!("{d}/half")).exists()
    });

    // Reload without the 20022 forward: applied live, not by a restart.
    let config = std::fs::read_to_string(&hq.config).unwrap();
    let without = config.replace(
        "[[nat.static]]\nproto = \"tcp\"\noutside_port = 20022\ninside = \"192.168.101.101:22\"\n",
        "",
    );
    assert_ne!(config, without);
    std::fs::write(&hq.config, without).unwrap();
    let out = t.vipgate_output("gw", &["reload", "-c", &hq.config]);
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("applied live"), "{report}");

    // The removed port no longer answers; show nat no longer lists it.
    assert!(t.curl("out", &format!("http://{PUBLIC}:20022/")).is_err());
    let v = hq.show();
    let statics = v["statics"].as_array().unwrap();
    assert!(
        statics
            .iter()
            .all(|s| s["inside_global"] != "198.51.100.1:20022"),
        "{v}"
    );
    assert!(
        statics
            .iter()
            .any(|s| s["inside_global"] == "198.51.100.1:8001"),
        "{v}"
    );
    assert!(!hq.show_text().contains(":20022"), "{}", hq.show_text());

    // The transfer through the forward that stays completes intact.
    std::fs::write(format!("{d}/go"), "").unwrap();
    assert_eq!(receiver.wait_exit(Duration::from_secs(60)), Some(0));
    let result = receiver.log();
    assert_eq!(
        result.trim(),
        format!("intact {}", 16 * 1024 * 1024),
        "{result}"
    );
}

/// Waits until something listens on TCP `port` in `host` (without connecting to it: a
/// one-shot sink would take the probe for its transfer).
fn wait_listening(t: &Topology, host: &str, port: u16) {
    wait_until(T, &format!("a listener on {host}:{port}"), || {
        t.try_sh(
            host,
            &format!("ss -Hltn 'sport = :{port}' | grep -q {port}"),
        )
        .is_ok()
    });
}

/// Sends `sent` from `from` to `to_addr:port`, received by a sink on `sink_host:sink_port`; the bytes
/// must arrive unchanged.
fn hash_checked_transfer(
    t: &Topology,
    from: &str,
    (sink_host, sink_port): (&str, u16),
    (to_addr, port): (&str, u16),
    name: &str,
) {
    let dir = t.dir().display().to_string();
    let _sink = t.spawn(
        sink_host,
        &format!("sink-{name}"),
        &[
            "socat",
            "-u",
            &format!("TCP-LISTEN:{sink_port},reuseaddr"),
            &format!("CREATE:{dir}/{name}"),
        ],
    );
    wait_listening(t, sink_host, sink_port);
    t.sh(
        from,
        // Connected first, data a second later: by then the established flow is in the kernel
        // path (one sync round), so the data shows where it went. Bounded: a stalled path
        // must fail the test, not hang it.
        &format!("(sleep 1; cat {dir}/sent) | timeout 60 socat -u STDIN TCP:{to_addr}:{port}"),
    );
    wait_until(T, &format!("the whole file to arrive ({name})"), || {
        std::fs::metadata(format!("{dir}/{name}")).is_ok_and(|m| m.len() == 20_000_000)
    });
    let hash = |f: &str| t.sh(from, &format!("sha256sum < {dir}/{f} | cut -d' ' -f1"));
    assert_eq!(
        hash("sent"),
        hash(name),
        "bytes changed on the way ({name})"
    );
}

/// The kernel fast path: transfers through dynamic PAT and through a static forward arrive
/// intact and mostly bypass nat0 (the fast path's counters moved, the core's translated
/// counters saw little more than the handshakes), and a stop removes the programs' qdisc
/// and filters from the interfaces.
#[test]
fn kernel_path_carries_transfers_and_a_stop_leaves_nothing() {
    let mut hq = hq(e2e!(), "datapath = \"kernel\"\nmax_mappings = 100000");
    let v = hq.show();
    assert_eq!(v["datapath"], "kernel", "{}", v["datapath_reason"]);
    // The flow map follows the table's bound: 2 entries per flow and an eighth more.
    assert_eq!(v["fast_path"]["map_capacity"], 225_000, "{v}");
    let text = hq.show_text();
    assert!(text.contains("Data path: kernel"), "{text}");
    assert!(text.contains("Kernel flow map: 225000 entries"), "{text}");
    let t = &hq.topo;
    let dir = t.dir().display().to_string();
    t.sh("gw", &format!("head -c 20000000 /dev/urandom > {dir}/sent"));
    hash_checked_transfer(t, "pc", ("out", 5001), ("198.51.100.200", 5001), "via-pat");
    hash_checked_transfer(t, "out", ("web", 80), (PUBLIC, 8001), "via-static");

    let v = hq.show();
    let fast = counter(&v, &["fast_path", "packets"]);
    let slow =
        counter(&v, &["counters", "translated_out"]) + counter(&v, &["counters", "translated_in"]);
    // 2 × 20 MB is about 28,000 data segments (plus ACKs); the core translated the handshakes
    // and what crossed before each flow was installed (one sync round).
    assert!(fast > 20_000, "fast path packets: {v}");
    assert!(
        slow * 5 < fast,
        "most packets bypassed nat0: {slow} slow, {fast} fast"
    );
    assert!(counter(&v, &["fast_path", "bytes"]) > 40_000_000, "{v}");

    hq._vipgate.terminate(T).expect("vipgate stops");
    for iface in ["eth0", "eth1"] {
        let qdiscs = t.sh("gw", &format!("tc qdisc show dev {iface}"));
        assert!(!qdiscs.contains("clsact"), "{iface}: {qdiscs}");
        let filters = t.sh("gw", &format!("tc filter show dev {iface} ingress"));
        assert!(filters.trim().is_empty(), "{iface}: {filters}");
    }
}

/// A bpffs that outlives the daemons of a test, as the host's /sys/fs/bpf does under systemd
/// (each `ip netns exec` has a mount namespace, and its bpffs, of its own): a process holding
/// a mount namespace of gw's; daemons and checks enter it.
struct PinRoot {
    _holder: Proc,
    pid: u32,
}

impl PinRoot {
    fn new(t: &Topology) -> Self {
        let holder = t.spawn("gw", "pin-root", &["sleep", "infinity"]);
        let pid = holder.pid();
        wait_until(T, "the mount namespace holder", || {
            t.try_sh("gw", &format!("nsenter -t {pid} -m true")).is_ok()
        });
        PinRoot {
            _holder: holder,
            pid,
        }
    }

    /// `vipgate run -c path` on gw, in the holder's mount namespace.
    fn vipgate(&self, t: &Topology, name: &str, path: &str) -> Proc {
        let bin = vipgate_tests::vipgate_bin();
        let pid = self.pid.to_string();
        t.spawn(
            "gw",
            name,
            &[
                "nsenter",
                "-t",
                &pid,
                "-m",
                bin.to_str().unwrap(),
                "run",
                "-c",
                path,
            ],
        )
    }

    /// vipgate's pins (and their directories) in the holder's mount namespace: what is under
    /// /sys/fs/bpf but the kernel's own preloaded iterators (`*.debug`).
    fn pins(&self, t: &Topology) -> String {
        t.sh(
            "gw",
            &format!(
                "nsenter -t {} -m find /sys/fs/bpf -mindepth 1 ! -name '*.debug'",
                self.pid
            ),
        )
    }
}

/// The HQ site on the kernel path, its daemon in a [`PinRoot`]'s mount namespace (pins that
/// outlive it); returns the running site, the pin root and the config's path.
fn pinned_kernel_hq(t: Topology) -> (Hq, PinRoot, String) {
    let (t, path) = hq_site(t, "datapath = \"kernel\"");
    let pins = PinRoot::new(&t);
    let first = pins.vipgate(&t, "vipgate", &path);
    let hq = hq_running(t, first, path.clone());
    let v = hq.show();
    assert_eq!(v["datapath"], "kernel", "{}", v["datapath_reason"]);
    (hq, pins, path)
}

/// Sends `<dir>/sent` from `from` to `to_addr:port` at about 1.2 MB/s (64 KiB every 50 ms),
/// in the background, into a sink on `sink_host:sink_port` writing `<dir>/<name>`.
fn slow_transfer(
    t: &Topology,
    from: &str,
    (sink_host, sink_port): (&str, u16),
    (to_addr, port): (&str, u16),
    name: &str,
) -> (Proc, Proc) {
    let dir = t.dir().display().to_string();
    let sink = t.spawn(
        sink_host,
        &format!("sink-{name}"),
        &[
            "socat",
            "-u",
            &format!("TCP-LISTEN:{sink_port},reuseaddr"),
            &format!("CREATE:{dir}/{name}"),
        ],
    );
    wait_listening(t, sink_host, sink_port);
    let pace = t.write(
        "pace.py",
        "import sys, time\n\
         data = open(sys.argv[1], 'rb').read()\n\
         time.sleep(1)\n\
         for i in range(0, len(data), 65536):\n    \
             sys.stdout.buffer.write(data[i:i + 65536]); sys.stdout.buffer.flush(); time.sleep(0.05)\n",
    );
    let send = t.spawn(
        from,
        &format!("send-{name}"),
        &[
            "sh",
            "-c",
            &format!(
                "python3 {} {dir}/sent | timeout 90 socat -u STDIN TCP:{to_addr}:{port}",
                pace.display()
            ),
        ],
    );
    (sink, send)
}

/// A UDP server on `host:port` that prints each sender's address, one per line.
fn udp_sender_log(t: &Topology, host: &str, port: u16) -> Proc {
    let code = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('',{port}))\n\
while True:\n  d,a=s.recvfrom(100)\n  print('%s:%d'%a, flush=True)\n"
    );
    let script = t.write(&format!("senders-{host}-{port}.py"), &code);
    let p = t.spawn(
        host,
        &format!("senders-{host}-{port}"),
        &["python3", "-u", script.to_str().unwrap()],
    );
    wait_until(T, &format!("udp server on {host}:{port}"), || {
        t.try_sh(
            host,
            &format!("ss -Hlun 'sport = :{port}' | grep -q {port}"),
        )
        .is_ok()
    });
    p
}

/// A shell command sending one datagram to `dst:port`.
fn udp_send(dst: &str, port: u16) -> String {
    format!(
        "python3 -c \"import socket;socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b'x',('{dst}',{port}))\""
    )
}

/// How a test replaces the running daemon.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Replace {
    /// `vipgate restart`: the daemon re-execs in place.
    Restart,
    /// SIGKILL, a second later a fresh `vipgate run`.
    Crash,
}

/// Established flows survive the daemon's replacement on the kernel path: two paced
/// transfers (dynamic PAT out, a static forward in) run while the daemon is replaced; both
/// arrive intact, the new daemon lists both flows as its own (adopted from the pinned map),
/// and a later SIGTERM leaves no pin, link or qdisc.
fn established_flows_survive(replace: Replace) {
    let (mut hq, pins, path) = pinned_kernel_hq(e2e!());
    let t = &hq.topo;
    let dir = t.dir().display().to_string();
    let size = 8 * 1024 * 1024;
    t.sh("gw", &format!("head -c {size} /dev/urandom > {dir}/sent"));
    let _pat = slow_transfer(t, "pc", ("out", 5001), ("198.51.100.200", 5001), "via-pat");
    let _static = slow_transfer(t, "out", ("web", 80), (PUBLIC, 8001), "via-static");
    // Both flows on the fast path, and data moving.
    wait_until(T, "both transfers on the kernel path", || {
        let v = hq.show();
        counter(&v, &["fast_path", "flows"]) >= 2
            && [format!("{dir}/via-pat"), format!("{dir}/via-static")]
                .iter()
                .all(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 1024 * 1024))
    });
    let pid = hq._vipgate.pid();
    match replace {
        Replace::Restart => {
            let out = t.vipgate_output("gw", &["restart", "-c", &path]);
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(hq._vipgate.is_running(), "the same process runs on");
            assert_eq!(hq._vipgate.pid(), pid);
        }
        Replace::Crash => {
            let senders = udp_sender_log(t, "out", 7001);
            hq._vipgate.kill9();
            // A new flow while no daemon runs waits for the next run: it does not leave
            // untranslated (the blackholes under nat0's routes).
            t.sh("pc", &udp_send("198.51.100.200", 7001));
            // No daemon at all for a while: the kernel forwards alone.
            let before = std::fs::metadata(format!("{dir}/via-pat")).map_or(0, |m| m.len());
            wait_until(T, "data to move while no daemon runs", || {
                std::fs::metadata(format!("{dir}/via-pat"))
                    .is_ok_and(|m| m.len() > before + 256 * 1024)
            });
            hq._vipgate = pins.vipgate(t, "vipgate-second", &path);
            wait_until(T, "a new flow translated by the new daemon", || {
                let _ = t.try_sh("pc", &udp_send("198.51.100.200", 7001));
                senders.log().contains(&format!("{PUBLIC}:"))
            });
            let seen = senders.log();
            assert!(
                !seen.contains("192.168.101.10"),
                "an untranslated packet left while no daemon ran: {seen}"
            );
        }
    }
    // The new daemon has both flows: adopted, listed, established.
    let v = wait_for(T, "the new daemon to list both flows", || {
        let v = hq
            .topo
            .try_show("gw", hq.topo.dir().join("vipgate.sock"), Show::Nat)?;
        let v = v[0].clone();
        let tr = v["translations"].as_array()?;
        let pat = tr.iter().any(|f| {
            f["outside"] == "198.51.100.200:5001"
                && f["inside_local"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("192.168.101.10:"))
                && f["established"] == true
        });
        let fwd = tr.iter().any(|f| {
            f["inside_global"] == "198.51.100.1:8001"
                && f["inside_local"] == "192.168.101.101:80"
                && f["established"] == true
        });
        (pat && fwd).then_some(v)
    });
    assert!(counter(&v, &["fast_path", "adopted"]) >= 2, "{v}");
    assert_eq!(counter(&v, &["fast_path", "adoption_dropped"]), 0, "{v}");
    assert!(hq.show_text().contains("flows of the previous run adopted"));
    let t = &hq.topo;
    for name in ["via-pat", "via-static"] {
        wait_until(
            Duration::from_secs(60),
            &format!("the whole file to arrive ({name})"),
            || std::fs::metadata(format!("{dir}/{name}")).is_ok_and(|m| m.len() == size),
        );
        let hash = |f: &str| t.sh("gw", &format!("sha256sum < {dir}/{f} | cut -d' ' -f1"));
        assert_eq!(
            hash("sent"),
            hash(name),
            "bytes changed on the way ({name})"
        );
    }
    // The adopted flows stayed on the fast path: the new core, which counts from its start,
    // translated little of the megabytes that crossed since (a few thousand segments each
    // way), at most the last segments (FIN) and what crossed before the adoption.
    let v = hq.show();
    let slow =
        counter(&v, &["counters", "translated_out"]) + counter(&v, &["counters", "translated_in"]);
    assert!(slow < 500, "the new core translated {slow} packets: {v}");

    assert_eq!(hq._vipgate.terminate(T), Some(0), "vipgate stops cleanly");
    // Links outlive a process only through their pins: no pin, no link.
    let left = pins.pins(t);
    assert!(left.trim().is_empty(), "left under /sys/fs/bpf: {left}");
    for iface in ["eth0", "eth1"] {
        let qdiscs = t.sh("gw", &format!("tc qdisc show dev {iface}"));
        assert!(!qdiscs.contains("clsact"), "{iface}: {qdiscs}");
    }
}

/// Deletes every entry of the kernel path's flow maps under the holder's bpffs, as the LRU
/// does when it evicts (the program never deletes one), with the bpf(2) syscall from
/// python3's ctypes (no bpftool on the machine); prints how many it deleted.
const EVICT_ALL: &str = r#"
import ctypes, glob, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF, OBJ_GET, NEXT_KEY, DELETE = 321, 7, 4, 3
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    return libc.syscall(SYS_BPF, cmd, buf, 128)
deleted = 0
for path in glob.glob('/sys/fs/bpf/vipgate/*/kpath_flows'):
    name = ctypes.create_string_buffer(path.encode())
    fd = bpf(OBJ_GET, struct.pack('QII', ctypes.addressof(name), 0, 0))
    if fd < 0:
        sys.exit('BPF_OBJ_GET %s: errno %d' % (path, ctypes.get_errno()))
    keys, prev = [], None
    while True:
        nxt = ctypes.create_string_buffer(16)
        p = ctypes.addressof(prev) if prev is not None else 0
        if bpf(NEXT_KEY, struct.pack('IIQQ', fd, 0, p, ctypes.addressof(nxt))) < 0:
            break
        keys.append(nxt)
        prev = nxt
    for k in keys:
        if bpf(DELETE, struct.pack('IIQ', fd, 0, ctypes.addressof(k))) == 0:
            deleted += 1
print(deleted)
"#;

/// An entry the kernel's LRU evicts while its flow lives is put back by the next sync round:
/// a paced transfer whose map entries are all deleted mid-way arrives intact, `show nat`
/// counts the reinstalled entries, and the rest of the transfer stays on the fast path
/// (the core translates little of it).
#[test]
fn evicted_entries_are_put_back_on_the_kernel_path() {
    let (hq, pins, _) = pinned_kernel_hq(e2e!());
    let t = &hq.topo;
    let dir = t.dir().display().to_string();
    let size = 8 * 1024 * 1024;
    t.sh("gw", &format!("head -c {size} /dev/urandom > {dir}/sent"));
    let _pat = slow_transfer(t, "pc", ("out", 5001), ("198.51.100.200", 5001), "via-pat");
    wait_until(T, "the transfer on the kernel path", || {
        counter(&hq.show(), &["fast_path", "flows"]) >= 1
            && std::fs::metadata(format!("{dir}/via-pat")).is_ok_and(|m| m.len() > 1024 * 1024)
    });
    let script = t.write("evict-all.py", EVICT_ALL);
    let deleted = t.sh(
        "gw",
        &format!("nsenter -t {} -m python3 {}", pins.pid, script.display()),
    );
    let deleted: u32 = deleted.trim().parse().expect("a count");
    assert!(
        deleted >= 2,
        "both directions' entries were in the map: {deleted}"
    );
    let before = hq.show();
    let slow_before = counter(&before, &["counters", "translated_out"])
        + counter(&before, &["counters", "translated_in"]);
    let v = wait_for(T, "the sync round to put the entries back", || {
        let v = hq.show();
        (counter(&v, &["fast_path", "reinstalled"]) >= 2).then_some(v)
    });
    assert!(hq.show_text().contains("Kernel flow map:"), "{v}");
    wait_until(Duration::from_secs(60), "the whole file to arrive", || {
        std::fs::metadata(format!("{dir}/via-pat")).is_ok_and(|m| m.len() == size)
    });
    let hash = |f: &str| t.sh("gw", &format!("sha256sum < {dir}/{f} | cut -d' ' -f1"));
    assert_eq!(hash("sent"), hash("via-pat"), "bytes changed on the way");
    // Without the entries the rest (megabytes: thousands of segments and ACKs) would cross
    // nat0; with them back, at most a sync interval's worth and the FINs do.
    let v = hq.show();
    let slow = counter(&v, &["counters", "translated_out"])
        + counter(&v, &["counters", "translated_in"])
        - slow_before;
    assert!(
        slow < 1500,
        "the core translated {slow} packets after the eviction: {v}"
    );
}

#[test]
fn established_flows_survive_a_restart_on_the_kernel_path() {
    established_flows_survive(Replace::Restart);
}

#[test]
fn established_flows_survive_a_crash_and_a_fresh_run_on_the_kernel_path() {
    established_flows_survive(Replace::Crash);
}
