//! Opening a TUN device with what the driver asked for, or the most of it the kernel grants.
//!
//! The fallback ladder, tried in order until the kernel accepts one:
//! 1. as asked (offload and, for more than one queue, `IFF_MULTI_QUEUE`);
//! 2. one queue, offload as asked (a kernel or a device that refuses multi-queue);
//! 3. one queue without offload (a kernel that refuses `IFF_VNET_HDR` or the offload ioctls).
//!
//! Invariant: the returned [`Tun::offload`] is what the kernel accepted, and every queue
//! reads and writes frames accordingly (with or without the virtio-net header); a driver
//! must frame by it, never by what it asked for.

use std::io;
use std::net::Ipv4Addr;

use tun_rs::{AsyncDevice, DeviceBuilder};

/// The most queues [`open`] opens.
pub const MAX_QUEUES: usize = 8;

/// What to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunRequest {
    /// Interface name.
    pub name: String,
    /// Interface MTU.
    pub mtu: u16,
    /// TUN offload (virtio-net header, TSO/GSO super-packets).
    pub offload: bool,
    /// Queues wanted (clamped to `1..=MAX_QUEUES`).
    pub queues: usize,
    /// An IPv4 address and prefix length to put on the interface.
    pub ipv4: Option<(Ipv4Addr, u8)>,
}

impl TunRequest {
    /// One queue, no address, offload as given.
    #[must_use]
    pub fn new(name: impl Into<String>, mtu: u16, offload: bool) -> Self {
        TunRequest {
            name: name.into(),
            mtu,
            offload,
            queues: 1,
            ipv4: None,
        }
    }
}

/// An open TUN: at least one queue, all up.
pub struct Tun {
    /// The queues, at least one (more only when multi-queue was asked and granted).
    pub queues: Vec<AsyncDevice>,
    /// Whether frames carry a virtio-net header (offload granted).
    pub offload: bool,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("queues", &self.queues.len())
            .field("offload", &self.offload)
            .finish()
    }
}

/// Every rung of the ladder failed.
#[derive(Debug, thiserror::Error)]
#[error("creating TUN {name}: {source}")]
pub struct TunError {
    /// Interface name.
    pub name: String,
    /// The kernel's answer to the last rung tried.
    #[source]
    pub source: io::Error,
}

/// The rungs of the ladder for `req`: `(offload, multi_queue)`, best first.
fn ladder(req: &TunRequest) -> Vec<(bool, bool)> {
    let multi = req.queues.clamp(1, MAX_QUEUES) > 1;
    let mut rungs = vec![(req.offload, multi)];
    if multi {
        rungs.push((req.offload, false));
    }
    if req.offload {
        rungs.push((false, false));
    }
    rungs
}

/// Opens the TUN `req` describes, up and with its address, falling back as the module says.
/// A multi-queue device that grants fewer queues than asked keeps the ones it granted.
///
/// # Errors
/// [`TunError`] with the kernel's answer to the last rung when none was accepted.
pub fn open(req: &TunRequest) -> Result<Tun, TunError> {
    let wanted = req.queues.clamp(1, MAX_QUEUES);
    let mut last = None;
    for (offload, multi_queue) in ladder(req) {
        let mut builder = DeviceBuilder::new()
            .name(req.name.clone())
            .mtu(req.mtu)
            .offload(offload)
            .multi_queue(multi_queue)
            .enable(true);
        if let Some((addr, prefix)) = req.ipv4 {
            builder = builder.ipv4(addr, prefix, None);
        }
        match builder.build_async() {
            Ok(first) => {
                let mut queues = vec![first];
                while multi_queue && queues.len() < wanted {
                    match queues[0].try_clone() {
                        Ok(q) => queues.push(q),
                        Err(e) => {
                            tracing::warn!(tun = %req.name, error = %e, opened = queues.len(), "opening another TUN queue");
                            break;
                        }
                    }
                }
                if offload != req.offload || queues.len() != wanted {
                    tracing::warn!(
                        tun = %req.name,
                        offload,
                        queues = queues.len(),
                        "TUN opened with less than asked"
                    );
                }
                return Ok(Tun { queues, offload });
            }
            Err(e) => {
                tracing::debug!(tun = %req.name, error = %e, offload, multi_queue, "opening the TUN");
                last = Some(e);
            }
        }
    }
    Err(TunError {
        name: req.name.clone(),
        source: last.unwrap_or_else(|| io::Error::other("no way to open the TUN")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(offload: bool, queues: usize) -> TunRequest {
        TunRequest {
            queues,
            ..TunRequest::new("t0", 1500, offload)
        }
    }

    #[test]
    fn the_ladder_gives_up_multi_queue_before_offload() {
        assert_eq!(
            ladder(&req(true, 4)),
            [(true, true), (true, false), (false, false)]
        );
        assert_eq!(ladder(&req(true, 1)), [(true, false), (false, false)]);
        assert_eq!(ladder(&req(false, 4)), [(false, true), (false, false)]);
        assert_eq!(ladder(&req(false, 0)), [(false, false)]);
    }
}
