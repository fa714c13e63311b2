//! Flow state sync between vipgate nodes (a pair of directors, or a pair of PAT gateways):
//! the node that owns a VIP streams its flows' creations, changes and removals to its peers,
//! which hold them as standby state and take over with them when VRRP makes them master.
//!
//! A sans-IO protocol core, as the other protocol crates: no sockets, clocks or tasks; the
//! daemon feeds it datagrams and time and sends what it returns.
//!
//! ```text
//!  flow table ──Update──▶ SyncEngine::send_updates ──▶ poll_transmit ──UDP──▶ peers
//!  peers ──UDP──▶ SyncEngine::handle_datagram ──▶ poll_event: Updates / SnapshotRequested …
//!  timers ──────▶ SyncEngine::handle_timeout (hello, resend, ack, peer down, bulk retry)
//! ```
//!
//! - [`wire`]: the versioned message format; HMAC-SHA256 with the group's shared key over
//!   every byte; every length and count bounded; one [`WireError`] per way a datagram can be
//!   malformed.
//! - [`Update`]: what is synced — a flow's full state ([`FlowState`]: both sides' endpoints,
//!   the public endpoint or backend chosen, TCP state, flags, remaining timeout), a
//!   persistence template ([`PersistState`]), or their removal; or an `lblc`/`lblcr`
//!   destination table entry ([`LocalityState`], to peers that announced they take it).
//! - [`SyncEngine`]: sequencing, cumulative acknowledgements, negative acknowledgements and
//!   a bounded resend queue (conntrackd's FTFW mode), the replay window, peer liveness, and
//!   bulk snapshots pulled by a node that (re)starts.
//!
//! What it does **not** do: decide what a node does with the state (the gateway installs it
//! as standby flows and promotes them when it becomes master), encrypt (the state is
//! authenticated, not secret: run sync on a dedicated link), or IPv6 flows.
#![warn(missing_docs)]

#[cfg(feature = "driver")]
pub mod driver;
mod engine;
mod error;
mod record;
pub mod wire;

pub use engine::{
    ACK_EVERY, BulkStatus, Event, Now, PeerStatus, RESEND_BURST, Rejected, SyncConfig, SyncEngine,
    SyncStats,
};
pub use error::{KeyError, WireError};
pub use record::{
    FlowKey, FlowProto, FlowState, LocalityKey, LocalityState, MAX_EXPIRES_SECS,
    MAX_LOCALITY_BACKENDS, PersistKey, PersistState, TcpPhase, Update,
};
pub use wire::{FEATURE_LOCALITY, FEATURE_LOCALITY_GONE, FEATURES, SyncKey};

/// Entry points for the cargo-fuzz target and the corpus replay test.
#[doc(hidden)]
pub mod fuzzing {
    use std::num::NonZeroU32;
    use std::time::{Duration, Instant};

    use crate::engine::{Now, SyncConfig, SyncEngine};
    use crate::wire::{self, MAC_LEN, SyncKey};

    /// The key the fuzz target signs with.
    const KEY: &[u8] = b"vipgate fuzzing sync key";
    /// The wall clock the fuzz target pretends (inputs stamped near it pass the skew check).
    pub const UNIX: u64 = 1_800_000_000;

    /// Splits `data` into datagrams (a two-byte length before each), re-signs each with the
    /// fuzzing key (so the checks behind the HMAC are reached) and feeds them to one engine,
    /// which sends every record it delivers back out (so decoded records of every kind,
    /// locality sets of any size among them, go through packing and the feature check),
    /// then checks: whatever decodes re-encodes to the same bytes, every datagram sent fits
    /// [`wire::MAX_DATAGRAM`], and the engine's bounds hold after every step.
    pub fn check_stream(data: &[u8], start: Instant) {
        let key = SyncKey::new(KEY).expect("a valid key");
        let node = NonZeroU32::new(1).expect("non-zero");
        let mut engine = SyncEngine::new(
            Now {
                at: start,
                unix_secs: UNIX,
            },
            SyncConfig::new(node, 1, key.clone()),
        );
        let mut rest = data;
        let mut step = 0u64;
        while let Some((len, tail)) = rest.split_first_chunk::<2>() {
            let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
            let (datagram, tail) = tail.split_at(len);
            rest = tail;
            step += 1;
            let now = Now {
                at: start + Duration::from_millis(step * 37),
                unix_secs: UNIX,
            };
            let mut signed = datagram.to_vec();
            if signed.len() >= MAC_LEN {
                let n = signed.len() - MAC_LEN;
                signed.truncate(n);
                let tag = wire::fuzz_tag(&key, &signed);
                signed.extend_from_slice(&tag);
            }
            if let Ok(msg) = wire::decode(&signed, &key) {
                assert_eq!(wire::encode(&msg, &key), signed, "re-encoding differs");
            }
            let _ = engine.handle_datagram(now, &signed);
            let _ = engine.handle_datagram(now, datagram);
            engine.handle_timeout(now);
            while let Some(event) = engine.poll_event() {
                match event {
                    crate::Event::SnapshotRequested { .. } => {
                        engine.send_snapshot(now, &[], false);
                    }
                    crate::Event::Updates { updates, .. } => engine.send_updates(now, &updates),
                    _ => {}
                }
            }
            while let Some(d) = engine.poll_transmit() {
                assert!(
                    d.len() <= wire::MAX_DATAGRAM,
                    "a datagram of {} bytes",
                    d.len()
                );
            }
            assert!(engine.queued() <= 8192);
            for p in engine.peers() {
                assert!(p.buffered <= 128);
            }
        }
    }
}
