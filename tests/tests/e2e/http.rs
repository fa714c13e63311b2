//! HTTP (L7) virtual services end to end (HTTP/1.1, and HTTP/2 over TLS from curl and
//! h2load): a director namespace runs `vipgate run` with `[[http]]`, two real servers run python3 http.server handlers that answer with their name,
//! the path they got, the `X-Forwarded-For` they saw and the SHA-256 of the body, and log every
//! request line they receive; a client namespace talks to the director with curl and raw
//! sockets.
//!
//! ```text
//!  cl 198.51.100.200 ── eth0 ── dir 198.51.100.11:80 (vipgate [[http]])
//!                               br0 10.0.0.1 ── rs1 10.0.0.101:8000, rs2 10.0.0.102:8000
//! ```

use std::time::Duration;

use vipgate_tests::{Proc, Show, Topology, counter, e2e, wait_for, wait_until};

const GATEWAY: &str = "198.51.100.11";

/// A backend on http.server's handler:
/// `NAME PATH xff=XFF proto=PROTO cookie=COOKIE tag=X-TAG,... sha256=HEX`
/// (over TLS with the certificate and key files argv[5] and argv[6] when given)
/// for any GET or POST (after SECONDS for a path `/slow?SECONDS`; with
/// `Set-Cookie: JSESSIONID=NAME-session; Path=/; HttpOnly` for `/login`, as an application
/// starting a session), and one line per request (`METHOD PATH`) in the log file.
const BACKEND_PY: &str = r#"
import hashlib, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, addr, port, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        with open(log, "a") as f:
            f.write(f"{self.command} {self.path}\n")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/slow?"):
            time.sleep(float(self.path.partition("?")[2]))
        xff = self.headers.get("X-Forwarded-For", "")
        proto = self.headers.get("X-Forwarded-Proto", "")
        cookie = self.headers.get("Cookie", "")
        tag = ",".join(self.headers.get_all("X-Tag") or [])
        text = f"{name} {self.path} xff={xff} proto={proto} cookie={cookie} tag={tag} sha256={hashlib.sha256(body).hexdigest()}\n".encode()
        self.send_response(200)
        if self.path == "/login":
            self.send_header("Set-Cookie", f"JSESSIONID={name}-session; Path=/; HttpOnly")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)
    do_GET = answer
    do_POST = answer
    def log_message(self, *args):
        pass
ThreadingHTTPServer.request_queue_size = 256
server = ThreadingHTTPServer((addr, port), Handler)
if len(sys.argv) > 6:
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[5], sys.argv[6])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// Sends argv[3] (with `\r\n` written as `\\r\\n`) raw to argv[1]:argv[2] and prints what
/// comes back until the gateway closes.
const RAW_PY: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(sys.argv[3].encode().decode("unicode_escape").encode("latin-1"))
data = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    data += d
print(data.decode("latin-1"))
"#;

/// Asks argv[1]:argv[2] for `/load` from two threads until the file argv[3] exists: one on a
/// single keep-alive connection, one on a new connection per request (over TLS, without
/// verifying, when argv[5] is `tls`). Writes to argv[4], as JSON, per thread the answers in
/// order (the backend's name, or `status N` / `error ...`) and the connections it used.
const LOAD_PY: &str = r#"
import http.client, json, os, ssl, sys, threading, time
host, port, stop, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tls = len(sys.argv) > 5 and sys.argv[5] == "tls"
ctx = ssl._create_unverified_context()
deadline = time.time() + 120
def run(keepalive, seen):
    conn = None
    while not os.path.exists(stop) and time.time() < deadline:
        try:
            if conn is None or not keepalive:
                if conn is not None:
                    conn.close()
                if tls:
                    conn = http.client.HTTPSConnection(host, port, timeout=10, context=ctx)
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=10)
                conn.connect()
            conn.request("GET", "/load")
            seen["ports"].add(conn.sock.getsockname()[1])
            r = conn.getresponse()
            body = r.read().decode()
            seen["answers"].append(body.split(" ")[0] if r.status == 200 else f"status {r.status}")
        except Exception as e:
            seen["answers"].append(f"error {e!r}")
            conn = None
keep, fresh = {"answers": [], "ports": set()}, {"answers": [], "ports": set()}
threads = [threading.Thread(target=run, args=(True, keep)), threading.Thread(target=run, args=(False, fresh))]
for t in threads:
    t.start()
for t in threads:
    t.join()
summary = {k: {"answers": v["answers"], "connections": len(v["ports"])} for k, v in (("keepalive", keep), ("new", fresh))}
with open(out + ".tmp", "w") as f:
    json.dump(summary, f)
os.rename(out + ".tmp", out)
"#;

/// Asks argv[1]:argv[2] for `/idle` on one connection, writes `answered` to argv[3] once
/// the answer is in, then waits, and appends `closed` when the gateway closes the connection.
const IDLE_PY: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
s.sendall(b"GET /idle HTTP/1.1\r\nHost: idle\r\n\r\n")
data = b""
while b"\r\n\r\n" not in data:
    data += s.recv(65536)
head, _, body = data.partition(b"\r\n\r\n")
length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
while len(body) < length:
    body += s.recv(65536)
with open(sys.argv[3], "w") as f:
    f.write("answered\n")
rest = s.recv(65536)
with open(sys.argv[3], "a") as f:
    f.write("closed\n" if not rest else "more\n")
"#;

const SITE: &str = r#"
[[http]]
name = "www"
listen = "198.51.100.11:80"
max_header_bytes = 2048
max_body_bytes = 100000
access_log = true

[[http.route]]
name = "api"
host = ["*.example.com"]
path_prefix = ["/api/"]
pool = "api"
strip_prefix = "/api"
set_request_headers = { "X-Forwarded-Proto" = "https" }

[[http.route]]
name = "old"
path = ["/old"]
redirect = { status = 301, prefix = "https://new.example.com" }

[[http.route]]
name = "down"
host = ["down.test"]
pool = "drained"

[[http.route]]
name = "default"
pool = "web"
set_response_headers = { "X-Served-By" = "vipgate" }
del_response_headers = ["Server"]

[[http.pool]]
name = "web"
backends = [{ address = "10.0.0.101:8000" }]

[[http.pool]]
name = "api"
scheduler = "wrr"
backends = [{ address = "10.0.0.102:8000", weight = 3 }]

[[http.pool]]
name = "drained"
backends = [{ address = "10.0.0.101:8000", weight = 0 }]
"#;

struct Lab {
    t: Topology,
    vipgate: Proc,
    /// The real servers, rs1 then rs2 (a test may kill or add one).
    backends: Vec<Proc>,
    control: String,
}

impl Lab {
    fn new(t: Topology) -> Lab {
        Lab::with_site(t, SITE, 80)
    }

    /// The lab with `site` as the director's config, waiting for `port` to accept.
    fn with_site(mut t: Topology, site: &str, port: u16) -> Lab {
        t.hosts(&["cl", "dir", "rs1", "rs2"]);
        t.veth("cl", "eth0", "dir", "eth0");
        t.addr("cl", "eth0", "198.51.100.200/24");
        t.addr("dir", "eth0", "198.51.100.11/24");
        t.bridge("dir", "br0");
        t.addr("dir", "br0", "10.0.0.1/24");
        let backend = t.write("backend.py", BACKEND_PY);
        t.write("raw.py", RAW_PY);
        let mut backends = Vec::new();
        for i in 1..=2 {
            let rs = format!("rs{i}");
            t.veth(&rs, "eth0", "dir", &format!("v{i}"));
            t.ip("dir", &format!("link set v{i} master br0"));
            let addr = format!("10.0.0.10{i}");
            t.addr(&rs, "eth0", &format!("{addr}/24"));
            let log = t.dir().join(format!("{rs}-requests.log"));
            std::fs::write(&log, "").expect("creating the request log");
            backends.push(t.spawn(
                &rs,
                &rs,
                &[
                    "python3",
                    backend.to_str().unwrap_or(""),
                    &rs,
                    &addr,
                    "8000",
                    log.to_str().unwrap_or(""),
                ],
            ));
            t.wait_tcp(&rs, &addr, 8000, Duration::from_secs(30));
        }
        let control = t.dir().join("vipgate.sock").display().to_string();
        let config = t.write("director.toml", &director_toml(&control, site));
        let vipgate = t.vipgate(
            "dir",
            "vipgate",
            &["run", "-c", config.to_str().unwrap_or("")],
        );
        t.wait_tcp("cl", GATEWAY, port, Duration::from_secs(30));
        Lab {
            t,
            vipgate,
            backends,
            control,
        }
    }

    /// curl from the client with extra arguments; stdout.
    fn curl(&self, args: &str) -> String {
        self.t
            .sh("cl", &format!("curl -sS --max-time 10 {args}"))
            .trim()
            .to_owned()
    }

    fn requests_seen(&self, rs: &str) -> String {
        std::fs::read_to_string(self.t.dir().join(format!("{rs}-requests.log"))).unwrap_or_default()
    }

    /// Waits until `rs` has logged `n` requests for `line` (`GET /load`).
    fn wait_requests(&self, rs: &str, line: &str, n: usize) {
        wait_until(
            Duration::from_secs(60),
            &format!("{n} `{line}` requests at {rs}"),
            || {
                self.requests_seen(rs)
                    .lines()
                    .filter(|l| *l == line)
                    .count()
                    >= n
            },
        );
    }

    /// Rewrites the director's config with `site` and runs `vipgate reload`.
    fn reload(&self, site: &str) -> std::process::Output {
        self.t
            .write("director.toml", &director_toml(&self.control, site));
        self.t
            .vipgate_output("dir", &["reload", "--control", &self.control])
    }

    /// Starts [`LOAD_PY`] against `port` (over TLS with `tls`); [`Load::stop`] ends it.
    fn load(&self, port: u16, tls: bool) -> Load {
        let script = self.t.write("load.py", LOAD_PY);
        let stop = self.t.dir().join("load.stop");
        let out = self.t.dir().join("load.json");
        let port = port.to_string();
        let mut argv = vec![
            "python3",
            script.to_str().unwrap_or(""),
            GATEWAY,
            &port,
            stop.to_str().unwrap_or(""),
            out.to_str().unwrap_or(""),
        ];
        if tls {
            argv.push("tls");
        }
        Load {
            proc: self.t.spawn("cl", "load", &argv),
            stop,
            out,
        }
    }

    /// Starts curl POSTing `bytes` random bytes to `/slow?SECONDS` in the background, waits
    /// until a backend got it, and returns curl, the body's SHA-256, curl's output file (the
    /// answer's head in the same file with `.head` appended) and the backend.
    fn slow_post(&self, seconds: u32, bytes: usize) -> SlowPost {
        let dir = self.t.dir().display().to_string();
        let body = format!("{dir}/slow.body");
        self.t
            .sh("cl", &format!("head -c {bytes} /dev/urandom > {body}"));
        let sha = self.t.sh("cl", &format!("sha256sum {body}"));
        let sha = sha.split_whitespace().next().unwrap_or("").to_owned();
        let out = self.t.dir().join("slow.out");
        let curl = self.t.spawn(
            "cl",
            "slow-curl",
            &[
                "sh",
                "-c",
                &format!(
                    "curl -sS --max-time 30 -D {0}.head --data-binary @{body} http://{GATEWAY}/slow?{seconds} > {0}",
                    out.display()
                ),
            ],
        );
        let line = format!("POST /slow?{seconds}");
        let backend = wait_for(
            Duration::from_secs(60),
            &format!("`{line}` at a backend"),
            || {
                ["rs1", "rs2"]
                    .into_iter()
                    .find(|rs| self.requests_seen(rs).lines().any(|l| l == line))
            },
        );
        SlowPost {
            curl,
            sha,
            out,
            backend,
        }
    }
}

/// A slow request on its way ([`Lab::slow_post`]).
struct SlowPost {
    curl: Proc,
    sha: String,
    out: std::path::PathBuf,
    backend: &'static str,
}

impl SlowPost {
    /// Waits for curl and checks it got `BACKEND /slow?SECONDS ... sha256=SHA`: the whole
    /// body reached the backend, and its answer the client.
    fn finished(&mut self, seconds: u32) {
        assert_eq!(self.curl.wait_exit(Duration::from_secs(30)), Some(0));
        let answer = std::fs::read_to_string(&self.out).unwrap_or_default();
        assert!(
            answer.starts_with(&format!("{} /slow?{seconds} ", self.backend))
                && answer.trim_end().ends_with(&format!("sha256={}", self.sha)),
            "{answer}"
        );
    }

    /// The answer's head.
    fn head(&self) -> String {
        std::fs::read_to_string(format!("{}.head", self.out.display())).unwrap_or_default()
    }
}

/// Two `[[http.pool]]`s: `first` on rs1:8000, `second` on rs2:8000.
fn two_pools(first: &str, second: &str) -> String {
    format!(
        "[[http.pool]]\nname = \"{first}\"\nbackends = [{{ address = \"10.0.0.101:8000\" }}]\n\n\
         [[http.pool]]\nname = \"{second}\"\nbackends = [{{ address = \"10.0.0.102:8000\" }}]"
    )
}

fn director_toml(control: &str, site: &str) -> String {
    format!("[daemon]\ncontrol = \"{control}\"\n{site}")
}

/// [`LOAD_PY`] running.
struct Load {
    proc: Proc,
    stop: std::path::PathBuf,
    out: std::path::PathBuf,
}

impl Load {
    /// Stops it and returns per thread (`keepalive`, `new`) its answers and connections.
    fn stop(mut self) -> serde_json::Value {
        std::fs::write(&self.stop, "").expect("writing the stop file");
        self.proc.wait_exit(Duration::from_secs(30));
        let text = std::fs::read_to_string(&self.out).expect("reading the load's summary");
        serde_json::from_str(&text).expect("the load's summary is JSON")
    }
}

/// The answers of one thread of [`LOAD_PY`]: none failed, and they switch once from `from`
/// to `to` (never back).
fn switched_once(summary: &serde_json::Value, thread: &str, from: &str, to: &str) {
    let answers: Vec<&str> = summary[thread]["answers"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    let failed: Vec<&&str> = answers
        .iter()
        .filter(|a| **a != from && **a != to)
        .collect();
    assert!(failed.is_empty(), "{thread}: failed requests {failed:?}");
    let first_to = answers.iter().position(|a| *a == to);
    assert!(
        first_to.is_some_and(|i| i > 0 && answers[i..].iter().all(|a| *a == to)),
        "{thread}: answers do not switch once from {from} to {to}: {answers:?}"
    );
}

#[test]
fn routes_pick_the_backend_rewrite_and_redirect() {
    let lab = Lab::new(e2e!());
    let url = |path: &str| format!("'http://{GATEWAY}{path}'");

    // Host + path prefix: the api pool's server answers, the prefix stripped, the query kept.
    let body = lab.curl(&format!(
        "-H 'Host: shop.example.com' {}",
        url("/api/items?x=1")
    ));
    assert!(
        body.starts_with("rs2 /items?x=1 xff=198.51.100.200 proto=https "),
        "{body}"
    );
    // The default route's response rules: a field set, the backend's Server field deleted.
    let head = lab
        .curl(&format!("-D - -o /dev/null {}", url("/")))
        .to_ascii_lowercase();
    assert!(head.contains("x-served-by: vipgate"), "{head}");
    assert!(!head.contains("server:"), "{head}");
    // The same path on another host: the default route's server, path untouched.
    let body = lab.curl(&format!("-H 'Host: example.org' {}", url("/api/items")));
    assert!(
        body.starts_with("rs1 /api/items xff=198.51.100.200 "),
        "{body}"
    );
    // A forged X-Forwarded-For from an untrusted client is replaced, not extended.
    let body = lab.curl(&format!("-H 'X-Forwarded-For: 6.6.6.6' {}", url("/")));
    assert!(body.starts_with("rs1 / xff=198.51.100.200 "), "{body}");
    // Redirect with the path and query appended.
    let out = lab.curl(&format!(
        "-o /dev/null -w '%{{http_code}} %{{redirect_url}}' {}",
        url("/old?q=1")
    ));
    assert_eq!(out, "301 https://new.example.com/old?q=1");
    // A body arrives intact (by hash) through the gateway.
    lab.t.sh(
        "cl",
        &format!(
            "head -c 60000 /dev/urandom > {}/up.bin",
            lab.t.dir().display()
        ),
    );
    let want = lab
        .t
        .sh("cl", &format!("sha256sum {}/up.bin", lab.t.dir().display()));
    let want = want.split_whitespace().next().unwrap_or("-").to_owned();
    let body = lab.curl(&format!(
        "--data-binary @{}/up.bin {}",
        lab.t.dir().display(),
        url("/upload")
    ));
    assert!(
        body.ends_with(&format!("sha256={want}")),
        "{body} vs {want}"
    );

    let json = lab.t.show("dir", &lab.control, Show::Http);
    let gw = &json[0];
    assert_eq!(counter(gw, &["routes", "0", "requests"]), 1, "{json}");
    assert_eq!(counter(gw, &["routes", "1", "requests"]), 1, "{json}");
    assert_eq!(counter(gw, &["routes", "3", "requests"]), 4, "{json}");
    assert_eq!(
        counter(gw, &["pools", "1", "backends", "0", "requests"]),
        1,
        "{json}"
    );
    assert_eq!(counter(gw, &["responses", "success"]), 5, "{json}");
    assert_eq!(counter(gw, &["responses", "redirect"]), 1, "{json}");
    // Response times of the five answers from backends (the redirect is the gateway's own).
    assert_eq!(counter(gw, &["latency", "samples"]), 5, "{json}");
    let (p50, max) = (
        counter(gw, &["latency", "p50_us"]),
        counter(gw, &["latency", "max_us"]),
    );
    assert!(0 < p50 && p50 <= max && max < 5_000_000, "{json}");
    let text = lab.t.sh(
        "dir",
        &format!(
            "{} show http --control {}",
            vipgate_tests::vipgate_bin().display(),
            lab.control
        ),
    );
    assert!(text.contains("route api"), "{text}");
    assert!(text.contains("10.0.0.102:8000"), "{text}");
    assert!(text.contains("response time: p50 "), "{text}");
}

/// A route on path regexes to rs2 (with `route`'s other lines), a default route to rs1.
fn regex_site(regexes: &str, route: &str) -> String {
    format!(
        r#"
[[http]]
name = "www"
listen = "{GATEWAY}:80"

[[http.route]]
name = "versioned"
path_regex = [{regexes}]
pool = "api"
{route}

[[http.route]]
name = "default"
pool = "web"

{pools}
"#,
        pools = two_pools("web", "api")
    )
}

/// Issue #20's regex paths and `add` header rules: a path regex picks the backend on the
/// path without its query, unanchored unless it anchors, on the path as sent (not decoded);
/// added fields join the ones already there on the request and the response; a reload
/// changes both live, and a bad regex is refused at its line and column.
#[test]
fn regex_paths_and_added_headers() {
    let adds = r#"add_request_headers = { "X-Tag" = ["one", "two"] }
add_response_headers = { "Server" = "vipgate", "X-Tag" = ["a", "b"] }"#;
    let lab = Lab::with_site(
        e2e!(),
        &regex_site(r#""^/api/v[0-9]+/", '\.php$'"#, adds),
        80,
    );
    let url = |path: &str| format!("'http://{GATEWAY}{path}'");
    let server = |path: &str| {
        let body = lab.curl(&url(path));
        body.split(' ').next().unwrap_or_default().to_owned()
    };

    // Anchored at the start; the path forwarded as it came, the client's field kept and the
    // route's two appended after it.
    let body = lab.curl(&format!("-H 'X-Tag: client' {}", url("/api/v2/items?x=1")));
    assert!(
        body.starts_with("rs2 /api/v2/items?x=1 ") && body.contains(" tag=client,one,two "),
        "{body}"
    );
    assert_eq!(server("/api/vx/items"), "rs1");
    assert_eq!(server("/v1/api/v2/"), "rs1");
    // Unanchored at the start, `$` at the end of the path, before the query.
    assert_eq!(server("/shop/index.php?page=.php"), "rs2");
    assert_eq!(server("/index.php/more?q=.php"), "rs1");
    // Percent-encoding is not decoded: `%32` is not a digit.
    assert_eq!(server("/api/v%32/items"), "rs1");
    // The default route adds nothing.
    let body = lab.curl(&format!("-H 'X-Tag: client' {}", url("/")));
    assert!(body.contains(" tag=client "), "{body}");

    // Response: the backend's Server field kept and the route's appended; two X-Tag fields.
    let head = lab
        .curl(&format!("-D - -o /dev/null {}", url("/api/v1/")))
        .to_ascii_lowercase();
    let fields = |name: &str| -> Vec<String> {
        head.lines()
            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(|v| v.trim().to_owned())
            .collect()
    };
    let servers = fields("server");
    assert!(
        servers.len() == 2 && servers[0].starts_with("basehttp/") && servers[1] == "vipgate",
        "{head}"
    );
    assert_eq!(fields("x-tag"), ["a", "b"], "{head}");

    let json = lab.t.show("dir", &lab.control, Show::Http);
    assert_eq!(json[0]["routes"][0]["name"], "versioned", "{json}");
    assert_eq!(counter(&json[0], &["routes", "0", "requests"]), 3, "{json}");

    // A bad regex: the reload is refused at its place, the running routes stay.
    let out = lab.reload(&regex_site(r#""^/api/v[0-9+/""#, adds));
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains(
            "director.toml:10:15: bad path regex \"^/api/v[0-9+/\": unclosed character class"
        ),
        "{report}"
    );
    assert_eq!(server("/api/v2/"), "rs2");

    // Live: a narrower regex, no header rules.
    let out = lab.reload(&regex_site(r#""^/api/v1/""#, ""));
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("http www: applied live"), "{report}");
    assert_eq!(server("/api/v2/items"), "rs1");
    let body = lab.curl(&format!("-D - {}", url("/api/v1/items")));
    assert!(body.contains("rs2 /api/v1/items "), "{body}");
    assert!(body.contains(" tag= "), "{body}");
    assert!(!body.to_ascii_lowercase().contains("x-tag:"), "{body}");
    wait_until(Duration::from_secs(10), "the reload's log line", || {
        lab.vipgate
            .log()
            .contains("HTTP gateway reconfigured live: routes ~versioned")
    });
    // The route kept its counters across the reload.
    let json = lab.t.show("dir", &lab.control, Show::Http);
    assert_eq!(counter(&json[0], &["routes", "0", "requests"]), 5, "{json}");
}

#[test]
fn limits_and_smuggling_are_refused_before_any_backend() {
    let lab = Lab::new(e2e!());
    let code = |args: &str| lab.curl(&format!("-o /dev/null -w '%{{http_code}}' {args}"));
    let url = format!("'http://{GATEWAY}/'");

    lab.t.sh(
        "cl",
        &format!(
            "head -c 200000 /dev/zero > {}/big.bin",
            lab.t.dir().display()
        ),
    );
    assert_eq!(
        code(&format!(
            "--data-binary @{}/big.bin {url}",
            lab.t.dir().display()
        )),
        "413"
    );
    let long = "a".repeat(3000);
    assert_eq!(code(&format!("-H 'X-Long: {long}' {url}")), "431");
    assert_eq!(code(&format!("-H 'Host: down.test' {url}")), "503");

    // CL+TE: hyper would read it as chunked and see a clean request; the guard refuses it
    // before hyper does, and neither it nor the request hidden in its body reaches rs1.
    let raw = |text: &str| {
        lab.t.sh(
            "cl",
            &format!(
                "python3 {}/raw.py {GATEWAY} 80 '{text}'",
                lab.t.dir().display()
            ),
        )
    };
    let smuggle = "POST / HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 44\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\nGET /smuggled HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n";
    let answer = raw(smuggle);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw(
        "POST / HTTP/1.1\\r\\nHost: a\\r\\nTransfer-Encoding: chunked\\r\\nContent-Length: 3\\r\\n\\r\\n0\\r\\n\\r\\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw(
        "POST / HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 3\\r\\nContent-Length: 4\\r\\n\\r\\nabcd",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A clean request on the same path still goes through, so the backend was reachable.
    let answer = raw("GET /clean HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    wait_until(
        Duration::from_secs(5),
        "rs1 to log the clean request",
        || lab.requests_seen("rs1").contains("GET /clean"),
    );
    assert_eq!(lab.requests_seen("rs1"), "GET /clean\n");
    assert_eq!(lab.requests_seen("rs2"), "");

    let json = lab.t.show("dir", &lab.control, Show::Http);
    let gw = &json[0];
    assert_eq!(counter(gw, &["refused"]), 5, "{json}");
    assert_eq!(counter(gw, &["pools", "2", "no_backend"]), 1, "{json}");
    assert_eq!(counter(gw, &["responses", "client_error"]), 5, "{json}");
    assert_eq!(counter(gw, &["responses", "server_error"]), 1, "{json}");
}

/// A self-signed certificate for `name` (and its subjectAltName `san`) made by openssl (on the
/// host, before the namespaces exist) in the test directory: `NAME.pem`, `NAME.key` (mode 600).
fn openssl_cert(t: &Topology, name: &str, san: &str) -> (String, String) {
    let dir = t.dir().display().to_string();
    let (cert, key) = (format!("{dir}/{name}.pem"), format!("{dir}/{name}.key"));
    let made = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
             -subj /CN={name} -addext 'subjectAltName={san}' -keyout {key} -out {cert} 2>&1 \
             && chmod 600 {key}"
        ))
        .output()
        .expect("running openssl");
    assert!(made.status.success(), "openssl: {made:?}");
    (cert, key)
}

#[test]
fn tls_picks_the_certificate_by_sni_and_bounds_handshakes() {
    let t = e2e!();
    let (default, default_key) = openssl_cert(&t, "default.test", "DNS:default.test");
    let (a, a_key) = openssl_cert(&t, "a.example.com", "DNS:a.example.com");
    let (b, b_key) = openssl_cert(&t, "b.example.com", "DNS:*.b.example.com");
    let site = format!(
        r#"
[[http]]
name = "tls"
listen = "{GATEWAY}:443"
access_log = true
tls = {{ handshake_timeout = "1s", certs = [
  {{ cert_file = "{default}", key_file = "{default_key}" }},
  {{ cert_file = "{a}", key_file = "{a_key}" }},
  {{ cert_file = "{b}", key_file = "{b_key}" }},
] }}

[[http.route]]
name = "a"
sni = ["a.example.com"]
pool = "one"

[[http.route]]
name = "default"
pool = "two"

{pools}
"#,
        pools = two_pools("one", "two")
    );
    let lab = Lab::with_site(t, &site, 443);
    let check = lab.t.vipgate_output(
        "dir",
        &[
            "check",
            "-c",
            lab.t.dir().join("director.toml").to_str().unwrap_or(""),
        ],
    );
    assert!(check.status.success(), "{check:?}");

    // curl to each name, trusting only that name's certificate: the handshake verifies only
    // if the gateway picked it; the subject shows which; the route on SNI picks the backend.
    let fetch = |name: &str, ca: &str| {
        lab.t.sh(
            "cl",
            &format!(
                "curl -sS -v --http1.1 --max-time 10 --cacert {ca} --resolve {name}:443:{GATEWAY} https://{name}/x 2>&1"
            ),
        )
    };
    let out = fetch("a.example.com", &a);
    assert!(out.contains("subject: CN=a.example.com"), "{out}");
    assert!(out.contains("ALPN: server accepted http/1.1"), "{out}");
    assert!(
        out.contains("rs1 /x xff=198.51.100.200 proto=https "),
        "{out}"
    );
    let out = fetch("www.b.example.com", &b);
    assert!(out.contains("subject: CN=b.example.com"), "{out}");
    assert!(
        out.contains("rs2 /x xff=198.51.100.200 proto=https "),
        "{out}"
    );
    // No SNI: the default certificate.
    let out = lab.t.sh(
        "cl",
        &format!(
            "openssl s_client -connect {GATEWAY}:443 -noservername </dev/null 2>/dev/null | grep '^subject='"
        ),
    );
    assert!(out.contains("CN = default.test"), "{out}");
    // TLS 1.1 is refused.
    assert!(
        lab.t
            .try_sh(
                "cl",
                &format!("curl -sS --max-time 5 -k --tls-max 1.1 https://{GATEWAY}/")
            )
            .is_err()
    );

    // Plain HTTP instead of a ClientHello: closed, nothing answered in HTTP.
    let answer = lab.t.sh(
        "cl",
        &format!(
            "python3 {}/raw.py {GATEWAY} 443 'GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n'",
            lab.t.dir().display()
        ),
    );
    assert!(!answer.contains("HTTP/1.1"), "{answer}");
    // A connection that never starts its handshake is closed at handshake_timeout (1 s).
    let took = lab.t.sh(
        "cl",
        &format!(
            "python3 -c 'import socket,time; s=socket.create_connection((\"{GATEWAY}\",443)); t=time.time(); s.settimeout(10); d=s.recv(1); print(round(time.time()-t, 1), len(d))'"
        ),
    );
    let secs: f64 = took
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1.0);
    assert!((0.8..5.0).contains(&secs), "{took}");

    let json = lab.t.show("dir", &lab.control, Show::Http);
    let gw = &json[0];
    assert_eq!(counter(gw, &["tls", "handshakes"]), 3, "{json}");
    assert_eq!(counter(gw, &["tls", "timed_out"]), 1, "{json}");
    assert!(counter(gw, &["tls", "failed"]) >= 2, "{json}");
    assert_eq!(counter(gw, &["routes", "0", "requests"]), 1, "{json}");
    assert_eq!(counter(gw, &["routes", "1", "requests"]), 1, "{json}");
    assert_eq!(lab.requests_seen("rs1"), "GET /x\n");
    assert_eq!(lab.requests_seen("rs2"), "GET /x\n");
}

/// A WebSocket-ish echo server: answers a request with `Upgrade: websocket` with `101` and
/// then echoes every byte until EOF; anything else gets `200 plain`.
const ECHO_PY: &str = r#"
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(16)
def serve(c):
    data = b""
    while b"\r\n\r\n" not in data:
        d = c.recv(4096)
        if not d:
            return
        data += d
    head, rest = data.split(b"\r\n\r\n", 1)
    if b"upgrade: websocket" in head.lower():
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n" + rest)
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    else:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Asks argv[1]:argv[2] to switch to websocket, then sends argv[3] random bytes while reading
/// the echo; prints the status line, then the SHA-256 of what went and what came back.
const WS_CLIENT_PY: &str = r#"
import hashlib, os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET /ws/chat HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
data = b""
while b"\r\n\r\n" not in data:
    data += s.recv(4096)
head, back = data.split(b"\r\n\r\n", 1)
payload = os.urandom(int(sys.argv[3]))
def send():
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
while True:
    d = s.recv(65536)
    if not d:
        break
    back += d
t.join()
print(head.split(b"\r\n")[0].decode())
print(hashlib.sha256(payload).hexdigest(), hashlib.sha256(back).hexdigest(), len(back))
"#;

#[test]
fn websocket_upgrade_is_tunnelled_both_ways() {
    let site = r#"
[[http]]
name = "ws"
listen = "198.51.100.11:80"
tunnel_timeout = "30s"

[[http.route]]
name = "ws"
path_prefix = ["/ws/"]
pool = "echo"

[[http.route]]
name = "default"
pool = "web"

[[http.pool]]
name = "echo"
backends = [{ address = "10.0.0.101:9000" }]

[[http.pool]]
name = "web"
backends = [{ address = "10.0.0.102:8000" }]
"#;
    let lab = Lab::with_site(e2e!(), site, 80);
    let echo = lab.t.write("echo.py", ECHO_PY);
    let _echo = lab.t.spawn(
        "rs1",
        "echo",
        &["python3", echo.to_str().unwrap_or(""), "10.0.0.101", "9000"],
    );
    lab.t.wait_listening("rs1", 9000);
    let client = lab.t.write("ws_client.py", WS_CLIENT_PY);
    let out = lab.t.sh(
        "cl",
        &format!("python3 {} {GATEWAY} 80 1000000", client.display()),
    );
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("HTTP/1.1 101 Switching Protocols"),
        "{out}"
    );
    let sums: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(sums.len(), 3, "{out}");
    assert_eq!(sums[0], sums[1], "echo differs: {out}");
    assert_eq!(sums[2], "1000000", "{out}");
    // An ordinary request on the same listener still works, and the switch was counted.
    assert!(
        lab.curl(&format!("http://{GATEWAY}/"))
            .starts_with("rs2 / ")
    );
    let json = lab.t.show("dir", &lab.control, Show::Http);
    let gw = &json[0];
    assert_eq!(
        counter(gw, &["routes", "0", "responses", "info"]),
        1,
        "{json}"
    );
    assert_eq!(
        counter(gw, &["routes", "1", "responses", "success"]),
        1,
        "{json}"
    );
}

#[test]
fn a_sticky_cookie_keeps_a_client_on_one_backend() {
    let site = r#"
[[http]]
name = "app"
listen = "198.51.100.11:80"

[[http.route]]
name = "default"
pool = "app"

[[http.pool]]
name = "app"
cookie = { name = "SRV", nocache = true }
backends = [{ address = "10.0.0.101:8000" }, { address = "10.0.0.102:8000" }]
"#;
    let lab = Lab::with_site(e2e!(), site, 80);
    let jar = lab.t.dir().join("jar.txt").display().to_string();
    let url = format!("http://{GATEWAY}/");
    // The first answer sets the cookie: an opaque id, not the address; Cache-Control private.
    let head = lab.curl(&format!("-D - -o /dev/null -c {jar} {url}"));
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("set-cookie: srv="), "{head}");
    assert!(lower.contains("cache-control: private"), "{head}");
    assert!(!head.contains("10.0.0."), "{head}");
    // With the jar: ten more requests, one backend.
    let bodies: Vec<String> = (0..10)
        .map(|_| lab.curl(&format!("-b {jar} -c {jar} -b other=1 {url}")))
        .collect();
    let with: Vec<&str> = bodies
        .iter()
        .map(|body| body.split_whitespace().next().unwrap_or("-"))
        .collect();
    assert!(with.iter().all(|b| *b == with[0]), "{bodies:?}");
    // The cookie is taken out before the request goes upstream; other cookies stay.
    assert!(
        bodies.iter().all(|b| b.contains(" cookie=other=1 ")),
        "{bodies:?}"
    );
    // Without it: round robin spreads them.
    let without: Vec<String> = (0..10)
        .map(|_| lab.curl(&url))
        .map(|body| body.split_whitespace().next().unwrap_or("-").to_owned())
        .collect();
    assert!(without.iter().any(|b| b == "rs1"), "{without:?}");
    assert!(without.iter().any(|b| b == "rs2"), "{without:?}");
    let json = lab.t.show("dir", &lab.control, Show::Http);
    assert_eq!(counter(&json[0], &["pools", "0", "requests"]), 21, "{json}");
}

#[test]
fn http2_over_tls_routes_as_http1_and_keeps_its_limits() {
    let t = e2e!();
    let (cert, key) = openssl_cert(&t, "example.com", "DNS:*.example.com");
    let site = format!(
        r#"
[[http]]
name = "h2"
listen = "{GATEWAY}:443"
access_log = true
max_header_bytes = 2048
max_streams = 32
tls = {{ alpn = ["h2", "http/1.1"], certs = [{{ cert_file = "{cert}", key_file = "{key}" }}] }}

[[http.route]]
name = "api"
host = ["api.example.com"]
path_prefix = ["/api/"]
pool = "api"
strip_prefix = "/api"

[[http.route]]
name = "app"
host = ["app.example.com"]
pool = "app"

[[http.route]]
name = "default"
pool = "web"

{pools}

[[http.pool]]
name = "app"
cookie = {{ name = "SRV", nocache = true }}
backends = [{{ address = "10.0.0.101:8000" }}, {{ address = "10.0.0.102:8000" }}]
"#,
        pools = two_pools("web", "api")
    );
    let lab = Lab::with_site(t, &site, 443);
    let dir = lab.t.dir().display().to_string();
    // curl over HTTP/2 to NAME: the body, then the HTTP version and the status code.
    let h2 = |name: &str, args: &str| -> (String, String) {
        let out = lab.t.sh(
            "cl",
            &format!(
                "curl -sS --http2 --max-time 10 --cacert {cert} --resolve {name}:443:{GATEWAY} \
                 -w '\\n%{{http_version}} %{{http_code}}' {args}"
            ),
        );
        let (body, tail) = out.trim().rsplit_once('\n').unwrap_or(("", out.trim()));
        (body.trim().to_owned(), tail.to_owned())
    };

    // Host and path pick the pool, the prefix is stripped, the query kept; the backend sees
    // the client's address and https.
    let (body, tail) = h2("api.example.com", "'https://api.example.com/api/items?x=1'");
    assert_eq!(tail, "2 200");
    assert!(
        body.starts_with("rs2 /items?x=1 xff=198.51.100.200 proto=https "),
        "{body}"
    );
    // The same path on another host: the default pool, path untouched.
    let (body, tail) = h2("www.example.com", "https://www.example.com/api/items");
    assert_eq!(tail, "2 200");
    assert!(
        body.starts_with("rs1 /api/items xff=198.51.100.200 "),
        "{body}"
    );
    // A forged X-Forwarded-For is replaced.
    let (body, _) = h2(
        "www.example.com",
        "-H 'X-Forwarded-For: 6.6.6.6' https://www.example.com/",
    );
    assert!(body.starts_with("rs1 / xff=198.51.100.200 "), "{body}");
    // A body arrives intact (by hash) through HTTP/2 → HTTP/1.1.
    lab.t
        .sh("cl", &format!("head -c 300000 /dev/urandom > {dir}/up.bin"));
    let want = lab.t.sh("cl", &format!("sha256sum {dir}/up.bin"));
    let want = want.split_whitespace().next().unwrap_or("-").to_owned();
    let (body, tail) = h2(
        "www.example.com",
        &format!("--data-binary @{dir}/up.bin https://www.example.com/upload"),
    );
    assert_eq!(tail, "2 200");
    assert!(
        body.ends_with(&format!("sha256={want}")),
        "{body} vs {want}"
    );

    // Stickiness over HTTP/2: the cookie set on the first answer keeps the next ten on one
    // backend; it is taken out upstream, other cookies stay.
    let jar = format!("{dir}/jar.txt");
    let (first, _) = h2(
        "app.example.com",
        &format!("-c {jar} https://app.example.com/"),
    );
    let picked = first.split_whitespace().next().unwrap_or("-").to_owned();
    let bodies: Vec<String> = (0..10)
        .map(|_| {
            h2(
                "app.example.com",
                &format!("-b {jar} -b other=1 https://app.example.com/"),
            )
            .0
        })
        .collect();
    assert!(
        bodies
            .iter()
            .all(|b| b.starts_with(&format!("{picked} / "))),
        "{picked}: {bodies:?}"
    );
    assert!(
        bodies.iter().all(|b| b.contains(" cookie=other=1 ")),
        "{bodies:?}"
    );

    // A head over max_header_bytes: 431 on HTTP/2 too, and no backend sees it.
    let long = "a".repeat(3000);
    let (_, tail) = h2(
        "www.example.com",
        &format!("-H 'X-Long: {long}' https://www.example.com/too-long"),
    );
    assert_eq!(tail, "2 431");
    // HTTP/1.1 is still offered.
    let out = lab.t.sh(
        "cl",
        &format!(
            "curl -sS --http1.1 --max-time 10 --cacert {cert} --resolve www.example.com:443:{GATEWAY} \
             -o /dev/null -w '%{{http_version}} %{{http_code}}' https://www.example.com/one"
        ),
    );
    assert_eq!(out.trim(), "1.1 200");

    // h2load: 4 connections, 32 streams each at once (the limit), 4000 requests.
    let out = lab.t.sh(
        "cl",
        &format!("h2load -n 4000 -c 4 -m 32 https://{GATEWAY}/load 2>&1"),
    );
    assert!(out.contains("Application protocol: h2"), "{out}");
    assert!(
        out.contains("4000 total, 4000 started, 4000 done, 4000 succeeded, 0 failed"),
        "{out}"
    );
    assert!(out.contains("status codes: 4000 2xx"), "{out}");

    assert!(!lab.requests_seen("rs1").contains("/too-long"));
    assert!(!lab.requests_seen("rs2").contains("/too-long"));
    let json = lab.t.show("dir", &lab.control, Show::Http);
    let gw = &json[0];
    // 16 curl connections over HTTP/2, 4 from h2load.
    assert_eq!(counter(gw, &["tls", "h2"]), 20, "{json}");
    assert_eq!(counter(gw, &["tls", "reset_floods"]), 0, "{json}");
    assert_eq!(counter(gw, &["refused"]), 1, "{json}");
    assert_eq!(counter(gw, &["cancelled"]), 0, "{json}");
    assert_eq!(counter(gw, &["routes", "0", "requests"]), 1, "{json}");
    assert_eq!(counter(gw, &["routes", "1", "requests"]), 11, "{json}");
    assert_eq!(counter(gw, &["routes", "2", "requests"]), 4004, "{json}");
    assert_eq!(counter(gw, &["responses", "success"]), 4016, "{json}");
    let text = lab.t.sh(
        "dir",
        &format!(
            "{} show http --control {}",
            vipgate_tests::vipgate_bin().display(),
            lab.control
        ),
    );
    assert!(text.contains("http/2: 20 connections"), "{text}");
}

/// One listener whose only route forwards to pool `pool` (`blue`: rs1, `green`: rs2).
fn blue_green_site(pool: &str, extra: &str) -> String {
    format!(
        r#"
[[http]]
name = "www"
listen = "{GATEWAY}:80"
{extra}

[[http.route]]
name = "default"
pool = "{pool}"

{pools}
"#,
        pools = two_pools("blue", "green")
    )
}

/// Issue #20's blue-green recipe: one reload switches the route's pool while clients ask
/// continuously on a keep-alive connection and on new connections; no request fails, the
/// keep-alive connection stays open, the answers switch from blue to green, and a slow
/// request already forwarded to blue finishes there with its whole body.
#[test]
fn blue_green_switch_by_reload_loses_no_request() {
    let lab = Lab::with_site(e2e!(), &blue_green_site("blue", ""), 80);
    let load = lab.load(80, false);
    lab.wait_requests("rs1", "GET /load", 20);
    let mut slow = lab.slow_post(3, 2_000_000);
    assert_eq!(slow.backend, "rs1");

    let out = lab.reload(&blue_green_site("green", ""));
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("http www: applied live"), "{report}");
    lab.wait_requests("rs2", "GET /load", 40);
    let summary = load.stop();
    switched_once(&summary, "keepalive", "rs1", "rs2");
    switched_once(&summary, "new", "rs1", "rs2");
    assert_eq!(summary["keepalive"]["connections"], 1, "{summary}");

    slow.finished(3);
    // The reload said what it changed; the route's counters carried over.
    wait_until(Duration::from_secs(10), "the reload's log line", || {
        lab.vipgate
            .log()
            .contains("HTTP gateway reconfigured live: routes ~default")
    });
    let json = lab.t.show("dir", &lab.control, Show::Http);
    let route = &json[0]["routes"][0];
    let blue = lab.requests_seen("rs1").lines().count() as u64;
    let green = lab.requests_seen("rs2").lines().count() as u64;
    assert_eq!(counter(route, &["requests"]), blue + green, "{json}");
}

/// Issue #20's certificate reload: certificate and key rewritten at the same paths and a
/// reload make new handshakes present the new certificate, while a keep-alive TLS connection
/// opened before goes on and handshakes during the reload all succeed; a broken certificate
/// is refused and the last good one keeps serving.
#[test]
fn a_reload_rotates_the_certificate_during_traffic() {
    let t = e2e!();
    let (cert, key) = openssl_cert(&t, "www.example.com", "DNS:www.example.com");
    let site = format!(
        r#"
[[http]]
name = "www"
listen = "{GATEWAY}:443"
tls = {{ certs = [{{ cert_file = "{cert}", key_file = "{key}" }}] }}

[[http.route]]
name = "default"
pool = "one"

[[http.pool]]
name = "one"
backends = [{{ address = "10.0.0.101:8000" }}]
"#
    );
    let lab = Lab::with_site(t, &site, 443);
    let presented = || {
        lab.t.sh(
            "cl",
            &format!(
                "openssl s_client -connect {GATEWAY}:443 -servername www.example.com </dev/null 2>/dev/null \
                 | openssl x509 -noout -serial -subject"
            ),
        )
    };
    let before = presented();
    assert!(before.contains("www.example.com"), "{before}");
    let load = lab.load(443, true);
    lab.wait_requests("rs1", "GET /load", 20);

    // The same paths, a new certificate (another subject and serial) and key.
    let (new_cert, new_key) = openssl_cert(&lab.t, "rotated.example.com", "DNS:www.example.com");
    std::fs::copy(&new_cert, &cert).expect("rewriting the certificate");
    std::fs::copy(&new_key, &key).expect("rewriting the key");
    let out = lab.reload(&site);
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("http www: applied live"), "{report}");
    let after = presented();
    assert!(after.contains("rotated.example.com"), "{after}");
    assert_ne!(
        after.lines().next(),
        before.lines().next(),
        "serial unchanged"
    );
    let seen = lab.requests_seen("rs1").lines().count();
    lab.wait_requests("rs1", "GET /load", seen + 20);

    // A broken certificate: the reload is refused at the file, the last good one serves.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .expect("breaking the certificate");
    let out = lab.reload(&site);
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains(&cert), "{report}");
    assert_eq!(presented(), after);

    let summary = load.stop();
    for thread in ["keepalive", "new"] {
        let answers = summary[thread]["answers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(answers.len() >= 10, "{summary}");
        assert!(answers.iter().all(|a| a == "rs1"), "{thread}: {summary}");
    }
    assert_eq!(summary["keepalive"]["connections"], 1, "{summary}");
    assert!(
        lab.vipgate.log().contains("1 new certificate(s)"),
        "{}",
        lab.vipgate.log()
    );
}

/// Issue #20's graceful stop: on SIGTERM the listener stops accepting, an idle keep-alive
/// connection is closed at once, a slow request in flight gets its whole answer (with
/// `Connection: close`), and vipgate exits once it is done.
#[test]
fn a_stop_drains_the_requests_in_flight() {
    let mut lab = Lab::with_site(
        e2e!(),
        &blue_green_site("blue", r#"drain_timeout = "20s""#),
        80,
    );
    let idle_py = lab.t.write("idle.py", IDLE_PY);
    let idle_out = lab.t.dir().join("idle.out");
    let _idle = lab.t.spawn(
        "cl",
        "idle",
        &[
            "python3",
            idle_py.to_str().unwrap_or(""),
            GATEWAY,
            "80",
            idle_out.to_str().unwrap_or(""),
        ],
    );
    let idle = || std::fs::read_to_string(&idle_out).unwrap_or_default();
    wait_until(Duration::from_secs(30), "the idle client's answer", || {
        idle().contains("answered")
    });
    let mut slow = lab.slow_post(4, 2_000_000);

    lab.vipgate.signal(15);
    wait_until(
        Duration::from_secs(10),
        "the idle connection closed",
        || idle().contains("closed"),
    );
    assert!(
        slow.curl.is_running(),
        "the slow request ended before the idle connection closed"
    );
    // No new connection while it drains.
    let refused = lab.t.try_sh(
        "cl",
        &format!("curl -sS --max-time 5 http://{GATEWAY}/new 2>&1"),
    );
    assert!(refused.is_err(), "{refused:?}");
    assert!(
        slow.curl.is_running(),
        "the slow request ended before the listener was checked"
    );

    slow.finished(4);
    let head = slow.head();
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(lab.vipgate.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(
        lab.vipgate.log().contains("draining for at most 20s"),
        "{}",
        lab.vipgate.log()
    );
}

/// A listener `www` on the gateway's port 80 whose one route sends everything to pool `web`,
/// which has the TOML line `option` (none when empty) and the servers at `backends`.
fn one_pool_site(option: &str, backends: &[&str]) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ address = \"{b}\" }}"))
        .collect();
    format!(
        r#"
[[http]]
name = "www"
listen = "{GATEWAY}:80"

[[http.route]]
name = "default"
pool = "web"

[[http.pool]]
name = "web"
{option}
backends = [{}]
"#,
        backends.join(", ")
    )
}

/// Issue #20's rolling update: `vipgate http drain --wait` takes a backend out of its pool and
/// returns only once the request it was answering has finished, while new requests go to the
/// other backend.
#[test]
fn a_rolling_update_drains_one_backend_and_waits_for_its_requests() {
    let site = one_pool_site("", &["10.0.0.101:8000", "10.0.0.102:8000"]);
    let lab = Lab::with_site(e2e!(), &site, 80);
    let mut slow = lab.slow_post(3, 100_000);
    let (drained, other) = match slow.backend {
        "rs1" => ("10.0.0.101:8000", "rs2"),
        _ => ("10.0.0.102:8000", "rs1"),
    };
    let mut drain = lab.t.vipgate(
        "dir",
        "drain",
        &[
            "http",
            "drain",
            "www",
            "web",
            drained,
            "--wait",
            "--timeout",
            "30s",
            "--control",
            &lab.control,
        ],
    );
    wait_until(
        Duration::from_secs(10),
        "the drain to start waiting",
        || drain.log().contains("1 requests in flight"),
    );
    for i in 0..6 {
        let body = lab.curl(&format!("http://{GATEWAY}/after{i}"));
        assert!(body.starts_with(&format!("{other} /after{i} ")), "{body}");
    }
    assert!(
        drain.is_running(),
        "drained before its request finished: {}",
        drain.log()
    );
    slow.finished(3);
    assert_eq!(
        drain.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        drain.log()
    );
    assert!(drain.log().contains("drained"), "{}", drain.log());
    // Ready again, it takes requests again.
    let out = lab.t.vipgate_output(
        "dir",
        &[
            "http",
            "set",
            "state",
            "www",
            "web",
            drained,
            "ready",
            "--control",
            &lab.control,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let answers: Vec<String> = (0..4)
        .map(|i| lab.curl(&format!("http://{GATEWAY}/back{i}")))
        .collect();
    assert!(
        answers
            .iter()
            .any(|a| a.starts_with(&format!("{} ", slow.backend))),
        "{answers:?}"
    );
}

/// A backend answering 500 to every request but `GET /health` (200): what a health check of
/// `/health` cannot see and passive ejection catches.
const FAILING_PY: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
addr, port = sys.argv[1], int(sys.argv[2])
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status, text = (200, b"ok\n") if self.path == "/health" else (500, b"failing\n")
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)
    def log_message(self, *args):
        pass
ThreadingHTTPServer((addr, port), Handler).serve_forever()
"#;

/// The JSON of backend `addr` of pool 0 of listener 0 in a `show http --json` answer.
fn http_backend(json: &serde_json::Value, addr: &str) -> serde_json::Value {
    json[0]["pools"][0]["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["addr"] == addr))
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_killed_backend_is_checked_out_and_back() {
    let site = one_pool_site(
        r#"health = { kind = "http", path = "/", interval = "500ms", timeout = "400ms", rise = 2, fall = 2 }"#,
        &["10.0.0.101:8000", "10.0.0.102:8000"],
    );
    let mut lab = Lab::with_site(e2e!(), &site, 80);
    let rs1 = "10.0.0.101:8000";
    let show = |lab: &Lab| lab.t.show("dir", &lab.control, Show::Http);
    wait_until(Duration::from_secs(10), "both backends checked up", || {
        let json = show(&lab);
        ["10.0.0.101:8000", "10.0.0.102:8000"]
            .iter()
            .all(|a| http_backend(&json, a)["health"] == "up")
    });
    lab.backends[0].kill9();
    let killed = std::time::Instant::now();
    wait_until(Duration::from_secs(10), "rs1 checked down", || {
        http_backend(&show(&lab), rs1)["health"] == "down"
    });
    // interval × fall, plus one interval for the probe under way when it died and the
    // time `show` takes.
    let took = killed.elapsed();
    assert!(took <= Duration::from_millis(2500), "down after {took:?}");
    let b = http_backend(&show(&lab), rs1);
    assert_eq!(b["state"], "down", "{b}");
    assert_eq!(b["reason"], "connection refused", "{b}");
    assert!(b["checks_failed"].as_u64().unwrap_or(0) >= 2, "{b}");
    let text = lab
        .t
        .vipgate_output("dir", &["show", "http", "--control", &lab.control]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("down: connection refused; checks: "),
        "{text}"
    );
    // Every request goes to rs2 while rs1 is out.
    for i in 0..10 {
        let body = lab.curl(&format!("http://{GATEWAY}/out{i}"));
        assert!(body.starts_with(&format!("rs2 /out{i} ")), "{body}");
    }
    // Back: after `rise` passing checks, and both serve again.
    let log = lab.t.dir().join("rs1-requests.log");
    let backend = lab.t.dir().join("backend.py");
    lab.backends[0] = lab.t.spawn(
        "rs1",
        "rs1-again",
        &[
            "python3",
            backend.to_str().unwrap_or(""),
            "rs1",
            "10.0.0.101",
            "8000",
            log.to_str().unwrap_or(""),
        ],
    );
    lab.t
        .wait_tcp("rs1", "10.0.0.101", 8000, Duration::from_secs(30));
    wait_until(Duration::from_secs(10), "rs1 checked up again", || {
        http_backend(&show(&lab), rs1)["health"] == "up"
    });
    let answers: Vec<String> = (0..6)
        .map(|i| lab.curl(&format!("http://{GATEWAY}/back{i}")))
        .collect();
    for who in ["rs1", "rs2"] {
        assert!(
            answers
                .iter()
                .any(|a| a.starts_with(&format!("{who} /back"))),
            "{answers:?}"
        );
    }
}

#[test]
fn a_backend_answering_500_is_ejected() {
    let site = one_pool_site(
        r#"eject = { consecutive_errors = 3, duration = "3s" }"#,
        &["10.0.0.101:8000", "10.0.0.102:8001"],
    );
    let mut lab = Lab::with_site(e2e!(), &site, 80);
    let failing = lab.t.write("failing.py", FAILING_PY);
    let failing = lab.t.spawn(
        "rs2",
        "failing",
        &[
            "python3",
            failing.to_str().unwrap_or(""),
            "10.0.0.102",
            "8001",
        ],
    );
    lab.backends.push(failing);
    lab.t
        .wait_tcp("rs2", "10.0.0.102", 8001, Duration::from_secs(30));
    let bad = "10.0.0.102:8001";
    let show = |lab: &Lab| lab.t.show("dir", &lab.control, Show::Http);
    let status = |lab: &Lab, path: &str| {
        lab.curl(&format!(
            "-o /dev/null -w %{{http_code}} http://{GATEWAY}{path}"
        ))
    };
    // Round robin: the failing backend gets every other request until its third 500.
    let first: Vec<String> = (0..6).map(|i| status(&lab, &format!("/a{i}"))).collect();
    assert_eq!(first.iter().filter(|s| *s == "500").count(), 3, "{first:?}");
    let b = http_backend(&show(&lab), bad);
    assert_eq!(
        (&b["health"], &b["state"], &b["ejections"]),
        (&"ejected".into(), &"ejected".into(), &1.into()),
        "{b}"
    );
    assert!(
        b["reason"]
            .as_str()
            .is_some_and(|r| r.contains("3 errors in a row, the last HTTP status 500")),
        "{b}"
    );
    let ejected = std::time::Instant::now();
    // Meanwhile every request succeeds on rs1.
    for i in 0..10 {
        let body = lab.curl(&format!("http://{GATEWAY}/b{i}"));
        assert!(body.starts_with(&format!("rs1 /b{i} ")), "{body}");
    }
    // It returns after the duration, and is tried again.
    wait_until(Duration::from_secs(10), "the ejection to end", || {
        http_backend(&show(&lab), bad)["health"] == "up"
    });
    assert!(
        ejected.elapsed() >= Duration::from_millis(2500),
        "back after {:?}",
        ejected.elapsed()
    );
    let again: Vec<String> = (0..6).map(|i| status(&lab, &format!("/c{i}"))).collect();
    assert!(again.iter().any(|s| s == "500"), "{again:?}");
    wait_until(Duration::from_secs(5), "a second ejection", || {
        http_backend(&show(&lab), bad)["ejections"] == 2
    });
    let json = show(&lab);
    assert_eq!(
        counter(&json[0], &["pools", "0", "backends", "0", "ejections"]),
        0,
        "{json}"
    );
}

/// The HTTP status of `n` GETs of `/NAME0` .. from the client, one curl each.
fn statuses(lab: &Lab, name: &str, n: usize) -> Vec<String> {
    lab.t
        .sh(
            "cl",
            &format!(
                "for i in $(seq 1 {n}); do curl -s --max-time 10 -o /dev/null -w '%{{http_code}}\\n' http://{GATEWAY}/{name}$i; done"
            ),
        )
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Retries (HAProxy `retries 3` + `option redispatch`): a backend whose port is closed costs
/// no request, each one it gets is sent to the live backend and counted; with `retries = 0`
/// its share is answered 502 as before.
#[test]
fn requests_to_an_unreachable_backend_are_retried_on_the_live_one() {
    let dead = "10.0.0.102:8009";
    let site = one_pool_site("", &["10.0.0.101:8000", dead]);
    let lab = Lab::with_site(e2e!(), &site, 80);
    let show = |lab: &Lab| lab.t.show("dir", &lab.control, Show::Http);
    let codes = statuses(&lab, "r", 100);
    assert_eq!(codes.len(), 100, "{codes:?}");
    assert!(codes.iter().all(|c| c == "200"), "{codes:?}");
    let served = lab
        .requests_seen("rs1")
        .lines()
        .filter(|l| l.starts_with("GET /r"))
        .count();
    assert_eq!(served, 100);
    let json = show(&lab);
    let retries = counter(&json[0], &["pools", "0", "retries"]);
    let b = http_backend(&json, dead);
    // Round robin: the retry's pick moves the rotation on, so every request after the first
    // starts at the closed port again (HAProxy's `balance roundrobin` with `option
    // redispatch` does the same); none of them fails.
    assert!((99..=100).contains(&retries), "{json}");
    assert_eq!(b["retried"], retries, "{b}");
    assert_eq!(b["failures"], retries, "{b}");
    assert_eq!(b["responses"]["server_error"], 0, "{b}");
    assert_eq!(
        counter(&json[0], &["pools", "0", "responses", "success"]),
        100,
        "{json}"
    );
    let text = lab
        .t
        .vipgate_output("dir", &["show", "http", "--control", &lab.control]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains(&format!("{retries} retries")), "{text}");

    // Off: the closed port's share fails as it did before retries.
    let off = lab.reload(&one_pool_site("retries = 0", &["10.0.0.101:8000", dead]));
    assert!(off.status.success(), "{off:?}");
    let codes = statuses(&lab, "s", 100);
    let failed = codes.iter().filter(|c| *c == "502").count();
    assert!((45..=55).contains(&failed), "{codes:?}");
    assert_eq!(
        codes.iter().filter(|c| *c == "200").count() + failed,
        100,
        "{codes:?}"
    );
    let json = show(&lab);
    assert_eq!(
        counter(&json[0], &["pools", "0", "retries"]),
        retries,
        "{json}"
    );
    let b = http_backend(&json, dead);
    assert_eq!(b["failures"], retries + failed as u64, "{b}");
    assert_eq!(b["responses"]["server_error"], failed as u64, "{b}");
}

/// A sticky client whose backend died is redispatched by the retry: its request is answered by
/// the live backend, the answer sets the cookie naming it, and it stays there.
#[test]
fn a_sticky_client_of_a_dead_backend_gets_a_new_one() {
    let site = one_pool_site(
        r#"cookie = { name = "SRV" }"#,
        &["10.0.0.101:8000", "10.0.0.102:8000"],
    );
    let mut lab = Lab::with_site(e2e!(), &site, 80);
    let jar = lab.t.dir().join("jar.txt").display().to_string();
    let url = format!("http://{GATEWAY}/");
    // A cookie naming rs2 (round robin: one of two fresh clients lands there).
    let on_rs2 = (0..4).any(|_| lab.curl(&format!("-c {jar} {url}")).starts_with("rs2 "));
    assert!(on_rs2);
    let before = std::fs::read_to_string(&jar).unwrap_or_default();
    lab.backends[1].kill9();
    let head = lab.curl(&format!("-D - -b {jar} -c {jar} {url}"));
    assert!(head.contains("\nrs1 / "), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("set-cookie: srv="),
        "{head}"
    );
    let after = std::fs::read_to_string(&jar).unwrap_or_default();
    assert_ne!(before, after);
    let json = lab.t.show("dir", &lab.control, Show::Http);
    let retries = counter(&json[0], &["pools", "0", "retries"]);
    assert!(retries >= 1, "{json}");
    for _ in 0..10 {
        let body = lab.curl(&format!("-b {jar} -c {jar} {url}"));
        assert!(body.starts_with("rs1 / "), "{body}");
    }
    let json = lab.t.show("dir", &lab.control, Show::Http);
    assert_eq!(
        counter(&json[0], &["pools", "0", "retries"]),
        retries,
        "{json}"
    );
    assert_eq!(
        counter(&json[0], &["pools", "0", "responses", "success"]),
        counter(&json[0], &["pools", "0", "requests"]),
        "{json}"
    );
}

/// HAProxy's `cookie JSESSIONID prefix`: the application's session cookie carries the
/// backend's id on the client's side only. 100 requests with the jar stay on the backend that
/// started the session, which always sees its own unprefixed value; when it dies, its clients
/// are redispatched (the prefix still removed).
#[test]
fn a_prefix_cookie_keeps_a_session_on_its_backend_unseen_by_it() {
    let site = one_pool_site(
        r#"cookie = { name = "JSESSIONID", mode = "prefix" }"#,
        &["10.0.0.101:8000", "10.0.0.102:8000"],
    );
    let mut lab = Lab::with_site(e2e!(), &site, 80);
    let jar = lab.t.dir().join("jar.txt").display().to_string();
    let url = format!("http://{GATEWAY}/");
    let head = lab.curl(&format!("-D - -c {jar} {url}login"));
    let started = head
        .lines()
        .last()
        .and_then(|body| body.split_whitespace().next())
        .unwrap_or("-")
        .to_owned();
    assert!(started == "rs1" || started == "rs2", "{head}");
    // The client gets ID~VALUE: the application's value behind an opaque id, no address.
    let set = head
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: jsessionid=")
        })
        .unwrap_or_else(|| panic!("no JSESSIONID set: {head}"));
    let value = set["set-cookie: jsessionid=".len()..]
        .split(';')
        .next()
        .unwrap_or("");
    let (id, own) = value.split_once('~').unwrap_or_else(|| panic!("{set}"));
    assert_eq!(id.len(), 16, "{set}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{set}");
    assert_eq!(own, format!("{started}-session"), "{set}");
    assert!(set.contains("; Path=/; HttpOnly"), "{set}");
    assert!(!head.contains("10.0.0."), "{head}");
    let expected = format!(" cookie=JSESSIONID={started}-session ");
    for i in 0..100 {
        let body = lab.curl(&format!("-b {jar} {url}"));
        assert!(
            body.starts_with(&format!("{started} / ")) && body.contains(&expected),
            "request {i}: {body}"
        );
    }
    // Without the cookie: round robin spreads them.
    let without: Vec<String> = (0..6)
        .map(|_| lab.curl(&url))
        .map(|body| body.split_whitespace().next().unwrap_or("-").to_owned())
        .collect();
    assert!(without.iter().any(|b| b == "rs1"), "{without:?}");
    assert!(without.iter().any(|b| b == "rs2"), "{without:?}");
    // Its backend dies: redispatched to the other one, which gets the unprefixed value.
    let (dead, other) = if started == "rs1" {
        (0, "rs2")
    } else {
        (1, "rs1")
    };
    lab.backends[dead].kill9();
    for _ in 0..5 {
        let body = lab.curl(&format!("-b {jar} {url}"));
        assert!(
            body.starts_with(&format!("{other} / ")) && body.contains(&expected),
            "{body}"
        );
    }
    let json = lab.t.show("dir", &lab.control, Show::Http);
    assert_eq!(
        counter(&json[0], &["pools", "0", "responses", "success"]),
        counter(&json[0], &["pools", "0", "requests"]),
        "{json}"
    );
}

/// A CA (`CA.pem`, made once per name) and a certificate it signs for `name` with the
/// subjectAltName `san`: (CA file, cert file, key file), by openssl in the test directory.
fn openssl_ca_signed(t: &Topology, ca: &str, name: &str, san: &str) -> (String, String, String) {
    let dir = t.dir().display().to_string();
    let (ca_cert, ca_key) = (format!("{dir}/{ca}.pem"), format!("{dir}/{ca}.key"));
    let (cert, key) = (format!("{dir}/{name}.pem"), format!("{dir}/{name}.key"));
    let made = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -e; [ -e {ca_cert} ] || openssl req -x509 -newkey ec \
             -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN={ca} -keyout {ca_key} \
             -out {ca_cert} 2>&1; \
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN={name} \
             -keyout {key} -out {dir}/{name}.csr 2>&1; \
             printf 'subjectAltName={san}\\n' > {dir}/{name}.ext; \
             openssl x509 -req -in {dir}/{name}.csr -CA {ca_cert} -CAkey {ca_key} \
             -CAcreateserial -days 2 -extfile {dir}/{name}.ext -out {cert} 2>&1; chmod 600 {key}"
        ))
        .output()
        .expect("running openssl");
    assert!(made.status.success(), "openssl: {made:?}");
    (ca_cert, cert, key)
}

/// Re-encryption: pools with `tls` talk HTTPS to backends serving their CA's certificates
/// (verified by SNI name, or by the backend's address without one); a backend whose
/// certificate does not chain to the pool's CA is never sent the request: 502, counted as
/// its failure; `verify = false` reaches it and is warned about by `vipgate check`.
#[test]
fn pools_with_tls_talk_https_to_their_backends_and_verify_them() {
    let t = e2e!();
    let (ca, rs1_cert, rs1_key) = openssl_ca_signed(&t, "backend-ca", "rs1", "DNS:app.internal");
    let (_, rs2_cert, rs2_key) =
        openssl_ca_signed(&t, "backend-ca", "rs2", "DNS:app.internal,IP:10.0.0.102");
    let (other_ca, _, _) = openssl_ca_signed(&t, "other-ca", "unused", "DNS:unused");
    let site = format!(
        r#"
[[http]]
name = "www"
listen = "{GATEWAY}:80"

[[http.route]]
name = "bad"
path = ["/bad"]
pool = "bad"

[[http.route]]
name = "insecure"
path = ["/insecure"]
pool = "insecure"

[[http.route]]
name = "byaddr"
path = ["/byaddr"]
pool = "byaddr"

[[http.route]]
name = "default"
pool = "app"

[[http.pool]]
name = "app"
tls = {{ sni = "app.internal", ca_file = "{ca}" }}
backends = [{{ address = "10.0.0.101:8443" }}, {{ address = "10.0.0.102:8443" }}]

[[http.pool]]
name = "byaddr"
tls = {{ ca_file = "{ca}" }}
backends = [{{ address = "10.0.0.102:8443" }}]

[[http.pool]]
name = "bad"
retries = 0
tls = {{ sni = "app.internal", ca_file = "{other_ca}" }}
backends = [{{ address = "10.0.0.101:8443" }}]

[[http.pool]]
name = "insecure"
tls = {{ verify = false }}
backends = [{{ address = "10.0.0.101:8443" }}]
"#
    );
    let lab = Lab::with_site(t, &site, 80);
    let backend = lab.t.dir().join("backend.py").display().to_string();
    let mut tls_backends = Vec::new();
    for (rs, addr, cert, key) in [
        ("rs1", "10.0.0.101", &rs1_cert, &rs1_key),
        ("rs2", "10.0.0.102", &rs2_cert, &rs2_key),
    ] {
        let log = lab
            .t
            .dir()
            .join(format!("{rs}-tls.log"))
            .display()
            .to_string();
        tls_backends.push(lab.t.spawn(
            rs,
            &format!("{rs}-tls"),
            &["python3", &backend, rs, addr, "8443", &log, cert, key],
        ));
        lab.t.wait_tcp(rs, addr, 8443, Duration::from_secs(30));
    }
    // Verified by name, both backends, their answers over the pooled HTTPS connections.
    let names: Vec<String> = (0..10)
        .map(|_| lab.curl(&format!("http://{GATEWAY}/hello")))
        .map(|body| {
            assert!(body.contains(" /hello "), "{body}");
            body.split_whitespace().next().unwrap_or("-").to_owned()
        })
        .collect();
    assert!(names.iter().any(|n| n == "rs1"), "{names:?}");
    assert!(names.iter().any(|n| n == "rs2"), "{names:?}");
    // Verified by address (no SNI): rs2's certificate lists 10.0.0.102.
    let body = lab.curl(&format!("http://{GATEWAY}/byaddr"));
    assert!(body.starts_with("rs2 /byaddr "), "{body}");
    // Not verified: reached anyway.
    let body = lab.curl(&format!("http://{GATEWAY}/insecure"));
    assert!(body.starts_with("rs1 /insecure "), "{body}");
    // Another CA's certificate: 502, the request never sent, counted as the backend's failure.
    let seen_before = std::fs::read_to_string(lab.t.dir().join("rs1-tls.log")).unwrap_or_default();
    for _ in 0..3 {
        let status = lab.curl(&format!(
            "-o /dev/null -w %{{http_code}} http://{GATEWAY}/bad"
        ));
        assert_eq!(status, "502");
    }
    let seen_after = std::fs::read_to_string(lab.t.dir().join("rs1-tls.log")).unwrap_or_default();
    assert!(!seen_after[seen_before.len().min(seen_after.len())..].contains("/bad"));
    let json = lab.t.show("dir", &lab.control, Show::Http);
    let pools = json[0]["pools"].as_array().expect("pools");
    let bad = pools.iter().find(|p| p["name"] == "bad").expect("pool bad");
    assert_eq!(bad["backends"][0]["failures"], 3, "{bad}");
    assert_eq!(bad["responses"]["server_error"], 3, "{bad}");
    let app = pools.iter().find(|p| p["name"] == "app").expect("pool app");
    assert_eq!(app["responses"]["success"], 10, "{app}");
    // `vipgate check` accepts the file and warns about verify = false at its place.
    let checked = lab.t.vipgate_output(
        "dir",
        &[
            "check",
            "-c",
            lab.t.dir().join("director.toml").to_str().unwrap_or(""),
        ],
    );
    let stderr = String::from_utf8_lossy(&checked.stderr).into_owned()
        + &String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: pool `insecure`: verify = false"),
        "{stderr}"
    );
    drop(tls_backends);
}

/// nginx on rs1:8080 taking the PROXY protocol: answers with the addresses the header named,
/// nginx's connection number and the `Via` it got.
fn nginx_proxy_protocol_backend(t: &Topology) -> Proc {
    let dir = t.dir().display();
    let conf = t.write(
        "nginx-pp.conf",
        &format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {dir}/nginx-pp.pid;\n\
             error_log {dir}/nginx-pp-error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  \
             server {{\n    listen 10.0.0.101:8080 proxy_protocol;\n    location / {{\n      \
             return 200 \"pp=$proxy_protocol_addr:$proxy_protocol_port \
             dst=$proxy_protocol_server_addr:$proxy_protocol_server_port conn=$connection \
             via=$http_via\\n\";\n    }}\n  }}\n}}\n"
        ),
    );
    let nginx = t.spawn(
        "rs1",
        "nginx-pp",
        &["nginx", "-c", conf.to_str().unwrap_or("")],
    );
    t.wait_tcp("rs1", "10.0.0.101", 8080, Duration::from_secs(30));
    nginx
}

/// A pool with `proxy_protocol = "v2"`: nginx (`listen ... proxy_protocol`) sees each client's
/// own address and port and the VIP it connected to; a client connection's requests share one
/// backend connection that no other client gets, and it closes with the client's. `via` is
/// added both ways.
#[test]
fn proxy_protocol_v2_names_each_client_to_nginx() {
    let lab = Lab::with_site(
        e2e!(),
        &format!(
            r#"
[[http]]
name = "www"
listen = "{GATEWAY}:80"
via = "gw1"

[[http.route]]
name = "pp"
pool = "pp"

[[http.pool]]
name = "pp"
proxy_protocol = "v2"
backends = [{{ address = "10.0.0.101:8080" }}]
"#
        ),
        80,
    );
    let _nginx = nginx_proxy_protocol_backend(&lab.t);
    // Two requests on one client connection (curl reuses it), with the answer's head.
    let both = lab.curl(&format!("-D - http://{GATEWAY}/a http://{GATEWAY}/b"));
    let lines: Vec<&str> = both.lines().filter(|l| l.starts_with("pp=")).collect();
    assert_eq!(lines.len(), 2, "{both}");
    let field = |line: &str, key: &str| {
        line.split(' ')
            .find_map(|f| f.strip_prefix(key))
            .unwrap_or_default()
            .to_owned()
    };
    let source = field(lines[0], "pp=");
    assert!(source.starts_with("198.51.100.200:"), "{both}");
    assert_eq!(field(lines[0], "dst="), "198.51.100.11:80", "{both}");
    assert!(lines[0].ends_with("via=1.1 gw1"), "{both}");
    assert_eq!(
        field(lines[1], "pp="),
        source,
        "one client connection: {both}"
    );
    assert_eq!(
        field(lines[0], "conn="),
        field(lines[1], "conn="),
        "one backend connection for the client connection's requests: {both}"
    );
    let vias = both
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("via:"))
        .count();
    assert_eq!(vias, 2, "a Via on each answer: {both}");
    // Another client connection: its own address in its own backend connection.
    let other = lab.curl(&format!("http://{GATEWAY}/c"));
    assert!(
        field(&other, "pp=").starts_with("198.51.100.200:"),
        "{other}"
    );
    assert_ne!(field(&other, "pp="), source, "{other}");
    assert_ne!(field(&other, "conn="), field(lines[0], "conn="), "{other}");
    // The clients are gone: so are their backend connections.
    wait_until(
        Duration::from_secs(10),
        "no backend connection left",
        || {
            lab.t
                .sh("rs1", "ss -Htn state established '( sport = :8080 )'")
                .trim()
                .is_empty()
        },
    );
}

fn canary_site(canary: &str) -> String {
    format!(
        r#"
[[http]]
name = "www"
listen = "{GATEWAY}:80"

[[http.route]]
name = "default"
pool = "stable"
canary = {{ pool = "next", {canary} }}

{pools}
"#,
        pools = two_pools("stable", "next")
    )
}

/// The canary recipe: 10 % of a route's requests to a new pool (exactly 10 of every 100 by
/// request), then by client address (each client keeps its side), then 100 % and 0 % by
/// reload, every answer a 200.
#[test]
fn a_canary_sends_its_share_of_a_route_to_the_new_pool() {
    let lab = Lab::with_site(e2e!(), &canary_site("percent = 10, by = \"request\""), 80);
    let answers = |client: &str, n: usize| -> Vec<String> {
        let out = lab.curl(&format!(
            "--interface {client} -w '%{{http_code}}\\n' 'http://{GATEWAY}/c[1-{n}]'"
        ));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2 * n, "{out}");
        assert!(
            lines.iter().skip(1).step_by(2).all(|c| *c == "200"),
            "{out}"
        );
        lines
            .iter()
            .step_by(2)
            .map(|l| l.split(' ').next().unwrap_or("").to_owned())
            .collect()
    };
    let got = answers("198.51.100.200", 100);
    assert_eq!(got.iter().filter(|b| *b == "rs2").count(), 10, "{got:?}");
    assert_eq!(got.iter().filter(|b| *b == "rs1").count(), 90, "{got:?}");
    let show = lab.t.show("dir", &lab.control, Show::Http);
    assert_eq!(
        counter(&show[0], &["routes", "0", "canary_requests"]),
        10,
        "{show}"
    );
    assert_eq!(
        counter(&show[0], &["routes", "0", "requests"]),
        100,
        "{show}"
    );

    // By client address: 20 clients, each asking three times, each always on one side.
    for i in 150..170 {
        lab.t
            .ip("cl", &format!("addr add 198.51.100.{i}/24 dev eth0"));
    }
    let out = lab.reload(&canary_site("percent = 50"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut sides = Vec::new();
    for i in 150..170 {
        let got = answers(&format!("198.51.100.{i}"), 3);
        assert!(
            got.iter().all(|b| *b == got[0]),
            "198.51.100.{i} switched sides: {got:?}"
        );
        sides.push(got[0].clone());
    }
    assert!(
        sides.iter().any(|s| s == "rs1") && sides.iter().any(|s| s == "rs2"),
        "{sides:?}"
    );

    // The rollout's end and its rollback, each one reload.
    for (percent, all) in [("100", "rs2"), ("0", "rs1")] {
        let out = lab.reload(&canary_site(&format!("percent = {percent}")));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = answers("198.51.100.155", 20);
        assert!(got.iter().all(|b| b == all), "{percent} %: {got:?}");
    }
}
