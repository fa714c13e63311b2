//! Tracked interfaces, services, scripts and processes turned into a fault flag and a
//! priority penalty.
//!
//! keepalived semantics: a tracked object with weight 0 puts the instance in Fault when it
//! fails; one with a weight lowers the advertised priority by that weight while it is down.

use std::time::{Duration, Instant};

/// One tracked object (an interface or a service) and its current health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedObject {
    /// Name shown in logs and `show vrrp`.
    pub name: String,
    /// 0 = fault when down; otherwise the priority penalty while down.
    pub weight: u8,
    /// Current health.
    pub up: bool,
}

/// The tracked objects of one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    objects: Vec<TrackedObject>,
}

impl Tracker {
    /// Tracks `objects`, all assumed up until told otherwise.
    pub fn new(objects: impl IntoIterator<Item = (String, u8)>) -> Self {
        Self {
            objects: objects
                .into_iter()
                .map(|(name, weight)| TrackedObject {
                    name,
                    weight,
                    up: true,
                })
                .collect(),
        }
    }

    /// The objects.
    pub fn objects(&self) -> &[TrackedObject] {
        &self.objects
    }

    /// Records object `i`'s health; returns whether it changed.
    pub fn set(&mut self, i: usize, up: bool) -> bool {
        match self.objects.get_mut(i) {
            Some(o) if o.up != up => {
                o.up = up;
                true
            }
            _ => false,
        }
    }

    /// Sets object `i`'s weight (a live reload); returns whether it changed.
    pub fn set_weight(&mut self, i: usize, weight: u8) -> bool {
        match self.objects.get_mut(i) {
            Some(o) if o.weight != weight => {
                o.weight = weight;
                true
            }
            _ => false,
        }
    }

    /// Whether a weight-0 object is down.
    pub fn fault(&self) -> bool {
        self.objects.iter().any(|o| !o.up && o.weight == 0)
    }

    /// Sum of the weights of the objects that are down, saturating at 255.
    pub fn penalty(&self) -> u8 {
        let sum: u32 = self
            .objects
            .iter()
            .filter(|o| !o.up)
            .map(|o| u32::from(o.weight))
            .sum();
        u8::try_from(sum).unwrap_or(u8::MAX)
    }
}

/// keepalived's `rise` / `fall` for a check that runs again and again (a track script): the
/// object goes down after `fall` failures in a row and up again after `rise` successes in a
/// row. It starts up, as every tracked object does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    up: bool,
    /// Results in a row that disagree with `up`.
    streak: u32,
}

impl RiseFall {
    /// `rise` and `fall` of at least 1 (0 is taken as 1).
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            up: true,
            streak: 0,
        }
    }

    /// Records one result; returns whether the object changed state.
    pub fn record(&mut self, ok: bool) -> bool {
        if ok == self.up {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return false;
        }
        self.up = ok;
        self.streak = 0;
        true
    }

    /// Current state.
    pub fn up(&self) -> bool {
        self.up
    }
}

/// How a tracked process's arguments are compared with the configured `parameters`
/// (keepalived's `param_match`; the program itself, argv\[0\], is never compared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParamMatch {
    /// The arguments are exactly the parameters, no more and no fewer (keepalived's default
    /// once `parameters` are given).
    #[default]
    Exact,
    /// The arguments begin with the parameters, each compared whole; more may follow.
    Initial,
    /// As `Initial`, but the last parameter need only begin the argument in its place (a
    /// parameter `--config=/etc/app` matches `--config=/etc/app/main.conf`).
    Partial,
}

impl ParamMatch {
    /// Whether a process with arguments `args` (argv\[1..\], without argv\[0\]) matches
    /// `parameters` under this rule.
    pub fn matches(self, parameters: &[String], args: &[&[u8]]) -> bool {
        if args.len() < parameters.len() {
            return false;
        }
        let whole = |n: usize| {
            parameters
                .iter()
                .take(n)
                .zip(args)
                .all(|(p, a)| p.as_bytes() == *a)
        };
        match self {
            Self::Exact => args.len() == parameters.len() && whole(parameters.len()),
            Self::Initial => whole(parameters.len()),
            Self::Partial => match parameters.split_last() {
                None => true,
                Some((last, _)) => {
                    whole(parameters.len() - 1)
                        && args[parameters.len() - 1].starts_with(last.as_bytes())
                }
            },
        }
    }
}

/// keepalived's `vrrp_track_process` verdict from the number of matching processes seen in
/// each scan: up while `quorum..=quorum_max` of them run. Losing the quorum counts only once
/// it has lasted `delay` (so a process that restarts does not move the VIP); regaining it
/// counts at once. The first scan decides at once either way: an instance whose process is
/// not running at start starts faulty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessQuorum {
    quorum: u32,
    quorum_max: u32,
    delay: Duration,
    up: bool,
    /// Processes seen in the last scan; `None` before the first.
    running: Option<u32>,
    /// Since when the quorum has been lost while still counted up.
    lost_since: Option<Instant>,
}

impl ProcessQuorum {
    /// Up while `quorum..=quorum_max` processes run (`quorum` of at least 1; a `quorum_max`
    /// below it is taken as `quorum`).
    pub fn new(quorum: u32, quorum_max: u32, delay: Duration) -> Self {
        let quorum = quorum.max(1);
        Self {
            quorum,
            quorum_max: quorum_max.max(quorum),
            delay,
            up: true,
            running: None,
            lost_since: None,
        }
    }

    /// Records one scan that found `running` processes at `now`; returns whether the verdict
    /// changed.
    pub fn record(&mut self, now: Instant, running: u32) -> bool {
        let first = self.running.is_none();
        self.running = Some(running);
        let ok = (self.quorum..=self.quorum_max).contains(&running);
        if ok {
            self.lost_since = None;
        } else if self.up && !first {
            let since = *self.lost_since.get_or_insert(now);
            if now.saturating_duration_since(since) < self.delay {
                return false;
            }
        }
        let changed = ok != self.up;
        self.up = ok;
        if !ok {
            self.lost_since = None;
        }
        changed
    }

    /// Current verdict.
    pub fn up(&self) -> bool {
        self.up
    }

    /// Processes seen in the last scan (0 before the first).
    pub fn running(&self) -> u32 {
        self.running.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_match_compares_arguments_as_keepalived_does() {
        let params = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let args: [&[u8]; 3] = [b"-f", b"/etc/haproxy/haproxy.cfg", b"-Ws"];
        let cfg = params(&["-f", "/etc/haproxy/haproxy.cfg"]);
        assert!(!ParamMatch::Exact.matches(&cfg, &args));
        assert!(ParamMatch::Exact.matches(&cfg, &args[..2]));
        assert!(ParamMatch::Initial.matches(&cfg, &args));
        assert!(ParamMatch::Partial.matches(&cfg, &args));
        let cut = params(&["-f", "/etc/haproxy/"]);
        assert!(!ParamMatch::Initial.matches(&cut, &args));
        assert!(ParamMatch::Partial.matches(&cut, &args));
        let other = params(&["-x", "/etc/haproxy/"]);
        assert!(!ParamMatch::Partial.matches(&other, &args));
        // More parameters than arguments never match; no parameters and no arguments is
        // an exact match (a process started without arguments).
        let long = params(&["-f", "/etc/haproxy/haproxy.cfg", "-Ws", "-q"]);
        for m in [ParamMatch::Exact, ParamMatch::Initial, ParamMatch::Partial] {
            assert!(!m.matches(&long, &args), "{m:?}");
            assert!(m.matches(&[], &[]), "{m:?}");
        }
        assert!(!ParamMatch::Exact.matches(&[], &args));
        assert!(ParamMatch::Initial.matches(&[], &args));
    }
    use proptest::prelude::*;

    #[test]
    fn rise_and_fall_need_results_in_a_row() {
        let mut r = RiseFall::new(2, 3);
        assert!(r.up());
        assert!(!r.record(false) && !r.record(false));
        assert!(!r.record(true), "a success breaks the run of failures");
        assert!(!r.record(false) && !r.record(false));
        assert!(r.record(false) && !r.up(), "three failures in a row");
        assert!(!r.record(true));
        assert!(r.record(true) && r.up(), "two successes in a row");
    }

    proptest! {
        /// keepalived's rule for any mix of weights and link states: fault iff a weight-0
        /// object is down, otherwise the penalty is the (saturating) sum of the down weights.
        #[test]
        fn fault_iff_unweighted_down_else_sum_of_weights(
            objects in proptest::collection::vec((any::<u8>(), any::<bool>()), 0..12),
            reweigh in proptest::collection::vec((0usize..12, any::<u8>()), 0..4),
        ) {
            let mut t = Tracker::new(objects.iter().enumerate().map(|(i, (w, _))| (format!("o{i}"), *w)));
            for (i, (_, up)) in objects.iter().enumerate() {
                t.set(i, *up);
            }
            for (i, w) in reweigh {
                t.set_weight(i, w);
            }
            let down = t.objects().iter().filter(|o| !o.up);
            let fault = down.clone().any(|o| o.weight == 0);
            let sum: u32 = down.map(|o| u32::from(o.weight)).sum();
            prop_assert_eq!(t.fault(), fault);
            prop_assert_eq!(u32::from(t.penalty()), sum.min(255));
        }
    }

    #[test]
    fn weighted_interface_down_lowers_priority_instead_of_fault() {
        let mut t = Tracker::new([
            ("interface eth0".to_owned(), 0),
            ("interface eth1".to_owned(), 20),
        ]);
        t.set(1, false);
        assert_eq!((t.fault(), t.penalty()), (false, 20));
        // A reload that drops the weight turns the same link-down into a fault.
        assert!(t.set_weight(1, 0));
        assert!(!t.set_weight(1, 0));
        assert_eq!((t.fault(), t.penalty()), (true, 0));
    }

    #[test]
    fn process_quorum_debounces_the_loss_but_not_the_return() {
        let t0 = testkit::epoch();
        let s = Duration::from_secs;
        let mut q = ProcessQuorum::new(2, 3, s(2));
        assert!(!q.record(t0, 2) && q.up());
        assert!(!q.record(t0 + s(1), 1), "lost, but not for 2 s yet");
        assert!(!q.record(t0 + s(2), 2), "back before the delay: never down");
        assert!(!q.record(t0 + s(3), 4), "more than quorum_max is lost too");
        assert!(q.record(t0 + s(5), 0) && !q.up(), "lost for 2 s");
        assert_eq!(q.running(), 0);
        assert!(!q.record(t0 + s(6), 1));
        assert!(q.record(t0 + s(7), 3) && q.up(), "regained at once");
        // The first scan decides at once.
        let mut q = ProcessQuorum::new(0, 0, s(10));
        assert!(q.record(t0, 0) && !q.up(), "quorum 0 is taken as 1");
        assert!(
            !q.record(t0, 5) && !q.up(),
            "quorum_max 0 is taken as quorum: 5 are too many"
        );
        assert!(!ProcessQuorum::new(1, 0, s(10)).record(t0, 1));
    }

    #[test]
    fn fault_and_penalty() {
        let mut t = Tracker::new([("eth0".to_owned(), 0), ("web".to_owned(), 60)]);
        assert!(!t.fault());
        assert!(t.set(1, false));
        assert!(!t.set(1, false));
        assert_eq!(t.penalty(), 60);
        assert!(!t.fault());
        t.set(0, false);
        assert!(t.fault());
        t.set(0, true);
        t.set(1, true);
        assert_eq!((t.fault(), t.penalty()), (false, 0));
    }
}
