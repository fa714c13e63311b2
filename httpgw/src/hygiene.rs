//! Request hygiene on a parsed head: refuse what is ambiguous, find the host, and prepare the
//! header fields an upstream sees (hop-by-hop fields gone, `X-Forwarded-*` set).
//!
//! The raw byte stream is checked first by [`crate::framing::HeadGuard`] (which sees what an
//! HTTP library normalises away); these checks repeat the framing ones on the parsed head so
//! that the core stays safe when fed by anything else, and add what needs the parsed form.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, StatusCode, Version, request};
use ipnet::IpNet;

/// Why a request is answered by the gateway itself with an error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Status of the answer (400, 405, 431, ...).
    pub status: StatusCode,
    /// Short reason for the access log and counters.
    pub reason: &'static str,
}

impl Refusal {
    pub(crate) const fn bad(reason: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }
}

/// What routing needs from a request that passed [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Host name without port, lower-case; empty for an HTTP/1.0 request without `Host`.
    pub host: String,
    /// The authority as the client sent it (for `X-Forwarded-Host`), if any.
    pub authority: Option<HeaderValue>,
    /// Path without the query (`*` for `OPTIONS *`).
    pub path: String,
}

/// The hop-by-hop fields of RFC 9110 §7.6.1 plus the non-standard ones proxies strip too.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether a field is the proxy's to manage, not a header rule's: the hop-by-hop fields,
/// `Upgrade`, `Host`, `Content-Length`.
#[must_use]
pub fn is_reserved(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
        || *name == header::UPGRADE
        || *name == header::HOST
        || *name == header::CONTENT_LENGTH
}

/// Checks a request head: framing (`Content-Length` with `Transfer-Encoding`, differing or
/// invalid `Content-Length` values), `Host` (required by HTTP/1.1, exactly one, a valid
/// authority without user info, the same as an absolute-form target's), the method (no
/// `CONNECT`) and the target form.
///
/// # Errors
/// A [`Refusal`] with 400 (405 for `CONNECT`).
pub fn check(head: &request::Parts) -> Result<Checked, Refusal> {
    let headers = &head.headers;
    if head.method == Method::CONNECT {
        return Err(Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "CONNECT is not proxied",
        });
    }
    if headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH)
    {
        return Err(Refusal::bad("both Content-Length and Transfer-Encoding"));
    }
    content_length(headers)?;

    let mut hosts = headers.get_all(header::HOST).iter();
    let host_field = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::bad("more than one Host"));
    }
    let from_field = host_field.map(parse_authority).transpose()?;
    let from_target = head.uri.authority().cloned();
    // The field itself when the authority is the Host field's (the same bytes: an
    // `Authority` keeps them as given), rather than a copy of it.
    let (authority, field) = match (from_field, from_target) {
        (Some(field), Some(target)) if field != target => {
            return Err(Refusal::bad("Host differs from the target's authority"));
        }
        (Some(a), _) => (Some(a), host_field),
        (None, Some(a)) => (Some(a), None),
        (None, None) if head.version == Version::HTTP_10 => (None, None),
        (None, None) => return Err(Refusal::bad("no Host")),
    };
    if authority.as_ref().is_some_and(|a| a.as_str().contains('@')) {
        return Err(Refusal::bad("user info in the authority"));
    }

    let path = head.uri.path();
    let path = if path == "*" {
        if head.method != Method::OPTIONS {
            return Err(Refusal::bad("asterisk target without OPTIONS"));
        }
        "*"
    } else if path.starts_with('/') {
        path
    } else {
        return Err(Refusal::bad("target is not a path"));
    };
    Ok(Checked {
        host: authority
            .as_ref()
            .map(|a| a.host().to_ascii_lowercase())
            .unwrap_or_default(),
        authority: match field {
            Some(f) => Some(f.clone()),
            None => authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        },
        path: path.to_owned(),
    })
}

/// The bounds an HTTP/1.1 head meets at the framing guard, checked on an HTTP/2 head (which
/// never passes the guard): at most [`MAX_HEADERS`](crate::framing::MAX_HEADERS) fields, and
/// at most `max_bytes` as the head would be written in HTTP/1.1 (request line, one line per
/// field, the blank line).
///
/// # Errors
/// A 431 [`Refusal`].
pub fn check_h2_head(head: &request::Parts, max_bytes: usize) -> Result<(), Refusal> {
    if head.headers.len() > crate::framing::MAX_HEADERS {
        return Err(Refusal {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            reason: "too many header fields",
        });
    }
    let target = head.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = head.method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let host = match (
        head.headers.contains_key(header::HOST),
        head.uri.authority(),
    ) {
        (false, Some(a)) => "Host: \r\n".len() + a.as_str().len(),
        _ => 0,
    };
    let fields: usize = head
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if line + host + fields + 2 > max_bytes {
        return Err(Refusal {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            reason: "request header too large",
        });
    }
    Ok(())
}

/// Joins the `Cookie` fields of a request into one, `; `-separated: HTTP/2 lets a client send
/// each cookie as its own field (RFC 9113 §8.2.3), HTTP/1.1 servers expect one.
pub fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

fn parse_authority(field: &HeaderValue) -> Result<Authority, Refusal> {
    let a = Authority::try_from(field.as_bytes()).map_err(|_| Refusal::bad("bad Host"))?;
    if a.host().is_empty() || a.as_str().contains('@') {
        return Err(Refusal::bad("bad Host"));
    }
    if a.as_str().ends_with(':') {
        return Err(Refusal::bad("bad Host"));
    }
    Ok(a)
}

/// The body length the head declares, if any, after refusing invalid or differing values
/// (each field may be a comma list; every element must be the same decimal number).
///
/// # Errors
/// A 400 [`Refusal`].
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Refusal> {
    let mut length = None;
    for field in headers.get_all(header::CONTENT_LENGTH) {
        let text = field
            .to_str()
            .map_err(|_| Refusal::bad("bad Content-Length"))?;
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() || item.len() > 19 || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Refusal::bad("bad Content-Length"));
            }
            let n: u64 = item
                .parse()
                .map_err(|_| Refusal::bad("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Refusal::bad("differing Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// How the `X-Forwarded-*` fields are written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarding {
    /// Clients whose own `X-Forwarded-*` fields are believed: their `X-Forwarded-For` is
    /// appended to and their `-Proto`/`-Host` kept. Everyone else's are replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// The pseudonym this gateway adds to `Via` (RFC 9110 7.6.3) on each request it forwards
    /// and each answer it passes back, after the protocol version it received the message
    /// with (`Via: 1.1 gw1`); `None`: no `Via` (HAProxy's and nginx's default).
    pub via: Option<String>,
}

impl Forwarding {
    fn trusts(&self, client: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&client))
    }

    /// The `Via` entry for a message received with `version`, if `via` is set.
    #[must_use]
    pub fn via_entry(&self, version: Version) -> Option<HeaderValue> {
        let name = self.via.as_deref()?;
        let received = match version {
            Version::HTTP_09 => "0.9",
            Version::HTTP_10 => "1.0",
            Version::HTTP_2 => "2",
            Version::HTTP_3 => "3",
            _ => "1.1",
        };
        HeaderValue::from_str(&format!("{received} {name}")).ok()
    }
}

/// Whether `name` may be a `Via` pseudonym: an RFC 9110 token of at most 64 bytes (a
/// `received-by` that is not a host and port, so it reveals nothing of the network).
#[must_use]
pub fn valid_via_pseudonym(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether a head asks to switch protocols and has no body: the framing guard then holds back
/// what follows it (see [`crate::framing::is_upgrade`]), so the answer must be the switch or
/// close the connection.
#[must_use]
pub fn upgrade_requested(headers: &HeaderMap) -> bool {
    // The rule needs an `Upgrade` field: one lookup settles the other requests.
    if !headers.contains_key(header::UPGRADE) {
        return false;
    }
    let bodiless = !headers.contains_key(header::TRANSFER_ENCODING)
        && matches!(content_length(headers), Ok(None | Some(0)));
    bodiless && crate::framing::is_upgrade(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())))
}

/// The protocol a request may be tunnelled to (its `Upgrade` field as sent), if it asks for
/// one, has no body, and does not ask for `h2c` (cleartext HTTP/2 through a proxy lets a
/// client talk to the backend past the routing rules: h2c smuggling).
#[must_use]
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    if !upgrade_requested(headers) {
        return None;
    }
    let value = headers.get(header::UPGRADE)?;
    let h2c = value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"));
    (!h2c).then(|| value.clone())
}

/// Removes the hop-by-hop fields, those the `Connection` field names (except `Host` and the
/// framing fields, which are not the sender's to drop), and `Upgrade` (a switch of protocols
/// is put back by the gateway where it passes one on). For a response on its way back to the
/// client too.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names they have, rather than a
    // lookup (and removal) of each name there is to remove.
    if !headers
        .keys()
        .any(|n| HOP_BY_HOP.contains(n) || *n == header::UPGRADE)
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| *n != header::HOST && *n != header::CONTENT_LENGTH)
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Rewrites `headers` for the upstream: removes the hop-by-hop fields (and those the
/// `Connection` field names, except `Host`), `Upgrade` (the gateway puts a switch back) and
/// `Content-Length` (the driver frames the body it forwards), then sets `X-Forwarded-For`,
/// `-Proto` (`proto`: `http` or `https`) and `-Host`, and `Host` from the authority where the
/// request has none (HTTP/2 carries it as `:authority`).
pub fn prepare_upstream(
    headers: &mut HeaderMap,
    client: IpAddr,
    authority: Option<&HeaderValue>,
    proto: &'static str,
    forwarding: &Forwarding,
    version: Version,
) {
    remove_hop_by_hop(headers);
    if let Some(via) = forwarding.via_entry(version) {
        headers.append(header::VIA, via);
    }
    headers.remove(header::CONTENT_LENGTH);
    if let Some(a) = authority
        && !headers.contains_key(header::HOST)
    {
        headers.insert(header::HOST, a.clone());
    }

    let trusted = forwarding.trusts(client);
    // Written on the stack: the value is the one copy made.
    const LONGEST: usize = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".len();
    let mut text = [0u8; LONGEST];
    let len = {
        let mut rest = &mut text[..];
        // The longest address fits.
        let _fits = std::io::Write::write_fmt(&mut rest, format_args!("{client}"));
        LONGEST - rest.len()
    };
    let client_text = std::str::from_utf8(&text[..len]).unwrap_or("unknown");
    let xff = if trusted && headers.contains_key(&X_FORWARDED_FOR) {
        let mut chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        chain.push(client_text);
        HeaderValue::from_str(&chain.join(", ")).ok()
    } else {
        None
    };
    // An address's text is always a valid value.
    let xff = xff.unwrap_or_else(|| {
        HeaderValue::from_str(client_text).unwrap_or(HeaderValue::from_static("unknown"))
    });
    headers.insert(X_FORWARDED_FOR, xff);
    if !trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !trusted || !headers.contains_key(&X_FORWARDED_HOST) {
        match authority {
            Some(a) => {
                headers.insert(X_FORWARDED_HOST, a.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}
