//! The destination side: guest memory registered with userfaultfd, filled on
//! demand and in the background until every page is present.
//!
//! Threads, rings and cores (see `docs/design.md`):
//! - the **fault loop** (`destination::faultloop`) reads faults, owns the
//!   demand lane through the remote page source (`destination::remote`), and
//!   drives the end of the session; one thread, one ring;
//! - one **bulk worker** per bulk lane (`destination::bulk`) receives pages
//!   into its lane's stream ring and installs them from there; one thread,
//!   one ring, one core each (or the first lane runs in the fault loop's ring).
//!
//! If the session fails for good, `run` returns the error but leaves the
//! userfaultfd open for the life of the process: a vCPU that faults on a page
//! that never arrived waits; it never reads a zero page in its place.

pub mod bulk;
pub mod direct;
pub mod faultloop;
pub mod file;
pub mod huge;
pub mod inbound;
pub mod install;
pub mod outbox;
pub mod pages;
pub mod precopy;
pub mod remote;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfault_proto::auth::PresharedKey;
use ringfault_proto::{Lane, Layout, PageSize, Protection, SessionId};

use crate::addr::PeerAddr;
use crate::error::EngineError;
use crate::handshake::random_bytes;
use crate::space::PageSpace;
use crate::stats::{hex, DestinationReport};
use crate::sys::affinity::SchedClass;
use crate::sys::guest::{GuestMemory, RegionSpec};
use crate::sys::mapping::MapOptions;
use crate::sys::ring::Opcodes;
use crate::sys::uffd::{Features, RegisterMode, Uffd, UffdOptions};
use crate::wire::Framed;
use bulk::WorkerConfig;
use faultloop::{LoopConfig, FAULT_PRIORITY};
use install::Installer;
use remote::{Link, RemoteConfig, RemotePages};

/// How a page goes from a receive buffer into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InstallMode {
    /// `UFFDIO_COPY` straight from the receive ring: one copy. The default:
    /// faster here when the destination page must be allocated anyway
    /// (`docs/results.md`).
    #[default]
    Copy,
    /// `UFFDIO_MOVE` (Linux 6.8): no copy; the receive ring's pages move into
    /// guest memory. Bulk lanes then receive into private rings and ask the
    /// source to page-align payloads.
    Move,
}

/// How bulk workers receive their lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BulkReceive {
    /// Each payload straight into memory it is installed from, a whole 2 MiB
    /// range into a huge page moved in as is (`destination::direct`;
    /// payloads aligned on 4 KiB of the stream). Used with copy installs of
    /// 4 KiB pages without `--encrypt`; the stream ring otherwise.
    #[default]
    Direct,
    /// A multishot receive into a stream ring, frames parsed where they land
    /// (`destination::inbound`).
    Stream,
}

/// Whether the destination checks a finished migration against the
/// source's digests of every page (`crate::verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Do not ask for digests.
    #[default]
    Off,
    /// Take the digests if the source sends them (it decides: reading all of
    /// its memory again costs it time).
    IfSent,
    /// The source must send them: connecting fails if it will not.
    Required,
}

/// Destination settings.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// The pre-shared key.
    pub key: PresharedKey,
    /// Frame protection (both ends must agree).
    pub protection: Protection,
    /// The AEAD of that protection, which the destination chooses (the
    /// source accepts either): by default the faster one on this CPU
    /// ([`crate::Cipher::for_this_cpu`]).
    pub cipher: crate::Cipher,
    /// Bulk connections. At least 1.
    pub bulk_channels: u16,
    /// COPY or MOVE.
    pub install: InstallMode,
    /// Pages fetched before a faulting page.
    pub prefetch_before: u16,
    /// Pages fetched after a faulting page.
    pub prefetch_after: u16,
    /// Pin the fault loop and workers to cores.
    pub pin_workers: bool,
    /// Run the fault loop `SCHED_FIFO` and bulk workers `SCHED_BATCH`, so that a
    /// fault preempts bulk work at once (needs `CAP_SYS_NICE`; without it the
    /// threads keep their class and a warning is logged). Off by default:
    /// on few cores it lets a fault storm starve the bulk transfer.
    pub prioritize_demand: bool,
    /// Run the first bulk lane in the fault loop's ring instead of a thread.
    pub host_first_bulk: bool,
    /// Payload bytes a lane installs between two looks at its ring.
    pub bulk_budget: usize,
    /// How long to keep retrying a refused connection at the start.
    pub connect_patience: Duration,
    /// A lane silent this long is dead.
    pub liveness: Duration,
    /// How long to keep trying to resume a broken link (0: never resume).
    pub resume_timeout: Duration,
    /// Back the engine's own guest memory with transparent huge pages.
    pub thp: bool,
    /// Demand pacing: on average at most one demand request per this
    /// interval after a burst (zero: none); faults meanwhile join the next.
    /// 1 ms by default: in a fault storm, fewer and larger requests leave
    /// the CPU to the bulk transfer and the vCPUs (docs/design.md, "The
    /// demand economy"); a fault outside a storm still goes out at once.
    pub demand_interval: Duration,
    /// Demand requests allowed back to back before pacing applies.
    pub demand_burst: u32,
    /// Digests of every page after completion.
    pub verify: Verify,
    /// How bulk workers receive.
    pub bulk_receive: BulkReceive,
}

impl DestinationConfig {
    /// Defaults picked by measurement (`docs/design.md`).
    pub fn new(key: PresharedKey) -> DestinationConfig {
        DestinationConfig {
            key,
            protection: Protection::Mac,
            cipher: crate::Cipher::for_this_cpu(),
            bulk_channels: 1,
            install: InstallMode::Copy,
            prefetch_before: 0,
            prefetch_after: 0,
            pin_workers: true,
            prioritize_demand: false,
            host_first_bulk: false,
            bulk_budget: 256 << 10,
            connect_patience: Duration::from_secs(10),
            liveness: Duration::from_secs(10),
            resume_timeout: Duration::from_secs(300),
            thp: true,
            demand_interval: Duration::from_millis(1),
            demand_burst: 64,
            verify: Verify::Off,
            bulk_receive: BulkReceive::Direct,
        }
    }

    /// Checks every value; the message names the setting.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.bulk_channels == 0 || self.bulk_channels > 64 {
            return Err(EngineError::Config("bulk channels must be 1 to 64".into()));
        }
        if self.prefetch_before > ringfault_proto::MAX_PREFETCH
            || self.prefetch_after > ringfault_proto::MAX_PREFETCH
        {
            return Err(EngineError::Config(format!(
                "the prefetch window is at most {} pages each way",
                ringfault_proto::MAX_PREFETCH
            )));
        }
        if self.liveness < Duration::from_millis(500) {
            return Err(EngineError::Config(
                "the liveness timeout must be at least 0.5 s".into(),
            ));
        }
        if self.install == InstallMode::Move && self.protection == Protection::Aead {
            return Err(EngineError::Config(
                "--install move cannot be combined with --encrypt (pages are decrypted in a copy)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A region a VMM registered with its own userfaultfd.
#[derive(Debug, Clone, Copy)]
pub struct AttachedRegion {
    /// Address of its first byte (in the VMM's address space).
    pub base: usize,
    /// Length in bytes.
    pub len: usize,
    /// Page size in bytes.
    pub page_size: usize,
}

/// Progress of a running destination, readable from any thread.
#[derive(Debug, Clone)]
pub struct Progress {
    inst: Arc<Installer>,
}

impl Progress {
    /// Progress of whatever fills `inst`.
    pub fn of(inst: Arc<Installer>) -> Progress {
        Progress { inst }
    }

    /// Pages present (or known to be zero).
    pub fn present(&self) -> u64 {
        self.inst.present.count()
    }
    /// Pages in all regions.
    pub fn total(&self) -> u64 {
        self.inst.present.len()
    }
    /// The live counters of whatever fills guest memory.
    pub fn counters(&self) -> &crate::stats::Counters {
        &self.inst.counters
    }
    /// Whether global page `page` (pages numbered across regions in layout
    /// order) is present: lets a workload tell a first touch that faults from
    /// one that does not. False for an index out of range.
    pub fn is_present(&self, page: u64) -> bool {
        page < self.inst.present.len() && self.inst.present.is_set(page)
    }
    /// Faults read so far.
    pub fn faults(&self) -> u64 {
        self.inst
            .counters
            .faults
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Bytes received so far on every lane.
    pub fn wire_bytes(&self) -> u64 {
        self.inst
            .counters
            .wire_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A connected destination, ready to run.
#[derive(Debug)]
pub struct Destination {
    cfg: DestinationConfig,
    link: Link,
    session: SessionId,
    layout: Layout,
    memory: Option<Arc<GuestMemory>>,
    inst: Arc<Installer>,
    /// The remote page source: `Ok` once started early (pre-copy), else the
    /// demand lane it will start from.
    remote: Result<RemotePages, Framed>,
    started: Instant,
    /// What pre-copy did, when the source ran it.
    precopy: Option<precopy::PrecopyStats>,
    /// The source sends digests of every page after completion.
    verifies: bool,
}

impl Destination {
    /// Connects to a source, authenticates the demand lane, maps guest memory
    /// of the source's layout and registers it with a new userfaultfd. Nothing
    /// is mapped or registered before authentication has succeeded. The VM may
    /// run on [`Destination::memory`] from here on; the bulk lanes open when
    /// [`Destination::run`] starts.
    pub fn connect(addr: &PeerAddr, cfg: DestinationConfig) -> Result<Destination, EngineError> {
        Self::connect_inner(addr, cfg, None)
    }

    /// Connects like [`Destination::connect`], but fills regions that a VMM
    /// already registered (MISSING mode) on `uffd`, after checking them
    /// against the source's layout, region by region in order.
    pub fn attach(
        addr: &PeerAddr,
        cfg: DestinationConfig,
        uffd: OwnedFd,
        regions: Vec<AttachedRegion>,
    ) -> Result<Destination, EngineError> {
        Self::connect_inner(addr, cfg, Some((uffd, regions)))
    }

    fn connect_inner(
        addr: &PeerAddr,
        cfg: DestinationConfig,
        attached: Option<(OwnedFd, Vec<AttachedRegion>)>,
    ) -> Result<Destination, EngineError> {
        cfg.validate()?;
        Opcodes::require_engine()?;
        let started = Instant::now();
        let session: SessionId = random_bytes()?;
        let mut link = Link {
            addr: addr.clone(),
            key: cfg.key.clone(),
            session,
            protection: cfg.protection,
            cipher: cfg.cipher,
            bulk_channels: cfg.bulk_channels,
            moving: cfg.install == InstallMode::Move,
            direct: false,
            connect_patience: cfg.connect_patience,
            verify: cfg.verify != Verify::Off,
        };
        let (demand, layout, flags) =
            link.open_flags(Lane::Demand, 0, false, cfg.connect_patience, cfg.liveness)?;
        // Bulk payloads straight into landings: copy installs into 4 KiB
        // pages, frames that are not decrypted in place.
        link.direct = cfg.bulk_receive == BulkReceive::Direct
            && cfg.install == InstallMode::Copy
            && cfg.protection != Protection::Aead
            && layout.regions.iter().all(|r| r.page_size.bytes() == 4096);
        let precopy = flags & ringfault_proto::WELCOME_PRECOPY != 0;
        let verifies = flags & ringfault_proto::WELCOME_VERIFY != 0;
        if cfg.verify == Verify::Required && !verifies {
            return Err(EngineError::Unsupported(
                "verification: this source does not send digests of its pages (it must be told to verify)"
                    .into(),
            ));
        }
        if precopy && (attached.is_some() || cfg.install == InstallMode::Move) {
            return Err(EngineError::Config(
                "the source runs pre-copy, which needs memory this destination maps itself and copy installs"
                    .into(),
            ));
        }
        let (inst, memory) = match attached {
            None => own_memory(&layout, &cfg, !precopy)?,
            Some((fd, list)) => (attached_memory(&layout, fd, &list)?, None),
        };
        let inst = Arc::new(inst);
        if !precopy {
            return Ok(Destination {
                cfg,
                link,
                session,
                layout,
                memory,
                inst,
                remote: Err(demand),
                started,
                precopy: None,
                verifies,
            });
        }
        // Pre-copy: receive rounds until the switch-over, then return with
        // memory registered and the rest to come by post-copy.
        let mem = memory
            .clone()
            .ok_or_else(|| EngineError::Internal("pre-copy without own memory".into()))?;
        let gate = Arc::new(precopy::PrecopyGate::new(mem));
        let _ = inst.precopy.set(gate.clone());
        let mut rcfg = remote_config(&cfg, verifies);
        rcfg.host_first_bulk = false;
        let mut rp = RemotePages::new(
            link.clone(),
            rcfg,
            layout.clone(),
            inst.clone(),
            demand,
            started,
        );
        let r = rp.spawn_bulk_early().and_then(|()| {
            precopy::switch_over(
                &mut rp,
                &gate,
                &inst,
                &layout,
                cfg.bulk_channels,
                cfg.liveness,
            )
        });
        let stats = match r {
            Ok(s) => s,
            Err(e) => {
                gate.abort();
                pages::PageSource::stop(&mut rp, Some(&e));
                return Err(e);
            }
        };
        tracing::info!(
            "switch-over after pre-copy: {} pages discarded, barrier {:.1} ms",
            stats.discarded,
            stats.barrier_ms
        );
        Ok(Destination {
            cfg,
            link,
            session,
            layout,
            memory,
            inst,
            remote: Ok(rp),
            started,
            precopy: Some(stats),
            verifies,
        })
    }

    /// Pages the source's pre-copy left for post-copy to discard, and the
    /// barrier's time; `None` for a pure post-copy session.
    pub fn precopy(&self) -> Option<precopy::PrecopyStats> {
        self.precopy
    }

    /// Whether the source will send digests of every page after completion
    /// ([`DestinationReport::source_digests`]).
    pub fn verifies(&self) -> bool {
        self.verifies
    }

    /// The source's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Guest memory the destination mapped itself ([`Destination::connect`]):
    /// what the VM runs on. Reads and writes of a page that has not arrived
    /// wait until it has. `None` when attached: the VMM holds its regions.
    pub fn memory(&self) -> Option<Arc<GuestMemory>> {
        self.memory.clone()
    }

    /// A progress handle.
    pub fn progress(&self) -> Progress {
        Progress {
            inst: self.inst.clone(),
        }
    }

    /// Runs the migration on this thread until every page is present and the
    /// source is released.
    pub fn run(self) -> Result<DestinationReport, EngineError> {
        let Destination {
            cfg,
            link,
            session,
            layout,
            memory,
            inst,
            remote,
            started,
            precopy: _,
            verifies,
        } = self;
        let class = cfg.prioritize_demand;
        let mut source = match remote {
            Ok(rp) => rp,
            Err(demand) => RemotePages::new(
                link,
                remote_config(&cfg, verifies),
                layout.clone(),
                inst.clone(),
                demand,
                started,
            ),
        };
        let lcfg = LoopConfig {
            name: "fault loop",
            core: cfg.pin_workers.then_some(0),
            class: class.then_some(SchedClass::Realtime(FAULT_PRIORITY)),
            unregister: true,
        };
        let result = faultloop::run(&inst, &mut source, &lcfg);
        match result {
            Ok(rep) => {
                // To every page present: not the end of the session, which
                // waits for the source's digests when it verifies.
                let elapsed = source
                    .complete_at
                    .map_or_else(|| started.elapsed(), |t| t.duration_since(started));
                let channels = source.reports();
                let bytes_total = layout.regions.iter().map(|r| r.size).sum();
                let mut r = DestinationReport::build(
                    hex(&session),
                    elapsed,
                    inst.present.len(),
                    bytes_total,
                    &inst.counters,
                    &rep.hist,
                    channels,
                );
                r.protection = cfg.protection.name().into();
                if cfg.protection != Protection::None {
                    r.cipher = cfg.cipher.name().into();
                }
                r.resumes = source.resumes;
                r.metadata_bytes = inst.present.allocated_bytes();
                r.source_digests = source.take_digests();
                drop(memory);
                Ok(r)
            }
            Err(e) => {
                // Keep the userfaultfd (and our memory) for the life of the
                // process: a vCPU blocked on a missing page must wait, not read
                // zeros.
                std::mem::forget(inst);
                std::mem::forget(memory);
                Err(e)
            }
        }
    }
}

fn features_for(layout: &Layout, moving: bool) -> Features {
    let huge = layout
        .regions
        .iter()
        .any(|r| r.page_size != PageSize::Size4K);
    let mut f = Features::NONE;
    if huge {
        f = f | Features::MISSING_HUGETLBFS;
    }
    if moving {
        f = f | Features::MOVE;
    }
    f
}

/// The remote page source's settings.
fn remote_config(cfg: &DestinationConfig, verify: bool) -> RemoteConfig {
    let cores = crate::sys::affinity::online_cores().max(1);
    RemoteConfig {
        prefetch_before: cfg.prefetch_before,
        prefetch_after: cfg.prefetch_after,
        host_first_bulk: cfg.host_first_bulk,
        worker: WorkerConfig {
            core: cfg.pin_workers.then_some(1 % cores),
            class: cfg.prioritize_demand.then_some(SchedClass::Batch),
            budget: cfg.bulk_budget,
            liveness: cfg.liveness,
        },
        liveness: cfg.liveness,
        resume_timeout: cfg.resume_timeout,
        demand_interval: cfg.demand_interval,
        demand_burst: cfg.demand_burst,
        verify,
    }
}

/// Maps guest memory for `layout`, registered at once unless `register` is
/// false (pre-copy registers at the switch-over).
fn own_memory(
    layout: &Layout,
    cfg: &DestinationConfig,
    register: bool,
) -> Result<(Installer, Option<Arc<GuestMemory>>), EngineError> {
    let uffd = Uffd::open(UffdOptions {
        nonblock: true,
        user_mode_only: false,
    })?;
    let mut wanted = features_for(layout, cfg.install == InstallMode::Move);
    // Whole 2 MiB ranges go in as huge pages by `UFFDIO_MOVE` where the
    // kernel has it (huge.rs); otherwise the keeper only collapses.
    let move_huge = cfg.thp
        && Uffd::probe()
            .map(|f| f.contains(Features::MOVE))
            .unwrap_or(false);
    if move_huge {
        wanted = wanted | Features::MOVE;
    }
    uffd.api(wanted)?;
    let specs: Vec<RegionSpec> = layout
        .regions
        .iter()
        .map(|r| {
            Ok(RegionSpec {
                id: r.id,
                size: usize::try_from(r.size).map_err(|_| {
                    EngineError::LayoutMismatch(format!(
                        "region {} of {} bytes does not fit this machine's address space",
                        r.id, r.size
                    ))
                })?,
                page_size: usize::try_from(r.page_size.bytes()).unwrap_or(usize::MAX),
            })
        })
        .collect::<Result<_, EngineError>>()?;
    let mem = GuestMemory::anonymous(
        &specs,
        MapOptions {
            thp: cfg.thp,
            populate: false,
        },
    )?;
    let mut bases = Vec::with_capacity(specs.len());
    for r in mem.regions() {
        if register {
            uffd.register(r.addr(), r.len(), RegisterMode::Missing)?;
        }
        bases.push(r.addr());
    }
    let space = PageSpace::new(layout, &bases);
    let inst = Installer::new(uffd, space, false)?;
    let mem = Arc::new(mem);
    if cfg.thp {
        // The keeper thread lives as long as the installer's reports can come.
        match huge::HugeKeeper::start(mem.clone(), inst.space.spans(), move_huge) {
            Ok((keeper, _thread, _stats)) => {
                let _ = inst.huge.set(keeper);
            }
            Err(e) => {
                tracing::warn!("huge pages will not be restored: cannot start the keeper: {e}")
            }
        }
    }
    Ok((inst, Some(mem)))
}

fn attached_memory(
    layout: &Layout,
    fd: OwnedFd,
    list: &[AttachedRegion],
) -> Result<Installer, EngineError> {
    if list.len() != layout.regions.len() {
        return Err(EngineError::LayoutMismatch(format!(
            "the VMM registered {} regions, the source has {}",
            list.len(),
            layout.regions.len()
        )));
    }
    for (i, (a, r)) in list.iter().zip(&layout.regions).enumerate() {
        if a.len as u64 != r.size || a.page_size as u64 != r.page_size.bytes() {
            return Err(EngineError::LayoutMismatch(format!(
                "region {i}: the VMM's is {} bytes of {}-byte pages, the source's {} bytes of {}-byte pages",
                a.len,
                a.page_size,
                r.size,
                r.page_size.bytes()
            )));
        }
    }
    let bases: Vec<usize> = list.iter().map(|a| a.base).collect();
    let space = PageSpace::new(layout, &bases);
    Installer::new(Uffd::from_fd(fd), space, true)
}
