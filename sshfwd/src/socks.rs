//! SOCKS4, SOCKS4a and SOCKS5 (RFC 1928) request parsing and replies for `-D` and the
//! reverse dynamic `-R port` (no target). Pure.
//!
//! Only CONNECT without authentication is supported, as with OpenSSH's `-D`: BIND, UDP
//! ASSOCIATE and username/password authentication are refused with the protocol's own error
//! reply. Parsers take the bytes received so far and return `Ok(None)` until a whole message
//! is there, so the driver can read into one bounded buffer.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Largest request any version can send: SOCKS5 with a 255-byte name is 262 bytes; SOCKS4a
/// has two NUL-terminated strings which we bound to keep the buffer bounded.
pub const MAX_REQUEST: usize = 600;

/// Where the client wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocksTarget {
    /// A host name (SOCKS4a / SOCKS5 domain) or an address in text form.
    pub host: String,
    /// Destination port.
    pub port: u16,
}

/// The first message of a SOCKS session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocksHello {
    /// SOCKS4/4a CONNECT: complete request, answer with [`socks4_reply`].
    V4 {
        /// Destination.
        target: SocksTarget,
    },
    /// SOCKS5 method negotiation: answer with [`socks5_method_reply`], then parse
    /// [`parse_socks5_request`].
    V5 {
        /// The client offered "no authentication required" (method 0).
        no_auth_offered: bool,
    },
}

/// Why a SOCKS message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SocksError {
    /// First byte is neither 4 nor 5.
    #[error("not a SOCKS4 or SOCKS5 request (version byte {0})")]
    BadVersion(u8),
    /// A command other than CONNECT.
    #[error("unsupported SOCKS command {0} (only CONNECT)")]
    UnsupportedCommand(u8),
    /// SOCKS5 address type other than IPv4, domain or IPv6.
    #[error("unsupported SOCKS5 address type {0}")]
    BadAddressType(u8),
    /// Request longer than [`MAX_REQUEST`].
    #[error("SOCKS request too long")]
    TooLong,
    /// A domain name that is empty or not UTF-8.
    #[error("bad destination name")]
    BadName,
    /// The SOCKS5 method list offered nothing (nmethods = 0).
    #[error("no SOCKS5 methods offered")]
    NoMethods,
}

/// SOCKS5 reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Socks5Reply {
    /// succeeded
    Succeeded = 0,
    /// general SOCKS server failure
    GeneralFailure = 1,
    /// connection not allowed by ruleset
    NotAllowed = 2,
    /// host unreachable
    HostUnreachable = 4,
    /// connection refused
    ConnectionRefused = 5,
    /// command not supported
    CommandNotSupported = 7,
    /// address type not supported
    AddressTypeNotSupported = 8,
}

/// Parses the first message: a whole SOCKS4/4a request, or a SOCKS5 method offer.
/// Returns the message and the number of bytes it used.
///
/// # Errors
/// A [`SocksError`] when the bytes cannot be a supported request.
pub fn parse_hello(buf: &[u8]) -> Result<Option<(SocksHello, usize)>, SocksError> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    match version {
        4 => parse_socks4(buf),
        5 => {
            let Some(&n) = buf.get(1) else {
                return Ok(None);
            };
            if n == 0 {
                return Err(SocksError::NoMethods);
            }
            let end = 2 + usize::from(n);
            let Some(methods) = buf.get(2..end) else {
                return Ok(None);
            };
            Ok(Some((
                SocksHello::V5 {
                    no_auth_offered: methods.contains(&0),
                },
                end,
            )))
        }
        v => Err(SocksError::BadVersion(v)),
    }
}

fn parse_socks4(buf: &[u8]) -> Result<Option<(SocksHello, usize)>, SocksError> {
    // VN CD DSTPORT(2) DSTIP(4) USERID NUL [HOST NUL]
    if buf.len() < 9 {
        return too_long_or_none(buf);
    }
    if buf[1] != 1 {
        return Err(SocksError::UnsupportedCommand(buf[1]));
    }
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
    let Some(user_len) = buf[8..].iter().position(|&b| b == 0) else {
        return too_long_or_none(buf);
    };
    let mut used = 8 + user_len + 1;
    let o = ip.octets();
    // SOCKS4a: 0.0.0.x with x != 0 means "the name follows the user id".
    let host = if o[0] == 0 && o[1] == 0 && o[2] == 0 && o[3] != 0 {
        let Some(name_len) = buf[used..].iter().position(|&b| b == 0) else {
            return too_long_or_none(buf);
        };
        let name = name(&buf[used..used + name_len])?;
        used += name_len + 1;
        name
    } else {
        ip.to_string()
    };
    Ok(Some((
        SocksHello::V4 {
            target: SocksTarget { host, port },
        },
        used,
    )))
}

fn too_long_or_none<T>(buf: &[u8]) -> Result<Option<T>, SocksError> {
    if buf.len() >= MAX_REQUEST {
        Err(SocksError::TooLong)
    } else {
        Ok(None)
    }
}

fn name(bytes: &[u8]) -> Result<String, SocksError> {
    let s = std::str::from_utf8(bytes).map_err(|_| SocksError::BadName)?;
    if s.is_empty() || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(SocksError::BadName);
    }
    Ok(s.to_string())
}

/// Parses a SOCKS5 request (RFC 1928 §4) after the method exchange.
///
/// # Errors
/// [`SocksError`] for a bad version, a command other than CONNECT or an unknown address type;
/// reply with [`socks5_reply`] and the matching [`Socks5Reply`] before closing.
pub fn parse_socks5_request(buf: &[u8]) -> Result<Option<(SocksTarget, usize)>, SocksError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 5 {
        return Err(SocksError::BadVersion(buf[0]));
    }
    if buf[1] != 1 {
        return Err(SocksError::UnsupportedCommand(buf[1]));
    }
    let (host, addr_end) = match buf[3] {
        1 => {
            let Some(a) = buf.get(4..8) else {
                return Ok(None);
            };
            (Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string(), 8)
        }
        3 => {
            let len = usize::from(buf[4]);
            let Some(n) = buf.get(5..5 + len) else {
                return Ok(None);
            };
            (name(n)?, 5 + len)
        }
        4 => {
            let Some(a) = buf.get(4..20) else {
                return Ok(None);
            };
            let mut o = [0u8; 16];
            o.copy_from_slice(a);
            (Ipv6Addr::from(o).to_string(), 20)
        }
        t => return Err(SocksError::BadAddressType(t)),
    };
    let Some(p) = buf.get(addr_end..addr_end + 2) else {
        return Ok(None);
    };
    Ok(Some((
        SocksTarget {
            host,
            port: u16::from_be_bytes([p[0], p[1]]),
        },
        addr_end + 2,
    )))
}

/// The SOCKS5 method selection reply: "no authentication" or "no acceptable methods".
#[must_use]
pub fn socks5_method_reply(no_auth_offered: bool) -> [u8; 2] {
    [5, if no_auth_offered { 0 } else { 0xff }]
}

/// A SOCKS5 reply with an all-zero IPv4 bound address (clients ignore it for CONNECT).
#[must_use]
pub fn socks5_reply(code: Socks5Reply) -> [u8; 10] {
    [5, code as u8, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// The SOCKS4 reply: 90 granted, 91 rejected.
#[must_use]
pub fn socks4_reply(granted: bool) -> [u8; 8] {
    [0, if granted { 90 } else { 91 }, 0, 0, 0, 0, 0, 0]
}

impl SocksError {
    /// The SOCKS5 reply code that tells the client why.
    #[must_use]
    pub fn socks5_reply(self) -> Socks5Reply {
        match self {
            SocksError::UnsupportedCommand(_) => Socks5Reply::CommandNotSupported,
            SocksError::BadAddressType(_) => Socks5Reply::AddressTypeNotSupported,
            _ => Socks5Reply::GeneralFailure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn socks5_domain_connect() {
        let hello = [5, 2, 0, 2];
        assert_eq!(parse_hello(&hello[..3]), Ok(None));
        assert_eq!(
            parse_hello(&hello),
            Ok(Some((
                SocksHello::V5 {
                    no_auth_offered: true
                },
                4
            )))
        );
        let mut req = vec![5, 1, 0, 3, 9];
        req.extend_from_slice(b"localhost");
        req.extend_from_slice(&8080u16.to_be_bytes());
        for cut in 0..req.len() {
            assert_eq!(parse_socks5_request(&req[..cut]), Ok(None), "cut at {cut}");
        }
        let (t, n) = parse_socks5_request(&req).unwrap().unwrap();
        assert_eq!((t.host.as_str(), t.port, n), ("localhost", 8080, req.len()));
    }

    #[test]
    fn socks5_ipv4_ipv6_and_refusals() {
        let req = [5, 1, 0, 1, 10, 0, 0, 1, 0, 80];
        assert_eq!(
            parse_socks5_request(&req).unwrap().unwrap().0.host,
            "10.0.0.1"
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 22]);
        assert_eq!(parse_socks5_request(&v6).unwrap().unwrap().0.host, "::1");
        assert_eq!(
            parse_socks5_request(&[5, 2, 0, 1, 0]),
            Err(SocksError::UnsupportedCommand(2))
        );
        assert_eq!(
            parse_socks5_request(&[5, 1, 0, 9, 0]),
            Err(SocksError::BadAddressType(9))
        );
        assert_eq!(
            parse_hello(&[5, 1, 2]),
            Ok(Some((
                SocksHello::V5 {
                    no_auth_offered: false
                },
                3
            )))
        );
        assert_eq!(parse_hello(&[6]), Err(SocksError::BadVersion(6)));
    }

    #[test]
    fn socks4_and_4a() {
        let req = [4, 1, 0, 80, 192, 168, 1, 5, b'u', 0];
        let (h, n) = parse_hello(&req).unwrap().unwrap();
        assert_eq!(n, req.len());
        assert_eq!(
            h,
            SocksHello::V4 {
                target: SocksTarget {
                    host: "192.168.1.5".into(),
                    port: 80
                }
            }
        );
        let mut a = vec![4, 1, 0x1f, 0x90, 0, 0, 0, 1, 0];
        a.extend_from_slice(b"web.lan\0");
        let (h, n) = parse_hello(&a).unwrap().unwrap();
        assert_eq!(n, a.len());
        assert_eq!(
            h,
            SocksHello::V4 {
                target: SocksTarget {
                    host: "web.lan".into(),
                    port: 8080
                }
            }
        );
        assert_eq!(parse_hello(&a[..a.len() - 1]), Ok(None));
        assert!(matches!(
            parse_hello(&[4, 2, 0, 80, 1, 2, 3, 4, 0]),
            Err(SocksError::UnsupportedCommand(2))
        ));
        let endless = [&[4u8, 1, 0, 80, 1, 2, 3, 4][..], &[b'x'; MAX_REQUEST]].concat();
        assert_eq!(parse_hello(&endless), Err(SocksError::TooLong));
    }

    proptest! {
        #[test]
        fn never_panics_and_never_overreads(buf in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(Some((_, n))) = parse_hello(&buf) { prop_assert!(n <= buf.len()); }
            if let Ok(Some((_, n))) = parse_socks5_request(&buf) { prop_assert!(n <= buf.len()); }
        }

        #[test]
        fn socks5_domain_round_trip(host in "[a-z][a-z0-9.\\-]{0,60}", port in any::<u16>()) {
            let mut req = vec![5, 1, 0, 3, u8::try_from(host.len()).unwrap()];
            req.extend_from_slice(host.as_bytes());
            req.extend_from_slice(&port.to_be_bytes());
            let (t, n) = parse_socks5_request(&req).unwrap().unwrap();
            prop_assert_eq!(n, req.len());
            prop_assert_eq!(t, SocksTarget { host, port });
        }
    }
}
