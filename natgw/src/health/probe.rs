//! The probes themselves (TCP connect, HTTP GET, HTTPS GET, agent questions) and the task
//! that runs a [`HealthChecker`] and an [`AgentSchedule`].
//!
//! Probes run from the process's own network namespace, i.e. the gateway's, with the kernel's
//! ordinary routing: a director reaches its real servers directly, not through `nat0`.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddrV4;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use super::agent::{AgentProbe, AgentSchedule, MAX_AGENT_LINE, agent_line};
use super::{
    AgentFailure, AgentReply, CheckEvent, CheckKind, CheckTargets, Health, HealthChecker,
    MAX_CHECKED_RESPONSE, Probe, ProbeFailure, TlsCheck, TlsFailure, tls,
};

/// The TLS client of an HTTPS check's settings, or why it could not be built.
pub type TlsClient = Result<TlsConnector, TlsFailure>;

/// The one clock read of the health driver.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// Runs one probe to completion or timeout; `client` is the TLS client of an HTTPS check
/// (see [`tls_clients`]).
pub async fn run_probe(
    addr: SocketAddrV4,
    kind: &CheckKind,
    client: Option<TlsClient>,
    timeout: std::time::Duration,
) -> Result<(), ProbeFailure> {
    match tokio::time::timeout(timeout, probe_once(addr, kind, client)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeFailure::Timeout),
    }
}

async fn probe_once(
    addr: SocketAddrV4,
    kind: &CheckKind,
    client: Option<TlsClient>,
) -> Result<(), ProbeFailure> {
    if let CheckKind::Udp { send, expect } = kind {
        return udp_exchange(addr, send.as_bytes(), expect.as_bytes()).await;
    }
    let stream = TcpStream::connect(addr).await.map_err(|e| match e.kind() {
        ErrorKind::ConnectionRefused => ProbeFailure::Refused,
        _ => ProbeFailure::Unreachable,
    })?;
    let CheckKind::Http {
        path,
        status,
        expect,
        tls: settings,
    } = kind
    else {
        return Ok(());
    };
    let Some(settings) = settings else {
        return http_get(stream, addr, path, *status, expect.as_deref()).await;
    };
    let connector = client
        .unwrap_or(Err(TlsFailure::NoTrustAnchors))
        .map_err(ProbeFailure::Tls)?;
    let stream = connector
        .connect(tls::server_name(settings, addr), stream)
        .await
        .map_err(|e| ProbeFailure::Tls(tls::handshake_failure(&e)))?;
    http_get(stream, addr, path, *status, expect.as_deref()).await
}

/// The TLS client of each HTTPS setting among `kinds`, built once per target list (a reload
/// reads the CA files again). A setting whose client cannot be built is logged; its probes
/// fail with [`TlsFailure::NoTrustAnchors`].
pub fn tls_clients<'a>(
    kinds: impl IntoIterator<Item = &'a CheckKind>,
) -> HashMap<TlsCheck, TlsClient> {
    let mut clients = HashMap::new();
    for kind in kinds {
        if let CheckKind::Http { tls: Some(t), .. } = kind
            && !clients.contains_key(t)
        {
            let client = tls::connector(t).map_err(|e| {
                tracing::warn!(error = %e, "HTTPS health checks cannot verify certificates");
                TlsFailure::NoTrustAnchors
            });
            clients.insert(t.clone(), client);
        }
    }
    clients
}

/// Sends `payload` in one datagram to `addr` and checks that the first answer from there
/// holds `expect` within its first [`MAX_CHECKED_RESPONSE`] bytes (the rest of a larger one
/// is cut off by the read). The socket is connected, so datagrams from anyone else are not
/// read, and an ICMP port unreachable comes back as a refused receive.
async fn udp_exchange(
    addr: SocketAddrV4,
    payload: &[u8],
    expect: &[u8],
) -> Result<(), ProbeFailure> {
    let socket = tokio::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(|_| ProbeFailure::Unreachable)?;
    let refused = |e: std::io::Error| match e.kind() {
        ErrorKind::ConnectionRefused => ProbeFailure::Refused,
        _ => ProbeFailure::Unreachable,
    };
    socket.connect(addr).await.map_err(refused)?;
    socket.send(payload).await.map_err(refused)?;
    let mut answer = vec![0u8; MAX_CHECKED_RESPONSE];
    let n = socket.recv(&mut answer).await.map_err(refused)?;
    if contains(&answer[..n], expect) {
        Ok(())
    } else {
        Err(ProbeFailure::ReplyMismatch)
    }
}

/// Sends `GET path` on `stream` and checks the answer's status and, with `expect`, its body.
async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddrV4,
    path: &str,
    status: u16,
    expect: Option<&str>,
) -> Result<(), ProbeFailure> {
    // HTTP/1.0 with Connection: close keeps the exchange to one request and one answer that
    // ends with the connection, like keepalived's HTTP_GET; the Host header satisfies
    // virtual-host servers.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: vipgate-health\r\nConnection: close\r\n\r\n",
        addr.ip()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|_| ProbeFailure::Unreachable)?;
    let mut answer = Vec::with_capacity(if expect.is_some() {
        MAX_CHECKED_RESPONSE
    } else {
        STATUS_LINE_PREFIX
    });
    let mut chunk = [0u8; 4096];
    // The status first ("HTTP/1.x NNN" is 12 bytes; servers may dribble).
    while answer.len() < STATUS_LINE_PREFIX {
        let n = read_some(&mut stream, &mut chunk).await?;
        if n == 0 {
            return Err(ProbeFailure::BadResponse);
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    let code = parse_status(&answer[..STATUS_LINE_PREFIX]).ok_or(ProbeFailure::BadResponse)?;
    if code != status {
        return Err(ProbeFailure::Status(code));
    }
    let Some(expect) = expect else {
        return Ok(());
    };
    // Then the body, up to the bound: the answer ends with the connection.
    answer.truncate(MAX_CHECKED_RESPONSE);
    loop {
        let body = head_end(&answer).map(|at| &answer[at..]);
        if body.is_some_and(|b| contains(b, expect.as_bytes())) {
            return Ok(());
        }
        // Past the bound or at the end, a missing head is not HTTP; a missing string is a
        // body that does not match.
        let missing = if body.is_some() {
            ProbeFailure::BodyMismatch
        } else {
            ProbeFailure::BadResponse
        };
        let room = MAX_CHECKED_RESPONSE - answer.len();
        if room == 0 {
            return Err(missing);
        }
        let n = read_some(&mut stream, &mut chunk).await?;
        if n == 0 {
            return Err(missing);
        }
        answer.extend_from_slice(&chunk[..n.min(room)]);
    }
}

/// Prefix of an answer that holds the status code.
const STATUS_LINE_PREFIX: usize = 12;

/// One read; 0 at the end. A TLS server that closes without its close_notify has still
/// ended its answer (the probe reads to the end, nothing relies on the length); another
/// error is an unreachable server (reset mid-answer).
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    chunk: &mut [u8],
) -> Result<usize, ProbeFailure> {
    match stream.read(chunk).await {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(0),
        Err(_) => Err(ProbeFailure::Unreachable),
    }
}

/// Where the body starts: after the blank line that ends the head.
fn head_end(answer: &[u8]) -> Option<usize> {
    answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// The status code of an HTTP/1.x status line prefix (`HTTP/1.1 200`).
fn parse_status(head: &[u8]) -> Option<u16> {
    if head.len() < STATUS_LINE_PREFIX || !head.starts_with(b"HTTP/1.") || head[8] != b' ' {
        return None;
    }
    let digits = &head[9..12];
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0')),
    )
}

/// Asks the agent at `addr` for its line: connect, read up to [`MAX_AGENT_LINE`] bytes until
/// a line end or the agent closing, parse. Sends nothing (HAProxy sends nothing either unless
/// told to).
pub async fn ask_agent(
    addr: SocketAddrV4,
    timeout: std::time::Duration,
) -> Result<AgentReply, AgentFailure> {
    let ask = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|_| AgentFailure::Unreachable)?;
        let mut line = [0u8; MAX_AGENT_LINE];
        let mut got = 0;
        loop {
            // Past the bound the buffer is full: agent_line says too long before this read.
            let n = stream
                .read(&mut line[got..])
                .await
                .map_err(|_| AgentFailure::Unreachable)?;
            got += n;
            if let Some(words) = agent_line(&line[..got], n == 0)? {
                return AgentReply::parse(words);
            }
        }
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or(Err(AgentFailure::Timeout))
}

/// Drives a [`HealthChecker`] and an [`AgentSchedule`]: starts due probes and agent
/// questions as tasks, feeds results back, and sends every failed probe, every health change
/// and every agent answer to `events` (a change after logging it). New targets on `targets`
/// replace the current ones (reload). Returns when `targets` is closed or `events` has no
/// receiver.
pub async fn run_checker<K>(
    mut targets: mpsc::Receiver<CheckTargets<K>>,
    events: mpsc::Sender<CheckEvent<K>>,
) where
    K: Clone + PartialEq + std::fmt::Display + Send + Sync + 'static,
{
    let mut checker = HealthChecker::new();
    let mut agents = AgentSchedule::new();
    let mut clients = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Probe<K>, Result<(), ProbeFailure>)>();
    let (answer_tx, mut answer_rx) =
        mpsc::unbounded_channel::<(AgentProbe<K>, Result<AgentReply, AgentFailure>)>();
    loop {
        let at = now();
        while let Some(q) = agents.poll_probe(at) {
            let answered = answer_tx.clone();
            tokio::spawn(async move {
                let outcome = ask_agent(q.addr, q.timeout).await;
                // As for probes: no receiver only when the checker stopped.
                let _ = answered.send((q, outcome));
            });
        }
        while let Some(p) = checker.poll_probe(at) {
            let done = done_tx.clone();
            let client = match &p.kind {
                CheckKind::Http { tls: Some(t), .. } => clients.get(t).cloned(),
                _ => None,
            };
            tokio::spawn(async move {
                let outcome = run_probe(p.addr, &p.kind, client, p.timeout).await;
                // The receiver only goes away when the checker stops; nothing to report then.
                let _ = done.send((p, outcome));
            });
        }
        let deadline = checker
            .poll_timeout()
            .into_iter()
            .chain(agents.poll_timeout())
            .min();
        tokio::select! {
            () = netsys::timer::sleep_until(deadline) => {}
            Some((q, outcome)) = answer_rx.recv() => {
                if agents.handle_result(&q.key, q.seq) {
                    if let Err(why) = outcome {
                        tracing::debug!(target = %q.key, addr = %q.addr, %why, "agent gave no usable answer");
                    }
                    if events.send(CheckEvent::Agent { key: q.key, outcome }).await.is_err() {
                        return;
                    }
                }
            }
            Some((p, outcome)) = done_rx.recv() => {
                // A failure counts even when a reload replaced its target meanwhile (the
                // checker then ignores it): the backend did fail that probe.
                if let Err(why) = outcome {
                    tracing::debug!(target = %p.key, addr = %p.addr, %why, "health probe failed");
                    let failed = CheckEvent::Failed { key: p.key.clone(), why };
                    if events.send(failed).await.is_err() {
                        return;
                    }
                }
                if let Some(t) = checker.handle_result(&p.key, p.seq, outcome) {
                    match (t.health, t.reason) {
                        (Health::Down, Some(why)) => tracing::warn!(target = %t.key, addr = %t.addr, %why, "backend down"),
                        _ => tracing::info!(target = %t.key, addr = %t.addr, health = ?t.health, "backend up"),
                    }
                    if events.send(CheckEvent::Changed(t)).await.is_err() {
                        return;
                    }
                }
            }
            list = targets.recv() => match list {
                Some(list) => {
                    clients = tls_clients(list.checks.iter().map(|t| &t.2.kind));
                    checker.set_targets(now(), list.checks);
                    agents.set_targets(now(), list.agents);
                }
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthConfig;
    use std::time::Duration;
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(2);

    async fn listener() -> (TcpListener, SocketAddrV4) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let std::net::SocketAddr::V4(a) = l.local_addr().unwrap() else {
            unreachable!()
        };
        (l, a)
    }

    /// Serves one connection with a fixed answer.
    fn answer(l: TcpListener, reply: &'static [u8]) {
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /health HTTP/1.0\r\n"));
            s.write_all(reply).await.unwrap();
        });
    }

    fn http(status: u16) -> CheckKind {
        CheckKind::Http {
            path: "/health".into(),
            status,
            expect: None,
            tls: None,
        }
    }

    fn expecting(text: &str) -> CheckKind {
        CheckKind::Http {
            path: "/health".into(),
            status: 200,
            expect: Some(text.into()),
            tls: None,
        }
    }

    #[tokio::test]
    async fn expect_finds_the_string_in_the_body_only() {
        let (l, a) = listener().await;
        answer(l, b"HTTP/1.1 200 OK\r\nX-Up: ok\r\n\r\nstatus: ok\n");
        assert_eq!(
            run_probe(a, &expecting("status: ok"), None, T).await,
            Ok(())
        );
        // In a header but not the body: a mismatch.
        let (l, a) = listener().await;
        answer(l, b"HTTP/1.1 200 OK\r\nX-Up: ok\r\n\r\nstatus: degraded\n");
        assert_eq!(
            run_probe(a, &expecting("X-Up"), None, T).await,
            Err(ProbeFailure::BodyMismatch)
        );
        // The status still comes first.
        let (l, a) = listener().await;
        answer(l, b"HTTP/1.1 500 Oops\r\n\r\nstatus: ok\n");
        assert_eq!(
            run_probe(a, &expecting("status: ok"), None, T).await,
            Err(ProbeFailure::Status(500))
        );
    }

    /// A body that never ends: the probe reads its first 16 KiB, says mismatch at once (not
    /// at the timeout) and closes; a head that never ends is not HTTP.
    #[tokio::test]
    async fn an_endless_body_is_read_to_the_bound_only() {
        for (head, want) in [
            (&b"HTTP/1.1 200 OK\r\n\r\n"[..], ProbeFailure::BodyMismatch),
            (
                &b"HTTP/1.1 200 OK\r\nX-Pad: "[..],
                ProbeFailure::BadResponse,
            ),
        ] {
            let (l, a) = listener().await;
            let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counter = sent.clone();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(head).await.unwrap();
                let filler = [b'x'; 1024];
                while s.write_all(&filler).await.is_ok() {
                    counter.fetch_add(filler.len(), std::sync::atomic::Ordering::Relaxed);
                }
            });
            let started = tokio::time::Instant::now();
            assert_eq!(run_probe(a, &expecting("ok"), None, T).await, Err(want));
            assert!(
                started.elapsed() < T / 2,
                "decided at the bound, not the timeout"
            );
            // Kernel buffers take some more, but the server stops once the probe closed.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let total = sent.load(std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(sent.load(std::sync::atomic::Ordering::Relaxed), total);
        }
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_on_a_listener_and_fails_on_a_closed_port() {
        let (l, a) = listener().await;
        assert_eq!(run_probe(a, &CheckKind::Tcp, None, T).await, Ok(()));
        drop(l);
        assert_eq!(
            run_probe(a, &CheckKind::Tcp, None, T).await,
            Err(ProbeFailure::Refused)
        );
    }

    #[tokio::test]
    async fn http_probe_checks_the_status() {
        let (l, a) = listener().await;
        answer(l, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(run_probe(a, &http(200), None, T).await, Ok(()));
        let (l, a) = listener().await;
        answer(l, b"HTTP/1.0 503 Service Unavailable\r\n\r\n");
        assert_eq!(
            run_probe(a, &http(200), None, T).await,
            Err(ProbeFailure::Status(503))
        );
        let (l, a) = listener().await;
        answer(l, b"SSH-2.0-OpenSSH_9.2\r\n");
        assert_eq!(
            run_probe(a, &http(200), None, T).await,
            Err(ProbeFailure::BadResponse)
        );
    }

    /// A UDP check passes on an answer holding `expect`, fails on another answer, on
    /// silence (timeout) and on a closed port (the ICMP port unreachable: refused).
    #[tokio::test]
    async fn udp_probe_needs_the_expected_answer() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let std::net::SocketAddr::V4(a) = server.local_addr().unwrap() else {
            unreachable!()
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            // Answers "pong rs1" to "ping", anything else with "what?".
            loop {
                let (n, from) = server.recv_from(&mut buf).await.unwrap();
                let reply: &[u8] = if &buf[..n] == b"ping" {
                    b"pong rs1"
                } else {
                    b"what?"
                };
                server.send_to(reply, from).await.unwrap();
            }
        });
        let udp = |send: &str, expect: &str| CheckKind::Udp {
            send: send.into(),
            expect: expect.into(),
        };
        assert_eq!(run_probe(a, &udp("ping", "pong"), None, T).await, Ok(()));
        assert_eq!(
            run_probe(a, &udp("hello", "pong"), None, T).await,
            Err(ProbeFailure::ReplyMismatch)
        );
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(quiet) = silent.local_addr().unwrap() else {
            unreachable!()
        };
        let short = Duration::from_millis(100);
        assert_eq!(
            run_probe(quiet, &udp("ping", "pong"), None, short).await,
            Err(ProbeFailure::Timeout)
        );
        drop(silent);
        assert_eq!(
            run_probe(quiet, &udp("ping", "pong"), None, T).await,
            Err(ProbeFailure::Refused)
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let (l, a) = listener().await;
        // Accepts (the kernel completes the handshake) but never answers.
        let _keep = l;
        let r = run_probe(a, &http(200), None, Duration::from_millis(100)).await;
        assert_eq!(r, Err(ProbeFailure::Timeout));
    }

    #[tokio::test]
    async fn checker_reports_a_backend_going_down_and_coming_back() {
        let (l, a) = listener().await;
        let (tx, rx) = mpsc::channel(1);
        let (ctx, mut crx) = mpsc::channel(4);
        tokio::spawn(run_checker(rx, ctx));
        let cfg = HealthConfig {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            rise: 2,
            fall: 2,
            ..HealthConfig::default()
        };
        tx.send(CheckTargets {
            checks: vec![("rs1".to_string(), a, cfg, Health::Up)],
            agents: Vec::new(),
        })
        .await
        .unwrap();
        drop(l);
        // Every failed probe is reported, `fall` of them before the change they cause.
        let mut failed = 0;
        let down = loop {
            match tokio::time::timeout(T, crx.recv()).await.unwrap().unwrap() {
                CheckEvent::Failed { key, why } => {
                    assert_eq!((key.as_str(), why), ("rs1", ProbeFailure::Refused));
                    failed += 1;
                }
                CheckEvent::Changed(t) => break t,
                CheckEvent::Agent { .. } => unreachable!("no agent was configured"),
            }
        };
        assert_eq!(
            (down.health, down.reason, failed),
            (Health::Down, Some(ProbeFailure::Refused), 2)
        );
        let l = TcpListener::bind(a).await.unwrap();
        // Failures of probes already under way may still arrive before the recovery.
        let up = loop {
            match tokio::time::timeout(T, crx.recv()).await.unwrap().unwrap() {
                CheckEvent::Failed { .. } => {}
                CheckEvent::Changed(t) => break t,
                CheckEvent::Agent { .. } => unreachable!("no agent was configured"),
            }
        };
        assert_eq!((up.key.as_str(), up.health), ("rs1", Health::Up));
        drop(l);
    }

    /// A self-signed certificate for `names` and a one-connection HTTPS server that
    /// presents it and answers 200 "ok".
    struct TlsBackend {
        addr: SocketAddrV4,
        cert_pem: String,
    }

    async fn tls_backend(names: &[&str]) -> TlsBackend {
        use rustls::ServerConfig;
        use rustls::pki_types::PrivateKeyDer;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let config = ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            // A client that refuses the certificate ends the handshake: nothing to serve.
            let Ok(mut s) = acceptor.accept(s).await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nok\n").await;
            let _ = s.shutdown().await;
        });
        TlsBackend {
            addr,
            cert_pem: certified.cert.pem(),
        }
    }

    fn https(sni: Option<&str>, verify: bool, ca_file: Option<&std::path::Path>) -> CheckKind {
        CheckKind::Http {
            path: "/health".into(),
            status: 200,
            expect: Some("ok".into()),
            tls: Some(TlsCheck {
                sni: sni.map(str::to_owned),
                verify,
                ca_file: ca_file.map(std::path::Path::to_path_buf),
            }),
        }
    }

    async fn probe_https(addr: SocketAddrV4, kind: &CheckKind) -> Result<(), ProbeFailure> {
        let client = tls_clients([kind]).into_values().next();
        run_probe(addr, kind, client, T).await
    }

    #[tokio::test]
    async fn https_checks_verify_the_certificate_unless_told_not_to() {
        let dir = std::env::temp_dir().join(format!("vipgate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let other = tls_backend(&["127.0.0.1"]).await;
        let other_ca = dir.join("other.pem");
        std::fs::write(&other_ca, &other.cert_pem).unwrap();

        // Trusted through ca_file, and naming the address the probe connects to.
        let b = tls_backend(&["127.0.0.1", "backend.example"]).await;
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &b.cert_pem).unwrap();
        assert_eq!(
            probe_https(b.addr, &https(None, true, Some(&ca))).await,
            Ok(())
        );
        // The SNI name is the name verified.
        let b = tls_backend(&["127.0.0.1"]).await;
        std::fs::write(&ca, &b.cert_pem).unwrap();
        assert_eq!(
            probe_https(b.addr, &https(Some("backend.example"), true, Some(&ca))).await,
            Err(ProbeFailure::Tls(TlsFailure::NameMismatch))
        );
        // Another CA's certificate: not trusted; with verify = false, up.
        let b = tls_backend(&["127.0.0.1"]).await;
        assert_eq!(
            probe_https(b.addr, &https(None, true, Some(&other_ca))).await,
            Err(ProbeFailure::Tls(TlsFailure::Untrusted))
        );
        let b = tls_backend(&["127.0.0.1"]).await;
        assert_eq!(
            probe_https(b.addr, &https(Some("x.example"), false, None)).await,
            Ok(())
        );
        // A plain HTTP server is not a TLS one.
        let (l, a) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nok\n").await;
        });
        assert_eq!(
            probe_https(a, &https(None, false, None)).await,
            Err(ProbeFailure::Tls(TlsFailure::Handshake))
        );
        // An unreadable CA file fails every probe, with the reason.
        let missing = dir.join("missing.pem");
        let (_l, a) = listener().await;
        assert_eq!(
            probe_https(a, &https(None, true, Some(&missing))).await,
            Err(ProbeFailure::Tls(TlsFailure::NoTrustAnchors))
        );
        std::fs::write(&ca, "not a certificate").unwrap();
        assert!(matches!(
            tls::load_ca_file(&ca),
            Err(tls::TlsSetupError::NoCertificates(_))
        ));
        assert!(tls::valid_sni("backend.example") && !tls::valid_sni("10.0.0.1"));
        assert!(!tls::valid_sni("bad name"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An agent that answers `reply` once, then closes.
    async fn agent(reply: &'static [u8]) -> SocketAddrV4 {
        let (l, a) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(reply).await;
        });
        a
    }

    #[tokio::test]
    async fn agents_answer_one_bounded_line() {
        let said = ask_agent(agent(b"drain 50%\n").await, T).await;
        assert_eq!(said, AgentReply::parse(b"drain 50%"));
        // Closed without a line end: the line still counts.
        let said = ask_agent(agent(b"up").await, T).await;
        assert_eq!(said, AgentReply::parse(b"up"));
        assert_eq!(
            ask_agent(agent(b"bonjour\n").await, T).await,
            Err(AgentFailure::Malformed)
        );
        let (l, a) = listener().await;
        drop(l);
        assert_eq!(ask_agent(a, T).await, Err(AgentFailure::Unreachable));
        // Silent: the timeout.
        let (_l, a) = listener().await;
        assert_eq!(
            ask_agent(a, Duration::from_millis(100)).await,
            Err(AgentFailure::Timeout)
        );
    }

    /// An agent that sends an endless line: read to the bound, then hung up on, at once.
    #[tokio::test]
    async fn an_endless_agent_line_is_cut_at_the_bound() {
        let (l, a) = listener().await;
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            while s.write_all(&[b'7'; 512]).await.is_ok() {
                counter.fetch_add(512, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let started = tokio::time::Instant::now();
        assert_eq!(ask_agent(a, T).await, Err(AgentFailure::TooLong));
        assert!(started.elapsed() < T / 2);
    }

    #[tokio::test]
    async fn the_checker_passes_agent_answers_on() {
        let a = agent(b"maint\n").await;
        let (tx, rx) = mpsc::channel(1);
        let (ctx, mut crx) = mpsc::channel(4);
        tokio::spawn(run_checker(rx, ctx));
        tx.send(CheckTargets {
            checks: Vec::new(),
            agents: vec![("rs1".to_string(), a, Duration::from_secs(60), T)],
        })
        .await
        .unwrap();
        let event = tokio::time::timeout(T, crx.recv()).await.unwrap().unwrap();
        assert_eq!(
            event,
            CheckEvent::Agent {
                key: "rs1".to_string(),
                outcome: AgentReply::parse(b"maint"),
            }
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 204"), Some(204));
        assert_eq!(parse_status(b"HTTP/1.0 200"), Some(200));
        assert_eq!(parse_status(b"HTTP/2.0 200"), None);
        assert_eq!(parse_status(b"HTTP/1.1 2x0"), None);
    }
}
