//! `vipgate run` / `show vrrp`: VRRPv3 instances, grouped by `group` into sync groups.
//!
//! Each sync group (or ungrouped instance) runs as one `vrrp::driver` task; every instance is
//! its own [`Part`] so `show vrrp` lists instances, and stopping any member of a group stops
//! the whole group once (masters send priority 0 and withdraw their addresses).
//!
//! A reload reconfigures each instance in place ([`Part::reconfigure`]): priority,
//! preemption, advert interval, the VIP list, tracking weights, notify and gratuitous ARP
//! settings change without leaving the current state. What needs new sockets or new health
//! subscriptions is the vrrp core's rule (`vrrp::SyncGroup::check_reconfigure`): the driver
//! answers `NeedsRestart` with the reason, the part logs it and answers `Ok(false)`, and the
//! group restarts. So does a change of the sync group's members (or of a member's group).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use netutil::Reconfigured;
use serde_json::{Value, json};
use vrrp::driver::{GroupSpec, MemberSpec, TrackedService, VrrpDriver, VrrpStatus};

use super::wiring::{self, Wiring};
use super::{BoxFuture, Kind, Part, StartCtx, ready};
use crate::config::vrrp::{VrrpGroupSection, VrrpSection};
use crate::config::{SiteConfig, lower};

/// The running driver of one sync group, shared by the parts of its members.
struct Shared {
    handle: Mutex<Option<VrrpDriver>>,
    /// The sections the group runs with, in member order (what a reload compares against).
    sections: Mutex<Vec<VrrpSection>>,
    /// The group's own `[[vrrp_group]]`, if any (a change restarts the group).
    group_section: Option<VrrpGroupSection>,
    /// The wiring the group was started with (health sources, VIP hooks).
    wiring: Wiring,
}

struct VrrpPart {
    name: String,
    /// This instance's member index in its group.
    index: usize,
    shared: Arc<Shared>,
}

/// The sync group a section belongs to (a standalone instance is a group of its own).
fn group_key(s: &VrrpSection) -> String {
    s.group
        .clone()
        .unwrap_or_else(|| format!("\0{}", s.name.get_ref()))
}

impl Part for VrrpPart {
    fn kind(&self) -> Kind {
        Kind::Vrrp
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn status(&self) -> Value {
        let statuses = match self.shared.handle.lock() {
            Ok(h) => h.as_ref().map(VrrpDriver::status).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        statuses
            .iter()
            .find(|s| s.name == self.name)
            .map(status_json)
            .unwrap_or_else(|| json!({ "name": self.name, "state": "STOPPED" }))
    }

    fn reconfigure(&self, site: &SiteConfig) -> BoxFuture<anyhow::Result<Reconfigured>> {
        let sections = self
            .shared
            .sections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(old) = sections.get(self.index) else {
            return ready(Ok(Reconfigured::restart("the instance is gone")));
        };
        let key = group_key(old);
        let members: Vec<&VrrpSection> = site.vrrp.iter().filter(|s| group_key(s) == key).collect();
        let same_members = members.len() == sections.len()
            && members
                .iter()
                .zip(sections.iter())
                .all(|(n, o)| n.name.get_ref() == o.name.get_ref() && n.group == o.group);
        if !same_members {
            return ready(Ok(Reconfigured::restart(
                "the sync group's members changed",
            )));
        }
        let group_section = group_section(site, members[self.index]);
        if serde_json::to_value(group_section).ok()
            != serde_json::to_value(self.shared.group_section.as_ref()).ok()
        {
            return ready(Ok(Reconfigured::restart(
                "the sync group's [[vrrp_group]] changed",
            )));
        }
        let new = members[self.index].clone();
        if serde_json::to_value(old).ok() == serde_json::to_value(&new).ok() {
            return ready(Ok(Reconfigured::Live));
        }
        drop(sections);
        let spec = wired_spec(&new, &self.shared.wiring);
        let reply = match self
            .shared
            .handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            Some(h) => h.reconfigure(self.index, spec),
            None => return ready(Ok(Reconfigured::restart("the group is not running"))),
        };
        // The group's task answers; only then does the new section become what a reload
        // compares with.
        let (shared, index, name) = (Arc::clone(&self.shared), self.index, self.name.clone());
        Box::pin(async move {
            let outcome = reply
                .await
                .with_context(|| format!("reconfiguring VRRP instance {name}"))?;
            if outcome.is_live()
                && let Some(slot) = shared
                    .sections
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_mut(index)
            {
                *slot = new;
            }
            Ok(outcome)
        })
    }

    fn dead_task(&self) -> Option<String> {
        // Every member of a sync group reports its group's death: they restart together.
        self.shared
            .handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .and_then(VrrpDriver::dead_task)
    }

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            let handle = self.shared.handle.lock().ok().and_then(|mut h| h.take());
            if let Some(h) = handle {
                h.stop().await;
            }
        })
    }
}

/// Starts every instance; instances sharing a `group` run as one sync group.
///
/// # Errors
/// An interface or socket problem, after stopping the groups already started.
pub(crate) async fn start(site: &SiteConfig, ctx: &StartCtx) -> anyhow::Result<Vec<Box<dyn Part>>> {
    let wiring = wiring::lock(&ctx.wiring).clone();
    let mut groups: BTreeMap<String, Vec<&VrrpSection>> = BTreeMap::new();
    let mut order = Vec::new();
    for s in &site.vrrp {
        let key = group_key(s);
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(s);
    }
    let mut parts: Vec<Box<dyn Part>> = Vec::new();
    for key in order {
        let sections = &groups[&key];
        let specs = sections.iter().map(|s| wired_spec(s, &wiring)).collect();
        let group_section = group_section(site, sections[0]).cloned();
        let group = sections[0].group.as_ref().map(|name| {
            group_section
                .as_ref()
                .map_or_else(|| GroupSpec::new(name), lower::vrrp_group)
        });
        let handle = match VrrpDriver::start(group, specs).await {
            Ok(h) => h,
            Err(e) => {
                for p in parts {
                    p.stop().await;
                }
                return Err(e).with_context(|| {
                    format!("starting VRRP instance {}", sections[0].name.get_ref())
                });
            }
        };
        let shared = Arc::new(Shared {
            handle: Mutex::new(Some(handle)),
            sections: Mutex::new(sections.iter().map(|s| (*s).clone()).collect()),
            group_section,
            wiring: wiring.clone(),
        });
        for (index, s) in sections.iter().enumerate() {
            parts.push(Box::new(VrrpPart {
                name: s.name.get_ref().clone(),
                index,
                shared: shared.clone(),
            }));
        }
    }
    Ok(parts)
}

/// The `[[vrrp_group]]` of the sync group `s` belongs to, if it has one.
fn group_section<'a>(site: &'a SiteConfig, s: &VrrpSection) -> Option<&'a VrrpGroupSection> {
    let name = s.group.as_ref()?;
    site.vrrp_group.iter().find(|g| g.name.get_ref() == name)
}

fn wired_spec(s: &VrrpSection, wiring: &Wiring) -> MemberSpec {
    let mut spec = lower::vrrp(s);
    let weight = s.track_services_weight.get_ref().get();
    for name in &s.track_services {
        match wiring.health.get(name.get_ref()) {
            Some(rx) => spec.track_services.push(TrackedService {
                name: name.get_ref().clone(),
                weight,
                health: rx.clone(),
            }),
            // Only until `vipgate run` passes the lb part's health here; say so loudly
            // rather than pretend the service is tracked.
            None => tracing::warn!(
                instance = %s.name.get_ref(),
                service = %name.get_ref(),
                "track_services: no health source for this service in this build; not tracked"
            ),
        }
    }
    spec.hooked = s
        .addresses
        .get_ref()
        .iter()
        .filter_map(|a| wiring.hooks.get(&a.addr()).map(|h| (a.addr(), h.clone())))
        .collect();
    spec
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn status_json(s: &VrrpStatus) -> Value {
    let c = &s.counters;
    json!({
        "name": s.name,
        "group": s.group,
        "interface": s.interface,
        "vrid": s.vrid,
        "state": s.state.as_str(),
        "priority": s.priority,
        "configured_priority": s.configured_priority,
        "primary_address": s.primary_address.to_string(),
        "master": s.master.map(|(a, _)| a.to_string()),
        "master_priority": s.master.map(|(_, p)| p),
        "advert_interval_ms": ms(s.advert_interval),
        "master_advert_interval_ms": ms(s.master_advert_interval),
        "master_down_interval_ms": ms(s.master_down_interval),
        "addresses": s.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect::<Vec<_>>(),
        "counters": {
            "adverts_rx": c.adverts_rx,
            "adverts_tx": c.adverts_tx,
            "priority_zero_rx": c.priority_zero_rx,
            "priority_zero_tx": c.priority_zero_tx,
            "bad_ttl": c.bad_ttl,
            "other_vrid": c.other_vrid,
            "address_mismatch": c.address_mismatch,
            "lower_priority": c.lower_priority,
            "ignored": c.ignored,
            "own_advert": c.own_advert,
            "zero_interval": c.zero_interval,
            "not_listening": c.not_listening,
            "held_by_group": c.held_by_group,
            "reassert_tx": c.reassert_tx,
            "reassert_suppressed": c.reassert_suppressed,
            "priority_zero_not_master": c.priority_zero_not_master,
            "interval_capped": c.interval_capped,
            "notify_runs": s.notify.runs,
            "notify_timeouts": s.notify.timeouts,
            "notify_skipped": s.notify.skipped,
            "notify_failed": s.notify.failed,
            "unknown_peer": s.unknown_peer,
            "io_errors": s.io_errors,
        },
        "malformed": s.malformed.iter().map(|(k, v)| (format!("{k:?}"), json!(v))).collect::<serde_json::Map<_, _>>(),
        "transitions": s.transitions.iter().map(|(at, from, to, reason)| json!({
            "at_unix_ms": at, "from": from.as_str(), "to": to.as_str(), "reason": reason,
        })).collect::<Vec<_>>(),
        "tracked": s.tracked.iter().map(|(name, weight, up)| json!({
            "name": name, "weight": weight, "up": up,
        })).collect::<Vec<_>>(),
    })
}

/// Human text for `vipgate show vrrp`.
pub(crate) fn render(items: &[Value]) -> String {
    let mut out = format!(
        "{:<14} {:<10} {:>4}  {:<7} {:>7}  {:<15} {:>7}  {}\n",
        "NAME", "INTERFACE", "VRID", "STATE", "PRIO", "MASTER", "ADVERT", "ADDRESSES"
    );
    for i in items {
        let s = |k: &str| i[k].as_str().unwrap_or("-").to_owned();
        let n = |k: &str| i[k].as_u64().map_or("-".to_owned(), |v| v.to_string());
        let addrs: Vec<String> = i["addresses"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        out += &format!(
            "{:<14} {:<10} {:>4}  {:<7} {:>7}  {:<15} {:>7}  {}\n",
            s("name"),
            s("interface"),
            n("vrid"),
            s("state"),
            format!("{}/{}", n("priority"), n("configured_priority")),
            s("master"),
            format!("{}ms", n("advert_interval_ms")),
            addrs.join(" "),
        );
        let c = &i["counters"];
        let malformed: u64 = i["malformed"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        out += &format!(
            "    adverts rx {} tx {} (priority 0 rx {} tx {}), dropped: ttl {} malformed {} lower-priority {}, master down interval {}ms\n",
            c["adverts_rx"],
            c["adverts_tx"],
            c["priority_zero_rx"],
            c["priority_zero_tx"],
            c["bad_ttl"],
            malformed,
            c["lower_priority"],
            n("master_down_interval_ms"),
        );
        out += &format!(
            "    spoofing: unknown peer {} priority 0 not from master {} re-assertions {} suppressed {} interval capped {}; notify runs {} timeouts {} skipped {}\n",
            c["unknown_peer"],
            c["priority_zero_not_master"],
            c["reassert_tx"],
            c["reassert_suppressed"],
            c["interval_capped"],
            c["notify_runs"],
            c["notify_timeouts"],
            c["notify_skipped"],
        );
        let tracked: Vec<String> = i["tracked"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let up = t["up"].as_bool().unwrap_or(true);
                let effect = match t["weight"].as_u64().unwrap_or(0) {
                    0 => "fault".to_owned(),
                    w => format!("-{w}"),
                };
                format!(
                    "{} {} ({effect})",
                    t["name"].as_str().unwrap_or("?"),
                    if up { "up" } else { "DOWN" }
                )
            })
            .collect();
        if !tracked.is_empty() {
            out += &format!("    tracking: {}\n", tracked.join(", "));
        }
        for t in i["transitions"].as_array().into_iter().flatten() {
            let at = t["at_unix_ms"].as_u64().unwrap_or(0);
            out += &format!(
                "    {} {} -> {}: {}\n",
                clock(at),
                t["from"].as_str().unwrap_or("?"),
                t["to"].as_str().unwrap_or("?"),
                t["reason"].as_str().unwrap_or("?"),
            );
        }
    }
    out
}

/// `HH:MM:SS.mmm` UTC of a unix time in milliseconds.
fn clock(ms: u64) -> String {
    let (s, milli) = (ms / 1000, ms % 1000);
    format!(
        "{:02}:{:02}:{:02}.{milli:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_state_and_transitions() {
        let item = json!({
            "name": "vip-web", "interface": "eth0", "vrid": 51, "state": "MASTER",
            "priority": 150, "configured_priority": 150, "master": "198.51.100.11",
            "advert_interval_ms": 1000, "master_down_interval_ms": 3414,
            "addresses": ["198.51.100.10/24"],
            "counters": {"adverts_rx": 1, "adverts_tx": 2, "priority_zero_rx": 0,
                         "priority_zero_tx": 0, "bad_ttl": 3, "lower_priority": 0},
            "malformed": {"BadChecksum": 2},
            "transitions": [{"at_unix_ms": 3_723_004u64, "from": "BACKUP", "to": "MASTER",
                             "reason": "no advert within master down interval"}],
            "tracked": [{"name": "interface eth0", "weight": 0, "up": true},
                        {"name": "interface eth1", "weight": 20, "up": false}],
        });
        let text = render(&[item]);
        assert!(text.contains("vip-web"), "{text}");
        assert!(text.contains("150/150"), "{text}");
        assert!(text.contains("malformed 2"), "{text}");
        assert!(text.contains("01:02:03.004 BACKUP -> MASTER"), "{text}");
        assert!(
            text.contains("tracking: interface eth0 up (fault), interface eth1 DOWN (-20)"),
            "{text}"
        );
    }
}
