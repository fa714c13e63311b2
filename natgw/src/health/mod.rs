//! Health checking of real servers: the pure bookkeeping.
//!
//! [`HealthChecker`] decides *when* each target is probed and *what* a run of results means:
//! `rise` consecutive successes bring a down target up, `fall` consecutive failures take an up
//! target down (defaults: every 2 s, rise 2, fall 4 as on Alteon, timeout 1 s). It performs no
//! probe itself: the driver side ([`probe`], behind the `driver` feature) connects or sends the
//! HTTP GET and feeds the outcome back.
//!
//! Call order, as for every vipgate core: [`HealthChecker::poll_probe`] until `None` (start
//! each probe, with its timeout), sleep until [`HealthChecker::poll_timeout`], and pass every
//! finished probe to [`HealthChecker::handle_result`], which returns the state changes to apply
//! to the pool (and to log). The task that does so reports failed probes too
//! ([`CheckEvent`]): the pool counts them next to the transitions.
//!
//! Timing: a target is probed every `interval`, measured from the start of the previous probe
//! (a slow probe does not stretch the period); at most one probe per target is in flight. A
//! server that starts refusing is therefore out of rotation within `interval × fall` (plus
//! `timeout` if it stops answering instead of refusing).

pub mod agent;
#[cfg(feature = "driver")]
pub mod probe;
#[cfg(feature = "driver")]
pub mod tls;

use std::fmt;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use agent::{AgentConfig, AgentFailure, AgentReply};
pub use balance::Health;

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// A TCP connect to the backend's address (keepalived `TCP_CHECK`).
    Tcp,
    /// An HTTP/1.0 `GET path` to the backend's address that must answer `status`
    /// (keepalived `HTTP_GET` with `status_code`).
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// Expected status code.
        status: u16,
        /// A string the body must hold within its first [`MAX_CHECKED_RESPONSE`] bytes (less
        /// the head) (HAProxy `http-check expect string`).
        expect: Option<String>,
        /// Over TLS (keepalived `SSL_GET`, HAProxy `check-ssl`); `None`: plain HTTP.
        tls: Option<TlsCheck>,
    },
    /// A UDP datagram `send` to the backend's address whose answer must hold `expect`
    /// (keepalived `UDP_CHECK` with `payload` and `require_reply`). An ICMP port unreachable
    /// fails it as refused; no answer within the timeout as a timeout.
    Udp {
        /// The datagram's payload.
        send: String,
        /// A string the answer must hold within its first [`MAX_CHECKED_RESPONSE`] bytes.
        expect: String,
    },
}

/// TLS settings of an HTTPS check.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsCheck {
    /// Name sent as SNI and verified (HAProxy `check-sni`); `None`: no SNI, and the
    /// certificate must name the backend's address.
    pub sni: Option<String>,
    /// Whether the certificate must verify (HAProxy `verify required`; `false` is `verify
    /// none`).
    pub verify: bool,
    /// PEM file of the CAs to trust instead of the system's (HAProxy `ca-file`).
    pub ca_file: Option<PathBuf>,
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The certificate does not chain to a trusted CA (or a signature is wrong).
    Untrusted,
    /// The certificate does not name the SNI name (or the address without one).
    NameMismatch,
    /// The certificate is expired or not yet valid.
    OutOfDate,
    /// Another certificate problem (e.g. wrong key usage).
    BadCertificate,
    /// The handshake failed otherwise (not a TLS server, protocol alert, reset).
    Handshake,
    /// The CA certificates to verify with could not be loaded.
    NoTrustAnchors,
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Untrusted => "TLS certificate not trusted (unknown issuer)",
            Self::NameMismatch => "TLS certificate does not match the SNI name or address",
            Self::OutOfDate => "TLS certificate expired or not yet valid",
            Self::BadCertificate => "TLS certificate invalid",
            Self::Handshake => "TLS handshake failed",
            Self::NoTrustAnchors => "TLS CA certificates could not be loaded",
        })
    }
}

/// Most bytes of an HTTP answer (status line, headers and body together) a probe reads: a
/// server that streams forever costs one buffer of this size and one probe timeout, and an
/// `expect` string further in counts as missing. HAProxy's check buffer is as large.
pub const MAX_CHECKED_RESPONSE: usize = 16 * 1024;

/// Health check parameters of one service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthConfig {
    /// What to probe.
    pub kind: CheckKind,
    /// Time between the starts of two probes of one target.
    pub interval: Duration,
    /// Time after which an unanswered probe counts as failed.
    pub timeout: Duration,
    /// Consecutive successes that bring a down target up.
    pub rise: u32,
    /// Consecutive failures that take an up target down.
    pub fall: u32,
    /// The port probes connect to on the backend's address; `None`: the backend's own port
    /// (keepalived `connect_port`, HAProxy `port`).
    pub port: Option<u16>,
    /// An agent on each backend to ask as well (HAProxy `agent-check`); asked with `timeout`.
    pub agent: Option<AgentConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 4,
            port: None,
            agent: None,
        }
    }
}

/// Why a probe failed (for logs and `show lb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeFailure {
    /// No answer within the timeout.
    Timeout,
    /// The connection was refused (RST).
    Refused,
    /// Another socket error, e.g. host unreachable.
    Unreachable,
    /// The HTTP server answered another status.
    Status(u16),
    /// The answer was not an HTTP status line, or its head did not end within
    /// [`MAX_CHECKED_RESPONSE`] bytes.
    BadResponse,
    /// The body did not hold the `expect` string within the bytes read.
    BodyMismatch,
    /// A UDP check's answer did not hold its `expect` string.
    ReplyMismatch,
    /// The TLS handshake of an HTTPS check failed.
    Tls(TlsFailure),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timeout"),
            Self::Refused => f.write_str("connection refused"),
            Self::Unreachable => f.write_str("unreachable"),
            Self::Status(s) => write!(f, "HTTP status {s}"),
            Self::BadResponse => f.write_str("not an HTTP response"),
            Self::ReplyMismatch => f.write_str("expected string not in the UDP answer"),
            Self::Tls(why) => why.fmt(f),
            Self::BodyMismatch => write!(
                f,
                "expected string not in the body's first {} KiB",
                MAX_CHECKED_RESPONSE / 1024
            ),
        }
    }
}

/// A probe the driver must run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe<K> {
    /// The target's key, given back in [`HealthChecker::handle_result`].
    pub key: K,
    /// Identifies this probe so a late result for a replaced target is ignored.
    pub seq: u64,
    /// Where to connect.
    pub addr: SocketAddrV4,
    /// What to do.
    pub kind: CheckKind,
    /// Give up after this long.
    pub timeout: Duration,
}

/// A target whose health changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition<K> {
    /// The target's key.
    pub key: K,
    /// The target's address.
    pub addr: SocketAddrV4,
    /// The new health.
    pub health: Health,
    /// The last failure when going down.
    pub reason: Option<ProbeFailure>,
}

/// What the checker task ([`probe::run_checker`]) reports to whoever applies the verdicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckEvent<K> {
    /// A probe failed, whether or not it changed the verdict (a failure that takes the
    /// target down comes before the [`CheckEvent::Changed`] it causes).
    Failed {
        /// The target's key.
        key: K,
        /// What went wrong.
        why: ProbeFailure,
    },
    /// The target's health changed.
    Changed(Transition<K>),
    /// The backend's agent answered (or did not).
    Agent {
        /// The backend's key.
        key: K,
        /// The parsed line, or why there was none.
        outcome: Result<AgentReply, AgentFailure>,
    },
}

/// Everything the checker task probes: health-check targets and agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckTargets<K> {
    /// `(key, probe address, settings, starting health)`.
    pub checks: Vec<(K, SocketAddrV4, HealthConfig, Health)>,
    /// `(key, agent address, interval, timeout)`.
    pub agents: Vec<(K, SocketAddrV4, Duration, Duration)>,
}

impl<K> Default for CheckTargets<K> {
    fn default() -> Self {
        Self {
            checks: Vec::new(),
            agents: Vec::new(),
        }
    }
}

impl<K> Extend<CheckTargets<K>> for CheckTargets<K> {
    fn extend<I: IntoIterator<Item = CheckTargets<K>>>(&mut self, iter: I) {
        for t in iter {
            self.checks.extend(t.checks);
            self.agents.extend(t.agents);
        }
    }
}

/// What `show lb` prints about a target's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckStatus {
    /// Current verdict.
    pub health: Health,
    /// Consecutive successes (while down: counting towards `rise`).
    pub successes: u32,
    /// Consecutive failures (while up: counting towards `fall`).
    pub failures: u32,
    /// Probes run.
    pub probes: u64,
    /// Last failure, if the last probe failed.
    pub last_failure: Option<ProbeFailure>,
}

#[derive(Debug, Clone)]
struct Target<K> {
    key: K,
    addr: SocketAddrV4,
    config: HealthConfig,
    status: CheckStatus,
    next: Instant,
    in_flight: Option<u64>,
}

/// The health state of every checked target; `K` names a target (e.g. service and backend).
#[derive(Debug, Clone)]
pub struct HealthChecker<K> {
    targets: Vec<Target<K>>,
    next_seq: u64,
}

impl<K> Default for HealthChecker<K> {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            next_seq: 0,
        }
    }
}

impl<K: Clone + PartialEq> HealthChecker<K> {
    /// A checker with no targets.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the set of targets (on start and on reload).
    ///
    /// A target listed before with the same key, address and configuration keeps its state
    /// and schedule; a new or changed one starts with `initial` health and is probed at once.
    /// Targets no longer listed are forgotten, and results of their probes ignored.
    pub fn set_targets(
        &mut self,
        now: Instant,
        targets: impl IntoIterator<Item = (K, SocketAddrV4, HealthConfig, Health)>,
    ) {
        let mut old = std::mem::take(&mut self.targets);
        for (key, addr, config, initial) in targets {
            let kept = old
                .iter()
                .position(|t| t.key == key && t.addr == addr && t.config == config);
            let target = match kept {
                Some(i) => old.swap_remove(i),
                None => Target {
                    key,
                    addr,
                    config,
                    status: CheckStatus {
                        health: initial,
                        successes: 0,
                        failures: 0,
                        probes: 0,
                        last_failure: None,
                    },
                    next: now,
                    in_flight: None,
                },
            };
            self.targets.push(target);
        }
    }

    /// The next probe due at `now`, marked in flight; call until `None`.
    pub fn poll_probe(&mut self, now: Instant) -> Option<Probe<K>> {
        let t = self
            .targets
            .iter_mut()
            .find(|t| t.in_flight.is_none() && t.next <= now)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        t.in_flight = Some(seq);
        // Measured from the start, so the period does not drift with probe latency; a probe
        // slower than the interval is followed by the next at once.
        t.next = now + t.config.interval;
        Some(Probe {
            key: t.key.clone(),
            seq,
            addr: t.addr,
            kind: t.config.kind.clone(),
            timeout: t.config.timeout,
        })
    }

    /// When the next probe is due (targets with a probe in flight wait for its result).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.targets
            .iter()
            .filter(|t| t.in_flight.is_none())
            .map(|t| t.next)
            .min()
    }

    /// Records the outcome of probe `seq` of target `key`; returns the change of health it
    /// causes, if any. Results of probes that are not in flight (target replaced) are ignored.
    pub fn handle_result(
        &mut self,
        key: &K,
        seq: u64,
        outcome: Result<(), ProbeFailure>,
    ) -> Option<Transition<K>> {
        let t = self
            .targets
            .iter_mut()
            .find(|t| &t.key == key && t.in_flight == Some(seq))?;
        t.in_flight = None;
        let s = &mut t.status;
        s.probes += 1;
        match outcome {
            Ok(()) => {
                s.successes = s.successes.saturating_add(1);
                s.failures = 0;
                s.last_failure = None;
                if s.health == Health::Down && s.successes >= t.config.rise.max(1) {
                    s.health = Health::Up;
                    return Some(Transition {
                        key: t.key.clone(),
                        addr: t.addr,
                        health: Health::Up,
                        reason: None,
                    });
                }
            }
            Err(why) => {
                s.failures = s.failures.saturating_add(1);
                s.successes = 0;
                s.last_failure = Some(why);
                if s.health == Health::Up && s.failures >= t.config.fall.max(1) {
                    s.health = Health::Down;
                    return Some(Transition {
                        key: t.key.clone(),
                        addr: t.addr,
                        health: Health::Down,
                        reason: Some(why),
                    });
                }
            }
        }
        None
    }

    /// The check status of target `key`.
    #[must_use]
    pub fn status(&self, key: &K) -> Option<&CheckStatus> {
        self.targets
            .iter()
            .find(|t| &t.key == key)
            .map(|t| &t.status)
    }

    /// Number of targets.
    #[must_use]
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether there is nothing to check.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use testkit::epoch;

    fn rs(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new([10, 0, 0, last].into(), 80)
    }

    /// Runs every probe due at `now` with `outcome`, returning the transitions.
    fn run(
        c: &mut HealthChecker<u8>,
        now: Instant,
        outcome: impl Fn(&Probe<u8>) -> Result<(), ProbeFailure>,
    ) -> Vec<Transition<u8>> {
        let mut probes = Vec::new();
        while let Some(p) = c.poll_probe(now) {
            probes.push(p);
        }
        probes
            .iter()
            .filter_map(|p| c.handle_result(&p.key, p.seq, outcome(p)))
            .collect()
    }

    #[test]
    fn defaults_match_the_issue() {
        let d = HealthConfig::default();
        assert_eq!((d.interval, d.rise, d.fall), (Duration::from_secs(2), 2, 4));
    }

    #[test]
    fn fall_failures_take_a_target_down_and_rise_successes_bring_it_back() {
        let t0 = epoch();
        let mut c = HealthChecker::new();
        c.set_targets(t0, [(1u8, rs(1), HealthConfig::default(), Health::Up)]);
        let mut now = t0;
        let step = Duration::from_secs(2);
        // Up and passing.
        assert!(run(&mut c, now, |_| Ok(())).is_empty());
        // Three failures: still up.
        for _ in 0..3 {
            now = c.poll_timeout().unwrap();
            assert!(run(&mut c, now, |_| Err(ProbeFailure::Refused)).is_empty());
        }
        assert_eq!(c.status(&1).unwrap().failures, 3);
        // The fourth: down, at 4 intervals after the first failing probe's start at most.
        now = c.poll_timeout().unwrap();
        assert_eq!(now, t0 + 4 * step);
        let down = run(&mut c, now, |_| Err(ProbeFailure::Refused));
        assert_eq!(
            down,
            [Transition {
                key: 1,
                addr: rs(1),
                health: Health::Down,
                reason: Some(ProbeFailure::Refused)
            }]
        );
        // One success is not enough, a failure resets the count, then two in a row are.
        for (outcome, expect) in [
            (true, None),
            (false, None),
            (true, None),
            (true, Some(Health::Up)),
        ] {
            now = c.poll_timeout().unwrap();
            let got = run(&mut c, now, |_| {
                if outcome {
                    Ok(())
                } else {
                    Err(ProbeFailure::Timeout)
                }
            });
            assert_eq!(got.first().map(|t| t.health), expect);
        }
        assert_eq!(c.status(&1).unwrap().probes, 9);
    }

    #[test]
    fn one_probe_in_flight_per_target_and_no_drift() {
        let t0 = epoch();
        let mut c = HealthChecker::new();
        c.set_targets(t0, [(1u8, rs(1), HealthConfig::default(), Health::Up)]);
        let p = c.poll_probe(t0).unwrap();
        assert!(
            c.poll_probe(t0 + Duration::from_secs(10)).is_none(),
            "still in flight"
        );
        assert_eq!(c.poll_timeout(), None);
        // Answered 900 ms late: the next probe still starts 2 s after this one started.
        c.handle_result(&1, p.seq, Ok(()));
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        // A duplicate or stale result is ignored.
        assert!(
            c.handle_result(&1, p.seq, Err(ProbeFailure::Refused))
                .is_none()
        );
        assert_eq!(c.status(&1).unwrap().failures, 0);
    }

    #[test]
    fn reload_keeps_unchanged_targets_and_drops_stale_results() {
        let t0 = epoch();
        let mut c = HealthChecker::new();
        let cfg = HealthConfig::default();
        c.set_targets(
            t0,
            [
                (1u8, rs(1), cfg.clone(), Health::Up),
                (2, rs(2), cfg.clone(), Health::Up),
            ],
        );
        let probes: Vec<_> = std::iter::from_fn(|| c.poll_probe(t0)).collect();
        assert_eq!(probes.len(), 2);
        let later = t0 + Duration::from_secs(1);
        let http = HealthConfig {
            kind: CheckKind::Http {
                path: "/".into(),
                status: 200,
                expect: None,
                tls: None,
            },
            ..cfg.clone()
        };
        c.set_targets(
            later,
            [
                (1u8, rs(1), cfg, Health::Up),
                (2, rs(2), http, Health::Down),
            ],
        );
        // Target 1 kept its in-flight probe; target 2 was replaced and is due at once.
        assert!(c.handle_result(&1, probes[0].seq, Ok(())).is_none());
        assert!(c.handle_result(&2, probes[1].seq, Ok(())).is_none());
        assert_eq!(c.status(&2).unwrap().probes, 0);
        let p = c.poll_probe(later).unwrap();
        assert_eq!(
            (p.key, p.kind.clone()),
            (
                2,
                CheckKind::Http {
                    path: "/".into(),
                    status: 200,
                    expect: None,
                    tls: None,
                }
            )
        );
        assert_eq!(c.len(), 2);
    }

    proptest! {
        /// Health only flips after exactly `fall` failures in a row (when up) or `rise`
        /// successes in a row (when down), whatever the sequence.
        #[test]
        fn transitions_follow_rise_and_fall(
            rise in 1u32..5,
            fall in 1u32..5,
            outcomes in prop::collection::vec(any::<bool>(), 0..100),
        ) {
            let t0 = epoch();
            let cfg = HealthConfig { rise, fall, ..HealthConfig::default() };
            let mut c = HealthChecker::new();
            c.set_targets(t0, [(0u8, rs(1), cfg, Health::Up)]);
            let (mut up, mut run_len, mut last) = (true, 0u32, None);
            let mut now = t0;
            for ok in outcomes {
                let p = c.poll_probe(now).unwrap();
                let t = c.handle_result(&0, p.seq, if ok { Ok(()) } else { Err(ProbeFailure::Timeout) });
                run_len = if last == Some(ok) { run_len + 1 } else { 1 };
                last = Some(ok);
                let flips = if up { !ok && run_len == fall } else { ok && run_len == rise };
                prop_assert_eq!(t.is_some(), flips);
                if flips {
                    up = !up;
                    // A flip starts a fresh count in the new state.
                    run_len = 0;
                    last = None;
                }
                prop_assert_eq!(c.status(&0).unwrap().health == Health::Up, up);
                now = c.poll_timeout().unwrap();
            }
        }
    }
}
