//! The driver against real sockets: a hyper backend per pool member, raw HTTP/1.1 bytes from
//! the client side (so malformed requests can be sent as they are).

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use balance::{BackendConfig, PoolConfig, SchedulerKind};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use httpgw::hygiene::Forwarding;
use httpgw::route::{Action, HeaderRules, HostPattern, Match, PathPattern, RedirectTarget, Route};
use httpgw::{GatewayConfig, HttpGateway, Limits, PoolSpec};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A backend answering `NAME PATH xff=... body=LEN` and counting requests; `/slow` never
/// answers.
async fn backend(name: &'static str) -> (SocketAddrV4, Arc<AtomicU64>) {
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let hits = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let hits = Arc::clone(&counted);
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let hits = Arc::clone(&hits);
                    async move {
                        hits.fetch_add(1, Ordering::SeqCst);
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        let xff = req
                            .headers()
                            .get("x-forwarded-for")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let path = req.uri().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let text = format!("{name} {path} xff={xff} body={}", body.len());
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

fn pool(name: &str, backends: &[SocketAddrV4]) -> PoolSpec {
    PoolSpec {
        health: None,
        eject: None,
        retries: PoolSpec::DEFAULT_RETRIES,
        proxy_protocol: false,
        name: name.into(),
        balance: PoolConfig {
            scheduler: SchedulerKind::Rr,
            backends: backends.iter().map(|a| BackendConfig::new(*a, 1)).collect(),
            ..PoolConfig::default()
        },
        cookie: None,
        tls: None,
    }
}

fn route(name: &str, when: Match, action: Action) -> Route {
    Route {
        name: name.into(),
        when,
        action,
        rewrite: HeaderRules::default(),
    }
}

fn to(pool: usize, strip: Option<&str>) -> Action {
    Action::Forward {
        pool,
        strip_prefix: strip.map(str::to_owned),
        canary: None,
    }
}

struct Site {
    gateway: HttpGateway,
    config: GatewayConfig,
    web: Arc<AtomicU64>,
    api: Arc<AtomicU64>,
}

async fn site() -> Site {
    let (web_addr, web) = backend("web").await;
    let (api_addr, api) = backend("api").await;
    // a port nobody listens on: bind, note it, close
    let closed = {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let SocketAddr::V4(a) = l.local_addr().unwrap() else {
            unreachable!()
        };
        a
    };
    let config = GatewayConfig {
        name: "test".into(),
        listen: SocketAddrV4::new(LOCAL, 0),
        routes: vec![
            route(
                "api",
                Match {
                    hosts: vec![HostPattern::parse("*.example.com").unwrap()],
                    paths: vec![PathPattern::prefix("/api/").unwrap()],
                    ..Match::default()
                },
                to(1, Some("/api")),
            ),
            route(
                "old",
                Match {
                    paths: vec![PathPattern::exact("/old").unwrap()],
                    ..Match::default()
                },
                Action::redirect(
                    301,
                    RedirectTarget::Prefix("https://new.example.com".into()),
                )
                .unwrap(),
            ),
            route(
                "dead",
                Match {
                    hosts: vec![HostPattern::parse("dead.test").unwrap()],
                    ..Match::default()
                },
                to(2, None),
            ),
            route(
                "empty",
                Match {
                    hosts: vec![HostPattern::parse("empty.test").unwrap()],
                    ..Match::default()
                },
                to(3, None),
            ),
            route("default", Match::default(), to(0, None)),
        ],
        pools: vec![
            pool("web", &[web_addr]),
            pool("api", &[api_addr]),
            pool("dead", &[closed]),
            pool("empty", &[]),
        ],
        forwarding: Forwarding::default(),
        limits: Limits {
            max_header_bytes: 1024,
            max_body_bytes: 1000,
            upstream_timeout: Duration::from_millis(500),
            header_timeout: Duration::from_millis(300),
            max_connections: 4,
            ..Limits::default()
        },
        access_log: false,
        tls: None,
    };
    Site {
        gateway: HttpGateway::start(&config).await.unwrap(),
        config,
        web,
        api,
    }
}

/// Sends `raw`, reads until the gateway closes (or `Connection: close` answers end).
async fn exchange(gw: &HttpGateway, raw: &[u8]) -> String {
    let mut tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    tcp.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .expect("gateway answered and closed")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn routes_rewrite_and_forward() {
    let s = site().await;
    let r = exchange(&s.gateway, &get("shop.example.com", "/api/items?x=1")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("api /items?x=1 xff=127.0.0.1 body=0"), "{r}");
    let r = exchange(&s.gateway, &get("example.com", "/api/items")).await;
    assert!(r.ends_with("web /api/items xff=127.0.0.1 body=0"), "{r}");
    let r = exchange(&s.gateway, &get("a", "/old?q=2")).await;
    assert!(r.starts_with("HTTP/1.1 301"), "{r}");
    assert!(
        r.to_ascii_lowercase()
            .contains("location: https://new.example.com/old?q=2"),
        "{r}"
    );
    // keep-alive: two requests, one connection, then a body
    let two = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let r = exchange(&s.gateway, two).await;
    assert!(r.contains("web /1 xff=127.0.0.1 body=0"), "{r}");
    assert!(r.ends_with("web /2 xff=127.0.0.1 body=5"), "{r}");
    let status = s.gateway.status();
    assert_eq!(status.requests, 5);
    assert_eq!(status.responses.success, 4);
    assert_eq!(status.responses.redirect, 1);
    assert_eq!(status.pools[0].backends[0].requests, 3);
    assert_eq!(s.web.load(Ordering::SeqCst), 3);
    s.gateway.stop().await;
}

#[tokio::test]
async fn smuggling_attempts_never_reach_a_backend() {
    let s = site().await;
    let attempts: [&[u8]; 4] = [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nContent-Length: 7\r\n\r\nabcdefg",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
    ];
    for raw in attempts {
        let r = exchange(&s.gateway, raw).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    }
    let r = exchange(&s.gateway, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(s.web.load(Ordering::SeqCst), 0);
    // a clean request before a smuggling one on the same connection is served, the other not
    let r = exchange(
        &s.gateway,
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(r.contains("web /first"), "{r}");
    assert!(r.contains("HTTP/1.1 400"), "{r}");
    assert_eq!(s.web.load(Ordering::SeqCst), 1);
    assert_eq!(s.gateway.status().refused, 6);
    s.gateway.stop().await;
}

#[tokio::test]
async fn limits_answer_with_their_status() {
    let s = site().await;
    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "a".repeat(2000)
    );
    assert!(
        exchange(&s.gateway, big_head.as_bytes())
            .await
            .starts_with("HTTP/1.1 431")
    );
    let declared = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n";
    assert!(
        exchange(&s.gateway, declared)
            .await
            .starts_with("HTTP/1.1 413")
    );
    let chunk = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n",
        "b".repeat(2000)
    );
    assert!(
        exchange(&s.gateway, chunk.as_bytes())
            .await
            .starts_with("HTTP/1.1 413")
    );
    assert!(
        exchange(&s.gateway, &get("empty.test", "/"))
            .await
            .starts_with("HTTP/1.1 503")
    );
    assert!(
        exchange(&s.gateway, &get("dead.test", "/"))
            .await
            .starts_with("HTTP/1.1 502")
    );
    assert!(
        exchange(&s.gateway, &get("a", "/slow"))
            .await
            .starts_with("HTTP/1.1 504")
    );
    assert_eq!(s.api.load(Ordering::SeqCst), 0);
    let status = s.gateway.status();
    assert_eq!(status.responses.client_error, 3);
    assert_eq!(status.responses.server_error, 3);
    assert_eq!(status.pools[2].backends[0].failures, 1);
    s.gateway.stop().await;
}

#[tokio::test]
async fn slow_heads_are_cut_and_connections_bounded() {
    let s = site().await;
    // slowloris: a head that never ends is cut at header_timeout
    let mut slow = TcpStream::connect(s.gateway.local_addr()).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut out))
        .await
        .expect("a slow head is cut")
        .ok();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(s.web.load(Ordering::SeqCst), 0);
    // four idle connections hold every slot: a fifth waits until one goes
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(s.gateway.local_addr()).await.unwrap());
    }
    until("four connections served", || {
        s.gateway.status().connections == 4
    })
    .await;
    let waiting = tokio::spawn({
        let addr = s.gateway.local_addr();
        async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(&get("a", "/late")).await.unwrap();
            let mut out = Vec::new();
            tcp.read_to_end(&mut out).await.unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }
    });
    // the idle ones are cut by the header timeout too, which frees the slots
    let r = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("served once a slot frees")
        .unwrap();
    assert!(r.ends_with("web /late xff=127.0.0.1 body=0"), "{r}");
    drop(idle);
    s.gateway.stop().await;
}

#[tokio::test]
async fn connections_are_spread_over_the_workers() {
    let s = site().await;
    let workers = s.gateway.status().workers.len();
    assert_eq!(
        workers,
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        "a worker per CPU"
    );
    // one after the other, each answered before the next opens: the least busy worker takes
    // each, so no worker has two more than another
    let mut open = Vec::new();
    for i in 0..4 {
        let mut tcp = TcpStream::connect(s.gateway.local_addr()).await.unwrap();
        let path = format!("/w{i}");
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answer = read_answer(&mut tcp).await;
        assert!(answer.contains(&format!("web {path} ")), "{answer}");
        open.push(tcp);
    }
    let status = s.gateway.status();
    assert_eq!(status.connections, 4);
    assert_eq!(
        status.workers.iter().sum::<u64>(),
        4,
        "{:?}",
        status.workers
    );
    let (most, least) = (status.workers.iter().max(), status.workers.iter().min());
    assert!(
        most.zip(least).is_some_and(|(m, l)| m - l <= 1),
        "{:?}",
        status.workers
    );
    drop(open);
    until("closed connections leave their workers", || {
        s.gateway.status().workers.iter().sum::<u64>() == 0
    })
    .await;
    s.gateway.stop().await;
}

/// Polls `f` every 10 ms until it holds, for at most 3 s.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_client_gone_before_the_answer_is_499_not_a_backend_failure() {
    let s = site().await;
    // Closed while the backend works on it (before the 500 ms upstream timeout).
    let mut tcp = TcpStream::connect(s.gateway.local_addr()).await.unwrap();
    tcp.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    until("the backend to get it", || {
        s.web.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(tcp);
    until("the cancel to be counted", || {
        s.gateway.status().cancelled == 1
    })
    .await;
    // Closed in the middle of its body.
    let mut tcp = TcpStream::connect(s.gateway.local_addr()).await.unwrap();
    tcp.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    until("the second cancel", || s.gateway.status().cancelled == 2).await;
    // Still sending it, too slowly: 408 at the header timeout (300 ms) between reads.
    let r = exchange(
        &s.gateway,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    let status = s.gateway.status();
    assert_eq!(status.responses.server_error, 0, "{status:?}");
    assert_eq!(status.responses.client_error, 3, "{status:?}");
    assert_eq!(status.refused, 1);
    let backend = &status.pools[0].backends[0];
    assert_eq!((backend.active, backend.failures), (0, 0));
    assert_eq!(s.web.load(Ordering::SeqCst), 1);
    s.gateway.stop().await;
}

/// Reads one answer with a `Content-Length` body from a keep-alive connection.
async fn read_answer(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_reload_moves_the_next_request_of_an_open_connection_and_stop_drains() {
    let s = site().await;
    let mut kept = TcpStream::connect(s.gateway.local_addr()).await.unwrap();
    kept.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let r = read_answer(&mut kept).await;
    assert!(r.ends_with("web /1 xff=127.0.0.1 body=0"), "{r}");

    // The default route now forwards to `api`; the drain bound is cut to 1 s.
    let mut config = s.config.clone();
    config.routes[4].action = to(1, None);
    config.limits.drain_timeout = Duration::from_secs(1);
    let reload = s.gateway.reconfigure(&config).unwrap();
    assert_eq!(reload.to_string(), "routes ~default; limits");
    kept.write_all(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let r = read_answer(&mut kept).await;
    assert!(r.ends_with("api /2 xff=127.0.0.1 body=0"), "{r}");
    let status = s.gateway.status();
    assert_eq!(status.routes[4].requests, 2);
    assert_eq!(status.pools[1].backends[0].requests, 1);

    // A broken config is refused whole.
    let mut broken = config.clone();
    broken.routes[0].action = to(9, None);
    assert!(s.gateway.reconfigure(&broken).is_err());

    // Stopping: the idle connection is closed at once; the one waiting for `/slow` (which
    // never answers) gets its answer (504 at the upstream timeout) with `Connection: close`.
    let mut waiting = TcpStream::connect(s.gateway.local_addr()).await.unwrap();
    waiting
        .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    while s.api.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let addr = s.gateway.local_addr();
    let stopping = tokio::spawn(s.gateway.stop());
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_millis(500), kept.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stop returns after the drain bound")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), waiting.read_to_end(&mut answer))
        .await
        .expect("the connection closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 504"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}
