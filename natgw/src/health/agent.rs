//! HAProxy's agent check: a small TCP service on the backend tells the director, in one line,
//! how much work the backend wants.
//!
//! Every `agent_interval` the driver connects to the agent's port, reads one line of at most
//! [`MAX_AGENT_LINE`] bytes (ended by `\n` or by the agent closing), and hands it to
//! [`AgentReply::parse`]. The line holds words separated by spaces, tabs or commas, as
//! HAProxy reads them:
//!
//! | word | effect |
//! |---|---|
//! | `up` | the agent's down verdict is lifted (the health check still decides) |
//! | `down`, `fail`, `failed`, `stopped` | the backend is down whatever its health check says |
//! | `ready`, `drain`, `maint` | the backend's state, as `vipgate lb set state` sets it |
//! | `NN%` | weight = NN % of the configured weight (0 drains) |
//! | `maxconn:NN` | accepted and ignored (HAProxy's per-server queue has no LVS equivalent) |
//! | `# text` | a note, ignored with the rest of the line |
//!
//! A line with an unknown word, an empty line or one with no end within the bound is
//! malformed: counted by the caller and otherwise ignored. An agent that cannot be reached
//! changes nothing (HAProxy: "connectivity is tested by the regular health check").
//!
//! [`AgentSchedule`] decides when each agent is asked, the way [`super::HealthChecker`] does
//! for probes: `poll_probe` until `None`, sleep until `poll_timeout`, `handle_result` for each
//! finished probe (which tells whether the result is still wanted).

use std::fmt;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use balance::AdminState;

/// Longest agent line read, end of line included (HAProxy's agent lines are a few words).
pub const MAX_AGENT_LINE: usize = 256;
/// Highest weight percentage taken (HAProxy takes more than 100 %; the pool caps the weight).
pub const MAX_AGENT_PERCENT: u32 = 1000;

/// Agent check parameters of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AgentConfig {
    /// The agent's TCP port on the backend's address (HAProxy `agent-port`).
    pub port: u16,
    /// Time between the starts of two questions (HAProxy `agent-inter`).
    pub interval: Duration,
}

/// What the agent says about the backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentHealth {
    /// `up`: the agent does not hold the backend down.
    Up,
    /// `down`, `fail`, `stopped`: down whatever the health check says.
    Down,
}

/// One parsed agent line; each part is `None` when the line does not say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AgentReply {
    /// `up` or `down` (and its synonyms).
    pub health: Option<AgentHealth>,
    /// `ready`, `drain` or `maint`.
    pub admin: Option<AdminState>,
    /// `NN%`: the weight as a percentage of the configured one.
    pub weight_percent: Option<u32>,
}

/// Why an agent gave no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentFailure {
    /// No line within the timeout.
    Timeout,
    /// The connection was refused or failed.
    Unreachable,
    /// No end of line within [`MAX_AGENT_LINE`] bytes.
    TooLong,
    /// An empty line, an unknown word or a percentage out of range.
    Malformed,
}

impl AgentFailure {
    /// Whether the agent answered something that is not an agent line (counted as
    /// malformed), as opposed to not answering.
    #[must_use]
    pub fn is_malformed(self) -> bool {
        matches!(self, Self::TooLong | Self::Malformed)
    }
}

impl fmt::Display for AgentFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("no answer"),
            Self::Unreachable => f.write_str("unreachable"),
            Self::TooLong => write!(f, "line longer than {MAX_AGENT_LINE} bytes"),
            Self::Malformed => f.write_str("malformed line"),
        }
    }
}

impl AgentReply {
    /// Parses one agent line (without its line end).
    ///
    /// # Errors
    /// [`AgentFailure::Malformed`] for a line with no word, an unknown word, or a percentage
    /// that is not an integer up to [`MAX_AGENT_PERCENT`].
    pub fn parse(line: &[u8]) -> Result<Self, AgentFailure> {
        // A note runs to the end of the line.
        let words = line.split(|&b| b == b'#').next().unwrap_or_default();
        let mut reply = Self::default();
        let mut any = false;
        for word in words
            .split(|&b| matches!(b, b' ' | b'\t' | b',' | b'\r'))
            .filter(|w| !w.is_empty())
        {
            any = true;
            let word = word.to_ascii_lowercase();
            match word.as_slice() {
                b"up" => reply.health = Some(AgentHealth::Up),
                b"down" | b"fail" | b"failed" | b"stopped" => {
                    reply.health = Some(AgentHealth::Down);
                }
                b"ready" => reply.admin = Some(AdminState::Ready),
                b"drain" => reply.admin = Some(AdminState::Drain),
                b"maint" => reply.admin = Some(AdminState::Maint),
                w if w.starts_with(b"maxconn:") && parse_number(&w[8..]).is_some() => {}
                [digits @ .., b'%'] => {
                    let pct = parse_number(digits)
                        .filter(|&p| p <= MAX_AGENT_PERCENT)
                        .ok_or(AgentFailure::Malformed)?;
                    reply.weight_percent = Some(pct);
                }
                _ => return Err(AgentFailure::Malformed),
            }
        }
        if any {
            Ok(reply)
        } else {
            Err(AgentFailure::Malformed)
        }
    }

    /// The weight this reply sets for a backend configured with `configured`, if it sets one
    /// (rounded down, as HAProxy does).
    #[must_use]
    pub fn weight(&self, configured: u32) -> Option<u32> {
        self.weight_percent
            .map(|p| u32::try_from(u64::from(configured) * u64::from(p) / 100).unwrap_or(u32::MAX))
    }
}

impl fmt::Display for AgentReply {
    /// The words of the reply, as an agent would say them (`show lb`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words = Vec::new();
        if let Some(h) = self.health {
            words.push(match h {
                AgentHealth::Up => "up".to_owned(),
                AgentHealth::Down => "down".to_owned(),
            });
        }
        if let Some(a) = self.admin {
            words.push(a.as_str().to_owned());
        }
        if let Some(p) = self.weight_percent {
            words.push(format!("{p}%"));
        }
        if words.is_empty() {
            // maxconn only.
            words.push("no change".to_owned());
        }
        f.write_str(&words.join(" "))
    }
}

/// A decimal number of at most 9 digits (no sign, no spaces).
fn parse_number(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u32, |n, d| n * 10 + u32::from(d - b'0')),
    )
}

/// The line in the bytes an agent sent so far: `Ok(Some(line))` once a `\n` came (or the
/// agent closed, `closed`), `Ok(None)` while more may come, an error past the bound.
///
/// # Errors
/// [`AgentFailure::TooLong`] when [`MAX_AGENT_LINE`] bytes hold no line end,
/// [`AgentFailure::Malformed`] when the agent closed without a word.
pub fn agent_line(received: &[u8], closed: bool) -> Result<Option<&[u8]>, AgentFailure> {
    if let Some(end) = received.iter().position(|&b| b == b'\n') {
        return Ok(Some(&received[..end]));
    }
    if received.len() >= MAX_AGENT_LINE {
        return Err(AgentFailure::TooLong);
    }
    if closed {
        return if received.is_empty() {
            Err(AgentFailure::Malformed)
        } else {
            Ok(Some(received))
        };
    }
    Ok(None)
}

/// An agent question the driver must ask now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentProbe<K> {
    /// The backend's key.
    pub key: K,
    /// Identifies this question so a late answer for a replaced target is ignored.
    pub seq: u64,
    /// The agent's address.
    pub addr: SocketAddrV4,
    /// Give up after this long.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
struct AgentTarget<K> {
    key: K,
    addr: SocketAddrV4,
    interval: Duration,
    timeout: Duration,
    next: Instant,
    in_flight: Option<u64>,
}

/// When each backend's agent is asked; `K` names a backend.
#[derive(Debug, Clone)]
pub struct AgentSchedule<K> {
    targets: Vec<AgentTarget<K>>,
    next_seq: u64,
}

impl<K> Default for AgentSchedule<K> {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            next_seq: 0,
        }
    }
}

impl<K: Clone + PartialEq> AgentSchedule<K> {
    /// A schedule with no agents.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the agents (on start and on reload): `(key, agent address, interval,
    /// timeout)`. An unchanged one keeps its schedule; a new or changed one is asked at once.
    pub fn set_targets(
        &mut self,
        now: Instant,
        targets: impl IntoIterator<Item = (K, SocketAddrV4, Duration, Duration)>,
    ) {
        let mut old = std::mem::take(&mut self.targets);
        for (key, addr, interval, timeout) in targets {
            let kept = old.iter().position(|t| {
                t.key == key && t.addr == addr && t.interval == interval && t.timeout == timeout
            });
            self.targets.push(match kept {
                Some(i) => old.swap_remove(i),
                None => AgentTarget {
                    key,
                    addr,
                    interval,
                    timeout,
                    next: now,
                    in_flight: None,
                },
            });
        }
    }

    /// The next question due at `now`, marked in flight; call until `None`.
    pub fn poll_probe(&mut self, now: Instant) -> Option<AgentProbe<K>> {
        let t = self
            .targets
            .iter_mut()
            .find(|t| t.in_flight.is_none() && t.next <= now)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        t.in_flight = Some(seq);
        t.next = now + t.interval;
        Some(AgentProbe {
            key: t.key.clone(),
            seq,
            addr: t.addr,
            timeout: t.timeout,
        })
    }

    /// When the next question is due (agents being asked wait for their answer).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.targets
            .iter()
            .filter(|t| t.in_flight.is_none())
            .map(|t| t.next)
            .min()
    }

    /// Records that question `seq` of `key` finished; returns whether its answer is still
    /// wanted (false for a target replaced or removed meanwhile, or a duplicate).
    pub fn handle_result(&mut self, key: &K, seq: u64) -> bool {
        match self
            .targets
            .iter_mut()
            .find(|t| &t.key == key && t.in_flight == Some(seq))
        {
            Some(t) => {
                t.in_flight = None;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use testkit::epoch;

    fn reply(line: &str) -> Result<AgentReply, AgentFailure> {
        AgentReply::parse(line.as_bytes())
    }

    #[test]
    fn fuzz_corpus_replays() {
        let n = testkit::replay_corpus("health_agent", crate::fuzzing::run_agent_line);
        assert!(n > 0, "no health_agent seeds");
    }

    #[test]
    fn haproxy_words_parse() {
        assert_eq!(
            reply("up 75%"),
            Ok(AgentReply {
                health: Some(AgentHealth::Up),
                weight_percent: Some(75),
                ..AgentReply::default()
            })
        );
        assert_eq!(
            reply("ready,50%"),
            Ok(AgentReply {
                admin: Some(AdminState::Ready),
                weight_percent: Some(50),
                ..AgentReply::default()
            })
        );
        for down in ["down", "fail", "failed", "stopped", "DOWN #disk full"] {
            assert_eq!(
                reply(down).unwrap().health,
                Some(AgentHealth::Down),
                "{down}"
            );
        }
        assert_eq!(reply("drain\r").unwrap().admin, Some(AdminState::Drain));
        assert_eq!(reply("maint").unwrap().admin, Some(AdminState::Maint));
        assert_eq!(reply("maxconn:30"), Ok(AgentReply::default()));
        assert_eq!(reply("0%").unwrap().weight(10), Some(0));
        assert_eq!(reply("50%").unwrap().weight(9), Some(4));
        assert_eq!(reply("up drain 50%").unwrap().to_string(), "up drain 50%");
    }

    #[test]
    fn anything_else_is_malformed() {
        for bad in [
            "",
            "   ",
            "#only a note",
            "upp",
            "50",
            "%",
            "-5%",
            "1001%",
            "5.5%",
            "9999999999%",
            "maxconn:",
            "maxconn:x",
            "up\0",
        ] {
            assert_eq!(reply(bad), Err(AgentFailure::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn a_line_ends_at_newline_or_close_within_the_bound() {
        assert_eq!(agent_line(b"up\nrest", false), Ok(Some(&b"up"[..])));
        assert_eq!(agent_line(b"up", false), Ok(None));
        assert_eq!(agent_line(b"up", true), Ok(Some(&b"up"[..])));
        assert_eq!(agent_line(b"", true), Err(AgentFailure::Malformed));
        let endless = [b'x'; MAX_AGENT_LINE];
        assert_eq!(agent_line(&endless, false), Err(AgentFailure::TooLong));
        assert!(AgentFailure::TooLong.is_malformed() && !AgentFailure::Timeout.is_malformed());
    }

    #[test]
    fn each_agent_is_asked_every_interval_one_question_at_a_time() {
        let t0 = epoch();
        let a = SocketAddrV4::new([10, 0, 0, 1].into(), 9999);
        let second = Duration::from_secs(1);
        let mut s = AgentSchedule::new();
        s.set_targets(t0, [(1u8, a, 2 * second, second)]);
        let p = s.poll_probe(t0).unwrap();
        assert!(s.poll_probe(t0 + 10 * second).is_none(), "in flight");
        assert!(s.handle_result(&1, p.seq));
        assert!(!s.handle_result(&1, p.seq), "a duplicate is not wanted");
        assert_eq!(s.poll_timeout(), Some(t0 + 2 * second));
        // A reload that changes the interval asks at once and drops the stale answer.
        let p = s.poll_probe(t0 + 2 * second).unwrap();
        s.set_targets(t0 + 3 * second, [(1u8, a, second, second)]);
        assert!(!s.handle_result(&1, p.seq));
        assert_eq!(s.poll_timeout(), Some(t0 + 3 * second));
    }

    proptest! {
        /// Whatever the bytes, parsing never panics and a reply's percentage is in range.
        #[test]
        fn any_line_parses_or_is_malformed(line in prop::collection::vec(any::<u8>(), 0..300)) {
            match AgentReply::parse(&line) {
                Ok(r) => prop_assert!(r.weight_percent.is_none_or(|p| p <= MAX_AGENT_PERCENT)),
                Err(e) => prop_assert_eq!(e, AgentFailure::Malformed),
            }
            let _ = agent_line(&line, true);
        }
    }
}
