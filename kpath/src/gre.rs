//! The GRE kernel data path (`bpf/gre.c`, shipped compiled as `bpf/gre.o`) and its loader.
//!
//! `gre_encap` runs at the egress of each tunnel's TUN device and `gre_decap` at the ingress of
//! each underlay interface; both carry only a tunnel's plain IPv4 and IPv6 traffic and leave
//! everything else (SYNs, keepalives, anything unusual) to the TUN path, which keeps every check.
//! gre's driver installs one [`GreTunnelEntry`] per tunnel it runs on this path and adds the
//! [`GreTunnelStats`] of its slot to the core's counters.
//!
//! Invariants:
//! - An entry is in the maps exactly while its tunnel runs on this path; a tunnel's slot
//!   (below [`MAX_GRE_TUNNELS`]) names its counters, all zero after [`GrePath::load`].
//! - The maps are pinned under `<bpffs>/vipgate/<site>/`; a [`GrePath::load`] that finds them
//!   pinned (a daemon killed without unloading) empties them, since no tunnel runs yet.
//! - Every link is recorded with whether its `clsact` qdisc was added here, so
//!   [`GrePath::unload`] removes exactly the links, qdiscs and pins this loader made.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::tc::{SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::gre_pod::{RawGreRx, RawGreRxKey, RawGreStats, RawGreTx};
use crate::loader::{attach_clsact, classifier, remove_clsact, run_classifier, valid_site};
use crate::{AttachMode, KpathError, LoadOptions, TestRun, ensure_bpffs};

/// The compiled program (`bpf/gre.o`, rebuilt by `bpf/build.sh`).
pub static GRE_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/gre.o");

/// Tunnels one [`GrePath`] can carry (the maps' size; slots are `0..MAX_GRE_TUNNELS`).
pub const MAX_GRE_TUNNELS: u32 = 64;

const TX: &str = "gre_tx_tunnels";
const RX: &str = "gre_rx_tunnels";
const STATS: &str = "gre_stats";
const COUNTERS: &str = "gre_counters";
const MAPS: [&str; 4] = [TX, RX, STATS, COUNTERS];

/// The two programs of the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GreProgram {
    /// Encapsulation, at a TUN device's egress.
    Encap,
    /// Decapsulation, at an underlay interface's ingress.
    Decap,
}

impl GreProgram {
    /// The program name in the object.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            GreProgram::Encap => "gre_encap",
            GreProgram::Decap => "gre_decap",
        }
    }

    fn hook(self) -> TcAttachType {
        match self {
            GreProgram::Encap => TcAttachType::Egress,
            GreProgram::Decap => TcAttachType::Ingress,
        }
    }
}

/// One tunnel as the programs see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreTunnelEntry {
    /// Its counters' index, below [`MAX_GRE_TUNNELS`].
    pub slot: u32,
    /// The TUN device packets are routed into (encapsulated at its egress) and decapsulated
    /// packets are delivered to.
    pub tun_ifindex: u32,
    /// Whether that device has an Ethernet header (a TUN has none; the differential test
    /// encapsulates on a veth).
    pub l2: bool,
    /// Outer source.
    pub local: Ipv4Addr,
    /// Outer destination; the only source decapsulated.
    pub remote: Ipv4Addr,
    /// RFC 2890 key, sent and required.
    pub key: Option<u32>,
    /// Tunnel MTU: larger inner packets take the TUN path.
    pub mtu: u16,
    /// GRE-in-UDP (RFC 8086, port 4754) rather than raw GRE.
    pub udp: bool,
    /// The interface the route to the remote left by, and its MTU, when known. The program
    /// sends the host's own packets out of it where the kernel refuses a FIB lookup because
    /// the TUN does not forward (a host with forwarding off); without it they take the TUN
    /// path there.
    pub egress: Option<GreEgress>,
}

/// An underlay interface, by index, and its MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreEgress {
    /// Interface index.
    pub ifindex: u32,
    /// Its MTU: larger outer packets take the TUN path.
    pub mtu: u32,
}

impl GreTunnelEntry {
    fn tx(&self) -> RawGreTx {
        RawGreTx {
            local: self.local.octets(),
            remote: self.remote.octets(),
            key: self.key.unwrap_or(0).to_be_bytes(),
            has_key: u16::from(self.key.is_some()),
            l2: u16::from(self.l2),
            mtu: u32::from(self.mtu),
            slot: self.slot,
            egress_ifindex: self.egress.map_or(0, |e| e.ifindex),
            egress_mtu: self.egress.map_or(0, |e| e.mtu),
            udp: u32::from(self.udp),
        }
    }

    fn rx_key(&self) -> RawGreRxKey {
        RawGreRxKey {
            remote: self.remote.octets(),
            local: self.local.octets(),
            key: self.key.unwrap_or(0).to_be_bytes(),
            has_key: u16::from(self.key.is_some()),
            udp: u16::from(self.udp),
        }
    }
}

/// What the programs did for one tunnel (summed over CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GreTunnelStats {
    /// Inner packets encapsulated (a GSO super-packet counts the segments it becomes).
    pub tx_packets: u64,
    /// Inner bytes encapsulated (each segment's headers included, as the TUN path counts).
    pub tx_bytes: u64,
    /// Inner packets decapsulated and delivered to the TUN device.
    pub rx_packets: u64,
    /// Inner bytes decapsulated.
    pub rx_bytes: u64,
    /// Packets routed into the tunnel that were left to the TUN path.
    pub tx_passed: u64,
    /// The tunnel's GRE packets that were left to the TUN path.
    pub rx_passed: u64,
}

/// Why packets were left to the TUN path, over all tunnels (summed over CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrePassCounters {
    /// At a TUN egress with no entry (a tunnel being removed).
    pub tx_no_tunnel: u64,
    /// Packets neither IPv4 nor IPv6 routed into a tunnel.
    pub tx_not_ip: u64,
    /// IP options, IPv6 extension headers, fragments, short or inconsistent headers, an
    /// already encapsulated skb.
    pub tx_unusual: u64,
    /// TCP SYNs (the core clamps their MSS).
    pub tx_tcp_syn: u64,
    /// Over the tunnel MTU, or not fitting the underlay's.
    pub tx_too_big: u64,
    /// No unicast route to the remote.
    pub tx_no_route: u64,
    /// A helper refused.
    pub tx_failed: u64,
    /// GRE matching no tunnel's (remote, local, key): the core counts the drop.
    pub rx_no_tunnel: u64,
    /// GRE checksum, sequence, routing, version or reserved bits.
    pub rx_gre_flags: u64,
    /// Keepalive replies and protocol types other than IPv4 and IPv6.
    pub rx_not_ip: u64,
    /// Inner IP options, IPv6 extension headers, fragments, lengths that do not add up.
    pub rx_unusual: u64,
    /// Inner TCP SYNs (the core clamps their MSS).
    pub rx_tcp_syn: u64,
    /// Inner packets for the remote: keepalive probes to reflect.
    pub rx_probe: u64,
    /// A helper refused.
    pub rx_failed: u64,
    /// GRE-in-UDP with a UDP checksum the receiving device did not verify (the TUN path's
    /// kernel checks it).
    pub rx_udp_checksum: u64,
}

#[derive(Debug)]
struct Attachment {
    iface: String,
    program: GreProgram,
    link: SchedClassifierLinkId,
    /// The `clsact` qdisc this loader added (removed at unload).
    qdisc_added: bool,
    /// Attached with a tcx link (else through `clsact`).
    tcx: bool,
}

/// The loaded GRE programs and their maps for one site.
pub struct GrePath {
    ebpf: Ebpf,
    tx: HashMap<MapData, u32, RawGreTx>,
    rx: HashMap<MapData, RawGreRxKey, RawGreRx>,
    stats: PerCpuArray<MapData, RawGreStats>,
    counters: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
    attach: AttachMode,
    attachments: Vec<Attachment>,
}

impl std::fmt::Debug for GrePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrePath")
            .field("pin_dir", &self.pin_dir)
            .field("attach", &self.attach)
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> KpathError {
    move |source| KpathError::Map { map, source }
}

fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

impl GrePath {
    /// Loads both programs (the verifier checks them here) and creates the pinned maps of
    /// `opts.site` (emptying them if a previous run left them). Nothing is attached yet.
    ///
    /// # Errors
    /// A bad site name, no bpffs, or the kernel refusing the object.
    pub fn load(opts: &LoadOptions) -> Result<Self, KpathError> {
        if !valid_site(&opts.site) {
            return Err(KpathError::SiteName(opts.site.clone()));
        }
        ensure_bpffs(&opts.bpffs)?;
        let pin_dir = opts.bpffs.join("vipgate").join(&opts.site);
        std::fs::create_dir_all(&pin_dir).map_err(|source| KpathError::Pins {
            path: pin_dir.clone(),
            source,
        })?;
        let pins: Vec<PathBuf> = MAPS.iter().map(|m| pin_dir.join(m)).collect();
        let mut loader = EbpfLoader::new();
        for (name, pin) in MAPS.iter().zip(&pins) {
            loader.map_pin_path(name, pin.as_path());
        }
        let mut ebpf = loader.load(GRE_OBJECT)?;
        for program in [GreProgram::Encap, GreProgram::Decap] {
            let name = program.name();
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| KpathError::Program {
                    program: name,
                    source,
                })?;
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(KpathError::Missing(name));
        let tx = HashMap::try_from(take(TX)?).map_err(map_err(TX))?;
        let rx = HashMap::try_from(take(RX)?).map_err(map_err(RX))?;
        let stats = PerCpuArray::try_from(take(STATS)?).map_err(map_err(STATS))?;
        let counters = PerCpuArray::try_from(take(COUNTERS)?).map_err(map_err(COUNTERS))?;
        let mut path = GrePath {
            ebpf,
            tx,
            rx,
            stats,
            counters,
            pin_dir,
            attach: opts.attach,
            attachments: Vec::new(),
        };
        path.clear()?;
        Ok(path)
    }

    /// Empties the tunnel maps and zeroes every counter.
    fn clear(&mut self) -> Result<(), KpathError> {
        let tx: Vec<u32> = self.tx.keys().filter_map(Result::ok).collect();
        for k in tx {
            self.tx.remove(&k).map_err(map_err(TX))?;
        }
        let rx: Vec<RawGreRxKey> = self.rx.keys().filter_map(Result::ok).collect();
        for k in rx {
            self.rx.remove(&k).map_err(map_err(RX))?;
        }
        for slot in 0..MAX_GRE_TUNNELS {
            self.stats.set(slot, zeros()?, 0).map_err(map_err(STATS))?;
        }
        let reasons = self.counters.len();
        for i in 0..reasons {
            self.counters
                .set(i, zeros()?, 0)
                .map_err(map_err(COUNTERS))?;
        }
        Ok(())
    }

    /// The directory holding this site's pins.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches `program` to its hook of `iface` (egress for [`GreProgram::Encap`], ingress
    /// for [`GreProgram::Decap`]) in the current network namespace, and says how. Attaching
    /// the same program to the same interface twice is a no-op.
    ///
    /// # Errors
    /// No such interface, or the kernel refusing both attach methods allowed.
    pub fn attach(&mut self, iface: &str, program: GreProgram) -> Result<AttachMode, KpathError> {
        if let Some(a) = self
            .attachments
            .iter()
            .find(|a| a.iface == iface && a.program == program)
        {
            return Ok(if a.tcx {
                AttachMode::Tcx
            } else {
                AttachMode::Clsact
            });
        }
        let name = program.name();
        let hook = program.hook();
        // A clsact qdisc this loader added already serves the other hook there.
        let ours = self
            .attachments
            .iter()
            .any(|a| a.iface == iface && a.qdisc_added);
        let prog = classifier(&mut self.ebpf, name)?;
        let tcx = || TcAttachOptions::TcxOrder(LinkOrder::default());
        let (link, mode, qdisc_added) = match self.attach {
            AttachMode::Tcx => (
                prog.attach_with_options(iface, hook, tcx())
                    .map_err(|source| KpathError::Program {
                        program: name,
                        source,
                    })?,
                AttachMode::Tcx,
                false,
            ),
            AttachMode::Auto => match prog.attach_with_options(iface, hook, tcx()) {
                Ok(link) => (link, AttachMode::Tcx, false),
                Err(e) => {
                    tracing::info!(iface, error = %e, "tcx attach refused; using clsact");
                    let (link, added) = attach_clsact(prog, iface, hook, name, !ours)?;
                    (link, AttachMode::Clsact, added)
                }
            },
            AttachMode::Clsact => {
                let (link, added) = attach_clsact(prog, iface, hook, name, !ours)?;
                (link, AttachMode::Clsact, added)
            }
        };
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            program,
            link,
            qdisc_added,
            tcx: mode == AttachMode::Tcx,
        });
        Ok(mode)
    }

    /// Puts `tunnel` on the kernel path, or updates it (an entry of the same TUN, or of the
    /// same remote, local and key, is replaced). Its slot's counters keep counting: they
    /// start from zero at [`GrePath::load`].
    ///
    /// # Errors
    /// A slot out of range, or the kernel refusing the update (the maps are full).
    pub fn insert(&mut self, tunnel: &GreTunnelEntry) -> Result<(), KpathError> {
        if tunnel.slot >= MAX_GRE_TUNNELS {
            return Err(KpathError::GreSlot(tunnel.slot));
        }
        self.tx
            .insert(tunnel.tun_ifindex, tunnel.tx(), 0)
            .map_err(map_err(TX))?;
        let rx = RawGreRx {
            tun_ifindex: tunnel.tun_ifindex,
            slot: tunnel.slot,
        };
        if let Err(e) = self.rx.insert(tunnel.rx_key(), rx, 0) {
            let _half_installed = self.tx.remove(&tunnel.tun_ifindex);
            return Err(KpathError::Map { map: RX, source: e });
        }
        Ok(())
    }

    /// Takes `tunnel` off the kernel path: its packets take the TUN path from now on.
    ///
    /// # Errors
    /// The kernel refusing a delete for another reason than a missing entry.
    pub fn remove(&mut self, tunnel: &GreTunnelEntry) -> Result<(), KpathError> {
        if let Err(e) = self.tx.remove(&tunnel.tun_ifindex)
            && !is_not_found(&e)
        {
            return Err(KpathError::Map { map: TX, source: e });
        }
        if let Err(e) = self.rx.remove(&tunnel.rx_key())
            && !is_not_found(&e)
        {
            return Err(KpathError::Map { map: RX, source: e });
        }
        Ok(())
    }

    /// What the programs did for the tunnel in `slot` since [`GrePath::load`].
    ///
    /// # Errors
    /// The kernel refusing the lookup (a slot out of range).
    pub fn stats(&self, slot: u32) -> Result<GreTunnelStats, KpathError> {
        let per_cpu = self.stats.get(&slot, 0).map_err(map_err(STATS))?;
        Ok(per_cpu
            .iter()
            .fold(GreTunnelStats::default(), |acc, s| GreTunnelStats {
                tx_packets: acc.tx_packets.wrapping_add(s.tx_packets),
                tx_bytes: acc.tx_bytes.wrapping_add(s.tx_bytes),
                rx_packets: acc.rx_packets.wrapping_add(s.rx_packets),
                rx_bytes: acc.rx_bytes.wrapping_add(s.rx_bytes),
                tx_passed: acc.tx_passed.wrapping_add(s.tx_passed),
                rx_passed: acc.rx_passed.wrapping_add(s.rx_passed),
            }))
    }

    /// Why packets were left to the TUN path, over all tunnels.
    ///
    /// # Errors
    /// The kernel refusing a lookup.
    pub fn pass_counters(&self) -> Result<GrePassCounters, KpathError> {
        let get = |i: u32| -> Result<u64, KpathError> {
            let per_cpu = self.counters.get(&i, 0).map_err(map_err(COUNTERS))?;
            Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(GrePassCounters {
            tx_no_tunnel: get(0)?,
            tx_not_ip: get(1)?,
            tx_unusual: get(2)?,
            tx_tcp_syn: get(3)?,
            tx_too_big: get(4)?,
            tx_no_route: get(5)?,
            tx_failed: get(6)?,
            rx_no_tunnel: get(7)?,
            rx_gre_flags: get(8)?,
            rx_not_ip: get(9)?,
            rx_unusual: get(10)?,
            rx_tcp_syn: get(11)?,
            rx_probe: get(12)?,
            rx_failed: get(13)?,
            rx_udp_checksum: get(14)?,
        })
    }

    /// Runs `program` once over `frame` (an Ethernet frame) as if it were on interface
    /// `ifindex` (`BPF_PROG_TEST_RUN`), with the live maps.
    ///
    /// # Errors
    /// The kernel refusing the run.
    pub fn test_run(
        &self,
        program: GreProgram,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<TestRun, KpathError> {
        run_classifier(&self.ebpf, program.name(), frame, ifindex)
    }

    /// Detaches the programs, removes the pins (and their directory) and every `clsact`
    /// qdisc this loader added: nothing of the site remains in the kernel.
    ///
    /// # Errors
    /// A pin or qdisc that could not be removed (the rest is still removed).
    pub fn unload(mut self) -> Result<(), KpathError> {
        let mut first_error = self.detach_all();
        for name in MAPS {
            let path = self.pin_dir.join(name);
            if let Err(source) = std::fs::remove_file(&path)
                && source.kind() != std::io::ErrorKind::NotFound
            {
                first_error.get_or_insert(KpathError::Pins { path, source });
            }
        }
        if let Err(source) = std::fs::remove_dir(&self.pin_dir) {
            first_error.get_or_insert(KpathError::Pins {
                path: self.pin_dir.clone(),
                source,
            });
        }
        // The shared parent goes when the last site leaves (another site's pins keep it).
        if let Some(parent) = self.pin_dir.parent() {
            let _still_used = std::fs::remove_dir(parent);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Detaches every link and removes the qdiscs added; the first error, if any.
    fn detach_all(&mut self) -> Option<KpathError> {
        let mut first_error = None;
        // Newest first: the attachment that added a qdisc goes after the filters it carries.
        for a in std::mem::take(&mut self.attachments).into_iter().rev() {
            let name = a.program.name();
            // A TUN device deleted meanwhile took its links with it.
            let gone = a.iface_gone();
            let detached = classifier(&mut self.ebpf, name).and_then(|prog| {
                prog.detach(a.link).map_err(|source| KpathError::Program {
                    program: name,
                    source,
                })
            });
            if let Err(e) = detached
                && !gone
            {
                first_error.get_or_insert(e);
            }
            if a.qdisc_added
                && !gone
                && let Err(e) = remove_clsact(&a.iface)
            {
                first_error.get_or_insert(e);
            }
        }
        first_error
    }
}

impl Attachment {
    fn iface_gone(&self) -> bool {
        nix::net::if_::if_nametoindex(self.iface.as_str()).is_err()
    }
}

impl Drop for GrePath {
    fn drop(&mut self) {
        // Links are closed with the loader anyway; the qdiscs it added must go too.
        if let Some(e) = self.detach_all() {
            tracing::warn!(error = %e, "detaching the GRE kernel path");
        }
    }
}

/// All-zero counters, one per possible CPU.
fn zeros<T: aya::Pod + Default>() -> Result<PerCpuValues<T>, KpathError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, source)| KpathError::PossibleCpus(source))?;
    PerCpuValues::try_from(vec![T::default(); cpus]).map_err(KpathError::PossibleCpus)
}
