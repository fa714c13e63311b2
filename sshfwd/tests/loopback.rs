//! vipgate's client against vipgate's server over loopback (no root, no OpenSSH needed):
//! -L with half-close, -R port 0, -D SOCKS5 and SOCKS4a, known_hosts accept-new / changed key,
//! refused keys and refused forwards. The OpenSSH interop tests live in tests/tests/e2e/ssh.rs.
#![cfg(feature = "driver")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use russh::keys::{Algorithm, PrivateKey};
use sshfwd::known_hosts::StrictHostKeyChecking;
use sshfwd::policy::PermitList;
use sshfwd::sockpath::PathPermit;
use sshfwd::spec::{DynamicSpec, ForwardSpec};
use sshfwd::{ClientConfig, ServerConfig, ServerLimits, SshClient, SshServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sshfwd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let path = dir.join(name);
    std::fs::write(
        &path,
        key.to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    // A secret key readable by others is refused (StrictModes).
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (path, key.public_key().to_openssh().unwrap())
}

async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Echoes everything, and after the client's EOF writes "bye" and closes: proves half-close.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(b"bye").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn start_server(dir: &Path, authorized: &str, permit_open: &[&str]) -> SshServer {
    start_server_with(dir, authorized, permit_open, ServerLimits::default()).await
}

async fn start_server_with(
    dir: &Path,
    authorized: &str,
    permit_open: &[&str],
    limits: ServerLimits,
) -> SshServer {
    SshServer::start(server_config(dir, authorized, permit_open, limits))
        .await
        .unwrap()
}

fn server_config(
    dir: &Path,
    authorized: &str,
    permit_open: &[&str],
    limits: ServerLimits,
) -> ServerConfig {
    let ak = dir.join("authorized_keys");
    std::fs::write(&ak, authorized).unwrap();
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        host_key: dir.join("host_ed25519"),
        authorized_keys: ak,
        trusted_user_ca_keys: None,
        host_certificate: None,
        permit_open: PermitList::parse(permit_open, false).unwrap(),
        permit_listen: PermitList::Any,
        permit_listen_paths: PathPermit::default(),
        permit_open_paths: PathPermit::default(),
        socket_mode: 0o600,
        gateway_ports: false,
        idle_timeout: None,
        limits,
    }
}

fn client(server: &SshServer, dir: &Path, key: &Path) -> ClientConfig {
    let mut c = ClientConfig::new(
        "127.0.0.1",
        server.local_addr().port(),
        "ops",
        dir.join("known_hosts"),
    );
    c.identities = vec![key.to_path_buf()];
    c.use_agent = false;
    c.connect_timeout = Duration::from_secs(5);
    c
}

async fn exchange(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

fn expected(payload: &[u8]) -> Vec<u8> {
    [payload, b"bye"].concat()
}

#[tokio::test]
async fn local_remote_dynamic_through_vipgate_sshd() {
    let dir = temp_dir("lrd");
    let echo = echo_server().await;
    let (key, public) = write_key(&dir, "id_ed25519");
    let server = start_server(&dir, &format!("{public}\n"), &["any"]).await;
    assert!(server.host_key().generated);
    assert!(dir.join("host_ed25519.pub").exists());

    let lport = free_port().await;
    let dport = free_port().await;
    let mut cfg = client(&server, &dir, &key);
    cfg.local =
        vec![ForwardSpec::parse_local(&format!("{lport}:127.0.0.1:{}", echo.port())).unwrap()];
    cfg.remote = vec![ForwardSpec::parse_remote(&format!("0:127.0.0.1:{}", echo.port())).unwrap()];
    cfg.dynamic = vec![DynamicSpec::parse(&dport.to_string()).unwrap()];
    let mut tunnel = SshClient::start(cfg).await.unwrap();
    let known = std::fs::read_to_string(dir.join("known_hosts")).unwrap();
    assert!(
        known.contains(
            &server
                .host_key()
                .public_line
                .split(' ')
                .nth(1)
                .unwrap()
                .to_string()
        ),
        "accept-new recorded the key"
    );

    // -L, half-close: the echo server's "bye" after our EOF must still arrive.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let l_addr: SocketAddr = format!("127.0.0.1:{lport}").parse().unwrap();
    assert_eq!(exchange(l_addr, &payload).await, expected(&payload));

    // -R 0: the allocated port is reported and reaches the echo server.
    let mut allocated = tunnel.allocated_ports().unwrap();
    let a = tokio::time::timeout(Duration::from_secs(5), allocated.recv())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(a.port, 0);
    let r_addr: SocketAddr = format!("127.0.0.1:{}", a.port).parse().unwrap();
    assert_eq!(exchange(r_addr, b"remote").await, expected(b"remote"));

    // -D: SOCKS5 with a domain name, then SOCKS4a.
    let mut s = TcpStream::connect(("127.0.0.1", dport)).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0]);
    let mut req = vec![5, 1, 0, 3, 9];
    req.extend_from_slice(b"localhost");
    req.extend_from_slice(&echo.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[1], 0, "SOCKS5 CONNECT succeeded");
    s.write_all(b"socks5").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, expected(b"socks5"));

    let mut s = TcpStream::connect(("127.0.0.1", dport)).await.unwrap();
    let mut req = vec![4, 1];
    req.extend_from_slice(&echo.port().to_be_bytes());
    req.extend_from_slice(&[0, 0, 0, 1, b'u', 0]);
    req.extend_from_slice(b"127.0.0.1\0socks4a");
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 8];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[1], 90);
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(
        out,
        expected(b"socks4a"),
        "bytes sent right behind the request are forwarded"
    );

    let st = tunnel.status();
    assert_eq!(st.state, sshfwd::TunnelState::Connected);
    assert_eq!(st.forwards.len(), 3);
    assert_eq!(st.forwards[0].counters.total, 1);
    assert_eq!(st.forwards[0].counters.bytes_out, 300_000);
    assert!(server.status().counters.logins >= 1);
    tunnel.stop().await;
}

#[tokio::test]
async fn refusals_are_clear() {
    let dir = temp_dir("refuse");
    let echo = echo_server().await;
    let (key, public) = write_key(&dir, "id_ok");
    let (other, _) = write_key(&dir, "id_other");
    let server = start_server(&dir, &format!("{public}\n"), &["127.0.0.1:1"]).await;

    // A key that is not authorized.
    let err = SshClient::start(client(&server, &dir, &other))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("Permission denied (publickey)."),
        "{err}"
    );

    // StrictHostKeyChecking=yes with an unknown host.
    let mut cfg = client(&server, &dir, &key);
    cfg.known_hosts = dir.join("empty_known_hosts");
    cfg.strict_host_key_checking = StrictHostKeyChecking::Yes;
    let err = SshClient::start(cfg).await.err().unwrap();
    assert!(err.to_string().contains("is not in"), "{err}");

    // A changed key is refused even with accept-new.
    let kh = dir.join("known_hosts");
    let (_, impostor) = write_key(&dir, "id_impostor");
    std::fs::write(
        &kh,
        format!("[127.0.0.1]:{} {impostor}\n", server.local_addr().port()),
    )
    .unwrap();
    let err = SshClient::start(client(&server, &dir, &key))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{err}"
    );
    std::fs::remove_file(&kh).unwrap();

    // A -L target outside permit_open: the channel is refused, the client connection closed.
    let lport = free_port().await;
    let mut cfg = client(&server, &dir, &key);
    cfg.local =
        vec![ForwardSpec::parse_local(&format!("{lport}:127.0.0.1:{}", echo.port())).unwrap()];
    let tunnel = SshClient::start(cfg).await.unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", lport)).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(
        read.is_err() || out.is_empty(),
        "refused forward closes the client"
    );
    assert_eq!(server.status().counters.forwards_refused, 1);
    assert_eq!(tunnel.status().forwards[0].counters.failed, 1);

    // A port already in use is named in the error.
    let busy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = busy.local_addr().unwrap().port();
    let mut cfg = client(&server, &dir, &key);
    cfg.local = vec![ForwardSpec::parse_local(&format!("{port}:127.0.0.1:80")).unwrap()];
    let err = SshClient::start(cfg).await.err().unwrap();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot listen on 127.0.0.1:{port} for -L {port}:127.0.0.1:80"
        )),
        "{err}"
    );
    tunnel.stop().await;
}

/// Polls `f` every 20 ms until it holds or `secs` pass.
async fn eventually(secs: u64, f: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Reads until EOF or error; true if that happened within `secs`.
async fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 512];
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn idle_connections_are_capped_and_closed_at_login_grace() {
    let dir = temp_dir("grace");
    let (key, public) = write_key(&dir, "id_ok");
    let limits = ServerLimits {
        login_grace_time: Duration::from_secs(1),
        max_startups: "3".parse().unwrap(),
        per_source_max_startups: None,
        ..ServerLimits::default()
    };
    let server = start_server_with(&dir, &format!("{public}\n"), &["any"], limits).await;
    // Three silent clients (never sending a version line) are held...
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(server.local_addr()).await.unwrap());
    }
    assert!(eventually(5, || server.status().pending == 3).await);
    // ...a fourth is closed at once and counted.
    let mut extra = TcpStream::connect(server.local_addr()).await.unwrap();
    assert!(closed_within(&mut extra, 2).await);
    assert_eq!(server.status().counters.refused_max_startups, 1);
    // After the grace time the server closes the silent ones.
    for s in &mut idle {
        assert!(closed_within(s, 5).await, "idle connection not closed");
    }
    assert!(eventually(5, || server.status().counters.login_grace_expired == 3).await);
    assert!(eventually(5, || server.status().pending == 0).await);
    // An authenticated session outlives the grace time and frees its startup slot.
    let tunnel = SshClient::start(client(&server, &dir, &key)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = server.status();
    assert_eq!(
        (
            st.pending,
            st.counters.logins,
            st.counters.login_grace_expired
        ),
        (0, 1, 3)
    );
    assert_eq!(st.sessions, 1);
    tunnel.stop().await;
}

#[tokio::test]
async fn per_source_cap() {
    let dir = temp_dir("persource");
    let (_, public) = write_key(&dir, "id_ok");
    let limits = ServerLimits {
        per_source_max_startups: Some(2),
        ..ServerLimits::default()
    };
    let server = start_server_with(&dir, &format!("{public}\n"), &["any"], limits).await;
    let _a = TcpStream::connect(server.local_addr()).await.unwrap();
    let _b = TcpStream::connect(server.local_addr()).await.unwrap();
    assert!(eventually(5, || server.status().pending == 2).await);
    let mut c = TcpStream::connect(server.local_addr()).await.unwrap();
    assert!(closed_within(&mut c, 2).await);
    assert_eq!(server.status().counters.refused_per_source, 1);
}

#[tokio::test]
async fn expired_and_cert_authority_keys_are_refused() {
    let dir = temp_dir("expired");
    let (expired, expired_pub) = write_key(&dir, "id_expired");
    let (ca, ca_pub) = write_key(&dir, "id_ca");
    let (fresh, fresh_pub) = write_key(&dir, "id_fresh");
    let text = format!(
        "expiry-time=\"20200101\" {expired_pub}\ncert-authority {ca_pub}\nexpiry-time=\"29991231Z\" {fresh_pub}\n"
    );
    let server = start_server(&dir, &text, &["any"]).await;
    for key in [&expired, &ca] {
        let err = SshClient::start(client(&server, &dir, key))
            .await
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("Permission denied (publickey)."),
            "{err}"
        );
    }
    let tunnel = SshClient::start(client(&server, &dir, &fresh))
        .await
        .unwrap();
    tunnel.stop().await;
    assert!(server.status().counters.auth_refused >= 2);
}

#[tokio::test]
async fn privileged_remote_port_and_channel_cap() {
    let dir = temp_dir("caps");
    let echo = echo_server().await;
    let (key, public) = write_key(&dir, "id_ok");
    let limits = ServerLimits {
        max_channels_per_session: 1,
        ..ServerLimits::default()
    };
    let server = start_server_with(&dir, &format!("{public}\n"), &["any"], limits).await;
    // -R on a port below 1024 without a permit_listen entry naming it.
    let mut cfg = client(&server, &dir, &key);
    cfg.remote = vec![ForwardSpec::parse_remote(&format!("80:127.0.0.1:{}", echo.port())).unwrap()];
    let err = SshClient::start(cfg).await.err().unwrap();
    assert!(
        err.to_string().contains("remote port forwarding failed"),
        "{err}"
    );
    assert_eq!(server.status().counters.forwards_refused, 1);
    // One channel per session: a second -L connection is refused, the session stays.
    let lport = free_port().await;
    let mut cfg = client(&server, &dir, &key);
    cfg.local =
        vec![ForwardSpec::parse_local(&format!("{lport}:127.0.0.1:{}", echo.port())).unwrap()];
    let tunnel = SshClient::start(cfg).await.unwrap();
    let mut first = TcpStream::connect(("127.0.0.1", lport)).await.unwrap();
    first.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), first.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
    let mut second = TcpStream::connect(("127.0.0.1", lport)).await.unwrap();
    assert!(closed_within(&mut second, 5).await);
    assert_eq!(server.status().counters.channels_refused, 1);
    drop(first);
    drop(second);
    // The session survived: once the first channel is gone a new one works.
    assert!(eventually(5, || server.status().channels_active == 0).await);
    assert_eq!(
        exchange(SocketAddr::from(([127, 0, 0, 1], lport)), b"again").await,
        expected(b"again")
    );
    tunnel.stop().await;
}

#[tokio::test]
async fn insecure_host_key_is_refused() {
    let dir = temp_dir("strict");
    let (_, public) = write_key(&dir, "id_ok");
    let (hk, _) = write_key(&dir, "host_ed25519");
    std::fs::set_permissions(&hk, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let ak = dir.join("authorized_keys");
    std::fs::write(&ak, format!("{public}\n")).unwrap();
    let err = SshServer::start(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        host_key: hk,
        authorized_keys: ak,
        trusted_user_ca_keys: None,
        host_certificate: None,
        permit_open: PermitList::Any,
        permit_listen: PermitList::Any,
        permit_listen_paths: PathPermit::default(),
        permit_open_paths: PathPermit::default(),
        socket_mode: 0o600,
        gateway_ports: false,
        idle_timeout: None,
        limits: ServerLimits::default(),
    })
    .await
    .err()
    .unwrap();
    assert!(err.to_string().contains("insecure: mode 0644"), "{err}");
}

/// A unix socket echo server (same "bye" after EOF as [`echo_server`]).
fn unix_echo_server(path: &Path) {
    let l = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                let _ = s.write_all(b"bye").await;
                let _ = s.shutdown().await;
            });
        }
    });
}

async fn unix_exchange(path: &Path, payload: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// A bare russh client: only what the flood below needs.
struct Bare;

impl russh::client::Handler for Bare {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

#[tokio::test]
async fn unix_socket_forwards_within_the_path_lists() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = temp_dir("unix");
    let fwd = dir.join("fwd");
    std::fs::create_dir(&fwd).unwrap();
    std::os::unix::fs::symlink(&fwd, dir.join("link")).unwrap();
    let echo = echo_server().await;
    let target = fwd.join("target.sock");
    unix_echo_server(&target);
    let (key, public) = write_key(&dir, "id_ok");
    let limits = ServerLimits {
        max_listeners_per_session: 4,
        ..ServerLimits::default()
    };
    let mut cfg = server_config(&dir, &format!("{public}\n"), &["any"], limits);
    let d = dir.display();
    cfg.permit_listen_paths =
        PathPermit::parse(&[format!("{d}/fwd/*"), format!("{d}/link/*")]).unwrap();
    let link_sock = fwd.join("link.sock");
    std::os::unix::fs::symlink(&target, &link_sock).unwrap();
    cfg.permit_open_paths = PathPermit::parse(&[
        target.display().to_string(),
        link_sock.display().to_string(),
    ])
    .unwrap();
    let server = SshServer::start(cfg).await.unwrap();

    // -R /path:host:port: a 0600 socket that reaches the target; -L port:/path.
    let r_sock = fwd.join("r.sock");
    let lport = free_port().await;
    let mut cfg = client(&server, &dir, &key);
    cfg.remote = vec![
        ForwardSpec::parse_remote(&format!("{}:127.0.0.1:{}", r_sock.display(), echo.port()))
            .unwrap(),
    ];
    cfg.local = vec![ForwardSpec::parse_local(&format!("{lport}:{}", target.display())).unwrap()];
    let tunnel = SshClient::start(cfg).await.unwrap();
    let meta = std::fs::symlink_metadata(&r_sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(unix_exchange(&r_sock, &payload).await, expected(&payload));
    let l_addr = SocketAddr::from(([127, 0, 0, 1], lport));
    assert_eq!(
        exchange(l_addr, b"to a socket").await,
        expected(b"to a socket")
    );

    // Refused, each counted, the file system left as it was.
    std::fs::write(fwd.join("file.sock"), "not a socket").unwrap();
    let refused = |path: String| {
        let mut cfg = client(&server, &dir, &key);
        cfg.remote =
            vec![ForwardSpec::parse_remote(&format!("{path}:127.0.0.1:{}", echo.port())).unwrap()];
        SshClient::start(cfg)
    };
    let before = server.status().counters.forwards_refused;
    for path in [
        format!("{d}/outside.sock"),
        format!("{d}/fwd/../fwd/dots.sock"),
        format!("{d}/fwd/file.sock"),
        format!("{d}/link/via-symlink.sock"),
        format!("{d}/fwd/{}", "a".repeat(120)),
        target.display().to_string(),
    ] {
        let err = refused(path.clone()).await.err().unwrap();
        assert!(
            err.to_string().contains("remote port forwarding failed"),
            "{path}: {err}"
        );
    }
    assert_eq!(server.status().counters.forwards_refused, before + 6);
    assert_eq!(
        std::fs::read_to_string(fwd.join("file.sock")).unwrap(),
        "not a socket"
    );
    assert!(!fwd.join("via-symlink.sock").exists());
    assert_eq!(unix_exchange(&target, b"still").await, expected(b"still"));
    // -L to a listed path that is a symlink: refused, since it could lead anywhere.
    let before = server.status().counters.forwards_refused;
    let lport = free_port().await;
    let mut cfg = client(&server, &dir, &key);
    cfg.local =
        vec![ForwardSpec::parse_local(&format!("{lport}:{}", link_sock.display())).unwrap()];
    let via_link = SshClient::start(cfg).await.unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", lport)).await.unwrap();
    assert!(closed_within(&mut s, 10).await);
    assert!(
        eventually(5, || server.status().counters.forwards_refused
            == before + 1)
        .await
    );
    via_link.stop().await;

    // A client asking for a thousand listeners gets its cap, the rest refused and counted,
    // and every socket goes with its session.
    let refused_before = server.status().counters.listeners_refused;
    let mut handle = russh::client::connect(
        std::sync::Arc::new(russh::client::Config::default()),
        server.local_addr(),
        Bare,
    )
    .await
    .unwrap();
    let k = russh::keys::load_secret_key(&key, None).unwrap();
    let auth = handle
        .authenticate_publickey(
            "ops",
            russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(k), None),
        )
        .await
        .unwrap();
    assert!(auth.success());
    let mut granted = 0;
    for i in 0..1000 {
        if handle
            .streamlocal_forward(format!("{d}/fwd/flood{i}.sock"))
            .await
            .is_ok()
        {
            granted += 1;
        }
    }
    assert_eq!(granted, 4);
    assert_eq!(
        server.status().counters.listeners_refused,
        refused_before + 996
    );
    assert!(fwd.join("flood3.sock").exists() && !fwd.join("flood4.sock").exists());
    handle
        .cancel_streamlocal_forward(format!("{d}/fwd/flood0.sock"))
        .await
        .unwrap();
    assert!(
        !fwd.join("flood0.sock").exists(),
        "cancel removes the socket"
    );
    drop(handle);
    assert!(eventually(10, || !fwd.join("flood1.sock").exists()).await);

    tunnel.stop().await;
    assert!(eventually(10, || !r_sock.exists()).await);
    assert!(
        target.exists(),
        "a socket vipgate did not create is left alone"
    );
}
