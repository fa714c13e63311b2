//! The gateway: routes and pools together, deciding what each request becomes, and counting
//! what happened to it. Pure: the driver passes the time, the addresses and the parsed head.
//!
//! ```text
//!  head ─► Gateway::decide(now, client, local, &mut head)
//!            │ hygiene::check fails       ─► Respond(400/405)
//!            │ no route matches            ─► Respond(404)
//!            │ route redirects             ─► Respond(3xx + Location)
//!            │ pool has no backend to give ─► Respond(503)
//!            ▼ else: head rewritten (hop-by-hop gone, X-Forwarded-*, prefix stripped)
//!          Forward(Upstream{backend addr, path}) ─► driver sends it ─► Gateway::finish(outcome)
//! ```
//!
//! [`Gateway::reconfigure`] swaps routes, pools, weights and header rules in place (a reload):
//! routes and pools are matched by name and keep their counters, a kept pool keeps its
//! backends' ids, counters and response times (balance's `Pool::reconfigure`), and a request
//! already forwarded finishes against the route and pool it was decided by. That is why an
//! [`Upstream`] names its route and pool by id, not by position: ids are never reused, and a
//! route or pool a reload removed stays (unlisted, answering no new request) while requests it
//! forwarded are in flight, until the next reload finds none.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use balance::{AdminState, BackendId, BackendState, ConnState, Decision, Health, Pool, PoolConfig};
use http::{HeaderValue, StatusCode, request};
use natgw::health::{CheckEvent, CheckKind, CheckTargets, HealthConfig, TlsCheck};

use crate::error::{CommandError, ConfigError};
use crate::health::{BackendHealth, CheckKey, EjectConfig, Ejection};
use crate::hygiene::{self, Forwarding, Refusal};
use crate::latency::{LatencyStatus, LatencyWindow};
use crate::route::{self, Action, RedirectTarget, RequestView, Route};

/// One pool of real servers, balanced by the `balance` crate's schedulers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Name routes refer to.
    pub name: String,
    /// Scheduler, backends, weights.
    pub balance: PoolConfig,
    /// Cookie stickiness, if any.
    pub cookie: Option<StickyCookie>,
    /// HTTPS to the backends (re-encryption), with natgw's HTTPS-check settings: the SNI
    /// name (else the backend's address is the name verified), whether the certificate must
    /// verify, the CA file (else the system's roots). `None`: plain HTTP.
    pub tls: Option<TlsCheck>,
    /// Active health checks of its backends (the L4 services' checker and settings; no
    /// agent, no UDP); `None`: the checks hold every backend up.
    pub health: Option<HealthConfig>,
    /// Passive ejection; `None`: failed requests take no backend out.
    pub eject: Option<EjectConfig>,
    /// Times a request is sent again, each time to another live backend, after its backend
    /// could not be reached (HAProxy `retries` + `option redispatch`, nginx
    /// `proxy_next_upstream error timeout`); see [`Gateway::retry`]. 0 turns retries off.
    pub retries: u32,
    /// Each connection to a backend starts with a PROXY protocol v2 header naming the client
    /// and the address it connected to (HAProxy `send-proxy-v2`). Such a connection belongs
    /// to one client connection: it is never given to another client's requests.
    pub proxy_protocol: bool,
}

impl PoolSpec {
    /// Default [`retries`](Self::retries): HAProxy's `retries 3`.
    pub const DEFAULT_RETRIES: u32 = 3;
    /// Most retries a pool may ask for.
    pub const MAX_RETRIES: u32 = 10;
}

/// Cookie stickiness: a request naming a backend (by an opaque id, see [`StickyCookie::id`])
/// goes to it while it can take requests; see [`CookieMode`] for where the id travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyCookie {
    /// Cookie name (an RFC 6265 token).
    pub name: String,
    /// Add `Cache-Control: private` to a response that sets the cookie, so that no shared
    /// cache hands it to other clients (insert mode only: in prefix mode the application
    /// sets its cookie and decides its caching).
    pub nocache: bool,
    /// Where the backend's id travels.
    pub mode: CookieMode,
}

/// How a [`StickyCookie`] carries the backend's id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CookieMode {
    /// HAProxy `cookie NAME insert indirect`: the proxy's own cookie `NAME=ID`, set on the
    /// answer from a backend the request did not name, removed from requests before they go
    /// upstream (the application never sees it).
    #[default]
    Insert,
    /// HAProxy `cookie NAME prefix`: the application's own cookie (a session id) carries the
    /// id as a prefix. Its `Set-Cookie: NAME=VALUE` becomes `NAME=ID~VALUE` on the way to the
    /// client; a request's `NAME=ID~VALUE` is routed by `ID` and reaches the backend as
    /// `NAME=VALUE`. A value without a well-formed prefix is passed on as it is and routed as
    /// if there were no cookie.
    Prefix,
}

impl StickyCookie {
    /// Longest cookie name accepted.
    pub const MAX_NAME: usize = 64;

    /// Checks the name: 1 to [`MAX_NAME`](Self::MAX_NAME) token characters.
    ///
    /// # Errors
    /// [`ConfigError::BadCookieName`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if self.name.is_empty() || self.name.len() > Self::MAX_NAME || !self.name.bytes().all(token)
        {
            return Err(ConfigError::BadCookieName(self.name.clone()));
        }
        if self.mode == CookieMode::Prefix && self.nocache {
            return Err(ConfigError::NocacheWithPrefix(self.name.clone()));
        }
        Ok(())
    }

    /// Characters of [`id`](Self::id).
    pub const ID_LEN: usize = 16;

    /// The opaque id a backend is named by in the cookie: 16 hex digits of a 64-bit FNV-1a
    /// hash of its address (stable across reloads and reorderings, not the address itself).
    #[must_use]
    pub fn id(addr: SocketAddrV4) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in addr
            .ip()
            .octets()
            .into_iter()
            .chain(addr.port().to_be_bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// The value of cookie `name` in the request's `Cookie` fields, and the fields with that
/// cookie removed (`None`: no such cookie, fields untouched).
fn take_cookie(headers: &mut http::HeaderMap, name: &str) -> Option<String> {
    rewrite_cookie(headers, name, true, |value| Some((value.to_owned(), None)))
}

/// The one walk over a request's `Cookie` fields that both cookie modes use. The first pair
/// named `name` goes to `first`, which gives the outcome and the value to put in its place
/// (`None`: the pair is dropped), or `None` to leave the fields untouched; later pairs of that
/// name are dropped with `drop_repeats`, kept otherwise. The fields are rewritten as one
/// (removed when nothing is left). `None`, fields untouched: no such pair, a field that is not
/// text, or `first` declined.
fn rewrite_cookie<R>(
    headers: &mut http::HeaderMap,
    name: &str,
    drop_repeats: bool,
    first: impl FnOnce(&str) -> Option<(R, Option<String>)>,
) -> Option<R> {
    let mut first = Some(first);
    let mut outcome = None;
    let mut kept: Vec<String> = Vec::new();
    for field in headers.get_all(http::header::COOKIE) {
        let text = field.to_str().ok()?;
        for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some((n, v)) if n.trim() == name && (outcome.is_none() || drop_repeats) => {
                    if let Some(decide) = first.take() {
                        let (r, replacement) = decide(v.trim())?;
                        if let Some(value) = replacement {
                            kept.push(format!("{}={value}", n.trim()));
                        }
                        outcome = Some(r);
                    }
                }
                _ => kept.push(pair.to_owned()),
            }
        }
    }
    let outcome = outcome?;
    headers.remove(http::header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(http::header::COOKIE, v);
    }
    Some(outcome)
}

/// The prefix naming the backend at `addr` on a prefix-mode pool.
fn cookie_prefix(cookie: &StickyCookie, addr: SocketAddrV4) -> Option<CookiePrefix> {
    (cookie.mode == CookieMode::Prefix).then(|| CookiePrefix {
        name: cookie.name.clone(),
        id: StickyCookie::id(addr),
    })
}

/// In prefix mode, the backend id that prefixes the value of cookie `name` in the request's
/// `Cookie` fields, whose value is rewritten without its prefix (`ID~VALUE` becomes `VALUE`).
/// `None`, fields untouched: no such cookie, or its value has no well-formed prefix
/// ([`StickyCookie::ID_LEN`] lower-case hex digits then `~`). Only the first cookie of that
/// name is looked at, as [`take_cookie`] does.
fn strip_cookie_prefix(headers: &mut http::HeaderMap, name: &str) -> Option<String> {
    rewrite_cookie(headers, name, false, |value| {
        split_prefix(value).map(|(id, rest)| (id.to_owned(), Some(rest.to_owned())))
    })
}

/// `ID~VALUE` as (`ID`, `VALUE`) when `ID` is a well-formed [`StickyCookie::id`].
fn split_prefix(value: &str) -> Option<(&str, &str)> {
    let (id, rest) = value.split_once('~')?;
    let well_formed = id.len() == StickyCookie::ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then_some((id, rest))
}

/// Prefix-mode stickiness on an answer ([`CookieMode::Prefix`]): the backend's id to put
/// before the value of every `Set-Cookie` of the pool's cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookiePrefix {
    /// The application's cookie name.
    pub name: String,
    /// [`StickyCookie::id`] of the backend that answers.
    pub id: String,
}

impl CookiePrefix {
    /// Rewrites each `Set-Cookie: NAME=VALUE; attributes` of this cookie to
    /// `NAME=ID~VALUE; attributes`. Other cookies, an empty value (a deletion) and fields
    /// that are not text stay as they are.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        let http::header::Entry::Occupied(mut fields) = headers.entry(http::header::SET_COOKIE)
        else {
            return;
        };
        for field in fields.iter_mut() {
            let Ok(text) = field.to_str() else {
                continue;
            };
            let pair_end = text.find(';').unwrap_or(text.len());
            let Some(eq) = text[..pair_end].find('=') else {
                continue;
            };
            let value = text[eq + 1..pair_end].trim();
            if text[..eq].trim() != self.name || value.is_empty() {
                continue;
            }
            let rewritten = format!(
                "{}={}~{}",
                text[..eq].trim(),
                self.id,
                text[eq + 1..].trim_start()
            );
            if let Ok(v) = HeaderValue::from_str(&rewritten) {
                *field = v;
            }
        }
    }
}

/// Bounds on what a client may send or hold, and how long an upstream may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Limits {
    /// Client connections held at once; further ones wait in the listen backlog.
    pub max_connections: u32,
    /// Longest request head (request line and header fields), in bytes: 431 beyond.
    pub max_header_bytes: usize,
    /// Largest request body, in bytes: 413 beyond (bodies are buffered up to this).
    pub max_body_bytes: u64,
    /// Time a client has to send a complete head (slowloris bound); the connection is closed
    /// when it runs out. Also the longest wait between two reads of a request body (408),
    /// and the longest an HTTP/2 connection may have no stream open.
    pub header_timeout: Duration,
    /// Time an upstream has to answer with a response head: 504 beyond. Counted per
    /// attempt: a retried request gets it anew on its next backend.
    pub upstream_timeout: Duration,
    /// Time a connection to an upstream has to be established (HAProxy `timeout connect`);
    /// beyond, the attempt failed without sending anything and may be retried.
    pub connect_timeout: Duration,
    /// Time an idle upstream connection is kept in the pool.
    pub upstream_idle: Duration,
    /// Time a tunnel (an upgraded connection, e.g. a WebSocket) may pass no byte either way
    /// before both sides are closed.
    pub tunnel_timeout: Duration,
    /// Streams an HTTP/2 client may have open at once on one connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams: u32,
    /// Time the requests in flight get to finish when the listener stops (or a reload
    /// removes it): idle connections are closed at once, busy ones after their answer; the
    /// ones still open after it are cut.
    pub drain_timeout: Duration,
}

impl Limits {
    /// Lowest head limit accepted (a request line and a few fields).
    pub const MIN_HEADER_BYTES: usize = 256;
    /// Highest head limit accepted (what the HTTP library can buffer).
    pub const MAX_HEADER_BYTES: usize = 1 << 20;
    /// Highest `max_streams` accepted.
    pub const MAX_STREAMS: u32 = 1000;

    /// The `SETTINGS_MAX_HEADER_LIST_SIZE` announced to HTTP/2 clients: twice the head limit
    /// plus HPACK's 32-byte overhead per field (and the four pseudo-fields). A head over
    /// [`max_header_bytes`](Self::max_header_bytes) but within this reaches the gateway, which
    /// answers 431 and counts it like an HTTP/1.1 one; beyond it the HTTP/2 layer answers 431
    /// itself, before any of it is kept.
    #[must_use]
    pub fn h2_header_list_size(&self) -> u32 {
        let overhead = 32 * (crate::framing::MAX_HEADERS + 4);
        u32::try_from(2 * self.max_header_bytes + overhead).unwrap_or(u32::MAX)
    }

    /// Streams one HTTP/2 connection may see cancelled by its client (`RST_STREAM`) within
    /// [`ResetBudget::WINDOW`] before it is sent a `GOAWAY`: twice `max_streams`.
    #[must_use]
    pub fn max_cancels(&self) -> u32 {
        self.max_streams.saturating_mul(2)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 8 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            upstream_idle: Duration::from_secs(60),
            tunnel_timeout: Duration::from_secs(3600),
            max_streams: 100,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Counts the requests a client cancels on one connection, in windows of [`Self::WINDOW`]:
/// the rapid-reset defence (CVE-2023-44487). Opening a stream and resetting it at once costs
/// the client two frames and the gateway a request (routing, an upstream connection); a
/// client doing it faster than the budget allows is sent a `GOAWAY`.
#[derive(Debug, Clone)]
pub struct ResetBudget {
    max: u32,
    window_start: Option<Instant>,
    count: u32,
}

impl ResetBudget {
    /// The window the budget is counted over.
    pub const WINDOW: Duration = Duration::from_secs(1);

    /// A budget of `max` cancellations per window.
    #[must_use]
    pub fn new(max: u32) -> Self {
        Self {
            max,
            window_start: None,
            count: 0,
        }
    }

    /// Counts one cancellation at `now`; `true` once the window's budget is exceeded (the
    /// connection should be told to go away).
    pub fn cancelled(&mut self, now: Instant) -> bool {
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < Self::WINDOW => {
                self.count = self.count.saturating_add(1);
            }
            _ => {
                self.window_start = Some(now);
                self.count = 1;
            }
        }
        self.count > self.max
    }
}

/// An application protocol offered to TLS clients by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Alpn {
    /// HTTP/2 (`h2`).
    H2,
    /// HTTP/1.1 (`http/1.1`).
    Http11,
}

impl Alpn {
    /// The protocol named `name` in ALPN's registry (`h2`, `http/1.1`).
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "h2" => Some(Self::H2),
            "http/1.1" => Some(Self::Http11),
            _ => None,
        }
    }

    /// Its ALPN name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::H2 => "h2",
            Self::Http11 => "http/1.1",
        }
    }
}

/// One certificate (with its chain) and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// TLS termination on a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificates, picked by SNI among their subjectAltName DNS names; the first is the
    /// default (no SNI, or a name none holds).
    pub certs: Vec<CertFiles>,
    /// Time a client has to complete the handshake; the connection is closed beyond.
    pub handshake_timeout: Duration,
    /// Protocols offered by ALPN, preferred first. A client that offers ALPN but none of
    /// these fails the handshake; one that offers no ALPN gets HTTP/1.1.
    pub alpn: Vec<Alpn>,
}

impl TlsConfig {
    /// Default ALPN list: HTTP/2 first, HTTP/1.1 for clients without it.
    pub const DEFAULT_ALPN: [Alpn; 2] = [Alpn::H2, Alpn::Http11];

    /// Most certificates on one listener.
    pub const MAX_CERTS: usize = 1000;
    /// Default handshake timeout (HAProxy's `timeout client` usually bounds it).
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
}

/// What the gateway knows of a request's TLS session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsSession<'a> {
    /// The server name the client sent, lower-case; `None` without SNI.
    pub sni: Option<&'a str>,
}

/// How a TLS handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Completed.
    Done,
    /// Refused or broken: not TLS, no common version or cipher, a bad message, EOF.
    Failed,
    /// Not completed within the handshake timeout.
    TimedOut,
}

/// Everything one HTTP gateway (one listener) is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Name (`show http`, logs).
    pub name: String,
    /// Address the driver listens on.
    pub listen: SocketAddrV4,
    /// Rules, first match wins.
    pub routes: Vec<Route>,
    /// Pools the routes forward to, by index.
    pub pools: Vec<PoolSpec>,
    /// `X-Forwarded-*` policy.
    pub forwarding: Forwarding,
    /// Bounds.
    pub limits: Limits,
    /// Log one line per request at info level (debug level otherwise).
    pub access_log: bool,
    /// TLS termination; `None`: plain HTTP.
    pub tls: Option<TlsConfig>,
}

impl GatewayConfig {
    /// Checks what the gateway relies on: routes name existing pools, pool names are unique,
    /// limits are in range.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, p) in self.pools.iter().enumerate() {
            if self.pools[..i].iter().any(|o| o.name == p.name) {
                return Err(ConfigError::DuplicatePool(p.name.clone()));
            }
            if let Some(c) = &p.cookie {
                c.validate()?;
            }
            let bad = |why| ConfigError::BadHealth {
                pool: p.name.clone(),
                why,
            };
            if let Some(h) = &p.health {
                if h.agent.is_some() {
                    return Err(bad("an HTTP pool's checks ask no agent"));
                }
                if matches!(h.kind, CheckKind::Udp { .. }) {
                    return Err(bad("an HTTP pool's backends are checked over TCP, not UDP"));
                }
                if h.rise == 0 || h.fall == 0 || h.interval.is_zero() || h.timeout.is_zero() {
                    return Err(bad(
                        "health rise, fall, interval and timeout must be above 0",
                    ));
                }
            }
            if let Some(e) = &p.eject {
                e.validate().map_err(bad)?;
            }
            range(
                "retries",
                u64::from(p.retries),
                0,
                u64::from(PoolSpec::MAX_RETRIES),
            )?;
        }
        for r in &self.routes {
            if !r.rewrite.within_bounds() {
                return Err(ConfigError::LimitOutOfRange {
                    what: "header rules per list",
                    value: r.rewrite.longest() as u64,
                    min: 0,
                    max: route::MAX_HEADER_RULES as u64,
                });
            }
            let regexes = r
                .when
                .paths
                .iter()
                .filter(|p| matches!(p, route::PathPattern::Regex(_)))
                .count();
            if regexes > route::MAX_PATH_REGEXES {
                return Err(ConfigError::LimitOutOfRange {
                    what: "path regexes per route",
                    value: regexes as u64,
                    min: 0,
                    max: route::MAX_PATH_REGEXES as u64,
                });
            }
            if let Action::Forward { pool, canary, .. } = r.action {
                for pool in std::iter::once(pool).chain(canary.map(|c| c.pool)) {
                    if pool >= self.pools.len() {
                        return Err(ConfigError::NoSuchPool {
                            route: r.name.clone(),
                            pool,
                        });
                    }
                }
                if let Some(c) = canary
                    && c.percent > route::Canary::MAX_PERCENT
                {
                    return Err(ConfigError::LimitOutOfRange {
                        what: "canary percent",
                        value: u64::from(c.percent),
                        min: 0,
                        max: u64::from(route::Canary::MAX_PERCENT),
                    });
                }
            }
        }
        let l = &self.limits;
        range(
            "max_header_bytes",
            l.max_header_bytes as u64,
            Limits::MIN_HEADER_BYTES as u64,
            Limits::MAX_HEADER_BYTES as u64,
        )?;
        range(
            "max_connections",
            u64::from(l.max_connections),
            1,
            1_000_000,
        )?;
        range(
            "max_streams",
            u64::from(l.max_streams),
            1,
            u64::from(Limits::MAX_STREAMS),
        )?;
        range(
            "connect_timeout (ms)",
            u64::try_from(l.connect_timeout.as_millis()).unwrap_or(u64::MAX),
            1,
            3_600_000,
        )?;
        if let Some(tls) = &self.tls {
            let alpn = &tls.alpn;
            if alpn.is_empty() || (1..alpn.len()).any(|i| alpn[..i].contains(&alpn[i])) {
                return Err(ConfigError::BadAlpn);
            }
            range(
                "the number of TLS certificates",
                tls.certs.len() as u64,
                1,
                TlsConfig::MAX_CERTS as u64,
            )?;
            range(
                "handshake_timeout (ms)",
                u64::try_from(tls.handshake_timeout.as_millis()).unwrap_or(u64::MAX),
                100,
                3_600_000,
            )?;
        }
        Ok(())
    }
}

fn range(what: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::LimitOutOfRange {
            what,
            value,
            min,
            max,
        })
    }
}

/// Responses by status class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct StatusClasses {
    /// 1xx.
    pub info: u64,
    /// 2xx.
    pub success: u64,
    /// 3xx.
    pub redirect: u64,
    /// 4xx.
    pub client_error: u64,
    /// 5xx.
    pub server_error: u64,
}

impl StatusClasses {
    fn count(&mut self, status: StatusCode) {
        let slot = match status.as_u16() / 100 {
            1 => &mut self.info,
            2 => &mut self.success,
            3 => &mut self.redirect,
            4 => &mut self.client_error,
            _ => &mut self.server_error,
        };
        *slot += 1;
    }
}

/// Counters of one route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct RouteStatus {
    /// Route name.
    pub name: String,
    /// What it does (`pool web`, `pool api, strip /api`, `redirect 301 https://...`).
    pub action: String,
    /// Requests it matched.
    pub requests: u64,
    /// Of those, the ones its canary sent to the canary pool.
    pub canary_requests: u64,
    /// Their answers.
    pub responses: StatusClasses,
}

/// Counters and state of one backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct BackendStatus {
    /// Address.
    pub addr: String,
    /// Configured weight.
    pub weight: u32,
    /// `up`, `draining`, `down`, `ejected`, `removed`, `maint`.
    pub state: String,
    /// Requests in flight.
    pub active: u32,
    /// Requests sent to it.
    pub requests: u64,
    /// Its answers (502/504 for its failures included).
    pub responses: StatusClasses,
    /// Requests it failed: refused connection, timeout, broken response (retried ones
    /// included).
    pub failures: u64,
    /// Of those, the ones sent again to another backend of its pool.
    pub retried: u64,
    /// `up`, `down` (by its health checks) or `ejected` (by passive ejection).
    pub health: String,
    /// Why it is down or ejected.
    pub reason: Option<String>,
    /// Whether its pool checks it.
    pub checked: bool,
    /// Health probes failed.
    pub checks_failed: u64,
    /// The last probe failure, if any.
    pub last_check_failure: Option<String>,
    /// Failed requests in a row (what passive ejection counts).
    pub consecutive_errors: u32,
    /// Times it was ejected.
    pub ejections: u64,
    /// Ejections not made because it was the pool's last live backend.
    pub ejections_spared: u64,
    /// The weight the scheduler uses now (below `weight` during slow start).
    pub effective_weight: u32,
    /// In slow start.
    pub slow_start: bool,
}

/// Counters of one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Scheduler (`rr`, `wrr`, ...).
    pub scheduler: String,
    /// Requests routed to it.
    pub requests: u64,
    /// Requests it had no backend for (answered 503).
    pub no_backend: u64,
    /// Requests sent again to another backend after theirs could not be reached (each
    /// retry counted).
    pub retries: u64,
    /// Its answers.
    pub responses: StatusClasses,
    /// Its backends.
    pub backends: Vec<BackendStatus>,
    /// Response times of its answers over the last 30–60 s.
    pub latency: LatencyStatus,
}

/// TLS handshakes of one listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct TlsStatus {
    /// Completed.
    pub handshakes: u64,
    /// Refused or broken (not TLS, no common version, EOF).
    pub failed: u64,
    /// Not completed within the handshake timeout.
    pub timed_out: u64,
    /// Completed handshakes that chose HTTP/2.
    pub h2: u64,
    /// HTTP/2 connections sent a `GOAWAY` for resetting streams faster than the budget (or
    /// than the HTTP/2 layer's own bounds on reset streams).
    pub reset_floods: u64,
}

/// What `show http` prints for one gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct GatewayStatus {
    /// Gateway name.
    pub name: String,
    /// Listening address.
    pub listen: String,
    /// Client connections open now (filled in by the driver).
    pub connections: u64,
    /// Client connections per worker thread, open or handed over and not yet served (filled
    /// in by the driver; empty without one).
    pub workers: Vec<u64>,
    /// Requests seen (refused ones included).
    pub requests: u64,
    /// Requests refused by hygiene or limits (400, 405, 408, 413, 431).
    pub refused: u64,
    /// Requests no route matched (404).
    pub no_route: u64,
    /// Requests the client gave up on (HTTP/2 `RST_STREAM`, a closed connection) before
    /// the answer; logged with status 499 and counted as 4xx.
    pub cancelled: u64,
    /// All answers.
    pub responses: StatusClasses,
    /// Per route.
    pub routes: Vec<RouteStatus>,
    /// Per pool.
    pub pools: Vec<PoolStatus>,
    /// Handshakes, on a TLS listener.
    pub tls: Option<TlsStatus>,
    /// Response times (forwarded to the answer's head) over the last 30–60 s.
    pub latency: LatencyStatus,
}

/// Where a forwarded request goes; hand it back to [`Gateway::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Matching route's id: the n-th route of the first config has id n, a route keeps its
    /// id across reloads that keep its name, and ids are never reused.
    pub route: usize,
    /// Pool's id, numbered as routes are.
    pub pool: usize,
    /// Backend picked (`None`: the pool's sorry server).
    pub backend: Option<BackendId>,
    /// Address to send it to.
    pub addr: SocketAddrV4,
    /// Path and query to send (prefix stripped).
    pub path_and_query: String,
    /// `Set-Cookie` value to add to the response (stickiness), and whether to add
    /// `Cache-Control: private` with it.
    pub set_cookie: Option<(HeaderValue, bool)>,
    /// Prefix-mode stickiness: the answer's `Set-Cookie` of the application's cookie gets
    /// the backend's id ([`CookiePrefix::apply`]).
    pub cookie_prefix: Option<CookiePrefix>,
    /// The pool talks HTTPS to its backends with these settings (`None`: HTTP). Boxed: a
    /// verdict is moved around per request, and most pools speak HTTP.
    pub tls: Option<Box<TlsCheck>>,
    /// The request asks to switch to this protocol (`Connection: upgrade` and `Upgrade` are
    /// forwarded); a `101` answer makes the connection a tunnel.
    pub upgrade: Option<HeaderValue>,
    /// Send the backend a PROXY protocol v2 header first, on a connection of this client
    /// connection's own ([`PoolSpec::proxy_protocol`]).
    pub proxy_protocol: bool,
    /// The `Via` entry to add to the answer (the listener's `via`; backends answer HTTP/1.1).
    /// Boxed as `tls` is: most listeners add none.
    pub via: Option<Box<HeaderValue>>,
    client: Ipv4Addr,
    /// The address the client connected to (what `dh` and `lblc` schedule by).
    local: Ipv4Addr,
    /// Retries left for this request.
    retries_left: u32,
    /// The backends it was sent to, the current one last (a retry picks none of them).
    tried: Vec<BackendId>,
    /// A safe method (GET, HEAD, OPTIONS) asking no upgrade: sending it twice changes nothing.
    safe: bool,
    /// When the gateway forwarded it: the start of its response time.
    decided: Instant,
}

impl Upstream {
    /// Whether a failed attempt of it may still be sent again (its pool's retries are not
    /// used up): the driver keeps a copy of the request only for one that may.
    #[must_use]
    pub fn may_retry(&self) -> bool {
        self.retries_left > 0 && self.backend.is_some()
    }
}

/// Names added, removed and changed by a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// New.
    pub added: Vec<String>,
    /// Gone.
    pub removed: Vec<String>,
    /// Kept with a different configuration.
    pub changed: Vec<String>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// What [`Gateway::reconfigure`] changed, by name; its `Display` is the log line's
/// (`routes +a -b ~c; pools ~web; backends +web/10.0.0.3:80; weights web/10.0.0.1:80 1→0`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reload {
    /// Routes.
    pub routes: Changes,
    /// Pools.
    pub pools: Changes,
    /// Backends added and removed, as `pool/address`.
    pub backends: Changes,
    /// Weights changed, as `pool/address old→new`.
    pub weights: Vec<String>,
    /// The `X-Forwarded-*` policy (trusted proxies) changed.
    pub forwarding: bool,
}

impl Reload {
    /// Whether it changed nothing the gateway decides with.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
            && self.pools.is_empty()
            && self.backends.is_empty()
            && self.weights.is_empty()
            && !self.forwarding
    }
}

impl std::fmt::Display for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, c) in [
            ("routes", &self.routes),
            ("pools", &self.pools),
            ("backends", &self.backends),
        ] {
            if !c.is_empty() {
                let names = c
                    .added
                    .iter()
                    .map(|n| format!("+{n}"))
                    .chain(c.removed.iter().map(|n| format!("-{n}")))
                    .chain(c.changed.iter().map(|n| format!("~{n}")));
                parts.push(format!("{what} {}", names.collect::<Vec<_>>().join(" ")));
            }
        }
        if !self.weights.is_empty() {
            parts.push(format!("weights {}", self.weights.join(", ")));
        }
        if self.forwarding {
            parts.push("trusted proxies".to_owned());
        }
        if parts.is_empty() {
            f.write_str("no routing change")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

/// Adds the backends `new` adds, removes or reweighs against `old` to `reload`.
fn diff_backends(old: &PoolSpec, new: &PoolSpec, reload: &mut Reload) {
    let (before, after) = (&old.balance.backends, &new.balance.backends);
    let name = |addr: SocketAddrV4| format!("{}/{addr}", new.name);
    for b in after {
        match before.iter().find(|o| o.addr == b.addr) {
            None => reload.backends.added.push(name(b.addr)),
            Some(o) if o.weight != b.weight => {
                reload
                    .weights
                    .push(format!("{} {}→{}", name(b.addr), o.weight, b.weight))
            }
            Some(o) if o != b => reload.backends.changed.push(name(b.addr)),
            Some(_) => {}
        }
    }
    for o in before {
        if !after.iter().any(|b| b.addr == o.addr) {
            reload.backends.removed.push(name(o.addr));
        }
    }
}

/// A request the gateway answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// `Location` of a redirect.
    pub location: Option<HeaderValue>,
    /// Why (access log).
    pub reason: &'static str,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send it upstream (the head has been rewritten for it).
    Forward(Upstream),
    /// Answer it here.
    Respond(Answer),
}

/// How a forwarded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Answered(StatusCode),
    /// The upstream could not be reached: connection refused, or not established within
    /// `connect_timeout` (answered 502).
    Refused,
    /// The upstream did not answer in time (answered 504).
    TimedOut,
    /// The upstream connection broke or sent garbage (answered 502).
    Broken,
    /// The client cancelled the request before the upstream answered (logged as 499, as
    /// nginx does; not the backend's failure).
    Cancelled,
}

/// Why an attempt to forward a request failed, as far as sending it again goes (see
/// [`Gateway::retry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// No connection to the backend: refused, unreachable, or not established within
    /// `connect_timeout`. Nothing of the request was sent.
    Unsent,
    /// The request was sent and the backend closed the connection before any byte of an
    /// answer; `bodiless`: the request had no body.
    ClosedUnanswered {
        /// The request had no body.
        bodiless: bool,
    },
}

/// A request [`Gateway::retry`] sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retried {
    /// What passive ejection made of the failed attempt, when it reached the error limit.
    pub ejection: Option<Ejection>,
}

/// The status logged for a request its client cancelled (nginx's 499, "client closed
/// request"; never sent).
#[must_use]
pub fn client_closed() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

impl Outcome {
    /// The status the client gets.
    #[must_use]
    pub fn status(self) -> StatusCode {
        match self {
            Self::Answered(s) => s,
            Self::Refused | Self::Broken => StatusCode::BAD_GATEWAY,
            Self::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            Self::Cancelled => client_closed(),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct BackendCounts {
    requests: u64,
    responses: StatusClasses,
    failures: u64,
    retried: u64,
    health: BackendHealth,
}

#[derive(Debug)]
struct PoolState {
    /// Stable across reloads that keep the pool's name; never reused.
    id: usize,
    /// As configured (names, cookie; the backends of the last reload, for its summary).
    spec: PoolSpec,
    pool: Pool,
    /// Requests forwarded and not yet finished.
    in_flight: u32,
    requests: u64,
    no_backend: u64,
    retries: u64,
    responses: StatusClasses,
    /// Indexed by [`BackendId::index`].
    backends: Vec<BackendCounts>,
    latency: LatencyWindow,
}

impl PoolState {
    /// The counts of backend `id`, made on first use.
    fn counts(&mut self, id: BackendId) -> &mut BackendCounts {
        let i = id.index();
        if self.backends.len() <= i {
            self.backends.resize(i + 1, BackendCounts::default());
        }
        &mut self.backends[i]
    }

    /// Puts backend `id` in or out of rotation as its checks and ejection say (balance
    /// starts the slow start of one coming back); returns whether that changed.
    fn sync_health(&mut self, id: BackendId) -> bool {
        let health = self
            .backends
            .get(id.index())
            .map_or(Health::Up, |c| c.health.health());
        self.pool.set_health(id, health)
    }

    /// After a reload: checks or ejection turned off release what they held out, and every
    /// backend's rotation follows its health again.
    fn settle_health(&mut self) {
        for c in &mut self.backends {
            if self.spec.health.is_none() {
                c.health.check_down = false;
            }
            if self.spec.eject.is_none() {
                c.health.ejected = None;
                c.health.consecutive_errors = 0;
            }
        }
        let ids: Vec<BackendId> = self.pool.backends().map(|(id, _)| id).collect();
        for id in ids {
            self.sync_health(id);
        }
    }
}

/// One route with its counters.
#[derive(Debug)]
struct RouteState {
    /// Stable across reloads that keep the route's name; never reused.
    id: usize,
    /// A forward's `pool` is the pool's id.
    route: Route,
    /// Requests forwarded and not yet finished.
    in_flight: u32,
    requests: u64,
    /// Requests its canary sent to the canary pool.
    canary_requests: u64,
    responses: StatusClasses,
}

/// The deciding half of one HTTP gateway; see the module documentation.
///
/// Invariants: `routes[..listed_routes]` are the configured routes in first-match order,
/// `pools[..listed_pools]` the configured pools; entries after them were removed by a reload
/// and only finish the requests they had forwarded. Every listed route forwards to a listed
/// pool.
#[derive(Debug)]
pub struct Gateway {
    name: String,
    listen: SocketAddrV4,
    routes: Vec<RouteState>,
    listed_routes: usize,
    pools: Vec<PoolState>,
    listed_pools: usize,
    next_route_id: usize,
    next_pool_id: usize,
    forwarding: Forwarding,
    requests: u64,
    refused: u64,
    no_route: u64,
    cancelled: u64,
    responses: StatusClasses,
    tls: Option<TlsStatus>,
    latency: LatencyWindow,
}

impl Gateway {
    /// Builds the gateway.
    ///
    /// # Errors
    /// [`ConfigError`] from [`GatewayConfig::validate`] or a pool the balance crate refuses.
    pub fn new(config: &GatewayConfig) -> Result<Self, ConfigError> {
        let mut gateway = Self {
            name: config.name.clone(),
            listen: config.listen,
            routes: Vec::new(),
            listed_routes: 0,
            pools: Vec::new(),
            listed_pools: 0,
            next_route_id: 0,
            next_pool_id: 0,
            forwarding: config.forwarding.clone(),
            requests: 0,
            refused: 0,
            no_route: 0,
            cancelled: 0,
            responses: StatusClasses::default(),
            tls: config.tls.as_ref().map(|_| TlsStatus::default()),
            latency: LatencyWindow::default(),
        };
        gateway.reconfigure(config)?;
        Ok(gateway)
    }

    /// Applies a new configuration in place (a reload) and says what changed; nothing changes
    /// if it is refused. Routes and pools are matched by name: a kept one keeps its counters
    /// (and a pool its backends' states, counters and response times, backends matched by
    /// address), a new one starts from zero, a removed one answers no new request but stays
    /// until the requests it forwarded are [`finish`](Self::finish)ed. Requests decided from
    /// now on take the new routes. The name and listen address are taken as given: a driver
    /// that cannot move its listener starts a new gateway instead.
    ///
    /// # Errors
    /// [`ConfigError`] from [`GatewayConfig::validate`] or a pool the balance crate refuses.
    pub fn reconfigure(&mut self, config: &GatewayConfig) -> Result<Reload, ConfigError> {
        config.validate()?;
        let first = self.routes.is_empty() && self.pools.is_empty();
        let listed_pools = &self.pools[..self.listed_pools];
        // Every pool is built (or reconfigured on a copy) before anything is replaced.
        let mut staged = Vec::with_capacity(config.pools.len());
        for spec in &config.pools {
            let refused = |source| ConfigError::Pool {
                pool: spec.name.clone(),
                source,
            };
            let kept = listed_pools.iter().position(|p| p.spec.name == spec.name);
            let pool = match kept {
                Some(i) => {
                    let mut pool = listed_pools[i].pool.clone();
                    pool.reconfigure(spec.balance.clone()).map_err(refused)?;
                    pool
                }
                None => Pool::new(spec.balance.clone()).map_err(refused)?,
            };
            staged.push((kept, pool));
        }

        let mut reload = Reload {
            forwarding: self.forwarding != config.forwarding,
            ..Reload::default()
        };
        let mut old: Vec<Option<PoolState>> = self.pools.drain(..).map(Some).collect();
        let mut pools = Vec::with_capacity(old.len().max(config.pools.len()));
        for (spec, (kept, pool)) in config.pools.iter().zip(staged) {
            let state = match kept.and_then(|i| old[i].take()) {
                Some(mut state) => {
                    if state.spec != *spec {
                        reload.pools.changed.push(spec.name.clone());
                        diff_backends(&state.spec, spec, &mut reload);
                    }
                    // A backend id that now names another address starts its counts anew.
                    for (id, b) in pool.backends() {
                        let before = state.pool.backend(id).map(balance::Backend::addr);
                        if before != Some(b.addr())
                            && let Some(counts) = state.backends.get_mut(id.index())
                        {
                            *counts = BackendCounts::default();
                        }
                    }
                    state.spec = spec.clone();
                    state.pool = pool;
                    state.settle_health();
                    state
                }
                None => {
                    if !first {
                        reload.pools.added.push(spec.name.clone());
                    }
                    self.next_pool_id += 1;
                    PoolState {
                        id: self.next_pool_id - 1,
                        spec: spec.clone(),
                        pool,
                        in_flight: 0,
                        requests: 0,
                        no_backend: 0,
                        retries: 0,
                        responses: StatusClasses::default(),
                        backends: Vec::new(),
                        latency: LatencyWindow::default(),
                    }
                }
            };
            pools.push(state);
        }
        let listed_pools = pools.len();
        for (i, state) in old.into_iter().enumerate() {
            let Some(state) = state else { continue };
            if i < self.listed_pools {
                reload.pools.removed.push(state.spec.name.clone());
            }
            if state.in_flight > 0 {
                pools.push(state);
            }
        }

        let pool_ids: Vec<usize> = pools[..listed_pools].iter().map(|p| p.id).collect();
        let mut old: Vec<Option<RouteState>> = self.routes.drain(..).map(Some).collect();
        let mut routes = Vec::with_capacity(old.len().max(config.routes.len()));
        for r in &config.routes {
            let mut route = r.clone();
            if let Action::Forward { pool, canary, .. } = &mut route.action {
                *pool = pool_ids[*pool];
                if let Some(c) = canary {
                    c.pool = pool_ids[c.pool];
                }
            }
            let kept = old[..self.listed_routes]
                .iter()
                .position(|o| o.as_ref().is_some_and(|o| o.route.name == r.name))
                .and_then(|i| old[i].take());
            let state = match kept {
                Some(mut state) => {
                    if state.route != route {
                        reload.routes.changed.push(r.name.clone());
                    }
                    state.route = route;
                    state
                }
                None => {
                    if !first {
                        reload.routes.added.push(r.name.clone());
                    }
                    self.next_route_id += 1;
                    RouteState {
                        id: self.next_route_id - 1,
                        route,
                        in_flight: 0,
                        requests: 0,
                        canary_requests: 0,
                        responses: StatusClasses::default(),
                    }
                }
            };
            routes.push(state);
        }
        let listed_routes = routes.len();
        for (i, state) in old.into_iter().enumerate() {
            let Some(state) = state else { continue };
            if i < self.listed_routes {
                reload.routes.removed.push(state.route.name.clone());
            }
            if state.in_flight > 0 {
                routes.push(state);
            }
        }

        self.name.clone_from(&config.name);
        self.listen = config.listen;
        self.routes = routes;
        self.listed_routes = listed_routes;
        self.pools = pools;
        self.listed_pools = listed_pools;
        self.forwarding.clone_from(&config.forwarding);
        match (&self.tls, &config.tls) {
            (None, Some(_)) => self.tls = Some(TlsStatus::default()),
            (Some(_), None) => self.tls = None,
            _ => {}
        }
        Ok(reload)
    }

    /// Forwarded requests not yet [`finish`](Self::finish)ed.
    #[must_use]
    pub fn in_flight(&self) -> u64 {
        self.pools.iter().map(|p| u64::from(p.in_flight)).sum()
    }

    /// Sets the operator state of backend `addr` of pool `pool` (`vipgate http drain`,
    /// `http set state`) and says whether it changed. A drained backend gets no new request
    /// (nor one whose sticky cookie names it), the ones it is answering finish. A reload that
    /// keeps the backend keeps its state.
    ///
    /// # Errors
    /// [`CommandError`] for an unknown pool or backend.
    pub fn set_backend_state(
        &mut self,
        pool: &str,
        addr: SocketAddrV4,
        state: AdminState,
    ) -> Result<bool, CommandError> {
        let listed = &mut self.pools[..self.listed_pools];
        let Some(p) = listed.iter_mut().find(|p| p.spec.name == pool) else {
            return Err(CommandError::UnknownPool(pool.to_owned()));
        };
        p.pool
            .set_admin(addr, state)
            .map_err(|source| CommandError::Pool {
                pool: pool.to_owned(),
                source,
            })
    }

    /// Decides what `head`, from `client` to `local` (over `tls`, if it came over TLS),
    /// becomes; on [`Verdict::Forward`] the head has been rewritten for the upstream and the
    /// pool counts the request as active until [`finish`](Self::finish).
    pub fn decide(
        &mut self,
        now: Instant,
        client: SocketAddrV4,
        local: Ipv4Addr,
        tls: Option<TlsSession<'_>>,
        head: &mut request::Parts,
    ) -> Verdict {
        self.requests += 1;
        let checked = match hygiene::check(head) {
            Ok(c) => c,
            Err(refusal) => return self.refuse(refusal),
        };
        let view = RequestView {
            host: &checked.host,
            path: &checked.path,
            method: &head.method,
            headers: &head.headers,
            sni: tls.and_then(|t| t.sni),
        };
        let listed = &self.routes[..self.listed_routes];
        let Some(index) = listed.iter().position(|r| r.route.when.matches(&view)) else {
            self.no_route += 1;
            return self.answer(None, StatusCode::NOT_FOUND, None, "no route");
        };
        self.routes[index].requests += 1;
        let (pool_id, strip, canary) = match &self.routes[index].route.action {
            Action::Redirect { status, target } => {
                let location = match target {
                    RedirectTarget::Location(url) => url.clone(),
                    RedirectTarget::Prefix(base) => {
                        let query = head.uri.query().map(|q| format!("?{q}"));
                        format!(
                            "{}{}{}",
                            base.trim_end_matches('/'),
                            checked.path,
                            query.unwrap_or_default()
                        )
                    }
                };
                let location = HeaderValue::from_str(&location).ok();
                return self.answer(Some(index), *status, location, "redirect");
            }
            Action::Forward {
                pool,
                strip_prefix,
                canary,
            } => (*pool, strip_prefix.clone(), *canary),
        };
        let pool_id = match canary {
            Some(c) => {
                let route = &mut self.routes[index];
                // The route's requests so far number its decisions: any run of 100 of
                // them spreads a per-request canary exactly.
                if c.takes(*client.ip(), route.requests - 1) {
                    route.canary_requests += 1;
                    c.pool
                } else {
                    pool_id
                }
            }
            None => pool_id,
        };
        // The path's own string becomes the target's (the query appended to it).
        let mut path_and_query = strip
            .and_then(|p| route::strip_prefix(&checked.path, &p))
            .unwrap_or(checked.path);
        if let Some(q) = head.uri.query() {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        let listed = &mut self.pools[..self.listed_pools];
        let Some(state) = listed.iter_mut().find(|p| p.id == pool_id) else {
            // Unreachable: a listed route forwards to a listed pool.
            return self.answer(
                Some(index),
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "no backend available",
            );
        };
        state.requests += 1;
        // Stickiness: the backend the cookie names while it can take requests, else the
        // scheduler's pick (a dead backend's clients are re-dispatched and get a new cookie).
        let named = state.spec.cookie.as_ref().and_then(|c| match c.mode {
            CookieMode::Insert => take_cookie(&mut head.headers, &c.name),
            CookieMode::Prefix => strip_cookie_prefix(&mut head.headers, &c.name),
        });
        let stuck = named.as_deref().and_then(|id| {
            state
                .pool
                .backends()
                .find(|(_, b)| b.is_eligible() && StickyCookie::id(b.addr()) == id)
                .map(|(bid, b)| (bid, b.addr()))
        });
        let decision = match stuck {
            Some((id, addr)) => {
                state.pool.opened(now, id, client);
                Decision::Backend { id, addr }
            }
            None => state.pool.schedule(now, client, local),
        };
        let set_cookie = match (&state.spec.cookie, &decision) {
            (Some(c), Decision::Backend { addr, .. })
                if stuck.is_none() && c.mode == CookieMode::Insert =>
            {
                HeaderValue::from_str(&format!("{}={}; Path=/", c.name, StickyCookie::id(*addr)))
                    .ok()
                    .map(|v| (v, c.nocache))
            }
            _ => None,
        };
        let cookie_prefix = match (&state.spec.cookie, &decision) {
            (Some(c), Decision::Backend { addr, .. }) => cookie_prefix(c, *addr),
            _ => None,
        };
        let (backend, addr) = match decision {
            Decision::Backend { id, addr } => {
                state.pool.established(now, id, *client.ip());
                let i = id.index();
                if state.backends.len() <= i {
                    state.backends.resize(i + 1, BackendCounts::default());
                }
                state.backends[i].requests += 1;
                (Some(id), addr)
            }
            Decision::Sorry(addr) => (None, addr),
            Decision::Refuse => {
                state.no_backend += 1;
                state.responses.count(StatusCode::SERVICE_UNAVAILABLE);
                return self.answer(
                    Some(index),
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    "no backend available",
                );
            }
        };
        let upgrade = hygiene::upgrade_protocol(&head.headers);
        hygiene::prepare_upstream(
            &mut head.headers,
            (*client.ip()).into(),
            checked.authority.as_ref(),
            if tls.is_some() { "https" } else { "http" },
            &self.forwarding,
            head.version,
        );
        if let Some(protocol) = &upgrade {
            head.headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            head.headers.insert(http::header::UPGRADE, protocol.clone());
        }
        state.in_flight += 1;
        let retries_left = state.spec.retries;
        let safe = upgrade.is_none()
            && matches!(
                head.method,
                http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
            );
        let route = &mut self.routes[index];
        route.in_flight += 1;
        route.route.rewrite.apply_request(&mut head.headers);
        Verdict::Forward(Upstream {
            route: route.id,
            pool: pool_id,
            backend,
            addr,
            path_and_query,
            set_cookie,
            cookie_prefix,
            tls: state.spec.tls.clone().map(Box::new),
            upgrade,
            proxy_protocol: state.spec.proxy_protocol,
            via: self
                .forwarding
                .via_entry(http::Version::HTTP_11)
                .map(Box::new),
            client: *client.ip(),
            local,
            retries_left,
            tried: backend.into_iter().collect(),
            safe,
            decided: now,
        })
    }

    /// Counts a request refused before or without [`decide`](Self::decide) (the framing guard,
    /// body and header limits, header timeout).
    pub fn refused(&mut self, status: StatusCode) {
        self.requests += 1;
        self.refused += 1;
        self.responses.count(status);
    }

    /// Counts a request its client cancelled before it was forwarded (while its body was
    /// read); one cancelled after is [`finish`](Self::finish)ed with [`Outcome::Cancelled`].
    pub fn cancelled(&mut self) {
        self.requests += 1;
        self.cancelled += 1;
        self.responses.count(client_closed());
    }

    /// Counts an HTTP/2 connection (after its handshake).
    pub fn h2_connection(&mut self) {
        if let Some(t) = &mut self.tls {
            t.h2 += 1;
        }
    }

    /// Counts an HTTP/2 connection sent away for resetting too many streams.
    pub fn reset_flood(&mut self) {
        if let Some(t) = &mut self.tls {
            t.reset_floods += 1;
        }
    }

    /// Counts a TLS handshake (a listener without TLS counts nothing).
    pub fn handshake(&mut self, outcome: Handshake) {
        if let Some(t) = &mut self.tls {
            let slot = match outcome {
                Handshake::Done => &mut t.handshakes,
                Handshake::Failed => &mut t.failed,
                Handshake::TimedOut => &mut t.timed_out,
            };
            *slot += 1;
        }
    }

    /// Records how a forwarded request ended and releases its backend; says what passive
    /// ejection made of it when this request reached the pool's error limit.
    pub fn finish(
        &mut self,
        now: Instant,
        upstream: &Upstream,
        outcome: Outcome,
    ) -> Option<Ejection> {
        let status = outcome.status();
        if outcome == Outcome::Cancelled {
            self.cancelled += 1;
        }
        self.responses.count(status);
        if let Some(r) = self.routes.iter_mut().find(|r| r.id == upstream.route) {
            r.responses.count(status);
            r.in_flight = r.in_flight.saturating_sub(1);
        }
        let state = self.pools.iter_mut().find(|p| p.id == upstream.pool)?;
        state.in_flight = state.in_flight.saturating_sub(1);
        state.responses.count(status);
        // Response time (to the answer's head), of answers only: a timeout would count the
        // timeout, a refusal or a cancel nothing the backend did.
        if matches!(outcome, Outcome::Answered(_)) {
            let took = now.saturating_duration_since(upstream.decided);
            state.latency.record(now, took);
            self.latency.record(now, took);
        }
        if let Some(id) = upstream.backend {
            state
                .pool
                .closed(now, id, ConnState::Active, upstream.client);
            if let Some(counts) = state.backends.get_mut(id.index()) {
                counts.responses.count(status);
                if !matches!(outcome, Outcome::Answered(_) | Outcome::Cancelled) {
                    counts.failures += 1;
                }
            }
        }
        observe(state, now, upstream.backend?, upstream.addr, outcome)
    }

    /// Sends a failed attempt of `upstream` again, to another backend of its pool, when it
    /// may be: the pool has retries left for it, and either nothing of it was sent
    /// ([`AttemptFailure::Unsent`]) or it is safe (GET, HEAD, OPTIONS, no upgrade), bodiless
    /// and its connection was closed before any byte of an answer
    /// ([`AttemptFailure::ClosedUnanswered`], the race of a pooled keep-alive connection the
    /// backend closed as it was reused). The next backend is the scheduler's pick when it is
    /// not one the request already tried, else the live untried backend with the fewest
    /// requests in flight; with none left, there is no retry.
    ///
    /// Retried: the failed attempt counts as its backend's failure (and for passive
    /// ejection, whose verdict is returned) and as a retry of the pool and of that backend,
    /// but not as an answer; `upstream` names the new backend, and on a sticky pool carries
    /// the cookie naming it. Not retried (`None`): nothing changed; finish the request with
    /// the attempt's outcome.
    pub fn retry(
        &mut self,
        now: Instant,
        upstream: &mut Upstream,
        failure: AttemptFailure,
    ) -> Option<Retried> {
        let replayable = match failure {
            AttemptFailure::Unsent => true,
            AttemptFailure::ClosedUnanswered { bodiless } => upstream.safe && bodiless,
        };
        let failed = upstream.backend?;
        if upstream.retries_left == 0 || !replayable {
            return None;
        }
        let state = self.pools.iter_mut().find(|p| p.id == upstream.pool)?;
        let client = SocketAddrV4::new(upstream.client, 0);
        let scheduled = match state.pool.pick(now, client, upstream.local) {
            Decision::Backend { id, addr } if !upstream.tried.contains(&id) => Some((id, addr)),
            _ => None,
        };
        let (next, addr) = scheduled.or_else(|| {
            state
                .pool
                .backends()
                .filter(|(id, b)| b.is_eligible() && !upstream.tried.contains(id))
                .min_by_key(|(id, b)| (b.active(), id.index()))
                .map(|(id, b)| (id, b.addr()))
        })?;

        state
            .pool
            .closed(now, failed, ConnState::Active, upstream.client);
        let counts = state.counts(failed);
        counts.failures += 1;
        counts.retried += 1;
        state.retries += 1;
        let outcome = match failure {
            AttemptFailure::Unsent => Outcome::Refused,
            AttemptFailure::ClosedUnanswered { .. } => Outcome::Broken,
        };
        let ejection = observe(state, now, failed, upstream.addr, outcome);

        state.pool.opened(now, next, client);
        state.pool.established(now, next, upstream.client);
        state.counts(next).requests += 1;
        upstream.set_cookie = state
            .spec
            .cookie
            .as_ref()
            .filter(|c| c.mode == CookieMode::Insert)
            .and_then(|c| {
                HeaderValue::from_str(&format!("{}={}; Path=/", c.name, StickyCookie::id(addr)))
                    .ok()
                    .map(|v| (v, c.nocache))
            });
        upstream.cookie_prefix = state
            .spec
            .cookie
            .as_ref()
            .and_then(|c| cookie_prefix(c, addr));
        upstream.backend = Some(next);
        upstream.addr = addr;
        upstream.tried.push(next);
        upstream.retries_left -= 1;
        Some(Retried { ejection })
    }

    /// What the health checker must probe: every backend of every checked pool but those
    /// removed or in maintenance, each starting from the verdict it has now.
    #[must_use]
    pub fn check_targets(&self) -> CheckTargets<CheckKey> {
        let mut targets = CheckTargets::default();
        for state in &self.pools[..self.listed_pools] {
            let Some(config) = &state.spec.health else {
                continue;
            };
            for (id, b) in state.pool.backends() {
                if matches!(b.state(), BackendState::Removed | BackendState::Maint) {
                    continue;
                }
                let down = state
                    .backends
                    .get(id.index())
                    .is_some_and(|c| c.health.check_down);
                let addr = b.addr();
                let probe = SocketAddrV4::new(*addr.ip(), config.port.unwrap_or(addr.port()));
                targets.checks.push((
                    CheckKey {
                        pool: state.spec.name.clone(),
                        backend: addr,
                    },
                    probe,
                    config.clone(),
                    if down { Health::Down } else { Health::Up },
                ));
            }
        }
        targets
    }

    /// Applies what the health checker reports: a failed probe is counted, a change of
    /// verdict takes the backend out of rotation or brings it back (unless it is ejected).
    /// Returns whether the backend's rotation changed. Reports about a backend or pool no
    /// longer configured are ignored, as are agent answers (an HTTP pool asks no agent).
    pub fn handle_check(&mut self, event: CheckEvent<CheckKey>) -> bool {
        let (key, change) = match event {
            CheckEvent::Failed { key, why } => (key, Err(why)),
            CheckEvent::Changed(t) => (t.key, Ok((t.health, t.reason))),
            CheckEvent::Agent { .. } => return false,
        };
        let listed = &mut self.pools[..self.listed_pools];
        let Some(state) = listed.iter_mut().find(|p| p.spec.name == key.pool) else {
            return false;
        };
        let Some(id) = state.pool.find(key.backend) else {
            return false;
        };
        match change {
            Err(why) => {
                state.pool.check_failed(id);
                let h = &mut state.counts(id).health;
                h.checks_failed += 1;
                h.last_check_failure = Some(why);
                false
            }
            Ok((health, reason)) => {
                let h = &mut state.counts(id).health;
                h.check_down = health == Health::Down;
                if reason.is_some() {
                    h.last_check_failure = reason;
                }
                state.sync_health(id)
            }
        }
    }

    /// Per configured pool, whether any backend can take a request (up, weight above 0, not
    /// drained): what VRRP `track_services` follows.
    #[must_use]
    pub fn pools_live(&self) -> Vec<(String, bool)> {
        self.pools[..self.listed_pools]
            .iter()
            .map(|p| (p.spec.name.clone(), p.pool.has_eligible()))
            .collect()
    }

    /// When the next ejection ends, if any is running.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pools
            .iter()
            .flat_map(|p| &p.backends)
            .filter_map(|c| c.health.ejected.map(|(until, _, _)| until))
            .min()
    }

    /// Ends the ejections due at `now` (the backends return unless their checks hold them
    /// down) and moves slow starts on; returns the backends whose ejection ended.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<CheckKey> {
        let mut ended = Vec::new();
        for state in &mut self.pools {
            let ids: Vec<(BackendId, SocketAddrV4)> = state
                .pool
                .backends()
                .map(|(id, b)| (id, b.addr()))
                .collect();
            for (id, addr) in ids {
                if state
                    .backends
                    .get_mut(id.index())
                    .is_some_and(|c| c.health.expire(now))
                {
                    state.sync_health(id);
                    ended.push(CheckKey {
                        pool: state.spec.name.clone(),
                        backend: addr,
                    });
                }
            }
            state.pool.handle_timeout(now);
        }
        ended
    }

    /// Applies the response rules of route `id` ([`Upstream::route`]) to a response it
    /// forwarded.
    pub fn rewrite_response(&self, id: usize, headers: &mut http::HeaderMap) {
        if let Some(r) = self.routes.iter().find(|r| r.id == id) {
            r.route.rewrite.apply_response(headers);
        }
    }

    /// The name of route `id` ([`Upstream::route`]; for the access log).
    #[must_use]
    pub fn route_name(&self, id: usize) -> String {
        self.routes
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.route.name.clone())
            .unwrap_or_default()
    }

    /// The counters and backend states; response times as of `now`.
    #[must_use]
    pub fn status(&self, now: Instant) -> GatewayStatus {
        GatewayStatus {
            name: self.name.clone(),
            listen: self.listen.to_string(),
            connections: 0,
            workers: Vec::new(),
            requests: self.requests,
            refused: self.refused,
            no_route: self.no_route,
            cancelled: self.cancelled,
            responses: self.responses,
            routes: self.routes[..self.listed_routes]
                .iter()
                .map(|r| RouteStatus {
                    name: r.route.name.clone(),
                    action: self.describe(&r.route.action),
                    requests: r.requests,
                    canary_requests: r.canary_requests,
                    responses: r.responses,
                })
                .collect(),
            pools: self.pools[..self.listed_pools]
                .iter()
                .map(|p| pool_status(p, now))
                .collect(),
            tls: self.tls,
            latency: self.latency.status(now),
        }
    }

    fn describe(&self, action: &Action) -> String {
        match action {
            Action::Forward {
                pool,
                strip_prefix,
                canary,
            } => {
                let name_of = |id: usize| {
                    self.pools
                        .iter()
                        .find(|p| p.id == id)
                        .map_or("-", |p| p.spec.name.as_str())
                };
                let mut text = format!("pool {}", name_of(*pool));
                if let Some(c) = canary {
                    let by = match c.by {
                        route::CanaryKey::Source => "source",
                        route::CanaryKey::Request => "request",
                    };
                    text.push_str(&format!(
                        ", canary {} {} % by {by}",
                        name_of(c.pool),
                        c.percent
                    ));
                }
                if let Some(p) = strip_prefix {
                    text.push_str(&format!(", strip {p}"));
                }
                text
            }
            Action::Redirect { status, target } => match target {
                RedirectTarget::Location(url) => format!("redirect {} {url}", status.as_u16()),
                RedirectTarget::Prefix(base) => {
                    format!("redirect {} {base}<path>", status.as_u16())
                }
            },
        }
    }

    fn refuse(&mut self, refusal: Refusal) -> Verdict {
        self.refused += 1;
        self.answer(None, refusal.status, None, refusal.reason)
    }

    fn answer(
        &mut self,
        route: Option<usize>,
        status: StatusCode,
        location: Option<HeaderValue>,
        reason: &'static str,
    ) -> Verdict {
        self.responses.count(status);
        if let Some(r) = route {
            self.routes[r].responses.count(status);
        }
        Verdict::Respond(Answer {
            status,
            location,
            reason,
        })
    }
}

/// Counts a failed request of backend `id` (at `addr`) for passive ejection; says what
/// ejection made of it when this request reached the pool's error limit.
fn observe(
    state: &mut PoolState,
    now: Instant,
    id: BackendId,
    addr: SocketAddrV4,
    outcome: Outcome,
) -> Option<Ejection> {
    let eject = state.spec.eject?;
    let live = state
        .pool
        .backend(id)
        .is_some_and(balance::Backend::is_eligible);
    let others_live = state
        .pool
        .backends()
        .any(|(other, b)| other != id && b.is_eligible());
    let (errors, last, spared) =
        state
            .counts(id)
            .health
            .observe(now, outcome, eject, live, others_live)?;
    if !spared {
        state.sync_health(id);
    }
    Some(Ejection {
        key: CheckKey {
            pool: state.spec.name.clone(),
            backend: addr,
        },
        last,
        errors,
        spared,
    })
}

fn pool_status(state: &PoolState, now: Instant) -> PoolStatus {
    PoolStatus {
        name: state.spec.name.clone(),
        scheduler: state.pool.scheduler().as_str().to_owned(),
        requests: state.requests,
        no_backend: state.no_backend,
        retries: state.retries,
        responses: state.responses,
        backends: state
            .pool
            .backends()
            .map(|(id, b)| {
                let counts = state.backends.get(id.index()).cloned().unwrap_or_default();
                let h = &counts.health;
                let (health, reason) = h.describe();
                BackendStatus {
                    addr: b.addr().to_string(),
                    weight: b.weight(),
                    // A backend ejected (and not held down by its checks) is `ejected`, not
                    // `down`: the state label of the metrics tells the two apart.
                    state: if b.state() == BackendState::Down && health == "ejected" {
                        health.to_owned()
                    } else {
                        b.state().to_string()
                    },
                    active: b.active(),
                    requests: counts.requests,
                    responses: counts.responses,
                    failures: counts.failures,
                    retried: counts.retried,
                    health: health.to_owned(),
                    reason,
                    checked: state.spec.health.is_some(),
                    checks_failed: h.checks_failed,
                    last_check_failure: h.last_check_failure.map(|w| w.to_string()),
                    consecutive_errors: h.consecutive_errors,
                    ejections: h.ejections,
                    ejections_spared: h.ejections_spared,
                    effective_weight: b.effective_weight(),
                    slow_start: b.is_ramping(),
                }
            })
            .collect(),
        latency: state.latency.status(now),
    }
}
