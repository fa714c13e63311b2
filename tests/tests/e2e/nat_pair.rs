//! A pair of PAT gateways that fail over losslessly: gw1 and gw2 share the inside gateway
//! address and the outside overload address by VRRP (one sync group), and sync their flows
//! over a link of their own. An inside host's OpenSSH session to a server outside and its
//! curl download, both paced by the server and through PAT, must arrive byte-exact (by hash)
//! across a crash of the master, a planned switchover and the fail-back; without `[sync]` the
//! same download breaks.
//!
//! ```text
//!  srv 198.51.100.200 ── br0 (sw) ── gw1 eth0 .11  gw2 eth0 .12   overload .10 (vrid 61)
//!  pc 192.168.101.10 ─── br1 (sw) ── gw1 eth1 .2   gw2 eth1 .3    gateway  .1  (vrid 62)
//!                        br2 (sw) ── gw1 eth2 10.9.0.1  gw2 eth2 10.9.0.2   [sync]
//! ```
//!
//! The overload address is never an interface address of either gateway: the VRRP master
//! makes it live (route into the TUN, proxy ARP) through the nat part's address hook; the
//! static forward `.10:8001 -> pc:8000` follows it. A host death is what the VRRP tests do:
//! SIGKILL and the host's bridge ports down.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use vipgate_tests::{Proc, Show, Topology, counter, e2e, wait_for, wait_until};

const OVERLOAD: &str = "198.51.100.10";
const SERVER: &str = "198.51.100.200";
const HTTP_PORT: u16 = 8080;
/// Bytes of each transfer, and the rate both are held to: 24 s, spanning every move.
const SIZE: u32 = 3_600_000;
const RATE: u32 = 150_000;

/// Writes a file to stdout at `rate` bytes/s (the SSH session's remote command).
const SLOWCAT_PY: &str = r#"
import sys, time
path, rate = sys.argv[1], int(sys.argv[2])
out, start, sent = sys.stdout.buffer, time.monotonic(), 0
with open(path, "rb") as f:
    while True:
        b = f.read(8192)
        if not b:
            break
        out.write(b); out.flush(); sent += len(b)
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
"#;

/// An HTTP server that sends `path` at `rate` bytes/s to every GET (paced at the sender: a
/// client-side limit would let the kernel buffer the whole file on the client before the
/// failover, and the test would test nothing).
const SLOWHTTP_PY: &str = r#"
import http.server, os, sys, time
addr, port, path, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.end_headers()
        start, sent = time.monotonic(), 0
        with open(path, "rb") as f:
            while True:
                b = f.read(8192)
                if not b:
                    break
                self.wfile.write(b); sent += len(b)
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
http.server.ThreadingHTTPServer((addr, port), H).serve_forever()
"#;

struct Pair {
    t: Topology,
    datapath: &'static str,
    key: PathBuf,
    /// The server's sshd and http server, the inside web server: they live as long as the
    /// pair.
    _servers: Vec<Proc>,
}

impl Pair {
    fn new(mut t: Topology, datapath: &'static str) -> Pair {
        t.hosts(&["sw", "gw1", "gw2", "pc", "srv"]);
        t.bridge("sw", "br0")
            .bridge("sw", "br1")
            .bridge("sw", "br2");
        for (h, n) in [("gw1", 1u8), ("gw2", 2)] {
            for (i, addr) in [
                format!("198.51.100.{}/24", 10 + n),
                format!("192.168.101.{}/24", 1 + n),
                format!("10.9.0.{n}/24"),
            ]
            .iter()
            .enumerate()
            {
                t.veth(h, &format!("eth{i}"), "sw", &format!("p-{h}-{i}"));
                t.ip("sw", &format!("link set p-{h}-{i} master br{i}"));
                t.addr(h, &format!("eth{i}"), addr);
            }
            t.forwarding(h);
        }
        t.veth("pc", "eth0", "sw", "p-pc");
        t.ip("sw", "link set p-pc master br1");
        t.addr("pc", "eth0", "192.168.101.10/24");
        t.ip("pc", "route add default via 192.168.101.1");
        t.veth("srv", "eth0", "sw", "p-srv");
        t.ip("sw", "link set p-srv master br0");
        t.addr("srv", "eth0", &format!("{SERVER}/24"));

        let d = t.dir().to_str().unwrap_or_default().to_owned();
        // The payload, served by both the HTTP server and the SSH session.
        let www = t.dir().join("www");
        std::fs::create_dir_all(&www).expect("web root");
        t.sh(
            "srv",
            &format!("head -c {SIZE} /dev/urandom > {d}/www/big && chmod 644 {d}/www/big"),
        );
        t.write("slowcat.py", SLOWCAT_PY);
        t.sh(
            "srv",
            &format!(
                "ssh-keygen -q -t ed25519 -N '' -f {d}/host_key && ssh-keygen -q -t ed25519 -N '' -f {d}/id \
                 && cp {d}/id.pub {d}/authorized_keys && chmod 600 {d}/authorized_keys {d}/id {d}/host_key"
            ),
        );
        let sshd_cfg = t.write(
            "sshd_config",
            &format!(
                "ListenAddress {SERVER}:22\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 StrictModes no\nUsePAM no\nPidFile none\n"
            ),
        );
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let sshd = t.spawn(
            "srv",
            "sshd",
            &[
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
                sshd_cfg.to_str().unwrap_or_default(),
            ],
        );
        let slowhttp = t.write("slowhttp.py", SLOWHTTP_PY);
        let http = t.spawn(
            "srv",
            "http-srv",
            &[
                "python3",
                slowhttp.to_str().unwrap_or_default(),
                SERVER,
                &HTTP_PORT.to_string(),
                www.join("big").to_str().unwrap_or_default(),
                &RATE.to_string(),
            ],
        );
        t.wait_listening("srv", 22);
        t.wait_listening("srv", HTTP_PORT);
        let web = t.http_server("pc", "192.168.101.10", 8000, "hello from pc");
        let key = t.write("sync.key", "the PAT pair's shared sync key\n");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the key");
        Pair {
            t,
            datapath,
            key,
            _servers: vec![sshd, http, web],
        }
    }

    fn sock(&self, host: &str) -> PathBuf {
        self.t.dir().join(format!("{host}.sock"))
    }

    /// A gateway of the pair, with `[sync]` or without.
    fn start(&self, host: &str, priority: u8, sync: bool) -> Proc {
        let (me, peer) = if host == "gw1" {
            ("10.9.0.1", "10.9.0.2")
        } else {
            ("10.9.0.2", "10.9.0.1")
        };
        let sync = if sync {
            format!(
                "[sync]\npeers = [\"{peer}\"]\nlisten = \"{me}\"\nkey_file = \"{}\"\nvrrp = \"outside\"\n",
                self.key.display()
            )
        } else {
            String::new()
        };
        let text = format!(
            r#"[daemon]
control = "{sock}"

[nat]
inside = ["eth1"]
outside = "eth0"
address = "{OVERLOAD}"
# The clients' ephemeral ports (32768-60999) lie outside: every public port is allocated
# at random, never preserved, so only sync can give the new master the same one.
ports = "10000-19999"
datapath = "{datapath}"

[[nat.acl]]
action = "permit"
src = "192.168.101.0/24"

[[nat.static]]
proto = "tcp"
outside_port = 8001
inside = "192.168.101.10:8000"

[[vrrp]]
name = "outside"
group = "hq"
interface = "eth0"
vrid = 61
priority = {priority}
advert_interval = "100ms"
addresses = ["{OVERLOAD}/24"]

[[vrrp]]
name = "inside"
group = "hq"
interface = "eth1"
vrid = 62
priority = {priority}
advert_interval = "100ms"
addresses = ["192.168.101.1/24"]

{sync}"#,
            sock = self.sock(host).display(),
            datapath = self.datapath,
        );
        let config = self.t.write(&format!("{host}.toml"), &text);
        let _ = std::fs::remove_file(self.sock(host));
        let check = self
            .t
            .vipgate_output(host, &["check", "-c", config.to_str().unwrap_or_default()]);
        assert!(
            check.status.success(),
            "vipgate check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        self.t.vipgate(
            host,
            &format!("vipgate-{host}"),
            &["run", "-c", config.to_str().unwrap_or_default()],
        )
    }

    fn sync(&self, host: &str) -> Option<Value> {
        self.t
            .try_show(host, self.sock(host), Show::Sync)
            .and_then(|v| v.get(0).cloned())
    }

    fn nat(&self, host: &str) -> Option<Value> {
        self.t
            .try_show(host, self.sock(host), Show::Nat)
            .and_then(|v| v.get(0).cloned())
    }

    /// Both instances' states, in config order (outside, inside).
    fn vrrp_states(&self, host: &str) -> Vec<String> {
        self.t
            .try_show(host, self.sock(host), Show::Vrrp)
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter_map(|i| i["state"].as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Whether `host` answers ARP for the overload address (its proxy neighbour entry).
    fn answers_for_overload(&self, host: &str) -> bool {
        self.t
            .try_sh(host, &format!("ip neigh show proxy {OVERLOAD} dev eth0"))
            .is_ok_and(|out| out.contains(OVERLOAD))
    }

    /// gw1 master of both instances and, with sync, streaming; gw2 backup, synced, and not
    /// answering for the overload address.
    fn wait_paired(&self, gw1: &Proc, gw2: &Proc, sync: bool) {
        wait_until(Duration::from_secs(20), "gw1 master, gw2 backup", || {
            self.vrrp_states("gw1") == ["MASTER", "MASTER"]
                && self.vrrp_states("gw2") == ["BACKUP", "BACKUP"]
        });
        if sync {
            wait_until(Duration::from_secs(20), "gw1 and gw2 synced", || {
                let ok = |s: Option<Value>, state: &str| {
                    s.is_some_and(|s| {
                        s["state"] == state && s["peers_up"] == 1 && s["synced"] == true
                    })
                };
                ok(self.sync("gw1"), "master") && ok(self.sync("gw2"), "backup")
            });
        }
        wait_until(
            Duration::from_secs(5),
            "only gw1 answering for the overload address",
            || self.answers_for_overload("gw1") && !self.answers_for_overload("gw2"),
        );
        assert!(
            self.nat("gw2").is_some(),
            "gw2's gateway runs: {}",
            gw2.log()
        );
        assert!(self.nat("gw1").is_some(), "{}", gw1.log());
    }

    /// A host death: SIGKILL and every bridge port of the host down.
    fn host_death(&self, host: &str, daemon: &mut Proc) {
        daemon.kill9();
        for i in 0..3 {
            self.t.ip("sw", &format!("link set p-{host}-{i} down"));
        }
    }

    /// The dead host boots again: its VRRP address and proxy neighbour are gone, its links
    /// come up.
    fn host_returns(&self, host: &str) {
        let _ = self.t.try_sh(host, "ip addr del 192.168.101.1/24 dev eth1");
        let _ = self
            .t
            .try_sh(host, &format!("ip neigh del proxy {OVERLOAD} dev eth0"));
        for i in 0..3 {
            self.t.ip("sw", &format!("link set p-{host}-{i} up"));
        }
    }

    /// The SSH session (`ssh srv 'slowcat big'`) and the curl download, from pc through PAT,
    /// each into a file of its own; returns once both have their first 64 KiB.
    fn transfers(&self) -> (Proc, Proc) {
        let d = self.t.dir().display().to_string();
        let ssh = self.t.spawn(
            "pc",
            "ssh-session",
            &[
                "sh",
                "-c",
                &format!(
                    "ssh -i {d}/id -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
                     -o ConnectTimeout=5 root@{SERVER} 'python3 {d}/slowcat.py {d}/www/big {RATE}' > {d}/via-ssh"
                ),
            ],
        );
        let curl = self.t.spawn(
            "pc",
            "curl-download",
            &[
                "curl",
                "-sS",
                "--speed-limit",
                "1000",
                "--speed-time",
                "8",
                "-o",
                &format!("{d}/via-http"),
                &format!("http://{SERVER}:{HTTP_PORT}/big"),
            ],
        );
        wait_until(Duration::from_secs(15), "both transfers under way", || {
            ["via-ssh", "via-http"]
                .iter()
                .all(|f| std::fs::metadata(self.t.dir().join(f)).is_ok_and(|m| m.len() >= 65_536))
        });
        (ssh, curl)
    }

    /// sha256 of a file of the test directory.
    fn hash(&self, name: &str) -> String {
        let out = self.t.sh(
            "pc",
            &format!("sha256sum {}", self.t.dir().join(name).display()),
        );
        out.split_whitespace().next().unwrap_or_default().to_owned()
    }

    /// Waits for both transfers to end and checks each got exactly the server's bytes.
    fn assert_intact(&self, ssh: &mut Proc, curl: &mut Proc, daemons: &[&Proc]) {
        let ssh_code = ssh.wait_exit(Duration::from_secs(90));
        let curl_code = curl.wait_exit(Duration::from_secs(90));
        let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
        let want = self.hash("www/big");
        for (what, code, log, file) in [
            ("ssh", ssh_code, ssh.log(), "via-ssh"),
            ("curl", curl_code, curl.log(), "via-http"),
        ] {
            assert_eq!(
                (code, self.hash(file)),
                (Some(0), want.clone()),
                "{what} broke: {log}\ndaemon logs:\n{}",
                logs.join("\n----\n")
            );
        }
    }

    /// gw2 holds both transfers' flows as standby (TCP established).
    fn wait_standby(&self) {
        wait_for(Duration::from_secs(5), "gw2 holding the two flows", || {
            self.sync("gw2")
                .map(|s| counter(&s, &["standby_flows"]))
                .filter(|n| *n >= 2)
        });
    }

    /// `host` is master of both instances, answers for the overload address, and its static
    /// forward on that address reaches pc's web server from outside.
    fn assert_serving(&self, host: &str) {
        wait_until(
            Duration::from_secs(10),
            &format!("{host} master of both instances"),
            || self.vrrp_states(host) == ["MASTER", "MASTER"],
        );
        assert!(self.answers_for_overload(host));
        let body = self
            .t
            .curl("srv", &format!("http://{OVERLOAD}:8001/"))
            .expect("curl through the forward");
        assert_eq!(body.trim(), "hello from pc");
    }
}

/// gw1 dies (kill -9, links down) during the SSH session and the download; gw2 promotes the
/// flows it holds, on the same public ports, and both continue byte-exact.
fn pat_pair_survives_the_master_crash(t: Topology, datapath: &'static str) {
    let pair = Pair::new(t, datapath);
    let mut gw1 = pair.start("gw1", 150, true);
    let gw2 = pair.start("gw2", 100, true);
    pair.wait_paired(&gw1, &gw2, true);
    assert_eq!(
        pair.nat("gw1").map(|n| n["datapath"].clone()),
        Some(Value::from(datapath))
    );
    let (mut ssh, mut curl) = pair.transfers();
    pair.wait_standby();
    // The public ports gw1 allocated: gw2 must use the same.
    let ports = |host: &str| -> Vec<String> {
        let mut p: Vec<String> = pair
            .nat(host)
            .and_then(|n| {
                n["translations"].as_array().map(|a| {
                    a.iter()
                        .filter(|t| t["listener"].is_null())
                        .filter_map(|t| t["inside_global"].as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default();
        p.sort();
        p
    };
    let before = ports("gw1");
    assert_eq!(before.len(), 2, "{before:?}");
    pair.host_death("gw1", &mut gw1);

    pair.assert_serving("gw2");
    let after = ports("gw2");
    assert!(
        before.iter().all(|p| after.contains(p)),
        "gw2 continues on gw1's public ports: {before:?} vs {after:?}"
    );
    pair.assert_intact(&mut ssh, &mut curl, &[&gw2]);
    let s2 = pair.sync("gw2").unwrap_or_default();
    assert_eq!(s2["state"], "master", "{s2}");
    assert!(counter(&s2, &["counters", "promoted"]) >= 2, "{s2}");
    assert_eq!(counter(&s2, &["counters", "promote_refused"]), 0, "{s2}");
}

#[test]
fn pat_pair_survives_the_master_crash_kernel() {
    pat_pair_survives_the_master_crash(e2e!(), "kernel");
}

#[test]
fn pat_pair_survives_the_master_crash_tun() {
    pat_pair_survives_the_master_crash(e2e!(), "tun");
}

/// A planned switchover: gw1 stops (SIGTERM: sync stops, VRRP sends priority 0, the overload
/// address is withdrawn), gw2 takes over at once with the flows it holds.
#[test]
fn pat_pair_survives_a_planned_switchover_kernel() {
    let pair = Pair::new(e2e!(), "kernel");
    let mut gw1 = pair.start("gw1", 150, true);
    let gw2 = pair.start("gw2", 100, true);
    pair.wait_paired(&gw1, &gw2, true);
    let (mut ssh, mut curl) = pair.transfers();
    pair.wait_standby();
    assert_eq!(
        gw1.terminate(Duration::from_secs(10)),
        Some(0),
        "gw1 stops cleanly: {}",
        gw1.log()
    );
    pair.assert_serving("gw2");
    pair.assert_intact(&mut ssh, &mut curl, &[&gw1, &gw2]);
    let s2 = pair.sync("gw2").unwrap_or_default();
    assert!(counter(&s2, &["counters", "promoted"]) >= 2, "{s2}");
}

/// Fail-back: gw1 dies, gw2 takes the transfers over; gw1 boots again, stays backup (and
/// answers for nothing) until it pulled gw2's flows, then preempts and promotes them. Both
/// transfers arrive intact across both moves.
#[test]
fn pat_pair_survives_the_crash_and_the_fail_back_tun() {
    let pair = Pair::new(e2e!(), "tun");
    let mut gw1 = pair.start("gw1", 150, true);
    let gw2 = pair.start("gw2", 100, true);
    pair.wait_paired(&gw1, &gw2, true);
    let (mut ssh, mut curl) = pair.transfers();
    pair.wait_standby();
    pair.host_death("gw1", &mut gw1);
    wait_until(Duration::from_secs(5), "gw2 master", || {
        pair.sync("gw2").is_some_and(|s| s["state"] == "master")
    });

    pair.host_returns("gw1");
    let gw1 = pair.start("gw1", 150, true);
    wait_until(Duration::from_secs(15), "gw1 back as master", || {
        // Read before the state: answering while still not MASTER after it is the fault.
        let answers = pair.answers_for_overload("gw1");
        let s1 = pair.sync("gw1");
        if pair
            .vrrp_states("gw1")
            .first()
            .is_some_and(|s| s == "MASTER")
        {
            assert!(
                s1.as_ref().is_some_and(|s| s["ready"] == true),
                "gw1 preempted before sync was ready: {s1:?}"
            );
        } else {
            assert!(!answers, "gw1 answers for the overload address as backup");
        }
        s1.is_some_and(|s| s["state"] == "master")
            && pair.sync("gw2").is_some_and(|s| s["state"] == "backup")
    });
    let log = gw1.log();
    let ready_at = log.find("flow sync: ready, VRRP may preempt");
    let master_at = log.find("to=MASTER");
    assert!(
        ready_at.is_some() && ready_at < master_at,
        "gw1 became ready before it preempted: {log}"
    );
    let s1 = pair.sync("gw1").unwrap_or_default();
    assert!(
        counter(&s1, &["counters", "promoted"]) >= 2,
        "gw1 promoted the flows it pulled: {s1}"
    );
    assert!(
        curl.is_running() && ssh.is_running(),
        "the transfers span the fail-back"
    );
    wait_until(
        Duration::from_secs(5),
        "gw2 withdrew the overload address",
        || !pair.answers_for_overload("gw2"),
    );
    pair.assert_serving("gw1");
    pair.assert_intact(&mut ssh, &mut curl, &[&gw1, &gw2]);
}

/// The control: the same crash without `[sync]`. gw2 takes the addresses over but knows
/// neither flow (and would allocate another, random, public port), so the download breaks:
/// what the tests above prove is sync's doing.
#[test]
fn without_sync_the_download_breaks_tun() {
    let pair = Pair::new(e2e!(), "tun");
    let mut gw1 = pair.start("gw1", 150, false);
    let gw2 = pair.start("gw2", 100, false);
    pair.wait_paired(&gw1, &gw2, false);
    let (mut ssh, mut curl) = pair.transfers();
    pair.host_death("gw1", &mut gw1);
    pair.assert_serving("gw2");
    let code = curl.wait_exit(Duration::from_secs(90));
    let intact = pair.hash("via-http") == pair.hash("www/big");
    assert!(
        code != Some(0) || !intact,
        "the download survived without sync: {}",
        curl.log()
    );
    ssh.kill9();
}
