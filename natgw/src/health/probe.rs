//! The probes themselves (TCP connect, HTTP GET) and the task that runs a [`HealthChecker`].
//!
//! Probes run from the process's own network namespace, i.e. the gateway's, with the kernel's
//! ordinary routing: a director reaches its real servers directly, not through `nat0`.

use std::io::ErrorKind;
use std::net::SocketAddrV4;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{CheckEvent, CheckKind, Health, HealthChecker, HealthConfig, Probe, ProbeFailure};

/// The one clock read of the health driver.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// Runs one probe to completion or timeout.
pub async fn run_probe(
    addr: SocketAddrV4,
    kind: &CheckKind,
    timeout: std::time::Duration,
) -> Result<(), ProbeFailure> {
    match tokio::time::timeout(timeout, probe_once(addr, kind)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeFailure::Timeout),
    }
}

async fn probe_once(addr: SocketAddrV4, kind: &CheckKind) -> Result<(), ProbeFailure> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| match e.kind() {
        ErrorKind::ConnectionRefused => ProbeFailure::Refused,
        _ => ProbeFailure::Unreachable,
    })?;
    let CheckKind::Http { path, status } = kind else {
        return Ok(());
    };
    // HTTP/1.0 with Connection: close keeps the exchange to one request and one status line,
    // like keepalived's HTTP_GET; the Host header satisfies virtual-host servers.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: vipgate-health\r\nConnection: close\r\n\r\n",
        addr.ip()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|_| ProbeFailure::Unreachable)?;
    // "HTTP/1.x NNN" is 12 bytes; read until we have them (servers may dribble).
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]).await {
            Ok(0) => return Err(ProbeFailure::BadResponse),
            Ok(n) => got += n,
            Err(_) => return Err(ProbeFailure::Unreachable),
        }
    }
    let code = parse_status(&head).ok_or(ProbeFailure::BadResponse)?;
    if code == *status {
        Ok(())
    } else {
        Err(ProbeFailure::Status(code))
    }
}

/// The status code of an HTTP/1.x status line prefix (`HTTP/1.1 200`).
fn parse_status(head: &[u8; 12]) -> Option<u16> {
    if !head.starts_with(b"HTTP/1.") || head[8] != b' ' {
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

/// One checked target, as [`run_checker`] takes them.
pub type TargetSpec<K> = (K, SocketAddrV4, HealthConfig, Health);

/// Drives a [`HealthChecker`]: starts due probes as tasks, feeds results back, and sends every
/// failed probe and every health change to `events` (a change after logging it). A new target
/// list on `targets` replaces the current one (reload). Returns when `targets` is closed or
/// `events` has no receiver.
pub async fn run_checker<K>(
    mut targets: mpsc::Receiver<Vec<TargetSpec<K>>>,
    events: mpsc::Sender<CheckEvent<K>>,
) where
    K: Clone + PartialEq + std::fmt::Display + Send + Sync + 'static,
{
    let mut checker = HealthChecker::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Probe<K>, Result<(), ProbeFailure>)>();
    loop {
        let at = now();
        while let Some(p) = checker.poll_probe(at) {
            let done = done_tx.clone();
            tokio::spawn(async move {
                let outcome = run_probe(p.addr, &p.kind, p.timeout).await;
                // The receiver only goes away when the checker stops; nothing to report then.
                let _ = done.send((p, outcome));
            });
        }
        let deadline = checker.poll_timeout();
        tokio::select! {
            () = netsys::timer::sleep_until(deadline) => {}
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
                Some(list) => checker.set_targets(now(), list),
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        }
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_on_a_listener_and_fails_on_a_closed_port() {
        let (l, a) = listener().await;
        assert_eq!(run_probe(a, &CheckKind::Tcp, T).await, Ok(()));
        drop(l);
        assert_eq!(
            run_probe(a, &CheckKind::Tcp, T).await,
            Err(ProbeFailure::Refused)
        );
    }

    #[tokio::test]
    async fn http_probe_checks_the_status() {
        let (l, a) = listener().await;
        answer(l, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(run_probe(a, &http(200), T).await, Ok(()));
        let (l, a) = listener().await;
        answer(l, b"HTTP/1.0 503 Service Unavailable\r\n\r\n");
        assert_eq!(
            run_probe(a, &http(200), T).await,
            Err(ProbeFailure::Status(503))
        );
        let (l, a) = listener().await;
        answer(l, b"SSH-2.0-OpenSSH_9.2\r\n");
        assert_eq!(
            run_probe(a, &http(200), T).await,
            Err(ProbeFailure::BadResponse)
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let (l, a) = listener().await;
        // Accepts (the kernel completes the handshake) but never answers.
        let _keep = l;
        let r = run_probe(a, &http(200), Duration::from_millis(100)).await;
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
        tx.send(vec![("rs1".to_string(), a, cfg, Health::Up)])
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
            }
        };
        assert_eq!((up.key.as_str(), up.health), ("rs1", Health::Up));
        drop(l);
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 204"), Some(204));
        assert_eq!(parse_status(b"HTTP/1.0 200"), Some(200));
        assert_eq!(parse_status(b"HTTP/2.0 200"), None);
        assert_eq!(parse_status(b"HTTP/1.1 2x0"), None);
    }
}
