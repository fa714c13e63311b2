//! Loading, attaching, feeding and unloading the program.
//!
//! Invariants: every link this loader creates or adopts is recorded in [`KernelPath`] with
//! whether it added the interface's `clsact` qdisc, so [`KernelPath::unload`] undoes exactly
//! what was done; the maps live at `<bpffs>/vipgate/<site>/{kpath_flows,kpath_counters}` and
//! the tcx links at `<bpffs>/vipgate/<site>/link_<program>_<ifindex>`, and nowhere else.
//!
//! Restarts: a tcx link is pinned as soon as it is made, so it outlives the process that made
//! it (an `exec`, a crash, [`KernelPath::leave`]) and the program keeps running on the
//! interface meanwhile, with the pinned maps. The next [`KernelPath::load`] of the site finds
//! the pin when it attaches the same program to the same interface and swaps its freshly
//! loaded program into that link (`BPF_LINK_UPDATE`, atomic: no packet misses a program);
//! [`KernelPath::detach_unclaimed`] then removes the links of the previous run that this one
//! did not claim (an interface no longer configured). A link made through the `clsact`
//! fallback (kernels before 6.6) is a netlink filter with no pin: it is not adopted.

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{
    HashMap, IterableMap as _, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf,
};
use aya::programs::TestRunOptions;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, qdisc_add_clsact};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, TcError, TestRun as _};
use aya::{Ebpf, EbpfLoader};

use crate::pod::{
    OP_MAX_SLOTS, RawFlowKey, RawFlowValue, RawHandshake, RawOpCounts, RawOpEndpoint,
    RawOpSchedule, RawOpened, RawPublished, RawPublishedKey,
};
use crate::{
    Counters, Direction, FlowKey, FlowReport, KernelPublished, KpathError, MAX_INSIDE_NETWORKS,
    MAX_ONE_PACKET_SERVICES, MAX_PUBLISHED_LISTENERS, OBJECT, OnePacketCounts, OpenedFlow,
    OpenedHandshake, OpenedKind, Rewrite, op_endpoint,
};

const FLOWS: &str = "kpath_flows";
const COUNTERS: &str = "kpath_counters";
const OP_SCHEDULES: &str = "kpath_op_schedules";
const OP_BACKENDS: &str = "kpath_op_backends";
const OP_COUNTS: &str = "kpath_op_counts";
const PUBLISHED: &str = "kpath_published";
const INSIDE_NETS: &str = "kpath_inside_nets";
const OPENED: &str = "kpath_opened";
const HANDSHAKES: &str = "kpath_handshakes";
/// `BPF_FS_MAGIC` (statfs f_type of a bpffs).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How programs are attached to an interface's ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links where the kernel has them (6.6+), else `clsact` + cls_bpf.
    Auto,
    /// tcx links only.
    Tcx,
    /// A `clsact` qdisc (added if absent, removed at unload if added) with a cls_bpf filter.
    Clsact,
}

/// Where and how to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The site name: the maps are pinned under `<bpffs>/vipgate/<site>/`.
    pub site: String,
    /// The bpffs mount point; mounted there if it is not a bpffs yet. Default `/sys/fs/bpf`.
    pub bpffs: PathBuf,
    /// How to attach.
    pub attach: AttachMode,
    /// Flow map size in entries (one per direction of a flow, one for a direct-routing flow).
    /// Default 262144. A map already pinned keeps the size it was created with: a new size
    /// applies after a stop that removes the pins, never by dropping a running site's flows.
    pub max_flows: u32,
}

impl LoadOptions {
    /// Defaults for a site.
    #[must_use]
    pub fn new(site: &str) -> Self {
        LoadOptions {
            site: site.to_owned(),
            bpffs: PathBuf::from("/sys/fs/bpf"),
            attach: AttachMode::Auto,
            max_flows: 262_144,
        }
    }
}

/// The program at `nat0`'s ingress that delivers direct-routing packets the core wrote back.
const DELIVER: &str = "kpath_deliver";

/// Prefix of a pinned tcx link's name (`link_<program>_<ifindex>`).
const LINK_PIN_PREFIX: &str = "link_";

#[derive(Debug)]
struct Attachment {
    iface: String,
    program: &'static str,
    link: AttachedLink,
    /// The `clsact` qdisc this loader added (removed at unload).
    qdisc_added: bool,
}

/// How a program is attached.
#[derive(Debug)]
enum AttachedLink {
    /// A tcx link pinned at `pin`: it stays attached while the pin exists, whatever happens
    /// to this process; the descriptor lets this process detach it.
    Pinned { link: FdLink, pin: PathBuf },
    /// A `clsact` filter, owned by the program in [`Ebpf`].
    Netlink(SchedClassifierLinkId),
}

/// One [`KernelPath::test_run`]: the program's return code and the frame it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRun {
    /// The TC action (`TC_ACT_OK` = 0: slow path; `TC_ACT_REDIRECT` = 7: fast path).
    pub action: u32,
    /// The frame after the program.
    pub frame: Vec<u8>,
}

impl TestRun {
    /// `TC_ACT_OK`: the packet continues to the slow path.
    pub const PASS: u32 = 0;
    /// `TC_ACT_REDIRECT`: rewritten and redirected.
    pub const REDIRECT: u32 = 7;
}

/// The loaded programs and their maps for one site.
pub struct KernelPath {
    ebpf: Ebpf,
    flows: HashMap<MapData, RawFlowKey, RawFlowValue>,
    /// `flows`' descriptor, for the batch reads aya does not wrap.
    flows_fd: std::os::fd::OwnedFd,
    counters: PerCpuArray<MapData, u64>,
    op_schedules: HashMap<MapData, RawOpEndpoint, RawOpSchedule>,
    op_backends: HashMap<MapData, RawOpEndpoint, RawOpEndpoint>,
    op_counts: PerCpuHashMap<MapData, RawOpEndpoint, RawOpCounts>,
    published: HashMap<MapData, RawPublishedKey, RawPublished>,
    /// What `published` holds (written only through [`KernelPath::set_published`]), so that
    /// an unchanged publication costs no system call.
    published_now: std::collections::HashMap<SocketAddrV4, KernelPublished>,
    inside_nets: LpmTrie<MapData, u32, u8>,
    /// What `inside_nets` holds, likewise.
    inside_nets_now: Vec<(Ipv4Addr, u8)>,
    opened: RingBuf<MapData>,
    handshakes: RingBuf<MapData>,
    pin_dir: PathBuf,
    attach: AttachMode,
    attachments: Vec<Attachment>,
    adopted: bool,
    /// tcx links of a previous run adopted by this one.
    adopted_links: usize,
}

impl std::fmt::Debug for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPath")
            .field("pin_dir", &self.pin_dir)
            .field("attach", &self.attach)
            .field("attachments", &self.attachments)
            .field("adopted", &self.adopted)
            .finish_non_exhaustive()
    }
}

pub(crate) fn valid_site(site: &str) -> bool {
    !site.is_empty()
        && site.len() <= 64
        && site != "."
        && site != ".."
        && site
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Mounts a bpffs at `mount_point` unless one is there (as systemd does at /sys/fs/bpf).
/// Needs CAP_SYS_ADMIN when it mounts: a daemon that drops privileges calls this first.
///
/// # Errors
/// The directory cannot be created or inspected, or the mount is refused.
pub fn ensure_bpffs(mount_point: &Path) -> Result<(), KpathError> {
    let pins = |source| KpathError::Pins {
        path: mount_point.to_owned(),
        source,
    };
    std::fs::create_dir_all(mount_point).map_err(pins)?;
    let fs = nix::sys::statfs::statfs(mount_point).map_err(|e| pins(e.into()))?;
    #[allow(clippy::useless_conversion)] // f_type's integer type differs between libcs
    if i64::from(fs.filesystem_type().0) == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| pins(e.into()))
}

pub(crate) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, KpathError> {
    ebpf.program_mut(name)
        .ok_or(KpathError::Missing(name))?
        .try_into()
        .map_err(|source| KpathError::Program {
            program: name,
            source,
        })
}

fn published_key(public: SocketAddrV4) -> RawPublishedKey {
    RawPublishedKey {
        addr: public.ip().octets(),
        port: public.port().to_be_bytes(),
        pad: 0,
    }
}

impl KernelPath {
    /// Loads both programs (the verifier checks them here) and creates or adopts the pinned
    /// maps of `opts.site`. Nothing is attached yet.
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
        let adopted = pin_dir.join(FLOWS).exists();
        let flows_pin = pin_dir.join(FLOWS);
        let counters_pin = pin_dir.join(COUNTERS);
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(FLOWS, flows_pin.as_path())
            .map_pin_path(COUNTERS, counters_pin.as_path())
            .map_max_entries(FLOWS, opts.max_flows)
            .load(OBJECT)?;
        for program in [
            Direction::Outbound.program(),
            Direction::Inbound.program(),
            DELIVER,
        ] {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|source| KpathError::Program { program, source })?;
        }
        let map_err = |map| move |source| KpathError::Map { map, source };
        let flows_map = ebpf.take_map(FLOWS).ok_or(KpathError::Missing(FLOWS))?;
        let flows_fd = match &flows_map {
            aya::maps::Map::LruHashMap(data) => Some(
                data.fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| KpathError::Batch { map: FLOWS, source })?,
            ),
            _ => None,
        };
        let flows = HashMap::try_from(flows_map).map_err(map_err(FLOWS))?;
        // The object declares an LRU hash; anything else failed the conversion above.
        let flows_fd = flows_fd.ok_or(KpathError::Missing(FLOWS))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(COUNTERS)
                .ok_or(KpathError::Missing(COUNTERS))?,
        )
        .map_err(map_err(COUNTERS))?;
        // The one-packet maps are not pinned: the core reinstalls every schedule at its first
        // sync, and a program left running in a pinned link keeps the maps it was loaded with.
        let op_schedules = HashMap::try_from(
            ebpf.take_map(OP_SCHEDULES)
                .ok_or(KpathError::Missing(OP_SCHEDULES))?,
        )
        .map_err(map_err(OP_SCHEDULES))?;
        let op_backends = HashMap::try_from(
            ebpf.take_map(OP_BACKENDS)
                .ok_or(KpathError::Missing(OP_BACKENDS))?,
        )
        .map_err(map_err(OP_BACKENDS))?;
        let op_counts = PerCpuHashMap::try_from(
            ebpf.take_map(OP_COUNTS)
                .ok_or(KpathError::Missing(OP_COUNTS))?,
        )
        .map_err(map_err(OP_COUNTS))?;
        // Nor are the publication's maps and the ring: a new run starts with nothing
        // published, and a program left in a pinned link keeps the ones it was loaded with
        // until the link takes this run's program.
        let published = HashMap::try_from(
            ebpf.take_map(PUBLISHED)
                .ok_or(KpathError::Missing(PUBLISHED))?,
        )
        .map_err(map_err(PUBLISHED))?;
        let inside_nets = LpmTrie::try_from(
            ebpf.take_map(INSIDE_NETS)
                .ok_or(KpathError::Missing(INSIDE_NETS))?,
        )
        .map_err(map_err(INSIDE_NETS))?;
        let opened = RingBuf::try_from(ebpf.take_map(OPENED).ok_or(KpathError::Missing(OPENED))?)
            .map_err(map_err(OPENED))?;
        let handshakes = RingBuf::try_from(
            ebpf.take_map(HANDSHAKES)
                .ok_or(KpathError::Missing(HANDSHAKES))?,
        )
        .map_err(map_err(HANDSHAKES))?;
        Ok(KernelPath {
            ebpf,
            flows,
            flows_fd,
            counters,
            op_schedules,
            op_backends,
            op_counts,
            published,
            published_now: std::collections::HashMap::new(),
            inside_nets,
            inside_nets_now: Vec::new(),
            opened,
            handshakes,
            pin_dir,
            attach: opts.attach,
            attachments: Vec::new(),
            adopted,
            adopted_links: 0,
        })
    }

    /// How many entries the flow map holds: the size it was created with, which for an
    /// adopted map is the previous run's.
    ///
    /// # Errors
    /// The kernel refusing to describe the map.
    pub fn flow_capacity(&self) -> Result<u32, KpathError> {
        self.flows
            .map()
            .info()
            .map(|info| info.max_entries())
            .map_err(|source| KpathError::Map { map: FLOWS, source })
    }

    /// Whether the maps were already pinned (a restarted daemon adopting its flows).
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// How many programs went into the tcx links a previous run left pinned (instead of new
    /// links): the interfaces where forwarding never stopped.
    #[must_use]
    pub fn adopted_links(&self) -> usize {
        self.adopted_links
    }

    /// The directory holding this site's pins.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the program for `direction` to the ingress of `iface` (in the current network
    /// namespace) and says how.
    ///
    /// # Errors
    /// No such interface, or the kernel refusing both attach methods allowed.
    pub fn attach(&mut self, iface: &str, direction: Direction) -> Result<AttachMode, KpathError> {
        self.attach_program(iface, direction.program())
    }

    /// Attaches the delivery program to the ingress of `iface`, the gateway's TUN (`nat0`):
    /// the packets of direct-routing flows that the core wrote back go to their real server
    /// from there; every other packet passes.
    ///
    /// # Errors
    /// As [`KernelPath::attach`].
    pub fn attach_delivery(&mut self, iface: &str) -> Result<AttachMode, KpathError> {
        self.attach_program(iface, DELIVER)
    }

    fn attach_program(
        &mut self,
        iface: &str,
        program: &'static str,
    ) -> Result<AttachMode, KpathError> {
        // A clsact qdisc this loader added already serves the second program there (adding
        // it again would replace it).
        let ours = self
            .attachments
            .iter()
            .any(|a| a.iface == iface && a.qdisc_added);
        let (link, mode, qdisc_added) = match self.attach {
            AttachMode::Tcx => (self.attach_tcx(iface, program)?, AttachMode::Tcx, false),
            AttachMode::Auto => match self.attach_tcx(iface, program) {
                Ok(link) => (link, AttachMode::Tcx, false),
                Err(e) => {
                    tracing::info!(iface, error = %e, "tcx attach refused; using clsact");
                    let prog = classifier(&mut self.ebpf, program)?;
                    let (link, added) =
                        attach_clsact(prog, iface, TcAttachType::Ingress, program, !ours)?;
                    (AttachedLink::Netlink(link), AttachMode::Clsact, added)
                }
            },
            AttachMode::Clsact => {
                let prog = classifier(&mut self.ebpf, program)?;
                let (link, added) =
                    attach_clsact(prog, iface, TcAttachType::Ingress, program, !ours)?;
                (AttachedLink::Netlink(link), AttachMode::Clsact, added)
            }
        };
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            program,
            link,
            qdisc_added,
        });
        Ok(mode)
    }

    /// Where the tcx link of `program` on `iface` is pinned (by ifindex: an interface name
    /// may hold a dot, which bpffs refuses in a name).
    fn link_pin(&self, iface: &str, program: &'static str) -> Result<PathBuf, KpathError> {
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| KpathError::Program {
            program,
            source: aya::programs::ProgramError::TcError(TcError::IoError(e.into())),
        })?;
        Ok(self
            .pin_dir
            .join(format!("{LINK_PIN_PREFIX}{program}_{ifindex}")))
    }

    /// Attaches `program` to `iface`'s ingress with a pinned tcx link: the previous run's
    /// link when one is pinned there (the new program replaces the old one in it, atomically),
    /// else a new link, pinned at once.
    fn attach_tcx(
        &mut self,
        iface: &str,
        program: &'static str,
    ) -> Result<AttachedLink, KpathError> {
        let pin = self.link_pin(iface, program)?;
        let prog = classifier(&mut self.ebpf, program)?;
        let link_err = |reason: String| KpathError::LinkPin {
            path: pin.clone(),
            reason,
        };
        if pin.exists() {
            match adopt_link(prog, &pin) {
                Ok(link) => {
                    self.adopted_links += 1;
                    return Ok(AttachedLink::Pinned { link, pin });
                }
                Err(reason) => {
                    // A link whose interface went away (or not a link at all): replaced.
                    tracing::info!(pin = %pin.display(), %reason, "not adopting a pinned link");
                    std::fs::remove_file(&pin).map_err(|e| link_err(e.to_string()))?;
                }
            }
        }
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| KpathError::Program { program, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| KpathError::Program { program, source })?;
        let link = FdLink::try_from(link).map_err(|e| link_err(e.to_string()))?;
        let pinned = link.pin(&pin).map_err(|e| link_err(e.to_string()))?;
        Ok(AttachedLink::Pinned {
            link: pinned.into(),
            pin,
        })
    }

    /// Detaches the tcx links a previous run pinned that this run did not adopt (their
    /// interface is no longer configured). Call once every program is attached.
    ///
    /// # Errors
    /// The pin directory cannot be read, or a pin cannot be removed.
    pub fn detach_unclaimed(&mut self) -> Result<usize, KpathError> {
        let pins_err = |source| KpathError::Pins {
            path: self.pin_dir.clone(),
            source,
        };
        let claimed: Vec<&Path> = self
            .attachments
            .iter()
            .filter_map(|a| match &a.link {
                AttachedLink::Pinned { pin, .. } => Some(pin.as_path()),
                AttachedLink::Netlink(_) => None,
            })
            .collect();
        let mut detached = 0;
        for entry in std::fs::read_dir(&self.pin_dir).map_err(pins_err)? {
            let path = entry.map_err(pins_err)?.path();
            let is_link = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(LINK_PIN_PREFIX));
            if is_link && !claimed.contains(&path.as_path()) {
                // Held open while its pin goes, the link dies with the descriptor, at once
                // (the last reference dropped by an unlink is released later, by a worker).
                let held = PinnedLink::from_pin(&path).ok();
                std::fs::remove_file(&path).map_err(|source| KpathError::Pins {
                    path: path.clone(),
                    source,
                })?;
                drop(held);
                detached += 1;
            }
        }
        Ok(detached)
    }

    /// Installs (or replaces) the rewrite for `key`, with fresh counters.
    ///
    /// # Errors
    /// The kernel refusing the update.
    pub fn insert(&mut self, key: &FlowKey, rewrite: &Rewrite) -> Result<(), KpathError> {
        self.flows
            .insert(key.raw(), rewrite.raw(), 0)
            .map_err(|source| KpathError::Map { map: FLOWS, source })
    }

    /// Removes the entry for `key`; false if there was none.
    ///
    /// # Errors
    /// The kernel refusing the delete for another reason than a missing key.
    pub fn remove(&mut self, key: &FlowKey) -> Result<bool, KpathError> {
        match self.flows.remove(&key.raw()) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(false)
            }
            Err(source) => Err(KpathError::Map { map: FLOWS, source }),
        }
    }

    /// What the program reported for `key`, if it has an entry.
    ///
    /// # Errors
    /// The kernel refusing the lookup for another reason than a missing key.
    pub fn report(&self, key: &FlowKey) -> Result<Option<FlowReport>, KpathError> {
        match self.flows.get(&key.raw(), 0) {
            Ok(v) => Ok(Some(FlowReport::from_raw(&v))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(KpathError::Map { map: FLOWS, source }),
        }
    }

    /// What the program reported for every entry, read in batches of thousands per system
    /// call (one lookup per entry costs a system call each).
    ///
    /// # Errors
    /// The kernel refusing the batch walk.
    pub fn reports(&self) -> Result<crate::FlowReports, KpathError> {
        let mut raw = Vec::new();
        crate::batch::lookup_all::<RawFlowKey, RawFlowValue>(self.flows_fd.as_fd(), &mut raw)
            .map_err(|source| KpathError::Batch { map: FLOWS, source })?;
        Ok(crate::FlowReports {
            entries: raw.into_iter().collect(),
        })
    }

    /// Every entry's key (e.g. to reconcile adopted maps with the core's table).
    ///
    /// # Errors
    /// The kernel refusing the iteration.
    pub fn keys(&self) -> Result<Vec<FlowKey>, KpathError> {
        let mut out = Vec::new();
        for raw in self.flows.keys() {
            let raw = raw.map_err(|source| KpathError::Map { map: FLOWS, source })?;
            out.extend(FlowKey::from_raw(&raw));
        }
        Ok(out)
    }

    /// Every entry with its rewrite and what the program reported: what a restarted daemon
    /// hands its core to adopt the flows of the previous run. Entries the program cannot
    /// hold (an unknown protocol) are left out.
    ///
    /// # Errors
    /// The kernel refusing the iteration.
    pub fn entries(&self) -> Result<Vec<(FlowKey, Rewrite, FlowReport)>, KpathError> {
        let mut out = Vec::new();
        for item in self.flows.iter() {
            let (raw_key, raw_value) =
                item.map_err(|source| KpathError::Map { map: FLOWS, source })?;
            if let Some(key) = FlowKey::from_raw(&raw_key) {
                out.push((
                    key,
                    Rewrite::from_raw(&raw_value),
                    FlowReport::from_raw(&raw_value),
                ));
            }
        }
        Ok(out)
    }

    /// Installs (or replaces, in one map update the program sees whole) the schedule of the
    /// one-packet service at `vip`: the inbound program sends each datagram to `vip` to the
    /// slot after the last one taken (on any CPU), walking `slots` round. `cursor` names the
    /// service's cursor (`0..MAX_ONE_PACKET_SERVICES`, one per service).
    ///
    /// # Errors
    /// An empty or too long schedule, a cursor out of range, or the kernel refusing the
    /// update (more than [`MAX_ONE_PACKET_SERVICES`] schedules).
    pub fn set_one_packet_schedule(
        &mut self,
        vip: SocketAddrV4,
        cursor: u32,
        slots: &[SocketAddrV4],
    ) -> Result<(), KpathError> {
        if slots.is_empty() || slots.len() > OP_MAX_SLOTS {
            return Err(KpathError::ScheduleSize(slots.len()));
        }
        if cursor >= MAX_ONE_PACKET_SERVICES {
            return Err(KpathError::OnePacketCursor(cursor));
        }
        let mut raw = RawOpSchedule {
            // Bounded by OP_MAX_SLOTS above.
            nslots: u32::try_from(slots.len()).unwrap_or(0),
            cursor,
            slots: [RawOpEndpoint::default(); OP_MAX_SLOTS],
        };
        for (slot, &backend) in raw.slots.iter_mut().zip(slots) {
            *slot = op_endpoint(backend);
        }
        self.op_schedules
            .insert(op_endpoint(vip), raw, 0)
            .map_err(|source| KpathError::Map {
                map: OP_SCHEDULES,
                source,
            })
    }

    /// Removes the schedule of `vip`: its datagrams take the slow path again.
    ///
    /// # Errors
    /// The kernel refusing the delete for another reason than a missing key.
    pub fn remove_one_packet_schedule(&mut self, vip: SocketAddrV4) -> Result<(), KpathError> {
        let key = op_endpoint(vip);
        removed(self.op_schedules.remove(&key), OP_SCHEDULES)
    }

    /// Makes the outbound program send the datagrams of backend endpoint `backend` from
    /// `vip`, and count what it moves for `backend` (from zero when the endpoint is new).
    ///
    /// # Errors
    /// The kernel refusing an update (more than [`crate::MAX_ONE_PACKET_BACKENDS`]).
    pub fn set_one_packet_backend(
        &mut self,
        backend: SocketAddrV4,
        vip: SocketAddrV4,
    ) -> Result<(), KpathError> {
        let key = op_endpoint(backend);
        if self.op_counts.get(&key, 0).is_err() {
            let cpus =
                aya::util::nr_cpus().map_err(|(_, source)| KpathError::PossibleCpus(source))?;
            let zeros = PerCpuValues::try_from(vec![RawOpCounts::default(); cpus])
                .map_err(KpathError::PossibleCpus)?;
            self.op_counts
                .insert(key, zeros, 0)
                .map_err(|source| KpathError::Map {
                    map: OP_COUNTS,
                    source,
                })?;
        }
        self.op_backends
            .insert(key, op_endpoint(vip), 0)
            .map_err(|source| KpathError::Map {
                map: OP_BACKENDS,
                source,
            })
    }

    /// Forgets backend endpoint `backend`: its datagrams take the slow path again, and its
    /// counts go.
    ///
    /// # Errors
    /// The kernel refusing a delete for another reason than a missing key.
    pub fn remove_one_packet_backend(&mut self, backend: SocketAddrV4) -> Result<(), KpathError> {
        let key = op_endpoint(backend);
        removed(self.op_backends.remove(&key), OP_BACKENDS)?;
        removed(self.op_counts.remove(&key), OP_COUNTS)
    }

    /// What the program moved for backend endpoint `backend` since it was installed, summed
    /// over CPUs; `None` if it is not installed.
    ///
    /// # Errors
    /// The kernel refusing the lookup for another reason than a missing key.
    pub fn one_packet_counts(
        &self,
        backend: SocketAddrV4,
    ) -> Result<Option<OnePacketCounts>, KpathError> {
        match self.op_counts.get(&op_endpoint(backend), 0) {
            Ok(per_cpu) => Ok(Some(per_cpu.iter().fold(
                OnePacketCounts::default(),
                |sum, c| OnePacketCounts {
                    in_packets: sum.in_packets.wrapping_add(c.in_packets),
                    in_bytes: sum.in_bytes.wrapping_add(c.in_bytes),
                    out_packets: sum.out_packets.wrapping_add(c.out_packets),
                    out_bytes: sum.out_bytes.wrapping_add(c.out_bytes),
                },
            ))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(KpathError::Map {
                map: OP_COUNTS,
                source,
            }),
        }
    }

    /// The program's counters, summed over CPUs.
    ///
    /// # Errors
    /// The kernel refusing the lookup.
    pub fn counters(&self) -> Result<Counters, KpathError> {
        let get = |i: u32| -> Result<u64, KpathError> {
            let per_cpu = self.counters.get(&i, 0).map_err(|source| KpathError::Map {
                map: COUNTERS,
                source,
            })?;
            Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(Counters {
            fast_packets: get(0)?,
            fast_bytes: get(1)?,
            slow_no_entry: get(2)?,
            slow_unparsed: get(3)?,
            slow_tcp_flags: get(4)?,
            slow_ttl: get(5)?,
            slow_fib: get(6)?,
            direct_route_undeliverable: get(7)?,
            // A counters map pinned by a build before one-packet services has no slots for
            // them (the program's lookups then find nothing): zero.
            one_packet_in: get(8).unwrap_or(0),
            one_packet_out: get(9).unwrap_or(0),
            // Likewise for a map pinned before the kernel-executed SYN.
            syn_opened: get(10).unwrap_or(0),
            syn_ring_full: get(11).unwrap_or(0),
            syn_race: get(12).unwrap_or(0),
            handshakes_reported: get(13).unwrap_or(0),
            handshake_ring_full: get(14).unwrap_or(0),
            syn_acks_sent: get(15).unwrap_or(0),
            syn_ack_ring_full: get(16).unwrap_or(0),
        })
    }

    /// Makes the program execute exactly `wanted`'s SYNs from now on (natgw's
    /// `Gateway::published_listeners`, with ids and a generation): entries no longer wanted
    /// are removed first, then the new or changed ones written. Only the differences with
    /// the previous call reach the kernel. Returns how many entries changed.
    ///
    /// # Errors
    /// More than [`MAX_PUBLISHED_LISTENERS`] wanted, or the kernel refusing an update (the
    /// entries written so far stay, and the next call retries the rest).
    pub fn set_published(&mut self, wanted: &[KernelPublished]) -> Result<usize, KpathError> {
        if wanted.len() > MAX_PUBLISHED_LISTENERS {
            return Err(KpathError::PublishedCount(wanted.len()));
        }
        let map_err = |source| KpathError::Map {
            map: PUBLISHED,
            source,
        };
        let wanted_by_public: std::collections::HashMap<SocketAddrV4, KernelPublished> =
            wanted.iter().map(|p| (p.public, *p)).collect();
        let stale: Vec<SocketAddrV4> = self
            .published_now
            .keys()
            .filter(|public| !wanted_by_public.contains_key(public))
            .copied()
            .collect();
        let mut changed = 0;
        for public in stale {
            match self.published.remove(&published_key(public)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(map_err(source)),
            }
            self.published_now.remove(&public);
            changed += 1;
        }
        for p in wanted_by_public.values() {
            if self.published_now.get(&p.public) == Some(p) {
                continue;
            }
            let value = RawPublished {
                inside_addr: p.inside.ip().octets(),
                inside_port: p.inside.port().to_be_bytes(),
                pad: 0,
                listener: p.listener,
                generation: p.generation,
            };
            self.published
                .insert(published_key(p.public), value, 0)
                .map_err(map_err)?;
            self.published_now.insert(p.public, *p);
            changed += 1;
        }
        Ok(changed)
    }

    /// Tells the program the inside networks (natgw's `inside_networks`): a SYN from one of
    /// them is a hairpin, the core's, even to a published listener. Replaces the previous
    /// set; an unchanged set costs no system call.
    ///
    /// # Errors
    /// More than [`MAX_INSIDE_NETWORKS`], a prefix longer than 32, or the kernel refusing
    /// an update.
    pub fn set_inside_networks(&mut self, networks: &[(Ipv4Addr, u8)]) -> Result<(), KpathError> {
        if networks.len() > MAX_INSIDE_NETWORKS {
            return Err(KpathError::InsideNetworks(format!(
                "{} networks, the program holds {MAX_INSIDE_NETWORKS}",
                networks.len()
            )));
        }
        if let Some((addr, len)) = networks.iter().find(|(_, len)| *len > 32) {
            return Err(KpathError::InsideNetworks(format!("{addr}/{len}")));
        }
        if self.inside_nets_now == networks {
            return Ok(());
        }
        let map_err = |source| KpathError::Map {
            map: INSIDE_NETS,
            source,
        };
        let key = |(addr, len): (Ipv4Addr, u8)| {
            LpmKey::new(u32::from(len), u32::from_ne_bytes(addr.octets()))
        };
        // Add before removing, so that no inside network is ever missing meanwhile.
        for net in networks {
            self.inside_nets.insert(&key(*net), 1, 0).map_err(map_err)?;
        }
        for old in std::mem::take(&mut self.inside_nets_now) {
            if networks.contains(&old) {
                continue;
            }
            match self.inside_nets.remove(&key(old)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(map_err(source)),
            }
        }
        self.inside_nets_now = networks.to_vec();
        Ok(())
    }

    /// Drains up to `max` records of flows the program opened, oldest first. A record
    /// whose size or header length is not the program's (a stale object) is skipped.
    pub fn take_opened(&mut self, max: usize) -> Vec<OpenedFlow> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.opened.next() else {
                break;
            };
            let Some(raw) = RawOpened::from_bytes(&item) else {
                continue;
            };
            let Some(tcp_header) = raw.tcp.get(..usize::from(raw.tcp_len)) else {
                continue;
            };
            let kind = match raw.kind {
                crate::pod::OPENED_SYN => OpenedKind::Syn,
                crate::pod::OPENED_SYN_ACK => OpenedKind::SynAck,
                _ => continue,
            };
            let endpoint = |addr: [u8; 4], port: [u8; 2]| {
                SocketAddrV4::new(Ipv4Addr::from(addr), u16::from_be_bytes(port))
            };
            out.push(OpenedFlow {
                client: endpoint(raw.client_addr, raw.client_port),
                public: endpoint(raw.public_addr, raw.public_port),
                inside: endpoint(raw.inside_addr, raw.inside_port),
                listener: raw.listener,
                generation: raw.generation,
                kind,
                tcp_header: tcp_header.to_vec(),
            });
        }
        out
    }

    /// Drains up to `max` records of client ACKs the program reported for flows it opened,
    /// oldest first. A record of another size (a stale object) is skipped.
    pub fn take_handshakes(&mut self, max: usize) -> Vec<OpenedHandshake> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.handshakes.next() else {
                break;
            };
            let Some(raw) = RawHandshake::from_bytes(&item) else {
                continue;
            };
            let endpoint = |addr: [u8; 4], port: [u8; 2]| {
                SocketAddrV4::new(Ipv4Addr::from(addr), u16::from_be_bytes(port))
            };
            out.push(OpenedHandshake {
                client: endpoint(raw.client_addr, raw.client_port),
                public: endpoint(raw.public_addr, raw.public_port),
                inside: endpoint(raw.inside_addr, raw.inside_port),
            });
        }
        out
    }

    /// Runs the program for `direction` once over `frame` (an Ethernet frame) as if it
    /// arrived on interface `ifindex` (`BPF_PROG_TEST_RUN`), with the live maps. (The
    /// delivery program reads an IP packet at offset 0, as a TUN hands it over, which a test
    /// run cannot give it: it is exercised end to end.)
    ///
    /// # Errors
    /// The kernel refusing the run.
    pub fn test_run(
        &self,
        direction: Direction,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<TestRun, KpathError> {
        run_classifier(&self.ebpf, direction.program(), frame, ifindex)
    }

    /// Detaches the programs but keeps the pinned maps, so that the next
    /// [`KernelPath::load`] of the same site adopts its flows.
    pub fn release(mut self) {
        self.detach_all();
    }

    /// Leaves everything in the kernel for the next run of the site (a restart): the tcx
    /// links stay pinned and attached, so the programs keep forwarding the flows in the
    /// pinned maps while no daemon runs; only this process's descriptors close. A `clsact`
    /// filter cannot be adopted and is detached (with the qdisc, if this loader added it).
    pub fn leave(mut self) {
        for a in std::mem::take(&mut self.attachments).into_iter().rev() {
            let AttachedLink::Netlink(link) = a.link else {
                continue;
            };
            let program = a.program;
            let detached = classifier(&mut self.ebpf, program).and_then(|prog| {
                prog.detach(link)
                    .map_err(|source| KpathError::Program { program, source })
            });
            if let Err(e) = detached {
                tracing::warn!(error = %e, "detaching a clsact filter");
            }
            if a.qdisc_added
                && let Err(e) = remove_clsact(&a.iface)
            {
                tracing::warn!(error = %e, "removing a clsact qdisc");
            }
        }
    }

    /// Detaches the programs, removes the pins (and their directory) and every `clsact`
    /// qdisc this loader added: nothing of the site remains in the kernel.
    ///
    /// # Errors
    /// A pin or qdisc that could not be removed (the rest is still removed).
    pub fn unload(mut self) -> Result<(), KpathError> {
        let mut first_error = self.detach_all();
        // Links of a previous run this one did not adopt go too.
        if let Err(e) = self.detach_unclaimed() {
            first_error.get_or_insert(e);
        }
        for name in [FLOWS, COUNTERS] {
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
            let program = a.program;
            let detached = match a.link {
                // Without its pin, closing the link's last descriptor detaches it.
                AttachedLink::Pinned { link, pin } => {
                    let unpinned = std::fs::remove_file(&pin);
                    drop(link);
                    match unpinned {
                        Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                            Err(KpathError::Pins { path: pin, source })
                        }
                        _ => Ok(()),
                    }
                }
                AttachedLink::Netlink(link) => {
                    classifier(&mut self.ebpf, program).and_then(|prog| {
                        prog.detach(link)
                            .map_err(|source| KpathError::Program { program, source })
                    })
                }
            };
            if let Err(e) = detached {
                first_error.get_or_insert(e);
            }
            if a.qdisc_added
                && let Err(e) = remove_clsact(&a.iface)
            {
                first_error.get_or_insert(e);
            }
        }
        first_error
    }
}

/// The result of a delete, a missing key being no error.
fn removed(result: Result<(), aya::maps::MapError>, map: &'static str) -> Result<(), KpathError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(source) => Err(KpathError::Map { map, source }),
    }
}

/// Opens the tcx link pinned at `pin` and puts `prog` in it in place of the program it runs.
fn adopt_link(prog: &mut SchedClassifier, pin: &Path) -> Result<FdLink, String> {
    let link: FdLink = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?.into();
    let link = SchedClassifierLink::try_from(link).map_err(|e| e.to_string())?;
    let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
    let link = prog.take_link(id).map_err(|e| e.to_string())?;
    FdLink::try_from(link).map_err(|e| e.to_string())
}

impl Drop for KernelPath {
    fn drop(&mut self) {
        // A dropped loader detaches what it attached (pinned links included) and removes the
        // qdiscs it added; a restart keeps them with [`KernelPath::leave`] or by `exec`.
        if let Some(e) = self.detach_all() {
            tracing::warn!(error = %e, "detaching the kernel path");
        }
    }
}

/// Attaches `prog` to `hook` of `iface` through a `clsact` qdisc (added first when
/// `add_qdisc`, unless one is there); says whether it added the qdisc.
pub(crate) fn attach_clsact(
    prog: &mut SchedClassifier,
    iface: &str,
    hook: TcAttachType,
    program: &'static str,
    add_qdisc: bool,
) -> Result<(SchedClassifierLinkId, bool), KpathError> {
    if !add_qdisc {
        return prog
            .attach_with_options(iface, hook, TcAttachOptions::Netlink(NlOptions::default()))
            .map(|link| (link, false))
            .map_err(|source| KpathError::Program { program, source });
    }
    let added = match qdisc_add_clsact(iface) {
        Ok(()) => true,
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc_eexist()) => false,
        Err(e) => {
            return Err(KpathError::Qdisc {
                iface: iface.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    match prog.attach_with_options(iface, hook, TcAttachOptions::Netlink(NlOptions::default())) {
        Ok(link) => Ok((link, added)),
        Err(source) => {
            if added {
                let _best_effort = remove_clsact(iface);
            }
            Err(KpathError::Program { program, source })
        }
    }
}

fn libc_eexist() -> i32 {
    nix::errno::Errno::EEXIST as i32
}

/// Removes the `clsact` qdisc of `iface` (with its filters), through iproute2's `tc`: aya
/// adds the qdisc but has no call to delete it.
pub(crate) fn remove_clsact(iface: &str) -> Result<(), KpathError> {
    let qdisc = |reason: String| KpathError::Qdisc {
        iface: iface.to_owned(),
        reason,
    };
    let out = Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .output()
        .map_err(|e| qdisc(format!("running tc: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(qdisc(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Runs `program` of `ebpf` once over `frame` (an Ethernet frame) as if it arrived on
/// interface `ifindex` (`BPF_PROG_TEST_RUN`), with the live maps.
pub(crate) fn run_classifier(
    ebpf: &Ebpf,
    program: &'static str,
    frame: &[u8],
    ifindex: u32,
) -> Result<TestRun, KpathError> {
    let prog: &SchedClassifier = ebpf
        .program(program)
        .ok_or(KpathError::Missing(program))?
        .try_into()
        .map_err(|source| KpathError::Program { program, source })?;
    // struct __sk_buff: only ifindex (offset 40) is set, which puts the skb on that device.
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        })
        .map_err(|source| KpathError::Program { program, source })?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRun {
        action: result.return_value,
        frame: out,
    })
}
