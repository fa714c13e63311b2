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
    /// Interfaces whose link-down puts the instance in fault (`"eth1"`) or lowers its
    /// priority (`{ name = "eth1", weight = 20 }`).
    #[serde(default)]
    pub(crate) track_interfaces: Vec<Spanned<TrackInterface>>,
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

/// One `track_interfaces` entry: `"eth1"` (link down = FAULT, weight 0) or
/// `{ name = "eth1", weight = 20 }` (link down lowers the priority by 20: keepalived's
/// `track_interface { eth1 weight -20 }`). Both spellings can be mixed in one list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TrackInterface {
    pub(crate) name: String,
    /// 0 = FAULT while down; otherwise the priority penalty while down.
    pub(crate) weight: i64,
}

/// The table spelling of a [`TrackInterface`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackInterfaceTable {
    name: String,
    #[serde(default)]
    weight: i64,
}

impl<'de> Deserialize<'de> for TrackInterface {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = TrackInterface;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"an interface name ("eth1") or { name = "eth1", weight = 20 }"#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(TrackInterface {
                    name: v.to_owned(),
                    weight: 0,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let t = TrackInterfaceTable::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(TrackInterface {
                    name: t.name,
                    weight: t.weight,
                })
            }
        }
        d.deserialize_any(Entry)
    }
}

impl Serialize for TrackInterface {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        if self.weight == 0 {
            return s.serialize_str(&self.name);
        }
        let mut t = s.serialize_struct("TrackInterface", 2)?;
        t.serialize_field("name", &self.name)?;
        t.serialize_field("weight", &self.weight)?;
        t.end()
    }
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
        for t in &i.track_interfaces {
            let (name, weight) = (&t.get_ref().name, t.get_ref().weight);
            if weight < 0 {
                v.error_at(
                    t,
                    format!(
                        "track_interfaces weight {weight}: vipgate's weight is the penalty while the link is down, so keepalived's `weight {weight}` is written `weight = {}`",
                        weight.unsigned_abs()
                    ),
                );
            } else if weight > 253 {
                v.error_at(
                    t,
                    "track_interfaces weight must be 0 (fault) or a penalty of 1..=253",
                );
            } else if weight > 0 && *name == i.interface {
                v.error_at(
                    t,
                    format!(
                        "`{name}` is this instance's own interface: losing it always means FAULT (no adverts can go out), so it takes no weight"
                    ),
                );
            }
            if name.is_empty() {
                v.error_at(t, "track_interfaces needs an interface name");
            }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn load(extra: &str) -> Result<crate::config::SiteConfig, String> {
        let text = format!(
            "[[vrrp]]\nname = \"v\"\ninterface = \"eth0\"\nvrid = 1\naddresses = [\"10.0.0.1/24\"]\n{extra}\n"
        );
        crate::config::parse(Path::new("site.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn track_interfaces_take_names_and_weighted_tables_mixed() {
        let site = load(
            r#"track_interfaces = ["eth1", { name = "eth2", weight = 20 }, { name = "eth3" }]"#,
        )
        .expect("valid");
        let got: Vec<(String, i64)> = site.vrrp[0]
            .track_interfaces
            .iter()
            .map(|t| (t.get_ref().name.clone(), t.get_ref().weight))
            .collect();
        assert_eq!(
            got,
            [("eth1".into(), 0), ("eth2".into(), 20), ("eth3".into(), 0)]
        );
        // What a reload compares: both spellings survive a round trip through JSON.
        let json = serde_json::to_string(&site.vrrp[0].track_interfaces).expect("serializes");
        assert_eq!(json, r#"["eth1",{"name":"eth2","weight":20},"eth3"]"#);
    }

    #[test]
    fn track_interfaces_mistakes_point_at_the_entry() {
        let e =
            load(r#"track_interfaces = ["eth1", { name = "eth2", weight = -20 }]"#).unwrap_err();
        assert!(
            e.starts_with("site.toml:6:29: track_interfaces weight -20:")
                && e.contains("`weight = 20`"),
            "{e}"
        );
        let e = load(r#"track_interfaces = [{ name = "eth2", weight = 300 }]"#).unwrap_err();
        assert!(
            e.starts_with("site.toml:6:21: track_interfaces weight must be"),
            "{e}"
        );
        let e = load(r#"track_interfaces = [{ name = "eth0", weight = 10 }]"#).unwrap_err();
        assert!(
            e.starts_with("site.toml:6:21: `eth0` is this instance's own interface"),
            "{e}"
        );
        let e = load(r#"track_interfaces = [{ name = "eth2", wieght = 10 }]"#).unwrap_err();
        assert!(e.starts_with("site.toml:6:"), "{e}");
        assert!(e.contains("wieght"), "{e}");
        let e = load("track_interfaces = [7]").unwrap_err();
        assert!(e.starts_with("site.toml:6:21:"), "{e}");
        assert!(e.contains(r#"an interface name ("eth1") or"#), "{e}");
    }
}
