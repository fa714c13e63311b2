//! `[[http]]`: L7 (HTTP/1.1, and HTTP/2 over TLS) virtual services: a listener, ordered routes and the pools they
//! forward to (HAProxy's `frontend` + `use_backend ... if <acl>` + `backend`; nginx's `server`
//! + `location` + `upstream`).
//!
//! One builder, [`HttpSection::build`], turns a section into the gateway's config and reports
//! every problem at its place on the way: `validate` runs it with the file's validator,
//! lowering runs it on a section that passed, so check and run cannot disagree.

use super::lb::{HealthKind, HealthSection, validate_health};
use super::{HumanDuration, Validator, check_unique, did_you_mean};
use balance::{BackendConfig, PoolConfig, SchedulerKind};
use httpgw::health::EjectConfig;
use httpgw::hygiene::Forwarding;
use httpgw::route::{
    Action, Canary, CanaryKey, HeaderMatch, HeaderRules, HostPattern, Match, PathPattern,
    RedirectTarget, Route,
};
use httpgw::{Alpn, CertFiles, GatewayConfig, Limits, PoolSpec, TlsConfig};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// One real server of an HTTP pool.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpBackendSection {
    pub(crate) address: Spanned<SocketAddrV4>,
    /// 0 drains; at most 65535. Default 1.
    #[serde(default = "d_weight")]
    pub(crate) weight: Spanned<u32>,
}

fn d_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

/// `[[http.pool]]`: HAProxy's `backend`, nginx's `upstream`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpPoolSection {
    pub(crate) name: Spanned<String>,
    /// Default `rr` (HAProxy's `balance roundrobin`, nginx's default).
    #[serde(default = "d_scheduler")]
    pub(crate) scheduler: SchedulerKind,
    #[serde(default)]
    pub(crate) backends: Vec<HttpBackendSection>,
    /// Cookie-insert stickiness (HAProxy `cookie NAME insert indirect nocache`).
    #[serde(default)]
    pub(crate) cookie: Option<CookieSection>,
    /// Active health checks: the `[[service]]` `health` table (tcp, http or https; no agent).
    #[serde(default)]
    pub(crate) health: Option<HealthSection>,
    /// Passive ejection (nginx `max_fails`/`fail_timeout`).
    #[serde(default)]
    pub(crate) eject: Option<Spanned<EjectSection>>,
    /// A backend coming back ramps its weight up over this long (HAProxy `slowstart`, nginx
    /// `slow_start`), as on a `[[service]]`.
    #[serde(default)]
    pub(crate) slow_start: Option<Spanned<HumanDuration>>,
    /// Times a request whose backend could not be reached is sent to another live backend
    /// (HAProxy `retries` + `option redispatch`); 0 to 10, default 3.
    #[serde(default)]
    pub(crate) retries: Option<Spanned<u32>>,
    /// HTTPS to the backends (HAProxy `server ... ssl verify required sni str(NAME) ca-file F`).
    #[serde(default)]
    pub(crate) tls: Option<Spanned<UpstreamTlsSection>>,
    /// `"v2"`: each connection to a backend starts with a PROXY protocol v2 header (HAProxy
    /// `server ... send-proxy-v2`, nginx `proxy_protocol on`).
    #[serde(default)]
    pub(crate) proxy_protocol: Option<Spanned<String>>,
}

/// `tls = { sni = "app.internal", verify = true, ca_file = "/etc/vipgate/backend-ca.pem" }`
/// on a pool: the keys and meanings of an HTTPS health check's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamTlsSection {
    /// Name sent as SNI and verified; without it the certificate must name the backend's
    /// address (an IP SAN).
    #[serde(default)]
    pub(crate) sni: Option<Spanned<String>>,
    /// Whether the certificate must verify. Default true; false is warned about.
    #[serde(default)]
    pub(crate) verify: Option<Spanned<bool>>,
    /// PEM file of the CAs to trust instead of the system's.
    #[serde(default)]
    pub(crate) ca_file: Option<Spanned<PathBuf>>,
}

impl UpstreamTlsSection {
    fn lower(&self) -> natgw::health::TlsCheck {
        natgw::health::TlsCheck {
            sni: self.sni.as_ref().map(|s| s.get_ref().clone()),
            verify: self.verify.as_ref().is_none_or(|v| *v.get_ref()),
            ca_file: self.ca_file.as_ref().map(|c| c.get_ref().clone()),
        }
    }
}

/// `eject = { consecutive_errors = 5, duration = "30s" }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EjectSection {
    /// Failed requests in a row (refused, timed out, broken, 5xx) that eject. Default 5.
    #[serde(default = "d_consecutive_errors")]
    pub(crate) consecutive_errors: Spanned<u32>,
    /// How long an ejected backend stays out. Default 30s.
    #[serde(default = "d_eject_duration")]
    pub(crate) duration: Spanned<HumanDuration>,
}

fn d_consecutive_errors() -> Spanned<u32> {
    Spanned::new(0..0, 5)
}

fn d_eject_duration() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(30)))
}

/// `cookie = { name = "SRV", nocache = true }` or
/// `cookie = { name = "JSESSIONID", mode = "prefix" }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CookieSection {
    pub(crate) name: Spanned<String>,
    /// `insert` (default: the proxy's own cookie) or `prefix` (the application's cookie
    /// carries the backend's id).
    #[serde(default)]
    pub(crate) mode: CookieModeSection,
    /// `Cache-Control: private` on responses that set it. Default true in insert mode;
    /// refused in prefix mode, where the proxy sets no cookie of its own.
    #[serde(default)]
    pub(crate) nocache: Option<Spanned<bool>>,
}

/// `mode` of a `cookie`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CookieModeSection {
    #[default]
    Insert,
    Prefix,
}

fn d_scheduler() -> SchedulerKind {
    SchedulerKind::Rr
}

/// `redirect = { status = 301, location = "https://..." }` or `{ prefix = "https://..." }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedirectSection {
    /// 301, 302, 303, 307 or 308. Default 302 (HAProxy's).
    #[serde(default = "d_redirect_status")]
    pub(crate) status: Spanned<u16>,
    /// This URL as is (HAProxy `redirect location`).
    #[serde(default)]
    pub(crate) location: Option<Spanned<String>>,
    /// This URL base followed by the request's path and query (HAProxy `redirect prefix`).
    #[serde(default)]
    pub(crate) prefix: Option<Spanned<String>>,
}

fn d_redirect_status() -> Spanned<u16> {
    Spanned::new(0..0, 302)
}

/// `[[http.route]]`, tried in file order; the first whose conditions all hold decides.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteSection {
    pub(crate) name: Spanned<String>,
    /// Any of these hosts: `www.example.com` or `*.example.com`.
    #[serde(default)]
    pub(crate) host: Vec<Spanned<String>>,
    /// Any of these exact paths.
    #[serde(default)]
    pub(crate) path: Vec<Spanned<String>>,
    /// Any of these path prefixes.
    #[serde(default)]
    pub(crate) path_prefix: Vec<Spanned<String>>,
    /// Any of these regexes, unanchored unless they anchor (HAProxy `path_reg`, nginx
    /// `location ~`).
    #[serde(default)]
    pub(crate) path_regex: Vec<Spanned<String>>,
    /// Any of these methods.
    #[serde(default)]
    pub(crate) method: Vec<Spanned<String>>,
    /// All of these headers, name → exact value (`"*"`: present with any value).
    #[serde(default)]
    pub(crate) header: BTreeMap<String, Spanned<String>>,
    /// The pool to forward to.
    #[serde(default)]
    pub(crate) pool: Option<Spanned<String>>,
    /// Remove this prefix from the path before forwarding.
    #[serde(default)]
    pub(crate) strip_prefix: Option<Spanned<String>>,
    /// A share of the route's requests to another pool (`{ pool = "web-v2", percent = 10 }`).
    #[serde(default)]
    pub(crate) canary: Option<Spanned<CanarySection>>,
    /// Answer with a redirect instead of forwarding.
    #[serde(default)]
    pub(crate) redirect: Option<Spanned<RedirectSection>>,
    /// Any of these TLS server names (SNI), exact or `*.suffix`; only on a TLS listener.
    #[serde(default)]
    pub(crate) sni: Vec<Spanned<String>>,
    /// Fields set on the forwarded request, name → value (HAProxy `http-request set-header`).
    #[serde(default)]
    pub(crate) set_request_headers: BTreeMap<String, Spanned<String>>,
    /// Fields deleted from the forwarded request (HAProxy `http-request del-header`).
    #[serde(default)]
    pub(crate) del_request_headers: Vec<Spanned<String>>,
    /// Fields appended to the forwarded request, name → value or values (HAProxy
    /// `http-request add-header`).
    #[serde(default)]
    pub(crate) add_request_headers: BTreeMap<String, Spanned<AddedValues>>,
    /// Fields set on the response (HAProxy `http-response set-header`).
    #[serde(default)]
    pub(crate) set_response_headers: BTreeMap<String, Spanned<String>>,
    /// Fields deleted from the response (HAProxy `http-response del-header`).
    #[serde(default)]
    pub(crate) del_response_headers: Vec<Spanned<String>>,
    /// Fields appended to the response (HAProxy `http-response add-header`, nginx
    /// `add_header`).
    #[serde(default)]
    pub(crate) add_response_headers: BTreeMap<String, Spanned<AddedValues>>,
}

/// `canary = { pool = "web-v2", percent = 10, by = "source" }` on a route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CanarySection {
    pub(crate) pool: Spanned<String>,
    pub(crate) percent: Spanned<u32>,
    /// `"source"` (default: a client stays on one side) or `"request"`.
    #[serde(default)]
    pub(crate) by: Option<Spanned<String>>,
}

/// The value of one name in `add_*_headers`: one field, or several of that name in order
/// (`"Link" = ["</a.css>; rel=preload", "</b.js>; rel=preload"]`), since a table key names
/// a field once.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "expected a header value (a string) or an array of header values"
)]
pub(crate) enum AddedValues {
    One(String),
    Many(Vec<String>),
}

impl AddedValues {
    fn values(&self) -> &[String] {
        match self {
            Self::One(v) => std::slice::from_ref(v),
            Self::Many(vs) => vs,
        }
    }
}

/// One certificate of a TLS listener: PEM files.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CertSection {
    /// The certificate, then its intermediates.
    pub(crate) cert_file: Spanned<PathBuf>,
    /// Its private key; mode 600 (or 640 with group ssl-cert).
    pub(crate) key_file: Spanned<PathBuf>,
}

/// `tls = { certs = [...] }`: TLS termination (HAProxy `bind :443 ssl crt A crt B`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    /// Picked by SNI among their subjectAltName DNS names; the first is the default.
    pub(crate) certs: Vec<CertSection>,
    /// Time to complete the handshake. Default 10s.
    #[serde(default)]
    pub(crate) handshake_timeout: Option<Spanned<HumanDuration>>,
    /// Protocols offered by ALPN, preferred first: `h2`, `http/1.1` (HAProxy `alpn
    /// h2,http/1.1`). Default both, `h2` first.
    #[serde(default)]
    pub(crate) alpn: Option<Spanned<Vec<Spanned<String>>>>,
}

/// One `[[http]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpSection {
    pub(crate) name: Spanned<String>,
    /// Address and port to listen on (a VIP may be listed before VRRP brings it up).
    pub(crate) listen: Spanned<SocketAddrV4>,
    /// Clients whose `X-Forwarded-*` fields are kept and extended (HAProxy's
    /// `option forwardfor if-none` / nginx's `set_real_ip_from`); everyone else's are replaced.
    #[serde(default)]
    pub(crate) trusted_proxies: Vec<Spanned<IpNet>>,
    /// Pseudonym added to `Via` on requests and answers (`via = "gw1"`: `Via: 1.1 gw1`).
    #[serde(default)]
    pub(crate) via: Option<Spanned<String>>,
    /// Log a line per request at info level (debug otherwise).
    #[serde(default)]
    pub(crate) access_log: bool,
    /// Client connections held at once (HAProxy `maxconn`). Default 10000.
    #[serde(default)]
    pub(crate) max_connections: Option<Spanned<u32>>,
    /// Longest request head in bytes: 431 beyond (nginx `large_client_header_buffers`).
    /// Default 16384.
    #[serde(default)]
    pub(crate) max_header_bytes: Option<Spanned<u64>>,
    /// Largest request body in bytes: 413 beyond (nginx `client_max_body_size`). Default
    /// 8 MiB.
    #[serde(default)]
    pub(crate) max_body_bytes: Option<Spanned<u64>>,
    /// Time to send a complete head (HAProxy `timeout http-request`), and at most between two
    /// reads of a body or on an HTTP/2 connection without a stream. Default 10s.
    #[serde(default)]
    pub(crate) header_timeout: Option<Spanned<HumanDuration>>,
    /// Time for a backend to answer (HAProxy `timeout server`). Default 30s: 504 beyond.
    #[serde(default)]
    pub(crate) upstream_timeout: Option<Spanned<HumanDuration>>,
    /// Time to establish a connection to a backend (HAProxy `timeout connect`, nginx
    /// `proxy_connect_timeout`). Default 5s; beyond, the request may be retried.
    #[serde(default)]
    pub(crate) connect_timeout: Option<Spanned<HumanDuration>>,
    /// Time an upgraded connection (WebSocket) may be idle both ways (HAProxy `timeout
    /// tunnel`). Default 1h.
    #[serde(default)]
    pub(crate) tunnel_timeout: Option<Spanned<HumanDuration>>,
    /// Time requests in flight get to finish when the listener stops or a reload removes it
    /// (HAProxy `hard-stop-after`, nginx `worker_shutdown_timeout`). Default 10s.
    #[serde(default)]
    pub(crate) drain_timeout: Option<Spanned<HumanDuration>>,
    /// Streams an HTTP/2 client may have open at once per connection (nginx
    /// `http2_max_concurrent_streams`, HAProxy `tune.h2.max-concurrent-streams`); 1 to 1000,
    /// default 100.
    #[serde(default)]
    pub(crate) max_streams: Option<Spanned<u32>>,
    /// TLS termination.
    #[serde(default)]
    pub(crate) tls: Option<Spanned<TlsSection>>,
    #[serde(default)]
    pub(crate) route: Vec<RouteSection>,
    #[serde(default)]
    pub(crate) pool: Vec<HttpPoolSection>,
}

/// Largest request body accepted as a limit (bodies are buffered up to it).
const MAX_BODY_LIMIT: u64 = 1 << 30;
const MIN_PERIOD: Duration = Duration::from_millis(100);
const MAX_PERIOD: Duration = Duration::from_secs(3600);

impl HttpSection {
    /// The gateway's config, reporting every problem to `error` (span, message).
    pub(crate) fn build(&self, error: &mut dyn FnMut(Range<usize>, String)) -> GatewayConfig {
        let name = self.name.get_ref();
        if let Some(via) = &self.via
            && !httpgw::hygiene::valid_via_pseudonym(via.get_ref())
        {
            error(
                via.span(),
                format!(
                    "via {:?}: a pseudonym is 1 to 64 token characters (letters, digits, `-._~!#$%&'*+^|`)",
                    via.get_ref()
                ),
            );
        }
        let pool_names: Vec<&str> = self
            .pool
            .iter()
            .map(|p| p.name.get_ref().as_str())
            .collect();
        let pools = self
            .pool
            .iter()
            .map(|p| {
                if p.backends.is_empty() {
                    error(
                        p.name.span(),
                        format!("pool `{}` has no backends", p.name.get_ref()),
                    );
                }
                for b in &p.backends {
                    if *b.weight.get_ref() > balance::MAX_WEIGHT {
                        error(
                            b.weight.span(),
                            format!("weight {} is over 65535", b.weight.get_ref()),
                        );
                    }
                }
                let cookie = p.cookie.as_ref().map(|c| {
                    let mode = match c.mode {
                        CookieModeSection::Insert => httpgw::CookieMode::Insert,
                        CookieModeSection::Prefix => httpgw::CookieMode::Prefix,
                    };
                    let nocache = c.nocache.as_ref().map(|n| *n.get_ref());
                    let sticky = httpgw::StickyCookie {
                        name: c.name.get_ref().clone(),
                        nocache: nocache.unwrap_or(mode == httpgw::CookieMode::Insert),
                        mode,
                    };
                    match (&c.nocache, sticky.validate()) {
                        (Some(n), Err(e @ httpgw::ConfigError::NocacheWithPrefix(_))) => {
                            error(n.span(), e.to_string());
                        }
                        (_, Err(e)) => error(c.name.span(), e.to_string()),
                        (_, Ok(())) => {}
                    }
                    sticky
                });
                let eject = p.eject.as_ref().map(|e| {
                    let section = e.get_ref();
                    let eject = EjectConfig {
                        consecutive_errors: *section.consecutive_errors.get_ref(),
                        duration: section.duration.get_ref().0,
                    };
                    // The defaults are in range: whatever is out of it was written.
                    if !(1..=EjectConfig::MAX_ERRORS).contains(&eject.consecutive_errors) {
                        error(
                            section.consecutive_errors.span(),
                            format!(
                                "eject consecutive_errors must be 1..={}",
                                EjectConfig::MAX_ERRORS
                            ),
                        );
                    }
                    if !(EjectConfig::MIN_DURATION..=EjectConfig::MAX_DURATION)
                        .contains(&eject.duration)
                    {
                        error(
                            section.duration.span(),
                            "eject duration must be between 1s and 1h".into(),
                        );
                    }
                    eject
                });
                if let Some(d) = &p.slow_start
                    && (d.get_ref().0.is_zero() || d.get_ref().0 > MAX_PERIOD)
                {
                    error(
                        d.span(),
                        "slow_start must be between 1ms and 1h (leave it out to turn it off)"
                            .into(),
                    );
                }
                let mut retries = PoolSpec::DEFAULT_RETRIES;
                if let Some(n) = &p.retries {
                    in_range(n, 0, u64::from(PoolSpec::MAX_RETRIES), "retries", error);
                    retries = *n.get_ref();
                }
                if let Some(v) = &p.proxy_protocol {
                    if v.get_ref() != "v2" {
                        error(
                            v.span(),
                            format!(
                                "proxy_protocol {:?}: the one version sent is \"v2\"",
                                v.get_ref()
                            ),
                        );
                    } else if let Some(tls) = &p.tls {
                        error(
                            tls.span(),
                            "`tls` and `proxy_protocol` on one pool are not supported yet".into(),
                        );
                    }
                }
                PoolSpec {
                    name: p.name.get_ref().clone(),
                    proxy_protocol: p.proxy_protocol.is_some(),
                    cookie,
                    tls: p.tls.as_ref().map(|t| t.get_ref().lower()),
                    retries,
                    health: p.health.as_ref().map(super::lower::health),
                    eject,
                    balance: PoolConfig {
                        scheduler: p.scheduler,
                        slow_start: p.slow_start.as_ref().map(|d| d.get_ref().0),
                        backends: p
                            .backends
                            .iter()
                            .map(|b| BackendConfig::new(*b.address.get_ref(), *b.weight.get_ref()))
                            .collect(),
                        ..PoolConfig::default()
                    },
                }
            })
            .collect();
        let routes = self
            .route
            .iter()
            .filter_map(|r| route(r, &pool_names, self.tls.is_some(), error))
            .collect();
        let tls = self.tls.as_ref().map(|t| {
            let section = t.get_ref();
            if section.certs.is_empty() {
                error(t.span(), "`tls` needs at least one of `certs`".into());
            }
            if section.certs.len() > TlsConfig::MAX_CERTS {
                error(
                    t.span(),
                    format!("`tls` has more than {} certs", TlsConfig::MAX_CERTS),
                );
            }
            let mut handshake_timeout = TlsConfig::DEFAULT_HANDSHAKE_TIMEOUT;
            if let Some(d) = &section.handshake_timeout {
                handshake_timeout = d.get_ref().0;
                if !(MIN_PERIOD..=MAX_PERIOD).contains(&handshake_timeout) {
                    error(
                        d.span(),
                        "`handshake_timeout` must be between 100ms and 1h".into(),
                    );
                }
            }
            let mut alpn = TlsConfig::DEFAULT_ALPN.to_vec();
            if let Some(list) = &section.alpn {
                if list.get_ref().is_empty() {
                    error(
                        list.span(),
                        "`alpn` needs at least one of \"h2\", \"http/1.1\"".into(),
                    );
                }
                alpn.clear();
                for name in list.get_ref() {
                    match Alpn::parse(name.get_ref()) {
                        Some(a) if alpn.contains(&a) => error(
                            name.span(),
                            format!("`alpn` lists \"{}\" twice", a.as_str()),
                        ),
                        Some(a) => alpn.push(a),
                        None => error(
                            name.span(),
                            format!(
                                "unknown ALPN protocol {:?}: vipgate speaks \"h2\" and \"http/1.1\"{}",
                                name.get_ref(),
                                did_you_mean(name.get_ref(), &["h2", "http/1.1"])
                            ),
                        ),
                    }
                }
            }
            TlsConfig {
                alpn,
                certs: section
                    .certs
                    .iter()
                    .map(|c| CertFiles {
                        cert_file: c.cert_file.get_ref().clone(),
                        key_file: c.key_file.get_ref().clone(),
                    })
                    .collect(),
                handshake_timeout,
            }
        });

        let mut limits = Limits::default();
        if let Some(n) = &self.max_connections {
            in_range(n, 1, 1_000_000, "max_connections", error);
            limits.max_connections = *n.get_ref();
        }
        if let Some(n) = &self.max_header_bytes {
            in_range(
                n,
                Limits::MIN_HEADER_BYTES as u64,
                Limits::MAX_HEADER_BYTES as u64,
                "max_header_bytes",
                error,
            );
            limits.max_header_bytes = usize::try_from(*n.get_ref()).unwrap_or(usize::MAX);
        }
        if let Some(n) = &self.max_streams {
            in_range(n, 1, u64::from(Limits::MAX_STREAMS), "max_streams", error);
            limits.max_streams = *n.get_ref();
        }
        if let Some(n) = &self.max_body_bytes {
            in_range(n, 0, MAX_BODY_LIMIT, "max_body_bytes", error);
            limits.max_body_bytes = *n.get_ref();
        }
        for (value, key, slot) in [
            (
                &self.header_timeout,
                "header_timeout",
                &mut limits.header_timeout,
            ),
            (
                &self.upstream_timeout,
                "upstream_timeout",
                &mut limits.upstream_timeout,
            ),
            (
                &self.connect_timeout,
                "connect_timeout",
                &mut limits.connect_timeout,
            ),
            (
                &self.tunnel_timeout,
                "tunnel_timeout",
                &mut limits.tunnel_timeout,
            ),
            (
                &self.drain_timeout,
                "drain_timeout",
                &mut limits.drain_timeout,
            ),
        ] {
            if let Some(d) = value {
                let d0 = d.get_ref().0;
                if !(MIN_PERIOD..=MAX_PERIOD).contains(&d0) {
                    error(d.span(), format!("`{key}` must be between 100ms and 1h"));
                }
                *slot = d0;
            }
        }
        GatewayConfig {
            name: name.clone(),
            listen: *self.listen.get_ref(),
            routes,
            pools,
            forwarding: Forwarding {
                trusted_proxies: self.trusted_proxies.iter().map(|n| *n.get_ref()).collect(),
                via: self.via.as_ref().map(|v| v.get_ref().clone()),
            },
            limits,
            access_log: self.access_log,
            tls,
        }
    }

    /// The gateway's config of a section that passed validation.
    pub(crate) fn lower(&self) -> GatewayConfig {
        self.build(&mut |_, _| {})
    }

    /// A digest of the contents of its certificate and key files (0 for one that cannot be
    /// read), in order: a reload compares it to tell rewritten files from unchanged ones.
    pub(crate) fn tls_files_digest(&self) -> Vec<u64> {
        use std::hash::{Hash as _, Hasher as _};
        use std::io::Read as _;
        let Some(tls) = &self.tls else {
            return Vec::new();
        };
        let digest = |path: &PathBuf| {
            let mut bytes = Vec::new();
            // At most what the gateway reads of a PEM file (and one byte to tell it is over).
            let read = std::fs::File::open(path).and_then(|f| {
                f.take(httpgw::tls::MAX_PEM_BYTES + 1)
                    .read_to_end(&mut bytes)
            });
            read.map_or(0, |_| {
                let mut h = std::hash::DefaultHasher::new();
                bytes.hash(&mut h);
                h.finish()
            })
        };
        tls.get_ref()
            .certs
            .iter()
            .flat_map(|c| [digest(c.cert_file.get_ref()), digest(c.key_file.get_ref())])
            .collect()
    }
}

fn in_range<T: Copy + Into<u64> + std::fmt::Display>(
    n: &Spanned<T>,
    min: u64,
    max: u64,
    key: &str,
    error: &mut dyn FnMut(Range<usize>, String),
) {
    let value: u64 = (*n.get_ref()).into();
    if !(min..=max).contains(&value) {
        error(
            n.span(),
            format!("`{key}` must be between {min} and {max}, not {value}"),
        );
    }
}

/// A route's canary, its mistakes reported at their place.
fn canary(
    route_name: &str,
    c: &CanarySection,
    pools: &[&str],
    error: &mut dyn FnMut(Range<usize>, String),
) -> Option<Canary> {
    let Some(pool) = pools.iter().position(|p| p == c.pool.get_ref()) else {
        error(
            c.pool.span(),
            format!(
                "route `{route_name}` sends a canary to pool `{}`, which is not defined{}",
                c.pool.get_ref(),
                did_you_mean(c.pool.get_ref(), pools)
            ),
        );
        return None;
    };
    let asked = *c.percent.get_ref();
    let percent = u8::try_from(asked)
        .ok()
        .filter(|p| *p <= Canary::MAX_PERCENT);
    if percent.is_none() {
        error(
            c.percent.span(),
            format!("canary percent must be between 0 and 100, not {asked}"),
        );
    }
    let by = match c.by.as_ref().map(|b| b.get_ref().as_str()) {
        None | Some("source") => Some(CanaryKey::Source),
        Some("request") => Some(CanaryKey::Request),
        Some(other) => {
            let span = c.by.as_ref().map(Spanned::span).unwrap_or_default();
            error(
                span,
                format!("canary `by` is \"source\" or \"request\", not {other:?}"),
            );
            None
        }
    };
    Some(Canary {
        pool,
        percent: percent?,
        by: by?,
    })
}

fn route(
    r: &RouteSection,
    pools: &[&str],
    tls: bool,
    error: &mut dyn FnMut(Range<usize>, String),
) -> Option<Route> {
    let mut when = Match::default();
    for h in &r.host {
        match HostPattern::parse(h.get_ref()) {
            Ok(p) => when.hosts.push(p),
            Err(e) => error(h.span(), e.to_string()),
        }
    }
    for h in &r.sni {
        if !tls {
            error(
                h.span(),
                "`sni` matches a TLS server name: this listener has no `tls`".into(),
            );
        }
        match HostPattern::parse(h.get_ref()) {
            Ok(p) => when.sni.push(p),
            Err(e) => error(h.span(), e.to_string()),
        }
    }
    let kinds: [(_, fn(&str) -> _); 3] = [
        (&r.path, PathPattern::exact),
        (&r.path_prefix, PathPattern::prefix),
        (&r.path_regex, PathPattern::regex),
    ];
    for (list, parse) in kinds {
        for p in list {
            match parse(p.get_ref()) {
                Ok(p) => when.paths.push(p),
                Err(e) => error(p.span(), e.to_string()),
            }
        }
    }
    if r.path_regex.len() > httpgw::route::MAX_PATH_REGEXES {
        error(
            r.path_regex[httpgw::route::MAX_PATH_REGEXES].span(),
            format!(
                "`path_regex` has more than {} entries",
                httpgw::route::MAX_PATH_REGEXES
            ),
        );
    }
    for m in &r.method {
        match ::http::Method::from_bytes(m.get_ref().as_bytes()) {
            Ok(method) if m.get_ref().bytes().all(|b| b.is_ascii_uppercase()) => {
                when.methods.push(method);
            }
            _ => error(
                m.span(),
                format!(
                    "method {:?} is not an upper-case HTTP method (GET, POST, ...)",
                    m.get_ref()
                ),
            ),
        }
    }
    for (name, value) in &r.header {
        let want = (value.get_ref() != "*").then_some(value.get_ref().as_str());
        match HeaderMatch::new(name, want) {
            Ok(h) => when.headers.push(h),
            Err(e) => error(value.span(), e.to_string()),
        }
    }
    let route_name = r.name.get_ref();
    let rewrite = rewrite(r, error);
    let action = match (&r.pool, &r.redirect) {
        (Some(pool), None) => {
            let Some(index) = pools.iter().position(|p| p == pool.get_ref()) else {
                error(
                    pool.span(),
                    format!(
                        "route `{route_name}` forwards to pool `{}`, which is not defined{}",
                        pool.get_ref(),
                        did_you_mean(pool.get_ref(), pools)
                    ),
                );
                return None;
            };
            if let Some(p) = &r.strip_prefix
                && let Err(e) = PathPattern::prefix(p.get_ref())
            {
                error(p.span(), e.to_string());
            }
            Action::Forward {
                pool: index,
                strip_prefix: r.strip_prefix.as_ref().map(|p| p.get_ref().clone()),
                canary: r
                    .canary
                    .as_ref()
                    .and_then(|c| canary(route_name, c.get_ref(), pools, error)),
            }
        }
        (None, Some(redirect)) => {
            if let Some(p) = &r.strip_prefix {
                error(
                    p.span(),
                    "strip_prefix applies to a route with a pool, not to a redirect".into(),
                );
            }
            if let Some(c) = &r.canary {
                error(
                    c.span(),
                    "canary applies to a route with a pool, not to a redirect".into(),
                );
            }
            let rd = redirect.get_ref();
            let target = match (&rd.location, &rd.prefix) {
                (Some(l), None) => RedirectTarget::Location(l.get_ref().clone()),
                (None, Some(p)) => RedirectTarget::Prefix(p.get_ref().clone()),
                _ => {
                    error(
                        redirect.span(),
                        "a redirect has either `location` (the URL as is) or `prefix` (the request's path appended)".into(),
                    );
                    return None;
                }
            };
            match Action::redirect(*rd.status.get_ref(), target) {
                Ok(a) => a,
                Err(httpgw::ConfigError::BadRedirectStatus(s)) => {
                    let span = if rd.status.span().is_empty() {
                        redirect.span()
                    } else {
                        rd.status.span()
                    };
                    error(
                        span,
                        format!("redirect status {s} is not one of 301, 302, 303, 307, 308"),
                    );
                    return None;
                }
                Err(e) => {
                    error(redirect.span(), e.to_string());
                    return None;
                }
            }
        }
        _ => {
            error(
                r.name.span(),
                format!("route `{route_name}` needs exactly one of `pool` (forward) or `redirect`"),
            );
            return None;
        }
    };
    if !matches!(action, Action::Forward { .. }) && rewrite != HeaderRules::default() {
        error(
            r.name.span(),
            format!("route `{route_name}` redirects: header rules apply to a route with a pool"),
        );
    }
    Some(Route {
        name: route_name.clone(),
        when,
        action,
        rewrite,
    })
}

/// Reports, at the route's name, a header-rule list longer than
/// [`httpgw::route::MAX_HEADER_RULES`] (`"{what} 32 {unit}"`).
fn rule_bound(
    r: &RouteSection,
    count: usize,
    what: &str,
    unit: &str,
    error: &mut dyn FnMut(Range<usize>, String),
) {
    if count > httpgw::route::MAX_HEADER_RULES {
        error(
            r.name.span(),
            format!("{what} {} {unit}", httpgw::route::MAX_HEADER_RULES),
        );
    }
}

/// The route's header rules, each mistake at its value (set) or entry (del).
fn rewrite(r: &RouteSection, error: &mut dyn FnMut(Range<usize>, String)) -> HeaderRules {
    let mut rules = HeaderRules::default();
    let lists = [
        (
            &r.set_request_headers,
            &mut rules.set_request,
            "set_request_headers",
        ),
        (
            &r.set_response_headers,
            &mut rules.set_response,
            "set_response_headers",
        ),
    ];
    for (map, into, key) in lists {
        rule_bound(
            r,
            map.len(),
            &format!("`{key}` has more than"),
            "entries",
            error,
        );
        for (name, value) in map {
            match (HeaderRules::name(name), HeaderRules::value(value.get_ref())) {
                (Ok(n), Ok(v)) => into.push((n, v)),
                (Err(e), _) | (_, Err(e)) => error(value.span(), e.to_string()),
            }
        }
    }
    let lists = [
        (
            &r.del_request_headers,
            &mut rules.del_request,
            "del_request_headers",
        ),
        (
            &r.del_response_headers,
            &mut rules.del_response,
            "del_response_headers",
        ),
    ];
    for (list, into, key) in lists {
        rule_bound(
            r,
            list.len(),
            &format!("`{key}` has more than"),
            "entries",
            error,
        );
        for name in list {
            match HeaderRules::name(name.get_ref()) {
                Ok(n) => into.push(n),
                Err(e) => error(name.span(), e.to_string()),
            }
        }
    }
    let lists = [
        (
            &r.add_request_headers,
            &mut rules.add_request,
            "add_request_headers",
        ),
        (
            &r.add_response_headers,
            &mut rules.add_response,
            "add_response_headers",
        ),
    ];
    for (map, into, key) in lists {
        // Each value is a field added: the bound counts values, not names.
        let fields: usize = map.values().map(|v| v.get_ref().values().len()).sum();
        rule_bound(
            r,
            fields,
            &format!("`{key}` adds more than"),
            "fields",
            error,
        );
        for (name, values) in map {
            let name = match HeaderRules::name(name) {
                Ok(n) => n,
                Err(e) => {
                    error(values.span(), e.to_string());
                    continue;
                }
            };
            for value in values.get_ref().values() {
                match HeaderRules::value(value) {
                    Ok(v) => into.push((name.clone(), v)),
                    Err(e) => error(values.span(), e.to_string()),
                }
            }
        }
    }
    rules
}

/// Checks every `[[http]]`: unique names and listen addresses, unique route and pool names
/// within one, and everything [`HttpSection::build`] reports.
pub(crate) fn validate_all(sections: &[HttpSection], v: &mut Validator) {
    check_unique(
        sections
            .iter()
            .map(|s| (s.name.get_ref().clone(), s.name.span())),
        "http name",
        v,
    );
    check_unique(
        sections
            .iter()
            .map(|s| (*s.listen.get_ref(), s.listen.span())),
        "http listen address",
        v,
    );
    for s in sections {
        check_unique(
            s.route
                .iter()
                .map(|r| (r.name.get_ref().clone(), r.name.span())),
            "route name",
            v,
        );
        check_unique(
            s.pool
                .iter()
                .map(|p| (p.name.get_ref().clone(), p.name.span())),
            "pool name",
            v,
        );
        for p in &s.pool {
            check_unique(
                p.backends
                    .iter()
                    .map(|b| (*b.address.get_ref(), b.address.span())),
                "backend",
                v,
            );
            if let Some(h) = &p.health {
                validate_pool_health(p, h, v);
            }
            if let Some(tls) = &p.tls {
                validate_upstream_tls(p, tls, v);
            }
        }
        if s.route.is_empty() {
            v.error_at(
                &s.name,
                format!(
                    "http `{}` has no [[http.route]]: nothing would be served",
                    s.name.get_ref()
                ),
            );
        }
        s.build(&mut |span, message| v.error(span, message));
        if let Some(tls) = &s.tls {
            check_certs(&tls.get_ref().certs, v);
        }
    }
}

/// A pool's `tls` must be usable as the gateway will set it up: a DNS name for SNI, a CA
/// file that reads, no CA file where nothing is verified; `verify = false` works but is
/// warned about (anyone on the path to the backends can read and change the traffic).
fn validate_upstream_tls(
    p: &HttpPoolSection,
    tls: &Spanned<UpstreamTlsSection>,
    v: &mut Validator,
) {
    let t = tls.get_ref();
    if let Some(sni) = &t.sni
        && !natgw::health::tls::valid_sni(sni.get_ref())
    {
        v.error_at(
            sni,
            format!(
                "sni {:?} must be a DNS name (leave it out to verify the backend's address)",
                sni.get_ref()
            ),
        );
    }
    let unverified = t.verify.as_ref().filter(|v| !*v.get_ref());
    match (&t.ca_file, unverified) {
        (Some(ca), Some(_)) => v.error_at(
            ca,
            "ca_file is not used with verify = false: drop one of them",
        ),
        (Some(ca), None) => {
            if let Err(e) = natgw::health::tls::load_ca_file(ca.get_ref()) {
                v.error_at(ca, e.to_string());
            }
        }
        (None, Some(off)) => v.warn_at(
            off,
            format!(
                "pool `{}`: verify = false accepts any certificate from its backends (the traffic is encrypted, not authenticated): give ca_file instead",
                p.name.get_ref()
            ),
        ),
        (None, None) => {}
    }
}

/// An HTTP pool's checks are a `[[service]]`'s, less what an HTTP backend has no use for:
/// UDP datagrams and an agent.
fn validate_pool_health(p: &HttpPoolSection, h: &HealthSection, v: &mut Validator) {
    validate_health(h, p.name.span(), v);
    if h.kind == HealthKind::Udp {
        v.error_at(
            &p.name,
            format!(
                "pool `{}`: an HTTP pool is checked with kind = \"tcp\", \"http\" or \"https\", not \"udp\"",
                p.name.get_ref()
            ),
        );
    }
    if let Some(send) = &h.send {
        v.error_at(
            send,
            "send belongs to a udp check, which an HTTP pool has not",
        );
    }
    if let Some(port) = &h.agent_port {
        v.error_at(
            port,
            "agent_port: an HTTP pool asks no agent (agent checks are for [[service]])",
        );
    }
}

/// Reads every certificate and key as the gateway will at start: files present and parsed,
/// the key the certificate's and not readable by others; a certificate after the first (the
/// default) must have a DNS name SNI can select it by.
fn check_certs(certs: &[CertSection], v: &mut Validator) {
    for (i, c) in certs.iter().enumerate() {
        let files = CertFiles {
            cert_file: c.cert_file.get_ref().clone(),
            key_file: c.key_file.get_ref().clone(),
        };
        match httpgw::tls::load_cert(&files) {
            Ok(loaded) if i > 0 && loaded.names.is_empty() => v.error_at(
                &c.cert_file,
                format!(
                    "{} has no DNS name in its subjectAltName: SNI can never select it (only the first certificate, the default, may lack one)",
                    files.cert_file.display()
                ),
            ),
            Ok(_) => {}
            Err(e) if e.in_key_file() => v.error_at(&c.key_file, e.to_string()),
            Err(e) => v.error_at(&c.cert_file, e.to_string()),
        }
    }
}
