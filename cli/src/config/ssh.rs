//! `[[ssh]]` (forwarding client, like `ssh -N -L ... -R ...` under autossh) and `[sshd]`
//! (the forwarding-only server).

use super::{HumanDuration, Validator, check_unique};
use serde::{Deserialize, Serialize};
use sshfwd::known_hosts::StrictHostKeyChecking;
use sshfwd::policy::PermitList;
use sshfwd::spec::{DynamicSpec, ForwardSpec};
use sshfwd::startups::{MaxStartups, NetBlock};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// One `[[ssh]]` destination with all its forwards.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SshSection {
    /// `[user@]host[:port]`.
    pub(crate) destination: Spanned<Destination>,
    /// Private key file.
    #[serde(default)]
    pub(crate) identity: Option<PathBuf>,
    /// User certificate for `identity` (`CertificateFile`). Default: `<identity>-cert.pub`
    /// when it exists, as OpenSSH picks it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) certificate: Option<PathBuf>,
    /// known_hosts file. Default `~/.ssh/known_hosts`.
    #[serde(default)]
    pub(crate) known_hosts: Option<PathBuf>,
    /// Default `yes` in the config (the library's own default is `accept-new`, which suits
    /// one-off `vipgate ssh` runs but not a daemon).
    #[serde(default = "default_strict_host_key_checking")]
    pub(crate) strict_host_key_checking: StrictHostKeyChecking,
    /// `-L` specs.
    #[serde(default)]
    pub(crate) local: Vec<Spanned<LocalSpec>>,
    /// `-R` specs.
    #[serde(default)]
    pub(crate) remote: Vec<Spanned<RemoteSpec>>,
    /// `-D` specs.
    #[serde(default)]
    pub(crate) dynamic: Vec<Spanned<DynamicForward>>,
    /// `ServerAliveInterval`. Default 15 s.
    #[serde(default = "d_alive")]
    pub(crate) server_alive_interval: HumanDuration,
    /// `ServerAliveCountMax`. Default 3.
    #[serde(default = "d_alive_max")]
    pub(crate) server_alive_count_max: u32,
    /// `ExitOnForwardFailure`. Default true (a daemon should not half-start).
    #[serde(default = "d_true")]
    pub(crate) exit_on_forward_failure: bool,
    /// File holding the passphrase of an encrypted `identity`. Default none.
    #[serde(default)]
    pub(crate) passphrase_file: Option<PathBuf>,
    /// File whose first line is the password for password and keyboard-interactive
    /// authentication, tried after the keys; re-read at each login. Default none: a daemon
    /// never tries passwords.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) password_file: Option<PathBuf>,
    /// Also offer the keys of the ssh-agent at `$SSH_AUTH_SOCK`. Default true.
    #[serde(default = "d_true")]
    pub(crate) use_agent: bool,
    /// `GatewayPorts`: local/dynamic forwards without a bind address listen on all addresses
    /// instead of loopback. Default false.
    #[serde(default)]
    pub(crate) gateway_ports: bool,
    /// `Ciphers` (OpenSSH names), most preferred first. Default: russh's order
    /// (chacha20-poly1305 first).
    #[serde(default)]
    pub(crate) ciphers: Vec<Spanned<String>>,
    /// SSH connections kept to this destination; channels are spread over them so that more
    /// than one core encrypts. Default 1 (like OpenSSH), at most 16.
    #[serde(default)]
    pub(crate) connections: Connections,
    /// TCP connect + handshake limit; also how long a local client waits for a reconnect.
    /// Default 10 s, at least 100 ms.
    #[serde(default = "d_connect_timeout", deserialize_with = "at_least_100ms")]
    pub(crate) connect_timeout: HumanDuration,
    /// First reconnect delay (doubles per failure, with jitter). Default 200 ms, at least 10 ms.
    #[serde(default = "d_reconnect_min", deserialize_with = "at_least_10ms")]
    pub(crate) reconnect_min: HumanDuration,
    /// Longest reconnect delay. Default 30 s, at least 100 ms.
    #[serde(default = "d_reconnect_max", deserialize_with = "at_least_100ms")]
    pub(crate) reconnect_max: HumanDuration,
    /// End-to-end probes (autossh's `-M`): every `probe_interval` a channel is opened through
    /// each `-L` to its target and through each `-R` back to this side; a probe that fails or
    /// outlasts `connect_timeout` reconnects the session. Default false.
    #[serde(default)]
    pub(crate) probe: bool,
    /// Time between probes. Default 30 s, at least 1 s.
    #[serde(default = "d_probe_interval", deserialize_with = "at_least_1s")]
    pub(crate) probe_interval: HumanDuration,
    /// `host:port` the probes open a channel to for the `-D` forwards, which have no target
    /// of their own (`[v6]:port` for IPv6). Default none: `-D` is watched by keepalives only.
    #[serde(
        default,
        deserialize_with = "probe_target",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) probe_target: Option<Spanned<String>>,
}

/// `host:port` or `[v6]:port`.
pub(crate) fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    ok.then(|| (host.to_string(), port))
}

fn probe_target<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Spanned<String>>, D::Error> {
    let s = Spanned::<String>::deserialize(d)?;
    match parse_host_port(s.get_ref()) {
        Some(_) => Ok(Some(s)),
        None => Err({
            serde::de::Error::custom(format!("probe_target `{}` is not host:port", s.get_ref()))
        }),
    }
}

/// `[user@]host[:port]` (`[v6]:port` for IPv6; a bare IPv6 address has no port), parsed
/// when the file is read, so `check` refuses exactly what `run` could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Destination {
    /// As written: the destination's name in `show ssh` and reloads.
    pub(crate) text: String,
    pub(crate) user: Option<String>,
    pub(crate) host: String,
    pub(crate) port: Option<u16>,
}

impl Destination {
    /// Splits `[user@]host[:port]`.
    pub(crate) fn parse(dest: &str) -> Result<Self, String> {
        let not_a_destination = || format!("destination `{dest}` is not [user@]host[:port]");
        let bad_port = || format!("bad port in destination `{dest}`");
        let (user, rest) = match dest.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(format!("destination `{dest}` has an empty user name")),
            None => (None, dest),
        };
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, p) = r
                .split_once(']')
                .ok_or_else(|| format!("destination `{dest}`: unbalanced ["))?;
            let port = match p.strip_prefix(':') {
                Some(p) => Some(p.parse::<u16>().map_err(|_| bad_port())?),
                None if p.is_empty() => None,
                None => return Err(not_a_destination()),
            };
            (h, port)
        } else if rest.matches(':').count() == 1 {
            let (h, p) = rest.split_once(':').unwrap_or((rest, ""));
            (h, Some(p.parse::<u16>().map_err(|_| bad_port())?))
        } else {
            (rest, None)
        };
        if host.is_empty() || dest.contains(char::is_whitespace) {
            return Err(not_a_destination());
        }
        Ok(Destination {
            text: dest.to_string(),
            user,
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "[user@]host[:port]", Destination::parse)
    }
}

impl Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// Reads a typed raw field from its text form with `parse`. The parse runs inside the string
/// visitor, so a refusal leaves the TOML deserializer while it still knows the value: the
/// error lands on that value's span (an array element's, not the array's).
fn from_text<'de, D, T, E>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, E>,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    E: std::fmt::Display,
{
    struct Text<T, E> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, E>,
    }
    impl<T, E: std::fmt::Display> serde::de::Visitor<'_> for Text<T, E> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<Er: serde::de::Error>(self, v: &str) -> Result<T, Er> {
            (self.parse)(v).map_err(Er::custom)
        }
    }
    d.deserialize_str(Text { expecting, parse })
}

/// A typed raw field read with [`from_text`] and written back as its text by `--dump`.
macro_rules! parsed_from_text {
    ($(#[$doc:meta])* $name:ident($inner:ty) = $parse:path, $expecting:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub(crate) struct $name(pub(crate) $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                from_text(d, $expecting, $parse).map($name)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }
    };
}

parsed_from_text!(
    /// One `-L` spec (`[bind:]port:host:hostport`, or with unix socket paths).
    LocalSpec(ForwardSpec) = ForwardSpec::parse_local, "an ssh -L spec"
);
parsed_from_text!(
    /// One `-R` spec (`[bind:]port:host:hostport`; port 0 lets the server choose).
    RemoteSpec(ForwardSpec) = ForwardSpec::parse_remote, "an ssh -R spec"
);
parsed_from_text!(
    /// One `-D` spec (`[bind:]port`).
    DynamicForward(DynamicSpec) = DynamicSpec::parse, "an ssh -D spec"
);

/// SSH connections kept to one destination, 1..=16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct Connections(u8);

impl Connections {
    pub(crate) fn get(self) -> usize {
        usize::from(self.0)
    }
}

impl Default for Connections {
    fn default() -> Self {
        Connections(1)
    }
}

impl<'de> Deserialize<'de> for Connections {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::narrow(
            d,
            |n| {
                u8::try_from(n)
                    .ok()
                    .filter(|c| (1..=16).contains(c))
                    .map(Connections)
            },
            |n| format!("connections {n} is out of range 1..=16"),
        )
    }
}
fn d_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn d_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(200))
}
fn d_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn d_probe_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn d_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(15))
}
fn d_alive_max() -> u32 {
    3
}
fn d_true() -> bool {
    true
}

/// `[sshd]`: the forwarding-only server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SshdSection {
    /// Listen address. Default `0.0.0.0:2222`.
    #[serde(default = "d_listen")]
    pub(crate) listen: Spanned<SocketAddr>,
    /// Host key; an ed25519 key is generated there on first start.
    pub(crate) host_key: PathBuf,
    /// authorized_keys file (OpenSSH format, `permitopen=`/`permitlisten=`/`from=` honoured;
    /// `cert-authority` lines with `principals=` admit user certificates).
    pub(crate) authorized_keys: PathBuf,
    /// `TrustedUserCAKeys`: CA public keys whose user certificates log in a user named among
    /// their principals. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) trusted_user_ca_keys: Option<PathBuf>,
    /// `HostCertificate`: a host certificate for `host_key`, presented to clients that trust
    /// its CA. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) host_certificate: Option<PathBuf>,
    /// `host:port` patterns clients may open (-L); empty = any.
    #[serde(default, deserialize_with = "permit_open_list")]
    pub(crate) permit_open: Vec<String>,
    /// `[addr:]port` patterns clients may listen on (-R); empty = any.
    #[serde(default, deserialize_with = "permit_listen_list")]
    pub(crate) permit_listen: Vec<String>,
    /// Unix socket paths clients may listen on (`ssh -R /path:...`): absolute paths, `*`
    /// and `?` in the last component only. Default none (refused).
    #[serde(default, deserialize_with = "path_permit_list")]
    pub(crate) permit_listen_paths: Vec<String>,
    /// Unix sockets clients may connect to (`ssh -L ...:/path`), same patterns. Default none.
    #[serde(default, deserialize_with = "path_permit_list")]
    pub(crate) permit_open_paths: Vec<String>,
    /// Mode of the sockets `-R /path` creates (TOML octal, `0o660`); the owner must keep
    /// read and write. Default `0o600` (OpenSSH's `StreamLocalBindMask 0177`).
    #[serde(default = "d_socket_mode", deserialize_with = "socket_mode")]
    pub(crate) socket_mode: u32,
    /// `GatewayPorts`: remote forwards may listen on the address the client asks for;
    /// otherwise they listen on loopback only. Default false.
    #[serde(default)]
    pub(crate) gateway_ports: bool,
    /// Drop a client that sent nothing (not even an answer to the server's keepalives, sent
    /// every 30 s) for this long. Default 10 min, at least 1 s.
    #[serde(default = "d_idle_timeout", deserialize_with = "at_least_1s")]
    pub(crate) idle_timeout: HumanDuration,
    /// `LoginGraceTime`: a connection not authenticated by then is closed. Default 30 s,
    /// 1 s to 10 min.
    #[serde(default = "d_login_grace", deserialize_with = "login_grace")]
    pub(crate) login_grace_time: HumanDuration,
    /// `MaxStartups` `start:rate:full` (or one number). Default `10:30:100`.
    #[serde(default, deserialize_with = "max_startups", serialize_with = "as_text")]
    pub(crate) max_startups: MaxStartups,
    /// `PerSourceMaxStartups`: unauthenticated connections per source network, 1..=100000
    /// or `"none"`. Default 10.
    #[serde(default = "d_per_source", deserialize_with = "per_source")]
    pub(crate) per_source_max_startups: Option<u32>,
    /// `PerSourceNetBlockSize` `v4len[:v6len]`. Default `32:128`.
    #[serde(default, deserialize_with = "netblock", serialize_with = "as_text")]
    pub(crate) per_source_netblock_size: NetBlock,
    /// Forwarded channels open at once per session, 1..=65536. Default 256.
    #[serde(default = "d_channels_session", deserialize_with = "cap")]
    pub(crate) max_channels_per_session: u32,
    /// `-R` listeners per session, 1..=65536. Default 16.
    #[serde(default = "d_listeners_session", deserialize_with = "cap")]
    pub(crate) max_listeners_per_session: u32,
    /// Forwarded channels open at once in the server, 1..=65536. Default 4096.
    #[serde(default = "d_channels", deserialize_with = "cap")]
    pub(crate) max_channels: u32,
    /// `-R` listeners in the server, 1..=65536. Default 256.
    #[serde(default = "d_listeners", deserialize_with = "cap")]
    pub(crate) max_listeners: u32,
}

fn d_socket_mode() -> u32 {
    0o600
}

fn socket_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(d)?;
    u32::try_from(n)
        .ok()
        .filter(|m| *m <= 0o777 && m & 0o600 == 0o600)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "socket_mode {n:#o} must be within 0o600..=0o777 and keep the owner's rw (0o600)"
            ))
        })
}

fn path_permit_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    sshfwd::sockpath::PathPermit::parse(&v).map_err(serde::de::Error::custom)?;
    Ok(v)
}

fn d_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}
fn d_login_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn d_per_source() -> Option<u32> {
    Some(10)
}
fn d_channels_session() -> u32 {
    256
}
fn d_listeners_session() -> u32 {
    16
}
fn d_channels() -> u32 {
    4096
}
fn d_listeners() -> u32 {
    256
}

/// A duration within `min..=max`; the error lands on the value's place in the file.
fn duration_in<'de, D: serde::Deserializer<'de>>(
    d: D,
    min: Duration,
    max: Duration,
) -> Result<HumanDuration, D::Error> {
    let v = HumanDuration::deserialize(d)?;
    if v.0 < min || v.0 > max {
        return Err(serde::de::Error::custom(format!(
            "{v} is out of range {}..={}",
            HumanDuration(min),
            HumanDuration(max)
        )));
    }
    Ok(v)
}

const A_YEAR: Duration = Duration::from_secs(365 * 86_400);

fn at_least_10ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    duration_in(d, Duration::from_millis(10), A_YEAR)
}
fn at_least_100ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    duration_in(d, Duration::from_millis(100), A_YEAR)
}
fn at_least_1s<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    duration_in(d, Duration::from_secs(1), A_YEAR)
}
fn login_grace<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    duration_in(d, Duration::from_secs(1), Duration::from_secs(600))
}

fn as_text<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn max_startups<'de, D: serde::Deserializer<'de>>(d: D) -> Result<MaxStartups, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

fn netblock<'de, D: serde::Deserializer<'de>>(d: D) -> Result<NetBlock, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CountOrNone {
    Count(i64),
    Word(String),
}

fn per_source<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match CountOrNone::deserialize(d)? {
        CountOrNone::Word(w) if w == "none" => Ok(None),
        CountOrNone::Count(n) if (1..=i64::from(sshfwd::startups::MAX_FULL)).contains(&n) => {
            Ok(u32::try_from(n).ok())
        }
        _ => Err(serde::de::Error::custom(format!(
            "per_source_max_startups must be 1..={} or \"none\"",
            sshfwd::startups::MAX_FULL
        ))),
    }
}

fn cap<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(d)?;
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=65_536).contains(n))
        .ok_or_else(|| serde::de::Error::custom(format!("{n} is out of range 1..=65536")))
}

/// Deserializes a permit list, refusing bad entries at their place in the file.
fn permit_open_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    PermitList::parse(&v, false).map_err(serde::de::Error::custom)?;
    Ok(v)
}

fn permit_listen_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    PermitList::parse(&v, true).map_err(serde::de::Error::custom)?;
    Ok(v)
}

fn d_listen() -> Spanned<SocketAddr> {
    Spanned::new(0..0, SocketAddr::from(([0, 0, 0, 0], 2222)))
}

fn default_strict_host_key_checking() -> StrictHostKeyChecking {
    StrictHostKeyChecking::Yes
}

impl SshdSection {
    /// Warns when other hosts can reach the server and no list limits what an authorized
    /// key may forward (an empty or absent list means anything).
    pub(crate) fn validate(&self, v: &mut Validator) {
        if !self.listen.get_ref().ip().is_loopback()
            && self.permit_open.is_empty()
            && self.permit_listen.is_empty()
        {
            v.warn_at(
                &self.listen,
                format!(
                    "[sshd] listens on {} and neither permit_open nor permit_listen is set: \
                     any authorized key may forward anywhere and listen on any port",
                    self.listen.get_ref()
                ),
            );
        }
    }
}

/// `complete`: no key of any `[[ssh]]` was cut out for a serde error, so an empty forward
/// list is what the file says (not a list refused element by element).
pub(crate) fn validate_all(dests: &[SshSection], complete: bool, v: &mut Validator) {
    check_unique(
        dests
            .iter()
            .map(|d| (d.destination.get_ref().text.clone(), d.destination.span())),
        "ssh destination",
        v,
    );
    for d in dests {
        for c in &d.ciphers {
            if !sshfwd::options::CIPHERS.contains(&c.get_ref().as_str()) {
                v.error_at(
                    c,
                    format!(
                        "unsupported cipher `{}`; supported: {}",
                        c.get_ref(),
                        sshfwd::options::CIPHERS.join(", ")
                    ),
                );
            }
        }
        if d.reconnect_min.0 > d.reconnect_max.0 {
            v.error_at(&d.destination, "reconnect_min is longer than reconnect_max");
        }
        if d.probe && !d.dynamic.is_empty() && d.probe_target.is_none() {
            v.warn_at(
                &d.destination,
                "probe = true does not reach the dynamic (-D) forwards, which have no target \
                 of their own: name one with probe_target (keepalives alone watch them now)",
            );
        }
        if let Some(t) = d.probe_target.as_ref().filter(|_| !d.probe) {
            v.warn_at(t, "probe_target is unused without probe = true");
        }
        if complete && d.local.is_empty() && d.remote.is_empty() && d.dynamic.is_empty() {
            v.error_at(
                &d.destination,
                "this destination has no local, remote or dynamic forwards",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sshd(extra: &str) -> Result<SshdSection, toml::de::Error> {
        toml::from_str(&format!(
            "host_key = \"/k\"\nauthorized_keys = \"/a\"\n{extra}"
        ))
    }

    #[test]
    fn sshd_defaults_are_bounded() {
        let s = sshd("").unwrap();
        assert_eq!(s.login_grace_time.0, Duration::from_secs(30));
        assert_eq!(s.idle_timeout.0, Duration::from_secs(600));
        assert_eq!(s.max_startups, MaxStartups::default());
        assert_eq!(s.per_source_max_startups, Some(10));
        assert_eq!(s.socket_mode, 0o600);
        assert!(s.permit_listen_paths.is_empty() && s.permit_open_paths.is_empty());
    }

    #[test]
    fn sshd_values_that_misbehave_are_refused_at_their_place() {
        for (bad, line) in [
            ("idle_timeout = \"0s\"", 3),
            ("login_grace_time = \"0s\"", 3),
            ("max_startups = \"100:30:10\"", 3),
            ("per_source_max_startups = 0", 3),
            ("per_source_netblock_size = \"33\"", 3),
            ("max_channels = 4294967296", 3),
            ("max_listeners_per_session = 0", 3),
            ("socket_mode = 0o1777", 3),
            ("socket_mode = 0o060", 3),
            ("permit_listen_paths = [\"/run/*/x\"]", 3),
            ("permit_open_paths = [\"/run/../x\"]", 3),
            ("permit_listen_paths = [\"run/x\"]", 3),
        ] {
            let e = sshd(bad).unwrap_err();
            let span = e.span().unwrap();
            let text = format!("host_key = \"/k\"\nauthorized_keys = \"/a\"\n{bad}");
            assert_eq!(text[..span.start].lines().count(), line, "{bad}: {e}");
        }
        assert_eq!(
            sshd("per_source_max_startups = \"none\"")
                .unwrap()
                .per_source_max_startups,
            None
        );
    }

    #[test]
    fn client_connections_are_narrowed_where_they_are_written() {
        let e = crate::config::parse(
            std::path::Path::new("site.toml"),
            "[[ssh]]\ndestination = \"u@h\"\nlocal = [\"1:h:2\"]\nconnections = 17\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "site.toml:4:15: connections 17 is out of range 1..=16");
    }

    #[test]
    fn destinations_and_specs_are_parsed_where_they_are_written() {
        let parse = |body: &str| {
            crate::config::parse(
                std::path::Path::new("site.toml"),
                &format!("[[ssh]]\n{body}"),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            parse("destination = \"u@h:x\"\nlocal = [\"1:h:2\"]\n").unwrap_err(),
            "site.toml:2:15: bad port in destination `u@h:x`"
        );
        let e = parse("destination = \"u@h\"\nlocal = [\"1:h:2\", \"nope\"]\nremote = [\"x\"]\n")
            .unwrap_err();
        assert_eq!(
            e,
            "site.toml:3:19: bad local forwarding specification 'nope'\n\
             site.toml:4:11: bad remote forwarding specification 'x'"
        );
        assert!(parse("destination = \"ops@[::1]:2222\"\ndynamic = [\"1080\"]\n").is_ok());
    }

    #[test]
    fn probes_and_reverse_dynamic_forwards_lower() {
        let lower = |body: &str| {
            let d: SshSection = toml::from_str(&format!("destination = \"u@h\"\n{body}")).unwrap();
            crate::config::lower::ssh_client(&d)
        };
        let cfg = lower("remote = [\"1080\", \"9000:localhost:22\"]\n");
        assert_eq!(cfg.probe_interval, None);
        assert_eq!(cfg.remote[0].connect, None);
        assert!(cfg.remote[1].connect.is_some());
        let cfg = lower("local = [\"1:h:2\"]\nprobe = true\n");
        assert_eq!(cfg.probe_interval, Some(Duration::from_secs(30)));
        let cfg = lower("local = [\"1:h:2\"]\nprobe = true\nprobe_interval = \"5s\"\n");
        assert_eq!(cfg.probe_interval, Some(Duration::from_secs(5)));
        let cfg = lower("dynamic = [\"1080\"]\nprobe = true\nprobe_target = \"[::1]:80\"\n");
        assert_eq!(cfg.probe_target, Some(("::1".to_string(), 80)));
        let bad: Result<SshSection, _> =
            toml::from_str("destination = \"u@h\"\nprobe_target = \"web\"\n");
        assert!(bad.unwrap_err().to_string().contains("is not host:port"));
    }

    #[test]
    fn destination_forms() {
        let d = |s: &str| {
            let d = Destination::parse(s).unwrap();
            (d.user, d.host, d.port)
        };
        assert_eq!(d("ops@web"), (Some("ops".into()), "web".into(), None));
        assert_eq!(
            d("ops@203.0.113.5:2222"),
            (Some("ops".into()), "203.0.113.5".into(), Some(2222))
        );
        assert_eq!(d("[::1]:22"), (None, "::1".into(), Some(22)));
        assert_eq!(d("::1"), (None, "::1".into(), None));
        for bad in ["@h", "h:x", "", "a b", "[::1", "[::1]x"] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_zero_durations_are_refused() {
        for bad in [
            "connect_timeout = \"0s\"",
            "reconnect_min = \"0s\"",
            "reconnect_max = \"0s\"",
            "probe_interval = \"500ms\"",
        ] {
            let r: Result<SshSection, _> = toml::from_str(&format!(
                "destination = \"u@h\"\nlocal = [\"1:h:2\"]\n{bad}"
            ));
            assert!(r.unwrap_err().to_string().contains("out of range"), "{bad}");
        }
    }
}
