//! The socket-free core of the engine: which page goes next, and which faults
//! share a request. Unit-tested without sockets or userfaultfd.
//!
//! - [`DemandTable`] (destination) coalesces faults on one page into one
//!   request and remembers when each fault was read, for latency accounting.
//! - [`PushPlan`] (source) hands out runs of pages to the bulk lanes: windows
//!   around recent faults first, then a sweep. Each page goes out at most once
//!   per lap: pages are claimed word by word with `fetch_or` on the `sent`
//!   bitmap, so lanes on several cores never send a page twice, and a sweep
//!   skips whole words of pages already sent (or known to be zero) at once.
//!   The sweep never passes the end of the scanned window: pages ahead of it
//!   have not been classified yet (see `source::scan`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::bitmap::AtomicBitmap;
use crate::space::PageSpace;

/// A run of pages inside one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Layout index of the region.
    pub region: usize,
    /// First page within the region.
    pub first: u64,
    /// Pages in the run.
    pub count: u64,
}

/// What the fault path must do about a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// The first fault on this page: fetch it.
    Fetch,
    /// A fetch of this page is already in flight; wait for it.
    Coalesced,
}

#[derive(Debug)]
struct Pending {
    faults: Vec<Instant>,
}

/// Faults in flight on the destination, keyed by global page.
#[derive(Debug, Default)]
pub struct DemandTable {
    pending: HashMap<u64, Pending>,
}

impl DemandTable {
    /// An empty table.
    pub fn new() -> DemandTable {
        DemandTable::default()
    }

    /// A fault on `page` was read at `at`.
    pub fn fault(&mut self, page: u64, at: Instant) -> FaultAction {
        if let Some(p) = self.pending.get_mut(&page) {
            p.faults.push(at);
            return FaultAction::Coalesced;
        }
        self.pending.insert(page, Pending { faults: vec![at] });
        FaultAction::Fetch
    }

    /// `page` is present now; returns the read times of the faults that waited on it.
    pub fn resolved(&mut self, page: u64) -> Option<Vec<Instant>> {
        self.pending.remove(&page).map(|p| p.faults)
    }

    /// Resolves every pending page in `[first, first + count)` for which
    /// `present` holds, calling `f` with each fault's read time.
    pub fn resolve_range(
        &mut self,
        first: u64,
        count: u64,
        present: impl Fn(u64) -> bool,
        mut f: impl FnMut(u64, Instant),
    ) {
        if self.pending.is_empty() {
            return;
        }
        let end = first.saturating_add(count);
        let hit: Vec<u64> = if usize::try_from(count).map_or(true, |c| c > self.pending.len()) {
            self.pending
                .keys()
                .copied()
                .filter(|&p| p >= first && p < end && present(p))
                .collect()
        } else {
            (first..end)
                .filter(|p| self.pending.contains_key(p) && present(*p))
                .collect()
        };
        for p in hit {
            if let Some(e) = self.pending.remove(&p) {
                for t in e.faults {
                    f(p, t);
                }
            }
        }
    }

    /// Pages with a fetch in flight, for re-requesting after a reconnect.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.keys().copied()
    }

    /// Number of pages with a fetch in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The prefetch window around a fault: `before` pages before it and `after`
/// pages after it, clipped to the region. Returns (first, count), fault page
/// included.
pub fn prefetch_window(page: u64, region_pages: u64, before: u16, after: u16) -> (u64, u64) {
    let first = page.saturating_sub(u64::from(before));
    let end = page
        .saturating_add(u64::from(after))
        .saturating_add(1)
        .min(region_pages);
    (first, end.saturating_sub(first))
}

/// Bounded queue length of fault windows waiting for a pusher.
const MAX_HINTS: usize = 4096;

/// The source's plan for background pages.
#[derive(Debug)]
pub struct PushPlan {
    space: PageSpace,
    sent: AtomicBitmap,
    cursor: AtomicU64,
    /// Global pages below this are classified (scanned); the sweep stops here.
    scanned: AtomicU64,
    hints: Mutex<VecDeque<(u64, u64)>>,
}

impl PushPlan {
    /// A plan over every page of `space`, none sent, none scanned.
    pub fn new(space: PageSpace) -> PushPlan {
        let total = space.total();
        PushPlan {
            space,
            sent: AtomicBitmap::new(total),
            cursor: AtomicU64::new(0),
            scanned: AtomicU64::new(0),
            hints: Mutex::new(VecDeque::new()),
        }
    }

    /// The page numbering.
    pub fn space(&self) -> &PageSpace {
        &self.space
    }

    /// The `sent` bitmap (pages handed out, sent on demand, or known zero).
    pub fn sent(&self) -> &AtomicBitmap {
        &self.sent
    }

    /// Pages handed out, sent, or known to be zero.
    pub fn sent_count(&self) -> u64 {
        self.sent.count()
    }

    /// Marks global pages as sent (on the demand lane, or as known-zero ranges).
    pub fn mark_sent(&self, global_first: u64, count: u64) -> u64 {
        self.sent.set_range(global_first, count)
    }

    /// Marks pages of region `region` as sent.
    pub fn mark_sent_in(&self, region: usize, first: u64, count: u64) {
        if let Some(s) = self.space.span(region) {
            self.sent
                .set_range(s.first + first, count.min(s.pages.saturating_sub(first)));
        }
    }

    /// Claims the window `first..first+count` of region `region` for the
    /// demand lane if none of its pages is sent yet; returns the runs
    /// claimed (the whole window, unless a pusher claimed part of it
    /// meanwhile: then the runs it left), or `None` when nothing was
    /// claimed. The caller makes sure the window holds no never-populated
    /// page that the scan has not marked yet.
    pub fn claim_window(&self, region: usize, first: u64, count: u64) -> Option<Vec<Run>> {
        let s = self.space.span(region)?;
        let count = count.min(s.pages.saturating_sub(first));
        let g = s.first + first;
        if count == 0 || self.sent.count_range(g, count) != 0 {
            return None;
        }
        let mut out = Vec::new();
        let mut budget = count;
        self.claim(g, g + count, &mut out, &mut budget);
        Some(out)
    }

    /// Global pages below `until` are classified: the sweep may go there.
    pub fn scanned_until(&self, until: u64) {
        // Release: the zero ranges marked before are visible to a pusher that
        // Acquire-loads the new limit.
        self.scanned.fetch_max(until, Ordering::Release);
    }

    /// How far the classification reached.
    pub fn scanned(&self) -> u64 {
        // Acquire: pairs with `scanned_until`.
        self.scanned.load(Ordering::Acquire)
    }

    /// Whether the sweep has caught up with the scanned window.
    pub fn needs_scan(&self) -> bool {
        let s = self.scanned();
        // Relaxed: the cursor only partitions work; claims decide ownership.
        s < self.space.total() && self.cursor.load(Ordering::Relaxed) >= s
    }

    /// Asks the lanes to send this window next (a prefetch window around a fault).
    pub fn hint(&self, region: usize, first: u64, count: u64) {
        let Some(s) = self.space.span(region) else {
            return;
        };
        let Ok(mut q) = self.hints.lock() else {
            return;
        };
        if q.len() >= MAX_HINTS {
            q.pop_front();
        }
        q.push_back((s.first + first, count.min(s.pages.saturating_sub(first))));
    }

    /// Starts the sweep over: every page not in `sent` goes out again (after a
    /// resume, or a pre-copy round's dirty pages were cleared from `sent`).
    pub fn restart_sweep(&self) {
        // Relaxed: pushers pick the new cursor up on their next claim; claims
        // are decided by the bitmap.
        self.cursor.store(0, Ordering::Relaxed);
        if let Ok(mut q) = self.hints.lock() {
            q.clear();
        }
    }

    /// Claims up to `max_pages` pages not sent yet: hinted windows first, then
    /// the sweep up to the scanned limit. Returns runs split at region
    /// boundaries and at pages already sent; empty when nothing is claimable
    /// now (see [`PushPlan::exhausted`] and [`PushPlan::needs_scan`]).
    pub fn next_batch(&self, max_pages: u64) -> Vec<Run> {
        let mut out = Vec::new();
        let mut budget = max_pages.max(1);
        loop {
            let hint = self.hints.lock().ok().and_then(|mut q| q.pop_front());
            let Some((first, count)) = hint else { break };
            let take = count.min(budget);
            self.claim(first, first.saturating_add(take), &mut out, &mut budget);
            if take < count {
                if let Ok(mut q) = self.hints.lock() {
                    q.push_front((first + take, count - take));
                }
            }
            if budget == 0 {
                return out;
            }
        }
        let limit = self.scanned().min(self.space.total());
        while budget > 0 {
            // Relaxed: the cursor only partitions work; claims decide ownership.
            let from = self.cursor.load(Ordering::Relaxed);
            if from >= limit {
                break;
            }
            let Some(start) = self.sent.next_clear(from).filter(|&s| s < limit) else {
                // Relaxed: as above.
                self.cursor.fetch_max(limit, Ordering::Relaxed);
                break;
            };
            let want = start.saturating_add(budget).min(limit);
            let end = self.align_end(start, want);
            // Relaxed: as above; two lanes may claim from overlapping windows,
            // and the bitmap gives each page to one of them.
            self.cursor.fetch_max(end, Ordering::Relaxed);
            self.claim(start, end, &mut out, &mut budget);
            if end < want {
                // Cut at a 2 MiB boundary: the next claim starts on it.
                break;
            }
        }
        out
    }

    /// Rounds the end of a sweep claim `[start, end)` down to a 2 MiB
    /// boundary of its region when that leaves something to claim, so that
    /// the sweep's claims (and the frames built from them) cover whole
    /// aligned 2 MiB ranges, which the destination installs as huge pages.
    fn align_end(&self, start: u64, end: u64) -> u64 {
        if end >= self.space.total() {
            return end;
        }
        let Some((ri, page)) = self.space.locate(end) else {
            return end;
        };
        let per = self.space.spans()[ri].pages_per_huge();
        let aligned = end - page % per;
        if aligned > start {
            aligned
        } else {
            end
        }
    }

    /// True once every page is sent and no window is waiting.
    pub fn exhausted(&self) -> bool {
        self.sent.all_set() && self.hints.lock().map(|q| q.is_empty()).unwrap_or(true)
    }

    /// Claims the clear bits of `[first, end)`, skipping sent stretches.
    fn claim(&self, first: u64, end: u64, out: &mut Vec<Run>, budget: &mut u64) {
        let end = end.min(self.space.total());
        let mut g = first;
        while g < end && *budget > 0 {
            let Some((region, _)) = self.space.locate(g) else {
                break;
            };
            let span = self.space.spans()[region];
            let region_end = (span.first + span.pages).min(end);
            let mut run: Option<Run> = None;
            while g < region_end && *budget > 0 {
                if self.sent.test_and_set(g) {
                    if let Some(r) = run.take() {
                        out.push(r);
                    }
                    g = self
                        .sent
                        .next_clear(g + 1)
                        .map_or(region_end, |n| n.min(region_end));
                    continue;
                }
                *budget -= 1;
                match &mut run {
                    Some(r) => r.count += 1,
                    None => {
                        run = Some(Run {
                            region,
                            first: g - span.first,
                            count: 1,
                        })
                    }
                }
                g += 1;
            }
            if let Some(r) = run.take() {
                out.push(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ringfault_proto::{Layout, PageSize, RegionDesc};

    fn space(sizes: &[u64]) -> PageSpace {
        let layout = Layout {
            regions: sizes
                .iter()
                .enumerate()
                .map(|(i, &pages)| RegionDesc {
                    id: u32::try_from(i).unwrap(),
                    page_size: PageSize::Size4K,
                    size: pages * 4096,
                })
                .collect(),
        };
        PageSpace::new(&layout, &[])
    }

    #[test]
    fn coalesces_and_resolves() {
        let mut t = DemandTable::new();
        let now = Instant::now();
        assert_eq!(t.fault(5, now), FaultAction::Fetch);
        assert_eq!(t.fault(5, now), FaultAction::Coalesced);
        assert_eq!(t.fault(9, now), FaultAction::Fetch);
        let mut seen = Vec::new();
        t.resolve_range(0, 8, |_| true, |p, _| seen.push(p));
        assert_eq!(seen, vec![5, 5]);
        assert_eq!(t.len(), 1);
        t.resolve_range(9, 1, |_| false, |p, _| seen.push(p));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn window_clips() {
        assert_eq!(prefetch_window(2, 10, 4, 3), (0, 6));
        assert_eq!(prefetch_window(8, 10, 0, 15), (8, 2));
    }

    #[test]
    fn sweep_stops_at_scanned_limit_and_skips_sent() {
        let p = PushPlan::new(space(&[100, 50]));
        assert!(p.next_batch(10).is_empty());
        assert!(p.needs_scan());
        p.mark_sent(0, 40);
        p.scanned_until(120);
        // The claim ends where region 1 (a 2 MiB boundary) begins.
        let b = p.next_batch(70);
        assert_eq!(
            b,
            vec![Run {
                region: 0,
                first: 40,
                count: 60
            }]
        );
        assert_eq!(
            p.next_batch(70),
            vec![Run {
                region: 1,
                first: 0,
                count: 20
            }]
        );
        assert!(p.next_batch(70).is_empty());
        p.scanned_until(150);
        p.hint(1, 45, 3);
        assert_eq!(
            p.next_batch(2),
            vec![Run {
                region: 1,
                first: 45,
                count: 2
            }]
        );
        let rest: u64 = p.next_batch(1000).iter().map(|r| r.count).sum();
        assert_eq!(rest, 28);
        assert!(p.exhausted());
    }

    #[test]
    fn sweep_claims_end_on_2mib_boundaries() {
        // Page 0 went out on demand: the first claim stops at page 512, and
        // every later claim covers one whole aligned 2 MiB range.
        let p = PushPlan::new(space(&[1500]));
        p.mark_sent(0, 1);
        p.scanned_until(1500);
        let firsts: Vec<(u64, u64)> = std::iter::from_fn(|| {
            let b = p.next_batch(512);
            (!b.is_empty()).then(|| (b[0].first, b.iter().map(|r| r.count).sum()))
        })
        .collect();
        assert_eq!(firsts, vec![(1, 511), (512, 512), (1024, 476)]);
    }

    proptest! {
        #[test]
        fn every_page_once(sizes in proptest::collection::vec(1u64..300, 1..5), batch in 1u64..200, pre in proptest::collection::vec((0u64..1200, 1u64..50), 0..8)) {
            let s = space(&sizes);
            let total = s.total();
            let p = PushPlan::new(s);
            let mut seen = vec![0u32; usize::try_from(total).unwrap()];
            for (f, c) in pre {
                let f = f % total;
                let c = c.min(total - f);
                p.mark_sent(f, c);
                for i in f..f + c { seen[usize::try_from(i).unwrap()] = 1; }
            }
            p.scanned_until(total);
            loop {
                let b = p.next_batch(batch);
                if b.is_empty() { break; }
                for r in b {
                    let g = p.space().global(r.region, r.first).unwrap();
                    for i in g..g + r.count { seen[usize::try_from(i).unwrap()] += 1; }
                }
            }
            prop_assert!(seen.iter().all(|&c| c == 1));
        }
    }
}
