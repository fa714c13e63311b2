//! TLS termination against real sockets: rustls clients with and without SNI, a route on the
//! server name, and hostile handshakes (garbage, one that never finishes).

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use balance::{BackendConfig, PoolConfig, SchedulerKind};
use bytes::Bytes;
use http_body_util::Full;
use httpgw::hygiene::Forwarding;
use httpgw::route::{Action, HeaderRules, HostPattern, Match, Route};
use httpgw::{CertFiles, GatewayConfig, HttpGateway, Limits, PoolSpec, TlsConfig};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A backend answering `NAME proto=X-FORWARDED-PROTO host=HOST` and counting requests.
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
                    hits.fetch_add(1, Ordering::SeqCst);
                    let field = |n: &str| {
                        req.headers()
                            .get(n)
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default()
                    };
                    let text = format!(
                        "{name} proto={} host={}",
                        field("x-forwarded-proto"),
                        field("host")
                    );
                    async move {
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

/// A self-signed certificate for `names`, written to `dir`; its DER.
fn cert(dir: &Path, file: &str, names: &[&str]) -> (CertFiles, CertificateDer<'static>) {
    use std::os::unix::fs::PermissionsExt as _;
    let made = rcgen::generate_simple_self_signed(
        names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
    )
    .unwrap();
    let files = CertFiles {
        cert_file: dir.join(format!("{file}.pem")),
        key_file: dir.join(format!("{file}.key")),
    };
    std::fs::write(&files.cert_file, made.cert.pem()).unwrap();
    std::fs::write(&files.key_file, made.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    (files, made.cert.der().clone())
}

/// Accepts any certificate (the test compares the one it got), checks signatures.
#[derive(Debug)]
struct AnyCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A client offering HTTP/1.1 only by ALPN (these tests speak it raw).
fn client(sni: bool, versions: &[&'static rustls::SupportedProtocolVersion]) -> TlsConnector {
    client_alpn(sni, versions, &["http/1.1"])
}

fn client_alpn(
    sni: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&str],
) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let mut config = ClientConfig::builder_with_provider(Arc::<CryptoProvider>::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(algorithms)))
        .with_no_client_auth();
    config.enable_sni = sni;
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

struct Answer {
    cert: CertificateDer<'static>,
    alpn: Option<Vec<u8>>,
    version: Option<rustls::ProtocolVersion>,
    text: String,
}

/// A TLS connection naming `name` (sent as SNI when `sni`), one request for `host`.
async fn request(
    gw: &HttpGateway,
    connector: &TlsConnector,
    name: &str,
    host: &str,
    raw: Option<&str>,
) -> Answer {
    let tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let (_, session) = tls.get_ref();
    let cert = session.peer_certificates().unwrap()[0].clone();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let version = session.protocol_version();
    let default = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(raw.unwrap_or(&default).as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out))
        .await
        .expect("answered and closed")
        .ok();
    Answer {
        cert,
        alpn,
        version,
        text: String::from_utf8_lossy(&out).into_owned(),
    }
}

#[tokio::test]
async fn sni_picks_the_certificate_and_the_route() {
    let dir = std::env::temp_dir().join(format!("httpgw-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (default_files, default_der) = cert(&dir, "default", &["default.test"]);
    let (a_files, a_der) = cert(&dir, "a", &["a.example.com"]);
    let (w_files, w_der) = cert(&dir, "w", &["*.w.example.com"]);
    let (web_addr, web) = backend("web").await;
    let (a_addr, a) = backend("a").await;
    let pool = |name: &str, addr| PoolSpec {
        health: None,
        eject: None,
        retries: PoolSpec::DEFAULT_RETRIES,
        proxy_protocol: false,
        name: name.into(),
        balance: PoolConfig {
            scheduler: SchedulerKind::Rr,
            backends: vec![BackendConfig::new(addr, 1)],
            ..PoolConfig::default()
        },
        cookie: None,
        tls: None,
    };
    let config = GatewayConfig {
        name: "tls".into(),
        listen: SocketAddrV4::new(LOCAL, 0),
        routes: vec![
            Route {
                name: "a".into(),
                when: Match {
                    sni: vec![HostPattern::parse("a.example.com").unwrap()],
                    ..Match::default()
                },
                action: Action::Forward {
                    pool: 1,
                    strip_prefix: None,
                    canary: None,
                },
                rewrite: HeaderRules::default(),
            },
            Route {
                name: "default".into(),
                when: Match::default(),
                action: Action::Forward {
                    pool: 0,
                    strip_prefix: None,
                    canary: None,
                },
                rewrite: HeaderRules::default(),
            },
        ],
        pools: vec![pool("web", web_addr), pool("a", a_addr)],
        forwarding: Forwarding::default(),
        limits: Limits::default(),
        access_log: false,
        tls: Some(TlsConfig {
            certs: vec![default_files, a_files, w_files],
            handshake_timeout: Duration::from_millis(300),
            alpn: TlsConfig::DEFAULT_ALPN.to_vec(),
        }),
    };
    let gw = HttpGateway::start(&config).await.unwrap();
    let both = client(true, &[&rustls::version::TLS13, &rustls::version::TLS12]);

    let r = request(&gw, &both, "a.example.com", "a.example.com", None).await;
    assert_eq!(r.cert, a_der);
    assert_eq!(r.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(r.text.starts_with("HTTP/1.1 200"), "{}", r.text);
    assert!(
        r.text.ends_with("a proto=https host=a.example.com"),
        "{}",
        r.text
    );

    // The wildcard's certificate; the route on SNI does not match, the default one does.
    let r = request(&gw, &both, "x.w.example.com", "x.w.example.com", None).await;
    assert_eq!(r.cert, w_der);
    assert!(
        r.text.ends_with("web proto=https host=x.w.example.com"),
        "{}",
        r.text
    );
    // One label too deep for the wildcard, an unknown name, no SNI at all: the default.
    for name in ["y.x.w.example.com", "unknown.test"] {
        let r = request(&gw, &both, name, name, None).await;
        assert_eq!(r.cert, default_der, "{name}");
    }
    let r = request(
        &gw,
        &client(false, &[&rustls::version::TLS13]),
        "a.example.com",
        "a.example.com",
        None,
    )
    .await;
    assert_eq!(r.cert, default_der);
    // Host a.example.com without SNI a.example.com: the SNI route does not match.
    assert!(
        r.text.ends_with("web proto=https host=a.example.com"),
        "{}",
        r.text
    );
    // TLS 1.2 is accepted.
    let r = request(
        &gw,
        &client(true, &[&rustls::version::TLS12]),
        "a.example.com",
        "a.example.com",
        None,
    )
    .await;
    assert_eq!(r.version, Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(r.cert, a_der);
    // The framing guard reads the decrypted stream: smuggling over TLS is refused too.
    let smuggle = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let r = request(&gw, &both, "a.example.com", "-", Some(smuggle)).await;
    assert!(r.text.starts_with("HTTP/1.1 400"), "{}", r.text);

    assert_eq!(a.load(Ordering::SeqCst), 2);
    assert_eq!(web.load(Ordering::SeqCst), 4);
    let tls = gw.status().tls.expect("tls counters");
    assert_eq!((tls.handshakes, tls.failed, tls.timed_out), (7, 0, 0));
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn hostile_handshakes_are_closed_and_counted() {
    let dir = std::env::temp_dir().join(format!("httpgw-tls-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (files, _) = cert(&dir, "only", &["only.test"]);
    let (web_addr, web) = backend("web").await;
    let config = GatewayConfig {
        name: "tls".into(),
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
            name: "web".into(),
            balance: PoolConfig {
                scheduler: SchedulerKind::Rr,
                backends: vec![BackendConfig::new(web_addr, 1)],
                ..PoolConfig::default()
            },
            cookie: None,
            tls: None,
        }],
        forwarding: Forwarding::default(),
        limits: Limits {
            max_connections: 2,
            ..Limits::default()
        },
        access_log: false,
        tls: Some(TlsConfig {
            certs: vec![files],
            handshake_timeout: Duration::from_millis(300),
            alpn: TlsConfig::DEFAULT_ALPN.to_vec(),
        }),
    };
    let gw = HttpGateway::start(&config).await.unwrap();
    let read_all = |mut tcp: TcpStream| async move {
        let mut out = Vec::new();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut out))
            .await
            .expect("the gateway closes")
            .ok();
        (out, started.elapsed())
    };

    // Plain HTTP instead of a ClientHello: closed at once, no request reaches a backend.
    let mut tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (out, took) = read_all(tcp).await;
    assert!(took < Duration::from_millis(250), "{took:?}");
    assert!(!out.starts_with(b"HTTP"), "{out:?}");
    // 64 KiB of zeros: a bad record, closed.
    let mut tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    let _ = tcp.write_all(&[0u8; 65536]).await;
    read_all(tcp).await;

    // Both slots held by handshakes that never finish (nothing sent, half a record): each is
    // cut at the handshake timeout and a real client gets through afterwards.
    let silent = TcpStream::connect(gw.local_addr()).await.unwrap();
    let mut half = TcpStream::connect(gw.local_addr()).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let late = tokio::spawn({
        let connector = client(true, &[&rustls::version::TLS13]);
        let addr = gw.local_addr();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = connector
                .connect(ServerName::try_from("only.test").unwrap(), tcp)
                .await
                .unwrap();
            tls.write_all(b"GET / HTTP/1.1\r\nHost: only.test\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = Vec::new();
            let _ = tls.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    });
    let (_, took) = read_all(silent).await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    read_all(half).await;
    let text = tokio::time::timeout(Duration::from_secs(3), late)
        .await
        .expect("served once a slot frees")
        .unwrap();
    assert!(text.ends_with("web proto=https host=only.test"), "{text}");

    assert_eq!(web.load(Ordering::SeqCst), 1);
    let tls = gw.status().tls.expect("tls counters");
    assert_eq!((tls.handshakes, tls.failed, tls.timed_out), (1, 2, 2));
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend that reads a request head, counts it and never answers.
async fn silent_backend() -> (SocketAddrV4, Arc<AtomicU64>) {
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let hits = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let hits = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                // Held until the gateway lets go of it.
                let _ = tcp.read(&mut buf).await;
            });
        }
    });
    (addr, hits)
}

/// A TLS gateway with one certificate, `alpn` offered, routes `/slow/` to `slow` and the
/// rest to `web` (both single-backend pools).
fn h2_config(
    dir: &Path,
    web: SocketAddrV4,
    slow: SocketAddrV4,
    alpn: Vec<httpgw::Alpn>,
    limits: Limits,
) -> GatewayConfig {
    let (files, _) = cert(dir, "h2", &["a.example.com"]);
    let pool = |name: &str, addr| PoolSpec {
        health: None,
        eject: None,
        retries: PoolSpec::DEFAULT_RETRIES,
        proxy_protocol: false,
        name: name.into(),
        balance: PoolConfig {
            scheduler: SchedulerKind::Rr,
            backends: vec![BackendConfig::new(addr, 1)],
            ..PoolConfig::default()
        },
        cookie: None,
        tls: None,
    };
    GatewayConfig {
        name: "h2".into(),
        listen: SocketAddrV4::new(LOCAL, 0),
        routes: vec![
            Route {
                name: "slow".into(),
                when: Match {
                    paths: vec![httpgw::route::PathPattern::prefix("/slow/").unwrap()],
                    ..Match::default()
                },
                action: Action::Forward {
                    pool: 1,
                    strip_prefix: None,
                    canary: None,
                },
                rewrite: HeaderRules::default(),
            },
            Route {
                name: "default".into(),
                when: Match::default(),
                action: Action::Forward {
                    pool: 0,
                    strip_prefix: None,
                    canary: None,
                },
                rewrite: HeaderRules::default(),
            },
        ],
        pools: vec![pool("web", web), pool("slow", slow)],
        forwarding: Forwarding::default(),
        limits,
        access_log: false,
        tls: Some(TlsConfig {
            certs: vec![files],
            handshake_timeout: Duration::from_secs(2),
            alpn,
        }),
    }
}

/// A started gateway of [`h2_config`] in a fresh scratch directory (`httpgw-TAG-PID`), with a
/// `web` backend (its request counter returned) and `slow` behind `/slow/`.
async fn h2_gateway(
    tag: &str,
    slow: SocketAddrV4,
    alpn: Vec<httpgw::Alpn>,
    limits: Limits,
) -> (PathBuf, HttpGateway, Arc<AtomicU64>) {
    let dir = std::env::temp_dir().join(format!("httpgw-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (web_addr, web) = backend("web").await;
    let config = h2_config(&dir, web_addr, slow, alpn, limits);
    let gw = HttpGateway::start(&config).await.unwrap();
    (dir, gw, web)
}

type H2Conn = tokio::task::JoinHandle<Result<(), h2::Error>>;

/// An HTTP/2 connection to the gateway (ALPN `h2` only).
async fn h2_connect(gw: &HttpGateway) -> (h2::client::SendRequest<Bytes>, H2Conn) {
    let tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    let tls = client_alpn(true, &[&rustls::version::TLS13], &["h2"])
        .connect(ServerName::try_from("a.example.com").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    (send, tokio::spawn(conn))
}

fn get(path: &str, fields: &[(&str, &str)]) -> hyper::Request<()> {
    let mut b = hyper::Request::get(format!("https://a.example.com{path}"));
    for (n, v) in fields {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap()
}

/// One request on `send`: its status and body.
async fn h2_get(
    send: &h2::client::SendRequest<Bytes>,
    req: hyper::Request<()>,
) -> (hyper::StatusCode, String) {
    let mut send = send.clone().ready().await.unwrap();
    let (response, _) = send.send_request(req, true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered")
        .unwrap();
    let status = response.status();
    let mut body = response.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&out).into_owned())
}

/// Polls `f` every 10 ms until it holds, for at most 5 s.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn http2_is_routed_like_http1_and_bounded() {
    let (slow_addr, _) = silent_backend().await;
    let limits = Limits {
        max_streams: 8,
        max_header_bytes: 4096,
        ..Limits::default()
    };
    let (dir, gw, web) =
        h2_gateway("h2", slow_addr, TlsConfig::DEFAULT_ALPN.to_vec(), limits).await;
    let (send, _conn) = h2_connect(&gw).await;
    // The stream limit is announced in the server's SETTINGS.
    let send = send.ready().await.unwrap();
    until("SETTINGS applied", || send.current_max_send_streams() == 8).await;

    // :authority is the Host the backend sees; X-Forwarded-Proto https.
    let (status, body) = h2_get(&send, get("/x", &[])).await;
    assert_eq!(status, hyper::StatusCode::OK);
    assert_eq!(body, "web proto=https host=a.example.com");
    // 32 requests at once on one connection, 8 streams at a time: all answered.
    let all = (0..32).map(|i| {
        let send = send.clone();
        tokio::spawn(async move { h2_get(&send, get(&format!("/many/{i}"), &[])).await })
    });
    for task in all {
        let (status, _) = task.await.unwrap();
        assert_eq!(status, hyper::StatusCode::OK);
    }
    assert_eq!(web.load(Ordering::SeqCst), 33);
    // A head over max_header_bytes, and one with more fields than HTTP/1.1 allows: 431 on
    // the stream, the connection still serves.
    let long = "v".repeat(5000);
    let (status, _) = h2_get(&send, get("/", &[("x-long", &long)])).await;
    assert_eq!(status, hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let names: Vec<String> = (0..101).map(|i| format!("x-f{i}")).collect();
    let fields: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let (status, _) = h2_get(&send, get("/", &fields)).await;
    assert_eq!(status, hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // Over the announced list size: the HTTP/2 layer answers 431 itself.
    let huge = "v".repeat(12_000);
    let (status, _) = h2_get(&send, get("/", &[("x-huge", &huge)])).await;
    assert_eq!(status, hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let (status, _) = h2_get(&send, get("/after", &[])).await;
    assert_eq!(status, hyper::StatusCode::OK);
    // CONNECT is not proxied (and extended CONNECT is not offered).
    let connect = hyper::Request::connect("https://a.example.com:443")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (response, _) = ready.send_request(connect, false).unwrap();
    let status = response.await.map(|r| r.status());
    assert!(
        matches!(status, Ok(hyper::StatusCode::METHOD_NOT_ALLOWED)),
        "CONNECT answered {status:?}"
    );

    let status = gw.status();
    let tls = status.tls.expect("tls counters");
    assert_eq!((tls.handshakes, tls.h2, tls.reset_floods), (1, 1, 0));
    assert_eq!(status.refused, 3);
    assert_eq!(status.routes[1].responses.success, 34);
    assert_eq!(web.load(Ordering::SeqCst), 34);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn alpn_offers_only_what_is_configured() {
    let (slow_addr, _) = silent_backend().await;
    let (dir, gw, _) = h2_gateway(
        "alpn",
        slow_addr,
        vec![httpgw::Alpn::Http11],
        Limits::default(),
    )
    .await;
    let both = client_alpn(true, &[&rustls::version::TLS13], &["h2", "http/1.1"]);
    let r = request(&gw, &both, "a.example.com", "a.example.com", None).await;
    assert_eq!(r.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(
        r.text.ends_with("web proto=https host=a.example.com"),
        "{}",
        r.text
    );
    // A client that wants only h2 finds no common protocol.
    let tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    let only_h2 = client_alpn(true, &[&rustls::version::TLS13], &["h2"]);
    assert!(
        only_h2
            .connect(ServerName::try_from("a.example.com").unwrap(), tcp)
            .await
            .is_err()
    );
    let tls = gw.status().tls.expect("tls counters");
    assert_eq!((tls.handshakes, tls.failed, tls.h2), (1, 1, 0));
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn cancelled_streams_are_499_and_a_reset_flood_is_sent_away() {
    let (slow_addr, slow) = silent_backend().await;
    let limits = Limits {
        max_streams: 4,
        ..Limits::default()
    };
    let (dir, gw, _) =
        h2_gateway("reset", slow_addr, TlsConfig::DEFAULT_ALPN.to_vec(), limits).await;

    // One request waiting for its backend, then reset by the client: 499, counted, the
    // backend released without a failure.
    let (send, _conn) = h2_connect(&gw).await;
    let mut ready = send.clone().ready().await.unwrap();
    let (_response, mut stream) = ready.send_request(get("/slow/1", &[]), true).unwrap();
    until("the backend to get the request", || {
        slow.load(Ordering::SeqCst) == 1
    })
    .await;
    stream.send_reset(h2::Reason::CANCEL);
    until("the cancel to be counted", || gw.status().cancelled == 1).await;
    let status = gw.status();
    let backend = &status.pools[1].backends[0];
    assert_eq!((backend.active, backend.failures), (0, 0));
    assert_eq!(backend.responses.client_error, 1);
    assert_eq!(status.responses.server_error, 0);

    // Opening and resetting streams in a loop: the connection is sent away (GOAWAY) long
    // before the loop ends, and the flood counted.
    let (send, conn) = h2_connect(&gw).await;
    let mut sent = 0;
    let mut send = Some(send);
    for i in 0..5000 {
        let Some(s) = send.take() else { break };
        let Ok(mut ready) = s.ready().await else {
            break;
        };
        let Ok((_, mut stream)) = ready.send_request(get(&format!("/slow/r{i}"), &[]), true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        send = Some(ready);
        if i % 8 == 7 {
            tokio::task::yield_now().await;
        }
    }
    assert!(sent < 5000, "never sent away");
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection ends");
    drop(ended);
    until("the flood to be counted", || {
        gw.status().tls.is_some_and(|t| t.reset_floods == 1)
    })
    .await;
    // Another connection is served.
    let (send, _conn) = h2_connect(&gw).await;
    let (status, _) = h2_get(&send, get("/fine", &[])).await;
    assert_eq!(status, hyper::StatusCode::OK);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend that answers a 1,000-byte body in ten pieces, 100 ms apart.
async fn trickle_backend() -> SocketAddrV4 {
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                    .await;
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = tcp.write_all(&[b'x'; 100]).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http2_download_longer_than_the_idle_bound_completes_then_the_connection_goes() {
    let trickle = trickle_backend().await;
    let limits = Limits {
        header_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (dir, gw, _) =
        h2_gateway("h2-idle", trickle, TlsConfig::DEFAULT_ALPN.to_vec(), limits).await;
    let (send, conn) = h2_connect(&gw).await;
    // 1 s of body with no other stream: the stream counts until its body ends.
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(5),
        h2_get(&send, get("/slow/file", &[])),
    )
    .await
    .expect("the download ends");
    assert_eq!(status, hyper::StatusCode::OK);
    assert_eq!(body.len(), 1000);
    // Then nothing: GOAWAY and closed after about the header timeout.
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap()
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(gw.status().cancelled, 0);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CA written to `dir/FILE-ca.pem`, and the server configuration of a backend whose
/// certificate it signs for `names`.
fn ca_signed(dir: &Path, file: &str, names: &[&str]) -> (PathBuf, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_file = dir.join(format!("{file}-ca.pem"));
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
    .unwrap();
    (ca_file, Arc::new(server))
}

/// A backend serving HTTPS with `server`: answers `NAME sni=SNI`, counts requests and TCP
/// connections.
async fn tls_backend(
    name: &'static str,
    server: Arc<rustls::ServerConfig>,
) -> (SocketAddrV4, Arc<AtomicU64>, Arc<AtomicU64>) {
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let (hits, connections) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (counted, accepted) = (Arc::clone(&hits), Arc::clone(&connections));
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            accepted.fetch_add(1, Ordering::SeqCst);
            let (acceptor, hits) = (acceptor.clone(), Arc::clone(&counted));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let text = format!("{name} sni={sni}");
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, hits, connections)
}

/// One keep-alive connection to the gateway: GET `path` `n` times; the answers' texts.
async fn plain_gets(gw: &HttpGateway, path: &str, n: usize) -> Vec<String> {
    let tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (reader, mut writer) = tcp.into_split();
    let mut reader = tokio::io::BufReader::new(reader);
    let mut answers = Vec::new();
    for _ in 0..n {
        writer
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut head = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut line)
                .await
                .unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await.unwrap();
        answers.push(format!("{}{}", head, String::from_utf8_lossy(&body)));
    }
    answers
}

#[tokio::test]
async fn a_pool_with_tls_talks_https_to_its_backends_and_verifies_them() {
    let dir = std::env::temp_dir().join(format!("httpgw-upstream-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, server) = ca_signed(&dir, "good", &["app.internal", "127.0.0.1"]);
    let (other_ca, _) = ca_signed(&dir, "other", &["app.internal"]);
    let (good_addr, good_hits, good_conns) = tls_backend("good", server).await;
    let pool = |name: &str, tls: natgw::health::TlsCheck| PoolSpec {
        health: None,
        eject: None,
        retries: 0,
        proxy_protocol: false,
        name: name.into(),
        balance: PoolConfig {
            scheduler: SchedulerKind::Rr,
            backends: vec![BackendConfig::new(good_addr, 1)],
            ..PoolConfig::default()
        },
        cookie: None,
        tls: Some(tls),
    };
    let path_route = |name: &str, path: &str, pool| Route {
        name: name.into(),
        when: Match {
            paths: vec![httpgw::route::PathPattern::exact(path).unwrap()],
            ..Match::default()
        },
        action: Action::Forward {
            pool,
            strip_prefix: None,
            canary: None,
        },
        rewrite: HeaderRules::default(),
    };
    let check = |sni: Option<&str>, verify, ca_file: &Path| natgw::health::TlsCheck {
        sni: sni.map(str::to_owned),
        verify,
        ca_file: Some(ca_file.to_owned()),
    };
    let config = GatewayConfig {
        name: "reencrypt".into(),
        listen: SocketAddrV4::new(LOCAL, 0),
        routes: vec![
            path_route("byname", "/byname", 0),
            path_route("byaddr", "/byaddr", 1),
            path_route("bad", "/bad", 2),
            path_route("insecure", "/insecure", 3),
        ],
        pools: vec![
            pool("byname", check(Some("app.internal"), true, &ca)),
            pool("byaddr", check(None, true, &ca)),
            pool("bad", check(Some("app.internal"), true, &other_ca)),
            pool(
                "insecure",
                natgw::health::TlsCheck {
                    sni: None,
                    verify: false,
                    ca_file: None,
                },
            ),
        ],
        forwarding: Forwarding::default(),
        limits: Limits::default(),
        access_log: false,
        tls: None,
    };
    let gw = HttpGateway::start(&config).await.unwrap();
    // Verified by name (sent as SNI), five requests over one pooled HTTPS connection.
    let answers = plain_gets(&gw, "/byname", 5).await;
    for a in &answers {
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        assert!(a.ends_with("good sni=app.internal"), "{a}");
    }
    assert_eq!(good_hits.load(Ordering::SeqCst), 5);
    assert_eq!(good_conns.load(Ordering::SeqCst), 1);
    // Verified by address: no SNI, the certificate lists 127.0.0.1.
    let a = plain_gets(&gw, "/byaddr", 1).await.remove(0);
    assert!(a.ends_with("good sni=-"), "{a}");
    // Not verified: reached.
    let a = plain_gets(&gw, "/insecure", 1).await.remove(0);
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    // Another CA: 502, nothing sent, counted as the backend's failure.
    let hits = good_hits.load(Ordering::SeqCst);
    let a = plain_gets(&gw, "/bad", 1).await.remove(0);
    assert!(a.starts_with("HTTP/1.1 502"), "{a}");
    assert_eq!(good_hits.load(Ordering::SeqCst), hits);
    let status = gw.status();
    let bad = status.pools.iter().find(|p| p.name == "bad").unwrap();
    assert_eq!(bad.backends[0].failures, 1, "{bad:?}");
    // A CA file that cannot be read refuses the start.
    let mut broken = config.clone();
    broken.pools[0].tls.as_mut().unwrap().ca_file = Some(dir.join("missing.pem"));
    assert!(matches!(
        HttpGateway::start(&broken).await,
        Err(httpgw::StartError::UpstreamTls { .. })
    ));
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
