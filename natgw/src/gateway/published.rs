//! Decisions stated in advance: the TCP listeners whose new connections a second data path
//! (the kernel fast path) may open without asking the core, SYN by SYN.
//!
//! Invariant: a listener is published only when the core's answer to every SYN from the
//! outside to it is already known and is "open a flow to this inside endpoint": a static
//! forward (one inside endpoint, no choice to make), the ACL's first match for a TCP packet
//! to its public endpoint a `permit` whatever the source address and port
//! ([`crate::Acl::verdict_for_any_source`]), and the table not under pressure
//! (the table's `new_flow_pressure`: a flood must meet the core's defences — early drop,
//! the per-source bound — packet by packet, so the listener is withdrawn while half-open
//! flows reach half of a bound). Everything else (virtual services, whose schedulers
//! choose per connection; UDP; a source-dependent or denying ACL) is never published and
//! keeps the slow path. The set is recomputed from the core's state at each call, so a
//! withdrawal takes effect at the data path's next update.
//!
//! What the executor must still leave to the core, because the verdict depends on it and
//! the publication does not carry it: a SYN whose source lies in the inside networks (the
//! core treats it as a hairpin from the inside, [`Gateway::direction`]), and a SYN of a
//! flow the data path already has an entry for.

use std::net::SocketAddrV4;

use super::Gateway;
use crate::acl::AclDecision;
use crate::flow::Proto;

/// A TCP static forward whose SYNs a data path may execute (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedListener {
    /// The public endpoint a SYN is addressed to.
    pub public: SocketAddrV4,
    /// The inside endpoint the SYN goes to, source address and port preserved.
    pub inside: SocketAddrV4,
    /// The ACL rule whose `permit` decides every such SYN (`None`: no rule matches, the
    /// outside's default permit), so that a flow opened elsewhere counts its hit.
    pub acl_rule: Option<usize>,
}

impl Gateway {
    /// The TCP static forwards whose new connections a second data path may open on its
    /// own right now, in listener order (see the module docs for the rule).
    #[must_use]
    pub fn published_listeners(&self) -> Vec<PublishedListener> {
        self.listeners()
            .filter(|(_, l)| l.proto == Proto::Tcp)
            .filter_map(|(id, l)| {
                let inside = l.selector.as_static()?.inside;
                let acl_rule = match self.acl.verdict_for_any_source(
                    Proto::Tcp,
                    *l.public.ip(),
                    l.public.port(),
                )? {
                    AclDecision::Permit(rule) => rule,
                    AclDecision::Deny(_) => return None,
                };
                if self.table.new_flow_pressure(id) {
                    return None;
                }
                Some(PublishedListener {
                    public: l.public,
                    inside,
                    acl_rule,
                })
            })
            .collect()
    }
}
