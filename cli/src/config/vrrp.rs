//! `[[vrrp]]`: VRRPv3 instances (keepalived `vrrp_instance`).

use super::lb::ServiceSection;
use super::{HumanDuration, Validator, check_unique};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::time::Duration;
use toml::Spanned;

/// One `[[vrrp]]` instance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VrrpSection {
    pub(crate) name: Spanned<String>,
    /// Interface the adverts go out on and the VIPs live on.
    pub(crate) interface: String,
    /// Virtual router id, 1..=255.
    pub(crate) vrid: Spanned<i64>,
    /// 1..=254; higher wins. Default 100 (keepalived).
    #[serde(default = "d_priority")]
    pub(crate) priority: Spanned<i64>,
    /// Default 1 s; VRRPv3 allows 10ms..=40.95s in centiseconds.
    #[serde(default = "d_advert")]
    pub(crate) advert_interval: Spanned<HumanDuration>,
    /// Take over from a lower-priority master. Default true (RFC 5798).
    #[serde(default = "d_true")]
    pub(crate) preempt: bool,
    /// Wait this long after start before preempting.
    #[serde(default)]
    pub(crate) preempt_delay: Option<HumanDuration>,
    /// Virtual addresses with prefix length.
    pub(crate) addresses: Spanned<Vec<Ipv4Net>>,
    /// Services whose health lowers this instance's priority.
    #[serde(default)]
    pub(crate) track_services: Vec<Spanned<String>>,
    /// Interfaces whose link-down puts the instance in fault.
    #[serde(default)]
    pub(crate) track_interfaces: Vec<String>,
    /// Sync group: instances with the same group change state together.
    #[serde(default)]
    pub(crate) group: Option<String>,
    /// Send adverts unicast to these peers instead of 224.0.0.18.
    #[serde(default)]
    pub(crate) unicast_peers: Vec<Ipv4Addr>,
    /// Program run on every state change with arguments: instance name, new state.
    #[serde(default)]
    pub(crate) notify: Option<String>,
}

fn d_priority() -> Spanned<i64> {
    Spanned::new(0..0, 100)
}
fn d_advert() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(1)))
}
fn d_true() -> bool {
    true
}

/// `services` is `None` when the `[[service]]` sections did not parse (no cross-checks then).
pub(crate) fn validate_all(
    instances: &[VrrpSection],
    services: Option<&[ServiceSection]>,
    v: &mut Validator,
) {
    check_unique(
        instances
            .iter()
            .map(|i| (i.name.get_ref().clone(), i.name.span())),
        "vrrp instance name",
        v,
    );
    check_unique(
        instances.iter().map(|i| {
            (
                format!("{} on {}", i.vrid.get_ref(), i.interface),
                i.vrid.span(),
            )
        }),
        "vrid",
        v,
    );
    for i in instances {
        if !(1..=255).contains(i.vrid.get_ref()) {
            v.error_at(
                &i.vrid,
                format!("vrid {} is out of range 1..=255", i.vrid.get_ref()),
            );
        }
        match *i.priority.get_ref() {
            1..=254 => {}
            255 => v.error_at(
                &i.priority,
                "priority 255 is reserved for the address owner (RFC 5798 §5.2.4); vipgate adds the VIPs itself, so use 1..=254",
            ),
            p => v.error_at(&i.priority, format!("priority {p} is out of range 1..=254")),
        }
        let cs = i.advert_interval.get_ref().0.as_millis();
        if !(10..=40_950).contains(&cs) || cs % 10 != 0 {
            v.error_at(
                &i.advert_interval,
                "advert_interval must be a whole number of centiseconds from 10ms to 40s950ms (RFC 5798)",
            );
        }
        if i.addresses.get_ref().is_empty() {
            v.error_at(&i.addresses, "a VRRP instance needs at least one address");
        }
        for t in i.track_services.iter().filter(|_| services.is_some()) {
            let services = services.unwrap_or_default();
            if !services.iter().any(|s| s.name.get_ref() == t.get_ref()) {
                let names: Vec<&str> = services.iter().map(|s| s.name.get_ref().as_str()).collect();
                v.error_at(
                    t,
                    format!(
                        "track_services names `{}`, but no [[service]] has that name{}",
                        t.get_ref(),
                        super::did_you_mean(t.get_ref(), &names)
                    ),
                );
            }
        }
    }
}
