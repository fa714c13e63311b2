//! `[[service]]`: load-balanced virtual services (ipvsadm `-A -t VIP:port -s wrr -p 300` +
//! `-a -r RS -m -w N`, or `-g` for direct routing; `-u` for UDP, `-o` for one-packet
//! scheduling; keepalived `virtual_server`).

use super::host::Reach;
use super::nat::{NatSection, PortItem, PortRange};
use super::{HumanDuration, Validator, check_unique};
use balance::SchedulerKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use toml::Spanned;

/// Health check kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HealthKind {
    /// TCP connect.
    #[default]
    Tcp,
    /// HTTP GET `path`, expecting `status`.
    Http,
    /// The same over TLS (keepalived `SSL_GET`, HAProxy `check-ssl`).
    Https,
    /// A datagram `send`, answered with one holding `expect` (keepalived `UDP_CHECK`).
    Udp,
}

/// `health = { kind = "tcp", interval = "2s", timeout = "1s", rise = 2, fall = 4 }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthSection {
    #[serde(default)]
    pub(crate) kind: HealthKind,
    /// Default 2 s (Alteon, HAProxy).
    #[serde(default = "d_interval")]
    pub(crate) interval: Spanned<HumanDuration>,
    /// Default 1 s.
    #[serde(default = "d_timeout")]
    pub(crate) timeout: Spanned<HumanDuration>,
    /// Successes to come up. Default 2.
    #[serde(default = "d_rise")]
    pub(crate) rise: Spanned<u32>,
    /// Failures to go down. Default 4 (Alteon).
    #[serde(default = "d_fall")]
    pub(crate) fall: Spanned<u32>,
    /// HTTP path. Default `/`.
    #[serde(default = "d_path")]
    pub(crate) path: Spanned<String>,
    /// Expected HTTP status. Default 200.
    #[serde(default = "d_status")]
    pub(crate) status: u16,
    /// A string the HTTP answer's body (or the UDP answer) must hold (HAProxy `http-check
    /// expect string`).
    #[serde(default)]
    pub(crate) expect: Option<Spanned<String>>,
    /// UDP: the datagram's payload (keepalived `UDP_CHECK` `payload`).
    #[serde(default)]
    pub(crate) send: Option<Spanned<String>>,
    /// HTTPS: the name sent as SNI and verified (HAProxy `check-sni`); default none, and the
    /// certificate must name the backend's address.
    #[serde(default)]
    pub(crate) sni: Option<Spanned<String>>,
    /// HTTPS: whether the certificate must verify. Default true (`false` is HAProxy's
    /// `verify none`).
    #[serde(default)]
    pub(crate) verify: Option<Spanned<bool>>,
    /// HTTPS: PEM file of the CAs to trust instead of the system's (HAProxy `ca-file`).
    #[serde(default)]
    pub(crate) ca_file: Option<Spanned<std::path::PathBuf>>,
    /// Port of an agent on each backend to ask as well (HAProxy `agent-check` with
    /// `agent-port`).
    #[serde(default)]
    pub(crate) agent_port: Option<Spanned<u16>>,
    /// Time between two questions to the agent (HAProxy `agent-inter`). Default: `interval`.
    #[serde(default)]
    pub(crate) agent_interval: Option<Spanned<HumanDuration>>,
    /// Port the probes connect to instead of the backend's (keepalived `connect_port`,
    /// HAProxy `port`).
    #[serde(default)]
    pub(crate) port: Option<Spanned<u16>>,
}

fn d_interval() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(2)))
}
fn d_timeout() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(1)))
}
fn d_rise() -> Spanned<u32> {
    Spanned::new(0..0, 2)
}
fn d_fall() -> Spanned<u32> {
    Spanned::new(0..0, 4)
}
fn d_path() -> Spanned<String> {
    Spanned::new(0..0, "/".into())
}

/// Longest persistence accepted (ipvsadm has no bound; a template lives this long).
const MAX_PERSISTENCE: Duration = Duration::from_secs(24 * 3600);
/// Shortest health interval and timeout: below this a probe loop spins.
const MIN_HEALTH_PERIOD: Duration = Duration::from_millis(100);
/// Longest health interval and timeout accepted.
const MAX_HEALTH_PERIOD: Duration = Duration::from_secs(3600);
/// Longest HTTP health path.
const MAX_HEALTH_PATH: usize = 1024;
/// Longest `expect` string: a search string, far below the body bytes a probe reads
/// (`natgw::health::MAX_CHECKED_RESPONSE`).
const MAX_HEALTH_EXPECT: usize = 1024;
/// Longest UDP check payload: one datagram, well inside any MTU's worth of headers.
const MAX_HEALTH_SEND: usize = 1024;
/// Longest slow start accepted (HAProxy's and nginx's are typically seconds to minutes).
const MAX_SLOW_START: Duration = Duration::from_secs(3600);
fn d_status() -> u16 {
    200
}

/// `"10.0.0.1:80"`, or `"10.0.0.1"` for no port (read as port 0, LVS's "the client's
/// port", which is also how it is written back and shown).
fn endpoint<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Spanned<SocketAddrV4>, D::Error> {
    let text: Spanned<String> = Spanned::deserialize(d)?;
    let span = text.span();
    let t = text.get_ref();
    let addr = t
        .parse::<SocketAddrV4>()
        .or_else(|_| t.parse::<Ipv4Addr>().map(|ip| SocketAddrV4::new(ip, 0)))
        .map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid address {t:?}: write an IPv4 address with a port (\"10.0.0.1:80\") or without one (\"10.0.0.1\": the connection's own port)"
            ))
        })?;
    Ok(Spanned::new(span, addr))
}

/// [`endpoint`], optional.
fn optional_endpoint<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Spanned<SocketAddrV4>>, D::Error> {
    endpoint(d).map(Some)
}

/// One real server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendSection {
    /// Without a port (port 0): each connection keeps its destination port, or its rport.
    #[serde(deserialize_with = "endpoint")]
    pub(crate) address: Spanned<SocketAddrV4>,
    /// 0 drains; at most 65535. Default 1.
    #[serde(default = "d_weight")]
    pub(crate) weight: Spanned<u32>,
    /// Upper connection threshold (ipvsadm `-x`); 0 or absent: none.
    #[serde(default)]
    pub(crate) max_connections: u32,
    /// Lower connection threshold (ipvsadm `-y`); needs `max_connections`.
    #[serde(default)]
    pub(crate) min_connections: Option<Spanned<u32>>,
}

fn d_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

fn d_netmask() -> Spanned<u8> {
    Spanned::new(0..0, 32)
}

/// One `[[service]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceSection {
    pub(crate) name: Spanned<String>,
    /// Virtual address and port (the VIP); the address alone (port 0) with `ports`.
    #[serde(deserialize_with = "endpoint")]
    pub(crate) listen: Spanned<SocketAddrV4>,
    /// A multi-port service's ports: `[80, 443, "8000-8100"]` (LVS firewall-mark service,
    /// keepalived `virtual_server_group`); instead of a port in `listen`.
    #[serde(default)]
    pub(crate) ports: Option<Spanned<Vec<Spanned<PortItem>>>>,
    /// Backend port per service port of a multi-port service: `{ 443 = 8443, 8000-8009 =
    /// 9000 }` (a range shifts: 8000 → 9000, 8001 → 9001, ...). Ports not listed keep
    /// their number.
    #[serde(default)]
    pub(crate) rports: Option<Spanned<BTreeMap<Spanned<String>, Spanned<u16>>>>,
    /// Default `wlc`, as ipvsadm.
    #[serde(default)]
    pub(crate) scheduler: SchedulerKind,
    /// Client affinity timeout (ipvsadm `-p`); off when absent.
    #[serde(default)]
    pub(crate) persistence: Option<HumanDuration>,
    /// Prefix length that groups clients for persistence (ipvsadm `-M`). Default 32.
    #[serde(default = "d_netmask")]
    pub(crate) persistence_netmask: Spanned<u8>,
    /// `sh`/`mh` hash the client port too (ipvsadm `sh-port` / `mh-port`). Default false.
    #[serde(default)]
    pub(crate) hash_port: bool,
    /// `sh`/`mh` send a client whose backend is overloaded to another one (ipvsadm
    /// `sh-fallback` / `mh-fallback`). Default false.
    #[serde(default)]
    pub(crate) fallback: Option<Spanned<bool>>,
    /// Most connections the whole service holds; 0 or absent: no limit.
    #[serde(default)]
    pub(crate) max_connections: u32,
    /// Linear ramp of a backend coming up to its weight; off when absent.
    #[serde(default)]
    pub(crate) slow_start: Option<Spanned<HumanDuration>>,
    /// Health checks; without them every backend counts as up.
    #[serde(default)]
    pub(crate) health: Option<HealthSection>,
    pub(crate) backends: Spanned<Vec<BackendSection>>,
    /// Used when every backend is down; without it new connections get a TCP RST.
    #[serde(default, deserialize_with = "optional_endpoint")]
    pub(crate) sorry: Option<Spanned<SocketAddrV4>>,
    /// How connections reach the backends: `"nat"` (LVS-NAT, ipvsadm `-m`, the default) or
    /// `"dr"` (direct routing, ipvsadm `-g`).
    #[serde(default)]
    pub(crate) forward: Option<Spanned<String>>,
    /// `"tcp"` (ipvsadm `-t`, the default) or `"udp"` (`-u`).
    #[serde(default)]
    pub(crate) proto: Option<Spanned<String>>,
    /// UDP: schedule each datagram on its own, with no flow (ipvsadm `-o`). Default false.
    #[serde(default)]
    pub(crate) one_packet: Option<Spanned<bool>>,
}

impl ServiceSection {
    /// The service's protocol (`proto = "udp"`; an invalid value is reported by validation
    /// and taken as TCP).
    pub(crate) fn proto(&self) -> natgw::Proto {
        match self.proto.as_ref().map(|p| p.get_ref().as_str()) {
            Some("udp") => natgw::Proto::Udp,
            _ => natgw::Proto::Tcp,
        }
    }

    /// Whether each datagram is scheduled on its own (`one_packet = true`).
    pub(crate) fn one_packet(&self) -> bool {
        self.one_packet.as_ref().is_some_and(|o| *o.get_ref())
    }

    /// Whether the service uses direct routing (`forward = "dr"`; an invalid value is
    /// reported by validation and taken as NAT).
    pub(crate) fn direct_route(&self) -> bool {
        self.forward.as_ref().is_some_and(|f| f.get_ref() == "dr")
    }

    /// The rport rules as written, each with the span of its key (`None` in place of a key
    /// that is not a port or range).
    fn rport_rules(&self) -> Vec<(Option<natgw::PortRule>, &Spanned<String>, &Spanned<u16>)> {
        let Some(rports) = &self.rports else {
            return Vec::new();
        };
        rports
            .get_ref()
            .iter()
            .map(|(key, to)| {
                let text = key.get_ref().as_str();
                let (a, b) = text.split_once('-').unwrap_or((text, text));
                let rule = match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
                    (Ok(first), Ok(last)) if first <= last => Some(natgw::PortRule {
                        ports: first..=last,
                        to: *to.get_ref(),
                    }),
                    _ => None,
                };
                (rule, key, to)
            })
            .collect()
    }

    /// A multi-port service's ports and rports, or why they cannot run; `None` for a
    /// single-port service.
    pub(crate) fn service_ports(&self) -> Option<Result<natgw::ServicePorts, natgw::PortsError>> {
        self.ports.as_ref()?;
        let ranges = self.port_items().map(|(r, _)| r.first..=r.last).collect();
        let rules = self
            .rport_rules()
            .into_iter()
            .filter_map(|(r, _, _)| r)
            .collect();
        Some(natgw::ServicePorts::new(ranges, rules))
    }

    /// The valid items of `ports` with the span each was written at (validation reports the
    /// others).
    fn port_items(&self) -> impl Iterator<Item = (PortRange, std::ops::Range<usize>)> + '_ {
        self.ports
            .iter()
            .flat_map(|ports| ports.get_ref())
            .filter_map(|item| Some((item.get_ref().range()?, item.span())))
    }

    /// Every port the service listens on, as ranges with the span they were written at.
    fn port_ranges(&self) -> Vec<(std::ops::RangeInclusive<u16>, std::ops::Range<usize>)> {
        match &self.ports {
            Some(_) => self
                .port_items()
                .map(|(r, span)| (r.first..=r.last, span))
                .collect(),
            None => {
                let p = self.listen.get_ref().port();
                vec![(p..=p, self.listen.span())]
            }
        }
    }

    /// The backend endpoints a real server at `real` is reached on: `real` when it has a
    /// port, else one per service port (after rports).
    fn reached_endpoints(&self, real: SocketAddrV4) -> Vec<SocketAddrV4> {
        if real.port() != 0 {
            return vec![real];
        }
        match self.service_ports() {
            Some(Ok(ports)) => ports
                .iter()
                .map(|p| SocketAddrV4::new(*real.ip(), ports.backend_port(p)))
                .collect(),
            Some(Err(_)) => Vec::new(),
            None => vec![SocketAddrV4::new(*real.ip(), self.listen.get_ref().port())],
        }
    }
}

/// `[lb]`: settings of a director's own gateway (a site with `[[service]]` and no `[nat]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LbSection {
    /// Which data path moves the services' established flows: `"kernel"` (the eBPF fast path
    /// at TC where it loads; the TUN otherwise) or `"tun"`. Default `"kernel"`. With `[nat]`
    /// the services join the PAT gateway and `[nat] datapath` decides.
    #[serde(default)]
    pub(crate) datapath: Option<Spanned<String>>,
}

impl LbSection {
    /// The data path value is one of the two; it is not set where `[nat]` decides.
    pub(crate) fn validate(&self, nat: bool, v: &mut Validator) {
        let Some(d) = &self.datapath else { return };
        if !matches!(d.get_ref().as_str(), "kernel" | "tun") {
            v.error_at(
                d,
                format!(
                    "datapath must be \"kernel\" or \"tun\", not {:?}",
                    d.get_ref()
                ),
            );
        } else if nat {
            v.error_at(
                d,
                "with [nat] the services join the PAT gateway: set its data path with [nat] datapath",
            );
        }
    }
}

/// A real server's address and port serves one listener (service or static forward) of a
/// protocol at a time: the gateway finds a reply's flow from its source endpoint, so two
/// listeners sharing one would take each other's replies (the second one's connections would
/// hang). Refused here, at the later backend, until replies are matched on the whole
/// 4-tuple. One endpoint may serve a TCP and a UDP service (DNS on both).
fn check_endpoints_serve_one_listener(
    services: &[ServiceSection],
    nat: Option<&NatSection>,
    v: &mut Validator,
) {
    let mut owner: std::collections::HashMap<(natgw::Proto, SocketAddrV4), String> = nat
        .into_iter()
        .flat_map(|n| &n.statics)
        .map(|st| {
            (
                (*st.proto.get_ref(), st.inside),
                format!(
                    "the [[nat.static]] forward of port {}",
                    st.outside_port.get_ref()
                ),
            )
        })
        .collect();
    for s in services {
        let name = s.name.get_ref();
        let proto = s.proto();
        let mine = s
            .backends
            .get_ref()
            .iter()
            .map(|b| &b.address)
            .chain(s.sorry.as_ref());
        let mut claimed = Vec::new();
        for real in mine {
            let reached = s.reached_endpoints(*real.get_ref());
            match reached
                .iter()
                .find_map(|e| Some((e, owner.get(&(proto, *e))?)))
            {
                Some((endpoint, other)) => v.error_at(
                    real,
                    format!(
                        "{endpoint} already serves {other}: a real server's address and port can serve one \
                         service or forward at a time (replies are told apart by it); give it \
                         another port for service `{name}`"
                    ),
                ),
                None => claimed.extend(reached),
            }
        }
        for endpoint in claimed {
            owner.insert((proto, endpoint), format!("service `{name}`"));
        }
    }
}

/// A VIP's port of a protocol belongs to one service: a port written twice, or in two
/// services' `listen`/`ports` (a range overlapping another service's), is refused at the
/// later place, naming the first.
fn check_ports_serve_one_service(services: &[ServiceSection], v: &mut Validator) {
    type Claim = (
        natgw::Proto,
        Ipv4Addr,
        std::ops::RangeInclusive<u16>,
        std::ops::Range<usize>,
        String,
    );
    let mut claims: Vec<Claim> = Vec::new();
    for s in services {
        let (proto, ip) = (s.proto(), *s.listen.get_ref().ip());
        for (range, span) in s.port_ranges() {
            if *range.start() == 0 {
                continue; // reported by validate_ports
            }
            let clash = claims.iter().find(|(p, a, r, _, _)| {
                *p == proto && *a == ip && r.start() <= range.end() && range.start() <= r.end()
            });
            if let Some((_, _, r, first, owner)) = clash {
                let port = (*r.start()).max(*range.start());
                let place = v.place_of(first.start);
                v.error(
                    span.clone(),
                    format!(
                        "{proto} {ip}:{port} is already a port of service `{owner}` (at {place}): a VIP's port serves one service"
                    ),
                );
            } else {
                claims.push((proto, ip, range, span, s.name.get_ref().clone()));
            }
        }
    }
}

/// `ports` replaces the port of `listen` (one or the other), holds 1 to
/// [`natgw::MAX_SERVICE_PORTS`] ports, and goes with port-less backends; `rports` maps ports
/// of the service, one to one, into 1..=65535.
fn validate_ports(s: &ServiceSection, v: &mut Validator) {
    let name = s.name.get_ref();
    let listen_port = s.listen.get_ref().port();
    let Some(ports) = &s.ports else {
        if listen_port == 0 {
            v.error_at(
                &s.listen,
                format!(
                    "service `{name}`: listen needs a port (\"{}:80\"), or the service needs ports = [...]",
                    s.listen.get_ref().ip()
                ),
            );
        }
        if let Some(r) = &s.rports {
            v.error_at(
                r,
                format!("service `{name}`: rports map the ports of a multi-port service (ports = [...]); give a single-port service's backends their port instead"),
            );
        }
        return;
    };
    if listen_port != 0 {
        v.error_at(
            &s.listen,
            format!(
                "service `{name}` has ports = [...]: listen is its address alone (\"{}\"), not a port too",
                s.listen.get_ref().ip()
            ),
        );
    }
    if ports.get_ref().is_empty() {
        v.error_at(ports, format!("service `{name}`: ports is empty"));
        return;
    }
    let mut items_ok = true;
    for item in ports.get_ref() {
        match &item.get_ref().0 {
            Err(why) => {
                v.error_at(item, why.clone());
                items_ok = false;
            }
            Ok(range) if range.first == 0 => {
                v.error_at(item, "port 0 is not a service port: ports are 1..=65535");
                items_ok = false;
            }
            Ok(_) => {}
        }
    }
    if s.one_packet() {
        v.error_at(
            ports,
            "one_packet services listen on one port (ipvsadm -o with a firewall mark is not offered)",
        );
    }
    for b in s.backends.get_ref() {
        if b.address.get_ref().port() != 0 {
            v.error_at(
                &b.address,
                format!(
                    "service `{name}` listens on several ports: backend {} takes no port (\"{}\": each connection keeps its port; map one with rports)",
                    b.address.get_ref(),
                    b.address.get_ref().ip()
                ),
            );
        }
    }
    if let Some(sorry) = s.sorry.as_ref().filter(|a| a.get_ref().port() != 0) {
        v.error_at(
            sorry,
            format!(
                "service `{name}` listens on several ports: the sorry server takes no port (\"{}\")",
                sorry.get_ref().ip()
            ),
        );
    }
    let service_ports: Vec<std::ops::RangeInclusive<u16>> =
        s.port_items().map(|(r, _)| r.first..=r.last).collect();
    let mut rules_ok = true;
    for (rule, key, to) in s.rport_rules() {
        let Some(rule) = rule else {
            v.error_at(
                key,
                format!(
                    "rports key {:?} is not a port or a range (443 or 8000-8009)",
                    key.get_ref()
                ),
            );
            rules_ok = false;
            continue;
        };
        if let Some(p) = rule
            .ports
            .clone()
            .find(|p| !service_ports.iter().any(|r| r.contains(p)))
        {
            v.error_at(
                key,
                format!("rport for port {p}, which is not one of service `{name}`'s ports"),
            );
            rules_ok = false;
        }
        let span = rule.ports.end() - rule.ports.start();
        if rule.to == 0 || rule.to.checked_add(span).is_none() {
            v.error_at(
                to,
                format!(
                    "rports {} from {}: the backend ports run outside 1..=65535",
                    key.get_ref(),
                    rule.to
                ),
            );
            rules_ok = false;
        }
    }
    if !rules_ok || !items_ok {
        return;
    }
    if let Some(Err(e)) = s.service_ports() {
        if matches!(e, natgw::PortsError::Twice(_)) {
            return; // reported with both places by check_ports_serve_one_service
        }
        let at = match &e {
            natgw::PortsError::TwoRules(_) | natgw::PortsError::SharedBackendPort(..) => s
                .rports
                .as_ref()
                .map_or_else(|| ports.span(), Spanned::span),
            _ => ports.span(),
        };
        v.error(at, format!("service `{name}`: {e}"));
    }
}

/// Checks what direct routing needs of a service: the real servers listen on the VIP's port
/// (the packet reaches them unchanged), and the data path can change a frame's MACs (the
/// kernel path; the TUN hands the core IP packets only, and writes back IP packets that the
/// kernel routes by their destination, the VIP). `datapath` is the `[nat]` or `[lb]` value
/// that decides this site's data path.
fn validate_forward(s: &ServiceSection, datapath: Option<&Spanned<String>>, v: &mut Validator) {
    let Some(f) = &s.forward else { return };
    match f.get_ref().as_str() {
        "nat" => return,
        "dr" => {}
        other => {
            v.error_at(
                f,
                format!(
                    "forward must be \"nat\" (ipvsadm -m) or \"dr\" (direct routing, ipvsadm -g), not {other:?}"
                ),
            );
            return;
        }
    }
    let port = s.listen.get_ref().port();
    if let Some(r) = &s.rports {
        v.error_at(
            r,
            format!(
                "service `{}` forwards by direct routing, which delivers the packet unchanged: it cannot map ports (rports)",
                s.name.get_ref()
            ),
        );
    }
    for b in s.backends.get_ref() {
        // A port-less backend keeps the port (a multi-port service's are all port-less).
        if b.address.get_ref().port() != port && b.address.get_ref().port() != 0 {
            v.error_at(
                &b.address,
                format!(
                    "service `{}` forwards by direct routing: backend {} must listen on the VIP's port {port} (the packet reaches it unchanged)",
                    s.name.get_ref(),
                    b.address.get_ref()
                ),
            );
        }
    }
    if let Some(sorry) = &s.sorry
        && sorry.get_ref().port() != port
        && sorry.get_ref().port() != 0
    {
        v.error_at(
            sorry,
            format!(
                "service `{}` forwards by direct routing: the sorry server must listen on the VIP's port {port}",
                s.name.get_ref()
            ),
        );
    }
    let reals = s
        .backends
        .get_ref()
        .iter()
        .map(|b| &b.address)
        .chain(s.sorry.as_ref());
    let unreachable: Vec<(std::ops::Range<usize>, String)> = v
        .host()
        .map(|routes| {
            reals
                .filter_map(|a| {
                    let ip = *a.get_ref().ip();
                    let why = match routes.reach(ip) {
                        Reach::OnLink => return None,
                        Reach::Via(gw) => format!("this host reaches it through the gateway {gw}"),
                        Reach::Unreachable => "this host has no route to it".to_owned(),
                    };
                    Some((
                        a.span(),
                        format!(
                            "service `{}` forwards by direct routing: {} is not on a directly connected network ({why}); direct routing delivers by MAC on a shared segment",
                            s.name.get_ref(),
                            a.get_ref()
                        ),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    for (span, message) in unreachable {
        v.error(span, message);
    }
    if let Some(d) = datapath.filter(|d| d.get_ref() == "tun") {
        v.error_at(
            f,
            format!(
                "forward = \"dr\" needs the kernel data path, and this site's is \"tun\" (at {}): the TUN carries IP packets without their frames, so only the kernel program can send one to a real server's MAC",
                v.place_of(d.span().start)
            ),
        );
    }
}

/// `proto` is tcp or udp; one-packet scheduling is UDP's; direct routing is TCP's (the
/// kernel program that delivers by MAC carries TCP flows only).
fn validate_proto(s: &ServiceSection, v: &mut Validator) {
    if let Some(p) = &s.proto
        && !matches!(p.get_ref().as_str(), "tcp" | "udp")
    {
        v.error_at(
            p,
            format!(
                "proto must be \"tcp\" (ipvsadm -t) or \"udp\" (ipvsadm -u), not {:?}",
                p.get_ref()
            ),
        );
        return;
    }
    let udp = s.proto() == natgw::Proto::Udp;
    if let Some(o) = &s.one_packet
        && *o.get_ref()
        && !udp
    {
        v.error_at(
            o,
            "one_packet needs proto = \"udp\" (ipvsadm -o schedules datagrams, not TCP segments)",
        );
    }
    if let Some(f) = &s.forward
        && udp
        && f.get_ref() == "dr"
    {
        v.error_at(
            f,
            "forward = \"dr\" carries tcp services only (the kernel program that delivers by MAC tracks TCP flows); use forward = \"nat\" for a udp service",
        );
    }
}

/// A UDP check sends `send` and needs `expect` (both bounded); `send` belongs to it. A check
/// of the other protocol than the service's probes another port, so it needs `port`: a TCP
/// connect to a UDP service's port (or a datagram to a TCP one) would test nothing the
/// service serves.
fn validate_udp_check(s: &ServiceSection, h: &HealthSection, v: &mut Validator) {
    let udp_check = h.kind == HealthKind::Udp;
    if udp_check {
        match &h.send {
            None => v.error_at(
                &s.name,
                format!(
                    "service `{}`: a udp health check needs send (the datagram) and expect (what its answer holds)",
                    s.name.get_ref()
                ),
            ),
            Some(send) if send.get_ref().is_empty() || send.get_ref().len() > MAX_HEALTH_SEND => {
                v.error_at(
                    send,
                    format!("send must be 1 to {MAX_HEALTH_SEND} bytes long"),
                );
            }
            Some(_) => {}
        }
        if h.expect.is_none() {
            v.error_at(
                &s.name,
                format!(
                    "service `{}`: a udp health check needs expect (a string its answer must hold)",
                    s.name.get_ref()
                ),
            );
        }
    } else if let Some(send) = &h.send {
        v.error_at(send, "send needs kind = \"udp\"");
    }
    let udp_service = s.proto() == natgw::Proto::Udp;
    if udp_check != udp_service && h.port.is_none() {
        let (service, check) = if udp_service {
            ("udp", "a tcp, http or https")
        } else {
            ("tcp", "a udp")
        };
        let at = s
            .proto
            .as_ref()
            .map_or_else(|| s.name.span(), Spanned::span);
        v.error(
            at,
            format!(
                "service `{}` is {service}: {check} health check of it needs port (the backends' port of that protocol to probe)",
                s.name.get_ref()
            ),
        );
    }
}

/// The TLS settings belong to an HTTPS check and must be usable: a DNS name for SNI, a CA
/// file that reads (checked here so that `vipgate check` finds it, and again on each start
/// and reload), and no CA file where nothing is verified.
fn validate_tls(h: &HealthSection, v: &mut Validator) {
    if h.kind != HealthKind::Https {
        let names = [
            h.sni.as_ref().map(|s| (s.span(), "sni")),
            h.verify.as_ref().map(|s| (s.span(), "verify")),
            h.ca_file.as_ref().map(|s| (s.span(), "ca_file")),
        ];
        for (span, name) in names.into_iter().flatten() {
            v.error(span, format!("{name} needs kind = \"https\""));
        }
        return;
    }
    if let Some(sni) = &h.sni
        && !natgw::health::tls::valid_sni(sni.get_ref())
    {
        v.error_at(
            sni,
            format!(
                "sni {:?} must be a DNS name (leave it out to verify the backend's address)",
                sni.get_ref()
            ),
        );
    }
    let Some(ca) = &h.ca_file else { return };
    if h.verify.as_ref().is_some_and(|v| !*v.get_ref()) {
        v.error_at(
            ca,
            "ca_file is not used with verify = false: drop one of them",
        );
    } else if let Err(e) = natgw::health::tls::load_ca_file(ca.get_ref()) {
        v.error_at(ca, e.to_string());
    }
}

/// The agent's port is a port, and it is asked no more often than a question can last.
fn validate_agent(h: &HealthSection, v: &mut Validator) {
    if let Some(port) = &h.agent_port
        && *port.get_ref() == 0
    {
        v.error_at(port, "agent_port must be 1..=65535");
    }
    let Some(every) = &h.agent_interval else {
        return;
    };
    if h.agent_port.is_none() {
        v.error_at(
            every,
            "agent_interval needs agent_port (the agent's port on each backend)",
        );
    } else if !(MIN_HEALTH_PERIOD..=MAX_HEALTH_PERIOD).contains(&every.get_ref().0) {
        v.error_at(every, "agent_interval must be between 100ms and 1h");
    } else if every.get_ref() < h.timeout.get_ref() {
        v.error_at(
            every,
            format!(
                "agent_interval is shorter than the health timeout ({}) the agent is asked with",
                h.timeout.get_ref()
            ),
        );
    }
}

/// What every health check needs, on a service or an HTTP pool; `owner` (the name of the
/// service or pool) is pointed at for a problem with a value left at its default.
pub(crate) fn validate_health(h: &HealthSection, owner: std::ops::Range<usize>, v: &mut Validator) {
    let path = h.path.get_ref();
    let at = |v: &mut Validator, msg: String| {
        if h.path.span().is_empty() {
            v.error(owner.clone(), msg);
        } else {
            v.error_at(&h.path, msg);
        }
    };
    if matches!(h.kind, HealthKind::Http | HealthKind::Https) && !path.starts_with('/') {
        at(v, format!("health path {path:?} must start with /"));
    }
    if path.len() > MAX_HEALTH_PATH {
        at(
            v,
            format!("health path is longer than {MAX_HEALTH_PATH} bytes"),
        );
    }
    // It is sent as the request line's target: a space, CR or LF would end it and
    // let the rest become request headers.
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        at(
            v,
            format!("health path {path:?} may hold only printable ASCII without spaces"),
        );
    }
    for (name, d) in [("interval", &h.interval), ("timeout", &h.timeout)] {
        let t = d.get_ref().0;
        if !(MIN_HEALTH_PERIOD..=MAX_HEALTH_PERIOD).contains(&t) {
            v.error_at(d, format!("health {name} must be between 100ms and 1h"));
        }
    }
    if let Some(expect) = &h.expect {
        let text = expect.get_ref();
        if h.kind == HealthKind::Tcp {
            v.error_at(
                    expect,
                    "expect needs an HTTP or UDP check (kind = \"http\", \"https\" or \"udp\"): a TCP check reads no answer",
                );
        } else if text.is_empty() || text.len() > MAX_HEALTH_EXPECT {
            v.error_at(
                expect,
                format!("expect must be 1 to {MAX_HEALTH_EXPECT} bytes long"),
            );
        }
    }
    validate_tls(h, v);
    validate_agent(h, v);
    if let Some(port) = &h.port
        && *port.get_ref() == 0
    {
        v.error_at(
            port,
            "health port must be 1..=65535 (leave it out to check the backend's own port)",
        );
    }
    if *h.rise.get_ref() == 0 {
        v.error_at(&h.rise, "rise must be at least 1");
    }
    if *h.fall.get_ref() == 0 {
        v.error_at(&h.fall, "fall must be at least 1");
    }
    if h.timeout.get_ref() > h.interval.get_ref() {
        if h.timeout.span().is_empty() {
            // The timeout was left at its default: point at the interval that is shorter.
            v.error_at(
                &h.interval,
                format!(
                    "health interval is shorter than the default timeout ({}): set `timeout` too",
                    h.timeout.get_ref()
                ),
            );
        } else {
            v.error_at(&h.timeout, "health timeout must not exceed the interval");
        }
    }
}

pub(crate) fn validate_all(
    services: &[ServiceSection],
    nat: Option<&NatSection>,
    datapath: Option<&Spanned<String>>,
    v: &mut Validator,
) {
    check_unique(
        services
            .iter()
            .map(|s| (s.name.get_ref().clone(), s.name.span())),
        "service name",
        v,
    );
    check_ports_serve_one_service(services, v);
    check_endpoints_serve_one_listener(services, nat, v);
    for s in services {
        validate_proto(s, v);
        validate_ports(s, v);
        validate_forward(s, datapath, v);
        if s.backends.get_ref().is_empty() {
            v.error_at(
                &s.backends,
                format!("service `{}` has no backends", s.name.get_ref()),
            );
        }
        check_unique(
            s.backends
                .get_ref()
                .iter()
                .map(|b| (*b.address.get_ref(), b.address.span())),
            "backend",
            v,
        );
        for b in s.backends.get_ref() {
            if let Some(min) = &b.min_connections
                && (b.max_connections == 0 || *min.get_ref() > b.max_connections)
            {
                v.error_at(
                    min,
                    format!(
                        "min_connections {} needs a max_connections at least as large (ipvsadm -y needs -x)",
                        min.get_ref()
                    ),
                );
            }
            if *b.weight.get_ref() > 65535 {
                v.error_at(
                    &b.weight,
                    format!(
                        "weight {} is over 65535 (ipvsadm's limit)",
                        b.weight.get_ref()
                    ),
                );
            }
        }
        if let Some(f) = &s.fallback
            && !matches!(s.scheduler, SchedulerKind::Sh | SchedulerKind::Mh)
        {
            v.error_at(
                f,
                format!(
                    "fallback applies to the sh and mh schedulers, not {}",
                    s.scheduler
                ),
            );
        }
        if let Some(d) = &s.slow_start
            && (d.get_ref().0.is_zero() || d.get_ref().0 > MAX_SLOW_START)
        {
            v.error_at(
                d,
                "slow_start must be between 1ms and 1h (leave it out to turn it off)",
            );
        }
        if s.persistence.is_some_and(|p| p.0.is_zero()) {
            v.error_at(
                &s.name,
                "persistence must be longer than 0s (leave it out to turn it off)",
            );
        }
        if s.persistence.is_some_and(|p| p.0 > MAX_PERSISTENCE) {
            v.error_at(&s.name, "persistence must be at most 24h");
        }
        if *s.persistence_netmask.get_ref() > 32 {
            v.error_at(
                &s.persistence_netmask,
                "persistence_netmask is a prefix length, 0..=32",
            );
        }
        if let Some(sorry) = &s.sorry
            && s.backends
                .get_ref()
                .iter()
                .any(|b| b.address.get_ref() == sorry.get_ref())
        {
            v.error_at(
                sorry,
                format!("sorry server {} is also a backend", sorry.get_ref()),
            );
        }
        if let Some(h) = &s.health {
            validate_health(h, s.name.span(), v);
            validate_udp_check(s, h, v);
        }
        if let Some(nat) = nat {
            let ip = *s.listen.get_ref().ip();
            for (range, span) in s.port_ranges() {
                if ip != nat.address {
                    break;
                }
                if let Some(st) = nat.statics.iter().find(|st| {
                    range.contains(st.outside_port.get_ref()) && *st.proto.get_ref() == s.proto()
                }) {
                    v.error(
                        span,
                        format!(
                            "{ip}:{} is also a [[nat.static]] port forward (at {})",
                            st.outside_port.get_ref(),
                            v.place_of(st.outside_port.span().start)
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use std::path::Path;

    #[test]
    fn runaway_health_and_persistence_values_are_refused_with_their_position() {
        let text = "[[service]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\n\
                    backends = [{ address = \"10.0.0.1:80\" }]\n\
                    health = { kind = \"http\", interval = \"0s\", timeout = \"0s\", path = \"/x HTTP/1.0\\r\\nX-Injected: 1\\r\\n\" }\n\
                    persistence = \"99999999999d\"\n";
        let err = parse(Path::new("site.toml"), text).unwrap_err().to_string();
        assert!(
            err.contains("site.toml:5:38: health interval must be between 100ms and 1h"),
            "{err}"
        );
        assert!(
            err.contains("site.toml:5:54: health timeout must be between 100ms and 1h"),
            "{err}"
        );
        assert!(err.contains("site.toml:5:67: health path"), "{err}");
        assert!(err.contains("persistence must be at most 24h"), "{err}");
    }

    #[test]
    fn schedulers_thresholds_and_slow_start_are_read_and_checked_with_their_position() {
        let text = "[[service]]\nname = \"cache\"\nlisten = \"198.51.100.10:80\"\n\
                    scheduler = \"lblcr\"\nmax_connections = 500\nslow_start = \"30s\"\n\
                    backends = [{ address = \"10.0.0.1:80\", max_connections = 100, min_connections = 80 }]\n";
        let site = parse(Path::new("site.toml"), text).unwrap();
        let pool = crate::config::lower::service(&site.service[0]).pool;
        assert_eq!(pool.scheduler, balance::SchedulerKind::Lblcr);
        assert_eq!(pool.max_connections, 500);
        assert_eq!(pool.slow_start, Some(std::time::Duration::from_secs(30)));
        assert_eq!(
            (
                pool.backends[0].max_connections,
                pool.backends[0].min_connections
            ),
            (100, 80)
        );

        let bad = "[[service]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\n\
                   scheduler = \"wlc\"\nfallback = true\nslow_start = \"0s\"\n\
                   backends = [{ address = \"10.0.0.1:80\", max_connections = 10, min_connections = 20 }]\n";
        let err = parse(Path::new("site.toml"), bad).unwrap_err().to_string();
        assert!(
            err.contains("site.toml:7:80: min_connections 20 needs a max_connections"),
            "{err}"
        );
        assert!(
            err.contains("site.toml:5:12: fallback applies to the sh and mh schedulers, not wlc"),
            "{err}"
        );
        assert!(err.contains("site.toml:6:14: slow_start must be"), "{err}");

        let unknown = "[[service]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\n\
                       scheduler = \"lblcrr\"\nbackends = [{ address = \"10.0.0.1:80\" }]\n";
        let err = parse(Path::new("site.toml"), unknown)
            .unwrap_err()
            .to_string();
        assert!(err.contains("site.toml:4:13:"), "{err}");
        assert!(err.contains("twos"), "{err}");
    }

    /// `proto = "udp"` and `one_packet` reach the service with a UDP check; a TCP and a UDP
    /// service may share VIP:port and backends, two UDP ones may not; the combinations that
    /// cannot run are refused where they are written.
    #[test]
    fn udp_services_are_read_and_their_limits_checked_with_their_position() {
        let dns = |name: &str, extra: &str| {
            format!(
                "[[service]]\nname = \"{name}\"\nlisten = \"198.51.100.10:53\"\n{extra}\n\
                 backends = [{{ address = \"10.0.0.101:53\" }}]\n"
            )
        };
        let udp = dns(
            "dns",
            "proto = \"udp\"\none_packet = true\n\
             health = { kind = \"udp\", send = \"ping\", expect = \"pong\" }",
        );
        let text = format!("{udp}\n{}", dns("dns-tcp", ""));
        let site = parse(Path::new("site.toml"), &text).unwrap();
        let svc = crate::config::lower::service(&site.service[0]);
        assert_eq!((svc.proto, svc.one_packet), (natgw::Proto::Udp, true));
        assert_eq!(
            svc.health.unwrap().kind,
            natgw::health::CheckKind::Udp {
                send: "ping".into(),
                expect: "pong".into()
            }
        );
        let tcp = crate::config::lower::service(&site.service[1]);
        assert_eq!((tcp.proto, tcp.one_packet), (natgw::Proto::Tcp, false));

        let twice = format!("{udp}\n{}", dns("dns2", "proto = \"udp\""));
        let err = parse(Path::new("site.toml"), &twice)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "site.toml:11:10: udp 198.51.100.10:53 is already a port of service `dns` (at line 3)"
            ),
            "{err}"
        );
        assert!(
            err.contains("site.toml:13:25: 10.0.0.101:53 already serves service `dns`"),
            "{err}"
        );

        let bad = dns(
            "dns",
            "proto = \"udp\"\nhealth = { kind = \"udp\", send = \"\", expect = \"pong\" }",
        );
        let err = parse(Path::new("site.toml"), &bad).unwrap_err().to_string();
        assert!(
            err.contains("site.toml:5:33: send must be 1 to 1024 bytes long"),
            "{err}"
        );
        // A TCP check of a UDP service's backends on their TCP port is fine.
        let port = dns(
            "dns",
            "proto = \"udp\"\nhealth = { kind = \"tcp\", port = 53 }",
        );
        assert!(parse(Path::new("site.toml"), &port).is_ok());
    }

    /// A multi-port service: the VIP in `listen`, its ports and ranges in `ports`, rports
    /// per port or range, backends without a port.
    #[test]
    fn multi_port_services_are_read_and_lowered() {
        let text = "[[service]]\nname = \"web\"\nlisten = \"198.51.100.10\"\n\
                    ports = [80, 443, \"8000-8009\"]\n\
                    rports = { 443 = 8443, 8000-8009 = 9000 }\n\
                    persistence = \"300s\"\n\
                    backends = [{ address = \"10.0.0.101\" }, { address = \"10.0.0.102\" }]\n";
        let site = parse(Path::new("site.toml"), text).unwrap();
        let svc = crate::config::lower::service(&site.service[0]);
        assert_eq!(svc.listen.to_string(), "198.51.100.10:80");
        let ports = svc.ports.as_ref().unwrap();
        assert_eq!(ports.display(), "80,443,8000-8009");
        assert_eq!(
            (
                ports.backend_port(80),
                ports.backend_port(443),
                ports.backend_port(8009)
            ),
            (80, 8443, 9009)
        );
        assert_eq!(svc.pool.backends[0].addr.to_string(), "10.0.0.101:0");
        assert!(svc.unsupported().is_none());
        // A single-port service's backend without a port keeps the VIP's port.
        let single = "[[service]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\n\
                      backends = [{ address = \"10.0.0.101\" }]\n";
        let site = parse(Path::new("site.toml"), single).unwrap();
        assert!(
            crate::config::lower::service(&site.service[0])
                .ports
                .is_none()
        );
    }

    #[test]
    fn multi_port_mistakes_are_refused_with_their_position() {
        let svc = |name: &str, listen: &str, rest: &str| {
            format!(
                "[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\n{rest}\n\
                 backends = [{{ address = \"10.0.0.101\" }}]\n"
            )
        };
        let err = |text: &str| parse(Path::new("site.toml"), text).unwrap_err().to_string();
        // `ports` with a port in listen.
        let e = err(&svc("web", "198.51.100.10:80", "ports = [443]"));
        assert!(
            e.contains("site.toml:3:10: service `web` has ports = [...]: listen is its address alone (\"198.51.100.10\")"),
            "{e}"
        );
        // Neither.
        let e = err(&svc("web", "198.51.100.10", ""));
        assert!(
            e.contains("site.toml:3:10: service `web`: listen needs a port (\"198.51.100.10:80\")"),
            "{e}"
        );
        // Range bounds: more than 1,024 ports, port 0, a range running down.
        let e = err(&svc("web", "198.51.100.10", "ports = [\"1024-2048\"]"));
        assert!(
            e.contains(
                "site.toml:4:9: service `web`: 1025 ports: a service listens on at most 1024"
            ),
            "{e}"
        );
        let e = err(&svc("web", "198.51.100.10", "ports = [\"0-10\"]"));
        assert!(
            e.contains("site.toml:4:10: port 0 is not a service port"),
            "{e}"
        );
        let e = err(&svc("web", "198.51.100.10", "ports = [\"90-80\"]"));
        assert!(
            e.contains("site.toml:4:10: invalid port range \"90-80\""),
            "{e}"
        );
        // Each bad item at its own position, none taken for a missing `ports`.
        let e = err(&svc(
            "web",
            "198.51.100.10",
            "ports = [80, \"90-x\", 70000, -1]",
        ));
        assert!(
            e.contains("site.toml:4:14: invalid port range \"90-x\""),
            "{e}"
        );
        assert!(
            e.contains("site.toml:4:22: port 70000 is out of range: ports are 1..=65535"),
            "{e}"
        );
        assert!(e.contains("site.toml:4:29: port -1 is out of range"), "{e}");
        assert!(!e.contains("listen needs a port"), "{e}");
        // An rport for a port the service does not listen on; one that runs out of range;
        // two ports onto one backend port.
        let e = err(&svc(
            "web",
            "198.51.100.10",
            "ports = [80, \"8000-8009\"]\nrports = { 444 = 8444, 8000-8009 = 65530 }",
        ));
        assert!(
            e.contains(
                "site.toml:5:12: rport for port 444, which is not one of service `web`'s ports"
            ),
            "{e}"
        );
        assert!(
            e.contains("site.toml:5:36: rports 8000-8009 from 65530: the backend ports run outside 1..=65535"),
            "{e}"
        );
        let e = err(&svc(
            "web",
            "198.51.100.10",
            "ports = [80, 443]\nrports = { 80 = 443 }",
        ));
        assert!(
            e.contains("site.toml:5:10: service `web`: service ports 80 and 443 both reach backend port 443"),
            "{e}"
        );
        // rports without ports; a backend or sorry server with a port.
        let e = err(&svc("web", "198.51.100.10:80", "rports = { 80 = 8080 }"));
        assert!(
            e.contains(
                "site.toml:4:10: service `web`: rports map the ports of a multi-port service"
            ),
            "{e}"
        );
        let text = "[[service]]\nname = \"web\"\nlisten = \"198.51.100.10\"\nports = [80, 443]\n\
                    sorry = \"10.0.0.200:80\"\nbackends = [{ address = \"10.0.0.101:80\" }]\n";
        let e = err(text);
        assert!(
            e.contains("site.toml:6:25: service `web` listens on several ports: backend 10.0.0.101:80 takes no port"),
            "{e}"
        );
        assert!(e.contains("site.toml:5:9: service `web` listens on several ports: the sorry server takes no port"), "{e}");
        // A port of another service on the same VIP and protocol, and a port listed twice;
        // another protocol or address is fine.
        let first = svc("web", "198.51.100.10", "ports = [80, \"440-450\"]");
        let e = err(&format!("{first}\n{}", svc("tls", "198.51.100.10:443", "")));
        assert!(
            e.contains("site.toml:9:10: tcp 198.51.100.10:443 is already a port of service `web` (at line 4)"),
            "{e}"
        );
        let e = err(&svc("web", "198.51.100.10", "ports = [80, \"70-90\"]"));
        assert!(
            e.contains("site.toml:4:14: tcp 198.51.100.10:80 is already a port of service `web` (at line 4)"),
            "{e}"
        );
        let udp =
            svc("dns", "198.51.100.10:443", "proto = \"udp\"").replace("10.0.0.101", "10.0.0.102");
        assert!(parse(Path::new("site.toml"), &format!("{first}\n{udp}")).is_ok());
        // Backend endpoints: a port-less backend of a multi-port service is reached on
        // every port, which another service may not use.
        let other = "[[service]]\nname = \"api\"\nlisten = \"198.51.100.11:8443\"\n\
                     backends = [{ address = \"10.0.0.101:445\" }]\n";
        let e = err(&format!("{first}\n{other}"));
        assert!(
            e.contains("site.toml:10:25: 10.0.0.101:445 already serves service `web`"),
            "{e}"
        );
    }

    fn dr(extra: &str, backends: &str) -> String {
        format!(
            "{extra}[[service]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\nforward = \"dr\"\n\
             backends = [{backends}]\n"
        )
    }

    #[test]
    fn direct_routing_is_read_and_its_needs_are_checked_with_their_position() {
        let ok = dr("", "{ address = \"10.0.0.101:80\" }");
        let site = parse(Path::new("site.toml"), &ok).unwrap();
        assert_eq!(
            crate::config::lower::service(&site.service[0]).forward,
            natgw::Forward::DirectRoute
        );
        let nat = ok.replace("\"dr\"", "\"nat\"");
        let site = parse(Path::new("site.toml"), &nat).unwrap();
        assert_eq!(
            crate::config::lower::service(&site.service[0]).forward,
            natgw::Forward::Nat
        );

        let bad = ok.replace("\"dr\"", "\"masq\"");
        let err = parse(Path::new("site.toml"), &bad).unwrap_err().to_string();
        assert!(
            err.contains("site.toml:4:11: forward must be \"nat\""),
            "{err}"
        );

        let port = dr("", "{ address = \"10.0.0.101:8080\" }");
        let err = parse(Path::new("site.toml"), &port)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("site.toml:5:25: service `web` forwards by direct routing: backend 10.0.0.101:8080 must listen on the VIP's port 80"),
            "{err}"
        );

        let tun = dr(
            "[lb]\ndatapath = \"tun\"\n\n",
            "{ address = \"10.0.0.101:80\" }",
        );
        let err = parse(Path::new("site.toml"), &tun).unwrap_err().to_string();
        assert!(
            err.contains("site.toml:7:11: forward = \"dr\" needs the kernel data path, and this site's is \"tun\" (at line 2)"),
            "{err}"
        );
    }

    #[test]
    fn on_the_host_a_direct_routing_backend_must_be_on_a_connected_network() {
        use crate::config::host::HostRoutes;
        let routes = || {
            HostRoutes::parse(
                "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0B6433C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                 eth1\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n",
            )
        };
        let text = dr(
            "",
            "{ address = \"10.0.0.101:80\" }, { address = \"10.9.0.5:80\" }",
        );
        // Without the host, the file is fine (it may be checked elsewhere).
        assert!(parse(Path::new("site.toml"), &text).is_ok());
        let err = crate::config::parse_on_host(Path::new("site.toml"), &text, routes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("site.toml:5:56: service `web` forwards by direct routing: 10.9.0.5:80 is not on a directly connected network (this host reaches it through the gateway 198.51.100.11)"),
            "{err}"
        );
        assert!(!err.contains("10.0.0.101:80 is not"), "{err}");
        // A NAT service's backends may be anywhere.
        let nat = text.replace("forward = \"dr\"\n", "");
        assert!(crate::config::parse_on_host(Path::new("site.toml"), &nat, routes()).is_ok());
    }
}
