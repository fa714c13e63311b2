//! OpenSSH certificate policy (PROTOCOL.certkeys): whether a certificate whose signature the
//! driver has verified may stand for a host or log in a user. Pure: the driver extracts the
//! certificate's fields into [`CertFacts`] and passes the time in.
//!
//! What is checked, as `sshkey_cert_check_authority` does: the certificate type, the validity
//! window (`valid_after <= now < valid_before`), the principal; for user certificates the
//! critical options (`source-address` is enforced, `force-command` is accepted because this
//! server never runs commands, any other critical option refuses the certificate) and the
//! `permit-port-forwarding` extension (without it the login may not forward, as in sshd).
//!
//! Stricter than OpenSSH: a certificate with an empty principal list is refused for users and
//! hosts alike (OpenSSH takes it as valid for every name where no principal is required,
//! which makes one leaked certificate good for every account or host the CA vouches for).
//! Refusal texts are OpenSSH's (`Certificate invalid: expired`...).

use std::fmt;
use std::net::IpAddr;

use crate::pattern::{ListMatch, match_list};
use crate::policy::KeyOptions;

/// Longest principal list accepted (each principal is a name; OpenSSH caps it at 256).
pub const MAX_PRINCIPALS: usize = 256;

/// Which role a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// `SSH2_CERT_TYPE_USER`.
    User,
    /// `SSH2_CERT_TYPE_HOST`.
    Host,
}

/// What the policy needs of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// User or host certificate.
    pub kind: CertKind,
    /// The key id the CA wrote (only logged).
    pub key_id: String,
    /// `valid principals`.
    pub principals: Vec<String>,
    /// Seconds since the epoch; 0 = always.
    pub valid_after: u64,
    /// Seconds since the epoch; `u64::MAX` = forever.
    pub valid_before: u64,
    /// Critical options (name, value).
    pub critical_options: Vec<(String, String)>,
    /// Extension names.
    pub extensions: Vec<String>,
}

/// Why a certificate is refused, worded as OpenSSH words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertRefusal {
    /// A user certificate presented as a host's, or the reverse.
    WrongType(CertKind),
    /// Before `valid_after`.
    NotYetValid,
    /// At or after `valid_before`.
    Expired,
    /// No principal at all.
    NoPrincipals,
    /// Too many principals.
    TooManyPrincipals,
    /// The name (host or user) is not among the principals.
    NotAPrincipal,
    /// `principals=` of the authorized_keys line names none of the certificate's principals.
    NoAuthorizedPrincipal,
    /// A critical option this implementation does not know.
    UnsupportedCriticalOption(String),
    /// `source-address` does not allow the client's address (or is malformed).
    SourceAddress,
}

impl fmt::Display for CertRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertRefusal::WrongType(CertKind::Host) => {
                f.write_str("Certificate invalid: not a host certificate")
            }
            CertRefusal::WrongType(CertKind::User) => {
                f.write_str("Certificate invalid: not a user certificate")
            }
            CertRefusal::NotYetValid => f.write_str("Certificate invalid: not yet valid"),
            CertRefusal::Expired => f.write_str("Certificate invalid: expired"),
            CertRefusal::NoPrincipals => f.write_str("Certificate lacks principal list"),
            CertRefusal::TooManyPrincipals => f.write_str("Certificate has too many principals"),
            CertRefusal::NotAPrincipal => {
                f.write_str("Certificate invalid: name is not a listed principal")
            }
            CertRefusal::NoAuthorizedPrincipal => {
                f.write_str("Certificate does not contain an authorized principal")
            }
            CertRefusal::UnsupportedCriticalOption(name) => {
                write!(f, "Certificate has unsupported critical option {name:?}")
            }
            CertRefusal::SourceAddress => f.write_str(
                "Certificate source-address contents invalid or does not allow this address",
            ),
        }
    }
}

fn common(facts: &CertFacts, want: CertKind, now: u64) -> Result<(), CertRefusal> {
    if facts.kind != want {
        return Err(CertRefusal::WrongType(want));
    }
    if now < facts.valid_after {
        return Err(CertRefusal::NotYetValid);
    }
    if now >= facts.valid_before {
        return Err(CertRefusal::Expired);
    }
    if facts.principals.is_empty() {
        return Err(CertRefusal::NoPrincipals);
    }
    if facts.principals.len() > MAX_PRINCIPALS {
        return Err(CertRefusal::TooManyPrincipals);
    }
    Ok(())
}

/// Whether a host certificate may stand for `host` (the name connected to, or
/// `HostKeyAlias`) at `now`. Principals may be wildcard patterns, as OpenSSH 8.8+ allows for
/// host certificates.
///
/// # Errors
/// Why not.
pub fn check_host(facts: &CertFacts, host: &str, now: u64) -> Result<(), CertRefusal> {
    common(facts, CertKind::Host, now)?;
    let host = host.to_ascii_lowercase();
    if facts
        .principals
        .iter()
        .any(|p| match_list([p.to_ascii_lowercase().as_str()], &host) == ListMatch::Match)
    {
        Ok(())
    } else {
        Err(CertRefusal::NotAPrincipal)
    }
}

/// Whether a user certificate logs in `user` from `peer` at `now`. `authorized_principals`
/// is the `principals=` list of an authorized_keys `cert-authority` line: one of the
/// certificate's principals must be in it; without it (a `trusted_user_ca_keys` CA, or a line
/// without `principals=`) the user name must be one of the certificate's principals.
///
/// Returns the key options the certificate adds to `base` (the line's options, or the
/// defaults): no `permit-port-forwarding` extension clears port forwarding.
///
/// # Errors
/// Why not.
pub fn check_user(
    facts: &CertFacts,
    user: &str,
    authorized_principals: Option<&[String]>,
    peer: IpAddr,
    now: u64,
    base: &KeyOptions,
) -> Result<KeyOptions, CertRefusal> {
    common(facts, CertKind::User, now)?;
    match authorized_principals {
        Some(allowed) => {
            if !facts.principals.iter().any(|p| allowed.contains(p)) {
                return Err(CertRefusal::NoAuthorizedPrincipal);
            }
        }
        None => {
            if !facts.principals.iter().any(|p| p == user) {
                return Err(CertRefusal::NotAPrincipal);
            }
        }
    }
    let mut options = base.clone();
    for (name, value) in &facts.critical_options {
        match name.as_str() {
            "force-command" => {}
            "source-address" => {
                let from = KeyOptions {
                    from: Some(value.split(',').map(|p| p.trim().to_string()).collect()),
                    ..KeyOptions::default()
                };
                let well_formed = value
                    .split(',')
                    .all(|p| !p.trim().is_empty() && p.trim().len() <= 64);
                if !well_formed || !from.allows_from(peer) {
                    return Err(CertRefusal::SourceAddress);
                }
            }
            other => return Err(CertRefusal::UnsupportedCriticalOption(other.to_string())),
        }
    }
    if !facts
        .extensions
        .iter()
        .any(|e| e == "permit-port-forwarding")
    {
        options.port_forwarding = false;
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn facts(kind: CertKind, principals: &[&str]) -> CertFacts {
        CertFacts {
            kind,
            key_id: "id".into(),
            principals: principals.iter().map(|s| (*s).to_string()).collect(),
            valid_after: 100,
            valid_before: 200,
            critical_options: Vec::new(),
            extensions: vec!["permit-port-forwarding".into()],
        }
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    #[test]
    fn host_certificate_window_type_and_principal() {
        let f = facts(CertKind::Host, &["web.lan", "*.db.lan"]);
        assert_eq!(check_host(&f, "web.lan", 150), Ok(()));
        assert_eq!(check_host(&f, "WEB.lan", 150), Ok(()));
        assert_eq!(check_host(&f, "a.db.lan", 150), Ok(()));
        assert_eq!(
            check_host(&f, "other", 150),
            Err(CertRefusal::NotAPrincipal)
        );
        assert_eq!(check_host(&f, "web.lan", 99), Err(CertRefusal::NotYetValid));
        assert_eq!(check_host(&f, "web.lan", 200), Err(CertRefusal::Expired));
        assert_eq!(
            check_host(&facts(CertKind::User, &["web.lan"]), "web.lan", 150),
            Err(CertRefusal::WrongType(CertKind::Host))
        );
        assert_eq!(
            check_host(&facts(CertKind::Host, &[]), "web.lan", 150),
            Err(CertRefusal::NoPrincipals)
        );
        assert_eq!(
            CertRefusal::Expired.to_string(),
            "Certificate invalid: expired"
        );
    }

    #[test]
    fn user_certificate_principals_options_and_extensions() {
        let base = KeyOptions::default();
        let f = facts(CertKind::User, &["alice", "ops"]);
        assert!(check_user(&f, "alice", None, PEER, 150, &base).is_ok());
        assert_eq!(
            check_user(&f, "root", None, PEER, 150, &base),
            Err(CertRefusal::NotAPrincipal)
        );
        // principals= decides instead of the user name.
        let ops = vec!["ops".to_string()];
        assert!(check_user(&f, "root", Some(&ops), PEER, 150, &base).is_ok());
        let admins = vec!["admins".to_string()];
        assert_eq!(
            check_user(&f, "alice", Some(&admins), PEER, 150, &base),
            Err(CertRefusal::NoAuthorizedPrincipal)
        );
        assert_eq!(
            check_user(&f, "alice", None, PEER, 250, &base),
            Err(CertRefusal::Expired)
        );
        // No permit-port-forwarding: the login may not forward.
        let mut bare = f.clone();
        bare.extensions.clear();
        let o = check_user(&bare, "alice", None, PEER, 150, &base).unwrap();
        assert!(!o.port_forwarding);
        // source-address is enforced; unknown critical options refuse.
        let mut src = f.clone();
        src.critical_options = vec![("source-address".into(), "10.0.0.0/8".into())];
        assert!(check_user(&src, "alice", None, PEER, 150, &base).is_ok());
        src.critical_options = vec![("source-address".into(), "192.168.0.0/16".into())];
        assert_eq!(
            check_user(&src, "alice", None, PEER, 150, &base),
            Err(CertRefusal::SourceAddress)
        );
        src.critical_options = vec![("verify-required".into(), String::new())];
        assert!(matches!(
            check_user(&src, "alice", None, PEER, 150, &base),
            Err(CertRefusal::UnsupportedCriticalOption(_))
        ));
        src.critical_options = vec![("force-command".into(), "/bin/true".into())];
        assert!(check_user(&src, "alice", None, PEER, 150, &base).is_ok());
    }

    proptest! {
        #[test]
        fn never_panics(principals in proptest::collection::vec(".{0,20}", 0..4),
                        name in ".{0,20}", now in any::<u64>(), after in any::<u64>(),
                        before in any::<u64>(), opt in ".{0,40}") {
            let mut f = facts(CertKind::User, &[]);
            f.principals = principals;
            f.valid_after = after;
            f.valid_before = before;
            f.critical_options = vec![("source-address".into(), opt)];
            let _ = check_user(&f, &name, None, PEER, now, &KeyOptions::default());
            f.kind = CertKind::Host;
            let _ = check_host(&f, &name, now);
        }
    }
}
