//! Flow sync end to end: two directors run VRRP (the VIP and the real servers' gateway in one
//! sync group, as in the lab), a virtual service and `[sync]`; slow downloads through the VIP
//! must survive the master's death, a planned switchover and the fail-back (under every
//! scheduler), a persistent client and an `lblc` destination must keep their real server,
//! and forged or replayed sync datagrams must be dropped and counted.
//!
//! ```text
//!  cl 198.51.100.200 ── br0 (sw) ── d1 eth0 .11  d2 eth0 .12   VIP .10 (vrid 51)
//!                        br1 (sw) ── d1 eth1 10.0.0.11  d2 eth1 10.0.0.12   gateway .1 (vrid 52)
//!                                 ── rs1 10.0.0.101, rs2 10.0.0.102 (slow senders on :8080)
//!  sync: d1 10.0.0.11:8849 <-> d2 10.0.0.12:8849 over br1
//! ```
//!
//! A host death is what the VRRP tests do: SIGKILL and the host's bridge ports down.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use vipgate_tests::{Proc, Show, Topology, counter, e2e, wait_for, wait_until};

const VIP: &str = "198.51.100.10";
const PORT: u16 = 8080;
/// The persistent service's port (`Lab::sticky`): real servers answering their name.
const STICKY_PORT: u16 = 8081;
/// The schedulers the downloads of `Lab::every_scheduler` go through, one service each, on
/// ports 8090.. (the main service is `rr`).
const SCHEDULERS: [&str; 13] = [
    "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
];
const SCHEDULER_PORT: u16 = 8090;
const SYNC_PORT: u16 = 8849;

/// Serves every connection on each of the comma-separated ports `size` bytes at `rate`
/// bytes/s: 4 KiB blocks, block `i` being sha256(str(i)) repeated, so the client can check
/// the bytes without a copy of them.
const SENDER_PY: &str = r#"
import hashlib, socket, sys, threading, time
ports, size, rate = [int(p) for p in sys.argv[1].split(",")], int(sys.argv[2]), int(sys.argv[3])
def block(i):
    return hashlib.sha256(b"%d" % i).digest() * 128
def serve(c):
    try:
        sent, i, start = 0, 0, time.monotonic()
        while sent < size:
            b = block(i)[: size - sent]
            c.sendall(b)
            sent += len(b); i += 1
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)
    except OSError as e:
        print("sender error:", e, flush=True)
    c.close()
def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
for p in ports[1:]:
    threading.Thread(target=listen, args=(p,), daemon=True).start()
listen(ports[0])
"#;

/// Opens `n` downloads from `VIP` at once, connection K to the K-th of the comma-separated
/// ports (round the list) (source ports `base`..), prints `started K`
/// once connection K has its first 64 KiB, and at the end one line per connection: the bytes
/// received and whether they are exactly the `size` bytes the senders send.
const CLIENT_PY: &str = r#"
import hashlib, socket, sys, threading
vip, ports, n, size, base = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
want, left, i = hashlib.sha256(), size, 0
while left > 0:
    b = hashlib.sha256(b"%d" % i).digest() * 128
    want.update(b[:left]); left -= len(b[:left]); i += 1
want = want.hexdigest()
results = [None] * n
def get(k):
    try:
        s = socket.create_connection((vip, ports[k % len(ports)]), timeout=30, source_address=("0.0.0.0", base + k))
        h, got, told = hashlib.sha256(), 0, False
        while True:
            d = s.recv(65536)
            if not d:
                break
            h.update(d); got += len(d)
            if got >= 65536 and not told:
                print("started %d" % k, flush=True); told = True
        s.close()
        results[k] = "bytes=%d ok=%s" % (got, got == size and h.hexdigest() == want)
    except OSError as e:
        results[k] = "bytes=-1 ok=False error=%s" % e
threads = [threading.Thread(target=get, args=(k,)) for k in range(n)]
for t in threads: t.start()
for t in threads: t.join()
for k, r in enumerate(results):
    print("conn=%d %s" % (k, r), flush=True)
"#;

/// Answers every connection on `port` with `name` and a newline, then closes.
const NAME_PY: &str = r#"
import socket, sys
port, name = int(sys.argv[1]), sys.argv[2].encode() + b"\n"
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(64)
while True:
    c, _ = s.accept()
    try:
        c.sendall(name)
    except OSError:
        pass
    c.close()
"#;

/// One NEW connection to `vip:port` from the address `src`: prints the name the real server
/// answered, then resets the connection (SO_LINGER 0) so its flow leaves the directors'
/// tables after the short CLOSE timeout rather than TIME_WAIT's.
const ASK_NAME_PY: &str = r#"
import socket, struct, sys
vip, port, src = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((vip, port), timeout=2, source_address=(src, 0))
name = b""
while not name.endswith(b"\n"):
    d = s.recv(100)
    if not d:
        break
    name += d
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
print(name.decode().strip())
"#;

/// Captures the first sync `Hello` (message kind 1) d1 sends through the bridge port it is
/// given, and prints it as hex.
const CAPTURE_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.settimeout(20)
while True:
    f = s.recv(65535)
    if f[12:14] != b"\x08\x00" or f[23] != 17:
        continue
    ihl = (f[14] & 15) * 4
    udp = f[14 + ihl:]
    src = ".".join(str(b) for b in f[26:30])
    if src == sys.argv[2] and int.from_bytes(udp[2:4], "big") == int(sys.argv[3]) and udp[8 + 5] == 1:
        print(udp[8:].hex(), flush=True)
        break
"#;

/// Sends a captured datagram to `addr:port` as is (a replay), re-signed with a wrong key,
/// and a garbage datagram.
const ATTACK_PY: &str = r#"
import hashlib, hmac, socket, sys
msg, addr, port = bytes.fromhex(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(msg, (addr, port))
forged = msg[:-32] + hmac.new(b"not the group's key at all", msg[:-32], hashlib.sha256).digest()
s.sendto(forged, (addr, port))
s.sendto(b"garbage, not a sync message", (addr, port))
"#;

struct Lab {
    t: Topology,
    datapath: &'static str,
    /// The service's scheduler line(s).
    scheduler: &'static str,
    /// Whether the directors run `[sync]`.
    synced: bool,
    /// `[sync] group`: a multicast group instead of the peer's address.
    group: Option<&'static str>,
    /// A second service on port 8081 whose real servers answer their name: its name and
    /// scheduler lines (`sticky`: rr, `persistence = "300s"`; `caches`: lblc).
    named: Option<(&'static str, &'static str)>,
    /// One more service per scheduler of [`SCHEDULERS`] (`Lab::every_scheduler`).
    every_scheduler: bool,
    key: PathBuf,
    /// Real servers' senders: they live as long as the lab.
    _senders: Vec<Proc>,
}

impl Lab {
    fn new(mut t: Topology, datapath: &'static str) -> Lab {
        t.hosts(&["sw", "d1", "d2", "cl", "rs1", "rs2"]);
        t.bridge("sw", "br0").bridge("sw", "br1");
        for (h, ip) in [("d1", "11"), ("d2", "12")] {
            t.veth(h, "eth0", "sw", &format!("p-{h}-0"));
            t.ip("sw", &format!("link set p-{h}-0 master br0"));
            t.addr(h, "eth0", &format!("198.51.100.{ip}/24"));
            t.veth(h, "eth1", "sw", &format!("p-{h}-1"));
            t.ip("sw", &format!("link set p-{h}-1 master br1"));
            t.addr(h, "eth1", &format!("10.0.0.{ip}/24"));
            t.forwarding(h);
        }
        t.veth("cl", "eth0", "sw", "p-cl");
        t.ip("sw", "link set p-cl master br0");
        t.addr("cl", "eth0", "198.51.100.200/24");
        let sender = t.write("sender.py", SENDER_PY);
        let sender = sender.to_str().unwrap_or_default().to_owned();
        let mut senders = Vec::new();
        for (h, ip) in [("rs1", "101"), ("rs2", "102")] {
            t.veth(h, "eth0", "sw", &format!("p-{h}"));
            t.ip("sw", &format!("link set p-{h} master br1"));
            t.addr(h, "eth0", &format!("10.0.0.{ip}/24"));
            t.ip(h, "route add default via 10.0.0.1");
            senders.push(t.spawn(
                h,
                &format!("sender-{h}"),
                &["python3", &sender, &PORT.to_string(), "1200000", "100000"],
            ));
        }
        t.write("client.py", CLIENT_PY);
        t.write("capture.py", CAPTURE_PY);
        t.write("attack.py", ATTACK_PY);
        let key = t.write("sync.key", "a shared key for the two directors\n");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the key");
        for h in ["rs1", "rs2"] {
            t.wait_listening(h, PORT);
        }
        Lab {
            t,
            datapath,
            scheduler: "scheduler = \"rr\"",
            synced: true,
            group: None,
            named: None,
            every_scheduler: false,
            key,
            _senders: senders,
        }
    }

    /// The same lab with a second, persistent service (`sticky`, rr, `persistence = "300s"`)
    /// on port 8081, whose real servers answer each connection with their name; the client
    /// gets a second address, 198.51.100.201, to be another client.
    fn sticky(self) -> Lab {
        self.named("sticky", "scheduler = \"rr\"\npersistence = \"300s\"")
    }

    /// The same lab with a second service `service` on port 8081 scheduled by `scheduler`,
    /// whose real servers answer each connection with their name; the client gets a second
    /// address, 198.51.100.201, to be another client.
    fn named(mut self, service: &'static str, scheduler: &'static str) -> Lab {
        let t = &mut self.t;
        t.addr("cl", "eth0", "198.51.100.201/24");
        let name = t.write("name.py", NAME_PY);
        let name = name.to_str().unwrap_or_default().to_owned();
        t.write("ask_name.py", ASK_NAME_PY);
        for h in ["rs1", "rs2"] {
            self._senders.push(t.spawn(
                h,
                &format!("name-{h}"),
                &["python3", &name, &STICKY_PORT.to_string(), h],
            ));
        }
        for h in ["rs1", "rs2"] {
            t.wait_listening(h, STICKY_PORT);
        }
        Lab {
            named: Some((service, scheduler)),
            ..self
        }
    }

    /// The same lab with one more service per scheduler of [`SCHEDULERS`], on ports
    /// `SCHEDULER_PORT`.., each with both real servers (slow senders on the same port).
    fn every_scheduler(mut self) -> Lab {
        let t = &mut self.t;
        let sender = t.dir().join("sender.py");
        let sender = sender.to_str().unwrap_or_default().to_owned();
        let ports = scheduler_ports();
        for h in ["rs1", "rs2"] {
            self._senders.push(t.spawn(
                h,
                &format!("senders-{h}"),
                &["python3", &sender, &ports, "1200000", "100000"],
            ));
        }
        for h in ["rs1", "rs2"] {
            for port in (SCHEDULER_PORT..).take(SCHEDULERS.len()) {
                t.wait_listening(h, port);
            }
        }
        Lab {
            every_scheduler: true,
            ..self
        }
    }

    /// The same lab with the service in direct routing (`forward = "dr"`): the real servers
    /// hold the VIP on `lo` and answer the client over a second link of the client's on the
    /// real servers' segment, so no answer crosses a director.
    fn direct_routing(mut self) -> Lab {
        let t = &mut self.t;
        t.veth("cl", "eth1", "sw", "p-cl-1");
        t.ip("sw", "link set p-cl-1 master br1");
        t.addr("cl", "eth1", "10.0.0.200/24");
        t.sh(
            "cl",
            "sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth1.rp_filter=0",
        );
        for rs in ["rs1", "rs2"] {
            t.sh(
                rs,
                "sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
            );
            t.addr(rs, "lo", &format!("{VIP}/32"));
            t.ip(rs, "route add 198.51.100.0/24 via 10.0.0.200");
        }
        Lab {
            scheduler: "scheduler = \"rr\"\nforward = \"dr\"",
            ..self
        }
    }

    /// The same lab with the directors' sync on a multicast group.
    fn multicast(self, group: &'static str) -> Lab {
        Lab {
            group: Some(group),
            ..self
        }
    }

    /// The same lab with no `[sync]` and the service scheduled by `scheduler`.
    fn without_sync(self, scheduler: &'static str) -> Lab {
        Lab {
            scheduler,
            synced: false,
            ..self
        }
    }

    fn sock(&self, host: &str) -> PathBuf {
        self.t.dir().join(format!("{host}.sock"))
    }

    fn start(&self, host: &str, priority: u8) -> Proc {
        self.start_with(host, priority, "")
    }

    /// A director with `extra` lines in its `vip-web` instance.
    fn start_with(&self, host: &str, priority: u8, extra: &str) -> Proc {
        let (me, peer) = if host == "d1" {
            ("10.0.0.11", "10.0.0.12")
        } else {
            ("10.0.0.12", "10.0.0.11")
        };
        let sync = if self.synced {
            let to = self.group.map_or_else(
                || format!("peers = [\"{peer}\"]"),
                |g| format!("group = \"{g}\""),
            );
            format!(
                "[sync]\n{to}\nlisten = \"{me}\"\nkey_file = \"{}\"\nvrrp = \"vip-web\"\n",
                self.key.display()
            )
        } else {
            String::new()
        };
        let mut services = match self.named {
            Some((name, scheduler)) => format!(
                r#"
[[service]]
name = "{name}"
listen = "{VIP}:{STICKY_PORT}"
{scheduler}
backends = [{{ address = "10.0.0.101:{STICKY_PORT}" }}, {{ address = "10.0.0.102:{STICKY_PORT}" }}]
"#
            ),
            None => String::new(),
        };
        if self.every_scheduler {
            for (s, port) in SCHEDULERS.iter().zip(SCHEDULER_PORT..) {
                services.push_str(&format!(
                    r#"
[[service]]
name = "{s}"
listen = "{VIP}:{port}"
scheduler = "{s}"
backends = [{{ address = "10.0.0.101:{port}" }}, {{ address = "10.0.0.102:{port}" }}]
"#
                ));
            }
        }
        let text = format!(
            r#"[daemon]
control = "{sock}"
metrics = "127.0.0.1:9477"

[lb]
datapath = "{datapath}"

[[service]]
name = "dl"
listen = "{VIP}:{PORT}"
{scheduler}
backends = [{{ address = "10.0.0.101:{PORT}" }}, {{ address = "10.0.0.102:{PORT}" }}]
{services}
[[vrrp]]
name = "vip-web"
group = "director"
interface = "eth0"
vrid = 51
priority = {priority}
advert_interval = "100ms"
addresses = ["{VIP}/24"]
{extra}

[[vrrp]]
name = "gw-inside"
group = "director"
interface = "eth1"
vrid = 52
priority = {priority}
advert_interval = "100ms"
addresses = ["10.0.0.1/24"]

{sync}"#,
            sock = self.sock(host).display(),
            datapath = self.datapath,
            scheduler = self.scheduler,
        );
        let config = self.t.write(&format!("{host}.toml"), &text);
        let _ = std::fs::remove_file(self.sock(host));
        let check = self
            .t
            .vipgate_output(host, &["check", "-c", config.to_str().unwrap_or_default()]);
        assert!(
            check.status.success(),
            "vipgate check: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        self.t.vipgate(
            host,
            &format!("vipgate-{host}"),
            &["run", "-c", config.to_str().unwrap_or_default()],
        )
    }

    /// `show sync --json` of `host`'s node, if the daemon answers.
    fn sync(&self, host: &str) -> Option<Value> {
        self.t
            .try_show(host, self.sock(host), Show::Sync)
            .and_then(|v| v.get(0).cloned())
    }

    /// `show lb --json`'s service `name` of `host`'s node (null if the daemon does not answer).
    fn lb_service(&self, host: &str, name: &str) -> Value {
        self.t
            .try_show(host, self.sock(host), Show::Lb)
            .and_then(|v| v.as_array()?.iter().find(|s| s["name"] == name).cloned())
            .unwrap_or_default()
    }

    /// A NEW connection from the client's address `src` to the named service: the name of
    /// the real server that answered.
    fn ask_name(&self, src: &str) -> Result<String, String> {
        let script = self.t.dir().join("ask_name.py");
        self.t
            .try_sh(
                "cl",
                &format!("python3 {} {VIP} {STICKY_PORT} {src}", script.display()),
            )
            .map(|name| name.trim().to_owned())
    }

    /// `show lb --json`'s service of `host`'s node (null if the daemon does not answer).
    fn lb(&self, host: &str) -> Value {
        self.t
            .try_show(host, self.sock(host), Show::Lb)
            .and_then(|v| v.get(0).cloned())
            .unwrap_or_default()
    }

    fn vrrp_state(&self, host: &str) -> String {
        self.t
            .try_show(host, self.sock(host), Show::Vrrp)
            .and_then(|v| {
                v.get(0)
                    .and_then(|i| i["state"].as_str().map(str::to_owned))
            })
            .unwrap_or_default()
    }

    /// d1 master and streaming, d2 backup with d1 up as its peer and d1's snapshot taken.
    fn wait_paired(&self, d1: &Proc, d2: &Proc) {
        wait_until(
            Duration::from_secs(20),
            "d1 master, d2 backup and synced",
            || {
                let (s1, s2) = (self.sync("d1"), self.sync("d2"));
                let ok = |s: &Option<Value>, state: &str| {
                    s.as_ref().is_some_and(|s| {
                        s["state"] == state && s["peers_up"] == 1 && s["synced"] == true
                    })
                };
                ok(&s1, "master") && ok(&s2, "backup")
            },
        );
        assert_eq!(self.vrrp_state("d1"), "MASTER", "{}", d1.log());
        assert_eq!(self.vrrp_state("d2"), "BACKUP", "{}", d2.log());
    }

    /// A host death: SIGKILL and both bridge ports down.
    fn host_death(&self, host: &str, daemon: &mut Proc) {
        daemon.kill9();
        self.t.ip("sw", &format!("link set p-{host}-0 down"));
        self.t.ip("sw", &format!("link set p-{host}-1 down"));
    }

    /// d1's host dies; d2 becomes master and the first new connection from `client`, made
    /// as soon as the VIP answers on d2, reaches the real server named `expected`.
    fn d1_dies_and_d2_answers(&self, client: &str, d1: &mut Proc, d2: &Proc, expected: &str) {
        self.host_death("d1", d1);
        wait_until(Duration::from_secs(5), "d2 master", || {
            self.sync("d2").is_some_and(|s| s["state"] == "master")
        });
        let first = wait_for(Duration::from_secs(10), "a connection through d2", || {
            self.ask_name(client).ok()
        });
        assert_eq!(first, expected, "{}", d2.log());
    }

    /// The dead host boots again: what did not survive a reboot (its VRRP addresses and proxy
    /// neighbour entries) is gone, and its links come up.
    fn host_returns(&self, host: &str) {
        let _ = self.t.try_sh(host, "ip addr del 10.0.0.1/24 dev eth1");
        let _ = self
            .t
            .try_sh(host, &format!("ip neigh del proxy {VIP} dev eth0"));
        self.t.ip("sw", &format!("link set p-{host}-0 up"));
        self.t.ip("sw", &format!("link set p-{host}-1 up"));
    }

    /// Starts `n` downloads of `size` bytes from the client (source ports from `base`) and
    /// waits until each has its first 64 KiB.
    fn downloads(&self, n: usize, size: u32, base: u16) -> Proc {
        self.downloads_to(&PORT.to_string(), "client", n, size, base)
    }

    /// [`Lab::downloads`] to the comma-separated `ports` (connection K to the K-th, round
    /// the list), by a client process named `name`.
    fn downloads_to(&self, ports: &str, name: &str, n: usize, size: u32, base: u16) -> Proc {
        let script = self.t.dir().join("client.py");
        let script = script.to_str().unwrap_or_default().to_owned();
        let client = self.t.spawn(
            "cl",
            name,
            &[
                "python3",
                &script,
                VIP,
                ports,
                &n.to_string(),
                &size.to_string(),
                &base.to_string(),
            ],
        );
        wait_until(Duration::from_secs(15), "every download under way", || {
            (0..n).all(|k| client.log().contains(&format!("started {k}")))
        });
        client
    }

    /// Waits for the client to end and checks every download got exactly its bytes.
    fn assert_complete(&self, client: &mut Proc, n: usize, size: u32, daemons: &[&Proc]) {
        client.wait_exit(Duration::from_secs(90));
        let log = client.log();
        let results: Vec<&str> = log.lines().filter(|l| l.starts_with("conn=")).collect();
        assert_eq!(results.len(), n, "client log:\n{log}");
        let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
        for r in &results {
            assert!(
                r.ends_with(&format!("bytes={size} ok=True")),
                "a download broke: {r}\nclient log:\n{log}\ndaemon logs:\n{}",
                logs.join("\n----\n")
            );
        }
    }
}

impl Lab {
    /// With `Lab::every_scheduler`: one download through each of the other schedulers'
    /// services (source ports from `base`), under way.
    fn scheduler_downloads(&self, base: u16) -> Option<Proc> {
        self.every_scheduler.then(|| {
            self.downloads_to(
                &scheduler_ports(),
                "client-schedulers",
                SCHEDULERS.len(),
                1_200_000,
                base,
            )
        })
    }

    /// The flows of `main` downloads to the main service plus those of
    /// [`Lab::scheduler_downloads`].
    fn flows(&self, main: u64) -> u64 {
        main + if self.every_scheduler {
            SCHEDULERS.len() as u64
        } else {
            0
        }
    }

    /// Waits until d2 holds at least `flows` standby flows; returns how many.
    fn d2_holds(&self, flows: u64) -> u64 {
        wait_for(Duration::from_secs(5), "d2 holding every flow", || {
            self.sync("d2")
                .map(|s| counter(&s, &["standby_flows"]))
                .filter(|n| *n >= flows)
        })
    }

    /// [`Lab::assert_complete`] for [`Lab::scheduler_downloads`], if any.
    fn assert_schedulers_complete(&self, others: &mut Option<Proc>, daemons: &[&Proc]) {
        if let Some(others) = others {
            self.assert_complete(others, SCHEDULERS.len(), 1_200_000, daemons);
        }
    }
}

fn scheduler_ports() -> String {
    (SCHEDULER_PORT..)
        .take(SCHEDULERS.len())
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Four downloads through the VIP, spread over both real servers, survive d1's death: d2
/// holds their flows as standby, promotes them when VRRP makes it master, and every byte
/// arrives, in order, exactly once. With `Lab::every_scheduler`, one more download through
/// each of the other schedulers' services survives the same death.
/// Returns d2's `show lb` afterwards (it is the master then).
fn downloads_survive_the_master_crash(lab: Lab) -> Value {
    let mut d1 = lab.start("d1", 150);
    let d2 = lab.start("d2", 100);
    lab.wait_paired(&d1, &d2);
    // d2 may have been master for a moment before it heard d1 at start.
    let promotions = |s: &Value| counter(s, &["counters", "promotions"]);
    let before = promotions(&lab.sync("d2").unwrap_or_default());

    let mut client = lab.downloads(4, 1_200_000, 31_000);
    let mut others = lab.scheduler_downloads(31_100);
    let flows = lab.flows(4);
    let standby = lab.d2_holds(flows);
    lab.host_death("d1", &mut d1);

    lab.assert_complete(&mut client, 4, 1_200_000, &[&d2]);
    lab.assert_schedulers_complete(&mut others, &[&d2]);
    let s2 = lab.sync("d2").unwrap_or_default();
    assert_eq!(s2["state"], "master", "{s2}");
    assert_eq!(promotions(&s2), before + 1, "{s2}");
    assert!(
        counter(&s2, &["counters", "promoted"]) >= flows,
        "{standby} standby flows, promoted: {s2}"
    );
    lab.lb("d2")
}

/// Every scheduler (issue #18): `rr` on the main service, the thirteen others one download
/// each, all through the same crash.
#[test]
fn downloads_survive_the_master_crash_kernel() {
    let _ = downloads_survive_the_master_crash(Lab::new(e2e!(), "kernel").every_scheduler());
}

#[test]
fn downloads_survive_the_master_crash_tun() {
    let _ = downloads_survive_the_master_crash(Lab::new(e2e!(), "tun"));
}

/// The same with the directors syncing over a multicast group: each finds the other by the
/// group's key, nothing listed.
#[test]
fn downloads_survive_the_master_crash_multicast() {
    let _ = downloads_survive_the_master_crash(Lab::new(e2e!(), "tun").multicast("239.192.88.49"));
}

/// The same with direct routing (issue #16): the synced flows name their real servers, and
/// the new master's kernel path delivers the clients' segments to them.
#[test]
fn direct_routed_downloads_survive_the_master_crash() {
    let lb = downloads_survive_the_master_crash(Lab::new(e2e!(), "kernel").direct_routing());
    assert_eq!(lb["forward"], "dr", "{lb}");
    assert!(
        counter(&lb, &["fast_path", "packets"]) > 0,
        "the kernel delivered: {lb}"
    );
    assert_eq!(
        counter(&lb, &["flows_adopted"]),
        0,
        "synced, not adopted: {lb}"
    );
}

/// Without `[sync]`, downloads survive anyway: d2 never saw them start, and adopts each one's
/// next segment on the real server d1 chose — told by the real server's own segment (any
/// scheduler), or computed from the client's (both directors build the same Maglev table).
fn downloads_survive_the_master_crash_without_sync(
    t: Topology,
    datapath: &'static str,
    scheduler: &'static str,
) {
    let lab = Lab::new(t, datapath).without_sync(scheduler);
    let mut d1 = lab.start("d1", 150);
    let d2 = lab.start("d2", 100);
    wait_until(Duration::from_secs(20), "d1 master, d2 backup", || {
        lab.vrrp_state("d1") == "MASTER" && lab.vrrp_state("d2") == "BACKUP"
    });
    // Source ports 35004..=35009: Maglev puts three on each real server.
    let mut client = lab.downloads(6, 1_200_000, 35_004);
    lab.host_death("d1", &mut d1);
    lab.assert_complete(&mut client, 6, 1_200_000, &[&d2]);
    let lb = lab.lb("d2");
    assert!(counter(&lb, &["flows_adopted"]) >= 6, "{lb}");
    let used = lb["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter(|b| counter(b, &["counters", "connections"]) > 0)
                .count()
        })
        .unwrap_or_default();
    assert_eq!(
        used, 2,
        "the downloads were spread over both real servers: {lb}"
    );
}

#[test]
fn downloads_survive_the_master_crash_without_sync_kernel() {
    downloads_survive_the_master_crash_without_sync(
        e2e!(),
        "kernel",
        "scheduler = \"mh\"\nhash_port = true",
    );
}

#[test]
fn downloads_survive_the_master_crash_without_sync_tun() {
    downloads_survive_the_master_crash_without_sync(
        e2e!(),
        "tun",
        "scheduler = \"mh\"\nhash_port = true",
    );
}

#[test]
fn downloads_survive_the_master_crash_without_sync_round_robin() {
    downloads_survive_the_master_crash_without_sync(e2e!(), "kernel", "scheduler = \"rr\"");
}

/// A planned switchover: d1 stops (SIGTERM: its sync part stops, then its VRRP instances
/// send priority 0), d2 takes over at once with the flows it holds. Every scheduler (issue
/// #18): one more download through each of the other schedulers' services (on the TUN path:
/// the crash test covers every scheduler on the kernel path).
#[test]
fn downloads_survive_a_planned_switchover() {
    let lab = Lab::new(e2e!(), "tun").every_scheduler();
    let mut d1 = lab.start("d1", 150);
    let d2 = lab.start("d2", 100);
    lab.wait_paired(&d1, &d2);
    let mut client = lab.downloads(4, 1_200_000, 33_000);
    let mut others = lab.scheduler_downloads(33_100);
    let flows = lab.flows(4);
    lab.d2_holds(flows);
    assert_eq!(
        d1.terminate(Duration::from_secs(10)),
        Some(0),
        "d1 stops cleanly: {}",
        d1.log()
    );
    lab.assert_complete(&mut client, 4, 1_200_000, &[&d1, &d2]);
    lab.assert_schedulers_complete(&mut others, &[&d1, &d2]);
    let s2 = lab.sync("d2").unwrap_or_default();
    assert_eq!(s2["state"], "master", "{s2}");
    assert!(counter(&s2, &["counters", "promoted"]) >= flows, "{s2}");
}

/// A captured `Hello` sent again, the same message signed with another key, and garbage:
/// each is dropped and counted by its reason, and nothing else changes.
#[test]
fn forged_replayed_and_garbage_datagrams_are_dropped_and_counted() {
    let lab = Lab::new(e2e!(), "tun");
    let d1 = lab.start("d1", 150);
    let d2 = lab.start("d2", 100);
    lab.wait_paired(&d1, &d2);
    let capture = lab.t.dir().join("capture.py");
    let hello = lab.t.sh(
        "sw",
        &format!("python3 {} p-d1-1 10.0.0.11 {SYNC_PORT}", capture.display()),
    );
    let hello = hello.trim();
    assert!(hello.starts_with("56475359"), "a VGSY message: {hello}");
    let before = lab.sync("d2").expect("d2 answers");
    let attack = lab.t.dir().join("attack.py");
    lab.t.sh(
        "rs1",
        &format!("python3 {} {hello} 10.0.0.12 {SYNC_PORT}", attack.display()),
    );
    let drops = |s: &Value, reason: &str| counter(s, &["counters", "drops", reason]);
    let after = wait_for(
        Duration::from_secs(5),
        "the three datagrams counted",
        || {
            lab.sync("d2").filter(|s| {
                drops(s, "auth_failures") > drops(&before, "auth_failures")
                    && drops(s, "replays") > drops(&before, "replays")
                    && drops(s, "malformed") > drops(&before, "malformed")
            })
        },
    );
    for reason in ["auth_failures", "replays", "malformed"] {
        assert_eq!(
            drops(&after, reason),
            drops(&before, reason) + 1,
            "{reason}: {after}"
        );
    }
    assert_eq!(after["state"], "backup");
    assert_eq!(after["peers_up"], 1, "d1 is still d2's peer: {after}");
    let text = lab.t.vipgate_output(
        "d2",
        &[
            "show",
            "sync",
            "--control",
            lab.sock("d2").to_str().unwrap_or_default(),
        ],
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("auth_failures 1"), "{text}");
    assert!(text.contains("replays 1"), "{text}");

    // The metrics endpoint says the same, in a page promtool accepts.
    let metrics = wait_for(Duration::from_secs(10), "the drops in the metrics", || {
        let page = lab
            .t
            .try_sh("d2", "curl -sS --max-time 2 http://127.0.0.1:9477/metrics")
            .ok()?;
        page.lines()
            .any(|l| {
                l.starts_with("vipgate_sync_drops_total{")
                    && l.ends_with("reason=\"auth_failures\"} 1")
            })
            .then_some(page)
    });
    super::daemon::promtool_accepts(&metrics);
    assert!(
        metrics.contains("vipgate_sync_state{listen=\"10.0.0.12:8849\",state=\"backup\"} 1"),
        "{metrics}"
    );

    // A change of [sync] restarts the part, which then runs with the new section.
    let config = lab.t.dir().join("d2.toml");
    let text = std::fs::read_to_string(&config).expect("d2's config");
    std::fs::write(&config, format!("{text}port = 8850\n")).expect("rewrite d2's config");
    let sock = lab.sock("d2");
    let out = lab.t.vipgate_output(
        "d2",
        &["reload", "--control", sock.to_str().unwrap_or_default()],
    );
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && reply.contains("sync: restarted ("),
        "{reply}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = lab.sync("d2").unwrap_or_default();
    assert_eq!(moved["name"], "10.0.0.12:8850", "{moved}");
}

/// Fail-back: d1 dies during four downloads, d2 takes them over; d1 boots again and, with no
/// `preempt_delay`, stays backup (its preemption gated by `[sync]`) until it pulled d2's
/// flows as standby, then takes the VIP back and promotes them. Every byte of every download
/// arrives across both moves, through every scheduler (one more download through each of
/// the other schedulers' services, on the TUN path as the switchover's).
#[test]
fn downloads_survive_the_crash_and_the_fail_back() {
    let lab = Lab::new(e2e!(), "tun").every_scheduler();
    let mut d1 = lab.start("d1", 150);
    let d2 = lab.start("d2", 100);
    lab.wait_paired(&d1, &d2);
    let mut client = lab.downloads(4, 1_200_000, 32_000);
    let mut others = lab.scheduler_downloads(32_100);
    let flows = lab.flows(4);
    lab.d2_holds(flows);
    lab.host_death("d1", &mut d1);
    wait_until(Duration::from_secs(5), "d2 master", || {
        lab.sync("d2").is_some_and(|s| s["state"] == "master")
    });

    lab.host_returns("d1");
    let d1 = lab.start("d1", 150);
    // The gate is monotonic (closed at start, opened once), so at every poll a MASTER d1
    // must already report ready.
    wait_until(Duration::from_secs(10), "d1 back as master", || {
        let s1 = lab.sync("d1");
        if lab.vrrp_state("d1") == "MASTER" {
            assert!(
                s1.as_ref().is_some_and(|s| s["ready"] == true),
                "d1 preempted before sync was ready: {s1:?}"
            );
        }
        s1.is_some_and(|s| s["state"] == "master")
            && lab.sync("d2").is_some_and(|s| s["state"] == "backup")
    });
    let log = d1.log();
    let ready_at = log.find("flow sync: ready, VRRP may preempt");
    let master_at = log.find("to=MASTER");
    assert!(
        ready_at.is_some() && ready_at < master_at,
        "d1 became ready before it preempted: {log}"
    );
    assert!(
        !log.contains("ready_timeout"),
        "the snapshot opened the gate, not the bound: {log}"
    );
    let s1 = lab.sync("d1").unwrap_or_default();
    assert!(
        counter(&s1, &["counters", "promoted"]) >= flows,
        "d1 promoted the flows it pulled: {s1}"
    );
    assert!(
        client.is_running(),
        "the downloads span the fail-back: {}",
        client.log()
    );
    lab.assert_complete(&mut client, 4, 1_200_000, &[&d1, &d2]);
    lab.assert_schedulers_complete(&mut others, &[&d1, &d2]);
}

/// Persistence across a failover (issue #18): a client's first connection sticks it to real
/// server X on d1; the connection ends (its flow leaves both tables), d1 dies, and the
/// client's NEW connections through d2 still reach X, because d2 received d1's persistence
/// template and installed it into its pool when it became master. (Without sync d2 would
/// schedule the client afresh: with rr, its first pick is the real server the other client
/// was given, not X — not asserted, rr's order is no contract.)
fn a_persistent_client_keeps_its_real_server(t: Topology, datapath: &'static str) {
    let lab = Lab::new(t, datapath).sticky();
    let mut d1 = lab.start("d1", 150);
    let d2 = lab.start("d2", 100);
    lab.wait_paired(&d1, &d2);
    // Another client first: rr gives the persistent client the other real server.
    let other = lab
        .ask_name("198.51.100.201")
        .expect("the other client's connection");
    let x = lab
        .ask_name("198.51.100.200")
        .expect("the client's first connection");
    assert!(x == "rs1" || x == "rs2", "a real server's name: {x:?}");
    assert_ne!(other, x, "rr spread the two clients");
    let s2 = wait_for(
        Duration::from_secs(20),
        "d2 holding both templates, and no flow (the connections ended)",
        || {
            lab.sync("d2").filter(|s| {
                counter(s, &["standby_templates"]) >= 2 && counter(s, &["standby_flows"]) == 0
            })
        },
    );
    assert!(
        counter(&s2, &["counters", "templates_applied"]) >= 2,
        "{s2}"
    );
    let sticky = lab.lb_service("d2", "sticky");
    assert_eq!(
        counter(&sticky, &["templates"]),
        0,
        "standby, not in d2's pool yet: {sticky}"
    );

    lab.d1_dies_and_d2_answers("198.51.100.200", &mut d1, &d2, &x);
    for k in 0..5 {
        let name = lab
            .ask_name("198.51.100.200")
            .expect("a new connection through d2");
        assert_eq!(name, x, "new connection {k} through d2");
    }
    let s2 = lab.sync("d2").unwrap_or_default();
    assert!(
        counter(&s2, &["counters", "templates_installed"]) >= 2,
        "{s2}"
    );
    assert_eq!(counter(&s2, &["counters", "templates_refused"]), 0, "{s2}");
    let sticky = lab.lb_service("d2", "sticky");
    assert!(
        counter(&sticky, &["counters", "persistent_hits"]) >= 6,
        "{sticky}"
    );
}

#[test]
fn a_persistent_client_keeps_its_real_server_across_the_master_crash() {
    a_persistent_client_keeps_its_real_server(e2e!(), "kernel");
}

#[test]
fn a_persistent_client_keeps_its_real_server_across_the_master_crash_tun() {
    a_persistent_client_keeps_its_real_server(e2e!(), "tun");
}

/// `lblc` across a failover (issue #18): the transparent-cache scheduler's destination (here
/// the VIP, a service's one destination) is on real server X on d1 — X = rs2, because the
/// operator drained rs1 on d1 when the destination was first scheduled, then restored it,
/// and lblc keeps a destination on its cache while that one keeps up. d2 receives the entry
/// and installs it into its pool; after d1's death d2's new connections still go to rs2.
/// (Without the entry d2 would schedule the destination afresh: wlc over two idle real
/// servers of equal weight takes rs1.)
#[test]
fn an_lblc_destination_keeps_its_cache_across_the_master_crash() {
    let lab = Lab::new(e2e!(), "kernel").named("caches", "scheduler = \"lblc\"");
    let mut d1 = lab.start("d1", 150);
    let d2 = lab.start("d2", 100);
    lab.wait_paired(&d1, &d2);
    // d2's `Features` rides with its `Hello`s (one a second): the first may have left before
    // d1 listened.
    wait_until(
        Duration::from_secs(5),
        "d1 seeing that d2 takes locality records",
        || {
            lab.sync("d1")
                .is_some_and(|s| s["peers"][0]["takes_locality"] == true)
        },
    );
    let weight = |w: &str| {
        let sock = lab.sock("d1");
        let out = lab.t.vipgate_output(
            "d1",
            &[
                "lb",
                "weight",
                "caches",
                &format!("10.0.0.101:{STICKY_PORT}"),
                w,
                "--control",
                sock.to_str().unwrap_or_default(),
            ],
        );
        assert!(
            out.status.success(),
            "lb weight: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    weight("0");
    let x = lab
        .ask_name("198.51.100.200")
        .expect("the first connection");
    assert_eq!(x, "rs2", "rs1 drained");
    weight("1");
    for k in 0..3 {
        let name = lab.ask_name("198.51.100.201").expect("a connection");
        assert_eq!(name, x, "lblc keeps the destination on its cache ({k})");
    }
    let s2 = wait_for(Duration::from_secs(10), "d2 holding the entry", || {
        lab.sync("d2")
            .filter(|s| counter(s, &["counters", "locality_installed"]) >= 1)
    });
    assert_eq!(counter(&s2, &["counters", "locality_refused"]), 0, "{s2}");
    let caches = lab.lb_service("d2", "caches");
    assert_eq!(counter(&caches, &["locality_entries"]), 1, "{caches}");

    lab.d1_dies_and_d2_answers("198.51.100.200", &mut d1, &d2, &x);
    for k in 0..4 {
        let name = lab
            .ask_name("198.51.100.201")
            .expect("a new connection through d2");
        assert_eq!(name, x, "new connection {k} through d2");
    }
    let caches = lab.lb_service("d2", "caches");
    assert_eq!(counter(&caches, &["locality_entries"]), 1, "{caches}");
}
