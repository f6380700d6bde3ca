//! Installing pages that arrived, on any lane or from any page source:
//! `UFFDIO_COPY` straight from where the bytes landed, `UFFDIO_MOVE` out of a
//! private receive ring, `UFFDIO_ZEROPAGE` (or a copy of zeros on hugetlbfs)
//! for pages known to be zero. Then the present bitmap records them.
//!
//! Outcomes the kernel may give, and what they mean here:
//! - done: installed; the faulting threads on it are woken;
//! - `EEXIST`: the page is already present (it came by another lane, twice,
//!   or the guest wrote it after a zero fill); counted as a duplicate;
//! - `EAGAIN` with no progress: a non-cooperative event (REMOVE, from a
//!   balloon) is pending and must be read first: [`Installer::read_pending`]
//!   reads it here, marks what it removed, and hands the events to the fault
//!   loop; then the install is retried.
//!
//! One installer may serve several userfaultfds, one per address space
//! ([`Installer::for_tasks`]: the processes of a CRIU restore): each region
//! names its owner ([`RegionSpan::owner`](crate::space::RegionSpan)), and an
//! install goes to that owner's userfaultfd. In that mode a process that
//! exits is not an error: its ioctls fail with `ESRCH` (or `ENOSPC` before
//! Linux 4.18's rename), its pages can never be needed again and are marked
//! present ([`Installer::task_exited`]); an install into a range the process
//! unmapped (`ENOENT`) settles those pages the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ringfault_proto::PageKind;

use crate::bitmap::AtomicBitmap;
use crate::error::EngineError;
use crate::space::PageSpace;
use crate::stats::Counters;
use crate::sys::bufring::StreamRing;
use crate::sys::install::{copy, copy_mapped, move_out, zero, Landing};
use crate::sys::mapping::Mapping;
use crate::sys::notify::Notifier;
use crate::sys::uffd::{Event, Installed, Uffd, UffdError, UffdMsg};

/// Orders installs against REMOVE events, for a userfaultfd that delivers
/// them (a VMM's, with a balloon).
///
/// The hazard: a lane checks that page P is absent, then installs it. If
/// between the two a balloon's `MADV_DONTNEED` on P is queued, read, and its
/// zap completes, the install lands after the zap and P holds the source's
/// stale bytes where the guest must read zeros. The kernel only refuses
/// installs (`EAGAIN`) while the REMOVE event is queued and unread.
///
/// So every install holds the gate shared from its present-bit check to the
/// end of its ioctl, and whoever reads events holds it exclusive from before
/// the read until it has marked removed ranges present. An install either
/// ends before the event is read (the zap then removes what it installed),
/// or starts after the marking (and skips the page), or runs while the event
/// is queued (and gets `EAGAIN`, then re-checks). Installs under the gate are
/// at most [`GATED_CHUNK`] bytes, so a reader never waits long.
#[derive(Debug, Default)]
pub struct RemoveGate(std::sync::RwLock<()>);

/// Largest single install while a [`RemoveGate`] is in use.
pub const GATED_CHUNK: usize = 64 * 1024;

/// Bytes and 4 KiB pages of a range installed whole as a huge page.
const HUGE_BYTES: usize = super::huge::HUGE;
const HUGE_PAGES: u64 = (HUGE_BYTES / 4096) as u64;

impl RemoveGate {
    /// Held by an install, from its check to the end of its ioctl.
    pub fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    /// Held while events are read and applied.
    pub fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where a frame's pages are.
#[derive(Debug)]
pub enum Payload<'a> {
    /// Copy these bytes (`count * page_size` of them).
    Bytes(&'a [u8]),
    /// Move the pages at `offset` of the ring's unconsumed bytes.
    Ring(&'a mut StreamRing, usize),
    /// Copy from `offset` of a file mapping (never read in user space).
    Mapped(&'a Mapping, usize),
    /// The bytes a receive put in a landing, from its start: a huge
    /// landing holding a whole 2 MiB range is moved in as one huge page,
    /// anything else is copied from there.
    Landed(&'a mut Landing),
    /// Zero pages (sent as zero, never populated, or removed by a balloon).
    Zero,
}

/// Pages a whole move installed: its bytes in pages, 0 if it was refused.
fn moved_pages(r: &Result<Installed, UffdError>, ps: usize) -> u64 {
    match r {
        Ok(Installed::Done(b) | Installed::Again { done: b }) => (b / ps) as u64,
        Ok(Installed::Exists) | Err(_) => 0,
    }
}

/// What one install did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Pages this call made present.
    pub installed: u64,
    /// Pages that were present already.
    pub duplicates: u64,
}

/// Installs pages into guest memory; shared by every lane and page source.
#[derive(Debug)]
pub struct Installer {
    /// The userfaultfd the regions are registered with (owner 0: the only
    /// one unless the installer serves several processes).
    pub uffd: Uffd,
    /// The userfaultfds of owners 1, 2, ... ([`Installer::for_tasks`]).
    pub other_uffds: Vec<Uffd>,
    /// Per owner: its process exited ([`Installer::for_tasks`] only).
    gone: Vec<AtomicBool>,
    /// Whether `ESRCH`/`ENOENT` from an install mean the owner exited or
    /// unmapped the range, rather than an error.
    tasks: bool,
    /// The regions and where they live.
    pub space: PageSpace,
    /// One bit per global page: present, or known to read as zero.
    pub present: AtomicBitmap,
    /// Statistics.
    pub counters: Counters,
    /// Set when the userfaultfd may deliver REMOVE events.
    pub gate: Option<RemoveGate>,
    /// Events read off a userfaultfd (by owner) by an install that hit
    /// `EAGAIN`; the fault loop handles them next.
    pub backlog: Mutex<Vec<(u32, Event)>>,
    /// Wakes the fault loop (backlog filled, every page present, a lane failed).
    pub notifier: Notifier,
    /// A page of zeros the size of the largest page, for hugetlbfs zero fills
    /// (which cannot use `UFFDIO_ZEROPAGE`).
    zeros: std::sync::OnceLock<Vec<u8>>,
    /// Collapses completed 2 MiB ranges of THP regions (own memory only).
    pub huge: std::sync::OnceLock<super::huge::HugeKeeper>,
    /// Pre-copy: frames go straight into memory until the switch-over.
    pub precopy: std::sync::OnceLock<Arc<super::precopy::PrecopyGate>>,
}

impl Installer {
    /// An installer for `space` (whose regions live here, registered on `uffd`).
    pub fn new(
        uffd: Uffd,
        space: PageSpace,
        guard_removes: bool,
    ) -> Result<Installer, EngineError> {
        let total = space.total();
        Ok(Installer {
            uffd,
            other_uffds: Vec::new(),
            gone: Vec::new(),
            tasks: false,
            space,
            present: AtomicBitmap::new(total),
            counters: Counters::default(),
            gate: guard_removes.then(RemoveGate::default),
            backlog: Mutex::new(Vec::new()),
            notifier: Notifier::new().map_err(|e| EngineError::io("creating an eventfd", e))?,
            zeros: std::sync::OnceLock::new(),
            huge: std::sync::OnceLock::new(),
            precopy: std::sync::OnceLock::new(),
        })
    }

    /// An installer for several processes: `uffds[k]` serves the regions
    /// whose owner is `k`. A process that exits, or unmaps part of its
    /// memory, settles its pages instead of failing installs (module docs).
    pub fn for_tasks(
        uffds: Vec<Uffd>,
        space: PageSpace,
        guard_removes: bool,
    ) -> Result<Installer, EngineError> {
        let n = uffds.len();
        if n == 0 || usize::try_from(space.owners()).unwrap_or(usize::MAX) > n {
            return Err(EngineError::Internal(format!(
                "{n} userfaultfds for regions of {} owners",
                space.owners()
            )));
        }
        let mut it = uffds.into_iter();
        let first = it
            .next()
            .ok_or_else(|| EngineError::Internal("no userfaultfd".into()))?;
        let mut inst = Installer::new(first, space, guard_removes)?;
        inst.other_uffds = it.collect();
        inst.gone = (0..n).map(|_| AtomicBool::new(false)).collect();
        inst.tasks = true;
        Ok(inst)
    }

    /// The userfaultfds this installer serves (1 unless [`Installer::for_tasks`]).
    pub fn uffd_count(&self) -> u32 {
        u32::try_from(1 + self.other_uffds.len()).unwrap_or(u32::MAX)
    }

    /// The userfaultfd of `owner`.
    pub fn uffd_of(&self, owner: u32) -> Option<&Uffd> {
        match owner {
            0 => Some(&self.uffd),
            k => self
                .other_uffds
                .get(usize::try_from(k - 1).unwrap_or(usize::MAX)),
        }
    }

    fn owner_uffd(&self, owner: u32) -> Result<&Uffd, EngineError> {
        self.uffd_of(owner)
            .ok_or_else(|| EngineError::Internal(format!("no userfaultfd for owner {owner}")))
    }

    /// Whether `owner`'s process exited (always false outside
    /// [`Installer::for_tasks`]).
    pub fn is_gone(&self, owner: u32) -> bool {
        // Acquire: pairs with the Release in `task_exited`, so a reader that
        // sees the flag also sees the owner's pages marked present.
        self.gone
            .get(usize::try_from(owner).unwrap_or(usize::MAX))
            .is_some_and(|g| g.load(Ordering::Acquire))
    }

    /// Owners whose process exited.
    pub fn gone_count(&self) -> usize {
        self.gone
            .iter()
            .filter(|g| g.load(Ordering::Acquire))
            .count()
    }

    /// `owner`'s process exited: none of its pages will ever be needed, so
    /// all are marked present. Returns whether this call recorded it.
    pub fn task_exited(&self, owner: u32) -> bool {
        let Some(flag) = self.gone.get(usize::try_from(owner).unwrap_or(usize::MAX)) else {
            return false;
        };
        if flag.load(Ordering::Acquire) {
            return false;
        }
        for s in self.space.spans().iter().filter(|s| s.owner == owner) {
            self.present.set_range(s.first, s.pages);
        }
        // Release: the pages above are marked before anyone sees the flag.
        let first = !flag.swap(true, Ordering::AcqRel);
        if self.present.all_set() {
            self.notifier.notify();
        }
        first
    }

    /// In [`Installer::for_tasks`] mode, what an ioctl error on `owner`'s
    /// userfaultfd means: `Some(true)` the process exited (recorded here),
    /// `Some(false)` the range is no longer registered or mapped (the caller
    /// settles it); `None` a real error.
    fn task_gone_error(&self, owner: u32, e: &UffdError) -> Option<bool> {
        if !self.tasks {
            return None;
        }
        let errno = match e {
            UffdError::Range { source, .. } | UffdError::Read { source } => source.raw_os_error(),
            _ => None,
        };
        match errno {
            Some(libc::ESRCH | libc::ENOSPC) => {
                if self.task_exited(owner) {
                    tracing::info!("process of userfaultfd {owner} exited; its pages are dropped");
                }
                Some(true)
            }
            Some(libc::ENOENT) => Some(false),
            _ => None,
        }
    }

    /// Installs `count` pages of region index `ri` from page `first`, skipping
    /// pages already present. Every page installed (or found present) has its
    /// bit set before this returns.
    pub fn install(
        &self,
        ri: usize,
        first: u64,
        count: u64,
        kind: PageKind,
        mut payload: Payload<'_>,
    ) -> Result<Outcome, EngineError> {
        let span = *self
            .space
            .span(ri)
            .ok_or_else(|| EngineError::Internal(format!("install into region index {ri}")))?;
        if first.checked_add(count).is_none_or(|e| e > span.pages) || span.base == 0 {
            return Err(EngineError::Internal(format!(
                "install of pages {first}+{count} outside region {} of {} pages",
                span.id, span.pages
            )));
        }
        let ps = span.page_size;
        let hugetlb = ps != 4096;
        let uffd = self.owner_uffd(span.owner)?;
        let mut out = Outcome::default();
        let mut p = 0u64;
        // Pages from here on may be tried as whole huge pages (a refused
        // attempt is not repeated for the same range).
        let mut whole_from = 0u64;
        // Pages installed in 4 KiB pages (the keeper may collapse their ranges).
        let mut small = 0u64;
        // A huge landing partly moved out: cleared at the end (it holds a
        // split page, which would not move whole again).
        let mut split_landing = false;
        // Each pass re-reads the present bits, so that a retry after EAGAIN
        // (when a REMOVE may have changed what is wanted) never installs stale
        // data over a page that was resolved meanwhile.
        while p < count {
            let guard = self.gate.as_ref().map(RemoveGate::shared);
            let g = span.first + first + p;
            if self.present.is_set(g) {
                out.duplicates += 1;
                p += 1;
                continue;
            }
            // A whole aligned 2 MiB range none of whose pages is present goes
            // in as one huge page: moved straight out of a huge landing the
            // bytes were received into, or copied into a stage and moved.
            // Anything short of a whole move falls through to the 4 KiB
            // installs below, which re-read the present bits and classify
            // errors.
            let whole = match (self.huge.get(), &mut payload, kind) {
                (Some(h), Payload::Landed(land), PageKind::Data)
                    if p == 0
                        && land.is_huge()
                        && guard.is_none()
                        && h.whole_at(ri, first, count) =>
                {
                    whole_from = HUGE_PAGES;
                    if self.present.count_range(g, HUGE_PAGES) == 0 {
                        let r = h.move_landed(uffd, span.addr_of(first), land);
                        let done = moved_pages(&r, ps);
                        // A refused move may have split the landing's page.
                        split_landing = done != HUGE_PAGES;
                        Some((done, true))
                    } else {
                        None
                    }
                }
                (Some(h), Payload::Bytes(bytes), PageKind::Data)
                    if p >= whole_from
                        && guard.is_none()
                        && h.whole_at(ri, first + p, count - p) =>
                {
                    whole_from = p + HUGE_PAGES;
                    if self.present.count_range(g, HUGE_PAGES) == 0 {
                        let off = usize::try_from(p).unwrap_or(0) * ps;
                        let src = bytes.get(off..off + HUGE_BYTES).ok_or_else(|| {
                            EngineError::Internal("payload shorter than its pages".into())
                        })?;
                        let r = h.install_whole(uffd, span.addr_of(first + p), src);
                        Some((moved_pages(&r, ps), false))
                    } else {
                        None
                    }
                }
                _ => None,
            };
            if let Some((done, landed)) = whole.filter(|&(done, _)| done > 0) {
                self.present.set_range(g, done);
                out.installed += done;
                p += done;
                if done == HUGE_PAGES {
                    Counters::add(&self.counters.huge_moves, 1);
                    if landed {
                        Counters::add(&self.counters.landed_moves, 1);
                    }
                } else {
                    small += done;
                }
                continue;
            }
            let max_run = if guard.is_some() {
                (GATED_CHUNK / ps).max(1) as u64
            } else {
                u64::MAX
            };
            let mut n = 1;
            while p + n < count && n < max_run && !self.present.is_set(g + n) {
                n += 1;
            }
            let off = usize::try_from(p).unwrap_or(0) * ps;
            let len = usize::try_from(n).unwrap_or(0) * ps;
            let dst = span.addr_of(first + p);
            let res = match &mut payload {
                Payload::Bytes(bytes) => {
                    let src = bytes.get(off..off + len).ok_or_else(|| {
                        EngineError::Internal("payload shorter than its pages".into())
                    })?;
                    copy(uffd, dst, src, true)
                }
                Payload::Landed(land) => {
                    let src = land.as_slice().get(off..off + len).ok_or_else(|| {
                        EngineError::Internal("payload shorter than its pages".into())
                    })?;
                    copy(uffd, dst, src, true)
                }
                Payload::Ring(ring, base) => move_out(uffd, dst, ring, *base + off, len),
                Payload::Mapped(map, base) => copy_mapped(uffd, dst, map, *base + off, len, true),
                Payload::Zero if hugetlb => {
                    let z = self
                        .zeros
                        .get_or_init(|| vec![0u8; self.space.largest_page()]);
                    let mut done = 0usize;
                    let mut last = Installed::Done(0);
                    let mut failed = None;
                    while done < len {
                        match copy(uffd, dst + done, &z[..ps], true) {
                            Ok(r) => last = r,
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                        match last {
                            Installed::Done(b) => done += b,
                            _ => break,
                        }
                    }
                    match (failed, last) {
                        (Some(e), _) => Err(e),
                        (None, Installed::Done(_)) => Ok(Installed::Done(done)),
                        (None, Installed::Again { done: d }) => {
                            Ok(Installed::Again { done: done + d })
                        }
                        (None, Installed::Exists) if done > 0 => Ok(Installed::Again { done }),
                        (None, Installed::Exists) => Ok(Installed::Exists),
                    }
                }
                Payload::Zero => zero(uffd, dst, len, true),
            };
            drop(guard);
            let res = match res {
                Ok(r) => r,
                Err(e) => match self.task_gone_error(span.owner, &e) {
                    // Exited: every page of the owner is marked present now.
                    Some(true) => return Ok(out),
                    // Unmapped under us: nobody can fault on these pages
                    // at this address again.
                    Some(false) => {
                        let settled = self.present.set_range(g, n);
                        Counters::add(&self.counters.removed_pages, settled);
                        out.duplicates += n;
                        p += n;
                        continue;
                    }
                    None => return Err(e.into()),
                },
            };
            let installed = match res {
                Installed::Done(b) | Installed::Again { done: b } => (b / ps) as u64,
                Installed::Exists => {
                    self.present.set_range(g, 1);
                    out.duplicates += 1;
                    p += 1;
                    continue;
                }
            };
            if installed == 0 {
                Counters::add(&self.counters.eagain_retries, 1);
                self.read_pending_of(span.owner)?;
                continue;
            }
            self.present.set_range(g, installed);
            out.installed += installed;
            small += installed;
            p += installed;
        }
        if let (true, Payload::Landed(land)) = (split_landing, &mut payload) {
            land.clear();
        }
        match kind {
            PageKind::Zero => Counters::add(&self.counters.zero_pages, out.installed),
            PageKind::Unpopulated => Counters::add(&self.counters.unpopulated_pages, out.installed),
            PageKind::Data => {}
        }
        Counters::add(&self.counters.duplicate_pages, out.duplicates);
        if let (Some(h), PageKind::Data, true) = (self.huge.get(), kind, small > 0) {
            h.installed(ri, &span, first, count, &self.present);
        }
        if self.present.all_set() {
            self.notifier.notify();
        }
        Ok(out)
    }

    /// Resolves a fault on a page whose bit is already set: a zero page if it
    /// is known to be zero and still missing (never populated on the source,
    /// or removed by a balloon), otherwise (it arrived after the fault was
    /// queued) a wake-up of the faulting threads.
    pub fn resolve_settled(&self, ri: usize, page: u64) -> Result<(), EngineError> {
        let Some(s) = self.space.span(ri).copied() else {
            return Ok(());
        };
        self.zero_fill(s.owner, s.addr_of(page), s.page_size)
    }

    /// Resolves a fault at `dst` (one page of `page_size` bytes) in the
    /// address space of `owner` with a zero page, or wakes its threads if
    /// the page is there already. For faults outside every region where the
    /// owner's memory is known to read as zero (CRIU: registered, never
    /// populated), and for known-zero pages ([`Installer::resolve_settled`]).
    pub fn zero_fill(&self, owner: u32, dst: usize, page_size: usize) -> Result<(), EngineError> {
        let uffd = self.owner_uffd(owner)?;
        loop {
            let res = if page_size == 4096 {
                let _g = self.gate.as_ref().map(RemoveGate::shared);
                zero(uffd, dst, page_size, true)
            } else {
                let z = self
                    .zeros
                    .get_or_init(|| vec![0u8; self.space.largest_page()]);
                let _g = self.gate.as_ref().map(RemoveGate::shared);
                copy(uffd, dst, &z[..page_size.min(z.len())], true)
            };
            let res = match res {
                Ok(r) => r,
                // No longer registered: unregistering woke the thread already.
                Err(crate::sys::uffd::UffdError::Range { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    return Ok(())
                }
                Err(e) if self.task_gone_error(owner, &e).is_some() => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match res {
                Installed::Done(_) => {
                    Counters::add(&self.counters.zero_faults, 1);
                    return Ok(());
                }
                Installed::Exists => {
                    match uffd.wake(dst, page_size) {
                        Ok(()) => {}
                        Err(e) if self.task_gone_error(owner, &e).is_some() => {}
                        Err(e) => return Err(e.into()),
                    }
                    return Ok(());
                }
                Installed::Again { done } if done > 0 => return Ok(()),
                Installed::Again { .. } => self.read_pending_of(owner)?,
            }
        }
    }

    /// Reads the events that block installs: marks removed ranges at once (so
    /// that no install lands in them after the kernel's zap) and queues every
    /// event for the fault loop.
    pub fn read_pending(&self) -> Result<(), EngineError> {
        self.read_pending_of(0)
    }

    /// [`Installer::read_pending`] for the userfaultfd of `owner`.
    pub fn read_pending_of(&self, owner: u32) -> Result<(), EngineError> {
        let uffd = self.owner_uffd(owner)?;
        let _g = self.gate.as_ref().map(RemoveGate::exclusive);
        let mut msgs = [UffdMsg::default(); 16];
        let n = match uffd.read_events(&mut msgs) {
            Ok(n) => n,
            Err(e) if self.task_gone_error(owner, &e).is_some() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            // Not a pending event: let whoever holds the mm lock finish.
            std::thread::yield_now();
            return Ok(());
        }
        let mut events = Vec::with_capacity(n);
        for m in msgs.iter().take(n) {
            let ev = m.parse();
            if let Event::Remove { start, end } = ev {
                self.mark_removed_in(owner, start, end);
            }
            events.push((owner, ev));
        }
        if let Ok(mut b) = self.backlog.lock() {
            b.extend(events);
        }
        self.notifier.notify();
        Ok(())
    }

    /// A balloon (MADV_DONTNEED) dropped `start..end`: whatever the source
    /// still has for those pages is stale. Mark them present so that no lane
    /// installs old bytes; a later fault there gets a zero page.
    pub fn mark_removed(&self, start: u64, end: u64) {
        self.mark_removed_in(0, start, end);
    }

    /// [`Installer::mark_removed`] in the address space of userfaultfd
    /// `owner` (also used for ranges a CRIU-restored process unmapped).
    pub fn mark_removed_in(&self, owner: u32, start: u64, end: u64) {
        for s in self.space.spans() {
            if s.base == 0 || s.owner != owner {
                continue;
            }
            let lo = usize::try_from(start).unwrap_or(usize::MAX).max(s.base);
            let hi = usize::try_from(end).unwrap_or(0).min(s.base + s.len());
            if lo < hi {
                let first = ((lo - s.base) >> s.shift) as u64;
                let last = ((hi - s.base).div_ceil(s.page_size)) as u64;
                self.present.set_range(s.first + first, last - first);
                Counters::add(&self.counters.removed_pages, last - first);
            }
        }
        if self.present.all_set() {
            self.notifier.notify();
        }
    }

    /// Marks known-zero pages (never populated on the source) present without
    /// installing anything: they read as zero once unregistered, and a fault
    /// on one before that is filled locally.
    pub fn mark_zero(&self, ri: usize, first: u64, count: u64) -> u64 {
        let Some(s) = self.space.span(ri) else {
            return 0;
        };
        let count = count.min(s.pages.saturating_sub(first));
        let n = self.present.set_range(s.first + first, count);
        Counters::add(&self.counters.unpopulated_pages, n);
        if self.present.all_set() {
            self.notifier.notify();
        }
        n
    }
}
