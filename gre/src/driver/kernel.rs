//! The kernel data path of the tunnels: kpath's GRE programs at each tunnel's TUN egress
//! (encapsulation) and at the underlay's ingress (decapsulation).
//!
//! The TUN devices, routes, sockets and tasks stay exactly as on the TUN path: the programs
//! take a tunnel's plain IPv4 and IPv6 traffic off them and leave them everything else (SYNs for
//! the MSS clamp, keepalives, oversized packets, anything unusual), so every check and
//! counter of the core still applies. What the programs carried is added to the core's
//! counters in `show gre`.
//!
//! Invariants: a tunnel is in the programs' maps only while it runs on this path; its slot is
//! its index in the driver; [`KernelTunnels::unload`] (at stop) removes links, pins and any
//! qdisc added, before the TUN devices go.

use std::net::{IpAddr, Ipv4Addr};

use kpath::{
    GreEgress, GrePath, GreProgram, GreTunnelEntry, GreTunnelStats, LoadOptions, MAX_GRE_TUNNELS,
};
use netsys::netlink::{addresses, link_by_index, route_get};

use crate::tunnel::{TunnelConfig, Underlay};

/// Which data path a tunnel asks for, or runs on (spelt `kernel` / `tun` in config and
/// status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Datapath {
    /// The GRE kernel programs where they load and the tunnel's options allow; the TUN path
    /// otherwise (the reason is shown).
    #[default]
    Kernel,
    /// Every packet crosses the TUN and the core.
    Tun,
}

impl Datapath {
    /// The config and status spelling.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Tun => "tun",
        }
    }
}

impl std::fmt::Display for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The data path a tunnel runs on and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathState {
    /// Plain traffic is carried by the kernel programs.
    pub kernel: bool,
    /// Why this data path (the configured one, or why the kernel path is not used).
    pub reason: String,
}

impl DatapathState {
    /// The data path it runs on.
    #[must_use]
    pub fn datapath(&self) -> Datapath {
        if self.kernel {
            Datapath::Kernel
        } else {
            Datapath::Tun
        }
    }

    fn tun(reason: impl Into<String>) -> Self {
        DatapathState {
            kernel: false,
            reason: reason.into(),
        }
    }
}

/// What the kernel programs did for one tunnel (already included in the tunnel's counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KernelCounters {
    /// Inner packets encapsulated in the kernel (a GSO super-packet counts its segments).
    pub tx_packets: u64,
    /// Inner bytes encapsulated in the kernel.
    pub tx_bytes: u64,
    /// Inner packets decapsulated in the kernel.
    pub rx_packets: u64,
    /// Inner bytes decapsulated in the kernel.
    pub rx_bytes: u64,
    /// Packets routed into the tunnel that the program left to the TUN path.
    pub tx_passed: u64,
    /// The tunnel's GRE packets the program left to the TUN path.
    pub rx_passed: u64,
}

impl From<GreTunnelStats> for KernelCounters {
    fn from(s: GreTunnelStats) -> Self {
        KernelCounters {
            tx_packets: s.tx_packets,
            tx_bytes: s.tx_bytes,
            rx_packets: s.rx_packets,
            rx_bytes: s.rx_bytes,
            tx_passed: s.tx_passed,
            rx_passed: s.rx_passed,
        }
    }
}

/// Why a tunnel with `config` stays on the TUN path whatever the kernel can do; `None` when
/// its options allow the kernel path.
#[must_use]
pub fn kernel_path_excluded(config: &TunnelConfig) -> Option<&'static str> {
    if config.sequence {
        Some("sequence = true: sequence numbers exclude GSO (as for Linux ip_gre)")
    } else if config.checksum {
        Some(
            "checksum = true: this kernel cannot segment a GRE super-packet with checksums \
             (bpf_skb_adjust_room marks it SKB_GSO_GRE, not SKB_GSO_GRE_CSUM)",
        )
    } else {
        None
    }
}

/// What the kernel path needs before a process drops CAP_SYS_ADMIN: a bpffs at
/// `/sys/fs/bpf` (mounted if absent). Afterwards loading needs CAP_BPF and CAP_NET_ADMIN.
///
/// # Errors
/// Why the kernel path will not be able to pin its maps (the tunnels then run on the TUN).
pub fn prepare_kernel_datapath() -> Result<(), String> {
    kpath::ensure_bpffs(std::path::Path::new("/sys/fs/bpf")).map_err(|e| e.to_string())
}

/// One tunnel as the driver hands it over: its configuration, TUN and wish.
pub(super) struct Candidate<'a> {
    pub(super) config: &'a TunnelConfig,
    pub(super) tun_ifindex: u32,
    pub(super) datapath: Datapath,
}

/// The loaded programs and the tunnels on them (by driver index).
pub(super) struct KernelTunnels {
    path: GrePath,
    entries: Vec<Option<GreTunnelEntry>>,
}

impl std::fmt::Debug for KernelTunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelTunnels")
            .field("path", &self.path)
            .field("tunnels", &self.entries.iter().flatten().count())
            .finish()
    }
}

/// Where a tunnel's outer packets go and come from.
struct UnderlayLinks {
    /// The interfaces GRE from `remote` to `local` arrives on: the one toward the remote and
    /// the one holding the local address (loopback excepted).
    ingress: Vec<String>,
    /// The interface the route to the remote leaves by (not loopback), and its MTU.
    egress: Option<GreEgress>,
}

async fn underlay_links(
    netlink: &rtnetlink::Handle,
    local: Ipv4Addr,
    remote: Ipv4Addr,
) -> Result<UnderlayLinks, String> {
    let mut names = Vec::new();
    let mut egress = None;
    if let Some(link) = route_get(netlink, IpAddr::V4(remote))
        .await
        .map_err(|e| e.to_string())?
    {
        if link.name != "lo" {
            egress = link.mtu.map(|mtu| GreEgress {
                ifindex: link.index,
                mtu,
            });
        }
        names.push(link.name);
    }
    let holder = addresses(netlink)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|a| a.net.addr() == local);
    if let Some(a) = holder
        && let Some(link) = link_by_index(netlink, a.ifindex)
            .await
            .map_err(|e| e.to_string())?
        && !names.contains(&link.name)
    {
        names.push(link.name);
    }
    names.retain(|n| n != "lo");
    if names.is_empty() {
        return Err(format!("no underlay interface toward {remote}"));
    }
    Ok(UnderlayLinks {
        ingress: names,
        egress,
    })
}

impl KernelTunnels {
    /// Decides every tunnel's data path, loading and attaching the programs for those that
    /// take the kernel path. Logs one line per tunnel. `site` names the pin directory.
    pub(super) async fn start(
        netlink: &rtnetlink::Handle,
        site: &str,
        candidates: &[Candidate<'_>],
    ) -> (Option<Self>, Vec<DatapathState>) {
        let mut states: Vec<Option<DatapathState>> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| match c.datapath {
                Datapath::Tun => Some(DatapathState::tun("configured: datapath = \"tun\"")),
                Datapath::Kernel if i >= MAX_GRE_TUNNELS as usize => Some(DatapathState::tun(
                    format!("the kernel path carries at most {MAX_GRE_TUNNELS} tunnels"),
                )),
                Datapath::Kernel => kernel_path_excluded(c.config).map(DatapathState::tun),
            })
            .collect();
        let mut kernel = None;
        if states.iter().any(Option::is_none) {
            match GrePath::load(&LoadOptions::new(site)) {
                Ok(path) => {
                    let mut k = KernelTunnels {
                        path,
                        entries: vec![None; candidates.len()],
                    };
                    for (i, c) in candidates.iter().enumerate() {
                        if states[i].is_none() {
                            states[i] = Some(match k.add(netlink, i, c).await {
                                Ok(()) => DatapathState {
                                    kernel: true,
                                    reason: "configured: datapath = \"kernel\"".into(),
                                },
                                Err(e) => {
                                    DatapathState::tun(format!("kernel path unavailable: {e}"))
                                }
                            });
                        }
                    }
                    if k.entries.iter().any(Option::is_some) {
                        kernel = Some(k);
                    } else {
                        k.unload();
                    }
                }
                Err(e) => {
                    for s in states.iter_mut().filter(|s| s.is_none()) {
                        *s = Some(DatapathState::tun(format!("kernel path unavailable: {e}")));
                    }
                }
            }
        }
        let states: Vec<DatapathState> = states
            .into_iter()
            .map(|s| s.unwrap_or_else(|| DatapathState::tun("undecided")))
            .collect();
        for (c, s) in candidates.iter().zip(&states) {
            if s.kernel || c.datapath == Datapath::Tun {
                tracing::info!(tunnel = %c.config.name, datapath = %s.datapath(), reason = %s.reason, "GRE data path");
            } else {
                tracing::warn!(tunnel = %c.config.name, datapath = %s.datapath(), reason = %s.reason, "GRE data path");
            }
        }
        (kernel, states)
    }

    /// Attaches the programs for tunnel `i` and installs its entry.
    async fn add(
        &mut self,
        netlink: &rtnetlink::Handle,
        i: usize,
        c: &Candidate<'_>,
    ) -> Result<(), String> {
        let underlay = underlay_links(netlink, c.config.local, c.config.remote).await?;
        let entry = GreTunnelEntry {
            slot: u32::try_from(i).map_err(|e| e.to_string())?,
            tun_ifindex: c.tun_ifindex,
            l2: false,
            local: c.config.local,
            remote: c.config.remote,
            key: c.config.key,
            mtu: c.config.mtu,
            udp: c.config.underlay == Underlay::Udp,
            egress: underlay.egress,
        };
        for iface in underlay.ingress {
            self.path
                .attach(&iface, GreProgram::Decap)
                .map_err(|e| format!("{iface}: {e}"))?;
        }
        self.path
            .attach(&c.config.name, GreProgram::Encap)
            .map_err(|e| format!("{}: {e}", c.config.name))?;
        self.path.insert(&entry).map_err(|e| e.to_string())?;
        self.entries[i] = Some(entry);
        Ok(())
    }

    /// What the programs did for tunnel `i`; `None` when it is not on this path.
    pub(super) fn stats(&self, i: usize) -> Option<KernelCounters> {
        let entry = self.entries.get(i).copied().flatten()?;
        match self.path.stats(entry.slot) {
            Ok(s) => Some(s.into()),
            Err(e) => {
                tracing::debug!(error = %e, "reading the GRE kernel path's counters");
                Some(KernelCounters::default())
            }
        }
    }

    /// A live MTU change of tunnel `i`: larger packets take the TUN path from now on.
    pub(super) fn set_mtu(&mut self, i: usize, mtu: u16) {
        let Some(Some(entry)) = self.entries.get_mut(i) else {
            return;
        };
        entry.mtu = mtu;
        let entry = *entry;
        if let Err(e) = self.path.insert(&entry) {
            tracing::warn!(error = %e, "updating the GRE kernel path's MTU");
        }
    }

    /// Detaches the programs and removes maps, pins and qdiscs.
    pub(super) fn unload(self) {
        if let Err(e) = self.path.unload() {
            tracing::warn!(error = %e, "unloading the GRE kernel path");
        }
    }
}
