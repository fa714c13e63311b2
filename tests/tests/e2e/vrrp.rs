//! VRRP end to end: two directors and a client on one bridge, vipgate against vipgate and
//! against Debian's keepalived (VRRPv3).
//!
//! A host death is simulated the way a host dies: its bridge port goes down and its daemon is
//! killed with SIGKILL (killing only the daemon would leave the VIP answering). The client
//! probes the VIP over UDP every 10 ms; the longest silence between two answers is the
//! client-visible failover gap.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use vipgate_tests::{Proc, Show, Topology, e2e, field, wait_until};

const VIP: &str = "198.51.100.10";
const PROBE_PORT: u16 = 7777;

/// Answers UDP probes with the host name, so the client sees who holds the VIP.
const ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(sys.argv[1].encode() + b" " + data, peer)
"#;

/// Sends a numbered probe every 10 ms for `seconds`; prints the longest gap between two
/// answers and who answered first and last.
const PROBE: &str = r#"
import socket, sys, time
vip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
start = time.monotonic(); nxt = start; seq = 0; replies = []; who = []
while time.monotonic() - start < seconds:
    now = time.monotonic()
    if now >= nxt:
        try: s.sendto(str(seq).encode(), (vip, port))
        except OSError: pass
        seq += 1; nxt += 0.01
    try:
        data, _ = s.recvfrom(2048)
        replies.append(time.monotonic()); name = data.split(b" ")[0].decode()
        if not who:
            print("first=" + name, flush=True)
        if not who or who[-1] != name: who.append(name)
    except BlockingIOError:
        time.sleep(0.001)
gaps = [b - a for a, b in zip(replies, replies[1:])]
print("gap_ms=%d received=%d sent=%d who=%s" % (round(max(gaps) * 1000) if gaps else 999999,
      len(replies), seq, ",".join(who)))
"#;

/// One instance from `show vrrp --json`; `Default` (null) when the daemon did not answer.
#[derive(Debug, Clone, Default)]
struct Status(Value);

impl Status {
    /// A string field of the instance (`state`, `master`).
    fn get(&self, key: &str) -> Option<String> {
        self.0[key].as_str().map(str::to_owned)
    }

    /// The number at `path` in the instance; 0 when absent (a malformed reason never seen,
    /// no master yet, or a daemon that did not answer).
    fn num(&self, path: &[&str]) -> u64 {
        field(&self.0, path).and_then(Value::as_u64).unwrap_or(0)
    }

    /// The instance's state transitions, oldest first.
    fn transitions(&self) -> &[Value] {
        self.0["transitions"].as_array().map_or(&[], Vec::as_slice)
    }
}

/// What the probe printed: the longest gap and who answered, in order.
struct ProbeResult {
    gap_ms: u64,
    who: String,
    line: String,
}

struct Lab {
    t: Topology,
    /// Echo services and daemons that live as long as the lab.
    procs: Vec<Proc>,
}

impl Lab {
    /// A bridge `br0` in host `sw`, directors `d1` (.11) and `d2` (.12), client `cl` (.200).
    fn new(mut t: Topology) -> Self {
        t.hosts(&["sw", "d1", "d2", "cl"]).bridge("sw", "br0");
        for (h, ip) in [("d1", "11"), ("d2", "12"), ("cl", "200")] {
            t.veth(h, "eth0", "sw", &format!("p-{h}"));
            t.ip("sw", &format!("link set p-{h} master br0"));
            t.addr(h, "eth0", &format!("198.51.100.{ip}/24"));
        }
        let script = t.write("echo.py", ECHO);
        let script = script.to_str().unwrap_or_default().to_owned();
        let echo = ["d1", "d2"]
            .map(|h| {
                t.spawn(
                    h,
                    &format!("echo-{h}"),
                    &["python3", &script, h, &PROBE_PORT.to_string()],
                )
            })
            .into();
        Lab { t, procs: echo }
    }

    fn sock(&self, host: &str) -> String {
        self.t
            .dir()
            .join(format!("{host}.sock"))
            .display()
            .to_string()
    }

    fn config(&self, host: &str, priority: u8, interval: &str, preempt: bool) -> PathBuf {
        self.config_with(host, priority, interval, preempt, "")
    }

    /// The standard instance plus `extra` lines in its `[[vrrp]]` section.
    fn config_with(
        &self,
        host: &str,
        priority: u8,
        interval: &str,
        preempt: bool,
        extra: &str,
    ) -> PathBuf {
        let text = format!(
            r#"[daemon]
control = "{sock}"

[[vrrp]]
name = "vip-web"
interface = "eth0"
vrid = 51
priority = {priority}
advert_interval = "{interval}"
preempt = {preempt}
addresses = ["{VIP}/24"]
{extra}
"#,
            sock = self.sock(host)
        );
        self.t.write(&format!("{host}.toml"), &text)
    }

    fn vipgate(&self, host: &str, priority: u8, interval: &str, preempt: bool) -> Proc {
        let cfg = self.config(host, priority, interval, preempt);
        let cfg = cfg.to_str().unwrap_or_default().to_owned();
        let _ = std::fs::remove_file(self.sock(host));
        self.t
            .vipgate(host, &format!("vipgate-{host}"), &["run", "-c", &cfg])
    }

    fn keepalived(&self, host: &str, priority: u8, advert_int: &str) -> Proc {
        let conf = format!(
            "global_defs {{\n  vrrp_version 3\n}}\nvrrp_instance vip {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {priority}\n  advert_int {advert_int}\n  virtual_ipaddress {{\n    {VIP}/24\n  }}\n}}\n"
        );
        let path = self.t.write(&format!("keepalived-{host}.conf"), &conf);
        let dir = self.t.dir();
        let (pid, vpid) = (
            dir.join(format!("ka-{host}.pid")),
            dir.join(format!("kav-{host}.pid")),
        );
        // A dead host's /run does not survive its reboot: drop the pid files, or keepalived
        // may find a recycled pid in them and refuse to start.
        let _ = std::fs::remove_file(&pid);
        let _ = std::fs::remove_file(&vpid);
        let argv = [
            "keepalived",
            "-n",
            "-l",
            "-D",
            "--vrrp",
            "-f",
            path.to_str().unwrap_or_default(),
            "-p",
            pid.to_str().unwrap_or_default(),
            "-r",
            vpid.to_str().unwrap_or_default(),
        ];
        self.t.spawn(host, &format!("keepalived-{host}"), &argv)
    }

    fn holds_vip(&self, host: &str) -> bool {
        self.t
            .ip(host, "-4 -o addr show dev eth0")
            .contains(&format!("{VIP}/"))
    }

    /// The instance's status from `vipgate show vrrp --json`, if the daemon answers (the labs
    /// run one instance per daemon).
    fn status(&self, host: &str) -> Option<Status> {
        let v = self.t.try_show(host, self.sock(host), Show::Vrrp)?;
        Some(Status(v[0].clone()))
    }

    fn state(&self, host: &str) -> String {
        self.status(host)
            .and_then(|s| s.get("state"))
            .unwrap_or_default()
    }

    fn wait_state(&self, host: &str, state: &str, timeout: Duration) {
        wait_until(timeout, &format!("{host} in state {state}"), || {
            self.state(host) == state
        });
    }

    /// Host death: the daemon dies with SIGKILL (keepalived's VRRP child too) and the bridge
    /// port goes down.
    fn host_death(&self, host: &str, daemon: &mut Proc) {
        daemon.kill9();
        let pids = std::process::Command::new("ip")
            .args(["netns", "pids", &self.t.ns(host)])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids.split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "keepalived" {
                let _ = std::process::Command::new("kill")
                    .args(["-9", pid])
                    .status();
            }
        }
        self.t.ip("sw", &format!("link set p-{host} down"));
    }

    /// Host death, and the dead host's addresses forgotten (its VIP cannot answer anyway and
    /// must not count as a second holder).
    fn host_death_clean(&self, host: &str, daemon: &mut Proc) {
        self.host_death(host, daemon);
        let _ = self
            .t
            .try_sh(host, &format!("ip addr del {VIP}/24 dev eth0"));
    }

    fn link_up(&self, host: &str) {
        self.t.ip("sw", &format!("link set p-{host} up"));
    }

    fn start_probe(&self, seconds: f64) -> Proc {
        let script = self.t.write("probe.py", PROBE);
        let script = script.to_str().unwrap_or_default().to_owned();
        self.t.spawn(
            "cl",
            "probe",
            &[
                "python3",
                &script,
                VIP,
                &PROBE_PORT.to_string(),
                &seconds.to_string(),
            ],
        )
    }

    /// Waits until the probe got its first answer, from `host`, then lets it record a few
    /// hundred more before the test breaks something (a loaded machine may start python late).
    fn wait_first_answer(&self, probe: &Proc, host: &str) {
        wait_until(Duration::from_secs(5), "the probe's first answer", || {
            probe.log().contains("first=")
        });
        assert!(
            probe.log().contains(&format!("first={host}")),
            "{}",
            probe.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    fn probe_result(&self, probe: &mut Proc) -> ProbeResult {
        probe.wait_exit(Duration::from_secs(30));
        let log = probe.log();
        let line = log.lines().last().unwrap_or_default().to_owned();
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_default()
                .to_owned()
        };
        ProbeResult {
            gap_ms: field("gap_ms=").parse().unwrap_or(u64::MAX),
            who: field("who="),
            line: line.clone(),
        }
    }

    /// Records, until stopped, the longest time both directors held the VIP at once.
    fn watch_dual_hold(self: &Arc<Self>) -> DualHold {
        let stop = Arc::new(AtomicBool::new(false));
        let (lab, flag) = (self.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut longest, mut since) = (Duration::ZERO, None::<Instant>);
            while !flag.load(Ordering::Relaxed) {
                let both = lab.holds_vip("d1") && lab.holds_vip("d2");
                match (both, since) {
                    (true, None) => since = Some(Instant::now()),
                    (false, Some(s)) => {
                        longest = longest.max(s.elapsed());
                        since = None;
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            longest.max(since.map_or(Duration::ZERO, |s| s.elapsed()))
        });
        DualHold {
            stop,
            thread: Some(thread),
        }
    }
}

struct DualHold {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Duration>>,
}

impl DualHold {
    fn finish(mut self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map_or(Duration::MAX, |t| t.join().unwrap_or(Duration::MAX))
    }
}

impl Drop for DualHold {
    /// Stops the watcher even when the test panics, so its handle on the lab goes away and
    /// the lab's namespaces are torn down.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(clippy::disallowed_methods)]
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[test]
fn host_death_failover_gap_and_restart_over_stale_vip() {
    let lab = Lab::new(e2e!());
    let mut d1 = lab.vipgate("d1", 150, "100ms", true);
    let _d2 = lab.vipgate("d2", 100, "100ms", true);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(5));
    assert!(lab.holds_vip("d1") && !lab.holds_vip("d2"));

    let mut probe = lab.start_probe(2.5);
    lab.wait_first_answer(&probe, "d1");
    lab.host_death("d1", &mut d1);
    let r = lab.probe_result(&mut probe);
    // d2 (priority 100) at 100 ms: master down interval = 300 ms + skew 61 ms.
    assert!(r.gap_ms < 361 + 200, "failover gap: {}", r.line);
    assert_eq!(r.who, "d1,d2", "{}", r.line);
    assert!(lab.holds_vip("d1"), "SIGKILL leaves the VIP behind");

    // Restart over the stale VIP: it is removed while backup, then d1 preempts.
    lab.link_up("d1");
    let _d1 = lab.vipgate("d1", 150, "100ms", true);
    wait_until(Duration::from_secs(2), "stale VIP removed on d1", || {
        !lab.holds_vip("d1")
    });
    assert_eq!(lab.state("d2"), "MASTER");
    lab.wait_state("d1", "MASTER", Duration::from_secs(3));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(2));
    assert!(lab.holds_vip("d1") && !lab.holds_vip("d2"));
    let s = lab.status("d1").unwrap_or_default();
    assert!(
        s.transitions().iter().any(|t| t["to"] == "BACKUP"),
        "d1 went through BACKUP: {s:?}"
    );
}

#[test]
fn sigterm_sends_priority_zero_and_backup_takes_over_after_skew() {
    let lab = Lab::new(e2e!());
    let mut d1 = lab.vipgate("d1", 150, "100ms", true);
    let _d2 = lab.vipgate("d2", 100, "100ms", true);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(5));
    let mut probe = lab.start_probe(2.0);
    lab.wait_first_answer(&probe, "d1");
    assert_eq!(
        d1.terminate(Duration::from_secs(5)),
        Some(0),
        "{}",
        d1.log()
    );
    let r = lab.probe_result(&mut probe);
    // Skew time of priority 100 at 100 ms is 61 ms.
    assert!(r.gap_ms < 61 + 100, "graceful gap: {}", r.line);
    assert!(!lab.holds_vip("d1"), "VIP removed on stop");
    let s = lab.status("d2").unwrap_or_default();
    assert_eq!(s.get("state").as_deref(), Some("MASTER"));
    assert!(s.num(&["counters", "priority_zero_rx"]) >= 1, "{s:?}");
}

#[test]
fn preempt_off_keeps_the_returning_node_backup() {
    let lab = Lab::new(e2e!());
    // With preemption off, whoever's master-down timer fires first wins: started together on
    // a loaded machine that may be d2. Start d1 first so it is the master being replaced.
    let mut d1 = lab.vipgate("d1", 150, "100ms", false);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    let _d2 = lab.vipgate("d2", 100, "100ms", false);
    lab.wait_state("d2", "BACKUP", Duration::from_secs(5));
    lab.host_death("d1", &mut d1);
    lab.wait_state("d2", "MASTER", Duration::from_secs(2));
    lab.link_up("d1");
    let _d1 = lab.vipgate("d1", 150, "100ms", false);
    lab.wait_state("d1", "BACKUP", Duration::from_secs(3));
    // Five master-down intervals later it still has not taken over.
    std::thread::sleep(Duration::from_millis(1800));
    assert_eq!(
        (lab.state("d1"), lab.state("d2")),
        ("BACKUP".into(), "MASTER".into())
    );
    assert!(!lab.holds_vip("d1") && lab.holds_vip("d2"));
}

#[test]
fn split_brain_heals_to_one_master_within_one_interval() {
    let lab = Lab::new(e2e!());
    let _d1 = lab.vipgate("d1", 150, "1s", true);
    let _d2 = lab.vipgate("d2", 100, "1s", true);
    lab.wait_state("d1", "MASTER", Duration::from_secs(8));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(2));
    // Block the bridge port without dropping carrier: the directors stop hearing each other.
    lab.t.sh("sw", "bridge link set dev p-d2 state 0");
    lab.wait_state("d2", "MASTER", Duration::from_secs(6));
    assert_eq!(lab.state("d1"), "MASTER");
    let healed = unix_ms();
    lab.t.sh("sw", "bridge link set dev p-d2 state 3");
    lab.wait_state("d2", "BACKUP", Duration::from_secs(3));
    let back = lab
        .status("d2")
        .map(|s| {
            s.transitions()
                .last()
                .and_then(|t| t["at_unix_ms"].as_u64())
                .unwrap_or(0)
        })
        .unwrap_or(u64::MAX);
    assert!(
        back.saturating_sub(healed) <= 1000 + 50,
        "healed after {} ms",
        back - healed
    );
    assert_eq!(lab.state("d1"), "MASTER");
    assert!(lab.holds_vip("d1") && !lab.holds_vip("d2"));
}

/// IPv4 + VRRP bytes sent by a raw socket from the client, unicast to d1.
const MALFORMED: &str = r#"
import socket, struct, sys
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
src, dst = socket.inet_aton("198.51.100.200"), socket.inet_aton(sys.argv[1])
def advert(ver=0x31, ttl=255, bad=False, cut=None):
    body = bytes([ver, 51, 250, 1]) + struct.pack("!HH", 10, 0) + socket.inet_aton("198.51.100.10")
    c = csum(src + dst + bytes([0, 112]) + struct.pack("!H", len(body)) + body) ^ (1 if bad else 0)
    body = body[:6] + struct.pack("!H", c) + body[8:]
    if cut: body = body[:cut]
    return bytes([0x45, 0]) + struct.pack("!H", 20 + len(body)) + bytes([0, 0, 0, 0, ttl, 112, 0, 0]) + src + dst + body
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for p in [advert(ttl=64), advert(bad=True), advert(ver=0x21), advert(cut=6)]:
    s.sendto(p, (sys.argv[1], 0))
"#;

#[test]
fn malformed_adverts_are_ignored_and_counted() {
    let lab = Lab::new(e2e!());
    let _d1 = lab.vipgate("d1", 150, "100ms", true);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    let script = lab.t.write("malformed.py", MALFORMED);
    lab.t
        .sh("cl", &format!("python3 {} 198.51.100.11", script.display()));
    wait_until(Duration::from_secs(3), "drops counted", || {
        let s = lab.status("d1").unwrap_or_default();
        s.num(&["counters", "drops", "bad_ttl"]) == 1
            && s.num(&["counters", "malformed", "bad_checksum"]) == 1
            && s.num(&["counters", "malformed", "bad_version"]) == 1
            && s.num(&["counters", "malformed", "truncated"]) == 1
    });
    // Priority 250 adverts would have made d1 a backup had any been accepted.
    assert_eq!(lab.state("d1"), "MASTER");
    let text = lab
        .t
        .vipgate_output("d1", &["show", "vrrp", "--control", &lab.sock("d1")]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("vip-web") && text.contains("MASTER"),
        "{text}"
    );
}

#[test]
fn interop_with_keepalived_both_ways() {
    let lab = Arc::new(Lab::new(e2e!()));
    let dual = lab.watch_dual_hold();

    // vipgate master (150) + keepalived backup (100).
    let mut vg = lab.vipgate("d1", 150, "100ms", true);
    let mut ka = lab.keepalived("d2", 100, "0.1");
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    wait_until(Duration::from_secs(3), "keepalived backup", || {
        ka.log().contains("Entering BACKUP STATE")
    });
    assert!(lab.holds_vip("d1") && !lab.holds_vip("d2"));
    // vipgate host dies: keepalived takes over.
    lab.host_death_clean("d1", &mut vg);
    wait_until(Duration::from_secs(2), "keepalived takes over", || {
        lab.holds_vip("d2")
    });
    // vipgate returns and preempts keepalived.
    lab.link_up("d1");
    let mut vg = lab.vipgate("d1", 150, "100ms", true);
    lab.wait_state("d1", "MASTER", Duration::from_secs(3));
    wait_until(Duration::from_secs(2), "keepalived back to backup", || {
        !lab.holds_vip("d2")
    });

    // keepalived master: vipgate restarts with priority 50 and stays backup.
    assert_eq!(vg.terminate(Duration::from_secs(5)), Some(0));
    wait_until(Duration::from_secs(2), "keepalived master again", || {
        lab.holds_vip("d2")
    });
    let vg = lab.vipgate("d1", 50, "100ms", true);
    lab.wait_state("d1", "BACKUP", Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        lab.state("d1"),
        "BACKUP",
        "vipgate follows keepalived's adverts"
    );
    let s = lab.status("d1").unwrap_or_default();
    assert_eq!(s.get("master").as_deref(), Some("198.51.100.12"), "{s:?}");
    // keepalived host dies: vipgate takes over.
    lab.host_death_clean("d2", &mut ka);
    lab.wait_state("d1", "MASTER", Duration::from_secs(2));
    assert!(lab.holds_vip("d1"));
    // keepalived returns (priority 100 > 50) and preempts vipgate.
    lab.link_up("d2");
    let _ka = lab.keepalived("d2", 100, "0.1");
    lab.wait_state("d1", "BACKUP", Duration::from_secs(5));
    wait_until(Duration::from_secs(2), "keepalived holds the VIP", || {
        lab.holds_vip("d2") && !lab.holds_vip("d1")
    });
    let longest = dual.finish();
    assert!(
        longest <= Duration::from_millis(100 + 20),
        "both held the VIP for {longest:?}"
    );
    drop(vg);
}

/// The state column of `vipgate show vrrp` for one instance.
fn state_of(lab: &Lab, host: &str, instance: &str) -> String {
    let out = lab
        .t
        .vipgate_output(host, &["show", "vrrp", "--control", &lab.sock(host)]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&instance)).then(|| cols.get(3).map(|s| s.to_string()))
        })
        .flatten()
        .unwrap_or_default()
}

#[test]
fn sync_group_moves_vip_and_inside_gateway_together() {
    let mut lab = Lab::new(e2e!());
    // The real servers' segment: a second bridge, eth1 on both directors, one real server.
    lab.t.host("rs").bridge("sw", "br1");
    for (h, ip) in [("d1", "11"), ("d2", "12"), ("rs", "101")] {
        lab.t.veth(h, "eth1", "sw", &format!("i-{h}"));
        lab.t.ip("sw", &format!("link set i-{h} master br1"));
        lab.t.addr(h, "eth1", &format!("10.0.0.{ip}/24"));
    }
    for (h, prio) in [("d1", 150), ("d2", 100)] {
        let text = format!(
            r#"[daemon]
control = "{sock}"

[[vrrp]]
name = "vip-web"
group = "director"
interface = "eth0"
vrid = 51
priority = {prio}
advert_interval = "100ms"
addresses = ["{VIP}/24"]
track_interfaces = ["eth1"]

[[vrrp]]
name = "gw-inside"
group = "director"
interface = "eth1"
vrid = 52
priority = {prio}
advert_interval = "100ms"
addresses = ["10.0.0.1/24"]
track_interfaces = ["eth0"]
"#,
            sock = lab.sock(h)
        );
        let cfg = lab.t.write(&format!("{h}.toml"), &text);
        let cfg = cfg.to_str().unwrap_or_default().to_owned();
        lab.procs.push(
            lab.t
                .vipgate(h, &format!("vipgate-{h}"), &["run", "-c", &cfg]),
        );
    }
    let states = |h: &str| (state_of(&lab, h, "vip-web"), state_of(&lab, h, "gw-inside"));
    let both = |s: &str| (s.to_owned(), s.to_owned());
    wait_until(Duration::from_secs(5), "d1 master of both", || {
        states("d1") == both("MASTER") && states("d2") == both("BACKUP")
    });
    let holds_gw = |h: &str| {
        lab.t
            .ip(h, "-4 -o addr show dev eth1")
            .contains("10.0.0.1/")
    };
    assert!(holds_gw("d1") && !holds_gw("d2"));

    // d1 loses its inside link: the whole group hands over, the public VIP included.
    lab.t.ip("sw", "link set i-d1 down");
    wait_until(Duration::from_secs(2), "d2 master of both", || {
        states("d2") == both("MASTER")
    });
    assert_eq!(states("d1"), both("FAULT"));
    assert!(lab.holds_vip("d2") && holds_gw("d2"));
    assert!(!lab.holds_vip("d1") && !holds_gw("d1"));
    lab.t.sh("rs", "ping -c1 -W1 10.0.0.1 >/dev/null");
    lab.t.sh("cl", &format!("ping -c1 -W1 {VIP} >/dev/null"));

    // The link returns: d1 preempts on both links again.
    lab.t.ip("sw", "link set i-d1 up");
    wait_until(Duration::from_secs(3), "d1 master of both again", || {
        states("d1") == both("MASTER") && states("d2") == both("BACKUP")
    });
    assert!(lab.holds_vip("d1") && holds_gw("d1") && !lab.holds_vip("d2") && !holds_gw("d2"));
}

/// keepalived's notify family, called as keepalived calls it: the state's own script first,
/// then `notify` with `INSTANCE NAME STATE PRIORITY`, the sync group's with `GROUP NAME STATE
/// 0`, and `STOP` (with `notify_stop`) when the daemon stops the instance.
#[test]
fn notify_scripts_run_with_keepalived_arguments() {
    let lab = Lab::new(e2e!());
    let out = lab.t.dir().join("notify.out");
    // One recording script: each configured command adds its own first argument (its name).
    let hook = lab.t.write(
        "notify.sh",
        &format!("#!/bin/sh\necho \"$@\" >> {}\n", out.display()),
    );
    lab.t.sh("d1", &format!("chmod +x {}", hook.display()));
    let text = format!(
        r#"[daemon]
control = "{sock}"

[[vrrp]]
name = "vip-web"
group = "edge"
interface = "eth0"
vrid = 51
priority = 150
advert_interval = "100ms"
addresses = ["{VIP}/24"]
notify = "{hook}"
notify_master = "{hook} notify_master"
notify_backup = "{hook} notify_backup"
notify_stop = "{hook} notify_stop"

[[vrrp_group]]
name = "edge"
notify = "{hook} group"
notify_master = "{hook} group_master"
"#,
        sock = lab.sock("d1"),
        hook = hook.display()
    );
    let cfg = lab.t.write("d1.toml", &text);
    let mut d1 = lab.t.vipgate(
        "d1",
        "vipgate-d1",
        &["run", "-c", cfg.to_str().unwrap_or_default()],
    );
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    // Lines of the instance's scripts and of the group's, each in its own order (the two run
    // side by side).
    let split = || {
        let text = read();
        let (group, instance): (Vec<String>, Vec<String>) = text
            .lines()
            .map(str::to_owned)
            .partition(|l| l.starts_with("group"));
        (instance, group)
    };
    wait_until(Duration::from_secs(5), "notify MASTER", || {
        split().0.len() >= 4 && split().1.len() >= 3
    });
    let (instance, group) = split();
    assert_eq!(
        instance,
        [
            "notify_backup",
            "INSTANCE vip-web BACKUP 150",
            "notify_master",
            "INSTANCE vip-web MASTER 150"
        ],
        "{}",
        read()
    );
    assert_eq!(
        group,
        [
            "group GROUP edge BACKUP 0",
            "group_master",
            "group GROUP edge MASTER 0"
        ],
        "{}",
        read()
    );
    assert_eq!(d1.terminate(Duration::from_secs(5)), Some(0));
    // The daemon waits for the STOP scripts before it exits; groups report no STOP.
    let (instance, group) = split();
    assert_eq!(
        instance[4..],
        ["notify_stop", "INSTANCE vip-web STOP 150"],
        "{}",
        read()
    );
    assert_eq!(group.len(), 3, "{}", read());
}

#[test]
fn unicast_peers_elect_and_fail_over() {
    let lab = Lab::new(e2e!());
    let mut procs = Vec::new();
    for (h, prio, peer) in [("d1", 150, "12"), ("d2", 100, "11")] {
        let extra = format!("unicast_peers = [\"198.51.100.{peer}\"]");
        let cfg = lab.config_with(h, prio, "100ms", true, &extra);
        let cfg = cfg.to_str().unwrap_or_default().to_owned();
        procs.push(
            lab.t
                .vipgate(h, &format!("vipgate-{h}"), &["run", "-c", &cfg]),
        );
    }
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(2));
    let s = lab.status("d2").unwrap_or_default();
    assert_eq!(s.get("master").as_deref(), Some("198.51.100.11"), "{s:?}");
    assert!(s.num(&["counters", "adverts_rx"]) > 0, "{s:?}");
    // The client is not a peer: its one well-formed advert (the TTL 64 one; the others do not
    // parse) is counted and ignored.
    let script = lab.t.write("malformed.py", MALFORMED);
    lab.t
        .sh("cl", &format!("python3 {} 198.51.100.12", script.display()));
    wait_until(Duration::from_secs(2), "unknown peer counted", || {
        lab.status("d2")
            .is_some_and(|s| s.num(&["counters", "unknown_peer"]) == 1)
    });
    assert_eq!(lab.state("d2"), "BACKUP");
    assert_eq!(procs[0].terminate(Duration::from_secs(5)), Some(0));
    lab.wait_state("d2", "MASTER", Duration::from_secs(1));
    assert!(lab.holds_vip("d2") && !lab.holds_vip("d1"));
}

/// Two directors each front the VIP with the virtual service `web`, d1 over its real server
/// rs1 and d2 over rs2, so the page served says which director holds the VIP. rs1 dies: d1's
/// service has no healthy backend, its priority drops by `track_services_weight` below d2's
/// and d2 preempts; rs1 returns: d1 preempts back.
#[test]
fn track_services_hands_the_vip_over_when_the_service_dies_and_back() {
    let mut lab = Lab::new(e2e!());
    let mut servers = Vec::new();
    for (d, rs, net, prio) in [("d1", "rs1", 1, 150), ("d2", "rs2", 2, 100)] {
        lab.t.host(rs);
        lab.t.veth(d, "eth1", rs, "eth0");
        lab.t.addr(d, "eth1", &format!("10.0.{net}.1/24"));
        lab.t.addr(rs, "eth0", &format!("10.0.{net}.101/24"));
        lab.t.ip(rs, &format!("route add default via 10.0.{net}.1"));
        lab.t.forwarding(d);
        servers.push(lab.t.http_server(rs, &format!("10.0.{net}.101"), 80, rs));
        let text = format!(
            r#"[daemon]
control = "{sock}"

[[service]]
name = "web"
listen = "{VIP}:80"
health = {{ kind = "http", interval = "200ms", timeout = "150ms", rise = 1, fall = 1 }}
backends = [{{ address = "10.0.{net}.101:80", weight = 1 }}]

[[vrrp]]
name = "vip-web"
interface = "eth0"
vrid = 51
priority = {prio}
advert_interval = "100ms"
addresses = ["{VIP}/24"]
track_services = ["web"]
track_services_weight = 60
"#,
            sock = lab.sock(d)
        );
        let cfg = lab.t.write(&format!("{d}.toml"), &text);
        let cfg = cfg.to_str().unwrap_or_default().to_owned();
        lab.procs.push(
            lab.t
                .vipgate(d, &format!("vipgate-{d}"), &["run", "-c", &cfg]),
        );
    }
    let page = || {
        lab.t
            .curl("cl", &format!("http://{VIP}/"))
            .unwrap_or_default()
    };
    lab.wait_state("d1", "MASTER", Duration::from_secs(20));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(5));
    wait_until(Duration::from_secs(10), "the VIP to serve rs1", || {
        page().trim() == "rs1"
    });

    // rs1 dies: only d1's health checks fail.
    servers[0].kill9();
    wait_until(Duration::from_secs(10), "the VIP to serve rs2", || {
        page().trim() == "rs2"
    });
    let (s1, s2) = (
        lab.status("d1").unwrap_or_default(),
        lab.status("d2").unwrap_or_default(),
    );
    assert_eq!(s1.get("state").as_deref(), Some("BACKUP"), "{s1:?}");
    assert_eq!(
        (s1.num(&["priority"]), s1.num(&["configured_priority"])),
        (90, 150)
    );
    assert_eq!(s2.get("state").as_deref(), Some("MASTER"), "{s2:?}");
    assert_eq!(s2.get("master").as_deref(), Some("198.51.100.12"));

    // rs1 is back: d1's priority returns to 150 and it preempts.
    servers[0] = lab.t.http_server("rs1", "10.0.1.101", 80, "rs1");
    wait_until(
        Duration::from_secs(10),
        "the VIP to serve rs1 again",
        || page().trim() == "rs1",
    );
    lab.wait_state("d1", "MASTER", Duration::from_secs(2));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(2));
    assert_eq!(lab.status("d1").unwrap_or_default().num(&["priority"]), 150);
}

/// keepalived's `track_interface { eth1 weight -20 }`: with a weight, losing the tracked link
/// lowers the priority (the node stays BACKUP, ready) instead of putting it in FAULT.
#[test]
fn weighted_track_interface_lowers_priority_instead_of_fault() {
    let mut lab = Lab::new(e2e!());
    lab.t.veth("d1", "eth1", "sw", "x-d1");
    let extra = r#"track_interfaces = [{ name = "eth1", weight = 60 }]"#;
    let cfg = lab.config_with("d1", 150, "100ms", true, extra);
    let cfg = cfg.to_str().unwrap_or_default().to_owned();
    lab.procs
        .push(lab.t.vipgate("d1", "vipgate-d1", &["run", "-c", &cfg]));
    let d2 = lab.vipgate("d2", 100, "100ms", true);
    lab.procs.push(d2);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(5));

    let mut probe = lab.start_probe(4.0);
    lab.wait_first_answer(&probe, "d1");
    lab.t.ip("sw", "link set x-d1 down");
    lab.wait_state("d2", "MASTER", Duration::from_secs(2));
    lab.wait_state("d1", "BACKUP", Duration::from_secs(1));
    let s1 = lab.status("d1").unwrap_or_default();
    assert_eq!(
        (s1.num(&["priority"]), s1.num(&["configured_priority"])),
        (90, 150)
    );
    assert!(lab.holds_vip("d2") && !lab.holds_vip("d1"));
    let r = lab.probe_result(&mut probe);
    assert!(r.who.ends_with("d2"), "{}", r.line);

    // The link returns: full priority, d1 preempts.
    lab.t.ip("sw", "link set x-d1 up");
    lab.wait_state("d1", "MASTER", Duration::from_secs(2));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(1));
    assert_eq!(lab.status("d1").unwrap_or_default().num(&["priority"]), 150);
    assert!(lab.holds_vip("d1") && !lab.holds_vip("d2"));
}

/// keepalived's `vrrp_script` + `track_script`: a script failing `fall` times in a row
/// lowers the priority by its weight and the backup takes over; succeeding `rise` times in a
/// row restores it and the first router preempts again.
#[test]
fn a_failing_track_script_lowers_priority_and_fails_over() {
    let mut lab = Lab::new(e2e!());
    let flag = lab.t.dir().join("healthy");
    std::fs::write(&flag, "").unwrap();
    let extra = format!(
        r#"track_scripts = [{{ command = "/usr/bin/test -e {}", interval = "200ms", fall = 2, rise = 2, weight = 60 }}]"#,
        flag.display()
    );
    let cfg = lab.config_with("d1", 150, "100ms", true, &extra);
    let cfg = cfg.to_str().unwrap_or_default().to_owned();
    lab.procs
        .push(lab.t.vipgate("d1", "vipgate-d1", &["run", "-c", &cfg]));
    let d2 = lab.vipgate("d2", 100, "100ms", true);
    lab.procs.push(d2);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(5));

    std::fs::remove_file(&flag).unwrap();
    lab.wait_state("d2", "MASTER", Duration::from_secs(5));
    lab.wait_state("d1", "BACKUP", Duration::from_secs(1));
    let s1 = lab.status("d1").unwrap_or_default();
    assert_eq!(
        (s1.num(&["priority"]), s1.num(&["configured_priority"])),
        (90, 150)
    );
    assert!(lab.holds_vip("d2") && !lab.holds_vip("d1"));

    std::fs::write(&flag, "").unwrap();
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(1));
    assert_eq!(lab.status("d1").unwrap_or_default().num(&["priority"]), 150);
}

/// A copy of `sleep` under a name of its own (`PREFIX` + this test's pid), so
/// /proc/PID/comm is that name, unique per run: every namespace shares the process table.
/// Returns the name and the copy's path.
fn sleep_named(lab: &Lab, prefix: &str) -> (String, String) {
    let name = format!("{prefix}{}", std::process::id());
    let bin = lab.t.dir().join(&name);
    std::fs::copy("/bin/sleep", &bin).unwrap();
    (name, bin.to_str().unwrap_or_default().to_owned())
}

/// Starts d1 (priority 150, tracking per `extra`) and d2 (100), and waits for d1 to be
/// master.
fn start_tracking_pair(lab: &mut Lab, extra: &str) {
    let cfg = lab.config_with("d1", 150, "100ms", true, extra);
    let cfg = cfg.to_str().unwrap_or_default().to_owned();
    lab.procs
        .push(lab.t.vipgate("d1", "vipgate-d1", &["run", "-c", &cfg]));
    let d2 = lab.vipgate("d2", 100, "100ms", true);
    lab.procs.push(d2);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(5));
}

/// The `tracking:` line of `show vrrp` on d1.
fn tracking_line(lab: &Lab) -> String {
    let text = String::from_utf8_lossy(
        &lab.t
            .vipgate_output("d1", &["show", "vrrp", "--control", &lab.sock("d1")])
            .stdout,
    )
    .into_owned();
    text.lines()
        .find(|l| l.contains("tracking:"))
        .unwrap_or_default()
        .to_owned()
}

/// keepalived's `vrrp_track_process`: the master tracks a daemon by its process name; killed,
/// the master's priority drops and the backup takes the VIP; started again, it comes back.
#[test]
fn a_tracked_process_killed_hands_the_vip_over_and_back() {
    let mut lab = Lab::new(e2e!());
    let (name, bin) = sleep_named(&lab, "vgt");
    let mut daemon = lab.t.spawn("d1", "tracked", &[&bin, "1000"]);
    let extra = format!(r#"track_processes = [{{ name = "{name}", weight = 60 }}]"#);
    start_tracking_pair(&mut lab, &extra);
    let tracked = tracking_line;
    wait_until(Duration::from_secs(5), "the process counted", || {
        tracked(&lab).contains(&format!("process {name} 1/1 up (-60)"))
    });

    daemon.kill9();
    lab.wait_state("d2", "MASTER", Duration::from_secs(5));
    lab.wait_state("d1", "BACKUP", Duration::from_secs(1));
    assert_eq!(lab.status("d1").unwrap_or_default().num(&["priority"]), 90);
    assert!(lab.holds_vip("d2") && !lab.holds_vip("d1"));
    let line = tracked(&lab);
    assert!(
        line.contains(&format!("process {name} 0/1 DOWN (-60)")),
        "{line}"
    );

    let _daemon = lab.t.spawn("d1", "tracked-again", &[&bin, "1000"]);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(1));
    assert_eq!(lab.status("d1").unwrap_or_default().num(&["priority"]), 150);
    assert!(lab.holds_vip("d1"));
}

/// keepalived's `param_match`: two processes share the tracked name, only the one whose
/// arguments match `parameters` counts, and killing it (the other still running) hands the
/// VIP over.
#[test]
fn a_tracked_process_is_told_apart_by_its_parameters() {
    let mut lab = Lab::new(e2e!());
    let (name, bin) = sleep_named(&lab, "vgp");
    let _other = lab.t.spawn("d1", "other", &[&bin, "1000"]);
    let mut tracked_daemon = lab.t.spawn("d1", "tracked", &[&bin, "2000"]);
    let extra = format!(
        r#"track_processes = [{{ name = "{name}", parameters = ["2000"], param_match = "exact", weight = 60 }}]"#
    );
    start_tracking_pair(&mut lab, &extra);
    let tracked = tracking_line;
    // Two processes run under the name; one matches.
    wait_until(
        Duration::from_secs(5),
        "the matching process counted",
        || tracked(&lab).contains(&format!("process {name} [2000] 1/1 up (-60)")),
    );

    tracked_daemon.kill9();
    lab.wait_state("d2", "MASTER", Duration::from_secs(5));
    lab.wait_state("d1", "BACKUP", Duration::from_secs(1));
    assert_eq!(lab.status("d1").unwrap_or_default().num(&["priority"]), 90);
    let line = tracked(&lab);
    assert!(
        line.contains(&format!("process {name} [2000] 0/1 DOWN (-60)")),
        "{line}"
    );
    // The backup that took over: one mastership counted, the transition dated, in UTC.
    let d2 = String::from_utf8_lossy(
        &lab.t
            .vipgate_output(
                "d2",
                &["show", "vrrp", "--utc", "--control", &lab.sock("d2")],
            )
            .stdout,
    )
    .into_owned();
    assert!(d2.contains("became master 1; time as master "), "{d2}");
    let dated = d2
        .lines()
        .find(|l| l.contains("BACKUP -> MASTER"))
        .unwrap_or_default();
    assert!(
        dated.trim_start().starts_with("20") && dated.contains(" +00:00 BACKUP -> MASTER"),
        "{d2}"
    );
}

/// `vipgate vrrp set-priority`: the backup raised above the master preempts it at once, no
/// reload; the reply and `show vrrp` say it is a runtime value; setting the file's value back
/// lets the master of the file preempt again.
#[test]
fn set_priority_on_the_backup_preempts_without_a_reload() {
    let mut lab = Lab::new(e2e!());
    let d1 = lab.vipgate("d1", 150, "100ms", true);
    lab.procs.push(d1);
    let d2 = lab.vipgate("d2", 100, "100ms", true);
    lab.procs.push(d2);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(5));
    let set = |lab: &Lab, priority: &str| {
        let out = lab.t.vipgate_output(
            "d2",
            &[
                "vrrp",
                "set-priority",
                "vip-web",
                priority,
                "--control",
                &lab.sock("d2"),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let refused = lab.t.vipgate_output(
        "d2",
        &[
            "vrrp",
            "set-priority",
            "vip-web",
            "255",
            "--control",
            &lab.sock("d2"),
        ],
    );
    assert!(!refused.status.success(), "{refused:?}");

    let mut probe = lab.start_probe(4.0);
    lab.wait_first_answer(&probe, "d1");
    let reply = set(&lab, "200");
    assert!(reply.contains("not persisted"), "{reply}");
    lab.wait_state("d2", "MASTER", Duration::from_secs(2));
    lab.wait_state("d1", "BACKUP", Duration::from_secs(1));
    let s2 = lab.status("d2").unwrap_or_default();
    assert_eq!(
        (
            s2.num(&["priority"]),
            s2.num(&["configured_priority"]),
            s2.num(&["runtime_priority"])
        ),
        (200, 100, 200)
    );
    let text = String::from_utf8_lossy(
        &lab.t
            .vipgate_output("d2", &["show", "vrrp", "--control", &lab.sock("d2")])
            .stdout,
    )
    .into_owned();
    assert!(
        text.contains("priority 200 (file: 100, set at runtime)"),
        "{text}"
    );
    assert!(lab.holds_vip("d2") && !lab.holds_vip("d1"));
    let r = lab.probe_result(&mut probe);
    assert!(r.who.ends_with("d2"), "{}", r.line);

    // The file's priority again: d1 (150) preempts.
    set(&lab, "100");
    lab.wait_state("d1", "MASTER", Duration::from_secs(2));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(1));
    assert_eq!(lab.status("d2").unwrap_or_default().num(&["priority"]), 100);
}

/// Every probe was answered (but the last one or two, still in flight when the probe
/// stopped). Loss, not the longest gap, is the measure here: on a loaded 2-core machine the
/// probe itself can be descheduled for a few hundred ms while every answer still arrives.
fn assert_no_loss(r: &ProbeResult) {
    let field = |k: &str| -> u64 {
        r.line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (sent, received) = (field("sent="), field("received="));
    assert!(
        sent > 100 && received + 2 >= sent,
        "the VIP stopped answering: {} (gap {} ms)",
        r.line,
        r.gap_ms
    );
}

/// A reload on the master applies a new priority live: lowered but still above the peer,
/// the VIP never stops answering and no transition happens; lowered below the peer, the
/// peer preempts (RFC 5798); raised again, the master takes it back.
#[test]
fn reload_changes_priority_live_and_moves_the_vip_only_when_it_should() {
    let lab = Lab::new(e2e!());
    let mut d1 = lab.vipgate("d1", 150, "100ms", true);
    let _d2 = lab.vipgate("d2", 100, "100ms", true);
    lab.wait_state("d1", "MASTER", Duration::from_secs(5));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(5));
    let transitions = |h: &str| lab.status(h).map_or(0, |s| s.transitions().len());
    let before = transitions("d1");
    let reload = |prio: u8, interval: &str| {
        lab.config("d1", prio, interval, true);
        let out = lab
            .t
            .vipgate_output("d1", &["reload", "--control", &lab.sock("d1")]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("vrrp vip-web: applied live"), "{text}");
    };

    // 150 -> 120 and a new advert interval: still above d2, mastership stays.
    let mut probe = lab.start_probe(3.0);
    lab.wait_first_answer(&probe, "d1");
    reload(120, "200ms");
    wait_until(Duration::from_secs(2), "priority 120 advertised", || {
        lab.status("d2")
            .is_some_and(|s| s.num(&["master_priority"]) == 120)
    });
    let r = lab.probe_result(&mut probe);
    assert_eq!(r.who, "d1", "{}", r.line);
    assert_no_loss(&r);
    let s1 = lab.status("d1").unwrap_or_default();
    assert_eq!(s1.get("state").as_deref(), Some("MASTER"));
    assert_eq!(
        (s1.num(&["priority"]), s1.num(&["advert_interval_ms"])),
        (120, 200)
    );
    assert_eq!(transitions("d1"), before, "no transition on a live reload");
    assert!(d1.is_running());

    // 120 -> 90: below d2, which preempts.
    reload(90, "200ms");
    lab.wait_state("d2", "MASTER", Duration::from_secs(3));
    lab.wait_state("d1", "BACKUP", Duration::from_secs(1));
    assert!(lab.holds_vip("d2") && !lab.holds_vip("d1"));

    // 90 -> 150: d1 preempts back.
    reload(150, "100ms");
    lab.wait_state("d1", "MASTER", Duration::from_secs(3));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(1));
    assert!(lab.holds_vip("d1") && !lab.holds_vip("d2"));

    // A second VIP added, then removed again, live: the first never stops answering.
    let second = "198.51.100.20";
    let holds_second = || {
        lab.t
            .ip("d1", "-4 -o addr show dev eth0")
            .contains(&format!("{second}/"))
    };
    let with_vips = |addresses: &str| {
        let text = std::fs::read_to_string(lab.config("d1", 150, "100ms", true))
            .unwrap_or_default()
            .replace(&format!("addresses = [\"{VIP}/24\"]"), addresses);
        lab.t.write("d1.toml", &text);
        let out = lab
            .t
            .vipgate_output("d1", &["reload", "--control", &lab.sock("d1")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("vrrp vip-web: applied live"), "{text}");
    };
    let mut probe = lab.start_probe(3.0);
    lab.wait_first_answer(&probe, "d1");
    with_vips(&format!("addresses = [\"{VIP}/24\", \"{second}/24\"]"));
    wait_until(Duration::from_secs(2), "the second VIP added", holds_second);
    lab.t.sh("cl", &format!("ping -c1 -W1 {second} >/dev/null"));
    with_vips(&format!("addresses = [\"{VIP}/24\"]"));
    wait_until(Duration::from_secs(2), "the second VIP withdrawn", || {
        !holds_second()
    });
    let r = lab.probe_result(&mut probe);
    assert_eq!(r.who, "d1", "{}", r.line);
    assert_no_loss(&r);
    assert_eq!(
        transitions("d1"),
        before + 2,
        "only the two handovers above"
    );
    assert!(d1.is_running());
}

/// An on-link attacker's spoofed adverts, sent from the client namespace with a raw socket
/// (its own IPv4 header: protocol 112, TTL 255, any source), unicast to one director. With a
/// counting duration, it also counts, on its AF_PACKET socket, the adverts from 198.51.100.11
/// and the ARP frames for the VIP that arrive while it floods and for a while after.
const SPOOF: &str = r#"
import socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
src, dst = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2])
prio, count, seconds, watch = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
vip, d1 = socket.inet_aton("198.51.100.10"), socket.inet_aton("198.51.100.11")
body = bytes([0x31, 51, prio, 1]) + struct.pack("!HH", 100, 0) + vip
c = csum(src + dst + bytes([0, 112]) + struct.pack("!H", len(body)) + body)
body = body[:6] + struct.pack("!H", c) + body[8:]
pkt = bytes([0x45, 0]) + struct.pack("!H", 20 + len(body)) + bytes([0, 0, 0, 0, 255, 112, 0, 0]) + src + dst + body
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
rx.setblocking(False)
adverts = arps = sent = 0
start = time.monotonic()
def drain():
    global adverts, arps
    while True:
        try: f, a = rx.recvfrom(2048)
        except BlockingIOError: return
        if a[2] == 4 or len(f) < 42: continue
        if f[12:14] == b"\x08\x00" and f[23] == 112 and f[26:30] == d1: adverts += 1
        if f[12:14] == b"\x08\x06" and f[28:32] == vip: arps += 1
while sent < count:
    if time.monotonic() - start >= seconds * sent / count:
        tx.sendto(pkt, (sys.argv[2], 0)); sent += 1
    else:
        drain(); time.sleep(0.0005)
while time.monotonic() - start < watch:
    drain(); time.sleep(0.005)
drain()
print("sent=%d adverts=%d arps=%d" % (sent, adverts, arps), flush=True)
"#;

impl Lab {
    /// Runs [`SPOOF`] in the client namespace and returns what it counted: (adverts, ARPs).
    fn spoof(
        &self,
        src: &str,
        dst: &str,
        prio: u8,
        count: u32,
        seconds: f64,
        watch: f64,
    ) -> (u64, u64) {
        let script = self.t.write("spoof.py", SPOOF);
        let out = self.t.sh(
            "cl",
            &format!(
                "python3 {} {src} {dst} {prio} {count} {seconds} {watch}",
                script.display()
            ),
        );
        let field = |k: &str| {
            out.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX)
        };
        assert_eq!(field("sent="), u64::from(count), "{out}");
        (field("adverts="), field("arps="))
    }
}

/// A flood of 2,000 spoofed lower-priority adverts in 2 s: without a limit each one made the
/// master send an advert and a burst of 5 ARPs per VIP (2,000 adverts, 10,000 frames). With
/// `reassert_interval` (1 s) the master answers at most once a second, stays master, and
/// the suppressed ones are counted.
#[test]
fn spoofed_lower_priority_flood_is_answered_at_most_once_per_second() {
    let lab = Lab::new(e2e!());
    let cfg = lab.config_with("d1", 150, "1s", true, "garp_repeat_delay = \"0s\"");
    let _d1 = lab.t.vipgate(
        "d1",
        "vipgate-d1",
        &["run", "-c", cfg.to_str().unwrap_or_default()],
    );
    lab.wait_state("d1", "MASTER", Duration::from_secs(8));
    let (adverts, arps) = lab.spoof("198.51.100.77", "198.51.100.11", 100, 2000, 2.0, 3.0);
    // The counter sees the master: the first re-assertion (an advert and 5 ARPs) at least.
    assert!(
        adverts >= 1 && arps >= 5,
        "{adverts} adverts, {arps} ARPs seen"
    );
    // 3 s watched: at most 4 periodic adverts, and 3 re-assertions (advert + 5 ARPs).
    assert!(adverts <= 4 + 3, "{adverts} adverts from the master");
    assert!(arps <= 5 * 3, "{arps} ARP frames from the master");
    let s = lab.status("d1").unwrap_or_default();
    assert!(s.num(&["counters", "reassert_tx"]) <= 3, "{s:?}");
    assert!(s.num(&["counters", "reassert_suppressed"]) >= 1990, "{s:?}");
    assert!(
        s.num(&["counters", "drops", "lower_priority"]) >= 2000,
        "{s:?}"
    );
    assert_eq!(lab.state("d1"), "MASTER");
    assert!(lab.holds_vip("d1"));
}

/// A spoofed priority-0 advert from an address that is not the master: the backup used to
/// take over after its skew time (0.6 s). Now it ignores and counts it, and the VIP keeps
/// answering from d1 alone.
#[test]
fn spoofed_priority_zero_from_a_non_master_does_not_move_the_vip() {
    let lab = Lab::new(e2e!());
    let _d1 = lab.vipgate("d1", 150, "1s", true);
    let _d2 = lab.vipgate("d2", 100, "1s", true);
    lab.wait_state("d1", "MASTER", Duration::from_secs(8));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(3));
    let mut probe = lab.start_probe(3.5);
    lab.wait_first_answer(&probe, "d1");
    lab.spoof("198.51.100.77", "198.51.100.12", 0, 20, 2.0, 2.0);
    let r = lab.probe_result(&mut probe);
    assert_eq!(r.who, "d1", "{}", r.line);
    let s = lab.status("d2").unwrap_or_default();
    assert_eq!(s.get("state").as_deref(), Some("BACKUP"), "{s:?}");
    assert!(
        s.num(&["counters", "drops", "priority_zero_not_master"]) >= 20,
        "{s:?}"
    );
    assert_eq!(s.get("master").as_deref(), Some("198.51.100.11"), "{s:?}");
}

/// With `peers`, a multicast instance drops adverts from anyone else: a spoofed priority-254
/// advert (which would demote the master) is counted as an unknown peer and ignored.
#[test]
fn peers_drop_adverts_from_unlisted_sources() {
    let lab = Lab::new(e2e!());
    let mut procs = Vec::new();
    for (h, prio, peer) in [("d1", 150, "12"), ("d2", 100, "11")] {
        let extra = format!("peers = [\"198.51.100.{peer}\"]");
        let cfg = lab.config_with(h, prio, "1s", true, &extra);
        let cfg = cfg.to_str().unwrap_or_default().to_owned();
        procs.push(
            lab.t
                .vipgate(h, &format!("vipgate-{h}"), &["run", "-c", &cfg]),
        );
    }
    lab.wait_state("d1", "MASTER", Duration::from_secs(8));
    lab.wait_state("d2", "BACKUP", Duration::from_secs(3));
    lab.spoof("198.51.100.77", "198.51.100.11", 254, 20, 1.0, 1.0);
    wait_until(Duration::from_secs(2), "unknown peers counted", || {
        lab.status("d1")
            .is_some_and(|s| s.num(&["counters", "unknown_peer"]) == 20)
    });
    assert_eq!(lab.state("d1"), "MASTER");
    assert_eq!(lab.state("d2"), "BACKUP");
    assert!(lab.holds_vip("d1") && !lab.holds_vip("d2"));
    // The listed peer is still heard: d2 follows d1.
    let s = lab.status("d2").unwrap_or_default();
    assert_eq!(s.get("master").as_deref(), Some("198.51.100.11"), "{s:?}");
}
