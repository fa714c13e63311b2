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
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use netutil::Reconfigured;
use serde_json::{Value, json};
use tokio::sync::watch;
use vrrp::DropReason;
use vrrp::driver::{GroupSpec, MemberSpec, TrackedService, VrrpDriver, VrrpStatus};

use super::wiring::{self, Wiring};
use super::{BoxFuture, Kind, Part, StartCtx, ready};
use crate::config::vrrp::{VrrpGroupSection, VrrpSection};
use crate::config::{SiteConfig, lower};
use crate::control::ControlOp;

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
        statuses.iter().find(|s| s.name == self.name).map_or_else(
            || json!({ "name": self.name, "state": "STOPPED" }),
            |s| serde_json::to_value(s).unwrap_or_default(),
        )
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

    fn control(&self, op: &ControlOp) -> anyhow::Result<Value> {
        let ControlOp::VrrpSetPriority { priority, .. } = *op else {
            anyhow::bail!("vrrp `{}` does not support `{op}`", self.name);
        };
        let file = self
            .shared
            .sections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(self.index)
            .map(|s| s.priority.get_ref().get());
        let previous = self.status().get("priority").cloned();
        self.shared
            .handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .context("the instance is not running")?
            .set_priority(self.index, priority)
            .with_context(|| format!("setting the priority of VRRP instance {}", self.name))?;
        tracing::info!(instance = %self.name, priority, "priority set by operator");
        Ok(json!({
            "instance": self.name,
            "priority": priority,
            "previous": previous,
            "file_priority": file,
            "note": "not persisted: a restart, or a reload that changes this instance's priority in the file, replaces it",
        }))
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
    make_preempt_gate(site, ctx);
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
        {
            let mut wiring = wiring::lock(&ctx.wiring);
            for (index, s) in sections.iter().enumerate() {
                if let Some(state) = handle.state_watch(index) {
                    wiring.vrrp_states.insert(s.name.get_ref().clone(), state);
                }
            }
        }
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

/// Makes the preemption gate of the instance `[sync]` follows, closed, when the sync part
/// will run: a node back from a crash must not take the VIP (and its connections) before it
/// holds the master's flows. The gate opens when the sync part has the master's snapshot, or
/// at `ready_timeout` (logged), so a dead sync delays fail-back but never blocks it.
fn make_preempt_gate(site: &SiteConfig, ctx: &StartCtx) {
    let Some(sync) = &site.sync else {
        return;
    };
    if !ctx.only.is_empty() && !ctx.only.contains(&Kind::Sync) {
        return;
    }
    let name = sync.vrrp.get_ref().clone();
    let timeout = sync.ready_timeout.get_ref().0;
    let (gate, _) = watch::channel(false);
    let bound = gate.clone();
    let instance = name.clone();
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        if bound.send_if_modified(|open| !std::mem::replace(open, true)) {
            tracing::warn!(
                instance = %instance,
                timeout = ?timeout,
                "flow sync not ready within [sync] ready_timeout: preemption allowed anyway"
            );
        }
    });
    wiring::lock(&ctx.wiring).preempt_gates.insert(name, gate);
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
    spec.preempt_gate = wiring
        .preempt_gates
        .get(s.name.get_ref())
        .map(watch::Sender::subscribe);
    spec.hooked = s
        .addresses
        .get_ref()
        .iter()
        .filter_map(|a| wiring.hooks.get(&a.addr()).map(|h| (a.addr(), h.clone())))
        .collect();
    spec
}

/// Human text for `vipgate show vrrp`: transition times as dates in local time, or in UTC
/// when `utc`.
pub(crate) fn render(items: &[Value], utc: bool) -> String {
    let header = row([
        "NAME",
        "INTERFACE",
        "VRID",
        "STATE",
        "PRIO",
        "MASTER",
        "ADVERT",
        "ADDRESSES",
    ]);
    header + &super::render_each(items, |out, i| render_instance(out, i, utc))
}

/// One line of the instance table.
fn row(columns: [&str; 8]) -> String {
    let [
        name,
        interface,
        vrid,
        state,
        prio,
        master,
        advert,
        addresses,
    ] = columns;
    format!(
        "{name:<14} {interface:<10} {vrid:>4}  {state:<7} {prio:>7}  {master:<15} {advert:>7}  {addresses}\n"
    )
}

fn render_instance(out: &mut String, i: &VrrpStatus, utc: bool) {
    let addrs: Vec<String> = i
        .addresses
        .iter()
        .map(|a| format!("{}/{}", a.address, a.prefix_len))
        .collect();
    out.push_str(&row([
        &i.name,
        &i.interface,
        &i.vrid.to_string(),
        i.state.as_str(),
        &format!("{}/{}", i.priority, i.configured_priority),
        &i.master.map_or("-".to_owned(), |m| m.to_string()),
        &format!("{}ms", i.advert_interval.as_millis()),
        &addrs.join(" "),
    ]));
    let c = &i.counters;
    let sm = &c.instance;
    let _ = writeln!(
        out,
        "    adverts rx {} tx {} (priority 0 rx {} tx {}), dropped: ttl {} malformed {} lower-priority {}, master down interval {}ms",
        sm.adverts_rx,
        sm.adverts_tx,
        sm.priority_zero_rx,
        sm.priority_zero_tx,
        sm.drops.get(DropReason::BadTtl),
        c.malformed.total(),
        sm.drops.get(DropReason::LowerPriority),
        i.master_down_interval.as_millis(),
    );
    let _ = writeln!(
        out,
        "    spoofing: unknown peer {} priority 0 not from master {} re-assertions {} suppressed {} interval capped {}; notify runs {} timeouts {} skipped {}",
        c.unknown_peer,
        sm.drops.get(DropReason::PriorityZeroNotMaster),
        sm.reassert_tx,
        sm.reassert_suppressed,
        sm.interval_capped,
        c.notify.runs,
        c.notify.timeouts,
        c.notify.skipped,
    );
    if let Some(p) = i.runtime_priority {
        let _ = writeln!(
            out,
            "    priority {p} (file: {}, set at runtime)",
            i.configured_priority
        );
    }
    let _ = writeln!(
        out,
        "    transitions {}, became master {}; time as master {}, backup {}, fault {}",
        c.transitions,
        c.became_master,
        span(c.master_time),
        span(c.backup_time),
        span(c.fault_time),
    );
    let tracked: Vec<String> = i
        .tracked
        .iter()
        .map(|t| {
            let effect = match t.weight {
                0 => "fault".to_owned(),
                w => format!("-{w}"),
            };
            let state = if t.up { "up" } else { "DOWN" };
            match (t.running, t.quorum) {
                (Some(running), Some(quorum)) => {
                    let max = t
                        .quorum_max
                        .filter(|m| *m != u32::MAX)
                        .map(|m| format!("..{m}"))
                        .unwrap_or_default();
                    format!("{} {running}/{quorum}{max} {state} ({effect})", t.name)
                }
                _ => format!("{} {state} ({effect})", t.name),
            }
        })
        .collect();
    if !tracked.is_empty() {
        let _ = writeln!(out, "    tracking: {}", tracked.join(", "));
    }
    match i.preempt_gate {
        Some(false) => out.push_str("    preempt waits for sync\n"),
        Some(true) => out.push_str("    sync ready\n"),
        None => {}
    }
    for t in &i.transitions {
        let _ = writeln!(
            out,
            "    {} {} -> {}: {}",
            clock(t.at_unix_ms, utc),
            t.from,
            t.to,
            t.reason
        );
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm +HH:MM` of a unix time in milliseconds, in local time (as the
/// host's time zone says) or in UTC.
fn clock(ms: u64, utc: bool) -> String {
    const FORMAT: &str = "%Y-%m-%d %H:%M:%S%.3f %:z";
    let Some(at) = i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
    else {
        return format!("@{ms}ms");
    };
    if utc {
        at.format(FORMAT).to_string()
    } else {
        at.with_timezone(&chrono::Local).format(FORMAT).to_string()
    }
}

/// A time span as `1h02m03s`, `2m03.4s` or `3.4s`.
fn span(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    let tenths = d.subsec_millis() / 100;
    match (secs / 3600, secs / 60 % 60, secs % 60) {
        (0, 0, s) => format!("{s}.{tenths}s"),
        (0, m, s) => format!("{m}m{s:02}.{tenths}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vrrp::VirtualAddress;
    use vrrp::driver::{TrackedStatus, TransitionRecord, VrrpCounters};

    #[test]
    fn render_lists_state_and_transitions() {
        let mut instance = vrrp::Counters {
            adverts_rx: 1,
            adverts_tx: 2,
            ..Default::default()
        };
        instance.drops.count(DropReason::BadTtl);
        let mut malformed = netutil::DropCounters::default();
        malformed.add(vrrp::WireError::BadChecksum, 2);
        let status = VrrpStatus {
            name: "vip-web".into(),
            group: None,
            interface: "eth0".into(),
            vrid: 51,
            state: vrrp::State::Master,
            priority: 150,
            configured_priority: 150,
            runtime_priority: Some(120),
            primary_address: "198.51.100.12".parse().unwrap(),
            master: Some("198.51.100.11".parse().unwrap()),
            master_priority: Some(150),
            advert_interval: Duration::from_secs(1),
            master_advert_interval: Duration::from_secs(1),
            master_down_interval: Duration::from_millis(3414),
            addresses: vec![VirtualAddress {
                address: "198.51.100.10".parse().unwrap(),
                prefix_len: 24,
            }],
            counters: VrrpCounters {
                instance,
                malformed,
                transitions: 3,
                became_master: 2,
                master_time: Duration::from_millis(2500),
                backup_time: Duration::from_secs(3723),
                fault_time: Duration::from_millis(125_400),
                ..Default::default()
            },
            transitions: vec![TransitionRecord {
                at_unix_ms: 3_723_004,
                from: vrrp::State::Backup,
                to: vrrp::State::Master,
                reason: "no advert within master down interval".into(),
            }],
            tracked: vec![
                TrackedStatus {
                    name: "interface eth0".into(),
                    weight: 0,
                    up: true,
                    running: None,
                    quorum: None,
                    quorum_max: None,
                },
                TrackedStatus {
                    name: "interface eth1".into(),
                    weight: 20,
                    up: false,
                    running: None,
                    quorum: None,
                    quorum_max: None,
                },
                TrackedStatus {
                    name: "process haproxy".into(),
                    weight: 30,
                    up: true,
                    running: Some(2),
                    quorum: Some(1),
                    quorum_max: Some(u32::MAX),
                },
            ],
            preempt_gate: Some(false),
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "MASTER");
        assert_eq!(json["advert_interval_ms"], 1000);
        assert_eq!(json["counters"]["adverts_tx"], 2);
        assert_eq!(json["counters"]["drops"]["bad_ttl"], 1);
        assert_eq!(json["counters"]["malformed"]["bad_checksum"], 2);
        assert_eq!(json["counters"]["master_ms"], 2500);
        assert_eq!(json["counters"]["backup_ms"], 3_723_000);
        assert_eq!(json["counters"]["became_master"], 2);
        assert_eq!(json["preempt_gate"], false);
        let text = render(std::slice::from_ref(&json), true);
        assert!(text.contains("vip-web"), "{text}");
        assert!(text.contains("150/150"), "{text}");
        assert!(
            text.contains("priority 120 (file: 150, set at runtime)"),
            "{text}"
        );
        assert!(text.contains("198.51.100.10/24"), "{text}");
        assert!(text.contains("ttl 1 malformed 2"), "{text}");
        assert!(
            text.contains(
                "transitions 3, became master 2; time as master 2.5s, backup 1h02m03s, fault 2m05.4s"
            ),
            "{text}"
        );
        assert!(
            text.contains("1970-01-01 01:02:03.004 +00:00 BACKUP -> MASTER"),
            "{text}"
        );
        // Local time: the same instant, in the offset the host's zone gives it.
        let local = chrono::DateTime::from_timestamp_millis(3_723_004)
            .unwrap()
            .with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S%.3f %:z")
            .to_string();
        let text_local = render(&[json], false);
        assert!(
            text_local.contains(&format!("{local} BACKUP -> MASTER")),
            "{text_local}"
        );
        assert!(text.contains("preempt waits for sync"), "{text}");
        assert!(
            text.contains("tracking: interface eth0 up (fault), interface eth1 DOWN (-20), process haproxy 2/1 up (-30)"),
            "{text}"
        );
        let stopped = render(&[json!({"name": "vip-db", "state": "STOPPED"})], false);
        assert!(stopped.ends_with("vip-db is STOPPED\n"), "{stopped}");
    }
}
