//! Operating virtual services as `ipvsadm` users do (issue #19): `show lb --connections`
//! (`ipvsadm -Lnc`) and `lb drain --wait` (the rolling-update step), against real servers in
//! the topology of `lb.rs` (python3 http.server real servers, a client namespace), on the
//! default kernel path.

use std::time::{Duration, Instant};

use vipgate_tests::{Proc, wait_until};

use super::lb::{CLIENTS, Lab, VIP, count, service};

impl Lab {
    /// `vipgate show lb --connections ARGS...`: exit success, stdout, stderr.
    fn connections(&self, args: &[&str]) -> (bool, String, String) {
        let mut all = vec!["show", "lb", "--connections", "--control", &self.control];
        all.extend_from_slice(args);
        let out = self.t.vipgate_output("dir", &all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `show lb --connections --json ARGS...`: the flows listed and how many matched.
    fn connections_json(&self, args: &[&str]) -> (Vec<serde_json::Value>, u64) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (ok, out, err) = self.connections(&all);
        assert!(ok, "show lb --connections failed: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        (
            v["connections"].as_array().cloned().unwrap_or_default(),
            v["matched"].as_u64().unwrap_or(u64::MAX),
        )
    }

    /// Holds `n` connections to VIP:80 open (no request yet) until the returned file is
    /// written; the process prints "held", then each answer's body.
    fn hold_open(&self, n: usize) -> (Proc, std::path::PathBuf) {
        let go = self.t.dir().join(format!("go{n}"));
        let hold = self.t.dir().join("hold.py");
        let p = self.t.spawn(
            "cl",
            "hold",
            &[
                "python3",
                hold.to_str().unwrap_or(""),
                VIP,
                "80",
                &n.to_string(),
                go.to_str().unwrap_or(""),
            ],
        );
        (p, go)
    }
}

fn field<'a>(flows: &'a [serde_json::Value], key: &str) -> Vec<&'a str> {
    flows.iter().filter_map(|f| f[key].as_str()).collect()
}

/// Four held connections under rr are listed one line each, with ipvsadm's state names,
/// the VIP, the client and the backend; the filters select, the limit cuts and says so, an
/// unknown service is an error; once the connections close none is ESTABLISHED any more.
#[test]
fn show_lb_connections_lists_each_flow_as_ipvsadm_lnc() {
    let lab = Lab::new(
        vipgate_tests::e2e!(),
        2,
        &service("rr", "", &[(1, 1), (2, 1)]),
        "kernel",
    );
    let (mut held, go) = lab.hold_open(4);
    wait_until(
        Duration::from_secs(10),
        "4 established flows listed",
        || {
            let (flows, _) = lab.connections_json(&[]);
            field(&flows, "state")
                .iter()
                .filter(|s| **s == "ESTABLISHED")
                .count()
                == 4
        },
    );
    let (flows, matched) = lab.connections_json(&[]);
    assert_eq!((flows.len(), matched), (4, 4), "{flows:?}");
    assert!(
        field(&flows, "virtual")
            .iter()
            .all(|v| *v == format!("{VIP}:80")),
        "{flows:?}"
    );
    assert!(field(&flows, "service").iter().all(|s| *s == "web"));
    assert!(
        field(&flows, "source")
            .iter()
            .all(|s| s.starts_with("198.51.100.2")),
        "the clients: {flows:?}"
    );
    let mut dests = field(&flows, "destination");
    dests.sort_unstable();
    assert_eq!(
        dests,
        [
            "10.0.0.101:80",
            "10.0.0.101:80",
            "10.0.0.102:80",
            "10.0.0.102:80"
        ],
        "rr spreads the four"
    );
    let client = field(&flows, "source")[0]
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();

    let (to_rs1, matched) = lab.connections_json(&["--backend", "10.0.0.101:80"]);
    assert_eq!((to_rs1.len(), matched), (2, 2));
    assert!(
        field(&to_rs1, "destination")
            .iter()
            .all(|d| *d == "10.0.0.101:80")
    );
    let (mine, _) = lab.connections_json(&["--client", &client, "--service", "web"]);
    assert_eq!(mine.len(), 4);
    let (nobody, matched) = lab.connections_json(&["--client", "198.51.100.99"]);
    assert_eq!((nobody.len(), matched), (0, 0));

    // The limit cuts the list and says so, in text and JSON alike.
    let (cut, matched) = lab.connections_json(&["--limit", "1"]);
    assert_eq!((cut.len(), matched), (1, 4));
    let (ok, text, _) = lab.connections(&["--limit", "1"]);
    assert!(ok);
    assert!(text.contains("first 1 of 4 shown"), "{text}");
    let (ok, text, _) = lab.connections(&[]);
    assert!(ok);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TCP ")).collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines.iter().all(|l| l.contains(" ESTABLISHED ")
            && l.contains(&format!("{VIP}:80"))
            && l.ends_with(" web")),
        "{text}"
    );
    // mm:ss of the established timeout.
    assert!(
        lines[0]
            .split_whitespace()
            .nth(1)
            .is_some_and(|e| e.len() >= 5 && e.contains(':')),
        "{text}"
    );

    // Refusals: an unknown service, a limit outside 1..=65536, a filter without --connections.
    let (ok, _, err) = lab.connections(&["--service", "nosuch"]);
    assert!(!ok && err.contains("nosuch"), "{err}");
    for bad in ["0", "65537", "many"] {
        let (ok, _, err) = lab.connections(&["--limit", bad]);
        assert!(!ok && err.contains("--limit"), "{bad}: {err}");
    }
    let out = lab.t.vipgate_output(
        "dir",
        &["show", "lb", "--service", "web", "--control", &lab.control],
    );
    assert!(!out.status.success(), "--service needs --connections");

    std::fs::write(&go, b"go").expect("releasing the held connections");
    assert_eq!(held.wait_exit(Duration::from_secs(20)), Some(0));
    wait_until(Duration::from_secs(10), "no flow established", || {
        let (flows, _) = lab.connections_json(&[]);
        !field(&flows, "state").contains(&"ESTABLISHED")
    });
}

/// `lb drain --wait`: blocks while the backend holds a connection (new ones go elsewhere
/// meanwhile), times out with exit 1 when asked to, and returns within a second after the
/// last connection ends; unknown services and backends and bad timeouts are refused.
#[test]
fn lb_drain_wait_returns_when_the_last_connection_ends() {
    let lab = Lab::new(
        vipgate_tests::e2e!(),
        2,
        &service("rr", "", &[(1, 1), (2, 1)]),
        "kernel",
    );
    let (mut held, go) = lab.hold_open(2);
    wait_until(Duration::from_secs(10), "a held connection on each", || {
        lab.backend("10.0.0.101:80").2 == 1 && lab.backend("10.0.0.102:80").2 == 1
    });
    let mut drain = lab.t.vipgate(
        "dir",
        "drain",
        &[
            "lb",
            "drain",
            "web",
            "10.0.0.101:80",
            "--wait",
            "--timeout",
            "60s",
            "--control",
            &lab.control,
        ],
    );
    wait_until(
        Duration::from_secs(10),
        "drain --wait reports 1 active",
        || drain.log().contains("10.0.0.101:80 of `web`: 1 active"),
    );
    assert!(lab.backend("10.0.0.101:80").0.starts_with("drain"));
    let next = count(&lab.connect(80, 10, CLIENTS));
    assert_eq!(
        next.get("rs2"),
        Some(&10),
        "new connections avoid rs1: {next:?}"
    );
    assert!(drain.is_running(), "still waiting: {}", drain.log());

    // A second waiter with a short timeout gives up with exit 1.
    let started = Instant::now();
    let short = lab.lb(&[
        "drain",
        "web",
        "10.0.0.101:80",
        "--wait",
        "--timeout",
        "300ms",
    ]);
    let err = short.expect_err("a timeout is a failure");
    assert!(err.contains("still holds 1 active"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Refusals.
    for (args, why) in [
        (vec!["drain", "nosuch", "10.0.0.101:80"], "nosuch"),
        (vec!["drain", "web", "10.0.0.109:80"], "10.0.0.109"),
        (vec!["drain", "web", "10.0.0.101"], "ip:port"),
        (
            vec!["drain", "web", "10.0.0.101:80", "--wait", "--timeout", "0s"],
            "timeout",
        ),
        (
            vec![
                "drain",
                "web",
                "10.0.0.101:80",
                "--wait",
                "--timeout",
                "25h",
            ],
            "timeout",
        ),
        (
            vec![
                "drain",
                "web",
                "10.0.0.101:80",
                "--wait",
                "--timeout",
                "soon",
            ],
            "timeout",
        ),
    ] {
        let err = lab.lb(&args).expect_err("refused");
        assert!(err.contains(why), "{args:?}: {err}");
    }

    // The held connections end: the waiter returns within a second, with status 0.
    std::fs::write(&go, b"go").expect("releasing the held connections");
    let done = Instant::now();
    let deadline = done + Duration::from_secs(20);
    while held.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let ended = Instant::now();
    assert_eq!(held.wait_exit(Duration::from_secs(1)), Some(0));
    let answers: Vec<String> = held.log().lines().skip(1).map(str::to_owned).collect();
    let mut sorted = answers.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["rs1", "rs2"],
        "the drained rs1 served its connection"
    );
    assert_eq!(
        drain.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        drain.log()
    );
    let waited = ended.elapsed();
    assert!(
        waited < Duration::from_secs(1),
        "drain --wait returned {waited:?} after the last connection ended"
    );
    assert!(drain.log().contains("drained"), "{}", drain.log());
}

/// `lb weight --canary` (the weights of the canary, blue-green and rolling-update recipes):
/// a new backend at weight 0 gets exactly 10 of 100 wrr connections while the others keep
/// their 1:1; 100 % sends every new connection to it (the blue-green switch), 0 % gives the
/// file's weights back; bad shares, unknown backends and mixed forms are refused.
#[test]
fn lb_weight_canary_gives_one_backend_its_share() {
    let lab = Lab::new(
        vipgate_tests::e2e!(),
        3,
        &service("wrr", "", &[(1, 1), (2, 1), (3, 0)]),
        "kernel",
    );
    let weights =
        |lab: &Lab| ["10.0.0.101:80", "10.0.0.102:80", "10.0.0.103:80"].map(|b| lab.backend(b).1);
    let out = lab
        .lb(&["weight", "web", "--canary", "10.0.0.103:80", "10%"])
        .expect("a canary step");
    // One result per part the operation reached: the one service here.
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["share_per_mille"], 100, "{v}");
    assert_eq!(v[0]["canary"], "10.0.0.103:80", "{v}");
    assert_eq!(weights(&lab), [9, 9, 2]);
    let split = count(&lab.connect(80, 100, CLIENTS));
    assert_eq!(
        (split.get("rs1"), split.get("rs2"), split.get("rs3")),
        (Some(&45), Some(&45), Some(&10)),
        "{split:?}"
    );

    // Blue-green: every new connection to the new one.
    lab.lb(&["weight", "web", "--canary", "10.0.0.103:80", "100%"])
        .expect("the switch");
    assert_eq!(weights(&lab), [0, 0, 1]);
    assert_eq!(count(&lab.connect(80, 20, CLIENTS)).get("rs3"), Some(&20));

    // And back: the file's weights, whatever came before.
    lab.lb(&["weight", "web", "--canary", "10.0.0.103:80", "0"])
        .expect("the rollback");
    assert_eq!(weights(&lab), [1, 1, 0]);
    let split = count(&lab.connect(80, 20, CLIENTS));
    assert_eq!(
        (split.get("rs1"), split.get("rs2"), split.get("rs3")),
        (Some(&10), Some(&10), None),
        "{split:?}"
    );

    for (args, why) in [
        (
            vec!["weight", "web", "--canary", "10.0.0.103:80", "101%"],
            "0% to 100%",
        ),
        (
            vec!["weight", "web", "--canary", "10.0.0.103:80", "ten"],
            "0% to 100%",
        ),
        (
            vec!["weight", "web", "--canary", "10.0.0.109:80", "10%"],
            "not a backend",
        ),
        (
            vec!["weight", "nosuch", "--canary", "10.0.0.103:80", "10%"],
            "nosuch",
        ),
        (
            vec![
                "weight",
                "web",
                "10.0.0.101:80",
                "--canary",
                "10.0.0.103:80",
                "10%",
            ],
            "cannot be used with",
        ),
    ] {
        let err = lab.lb(&args).expect_err("refused");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(weights(&lab), [1, 1, 0], "a refusal changes nothing");
}

/// `show lb --rate` (`ipvsadm -Ln --rate`): 40 connections made while it reads the counters
/// twice show as connections, packets and bytes per second; the service line is the sum of its
/// backends', wrr's 1:1 split shows in the backends' figures, and the text has ipvsadm's columns.
#[test]
fn show_lb_rate_gives_per_second_figures() {
    let lab = Lab::new(
        vipgate_tests::e2e!(),
        2,
        &service("wrr", "", &[(1, 1), (2, 1)]),
        "kernel",
    );
    let bin = vipgate_tests::vipgate_bin();
    let bin = bin.to_str().unwrap();
    let args = [
        bin,
        "show",
        "lb",
        "--rate",
        "--interval",
        "6s",
        "--json",
        "--control",
        &lab.control,
    ];
    let mut rate = lab.t.spawn("dir", "rate", &args);
    let answers = lab.connect(80, 40, CLIENTS);
    assert_eq!(answers.len(), 40);
    assert_eq!(
        rate.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        rate.log()
    );
    let v: serde_json::Value = serde_json::from_str(&rate.log()).expect("JSON");
    let interval_ms = v["interval_ms"].as_u64().expect("interval_ms");
    assert!((6000..8000).contains(&interval_ms), "{v}");
    let web = &v["services"][0];
    assert_eq!(web["name"], "web", "{v}");
    let per_backend = |key: &str| {
        web["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| b[key].as_u64().expect("a rate"))
            .collect::<Vec<_>>()
    };
    for key in ["cps", "in_pps", "out_pps", "in_bps", "out_bps"] {
        let each = per_backend(key);
        assert_eq!(web[key].as_u64(), Some(each.iter().sum()), "{key}: {v}");
        assert!(
            each.iter().all(|&r| r > 0),
            "{key}: both backends served: {v}"
        );
    }
    // The connections counted in the window: at most the 40 made (some may have started
    // before the first reading), and wrr 1:1 gives the two backends the same number ±1.
    let cps = per_backend("cps");
    let counted: Vec<u64> = cps.iter().map(|c| c * interval_ms / 1000).collect();
    assert!(counted.iter().sum::<u64>() <= 41, "{v}");
    assert!(counted[0].abs_diff(counted[1]) <= 2, "{v}");

    let out = lab.t.vipgate_output(
        "dir",
        &[
            "show",
            "lb",
            "--rate",
            "--interval",
            "200ms",
            "--control",
            &lab.control,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("CPS    InPPS   OutPPS    InBPS   OutBPS"),
        "{text}"
    );
    assert!(text.contains(&format!("TCP  {VIP}:80")), "{text}");
    assert!(text.contains("  -> 10.0.0.101:80"), "{text}");
    let refused = lab.t.vipgate_output(
        "dir",
        &[
            "show",
            "lb",
            "--rate",
            "--interval",
            "61s",
            "--control",
            &lab.control,
        ],
    );
    assert!(!refused.status.success());
}

/// Slow start (`slow_start`, HAProxy `slowstart`), measured as the issue asks: in connections
/// per second. rs2 comes back from weight 0 to 10 beside rs1 at 10 under wrr with an 8 s ramp;
/// connections made in a steady loop reach rs2 at a rate that starts near 1/11 of the total
/// (effective weight 1), climbs through the ramp and ends at half (weight 10 of 20), while
/// `show lb` says `slow start` and prints the weight in effect. The clock starts at the first
/// scheduling decision after the change, so the loop's first batch is the ramp's beginning.
#[test]
fn slow_start_ramps_a_returning_backend_in_connections_per_second() {
    const RAMP: Duration = Duration::from_secs(8);
    const BATCH: usize = 40;
    let lab = Lab::new(
        vipgate_tests::e2e!(),
        2,
        &service("wrr", "slow_start = \"8s\"", &[(1, 10), (2, 10)]),
        "kernel",
    );
    lab.lb(&["weight", "web", "10.0.0.102:80", "0"])
        .expect("rs2 out");
    assert_eq!(count(&lab.connect(80, 10, CLIENTS)).get("rs1"), Some(&10));
    lab.lb(&["weight", "web", "10.0.0.102:80", "10"])
        .expect("rs2 back");

    // (seconds since the ramp began at the batch's middle, rs2's connections/s, total/s)
    let mut rates: Vec<(f64, f64, f64)> = Vec::new();
    let start = Instant::now();
    let mut ramping_seen = false;
    while start.elapsed() < RAMP + Duration::from_secs(2) {
        let began = Instant::now();
        let split = count(&lab.connect(80, BATCH, CLIENTS));
        let took = began.elapsed().as_secs_f64().max(1e-3);
        let rs2 = split.get("rs2").copied().unwrap_or(0) as f64;
        let middle = (began + (Instant::now() - began) / 2 - start).as_secs_f64();
        rates.push((middle, rs2 / took, BATCH as f64 / took));
        if !ramping_seen && start.elapsed() < RAMP / 2 {
            let show = lab.show();
            let line = show
                .lines()
                .find(|l| l.trim_start().starts_with("-> 10.0.0.102:80 "))
                .unwrap_or_default()
                .to_owned();
            ramping_seen = line.contains("slow start") && line.contains("/10");
            assert!(ramping_seen, "ramping rs2 not shown as such:\n{show}");
        }
    }
    let share = |(_, rs2, total): &(f64, f64, f64)| rs2 / total;
    let report: Vec<String> = rates
        .iter()
        .map(|r| format!("{:.1}s: rs2 {:.0}/s of {:.0}/s", r.0, r.1, r.2))
        .collect();
    // The ramp as measured, for the README's figure (`--nocapture`).
    eprintln!("slow start ramp: {report:#?}");
    let first = rates.first().expect("a batch");
    let last = rates.last().expect("a batch");
    // The first batch runs at effective weights ≈ 1..3 of 10: well under a fifth.
    assert!(share(first) < 0.2, "{report:#?}");
    // After the ramp, wrr's exact half.
    assert!((share(last) - 0.5).abs() < 0.05, "{report:#?}");
    // In between it climbs: the mid-ramp batches sit between the two ends.
    let middle: Vec<f64> = rates
        .iter()
        .filter(|r| r.0 > 3.0 && r.0 < 5.0)
        .map(share)
        .collect();
    assert!(
        !middle.is_empty() && middle.iter().all(|s| *s > 0.15 && *s < 0.47),
        "{report:#?}"
    );
    let (state, weight, ..) = lab.backend("10.0.0.102:80");
    assert_eq!((state.as_str(), weight), ("up", 10));
}
