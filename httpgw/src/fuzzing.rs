//! Entry point of the `http_request` cargo-fuzz target (and of the corpus replay test).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use balance::{BackendConfig, PoolConfig, SchedulerKind};
use http::Request;

use crate::framing::{HeadGuard, MAX_HEADERS};
use crate::hygiene::Forwarding;
use crate::route::{Action, HeaderRules, HostPattern, Match, PathPattern, RedirectTarget, Route};
use crate::{Gateway, GatewayConfig, Limits, PoolSpec, Verdict};

/// Feeds `data` (a client's byte stream) to the framing guard in one piece and split at
/// every byte, and each head it lets through to a gateway with host, path (prefix, exact
/// and regex) and redirect rules. Panics if the two feedings disagree, if a head with both `Content-Length` and
/// `Transfer-Encoding` gets through, if a forwarded head still carries a hop-by-hop field, or
/// if a switch of protocols goes on that the guard did not hold the stream back for (or to
/// h2c).
///
/// # Panics
/// On an invariant violation (that is the point).
pub fn run_request(now: Instant, data: &[u8]) {
    let max_head = 512;
    let mut whole = HeadGuard::new(max_head);
    let mut out_whole = Vec::new();
    let verdict_whole = whole.feed(data, &mut out_whole);

    let mut split = HeadGuard::new(max_head);
    let mut out_split = Vec::new();
    let mut verdict_split = Ok(());
    for byte in data.chunks(1) {
        verdict_split = split.feed(byte, &mut out_split);
        if verdict_split.is_err() {
            break;
        }
    }
    assert_eq!(
        verdict_whole, verdict_split,
        "verdict depends on read sizes"
    );
    assert_eq!(out_whole, out_split, "released bytes depend on read sizes");
    assert!(out_whole.len() <= data.len());

    let mut gateway = Gateway::new(&config()).expect("fixed config is valid");
    let mut rest = &out_whole[..];
    while !rest.is_empty() {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let Ok(httparse::Status::Complete(len)) = req.parse(rest) else {
            // A body, or a head cut short by the end of the input.
            return;
        };
        rest = &rest[len..];
        let mut builder = Request::builder()
            .method(req.method.unwrap_or("GET"))
            .uri(req.path.unwrap_or("/"));
        let mut lengths = 0;
        let mut codings = 0;
        for f in req.headers.iter() {
            lengths += usize::from(f.name.eq_ignore_ascii_case("content-length"));
            codings += usize::from(f.name.eq_ignore_ascii_case("transfer-encoding"));
            builder = builder.header(f.name, f.value);
        }
        assert!(lengths == 0 || codings == 0, "CL+TE head released");
        let Ok(request) = builder.body(()) else {
            return;
        };
        let (mut head, ()) = request.into_parts();
        let client = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 40_000);
        let verdict = gateway.decide(now, client, Ipv4Addr::new(198, 51, 100, 1), None, &mut head);
        if let Verdict::Forward(up) = verdict {
            let mut hops = vec!["transfer-encoding", "te", "keep-alive"];
            match &up.upgrade {
                // A switch goes on as `Connection: upgrade` + the client's `Upgrade`, never
                // to h2c, and only for a bodiless head the guard held the rest back after.
                Some(protocol) => {
                    assert_eq!(
                        head.headers.get("connection").map(|v| v.as_bytes()),
                        Some(&b"upgrade"[..])
                    );
                    assert_eq!(head.headers.get("upgrade"), Some(protocol));
                    assert!(
                        !protocol
                            .as_bytes()
                            .to_ascii_lowercase()
                            .windows(3)
                            .any(|w| w == b"h2c")
                    );
                    assert!(whole.upgrading() || verdict_whole.is_err());
                }
                None => hops.extend(["connection", "upgrade"]),
            }
            for hop in hops {
                assert!(!head.headers.contains_key(hop), "{hop} forwarded");
            }
            assert!(up.path_and_query.starts_with('/'));
            gateway.finish(now, &up, crate::Outcome::Refused);
        }
        // Without framing knowledge here, stop after the first head that has a body.
        if lengths + codings > 0 {
            return;
        }
    }
}

fn config() -> GatewayConfig {
    let backend =
        |last: u8| BackendConfig::new(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80), 1);
    GatewayConfig {
        name: "fuzz".into(),
        listen: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 80),
        routes: vec![
            Route {
                name: "api".into(),
                when: Match {
                    hosts: vec![HostPattern::Suffix("example.com".into())],
                    paths: vec![PathPattern::Prefix("/api".into())],
                    ..Match::default()
                },
                action: Action::Forward {
                    pool: 1,
                    strip_prefix: Some("/api".into()),
                    canary: None,
                },
                rewrite: HeaderRules::default(),
            },
            Route {
                name: "old".into(),
                when: Match {
                    paths: vec![PathPattern::Exact("/old".into())],
                    ..Match::default()
                },
                action: Action::Redirect {
                    status: http::StatusCode::MOVED_PERMANENTLY,
                    target: RedirectTarget::Prefix("https://example.com/".into()),
                },
                rewrite: HeaderRules::default(),
            },
            Route {
                name: "versioned".into(),
                when: Match {
                    paths: vec![
                        PathPattern::regex("^/v[0-9]+/(a|b)*$").expect("fixed pattern compiles"),
                    ],
                    ..Match::default()
                },
                action: Action::Forward {
                    pool: 1,
                    strip_prefix: None,
                    canary: None,
                },
                rewrite: HeaderRules {
                    add_request: vec![(
                        http::HeaderName::from_static("x-tag"),
                        http::HeaderValue::from_static("fuzz"),
                    )],
                    ..HeaderRules::default()
                },
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
        pools: vec![
            PoolSpec {
                health: None,
                eject: None,
                retries: PoolSpec::DEFAULT_RETRIES,
                proxy_protocol: false,
                name: "web".into(),
                balance: PoolConfig {
                    scheduler: SchedulerKind::Wrr,
                    backends: vec![backend(1), backend(2)],
                    ..PoolConfig::default()
                },
                cookie: None,
                tls: None,
            },
            PoolSpec {
                health: None,
                eject: None,
                retries: PoolSpec::DEFAULT_RETRIES,
                proxy_protocol: false,
                name: "api".into(),
                balance: PoolConfig {
                    scheduler: SchedulerKind::Rr,
                    backends: vec![backend(3)],
                    ..PoolConfig::default()
                },
                cookie: None,
                tls: None,
            },
        ],
        forwarding: Forwarding::default(),
        limits: Limits::default(),
        access_log: false,
        tls: None,
    }
}
