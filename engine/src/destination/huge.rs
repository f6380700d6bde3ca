//! Keeping transparent huge pages on the destination.
//!
//! `UFFDIO_COPY` installs 4 KiB pages, even into a region madvised for
//! transparent huge pages, so a guest whose memory was huge-page backed on
//! the source would run on 4 KiB pages afterwards (QEMU's post-copy loses
//! them this way). The destination therefore collapses each 2 MiB range of a
//! THP region back into one huge page (`MADV_COLLAPSE`, Linux 6.1) once every
//! page of it was installed, in a background thread at batch priority, off
//! the demand path:
//! - the installer reports each 2 MiB range it has just completed
//!   ([`HugeKeeper::installed`]: a few bitmap words per install, no system
//!   call);
//! - the keeper thread (`SCHED_BATCH`: it yields to vCPUs at once, yet is not
//!   starved by guests that never idle) checks with `PAGEMAP_SCAN` that every page of the range
//!   holds real data (a never-populated page is left unmapped, so a sparse
//!   guest stays sparse; the kernel would refuse the collapse anyway while
//!   the region is registered), then collapses it;
//! - once guest memory is unregistered at the end of the migration
//!   ([`HugeKeeper::sweep`]), one `PAGEMAP_SCAN` of each region finds the
//!   2 MiB ranges that are still in 4 KiB pages and at least 90% populated
//!   with data (the rest are pages the source sent as zero, which the
//!   destination leaves unmapped, so the range could not be collapsed while
//!   registered): the keeper collapses them, the kernel filling the holes
//!   with zeros. That is stricter than khugepaged's default, which collapses
//!   a range holding a single page; a range never populated stays unmapped.
//!
//! Better than collapsing a range is never having to: when a whole aligned
//! 2 MiB range arrives in one frame (the source aligns its frames for this)
//! and no page of it is present yet, the installer asks the keeper to
//! install it whole ([`HugeKeeper::install_whole`]): one copy into a
//! huge-page stage (`sys::install::HugeStage`), then `UFFDIO_MOVE` of that
//! huge page into guest memory, so the range is never in 4 KiB pages and
//! never collapsed. That needs `UFFD_FEATURE_MOVE` (Linux 6.8); without it,
//! or for ranges that demand faults reached first, the collapse above
//! remains.
//!
//! Only memory the destination maps itself is collapsed; a VMM's memory is its
//! owner's to manage.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::bitmap::AtomicBitmap;
use crate::space::RegionSpan as Span;
use crate::sys::affinity::{place_current_thread, SchedClass};
use crate::sys::guest::GuestMemory;
use crate::sys::install::{HugeStage, Landing};
use crate::sys::pagemap::{Query, Scanner, PAGE_IS_HUGE, PAGE_IS_PFNZERO};
use crate::sys::uffd::{Installed, Uffd, UffdError};

/// Bytes of a transparent huge page (x86-64, arm64 with 4 KiB pages).
pub const HUGE: usize = 2 << 20;
const PAGES_PER_HUGE: u64 = (HUGE / 4096) as u64;

/// Queued ranges before installers stop reporting (the keeper is behind).
const QUEUE: usize = 16 << 10;

/// The message that asks for the final sweep.
const SWEEP: (usize, usize) = (usize::MAX, 0);

/// Stages kept for reuse (one per installing thread is enough).
const STAGES: usize = 8;

/// Pages of data a 2 MiB range needs for the final sweep to collapse it.
const SWEEP_MIN_PAGES: usize = HUGE / 4096 * 9 / 10;

/// What the keeper did.
#[derive(Debug, Default)]
pub struct HugeStats {
    /// 2 MiB ranges collapsed into a huge page.
    pub collapsed: AtomicU64,
    /// Ranges left as they were (not fully populated, or the kernel refused).
    pub skipped: AtomicU64,
    /// Ranges reported complete that were already one huge page.
    pub already_huge: AtomicU64,
}

/// Reports completed 2 MiB ranges to the keeper thread, which collapses them
/// in a `SCHED_BATCH` thread.
#[derive(Debug)]
pub struct HugeKeeper {
    tx: SyncSender<(usize, usize)>,
    /// Which region indexes are THP-backed 4 KiB regions.
    eligible: Vec<bool>,
    /// Whole ranges may be installed by `UFFDIO_MOVE` (the userfaultfd has
    /// `UFFD_FEATURE_MOVE`; cleared if the kernel refuses a move outright).
    moving: AtomicBool,
    /// Idle huge-page stages.
    stages: Mutex<Vec<HugeStage>>,
}

impl HugeKeeper {
    /// Starts the keeper thread for the THP regions of `memory` (the
    /// destination's own), which the installer numbers like `spans`.
    /// `moving`: the userfaultfd has `UFFD_FEATURE_MOVE`, so whole ranges
    /// can be installed as huge pages ([`HugeKeeper::install_whole`]).
    pub fn start(
        memory: Arc<GuestMemory>,
        spans: &[Span],
        moving: bool,
    ) -> std::io::Result<(HugeKeeper, JoinHandle<()>, Arc<HugeStats>)> {
        let (tx, rx) = sync_channel(QUEUE);
        let eligible: Vec<bool> = spans
            .iter()
            .map(|s| s.page_size == 4096 && s.base % HUGE == 0 && s.len() >= HUGE)
            .collect();
        let stats = Arc::new(HugeStats::default());
        let st = stats.clone();
        let el = eligible.clone();
        let h = std::thread::Builder::new()
            .name("rf-huge".into())
            .spawn(move || keep(&memory, &el, &rx, &st))?;
        Ok((
            HugeKeeper {
                tx,
                eligible,
                moving: AtomicBool::new(moving),
                stages: Mutex::new(Vec::new()),
            },
            h,
            stats,
        ))
    }

    /// Whether pages `first..first+count` of region `ri` start with a whole
    /// aligned 2 MiB range that [`HugeKeeper::install_whole`] may install.
    pub fn whole_at(&self, ri: usize, first: u64, count: u64) -> bool {
        // Relaxed: only ever cleared, and a stale `true` costs one refused move.
        self.moving.load(Ordering::Relaxed)
            && self.eligible.get(ri).copied().unwrap_or(false)
            && first.is_multiple_of(PAGES_PER_HUGE)
            && count >= PAGES_PER_HUGE
    }

    /// Installs the 2 MiB `bytes` at `dst` (2 MiB-aligned, missing) as one
    /// huge page: copied into a stage, then moved. Anything short of
    /// `Done(2 MiB)` means the caller installs the rest another way; a move
    /// the kernel refuses outright (`EINVAL`: memory it cannot move into)
    /// turns whole installs off for this session.
    pub fn install_whole(
        &self,
        uffd: &Uffd,
        dst: usize,
        bytes: &[u8],
    ) -> Result<Installed, UffdError> {
        let idle = self.stages.lock().ok().and_then(|mut v| v.pop());
        let mut stage = match idle {
            Some(s) => s,
            None => HugeStage::new().map_err(|e| UffdError::Range {
                op: "mapping a huge-page stage",
                addr: dst,
                len: HUGE,
                source: std::io::Error::other(e.to_string()),
            })?,
        };
        let r = stage.install(uffd, dst, bytes);
        if let Ok(mut v) = self.stages.lock() {
            if v.len() < STAGES {
                v.push(stage);
            }
        }
        self.refused(&r);
        r
    }

    /// Moves the huge landing `land`, which a receive filled with the 2 MiB
    /// for `dst` (2 MiB-aligned, missing), in as one huge page; as
    /// [`HugeKeeper::install_whole`] without the copy. After anything short
    /// of a whole move the caller installs the rest from the landing, then
    /// clears it.
    pub fn move_landed(
        &self,
        uffd: &Uffd,
        dst: usize,
        land: &mut Landing,
    ) -> Result<Installed, UffdError> {
        let r = land.move_whole(uffd, dst);
        self.refused(&r);
        r
    }

    /// A move the kernel refuses outright (`EINVAL`: memory it cannot move
    /// into) turns whole installs off for this session.
    fn refused(&self, r: &Result<Installed, UffdError>) {
        if let Err(UffdError::Range { source, .. }) = r {
            if source.raw_os_error() == Some(libc::EINVAL) {
                tracing::debug!(
                    "UFFDIO_MOVE refused ({source}): huge pages will be collapsed instead"
                );
                // Relaxed: see `whole_at`.
                self.moving.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Guest memory is unregistered: collapses what the installs could not
    /// (see the module doc), in the keeper thread.
    pub fn sweep(&self) {
        // Blocking: the sweep must not be dropped behind a full queue.
        let _ = self.tx.send(SWEEP);
    }

    /// Pages `first..first+count` of region `ri` (span `s`) were just
    /// installed: reports each 2 MiB range they complete.
    pub fn installed(&self, ri: usize, s: &Span, first: u64, count: u64, present: &AtomicBitmap) {
        if count == 0 || !self.eligible.get(ri).copied().unwrap_or(false) {
            return;
        }
        let lo = first / PAGES_PER_HUGE;
        let hi = (first + count - 1) / PAGES_PER_HUGE;
        for chunk in lo..=hi {
            let start = chunk * PAGES_PER_HUGE;
            if start + PAGES_PER_HUGE > s.pages {
                break;
            }
            if present.count_range(s.first + start, PAGES_PER_HUGE) == PAGES_PER_HUGE {
                let off = usize::try_from(start).unwrap_or(usize::MAX) * 4096;
                match self.tx.try_send((ri, off)) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                    // Behind: this range stays in 4 KiB pages.
                    Err(TrySendError::Full(_)) => {}
                }
            }
        }
    }
}

fn keep(memory: &GuestMemory, eligible: &[bool], rx: &Receiver<(usize, usize)>, stats: &HugeStats) {
    place_current_thread("huge-page keeper", false, 0, Some(SchedClass::Batch));
    let Ok(mut scanner) = Scanner::new() else {
        tracing::debug!("no PAGEMAP_SCAN: transparent huge pages are not restored");
        return;
    };
    while let Ok((ri, off)) = rx.recv() {
        if (ri, off) == SWEEP {
            sweep(memory, eligible, &mut scanner, stats);
            continue;
        }
        let Some(r) = memory.region(ri) else { continue };
        let start = r.addr() + off;
        let Ok(v) = scanner.scan(start, start + HUGE, Query::Populated) else {
            stats.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let full = v.iter().all(|x| x.categories & PAGE_IS_PFNZERO == 0)
            && v.iter().map(|x| x.end - x.start).sum::<usize>() == HUGE;
        if full && v.iter().all(|x| x.categories & PAGE_IS_HUGE != 0) {
            // Relaxed: statistics.
            stats.already_huge.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let ok = full && r.collapse(off, HUGE).is_ok();
        let c = if ok { &stats.collapsed } else { &stats.skipped };
        // Relaxed: statistics, read after the thread is joined.
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The final sweep: collapses each 2 MiB range of an eligible region that is
/// in 4 KiB pages and at least [`SWEEP_MIN_PAGES`] populated with data.
fn sweep(memory: &GuestMemory, eligible: &[bool], scanner: &mut Scanner, stats: &HugeStats) {
    for (ri, r) in memory.regions().iter().enumerate() {
        if !eligible.get(ri).copied().unwrap_or(false) {
            continue;
        }
        let Ok(ranges) = scanner.scan(r.addr(), r.addr() + r.len(), Query::Populated) else {
            continue;
        };
        // Data pages per 2 MiB range, and the ranges already huge.
        let mut data: std::collections::BTreeMap<usize, usize> = std::collections::BTreeMap::new();
        let mut huge = std::collections::BTreeSet::new();
        for x in &ranges {
            if x.categories & PAGE_IS_PFNZERO != 0 {
                continue;
            }
            let mut a = x.start - r.addr();
            let end = x.end - r.addr();
            while a < end {
                let chunk = a / HUGE;
                let stop = ((chunk + 1) * HUGE).min(end);
                *data.entry(chunk).or_default() += (stop - a) / 4096;
                if x.categories & PAGE_IS_HUGE != 0 {
                    huge.insert(chunk);
                }
                a = stop;
            }
        }
        for (&chunk, &pages) in &data {
            if pages < SWEEP_MIN_PAGES || huge.contains(&chunk) || (chunk + 1) * HUGE > r.len() {
                continue;
            }
            let ok = r.collapse(chunk * HUGE, HUGE).is_ok();
            let c = if ok { &stats.collapsed } else { &stats.skipped };
            // Relaxed: statistics.
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}
