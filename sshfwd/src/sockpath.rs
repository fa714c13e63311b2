//! Unix socket paths a `vipgate sshd` client may forward: the listeners of its
//! `ssh -R /path:...` (`streamlocal-forward@openssh.com`) and the targets of its
//! `ssh -L ...:/path` (`direct-streamlocal@openssh.com`). Pure: the checks on the text of a
//! path and the permit lists; the driver adds what needs the file system (symlinks, what is
//! already at the path).
//!
//! A path a client names must be absolute, at most [`MAX_SOCKET_PATH`] bytes (`sun_path`
//! holds 108 with the NUL), free of NUL bytes and of `.`, `..` and empty components, so that
//! the text the permit list matched is the place the socket is: `/run/fwd/../../etc/x` never
//! reaches a pattern. A permit pattern is such a path in which `*` matches any run and `?`
//! one character *within one component*: `/run/vipgate-fwd/*` admits
//! `/run/vipgate-fwd/app.sock`, not `/run/vipgate-fwd/sub/app.sock`. An empty list admits
//! nothing (OpenSSH's `AllowStreamLocalForwarding no`; TCP permit lists are the other way
//! round, as OpenSSH's `PermitListen`/`PermitOpen` default to any).

use std::fmt;

use crate::pattern::wildcard_match_exact;

/// Longest socket path in bytes: `sun_path` is 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Why a socket path or a permit pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not starting with `/`.
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    /// Longer than [`MAX_SOCKET_PATH`].
    #[error("socket path of {0} bytes is longer than {MAX_SOCKET_PATH}")]
    TooLong(usize),
    /// A NUL byte (it would cut the path short in the kernel).
    #[error("socket path contains a NUL byte")]
    Nul,
    /// A `.`, `..` or empty component, or a trailing `/`.
    #[error("{0:?} has a `.`, `..` or empty component")]
    NotCanonical(String),
    /// A pattern with a wildcard in a directory component.
    #[error("{0:?}: wildcards are only allowed in the last component")]
    WildDirectory(String),
}

/// Checks the text of a socket path a client sent (see the module documentation).
///
/// # Errors
/// The first rule it breaks.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.len() > MAX_SOCKET_PATH {
        return Err(PathError::TooLong(path.len()));
    }
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute(path.to_string()));
    };
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(PathError::NotCanonical(path.to_string()));
    }
    Ok(())
}

/// A permit list of socket path patterns; empty admits nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathPermit(Vec<String>);

impl PathPermit {
    /// Parses patterns: each a path as [`check_path`] wants it, wildcards only in its last
    /// component (a directory named by a wildcard would be any directory clients could
    /// have made).
    ///
    /// # Errors
    /// The first pattern that breaks a rule.
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PathError> {
        let mut out = Vec::with_capacity(patterns.len());
        for p in patterns {
            let p = p.as_ref();
            check_path(p)?;
            let dir = p.rsplit_once('/').map_or("", |(d, _)| d);
            if dir.contains(['*', '?']) {
                return Err(PathError::WildDirectory(p.to_string()));
            }
            out.push(p.to_string());
        }
        Ok(PathPermit(out))
    }

    /// Whether the list admits nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `path` (already passed by [`check_path`]) matches a pattern, component by
    /// component.
    #[must_use]
    pub fn allows(&self, path: &str) -> bool {
        check_path(path).is_ok()
            && self.0.iter().any(|p| {
                let (pd, pf) = p.rsplit_once('/').unwrap_or(("", p));
                let (d, f) = path.rsplit_once('/').unwrap_or(("", path));
                pd == d && wildcard_match_exact(pf, f)
            })
    }
}

impl fmt::Display for PathPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_canonical_and_short() {
        assert!(check_path("/run/vipgate-fwd/a.sock").is_ok());
        for bad in [
            "run/x",
            "/run/../etc/x",
            "/run/./x",
            "/run//x",
            "/run/x/",
            "/",
            "",
            "/run/a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        let long = format!("/{}", "a".repeat(MAX_SOCKET_PATH - 1));
        assert!(check_path(&long).is_ok());
        assert_eq!(
            check_path(&format!("{long}b")),
            Err(PathError::TooLong(MAX_SOCKET_PATH + 1))
        );
    }

    #[test]
    fn wildcards_stay_within_one_component() {
        let l = PathPermit::parse(&["/run/vipgate-fwd/*", "/tmp/x/s?.sock"]).unwrap();
        assert!(l.allows("/run/vipgate-fwd/app.sock"));
        assert!(!l.allows("/run/vipgate-fwd/sub/app.sock"));
        assert!(!l.allows("/run/vipgate-fwd/../../etc/passwd"));
        assert!(!l.allows("/run/vipgate-fwd"));
        assert!(l.allows("/tmp/x/s1.sock"));
        assert!(!l.allows("/tmp/x/s12.sock"));
        assert!(!l.allows("/tmp/y/s1.sock"));
        assert!(!PathPermit::default().allows("/run/vipgate-fwd/app.sock"));
    }

    #[test]
    fn patterns_are_checked() {
        assert!(matches!(
            PathPermit::parse(&["/run/*/x.sock"]),
            Err(PathError::WildDirectory(_))
        ));
        assert!(PathPermit::parse(&["relative/*"]).is_err());
        assert!(PathPermit::parse(&["/run/../*"]).is_err());
        assert!(PathPermit::parse(&["/*"]).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_never_admits_dot_dot(s in ".{0,140}") {
            let l = PathPermit::parse(&["/run/f/*"]).unwrap();
            let _ = check_path(&s);
            if l.allows(&s) {
                proptest::prop_assert!(!s.contains("/..") && s.len() <= MAX_SOCKET_PATH);
            }
        }
    }
}
