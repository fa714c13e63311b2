//! The ACL stage that runs before translation, as an `ip access-group` does on a router.
//!
//! Rules are evaluated in order on the packet as it arrived (before any rewrite); the first
//! rule that matches decides and its hit counter goes up. When no rule matches:
//! - a packet from the inside is denied if the list holds at least one `permit` rule (the
//!   implicit deny of an IOS access list used as `ip nat inside source list N`), and permitted
//!   when the list is empty or holds only `deny` rules;
//! - a packet from the outside is permitted: inbound traffic is then filtered by the NAT
//!   itself (only forwarded ports and replies to mappings get in).

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;

use crate::flow::Proto;

/// What a rule does with the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum AclAction {
    /// Let the packet through to translation.
    Permit,
    /// Drop the packet and count it on the rule.
    Deny,
}

/// One ACL line. `None` fields match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AclRule {
    /// Permit or deny.
    pub action: AclAction,
    /// Source prefix.
    pub src: Option<Ipv4Net>,
    /// Destination prefix.
    pub dst: Option<Ipv4Net>,
    /// Protocol.
    pub proto: Option<Proto>,
    /// Source ports (TCP/UDP only; a rule with ports never matches other protocols).
    pub src_ports: Option<RangeInclusive<u16>>,
    /// Destination ports (TCP/UDP only).
    pub dst_ports: Option<RangeInclusive<u16>>,
}

impl AclRule {
    /// A rule matching everything with the given action.
    #[must_use]
    pub fn any(action: AclAction) -> Self {
        AclRule {
            action,
            src: None,
            dst: None,
            proto: None,
            src_ports: None,
            dst_ports: None,
        }
    }

    fn matches(&self, p: &AclPacket) -> bool {
        fn net(n: &Option<Ipv4Net>, a: Ipv4Addr) -> bool {
            n.is_none_or(|n| n.contains(&a))
        }
        fn port(r: &Option<RangeInclusive<u16>>, p: Option<u16>) -> bool {
            match (r, p) {
                (None, _) => true,
                (Some(r), Some(p)) => r.contains(&p),
                (Some(_), None) => false,
            }
        }
        net(&self.src, p.src)
            && net(&self.dst, p.dst)
            && self.proto.is_none_or(|x| Some(x) == p.proto)
            && port(&self.src_ports, p.src_port)
            && port(&self.dst_ports, p.dst_port)
    }
}

/// The header fields an ACL looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclPacket {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Protocol, if one the gateway knows.
    pub proto: Option<Proto>,
    /// TCP/UDP source port.
    pub src_port: Option<u16>,
    /// TCP/UDP destination port.
    pub dst_port: Option<u16>,
}

/// The outcome of [`Acl::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclDecision {
    /// Rule `n` (0-based) permitted the packet.
    Permit(Option<usize>),
    /// Rule `n` denied it, or `None` for the implicit deny.
    Deny(Option<usize>),
}

/// An ordered rule list with per-rule hit counters.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    rules: Vec<AclRule>,
    hits: Vec<u64>,
    implicit_denies: u64,
    has_permit: bool,
}

impl Acl {
    /// Builds the list; counters start at zero.
    #[must_use]
    pub fn new(rules: Vec<AclRule>) -> Self {
        let has_permit = rules.iter().any(|r| r.action == AclAction::Permit);
        Acl {
            hits: vec![0; rules.len()],
            rules,
            implicit_denies: 0,
            has_permit,
        }
    }

    /// First match wins; counts the hit. `from_inside` selects the no-match default.
    pub fn check(&mut self, p: &AclPacket, from_inside: bool) -> AclDecision {
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matches(p) {
                self.hits[i] += 1;
                return match rule.action {
                    AclAction::Permit => AclDecision::Permit(Some(i)),
                    AclAction::Deny => AclDecision::Deny(Some(i)),
                };
            }
        }
        if from_inside && self.has_permit {
            self.implicit_denies += 1;
            AclDecision::Deny(None)
        } else {
            AclDecision::Permit(None)
        }
    }

    /// The first-match decision every packet from the outside of protocol `proto` to
    /// `dst:dst_port` gets whatever its source address and port, or `None` when it depends on
    /// them: the first rule that can match such a packet constrains the source (a rule with a
    /// source prefix other than `/0` or source ports other than all of them). A rule that
    /// matches on the source decides, and counts its hit, for some sources only, so even one
    /// whose action agrees with a later rule's makes the answer source-dependent. Nothing is
    /// counted: this states a decision in advance for a data path that executes it without
    /// the core (see [`crate::Gateway::published_listeners`]).
    #[must_use]
    pub fn verdict_for_any_source(
        &self,
        proto: Proto,
        dst: Ipv4Addr,
        dst_port: u16,
    ) -> Option<AclDecision> {
        for (i, rule) in self.rules.iter().enumerate() {
            let can_match = rule.dst.is_none_or(|n| n.contains(&dst))
                && rule.proto.is_none_or(|p| p == proto)
                && rule
                    .dst_ports
                    .as_ref()
                    .is_none_or(|r| r.contains(&dst_port));
            if !can_match {
                continue;
            }
            let any_src = rule.src.is_none_or(|n| n.prefix_len() == 0);
            let any_src_port = rule
                .src_ports
                .as_ref()
                .is_none_or(|r| *r.start() == 0 && *r.end() == u16::MAX);
            if !(any_src && any_src_port) {
                return None;
            }
            return Some(match rule.action {
                AclAction::Permit => AclDecision::Permit(Some(i)),
                AclAction::Deny => AclDecision::Deny(Some(i)),
            });
        }
        // No rule matches any of them: from the outside, the no-match default is permit.
        Some(AclDecision::Permit(None))
    }

    /// The rules with their hit counters.
    pub fn rules(&self) -> impl Iterator<Item = (&AclRule, u64)> {
        self.rules.iter().zip(self.hits.iter().copied())
    }

    /// Inside packets dropped because no rule matched.
    #[must_use]
    pub fn implicit_denies(&self) -> u64 {
        self.implicit_denies
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(src: [u8; 4], dst: [u8; 4], proto: Proto, dport: u16) -> AclPacket {
        AclPacket {
            src: src.into(),
            dst: dst.into(),
            proto: Some(proto),
            src_port: Some(40000),
            dst_port: Some(dport),
        }
    }

    #[test]
    fn first_match_wins_and_counts() {
        let mut acl = Acl::new(vec![
            AclRule {
                src: Some("192.168.101.66/32".parse().unwrap()),
                ..AclRule::any(AclAction::Deny)
            },
            AclRule {
                src: Some("192.168.101.0/24".parse().unwrap()),
                ..AclRule::any(AclAction::Permit)
            },
        ]);
        let bad = pkt([192, 168, 101, 66], [8, 8, 8, 8], Proto::Udp, 53);
        let good = pkt([192, 168, 101, 10], [8, 8, 8, 8], Proto::Udp, 53);
        assert_eq!(acl.check(&bad, true), AclDecision::Deny(Some(0)));
        assert_eq!(acl.check(&good, true), AclDecision::Permit(Some(1)));
        assert_eq!(acl.check(&good, true), AclDecision::Permit(Some(1)));
        let hits: Vec<u64> = acl.rules().map(|(_, h)| h).collect();
        assert_eq!(hits, vec![1, 2]);
    }

    #[test]
    fn implicit_deny_only_for_inside_with_permits() {
        let mut acl = Acl::new(vec![AclRule {
            src: Some("192.168.101.0/24".parse().unwrap()),
            ..AclRule::any(AclAction::Permit)
        }]);
        let other = pkt([10, 9, 9, 9], [8, 8, 8, 8], Proto::Tcp, 80);
        assert_eq!(acl.check(&other, true), AclDecision::Deny(None));
        assert_eq!(acl.check(&other, false), AclDecision::Permit(None));
        assert_eq!(acl.implicit_denies(), 1);
        let mut only_deny = Acl::new(vec![AclRule::any(AclAction::Deny)]);
        assert_eq!(only_deny.check(&other, true), AclDecision::Deny(Some(0)));
        let mut empty = Acl::new(vec![]);
        assert_eq!(empty.check(&other, true), AclDecision::Permit(None));
    }

    #[test]
    fn ports_and_proto() {
        let mut acl = Acl::new(vec![AclRule {
            proto: Some(Proto::Tcp),
            dst_ports: Some(22..=22),
            ..AclRule::any(AclAction::Deny)
        }]);
        assert_eq!(
            acl.check(&pkt([1, 1, 1, 1], [2, 2, 2, 2], Proto::Tcp, 22), false),
            AclDecision::Deny(Some(0))
        );
        assert_eq!(
            acl.check(&pkt([1, 1, 1, 1], [2, 2, 2, 2], Proto::Udp, 22), false),
            AclDecision::Permit(None)
        );
        let icmp = AclPacket {
            src_port: None,
            dst_port: None,
            ..pkt([1; 4], [2; 4], Proto::Icmp, 0)
        };
        assert_eq!(acl.check(&icmp, false), AclDecision::Permit(None));
    }

    #[test]
    fn verdict_for_any_source_is_the_first_rule_that_can_match() {
        let to_web = |rule: AclRule| AclRule {
            dst: Some("198.51.100.1/32".parse().unwrap()),
            ..rule
        };
        let dst = Ipv4Addr::new(198, 51, 100, 1);
        let verdict = |rules: Vec<AclRule>, port| {
            Acl::new(rules).verdict_for_any_source(Proto::Tcp, dst, port)
        };
        // No rule: the outside's default permit.
        assert_eq!(verdict(vec![], 80), Some(AclDecision::Permit(None)));
        // Rules for other destinations, protocols or ports are skipped whatever they say
        // about sources.
        let others = vec![
            AclRule {
                dst: Some("203.0.113.0/24".parse().unwrap()),
                src: Some("10.0.0.0/8".parse().unwrap()),
                ..AclRule::any(AclAction::Deny)
            },
            AclRule {
                proto: Some(Proto::Udp),
                src_ports: Some(53..=53),
                ..AclRule::any(AclAction::Deny)
            },
            to_web(AclRule {
                dst_ports: Some(22..=22),
                src: Some("10.0.0.0/8".parse().unwrap()),
                ..AclRule::any(AclAction::Deny)
            }),
            to_web(AclRule::any(AclAction::Permit)),
        ];
        assert_eq!(
            verdict(others.clone(), 80),
            Some(AclDecision::Permit(Some(3)))
        );
        // The port-22 rule can match port 22 and names sources: source-dependent.
        assert_eq!(verdict(others, 22), None);
        // A deny for every source is known in advance (and is a deny).
        let deny_all = vec![to_web(AclRule::any(AclAction::Deny))];
        assert_eq!(verdict(deny_all, 80), Some(AclDecision::Deny(Some(0))));
        // A source constraint decides even when a later rule would say the same.
        let both_permit = vec![
            AclRule {
                src: Some("192.0.2.0/24".parse().unwrap()),
                ..AclRule::any(AclAction::Permit)
            },
            AclRule::any(AclAction::Permit),
        ];
        assert_eq!(verdict(both_permit, 80), None);
        let src_ports = vec![AclRule {
            src_ports: Some(1024..=65535),
            ..AclRule::any(AclAction::Permit)
        }];
        assert_eq!(verdict(src_ports, 80), None);
        // A /0 and the whole port range constrain nothing.
        let wide = vec![AclRule {
            src: Some("0.0.0.0/0".parse().unwrap()),
            src_ports: Some(0..=65535),
            ..AclRule::any(AclAction::Permit)
        }];
        assert_eq!(verdict(wide, 80), Some(AclDecision::Permit(Some(0))));
    }

    #[test]
    fn verdict_for_any_source_agrees_with_check() {
        // Every source gets the stated verdict from the rule list itself.
        let rules = vec![
            AclRule {
                proto: Some(Proto::Udp),
                src: Some("10.0.0.0/8".parse().unwrap()),
                ..AclRule::any(AclAction::Deny)
            },
            AclRule {
                dst_ports: Some(1..=1023),
                ..AclRule::any(AclAction::Permit)
            },
            AclRule::any(AclAction::Deny),
        ];
        let mut acl = Acl::new(rules);
        let dst = Ipv4Addr::new(198, 51, 100, 1);
        for dport in [22, 80, 8080] {
            let stated = acl.verdict_for_any_source(Proto::Tcp, dst, dport);
            assert!(stated.is_some());
            for src in [[10, 1, 2, 3], [192, 0, 2, 1], [203, 0, 113, 9]] {
                for sport in [0, 1, 40000, 65535] {
                    let p = AclPacket {
                        src_port: Some(sport),
                        ..pkt(src, dst.octets(), Proto::Tcp, dport)
                    };
                    assert_eq!(
                        Some(acl.check(&p, false)),
                        stated,
                        "{src:?}:{sport} -> {dport}"
                    );
                }
            }
        }
    }
}
