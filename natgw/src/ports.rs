//! The ports of a multi-port virtual service — LVS's firewall-mark service (`ipvsadm -A -f`
//! with an iptables `-j MARK` rule per port set), keepalived's `virtual_server fwmark` or a
//! `virtual_server_group` with port ranges, Alteon's several services on one virt — and the
//! backend port each one reaches.
//!
//! A backend of such a service has no port of its own (LVS's port 0): a connection to
//! `VIP:p` reaches `RS:p`, unless an rport rule maps `p` to another port. One pool serves
//! every port, so its persistence templates (keyed by client and service) pin a client's
//! connections to all of them to one real server.
//!
//! Invariants, established by [`ServicePorts::new`]:
//! - the ranges are sorted, disjoint, hold no port 0 and 1 to [`MAX_SERVICE_PORTS`] ports;
//! - each rport rule covers ports of the service only, no port is covered twice, and its
//!   targets stay within 1..=65535;
//! - the map from service port to backend port is one to one, so a backend endpoint names
//!   exactly one service port: the gateway tells from a reply's source (`RS:8443`) which
//!   `VIP:443` it leaves from, as it does for a single-port service.

use std::ops::RangeInclusive;

/// Most ports one service listens on: a gateway listener entry per port, and the bound
/// `vipgate check` enforces (a `"1024-65535"` range is refused; ipvsadm's firewall marks
/// have no bound, but each port here costs a table entry and a health of nothing).
pub const MAX_SERVICE_PORTS: usize = 1024;

/// Service ports `ports` reach backend ports from `to` on: `ports.start()` → `to`,
/// `ports.start() + 1` → `to + 1`, and so on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    /// The service ports mapped.
    pub ports: RangeInclusive<u16>,
    /// The backend port of `ports.start()`.
    pub to: u16,
}

impl PortRule {
    /// The backend port of service port `port`, if the rule covers it.
    fn map(&self, port: u16) -> Option<u16> {
        self.ports
            .contains(&port)
            .then(|| self.to + (port - self.ports.start()))
    }
}

/// Why a port set or its rport rules cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortsError {
    /// No port at all.
    #[error("a service needs at least one port")]
    Empty,
    /// Port 0 (or a range starting after its end).
    #[error("ports are 1..=65535 and a range runs upwards ({0:?})")]
    BadRange(RangeInclusive<u16>),
    /// More ports than [`MAX_SERVICE_PORTS`].
    #[error("{0} ports: a service listens on at most {MAX_SERVICE_PORTS}")]
    TooMany(usize),
    /// Two ranges share a port.
    #[error("port {0} is listed twice")]
    Twice(u16),
    /// An rport rule covers a port the service does not listen on.
    #[error("rport for port {0}, which is not one of the service's ports")]
    NotAServicePort(u16),
    /// Two rport rules cover one port.
    #[error("port {0} has two rports")]
    TwoRules(u16),
    /// An rport rule's targets run past 65535 (or it targets port 0).
    #[error("rports of {from:?} starting at {to} run outside 1..=65535")]
    TargetOutOfRange {
        /// The service ports.
        from: RangeInclusive<u16>,
        /// The first backend port.
        to: u16,
    },
    /// Two service ports reach one backend port: its replies could not be told apart.
    #[error("service ports {0} and {1} both reach backend port {2}")]
    SharedBackendPort(u16, u16, u16),
}

/// The ports of one multi-port service and their backend ports (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePorts {
    ranges: Vec<RangeInclusive<u16>>,
    rports: Vec<PortRule>,
    count: usize,
}

impl ServicePorts {
    /// The ports `ranges` (in any order) with the rport rules `rports`.
    ///
    /// # Errors
    /// When an invariant of the module docs does not hold.
    pub fn new(
        mut ranges: Vec<RangeInclusive<u16>>,
        rports: Vec<PortRule>,
    ) -> Result<Self, PortsError> {
        if ranges.is_empty() {
            return Err(PortsError::Empty);
        }
        if let Some(bad) = ranges.iter().find(|r| *r.start() == 0 || r.is_empty()) {
            return Err(PortsError::BadRange(bad.clone()));
        }
        ranges.sort_by_key(|r| *r.start());
        if let Some(w) = ranges.windows(2).find(|w| w[1].start() <= w[0].end()) {
            return Err(PortsError::Twice(*w[1].start()));
        }
        let count: usize = ranges.iter().map(|r| r.len()).sum();
        if count > MAX_SERVICE_PORTS {
            return Err(PortsError::TooMany(count));
        }
        let this = Self {
            ranges,
            rports: Vec::new(),
            count,
        };
        for (i, rule) in rports.iter().enumerate() {
            if *rule.ports.start() == 0 || rule.ports.is_empty() {
                return Err(PortsError::BadRange(rule.ports.clone()));
            }
            if let Some(p) = rule.ports.clone().find(|p| !this.contains(*p)) {
                return Err(PortsError::NotAServicePort(p));
            }
            if let Some(p) = rule
                .ports
                .clone()
                .find(|p| rports[..i].iter().any(|o| o.ports.contains(p)))
            {
                return Err(PortsError::TwoRules(p));
            }
            let span = rule.ports.end() - rule.ports.start();
            if rule.to == 0 || rule.to.checked_add(span).is_none() {
                return Err(PortsError::TargetOutOfRange {
                    from: rule.ports.clone(),
                    to: rule.to,
                });
            }
        }
        let this = Self { rports, ..this };
        let mut reached: Vec<(u16, u16)> = this.iter().map(|p| (this.backend_port(p), p)).collect();
        reached.sort_unstable();
        if let Some(w) = reached.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(PortsError::SharedBackendPort(w[0].1, w[1].1, w[0].0));
        }
        Ok(this)
    }

    /// Whether the service listens on `port`.
    #[must_use]
    pub fn contains(&self, port: u16) -> bool {
        // At most a handful of ranges in practice; a binary search keeps a 1,024-port list
        // of single ports cheap too.
        self.ranges
            .binary_search_by(|r| {
                if *r.end() < port {
                    std::cmp::Ordering::Less
                } else if *r.start() > port {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }

    /// The lowest port (the service's `listen` port in `show lb`'s sort and its health
    /// checks' default).
    #[must_use]
    pub fn first(&self) -> u16 {
        // Cannot be empty (see `new`).
        self.ranges.first().map_or(0, |r| *r.start())
    }

    /// How many ports.
    #[must_use]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Always false: a service has a port (see `new`).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The port ranges, sorted.
    #[must_use]
    pub fn ranges(&self) -> &[RangeInclusive<u16>] {
        &self.ranges
    }

    /// The rport rules, as configured.
    #[must_use]
    pub fn rports(&self) -> &[PortRule] {
        &self.rports
    }

    /// Every port, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.ranges.iter().flat_map(Clone::clone)
    }

    /// The backend port a connection to service port `port` reaches on a backend without a
    /// port of its own: its rport, else the port itself (LVS's port 0 behaviour).
    #[must_use]
    pub fn backend_port(&self, port: u16) -> u16 {
        self.rports.iter().find_map(|r| r.map(port)).unwrap_or(port)
    }

    /// The service port whose connections reach backend port `backend_port`, if any (the
    /// inverse of [`backend_port`](Self::backend_port), one to one by the invariants).
    #[must_use]
    pub fn service_port_of(&self, backend_port: u16) -> Option<u16> {
        let mapped = self.rports.iter().find_map(|r| {
            let span = r.ports.end() - r.ports.start();
            (r.to..=r.to + span)
                .contains(&backend_port)
                .then(|| r.ports.start() + (backend_port - r.to))
        });
        mapped.or_else(|| {
            (self.contains(backend_port)
                && !self.rports.iter().any(|r| r.ports.contains(&backend_port)))
            .then_some(backend_port)
        })
    }

    /// `80,443,8000-8100`: the ports as `show lb` prints them.
    #[must_use]
    pub fn display(&self) -> String {
        self.ranges
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(ports: RangeInclusive<u16>, to: u16) -> PortRule {
        PortRule { ports, to }
    }

    #[test]
    fn ports_and_ranges_match_and_print_sorted() {
        let p = ServicePorts::new(vec![8000..=8100, 443..=443, 80..=80], vec![]).unwrap();
        assert_eq!(p.display(), "80,443,8000-8100");
        assert_eq!((p.first(), p.len()), (80, 103));
        for port in [80, 443, 8000, 8050, 8100] {
            assert!(p.contains(port), "{port}");
        }
        for port in [0, 79, 81, 442, 7999, 8101, 65535] {
            assert!(!p.contains(port), "{port}");
        }
        // Without rports, a backend port is the service port.
        assert_eq!(
            (p.backend_port(443), p.service_port_of(443)),
            (443, Some(443))
        );
        assert_eq!(p.service_port_of(22), None);
    }

    #[test]
    fn rports_map_single_ports_and_shift_ranges_one_to_one() {
        let p = ServicePorts::new(
            vec![80..=80, 443..=443, 8000..=8009],
            vec![rule(443..=443, 8443), rule(8000..=8009, 9000)],
        )
        .unwrap();
        assert_eq!(p.backend_port(80), 80);
        assert_eq!(p.backend_port(443), 8443);
        assert_eq!(p.backend_port(8005), 9005);
        assert_eq!(p.service_port_of(8443), Some(443));
        assert_eq!(p.service_port_of(9009), Some(8009));
        // 443 and 8000 are mapped away: a reply from them belongs to no service port.
        assert_eq!(p.service_port_of(443), None);
        assert_eq!(p.service_port_of(8000), None);
        for port in p.iter() {
            assert_eq!(p.service_port_of(p.backend_port(port)), Some(port));
        }
    }

    #[test]
    fn what_cannot_run_is_refused() {
        let err = |ranges: Vec<RangeInclusive<u16>>, rules: Vec<PortRule>| {
            ServicePorts::new(ranges, rules).unwrap_err()
        };
        assert_eq!(err(vec![], vec![]), PortsError::Empty);
        assert_eq!(err(vec![0..=10], vec![]), PortsError::BadRange(0..=10));
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 90..=80;
        assert!(matches!(
            err(vec![backwards], vec![]),
            PortsError::BadRange(_)
        ));
        assert_eq!(err(vec![80..=90, 85..=85], vec![]), PortsError::Twice(85));
        assert_eq!(err(vec![1..=1025], vec![]), PortsError::TooMany(1025));
        assert!(ServicePorts::new(vec![1..=1024], vec![]).is_ok());
        assert_eq!(
            err(vec![80..=80], vec![rule(443..=443, 8443)]),
            PortsError::NotAServicePort(443)
        );
        assert_eq!(
            err(
                vec![80..=90],
                vec![rule(80..=85, 1000), rule(85..=86, 2000)]
            ),
            PortsError::TwoRules(85)
        );
        assert!(matches!(
            err(vec![80..=90], vec![rule(80..=90, 65530)]),
            PortsError::TargetOutOfRange { .. }
        ));
        // 80 → 443 while 443 stays 443: two service ports on one backend port.
        assert_eq!(
            err(vec![80..=80, 443..=443], vec![rule(80..=80, 443)]),
            PortsError::SharedBackendPort(80, 443, 443)
        );
        // Swapping them is one to one.
        assert!(
            ServicePorts::new(
                vec![80..=80, 443..=443],
                vec![rule(80..=80, 443), rule(443..=443, 80)]
            )
            .is_ok()
        );
    }
}
