//! After setup the daemon keeps only the capabilities a network daemon needs at run time
//! (CAP_NET_ADMIN for routes/addresses/TUN, CAP_NET_RAW for raw and packet sockets,
//! CAP_NET_BIND_SERVICE for low ports) and sets no_new_privs, so a compromised daemon
//! cannot load modules, read other users' files or regain what it gave up.

use caps::{CapSet, Capability};
use std::collections::HashSet;

const KEEP: [Capability; 3] = [
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_RAW,
    Capability::CAP_NET_BIND_SERVICE,
];

/// Drops every capability but [`KEEP`] from all sets and sets no_new_privs.
///
/// # Errors
/// The kernel refused a change (the daemon then stops: it promised to run reduced).
pub(crate) fn drop_to_network_capabilities() -> anyhow::Result<()> {
    let keep: HashSet<Capability> = KEEP.into_iter().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| anyhow::anyhow!("dropping {cap} from the bounding set: {e}"))?;
        }
    }
    let current = caps::read(None, CapSet::Permitted)
        .map_err(|e| anyhow::anyhow!("reading capabilities: {e}"))?;
    let kept: HashSet<Capability> = current.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Inheritable, &HashSet::new())
        .map_err(|e| anyhow::anyhow!("clearing inheritable capabilities: {e}"))?;
    caps::set(None, CapSet::Effective, &kept)
        .map_err(|e| anyhow::anyhow!("setting effective capabilities: {e}"))?;
    caps::set(None, CapSet::Permitted, &kept)
        .map_err(|e| anyhow::anyhow!("setting permitted capabilities: {e}"))?;
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| anyhow::anyhow!("setting no_new_privs: {e}"))?;
    tracing::info!(kept = ?kept, "dropped every other privilege");
    Ok(())
}
