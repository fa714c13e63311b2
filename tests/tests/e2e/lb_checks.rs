//! Health-check kinds of `[[service]]` end to end, in `lb`'s lab (a director, real servers
//! rs1..rs3 answering with their names on :80, a client): a check on another port, a body
//! `expect`, HTTPS checks against python ssl servers with certificates made by openssl at
//! test time, and HAProxy agent checks served by a tiny python agent. Each test asserts which
//! backend answers client connections through the VIP after a check flips, and what
//! `show lb` says. Kernel data path only: checks decide in the control plane, the same on
//! both paths.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vipgate_tests::{Proc, e2e, wait_until};

use super::lb::{CLIENTS, Lab, count, service};

const RS1: &str = "10.0.0.101:80";
const RS2: &str = "10.0.0.102:80";
/// The system's python (the harness's http servers use it too).
const PYTHON: &str = "/usr/bin/python3";

/// Serves `GET` with 200, the head, then `x` forever; prints `closed N` with the bytes it got
/// out before each probe hung up.
const ENDLESS_PY: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
while True:
    c, _ = s.accept()
    c.recv(4096)
    sent = 0
    try:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        while True:
            sent += c.send(b"x" * 4096)
    except OSError:
        pass
    c.close()
    print("closed", sent, flush=True)
"#;

/// The `show lb` line of `backend`.
fn line_of(lab: &Lab, backend: &str) -> String {
    let show = lab.show();
    show.lines()
        .find(|l| l.trim_start().starts_with(&format!("-> {backend} ")))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{backend} not in show lb:\n{show}"))
}

/// Writes the health file python serves from `host`'s web root on `port`.
fn health_file(lab: &Lab, host: &str, port: u16, text: &str) {
    let path = lab.t.dir().join(format!("www-{host}-{port}/health.txt"));
    std::fs::write(&path, text).expect("writing the health file");
}

/// rs1 and rs2 serve their names on :80 and a health file on :8080; the checks go to :8080
/// and need "status: ok" in the body. A degraded body takes rs2 out (its :80 still answers);
/// rs1's check port going away takes rs1 out; a check server that streams an endless body is
/// read to the bound, the probe hangs up each time, and it counts as a failed check.
#[test]
fn a_check_port_and_a_body_expect_decide_which_backend_answers() {
    let mut lab = Lab::new(
        e2e!(),
        2,
        &service(
            "rr",
            "health = { kind = \"http\", port = 8080, path = \"/health.txt\", expect = \"status: ok\", \
             interval = \"300ms\", timeout = \"250ms\", rise = 1, fall = 2 }",
            &[(1, 1), (2, 1)],
        ),
        "kernel",
    );
    let mut checks: Vec<Proc> = Vec::new();
    for i in 1..=2 {
        let host = format!("rs{i}");
        checks.push(
            lab.t
                .http_server(&host, &format!("10.0.0.10{i}"), 8080, "x"),
        );
        health_file(&lab, &host, 8080, "service\nstatus: ok\n");
    }
    wait_until(Duration::from_secs(10), "both backends up", || {
        lab.backend(RS1).0 == "up" && lab.backend(RS2).0 == "up"
    });
    assert!(
        lab.show()
            .contains("check http port 8080 expect \"status: ok\""),
        "{}",
        lab.show()
    );
    assert_eq!(count(&lab.connect(80, 10, CLIENTS)).len(), 2);

    health_file(&lab, "rs2", 8080, "service\nstatus: degraded\n");
    wait_until(Duration::from_secs(5), "rs2 down on its body", || {
        lab.backend(RS2).0 == "down"
    });
    assert!(
        line_of(&lab, RS2).contains("last: expected string not in the body's first 16 KiB"),
        "{}",
        lab.show()
    );
    let after = count(&lab.connect(80, 10, CLIENTS));
    assert_eq!(after.get("rs1"), Some(&10), "{after:?}");

    health_file(&lab, "rs2", 8080, "service\nstatus: ok\n");
    wait_until(Duration::from_secs(5), "rs2 back up", || {
        lab.backend(RS2).0 == "up"
    });
    // rs1's :80 still serves, but its check port is closed: down, and the VIP says so.
    drop(checks.remove(0));
    wait_until(Duration::from_secs(5), "rs1 down on its check port", || {
        lab.backend(RS1).0 == "down"
    });
    assert!(
        line_of(&lab, RS1).contains("last: connection refused"),
        "{}",
        lab.show()
    );
    let after = count(&lab.connect(80, 10, CLIENTS));
    assert_eq!(after.get("rs2"), Some(&10), "{after:?}");

    // Hostile: rs2's check server streams forever. Each probe stops at the bound and hangs
    // up (the server sees its sends fail), and the backend goes down on its body.
    drop(checks.remove(0));
    let script = lab.t.write("endless.py", ENDLESS_PY);
    let endless = lab.t.spawn(
        "rs2",
        "endless",
        &[PYTHON, script.to_str().unwrap_or(""), "10.0.0.102", "8080"],
    );
    lab.t
        .wait_tcp("rs2", "10.0.0.102", 8080, Duration::from_secs(30));
    // The port check's own connection is the first.
    wait_until(Duration::from_secs(10), "three probes to hang up", || {
        endless.log().matches("closed").count() >= 4
    });
    wait_until(
        Duration::from_secs(5),
        "rs2 down on the endless body",
        || lab.backend(RS2).0 == "down",
    );
    assert!(
        line_of(&lab, RS2).contains("expected string not in the body"),
        "{}",
        lab.show()
    );
    let rss = || vm_rss_kib(lab.vipgate.pid());
    let before = rss();
    std::thread::sleep(Duration::from_secs(3));
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 4096,
        "10 probes of an endless body grew vipgate by {grown} KiB"
    );
    drop(endless);
    drop(lab.servers.remove("rs1"));
}

/// An HTTPS server (python's http.server over ssl) answering 200 "ok" to every GET.
const HTTPS_PY: &str = r#"
import http.server, ssl, sys
addr, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer((addr, port), Ok)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// Runs openssl in the test directory; panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `name` (`name.pem`, `name.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// A server certificate `host.pem`/`host.key` for `ip`, signed by CA `ca`.
fn make_cert(dir: &Path, host: &str, ip: &str, ca: &str) -> (PathBuf, PathBuf) {
    std::fs::write(
        dir.join(format!("{host}.ext")),
        format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n"),
    )
    .expect("writing the extensions");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{host}.key"),
            "-out",
            &format!("{host}.csr"),
            "-subj",
            &format!("/CN={host}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{host}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{host}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{host}.ext"),
        ],
    );
    (
        dir.join(format!("{host}.pem")),
        dir.join(format!("{host}.key")),
    )
}

/// HTTPS checks on :8443 with `ca_file` = the lab's CA: rs1's certificate chains to it, rs2's
/// to another CA, so rs2 is down with the reason and only rs1 answers the VIP. A reload with
/// `verify = false` instead brings rs2 back.
#[test]
fn https_checks_verify_certificates_and_verify_false_accepts_any() {
    let t = e2e!();
    let dir = t.dir().to_path_buf();
    make_ca(&dir, "lab-ca");
    make_ca(&dir, "other-ca");
    let rs1 = make_cert(&dir, "rs1", "10.0.0.101", "lab-ca");
    let rs2 = make_cert(&dir, "rs2", "10.0.0.102", "other-ca");
    let ca_file = dir.join("lab-ca.pem");
    let lab = Lab::new(
        t,
        2,
        &service(
            "rr",
            &format!(
                "health = {{ kind = \"https\", port = 8443, ca_file = \"{}\", expect = \"ok\", \
                 interval = \"300ms\", timeout = \"250ms\", rise = 1, fall = 2 }}",
                ca_file.display()
            ),
            &[(1, 1), (2, 1)],
        ),
        "kernel",
    );
    let script = lab.t.write("https.py", HTTPS_PY);
    let mut tls_servers = Vec::new();
    for (i, (cert, key)) in [(1, &rs1), (2, &rs2)] {
        let host = format!("rs{i}");
        let addr = format!("10.0.0.10{i}");
        tls_servers.push(lab.t.spawn(
            &host,
            &format!("https-{host}"),
            &[
                PYTHON,
                script.to_str().unwrap_or(""),
                &addr,
                "8443",
                cert.to_str().unwrap_or(""),
                key.to_str().unwrap_or(""),
            ],
        ));
        lab.t.wait_tcp(&host, &addr, 8443, Duration::from_secs(30));
    }
    wait_until(
        Duration::from_secs(10),
        "rs1 up and rs2 down on its certificate",
        || {
            lab.backend(RS1).0 == "up"
                && lab.backend(RS2).0 == "down"
                && line_of(&lab, RS2).contains("last: TLS certificate not trusted")
        },
    );
    assert!(
        lab.show().contains(&format!(
            "check https port 8443 ca-file {}",
            ca_file.display()
        )),
        "{}",
        lab.show()
    );
    let only = count(&lab.connect(80, 10, CLIENTS));
    assert_eq!(only.get("rs1"), Some(&10), "{only:?}");

    let text = std::fs::read_to_string(&lab.config).expect("reading the config");
    let relaxed = text.replace(
        &format!("ca_file = \"{}\"", ca_file.display()),
        "verify = false",
    );
    assert_ne!(text, relaxed);
    std::fs::write(&lab.config, relaxed).expect("rewriting the config");
    lab.vipgate.signal(1); // SIGHUP
    wait_until(
        Duration::from_secs(10),
        "rs2 up with verify = false",
        || lab.backend(RS2).0 == "up",
    );
    assert!(
        lab.show().contains("check https port 8443 verify none"),
        "{}",
        lab.show()
    );
    assert_eq!(count(&lab.connect(80, 10, CLIENTS)).len(), 2);
    drop(tls_servers);
}

/// A HAProxy-style agent: each connection gets the current contents of a file (its word),
/// or with `ENDLESS` in it a line that never ends (it prints `cut` once hung up on).
const AGENT_PY: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
while True:
    c, _ = s.accept()
    try:
        word = open(sys.argv[3], "rb").read()
        if word.startswith(b"ENDLESS"):
            c.settimeout(5)
            try:
                while True:
                    c.sendall(b"7" * 512)
            except OSError:
                print("cut", flush=True)
        else:
            c.sendall(word)
    except OSError:
        pass
    c.close()
"#;

/// Agents on rs1 and rs2 (:9999) next to TCP checks, both backends weight 10 under wrr: an
/// agent's `drain` takes its backend out of new flows, `ready 50%` brings it back at weight
/// 5 (15 connections split 10:5), `down` holds it down although its TCP check passes, `up`
/// lifts that. An endless line and a line of nonsense are counted and change nothing.
#[test]
fn agent_words_drain_weigh_and_hold_down_backends() {
    let lab = Lab::new(
        e2e!(),
        2,
        &service(
            "wrr",
            "health = { kind = \"tcp\", interval = \"300ms\", timeout = \"250ms\", rise = 1, fall = 2, \
             agent_port = 9999, agent_interval = \"300ms\" }",
            &[(1, 10), (2, 10)],
        ),
        "kernel",
    );
    let script = lab.t.write("agent.py", AGENT_PY);
    let word = |host: &str, text: &str| {
        std::fs::write(lab.t.dir().join(format!("agent-{host}.txt")), text)
            .expect("writing the agent's word");
    };
    let mut agents = Vec::new();
    for i in 1..=2 {
        let host = format!("rs{i}");
        let addr = format!("10.0.0.10{i}");
        word(&host, "ready\n");
        let file = lab.t.dir().join(format!("agent-{host}.txt"));
        agents.push(lab.t.spawn(
            &host,
            &format!("agent-{host}"),
            &[
                PYTHON,
                script.to_str().unwrap_or(""),
                &addr,
                "9999",
                file.to_str().unwrap_or(""),
            ],
        ));
        lab.t.wait_tcp(&host, &addr, 9999, Duration::from_secs(30));
    }
    wait_until(Duration::from_secs(10), "both agents heard", || {
        line_of(&lab, RS1).contains("agent: ready") && line_of(&lab, RS2).contains("agent: ready")
    });
    assert!(
        lab.show()
            .contains("check tcp every 300ms rise 1 fall 2 agent port 9999 every 300ms"),
        "{}",
        lab.show()
    );

    word("rs2", "drain\n");
    wait_until(Duration::from_secs(5), "rs2 drained by its agent", || {
        lab.backend(RS2).0 == "draining"
    });
    let drained = count(&lab.connect(80, 10, CLIENTS));
    assert_eq!(drained.get("rs1"), Some(&10), "{drained:?}");

    word("rs2", "ready 50%\n");
    wait_until(Duration::from_secs(5), "rs2 back at half weight", || {
        let (state, weight, ..) = lab.backend(RS2);
        state == "up" && weight == 5
    });
    assert!(
        line_of(&lab, RS2).contains("agent: ready 50%"),
        "{}",
        lab.show()
    );
    let split = count(&lab.connect(80, 15, CLIENTS));
    assert_eq!(
        (split.get("rs1"), split.get("rs2")),
        (Some(&10), Some(&5)),
        "wrr 10:5 over 15 connections: {split:?}"
    );

    word("rs2", "down #maintenance window\n");
    wait_until(Duration::from_secs(5), "rs2 held down by its agent", || {
        lab.backend(RS2).0 == "down"
    });
    let held = count(&lab.connect(80, 10, CLIENTS));
    assert_eq!(held.get("rs1"), Some(&10), "{held:?}");
    word("rs2", "up\n");
    wait_until(Duration::from_secs(5), "rs2 up again", || {
        lab.backend(RS2).0 == "up"
    });

    // Hostile: rs1's agent sends an endless line, then nonsense. Each is counted, rs1 keeps
    // its state, and the agent is hung up on at the bound.
    word("rs1", "ENDLESS");
    wait_until(Duration::from_secs(10), "endless lines counted", || {
        agents[0].log().matches("cut").count() >= 2
            && line_of(&lab, RS1).contains("agent: line longer than 256 bytes")
    });
    word("rs1", "bonjour\n");
    wait_until(Duration::from_secs(5), "nonsense counted", || {
        line_of(&lab, RS1).contains("agent: malformed line")
    });
    let json = lab.json();
    let malformed = json[0]["backends"][0]["agent"]["counters"]["malformed"]
        .as_u64()
        .unwrap_or(0);
    assert!(malformed >= 3, "endless and nonsense lines counted: {json}");
    assert_eq!(lab.backend(RS1).0, "up");
    drop(agents);
}

/// Resident memory of process `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
