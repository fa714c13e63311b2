//! `vipgate run` as an operator meets it: a failed start leaves nothing behind, a bad reload
//! keeps the running config, and /metrics agrees with `show --json`.

use serde_json::Value;
use std::time::Duration;
use vipgate_tests::{Proc, Show, Topology, e2e, wait_for, wait_until};

/// A gateway host `gw` (eth0 outside 198.51.100.1/24 towards `out`, eth1 inside 192.168.101.1/24).
fn gateway(mut t: Topology) -> Topology {
    t.hosts(&["gw", "out", "in"]);
    t.veth("gw", "eth0", "out", "eth0")
        .veth("gw", "eth1", "in", "eth0");
    t.addr("gw", "eth0", "198.51.100.1/24")
        .addr("out", "eth0", "198.51.100.200/24");
    t.addr("gw", "eth1", "192.168.101.1/24")
        .addr("in", "eth0", "192.168.101.101/24");
    t.ip("in", "route add default via 192.168.101.1");
    t.forwarding("gw");
    t
}

fn nat_config(t: &Topology, inside: &str, extra: &str) -> String {
    format!(
        "[daemon]\ncontrol = \"{}/ctl.sock\"\nmetrics = \"127.0.0.1:9477\"\n\n[nat]\ninside = [\"{inside}\"]\noutside = \"eth0\"\naddress = \"198.51.100.1\"\n\n\
         [[nat.static]]\nproto = \"tcp\"\noutside_port = 8001\ninside = \"192.168.101.101:80\"\n{extra}",
        t.dir().display()
    )
}

/// What the kernel state of `gw` looks like: links, rules, routes of every table, neighbours.
/// IPv6 link-local routes are left out: the kernel adds them when duplicate address detection
/// ends, which on a loaded machine can fall between two snapshots; vipgate never touches them.
fn kernel_state(t: &Topology) -> String {
    [
        "link show",
        "rule show",
        "route show table all",
        "neigh show proxy",
    ]
    .iter()
    .map(|c| t.ip("gw", c))
    .collect::<Vec<_>>()
    .join("\n")
    .lines()
    .filter(|l| !l.contains("fe80:"))
    .collect::<Vec<_>>()
    .join("\n")
}

/// Runs `vipgate run -c cfg` on `gw`, which must fail with exit code 1 and leave the kernel
/// state as `before` and no control socket; returns its stderr.
fn failed_start(t: &Topology, cfg: &std::path::Path, before: &str) -> String {
    let out = t.vipgate_output("gw", &["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(kernel_state(t), before, "a failed start left state behind");
    assert!(!t.dir().join("ctl.sock").exists());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn failed_start_leaves_the_host_as_before() {
    let t = gateway(e2e!());
    let before = kernel_state(&t);
    // The second tunnel names an interface that does not exist: GRE comes up first, then NAT
    // fails, and everything must be undone.
    let cfg = t.write(
        "site.toml",
        &format!(
            "{}\n[[gre]]\nname = \"gre-x\"\nlocal = \"198.51.100.1\"\nremote = \"198.51.100.2\"\naddress = \"172.16.0.1/30\"\nroutes = [\"192.168.102.0/24\"]\n",
            nat_config(&t, "eth9", "")
        ),
    );
    let err = failed_start(&t, &cfg, &before);
    assert!(err.contains("starting nat failed"), "{err}");
    assert!(
        err.contains("eth9"),
        "the message names the missing interface: {err}"
    );
}

#[test]
fn taken_port_fails_the_start_and_undoes_the_gateway() {
    let t = gateway(e2e!());
    // Something already listens on the metrics port: the gateway starts (TUN, rules, routes),
    // then the metrics endpoint cannot bind, and all of it must be undone.
    let _squatter = t.spawn("gw", "squatter", &["python3", "-c", "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 9477)); s.listen(); time.sleep(60)"]);
    t.wait_tcp("gw", "127.0.0.1", 9477, Duration::from_secs(30));
    let before = kernel_state(&t);
    let cfg = t.write("site.toml", &nat_config(&t, "eth1", ""));
    let err = failed_start(&t, &cfg, &before);
    assert!(
        err.contains("127.0.0.1:9477"),
        "the message names the port: {err}"
    );
}

#[test]
fn bad_reload_keeps_running_config_and_metrics_match_show() {
    let t = gateway(e2e!());
    let _web = t.http_server("in", "192.168.101.101", 80, "web");
    let _alt = t.http_server("in", "192.168.101.101", 8080, "alt");
    let cfg = t.write("site.toml", &nat_config(&t, "eth1", ""));
    let mut daemon = t.vipgate("gw", "vipgate", &["run", "-c", cfg.to_str().unwrap()]);
    let ctl = t.dir().join("ctl.sock");
    let ctl = ctl.to_str().unwrap();
    wait_ready(&t);

    // A reload with a mistake is refused with FILE:LINE:COL and the forward keeps working.
    std::fs::write(&cfg, nat_config(&t, "eth1", "[[nat.static]]\nproto = \"tcp\"\noutside_port = 8001\ninside = \"192.168.101.101:22\"\n")).unwrap();
    let out = t.vipgate_output("gw", &["reload", "--control", ctl]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("site.toml:") && err.contains("duplicate static port"),
        "{err}"
    );
    assert_eq!(
        t.curl("out", "http://198.51.100.1:8001/").unwrap().trim(),
        "web"
    );
    assert!(daemon.is_running());

    // A good reload that adds a forward applies live; the old one still answers.
    std::fs::write(&cfg, nat_config(&t, "eth1", "[[nat.static]]\nproto = \"tcp\"\noutside_port = 8002\ninside = \"192.168.101.101:8080\"\n")).unwrap();
    let out = t.vipgate_output("gw", &["reload", "--control", ctl]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nat"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_until(Duration::from_secs(10), "the new forward", || {
        t.curl("out", "http://198.51.100.1:8002/")
            .is_ok_and(|b| b.trim() == "alt")
    });
    assert_eq!(
        t.curl("out", "http://198.51.100.1:8001/").unwrap().trim(),
        "web"
    );

    // Prometheus text on [daemon] metrics agrees with `show nat --json`.
    // Show first, then scrape until the scrape is at least as new: metrics are rendered at
    // most once a second, so a scrape may predate the flows the curls above just opened.
    // The show is taken once the core has heard of every packet of those curls: on the kernel
    // path the program executes a published forward's handshake and carries the client's
    // ACK, and the core, which adopted the flow half-open from the SYN, learns of the ACK at
    // the next sync round. A show from before that round counts half-open flows that every
    // later render (and show) counts established: a gauge that shrinks, which no scrape
    // could ever match. Settled, the table holds still for the rest of the test.
    let show = wait_for(
        Duration::from_secs(10),
        "the core to hear of every handshake the curls made",
        || {
            let show = t.show("gw", ctl, Show::Nat);
            (show[0]["half_open"] == 0).then_some(show)
        },
    );
    if show[0]["datapath"] == "kernel" {
        // This test covers the flows the kernel opens, not only those the core opened.
        assert!(
            show[0]["counters"]["flows_opened_by_data_path"].as_u64() > Some(0),
            "{}",
            show[0]
        );
        // Closing in the core (their FINs reported), the curls' flows leave the kernel path
        // within a round or two, not when the core expires them.
        wait_until(
            Duration::from_secs(5),
            "the closed kernel-opened flows to be let go",
            || t.show("gw", ctl, Show::Nat)[0]["fast_path"]["opened_pending"] == 0,
        );
    }
    let metrics = wait_for(Duration::from_secs(10), "metrics as new as show", || {
        let metrics = t
            .try_sh("gw", "curl -sS --max-time 2 http://127.0.0.1:9477/metrics")
            .ok()?;
        metrics_not_behind(&show[0], &metrics).then_some(metrics)
    });
    promtool_accepts(&metrics);
    let mut samples = 0;
    for line in metrics.lines() {
        if line.starts_with("# HELP ") {
            assert!(line.starts_with("# HELP vipgate_nat_"), "{line}");
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# TYPE vipgate_nat_"), "{line}");
            assert!(
                line.ends_with(" counter") || line.ends_with(" gauge"),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample is `series value`");
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
        samples += 1;
    }
    assert!(samples > 5, "{metrics}");
    // Drops are one counter labelled by reason.
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("vipgate_nat_drops_total{gateway=\"nat\",reason=\"table_full\"} ")),
        "{metrics}"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

/// Every top-level number of a `show nat` status is a gauge and every count under its
/// `counters` a `_total` counter in the metrics text, with at least the same value (counters
/// only grow; the gauges here do not shrink within a test); a number without its metric fails
/// the test at once.
fn metrics_not_behind(status: &Value, metrics: &str) -> bool {
    let gauges = status
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (format!("vipgate_nat_{k}{{"), v));
    let counters = status["counters"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (format!("vipgate_nat_{k}_total{{"), v));
    gauges.chain(counters).all(|(prefix, v)| {
        let Some(n) = v.as_f64() else { return true };
        let series = metrics
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{metrics}"));
        let m: f64 = series.rsplit_once(' ').unwrap().1.parse().unwrap();
        m >= n
    })
}

/// `promtool check metrics` (Debian package `prometheus`, which `netns-scripts/test.sh`
/// installs) lints `page`: HELP and TYPE lines, `_total` on counters only, base units.
pub(super) fn promtool_accepts(page: &str) {
    use std::io::Write as _;
    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) runs");
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write the page to promtool");
    let out = lint.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{page}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn vrrp_instance(name: &str, vrid: u8, vip: &str) -> String {
    format!(
        "\n[[vrrp]]\nname = \"{name}\"\ninterface = \"eth0\"\nvrid = {vrid}\npriority = 150\nadvert_interval = \"100ms\"\naddresses = [\"{vip}/24\"]\n"
    )
}

/// `vipgate run` on the gateway with `nat_config` (outside :8001 forwarded to the web server
/// inside), returned once the forward answers.
struct ForwardingDaemon {
    t: Topology,
    _web: Proc,
    cfg: std::path::PathBuf,
    daemon: Proc,
}

fn forwarding_daemon(t: Topology) -> ForwardingDaemon {
    let t = gateway(t);
    let _web = t.http_server("in", "192.168.101.101", 80, "web");
    let cfg = t.write("site.toml", &nat_config(&t, "eth1", ""));
    let daemon = t.vipgate("gw", "vipgate", &["run", "-c", cfg.to_str().unwrap()]);
    wait_ready(&t);
    ForwardingDaemon {
        t,
        _web,
        cfg,
        daemon,
    }
}

/// Waits until the daemon is up: the forward answers and the control socket takes requests.
/// The forward alone is not enough: the gateway forwards (slow path) while its kernel fast
/// path is still loading, before the daemon has bound its control socket.
fn wait_ready(t: &Topology) {
    wait_until(
        Duration::from_secs(20),
        "the port forward to answer",
        || forward_answers(t),
    );
    let ctl = t.dir().join("ctl.sock");
    wait_until(
        Duration::from_secs(20),
        "the control socket to answer",
        || t.try_show("gw", &ctl, Show::Status).is_some(),
    );
}

fn forward_answers(t: &Topology) -> bool {
    t.curl("out", "http://198.51.100.1:8001/")
        .is_ok_and(|b| b.trim() == "web")
}

/// Security review §9: a reload whose unit fails to start leaves it stopped and shown dead,
/// and reloading the original file starts it again (the reload compares with what runs, not
/// with the last file).
#[test]
fn reload_after_a_failed_start_brings_the_unit_back() {
    let ForwardingDaemon {
        t,
        _web,
        cfg,
        mut daemon,
    } = forwarding_daemon(e2e!());
    let good = std::fs::read_to_string(&cfg).unwrap();
    let ctl = t.dir().join("ctl.sock");
    let ctl = ctl.to_str().unwrap();
    let forward_answers = || forward_answers(&t);

    // A new inside interface needs a new gateway, and eth9 does not exist: nat is stopped
    // for the restart and cannot start again.
    std::fs::write(&cfg, nat_config(&t, "eth9", "")).unwrap();
    let out = t.vipgate_output("gw", &["reload", "--control", ctl]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("partly failed") && err.contains("nat: failed to start"),
        "{err}"
    );
    assert!(err.contains("eth9"), "{err}");
    assert!(daemon.is_running());
    let status = t.show("gw", ctl, Show::Status);
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["status"]["state"] == "dead"
                && p["status"]["last_death"]
                    .as_str()
                    .is_some_and(|cause| cause.contains("eth9"))),
        "{status}"
    );

    // The original file again: the stopped gateway starts, the forward answers.
    std::fs::write(&cfg, &good).unwrap();
    let out = t.vipgate_output("gw", &["reload", "--control", ctl]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("nat: started"), "{report}");
    wait_until(
        Duration::from_secs(20),
        "the port forward to answer again",
        forward_answers,
    );
    let status = t.show("gw", ctl, Show::Status);
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"]["state"] != "dead"),
        "{status}"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

/// Issue #14: deleting the gateway's TUN from outside (`ip link del nat0`) detaches the packet
/// loop's queues, whose next read fails (EBADFD), so the loop task ends; the supervisor shows
/// the death with its cause, starts the gateway again on a new TUN and the forward answers.
#[test]
fn supervisor_restarts_nat_after_its_tun_is_deleted() {
    let ForwardingDaemon {
        t,
        _web,
        mut daemon,
        ..
    } = forwarding_daemon(e2e!());
    let ctl = t.dir().join("ctl.sock");
    let ctl = ctl.to_str().unwrap();
    let forward_answers = || forward_answers(&t);

    t.ip("gw", "link del nat0");
    // The unit comes back as a running part that carries its death: `restarts` and the cause.
    let nat = wait_for(Duration::from_secs(20), "nat restarted", || {
        let parts = t.try_show("gw", ctl, Show::Status)?;
        parts
            .as_array()?
            .iter()
            .find(|p| {
                p["kind"] == "nat"
                    && p["status"]["state"] != "dead"
                    && p["status"]["restarts"].as_u64() >= Some(1)
            })
            .map(|p| p["status"].clone())
    });
    let cause = nat["last_death"].as_str().unwrap_or_default();
    assert!(
        cause.contains("nat packet loop failed") && cause.contains("TUN I/O"),
        "{nat}"
    );
    wait_until(
        Duration::from_secs(20),
        "the port forward to answer after the restart",
        forward_answers,
    );
    assert!(t.ip("gw", "link show").contains("nat0"), "no new TUN");
    let log = daemon.log();
    assert!(
        log.contains("a task died") && log.contains("restarted"),
        "{log}"
    );

    // The metrics and `show nat` carry the same count.
    let metrics = wait_for(
        Duration::from_secs(10),
        "the restart in the metrics",
        || {
            t.try_sh("gw", "curl -sS --max-time 2 http://127.0.0.1:9477/metrics")
                .ok()
                .filter(|m| {
                    m.lines()
                        .any(|l| l.starts_with("vipgate_nat_restarts_total{"))
                })
        },
    );
    let series = metrics
        .lines()
        .find(|l| l.starts_with("vipgate_nat_restarts_total{"))
        .unwrap();
    let show = t.show("gw", ctl, Show::Nat);
    assert_eq!(
        series.rsplit_once(' ').unwrap().1.parse::<f64>().ok(),
        show[0]["restarts"].as_f64(),
        "{series} vs {show}"
    );
    assert!(daemon.is_running());
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

/// The VRRP instances in `show vrrp --json`; none while the daemon does not answer.
fn vrrp_show(t: &Topology, ctl: &str) -> Vec<Value> {
    t.try_show("gw", ctl, Show::Vrrp)
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn reload_touches_only_the_units_that_changed() {
    let t = gateway(e2e!());
    let ctl = t.dir().join("ctl.sock");
    let ctl = ctl.to_str().unwrap();
    let head = format!("[daemon]\ncontrol = \"{ctl}\"\n");
    let cfg = t.write(
        "site.toml",
        &format!(
            "{head}{}{}",
            vrrp_instance("keep", 51, "198.51.100.51"),
            vrrp_instance("drop", 52, "198.51.100.52")
        ),
    );
    let mut daemon = t.vipgate("gw", "vipgate", &["run", "-c", cfg.to_str().unwrap()]);
    let masters = |want: &[&str]| {
        let show = vrrp_show(&t, ctl);
        let mut names: Vec<&str> = show
            .iter()
            .filter(|i| i["state"] == "MASTER")
            .filter_map(|i| i["name"].as_str())
            .collect();
        names.sort_unstable();
        names == want
    };
    wait_until(Duration::from_secs(20), "both instances master", || {
        masters(&["drop", "keep"])
    });
    let keep_before = vrrp_show(&t, ctl)
        .into_iter()
        .find(|i| i["name"] == "keep")
        .unwrap();

    // Remove one instance and add another: the untouched instance keeps running as it was.
    std::fs::write(
        &cfg,
        format!(
            "{head}{}{}",
            vrrp_instance("keep", 51, "198.51.100.51"),
            vrrp_instance("new", 53, "198.51.100.53")
        ),
    )
    .unwrap();
    let out = t.vipgate_output("gw", &["reload", "--control", ctl]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("vrrp drop: stopped"), "{report}");
    assert!(report.contains("vrrp new: started"), "{report}");
    assert!(
        !report.contains("keep"),
        "the unchanged instance was touched: {report}"
    );
    wait_until(Duration::from_secs(20), "the new instance master", || {
        masters(&["keep", "new"])
    });
    let addrs = t.ip("gw", "-4 addr show dev eth0");
    assert!(
        !addrs.contains("198.51.100.52/"),
        "the removed VIP stayed: {addrs}"
    );
    assert!(
        addrs.contains("198.51.100.51/") && addrs.contains("198.51.100.53/"),
        "{addrs}"
    );
    let keep_after = vrrp_show(&t, ctl)
        .into_iter()
        .find(|i| i["name"] == "keep")
        .unwrap();
    assert_eq!(
        keep_after["transitions"], keep_before["transitions"],
        "the unchanged instance went through new transitions"
    );
    assert!(
        keep_after["counters"]["adverts_tx"].as_u64()
            > keep_before["counters"]["adverts_tx"].as_u64(),
        "the unchanged instance kept advertising"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn gateway_restart_on_reload_brings_services_and_vrrp_back() {
    let t = gateway(e2e!());
    let _web = t.http_server("in", "192.168.101.101", 80, "web");
    let _pool = t.http_server("in", "192.168.101.101", 8080, "pool");
    let ctl = t.dir().join("ctl.sock");
    let ctl = ctl.to_str().unwrap();
    let site = |table: u32| {
        nat_config(
            &t,
            "eth1",
            &format!(
                "\n[[service]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\n\
                 health = {{ kind = \"tcp\", interval = \"200ms\", timeout = \"200ms\", rise = 1, fall = 2 }}\n\
                 backends = [{{ address = \"192.168.101.101:8080\" }}]\n\
                 {}track_services = [\"web\"]\n",
                vrrp_instance("vip-web", 51, "198.51.100.10")
            ),
        )
        .replace("[nat]\n", &format!("[nat]\ntable = {table}\n"))
    };
    let cfg = t.write("site.toml", &site(4787));
    let mut daemon = t.vipgate("gw", "vipgate", &["run", "-c", cfg.to_str().unwrap()]);
    let both_answer = || {
        t.curl("out", "http://198.51.100.10/")
            .is_ok_and(|b| b.trim() == "pool")
            && t.curl("out", "http://198.51.100.1:8001/")
                .is_ok_and(|b| b.trim() == "web")
    };
    wait_until(
        Duration::from_secs(30),
        "the service VIP and the port forward",
        both_answer,
    );

    // Moving the steering rules to another table needs a new gateway: the services and the
    // VRRP instance built on it must come back on the new one.
    std::fs::write(&cfg, site(4788)).unwrap();
    let out = t.vipgate_output("gw", &["reload", "--control", ctl]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("nat: restarted"), "{report}");
    assert!(
        report.contains("lb: restarted (it is built on nat)"),
        "{report}"
    );
    assert!(
        report.contains("vrrp: restarted (it is built on lb)"),
        "{report}"
    );
    wait_until(
        Duration::from_secs(30),
        "both again after the restart",
        both_answer,
    );
    let rules = t.ip("gw", "rule show");
    assert!(
        rules.contains("lookup 4788") && !rules.contains("lookup 4787"),
        "{rules}"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

/// Each task of `pid`: (tid, the status lines named in `keys`).
fn task_status(pid: u32, keys: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap();
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        out.push((
            task.file_name().to_string_lossy().into_owned(),
            status
                .lines()
                .filter(|l| keys.iter().any(|k| l.starts_with(&format!("{k}:"))))
                .map(str::to_string)
                .collect(),
        ));
    }
    out
}

/// CAP_NET_ADMIN | CAP_NET_RAW | CAP_NET_BIND_SERVICE as /proc prints it.
const KEPT_MASK: &str = "0000000000003400";
/// The same plus CAP_BPF, kept when `[nat]` runs its kernel fast path (the default).
const KEPT_MASK_KERNEL_NAT: &str = "0000008000003400";

/// `vipgate run` with NAT, VRRP (its reader threads and a notify script) and sshd: every
/// task holds exactly the kept capabilities with no_new_privs, as root and as `nobody`, and
/// the notify script holds no more.
fn every_task_reduced(t: Topology, user: Option<(&str, u32)>) {
    let t = gateway(t);
    let state = t.dir().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut perms = std::fs::metadata(t.dir()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(t.dir(), perms).unwrap();
    if let Some((_, uid)) = user {
        std::os::unix::fs::chown(&state, Some(uid), None).unwrap();
    }
    let ctl = state.join("ctl.sock");
    let notified = state.join("notify.status");
    let script = t.write(
        "notify.sh",
        &format!(
            "#!/bin/sh\ncat /proc/self/status > {}\n",
            notified.display()
        ),
    );
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    std::fs::write(t.dir().join("ak"), "").unwrap();
    let user_line = user.map_or(String::new(), |(name, _)| format!("user = \"{name}\"\n"));
    // NAT opens /dev/net/tun, which some hosts (this CI's) keep 0600 root; as another user
    // the gateway then cannot start, so the user case runs VRRP and sshd only.
    let nat = if user.is_none() {
        "[nat]\ninside = [\"eth1\"]\noutside = \"eth0\"\naddress = \"198.51.100.1\"\n"
    } else {
        ""
    };
    let cfg = t.write(
        "site.toml",
        &format!(
            "[daemon]\ncontrol = \"{}\"\n{user_line}\n{nat}\
             {}notify = \"{}\"\n\n[sshd]\nlisten = \"192.168.101.1:222\"\nhost_key = \"{}/hk\"\nauthorized_keys = \"{}/ak\"\n",
            ctl.display(),
            vrrp_instance("caps", 61, "198.51.100.61"),
            script.display(),
            state.display(),
            t.dir().display(),
        ),
    );
    let mut daemon = t.vipgate("gw", "vipgate", &["run", "-c", cfg.to_str().unwrap()]);
    let ctl_s = ctl.to_str().unwrap();
    wait_until(Duration::from_secs(20), "the instance is master", || {
        vrrp_show(&t, ctl_s).iter().any(|i| i["state"] == "MASTER")
    });
    // What follows holds for a daemon re-exec'd by `vipgate restart` too, which starts with
    // only the kept set (and, with `user`, as that user already).
    let pid = daemon.pid();
    let restart = t.vipgate_output("gw", &["restart", "-c", cfg.to_str().unwrap()]);
    assert!(
        restart.status.success(),
        "{}{}",
        String::from_utf8_lossy(&restart.stderr),
        daemon.log()
    );
    assert!(daemon.is_running(), "{}", daemon.log());
    assert_eq!(daemon.pid(), pid);
    wait_until(
        Duration::from_secs(20),
        "the second run to reduce itself",
        || {
            daemon
                .log()
                .matches("every thread keeps only these capabilities")
                .count()
                == 2
        },
    );
    wait_until(
        Duration::from_secs(20),
        "the instance is master again",
        || vrrp_show(&t, ctl_s).iter().any(|i| i["state"] == "MASTER"),
    );
    let tasks = task_status(
        daemon.pid(),
        &[
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Uid",
        ],
    );
    assert!(tasks.len() > 3, "expected worker threads: {tasks:?}");
    let uid = user.map_or(0, |(_, uid)| uid);
    let kept = if nat.is_empty() {
        KEPT_MASK
    } else {
        KEPT_MASK_KERNEL_NAT
    };
    for (tid, lines) in &tasks {
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert!(
                lines.contains(&format!("{set}:\t{kept}")),
                "task {tid}: {set} is not the kept set: {lines:?}"
            );
        }
        assert!(
            lines.contains(&"NoNewPrivs:\t1".to_string()),
            "task {tid}: {lines:?}"
        );
        assert!(
            lines.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")),
            "task {tid}: {lines:?}"
        );
    }
    let status = wait_for(Duration::from_secs(10), "the notify script ran", || {
        std::fs::read_to_string(&notified)
            .ok()
            .filter(|s| s.contains("NoNewPrivs"))
    });
    for set in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{set}:")))
            .unwrap();
        let mask = u64::from_str_radix(line.rsplit('\t').next().unwrap(), 16).unwrap();
        assert_eq!(
            mask & !0x0080_0000_3400,
            0,
            "notify script holds more than the kept set: {line}"
        );
    }
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn every_task_holds_only_the_kept_capabilities() {
    every_task_reduced(e2e!(), None);
}

#[test]
fn every_task_runs_as_the_configured_user() {
    let id = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .unwrap();
    let uid: u32 = String::from_utf8_lossy(&id.stdout).trim().parse().unwrap();
    every_task_reduced(e2e!(), Some(("nobody", uid)));
}
