//! SSH forwarding against the real OpenSSH: vipgate's client against Debian's sshd, and
//! OpenSSH's ssh against `vipgate sshd`. Every daemon runs inside the test's own namespace on
//! loopback, with configs and keys in the test's directory (never the system's sshd or
//! /root/.ssh).

use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vipgate_tests::{Proc, Show, Topology, e2e, wait_for, wait_until};

pub(super) const H: &str = "h";
pub(super) const SSHD_PORT: u16 = 2222;
pub(super) const HTTP_PORT: u16 = 8080;
pub(super) const ECHO_PORT: u16 = 7007;

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

pub(super) struct Keys {
    pub(super) client: PathBuf,
    pub(super) client_pub: String,
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

pub(super) fn client_keys(topo: &Topology) -> Keys {
    let client = keygen(topo, "id_ed25519", "ed25519");
    let client_pub = std::fs::read_to_string(client.with_extension("pub")).unwrap();
    Keys { client, client_pub }
}

/// Debian's sshd on 127.0.0.1:SSHD_PORT in the test's namespace, with its own host key.
pub(super) fn openssh_sshd(topo: &Topology, keys: &Keys) -> Proc {
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
    topo.wait_tcp(H, "127.0.0.1", SSHD_PORT, Duration::from_secs(10));
    p
}

pub(super) fn setup(mut topo: Topology) -> (Topology, Keys) {
    topo.host(H);
    let keys = client_keys(&topo);
    topo.write("echo_server.py", ECHO_SERVER);
    topo.write("echo_client.py", ECHO_CLIENT);
    (topo, keys)
}

pub(super) fn echo_server(topo: &Topology) -> Proc {
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
    topo.wait_tcp(H, "127.0.0.1", ECHO_PORT, Duration::from_secs(10));
    p
}

pub(super) fn echo_check(topo: &Topology, port: u16, seq: u32, conc: u32) {
    let script = topo.dir().join("echo_client.py");
    let out = topo.sh(
        H,
        &format!("python3 {} 127.0.0.1 {port} {seq} {conc}", script.display()),
    );
    assert_eq!(out.trim(), format!("ok {}", seq + conc));
}

pub(super) fn known_hosts(topo: &Topology) -> PathBuf {
    topo.dir().join("known_hosts")
}

/// `vipgate ssh` against OpenSSH's sshd with the common flags.
fn vipgate_ssh(topo: &Topology, name: &str, keys: &Keys, extra: &[&str]) -> Proc {
    vipgate_ssh_to(topo, name, keys, extra, "127.0.0.1")
}

/// `vipgate ssh` with the common flags against OpenSSH's sshd at `addr` (port SSHD_PORT).
pub(super) fn vipgate_ssh_to(
    topo: &Topology,
    name: &str,
    keys: &Keys,
    extra: &[&str],
    addr: &str,
) -> Proc {
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
    let destination = format!("root@{addr}");
    args.push(&destination);
    topo.vipgate(H, name, &args)
}

pub(super) fn wait_log(p: &Proc, needle: &str) -> String {
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
    let (topo, keys) = setup(e2e!());
    let _sshd = openssh_sshd(&topo, &keys);
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "hello from web");
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
    topo.wait_tcp(H, "127.0.0.1", 8585, Duration::from_secs(15));
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
    let (topo, keys) = setup(e2e!());
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "served");
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
    topo.wait_tcp(H, "127.0.0.1", 18585, Duration::from_secs(15));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:18585/").unwrap().trim(),
        "served"
    );
    echo_check(&topo, 18586, 200, 50);
    topo.wait_tcp(H, "127.0.0.1", 19000, Duration::from_secs(15));
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
    let (topo, keys) = setup(e2e!());
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
    let (topo, keys) = setup(e2e!());
    let mut sshd = openssh_sshd(&topo, &keys);
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "still here");
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
    topo.wait_tcp(H, "127.0.0.1", 8585, Duration::from_secs(15));
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
    let show = show_ssh(&topo);
    assert!(parts(&show).any(|p| p["state"] == "connected"), "{show}");
    assert!(
        parts(&show).all(|p| p["counters"]["reconnects"] != 0),
        "{show}"
    );
    assert!(
        forwards(&show).any(|f| f["bound"] == "127.0.0.1:8585"),
        "{show}"
    );
    let human = topo.vipgate_output(H, &["show", "ssh", "--control", &format!("{d}/ctl.sock")]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("127.0.0.1:8585"), "{human}");
}

#[test]
fn bad_input_gives_clear_errors() {
    let (topo, keys) = setup(e2e!());
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
        out(&[
            "ssh",
            "-N",
            "-o",
            "ProxyCommand=nc %h %p",
            "-L",
            "1:h:2",
            "h"
        ])
        .contains("option 'ProxyCommand' is not supported")
    );
    // A port already in use is named.
    let _sshd = openssh_sshd(&topo, &keys);
    let _busy = topo.http_server(H, "127.0.0.1", 8585, "busy");
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
pub(super) fn ssh_site(topo: &Topology, keys: &Keys, forwards: &str) -> PathBuf {
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

/// `show ssh --json` of the daemon on the test's control socket: its clients and server.
pub(super) fn show_ssh(topo: &Topology) -> Value {
    topo.show(H, topo.dir().join("ctl.sock"), Show::Ssh)
}

/// The parts (clients and server) in `show ssh --json`.
pub(super) fn parts(show: &Value) -> impl Iterator<Item = &Value> {
    show.as_array().into_iter().flatten()
}

/// Every forward of every client in `show ssh --json`.
pub(super) fn forwards(show: &Value) -> impl Iterator<Item = &Value> {
    parts(show)
        .filter_map(|p| p["forwards"].as_array())
        .flatten()
}

/// A numeric field of the forward whose spec is `spec`, or of its `counters`.
fn forward_field(show: &Value, spec: &str, field: &str) -> Option<u64> {
    let forward = forwards(show).find(|f| f["spec"] == spec)?;
    forward[field]
        .as_u64()
        .or_else(|| forward["counters"][field].as_u64())
}

#[test]
fn remote_unix_sockets_and_live_counters() {
    let (topo, keys) = setup(e2e!());
    let _sshd = openssh_sshd(&topo, &keys);
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "hello over unix");
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
    let show = show_ssh(&topo);
    assert!(
        forwards(&show).any(|f| f["bound"] == format!("{d}/remote-web.sock")),
        "{show}"
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
    let show = show_ssh(&topo);
    assert_eq!(forward_field(&show, &spec, "active"), Some(1), "{show}");
    assert_eq!(
        forward_field(&show, &spec, "bytes_out"),
        Some(300_000),
        "{show}"
    );
    assert_eq!(
        forward_field(&show, &spec, "bytes_in"),
        Some(300_000),
        "{show}"
    );
}

#[test]
fn reload_changes_forwards_on_the_live_connection() {
    let (topo, keys) = setup(e2e!());
    let _sshd = openssh_sshd(&topo, &keys);
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "web");
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
    topo.wait_tcp(H, "127.0.0.1", 8585, Duration::from_secs(15));
    topo.wait_tcp(H, "127.0.0.1", 8586, Duration::from_secs(15));
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
            &show_ssh(&topo),
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
    topo.wait_tcp(H, "127.0.0.1", 8587, Duration::from_secs(10));
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
    let show = show_ssh(&topo);
    assert!(
        parts(&show).any(|p| p["counters"]["reconnects"] == 0),
        "{show}"
    );
    assert!(parts(&show).any(|p| p["state"] == "connected"), "{show}");
    assert!(
        forwards(&show).all(|f| !f["spec"]
            .as_str()
            .is_some_and(|s| s.contains("8585:127.0.0.1"))),
        "{show}"
    );
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
    let (topo, keys) = setup(e2e!());
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "served");
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
    topo.wait_tcp(H, "127.0.0.1", SSHD_PORT, Duration::from_secs(15));
    // A handshake that completes while the daemon's accept queue is full is dropped by the
    // kernel without a word: the client counts it held, the daemon never sees it, and it would
    // stay open forever. Told with a reset instead, the client sees it closed.
    topo.sh(H, "sysctl -qw net.ipv4.tcp_abort_on_overflow=1");
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
    topo.wait_tcp(H, "127.0.0.1", 18585, Duration::from_secs(15));
    let big = "x".repeat(200_000);
    std::fs::write(
        topo.dir().join(format!("www-{H}-{HTTP_PORT}/big.txt")),
        &big,
    )
    .unwrap();
    let got = topo.curl(H, "http://127.0.0.1:18585/big.txt").unwrap();
    assert_eq!(got.trim_end().len(), big.len(), "forwarded body differs");
    assert_eq!(got.trim_end(), big);
    // After the grace time every idle connection is closed by the server.
    wait_log(&attacker, &format!("closed {held} of {held} all"));
    let show = show_ssh(&topo);
    assert!(
        parts(&show).any(|p| p["counters"]["login_grace_expired"] == 10),
        "{show}"
    );
    assert!(
        parts(&show).all(|p| p["counters"]["refused_per_source"] != 0),
        "{show}"
    );
}

#[test]
fn vipgate_sshd_key_options_and_privileged_listen() {
    let (topo, keys) = setup(e2e!());
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "served");
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

/// A home directory of the test's own, with `.ssh/` made as ssh wants it.
fn test_home(topo: &Topology) -> PathBuf {
    let home = topo.dir().join("home");
    std::fs::create_dir_all(home.join(".ssh/conf.d")).unwrap();
    home
}

/// `vipgate ssh ARGS` with HOME set to `home` (so `~/.ssh/config` is the test's).
fn vipgate_ssh_home(topo: &Topology, name: &str, home: &std::path::Path, args: &[&str]) -> Proc {
    let bin = vipgate_tests::vipgate_bin();
    let home_env = format!("HOME={}", home.display());
    let mut argv = vec!["env", &home_env, bin.to_str().unwrap(), "ssh"];
    argv.extend_from_slice(args);
    topo.spawn(H, name, &argv)
}

#[test]
fn user_config_with_include_match_and_tokens() {
    let (topo, keys) = setup(e2e!());
    let _sshd = openssh_sshd(&topo, &keys);
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "configured");
    let home = test_home(&topo);
    let ssh = home.join(".ssh");
    std::fs::copy(&keys.client, ssh.join("id_root")).unwrap();
    // An ordinary ~/.ssh/config: keywords vipgate ignores, one only macOS's ssh knows (hence
    // IgnoreUnknown), a relative Include whose User the Match below depends on, tokens.
    std::fs::write(
        ssh.join("config"),
        "IgnoreUnknown UseKeychain,AddKeysToAgent\n\
         Include conf.d/*.conf\n\
         \n\
         Host gw\n\
         \x20 HostName 127.0.0.1\n\
         \x20 UseKeychain yes\n\
         \x20 ForwardAgent yes\n\
         \x20 ControlMaster auto\n\
         \x20 ControlPath ~/.ssh/cm-%r@%h:%p\n\
         \x20 Compression yes\n\
         \n\
         Match originalhost gw user root\n\
         \x20 Port 2222\n\
         \x20 IdentityFile ~/.ssh/id_%r\n\
         \x20 UserKnownHostsFile ~/.ssh/known_hosts_%h_%p\n\
         \x20 LocalForward 8585 127.0.0.1:8080\n\
         \x20 ConnectTimeout 5\n\
         \n\
         Host other\n\
         \x20 Port 1\n\
         \x20 LocalForward 9999 127.0.0.1:1\n",
    )
    .unwrap();
    std::fs::write(
        ssh.join("conf.d/10-user.conf"),
        "Host *\n  User root\n  ServerAliveInterval 5\n  SendEnv LANG LC_*\n",
    )
    .unwrap();
    std::fs::write(ssh.join("conf.d/ignored.txt"), "Bogus keyword\n").unwrap();
    let mut client = vipgate_ssh_home(&topo, "client", &home, &["-N", "gw"]);
    topo.wait_tcp(H, "127.0.0.1", 8585, Duration::from_secs(15));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:8585/").unwrap().trim(),
        "configured"
    );
    assert!(
        ssh.join("known_hosts_127.0.0.1_2222").exists(),
        "UserKnownHostsFile's tokens were expanded: {}",
        client.log()
    );
    assert!(
        topo.try_sh(H, "bash -c 'exec 3<>/dev/tcp/127.0.0.1/9999'")
            .is_err(),
        "the block of another host did not apply"
    );
    client.terminate(Duration::from_secs(10));

    let out = |home: &std::path::Path, args: &[&str]| {
        let mut p = vipgate_ssh_home(&topo, "fails", home, args);
        p.wait_exit(Duration::from_secs(15));
        p.log()
    };
    // -F none reads no file: nothing to forward.
    assert!(out(&home, &["-N", "-F", "none", "gw"]).contains("nothing to forward"));
    // A keyword OpenSSH does not know is refused with ssh's words, file and line, even in a
    // block that does not match; so is one whose absence would weaken security.
    let bad = topo.write("bad_config", "Host elsewhere\n  Frobnicate yes\n");
    let log = out(&home, &["-N", "-F", bad.to_str().unwrap(), "gw"]);
    assert!(
        log.contains("bad_config line 2: Bad configuration option: Frobnicate"),
        "{log}"
    );
    let alias = topo.write("alias_config", "Host gw\n  HostKeyAlias trusted\n");
    let log = out(&home, &["-N", "-F", alias.to_str().unwrap(), "gw"]);
    assert!(
        log.contains("alias_config line 2: option 'HostKeyAlias' is not supported"),
        "{log}"
    );
    // A group-writable include is refused, as ssh refuses it.
    let loose = ssh.join("conf.d/20-loose.conf");
    std::fs::write(&loose, "Host *\n  Port 2222\n").unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o664)).unwrap();
    let log = out(&home, &["-N", "gw"]);
    assert!(log.contains("writable by group or others"), "{log}");
}

/// Debian's sshd in `host` on `addr`:SSHD_PORT with a host key of its own (`ssh_host_HOST`).
pub(super) fn openssh_sshd_on(topo: &Topology, host: &str, addr: &str) -> Proc {
    std::fs::create_dir_all("/run/sshd").unwrap();
    let d = topo.dir().display().to_string();
    let key = format!("ssh_host_{host}");
    if !topo.dir().join(&key).exists() {
        keygen(topo, &key, "ed25519");
    }
    let cfg = topo.write(
        &format!("sshd_config_{host}"),
        &format!(
            "Port {SSHD_PORT}\nListenAddress {addr}\nHostKey {d}/{key}\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
             AllowTcpForwarding yes\nLogLevel VERBOSE\n"
        ),
    );
    let p = topo.spawn(
        host,
        &format!("sshd-{host}"),
        &["/usr/sbin/sshd", "-D", "-e", "-f", cfg.to_str().unwrap()],
    );
    topo.wait_tcp(host, addr, SSHD_PORT, Duration::from_secs(10));
    p
}

#[test]
fn proxy_jump_through_a_bastion() {
    let mut topo = Topology::new("ssh_jump");
    // The client (h) reaches only the bastion (b); only the bastion reaches the target (t).
    topo.hosts(&[H, "b", "t"])
        .veth(H, "hb", "b", "bh")
        .veth("b", "bt", "t", "tb")
        .addr(H, "hb", "10.77.1.1/24")
        .addr("b", "bh", "10.77.1.2/24")
        .addr("b", "bt", "10.77.2.1/24")
        .addr("t", "tb", "10.77.2.2/24");
    let keys = client_keys(&topo);
    topo.write("authorized_keys", &keys.client_pub);
    let mut bastion = openssh_sshd_on(&topo, "b", "10.77.1.2");
    let _target = openssh_sshd_on(&topo, "t", "10.77.2.2");
    let _http = topo.http_server("t", "127.0.0.1", HTTP_PORT, "behind the bastion");
    assert!(
        topo.try_sh(
            H,
            &format!("bash -c 'exec 3<>/dev/tcp/10.77.2.2/{SSHD_PORT}'")
        )
        .is_err(),
        "the client must not reach the target directly"
    );
    let kh = format!("UserKnownHostsFile={}", known_hosts(&topo).display());
    let jump = format!("root@10.77.1.2:{SSHD_PORT}");
    let port = SSHD_PORT.to_string();
    let args = [
        "ssh",
        "-N",
        "-F",
        "none",
        "-J",
        jump.as_str(),
        "-p",
        port.as_str(),
        "-i",
        keys.client.to_str().unwrap(),
        "-o",
        kh.as_str(),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ServerAliveInterval=1",
        "-o",
        "ServerAliveCountMax=2",
        "-L",
        "8585:127.0.0.1:8080",
        "root@10.77.2.2",
    ];
    let mut client = topo.vipgate(H, "jump", &args);
    topo.wait_tcp(H, "127.0.0.1", 8585, Duration::from_secs(20));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:8585/").unwrap().trim(),
        "behind the bastion"
    );
    // Both hops' keys were checked and recorded, each under its own name.
    let recorded = std::fs::read_to_string(known_hosts(&topo)).unwrap();
    assert!(recorded.contains("[10.77.1.2]:2222 "), "{recorded}");
    assert!(recorded.contains("[10.77.2.2]:2222 "), "{recorded}");

    // The bastion goes down hard (its session children too) and comes back: the whole chain
    // is rebuilt and the forward works again.
    let _ = topo.try_sh("b", &format!("pkill -KILL -P {}", bastion.pid()));
    bastion.kill9();
    let mut bastion = openssh_sshd_on(&topo, "b", "10.77.1.2");
    wait_until(
        Duration::from_secs(30),
        "the -L forward to work again through the new bastion",
        || {
            topo.curl(H, "http://127.0.0.1:8585/")
                .is_ok_and(|b| b.trim() == "behind the bastion")
        },
    );
    assert!(client.log().contains("reconnect"), "{}", client.log());
    client.terminate(Duration::from_secs(10));

    // OpenSSH's ssh reaches the target with `vipgate ssh -W` as its ProxyCommand, and runs a
    // command there (stdio forwarding carries the whole SSH session both ways).
    let proxy = format!(
        "ProxyCommand={} ssh -q -F none -W %h:%p -p {SSHD_PORT} -i {} -o {kh} -o IdentitiesOnly=yes root@10.77.1.2",
        vipgate_tests::vipgate_bin().display(),
        keys.client.display()
    );
    let via_w = topo
        .try_sh(
            H,
            &format!(
                "ssh -F none -o BatchMode=yes -o '{proxy}' -o UserKnownHostsFile={d}/known_hosts_w \
                 -o StrictHostKeyChecking=accept-new -i {key} -p {SSHD_PORT} root@10.77.2.2 echo through-w",
                d = topo.dir().display(),
                key = keys.client.display()
            ),
        )
        .unwrap();
    assert_eq!(via_w.trim(), "through-w");
    // -W to a port nobody listens on: ssh's wording, exit status 255.
    let o = topo.vipgate_output(
        H,
        &[
            "ssh",
            "-F",
            "none",
            "-W",
            "127.0.0.1:1",
            "-p",
            &port,
            "-i",
            keys.client.to_str().unwrap(),
            "-o",
            &kh,
            "root@10.77.1.2",
        ],
    );
    assert_eq!(o.status.code(), Some(255));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("connect to host 127.0.0.1 port 1:"), "{err}");

    // A bastion whose key changed is refused, naming it.
    let _ = topo.try_sh("b", &format!("pkill -KILL -P {}", bastion.pid()));
    bastion.kill9();
    std::fs::remove_file(topo.dir().join("ssh_host_b")).unwrap();
    std::fs::remove_file(topo.dir().join("ssh_host_b.pub")).unwrap();
    let _new_bastion = openssh_sshd_on(&topo, "b", "10.77.1.2");
    let mut refused = topo.vipgate(H, "jump-changed", &args);
    refused.wait_exit(Duration::from_secs(20));
    let log = refused.log();
    assert!(
        log.contains("REMOTE HOST IDENTIFICATION HAS CHANGED for [10.77.1.2]:2222"),
        "{log}"
    );
}

#[test]
fn exit_status_and_messages_as_ssh() {
    let (topo, keys) = setup(e2e!());
    let _sshd = openssh_sshd(&topo, &keys);
    let kh = format!("UserKnownHostsFile={}", known_hosts(&topo).display());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "ssh",
            "-N",
            "-F",
            "none",
            "-o",
            kh.as_str(),
            "-o",
            "IdentitiesOnly=yes",
        ];
        args.extend_from_slice(extra);
        let o = topo.vipgate_output(H, &args);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["-p", "1", "-L", "8585:127.0.0.1:80", "root@127.0.0.1"]);
    assert_eq!(code, Some(255));
    assert!(
        err.contains("connect to host 127.0.0.1 port 1: Connection refused"),
        "{err}"
    );
    let stranger = keygen(&topo, "id_stranger", "ed25519");
    let port = SSHD_PORT.to_string();
    let (code, err) = run(&[
        "-p",
        &port,
        "-i",
        stranger.to_str().unwrap(),
        "-L",
        "8585:127.0.0.1:80",
        "root@127.0.0.1",
    ]);
    assert_eq!(code, Some(255));
    assert!(
        err.contains("root@127.0.0.1: Permission denied (publickey)."),
        "{err}"
    );
    // A -R port sshd cannot bind: one already in use on its side.
    let _busy = topo.http_server(H, "127.0.0.1", 8586, "busy");
    let (code, err) = run(&[
        "-p",
        &port,
        "-i",
        keys.client.to_str().unwrap(),
        "-R",
        "127.0.0.1:8586:127.0.0.1:80",
        "root@127.0.0.1",
    ]);
    assert_eq!(code, Some(255));
    assert!(
        err.contains("Error: remote port forwarding failed for listen port")
            && err.contains("8586"),
        "{err}"
    );
    // -q keeps the log quiet; -E sends it to a file.
    let log = topo.dir().join("ssh.log");
    let (code, _) = run(&[
        "-v",
        "-E",
        log.to_str().unwrap(),
        "-p",
        &port,
        "-i",
        keys.client.to_str().unwrap(),
        "-o",
        "ClearAllForwardings=yes",
        "-L",
        "8585:127.0.0.1:80",
        "root@127.0.0.1",
    ]);
    assert_eq!(code, Some(255), "nothing to forward");
    let mut client = topo.vipgate(
        H,
        "logged",
        &[
            "ssh",
            "-v",
            "-4",
            "-E",
            log.to_str().unwrap(),
            "-F",
            "none",
            "-o",
            &kh,
            "-p",
            &port,
            "-i",
            keys.client.to_str().unwrap(),
            "-L",
            "8587:127.0.0.1:80",
            "root@localhost",
        ],
    );
    topo.wait_tcp(H, "127.0.0.1", 8587, Duration::from_secs(15));
    wait_until(
        Duration::from_secs(10),
        "debug lines in the -E file",
        || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("DEBUG")),
    );
    client.terminate(Duration::from_secs(10));
    assert!(!client.log().contains("DEBUG"), "{}", client.log());
}

/// `ssh-keygen -s CA` signs `pubkey` (user certificate, or host with `-h`); returns the
/// certificate's path (`<key>-cert.pub`, OpenSSH's name).
fn sign(topo: &Topology, ca: &std::path::Path, pubkey: &std::path::Path, args: &str) -> PathBuf {
    topo.sh(
        H,
        &format!(
            "ssh-keygen -q -s {} -I test {args} {}",
            ca.display(),
            pubkey.display()
        ),
    );
    let stem = pubkey.to_str().unwrap().strip_suffix(".pub").unwrap();
    PathBuf::from(format!("{stem}-cert.pub"))
}

/// Debian's sshd on 127.0.0.1:`port` that admits only user certificates of `ca` (no
/// authorized_keys) and presents `host_cert` for its host key `host_key`.
fn cert_sshd(topo: &Topology, port: u16, host_key: &str, host_cert: &std::path::Path) -> Proc {
    std::fs::create_dir_all("/run/sshd").unwrap();
    let d = topo.dir().display().to_string();
    let cfg = topo.write(
        &format!("sshd_config_{port}"),
        &format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/{host_key}\n\
             HostCertificate {}\nTrustedUserCAKeys {d}/ca.pub\nAuthorizedKeysFile none\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile none\nAllowTcpForwarding yes\nLogLevel VERBOSE\n",
            host_cert.display()
        ),
    );
    let p = topo.spawn(
        H,
        &format!("sshd-{port}"),
        &["/usr/sbin/sshd", "-D", "-e", "-f", cfg.to_str().unwrap()],
    );
    topo.wait_tcp(H, "127.0.0.1", port, Duration::from_secs(10));
    p
}

#[test]
fn certificates_against_openssh_sshd() {
    let (topo, _keys) = setup(e2e!());
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "via a certificate");
    let ca = keygen(&topo, "ca", "ed25519");
    let ca_pub = std::fs::read_to_string(ca.with_extension("pub")).unwrap();
    // Three host keys: a good certificate, one for another name, an expired one.
    let mut sshds = Vec::new();
    for (port, name, validity) in [
        (SSHD_PORT, "127.0.0.1", "-V -5m:+1h"),
        (2223, "other.example", "-V -5m:+1h"),
        (2224, "127.0.0.1", "-V 20200101:20200102"),
    ] {
        let key = format!("host_{port}");
        let k = keygen(&topo, &key, "ed25519");
        let cert = sign(
            &topo,
            &ca,
            &k.with_extension("pub"),
            &format!("-h -n {name} {validity}"),
        );
        sshds.push(cert_sshd(&topo, port, &key, &cert));
    }
    // known_hosts trusts only the CA, and StrictHostKeyChecking=yes: a plain host key would
    // be refused, so getting in proves the host certificate was checked and accepted.
    std::fs::write(
        known_hosts(&topo),
        format!("@cert-authority [127.0.0.1]:* {ca_pub}"),
    )
    .unwrap();
    // User keys: `-i key` picks up key-cert.pub; another key's certificate comes through
    // CertificateFile; one expired; one without the principal "root".
    let user = keygen(&topo, "id_user", "ed25519");
    sign(
        &topo,
        &ca,
        &user.with_extension("pub"),
        "-n root -V -5m:+1h",
    );
    let listed = keygen(&topo, "id_listed", "ed25519");
    let listed_cert = sign(&topo, &ca, &listed.with_extension("pub"), "-n root");
    let moved = topo.dir().join("listed.cert");
    std::fs::rename(&listed_cert, &moved).unwrap();
    let expired = keygen(&topo, "id_expired", "ed25519");
    sign(
        &topo,
        &ca,
        &expired.with_extension("pub"),
        "-n root -V 20200101:20200102",
    );
    let alice = keygen(&topo, "id_alice", "ed25519");
    sign(&topo, &ca, &alice.with_extension("pub"), "-n alice");

    let kh = format!("UserKnownHostsFile={}", known_hosts(&topo).display());
    let run = |port: u16, key: &std::path::Path, extra: &[&str]| {
        let port = port.to_string();
        let mut args = vec![
            "ssh",
            "-N",
            "-p",
            &port,
            "-i",
            key.to_str().unwrap(),
            "-o",
            &kh,
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            // sshd itself holds this port: once in, the run ends on the refused forward.
            "-R",
            "127.0.0.1:2222:127.0.0.1:1",
        ];
        args.extend_from_slice(extra);
        args.push("root@127.0.0.1");
        let o = topo.vipgate_output(H, &args);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let logged_in = "remote port forwarding failed for listen port 2222";
    // A user certificate picked up beside the key, a host certificate for 127.0.0.1.
    let e = run(SSHD_PORT, &user, &[]);
    assert!(e.contains(logged_in), "{e}");
    // CertificateFile.
    let cf = format!("CertificateFile={}", moved.display());
    let e = run(SSHD_PORT, &listed, &["-o", &cf]);
    assert!(e.contains(logged_in), "{e}");
    // Without CertificateFile that key is not authorized at all.
    let e = run(SSHD_PORT, &listed, &[]);
    assert!(e.contains("Permission denied (publickey)"), "{e}");
    // Expired user certificate, and one without the principal: sshd refuses them.
    let e = run(SSHD_PORT, &expired, &[]);
    assert!(e.contains("Permission denied (publickey)"), "{e}");
    let e = run(SSHD_PORT, &alice, &[]);
    assert!(e.contains("Permission denied (publickey)"), "{e}");
    // Host certificate for another name, and an expired one: refused in ssh's words.
    let e = run(2223, &user, &[]);
    assert!(
        e.contains("Certificate invalid: name is not a listed principal")
            && e.contains("Host key verification failed."),
        "{e}"
    );
    let e = run(2224, &user, &[]);
    assert!(
        e.contains("Certificate invalid: expired") && e.contains("Host key verification failed."),
        "{e}"
    );
    // A forward through the certified connection carries bytes.
    let client = topo.vipgate(
        H,
        "vipgate-ssh-cert",
        &[
            "ssh",
            "-N",
            "-p",
            &SSHD_PORT.to_string(),
            "-i",
            user.to_str().unwrap(),
            "-o",
            &kh,
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-L",
            "18590:127.0.0.1:8080",
            "root@127.0.0.1",
        ],
    );
    topo.wait_tcp(H, "127.0.0.1", 18590, Duration::from_secs(15));
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:18590/").unwrap().trim(),
        "via a certificate",
        "{}",
        client.log()
    );
    // Nothing was recorded: the CA line vouched for the host.
    let kh_text = std::fs::read_to_string(known_hosts(&topo)).unwrap();
    assert_eq!(kh_text.lines().count(), 1, "{kh_text}");
}

#[test]
fn openssh_client_with_certificates_against_vipgate_sshd() {
    let (topo, _keys) = setup(e2e!());
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "certified");
    let d = topo.dir().display().to_string();
    let ca = keygen(&topo, "ca", "ed25519");
    let ca_pub = std::fs::read_to_string(ca.with_extension("pub")).unwrap();
    let ca2 = keygen(&topo, "ca2", "ed25519");
    // The host key exists first so that it can be certified.
    let host = keygen(&topo, "vg_host_key", "ed25519");
    let host_cert = sign(
        &topo,
        &ca,
        &host.with_extension("pub"),
        "-h -n 127.0.0.1 -V -5m:+1h",
    );
    // authorized_keys: CA 1 for certificates naming "ops"; trusted_user_ca_keys: CA 2, whose
    // certificates must name the login user.
    topo.write(
        "authorized_keys",
        &format!("cert-authority,principals=\"ops\" {ca_pub}"),
    );
    let cfg = topo.write(
        "site.toml",
        &format!(
            "[sshd]\nlisten = \"127.0.0.1:{SSHD_PORT}\"\nhost_key = \"{d}/vg_host_key\"\n\
             authorized_keys = \"{d}/authorized_keys\"\n\
             trusted_user_ca_keys = \"{d}/ca2.pub\"\n\
             host_certificate = \"{}\"\n",
            host_cert.display()
        ),
    );
    let sshd = topo.vipgate(H, "vipgate-sshd", &["sshd", "-c", cfg.to_str().unwrap()]);
    wait_log(&sshd, "listening on");
    topo.write(
        "known_hosts",
        &format!("@cert-authority [127.0.0.1]:{SSHD_PORT} {ca_pub}"),
    );
    let user = |name: &str, ca: &std::path::Path, args: &str| {
        let k = keygen(&topo, name, "ed25519");
        sign(&topo, ca, &k.with_extension("pub"), args);
        k
    };
    let ops = user("id_ops", &ca, "-n ops -V -5m:+1h");
    let root_only = user("id_root", &ca, "-n root");
    let expired = user("id_expired", &ca, "-n ops -V 20200101:20200102");
    let trusted_root = user("id_trusted", &ca2, "-n root");
    let trusted_alice = user("id_trusted_alice", &ca2, "-n alice");
    let ssh = |key: &std::path::Path, fwd: &str| {
        format!(
            "ssh -p {SSHD_PORT} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes \
             -o ExitOnForwardFailure=yes -N -L {fwd}:127.0.0.1:8080 root@127.0.0.1",
            key.display()
        )
    };
    // OpenSSH checks vipgate's host certificate (StrictHostKeyChecking=yes, only the CA in
    // known_hosts) and logs in with its user certificate.
    let mut fwds = Vec::new();
    for (key, port) in [(&ops, 18591), (&trusted_root, 18592)] {
        fwds.push(topo.spawn(
            H,
            &format!("openssh-{port}"),
            &["sh", "-c", &ssh(key, &port.to_string())],
        ));
        topo.wait_tcp(H, "127.0.0.1", port, Duration::from_secs(15));
        assert_eq!(
            topo.curl(H, &format!("http://127.0.0.1:{port}/"))
                .unwrap()
                .trim(),
            "certified"
        );
    }
    // Refused: no principal that principals= asks for, expired, the user not a principal.
    for key in [&root_only, &expired, &trusted_alice] {
        let e = topo.try_sh(H, &ssh(key, "18599")).unwrap_err();
        assert!(e.contains("Permission denied"), "{}: {e}", key.display());
    }
    let log = wait_log(
        &sshd,
        "Certificate does not contain an authorized principal",
    );
    assert!(
        log.contains("Certificate invalid: name is not a listed principal"),
        "{log}"
    );
    assert!(log.contains("accepted certificate"), "{log}");
}
