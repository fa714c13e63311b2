//! Unix socket forwarding through `vipgate sshd` with Debian's OpenSSH client:
//! `ssh -R /path:host:port` (`streamlocal-forward@openssh.com`) and `ssh -L port:/path`
//! (`direct-streamlocal@openssh.com`) within the path permit lists, refusals in ssh's words.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use vipgate_tests::{Topology, e2e, wait_until};

use super::ssh::{ECHO_PORT, H, HTTP_PORT, Keys, SSHD_PORT, echo_server, setup, wait_log};

/// Sends `argv[2]` random bytes to the echo server behind the unix socket `argv[1]` (or
/// 127.0.0.1:`argv[1]` when it is a number), half-closes, and compares SHA-256 digests of
/// what was sent and what came back before the echo server's closing "bye".
const HASH_CLIENT: &str = r#"
import hashlib, os, socket, sys, threading
where, size = sys.argv[1], int(sys.argv[2])
data = os.urandom(size)
if where.isdigit():
    s = socket.create_connection(("127.0.0.1", int(where)), timeout=30)
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(where)
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

/// An echo server on the unix socket `argv[1]` that writes "bye" after the client's EOF.
const UNIX_ECHO: &str = r#"
import os, socket, sys, threading
path = sys.argv[1]
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(path)
l.listen(16)
def serve(c):
    while True:
        b = c.recv(65536)
        if not b:
            break
        c.sendall(b)
    c.sendall(b"bye")
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

fn hash_via(topo: &Topology, where_: &str, size: usize) -> String {
    let script = topo.dir().join("hash_client.py");
    let out = topo.sh(H, &format!("python3 {} {where_} {size}", script.display()));
    assert!(out.starts_with("sha256 "), "{out}");
    out.trim().to_string()
}

/// OpenSSH's client against vipgate sshd with `args`; its exit code and stderr.
fn ssh(topo: &Topology, keys: &Keys, args: &str) -> (Option<i32>, String) {
    let d = topo.dir().display();
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.ns(H), "sh", "-c"])
        .arg(format!(
            "exec timeout 20 ssh -p {SSHD_PORT} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes \
             {args} root@127.0.0.1",
            keys.client.display()
        ))
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn openssh_forwards_unix_sockets_through_vipgate_sshd() {
    let (topo, keys) = setup(e2e!());
    let d = topo.dir().display().to_string();
    let fwd = topo.dir().join("fwd");
    std::fs::create_dir(&fwd).unwrap();
    topo.write("hash_client.py", HASH_CLIENT);
    let unix_echo = topo.write("unix_echo.py", UNIX_ECHO);
    topo.write("authorized_keys", &keys.client_pub);
    let cfg = topo.write(
        "site.toml",
        &format!(
            "[sshd]\nlisten = \"127.0.0.1:{SSHD_PORT}\"\nhost_key = \"{d}/vg_host_key\"\n\
             authorized_keys = \"{d}/authorized_keys\"\npermit_open = [\"127.0.0.1:{HTTP_PORT}\"]\n\
             permit_listen_paths = [\"{d}/fwd/*.sock\"]\n\
             permit_open_paths = [\"{d}/fwd/target.sock\"]\n"
        ),
    );
    let sshd = topo.vipgate(H, "vipgate-sshd", &["sshd", "-c", cfg.to_str().unwrap()]);
    wait_log(&sshd, "listening on");
    let pubkey = std::fs::read_to_string(topo.dir().join("vg_host_key.pub")).unwrap();
    topo.write("known_hosts", &format!("[127.0.0.1]:{SSHD_PORT} {pubkey}"));
    let _echo = echo_server(&topo);
    let _http = topo.http_server(H, "127.0.0.1", HTTP_PORT, "through a unix socket");
    let target = fwd.join("target.sock");
    let _target = topo.spawn(
        H,
        "unix-echo",
        &[
            "python3",
            unix_echo.to_str().unwrap(),
            target.to_str().unwrap(),
        ],
    );
    wait_until(Duration::from_secs(10), "the unix echo server", || {
        target.exists()
    });

    // -R /path:host:port twice and -L port:/path in one client.
    let s_sock = fwd.join("s.sock");
    let web_sock = fwd.join("web.sock");
    let client = topo.spawn(
        H,
        "openssh-client",
        &[
            "sh",
            "-c",
            &format!(
                "exec ssh -N -p {SSHD_PORT} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
                 -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes \
                 -o ExitOnForwardFailure=yes -R {}:127.0.0.1:{ECHO_PORT} \
                 -R {}:127.0.0.1:{HTTP_PORT} -L 18800:{} root@127.0.0.1",
                keys.client.display(),
                s_sock.display(),
                web_sock.display(),
                target.display()
            ),
        ],
    );
    wait_until(Duration::from_secs(15), "the -R sockets", || {
        s_sock.exists() && web_sock.exists()
    });
    let meta = std::fs::symlink_metadata(&s_sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "owner-only socket"
    );
    // Bytes by hash through the -R socket, both ways, 4 MiB.
    hash_via(&topo, s_sock.to_str().unwrap(), 4 << 20);
    // curl through the other -R socket reaches the HTTP server behind the client.
    let page = topo.sh(
        H,
        &format!(
            "curl -sS --max-time 10 --unix-socket {} http://x/",
            web_sock.display()
        ),
    );
    assert_eq!(page.trim(), "through a unix socket");
    // -L 18800:/path: to the server side's unix socket.
    topo.wait_tcp(H, "127.0.0.1", 18800, Duration::from_secs(10));
    hash_via(&topo, "18800", 1 << 20);

    // Outside the permit list, and a regular file in the way: ssh's own words.
    let (code, err) = ssh(
        &topo,
        &keys,
        &format!("-N -o ExitOnForwardFailure=yes -R {d}/elsewhere.sock:127.0.0.1:{ECHO_PORT}"),
    );
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("remote port forwarding failed"), "{err}");
    std::fs::write(fwd.join("file.sock"), "keep me").unwrap();
    let (code, err) = ssh(
        &topo,
        &keys,
        &format!("-N -o ExitOnForwardFailure=yes -R {d}/fwd/file.sock:127.0.0.1:{ECHO_PORT}"),
    );
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("remote port forwarding failed"), "{err}");
    assert_eq!(
        std::fs::read_to_string(fwd.join("file.sock")).unwrap(),
        "keep me"
    );
    wait_log(&sshd, "a regular file is there, not a socket");
    // -L to a socket outside permit_open_paths: the channel is refused.
    let d2 = d.clone();
    let mut refused_l = topo.spawn(
        H,
        "openssh-client-l",
        &[
            "sh",
            "-c",
            &format!(
                "exec ssh -N -p {SSHD_PORT} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
                 -o UserKnownHostsFile={d2}/known_hosts -o StrictHostKeyChecking=yes \
                 -L 18801:{}/fwd/s.sock root@127.0.0.1",
                keys.client.display(),
                d2
            ),
        ],
    );
    topo.wait_tcp(H, "127.0.0.1", 18801, Duration::from_secs(10));
    let out = topo
        .try_sh(H, "curl -sS --max-time 5 http://127.0.0.1:18801/")
        .unwrap_err();
    assert!(!out.contains("through a unix socket"), "{out}");
    wait_log(&sshd, "not in");
    refused_l.terminate(Duration::from_secs(5));

    // ssh -A: agent forwarding is refused (nothing here could use it), the session request
    // gets the usual answer.
    // (ssh asks for it only with an agent to forward: one runs for this command alone.)
    let out = topo
        .try_sh(
            H,
            &format!(
                "ssh-agent sh -c 'timeout 20 ssh -A -T -p {SSHD_PORT} -i {} -o IdentitiesOnly=yes \
                 -o BatchMode=yes -o UserKnownHostsFile={d}/known_hosts root@127.0.0.1 true 2>&1; \
                 echo exit $?'",
                keys.client.display()
            ),
        )
        .unwrap();
    assert!(out.contains("this server only forwards ports"), "{out}");
    assert!(out.contains("exit 1"), "{out}");
    wait_log(&sshd, "refused agent forwarding");
    // The client goes: its sockets go with it, the target's stays.
    let mut client = client;
    client.terminate(Duration::from_secs(5));
    wait_until(Duration::from_secs(10), "the -R sockets removed", || {
        !s_sock.exists() && !web_sock.exists()
    });
    assert!(target.exists());
}
