//! Installing pages that arrived, on any lane: `UFFDIO_COPY` from a receive buffer
//! (or `UFFDIO_MOVE` out of it), `UFFDIO_ZEROPAGE` for zero and never-populated
//! pages. Then the present bitmap records them.
//!
//! Outcomes the kernel may give, and what they mean here:
//! - done: installed; the faulting threads on it are woken;
//! - `EEXIST`: the page is already present (it came by the other lane, or twice);
//!   counted as a duplicate, never an error;
//! - `EAGAIN` with no progress: a non-cooperative event (REMOVE, from a balloon) is
//!   pending and must be read first; the caller's `on_again` does that, then we retry.

use ringfault_proto::PageKind;

use crate::bitmap::AtomicBitmap;
use crate::error::EngineError;
use crate::stats::Counters;
use crate::sys::install::{copy_from, move_from, zero};
use crate::sys::mapping::AlignedBuf;
use crate::sys::uffd::{Installed, Uffd};

/// Where a destination region lives in this process.
#[derive(Debug, Clone, Copy)]
pub struct DestRegion {
    /// Wire id.
    pub id: u32,
    /// Address of its first byte.
    pub base: usize,
    /// Length in bytes.
    pub len: usize,
    /// Page size in bytes.
    pub page_size: usize,
    /// Global index of its first page.
    pub first_global: u64,
    /// Pages.
    pub pages: u64,
}

/// The payload of a frame, as it sits in a receive buffer.
#[derive(Debug)]
pub enum Payload<'a> {
    /// Copy these bytes (`count * page_size` of them).
    Copy(&'a [u8]),
    /// Move `len` bytes at `offset` out of this buffer.
    Move(&'a mut AlignedBuf, usize),
    /// Zero pages (sent as zero, or never populated).
    Zero,
}

/// What one install did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Pages this call made present.
    pub installed: u64,
    /// Pages that were present already.
    pub duplicates: u64,
}

/// Installs pages into guest memory. Shared by the fault worker and bulk workers.
#[derive(Debug)]
pub struct Installer<'a> {
    /// The userfaultfd the regions are registered with.
    pub uffd: &'a Uffd,
    /// The regions, in layout order.
    pub regions: &'a [DestRegion],
    /// One bit per global page.
    pub present: &'a AtomicBitmap,
    /// Statistics.
    pub counters: &'a Counters,
    /// Set when the userfaultfd may deliver REMOVE events (a VMM's, e.g. with a
    /// balloon): see [`RemoveGate`].
    pub gate: Option<&'a RemoveGate>,
}

/// Orders installs against REMOVE events, for a userfaultfd that delivers them.
///
/// The hazard: a lane checks that page P is absent, then installs it. If between the
/// two a balloon's `MADV_DONTNEED` on P is queued, read, and its zap completes, the
/// install lands after the zap and P holds the source's stale bytes where the guest
/// must read zeros. The kernel only refuses installs (`EAGAIN`) while the REMOVE
/// event is queued and unread.
///
/// So every install holds the gate shared from its present-bit check to the end of
/// its ioctl, and the fault worker holds it exclusive from before it reads events
/// until it has marked removed ranges present. An install either ends before the
/// event is read (the zap then removes what it installed), or starts after the
/// marking (and skips the page), or runs while the event is queued (and gets
/// `EAGAIN`, then re-checks). Installs under the gate are at most [`GATED_CHUNK`]
/// bytes, so the fault worker never waits long for the gate.
#[derive(Debug, Default)]
pub struct RemoveGate(std::sync::RwLock<()>);

/// Largest single install while a [`RemoveGate`] is in use.
pub const GATED_CHUNK: usize = 64 * 1024;

impl RemoveGate {
    /// Held by an install, from its check to the end of its ioctl.
    pub fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    /// Held by the fault worker while it reads and applies events.
    pub fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Installer<'_> {
    /// Installs `count` pages of region `ri` from page `first`. `on_again` is called
    /// when a pending userfaultfd event blocks the install; it must read events.
    pub fn install(
        &self,
        ri: usize,
        first: u64,
        count: u64,
        kind: PageKind,
        mut payload: Payload<'_>,
        on_again: &mut dyn FnMut(),
    ) -> Result<Outcome, EngineError> {
        let r = self
            .regions
            .get(ri)
            .ok_or_else(|| EngineError::Protocol("pages for an unknown region".into()))?;
        if first.checked_add(count).is_none_or(|e| e > r.pages) {
            return Err(EngineError::Protocol(format!(
                "pages {first}+{count} outside region {} of {} pages",
                r.id, r.pages
            )));
        }
        let ps = r.page_size;
        let mut out = Outcome::default();
        let mut p = 0u64;
        // Each pass re-reads the present bits, so that a retry after EAGAIN (when a
        // REMOVE event may have changed what is wanted) never installs stale data
        // over a page that was resolved meanwhile.
        while p < count {
            let guard = self.gate.map(RemoveGate::shared);
            let g = r.first_global + first + p;
            if self.present.is_set(g) {
                out.duplicates += 1;
                p += 1;
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
            let off = to_usize(p)? * ps;
            let len = to_usize(n)? * ps;
            let dst = r.base + to_usize(first + p)? * ps;
            let res = match &mut payload {
                Payload::Copy(bytes) => {
                    let src = bytes.get(off..off + len).ok_or_else(|| {
                        EngineError::Protocol("payload shorter than its pages".into())
                    })?;
                    copy_from(self.uffd, dst, src, true)?
                }
                Payload::Move(buf, base) => move_from(self.uffd, dst, buf, *base + off, len)?,
                Payload::Zero => zero(self.uffd, dst, len, true)?,
            };
            drop(guard);
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
                on_again();
                continue;
            }
            self.present.set_range(g, installed);
            out.installed += installed;
            p += installed;
        }
        match kind {
            PageKind::Zero => Counters::add(&self.counters.zero_pages, out.installed),
            PageKind::Unpopulated => Counters::add(&self.counters.unpopulated_pages, out.installed),
            PageKind::Data => {}
        }
        Counters::add(&self.counters.duplicate_pages, out.duplicates);
        Ok(out)
    }

    /// Region index and page of a faulting address, if it is guest memory.
    pub fn locate(&self, addr: usize) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (addr >= r.base && addr < r.base + r.len)
                .then(|| (i, ((addr - r.base) / r.page_size) as u64))
        })
    }
}

fn to_usize(v: u64) -> Result<usize, EngineError> {
    usize::try_from(v).map_err(|_| EngineError::Protocol("page index does not fit".into()))
}
