//! Who may forward what: sshd-style `PermitOpen` / `PermitListen` lists and authorized_keys
//! lines with their options (`restrict`, `no-port-forwarding`, `port-forwarding`,
//! `permitopen=`, `permitlisten=`, `from=`, `expiry-time=`, `cert-authority`). Pure: no DNS,
//! no files, no sockets, no clock (the time is passed in).
//!
//! `from=` is matched against the client's address only (wildcards and CIDR), never a reverse
//! DNS name, as OpenSSH does with `UseDNS no` (its default). An IPv4-mapped IPv6 peer
//! (`::ffff:a.b.c.d`, what a dual-stack listener reports) is matched as `a.b.c.d` by every
//! pattern kind, so a `!a.b.c.d` negation cannot be sidestepped.
//!
//! Invariants: a key past its `expiry-time` never authorizes ([`AuthorizedKey::usable_at`]);
//! a `cert-authority` line never authorizes a plain key, only user certificates it signed
//! (see [`crate::cert::check_user`], with the line's `principals=`); a peer matching a `!`
//! pattern of `from=` is refused.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::pattern::{ListMatch, match_list};
use crate::startups::canonical_ip;

/// One `host:port` permission; `None` is the `*` wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host (lower-cased), or `None` for any host.
    pub host: Option<String>,
    /// Port, or `None` for any port.
    pub port: Option<u16>,
}

/// A permit list as in sshd_config: `any`, `none`, or a list of `host:port` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PermitList {
    /// Everything is allowed (OpenSSH's default).
    Any,
    /// Nothing is allowed.
    None,
    /// Only these entries.
    Only(Vec<HostPort>),
}

/// Why a permission entry or authorized_keys line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A permit entry that is not `host:port`, `port`, `any` or `none`.
    #[error(
        "bad permit entry '{0}': expected host:port, [ipv6]:port, port, any or none ('*' is a wildcard)"
    )]
    BadEntry(String),
    /// `any`/`none` mixed with other entries.
    #[error("'any' and 'none' must be the only entry of a permit list")]
    MixedAnyNone,
    /// An authorized_keys line without a key.
    #[error("no key found")]
    NoKey,
    /// An authorized_keys option this server does not know (OpenSSH skips such lines too).
    #[error("unknown or malformed option '{0}'")]
    BadOption(String),
    /// The key blob is not base64.
    #[error("key is not valid base64")]
    BadBase64,
}

fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        Some((h, p))
    } else {
        s.rsplit_once(':')
    }
}

impl HostPort {
    /// Parses `host:port`, `[v6]:port`, `*:port`, `host:*`; with `port_only_ok`, a bare port
    /// (PermitListen's `[host:]port` form) means any host.
    ///
    /// # Errors
    /// [`PolicyError::BadEntry`] on anything else.
    pub fn parse(s: &str, port_only_ok: bool) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadEntry(s.to_string());
        let s = s.trim();
        let (host, port) = match split_host_port(s) {
            Some((h, p)) => (Some(h), p),
            None if port_only_ok => (None, s),
            None => return Err(bad()),
        };
        let port = match port {
            "*" => None,
            p if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                Some(p.parse::<u16>().map_err(|_| bad())?)
            }
            _ => return Err(bad()),
        };
        let host = match host {
            None | Some("*") => None,
            Some(h) if h.is_empty() || h.contains(char::is_whitespace) => return Err(bad()),
            Some(h) => Some(h.to_ascii_lowercase()),
        };
        Ok(HostPort { host, port })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        self.host
            .as_deref()
            .is_none_or(|h| h.eq_ignore_ascii_case(host))
            && self.port.is_none_or(|p| p == port)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(h) if h.contains(':') => write!(f, "[{h}]:")?,
            Some(h) => write!(f, "{h}:")?,
            None => f.write_str("*:")?,
        }
        match self.port {
            Some(p) => write!(f, "{p}"),
            None => f.write_str("*"),
        }
    }
}

impl PermitList {
    /// Parses a list of entries; `port_only_ok` allows PermitListen's bare `port`.
    ///
    /// # Errors
    /// The first bad entry.
    pub fn parse<S: AsRef<str>>(entries: &[S], port_only_ok: bool) -> Result<Self, PolicyError> {
        let lower: Vec<String> = entries
            .iter()
            .map(|e| e.as_ref().trim().to_ascii_lowercase())
            .collect();
        if lower.iter().any(|e| e == "any" || e == "none") {
            return match lower.as_slice() {
                [one] if one == "any" => Ok(PermitList::Any),
                [one] if one == "none" => Ok(PermitList::None),
                _ => Err(PolicyError::MixedAnyNone),
            };
        }
        if lower.is_empty() {
            return Ok(PermitList::Any);
        }
        let list = entries
            .iter()
            .map(|e| HostPort::parse(e.as_ref(), port_only_ok))
            .collect::<Result<_, _>>()?;
        Ok(PermitList::Only(list))
    }

    /// Whether an entry names `port` itself (not `*`, not `any`) and matches `host`: what a
    /// privileged (below 1024) `-R` port needs.
    #[must_use]
    pub fn names_port(&self, host: &str, port: u16) -> bool {
        match self {
            PermitList::Only(list) => list
                .iter()
                .any(|e| e.port == Some(port) && e.matches(host, port)),
            PermitList::Any | PermitList::None => false,
        }
    }

    /// Whether a connection to `addr`, which the client's `host` resolved to, is allowed.
    /// The name itself must already be allowed ([`PermitList::allows`]). With `any`, every
    /// address is. Otherwise a loopback, unspecified, link-local (cloud metadata), multicast
    /// or broadcast address is allowed only if an entry names that address itself, so a
    /// permitted name whose DNS is controlled by someone else cannot reach this host's own
    /// services.
    #[must_use]
    pub fn allows_resolved(&self, addr: IpAddr, port: u16) -> bool {
        match self {
            PermitList::Any => true,
            PermitList::None => false,
            PermitList::Only(list) => {
                !is_special(addr)
                    || list.iter().any(|e| {
                        e.port.is_none_or(|p| p == port)
                            && e.host
                                .as_deref()
                                .and_then(|h| h.parse::<IpAddr>().ok())
                                .is_some_and(|h| canonical_ip(h) == canonical_ip(addr))
                    })
            }
        }
    }

    /// Whether `host:port` is allowed.
    #[must_use]
    pub fn allows(&self, host: &str, port: u16) -> bool {
        match self {
            PermitList::Any => true,
            PermitList::None => false,
            PermitList::Only(list) => list.iter().any(|e| e.matches(host, port)),
        }
    }
}

/// Addresses that reach this host itself or its link rather than a remote service.
#[must_use]
pub fn is_special(addr: IpAddr) -> bool {
    match canonical_ip(addr) {
        IpAddr::V4(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
        }
        IpAddr::V6(a) => {
            a.is_loopback() || a.is_unspecified() || a.is_multicast() || a.is_unicast_link_local()
        }
    }
}

/// A civil date-time as the number `YYYYMMDDHHMMSS`, so that comparing numbers compares times.
pub type CivilTime = u64;

/// The current time as `expiry-time=` needs it: local wall-clock time and UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Local time, `YYYYMMDDHHMMSS`.
    pub local: CivilTime,
    /// UTC, `YYYYMMDDHHMMSS`.
    pub utc: CivilTime,
}

/// An `expiry-time=` value: the last moment the key may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// `YYYYMMDDHHMMSS`.
    pub at: CivilTime,
    /// The value ended in `Z`: UTC; otherwise local time (OpenSSH's reading).
    pub utc: bool,
}

impl Expiry {
    /// Parses OpenSSH's `YYYYMMDD[Z]` or `YYYYMMDDHHMM[SS][Z]`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Expiry> {
        let (digits, utc) = match s.strip_suffix(['Z', 'z']) {
            Some(d) => (d, true),
            None => (s, false),
        };
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let padded = match digits.len() {
            8 => format!("{digits}000000"),
            12 => format!("{digits}00"),
            14 => digits.to_string(),
            _ => return None,
        };
        let field = |r: std::ops::Range<usize>| padded.get(r).and_then(|t| t.parse::<u64>().ok());
        let (month, day, hour, min, sec) = (
            field(4..6)?,
            field(6..8)?,
            field(8..10)?,
            field(10..12)?,
            field(12..14)?,
        );
        if !(1..=12).contains(&month)
            || !(1..=31).contains(&day)
            || hour > 23
            || min > 59
            || sec > 60
        {
            return None;
        }
        Some(Expiry {
            at: padded.parse().ok()?,
            utc,
        })
    }

    /// Whether the key has expired at `now`.
    #[must_use]
    pub fn expired(&self, now: Now) -> bool {
        let now = if self.utc { now.utc } else { now.local };
        now > self.at
    }
}

/// Everything a key line grants beyond "this key may log in".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOptions {
    /// Port forwarding allowed (`no-port-forwarding` / `restrict` clear it,
    /// `port-forwarding` after `restrict` sets it again).
    pub port_forwarding: bool,
    /// `permitopen="host:port"` entries; empty means no per-key restriction.
    pub permit_open: Vec<HostPort>,
    /// `permitlisten="[host:]port"` entries; empty means no per-key restriction.
    pub permit_listen: Vec<HostPort>,
    /// `from="pattern-list"`: client addresses allowed to use this key.
    pub from: Option<Vec<String>>,
    /// `expiry-time="..."`: the key is refused after this time.
    pub expiry: Option<Expiry>,
    /// `cert-authority`: the key signs user certificates; it is never a login key itself.
    pub cert_authority: bool,
    /// `principals="a,b"` (with `cert-authority`): a certificate must carry one of these
    /// principals; without it the user name must be one of the certificate's.
    pub principals: Option<Vec<String>>,
}

impl Default for KeyOptions {
    fn default() -> Self {
        KeyOptions {
            port_forwarding: true,
            permit_open: Vec::new(),
            permit_listen: Vec::new(),
            from: None,
            expiry: None,
            cert_authority: false,
            principals: None,
        }
    }
}

impl KeyOptions {
    /// Whether a direct-tcpip to `host:port` is allowed by this key's options.
    #[must_use]
    pub fn allows_open(&self, host: &str, port: u16) -> bool {
        self.port_forwarding
            && (self.permit_open.is_empty()
                || self.permit_open.iter().any(|e| e.matches(host, port)))
    }

    /// Whether a tcpip-forward on `host:port` is allowed by this key's options.
    #[must_use]
    pub fn allows_listen(&self, host: &str, port: u16) -> bool {
        self.port_forwarding
            && (self.permit_listen.is_empty()
                || self.permit_listen.iter().any(|e| e.matches(host, port)))
    }

    /// Whether a client connecting from `addr` may use this key.
    #[must_use]
    pub fn allows_from(&self, addr: IpAddr) -> bool {
        let Some(patterns) = &self.from else {
            return true;
        };
        let addr = canonical_ip(addr);
        let text = addr.to_string();
        let mut matched = false;
        for pat in patterns {
            let (neg, pat) = match pat.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, pat.as_str()),
            };
            let hit = if pat.contains('/') {
                cidr_contains(pat, addr)
            } else {
                match_list([pat], &text) == ListMatch::Match
            };
            if hit && neg {
                return false;
            }
            matched |= hit;
        }
        matched
    }
}

fn cidr_contains(cidr: &str, addr: IpAddr) -> bool {
    let Some((net, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(len)) = (IpAddr::from_str(net), len.parse::<u32>()) else {
        return false;
    };
    // Compare IPv4-mapped clients (and mapped networks of /96 or longer) as plain IPv4.
    let (net, len) = match net {
        IpAddr::V6(v6) if len >= 96 => v6
            .to_ipv4_mapped()
            .map_or((net, len), |v4| (IpAddr::V4(v4), len - 96)),
        other => (other, len),
    };
    match (net, canonical_ip(addr)) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// One usable line of an authorized_keys file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    /// Key type name, e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// The decoded key blob (compare with the offered key's wire encoding).
    pub blob: Vec<u8>,
    /// Trailing comment, if any.
    pub comment: String,
    /// Options in front of the key.
    pub options: KeyOptions,
    /// 1-based line number, for log messages.
    pub line: usize,
}

fn is_key_type(s: &str) -> bool {
    s.starts_with("ssh-") || s.starts_with("ecdsa-sha2-") || s.starts_with("sk-")
}

/// Splits the options field: commas separate options, except inside double quotes.
fn split_options(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            '\\' if quoted => {
                cur.push(c);
                cur.push(chars.next()?);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        return None;
    }
    out.push(cur);
    Some(out)
}

/// Splits a line into the options field (if any) and the rest, honouring quotes.
fn split_first_field(line: &str) -> (&str, &str) {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return (&line[..i], line[i..].trim_start()),
            _ => {}
        }
    }
    (line, "")
}

fn unquote(v: &str) -> Option<String> {
    let inner = v.strip_prefix('"')?.strip_suffix('"')?;
    Some(inner.replace("\\\"", "\""))
}

fn parse_options(field: &str) -> Result<KeyOptions, PolicyError> {
    let mut opts = KeyOptions::default();
    let bad = |o: &str| PolicyError::BadOption(o.to_string());
    for opt in split_options(field).ok_or_else(|| bad(field))? {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n.to_ascii_lowercase(), Some(v)),
            None => (opt.to_ascii_lowercase(), None),
        };
        match (name.as_str(), value) {
            ("restrict" | "no-port-forwarding", None) => opts.port_forwarding = false,
            ("port-forwarding", None) => opts.port_forwarding = true,
            // These restrict things this server never offers (shells, agents, X11, pty).
            (
                "no-pty"
                | "no-agent-forwarding"
                | "no-x11-forwarding"
                | "no-user-rc"
                | "pty"
                | "agent-forwarding"
                | "x11-forwarding"
                | "user-rc",
                None,
            ) => {}
            ("cert-authority", None) => opts.cert_authority = true,
            ("expiry-time", Some(v)) => {
                let v = unquote(v).ok_or_else(|| bad(&opt))?;
                let e = Expiry::parse(&v).ok_or_else(|| bad(&opt))?;
                // OpenSSH keeps the earliest of several.
                opts.expiry = Some(
                    opts.expiry
                        .map_or(e, |old| if old.at <= e.at { old } else { e }),
                );
            }
            ("command" | "environment", Some(v)) => {
                unquote(v).ok_or_else(|| bad(&opt))?;
            }
            ("principals", Some(v)) => {
                let v = unquote(v).ok_or_else(|| bad(&opt))?;
                let list: Vec<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect();
                if list.is_empty() || list.len() > crate::cert::MAX_PRINCIPALS {
                    return Err(bad(&opt));
                }
                opts.principals.get_or_insert_with(Vec::new).extend(list);
            }
            ("permitopen", Some(v)) => {
                let v = unquote(v).ok_or_else(|| bad(&opt))?;
                opts.permit_open
                    .push(HostPort::parse(&v, false).map_err(|_| bad(&opt))?);
            }
            ("permitlisten", Some(v)) => {
                let v = unquote(v).ok_or_else(|| bad(&opt))?;
                opts.permit_listen
                    .push(HostPort::parse(&v, true).map_err(|_| bad(&opt))?);
            }
            ("from", Some(v)) => {
                let v = unquote(v).ok_or_else(|| bad(&opt))?;
                opts.from
                    .get_or_insert_with(Vec::new)
                    .extend(v.split(',').map(|p| p.trim().to_string()));
            }
            _ => return Err(bad(&opt)),
        }
    }
    Ok(opts)
}

/// Why a parsed key line does not authorize a login right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// `cert-authority`: only certificates signed by it log in, never the key itself.
    CertAuthority,
    /// Not a `cert-authority` line: it cannot vouch for a certificate.
    NotCertAuthority,
    /// Past its `expiry-time`.
    Expired,
    /// The peer's address is not allowed by `from=`.
    From,
}

impl AuthorizedKey {
    /// Whether this line lets a client at `peer` log in with the plain key at `now`.
    ///
    /// # Errors
    /// Why not.
    pub fn usable_at(&self, peer: IpAddr, now: Now) -> Result<(), Unusable> {
        if self.options.cert_authority {
            return Err(Unusable::CertAuthority);
        }
        self.restrictions_allow(peer, now)
    }

    /// Whether this `cert-authority` line lets a client at `peer` log in at `now` with a
    /// certificate it signed (its `from=` and `expiry-time=` apply to the certificate's use).
    ///
    /// # Errors
    /// Why not.
    pub fn usable_as_ca_at(&self, peer: IpAddr, now: Now) -> Result<(), Unusable> {
        if !self.options.cert_authority {
            return Err(Unusable::NotCertAuthority);
        }
        self.restrictions_allow(peer, now)
    }

    fn restrictions_allow(&self, peer: IpAddr, now: Now) -> Result<(), Unusable> {
        if self.options.expiry.is_some_and(|e| e.expired(now)) {
            return Err(Unusable::Expired);
        }
        if !self.options.allows_from(peer) {
            return Err(Unusable::From);
        }
        Ok(())
    }
}

/// Parses one authorized_keys line; `Ok(None)` for blank lines and comments.
///
/// # Errors
/// A [`PolicyError`]; OpenSSH skips such lines, and so should the caller (after logging).
pub fn parse_authorized_key(
    line: &str,
    line_no: usize,
) -> Result<Option<AuthorizedKey>, PolicyError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let (first, rest) = split_first_field(line);
    let (options, key_part) = if is_key_type(first) {
        (KeyOptions::default(), line)
    } else {
        (parse_options(first)?, rest)
    };
    let mut fields = key_part.split_whitespace();
    let algorithm = fields
        .next()
        .filter(|a| is_key_type(a))
        .ok_or(PolicyError::NoKey)?;
    let b64 = fields.next().ok_or(PolicyError::NoKey)?;
    let blob = data_encoding::BASE64
        .decode(b64.as_bytes())
        .map_err(|_| PolicyError::BadBase64)?;
    let comment = fields.collect::<Vec<_>>().join(" ");
    Ok(Some(AuthorizedKey {
        algorithm: algorithm.to_string(),
        blob,
        comment,
        options,
        line: line_no,
    }))
}

/// Parses a whole authorized_keys file: the usable keys, and the refused lines with reasons.
#[must_use]
pub fn parse_authorized_keys(text: &str) -> (Vec<AuthorizedKey>, Vec<(usize, PolicyError)>) {
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse_authorized_key(line, i + 1) {
            Ok(Some(k)) => keys.push(k),
            Ok(None) => {}
            Err(e) => errors.push((i + 1, e)),
        }
    }
    (keys, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";

    #[test]
    fn permit_lists() {
        let l = PermitList::parse(&["web:80", "*:8080", "[::1]:22", "db:*"], false).unwrap();
        assert!(l.allows("WEB", 80));
        assert!(!l.allows("web", 81));
        assert!(l.allows("anything", 8080));
        assert!(l.allows("::1", 22));
        assert!(l.allows("db", 5432));
        assert_eq!(PermitList::parse(&["any"], false).unwrap(), PermitList::Any);
        assert!(!PermitList::parse(&["none"], false).unwrap().allows("a", 1));
        assert_eq!(
            PermitList::parse(&["any", "a:1"], false),
            Err(PolicyError::MixedAnyNone)
        );
        assert!(PermitList::parse(&["8080"], false).is_err());
        let listen = PermitList::parse(&["8080", "localhost:9000"], true).unwrap();
        assert!(listen.allows("0.0.0.0", 8080));
        assert!(!listen.allows("0.0.0.0", 9000));
        assert!(PermitList::parse(&["x:99999"], false).is_err());
    }

    #[test]
    fn authorized_keys_options() {
        let text = format!(
            "# comment\n\n{KEY} plain@host\n\
             restrict,port-forwarding,permitopen=\"web:80\",permitlisten=\"9000\",from=\"10.0.0.0/8,!10.9.9.9\" {KEY} r\n\
             no-port-forwarding {KEY}\n\
             bogus-option {KEY}\n\
             command=\"echo hi, there\",no-pty {KEY} c\n"
        );
        let (keys, errors) = parse_authorized_keys(&text);
        assert_eq!(keys.len(), 4);
        assert_eq!(
            errors,
            vec![(6, PolicyError::BadOption("bogus-option".into()))]
        );
        assert_eq!(keys[0].comment, "plain@host");
        assert_eq!(keys[0].blob.len(), 51);
        let r = &keys[1].options;
        assert!(r.allows_open("web", 80) && !r.allows_open("web", 22));
        assert!(r.allows_listen("localhost", 9000) && !r.allows_listen("localhost", 9001));
        assert!(r.allows_from("10.1.2.3".parse().unwrap()));
        assert!(!r.allows_from("10.9.9.9".parse().unwrap()));
        assert!(!r.allows_from("192.168.0.1".parse().unwrap()));
        assert!(r.allows_from("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!keys[2].options.allows_open("web", 80));
        assert_eq!(keys[3].line, 7);
    }

    #[test]
    fn from_wildcards() {
        let o = KeyOptions {
            from: Some(vec!["127.0.0.*".into(), "::1".into()]),
            ..KeyOptions::default()
        };
        assert!(o.allows_from("127.0.0.1".parse().unwrap()));
        assert!(o.allows_from("::1".parse().unwrap()));
        assert!(!o.allows_from("10.0.0.1".parse().unwrap()));
    }

    const NOW: Now = Now {
        local: 20_260_615_120_000,
        utc: 20_260_615_100_000,
    };

    fn key(opts: &str) -> AuthorizedKey {
        parse_authorized_key(&format!("{opts} {KEY}"), 1)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn expiry_time_is_enforced() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            key("expiry-time=\"20200101\"").usable_at(peer, NOW),
            Err(Unusable::Expired)
        );
        assert!(key("expiry-time=\"20300101\"").usable_at(peer, NOW).is_ok());
        // local 12:00, UTC 10:00
        assert!(
            key("expiry-time=\"202606151100\"")
                .usable_at(peer, NOW)
                .is_err()
        );
        assert!(
            key("expiry-time=\"202606151100Z\"")
                .usable_at(peer, NOW)
                .is_ok()
        );
        assert!(
            key("expiry-time=\"20260615095959Z\"")
                .usable_at(peer, NOW)
                .is_err()
        );
        // the earliest of two wins
        assert!(
            key("expiry-time=\"20300101\",expiry-time=\"20200101\"")
                .usable_at(peer, NOW)
                .is_err()
        );
        for bad in ["2020", "20201301", "2020010125", "202001011200x", "\"\""] {
            assert!(
                parse_authorized_key(&format!("expiry-time={bad} {KEY}"), 1).is_err()
                    || bad.starts_with('2') && !bad.contains('"'),
                "{bad}"
            );
            assert!(parse_authorized_key(&format!("expiry-time=\"{bad}\" {KEY}"), 1).is_err());
        }
    }

    #[test]
    fn cert_authority_is_not_a_login_key() {
        let k = key("cert-authority");
        assert_eq!(
            k.usable_at("10.0.0.1".parse().unwrap(), NOW),
            Err(Unusable::CertAuthority)
        );
        let peer = "10.0.0.1".parse().unwrap();
        assert!(k.usable_as_ca_at(peer, NOW).is_ok());
        assert_eq!(
            key("").usable_as_ca_at(peer, NOW),
            Err(Unusable::NotCertAuthority)
        );
        let k = key("cert-authority,principals=\"ops, admins\",from=\"192.168.0.0/16\"");
        assert_eq!(
            k.options.principals,
            Some(vec!["ops".to_string(), "admins".to_string()])
        );
        assert_eq!(k.usable_as_ca_at(peer, NOW), Err(Unusable::From));
        assert!(parse_authorized_key(&format!("principals=\"\" {KEY}"), 1).is_err());
        assert!(parse_authorized_key(&format!("principals=ops {KEY}"), 1).is_err());
    }

    #[test]
    fn from_matches_mapped_peers_as_ipv4() {
        let k = key("from=\"10.0.0.0/8,!10.0.0.5\"");
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(k.usable_at(mapped, NOW), Err(Unusable::From));
        assert!(k.usable_at("::ffff:10.0.0.6".parse().unwrap(), NOW).is_ok());
        let k = key("from=\"10.0.0.*,!10.0.0.5\"");
        assert!(!k.options.allows_from(mapped));
        assert!(k.options.allows_from("::ffff:10.0.0.7".parse().unwrap()));
        let k = key("from=\"!::ffff:10.0.0.0/120,10.0.0.0/8\"");
        assert!(!k.options.allows_from(mapped));
        assert!(!k.options.allows_from("10.0.0.5".parse().unwrap()));
    }

    #[test]
    fn privileged_listen_needs_an_explicit_entry() {
        assert!(!PermitList::Any.names_port("127.0.0.1", 80));
        let l = PermitList::parse(&["*:*", "localhost:80"], true).unwrap();
        assert!(l.names_port("localhost", 80));
        assert!(!l.names_port("localhost", 81));
        assert!(l.allows("localhost", 81));
    }

    #[test]
    fn resolved_addresses_are_checked() {
        let l = PermitList::parse(&["web.example:80", "127.0.0.1:8080"], false).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(l.allows_resolved(ip("192.0.2.10"), 80));
        assert!(!l.allows_resolved(ip("127.0.0.1"), 80));
        assert!(!l.allows_resolved(ip("169.254.169.254"), 80));
        assert!(!l.allows_resolved(ip("::ffff:127.0.0.1"), 80));
        assert!(!l.allows_resolved(ip("0.0.0.0"), 80));
        assert!(l.allows_resolved(ip("127.0.0.1"), 8080));
        assert!(PermitList::Any.allows_resolved(ip("127.0.0.1"), 80));
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,80}") {
            let _ = parse_authorized_key(&s, 1);
            let _ = HostPort::parse(&s, true);
        }

        #[test]
        fn host_port_round_trips(h in "[a-z][a-z0-9.]{0,12}", p in any::<u16>()) {
            let e = HostPort::parse(&format!("{h}:{p}"), false).unwrap();
            prop_assert_eq!(e.to_string(), format!("{h}:{p}"));
            prop_assert!(e.matches(&h, p));
        }
    }
}
