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
    /// Program run on every state change, with keepalived's `notify` arguments:
    /// `INSTANCE <name> <MASTER|BACKUP|FAULT|INIT> <priority>`.
    #[serde(default)]
    pub(crate) notify: Option<String>,
    /// Source address of the adverts and tie-breaker between equal priorities. Default: the
    /// first IPv4 address of `interface` that is not a VIP.
    #[serde(default)]
    pub(crate) primary_address: Option<Ipv4Addr>,
    /// Priority penalty while a tracked service has no healthy backend; 0 puts the instance
    /// in FAULT instead (keepalived `track_script` weight). Default 0.
    #[serde(default = "d_zero")]
    pub(crate) track_services_weight: Spanned<i64>,
    /// Gratuitous ARPs per burst on becoming master (keepalived `garp_master_repeat`).
    /// Default 5.
    #[serde(default = "d_garp_count")]
    pub(crate) garp_count: Spanned<i64>,
    /// Repeat the burst this long after becoming master (keepalived `garp_master_delay`);
    /// "0s" = only once. Default 5 s.
    #[serde(default = "d_garp_delay")]
    pub(crate) garp_repeat_delay: HumanDuration,
}

fn d_zero() -> Spanned<i64> {
    Spanned::new(0..0, 0)
}
fn d_garp_count() -> Spanned<i64> {
    Spanned::new(0..0, 5)
}
fn d_garp_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
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
        if !(0..=253).contains(i.track_services_weight.get_ref()) {
            v.error_at(
                &i.track_services_weight,
                "track_services_weight must be 0 (fault) or a penalty of 1..=253",
            );
        }
        if !(1..=100).contains(i.garp_count.get_ref()) {
            v.error_at(&i.garp_count, "garp_count must be 1..=100");
        }
        if let Some(p) = i.primary_address
            && i.addresses.get_ref().iter().any(|a| a.addr() == p)
        {
            v.error_at(
                &i.addresses,
                format!("primary_address {p} is also a virtual address"),
            );
        }
        if i.addresses.get_ref().len() > 255 {
            v.error_at(&i.addresses, "an advert carries at most 255 addresses");
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
