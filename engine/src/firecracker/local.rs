//! Local mode: serve Firecracker's page faults from a snapshot memory file.
//!
//! # Mechanism
//!
//! The memory file is mapped private and read-only; a faulting page is installed
//! with one `UFFDIO_COPY` straight from that mapping (no staging copy), or with
//! `UFFDIO_ZEROPAGE` when the file's page is all zeros (not on hugetlbfs, where
//! zeros are copied). After the first fault, the same thread fills every other
//! page in runs of up to [`LocalOptions::background_run_bytes`] between polls, so a fault waits
//! behind at most one run. Once every page is present the regions are
//! unregistered: from then on the kernel itself serves a balloon's re-faults with
//! zero pages, and the loop only waits for Firecracker to go away.
//!
//! One thread does everything, and it is the only reader of the userfaultfd. So a
//! REMOVE cannot complete (Firecracker's `madvise` waits until the event is read)
//! between the moment a page is chosen and its install: an install either lands
//! before the range is zapped, or fails with `EAGAIN`.
//!
//! # Page states
//!
//! One bit per page, `resolved`: the page was installed, or a balloon removed it.
//! - clear: a fault installs the file's page;
//! - set: a fault is either stale (the page arrived after the fault was queued; it
//!   is woken) or a re-fault after a REMOVE, which gets a zero page, never the
//!   snapshot's bytes. `UFFDIO_ZEROPAGE` tells the two apart (`EEXIST` for a present
//!   page).
//!
//! # Hazards
//!
//! - A pending REMOVE makes every install fail with `EAGAIN`: every event then
//!   pending is read and applied (REMOVEs at once, faults queued), and the install
//!   is retried after checking the page's bit again.
//! - A fault may be read before the REMOVE that caused it: REMOVEs are applied as
//!   soon as they are read, before any queued fault is served.
//! - When Firecracker dies, its memory goes first (`ESRCH` from every ioctl) and
//!   its socket closes a moment later: an ioctl error is taken as Firecracker's
//!   exit if the socket closes within [`EXIT_PATIENCE`].

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handshake::{peer_gone, wait_peer_gone, Handshake};
use super::mappings::{check_against_file, GuestRegionMapping};
use super::stats::HandlerStats;
use super::{Ended, FirecrackerError};
use crate::bitmap::AtomicBitmap;
use crate::sys::guest::wait_readable;
use crate::sys::install::{copy_from, copy_from_mapping, zero};
use crate::sys::mapping::{AlignedBuf, GuestMapping};
use crate::sys::uffd::{Event, Installed, Uffd, UffdMsg};

/// Default of [`LocalOptions::background_run_bytes`].
pub const BACKGROUND_RUN_BYTES: usize = 256 << 10;

/// How long the loop sleeps when idle before it looks again.
const IDLE_POLL_MS: i32 = 500;

/// How long an ioctl failure waits for Firecracker's socket to close.
pub const EXIT_PATIENCE: Duration = Duration::from_millis(500);

/// Local-mode settings.
#[derive(Debug, Clone, Copy)]
pub struct LocalOptions {
    /// Fill every page in the background after the first fault.
    pub background: bool,
    /// Unregister the regions once every page is present.
    pub unregister_when_complete: bool,
    /// Most bytes the background fill installs between two polls (at least one
    /// page): a fault waits behind one such run at most.
    pub background_run_bytes: usize,
}

impl Default for LocalOptions {
    fn default() -> LocalOptions {
        LocalOptions {
            background: true,
            unregister_when_complete: true,
            background_run_bytes: BACKGROUND_RUN_BYTES,
        }
    }
}

/// Serves Firecracker's faults from `file` until Firecracker goes away.
///
/// Fails at once, before any fault is served, if a region does not fit in the
/// file.
pub fn serve_local(
    hs: Handshake,
    file: &File,
    opts: LocalOptions,
    stats: Arc<HandlerStats>,
) -> Result<Ended, FirecrackerError> {
    let file_err = |what: &str, source| FirecrackerError::MemoryFile {
        what: what.to_owned(),
        source,
    };
    let file_len = file
        .metadata()
        .map_err(|e| file_err("reading its size", e))?
        .len();
    let used = check_against_file(&hs.mappings, file_len)?;
    let map_len = usize::try_from(used).map_err(|_| {
        file_err(
            "mapping it",
            std::io::Error::other("larger than the address space"),
        )
    })?;
    let memory = GuestMapping::map_file(file, map_len)?;
    stats.begin();
    let mut handler = LocalHandler::new(hs, memory, opts, stats)?;
    handler.run()
}

/// A region as the fault loop sees it.
#[derive(Debug, Clone, Copy)]
struct Region {
    base: usize,
    len: usize,
    page_size: usize,
    /// Offset of its first byte in the memory file.
    file_offset: usize,
    /// Global index of its first page in `resolved`.
    first: u64,
    pages: u64,
    /// `UFFDIO_ZEROPAGE` works here (not hugetlbfs).
    zeropage: bool,
}

impl Region {
    fn page_addr(&self, page: u64) -> usize {
        self.base + to_usize(page) * self.page_size
    }
}

/// What one install attempt did.
enum Step {
    /// This many pages were installed.
    Installed(u64),
    /// The first page was present already.
    Exists,
    /// A pending event blocked the install; read events, then retry.
    Again,
}

struct LocalHandler {
    hs_stream: std::os::unix::net::UnixStream,
    uffd: Uffd,
    regions: Vec<Region>,
    memory: GuestMapping,
    resolved: AtomicBitmap,
    opts: LocalOptions,
    stats: Arc<HandlerStats>,
    events: Vec<UffdMsg>,
    /// Faults read but not served yet: address and when it was read.
    backlog: VecDeque<(u64, Instant)>,
    /// Zeros to copy on hugetlbfs, where `UFFDIO_ZEROPAGE` does not exist.
    zeros: Option<AlignedBuf>,
    cursor: u64,
    faulted: bool,
    complete: bool,
    /// False once the regions are unregistered: the userfaultfd has no more work.
    watching: bool,
    /// Events read so far.
    events_read: u64,
}

impl LocalHandler {
    fn new(
        hs: Handshake,
        memory: GuestMapping,
        opts: LocalOptions,
        stats: Arc<HandlerStats>,
    ) -> Result<LocalHandler, FirecrackerError> {
        let mut regions = Vec::with_capacity(hs.mappings.len());
        let mut first = 0u64;
        let mut largest_huge = 0usize;
        for m in &hs.mappings {
            let r = region_of(m, first)?;
            if !r.zeropage {
                largest_huge = largest_huge.max(r.page_size);
            }
            first += r.pages;
            regions.push(r);
        }
        let zeros = if largest_huge > 0 {
            Some(AlignedBuf::new(largest_huge)?)
        } else {
            None
        };
        HandlerStats::add(&stats.pages_total, first);
        Ok(LocalHandler {
            hs_stream: hs.stream,
            uffd: Uffd::from_fd(hs.uffd),
            regions,
            memory,
            resolved: AtomicBitmap::new(first),
            opts,
            stats,
            events: vec![UffdMsg::default(); 64],
            backlog: VecDeque::new(),
            zeros,
            cursor: 0,
            faulted: false,
            complete: false,
            watching: true,
            events_read: 0,
        })
    }

    fn run(&mut self) -> Result<Ended, FirecrackerError> {
        loop {
            match self.step() {
                Ok(Some(ended)) => return Ok(ended),
                Ok(None) => {}
                Err(e) => {
                    if wait_peer_gone(&self.hs_stream, EXIT_PATIENCE) {
                        tracing::info!("Firecracker went away ({e})");
                        return Ok(Ended::PeerGone);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// One turn of the loop: poll, read events, serve faults, fill one run.
    fn step(&mut self) -> Result<Option<Ended>, FirecrackerError> {
        let filling = self.opts.background && self.faulted && !self.complete;
        let timeout = if filling || !self.backlog.is_empty() {
            0
        } else {
            IDLE_POLL_MS
        };
        // The socket first: its end of file must be seen even while the
        // userfaultfd is busy.
        let fds = [self.hs_stream.as_fd(), self.uffd.as_fd()];
        let watched = if self.watching { &fds[..] } else { &fds[..1] };
        let ready = wait_readable(watched, timeout)
            .map_err(|e| FirecrackerError::io("polling the userfaultfd and the socket", e))?;
        if ready[0] && peer_gone(&self.hs_stream) {
            return Ok(Some(Ended::PeerGone));
        }
        if !self.watching {
            return Ok(None);
        }
        self.read_events()?;
        while let Some((addr, read_at)) = self.backlog.pop_front() {
            self.serve_fault(addr)?;
            self.stats.record_fault(read_at.elapsed());
        }
        if filling {
            self.fill_next()?;
        }
        self.check_complete()?;
        Ok(None)
    }

    /// Reads every pending event: REMOVEs are applied at once, faults queued.
    fn read_events(&mut self) -> Result<(), FirecrackerError> {
        loop {
            let n = self.uffd.read_events(&mut self.events)?;
            if n == 0 {
                return Ok(());
            }
            let now = Instant::now();
            self.events_read += n as u64;
            for i in 0..n {
                match self.events[i].parse() {
                    Event::PageFault { addr, .. } => {
                        HandlerStats::add(&self.stats.faults, 1);
                        self.faulted = true;
                        self.backlog.push_back((addr, now));
                    }
                    Event::Remove { start, end } => self.removed(start, end),
                    Event::Unmap { start, end } => {
                        tracing::warn!("guest memory {start:#x}..{end:#x} was unmapped");
                    }
                    other => tracing::warn!("unexpected userfaultfd event ignored: {other:?}"),
                }
            }
        }
    }

    /// A balloon dropped `start..end`: those pages read as zeros from now on.
    fn removed(&mut self, start: u64, end: u64) {
        for r in &self.regions {
            let lo = to_usize(start).max(r.base);
            let hi = to_usize(end).min(r.base + r.len);
            if lo < hi {
                let first = ((lo - r.base) / r.page_size) as u64;
                let last = (hi - r.base).div_ceil(r.page_size) as u64;
                let newly = self.resolved.set_range(r.first + first, last - first);
                HandlerStats::add(&self.stats.pages_present, newly);
                HandlerStats::add(&self.stats.removed_pages, last - first);
            }
        }
    }

    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let addr = to_usize(addr);
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (addr >= r.base && addr < r.base + r.len)
                .then(|| (i, ((addr - r.base) / r.page_size) as u64))
        })
    }

    /// Resolves one fault.
    fn serve_fault(&mut self, addr: u64) -> Result<(), FirecrackerError> {
        let Some((ri, page)) = self.locate(addr) else {
            tracing::warn!("fault at {addr:#x} outside every guest memory region; ignored");
            return Ok(());
        };
        let r = self.regions[ri];
        let g = r.first + page;
        loop {
            let step = if self.resolved.is_set(g) {
                self.install_zero(ri, page)?
            } else {
                self.install_run(ri, page, 1)?
            };
            match step {
                Step::Installed(_) => return Ok(()),
                Step::Exists => {
                    // Present already (stale fault): make sure the thread runs.
                    HandlerStats::add(&self.stats.stale_faults, 1);
                    self.uffd.wake(r.page_addr(page), r.page_size)?;
                    return Ok(());
                }
                Step::Again => self.events_then_retry()?,
            }
        }
    }

    /// After `EAGAIN`: reads the pending events. If there were none, the thread
    /// whose REMOVE we read is yet to finish its `madvise`; let it run.
    fn events_then_retry(&mut self) -> Result<(), FirecrackerError> {
        let before = self.events_read;
        self.read_events()?;
        if self.events_read == before {
            std::thread::yield_now();
        }
        Ok(())
    }

    /// A fault on a page a balloon removed: a zero page.
    fn install_zero(&mut self, ri: usize, page: u64) -> Result<Step, FirecrackerError> {
        let r = self.regions[ri];
        let dst = r.page_addr(page);
        let res = if r.zeropage {
            zero(&self.uffd, dst, r.page_size, true)?
        } else {
            let zeros = self
                .zeros
                .as_ref()
                .map(|z| &z.as_slice()[..r.page_size])
                .unwrap_or(&[]);
            copy_from(&self.uffd, dst, zeros, true)?
        };
        Ok(match res {
            Installed::Done(_) | Installed::Again { done: 1.. } => {
                HandlerStats::add(&self.stats.removed_faults, 1);
                HandlerStats::add(&self.stats.pages_zeroed, 1);
                Step::Installed(1)
            }
            Installed::Exists => Step::Exists,
            Installed::Again { done: 0 } => {
                HandlerStats::add(&self.stats.eagain_retries, 1);
                Step::Again
            }
        })
    }

    /// Installs from the file up to `max` pages from `page` of region `ri` whose
    /// bits are clear (the first one must be), as one run of data (COPY) or of
    /// zeros (ZEROPAGE).
    fn install_run(&mut self, ri: usize, page: u64, max: u64) -> Result<Step, FirecrackerError> {
        let r = self.regions[ri];
        let g = r.first + page;
        let is_zero = |p: u64| -> Result<bool, FirecrackerError> {
            if !r.zeropage {
                return Ok(false);
            }
            let off = r.file_offset + to_usize(p) * r.page_size;
            Ok(self.memory.is_zero(off, r.page_size)?)
        };
        let zero_run = is_zero(page)?;
        let mut n = 1u64;
        while n < max
            && page + n < r.pages
            && !self.resolved.is_set(g + n)
            && is_zero(page + n)? == zero_run
        {
            n += 1;
        }
        let dst = r.page_addr(page);
        let len = to_usize(n) * r.page_size;
        let res = if zero_run {
            zero(&self.uffd, dst, len, true)?
        } else {
            let off = r.file_offset + to_usize(page) * r.page_size;
            copy_from_mapping(&self.uffd, dst, &self.memory, off, len, true)?
        };
        let done = match res {
            Installed::Done(b) | Installed::Again { done: b } => (b / r.page_size) as u64,
            Installed::Exists => {
                let newly = self.resolved.set_range(g, 1);
                HandlerStats::add(&self.stats.pages_present, newly);
                return Ok(Step::Exists);
            }
        };
        if done == 0 {
            HandlerStats::add(&self.stats.eagain_retries, 1);
            return Ok(Step::Again);
        }
        let newly = self.resolved.set_range(g, done);
        HandlerStats::add(&self.stats.pages_present, newly);
        if zero_run {
            HandlerStats::add(&self.stats.pages_zeroed, done);
        } else {
            HandlerStats::add(&self.stats.pages_copied, done);
            HandlerStats::add(&self.stats.bytes_served, done * r.page_size as u64);
        }
        Ok(Step::Installed(done))
    }

    /// Background fill: one run of missing pages at or after the cursor.
    fn fill_next(&mut self) -> Result<(), FirecrackerError> {
        let Some(g) = self
            .resolved
            .next_clear(self.cursor)
            .or_else(|| self.resolved.next_clear(0))
        else {
            return Ok(());
        };
        let Some(ri) = self
            .regions
            .iter()
            .position(|r| g >= r.first && g < r.first + r.pages)
        else {
            return Ok(());
        };
        let r = self.regions[ri];
        let per_run = (self.opts.background_run_bytes / r.page_size).max(1) as u64;
        match self.install_run(ri, g - r.first, per_run)? {
            Step::Installed(n) => self.cursor = g + n,
            Step::Exists => self.cursor = g + 1,
            Step::Again => self.events_then_retry()?,
        }
        Ok(())
    }

    fn check_complete(&mut self) -> Result<(), FirecrackerError> {
        if self.complete || !self.resolved.all_set() {
            return Ok(());
        }
        self.complete = true;
        self.stats.mark_all_present();
        tracing::info!(
            "every page is present after {:.3} s",
            self.stats
                .all_present_after()
                .unwrap_or_default()
                .as_secs_f64()
        );
        if self.opts.unregister_when_complete {
            // Faults still queued are on present pages; unregistering wakes them.
            for r in &self.regions {
                self.uffd.unregister(r.base, r.len)?;
            }
            self.backlog.clear();
            self.watching = false;
        }
        Ok(())
    }
}

fn region_of(m: &GuestRegionMapping, first: u64) -> Result<Region, FirecrackerError> {
    let too_big = || {
        FirecrackerError::Mappings(super::MappingsError::Overflow {
            index: 0,
            what: "a region that does not fit this address space",
        })
    };
    let base = usize::try_from(m.base_host_virt_addr).map_err(|_| too_big())?;
    let len = usize::try_from(m.size).map_err(|_| too_big())?;
    let page_size = usize::try_from(m.page_size).map_err(|_| too_big())?;
    let file_offset = usize::try_from(m.offset).map_err(|_| too_big())?;
    Ok(Region {
        base,
        len,
        page_size,
        file_offset,
        first,
        pages: m.pages(),
        zeropage: page_size == 4096,
    })
}

fn to_usize(v: u64) -> usize {
    // Addresses and page indexes of mapped memory fit in usize on 64-bit Linux;
    // saturate rather than wrap anywhere else.
    usize::try_from(v).unwrap_or(usize::MAX)
}
