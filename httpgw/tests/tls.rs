//! TLS termination against real sockets: rustls clients with and without SNI, a route on the
//! server name, and hostile handshakes (garbage, one that never finishes).

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
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

fn client(sni: bool, versions: &[&'static rustls::SupportedProtocolVersion]) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let mut config = ClientConfig::builder_with_provider(Arc::<CryptoProvider>::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(algorithms)))
        .with_no_client_auth();
    config.enable_sni = sni;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
        name: name.into(),
        balance: PoolConfig {
            scheduler: SchedulerKind::Rr,
            backends: vec![BackendConfig::new(addr, 1)],
            ..PoolConfig::default()
        },
        cookie: None,
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
                },
                rewrite: HeaderRules::default(),
            },
            Route {
                name: "default".into(),
                when: Match::default(),
                action: Action::Forward {
                    pool: 0,
                    strip_prefix: None,
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
            },
            rewrite: HeaderRules::default(),
        }],
        pools: vec![PoolSpec {
            name: "web".into(),
            balance: PoolConfig {
                scheduler: SchedulerKind::Rr,
                backends: vec![BackendConfig::new(web_addr, 1)],
                ..PoolConfig::default()
            },
            cookie: None,
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
