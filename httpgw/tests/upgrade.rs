//! `Upgrade` (WebSocket) through the gateway against raw sockets: the switch passed on, bytes
//! spliced both ways intact, a declined switch closing the connection, the tunnel's idle
//! timeout, `h2c` never tunnelled.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balance::{BackendConfig, PoolConfig, SchedulerKind};
use httpgw::hygiene::Forwarding;
use httpgw::route::{Action, HeaderRules, Match, Route};
use httpgw::{GatewayConfig, HttpGateway, Limits, PoolSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Reads up to the end of a head; returns it and what followed.
async fn read_head(tcp: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8_lossy(&buf).to_ascii_lowercase(), rest);
        }
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "EOF inside a head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A backend that switches to an echo of every byte when asked for `websocket` (except on
/// `/decline`), and answers 200 otherwise; it records each head it got.
async fn backend() -> (SocketAddrV4, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&heads);
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let (head, rest) = read_head(&mut tcp).await;
                seen.lock().unwrap().push(head.clone());
                if head.contains("upgrade: websocket") && !head.starts_with("get /decline") {
                    tcp.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                        .await
                        .unwrap();
                    tcp.write_all(&rest).await.unwrap();
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                } else {
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
                        .await;
                }
            });
        }
    });
    (addr, heads)
}

async fn gateway(tunnel_timeout: Duration) -> (HttpGateway, Arc<Mutex<Vec<String>>>) {
    let (addr, heads) = backend().await;
    let config = GatewayConfig {
        name: "ws".into(),
        listen: SocketAddrV4::new(LOCAL, 0),
        routes: vec![Route {
            name: "default".into(),
            when: Match::default(),
            action: Action::Forward {
                pool: 0,
                strip_prefix: None,
                canary: None,
            },
            rewrite: HeaderRules::default(),
        }],
        pools: vec![PoolSpec {
            health: None,
            eject: None,
            retries: PoolSpec::DEFAULT_RETRIES,
            proxy_protocol: false,
            name: "echo".into(),
            balance: PoolConfig {
                scheduler: SchedulerKind::Rr,
                backends: vec![BackendConfig::new(addr, 1)],
                ..PoolConfig::default()
            },
            cookie: None,
            tls: None,
        }],
        forwarding: Forwarding::default(),
        limits: Limits {
            tunnel_timeout,
            ..Limits::default()
        },
        access_log: false,
        tls: None,
    };
    (HttpGateway::start(&config).await.unwrap(), heads)
}

fn upgrade(path: &str, protocol: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: {protocol}\r\n\r\n")
        .into_bytes()
}

#[tokio::test]
async fn a_websocket_switch_splices_bytes_both_ways() {
    let (gw, heads) = gateway(Duration::from_secs(30)).await;
    let mut tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    // The client's first bytes right behind the head: held back by the guard, then tunnelled.
    let mut hello = upgrade("/chat", "websocket");
    hello.extend_from_slice(b"early!");
    tcp.write_all(&hello).await.unwrap();
    let (head, mut echoed) = read_head(&mut tcp).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    let sent = heads.lock().unwrap()[0].clone();
    assert!(sent.contains("upgrade: websocket"), "{sent}");
    assert!(sent.contains("connection: upgrade"), "{sent}");
    assert!(sent.contains("x-forwarded-for: 127.0.0.1"), "{sent}");

    // 1 MiB of patterned bytes up, the same back, while both directions run.
    let payload: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (mut r, mut w) = tcp.into_split();
    let up = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&up).await.unwrap();
        w.shutdown().await.unwrap();
    });
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut echoed))
        .await
        .expect("the echo ends after the client's EOF")
        .unwrap();
    writer.await.unwrap();
    let mut want = b"early!".to_vec();
    want.extend_from_slice(&payload);
    assert_eq!(echoed.len(), want.len());
    assert!(echoed == want, "bytes differ");
    assert_eq!(gw.status().responses.info, 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_declined_switch_closes_and_h2c_is_never_tunnelled() {
    let (gw, heads) = gateway(Duration::from_secs(30)).await;
    for (path, protocol) in [("/decline", "websocket"), ("/", "h2c")] {
        let mut tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
        let mut bytes = upgrade(path, protocol);
        // Looks like a second request; it is held back and never read as one.
        bytes.extend_from_slice(b"GET /hidden HTTP/1.1\r\nHost: a\r\n\r\n");
        tcp.write_all(&bytes).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
            .await
            .expect("closed after the answer")
            .unwrap();
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{text}");
        assert!(text.contains("connection: close"), "{text}");
        assert!(text.ends_with("no"), "{text}");
    }
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads.iter().all(|h| !h.contains("/hidden")), "{heads:?}");
    // h2c: neither Upgrade nor Connection: upgrade reaches the backend.
    assert!(!heads[1].contains("upgrade"), "{}", heads[1]);
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_at_its_timeout() {
    let (gw, _) = gateway(Duration::from_millis(300)).await;
    let mut tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    tcp.write_all(&upgrade("/", "websocket")).await.unwrap();
    let (head, _) = read_head(&mut tcp).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    tcp.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    let started = tokio::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut out))
        .await
        .expect("an idle tunnel is closed")
        .ok();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    gw.stop().await;
}
