use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use balance::{BackendConfig, PoolConfig, SchedulerKind};
use http::{Method, Request, StatusCode, request};
use proptest::prelude::*;
use testkit::epoch;

use crate::framing::HeadGuard;
use crate::hygiene::{self, Forwarding};
use crate::route::{
    Action, HeaderMatch, HeaderRules, HostPattern, Match, PathPattern, RedirectTarget, Route,
};
use crate::{
    AttemptFailure, ConfigError, Gateway, GatewayConfig, Limits, Outcome, PoolSpec, Upstream,
    Verdict,
};

const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 40_000);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn backend(last: u8, weight: u32) -> BackendConfig {
    BackendConfig::new(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80), weight)
}

fn pool(name: &str, backends: Vec<BackendConfig>) -> PoolSpec {
    PoolSpec {
        health: None,
        eject: None,
        retries: PoolSpec::DEFAULT_RETRIES,
        proxy_protocol: false,
        name: name.into(),
        balance: PoolConfig {
            scheduler: SchedulerKind::Rr,
            backends,
            ..PoolConfig::default()
        },
        cookie: None,
        tls: None,
    }
}

fn forward(name: &str, when: Match, pool: usize, strip: Option<&str>) -> Route {
    Route {
        name: name.into(),
        when,
        action: Action::Forward {
            pool,
            strip_prefix: strip.map(str::to_owned),
            canary: None,
        },
        rewrite: HeaderRules::default(),
    }
}

fn config() -> GatewayConfig {
    GatewayConfig {
        name: "www".into(),
        listen: SocketAddrV4::new(VIP, 80),
        routes: vec![
            forward(
                "api",
                Match {
                    hosts: vec![HostPattern::parse("*.example.com").unwrap()],
                    paths: vec![PathPattern::prefix("/api/").unwrap()],
                    ..Match::default()
                },
                1,
                Some("/api"),
            ),
            Route {
                name: "old".into(),
                when: Match {
                    paths: vec![PathPattern::exact("/old").unwrap()],
                    ..Match::default()
                },
                action: Action::redirect(
                    301,
                    RedirectTarget::Prefix("https://new.example.com/".into()),
                )
                .unwrap(),
                rewrite: HeaderRules::default(),
            },
            forward(
                "admin-posts",
                Match {
                    methods: vec![Method::POST],
                    headers: vec![HeaderMatch::new("X-Admin", Some("yes")).unwrap()],
                    ..Match::default()
                },
                2,
                None,
            ),
            forward(
                "www",
                Match {
                    hosts: vec![HostPattern::parse("www.example.com").unwrap()],
                    ..Match::default()
                },
                0,
                None,
            ),
        ],
        pools: vec![
            pool("web", vec![backend(1, 1), backend(2, 1)]),
            pool("api", vec![backend(3, 1)]),
            pool("drained", vec![backend(4, 0)]),
        ],
        forwarding: Forwarding {
            trusted_proxies: vec!["203.0.113.0/24".parse().unwrap()],
            via: None,
        },
        limits: Limits::default(),
        access_log: false,
        tls: None,
    }
}

fn head(raw: &[(&str, &str)], method: &str, uri: &str) -> request::Parts {
    let mut b = Request::builder().method(method).uri(uri);
    for (n, v) in raw {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn decide(gw: &mut Gateway, h: &mut request::Parts) -> Verdict {
    gw.decide(epoch(), CLIENT, VIP, None, h)
}

fn forwarded(v: Verdict) -> Upstream {
    match v {
        Verdict::Forward(up) => up,
        Verdict::Respond(a) => panic!("answered {a:?}"),
    }
}

fn answered(v: Verdict) -> StatusCode {
    match v {
        Verdict::Respond(a) => a.status,
        Verdict::Forward(up) => panic!("forwarded {up:?}"),
    }
}

#[test]
fn host_patterns() {
    let suffix = HostPattern::parse("*.Example.com").unwrap();
    assert!(suffix.matches("a.example.com"));
    assert!(suffix.matches("a.b.example.com"));
    assert!(!suffix.matches("example.com"));
    assert!(!suffix.matches("badexample.com"));
    assert!(!suffix.matches(".example.com"));
    assert_eq!(suffix.to_string(), "*.example.com");
    let exact = HostPattern::parse("www.example.com").unwrap();
    assert!(exact.matches("www.example.com"));
    assert!(!exact.matches("wwww.example.com"));
    for bad in ["", "*", "*.", "a.*.com", "a b", "ex*ample.com", "host:80"] {
        assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn path_patterns_and_prefix_strip() {
    assert!(PathPattern::prefix("/api").unwrap().matches("/apix"));
    assert!(!PathPattern::exact("/api").unwrap().matches("/api/"));
    assert!(PathPattern::prefix("api").is_err());
    assert!(PathPattern::exact("/a b").is_err());
    assert_eq!(
        crate::route::strip_prefix("/api/users", "/api").unwrap(),
        "/users"
    );
    assert_eq!(crate::route::strip_prefix("/api", "/api").unwrap(), "/");
    assert_eq!(crate::route::strip_prefix("/api/", "/api/").unwrap(), "/");
    assert_eq!(crate::route::strip_prefix("/other", "/api"), None);
}

fn regex(text: &str) -> PathPattern {
    PathPattern::regex(text).unwrap()
}

#[test]
fn path_regexes_match_unanchored_unless_anchored() {
    let versioned = regex("^/api/v[0-9]+/");
    assert!(versioned.matches("/api/v2/users"));
    assert!(versioned.matches("/api/v10/"));
    assert!(!versioned.matches("/api/vx/"));
    assert!(!versioned.matches("/x/api/v2/"));
    // Unanchored, as HAProxy's path_reg and nginx's `location ~`: anywhere in the path.
    let php = regex(r"\.php$");
    assert!(php.matches("/a/b/index.php"));
    assert!(!php.matches("/index.php/x"));
    assert!(regex("admin").matches("/x/admin/y"));
    // Case-sensitive unless the pattern asks otherwise.
    assert!(!regex("^/Admin").matches("/admin"));
    assert!(regex("(?i)^/Admin").matches("/admin"));
    // The path as sent: percent-encoding is not decoded, unencoded UTF-8 stays as it is.
    assert!(regex("^/caf%C3%A9$").matches("/caf%C3%A9"));
    assert!(!regex("^/café$").matches("/caf%C3%A9"));
    assert!(regex("^/café$").matches("/café"));
    assert!(regex("%2[fF]").matches("/a%2Fb"));
    // Equal by pattern (what a reload compares).
    assert_eq!(regex("^/a"), regex("^/a"));
    assert_ne!(regex("^/a"), regex("^/b"));
    assert_ne!(regex("/a"), PathPattern::prefix("/a").unwrap());
}

#[test]
fn path_regexes_are_bounded_and_errors_are_one_line() {
    let Err(ConfigError::BadPathRegex { pattern, why }) = PathPattern::regex("^/api/(") else {
        panic!("an unclosed group compiled");
    };
    assert_eq!(
        (pattern.as_str(), why.as_str()),
        ("^/api/(", "unclosed group")
    );
    let long = format!("^/{}", "a".repeat(crate::route::MAX_PATH_REGEX_LEN));
    let Err(ConfigError::BadPathRegex { pattern, why }) = PathPattern::regex(&long) else {
        panic!("a pattern over the length limit compiled");
    };
    assert_eq!(pattern.len(), 64);
    assert_eq!(why, "longer than 1024 bytes");
    assert!(PathPattern::regex(&"a".repeat(crate::route::MAX_PATH_REGEX_LEN)).is_ok());
    // Short, but its program would be huge: refused by the size limit, not built.
    let Err(ConfigError::BadPathRegex { why, .. }) = PathPattern::regex(r"(\w{100}){100}") else {
        panic!("a huge automaton compiled");
    };
    assert!(
        why.starts_with("its compiled program would exceed"),
        "{why}"
    );
    // Linear time: a pattern that makes a backtracking engine take exponential time.
    let nested = regex("^/(a+)+$");
    assert!(!nested.matches(&format!("/{}!", "a".repeat(10_000))));
    let mut cfg = config();
    cfg.routes[0].when.paths = vec![regex("^/x"); crate::route::MAX_PATH_REGEXES + 1];
    assert!(matches!(
        Gateway::new(&cfg),
        Err(ConfigError::LimitOutOfRange {
            what: "path regexes per route",
            ..
        })
    ));
    cfg.routes[0].when.paths.pop();
    assert!(Gateway::new(&cfg).is_ok());
}

#[test]
fn a_regex_route_sees_the_path_without_the_query() {
    let mut cfg = config();
    cfg.routes.insert(
        0,
        forward(
            "php",
            Match {
                paths: vec![regex(r"\.php$"), PathPattern::exact("/exact").unwrap()],
                ..Match::default()
            },
            2,
            None,
        ),
    );
    cfg.routes.insert(
        1,
        forward(
            "versioned",
            Match {
                paths: vec![regex("^/v[0-9]+/")],
                ..Match::default()
            },
            1,
            Some("/v1"),
        ),
    );
    let mut gw = Gateway::new(&cfg).unwrap();
    let host = [("host", "www.example.com")];
    // `$` anchors at the end of the path, before the query.
    let mut h = head(&host, "GET", "/index.php?page=2");
    assert_eq!(
        answered(decide(&mut gw, &mut h)),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // The query is not matched against: a `.php` ending the query does not end the path.
    let mut h = head(&host, "GET", "/index.php/x?q=.php");
    assert_eq!(forwarded(decide(&mut gw, &mut h)).pool, 0);
    // Another alternative of the same route.
    let mut h = head(&host, "GET", "/exact");
    assert_eq!(
        answered(decide(&mut gw, &mut h)),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // strip_prefix stays a literal prefix on a regex route: removed where the path starts
    // with it, the path kept as it is where it does not.
    let mut h = head(&host, "GET", "/v1/users?id=1");
    let up = forwarded(decide(&mut gw, &mut h));
    assert_eq!((up.pool, up.path_and_query.as_str()), (1, "/users?id=1"));
    let mut h = head(&host, "GET", "/v2/users");
    let up = forwarded(decide(&mut gw, &mut h));
    assert_eq!((up.pool, up.path_and_query.as_str()), (1, "/v2/users"));
    let mut h = head(&host, "GET", "/vx/users");
    assert_eq!(forwarded(decide(&mut gw, &mut h)).pool, 0);
    let status = gw.status(epoch());
    assert_eq!(
        [status.routes[0].requests, status.routes[1].requests],
        [2, 2]
    );
}

#[test]
fn a_reload_reports_a_changed_regex_only() {
    let mut cfg = config();
    cfg.routes[0].when.paths = vec![regex("^/api/v[0-9]+/")];
    let mut gw = Gateway::new(&cfg).unwrap();
    assert_eq!(
        gw.reconfigure(&cfg).unwrap().to_string(),
        "no routing change"
    );
    cfg.routes[0].when.paths = vec![regex("^/api/v[0-9]/")];
    assert_eq!(gw.reconfigure(&cfg).unwrap().to_string(), "routes ~api");
    let mut h = head(&[("host", "a.example.com")], "GET", "/api/v10/x");
    assert_eq!(answered(decide(&mut gw, &mut h)), StatusCode::NOT_FOUND);
}

#[test]
fn first_matching_rule_decides() {
    let mut gw = Gateway::new(&config()).unwrap();
    // host suffix + path prefix: the api pool, prefix stripped, query kept
    let mut h = head(
        &[("host", "shop.example.com:8080")],
        "GET",
        "/api/items?id=3",
    );
    let up = forwarded(decide(&mut gw, &mut h));
    assert_eq!((up.pool, up.addr.ip().octets()[3]), (1, 3));
    assert_eq!(up.path_and_query, "/items?id=3");
    // the same path on the bare domain falls through to no route
    let mut h = head(&[("host", "example.com")], "GET", "/api/items");
    assert_eq!(answered(decide(&mut gw, &mut h)), StatusCode::NOT_FOUND);
    // exact host, any path: the web pool, round robin over two backends
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut h = head(&[("host", "WWW.example.com")], "GET", "/x");
        let up = forwarded(decide(&mut gw, &mut h));
        assert_eq!(up.path_and_query, "/x");
        seen.push(up.addr.ip().octets()[3]);
        gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    }
    seen.sort_unstable();
    assert_eq!(seen, [1, 1, 2, 2]);
    // method + header: needs both
    let mut h = head(&[("host", "x.org"), ("x-admin", "yes")], "GET", "/");
    assert_eq!(answered(decide(&mut gw, &mut h)), StatusCode::NOT_FOUND);
    let mut h = head(&[("host", "x.org"), ("x-admin", "yes")], "POST", "/");
    // ... and its pool has only a drained backend: 503
    assert_eq!(
        answered(decide(&mut gw, &mut h)),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let status = gw.status(epoch());
    assert_eq!(status.requests, 8);
    assert_eq!(status.no_route, 2);
    assert_eq!(status.routes[3].requests, 4);
    assert_eq!(status.routes[3].responses.success, 4);
    assert_eq!(status.pools[2].no_backend, 1);
    assert_eq!(status.pools[0].backends[0].requests, 2);
    assert_eq!(status.pools[0].backends[0].active, 0);
    assert_eq!(status.pools[1].backends[0].active, 1);
}

#[test]
fn redirects_keep_path_and_query() {
    let mut gw = Gateway::new(&config()).unwrap();
    let mut h = head(&[("host", "www.example.com")], "GET", "/old?a=1");
    match decide(&mut gw, &mut h) {
        Verdict::Respond(a) => {
            assert_eq!(a.status, StatusCode::MOVED_PERMANENTLY);
            assert_eq!(a.location.unwrap(), "https://new.example.com/old?a=1");
        }
        Verdict::Forward(up) => panic!("{up:?}"),
    }
    assert!(Action::redirect(200, RedirectTarget::Location("/x".into())).is_err());
    assert!(Action::redirect(302, RedirectTarget::Location("/x\r\ny".into())).is_err());
}

#[test]
fn ambiguous_or_bad_heads_are_refused() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case<'_>; 9] = [
        (
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("transfer-encoding", "chunked"),
            ],
            "POST",
            "/",
        ),
        (
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "6"),
            ],
            "POST",
            "/",
        ),
        (&[("host", "a"), ("content-length", "5, 6")], "POST", "/"),
        (&[("host", "a"), ("content-length", "-1")], "POST", "/"),
        (&[("host", "a"), ("host", "b")], "GET", "/"),
        (&[("host", "a b")], "GET", "/"),
        (&[("host", "user@a")], "GET", "/"),
        (&[], "GET", "/"),
        (&[("host", "a")], "GET", "http://b/"),
    ];
    for (fields, method, uri) in cases {
        let mut gw = Gateway::new(&config()).unwrap();
        let mut h = head(fields, method, uri);
        assert_eq!(
            answered(decide(&mut gw, &mut h)),
            StatusCode::BAD_REQUEST,
            "{fields:?} {uri}"
        );
        assert_eq!(gw.status(epoch()).refused, 1);
    }
    let mut h = head(&[("host", "a")], "CONNECT", "a:443");
    let mut gw = Gateway::new(&config()).unwrap();
    assert_eq!(
        answered(decide(&mut gw, &mut h)),
        StatusCode::METHOD_NOT_ALLOWED
    );
    // equal duplicates are one length
    let h = head(
        &[
            ("host", "a"),
            ("content-length", "5"),
            ("content-length", "5"),
        ],
        "POST",
        "/",
    );
    assert_eq!(hygiene::content_length(&h.headers), Ok(Some(5)));
    // HTTP/1.0 without Host is fine
    let mut h = head(&[], "GET", "/");
    h.version = http::Version::HTTP_10;
    assert_eq!(hygiene::check(&h).unwrap().host, "");
}

/// A canary by request sends exactly `percent` of every 100 requests to its pool, spread
/// out; by source, a client always takes the same side, about `percent` of the clients the
/// canary's; 0 % and 100 % are all or nothing; `show http` counts and describes it.
#[test]
fn a_canary_takes_its_share_by_request_or_by_source() {
    use crate::route::{Canary, CanaryKey};
    let with = |percent: u8, by: CanaryKey| {
        let mut cfg = config();
        if let Action::Forward { canary, .. } = &mut cfg.routes[3].action {
            *canary = Some(Canary {
                pool: 1,
                percent,
                by,
            });
        }
        Gateway::new(&cfg).unwrap()
    };
    let to_api = |gw: &mut Gateway, client: Ipv4Addr| {
        let mut h = head(&[("host", "www.example.com")], "GET", "/");
        let up = forwarded(gw.decide(
            epoch(),
            SocketAddrV4::new(client, 40_000),
            VIP,
            None,
            &mut h,
        ));
        up.pool == 1
    };
    let mut gw = with(10, CanaryKey::Request);
    let sides: Vec<bool> = (0..200)
        .map(|_| to_api(&mut gw, CLIENT.ip().to_owned()))
        .collect();
    assert_eq!(sides.iter().filter(|c| **c).count(), 20);
    for window in sides.chunks(10) {
        assert_eq!(window.iter().filter(|c| **c).count(), 1, "{sides:?}");
    }
    let status = gw.status(epoch());
    let route = &status.routes[3];
    assert_eq!((route.requests, route.canary_requests), (200, 20));
    assert_eq!(route.action, "pool web, canary api 10 % by request");

    let mut gw = with(10, CanaryKey::Source);
    let clients: Vec<Ipv4Addr> = (0..1000u32)
        .map(|i| Ipv4Addr::from(0x0A00_0000 + i))
        .collect();
    let first: Vec<bool> = clients.iter().map(|c| to_api(&mut gw, *c)).collect();
    let again: Vec<bool> = clients.iter().map(|c| to_api(&mut gw, *c)).collect();
    assert_eq!(first, again, "a client keeps its side");
    let share = first.iter().filter(|c| **c).count();
    assert!((70..=130).contains(&share), "{share} of 1000 clients");
    for (percent, all) in [(0, false), (100, true)] {
        for by in [CanaryKey::Source, CanaryKey::Request] {
            let mut gw = with(percent, by);
            assert!(clients[..50].iter().all(|c| to_api(&mut gw, *c) == all));
        }
    }
    let mut cfg = config();
    if let Action::Forward { canary, .. } = &mut cfg.routes[3].action {
        *canary = Some(Canary {
            pool: 7,
            percent: 10,
            by: CanaryKey::Source,
        });
    }
    assert!(Gateway::new(&cfg).is_err());
}

/// `via` adds the version the request came with and the pseudonym after any `Via` the client
/// sent; the answer's entry is always HTTP/1.1's (the backends'); no `via`, no entry.
#[test]
fn via_is_appended_with_the_received_version() {
    let mut cfg = config();
    cfg.forwarding.via = Some("gw1".into());
    let mut gw = Gateway::new(&cfg).unwrap();
    let mut h = head(
        &[("host", "www.example.com"), ("via", "1.0 fred")],
        "GET",
        "/",
    );
    let up = forwarded(decide(&mut gw, &mut h));
    let via: Vec<&str> = h
        .headers
        .get_all("via")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(via, ["1.0 fred", "1.1 gw1"]);
    assert_eq!(
        up.via.as_deref().map(http::HeaderValue::as_bytes),
        Some(&b"1.1 gw1"[..])
    );
    let mut h2 = head(&[("host", "www.example.com")], "GET", "/");
    h2.version = http::Version::HTTP_2;
    forwarded(decide(&mut gw, &mut h2));
    assert_eq!(h2.headers["via"], "2 gw1");

    let mut plain = Gateway::new(&config()).unwrap();
    let mut h = head(&[("host", "www.example.com")], "GET", "/");
    let up = forwarded(decide(&mut plain, &mut h));
    assert!(!h.headers.contains_key("via") && up.via.is_none());

    for good in ["gw1", "edge-1.example", "a~b"] {
        assert!(hygiene::valid_via_pseudonym(good), "{good}");
    }
    for bad in ["", "gw 1", "gw,1", "gw\r\n", &"x".repeat(65)] {
        assert!(!hygiene::valid_via_pseudonym(bad), "{bad:?}");
    }
}

/// The client's address is written into a fixed buffer for `X-Forwarded-For`: the longest
/// texts of both families fit whole.
#[test]
fn forwarded_for_takes_the_longest_addresses_whole() {
    for client in [
        "255.255.255.255",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "::ffff:255.255.255.255",
    ] {
        let mut headers = http::HeaderMap::new();
        hygiene::prepare_upstream(
            &mut headers,
            client.parse().unwrap(),
            None,
            "http",
            &Forwarding::default(),
            http::Version::HTTP_11,
        );
        assert_eq!(headers["x-forwarded-for"], client);
    }
}

/// Hop-by-hop removal skips a message that has none of those fields, and still removes the
/// ones a `Connection` field names when it has one.
#[test]
fn hop_by_hop_removal_with_and_without_connection() {
    let mut plain = head(&[("host", "a"), ("x-secret", "s")], "GET", "/").headers;
    hygiene::remove_hop_by_hop(&mut plain);
    assert_eq!(plain.len(), 2);
    let mut named = head(
        &[("host", "a"), ("x-secret", "s"), ("connection", "x-secret")],
        "GET",
        "/",
    )
    .headers;
    hygiene::remove_hop_by_hop(&mut named);
    assert_eq!(named.len(), 1);
    assert_eq!(named["host"], "a");
}

#[test]
fn forwarded_headers_replace_or_append() {
    let mut gw = Gateway::new(&config()).unwrap();
    let spoofed = [
        ("host", "www.example.com"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil"),
        ("connection", "keep-alive, x-secret"),
        ("x-secret", "s"),
        ("keep-alive", "timeout=5"),
        ("upgrade", "websocket"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic eA=="),
        ("content-length", "3"),
    ];
    let mut h = head(&spoofed, "POST", "/");
    forwarded(decide(&mut gw, &mut h));
    let get = |n: &str| h.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(get("x-forwarded-for").unwrap(), "192.0.2.7");
    assert_eq!(get("x-forwarded-proto").unwrap(), "http");
    assert_eq!(get("x-forwarded-host").unwrap(), "www.example.com");
    for gone in [
        "connection",
        "x-secret",
        "keep-alive",
        "upgrade",
        "te",
        "proxy-authorization",
        "content-length",
    ] {
        assert_eq!(get(gone), None, "{gone}");
    }
    assert_eq!(get("host").unwrap(), "www.example.com");

    // a trusted proxy's chain is extended and its proto/host kept
    let proxy = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 5000);
    let mut h = head(
        &[
            ("host", "www.example.com"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "https"),
            ("connection", "host"),
        ],
        "GET",
        "/",
    );
    forwarded(gw.decide(epoch(), proxy, VIP, None, &mut h));
    let get = |n: &str| h.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        get("x-forwarded-for").unwrap(),
        "1.2.3.4, 5.6.7.8, 203.0.113.9"
    );
    assert_eq!(get("x-forwarded-proto").unwrap(), "https");
    // `Connection: host` does not remove Host
    assert_eq!(get("host").unwrap(), "www.example.com");
}

#[test]
fn config_errors() {
    let mut c = config();
    c.pools.push(pool("web", vec![]));
    assert_eq!(
        Gateway::new(&c).unwrap_err(),
        ConfigError::DuplicatePool("web".into())
    );
    let mut c = config();
    c.routes.push(forward("x", Match::default(), 9, None));
    assert!(matches!(
        Gateway::new(&c).unwrap_err(),
        ConfigError::NoSuchPool { pool: 9, .. }
    ));
    let mut c = config();
    c.limits.max_header_bytes = 10;
    assert!(matches!(
        Gateway::new(&c).unwrap_err(),
        ConfigError::LimitOutOfRange { .. }
    ));
    let mut c = config();
    c.pools[0].balance.backends.push(backend(1, 1));
    assert!(matches!(
        Gateway::new(&c).unwrap_err(),
        ConfigError::Pool { .. }
    ));
}

fn guard_all(data: &[u8]) -> (Vec<u8>, Result<(), hygiene::Refusal>) {
    let mut g = HeadGuard::new(1024);
    let mut out = Vec::new();
    let r = g.feed(data, &mut out);
    (out, r)
}

#[test]
fn guard_passes_pipelined_requests_with_bodies() {
    let stream = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: a\r\n\r\n";
    let (out, r) = guard_all(stream);
    assert_eq!(r, Ok(()));
    assert_eq!(out, stream);
    let mut g = HeadGuard::new(1024);
    let mut out = Vec::new();
    for b in stream.chunks(1) {
        g.feed(b, &mut out).unwrap();
    }
    assert_eq!(out, stream);
    assert_eq!(g.heads(), 3);
    assert!(g.at_head());
}

#[test]
fn guard_holds_back_an_incomplete_head() {
    let mut g = HeadGuard::new(1024);
    let mut out = Vec::new();
    g.feed(b"GET / HTTP/1.1\r\nHost: a\r\n", &mut out).unwrap();
    assert!(out.is_empty());
    g.feed(b"\r\n", &mut out).unwrap();
    assert_eq!(out.len(), 27);
}

#[test]
fn guard_refuses_smuggling_and_oversize() {
    let first = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let cases: [(&[u8], u16); 8] = [
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ];
    for (bad, status) in cases {
        // behind a clean request on the same connection: only that one is released
        let stream = [&first[..], bad].concat();
        let (out, r) = guard_all(&stream);
        assert_eq!(
            r.unwrap_err().status.as_u16(),
            status,
            "{}",
            String::from_utf8_lossy(bad)
        );
        assert!(out.starts_with(first));
        if status == 400
            && !bad
                .starts_with(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz")
        {
            assert_eq!(out, first);
        }
    }
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "a".repeat(2000)
    );
    assert_eq!(guard_all(big.as_bytes()).1.unwrap_err().status, 431);
    // never completing, but too long already
    let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(2000));
    let (out, r) = guard_all(endless.as_bytes());
    assert_eq!((out.len(), r.unwrap_err().status.as_u16()), (0, 431));
    let many: String = (0..101).map(|i| format!("X{i}: 1\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
    let mut g = HeadGuard::new(8192);
    assert_eq!(
        g.feed(many.as_bytes(), &mut Vec::new()).unwrap_err().status,
        431
    );
}

#[test]
fn guard_holds_back_what_follows_an_upgrade_head() {
    let head: &[u8] =
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let mut stream = head.to_vec();
    stream.extend_from_slice(b"GET /hidden HTTP/1.1\r\nHost: a\r\n\r\n");
    let mut g = HeadGuard::new(1024);
    let mut out = Vec::new();
    g.feed(&stream, &mut out).unwrap();
    assert_eq!(out, head);
    assert!(g.upgrading());
    assert_eq!(g.take_held(), b"GET /hidden HTTP/1.1\r\nHost: a\r\n\r\n");
    // Bounded: no more than max_head bytes are held before the answer.
    let (_, r) = guard_all(&[head, &[0u8; 2000][..]].concat());
    assert!(r.is_err());
    // With a body it is an ordinary request: the next head is judged as usual.
    let with_body = b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let (out, r) = guard_all(with_body);
    assert_eq!((out.as_slice(), r), (&with_body[..], Ok(())));
}

#[test]
fn upgrades_are_forwarded_except_h2c_or_with_a_body() {
    let mut gw = Gateway::new(&config()).unwrap();
    let ws = [
        ("host", "www.example.com"),
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
    ];
    let mut h = head(&ws, "GET", "/chat");
    let up = forwarded(decide(&mut gw, &mut h));
    assert_eq!(
        up.upgrade.as_ref().map(|v| v.as_bytes()),
        Some(&b"websocket"[..])
    );
    assert_eq!(h.headers["connection"], "upgrade");
    assert_eq!(h.headers["upgrade"], "websocket");
    for extra in [("upgrade", "h2c"), ("content-length", "3")] {
        let mut fields = ws.to_vec();
        if extra.0 == "upgrade" {
            fields[2] = extra;
        } else {
            fields.push(extra);
        }
        let mut h = head(&fields, "GET", "/chat");
        let up = forwarded(decide(&mut gw, &mut h));
        assert_eq!(up.upgrade, None, "{extra:?}");
        assert!(!h.headers.contains_key("upgrade"), "{extra:?}");
        assert!(!h.headers.contains_key("connection"), "{extra:?}");
    }
    // Upgrade without Connection: upgrade is no request to switch.
    let mut h = head(
        &[("host", "www.example.com"), ("upgrade", "websocket")],
        "GET",
        "/",
    );
    assert_eq!(forwarded(decide(&mut gw, &mut h)).upgrade, None);
}

#[test]
fn fuzz_entry_runs_on_samples() {
    crate::fuzzing::run_request(
        epoch(),
        b"GET /api/x HTTP/1.1\r\nHost: a.example.com\r\n\r\nGET /old HTTP/1.1\r\nHost: b\r\n\r\n",
    );
    crate::fuzzing::run_request(
        epoch(),
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    crate::fuzzing::run_request(
        epoch(),
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
    );
}

proptest! {
    /// However the stream is cut into reads, the guard releases the same bytes and verdict.
    #[test]
    fn guard_is_independent_of_read_sizes(
        cuts in proptest::collection::vec(1usize..40, 1..20),
        body in proptest::collection::vec(any::<u8>(), 0..200),
        chunked in any::<bool>(),
    ) {
        let mut stream = Vec::new();
        if chunked {
            stream.extend_from_slice(b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
            for piece in body.chunks(37) {
                stream.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                stream.extend_from_slice(piece);
                stream.extend_from_slice(b"\r\n");
            }
            stream.extend_from_slice(b"0\r\n\r\n");
        } else {
            stream.extend_from_slice(format!("POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
            stream.extend_from_slice(&body);
        }
        stream.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
        let mut g = HeadGuard::new(1024);
        let mut out = Vec::new();
        let mut rest = &stream[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() { break; }
            let n = (*cut).min(rest.len());
            g.feed(&rest[..n], &mut out).unwrap();
            rest = &rest[n..];
        }
        prop_assert_eq!(&out, &stream);
        prop_assert_eq!(g.heads(), 2);
        crate::fuzzing::run_request(epoch(), &[&stream[..], &body[..]].concat());
    }
}

#[test]
fn fuzz_corpus_replays() {
    let n = testkit::replay_corpus("http_request", |data| {
        crate::fuzzing::run_request(epoch(), data);
    });
    assert!(n >= 4);
}

#[test]
fn empty_lines_before_a_head_are_judged_alike_however_read() {
    // Found by the fuzzer: an end-of-head looked for inside the leading empty lines made the
    // verdict depend on where reads were cut.
    let stream = b"\r\n\r\n\r{\n";
    crate::fuzzing::run_request(epoch(), stream);
    let (out, r) = guard_all(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r, Ok(()));
    assert_eq!(out.len(), 31);
}

#[test]
fn a_long_malformed_head_is_too_large_however_read() {
    // Found by the fuzzer: read whole, the head's end was found and the head judged malformed;
    // read byte by byte, it was too large first. The limit now applies to where the head ends.
    let head = format!(
        "GET / HTTP/1.1\r\nX: {}\r\nBad header\r\n\r\n",
        "a".repeat(600)
    );
    crate::fuzzing::run_request(epoch(), head.as_bytes());
    let mut g = HeadGuard::new(512);
    assert_eq!(
        g.feed(head.as_bytes(), &mut Vec::new()).unwrap_err().status,
        431
    );
}

#[test]
fn a_long_chunk_size_line_releases_the_same_bytes_however_read() {
    // Found by the fuzzer: read whole, the bytes up to the line's end were released before
    // the line was found too long; byte by byte, only up to the limit.
    let stream = format!(
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\n",
        "e".repeat(2 * crate::framing::MAX_CHUNK_LINE)
    );
    crate::fuzzing::run_request(epoch(), stream.as_bytes());
    let (out, r) = guard_all(stream.as_bytes());
    assert!(r.is_err());
    let head = stream.find("\r\n\r\n").unwrap() + 4;
    assert_eq!(out.len(), head + crate::framing::MAX_CHUNK_LINE);
}

#[test]
fn a_sticky_cookie_routes_to_its_backend_while_it_is_up() {
    let mut cfg = config();
    cfg.pools[0].cookie = Some(crate::StickyCookie {
        name: "SRV".into(),
        nocache: true,
        mode: crate::CookieMode::Insert,
    });
    let mut gw = Gateway::new(&cfg).unwrap();
    let www = |cookie: Option<&str>| {
        let mut fields = vec![("host", "www.example.com")];
        if let Some(c) = cookie {
            fields.push(("cookie", c));
        }
        head(&fields, "GET", "/")
    };
    // No cookie: the scheduler picks, the answer sets the cookie naming its pick.
    let mut h = www(None);
    let first = forwarded(decide(&mut gw, &mut h));
    let (set, nocache) = first.set_cookie.clone().expect("cookie set");
    assert!(nocache);
    let id = crate::StickyCookie::id(first.addr);
    assert_eq!(set.to_str().unwrap(), format!("SRV={id}; Path=/"));
    assert!(!set.to_str().unwrap().contains("10.0.0."));
    gw.finish(epoch(), &first, Outcome::Answered(StatusCode::OK));
    // With it: the same backend every time (rr would alternate), no new cookie, and the
    // cookie never goes upstream while the others do.
    for _ in 0..5 {
        let mut h = www(Some(&format!("a=1; SRV={id}; b=2")));
        let up = forwarded(decide(&mut gw, &mut h));
        assert_eq!(up.addr, first.addr);
        assert_eq!(up.set_cookie, None);
        assert_eq!(h.headers["cookie"], "a=1; b=2");
        gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    }
    let mut h = www(Some(&format!("SRV={id}")));
    forwarded(decide(&mut gw, &mut h));
    assert!(!h.headers.contains_key("cookie"));
    // An unknown id is re-dispatched and gets a fresh cookie.
    let mut h = www(Some("SRV=0000000000000000"));
    assert!(forwarded(decide(&mut gw, &mut h)).set_cookie.is_some());
    // Without stickiness the two backends alternate.
    let mut gw = Gateway::new(&config()).unwrap();
    let a = forwarded(decide(&mut gw, &mut www(None)));
    let b = forwarded(decide(&mut gw, &mut www(Some(&format!("SRV={id}")))));
    assert_ne!(a.addr, b.addr);
    assert_eq!(a.set_cookie, None);
    // Names are tokens.
    for bad in ["", "a b", "a;b", &"x".repeat(65)] {
        let mut cfg = config();
        cfg.pools[0].cookie = Some(crate::StickyCookie {
            name: bad.into(),
            nocache: false,
            mode: crate::CookieMode::Insert,
        });
        assert!(matches!(
            Gateway::new(&cfg),
            Err(ConfigError::BadCookieName(_))
        ));
    }
}

#[test]
fn header_rules_set_and_delete_with_bounds() {
    let mut cfg = config();
    let www = cfg.routes.iter().position(|r| r.name == "www").unwrap();
    cfg.routes[www].rewrite = HeaderRules {
        set_request: vec![
            (
                HeaderRules::name("X-Env").unwrap(),
                HeaderRules::value("prod").unwrap(),
            ),
            (
                HeaderRules::name("X-Forwarded-Proto").unwrap(),
                HeaderRules::value("https").unwrap(),
            ),
        ],
        del_request: vec![HeaderRules::name("X-Debug").unwrap()],
        set_response: vec![(
            HeaderRules::name("Strict-Transport-Security").unwrap(),
            HeaderRules::value("max-age=63072000").unwrap(),
        )],
        del_response: vec![HeaderRules::name("Server").unwrap()],
        ..HeaderRules::default()
    };
    let mut gw = Gateway::new(&cfg).unwrap();
    let mut h = head(
        &[
            ("host", "www.example.com"),
            ("x-debug", "1"),
            ("x-env", "client"),
            ("x-env", "twice"),
        ],
        "GET",
        "/",
    );
    let up = forwarded(decide(&mut gw, &mut h));
    assert_eq!(h.headers.get_all("x-env").iter().count(), 1);
    assert_eq!(h.headers["x-env"], "prod");
    assert_eq!(h.headers["x-forwarded-proto"], "https");
    assert!(!h.headers.contains_key("x-debug"));
    let mut res = http::HeaderMap::new();
    res.insert("server", "apache".parse().unwrap());
    gw.rewrite_response(up.route, &mut res);
    assert!(!res.contains_key("server"));
    assert_eq!(res["strict-transport-security"], "max-age=63072000");
    // Other routes are untouched.
    let mut h = head(
        &[("host", "x.example.com"), ("x-debug", "1")],
        "GET",
        "/api/x",
    );
    forwarded(decide(&mut gw, &mut h));
    assert!(h.headers.contains_key("x-debug"));

    for reserved in [
        "Connection",
        "transfer-encoding",
        "Upgrade",
        "Host",
        "content-length",
    ] {
        assert_eq!(
            HeaderRules::name(reserved),
            Err(ConfigError::ReservedHeader(reserved.into()))
        );
    }
    assert!(matches!(
        HeaderRules::name("a b"),
        Err(ConfigError::BadHeaderName(_))
    ));
    for bad in ["a\r\nX-Injected: 1", "\u{e9}", &"v".repeat(4097)] {
        assert!(matches!(
            HeaderRules::value(bad),
            Err(ConfigError::BadHeaderValue(_))
        ));
    }
    assert!(HeaderRules::value(&"v".repeat(4096)).is_ok());
    let mut cfg = config();
    cfg.routes[0].rewrite.del_request = vec![HeaderRules::name("x-a").unwrap(); 33];
    assert!(matches!(
        Gateway::new(&cfg),
        Err(ConfigError::LimitOutOfRange { .. })
    ));
}

#[test]
fn header_rules_add_after_delete_and_set() {
    let rule = |name: &str, value: &str| {
        (
            HeaderRules::name(name).unwrap(),
            HeaderRules::value(value).unwrap(),
        )
    };
    let mut cfg = config();
    let www = cfg.routes.iter().position(|r| r.name == "www").unwrap();
    cfg.routes[www].rewrite = HeaderRules {
        del_request: vec![HeaderRules::name("X-Tag").unwrap()],
        set_request: vec![rule("X-Env", "prod")],
        add_request: vec![
            rule("X-Tag", "proxy"),
            rule("X-Env", "eu"),
            rule("X-Forwarded-For", "10.9.9.9"),
        ],
        set_response: vec![rule("Cache-Control", "no-store")],
        add_response: vec![
            rule("Link", "</a.css>; rel=preload"),
            rule("Link", "</b.js>; rel=preload"),
            rule("Cache-Control", "private"),
        ],
        ..HeaderRules::default()
    };
    let mut gw = Gateway::new(&cfg).unwrap();
    let mut h = head(
        &[
            ("host", "www.example.com"),
            ("x-tag", "client"),
            ("x-env", "client"),
        ],
        "GET",
        "/",
    );
    let up = forwarded(decide(&mut gw, &mut h));
    let all = |map: &http::HeaderMap, name: &str| -> Vec<String> {
        map.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    // Deleted, then added: only the rule's field is left.
    assert_eq!(all(&h.headers, "x-tag"), ["proxy"]);
    // Set (replacing the client's), then added: both, the set one first.
    assert_eq!(all(&h.headers, "x-env"), ["prod", "eu"]);
    // After X-Forwarded-For is set by the proxy: appended to it, not replacing it.
    assert_eq!(
        all(&h.headers, "x-forwarded-for"),
        [CLIENT.ip().to_string(), "10.9.9.9".to_owned()]
    );
    let mut res = http::HeaderMap::new();
    res.append("link", "</app.js>; rel=preload".parse().unwrap());
    res.append("cache-control", "max-age=60".parse().unwrap());
    gw.rewrite_response(up.route, &mut res);
    // Kept what the backend sent and appended in rule order.
    assert_eq!(
        all(&res, "link"),
        [
            "</app.js>; rel=preload",
            "</a.css>; rel=preload",
            "</b.js>; rel=preload"
        ]
    );
    assert_eq!(all(&res, "cache-control"), ["no-store", "private"]);

    // The bounds and refusals of set rules.
    let mut cfg = config();
    cfg.routes[0].rewrite.add_response = vec![rule("X-A", "1"); 33];
    assert!(matches!(
        Gateway::new(&cfg),
        Err(ConfigError::LimitOutOfRange { value: 33, .. })
    ));
    cfg.routes[0].rewrite.add_response.pop();
    assert!(Gateway::new(&cfg).is_ok());
}

/// An HTTP/2 head as hyper hands it over: the target in absolute form (`:scheme`,
/// `:authority`, `:path`), no `Host` field.
fn h2_head(raw: &[(&str, &str)], method: &str, uri: &str) -> request::Parts {
    let mut h = head(raw, method, uri);
    h.version = http::Version::HTTP_2;
    h
}

#[test]
fn an_http2_head_routes_by_its_authority_and_gets_a_host_upstream() {
    let mut gw = Gateway::new(&config()).unwrap();
    let mut h = h2_head(&[], "GET", "https://shop.example.com/api/items?x=1");
    let up = forwarded(decide(&mut gw, &mut h));
    assert_eq!(up.pool, 1);
    assert_eq!(up.path_and_query, "/items?x=1");
    assert_eq!(h.headers["host"], "shop.example.com");
    assert_eq!(h.headers["x-forwarded-host"], "shop.example.com");
    assert_eq!(h.headers["x-forwarded-for"], "192.0.2.7");
    // :authority and a Host that differs: malformed (RFC 9113 §8.3.1).
    let mut h = h2_head(&[("host", "evil.test")], "GET", "https://www.example.com/");
    assert_eq!(answered(decide(&mut gw, &mut h)), StatusCode::BAD_REQUEST);
    // Neither: no host to route on.
    let mut h = h2_head(&[], "GET", "/");
    assert_eq!(answered(decide(&mut gw, &mut h)), StatusCode::BAD_REQUEST);
}

#[test]
fn http2_heads_meet_the_http1_bounds() {
    let max = Limits::default().max_header_bytes;
    let ok = h2_head(&[("x-a", "1")], "GET", "https://a.test/p");
    assert_eq!(hygiene::check_h2_head(&ok, max), Ok(()));
    // One field more than an HTTP/1.1 head may have.
    let names: Vec<String> = (0..=crate::framing::MAX_HEADERS)
        .map(|i| format!("x-f{i}"))
        .collect();
    let fields: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let many = h2_head(&fields, "GET", "https://a.test/");
    let refusal = hygiene::check_h2_head(&many, max).unwrap_err();
    assert_eq!(refusal.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(
        hygiene::check_h2_head(&many, max).unwrap_err().reason,
        "too many header fields"
    );
    let exactly = h2_head(&fields[1..], "GET", "https://a.test/");
    assert_eq!(hygiene::check_h2_head(&exactly, max), Ok(()));
    // Bytes as HTTP/1.1 would count them: the request line, Host from :authority, fields.
    let long = "v".repeat(1000);
    let big = h2_head(&[("x-long", long.as_str())], "GET", "https://a.test/");
    let size =
        "GET / HTTP/1.1\r\n".len() + "Host: a.test\r\n".len() + "x-long: \r\n".len() + 1000 + 2;
    assert_eq!(hygiene::check_h2_head(&big, size), Ok(()));
    assert_eq!(
        hygiene::check_h2_head(&big, size - 1).unwrap_err().status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    // The list size announced leaves room for every head within the limit, and bounds it.
    let limits = Limits::default();
    let h2_size = |h: &request::Parts| {
        h.headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum::<usize>()
            + 4 * 32
            + h.uri.to_string().len()
            + h.method.as_str().len()
    };
    assert!(h2_size(&exactly) < limits.h2_header_list_size() as usize);
    assert!(limits.h2_header_list_size() as usize <= 2 * max + 32 * 104);
}

fn prefix_mode() -> GatewayConfig {
    let mut cfg = config();
    cfg.pools[0].cookie = Some(crate::StickyCookie {
        name: "JSESSIONID".into(),
        nocache: false,
        mode: crate::CookieMode::Prefix,
    });
    cfg
}

#[test]
fn a_prefix_cookie_routes_by_its_prefix_and_reaches_the_backend_without_it() {
    let mut gw = Gateway::new(&prefix_mode()).unwrap();
    let www = |cookie: Option<&str>| {
        let mut fields = vec![("host", "www.example.com")];
        if let Some(c) = cookie {
            fields.push(("cookie", c));
        }
        head(&fields, "GET", "/")
    };
    // No cookie: the scheduler picks; the proxy sets nothing itself, it prefixes the
    // application's Set-Cookie with the id of the backend that answered.
    let first = forwarded(decide(&mut gw, &mut www(None)));
    assert_eq!(first.set_cookie, None);
    let id = crate::StickyCookie::id(first.addr);
    let prefix = first.cookie_prefix.clone().expect("prefix mode");
    assert_eq!(prefix.id, id);
    let mut answer = http::HeaderMap::new();
    answer.append("set-cookie", "other=1; Path=/".parse().unwrap());
    answer.append(
        "set-cookie",
        "JSESSIONID=abc123; Path=/; HttpOnly".parse().unwrap(),
    );
    answer.append("set-cookie", "JSESSIONID=; Max-Age=0".parse().unwrap());
    prefix.apply(&mut answer);
    let set: Vec<String> = answer
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        set,
        [
            "other=1; Path=/".to_owned(),
            format!("JSESSIONID={id}~abc123; Path=/; HttpOnly"),
            "JSESSIONID=; Max-Age=0".to_owned(),
        ]
    );
    gw.finish(epoch(), &first, Outcome::Answered(StatusCode::OK));
    // With it: the same backend every time (rr would alternate), and the backend sees its
    // own value; the client's other cookies pass unchanged.
    for _ in 0..5 {
        let mut h = www(Some(&format!("a=1; JSESSIONID={id}~abc123; b=2")));
        let up = forwarded(decide(&mut gw, &mut h));
        assert_eq!(up.addr, first.addr);
        assert_eq!(h.headers["cookie"], "a=1; JSESSIONID=abc123; b=2");
        gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    }
    // A drained backend's clients are redispatched, the prefix still stripped.
    gw.set_backend_state("web", first.addr, balance::AdminState::Drain)
        .unwrap();
    for _ in 0..3 {
        let mut h = www(Some(&format!("JSESSIONID={id}~abc123")));
        let up = forwarded(decide(&mut gw, &mut h));
        assert_ne!(up.addr, first.addr);
        assert_eq!(h.headers["cookie"], "JSESSIONID=abc123");
        assert_eq!(
            up.cookie_prefix.unwrap().id,
            crate::StickyCookie::id(up.addr)
        );
    }
}

#[test]
fn a_malformed_or_unknown_prefix_is_no_cookie() {
    let mut gw = Gateway::new(&prefix_mode()).unwrap();
    let sent = |gw: &mut Gateway, cookie: &str| {
        let mut h = head(
            &[("host", "www.example.com"), ("cookie", cookie)],
            "GET",
            "/",
        );
        let up = forwarded(decide(gw, &mut h));
        gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
        (up.addr, h.headers["cookie"].to_str().unwrap().to_owned())
    };
    // Passed on as they are, and balanced as if there were no cookie (rr alternates).
    for bad in [
        "JSESSIONID=abc",
        "JSESSIONID=~abc",
        "JSESSIONID=0123~abc",
        "JSESSIONID=0123456789ABCDEF~abc",
        "JSESSIONID=0123456789abcdeg~abc",
        "JSESSIONID",
        "jsessionid=0123456789abcdef~abc",
    ] {
        let (a, seen_a) = sent(&mut gw, bad);
        let (b, _) = sent(&mut gw, bad);
        assert_ne!(a, b, "{bad}");
        assert_eq!(seen_a, bad);
    }
    // Well-formed but naming no backend: balanced, and the prefix (the proxy's) removed.
    let (a, seen) = sent(&mut gw, "JSESSIONID=0123456789abcdef~abc; x=1");
    let (b, _) = sent(&mut gw, "JSESSIONID=0123456789abcdef~abc; x=1");
    assert_ne!(a, b);
    assert_eq!(seen, "JSESSIONID=abc; x=1");
    // Only the first cookie of the name counts, as in insert mode.
    let id = crate::StickyCookie::id(a);
    let (to, seen) = sent(&mut gw, &format!("JSESSIONID={id}~v1; JSESSIONID=v2"));
    assert_eq!(to, a);
    assert_eq!(seen, "JSESSIONID=v1; JSESSIONID=v2");
    // nocache means nothing in prefix mode: refused rather than ignored.
    let mut cfg = prefix_mode();
    cfg.pools[0].cookie.as_mut().unwrap().nocache = true;
    assert!(matches!(
        Gateway::new(&cfg),
        Err(ConfigError::NocacheWithPrefix(_))
    ));
}

#[test]
fn a_retry_moves_the_prefix_to_the_new_backend() {
    let mut gw = Gateway::new(&prefix_mode()).unwrap();
    let dead = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80);
    let cookie = format!("JSESSIONID={}~s", crate::StickyCookie::id(dead));
    let mut h = head(
        &[("host", "www.example.com"), ("cookie", &cookie)],
        "GET",
        "/",
    );
    let mut up = forwarded(decide(&mut gw, &mut h));
    assert_eq!(up.addr, dead);
    assert!(gw.retry(epoch(), &mut up, AttemptFailure::Unsent).is_some());
    assert_ne!(up.addr, dead);
    assert_eq!(up.set_cookie, None);
    assert_eq!(
        up.cookie_prefix.unwrap().id,
        crate::StickyCookie::id(up.addr)
    );
}

proptest! {
    /// Whatever a client sends as cookies, or a backend as Set-Cookie, prefix mode takes it
    /// without a panic.
    #[test]
    fn prefix_mode_takes_any_cookie_field(field in "[ -~]{0,200}") {
        let mut gw = Gateway::new(&prefix_mode()).unwrap();
        let Ok(value) = http::HeaderValue::from_str(&field) else {
            return Ok(());
        };
        let mut h = head(&[("host", "www.example.com")], "GET", "/");
        h.headers.insert("cookie", value);
        if let Verdict::Forward(up) = decide(&mut gw, &mut h) {
            gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
            let mut answer = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&field) {
                answer.insert("set-cookie", v);
            }
            up.cookie_prefix.unwrap().apply(&mut answer);
        }
    }
}

#[test]
fn http2_cookie_fields_are_joined_for_http1() {
    let mut h = h2_head(
        &[("cookie", "a=1"), ("cookie", "SRV=x"), ("cookie", "b=2")],
        "GET",
        "https://a.test/",
    );
    hygiene::join_cookies(&mut h.headers);
    let all: Vec<_> = h.headers.get_all("cookie").iter().collect();
    assert_eq!(all, ["a=1; SRV=x; b=2"]);
    let mut one = head(&[("cookie", "a=1")], "GET", "/");
    hygiene::join_cookies(&mut one.headers);
    assert_eq!(one.headers["cookie"], "a=1");
    // The sticky cookie is found among split fields, the others kept joined.
    let mut cfg = config();
    cfg.pools[0].cookie = Some(crate::StickyCookie {
        name: "SRV".into(),
        nocache: false,
        mode: crate::CookieMode::Insert,
    });
    let mut gw = Gateway::new(&cfg).unwrap();
    let first = forwarded(decide(
        &mut gw,
        &mut h2_head(&[], "GET", "https://www.example.com/"),
    ));
    let id = crate::StickyCookie::id(first.addr);
    for _ in 0..4 {
        let mut h = h2_head(
            &[("cookie", "a=1"), ("cookie", &format!("SRV={id}"))],
            "GET",
            "https://www.example.com/",
        );
        hygiene::join_cookies(&mut h.headers);
        let up = forwarded(decide(&mut gw, &mut h));
        assert_eq!(up.addr, first.addr);
        assert_eq!(h.headers["cookie"], "a=1");
    }
}

/// Response times: from the decision to the answer's head, per gateway and per pool; a
/// cancel or a refused connection is no response time.
#[test]
fn answers_feed_the_response_time_percentiles() {
    let mut gw = Gateway::new(&config()).unwrap();
    for ms in 1..=10 {
        let mut h = head(&[("host", "www.example.com")], "GET", "/");
        let up = forwarded(decide(&mut gw, &mut h));
        let at = epoch() + Duration::from_millis(ms);
        gw.finish(at, &up, Outcome::Answered(StatusCode::OK));
    }
    for outcome in [Outcome::Cancelled, Outcome::Refused] {
        let mut h = head(&[("host", "www.example.com")], "GET", "/");
        let up = forwarded(decide(&mut gw, &mut h));
        gw.finish(epoch() + Duration::from_secs(9), &up, outcome);
    }
    let s = gw.status(epoch() + Duration::from_millis(10));
    assert_eq!(s.latency.samples, 10, "{:?}", s.latency);
    assert!(
        (4_900..=5_100).contains(&s.latency.p50_us),
        "{:?}",
        s.latency
    );
    assert!(
        (9_900..=10_100).contains(&s.latency.max_us),
        "{:?}",
        s.latency
    );
    let pool = s.pools.iter().find(|p| p.latency.samples > 0).unwrap();
    assert_eq!(pool.latency, s.latency);
    // Two idle windows later the figures are gone.
    let later = gw.status(epoch() + Duration::from_secs(61));
    assert_eq!(later.latency.samples, 0);
}

#[test]
fn a_cancelled_request_is_499_and_not_the_backends_failure() {
    let mut gw = Gateway::new(&config()).unwrap();
    let mut h = head(&[("host", "www.example.com")], "GET", "/");
    let up = forwarded(decide(&mut gw, &mut h));
    gw.finish(epoch(), &up, Outcome::Cancelled);
    gw.cancelled();
    assert_eq!(Outcome::Cancelled.status().as_u16(), 499);
    let s = gw.status(epoch());
    assert_eq!(s.requests, 2);
    assert_eq!(s.cancelled, 2);
    assert_eq!(s.responses.client_error, 2);
    assert_eq!(s.routes[3].responses.client_error, 1);
    let b = s.pools[0]
        .backends
        .iter()
        .find(|b| b.addr == up.addr.to_string())
        .unwrap();
    assert_eq!((b.active, b.failures, b.responses.client_error), (0, 0, 1));
}

/// The status of backend `addr` of pool `pool`.
fn backend_status(gw: &Gateway, pool: usize, addr: SocketAddrV4) -> crate::BackendStatus {
    gw.status(epoch()).pools[pool]
        .backends
        .iter()
        .find(|b| b.addr == addr.to_string())
        .cloned()
        .unwrap()
}

#[test]
fn an_unreachable_backend_is_retried_on_another_and_counted() {
    let mut cfg = config();
    cfg.pools[0]
        .balance
        .backends
        .extend([backend(5, 1), backend(6, 1)]);
    let mut gw = Gateway::new(&cfg).unwrap();
    let mut h = head(&[("host", "www.example.com")], "POST", "/");
    let mut up = forwarded(decide(&mut gw, &mut h));
    let first = up.addr;
    // Nothing was sent: even a POST goes to another backend, each retry to a new one.
    let mut seen = vec![first];
    for _ in 0..PoolSpec::DEFAULT_RETRIES {
        assert!(up.may_retry());
        let retried = gw.retry(epoch(), &mut up, AttemptFailure::Unsent);
        assert_eq!(retried.map(|r| r.ejection), Some(None));
        assert!(!seen.contains(&up.addr), "{:?} retried again", up.addr);
        seen.push(up.addr);
    }
    // Out of retries: nothing changes, the request finishes with its outcome.
    assert!(!up.may_retry());
    let last = up.clone();
    assert_eq!(gw.retry(epoch(), &mut up, AttemptFailure::Unsent), None);
    assert_eq!(up, last);
    gw.finish(epoch(), &up, Outcome::Refused);
    let s = gw.status(epoch());
    assert_eq!((s.requests, s.responses.server_error), (1, 1));
    assert_eq!(s.pools[0].retries, 3);
    assert_eq!(
        (s.pools[0].requests, s.pools[0].responses.server_error),
        (1, 1)
    );
    for addr in &seen[..3] {
        let b = backend_status(&gw, 0, *addr);
        assert_eq!(
            (
                b.requests,
                b.failures,
                b.retried,
                b.active,
                b.responses.server_error
            ),
            (1, 1, 1, 0, 0),
            "{addr}"
        );
    }
    let b = backend_status(&gw, 0, seen[3]);
    assert_eq!(
        (b.requests, b.failures, b.retried, b.responses.server_error),
        (1, 1, 0, 1)
    );
}

#[test]
fn a_retry_needs_an_untried_live_backend_and_a_replayable_request() {
    let mut gw = Gateway::new(&config()).unwrap();
    let www = |method: &str| head(&[("host", "www.example.com")], method, "/");
    // Two backends: one retry, then none left untried.
    let mut up = forwarded(decide(&mut gw, &mut www("GET")));
    assert!(gw.retry(epoch(), &mut up, AttemptFailure::Unsent).is_some());
    assert_eq!(gw.retry(epoch(), &mut up, AttemptFailure::Unsent), None);
    gw.finish(epoch(), &up, Outcome::Refused);
    // Sent and closed unanswered: only a safe, bodiless request goes again.
    let closed = |bodiless| AttemptFailure::ClosedUnanswered { bodiless };
    let mut up = forwarded(decide(&mut gw, &mut www("POST")));
    assert_eq!(gw.retry(epoch(), &mut up, closed(true)), None);
    gw.finish(epoch(), &up, Outcome::Broken);
    let mut up = forwarded(decide(&mut gw, &mut www("GET")));
    assert_eq!(gw.retry(epoch(), &mut up, closed(false)), None);
    let before = up.addr;
    assert!(gw.retry(epoch(), &mut up, closed(true)).is_some());
    assert_ne!(up.addr, before);
    gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    // A one-backend pool has nowhere to retry; `retries = 0` never retries.
    let mut api = head(&[("host", "a.example.com")], "GET", "/api/x");
    let mut up = forwarded(decide(&mut gw, &mut api));
    assert!(up.may_retry());
    assert_eq!(gw.retry(epoch(), &mut up, AttemptFailure::Unsent), None);
    gw.finish(epoch(), &up, Outcome::Refused);
    let mut cfg = config();
    cfg.pools[0].retries = 0;
    let mut gw = Gateway::new(&cfg).unwrap();
    let mut up = forwarded(decide(&mut gw, &mut www("GET")));
    assert!(!up.may_retry());
    assert_eq!(gw.retry(epoch(), &mut up, AttemptFailure::Unsent), None);
    // Bounded.
    cfg.pools[0].retries = PoolSpec::MAX_RETRIES + 1;
    assert!(matches!(
        Gateway::new(&cfg),
        Err(ConfigError::LimitOutOfRange {
            what: "retries",
            ..
        })
    ));
}

#[test]
fn a_sticky_client_whose_backend_is_unreachable_is_redispatched_with_a_new_cookie() {
    let mut cfg = config();
    cfg.pools[0].cookie = Some(crate::StickyCookie {
        name: "SRV".into(),
        nocache: false,
        mode: crate::CookieMode::Insert,
    });
    let mut gw = Gateway::new(&cfg).unwrap();
    let dead = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80);
    let cookie = format!("SRV={}", crate::StickyCookie::id(dead));
    let mut h = head(
        &[("host", "www.example.com"), ("cookie", &cookie)],
        "GET",
        "/",
    );
    let mut up = forwarded(decide(&mut gw, &mut h));
    assert_eq!((up.addr, up.set_cookie.clone()), (dead, None));
    assert!(gw.retry(epoch(), &mut up, AttemptFailure::Unsent).is_some());
    assert_ne!(up.addr, dead);
    let (set, _) = up.set_cookie.clone().expect("the new backend's cookie");
    assert_eq!(
        set.to_str().unwrap(),
        format!("SRV={}; Path=/", crate::StickyCookie::id(up.addr))
    );
}

#[test]
fn a_retried_failure_counts_for_passive_ejection() {
    let mut cfg = config();
    cfg.pools[0].eject = Some(crate::health::EjectConfig {
        consecutive_errors: 1,
        duration: Duration::from_secs(30),
    });
    let mut gw = Gateway::new(&cfg).unwrap();
    let mut up = forwarded(decide(
        &mut gw,
        &mut head(&[("host", "www.example.com")], "GET", "/"),
    ));
    let failed = up.addr;
    let retried = gw.retry(epoch(), &mut up, AttemptFailure::Unsent).unwrap();
    let ejection = retried.ejection.expect("ejected at the first error");
    assert_eq!((ejection.key.backend, ejection.spared), (failed, false));
    gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    assert_eq!(backend_status(&gw, 0, failed).state, "ejected");
}

#[test]
fn the_reset_budget_counts_per_window() {
    use crate::ResetBudget;
    let t0 = epoch();
    let mut budget = ResetBudget::new(3);
    for i in 0..3 {
        assert!(!budget.cancelled(t0 + Duration::from_millis(i * 100)));
    }
    assert!(budget.cancelled(t0 + Duration::from_millis(500)));
    // A new window starts afresh: a client cancelling now and then is never sent away.
    let mut budget = ResetBudget::new(3);
    for i in 0..100 {
        assert!(!budget.cancelled(t0 + ResetBudget::WINDOW * i));
    }
    assert_eq!(Limits::default().max_cancels(), 200);
}

#[test]
fn alpn_and_stream_limits_are_checked() {
    use crate::{Alpn, TlsConfig};
    assert_eq!(Alpn::parse("h2"), Some(Alpn::H2));
    assert_eq!(Alpn::parse("http/1.1"), Some(Alpn::Http11));
    assert_eq!(Alpn::parse("h2c"), None);
    assert_eq!(Alpn::parse("HTTP/1.1"), None);
    let with_tls = |alpn: Vec<Alpn>| {
        let mut cfg = config();
        cfg.tls = Some(TlsConfig {
            certs: vec![crate::CertFiles {
                cert_file: "c.pem".into(),
                key_file: "c.key".into(),
            }],
            handshake_timeout: TlsConfig::DEFAULT_HANDSHAKE_TIMEOUT,
            alpn,
        });
        cfg.validate()
    };
    assert_eq!(with_tls(TlsConfig::DEFAULT_ALPN.to_vec()), Ok(()));
    assert_eq!(with_tls(vec![Alpn::Http11]), Ok(()));
    assert_eq!(with_tls(vec![]), Err(ConfigError::BadAlpn));
    assert_eq!(
        with_tls(vec![Alpn::H2, Alpn::H2]),
        Err(ConfigError::BadAlpn)
    );
    for (streams, ok) in [(0, false), (1, true), (1000, true), (1001, false)] {
        let mut cfg = config();
        cfg.limits.max_streams = streams;
        assert_eq!(cfg.validate().is_ok(), ok, "{streams}");
    }
}

/// The `www` route sent to a pool `green` of one backend, 10.0.0.9, instead of `web`.
fn blue_green() -> GatewayConfig {
    let mut cfg = config();
    cfg.pools.push(pool("green", vec![backend(9, 1)]));
    if let Action::Forward { pool, .. } = &mut cfg.routes[3].action {
        *pool = 3;
    }
    cfg
}

fn www(gw: &mut Gateway) -> Upstream {
    let mut h = head(&[("host", "www.example.com")], "GET", "/");
    forwarded(decide(gw, &mut h))
}

#[test]
fn a_reload_switches_a_routes_pool_and_forwarded_requests_finish_on_the_old_one() {
    let mut gw = Gateway::new(&config()).unwrap();
    let blue = www(&mut gw);
    assert_eq!(blue.addr.ip().octets()[3], 1);

    let reload = gw.reconfigure(&blue_green()).unwrap();
    assert_eq!(reload.pools.added, ["green"]);
    assert_eq!(reload.routes.changed, ["www"]);
    assert!(reload.routes.added.is_empty() && reload.pools.removed.is_empty());
    assert_eq!(reload.to_string(), "routes ~www; pools +green");
    // Every request decided from now on goes to green; the one in flight is still blue's.
    for _ in 0..3 {
        let green = www(&mut gw);
        assert_eq!(green.addr.ip().octets()[3], 9);
        gw.finish(epoch(), &green, Outcome::Answered(StatusCode::OK));
    }
    let web = |gw: &Gateway| {
        gw.status(epoch())
            .pools
            .into_iter()
            .find(|p| p.name == "web")
            .unwrap()
    };
    assert_eq!(web(&gw).backends[0].active, 1);
    gw.finish(epoch(), &blue, Outcome::Answered(StatusCode::OK));
    let web = web(&gw);
    assert_eq!((web.backends[0].active, web.responses.success), (0, 1));
    let status = gw.status(epoch());
    let route = status.routes.iter().find(|r| r.name == "www").unwrap();
    assert_eq!((route.requests, route.responses.success), (4, 4));
    assert_eq!(route.action, "pool green");
}

#[test]
fn a_removed_pool_and_route_stay_until_their_requests_finish() {
    let mut gw = Gateway::new(&blue_green()).unwrap();
    let mut cfg = blue_green();
    let up = www(&mut gw);
    assert_eq!(up.addr.ip().octets()[3], 9);
    // `www` and `green` go; the request `www` forwarded to green is still in flight.
    cfg.routes.remove(3);
    cfg.pools.remove(3);
    cfg.routes[2].rewrite.del_response = vec![HeaderRules::name("Server").unwrap()];
    let reload = gw.reconfigure(&cfg).unwrap();
    assert_eq!(reload.to_string(), "routes -www ~admin-posts; pools -green");
    let mut h = head(&[("host", "www.example.com")], "GET", "/");
    assert_eq!(answered(decide(&mut gw, &mut h)), StatusCode::NOT_FOUND);
    assert!(gw.status(epoch()).pools.iter().all(|p| p.name != "green"));
    assert_eq!(gw.in_flight(), 1);
    // Its answer still gets the removed route's name and rules.
    assert_eq!(gw.route_name(up.route), "www");
    gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    assert_eq!(gw.in_flight(), 0);
    // Added back by name: a new route and pool, counted from zero, with new ids.
    let again = gw.reconfigure(&blue_green()).unwrap();
    assert_eq!(again.to_string(), "routes +www ~admin-posts; pools +green");
    let next = www(&mut gw);
    assert_ne!((next.route, next.pool), (up.route, up.pool));
    let status = gw.status(epoch());
    let green = status.pools.iter().find(|p| p.name == "green").unwrap();
    assert_eq!((green.requests, green.backends[0].requests), (1, 1));
}

#[test]
fn a_reload_keeps_counters_by_name_and_backends_by_address() {
    let mut gw = Gateway::new(&config()).unwrap();
    for _ in 0..4 {
        let up = www(&mut gw);
        gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    }
    let mut cfg = config();
    // web: 10.0.0.1 drained (weight 0), 10.0.0.2 replaced by 10.0.0.5.
    cfg.pools[0].balance.backends = vec![backend(1, 0), backend(5, 1)];
    cfg.forwarding.trusted_proxies.clear();
    let reload = gw.reconfigure(&cfg).unwrap();
    assert_eq!(reload.pools.changed, ["web"]);
    assert_eq!(reload.backends.added, ["web/10.0.0.5:80"]);
    assert_eq!(reload.backends.removed, ["web/10.0.0.2:80"]);
    assert_eq!(reload.weights, ["web/10.0.0.1:80 1→0"]);
    assert!(reload.forwarding);
    let up = www(&mut gw);
    assert_eq!(up.addr.ip().octets()[3], 5);
    gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    let status = gw.status(epoch());
    assert_eq!(status.requests, 5);
    let route = status.routes.iter().find(|r| r.name == "www").unwrap();
    assert_eq!(route.requests, 5);
    let web = status.pools.iter().find(|p| p.name == "web").unwrap();
    assert_eq!(web.requests, 5);
    assert_eq!(web.latency.samples, 5);
    let by_addr = |last: u8| {
        web.backends
            .iter()
            .find(|b| b.addr == format!("10.0.0.{last}:80"))
            .map(|b| (b.requests, b.state.as_str()))
    };
    assert_eq!(by_addr(1), Some((2, "draining")));
    // The new backend took the removed one's id: its counts start anew.
    assert_eq!(by_addr(5), Some((1, "up")));
    assert_eq!(by_addr(2), None);
}

#[test]
fn a_refused_reload_changes_nothing() {
    let mut gw = Gateway::new(&config()).unwrap();
    let up = www(&mut gw);
    gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    let before = gw.status(epoch());
    let mut cfg = blue_green();
    // The new pool is fine, but another one has a backend twice: the balance crate refuses.
    cfg.pools[1].balance.backends = vec![backend(3, 1), backend(3, 2)];
    assert!(matches!(
        gw.reconfigure(&cfg),
        Err(ConfigError::Pool { pool, .. }) if pool == "api"
    ));
    let mut cfg = blue_green();
    cfg.routes[0].action = Action::Forward {
        pool: 9,
        strip_prefix: None,
        canary: None,
    };
    assert!(matches!(
        gw.reconfigure(&cfg),
        Err(ConfigError::NoSuchPool { .. })
    ));
    assert_eq!(gw.status(epoch()), before);
    assert_eq!(www(&mut gw).addr.ip().octets()[3], 2);
    assert!(gw.reconfigure(&config()).unwrap().is_empty());
}

#[test]
fn a_drained_backend_finishes_its_requests_and_stays_drained_across_reloads() {
    let mut gw = Gateway::new(&config()).unwrap();
    let first = www(&mut gw);
    assert_eq!(first.addr.ip().octets()[3], 1);
    let one = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80);
    assert_eq!(
        gw.set_backend_state("web", one, balance::AdminState::Drain),
        Ok(true)
    );
    assert!(matches!(
        gw.set_backend_state("nope", one, balance::AdminState::Drain),
        Err(crate::CommandError::UnknownPool(_))
    ));
    assert!(matches!(
        gw.set_backend_state("api", one, balance::AdminState::Drain),
        Err(crate::CommandError::Pool { .. })
    ));
    gw.reconfigure(&blue_green()).unwrap();
    gw.reconfigure(&config()).unwrap();
    for _ in 0..4 {
        let up = www(&mut gw);
        assert_eq!(up.addr.ip().octets()[3], 2);
        gw.finish(epoch(), &up, Outcome::Answered(StatusCode::OK));
    }
    let active = |gw: &Gateway| gw.status(epoch()).pools[0].backends[0].active;
    assert_eq!(active(&gw), 1);
    gw.finish(epoch(), &first, Outcome::Answered(StatusCode::OK));
    assert_eq!(active(&gw), 0);
}

/// Health: passive ejection, active check verdicts and slow start, decided in the core.
mod health {
    use super::*;
    use crate::health::{CheckKey, EjectConfig, UpstreamError};
    use crate::{BackendStatus, GatewayStatus};
    use natgw::health::{CheckEvent, HealthConfig, ProbeFailure, Transition};
    use std::time::Instant;

    const A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80);
    const B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80);
    const EJECT: Duration = Duration::from_secs(10);
    const RAMP: Duration = Duration::from_secs(20);

    /// `web` (A and B, weight 10 each) ejecting after 3 errors for 10 s, with a 20 s slow
    /// start, and optionally health checks.
    fn web(checks: bool) -> GatewayConfig {
        let mut cfg = config();
        let web = &mut cfg.pools[0];
        web.balance.backends = vec![backend(1, 10), backend(2, 10)];
        web.balance.slow_start = Some(RAMP);
        web.eject = Some(EjectConfig {
            consecutive_errors: 3,
            duration: EJECT,
        });
        web.health = checks.then(HealthConfig::default);
        cfg
    }

    fn www_at(gw: &mut Gateway, now: Instant, cookie: Option<&str>) -> Upstream {
        let mut fields = vec![("host", "www.example.com")];
        if let Some(c) = cookie {
            fields.push(("cookie", c));
        }
        let mut h = head(&fields, "GET", "/");
        forwarded(gw.decide(now, CLIENT, VIP, None, &mut h))
    }

    /// Sends requests until one goes to `addr`, finishing the others with 200.
    fn request_to(gw: &mut Gateway, now: Instant, addr: SocketAddrV4) -> Upstream {
        for _ in 0..4 {
            let up = www_at(gw, now, None);
            if up.addr == addr {
                return up;
            }
            gw.finish(now, &up, Outcome::Answered(StatusCode::OK));
        }
        panic!("no request went to {addr}");
    }

    fn backend_status(gw: &Gateway, now: Instant, addr: SocketAddrV4) -> BackendStatus {
        let status: GatewayStatus = gw.status(now);
        let web = status.pools.iter().find(|p| p.name == "web").unwrap();
        web.backends
            .iter()
            .find(|b| b.addr == addr.to_string())
            .unwrap()
            .clone()
    }

    fn key(addr: SocketAddrV4) -> CheckKey {
        CheckKey {
            pool: "web".into(),
            backend: addr,
        }
    }

    fn verdict(addr: SocketAddrV4, health: balance::Health) -> CheckEvent<CheckKey> {
        CheckEvent::Changed(Transition {
            key: key(addr),
            addr,
            health,
            reason: (health == balance::Health::Down).then_some(ProbeFailure::Refused),
        })
    }

    #[test]
    fn consecutive_errors_eject_for_the_duration_then_the_backend_slow_starts_back() {
        let t0 = epoch();
        let mut gw = Gateway::new(&web(false)).unwrap();
        // Never a slow start at daemon start.
        for addr in [A, B] {
            let s = backend_status(&gw, t0, addr);
            assert_eq!((s.effective_weight, s.slow_start), (10, false));
        }
        // Two errors, then an answer below 500: the count starts again.
        for outcome in [Outcome::Refused, Outcome::TimedOut] {
            let up = request_to(&mut gw, t0, A);
            assert_eq!(gw.finish(t0, &up, outcome), None);
        }
        assert_eq!(backend_status(&gw, t0, A).consecutive_errors, 2);
        let up = request_to(&mut gw, t0, A);
        assert_eq!(
            gw.finish(t0, &up, Outcome::Answered(StatusCode::NOT_FOUND)),
            None
        );
        assert_eq!(backend_status(&gw, t0, A).consecutive_errors, 0);
        // A cancelled request is nobody's error and counts nothing.
        let up = request_to(&mut gw, t0, A);
        assert_eq!(gw.finish(t0, &up, Outcome::Cancelled), None);
        // Three 5xx or broken answers in a row: out.
        let mut last = None;
        for outcome in [
            Outcome::Answered(StatusCode::INTERNAL_SERVER_ERROR),
            Outcome::Broken,
            Outcome::Answered(StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let up = request_to(&mut gw, t0, A);
            last = gw.finish(t0, &up, outcome);
        }
        let ejection = last.expect("ejected at the third error");
        assert_eq!(
            (
                ejection.key,
                ejection.errors,
                ejection.last,
                ejection.spared
            ),
            (key(A), 3, UpstreamError::Status(503), false)
        );
        let s = backend_status(&gw, t0, A);
        assert_eq!(
            (s.health.as_str(), s.state.as_str()),
            ("ejected", "ejected")
        );
        assert_eq!(s.ejections, 1);
        assert!(
            s.reason
                .unwrap()
                .contains("3 errors in a row, the last HTTP status 503")
        );
        // Every request goes to B meanwhile, a sticky client of A's too.
        let stuck = format!("SRV={}", crate::StickyCookie::id(A));
        for _ in 0..6 {
            let up = www_at(&mut gw, t0, Some(&stuck));
            assert_eq!(up.addr, B);
            gw.finish(t0, &up, Outcome::Answered(StatusCode::OK));
        }
        // It ends on time, and A ramps from 1 to 10 over the slow start.
        assert_eq!(gw.poll_timeout(), Some(t0 + EJECT));
        assert!(
            gw.handle_timeout(t0 + EJECT - Duration::from_millis(1))
                .is_empty()
        );
        let back = t0 + EJECT;
        assert_eq!(gw.handle_timeout(back), [key(A)]);
        assert_eq!(gw.poll_timeout(), None);
        let s = backend_status(&gw, back, A);
        assert_eq!(s.health, "up");
        assert!(s.slow_start && s.effective_weight < 10, "{s:?}");
        gw.handle_timeout(back + RAMP / 2);
        let half = backend_status(&gw, back + RAMP / 2, A).effective_weight;
        assert!((4..=6).contains(&half), "half-way weight {half}");
        gw.handle_timeout(back + RAMP);
        let s = backend_status(&gw, back + RAMP, A);
        assert_eq!((s.effective_weight, s.slow_start), (10, false));
    }

    #[test]
    fn the_last_live_backend_is_never_ejected() {
        let t0 = epoch();
        let mut gw = Gateway::new(&web(false)).unwrap();
        for _ in 0..3 {
            let up = request_to(&mut gw, t0, A);
            gw.finish(t0, &up, Outcome::Refused);
        }
        assert_eq!(backend_status(&gw, t0, A).health, "ejected");
        // B fails as often: it is the only one left, so it stays, and the refusal counts.
        let mut last = None;
        for _ in 0..3 {
            let up = www_at(&mut gw, t0, None);
            assert_eq!(up.addr, B);
            last = gw.finish(t0, &up, Outcome::Answered(StatusCode::BAD_GATEWAY));
        }
        assert!(last.expect("the limit was reached").spared);
        let s = backend_status(&gw, t0, B);
        assert_eq!(
            (s.health.as_str(), s.ejections, s.ejections_spared),
            ("up", 0, 1)
        );
        // Requests keep going to it rather than being answered 503.
        assert_eq!(www_at(&mut gw, t0, None).addr, B);
    }

    #[test]
    fn check_verdicts_take_backends_out_and_an_ejection_ends_into_the_checks_verdict() {
        let t0 = epoch();
        let mut cfg = web(true);
        cfg.pools[0].cookie = Some(crate::StickyCookie {
            name: "SRV".into(),
            nocache: true,
            mode: crate::CookieMode::Insert,
        });
        let mut gw = Gateway::new(&cfg).unwrap();
        let targets = gw.check_targets();
        let listed: Vec<_> = targets
            .checks
            .iter()
            .map(|(k, probe, _, health)| (k.backend, *probe, *health))
            .collect();
        assert_eq!(
            listed,
            [(A, A, balance::Health::Up), (B, B, balance::Health::Up)]
        );
        // A failed probe is counted; the verdict takes A out.
        assert!(!gw.handle_check(CheckEvent::Failed {
            key: key(A),
            why: ProbeFailure::Refused,
        }));
        assert!(gw.handle_check(verdict(A, balance::Health::Down)));
        let s = backend_status(&gw, t0, A);
        assert_eq!(
            (s.health.as_str(), s.reason.as_deref(), s.checks_failed),
            ("down", Some("connection refused"), 1)
        );
        assert!(s.checked);
        let stuck = format!("SRV={}", crate::StickyCookie::id(A));
        let up = www_at(&mut gw, t0, Some(&stuck));
        assert_eq!(up.addr, B);
        assert!(up.set_cookie.is_some(), "re-dispatched with a new cookie");
        gw.finish(t0, &up, Outcome::Answered(StatusCode::OK));
        // The checker starts from the verdict after a reload.
        assert_eq!(gw.check_targets().checks[0].3, balance::Health::Down);
        // Back up: in rotation again, in slow start (a recovery).
        assert!(gw.handle_check(verdict(A, balance::Health::Up)));
        gw.handle_timeout(t0);
        let s = backend_status(&gw, t0, A);
        assert_eq!(s.health, "up");
        assert!(s.slow_start);
        // Ejected B whose checks then fail stays out when the ejection ends...
        for _ in 0..3 {
            let up = request_to(&mut gw, t0, B);
            gw.finish(t0, &up, Outcome::TimedOut);
        }
        assert_eq!(backend_status(&gw, t0, B).health, "ejected");
        assert!(!gw.handle_check(verdict(B, balance::Health::Down)));
        assert_eq!(gw.handle_timeout(t0 + EJECT), [key(B)]);
        assert_eq!(backend_status(&gw, t0 + EJECT, B).health, "down");
        // ...until they pass.
        assert!(gw.handle_check(verdict(B, balance::Health::Up)));
        assert_eq!(backend_status(&gw, t0 + EJECT, B).health, "up");
        // Reports about unknown pools or backends change nothing.
        let stranger = SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 80);
        assert!(!gw.handle_check(verdict(stranger, balance::Health::Down)));
    }

    #[test]
    fn a_reload_turning_checks_or_ejection_off_releases_what_they_held() {
        let t0 = epoch();
        let mut gw = Gateway::new(&web(true)).unwrap();
        gw.handle_check(verdict(A, balance::Health::Down));
        for _ in 0..3 {
            let up = request_to(&mut gw, t0, B);
            gw.finish(t0, &up, Outcome::Answered(StatusCode::OK));
        }
        // An unchanged reload keeps the verdict.
        gw.reconfigure(&web(true)).unwrap();
        assert_eq!(backend_status(&gw, t0, A).health, "down");
        // Without checks, A is back.
        let reload = gw.reconfigure(&web(false)).unwrap();
        assert_eq!(reload.pools.changed, ["web"]);
        assert_eq!(backend_status(&gw, t0, A).health, "up");
        assert!(gw.check_targets().checks.is_empty());
        // An ejection ends when ejection is turned off.
        for _ in 0..3 {
            let up = request_to(&mut gw, t0, A);
            gw.finish(t0, &up, Outcome::Refused);
        }
        assert_eq!(backend_status(&gw, t0, A).health, "ejected");
        let mut cfg = web(false);
        cfg.pools[0].eject = None;
        gw.reconfigure(&cfg).unwrap();
        assert_eq!(backend_status(&gw, t0, A).health, "up");
        assert_eq!(gw.poll_timeout(), None);
    }

    #[test]
    fn health_and_ejection_settings_are_bounded() {
        let mut cfg = web(true);
        cfg.pools[0].health = Some(HealthConfig {
            agent: Some(natgw::health::AgentConfig {
                port: 9000,
                interval: Duration::from_secs(2),
            }),
            ..HealthConfig::default()
        });
        assert!(matches!(
            Gateway::new(&cfg),
            Err(ConfigError::BadHealth { .. })
        ));
        for (errors, secs) in [
            (0, 10),
            (EjectConfig::MAX_ERRORS + 1, 10),
            (3, 0),
            (3, 7200),
        ] {
            let mut cfg = web(false);
            cfg.pools[0].eject = Some(EjectConfig {
                consecutive_errors: errors,
                duration: Duration::from_secs(secs),
            });
            assert!(
                matches!(Gateway::new(&cfg), Err(ConfigError::BadHealth { .. })),
                "{errors} errors, {secs} s"
            );
        }
    }
}
