//! VRRPv3 (RFC 5798) for IPv4, interoperable with keepalived: a sans-IO codec and state
//! machine, plus (behind the default `driver` feature) a tokio driver with a raw IP protocol
//! 112 socket, rtnetlink address management and gratuitous ARP.
//!
//! What this crate does **not** do: VRRP for IPv6, VRRPv2 or its authentication, virtual MAC
//! addresses (`use_vmac`: the interface's own MAC is used, as keepalived does by default),
//! accept mode, or running health checks (the caller reports service health).
//!
//! ```text
//!  raw socket ──bytes──> wire::parse_ipv4 ──ReceivedAdvert──> SyncGroup / VrrpInstance
//!  timers ───now──────────────────────────handle_timeout────>        │
//!  tracking ──fault / penalty────────────────────────────────>        │
//!                         Action::{SendAdvert, Transition, AddAddresses,
//!          driver <────── RemoveAddresses, GratuitousArp} + poll_timeout()
//! ```
//!
//! ```text
//!            startup (priority 255)
//!  Initialize ───────────────────────────> Master <──┐ master down timer / preempt
//!      │ startup                           │  ▲      │
//!      └──────────────> Backup ────────────┘  │      │
//!                         ▲  higher priority advert  │
//!                         └──────────────────────────┘
//!  any ── tracked fault ──> Fault ── recovered ──> Backup;  shutdown ──> Initialize
//! ```
//!
//! The modules are private and what callers use is re-exported here, except [`wire`] (the
//! packet view and its constants, smoltcp-style) and `driver`.
#![warn(missing_docs)]

mod arp;
mod error;
mod instance;
mod sync_group;
mod track;
pub mod wire;

#[cfg(feature = "driver")]
pub mod driver;

pub use arp::{ARP_LEN, ETHERTYPE_ARP, gratuitous_arp};
#[cfg(feature = "driver")]
pub use error::DriverError;
pub use error::{ReconfigureError, WireError};
pub use instance::{
    Action, Counters, DropReason, InstanceConfig, PRIORITY_OWNER, PRIORITY_STOP, Reason,
    ReceivedAdvert, State, TRANSITION_HISTORY, Transition, VirtualAddress, VrrpInstance,
};
pub use sync_group::{Binding, MemberId, ObjectId, SyncGroup};
pub use track::{ParamMatch, ProcessQuorum, RiseFall, TrackedObject, Tracker};
pub use wire::{VrrpPacket, VrrpRepr};

/// Entry points for the cargo-fuzz targets and the corpus replay test.
#[doc(hidden)]
pub mod fuzzing {
    use crate::instance::{
        Action, InstanceConfig, ReceivedAdvert, State, VirtualAddress, VrrpInstance,
    };
    use crate::wire::{VrrpPacket, VrrpRepr, parse_ipv4};
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    const OWN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    /// Advert sources the input picks from: two peers, an attacker, and our own address.
    const SOURCES: [Ipv4Addr; 4] = [
        Ipv4Addr::new(198, 51, 100, 12),
        Ipv4Addr::new(198, 51, 100, 13),
        Ipv4Addr::new(198, 51, 100, 66),
        OWN,
    ];

    /// Reads the input a byte at a time; zeros once it is used up.
    struct Input<'a>(&'a [u8]);

    impl Input<'_> {
        fn byte(&mut self) -> u8 {
            match self.0.split_first() {
                Some((b, rest)) => {
                    self.0 = rest;
                    *b
                }
                None => 0,
            }
        }
        fn more(&self) -> bool {
            !self.0.is_empty()
        }
    }

    /// The simulated clock's epoch.
    #[allow(clippy::disallowed_methods)]
    fn epoch() -> Instant {
        Instant::now()
    }

    /// Drives one instance with a sequence of inputs decoded from `data` (adverts of any
    /// priority, source, interval and TTL; timer expiries; waits; faults; penalties;
    /// shutdown, startup and reconfigure) and checks the state machine's invariants after
    /// every step. Panics (an assertion) on a violated invariant, never otherwise.
    pub fn check_instance(data: &[u8]) {
        let mut input = Input(data);
        let mut config = InstanceConfig::new("fuzz", 51, OWN);
        config.priority = input.byte().max(1);
        config.preempt = input.byte() & 1 == 0;
        config.preempt_delay = Duration::from_millis(u64::from(input.byte()) * 20);
        config.advert_interval = Duration::from_millis(50 + u64::from(input.byte()) * 10);
        config.reassert_interval = Duration::from_millis(100 + u64::from(input.byte()) * 10);
        config.addresses = vec![VirtualAddress {
            address: VIP,
            prefix_len: 24,
        }];
        let reassert_interval = config.reassert_interval;
        let mut i = VrrpInstance::new(config);
        let mut now = epoch();
        let mut holds = false;
        let mut last_reassert_arp: Option<Instant> = None;
        i.startup(now);
        while let Some(a) = i.poll_action() {
            match a {
                Action::AddAddresses => holds = true,
                Action::RemoveAddresses => holds = false,
                _ => {}
            }
        }
        while input.more() {
            let before = (i.state(), i.master(), i.poll_timeout());
            let mut foreign_zero = false;
            let mut lower_to_master = false;
            match input.byte() % 8 {
                0 => {
                    let src = SOURCES[usize::from(input.byte() % 4)];
                    let priority = input.byte();
                    let cs = u16::from_be_bytes([input.byte(), input.byte()]) & 0x0fff;
                    let ttl = if input.byte() & 1 == 0 {
                        255
                    } else {
                        input.byte()
                    };
                    foreign_zero = priority == 0
                        && ttl == 255
                        && before.0 == State::Backup
                        && before.1.map(|(a, _)| a) != Some(src);
                    lower_to_master = before.0 == State::Master && priority < i.priority();
                    let adv = ReceivedAdvert {
                        src,
                        ttl,
                        repr: VrrpRepr {
                            vrid: 51,
                            priority,
                            max_advert_interval_cs: cs,
                            addresses: vec![VIP],
                        },
                    };
                    let _ = i.handle_advert(now, &adv);
                }
                1 => {
                    if let Some(t) = i.poll_timeout() {
                        now = t;
                    }
                    i.handle_timeout(now);
                }
                2 => {
                    now += Duration::from_millis(u64::from(input.byte()) * 20);
                    i.handle_timeout(now);
                }
                3 => i.set_fault(now, input.byte() & 1 == 1),
                4 => i.set_priority_penalty(now, input.byte() % 120),
                5 => i.shutdown(now),
                6 => i.startup(now),
                _ => {
                    let mut c = i.config().clone();
                    c.priority = input.byte().clamp(1, 254);
                    c.preempt = input.byte() & 1 == 0;
                    let state = i.state();
                    assert_eq!(i.reconfigure(now, c), Ok(()));
                    assert_eq!(i.state(), state, "a reconfigure never changes state");
                }
            }
            let mut transitions = 0;
            let mut adverts = 0;
            while let Some(a) = i.poll_action() {
                match a {
                    Action::Transition(t) => {
                        transitions += 1;
                        assert_eq!(t.to, i.state(), "the last transition names the state");
                    }
                    Action::AddAddresses => holds = true,
                    Action::RemoveAddresses => holds = false,
                    Action::SendAdvert(_) => adverts += 1,
                    Action::ReassertArp => {
                        if let Some(prev) = last_reassert_arp {
                            assert!(now - prev >= reassert_interval, "re-assertion rate");
                        }
                        last_reassert_arp = Some(now);
                    }
                    Action::GratuitousArp | Action::WithdrawAddresses(_) => {}
                }
            }
            assert!(transitions <= 1, "{transitions} transitions for one input");
            assert_eq!(holds, i.state() == State::Master, "a master owns its VIPs");
            if let Some(d) = i.poll_timeout() {
                assert!(d > now, "deadline not in the future");
            }
            if i.state() == State::Master {
                assert!(i.poll_timeout().is_some(), "a master has an advert timer");
            }
            if lower_to_master {
                assert!(adverts <= 1, "one lower-priority advert, {adverts} adverts");
            }
            if foreign_zero {
                assert_eq!(
                    (i.state(), i.master(), i.poll_timeout()),
                    before,
                    "priority 0 from a non-master moved the backup"
                );
            }
        }
    }

    /// Parses `data` as an IPv4 packet carrying an advert; whatever parses must emit an advert
    /// that parses back to the same meaning. Never panics on any input.
    pub fn check_advert(data: &[u8]) {
        let Ok((env, repr)) = parse_ipv4(data) else {
            return;
        };
        let bytes = repr.to_bytes(env.src, env.dst);
        let again =
            VrrpPacket::new_checked(&bytes[..]).and_then(|p| VrrpRepr::parse(&p, env.src, env.dst));
        assert_eq!(again, Ok(repr), "emit/parse round trip");
    }
}
