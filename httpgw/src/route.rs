//! Routing rules: what a request must look like (host, path, method, headers) and what to do
//! with it (forward to a pool, optionally stripping a path prefix, or redirect), and the
//! header fields a forwarding rule deletes, sets and adds.
//!
//! Rules are tried in order and the first whose every condition holds wins, as HAProxy's
//! `use_backend ... if ...` lines are. Within one condition the alternatives are ORed
//! (`hosts = ["a", "b"]` matches either), across conditions they are ANDed; a rule without
//! conditions matches every request (a default route).

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use crate::error::ConfigError;

/// A Host condition: exact (`www.example.com`) or a suffix wildcard (`*.example.com`, which
/// matches `a.example.com` and `a.b.example.com` but not `example.com` itself, as nginx's
/// `server_name *.example.com`). Compared without the port and case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// This host name exactly.
    Exact(String),
    /// Any host ending in `.` + this suffix (stored without the leading `*.`).
    Suffix(String),
}

impl HostPattern {
    /// Parses `name` or `*.suffix`.
    ///
    /// # Errors
    /// [`ConfigError::BadHostPattern`] for an empty name, a `*` anywhere but a leading `*.`,
    /// or characters a host name cannot hold.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadHostPattern(text.to_owned());
        let (suffix, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err(bad());
        }
        let name = name.to_ascii_lowercase();
        Ok(if suffix {
            Self::Suffix(name)
        } else {
            Self::Exact(name)
        })
    }

    /// Whether `host` (lower-case, without port) matches.
    #[must_use]
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host == name,
            Self::Suffix(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Suffix(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Longest path regex accepted, in bytes of pattern.
pub const MAX_PATH_REGEX_LEN: usize = 1024;
/// Largest compiled program of one path regex, in bytes ([`regex::RegexBuilder::size_limit`];
/// the crate's default is 10 MiB): a counted repetition of a Unicode class (`\w{1000}`) grows
/// the program by multiplication, so a short pattern could otherwise cost megabytes per route.
pub const PATH_REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Most memory the lazy DFA of one path regex caches per matching thread
/// ([`regex::RegexBuilder::dfa_size_limit`]); beyond it the engine falls back to slower,
/// still linear, matching instead of growing.
pub const PATH_REGEX_DFA_LIMIT: usize = 1 << 20;
/// Most path regexes on one route.
pub const MAX_PATH_REGEXES: usize = 32;

/// A compiled path regex, built only by [`PathPattern::regex`] (so within its bounds).
/// Two are equal when their patterns are (a reload compares routes to report changed ones).
#[derive(Debug, Clone)]
pub struct PathRegex(regex::Regex);

impl PathRegex {
    /// The pattern as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for PathRegex {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for PathRegex {}

/// A path condition on the request path (without the query string), case-sensitive. The
/// path is compared as the client sent it: percent-encoding is not decoded (`/caf%C3%A9` is
/// those ten characters, not `/café`), and UTF-8 a client sends unencoded stays as it is (a
/// target that is not UTF-8 is refused before routing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// The path is exactly this (nginx `location = /x`, HAProxy `path /x`).
    Exact(String),
    /// The path starts with this (nginx `location /x`, HAProxy `path_beg /x`): a plain string
    /// prefix, so `/api` also matches `/apix`; write `/api/` to match a directory only.
    Prefix(String),
    /// The path holds a match of this regex (nginx `location ~`, HAProxy `path_reg`):
    /// unanchored unless the pattern anchors itself with `^` or `$`. Matching takes time
    /// linear in the path whatever the pattern (the `regex` crate has no backtracking).
    Regex(PathRegex),
}

impl PathPattern {
    fn validate(text: &str) -> Result<(), ConfigError> {
        if text.starts_with('/') && !text.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            Ok(())
        } else {
            Err(ConfigError::BadPath(text.to_owned()))
        }
    }

    /// An exact path condition.
    ///
    /// # Errors
    /// [`ConfigError::BadPath`] unless `text` starts with `/` and holds no space or control
    /// character.
    pub fn exact(text: &str) -> Result<Self, ConfigError> {
        Self::validate(text)?;
        Ok(Self::Exact(text.to_owned()))
    }

    /// A prefix path condition.
    ///
    /// # Errors
    /// As [`PathPattern::exact`].
    pub fn prefix(text: &str) -> Result<Self, ConfigError> {
        Self::validate(text)?;
        Ok(Self::Prefix(text.to_owned()))
    }

    /// A regex path condition, compiled within [`PATH_REGEX_SIZE_LIMIT`] and
    /// [`PATH_REGEX_DFA_LIMIT`].
    ///
    /// # Errors
    /// [`ConfigError::BadPathRegex`] for a pattern over [`MAX_PATH_REGEX_LEN`] bytes, one that
    /// does not parse, or one whose program would be larger than the limit.
    pub fn regex(text: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::BadPathRegex {
            pattern: text.chars().take(64).collect(),
            why,
        };
        if text.len() > MAX_PATH_REGEX_LEN {
            return Err(bad(format!("longer than {MAX_PATH_REGEX_LEN} bytes")));
        }
        regex::RegexBuilder::new(text)
            .size_limit(PATH_REGEX_SIZE_LIMIT)
            .dfa_size_limit(PATH_REGEX_DFA_LIMIT)
            .build()
            .map(|r| Self::Regex(PathRegex(r)))
            .map_err(|e| bad(regex_error(&e)))
    }

    /// Whether `path` matches.
    #[must_use]
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            Self::Prefix(p) => path.starts_with(p.as_str()),
            Self::Regex(r) => r.0.is_match(path),
        }
    }
}

/// One line for a regex error: the crate's syntax errors span several lines (the pattern, a
/// caret, then `error: what`), which a `FILE:LINE:COL: message` diagnostic cannot hold.
fn regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::CompiledTooBig(limit) => format!(
            "its compiled program would exceed {limit} bytes (counted repetitions of classes multiply it)"
        ),
        other => {
            let text = other.to_string();
            text.lines()
                .rev()
                .find_map(|l| l.strip_prefix("error: "))
                .map_or_else(
                    || text.split_whitespace().collect::<Vec<_>>().join(" "),
                    str::to_owned,
                )
        }
    }
}

/// A header condition: the header is present (any value) or one of its values equals
/// `value` exactly (HAProxy `hdr(name) -m str value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Header name (lower-case, as `http` stores it).
    pub name: HeaderName,
    /// Required value; `None`: present with any value.
    pub value: Option<String>,
}

impl HeaderMatch {
    /// Parses a header name and an optional value.
    ///
    /// # Errors
    /// [`ConfigError::BadHeaderName`] when `name` is not a valid header name.
    pub fn new(name: &str, value: Option<&str>) -> Result<Self, ConfigError> {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::BadHeaderName(name.to_owned()))?;
        Ok(Self {
            name,
            value: value.map(str::to_owned),
        })
    }

    fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        match &self.value {
            None => values.next().is_some(),
            Some(want) => values.any(|v| v.as_bytes() == want.as_bytes()),
        }
    }
}

/// The conditions of one rule; empty lists do not constrain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Match {
    /// Any of these hosts.
    pub hosts: Vec<HostPattern>,
    /// Any of these paths.
    pub paths: Vec<PathPattern>,
    /// Any of these methods.
    pub methods: Vec<Method>,
    /// All of these headers.
    pub headers: Vec<HeaderMatch>,
    /// Any of these TLS server names (SNI); a request without TLS or SNI matches none.
    pub sni: Vec<HostPattern>,
}

/// What the rule matching needs of a request (already checked by [`crate::hygiene`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Host without port, lower-case.
    pub host: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Method.
    pub method: &'a Method,
    /// Header fields.
    pub headers: &'a HeaderMap,
    /// The TLS server name the client sent (lower-case), if it came over TLS with SNI.
    pub sni: Option<&'a str>,
}

impl Match {
    /// Whether every condition holds for `req`.
    #[must_use]
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(req.host)))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(req.path)))
            && (self.methods.is_empty() || self.methods.contains(req.method))
            && self.headers.iter().all(|h| h.matches(req.headers))
            && (self.sni.is_empty()
                || req
                    .sni
                    .is_some_and(|name| self.sni.iter().any(|h| h.matches(name))))
    }
}

/// Where a redirect points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedirectTarget {
    /// This URL as it is (HAProxy `redirect location`).
    Location(String),
    /// This scheme + authority (and optional path) followed by the request's path and query
    /// (HAProxy `redirect prefix`, nginx `return 301 https://host$request_uri`).
    Prefix(String),
}

/// A canary: `percent` of a route's requests go to another pool (a new release) and the rest
/// to the route's own (HAProxy `use_backend v2 if { rand(100) lt 10 }`, nginx
/// `split_clients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canary {
    /// Index into [`GatewayConfig::pools`](crate::GatewayConfig::pools).
    pub pool: usize,
    /// 0 to 100.
    pub percent: u8,
    /// What decides the side a request takes.
    pub by: CanaryKey,
}

/// What decides which side of a canary a request takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryKey {
    /// The client's address: a client stays on one side while the percentage stays (nginx
    /// `split_clients "${remote_addr}"`). Every director computes the same side.
    Source,
    /// Each request on its own, spread evenly: exactly `percent` of every 100 requests.
    Request,
}

impl Canary {
    /// Largest `percent`.
    pub const MAX_PERCENT: u8 = 100;

    /// Whether a request from `client` goes to the canary pool; `seq` numbers the route's
    /// requests from 0 (for [`CanaryKey::Request`]).
    #[must_use]
    pub fn takes(&self, client: std::net::Ipv4Addr, seq: u64) -> bool {
        let percent = u64::from(self.percent.min(Self::MAX_PERCENT));
        match self.by {
            CanaryKey::Source => source_bucket(client) < percent,
            // Request n is the canary's when floor((n + 1) p / 100) steps past floor(n p / 100).
            CanaryKey::Request => {
                let n = seq % 100;
                (n + 1) * percent / 100 > n * percent / 100
            }
        }
    }
}

/// The client's bucket, 0 to 99: a fixed mix of the address's bits (splitmix64's finaliser),
/// so neighbouring addresses land apart and every director agrees.
#[must_use]
pub fn source_bucket(client: std::net::Ipv4Addr) -> u64 {
    let mut x = u64::from(u32::from(client)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    x % 100
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward to the pool at this index of the gateway's pools.
    Forward {
        /// Index into [`GatewayConfig::pools`](crate::GatewayConfig::pools).
        pool: usize,
        /// Remove this prefix from the path first (`/api/users` → `/users`); a path that is
        /// the prefix itself becomes `/`. Only applies when the path starts with it.
        strip_prefix: Option<String>,
        /// A share of the route's requests goes to another pool instead.
        canary: Option<Canary>,
    },
    /// Answer with a redirect; the request goes nowhere.
    Redirect {
        /// 301, 302, 303, 307 or 308.
        status: StatusCode,
        /// Target.
        target: RedirectTarget,
    },
}

impl Action {
    /// A redirect action.
    ///
    /// # Errors
    /// [`ConfigError::BadRedirectStatus`] unless `status` is 301, 302, 303, 307 or 308;
    /// [`ConfigError::BadLocation`] if the target is empty or holds a control character or
    /// space (it becomes a header value).
    pub fn redirect(status: u16, target: RedirectTarget) -> Result<Self, ConfigError> {
        if !matches!(status, 301 | 302 | 303 | 307 | 308) {
            return Err(ConfigError::BadRedirectStatus(status));
        }
        let text = match &target {
            RedirectTarget::Location(t) | RedirectTarget::Prefix(t) => t,
        };
        if text.is_empty() || text.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(ConfigError::BadLocation(text.clone()));
        }
        let status =
            StatusCode::from_u16(status).map_err(|_| ConfigError::BadRedirectStatus(status))?;
        Ok(Self::Redirect { status, target })
    }
}

/// Most entries in each list of [`HeaderRules`].
pub const MAX_HEADER_RULES: usize = 32;
/// Longest value a rule may set, in bytes.
pub const MAX_HEADER_RULE_VALUE: usize = 4096;

/// Header fields a route deletes, sets and adds on the request it forwards and on the
/// response it passes back (HAProxy `http-request del-header` / `set-header` / `add-header`,
/// `http-response ...`). Always in that order, as HAProxy runs the rules written in that
/// order: deletions first, then each set replaces every field of its name, then each add
/// appends a field and keeps the ones already there (so a set and an add of one name leave
/// both values).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderRules {
    /// Set on the request (after `X-Forwarded-*`, so these may override them).
    pub set_request: Vec<(HeaderName, HeaderValue)>,
    /// Deleted from the request.
    pub del_request: Vec<HeaderName>,
    /// Appended to the request, in order.
    pub add_request: Vec<(HeaderName, HeaderValue)>,
    /// Set on the response.
    pub set_response: Vec<(HeaderName, HeaderValue)>,
    /// Deleted from the response.
    pub del_response: Vec<HeaderName>,
    /// Appended to the response, in order.
    pub add_response: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    /// A field name a rule may name: a valid name, and not one the proxy owns (hop-by-hop
    /// fields, `Upgrade`, `Host`, `Content-Length`).
    ///
    /// # Errors
    /// [`ConfigError::BadHeaderName`] or [`ConfigError::ReservedHeader`].
    pub fn name(text: &str) -> Result<HeaderName, ConfigError> {
        let name = HeaderName::from_bytes(text.as_bytes())
            .map_err(|_| ConfigError::BadHeaderName(text.to_owned()))?;
        if crate::hygiene::is_reserved(&name) {
            return Err(ConfigError::ReservedHeader(text.to_owned()));
        }
        Ok(name)
    }

    /// A value a rule may set: at most [`MAX_HEADER_RULE_VALUE`] bytes of visible ASCII,
    /// spaces and tabs.
    ///
    /// # Errors
    /// [`ConfigError::BadHeaderValue`].
    pub fn value(text: &str) -> Result<HeaderValue, ConfigError> {
        let bad = || ConfigError::BadHeaderValue(text.chars().take(64).collect());
        if text.len() > MAX_HEADER_RULE_VALUE
            || !text
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            return Err(bad());
        }
        HeaderValue::from_str(text).map_err(|_| bad())
    }

    /// The length of the longest list.
    #[must_use]
    pub fn longest(&self) -> usize {
        [
            self.set_request.len(),
            self.del_request.len(),
            self.add_request.len(),
            self.set_response.len(),
            self.del_response.len(),
            self.add_response.len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// Whether every list is within [`MAX_HEADER_RULES`].
    #[must_use]
    pub fn within_bounds(&self) -> bool {
        self.longest() <= MAX_HEADER_RULES
    }

    fn apply(
        del: &[HeaderName],
        set: &[(HeaderName, HeaderValue)],
        add: &[(HeaderName, HeaderValue)],
        headers: &mut HeaderMap,
    ) {
        for name in del {
            headers.remove(name);
        }
        for (name, value) in set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in add {
            headers.append(name.clone(), value.clone());
        }
    }

    /// Applies the request rules.
    pub fn apply_request(&self, headers: &mut HeaderMap) {
        Self::apply(
            &self.del_request,
            &self.set_request,
            &self.add_request,
            headers,
        );
    }

    /// Applies the response rules.
    pub fn apply_response(&self, headers: &mut HeaderMap) {
        Self::apply(
            &self.del_response,
            &self.set_response,
            &self.add_response,
            headers,
        );
    }
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Name shown by `show http` and in the access log.
    pub name: String,
    /// Conditions.
    pub when: Match,
    /// Action.
    pub action: Action,
    /// Header fields deleted, set and added on what it forwards (with [`Action::Forward`]).
    pub rewrite: HeaderRules,
}

/// `path` without `prefix`, starting with `/`; `None` when `path` does not start with it.
#[must_use]
pub fn strip_prefix(path: &str, prefix: &str) -> Option<String> {
    let rest = path.strip_prefix(prefix)?;
    Some(if rest.starts_with('/') {
        rest.to_owned()
    } else {
        format!("/{rest}")
    })
}
