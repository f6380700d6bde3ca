//! The destination side: guest memory registered with userfaultfd, filled on demand
//! and in the background until every page is present.
//!
//! Threads, rings and cores (see `docs/design.md`):
//! - the **fault worker** (`destination::fault`) owns the demand lane and reads
//!   faults; it requests, receives and installs demand pages itself, so a fault's
//!   whole service stays on one thread and one core (a wake across cores costs about
//!   64 µs here). It polls briefly before it sleeps in its io_uring ring.
//! - one **bulk worker** per bulk lane (`destination::bulk`) receives pages into
//!   page-aligned buffers registered with its own ring and installs them from there.
//!
//! If a connection is lost, `run` returns the error but leaves the userfaultfd
//! open and the memory mapped for the life of the process: a vCPU that faults on a
//! page that never arrived waits; it never reads a zero page in its place.

mod bulk;
mod fault;
pub mod install;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfault_proto::auth::PresharedKey;
use ringfault_proto::{Lane, Layout, PageSize, SessionId};

use crate::addr::{PeerAddr, Stream};
use crate::bitmap::AtomicBitmap;
use crate::error::EngineError;
use crate::handshake::{destination_handshake, random_bytes, ChannelId};
use crate::stats::{hex, Counters, DestinationReport};
use crate::sys::guest::GuestArea;
use crate::sys::mapping::{GuestMapping, MapOptions};
use crate::sys::uffd::{Features, Ioctls, RegisterMode, Uffd, UffdOptions};
use install::DestRegion;

/// How a page goes from a receive buffer into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InstallMode {
    /// `UFFDIO_COPY`: one copy. The default: faster here when the destination page
    /// must be allocated anyway (`docs/results.md`).
    #[default]
    Copy,
    /// `UFFDIO_MOVE` (Linux 6.8): no copy; the buffer's pages move into guest memory.
    /// Receive buffers are then not registered with the ring, since a pinned page
    /// cannot move.
    Move,
}

/// Destination settings.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// The pre-shared key.
    pub key: PresharedKey,
    /// Bulk connections (each with its own worker, ring and core). At least 1.
    pub bulk_channels: u16,
    /// COPY or MOVE.
    pub install: InstallMode,
    /// Pages fetched before a faulting page.
    pub prefetch_before: u32,
    /// Pages fetched after a faulting page.
    pub prefetch_after: u32,
    /// How long the fault worker polls before it sleeps.
    pub spin: Duration,
    /// Pin workers to cores.
    pub pin_workers: bool,
    /// Run the fault worker `SCHED_FIFO` and bulk workers `SCHED_BATCH`, so that a
    /// fault preempts bulk work at once (needs `CAP_SYS_NICE`; without it the
    /// threads keep their class and a warning is logged).
    pub prioritize_demand: bool,
    /// How long to keep retrying a refused connection.
    pub connect_patience: Duration,
    /// Bytes per bulk receive buffer.
    pub recv_buffer: usize,
}

impl DestinationConfig {
    /// Defaults picked by measurement (`docs/results.md`).
    pub fn new(key: PresharedKey) -> DestinationConfig {
        DestinationConfig {
            key,
            bulk_channels: 1,
            install: InstallMode::Copy,
            prefetch_before: 0,
            prefetch_after: 15,
            spin: Duration::ZERO,
            pin_workers: true,
            prioritize_demand: true,
            connect_patience: Duration::from_secs(10),
            recv_buffer: 1 << 20,
        }
    }
}

/// A region a VMM registered with its own userfaultfd.
#[derive(Debug, Clone, Copy)]
pub struct AttachedRegion {
    /// Address of its first byte.
    pub base: usize,
    /// Length in bytes.
    pub len: usize,
    /// Page size in bytes.
    pub page_size: usize,
}

/// Progress of a running destination, readable from any thread.
#[derive(Debug, Clone)]
pub struct Progress {
    present: Arc<AtomicBitmap>,
}

impl Progress {
    /// Pages present.
    pub fn present(&self) -> u64 {
        self.present.count()
    }
    /// Pages in all regions.
    pub fn total(&self) -> u64 {
        self.present.len()
    }
    /// Whether global page `page` (pages numbered across regions in layout order)
    /// is present: lets a workload tell a first touch that faults from one that
    /// does not. False for an index out of range.
    pub fn is_present(&self, page: u64) -> bool {
        page < self.present.len() && self.present.is_set(page)
    }
}

/// A connected destination, ready to run.
#[derive(Debug)]
pub struct Destination {
    cfg: DestinationConfig,
    session: SessionId,
    layout: Layout,
    regions: Vec<DestRegion>,
    /// Guest memory we mapped (empty when attached). Never unmapped: the VM runs
    /// on it after the migration, for the life of the process, and every
    /// [`GuestArea`] handed out by [`Destination::regions`] stays valid.
    mappings: Vec<&'static GuestMapping>,
    uffd: Uffd,
    demand: Stream,
    bulk: Vec<Stream>,
    present: Arc<AtomicBitmap>,
    started: Instant,
    /// The userfaultfd came from a VMM and may deliver REMOVE events.
    guard_removes: bool,
}

impl Destination {
    /// Connects to a source, authenticates every channel, maps guest memory of the
    /// source's layout and registers it with a new userfaultfd. Nothing is mapped or
    /// registered before authentication has succeeded.
    pub fn connect(addr: &PeerAddr, cfg: DestinationConfig) -> Result<Destination, EngineError> {
        Self::connect_inner(addr, cfg, None)
    }

    /// Connects like [`Destination::connect`], but fills regions that a VMM already
    /// registered (MISSING mode) on `uffd`, after checking them against the source's
    /// layout, region by region in order.
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
        if cfg.bulk_channels == 0 || cfg.bulk_channels > 64 {
            return Err(EngineError::Config("bulk channels must be 1 to 64".into()));
        }
        if cfg.prefetch_before > ringfault_proto::MAX_PREFETCH
            || cfg.prefetch_after > ringfault_proto::MAX_PREFETCH
        {
            return Err(EngineError::Config(format!(
                "prefetch window is at most {} pages each way",
                ringfault_proto::MAX_PREFETCH
            )));
        }
        let started = Instant::now();
        let session: SessionId = random_bytes()?;
        let channel_count = cfg.bulk_channels + 1;
        let mut demand = addr.connect(cfg.connect_patience)?;
        let id = ChannelId {
            lane: Lane::Demand,
            channel: 0,
            channel_count,
        };
        let (_caps, welcome) = destination_handshake(&mut demand, &cfg.key, id, session, false)?;
        let layout = welcome.layout;
        let total: u64 = layout.total_pages();

        let (uffd, regions, mappings) = match attached {
            None => own_memory(&layout, cfg.install)?,
            Some((fd, list)) => attached_memory(&layout, fd, list)?,
        };
        let mut bulk = Vec::with_capacity(usize::from(cfg.bulk_channels));
        for ch in 1..=cfg.bulk_channels {
            let mut s = addr.connect(cfg.connect_patience)?;
            let id = ChannelId {
                lane: Lane::Bulk,
                channel: ch,
                channel_count,
            };
            destination_handshake(&mut s, &cfg.key, id, session, false)?;
            bulk.push(s);
        }
        // Our own mappings never see a balloon; a VMM's userfaultfd may.
        let guard_removes = mappings.is_empty();
        Ok(Destination {
            guard_removes,
            cfg,
            session,
            layout,
            regions,
            mappings,
            uffd,
            demand,
            bulk,
            present: Arc::new(AtomicBitmap::new(total)),
            started,
        })
    }

    /// The source's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Guest memory that the destination mapped itself ([`Destination::connect`]),
    /// region by region in layout order: what the VM runs on. Reads and writes of a
    /// page that has not arrived wait until it has. Empty when attached: the VMM's
    /// regions may live in another process (Firecracker's do), and the VMM already
    /// holds them.
    pub fn regions(&self) -> Vec<GuestArea> {
        self.mappings
            .iter()
            .map(|m| {
                // SAFETY: our own mappings are leaked on purpose (`mappings`), so
                // they stay mapped for the life of the process.
                unsafe { GuestArea::new(m.as_ptr(), m.len()) }
            })
            .collect()
    }

    /// The mappings the destination allocated (empty when attached). They live for
    /// the rest of the process: the VM runs on them after the migration.
    pub fn mappings(&self) -> Vec<&'static GuestMapping> {
        self.mappings.clone()
    }

    /// A progress handle.
    pub fn progress(&self) -> Progress {
        Progress {
            present: self.present.clone(),
        }
    }

    /// Runs the migration until every page is present and the source is released.
    pub fn run(self) -> Result<DestinationReport, EngineError> {
        let Destination {
            cfg,
            session,
            layout,
            regions,
            mappings: _,
            uffd,
            demand,
            bulk,
            present,
            started,
            guard_removes,
        } = self;
        let gate = install::RemoveGate::default();
        let counters = Counters::default();
        let finished = AtomicBool::new(false);
        let failed: Mutex<Option<EngineError>> = Mutex::new(None);
        let notifier = fault::Notifier::new()?;
        let mut stream_handles: Vec<Stream> = Vec::new();
        for s in std::iter::once(&demand).chain(bulk.iter()) {
            if let Ok(c) = s.try_clone() {
                stream_handles.push(c);
            }
        }
        let shared = Shared {
            cfg: &cfg,
            layout: &layout,
            uffd: &uffd,
            regions: &regions,
            present: &present,
            counters: &counters,
            finished: &finished,
            notifier: &notifier,
            started,
            gate: guard_removes.then_some(&gate),
        };
        let fail = |e: EngineError| {
            if let Ok(mut f) = failed.lock() {
                if f.is_none() {
                    *f = Some(e);
                }
            }
            // Wake everybody: a blocked read returns once its socket is shut.
            for s in &stream_handles {
                s.shutdown();
            }
            notifier.notify();
        };
        let (fault_stats, channel_reports) = std::thread::scope(|scope| {
            let bulk_handles: Vec<_> = bulk
                .into_iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let sh = &shared;
                    let fail = &fail;
                    let ch = u16::try_from(i + 1).unwrap_or(u16::MAX);
                    let spawned = std::thread::Builder::new()
                        .name(format!("rf-bulk{ch}"))
                        .spawn_scoped(scope, move || {
                            let r = bulk::run(sh, s, ch);
                            match r {
                                Ok(rep) => Some(rep),
                                Err(e) => {
                                    // Acquire: pairs with the fault worker's Release store.
                                    if !sh.finished.load(Ordering::Acquire) {
                                        fail(e);
                                    }
                                    None
                                }
                            }
                        });
                    match spawned {
                        Ok(h) => Some(h),
                        Err(e) => {
                            fail(EngineError::io("starting a bulk worker", e));
                            None
                        }
                    }
                })
                .collect();
            let fault_result = fault::run(&shared, demand);
            let fault_stats = match fault_result {
                Ok(s) => Some(s),
                Err(e) => {
                    fail(e);
                    None
                }
            };
            // Every page is present (or we failed): stop the bulk lanes.
            for s in &stream_handles {
                s.shutdown();
            }
            let mut reports = Vec::new();
            for h in bulk_handles {
                match h.join() {
                    Ok(Some(r)) => reports.push(r),
                    Ok(None) => {}
                    Err(_) => fail(EngineError::WorkerPanicked {
                        worker: "destination bulk".into(),
                    }),
                }
            }
            (fault_stats, reports)
        });
        let failure = failed.lock().ok().and_then(|mut f| f.take());
        match (failure, fault_stats) {
            (None, Some((hist, demand_report))) => {
                let mut channels = vec![demand_report];
                channels.extend(channel_reports);
                let bytes_total = regions.iter().map(|r| r.len as u64).sum();
                Ok(DestinationReport::build(
                    hex(&session),
                    started.elapsed(),
                    present.len(),
                    bytes_total,
                    &counters,
                    &hist,
                    channels,
                ))
            }
            (failure, _) => {
                // Keep the userfaultfd and the memory for the life of the process:
                // a vCPU blocked on a missing page must wait, not read zeros.
                std::mem::forget(uffd);
                Err(failure.unwrap_or_else(|| EngineError::Protocol("run ended early".into())))
            }
        }
    }
}

/// What the workers of one run share.
pub(crate) struct Shared<'a> {
    pub cfg: &'a DestinationConfig,
    pub layout: &'a Layout,
    pub uffd: &'a Uffd,
    pub regions: &'a [DestRegion],
    pub present: &'a AtomicBitmap,
    pub counters: &'a Counters,
    /// Set by the fault worker once the source acknowledged completion.
    pub finished: &'a AtomicBool,
    pub notifier: &'a fault::Notifier,
    pub started: Instant,
    /// Orders installs against REMOVE events (attached userfaultfds only).
    pub gate: Option<&'a install::RemoveGate>,
}

impl Shared<'_> {
    pub(crate) fn installer(&self) -> install::Installer<'_> {
        install::Installer {
            uffd: self.uffd,
            regions: self.regions,
            present: self.present,
            counters: self.counters,
            gate: self.gate,
        }
    }
}

fn spans(layout: &Layout) -> Vec<(u64, u64)> {
    let mut first = 0u64;
    layout
        .regions
        .iter()
        .map(|r| {
            let f = first;
            first += r.page_count();
            (f, r.page_count())
        })
        .collect()
}

type Memory = (Uffd, Vec<DestRegion>, Vec<&'static GuestMapping>);

fn own_memory(layout: &Layout, install: InstallMode) -> Result<Memory, EngineError> {
    let uffd = Uffd::open(UffdOptions {
        nonblock: true,
        user_mode_only: false,
    })?;
    let huge = layout
        .regions
        .iter()
        .any(|r| r.page_size != PageSize::Size4K);
    let mut wanted = Features::NONE;
    if huge {
        wanted = wanted | Features::MISSING_HUGETLBFS;
    }
    if install == InstallMode::Move {
        wanted = wanted | Features::MOVE;
    }
    uffd.api(wanted)?;
    let mut regions = Vec::new();
    let mut mappings = Vec::new();
    for (r, (first, pages)) in layout.regions.iter().zip(spans(layout)) {
        let size = usize::try_from(r.size)
            .map_err(|_| EngineError::LayoutMismatch("region larger than memory".into()))?;
        let ps = usize::try_from(r.page_size.bytes()).unwrap_or(usize::MAX);
        let m = GuestMapping::anonymous(size, ps, MapOptions::default())?;
        let ioctls = uffd.register(m.addr(), m.len(), RegisterMode::Missing)?;
        let mut need = Ioctls::COPY;
        if r.page_size == PageSize::Size4K {
            need = need | Ioctls::ZEROPAGE;
        }
        if install == InstallMode::Move {
            need = need | Ioctls::MOVE;
        }
        ioctls.require(need)?;
        regions.push(DestRegion {
            id: r.id,
            base: m.addr(),
            len: m.len(),
            page_size: ps,
            first_global: first,
            pages,
        });
        // Leaked on purpose: see `Destination::mappings`.
        mappings.push(&*Box::leak(Box::new(m)));
    }
    Ok((uffd, regions, mappings))
}

fn attached_memory(
    layout: &Layout,
    fd: OwnedFd,
    list: Vec<AttachedRegion>,
) -> Result<Memory, EngineError> {
    if list.len() != layout.regions.len() {
        return Err(EngineError::LayoutMismatch(format!(
            "the source has {} regions, the VMM registered {}",
            layout.regions.len(),
            list.len()
        )));
    }
    let mut regions = Vec::new();
    for ((r, a), (first, pages)) in layout.regions.iter().zip(&list).zip(spans(layout)) {
        if a.len as u64 != r.size || a.page_size as u64 != r.page_size.bytes() {
            return Err(EngineError::LayoutMismatch(format!(
                "region {}: source has {:#x} bytes in {}-byte pages, VMM has {:#x} bytes at {:#x} in {}-byte pages",
                r.id, r.size, r.page_size.bytes(), a.len, a.base, a.page_size
            )));
        }
        regions.push(DestRegion {
            id: r.id,
            base: a.base,
            len: a.len,
            page_size: a.page_size,
            first_global: first,
            pages,
        });
    }
    Ok((Uffd::from_fd(fd), regions, Vec::new()))
}
