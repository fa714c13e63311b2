//! What OpenSSH + autossh users expect of forwards that must stay up, against Debian's sshd:
//! a `-R` the server refuses is retried inside the live session until it binds; end-to-end
//! probes reconnect a half-dead session; `-R port` without a target is a SOCKS proxy on the
//! server's side whose connections leave from vipgate's.

use serde_json::Value;
use std::time::Duration;
use vipgate_tests::{Proc, Topology, e2e, wait_for, wait_until};

use super::ssh::{
    ECHO_PORT, H, HTTP_PORT, Keys, SSHD_PORT, client_keys, echo_server, forwards, openssh_sshd,
    openssh_sshd_on, parts, setup, ssh_site, vipgate_ssh_to, wait_log,
};

/// Sends `argv[3]` random bytes to an echo server at 127.0.0.1:`argv[2]`, half-closes, reads
/// everything back and compares SHA-256 digests (the echo server adds "bye" at the end).
const HASH_CLIENT: &str = r#"
import hashlib, os, socket, sys, threading
port, size = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(size)
s = socket.create_connection(("127.0.0.1", port), timeout=30)
def send():
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
back = hashlib.sha256()
tail = b""
n = 0
while True:
    c = s.recv(65536)
    if not c:
        break
    n += len(c)
    both = tail + c
    back.update(both[:-3])
    tail = both[-3:]
t.join()
sent = hashlib.sha256(data).hexdigest()
if tail != b"bye" or back.hexdigest() != sent:
    print("mismatch: sent %d bytes sha256 %s, got %d bytes sha256 %s" % (size, sent, n - 3, back.hexdigest()))
    sys.exit(1)
print("sha256 %s" % sent)
"#;

/// Sends the bytes given in hex to 127.0.0.1:1080 and prints "closed" once the other end
/// closes without answering (a reset counts as closed), or what it answered.
const HOSTILE_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", 1080), timeout=20)
try:
    s.sendall(bytes.fromhex(sys.argv[1]))
    got = s.recv(100)
except ConnectionResetError:
    got = b""
print("closed" if not got else "answered %r" % got)
"#;

/// `HASH_CLIENT` through `port`: the digest it printed.
fn hash_through(topo: &Topology, port: u16, size: usize) -> String {
    let script = topo.write("hash_client.py", HASH_CLIENT);
    let out = topo.sh(H, &format!("python3 {} {port} {size}", script.display()));
    assert!(out.starts_with("sha256 "), "{out}");
    out.trim().to_string()
}

/// OpenSSH's `ssh -N` with `args` (forwards) against the test's sshd, as another user of the
/// same account would run it.
fn openssh_client(topo: &Topology, keys: &Keys, name: &str, args: &str) -> Proc {
    let d = topo.dir().display();
    topo.spawn(
        H,
        name,
        &[
            "sh",
            "-c",
            &format!(
                "exec ssh -N -p {SSHD_PORT} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
                 -o UserKnownHostsFile={d}/known_hosts_openssh -o StrictHostKeyChecking=accept-new \
                 -o ExitOnForwardFailure=yes {args} root@127.0.0.1",
                keys.client.display()
            ),
        ],
    )
}

/// The forward whose spec is `spec` in `show ssh --json`.
fn forward<'v>(show: &'v Value, spec: &str) -> Option<&'v Value> {
    forwards(show).find(|f| f["spec"] == spec)
}

fn ctl(topo: &Topology) -> std::path::PathBuf {
    topo.dir().join("ctl.sock")
}

fn try_show_ssh(topo: &Topology) -> Option<Value> {
    topo.try_show(H, ctl(topo), vipgate_tests::Show::Ssh)
}

fn show_ssh_text(topo: &Topology) -> String {
    let out = topo.vipgate_output(
        H,
        &["show", "ssh", "--control", ctl(topo).to_str().unwrap()],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn refused_remote_forward_is_retried_until_it_binds() {
    let (topo, keys) = setup(e2e!());
    let _sshd = openssh_sshd(&topo, &keys);
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "the old session");
    let _echo = echo_server(&topo);
    // autossh's classic failure: an older session still holds the ports on the server.
    let mut holder = openssh_client(&topo, &keys, "holder", "-R 9100:127.0.0.1:8080");
    // Held for the whole test: a forward the server refuses forever.
    let _stuck = openssh_client(&topo, &keys, "stuck", "-R 9300:127.0.0.1:8080");
    topo.wait_tcp(H, "127.0.0.1", 9100, Duration::from_secs(15));
    topo.wait_tcp(H, "127.0.0.1", 9300, Duration::from_secs(15));

    let cfg = ssh_site(
        &topo,
        &keys,
        &format!(
            "remote = [\"9100:127.0.0.1:{ECHO_PORT}\", \"9300:127.0.0.1:{ECHO_PORT}\"]\n\
             exit_on_forward_failure = false\nreconnect_max = \"1s\"\n"
        ),
    );
    let run = topo.vipgate(H, "vipgate-run", &["run", "-c", cfg.to_str().unwrap()]);
    let spec = format!("9100:127.0.0.1:{ECHO_PORT}");
    let show = wait_for(
        Duration::from_secs(20),
        "-R 9100 pending after two refusals",
        || {
            let show = try_show_ssh(&topo)?;
            let f = forward(&show, &spec)?;
            (f["state"] == "pending" && f["pending"]["attempts"].as_u64() >= Some(2))
                .then_some(show)
        },
    );
    let f = forward(&show, &spec).unwrap();
    assert_eq!(
        f["pending"]["reason"], "remote port forwarding failed for listen port 9100",
        "{show}"
    );
    assert!(f["pending"]["next_retry_s"].as_u64() <= Some(1), "{show}");
    assert_eq!(f["bound"], "", "{show}");
    assert!(parts(&show).all(|p| p["state"] == "connected"), "{show}");
    let text = show_ssh_text(&topo);
    assert!(text.contains("(pending)"), "{text}");
    assert!(
        text.contains("pending: remote port forwarding failed for listen port 9100; attempts "),
        "{text}"
    );
    // The port still belongs to the old session.
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:9100/").unwrap().trim(),
        "the old session"
    );

    // The old session ends: the retry inside the live session takes the port.
    holder.kill9();
    wait_until(Duration::from_secs(20), "vipgate's -R 9100 to bind", || {
        try_show_ssh(&topo).is_some_and(|s| {
            forward(&s, &spec)
                .is_some_and(|f| f["state"] == "listening" && f["bound"] == "localhost:9100")
        })
    });
    let digest = hash_through(&topo, 9100, 4 << 20);
    eprintln!("4 MiB through the rebound -R 9100: {digest}");
    wait_log(&run, &format!("remote forward {spec} established after"));

    // The forward refused forever: attempts go on at the bounded delay, one log line only.
    let stuck = format!("9300:127.0.0.1:{ECHO_PORT}");
    let show = wait_for(
        Duration::from_secs(30),
        "-R 9300 refused eight times",
        || {
            let show = try_show_ssh(&topo)?;
            (forward(&show, &stuck)?["pending"]["attempts"].as_u64() >= Some(8)).then_some(show)
        },
    );
    assert!(
        forward(&show, &stuck).unwrap()["pending"]["next_retry_s"].as_u64() <= Some(1),
        "{show}"
    );
    let log = run.log();
    assert_eq!(
        log.matches("remote port forwarding failed for listen port 9300")
            .count(),
        1,
        "one log line per state change, not per attempt:\n{log}"
    );
    assert!(
        parts(&show).all(|p| p["counters"]["reconnects"] == 0),
        "the session itself was never reconnected: {show}"
    );
}

/// A numeric counter of the first client in `show ssh --json`.
fn client_counter(show: &Value, name: &str) -> u64 {
    parts(show)
        .find(|p| p["role"] == "client")
        .and_then(|p| p["counters"][name].as_u64())
        .unwrap_or(0)
}

#[test]
fn probes_reconnect_a_half_dead_forward_and_leave_a_healthy_one_alone() {
    let (topo, keys) = setup(e2e!());
    let _sshd = openssh_sshd(&topo, &keys);
    let mut http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "probed");
    let _echo = echo_server(&topo);
    let cfg = ssh_site(
        &topo,
        &keys,
        &format!(
            "local = [\"8585:127.0.0.1:{HTTP_PORT}\"]\nremote = [\"9400:127.0.0.1:{ECHO_PORT}\"]\n\
             probe = true\nprobe_interval = \"1s\"\nconnect_timeout = \"2s\"\nreconnect_max = \"1s\"\n"
        ),
    );
    let run = topo.vipgate(H, "vipgate-run", &["run", "-c", cfg.to_str().unwrap()]);
    let remote = format!("9400:127.0.0.1:{ECHO_PORT}");

    // Healthy: every probe passes and the session stays up.
    let show = wait_for(Duration::from_secs(30), "four rounds of probes", || {
        try_show_ssh(&topo).filter(|s| client_counter(s, "probes") >= 8)
    });
    assert_eq!(client_counter(&show, "probe_failures"), 0, "{show}");
    assert_eq!(client_counter(&show, "reconnects"), 0, "{show}");
    // Each -R probe came back from sshd's listener as a forwarded channel of that forward.
    assert!(
        forward(&show, &remote).unwrap()["counters"]["total"].as_u64() >= Some(3),
        "{show}"
    );
    assert!(show_ssh_text(&topo).contains("  probes "), "{show}");
    assert_eq!(
        topo.curl(H, "http://127.0.0.1:8585/").unwrap().trim(),
        "probed"
    );

    // Half-dead -R: sshd's listener stops answering (its SYNs dropped) while the SSH
    // connection and its keepalives are fine. The probe notices and the session reconnects.
    topo.sh(
        H,
        "nft add table inet probe_test && \
         nft add chain inet probe_test out '{ type filter hook output priority 0; }' && \
         nft add rule inet probe_test out tcp dport 9400 drop",
    );
    wait_until(
        Duration::from_secs(30),
        "a failed -R probe and a reconnect",
        || {
            try_show_ssh(&topo).is_some_and(|s| {
                client_counter(&s, "probe_failures") >= 1 && client_counter(&s, "reconnects") >= 1
            })
        },
    );
    wait_log(&run, &format!("probe of -R {remote} timed out"));
    topo.sh(H, "nft delete table inet probe_test");

    // Healthy again: once the forward is back, probes pass without further failures.
    let show = wait_for(Duration::from_secs(30), "-R 9400 back", || {
        try_show_ssh(&topo).filter(|s| {
            forward(s, &remote).is_some_and(|f| f["state"] == "listening")
                && parts(s).all(|p| p["state"] == "connected")
        })
    });
    let (probes, failures) = (
        client_counter(&show, "probes"),
        client_counter(&show, "probe_failures"),
    );
    let show = wait_for(Duration::from_secs(30), "two more rounds of probes", || {
        try_show_ssh(&topo).filter(|s| client_counter(s, "probes") >= probes + 4)
    });
    assert_eq!(client_counter(&show, "probe_failures"), failures, "{show}");
    let reconnects = client_counter(&show, "reconnects");

    // The -L target dies: the server can no longer open channels to it.
    http.kill9();
    wait_until(
        Duration::from_secs(30),
        "a failed -L probe and another reconnect",
        || {
            try_show_ssh(&topo).is_some_and(|s| {
                client_counter(&s, "probe_failures") > failures
                    && client_counter(&s, "reconnects") > reconnects
            })
        },
    );
    wait_log(
        &run,
        &format!("probe of -L 8585:127.0.0.1:{HTTP_PORT} failed: the server could not open"),
    );
}

#[test]
fn probes_reach_the_named_target_of_a_dynamic_forward() {
    let (topo, keys) = setup(e2e!());
    let _sshd = openssh_sshd(&topo, &keys);
    let mut http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "behind -D");
    let cfg = ssh_site(
        &topo,
        &keys,
        &format!(
            "dynamic = [\"1080\"]\nprobe = true\nprobe_interval = \"1s\"\n\
             probe_target = \"127.0.0.1:{HTTP_PORT}\"\nconnect_timeout = \"2s\"\n\
             reconnect_max = \"1s\"\n"
        ),
    );
    let run = topo.vipgate(H, "vipgate-run", &["run", "-c", cfg.to_str().unwrap()]);
    // Healthy: the -D's probes pass and the session stays.
    let show = wait_for(Duration::from_secs(30), "three probes of the -D", || {
        try_show_ssh(&topo).filter(|s| client_counter(s, "probes") >= 3)
    });
    assert_eq!(client_counter(&show, "probe_failures"), 0, "{show}");
    assert_eq!(client_counter(&show, "reconnects"), 0, "{show}");
    let page = topo.sh(
        H,
        &format!(
            "curl -sS --max-time 10 --socks5-hostname 127.0.0.1:1080 http://127.0.0.1:{HTTP_PORT}/"
        ),
    );
    assert_eq!(page.trim(), "behind -D");
    // The target goes: the probe fails and the session is reconnected.
    http.kill9();
    wait_until(
        Duration::from_secs(30),
        "a failed -D probe and a reconnect",
        || {
            try_show_ssh(&topo).is_some_and(|s| {
                client_counter(&s, "probe_failures") >= 1 && client_counter(&s, "reconnects") >= 1
            })
        },
    );
    wait_log(
        &run,
        &format!("probe of -D target 127.0.0.1:{HTTP_PORT} failed: the server could not open it"),
    );
    // Without probe_target, `vipgate check` says what probe = true leaves out.
    let plain = ssh_site(&topo, &keys, "dynamic = [\"1080\"]\nprobe = true\n");
    let out = topo.vipgate_output(H, &["check", "-c", plain.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("name one with probe_target"), "{text}");
    assert!(text.contains("site.toml:"), "{text}");
}

#[test]
fn reverse_dynamic_socks_reaches_what_only_the_client_reaches() {
    let mut topo = e2e!();
    // vipgate runs in h, sshd in s; h's loopback web server is out of s's reach.
    topo.hosts(&[H, "s"])
        .veth(H, "hs", "s", "sh")
        .addr(H, "hs", "10.78.1.1/24")
        .addr("s", "sh", "10.78.1.2/24");
    let keys = client_keys(&topo);
    topo.write("authorized_keys", &keys.client_pub);
    let _sshd = openssh_sshd_on(&topo, "s", "10.78.1.2");
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "client side only");
    let www = topo.dir().join(format!("www-{H}-{HTTP_PORT}"));
    let want = topo.sh(
        H,
        &format!(
            "head -c 8388608 /dev/urandom > {0}/big.bin && sha256sum < {0}/big.bin",
            www.display()
        ),
    );
    assert!(
        topo.curl("s", &format!("http://127.0.0.1:{HTTP_PORT}/"))
            .is_err(),
        "sshd's side must not reach the web server by itself"
    );
    let client = vipgate_ssh_to(&topo, "vipgate-ssh", &keys, &["-R", "1080"], "10.78.1.2");
    topo.wait_tcp("s", "127.0.0.1", 1080, Duration::from_secs(15));
    // SOCKS5 with the name resolved on vipgate's side, and SOCKS4a.
    let socks = |proxy: &str, path: &str| {
        topo.try_sh(
            "s",
            &format!(
                "curl -sS --max-time 30 --{proxy} 127.0.0.1:1080 http://localhost:{HTTP_PORT}/{path}"
            ),
        )
    };
    assert_eq!(
        socks("socks5-hostname", "").unwrap().trim(),
        "client side only"
    );
    assert_eq!(socks("socks4a", "").unwrap().trim(), "client side only");
    let got = topo.sh(
        "s",
        &format!(
            "curl -sS --max-time 60 --socks5-hostname 127.0.0.1:1080 \
             http://localhost:{HTTP_PORT}/big.bin | sha256sum"
        ),
    );
    assert_eq!(got, want, "8 MiB through the reverse SOCKS proxy");

    // Hostile requests on a reverse-dynamic channel: a clear error, the channel closed.
    let hostile = topo.write("hostile.py", HOSTILE_CLIENT);
    let send = |hex: &str| topo.sh("s", &format!("python3 {} {hex}", hostile.display()));
    assert_eq!(send("0967617262616765").trim(), "closed");
    wait_log(
        &client,
        "SOCKS request: not a SOCKS4 or SOCKS5 request (version byte 9); channel closed",
    );
    // SOCKS4a with a user id that never ends.
    assert_eq!(
        send(&format!("0401005000000001{}", "75".repeat(5000))).trim(),
        "closed"
    );
    wait_log(&client, "too long; channel closed");
    // Still serving after both.
    assert_eq!(
        socks("socks5-hostname", "").unwrap().trim(),
        "client side only"
    );
    // sshd opens a channel for the connection `wait_tcp` made the moment it binds, before
    // russh hands vipgate the reply to its request: that channel too was one we asked for.
    assert!(
        !client.log().contains("which we did not ask for"),
        "{}",
        client.log()
    );
}

/// Runs `vipgate ssh` (argv[3:]) on a new pseudo-terminal as its controlling terminal and
/// answers the password prompt with argv[1] ("login", "background" for `-f`) or Ctrl-C
/// ("ctrl-c"). Prints what it saw: the terminal's echo while prompting and afterwards, the
/// page fetched through the forward (login, background: after the foreground process
/// exited 0, the background one then stopped by its pid), or the exit status and output
/// (ctrl-c).
const PTY_LOGIN: &str = r#"
import fcntl, os, select, subprocess, sys, termios, time, urllib.request
password, mode, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
master, slave = os.openpty()
def own_tty():
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
child = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=own_tty)
out = b""
def read_some(timeout):
    global out
    r, _, _ = select.select([master], [], [], timeout)
    if r:
        try:
            out += os.read(master, 4096)
        except OSError:
            pass
def wait(what, cond, timeout=20):
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            print("timed out waiting for %s; output %r" % (what, out))
            child.kill()
            sys.exit(1)
        read_some(0.05)
def echo():
    lflag = termios.tcgetattr(slave)[3]
    return bool(lflag & termios.ECHO) and bool(lflag & termios.ICANON) and bool(lflag & termios.ISIG)
wait("the prompt", lambda: b"'s password: " in out)
wait("echo off", lambda: not echo())
print("echo off while prompting")
if mode == "ctrl-c":
    os.write(master, b"\x03")
    wait("the exit", lambda: child.poll() is not None)
    read_some(0.5)
    print("exit %d" % child.returncode)
    print("terminal restored" if echo() else "terminal left raw")
    print(out.decode(errors="replace"))
    sys.exit(0)
os.write(master, password.encode() + b"\r")
if mode == "background":
    wait("the foreground process to exit", lambda: child.poll() is not None, 30)
    read_some(0.5)
    print("foreground exit %d" % child.returncode)
    print("terminal restored" if echo() else "terminal left raw")
    page = urllib.request.urlopen("http://127.0.0.1:18700/", timeout=10).read()
    print("page: " + page.decode().strip())
    for pid in os.listdir("/proc"):
        try:
            env = open("/proc/%s/environ" % pid, "rb").read()
            cmd = open("/proc/%s/cmdline" % pid, "rb").read()
        except OSError:
            continue
        if b"VIPGATE_SSH_BACKGROUND_CHILD=ask" in env and argv[-1].encode() in cmd and b"18700" in cmd:
            os.kill(int(pid), 15)
            print("background process stopped")
    sys.exit(0)
def page():
    try:
        return urllib.request.urlopen("http://127.0.0.1:18700/", timeout=5).read()
    except OSError:
        return None
wait("the forward", lambda: page() is not None or child.poll() is not None, 30)
if child.poll() is not None:
    print("exited %d: %r" % (child.returncode, out))
    sys.exit(1)
print("terminal restored" if echo() else "terminal left raw")
print("page: " + page().decode().strip())
child.terminate()
child.wait()
"#;

/// A login with a password on this machine, for sshd's password authentication; removed
/// when dropped.
struct PasswordUser {
    name: String,
}

impl PasswordUser {
    fn new(topo: &Topology, password: &str) -> Self {
        let name = format!("vgpw{}", std::process::id() % 100_000);
        let _ = topo.try_sh(H, &format!("userdel {name}"));
        topo.sh(
            H,
            &format!(
                "useradd -M -d /nonexistent -s /bin/sh {name} && echo '{name}:{password}' | chpasswd"
            ),
        );
        PasswordUser { name }
    }
}

impl Drop for PasswordUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel")
            .arg(&self.name)
            .status();
    }
}

#[test]
fn password_login_from_a_terminal_and_from_a_password_file() {
    let (topo, _keys) = setup(e2e!());
    let password = "Tr0ub4dor-3";
    let user = PasswordUser::new(&topo, password);
    let d = topo.dir().display().to_string();
    if !topo.dir().join("ssh_host_ed25519").exists() {
        topo.sh(
            H,
            &format!("ssh-keygen -q -t ed25519 -N '' -f {d}/ssh_host_ed25519"),
        );
    }
    std::fs::create_dir_all("/run/sshd").unwrap();
    let cfg = topo.write(
        "sshd_config_pw",
        &format!(
            "Port {SSHD_PORT}\nListenAddress 127.0.0.1\nHostKey {d}/ssh_host_ed25519\n\
             AuthorizedKeysFile none\nPasswordAuthentication yes\nPermitEmptyPasswords no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
             AllowTcpForwarding yes\nLogLevel VERBOSE\n"
        ),
    );
    let _sshd = topo.spawn(
        H,
        "sshd",
        &["/usr/sbin/sshd", "-D", "-e", "-f", cfg.to_str().unwrap()],
    );
    topo.wait_tcp(H, "127.0.0.1", SSHD_PORT, Duration::from_secs(10));
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "after a password");
    let script = topo.write("pty_login.py", PTY_LOGIN);
    let vipgate = vipgate_tests::vipgate_bin();
    let login = |mode: &str| {
        topo.sh(
            H,
            &format!(
                "python3 {} '{password}' {mode} {} ssh -N -F none -p {SSHD_PORT} \
                 -o UserKnownHostsFile={d}/known_hosts -o IdentityAgent=none \
                 -L 18700:127.0.0.1:{HTTP_PORT} {}@127.0.0.1",
                script.display(),
                vipgate.display(),
                user.name
            ),
        )
    };
    let out = login("login");
    assert!(out.contains("echo off while prompting"), "{out}");
    assert!(out.contains("terminal restored"), "{out}");
    assert!(out.contains("page: after a password"), "{out}");
    // Ctrl-C at the prompt: the terminal is put back and the login fails as ssh's does,
    // naming the methods the server offered.
    let out = login("ctrl-c");
    assert!(out.contains("terminal restored"), "{out}");
    assert!(out.contains("exit 255"), "{out}");
    assert!(
        out.contains(&format!(
            "{}@127.0.0.1: Permission denied (publickey,password).",
            user.name
        )),
        "{out}"
    );
    // -f: the password is asked in the foreground, then the forward lives on in the
    // background.
    let out = topo.sh(
        H,
        &format!(
            "python3 {} '{password}' background {} ssh -f -N -F none -p {SSHD_PORT} \
             -o UserKnownHostsFile={d}/known_hosts -o IdentityAgent=none \
             -L 18700:127.0.0.1:{HTTP_PORT} {}@127.0.0.1",
            script.display(),
            vipgate.display(),
            user.name
        ),
    );
    assert!(out.contains("echo off while prompting"), "{out}");
    assert!(out.contains("foreground exit 0"), "{out}");
    assert!(out.contains("terminal restored"), "{out}");
    assert!(out.contains("page: after a password"), "{out}");
    assert!(out.contains("background process stopped"), "{out}");

    // The daemon: a password only from password_file, never from a terminal.
    let site = |extra: &str| {
        format!(
            "[daemon]\ncontrol = \"{d}/ctl.sock\"\n\n[[ssh]]\n\
             destination = \"{}@127.0.0.1:{SSHD_PORT}\"\nknown_hosts = \"{d}/known_hosts\"\n\
             strict_host_key_checking = \"accept-new\"\nuse_agent = false\n\
             local = [\"18701:127.0.0.1:{HTTP_PORT}\"]\n{extra}",
            user.name
        )
    };
    let no_file = topo.write("site-nofile.toml", &site(""));
    let refused = topo.vipgate_output(H, &["run", "-c", no_file.to_str().unwrap()]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(
        text.contains("Permission denied (publickey,password)."),
        "{text}"
    );
    let pw_file = topo.write("password", &format!("{password}\n"));
    topo.sh(H, &format!("chmod 600 {}", pw_file.display()));
    let with_file = topo.write(
        "site.toml",
        &site(&format!("password_file = \"{}\"\n", pw_file.display())),
    );
    let _run = topo.vipgate(
        H,
        "vipgate-run",
        &["run", "-c", with_file.to_str().unwrap()],
    );
    wait_until(
        Duration::from_secs(20),
        "the -L forward of the daemon",
        || {
            topo.curl(H, "http://127.0.0.1:18701/")
                .is_ok_and(|b| b.trim() == "after a password")
        },
    );
}
