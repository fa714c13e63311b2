//! `[[vrrp]]`: VRRPv3 instances (keepalived `vrrp_instance`).

use super::lb::ServiceSection;
use super::{HumanDuration, Validator, check_unique, narrow};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::num::NonZeroU8;
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
    pub(crate) vrid: Spanned<Vrid>,
    /// 1..=254; higher wins. Default 100 (keepalived).
    #[serde(default = "d_priority")]
    pub(crate) priority: Spanned<Priority>,
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
    /// Scripts run again and again whose failure faults the instance (weight 0) or lowers
    /// its priority (keepalived `vrrp_script` + `track_script`).
    #[serde(default)]
    pub(crate) track_scripts: Vec<TrackScriptSection>,
    /// Processes whose absence (fewer than `quorum` running) faults the instance (weight 0)
    /// or lowers its priority (keepalived `vrrp_track_process` + `track_process`).
    #[serde(default)]
    pub(crate) track_processes: Vec<TrackProcessSection>,
    /// Sync group: instances with the same group change state together.
    #[serde(default)]
    pub(crate) group: Option<String>,
    /// Send adverts unicast to these peers instead of 224.0.0.18.
    #[serde(default)]
    pub(crate) unicast_peers: Vec<Ipv4Addr>,
    /// Multicast instances: accept adverts only from these sources (the other routers'
    /// primary addresses); adverts from anyone else are dropped and counted. Default: any.
    #[serde(default)]
    pub(crate) peers: Option<Spanned<Vec<Ipv4Addr>>>,
    /// Script run on every state change with keepalived's `notify` arguments appended:
    /// `INSTANCE <name> <MASTER|BACKUP|FAULT|STOP> <priority>`. An absolute path, then any
    /// arguments of its own, separated by spaces.
    #[serde(default)]
    pub(crate) notify: Option<Spanned<String>>,
    /// Script run on becoming master, before `notify` (keepalived `notify_master`).
    #[serde(default)]
    pub(crate) notify_master: Option<Spanned<String>>,
    /// Script run on becoming backup (keepalived `notify_backup`).
    #[serde(default)]
    pub(crate) notify_backup: Option<Spanned<String>>,
    /// Script run on entering fault (keepalived `notify_fault`).
    #[serde(default)]
    pub(crate) notify_fault: Option<Spanned<String>>,
    /// Script run when the daemon stops the instance (keepalived `notify_stop`).
    #[serde(default)]
    pub(crate) notify_stop: Option<Spanned<String>>,
    /// A notify script still running after this is killed. Default 30 s.
    #[serde(default = "d_notify_timeout")]
    pub(crate) notify_timeout: Spanned<HumanDuration>,
    /// Source address of the adverts and tie-breaker between equal priorities. Default: the
    /// first IPv4 address of `interface` that is not a VIP.
    #[serde(default)]
    pub(crate) primary_address: Option<Ipv4Addr>,
    /// Priority penalty while a tracked service has no healthy backend; 0 puts the instance
    /// in FAULT instead (keepalived `track_script` weight). Default 0.
    #[serde(default = "d_fault")]
    pub(crate) track_services_weight: Spanned<ServicePenalty>,
    /// Gratuitous ARPs per burst on becoming master (keepalived `garp_master_repeat`).
    /// Default 5.
    #[serde(default = "d_garp_count")]
    pub(crate) garp_count: Spanned<GarpCount>,
    /// Repeat the burst this long after becoming master (keepalived `garp_master_delay`);
    /// "0s" = only once. Default 5 s.
    #[serde(default = "d_garp_delay")]
    pub(crate) garp_repeat_delay: Spanned<HumanDuration>,
    /// Gratuitous ARPs per VIP when a master re-asserts itself against a lower-priority
    /// advert (keepalived `garp_lower_prio_repeat`); 0 = the advert only. Default: `garp_count`.
    #[serde(default)]
    pub(crate) garp_lower_prio_repeat: Option<Spanned<ReassertArps>>,
    /// At most one re-assertion (advert + `garp_lower_prio_repeat` ARPs) per this interval,
    /// however many lower-priority adverts arrive. Default 1 s.
    #[serde(default = "d_reassert")]
    pub(crate) reassert_interval: Spanned<HumanDuration>,
    /// The longest advert interval a backup learns from a master. Default: three times
    /// `advert_interval`; "40s950ms" learns any, as RFC 5798 has it.
    #[serde(default)]
    pub(crate) max_learnt_advert_interval: Option<Spanned<HumanDuration>>,
}

/// One `track_scripts` entry: `{ command, interval, timeout, rise, fall, weight }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrackScriptSection {
    /// Absolute program path, then its own arguments; exit 0 is a success.
    pub(crate) command: Spanned<String>,
    /// Time between runs. Default 1 s (keepalived's `interval`).
    #[serde(default = "d_script_interval")]
    pub(crate) interval: Spanned<HumanDuration>,
    /// A run still going after this is killed and counts as a failure. Default: `interval`.
    #[serde(default)]
    pub(crate) timeout: Option<Spanned<HumanDuration>>,
    /// Successes in a row to come back up, 1..=100. Default 1.
    #[serde(default = "d_one")]
    pub(crate) rise: Spanned<u32>,
    /// Failures in a row to go down, 1..=100. Default 1.
    #[serde(default = "d_one")]
    pub(crate) fall: Spanned<u32>,
    /// 0 (default) = FAULT while failing; 1..=253 = priority penalty while failing.
    #[serde(default = "d_script_weight")]
    pub(crate) weight: Spanned<ScriptWeight>,
}

/// A track script's weight: 0 (fault) or the penalty 1..=253 (keepalived's `weight -20` is
/// written 20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct ScriptWeight(u8);

impl ScriptWeight {
    pub(crate) fn get(self) -> u8 {
        self.0
    }
}

impl<'de> Deserialize<'de> for ScriptWeight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        narrow(
            d,
            |n| penalty(n).map(ScriptWeight),
            |n| {
                if n < 0 {
                    format!(
                        "track_scripts weight {n}: the weight is the penalty while the script fails, so keepalived's `weight {n}` is written `weight = {}`",
                        n.unsigned_abs()
                    )
                } else {
                    "track_scripts weight must be 0 (fault) or a penalty of 1..=253".to_owned()
                }
            },
        )
    }
}

/// One `track_processes` entry: `{ name, quorum, quorum_max, delay, weight }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrackProcessSection {
    /// The process name as `/proc/PID/comm` (and `ps -e`) shows it: at most 15 bytes.
    pub(crate) name: Spanned<String>,
    /// Fewest processes running for the instance to be healthy, 1..=65535. Default 1.
    #[serde(default = "d_one")]
    pub(crate) quorum: Spanned<u32>,
    /// Most processes running for the instance to be healthy. Default: no limit.
    #[serde(default)]
    pub(crate) quorum_max: Option<Spanned<u32>>,
    /// The quorum must be lost this long before it counts (keepalived's `delay`), so a
    /// restarting process does not move the VIP; "0s" or 100ms..=1h. Default 0s.
    #[serde(default)]
    pub(crate) delay: Option<Spanned<HumanDuration>>,
    /// 0 (default) = FAULT while below quorum; 1..=253 = priority penalty.
    #[serde(default = "d_process_weight")]
    pub(crate) weight: Spanned<ProcessWeight>,
    /// Only processes whose arguments (after the program) match these count
    /// (keepalived's `process NAME PARAM...`). Default: any arguments.
    #[serde(default)]
    pub(crate) parameters: Option<Spanned<Vec<String>>>,
    /// How `parameters` are compared: `exact` (default), `initial`, `partial`.
    #[serde(default)]
    pub(crate) param_match: Option<Spanned<String>>,
}

/// The rule a `param_match` value names, as keepalived names them; `None` for any other.
pub(crate) fn param_match_rule(name: &str) -> Option<vrrp::ParamMatch> {
    match name {
        "exact" => Some(vrrp::ParamMatch::Exact),
        "initial" => Some(vrrp::ParamMatch::Initial),
        "partial" => Some(vrrp::ParamMatch::Partial),
        _ => None,
    }
}

/// A tracked process's weight: 0 (fault) or the penalty 1..=253 (keepalived's `weight -20`
/// is written 20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct ProcessWeight(u8);

impl ProcessWeight {
    pub(crate) fn get(self) -> u8 {
        self.0
    }
}

impl<'de> Deserialize<'de> for ProcessWeight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        narrow(
            d,
            |n| penalty(n).map(ProcessWeight),
            |n| {
                if n < 0 {
                    format!(
                        "track_processes weight {n}: the weight is the penalty while the process is missing, so keepalived's `weight {n}` is written `weight = {}`",
                        n.unsigned_abs()
                    )
                } else {
                    "track_processes weight must be 0 (fault) or a penalty of 1..=253".to_owned()
                }
            },
        )
    }
}

/// The longest process name the kernel keeps (`TASK_COMM_LEN` 16 with its NUL).
pub(crate) const MAX_PROCESS_NAME: usize = 15;

fn d_process_weight() -> Spanned<ProcessWeight> {
    Spanned::new(0..0, ProcessWeight(0))
}

fn d_script_interval() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(1)))
}
fn d_one() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}
fn d_script_weight() -> Spanned<ScriptWeight> {
    Spanned::new(0..0, ScriptWeight(0))
}

/// One `[[vrrp_group]]`: a sync group's own notify scripts (keepalived's `vrrp_sync_group`
/// block). The members are the `[[vrrp]]` instances whose `group` is its name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VrrpGroupSection {
    pub(crate) name: Spanned<String>,
    /// Script run when the whole group changes state, with `GROUP <name> <state> 0` appended.
    #[serde(default)]
    pub(crate) notify: Option<Spanned<String>>,
    /// Script run when the whole group becomes master.
    #[serde(default)]
    pub(crate) notify_master: Option<Spanned<String>>,
    /// Script run when the whole group becomes backup.
    #[serde(default)]
    pub(crate) notify_backup: Option<Spanned<String>>,
    /// Script run when the group enters fault.
    #[serde(default)]
    pub(crate) notify_fault: Option<Spanned<String>>,
    /// A notify script still running after this is killed. Default 30 s.
    #[serde(default = "d_notify_timeout")]
    pub(crate) notify_timeout: Spanned<HumanDuration>,
}

/// One `track_interfaces` entry: `"eth1"` (link down = FAULT, weight 0) or
/// `{ name = "eth1", weight = 20 }` (link down lowers the priority by 20: keepalived's
/// `track_interface { eth1 weight -20 }`). Both spellings can be mixed in one list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TrackInterface {
    pub(crate) name: String,
    /// 0 = FAULT while down; otherwise the priority penalty while down (at most 253).
    pub(crate) weight: u8,
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
                use serde::de::Error as _;
                let t = TrackInterfaceTable::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                let weight = match penalty(t.weight) {
                    Some(w) => w,
                    None if t.weight < 0 => {
                        return Err(A::Error::custom(format!(
                            "track_interfaces weight {w}: vipgate's weight is the penalty while the link is down, so keepalived's `weight {w}` is written `weight = {}`",
                            t.weight.unsigned_abs(),
                            w = t.weight,
                        )));
                    }
                    None => {
                        return Err(A::Error::custom(
                            "track_interfaces weight must be 0 (fault) or a penalty of 1..=253",
                        ));
                    }
                };
                Ok(TrackInterface {
                    name: t.name,
                    weight,
                })
            }
        }
        d.deserialize_any(Entry)
    }
}

/// A priority penalty: 0 (fault instead) or 1..=253, so that a 254 instance keeps priority 1.
fn penalty(n: i64) -> Option<u8> {
    u8::try_from(n).ok().filter(|w| *w <= 253)
}

/// Virtual router id, 1..=255 (RFC 5798 §5.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub(crate) struct Vrid(NonZeroU8);

impl Vrid {
    pub(crate) fn get(self) -> u8 {
        self.0.get()
    }
}

impl std::fmt::Display for Vrid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Vrid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        narrow(
            d,
            |n| u8::try_from(n).ok().and_then(NonZeroU8::new).map(Vrid),
            |n| format!("vrid {n} is out of range 1..=255"),
        )
    }
}

/// A configured priority, 1..=254: 255 belongs to the address owner, and vipgate adds the
/// VIPs itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct Priority(u8);

impl Priority {
    pub(crate) fn get(self) -> u8 {
        self.0
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        narrow(
            d,
            |n| {
                u8::try_from(n)
                    .ok()
                    .filter(|p| (1..=254).contains(p))
                    .map(Priority)
            },
            |n| {
                match n {
                255 => "priority 255 is reserved for the address owner (RFC 5798 §5.2.4); vipgate adds the VIPs itself, so use 1..=254".to_owned(),
                p => format!("priority {p} is out of range 1..=254"),
            }
            },
        )
    }
}

/// `track_services_weight`: 0 (a service without healthy backends faults the instance) or
/// the priority penalty 1..=253.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct ServicePenalty(u8);

impl ServicePenalty {
    pub(crate) fn get(self) -> u8 {
        self.0
    }
}

impl<'de> Deserialize<'de> for ServicePenalty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        narrow(
            d,
            |n| penalty(n).map(ServicePenalty),
            |_| "track_services_weight must be 0 (fault) or a penalty of 1..=253".to_owned(),
        )
    }
}

/// Gratuitous ARPs per burst on becoming master, 1..=100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct GarpCount(u32);

impl GarpCount {
    pub(crate) fn get(self) -> u32 {
        self.0
    }
}

impl<'de> Deserialize<'de> for GarpCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        narrow(
            d,
            |n| {
                u32::try_from(n)
                    .ok()
                    .filter(|c| (1..=100).contains(c))
                    .map(GarpCount)
            },
            |_| "garp_count must be 1..=100".to_owned(),
        )
    }
}

/// Gratuitous ARPs per VIP in a re-assertion against a lower-priority advert, 0..=100
/// (0 = the advert only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct ReassertArps(u32);

impl ReassertArps {
    pub(crate) fn get(self) -> u32 {
        self.0
    }
}

impl<'de> Deserialize<'de> for ReassertArps {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        narrow(
            d,
            |n| {
                u32::try_from(n)
                    .ok()
                    .filter(|c| *c <= 100)
                    .map(ReassertArps)
            },
            |_| "garp_lower_prio_repeat must be 0..=100 (0 = the advert only)".to_owned(),
        )
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

fn d_fault() -> Spanned<ServicePenalty> {
    Spanned::new(0..0, ServicePenalty(0))
}
fn d_garp_count() -> Spanned<GarpCount> {
    Spanned::new(0..0, GarpCount(5))
}
fn d_garp_delay() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(5)))
}
fn d_notify_timeout() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(30)))
}
fn d_reassert() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(1)))
}

/// The shortest advert interval accepted. RFC 5798 allows 10 ms, but the driver polls link
/// state every 100 ms and shares its thread with netlink work: below 50 ms one scheduling
/// hiccup of three intervals on a loaded host elects a second master.
pub(crate) const MIN_ADVERT_INTERVAL: Duration = Duration::from_millis(50);
/// The shortest non-zero timer accepted for the gratuitous ARP repeat, the re-assertion
/// limit and the notify timeout: anything shorter turns the daemon into a packet or process
/// generator.
const MIN_TIMER: Duration = Duration::from_millis(100);
/// The longest of those timers accepted.
const MAX_TIMER: Duration = Duration::from_secs(3600);

fn d_priority() -> Spanned<Priority> {
    Spanned::new(0..0, Priority(100))
}
fn d_advert() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(1)))
}
fn d_true() -> bool {
    true
}

/// A script key: an absolute program path, then its own arguments.
pub(crate) fn check_script(key: &str, script: Option<&Spanned<String>>, v: &mut Validator) {
    let Some(script) = script else {
        return;
    };
    match script.get_ref().split_whitespace().next() {
        None => v.error_at(script, format!("{key} is empty: leave it out instead")),
        Some(program) if !std::path::Path::new(program).is_absolute() => v.error_at(
            script,
            format!(
                "{key} `{program}` must be an absolute path (it runs with a fixed PATH, not the daemon's)"
            ),
        ),
        Some(_) => {}
    }
}

/// The `[[vrrp_group]]` sections: unique names, each the `group` of some instance.
pub(crate) fn validate_groups(
    groups: &[VrrpGroupSection],
    instances: &[VrrpSection],
    v: &mut Validator,
) {
    check_unique(
        groups
            .iter()
            .map(|g| (g.name.get_ref().clone(), g.name.span())),
        "vrrp_group name",
        v,
    );
    let used: Vec<&str> = instances
        .iter()
        .filter_map(|i| i.group.as_deref())
        .collect();
    for g in groups {
        if !used.contains(&g.name.get_ref().as_str()) {
            v.error_at(
                &g.name,
                format!(
                    "no [[vrrp]] instance has group = \"{}\"{}",
                    g.name.get_ref(),
                    super::did_you_mean(g.name.get_ref(), &used)
                ),
            );
        }
        let t = g.notify_timeout.get_ref().0;
        if !(MIN_TIMER..=MAX_TIMER).contains(&t) {
            v.error_at(&g.notify_timeout, "notify_timeout must be 100ms..=1h");
        }
        for (key, script) in [
            ("notify", &g.notify),
            ("notify_master", &g.notify_master),
            ("notify_backup", &g.notify_backup),
            ("notify_fault", &g.notify_fault),
        ] {
            check_script(key, script.as_ref(), v);
        }
    }
}

/// `services` is `None` when the `[[service]]` sections did not parse (no cross-checks then).
/// `track_services` names a `[[service]]` or an HTTP pool as `listener/pool`.
pub(crate) fn validate_all(
    instances: &[VrrpSection],
    services: Option<&[ServiceSection]>,
    http: &[super::http::HttpSection],
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
        let advert = i.advert_interval.get_ref().0;
        let cs = advert.as_millis();
        if !(10..=40_950).contains(&cs) || cs % 10 != 0 {
            v.error_at(
                &i.advert_interval,
                "advert_interval must be a whole number of centiseconds from 10ms to 40s950ms (RFC 5798)",
            );
        } else if advert < MIN_ADVERT_INTERVAL {
            v.error_at(
                &i.advert_interval,
                format!(
                    "advert_interval {}ms is below {}ms, shorter than the driver keeps reliably (a missed wakeup of three intervals elects a second master)",
                    cs,
                    MIN_ADVERT_INTERVAL.as_millis()
                ),
            );
        }
        if let Some(m) = &i.max_learnt_advert_interval {
            let d = m.get_ref().0;
            if d < advert || d > Duration::from_millis(40_950) || d.as_millis() % 10 != 0 {
                v.error_at(
                    m,
                    "max_learnt_advert_interval must be a whole number of centiseconds from advert_interval to 40s950ms",
                );
            }
        }
        let timer = |d: &Spanned<HumanDuration>, key: &str, zero_ok: bool, v: &mut Validator| {
            let t = d.get_ref().0;
            let allowed = (MIN_TIMER..=MAX_TIMER).contains(&t) || (zero_ok && t.is_zero());
            if !allowed {
                let zero = if zero_ok { "\"0s\" or " } else { "" };
                v.error_at(d, format!("{key} must be {zero}100ms..=1h"));
            }
        };
        timer(&i.garp_repeat_delay, "garp_repeat_delay", true, v);
        timer(&i.reassert_interval, "reassert_interval", false, v);
        timer(&i.notify_timeout, "notify_timeout", false, v);
        for t in &i.track_scripts {
            check_script("track_scripts command", Some(&t.command), v);
            timer(&t.interval, "track_scripts interval", false, v);
            if let Some(timeout) = &t.timeout {
                timer(timeout, "track_scripts timeout", false, v);
            }
            for (key, n) in [("rise", &t.rise), ("fall", &t.fall)] {
                if !(1..=100).contains(n.get_ref()) {
                    v.error_at(n, format!("track_scripts {key} must be 1..=100"));
                }
            }
        }
        for p in &i.track_processes {
            let name = p.name.get_ref();
            if name.is_empty() {
                v.error_at(&p.name, "track_processes name is empty");
            } else if name.len() > MAX_PROCESS_NAME {
                v.error_at(
                    &p.name,
                    format!(
                        "track_processes name `{name}` is {} bytes; the kernel keeps the first {MAX_PROCESS_NAME} of a process name (`{}`), so it would never match",
                        name.len(),
                        name.get(..MAX_PROCESS_NAME).unwrap_or(name)
                    ),
                );
            }
            let quorum = *p.quorum.get_ref();
            if !(1..=65_535).contains(&quorum) {
                v.error_at(&p.quorum, "track_processes quorum must be 1..=65535");
            }
            if let Some(max) = &p.quorum_max
                && *max.get_ref() < quorum
            {
                v.error_at(
                    max,
                    format!("track_processes quorum_max must be at least quorum ({quorum})"),
                );
            }
            if let Some(delay) = &p.delay {
                timer(delay, "track_processes delay", true, v);
            }
            if let Some(rule) = &p.param_match {
                if p.parameters.is_none() {
                    v.error_at(
                        rule,
                        "track_processes param_match needs `parameters` to compare (`parameters = []` with `exact` = a process started without arguments)",
                    );
                }
                if param_match_rule(rule.get_ref()).is_none() {
                    v.error_at(
                        rule,
                        format!(
                            "track_processes param_match `{}` is not one of exact, initial, partial",
                            rule.get_ref()
                        ),
                    );
                }
            }
            if let Some(params) = &p.parameters {
                // Compared against /proc/PID/cmdline, NUL-separated and read up to a bound.
                let total: usize = params.get_ref().iter().map(|a| a.len() + 1).sum();
                if params.get_ref().iter().any(|a| a.contains('\0')) {
                    v.error_at(params, "track_processes parameters cannot hold NUL bytes");
                } else if total + MAX_PROCESS_NAME + 1 > vrrp::driver::MAX_CMDLINE {
                    v.error_at(
                        params,
                        format!(
                            "track_processes parameters are {total} bytes; command lines are compared up to {} bytes",
                            vrrp::driver::MAX_CMDLINE
                        ),
                    );
                }
                let partial = p
                    .param_match
                    .as_ref()
                    .and_then(|r| param_match_rule(r.get_ref()))
                    == Some(vrrp::ParamMatch::Partial);
                if partial && params.get_ref().is_empty() {
                    v.error_at(
                        params,
                        "track_processes param_match = \"partial\" needs at least one parameter (the last is matched by its beginning)",
                    );
                }
            }
        }
        for (key, script) in [
            ("notify", &i.notify),
            ("notify_master", &i.notify_master),
            ("notify_backup", &i.notify_backup),
            ("notify_fault", &i.notify_fault),
            ("notify_stop", &i.notify_stop),
        ] {
            check_script(key, script.as_ref(), v);
        }
        if let Some(p) = &i.peers {
            if !i.unicast_peers.is_empty() {
                v.error_at(
                    p,
                    "peers is for multicast instances; with unicast_peers only those are accepted already",
                );
            } else if p.get_ref().is_empty() {
                v.error_at(
                    p,
                    "peers = [] would drop every advert; leave it out to accept any source",
                );
            }
        }
        for t in &i.track_interfaces {
            let (name, weight) = (&t.get_ref().name, t.get_ref().weight);
            if weight > 0 && *name == i.interface {
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
            let pools: Vec<String> = http
                .iter()
                .flat_map(|h| {
                    h.pool
                        .iter()
                        .map(move |p| format!("{}/{}", h.name.get_ref(), p.name.get_ref()))
                })
                .collect();
            let known = services.iter().any(|s| s.name.get_ref() == t.get_ref())
                || pools.iter().any(|p| p == t.get_ref());
            if !known {
                let names: Vec<&str> = services
                    .iter()
                    .map(|s| s.name.get_ref().as_str())
                    .chain(pools.iter().map(String::as_str))
                    .collect();
                v.error_at(
                    t,
                    format!(
                        "track_services names `{}`, but no [[service]] nor HTTP pool (`listener/pool`) has that name{}",
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
    use std::time::Duration;

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
        let got: Vec<(String, u8)> = site.vrrp[0]
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

    #[test]
    fn misbehaving_values_point_at_the_key() {
        for (extra, msg) in [
            (
                "advert_interval = \"20ms\"",
                "site.toml:6:19: advert_interval 20ms is below 50ms",
            ),
            (
                "advert_interval = \"0s\"",
                "site.toml:6:19: advert_interval must be a whole",
            ),
            (
                "priority = 300",
                "site.toml:6:12: priority 300 is out of range",
            ),
            (
                "garp_count = 0",
                "site.toml:6:14: garp_count must be 1..=100",
            ),
            (
                "track_services_weight = 254",
                "site.toml:6:25: track_services_weight must be 0 (fault) or a penalty of 1..=253",
            ),
            (
                "garp_repeat_delay = \"1ms\"",
                "site.toml:6:21: garp_repeat_delay must be \"0s\" or",
            ),
            (
                "garp_lower_prio_repeat = 101",
                "site.toml:6:26: garp_lower_prio_repeat must be 0..=100",
            ),
            (
                "reassert_interval = \"0s\"",
                "site.toml:6:21: reassert_interval must be 100ms",
            ),
            (
                "notify_timeout = \"0s\"",
                "site.toml:6:18: notify_timeout must be 100ms",
            ),
            (
                "notify = \"notify.sh\"",
                "site.toml:6:10: notify `notify.sh` must be an absolute path",
            ),
            (
                "notify_master = \"master.sh MASTER\"",
                "site.toml:6:17: notify_master `master.sh` must be an absolute path",
            ),
            (
                "notify_stop = \" \"",
                "site.toml:6:15: notify_stop is empty",
            ),
            (
                "max_learnt_advert_interval = \"500ms\"",
                "site.toml:6:30: max_learnt_advert_interval must be",
            ),
            (
                "peers = []",
                "site.toml:6:9: peers = [] would drop every advert",
            ),
            (
                "unicast_peers = [\"10.0.0.2\"]\npeers = [\"10.0.0.2\"]",
                "site.toml:7:9: peers is for multicast instances",
            ),
        ] {
            let e = load(extra).unwrap_err();
            assert!(e.starts_with(msg), "{extra}: {e}");
        }
        let site = load(
            "peers = [\"10.0.0.2\"]\nnotify = \"/bin/true\"\ngarp_lower_prio_repeat = 0\nmax_learnt_advert_interval = \"40s950ms\"\ngarp_repeat_delay = \"0s\"",
        )
        .expect("valid");
        assert_eq!(
            site.vrrp[0].reassert_interval.get_ref().0,
            Duration::from_secs(1)
        );
        assert_eq!(
            site.vrrp[0].notify_timeout.get_ref().0,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn sync_groups_name_instances_groups_and_scripts_with_arguments() {
        let text = "[[vrrp]]\nname = \"v\"\ninterface = \"eth0\"\nvrid = 1\naddresses = [\"10.0.0.1/24\"]\n\
                    group = \"edge\"\nnotify_backup = \"/etc/keepalived/backup.sh --quiet\"\n\n\
                    [[vrrp_group]]\nname = \"edge\"\nnotify = \"/etc/keepalived/notify.sh\"\n";
        let site = crate::config::parse(Path::new("site.toml"), text).expect("valid");
        assert_eq!(site.vrrp_group[0].name.get_ref(), "edge");
        let wrong = text.replace("name = \"edge\"", "name = \"egde\"");
        let e = crate::config::parse(Path::new("site.toml"), &wrong)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("site.toml:10:8: no [[vrrp]] instance has group = \"egde\"")
                && e.contains("edge"),
            "{e}"
        );
    }

    #[test]
    fn track_scripts_take_keepalived_settings_and_point_at_mistakes() {
        let site = load(
            r#"track_scripts = [{ command = "/usr/local/bin/check web", interval = "2s", fall = 3, rise = 2, weight = 40 }]"#,
        )
        .expect("valid");
        let t = &site.vrrp[0].track_scripts[0];
        assert_eq!(
            (
                *t.rise.get_ref(),
                *t.fall.get_ref(),
                t.weight.get_ref().get()
            ),
            (2, 3, 40)
        );
        assert!(t.timeout.is_none(), "defaults to the interval when lowered");
        for (extra, msg) in [
            (
                r#"track_scripts = [{ command = "check.sh" }]"#,
                "site.toml:6:30: track_scripts command `check.sh` must be an absolute path",
            ),
            (
                r#"track_scripts = [{ command = "/bin/true", weight = -20 }]"#,
                "site.toml:6:52: track_scripts weight -20:",
            ),
            (
                r#"track_scripts = [{ command = "/bin/true", fall = 0 }]"#,
                "site.toml:6:50: track_scripts fall must be 1..=100",
            ),
            (
                r#"track_scripts = [{ command = "/bin/true", interval = "0s" }]"#,
                "site.toml:6:54: track_scripts interval must be 100ms..=1h",
            ),
        ] {
            let e = load(extra).unwrap_err();
            assert!(e.starts_with(msg), "{extra}: {e}");
        }
    }

    #[test]
    fn track_processes_take_keepalived_settings_and_point_at_mistakes() {
        let site = load(
            r#"track_processes = [{ name = "haproxy", quorum = 2, quorum_max = 4, delay = "2s", weight = 30 }, { name = "nginx", parameters = ["-c", "/etc/nginx/"], param_match = "partial" }]"#,
        )
        .expect("valid");
        let p = &site.vrrp[0].track_processes;
        assert_eq!(
            (
                p[1].parameters.as_ref().map(|v| v.get_ref().len()),
                p[1].param_match.as_ref().map(|r| r.get_ref().as_str())
            ),
            (Some(2), Some("partial"))
        );
        let long = format!(
            r#"track_processes = [{{ name = "haproxy", parameters = ["{}"] }}]"#,
            "x".repeat(5000)
        );
        let e = load(&long).unwrap_err();
        assert!(
            e.starts_with("site.toml:6:53: track_processes parameters are 5001 bytes; command lines are compared up to 4096 bytes"),
            "{e}"
        );
        assert_eq!(
            (
                *p[0].quorum.get_ref(),
                p[0].quorum_max.as_ref().map(|m| *m.get_ref()),
                p[0].delay.as_ref().map(|d| d.get_ref().0),
                p[0].weight.get_ref().get()
            ),
            (2, Some(4), Some(Duration::from_secs(2)), 30)
        );
        assert_eq!(
            (*p[1].quorum.get_ref(), p[1].weight.get_ref().get()),
            (1, 0)
        );
        for (extra, msg) in [
            (
                r#"track_processes = [{ name = "" }]"#,
                "site.toml:6:29: track_processes name is empty",
            ),
            (
                r#"track_processes = [{ name = "a-very-long-daemon" }]"#,
                "site.toml:6:29: track_processes name `a-very-long-daemon` is 18 bytes; the kernel keeps the first 15 of a process name (`a-very-long-dae`)",
            ),
            (
                r#"track_processes = [{ name = "haproxy", quorum = 0 }]"#,
                "site.toml:6:49: track_processes quorum must be 1..=65535",
            ),
            (
                r#"track_processes = [{ name = "haproxy", quorum = 3, quorum_max = 2 }]"#,
                "site.toml:6:65: track_processes quorum_max must be at least quorum (3)",
            ),
            (
                r#"track_processes = [{ name = "haproxy", weight = -30 }]"#,
                "site.toml:6:49: track_processes weight -30:",
            ),
            (
                r#"track_processes = [{ name = "haproxy", weight = 254 }]"#,
                "site.toml:6:49: track_processes weight must be 0 (fault) or a penalty of 1..=253",
            ),
            (
                r#"track_processes = [{ name = "haproxy", delay = "1ms" }]"#,
                "site.toml:6:48: track_processes delay must be \"0s\" or 100ms..=1h",
            ),
            (
                r#"track_processes = [{ name = "haproxy", pid = 3 }]"#,
                "site.toml:6:",
            ),
            (
                r#"track_processes = [{ name = "haproxy", param_match = "initial" }]"#,
                "site.toml:6:54: track_processes param_match needs `parameters` to compare",
            ),
            (
                r#"track_processes = [{ name = "haproxy", parameters = ["-f"], param_match = "prefix" }]"#,
                "site.toml:6:75: track_processes param_match `prefix` is not one of exact, initial, partial",
            ),
            (
                r#"track_processes = [{ name = "haproxy", parameters = [], param_match = "partial" }]"#,
                "site.toml:6:53: track_processes param_match = \"partial\" needs at least one parameter",
            ),
            (
                r#"track_processes = [{ name = "haproxy", parameters = ["a\u0000b"] }]"#,
                "site.toml:6:53: track_processes parameters cannot hold NUL bytes",
            ),
        ] {
            let e = load(extra).unwrap_err();
            assert!(e.starts_with(msg), "{extra}: {e}");
        }
    }
}
