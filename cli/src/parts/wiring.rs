//! What parts started earlier hand to parts started after them, in one place.
//!
//! `vipgate run` starts the kinds in order (GRE, NAT, services, VRRP, sync, SSH); a part that
//! others build on leaves its handles here at start, and the later parts read them from
//! [`super::StartCtx::wiring`]. Nothing else crosses between parts: no part reaches into
//! another's module state. Invariant: an entry is only ever replaced by the part that
//! provides it (a restart), and the `nat` entry is cleared by the nat part that set it. The
//! parts that read `gateway` and `vrrp_states` (sync) are restarted with the parts that
//! provide them (`Kind::dependents`), so they never hold a stopped one for long.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use natgw::driver::NatDriver;
use tokio::sync::watch;
use vrrp::driver::AddressHook;

/// The cross-part handles of one running site.
#[derive(Default, Clone)]
pub(crate) struct Wiring {
    /// The PAT gateway the nat part runs, for the virtual services to join (they add their
    /// listeners to its core and make VIPs live through it). Set while the nat part runs.
    pub(crate) nat: Option<Arc<NatDriver>>,
    /// The gateway whose flows this node owns: the nat part's, or the one the services of a
    /// director started (set by whichever of the two started last). Flow sync reads it.
    pub(crate) gateway: Option<Arc<NatDriver>>,
    /// Per VRRP instance name: its state, changed at each transition (flow sync follows the
    /// instance its `[sync] vrrp` names).
    pub(crate) vrrp_states: HashMap<String, watch::Receiver<vrrp::State>>,
    /// Per VRRP instance a `[sync]` follows: its preemption gate, made by the vrrp part
    /// closed (`false`) and opened by the sync part once a snapshot from the master is in,
    /// or by the vrrp part when `[sync] ready_timeout` passes first.
    pub(crate) preempt_gates: HashMap<String, watch::Sender<bool>>,
    /// Per service name, or `listener/pool` of an HTTP pool: `true` while it has a healthy
    /// backend (VRRP `track_services`).
    pub(crate) health: HashMap<String, watch::Receiver<bool>>,
    /// Per VIP a VRRP instance moves: the hook of the service that makes it live.
    pub(crate) hooks: HashMap<Ipv4Addr, Arc<dyn AddressHook>>,
}

/// [`Wiring`] as the parts share it: written at start, read by later starts.
pub(crate) type SharedWiring = Arc<std::sync::Mutex<Wiring>>;

/// Locks the wiring; a part that panicked while holding it cannot leave it half-written
/// (every write is one field assignment or map insert), so a poisoned lock is still good.
pub(crate) fn lock(wiring: &SharedWiring) -> std::sync::MutexGuard<'_, Wiring> {
    wiring
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
