//! SSH forwarding against the real OpenSSH: vipgate's client against Debian's sshd, and
//! OpenSSH's ssh against `vipgate sshd`. Every daemon runs inside the test's own namespace on
//! loopback, with configs and keys in the test's directory (never the system's sshd or
//! /root/.ssh).

use std::path::PathBuf;
use std::time::{Duration, Instant};
use vipgate_tests::{Proc, Topology, wait_for, wait_until};

const H: &str = "h";
const SSHD_PORT: u16 = 2222;
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7007;

/// Echoes each connection; after the client's EOF it sends "bye" and closes (half-close check).
const ECHO_SERVER: &str = r#"
import socketserver, sys
class H(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(65536)
            if not d:
                break
            self.request.sendall(d)
        self.request.sendall(b"bye")
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024
S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

/// N sequential then M concurrent connections: random payload, write, shut down the write
/// side, expect payload + "bye" back byte for byte.
const ECHO_CLIENT: &str = r#"
import os, socket, sys, threading
host, port, n_seq, n_conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def one(i):
    data = os.urandom(100 + (i * 7919) % 20000)
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    buf = bytearray()
    while True:
        c = s.recv(65536)
        if not c:
            break
        buf += c
    s.close()
    if bytes(buf) != data + b"bye":
        raise Exception("connection %d: sent %d bytes, got %d back" % (i, len(data), len(buf)))
for i in range(n_seq):
    one(i)
errors = []
def worker(i):
    try:
        one(i)
    except BaseException as e:
        errors.append(repr(e))
threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_conc)]
for t in threads: t.start()
for t in threads: t.join()
if errors:
    print("%d failures, first: %s" % (len(errors), errors[0]))
    sys.exit(1)
print("ok %d" % (n_seq + n_conc))
"#;

/// Waits until 127.0.0.1:`port` accepts inside the test's host (bash: dash has no /dev/tcp).
fn wait_port(topo: &Topology, port: u16, timeout: Duration) {
    wait_until(timeout, &format!("127.0.0.1:{port} to accept"), || {
        topo.try_sh(H, &format!("bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}'"))
            .is_ok()
    });
}

/// python3's http.server on 127.0.0.1:`port` answering GET / with `body`.
fn http_server(topo: &Topology, port: u16, body: &str) -> Proc {
    let www = topo.dir().join(format!("www-{port}"));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), format!("{body}\n")).unwrap();
    let p = topo.spawn(
        H,
        &format!("http-{port}"),
        &[
            "python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            www.to_str().unwrap(),
            &port.to_string(),
        ],
    );
    wait_port(topo, port, Duration::from_secs(10));
    p
}

struct Keys {
    client: PathBuf,
    client_pub: String,
}

fn keygen(topo: &Topology, name: &str, kind: &str) -> PathBuf {
    let path = topo.dir().join(name);
    topo.sh(
        H,
        &format!(
            "ssh-keygen -q -t {kind} -N '' -C {name} -f {}",
            path.display()
        ),
    );
    path
}

fn client_keys(topo: &Topology) -> Keys {
    let client = keygen(topo, "id_ed25519", "ed25519");
    let client_pub = std::fs::read_to_string(client.with_extension("pub")).unwrap();
    Keys { client, client_pub }
}

/// Debian's sshd on 127.0.0.1:SSHD_PORT in the test's namespace, with its own host key.
fn openssh_sshd(topo: &Topology, keys: &Keys) -> Proc {
    std::fs::create_dir_all("/run/sshd").unwrap();
    let dir = topo.dir().to_path_buf();
    if !dir.join("ssh_host_ed25519").exists() {
        keygen(topo, "ssh_host_ed25519", "ed25519");
    }
    topo.write("authorized_keys", &keys.client_pub);
    let cfg = topo.write(
        "sshd_config",
        &format!(
            "Port {SSHD_PORT}\nListenAddress 127.0.0.1\nHostKey {d}/ssh_host_ed25519\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
             AllowTcpForwarding yes\nMaxStartups 1000\nLogLevel VERBOSE\n",
            d = dir.display()
        ),
    );
    let p = topo.spawn(
        H,
        "sshd",
        &["/usr/sbin/sshd", "-D", "-e", "-f", cfg.to_str().unwrap()],
    );
    wait_port(topo, SSHD_PORT, Duration::from_secs(10));
    p
}

fn setup(test: &str) -> (Topology, Keys) {
    let mut topo = Topology::new(test);
    topo.host(H);
    let keys = client_keys(&topo);
    topo.write("echo_server.py", ECHO_SERVER);
    topo.write("echo_client.py", ECHO_CLIENT);
    (topo, keys)
}

fn echo_server(topo: &Topology) -> Proc {
    let script = topo.dir().join("echo_server.py");
    let p = topo.spawn(
        H,
        "echo",
        &[
            "python3",
            script.to_str().unwrap(),
            "127.0.0.1",
            &ECHO_PORT.to_string(),
        ],
    );
    wait_port(topo, ECHO_PORT, Duration::from_secs(10));
    p
}

fn echo_check(topo: &Topology, port: u16, seq: u32, conc: u32) {
    let script = topo.dir().join("echo_client.py");
    let out = topo.sh(
        H,
        &format!("python3 {} 127.0.0.1 {port} {seq} {conc}", script.display()),
    );
    assert_eq!(out.trim(), format!("ok {}", seq + conc));
}

fn known_hosts(topo: &Topology) -> PathBuf {
    topo.dir().join("known_hosts")
}

/// `vipgate ssh` against OpenSSH's sshd with the common flags.
fn vipgate_ssh(topo: &Topology, name: &str, keys: &Keys, extra: &[&str]) -> Proc {
    let kh = format!("UserKnownHostsFile={}", known_hosts(topo).display());
    let port = SSHD_PORT.to_string();
    let mut args = vec![
        "ssh",
        "-N",
        "-p",
        &port,
        "-i",
        keys.client.to_str().unwrap(),
        "-o",
        &kh,
        "-o",
        "IdentitiesOnly=yes",
    ];
    args.extend_from_slice(extra);
    args.push("root@127.0.0.1");
    topo.vipgate(H, name, &args)
}

fn wait_log(p: &Proc, needle: &str) -> String {
    wait_for(Duration::from_secs(15), needle, || {
        let log = p.log();
        log.contains(needle).then_some(log)
    })
}

fn allocated_port(p: &Proc) -> u16 {
    let log = wait_log(p, "Allocated port ");
    let rest = log.split("Allocated port ").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn client_forwards_through_openssh_sshd() {
    let (topo, keys) = setup("ssh_client");
    let _sshd = openssh_sshd(&topo, &keys);
    let _http = http_server(&topo, HTTP_PORT, "hello from web");
    let _echo = echo_server(&topo);
    let client = vipgate_ssh(
        &topo,
        "vipgate-ssh",
        &keys,
        &[
            "-L",
            "8585:127.0.0.1:8080",
            "-L",
            "8586:127.0.0.1:7007",
            "-R",
            "9000:127.0.0.1:8080",
            "-R",
            "0:127.0.0.1:7007",
            "-D",
            "1080",
        ],
    );
    let r0 = allocated_port(&client);
    wait_port(&topo, 8585, Duration::from_secs(15));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:8585/").unwrap().trim(),
        "hello from web"
    );
    // -R with a fixed port: sshd listens on 9000 and hands connections back to us.
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:9000/").unwrap().trim(),
        "hello from web"
    );
    // -D: curl resolves nothing itself, the name goes through the tunnel.
    let via_socks = topo
        .try_sh(
            H,
            "curl -sS --max-time 5 --socks5-hostname 127.0.0.1:1080 http://localhost:8080/",
        )
        .unwrap();
    assert_eq!(via_socks.trim(), "hello from web");
    // -L to an echo server: 1,000 sequential and 200 concurrent connections, every byte
    // checked, each with a half-close (the client shuts down its write side first).
    echo_check(&topo, 8586, 1000, 200);
    // -R port 0: the printed port works.
    echo_check(&topo, r0, 20, 20);
    assert!(
        known_hosts(&topo).exists(),
        "accept-new recorded the host key"
    );
}

#[test]
fn openssh_client_against_vipgate_sshd() {
    let (topo, keys) = setup("ssh_server");
    let _http = http_server(&topo, HTTP_PORT, "served");
    let _echo = echo_server(&topo);
    topo.write("authorized_keys", &keys.client_pub);
    let d = topo.dir().display().to_string();
    let cfg = topo.write(
        "site.toml",
        &format!(
            "[sshd]\nlisten = \"127.0.0.1:{SSHD_PORT}\"\nhost_key = \"{d}/vg_host_key\"\n\
             authorized_keys = \"{d}/authorized_keys\"\n\
             permit_open = [\"127.0.0.1:8080\", \"127.0.0.1:7007\"]\n"
        ),
    );
    let sshd = topo.vipgate(H, "vipgate-sshd", &["sshd", "-c", cfg.to_str().unwrap()]);
    let log = wait_log(&sshd, "listening on");
    assert!(log.contains("generated host key"), "{log}");
    let pubkey = std::fs::read_to_string(topo.dir().join("vg_host_key.pub")).unwrap();
    topo.write("known_hosts", &format!("[127.0.0.1]:{SSHD_PORT} {pubkey}"));
    let ssh = |extra: &str| {
        format!(
            "ssh -p {SSHD_PORT} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes \
             -o ExitOnForwardFailure=yes {extra} root@127.0.0.1",
            keys.client.display()
        )
    };
    let _fwd = topo.spawn(
        H,
        "openssh-client",
        &["sh", "-c", &ssh("-N -L 18585:127.0.0.1:8080 -L 18586:127.0.0.1:7007 -L 18587:127.0.0.1:22 -R 19000:127.0.0.1:8080")],
    );
    wait_port(&topo, 18585, Duration::from_secs(15));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:18585/").unwrap().trim(),
        "served"
    );
    echo_check(&topo, 18586, 200, 50);
    wait_port(&topo, 19000, Duration::from_secs(15));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:19000/").unwrap().trim(),
        "served"
    );
    // Outside permit_open: OpenSSH's client sees the channel refused, nothing connects.
    assert!(topo.curl(H, "http://127.0.0.1:18587/").is_err());
    wait_log(&sshd, "refused direct-tcpip to \"127.0.0.1\":22");
    // A shell is refused with a message.
    let shell = topo.try_sh(H, &format!("{} < /dev/null", ssh("-T")));
    let text = match &shell {
        Ok(o) | Err(o) => o.clone(),
    };
    assert!(shell.is_err(), "shell must fail: {text}");
    assert!(text.contains("only forwards ports"), "{text}");
    let exec = topo.try_sh(H, &format!("{} 2>&1", ssh("id")));
    assert!(exec.is_err(), "exec must fail");
    // A key that is not in authorized_keys.
    let stranger = keygen(&topo, "id_stranger", "ed25519");
    let denied = topo.try_sh(
        H,
        &format!(
            "ssh -p {SSHD_PORT} -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile={d}/known_hosts -N -L 18600:127.0.0.1:8080 root@127.0.0.1",
            stranger.display()
        ),
    );
    assert!(denied.unwrap_err().contains("Permission denied"));
}

#[test]
fn host_key_policies() {
    let (topo, keys) = setup("ssh_hostkeys");
    let _sshd = openssh_sshd(&topo, &keys);
    let port = SSHD_PORT.to_string();
    let run = |policy: &str| {
        let kh = format!("UserKnownHostsFile={}", known_hosts(&topo).display());
        let strict = format!("StrictHostKeyChecking={policy}");
        // ExitOnForwardFailure with a bogus remote forward makes the command return at once
        // after the host key decision, whatever it was.
        topo.vipgate_output(
            H,
            &[
                "ssh",
                "-N",
                "-p",
                &port,
                "-i",
                keys.client.to_str().unwrap(),
                "-o",
                &kh,
                "-o",
                &strict,
                "-o",
                "IdentitiesOnly=yes",
                "-L",
                "18700:127.0.0.1:8080",
                "-R",
                "127.0.0.1:2222:127.0.0.1:1",
                "root@127.0.0.1",
            ],
        )
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // Unknown host with `yes`: refused, nothing recorded.
    let o = run("yes");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not in"), "{}", stderr(&o));
    assert!(!known_hosts(&topo).exists());
    // accept-new: recorded (the run then fails on the -R port sshd itself holds, which proves
    // authentication went through).
    let o = run("accept-new");
    assert!(
        stderr(&o).contains("remote port forwarding failed"),
        "{}",
        stderr(&o)
    );
    let recorded = std::fs::read_to_string(known_hosts(&topo)).unwrap();
    let host_pub = std::fs::read_to_string(topo.dir().join("ssh_host_ed25519.pub")).unwrap();
    let blob = host_pub.split_whitespace().nth(1).unwrap();
    assert!(
        recorded.contains(&format!("[127.0.0.1]:{SSHD_PORT} ssh-ed25519 {blob}")),
        "{recorded}"
    );
    // Changed key: refused loudly even with accept-new.
    let other = keygen(&topo, "other_host_key", "ed25519");
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    std::fs::write(
        known_hosts(&topo),
        format!("[127.0.0.1]:{SSHD_PORT} {other_pub}"),
    )
    .unwrap();
    let o = run("accept-new");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("known_hosts:1"), "{}", stderr(&o));
}

#[test]
fn reconnects_after_sshd_restart_and_shows_status() {
    let (topo, keys) = setup("ssh_reconnect");
    let mut sshd = openssh_sshd(&topo, &keys);
    let _http = http_server(&topo, HTTP_PORT, "still here");
    let d = topo.dir().display().to_string();
    let cfg = topo.write(
        "site.toml",
        &format!(
            "[daemon]\ncontrol = \"{d}/ctl.sock\"\n\n[[ssh]]\ndestination = \"root@127.0.0.1:{SSHD_PORT}\"\n\
             identity = \"{}\"\nknown_hosts = \"{d}/known_hosts\"\n\
             strict_host_key_checking = \"accept-new\"\nuse_agent = false\n\
             local = [\"8585:127.0.0.1:8080\"]\nserver_alive_interval = \"1s\"\nserver_alive_count_max = 2\n",
            keys.client.display()
        ),
    );
    let _run = topo.vipgate(H, "vipgate-run", &["run", "-c", cfg.to_str().unwrap()]);
    wait_port(&topo, 8585, Duration::from_secs(15));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:8585/").unwrap().trim(),
        "still here"
    );
    // A hard restart: the per-connection children go too, so the client must reconnect.
    let _ = topo.try_sh(H, &format!("pkill -KILL -P {}", sshd.pid()));
    sshd.kill9();
    let _sshd = openssh_sshd(&topo, &keys);
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "the -L forward to work again",
        || {
            topo.curl(H, "http://127.0.0.1:8585/")
                .is_ok_and(|b| b.trim() == "still here")
        },
    );
    eprintln!("forward back {:?} after sshd restart", t0.elapsed());
    let out = topo.vipgate_output(
        H,
        &[
            "show",
            "ssh",
            "--json",
            "--control",
            &format!("{d}/ctl.sock"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The tests crate has no JSON parser: compare the compacted text.
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(compact.contains("\"state\":\"connected\""), "{text}");
    assert!(!compact.contains("\"reconnects\":0"), "{text}");
    assert!(compact.contains("\"bound\":\"127.0.0.1:8585\""), "{text}");
    let human = topo.vipgate_output(H, &["show", "ssh", "--control", &format!("{d}/ctl.sock")]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("127.0.0.1:8585"), "{human}");
}

#[test]
fn bad_input_gives_clear_errors() {
    let (topo, keys) = setup("ssh_badinput");
    let out = |args: &[&str]| {
        let o = topo.vipgate_output(H, args);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(
        out(&["ssh", "-N", "-L", "8585:web", "h"])
            .contains("bad local forwarding specification '8585:web'")
    );
    assert!(
        out(&["ssh", "-N", "-R", "x:web:80", "h"])
            .contains("bad remote forwarding specification 'x:web:80'")
    );
    assert!(
        out(&["ssh", "-N", "-D", "0", "h"]).contains("bad dynamic forwarding specification '0'")
    );
    assert!(
        out(&["ssh", "-N", "-o", "ProxyJump=x", "-L", "1:h:2", "h"])
            .contains("unsupported option 'ProxyJump'")
    );
    // A port already in use is named.
    let _sshd = openssh_sshd(&topo, &keys);
    let _busy = http_server(&topo, 8585, "busy");
    let p = vipgate_ssh(&topo, "busy", &keys, &["-L", "8585:127.0.0.1:80"]);
    let mut p = p;
    p.wait_exit(Duration::from_secs(10));
    assert!(
        p.log().contains(
            "cannot listen on 127.0.0.1:8585 for -L 8585:127.0.0.1:80: Address already in use"
        ),
        "{}",
        p.log()
    );
}

/// Opens one connection to 127.0.0.1:port, sends `total` bytes in 64 KiB chunks spread over
/// about `secs` seconds, shuts down its write side and checks that exactly those bytes plus
/// "bye" come back; prints "ok N" (a transfer that must survive a reload).
const SLOW_CLIENT: &str = r#"
import os, socket, sys, threading, time
port, total, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
data = os.urandom(total)
s = socket.create_connection(("127.0.0.1", port), timeout=60)
got = bytearray()
def reader():
    while True:
        c = s.recv(65536)
        if not c:
            break
        got.extend(c)
t = threading.Thread(target=reader); t.start()
chunk = 65536
pause = secs / max(1, total // chunk)
for i in range(0, total, chunk):
    s.sendall(data[i:i + chunk])
    time.sleep(pause)
s.shutdown(socket.SHUT_WR)
t.join()
if bytes(got) != data + b"bye":
    print("corrupt: sent %d, got %d" % (total, len(got)))
    sys.exit(1)
print("ok %d" % total)
"#;

/// One connection that sends `n` bytes, reads them back, then stays open for a minute.
const HOLD_CLIENT: &str = r#"
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
s.sendall(b"x" * n)
got = 0
while got < n:
    got += len(s.recv(65536))
print("echoed", flush=True)
time.sleep(60)
"#;

/// `vipgate run` with one `[[ssh]]` destination built from `forwards` (TOML lines).
fn ssh_site(topo: &Topology, keys: &Keys, forwards: &str) -> PathBuf {
    let d = topo.dir().display().to_string();
    topo.write(
        "site.toml",
        &format!(
            "[daemon]\ncontrol = \"{d}/ctl.sock\"\n\n[[ssh]]\ndestination = \"root@127.0.0.1:{SSHD_PORT}\"\n\
             identity = \"{}\"\nknown_hosts = \"{d}/known_hosts\"\n\
             strict_host_key_checking = \"accept-new\"\nuse_agent = false\n{forwards}",
            keys.client.display()
        ),
    )
}

/// `show ssh --json`, whitespace removed (the tests crate has no JSON parser).
fn show_ssh_compact(topo: &Topology) -> String {
    let ctl = format!("{}/ctl.sock", topo.dir().display());
    let out = topo.vipgate_output(H, &["show", "ssh", "--json", "--control", &ctl]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// A numeric field of the forward object whose spec is `spec`, or of its `counters`.
fn forward_field(compact: &str, spec: &str, field: &str) -> Option<u64> {
    let parts: Vec<serde_json::Value> = serde_json::from_str(compact).ok()?;
    let forward = parts
        .iter()
        .filter_map(|p| p["forwards"].as_array())
        .flatten()
        .find(|f| f["spec"] == spec)?;
    forward[field]
        .as_u64()
        .or_else(|| forward["counters"][field].as_u64())
}

#[test]
fn remote_unix_sockets_and_live_counters() {
    let (topo, keys) = setup("ssh_unix");
    let _sshd = openssh_sshd(&topo, &keys);
    let _http = http_server(&topo, HTTP_PORT, "hello over unix");
    let _echo = echo_server(&topo);
    let d = topo.dir().display().to_string();
    // A local unix socket in front of the web server (what `-R port:/path` points at).
    let _unix_web = topo.spawn(
        H,
        "socat",
        &[
            "socat",
            &format!("UNIX-LISTEN:{d}/local-web.sock,fork"),
            &format!("TCP:127.0.0.1:{HTTP_PORT}"),
        ],
    );
    wait_until(Duration::from_secs(10), "socat's socket", || {
        topo.dir().join("local-web.sock").exists()
    });
    let cfg = ssh_site(
        &topo,
        &keys,
        &format!(
            "local = [\"8586:127.0.0.1:{ECHO_PORT}\"]\n\
             remote = [\"9100:{d}/local-web.sock\", \"{d}/remote-web.sock:127.0.0.1:{HTTP_PORT}\"]\n"
        ),
    );
    let _run = topo.vipgate(H, "vipgate-run", &["run", "-c", cfg.to_str().unwrap()]);
    // -R port:/local/socket: sshd's port 9100 ends at our unix socket.
    wait_until(
        Duration::from_secs(15),
        "-R 9100 to the unix socket",
        || {
            topo.curl(H, "http://127.0.0.1:9100/")
                .is_ok_and(|b| b.trim() == "hello over unix")
        },
    );
    // -R /remote/socket:host:port (streamlocal-forward@openssh.com): sshd listens on a unix
    // socket and hands connections back to us.
    let via_socket = wait_for(Duration::from_secs(15), "sshd's remote unix socket", || {
        topo.try_sh(
            H,
            &format!("curl -sS --max-time 5 --unix-socket {d}/remote-web.sock http://x/"),
        )
        .ok()
    });
    assert_eq!(via_socket.trim(), "hello over unix");
    let compact = show_ssh_compact(&topo);
    assert!(
        compact.contains(&format!("\"bound\":\"{d}/remote-web.sock\"")),
        "{compact}"
    );

    // Live byte counters: bytes show up while the connection is still open.
    topo.write("hold_client.py", HOLD_CLIENT);
    let hold = topo.spawn(
        H,
        "hold",
        &["python3", &format!("{d}/hold_client.py"), "8586", "300000"],
    );
    wait_until(
        Duration::from_secs(15),
        "the held connection's echo",
        || hold.log().contains("echoed"),
    );
    let spec = format!("8586:127.0.0.1:{ECHO_PORT}");
    let compact = show_ssh_compact(&topo);
    assert_eq!(
        forward_field(&compact, &spec, "active"),
        Some(1),
        "{compact}"
    );
    assert_eq!(
        forward_field(&compact, &spec, "bytes_out"),
        Some(300_000),
        "{compact}"
    );
    assert_eq!(
        forward_field(&compact, &spec, "bytes_in"),
        Some(300_000),
        "{compact}"
    );
}

#[test]
fn reload_changes_forwards_on_the_live_connection() {
    let (topo, keys) = setup("ssh_reload");
    let _sshd = openssh_sshd(&topo, &keys);
    let _http = http_server(&topo, HTTP_PORT, "web");
    let _echo = echo_server(&topo);
    let d = topo.dir().display().to_string();
    let ctl = format!("{d}/ctl.sock");
    let echo = format!("\"8586:127.0.0.1:{ECHO_PORT}\"");
    let cfg = ssh_site(
        &topo,
        &keys,
        &format!(
            "local = [\"8585:127.0.0.1:{HTTP_PORT}\", {echo}]\nserver_alive_interval = \"5s\"\n"
        ),
    );
    let _run = topo.vipgate(H, "vipgate-run", &["run", "-c", cfg.to_str().unwrap()]);
    wait_port(&topo, 8585, Duration::from_secs(15));
    wait_port(&topo, 8586, Duration::from_secs(15));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:8585/").unwrap().trim(),
        "web"
    );

    // A transfer through 8586 that runs across the reload.
    topo.write("slow_client.py", SLOW_CLIENT);
    let mut transfer = topo.spawn(
        H,
        "transfer",
        &[
            "python3",
            &format!("{d}/slow_client.py"),
            "8586",
            "8000000",
            "4",
        ],
    );
    wait_until(Duration::from_secs(10), "the transfer to start", || {
        forward_field(
            &show_ssh_compact(&topo),
            &format!("8586:127.0.0.1:{ECHO_PORT}"),
            "active",
        ) == Some(1)
    });

    // Remove 8585, add 8587, change the keepalive: all on the same SSH connection.
    ssh_site(
        &topo,
        &keys,
        &format!(
            "local = [{echo}, \"8587:127.0.0.1:{HTTP_PORT}\"]\nserver_alive_interval = \"2s\"\n"
        ),
    );
    let out = topo.vipgate_output(H, &["reload", "--control", &ctl]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("applied live"), "{stdout}");
    wait_port(&topo, 8587, Duration::from_secs(10));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:8587/").unwrap().trim(),
        "web"
    );
    wait_until(Duration::from_secs(10), "8585 to close", || {
        topo.try_sh(H, "bash -c 'exec 3<>/dev/tcp/127.0.0.1/8585'")
            .is_err()
    });

    assert_eq!(
        transfer.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        transfer.log()
    );
    assert!(transfer.log().contains("ok 8000000"), "{}", transfer.log());
    let compact = show_ssh_compact(&topo);
    assert!(compact.contains("\"reconnects\":0"), "{compact}");
    assert!(compact.contains("\"state\":\"connected\""), "{compact}");
    assert!(!compact.contains("8585:127.0.0.1"), "{compact}");
}

/// Holds N idle TCP connections to 127.0.0.1:PORT (never sending a byte) from this helper's
/// own process (its RLIMIT_NOFILE raised), prints `held N` (connections established), then
/// `closed K of N` each second (connections the server has closed), with `all` once K = N.
const IDLE_FLOOD: &str = r#"
import resource, select, socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, n + 100))
socks = []
# In batches, so the server's listen backlog (1,024) never overflows: an overflowed
# handshake waits in the kernel for SYN-ACK retransmits, outside anything the server sees.
for i in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    socks.append(s)
    if i % 250 == 249:
        time.sleep(0.1)
# Count only connections the kernel completed (SYNs beyond the listen backlog are retried
# by the kernel for tens of seconds; those are dropped here, not counted as held).
pending, held, deadline = set(socks), [], time.time() + 20
while pending and time.time() < deadline:
    p = select.poll()
    for s in pending:
        p.register(s, select.POLLOUT)
    for fd, ev in p.poll(500):
        s = next(x for x in pending if x.fileno() == fd)
        pending.discard(s)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            held.append(s)
        else:
            s.close()
for s in pending:
    s.close()
n = len(held)
print("held", n, flush=True)
open_ = set(held)
while True:
    p = select.poll()
    for s in open_:
        p.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
    for fd, _ in p.poll(1000):
        s = next(x for x in open_ if x.fileno() == fd)
        try:
            while s.recv(4096):
                pass
            open_.discard(s); s.close()
        except BlockingIOError:
            pass
        except OSError:
            open_.discard(s); s.close()
    print("closed", n - len(open_), "of", n, "all" if not open_ else "", flush=True)
    time.sleep(0.2)
"#;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[test]
fn idle_connection_flood_leaves_sshd_and_daemon_serving() {
    let (topo, keys) = setup("ssh_idleflood");
    let _http = http_server(&topo, HTTP_PORT, "served");
    topo.write("authorized_keys", &keys.client_pub);
    let d = topo.dir().display().to_string();
    let cfg = topo.write(
        "site.toml",
        &format!(
            "[daemon]\ncontrol = \"{d}/ctl.sock\"\n\n[sshd]\nlisten = \"127.0.0.1:{SSHD_PORT}\"\n\
             host_key = \"{d}/vg_host_key\"\nauthorized_keys = \"{d}/authorized_keys\"\n\
             permit_open = [\"127.0.0.1:8080\"]\nlogin_grace_time = \"4s\"\n\
             max_startups = \"20:30:100\"\nper_source_max_startups = 10\n"
        ),
    );
    let run = topo.vipgate(H, "vipgate-run", &["run", "-c", cfg.to_str().unwrap()]);
    wait_port(&topo, SSHD_PORT, Duration::from_secs(15));
    let flood = topo.write("flood.py", IDLE_FLOOD);
    let attacker = topo.spawn(
        H,
        "idle-flood",
        &[
            "python3",
            flood.to_str().unwrap(),
            "5000",
            &SSHD_PORT.to_string(),
        ],
    );
    let log = wait_log(&attacker, "held ");
    let held: usize = log
        .split("held ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(held >= 4000, "only {held} of 5000 connections established");
    // Everything beyond the per-source cap is closed at accept: the daemon stays small.
    let fds = fd_count(run.pid());
    assert!(fds < 200, "daemon holds {fds} descriptors");
    // The control socket still answers.
    let status = topo.vipgate_output(H, &["status", "--control", &format!("{d}/ctl.sock")]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // A new login from another source address, with a forward, carries bytes intact.
    let pubkey = std::fs::read_to_string(topo.dir().join("vg_host_key.pub")).unwrap();
    topo.write("known_hosts", &format!("[127.0.0.1]:{SSHD_PORT} {pubkey}"));
    let _fwd = topo.spawn(
        H,
        "openssh-client",
        &[
            "sh",
            "-c",
            &format!(
                "ssh -p {SSHD_PORT} -b 127.0.0.2 -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
                 -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes \
                 -o ExitOnForwardFailure=yes -N -L 18585:127.0.0.1:8080 root@127.0.0.1",
                keys.client.display()
            ),
        ],
    );
    wait_port(&topo, 18585, Duration::from_secs(15));
    let big = "x".repeat(200_000);
    std::fs::write(topo.dir().join(format!("www-{HTTP_PORT}/big.txt")), &big).unwrap();
    let got = topo.curl(H, "http://127.0.0.1:18585/big.txt").unwrap();
    assert_eq!(got.trim_end().len(), big.len(), "forwarded body differs");
    assert_eq!(got.trim_end(), big);
    // After the grace time every idle connection is closed by the server.
    wait_log(&attacker, &format!("closed {held} of {held} all"));
    let out = topo.vipgate_output(
        H,
        &[
            "show",
            "ssh",
            "--json",
            "--control",
            &format!("{d}/ctl.sock"),
        ],
    );
    let compact: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    assert!(compact.contains("\"login_grace_expired\":10"), "{compact}");
    assert!(!compact.contains("\"refused_per_source\":0,"), "{compact}");
}

#[test]
fn vipgate_sshd_key_options_and_privileged_listen() {
    let (topo, keys) = setup("ssh_keyopts");
    let _http = http_server(&topo, HTTP_PORT, "served");
    let expired = keygen(&topo, "id_expired", "ed25519");
    let ca = keygen(&topo, "id_ca", "ed25519");
    let public = |p: &PathBuf| std::fs::read_to_string(p.with_extension("pub")).unwrap();
    // Dual-stack listen: IPv4 clients appear as ::ffff:127.0.0.x, and `!127.0.0.1` must
    // still exclude 127.0.0.1.
    topo.write(
        "authorized_keys",
        &format!(
            "from=\"127.0.0.0/8,!127.0.0.1\" {}expiry-time=\"20200101\" {}cert-authority {}",
            keys.client_pub,
            public(&expired),
            public(&ca)
        ),
    );
    let d = topo.dir().display().to_string();
    let cfg = topo.write(
        "site.toml",
        &format!(
            "[sshd]\nlisten = \"[::]:{SSHD_PORT}\"\nhost_key = \"{d}/vg_host_key\"\n\
             authorized_keys = \"{d}/authorized_keys\"\npermit_open = [\"127.0.0.1:8080\"]\n"
        ),
    );
    let sshd = topo.vipgate(H, "vipgate-sshd", &["sshd", "-c", cfg.to_str().unwrap()]);
    wait_log(&sshd, "listening on");
    let pubkey = std::fs::read_to_string(topo.dir().join("vg_host_key.pub")).unwrap();
    topo.write("known_hosts", &format!("[127.0.0.1]:{SSHD_PORT} {pubkey}"));
    let ssh = |key: &PathBuf, src: &str, fwd: &str| {
        topo.try_sh(
            H,
            &format!(
                "timeout 15 ssh -p {SSHD_PORT} -b {src} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
                 -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes \
                 -o ExitOnForwardFailure=yes -N {fwd} root@127.0.0.1",
                key.display()
            ),
        )
    };
    for key in [&expired, &ca] {
        let out = ssh(key, "127.0.0.2", "-L 18590:127.0.0.1:8080").unwrap_err();
        assert!(out.contains("Permission denied"), "{out}");
    }
    wait_log(&sshd, "its expiry-time has passed");
    // from= negation with an IPv4-mapped peer.
    let out = ssh(&keys.client, "127.0.0.1", "-L 18591:127.0.0.1:8080").unwrap_err();
    assert!(out.contains("Permission denied"), "{out}");
    wait_log(&sshd, "from= does not allow this address");
    // The same key from 127.0.0.2 logs in; -R on port 80 is refused without an entry naming it.
    let out = ssh(&keys.client, "127.0.0.2", "-R 80:127.0.0.1:8080").unwrap_err();
    assert!(out.contains("remote port forwarding failed"), "{out}");
    wait_log(
        &sshd,
        "a port below 1024 needs a permit_listen entry naming it",
    );
}
