//! Host-key verification against an OpenSSH known_hosts file. Pure: the driver reads the file,
//! passes its text and the key the server presented, and appends the line this module formats.
//!
//! Supports what OpenSSH writes and users edit: plain and hashed (`|1|salt|hash`) host fields,
//! `[host]:port` for non-22 ports, comma lists with `*`/`?` wildcards and `!` negation,
//! `@revoked` lines, comments, any run of blanks between fields. `@cert-authority` lines name
//! the CAs whose host certificates are trusted for the hosts they match
//! ([`cert_authorities`]; the certificate itself is judged by [`crate::cert::check_host`]).
//!
//! Policy (stricter than OpenSSH where OpenSSH only warns): a host known under other key types
//! but not the presented one is refused too, because accepting it would let an attacker pick a
//! key type the file says nothing about.

use hmac::{KeyInit, Mac};

/// What `StrictHostKeyChecking` allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "kebab-case")
)]
pub enum StrictHostKeyChecking {
    /// Only keys already in known_hosts (OpenSSH `yes`).
    Yes,
    /// Unknown hosts are recorded and accepted; changed keys are refused (`accept-new`).
    #[default]
    AcceptNew,
}

impl std::str::FromStr for StrictHostKeyChecking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "yes" => Ok(StrictHostKeyChecking::Yes),
            "accept-new" => Ok(StrictHostKeyChecking::AcceptNew),
            "no" | "off" | "ask" => Err(format!(
                "StrictHostKeyChecking={s} is not supported: use 'yes' or 'accept-new' (a changed host key is always refused)"
            )),
            _ => Err(format!(
                "bad StrictHostKeyChecking value '{s}': expected yes or accept-new"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

/// One parsed known_hosts line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    marker: Marker,
    hosts: String,
    algorithm: String,
    blob: Vec<u8>,
    line: usize,
}

/// What the file says about the presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyStatus {
    /// The key is recorded for this host.
    Known,
    /// Nothing is recorded for this host.
    Unknown,
    /// A different key of the same type is recorded (line number of the first one).
    Changed {
        /// 1-based line of the recorded key.
        line: usize,
    },
    /// The host is recorded only with other key types.
    OtherTypes {
        /// 1-based line of the first recorded key.
        line: usize,
        /// Key types recorded for the host.
        algorithms: Vec<String>,
    },
    /// The key is listed under `@revoked`.
    Revoked {
        /// 1-based line of the `@revoked` entry.
        line: usize,
    },
}

/// What to do with the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go on.
    Accept,
    /// Go on, and append [`format_entry`] to the file first.
    AcceptAndRecord,
    /// Refuse, with a message for the operator.
    Refuse(String),
}

/// The host field OpenSSH uses: `host` on port 22, `[host]:port` otherwise.
#[must_use]
pub fn host_field(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

fn parse_line(raw: &str, line: usize) -> Option<Entry> {
    let text = raw.trim();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    let mut fields = text.split_whitespace();
    let mut first = fields.next()?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        m if m.starts_with('@') => return None,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next()?;
    }
    let algorithm = fields.next()?;
    let blob = data_encoding::BASE64
        .decode(fields.next()?.as_bytes())
        .ok()?;
    Some(Entry {
        marker,
        hosts: first.to_string(),
        algorithm: algorithm.to_string(),
        blob,
        line,
    })
}

fn hashed_match(entry: &str, host: &str) -> bool {
    let mut parts = entry.split('|').skip(2);
    let (Some(salt), Some(hash)) = (parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        data_encoding::BASE64.decode(salt.as_bytes()),
        data_encoding::BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mac) = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(host.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

fn hosts_match(hosts: &str, host: &str) -> bool {
    if hosts.starts_with("|1|") {
        return hashed_match(hosts, host);
    }
    crate::pattern::match_list(hosts.split(','), host) == crate::pattern::ListMatch::Match
}

/// Looks the presented key (type name and wire blob) up for `host:port` in the file's text.
#[must_use]
pub fn check(text: &str, host: &str, port: u16, algorithm: &str, blob: &[u8]) -> HostKeyStatus {
    let field = host_field(host, port);
    let entries: Vec<Entry> = text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| parse_line(l, i + 1))
        .collect();
    if let Some(r) = entries
        .iter()
        .find(|e| e.marker == Marker::Revoked && e.blob == blob)
    {
        return HostKeyStatus::Revoked { line: r.line };
    }
    let for_host: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.marker == Marker::None && hosts_match(&e.hosts, &field))
        .collect();
    if for_host.iter().any(|e| e.blob == blob) {
        return HostKeyStatus::Known;
    }
    if let Some(e) = for_host.iter().find(|e| e.algorithm == algorithm) {
        return HostKeyStatus::Changed { line: e.line };
    }
    match for_host.first() {
        None => HostKeyStatus::Unknown,
        Some(first) => {
            let mut algorithms: Vec<String> =
                for_host.iter().map(|e| e.algorithm.clone()).collect();
            algorithms.dedup();
            HostKeyStatus::OtherTypes {
                line: first.line,
                algorithms,
            }
        }
    }
}

/// A `@cert-authority` line that matches a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertAuthority {
    /// 1-based line number.
    pub line: usize,
    /// The CA key's wire blob.
    pub blob: Vec<u8>,
}

/// The `@cert-authority` keys trusted for `host:port`, in file order. A host certificate is
/// accepted only if signed by one of them (and not `@revoked`).
#[must_use]
pub fn cert_authorities(text: &str, host: &str, port: u16) -> Vec<CertAuthority> {
    let field = host_field(host, port);
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| parse_line(l, i + 1))
        .filter(|e| e.marker == Marker::CertAuthority && hosts_match(&e.hosts, &field))
        .map(|e| CertAuthority {
            line: e.line,
            blob: e.blob,
        })
        .collect()
}

/// The line of an `@revoked` entry for this key blob (a host key, a certificate's key or a
/// CA key), if any.
#[must_use]
pub fn revoked(text: &str, blob: &[u8]) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| parse_line(l, i + 1))
        .find(|e| e.marker == Marker::Revoked && e.blob == blob)
        .map(|e| e.line)
}

/// Key types recorded for `host:port`, in file order: the client offers these first so the
/// server picks a key the file can vouch for (what OpenSSH does with `HostKeyAlgorithms`).
#[must_use]
pub fn known_algorithms(text: &str, host: &str, port: u16) -> Vec<String> {
    let field = host_field(host, port);
    let mut out: Vec<String> = Vec::new();
    for e in text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| parse_line(l, i + 1))
    {
        if e.marker == Marker::None && hosts_match(&e.hosts, &field) && !out.contains(&e.algorithm)
        {
            out.push(e.algorithm);
        }
    }
    out
}

/// Applies the policy to a lookup result. `path` and `fingerprint` only go into messages.
#[must_use]
pub fn decide(
    status: &HostKeyStatus,
    policy: StrictHostKeyChecking,
    host: &str,
    port: u16,
    path: &str,
    fingerprint: &str,
) -> Decision {
    let who = host_field(host, port);
    match status {
        HostKeyStatus::Known => Decision::Accept,
        HostKeyStatus::Unknown => match policy {
            StrictHostKeyChecking::AcceptNew => Decision::AcceptAndRecord,
            StrictHostKeyChecking::Yes => Decision::Refuse(format!(
                "host key for {who} is not in {path} and StrictHostKeyChecking is yes \
                 (server key fingerprint {fingerprint}); add it, or use accept-new"
            )),
        },
        HostKeyStatus::Changed { line } => Decision::Refuse(format!(
            "REMOTE HOST IDENTIFICATION HAS CHANGED for {who}: the server presented {fingerprint}, \
             which differs from the key recorded at {path}:{line}. Someone could be intercepting \
             the connection, or the host key was replaced. Refusing to connect; if the change is \
             expected, remove line {line} from {path}"
        )),
        HostKeyStatus::OtherTypes { line, algorithms } => Decision::Refuse(format!(
            "host key for {who} has changed type: {path}:{line} records {} but the server \
             presented another type ({fingerprint}). Refusing to connect; if expected, remove the \
             old entries from {path}",
            algorithms.join(", ")
        )),
        HostKeyStatus::Revoked { line } => Decision::Refuse(format!(
            "host key {fingerprint} for {who} is marked @revoked at {path}:{line}; refusing to connect"
        )),
    }
}

/// The line to append for an accepted new key (unhashed, like `HashKnownHosts no`).
#[must_use]
pub fn format_entry(host: &str, port: u16, algorithm: &str, blob: &[u8]) -> String {
    format!(
        "{} {algorithm} {}\n",
        host_field(host, port),
        data_encoding::BASE64.encode(blob)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAILIG2T/B0l0gaqj3puu510tu9N1OkQ4znY3LYuEm5zCF";

    fn blob(b64: &str) -> Vec<u8> {
        data_encoding::BASE64.decode(b64.as_bytes()).unwrap()
    }

    #[test]
    fn plain_port_and_wildcards() {
        let text =
            format!("# c\n[localhost]:2222  ssh-ed25519 {A} me\n*.lan,!bad.lan ssh-ed25519 {A}\n");
        assert_eq!(
            check(&text, "localhost", 2222, "ssh-ed25519", &blob(A)),
            HostKeyStatus::Known
        );
        assert_eq!(
            check(&text, "localhost", 22, "ssh-ed25519", &blob(A)),
            HostKeyStatus::Unknown
        );
        assert_eq!(
            check(&text, "localhost", 2222, "ssh-ed25519", &blob(B)),
            HostKeyStatus::Changed { line: 2 }
        );
        assert_eq!(
            check(&text, "web.lan", 22, "ssh-ed25519", &blob(A)),
            HostKeyStatus::Known
        );
        assert_eq!(
            check(&text, "bad.lan", 22, "ssh-ed25519", &blob(A)),
            HostKeyStatus::Unknown
        );
        assert_eq!(
            check(&text, "localhost", 2222, "ecdsa-sha2-nistp256", &blob(B)),
            HostKeyStatus::OtherTypes {
                line: 2,
                algorithms: vec!["ssh-ed25519".into()]
            }
        );
        assert_eq!(
            known_algorithms(&text, "localhost", 2222),
            vec!["ssh-ed25519".to_string()]
        );
    }

    #[test]
    fn hashed_entry_from_russh_test_vector() {
        // Hashed entry for "example.com" (from russh's known_hosts tests).
        let text = format!(
            "|1|O33ESRMWPVkMYIwJ1Uw+n877jTo=|nuuC5vEqXlEZ/8BXQR7m619W6Ak= ssh-ed25519 {B}\n"
        );
        assert_eq!(
            check(&text, "example.com", 22, "ssh-ed25519", &blob(B)),
            HostKeyStatus::Known
        );
        assert_eq!(
            check(&text, "example.org", 22, "ssh-ed25519", &blob(B)),
            HostKeyStatus::Unknown
        );
    }

    #[test]
    fn revoked_and_policy() {
        let text = format!("@revoked * ssh-ed25519 {A}\n");
        let s = check(&text, "h", 22, "ssh-ed25519", &blob(A));
        assert_eq!(s, HostKeyStatus::Revoked { line: 1 });
        assert!(matches!(
            decide(&s, StrictHostKeyChecking::AcceptNew, "h", 22, "kh", "fp"),
            Decision::Refuse(_)
        ));
        let u = HostKeyStatus::Unknown;
        assert_eq!(
            decide(&u, StrictHostKeyChecking::AcceptNew, "h", 22, "kh", "fp"),
            Decision::AcceptAndRecord
        );
        assert!(matches!(
            decide(&u, StrictHostKeyChecking::Yes, "h", 22, "kh", "fp"),
            Decision::Refuse(_)
        ));
        let Decision::Refuse(msg) = decide(
            &HostKeyStatus::Changed { line: 3 },
            StrictHostKeyChecking::AcceptNew,
            "h",
            2222,
            "kh",
            "fp",
        ) else {
            panic!("changed key accepted")
        };
        assert!(msg.contains("CHANGED") && msg.contains("kh:3") && msg.contains("[h]:2222"));
        assert!("no".parse::<StrictHostKeyChecking>().is_err());
        assert_eq!("accept-new".parse(), Ok(StrictHostKeyChecking::AcceptNew));
    }

    #[test]
    fn cert_authority_lines() {
        let text = format!(
            "@cert-authority *.lan,!bad.lan ssh-ed25519 {A} ca\n@revoked * ssh-ed25519 {B}\n\
             @cert-authority [h]:2222 ssh-ed25519 {B}\n"
        );
        let cas = cert_authorities(&text, "web.lan", 22);
        assert_eq!(cas.len(), 1);
        assert_eq!(cas[0].line, 1);
        assert_eq!(cas[0].blob, blob(A));
        assert!(cert_authorities(&text, "bad.lan", 22).is_empty());
        assert_eq!(cert_authorities(&text, "h", 2222)[0].line, 3);
        assert!(cert_authorities(&text, "h", 22).is_empty());
        assert_eq!(revoked(&text, &blob(B)), Some(2));
        assert_eq!(revoked(&text, &blob(A)), None);
        // A CA line never makes its key a trusted host key.
        assert_eq!(
            check(&text, "web.lan", 22, "ssh-ed25519", &blob(A)),
            HostKeyStatus::Unknown
        );
    }

    #[test]
    fn recorded_entry_is_found_again() {
        let line = format_entry("127.0.0.1", 2200, "ssh-ed25519", &blob(A));
        assert_eq!(
            check(&line, "127.0.0.1", 2200, "ssh-ed25519", &blob(A)),
            HostKeyStatus::Known
        );
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,200}", host in "[a-z.]{0,10}", port in any::<u16>()) {
            let _ = check(&text, &host, port, "ssh-ed25519", &[1, 2, 3]);
        }

        #[test]
        fn format_then_check_is_known(host in "[a-z][a-z0-9.\\-]{0,20}", port in any::<u16>(),
                                      b in proptest::collection::vec(any::<u8>(), 1..64)) {
            let line = format_entry(&host, port, "ssh-ed25519", &b);
            prop_assert_eq!(check(&line, &host, port, "ssh-ed25519", &b), HostKeyStatus::Known);
        }
    }
}
