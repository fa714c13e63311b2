//! OpenSSH forwarding specifications (`-L`, `-R`, `-D`), parsed the way ssh(1) reads them.
//!
//! Accepted forms (ssh(1)):
//! - `-L [bind_address:]port:host:hostport`, `-L [bind_address:]port:remote_socket`,
//!   `-L local_socket:host:hostport`, `-L local_socket:remote_socket`
//! - `-R [bind_address:]port:host:hostport`, `-R [bind_address:]port:local_socket`,
//!   `-R remote_socket:host:hostport`, `-R remote_socket:local_socket`, and
//!   `-R [bind_address:]port` without a target (reverse dynamic: each connection to the
//!   server's port is a SOCKS request served on this side, OpenSSH 7.6+)
//! - `-D [bind_address:]port`
//!
//! IPv6 addresses go in square brackets (`[::1]:8080:[fe80::1]:80`). A path is anything that
//! contains a `/`. This module is pure: it never resolves names or opens sockets.
//!
//! A [`LocalForward`] is what listens on this side (an `-L` or a `-D`); its
//! [`ListenAddress`] is where, after OpenSSH's defaults, and is what a reload matches
//! listeners by.

use std::fmt;

use crate::config::ForwardKind;

/// One side of a forward: a TCP host and port, or a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port`; `host` is `None` when the spec gave no bind address.
    Tcp {
        /// Host name or address (brackets removed), or `None` for "the default".
        host: Option<String>,
        /// TCP port; 0 asks for an allocated port where the spec allows it.
        port: u16,
    },
    /// A unix-domain socket path.
    Unix(String),
}

/// A parsed `-L` / `-R` specification: where to listen, where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// The listening side (local for `-L`, on the server for `-R`).
    pub listen: Endpoint,
    /// The connecting side (on the server's side for `-L`, local for `-R`); `None` for a
    /// reverse dynamic `-R [bind:]port`, whose connections each name their target in a
    /// SOCKS request (never for `-L`: [`ForwardSpec::parse_local`] requires a target).
    pub connect: Option<Endpoint>,
}

/// A parsed `-D` specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicSpec {
    /// Bind address, `None` for loopback (OpenSSH's default without `GatewayPorts`).
    pub bind: Option<String>,
    /// Listening port.
    pub port: u16,
}

/// Why a specification was refused; the text mirrors OpenSSH's complaints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The `-L` spec has the wrong shape.
    #[error("bad local forwarding specification '{0}'")]
    BadLocal(String),
    /// The `-R` spec has the wrong shape.
    #[error("bad remote forwarding specification '{0}'")]
    BadRemote(String),
    /// The `-D` spec has the wrong shape.
    #[error("bad dynamic forwarding specification '{0}'")]
    BadDynamic(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp {
                host: Some(h),
                port,
            } if h.contains(':') => write!(f, "[{h}]:{port}"),
            Endpoint::Tcp {
                host: Some(h),
                port,
            } => write!(f, "{h}:{port}"),
            Endpoint::Tcp { host: None, port } => write!(f, "{port}"),
            // A path with a ':' must be bracketed to stay one field (fields never hold
            // brackets, see split_fields, so the brackets are unambiguous).
            Endpoint::Unix(p) if p.contains(':') => write!(f, "[{p}]"),
            Endpoint::Unix(p) => f.write_str(p),
        }
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.connect {
            Some(connect) => write!(f, "{}:{connect}", self.listen),
            None => self.listen.fmt(f),
        }
    }
}

impl fmt::Display for DynamicSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.bind {
            Some(b) if b.contains(':') => write!(f, "[{b}]:{}", self.port),
            Some(b) => write!(f, "{b}:{}", self.port),
            None => write!(f, "{}", self.port),
        }
    }
}

/// A forward that listens on this side of the connection: an `-L` or a `-D`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalForward {
    /// `-L`: connections are forwarded to the spec's target through the server.
    Local(ForwardSpec),
    /// `-D`: a SOCKS proxy; each client names its own target.
    Dynamic(DynamicSpec),
}

/// Where a [`LocalForward`] listens, with the bind address defaulted as OpenSSH does: two
/// forwards with the same address cannot both be bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// A TCP host (address or name, not resolved here) and port.
    Tcp {
        /// `127.0.0.1` without a bind address, `0.0.0.0` for `*` or with `GatewayPorts`.
        host: String,
        /// The port.
        port: u16,
    },
    /// A unix socket path.
    Unix(String),
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            ListenAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
            ListenAddress::Unix(path) => f.write_str(path),
        }
    }
}

impl LocalForward {
    /// `local` or `dynamic`, as `vipgate show ssh` names them.
    #[must_use]
    pub fn kind(&self) -> ForwardKind {
        match self {
            LocalForward::Local(_) => ForwardKind::Local,
            LocalForward::Dynamic(_) => ForwardKind::Dynamic,
        }
    }

    /// Where it listens; without a bind address that is loopback, unless `gateway_ports`.
    #[must_use]
    pub fn listen_address(&self, gateway_ports: bool) -> ListenAddress {
        let (host, port) = match self {
            LocalForward::Local(spec) => match &spec.listen {
                Endpoint::Tcp { host, port } => (host.as_deref(), *port),
                Endpoint::Unix(path) => return ListenAddress::Unix(path.clone()),
            },
            LocalForward::Dynamic(d) => (d.bind.as_deref(), d.port),
        };
        let host = match host {
            None if gateway_ports => "0.0.0.0",
            None => "127.0.0.1",
            Some("" | "*") => "0.0.0.0",
            Some("localhost") => "127.0.0.1",
            Some(h) => h,
        };
        ListenAddress::Tcp {
            host: host.to_string(),
            port,
        }
    }

    /// The unix socket it listens on, if any (removed again when the listener closes).
    #[must_use]
    pub fn unix_path(&self) -> Option<&str> {
        match self {
            LocalForward::Local(ForwardSpec {
                listen: Endpoint::Unix(path),
                ..
            }) => Some(path),
            _ => None,
        }
    }
}

impl fmt::Display for LocalForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalForward::Local(spec) => spec.fmt(f),
            LocalForward::Dynamic(d) => d.fmt(f),
        }
    }
}

/// Splits on `:` outside square brackets; brackets must balance and wrap a whole field.
fn split_fields(spec: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut in_brackets = false;
    let mut bracketed = false;
    for c in spec.chars() {
        match c {
            '[' if !in_brackets && cur.is_empty() && !bracketed => {
                in_brackets = true;
                bracketed = true;
            }
            ']' if in_brackets => in_brackets = false,
            '[' | ']' => return None,
            ':' if !in_brackets => {
                fields.push(std::mem::take(&mut cur));
                bracketed = false;
            }
            _ if bracketed && !in_brackets => return None,
            c => cur.push(c),
        }
    }
    if in_brackets {
        return None;
    }
    fields.push(cur);
    Some(fields)
}

fn port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn is_path(s: &str) -> bool {
    s.contains('/')
}

fn host(s: &str) -> Option<String> {
    (!s.is_empty() && !s.chars().any(char::is_whitespace)).then(|| s.to_string())
}

/// Parses `listen` fields then `connect` fields, given the whole field list.
/// `remote` allows what only `-R` takes: listen port 0 and no target.
fn parse_forward(fields: &[String], remote: bool) -> Option<ForwardSpec> {
    let (allow_listen_port_zero, allow_dynamic) = (remote, remote);
    let listen_tcp = |bind: Option<&str>, p: &str| -> Option<Endpoint> {
        let port = port(p)?;
        if port == 0 && !allow_listen_port_zero {
            return None;
        }
        let host = match bind {
            Some(b) => Some(host(b)?),
            None => None,
        };
        Some(Endpoint::Tcp { host, port })
    };
    let connect_tcp = |h: &str, p: &str| -> Option<Endpoint> {
        let port = port(p)?;
        (port != 0).then_some(())?;
        Some(Endpoint::Tcp {
            host: Some(host(h)?),
            port,
        })
    };
    let f: Vec<&str> = fields.iter().map(String::as_str).collect();
    let (listen, connect) = match f.as_slice() {
        // -R port, -R bind:port (reverse dynamic)
        [p] if allow_dynamic => (listen_tcp(None, p)?, None),
        [b, p] if allow_dynamic && !is_path(b) && !is_path(p) => (listen_tcp(Some(b), p)?, None),
        // local_socket:remote_socket
        [l, c] if is_path(l) && is_path(c) => (
            Endpoint::Unix(l.to_string()),
            Some(Endpoint::Unix(c.to_string())),
        ),
        // port:remote_socket
        [p, c] if is_path(c) => (listen_tcp(None, p)?, Some(Endpoint::Unix(c.to_string()))),
        // local_socket:host:hostport
        [l, h, p] if is_path(l) => (Endpoint::Unix(l.to_string()), Some(connect_tcp(h, p)?)),
        // bind:port:remote_socket
        [b, p, c] if is_path(c) => (listen_tcp(Some(b), p)?, Some(Endpoint::Unix(c.to_string()))),
        // port:host:hostport
        [p, h, hp] => (listen_tcp(None, p)?, Some(connect_tcp(h, hp)?)),
        // bind:port:host:hostport
        [b, p, h, hp] => (listen_tcp(Some(b), p)?, Some(connect_tcp(h, hp)?)),
        _ => return None,
    };
    Some(ForwardSpec { listen, connect })
}

impl ForwardSpec {
    /// Parses an `-L` / `LocalForward` specification.
    ///
    /// # Errors
    /// [`SpecError::BadLocal`] when OpenSSH would refuse the same text.
    pub fn parse_local(spec: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::BadLocal(spec.to_string());
        let fields = split_fields(spec).ok_or_else(bad)?;
        parse_forward(&fields, false).ok_or_else(bad)
    }

    /// Parses an `-R` / `RemoteForward` specification; port 0 asks the server to allocate one.
    ///
    /// # Errors
    /// [`SpecError::BadRemote`] when OpenSSH would refuse the same text.
    pub fn parse_remote(spec: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::BadRemote(spec.to_string());
        let fields = split_fields(spec).ok_or_else(bad)?;
        parse_forward(&fields, true).ok_or_else(bad)
    }
}

impl DynamicSpec {
    /// Parses a `-D` / `DynamicForward` specification.
    ///
    /// # Errors
    /// [`SpecError::BadDynamic`] when OpenSSH would refuse the same text.
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::BadDynamic(spec.to_string());
        let fields = split_fields(spec).ok_or_else(bad)?;
        match fields.as_slice() {
            [p] => Ok(DynamicSpec {
                bind: None,
                port: port(p).filter(|p| *p != 0).ok_or_else(bad)?,
            }),
            [b, p] => Ok(DynamicSpec {
                bind: Some(host(b).ok_or_else(bad)?),
                port: port(p).filter(|p| *p != 0).ok_or_else(bad)?,
            }),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp(host: Option<&str>, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.map(str::to_string),
            port,
        }
    }

    #[test]
    fn listen_addresses_take_openssh_defaults() {
        let at = |fwd: LocalForward, gateway_ports| fwd.listen_address(gateway_ports).to_string();
        let l = |t| LocalForward::Local(ForwardSpec::parse_local(t).unwrap());
        let d = |t| LocalForward::Dynamic(DynamicSpec::parse(t).unwrap());
        assert_eq!(at(l("8585:web:80"), false), "127.0.0.1:8585");
        assert_eq!(at(l("8585:web:80"), true), "0.0.0.0:8585");
        assert_eq!(at(l("*:8585:web:80"), false), "0.0.0.0:8585");
        assert_eq!(at(l("localhost:8585:web:80"), true), "127.0.0.1:8585");
        assert_eq!(at(l("[::1]:8585:web:80"), false), "[::1]:8585");
        assert_eq!(at(l("/tmp/x.sock:web:80"), true), "/tmp/x.sock");
        assert_eq!(at(d("1080"), false), "127.0.0.1:1080");
        assert_eq!(at(d("10.0.0.1:1080"), true), "10.0.0.1:1080");
        assert_eq!(d("[::1]:1080").to_string(), "[::1]:1080");
        assert_eq!(l("/tmp/x.sock:web:80").unix_path(), Some("/tmp/x.sock"));
        assert_eq!(d("1080").unix_path(), None);
        assert_eq!(
            (l("1:h:2").kind(), d("1").kind()),
            (ForwardKind::Local, ForwardKind::Dynamic)
        );
    }

    #[test]
    fn local_forms() {
        let s = ForwardSpec::parse_local("8585:127.0.0.1:80").unwrap();
        assert_eq!(s.listen, tcp(None, 8585));
        assert_eq!(s.connect, Some(tcp(Some("127.0.0.1"), 80)));
        let s = ForwardSpec::parse_local("0.0.0.0:8585:web:80").unwrap();
        assert_eq!(s.listen, tcp(Some("0.0.0.0"), 8585));
        let s = ForwardSpec::parse_local("[::1]:8585:[fe80::1]:80").unwrap();
        assert_eq!(s.listen, tcp(Some("::1"), 8585));
        assert_eq!(s.connect, Some(tcp(Some("fe80::1"), 80)));
        let s = ForwardSpec::parse_local("8585:/run/app.sock").unwrap();
        assert_eq!(s.connect, Some(Endpoint::Unix("/run/app.sock".into())));
        let s = ForwardSpec::parse_local("/tmp/l.sock:db:5432").unwrap();
        assert_eq!(s.listen, Endpoint::Unix("/tmp/l.sock".into()));
    }

    #[test]
    fn remote_allows_port_zero() {
        let s = ForwardSpec::parse_remote("0:localhost:22").unwrap();
        assert_eq!(s.listen, tcp(None, 0));
        assert!(ForwardSpec::parse_local("0:localhost:22").is_err());
    }

    #[test]
    fn remote_without_a_target_is_reverse_dynamic() {
        let s = ForwardSpec::parse_remote("9100").unwrap();
        assert_eq!(
            (s.listen.clone(), s.connect.clone()),
            (tcp(None, 9100), None)
        );
        assert_eq!(s.to_string(), "9100");
        let s = ForwardSpec::parse_remote("[::1]:9100").unwrap();
        assert_eq!(
            (s.listen.clone(), s.connect.clone()),
            (tcp(Some("::1"), 9100), None)
        );
        assert_eq!(s.to_string(), "[::1]:9100");
        assert_eq!(ForwardSpec::parse_remote("*:0").unwrap().to_string(), "*:0");
        for bad in ["x", "a:b", "/tmp/s", "h:/tmp/s", "70000", ""] {
            assert!(ForwardSpec::parse_remote(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ForwardSpec::parse_local("9100").is_err());
        assert!(ForwardSpec::parse_local("localhost:9100").is_err());
    }

    #[test]
    fn rejects_what_openssh_rejects() {
        for bad in [
            "",
            "8585",
            "8585:host",
            "x:host:80",
            "70000:h:80",
            "1:h:0",
            "1:h:80:9:9",
            "[::1:8585:h:80",
            "a]:1:h:2",
            "1: :80",
        ] {
            assert!(ForwardSpec::parse_local(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            ForwardSpec::parse_local("nope").unwrap_err().to_string(),
            "bad local forwarding specification 'nope'"
        );
    }

    #[test]
    fn dynamic_forms() {
        assert_eq!(
            DynamicSpec::parse("1080").unwrap(),
            DynamicSpec {
                bind: None,
                port: 1080
            }
        );
        assert_eq!(
            DynamicSpec::parse("[::1]:1080").unwrap().bind.as_deref(),
            Some("::1")
        );
        assert!(DynamicSpec::parse("0").is_err());
        assert!(DynamicSpec::parse("a:b:c").is_err());
    }

    #[test]
    fn unix_path_with_colon_round_trips() {
        // fuzz/corpus/ssh_spec/roundtrip-bracketed-path: a bracketed path holding ':'.
        let text = "[5:8@/t5mp\t]:8/t5";
        let spec = ForwardSpec::parse_remote(text).unwrap();
        assert_eq!(spec.listen, Endpoint::Unix("5:8@/t5mp\t".into()));
        assert_eq!(ForwardSpec::parse_remote(&spec.to_string()).unwrap(), spec);
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,40}") {
            let _ = ForwardSpec::parse_local(&s);
            let _ = ForwardSpec::parse_remote(&s);
            let _ = DynamicSpec::parse(&s);
        }

        #[test]
        fn accepted_specs_round_trip(s in "[\\[\\]:/a1 ]{0,16}") {
            for spec in [ForwardSpec::parse_local(&s), ForwardSpec::parse_remote(&s)].into_iter().flatten() {
                prop_assert_eq!(ForwardSpec::parse_remote(&spec.to_string()).unwrap(), spec);
            }
        }

        #[test]
        fn display_round_trips(lp in 1u16.., h in "[a-z][a-z0-9.]{0,10}", hp in 1u16..) {
            let text = format!("{lp}:{h}:{hp}");
            let spec = ForwardSpec::parse_local(&text).unwrap();
            prop_assert_eq!(spec.to_string(), text);
        }
    }
}
