//! The socket-free core of the engine: which page goes next, and which faults share a
//! request. Unit-tested without sockets or userfaultfd.
//!
//! - [`PageSpace`] numbers every page of every region in one global index space.
//! - [`DemandTable`] (destination) coalesces faults on one page into one request and
//!   remembers when each fault was read, for latency accounting.
//! - [`PushPlan`] (source) hands out runs of pages to the bulk pushers: windows
//!   around recent faults first, then a sweep; each page at most once, claimed with
//!   an atomic test-and-set so pushers on several cores never send a page twice.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ringfault_proto::Layout;

use crate::bitmap::AtomicBitmap;

/// One region's place in the global page index space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpan {
    /// The region's id on the wire.
    pub id: u32,
    /// Global index of its first page.
    pub first: u64,
    /// Its page count.
    pub pages: u64,
    /// Its page size in bytes.
    pub page_size: u64,
}

/// All regions' pages numbered 0.. in layout order.
#[derive(Debug, Clone)]
pub struct PageSpace {
    spans: Vec<RegionSpan>,
    total: u64,
}

impl PageSpace {
    /// Numbers the pages of a layout.
    pub fn new(layout: &Layout) -> PageSpace {
        let mut spans = Vec::with_capacity(layout.regions.len());
        let mut total = 0u64;
        for r in &layout.regions {
            let pages = r.page_count();
            spans.push(RegionSpan {
                id: r.id,
                first: total,
                pages,
                page_size: r.page_size.bytes(),
            });
            total = total.saturating_add(pages);
        }
        PageSpace { spans, total }
    }

    /// Pages in all regions.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The regions in layout order.
    pub fn spans(&self) -> &[RegionSpan] {
        &self.spans
    }

    /// The span of region index `idx` (layout order).
    pub fn span(&self, idx: usize) -> Option<&RegionSpan> {
        self.spans.get(idx)
    }

    /// Layout index of the region with wire id `id`.
    pub fn index_of(&self, id: u32) -> Option<usize> {
        self.spans.iter().position(|s| s.id == id)
    }

    /// (layout index, page within region) of a global page.
    pub fn locate(&self, global: u64) -> Option<(usize, u64)> {
        let idx = self.spans.partition_point(|s| s.first + s.pages <= global);
        let s = self.spans.get(idx)?;
        (global >= s.first).then(|| (idx, global - s.first))
    }
}

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
    /// Send a demand request with this id.
    Request(u64),
    /// A request for this page is already in flight; wait for it.
    Coalesced,
}

#[derive(Debug)]
struct Pending {
    request_id: u64,
    faults: Vec<Instant>,
}

/// Faults in flight on the destination, keyed by global page.
#[derive(Debug, Default)]
pub struct DemandTable {
    pending: HashMap<u64, Pending>,
    next_id: u64,
}

impl DemandTable {
    /// An empty table.
    pub fn new() -> DemandTable {
        DemandTable {
            pending: HashMap::new(),
            next_id: 1,
        }
    }

    /// A fault on `page` was read at `at`.
    pub fn fault(&mut self, page: u64, at: Instant) -> FaultAction {
        if let Some(p) = self.pending.get_mut(&page) {
            p.faults.push(at);
            return FaultAction::Coalesced;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(
            page,
            Pending {
                request_id: id,
                faults: vec![at],
            },
        );
        FaultAction::Request(id)
    }

    /// `page` is present now; returns the read times of the faults that waited on it.
    pub fn resolved(&mut self, page: u64) -> Option<Vec<Instant>> {
        self.pending.remove(&page).map(|p| p.faults)
    }

    /// Requests in flight (page, request id), for resending after a reconnect.
    pub fn in_flight(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pending.iter().map(|(pg, p)| (*pg, p.request_id))
    }

    /// Number of pages with a request in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The prefetch window around a fault: `before` pages before it and `after` pages
/// after it, clipped to the region. Returns (first, count), fault page included.
pub fn prefetch_window(page: u64, region_pages: u64, before: u32, after: u32) -> (u64, u64) {
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
    hints: Mutex<VecDeque<(u64, u64)>>,
}

impl PushPlan {
    /// A plan over every page of `space`, none sent yet.
    pub fn new(space: PageSpace) -> PushPlan {
        let total = space.total();
        PushPlan {
            space,
            sent: AtomicBitmap::new(total),
            cursor: AtomicU64::new(0),
            hints: Mutex::new(VecDeque::new()),
        }
    }

    /// The page numbering.
    pub fn space(&self) -> &PageSpace {
        &self.space
    }

    /// Pages that have been handed out or sent on the demand lane.
    pub fn sent_count(&self) -> u64 {
        self.sent.count()
    }

    /// Marks pages as sent by the demand lane so that no pusher sends them again.
    pub fn mark_sent(&self, region: usize, first: u64, count: u64) {
        if let Some(s) = self.space.span(region) {
            self.sent
                .set_range(s.first + first, count.min(s.pages.saturating_sub(first)));
        }
    }

    /// Marks pages as already present on the destination (resume, or pre-copy rounds).
    pub fn mark_present(&self, global_first: u64, count: u64) {
        self.sent.set_range(global_first, count);
    }

    /// Asks the pushers to send this window next (a prefetch window around a fault).
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

    /// Claims up to `max_pages` pages not sent yet: hinted windows first, then the
    /// sweep. Returns runs split at region boundaries and at pages already sent;
    /// returns an empty vector once every page has been claimed.
    pub fn next_batch(&self, max_pages: u64) -> Vec<Run> {
        let mut out = Vec::new();
        let mut budget = max_pages.max(1);
        loop {
            let hint = self.hints.lock().ok().and_then(|mut q| q.pop_front());
            let Some((first, count)) = hint else { break };
            let take = count.min(budget);
            self.claim(first, take, &mut out, &mut budget);
            if take < count {
                if let Ok(mut q) = self.hints.lock() {
                    q.push_front((first + take, count - take));
                }
            }
            if budget == 0 {
                return out;
            }
        }
        let total = self.space.total();
        while budget > 0 {
            // Relaxed: the cursor only partitions work; the per-page test-and-set in
            // `claim` is what decides ownership.
            let start = self.cursor.fetch_add(budget, Ordering::Relaxed);
            if start >= total {
                break;
            }
            let take = budget.min(total - start);
            self.claim(start, take, &mut out, &mut budget);
            if !out.is_empty() {
                break;
            }
        }
        out
    }

    /// True once the sweep has passed the end and no window is waiting.
    pub fn exhausted(&self) -> bool {
        // Relaxed: a hint added later is still served by a pusher that is not yet done.
        self.cursor.load(Ordering::Relaxed) >= self.space.total()
            && self.hints.lock().map(|q| q.is_empty()).unwrap_or(true)
    }

    fn claim(&self, first: u64, count: u64, out: &mut Vec<Run>, budget: &mut u64) {
        let end = first.saturating_add(count).min(self.space.total());
        let mut g = first;
        while g < end {
            let Some((region, _)) = self.space.locate(g) else {
                break;
            };
            let span = self.space.spans[region];
            let region_end = (span.first + span.pages).min(end);
            let mut run: Option<Run> = None;
            while g < region_end {
                if self.sent.test_and_set(g) {
                    if let Some(r) = run.take() {
                        out.push(r);
                    }
                } else {
                    *budget = budget.saturating_sub(1);
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
    use ringfault_proto::{PageSize, RegionDesc};

    fn layout(sizes: &[u64]) -> Layout {
        Layout {
            regions: sizes
                .iter()
                .enumerate()
                .map(|(i, &pages)| RegionDesc {
                    id: u32::try_from(i).unwrap() + 10,
                    page_size: PageSize::Size4K,
                    size: pages * 4096,
                })
                .collect(),
        }
    }

    #[test]
    fn locate_maps_global_pages_to_regions() {
        let s = PageSpace::new(&layout(&[3, 5]));
        assert_eq!(s.total(), 8);
        assert_eq!(s.locate(0), Some((0, 0)));
        assert_eq!(s.locate(2), Some((0, 2)));
        assert_eq!(s.locate(3), Some((1, 0)));
        assert_eq!(s.locate(7), Some((1, 4)));
        assert_eq!(s.locate(8), None);
        assert_eq!(s.index_of(11), Some(1));
    }

    #[test]
    fn duplicate_faults_coalesce_into_one_request() {
        let mut t = DemandTable::new();
        let now = Instant::now();
        let FaultAction::Request(id) = t.fault(7, now) else {
            panic!("first fault must request")
        };
        assert_eq!(t.fault(7, now), FaultAction::Coalesced);
        assert_eq!(t.fault(7, now), FaultAction::Coalesced);
        assert!(matches!(t.fault(8, now), FaultAction::Request(i) if i != id));
        assert_eq!(t.resolved(7).map(|v| v.len()), Some(3));
        assert!(t.resolved(7).is_none(), "resolved twice");
        assert!(matches!(t.fault(7, now), FaultAction::Request(_)));
    }

    #[test]
    fn prefetch_window_is_clipped_to_the_region() {
        assert_eq!(prefetch_window(10, 100, 2, 3), (8, 6));
        assert_eq!(prefetch_window(0, 100, 4, 0), (0, 1));
        assert_eq!(prefetch_window(99, 100, 0, 8), (99, 1));
        assert_eq!(prefetch_window(50, 100, 0, 0), (50, 1));
    }

    #[test]
    fn hinted_windows_go_before_the_sweep() {
        let plan = PushPlan::new(PageSpace::new(&layout(&[1000])));
        plan.hint(0, 500, 4);
        let b = plan.next_batch(8);
        assert_eq!(
            b[0],
            Run {
                region: 0,
                first: 500,
                count: 4
            }
        );
        assert_eq!(
            b[1],
            Run {
                region: 0,
                first: 0,
                count: 4
            }
        );
    }

    #[test]
    fn demand_sent_pages_are_skipped_by_the_sweep() {
        let plan = PushPlan::new(PageSpace::new(&layout(&[16])));
        plan.mark_sent(0, 3, 2);
        let b = plan.next_batch(16);
        assert_eq!(
            b,
            vec![
                Run {
                    region: 0,
                    first: 0,
                    count: 3
                },
                Run {
                    region: 0,
                    first: 5,
                    count: 11
                }
            ]
        );
        assert!(plan.next_batch(16).is_empty());
        assert!(plan.exhausted());
    }

    #[test]
    fn runs_never_cross_regions() {
        let plan = PushPlan::new(PageSpace::new(&layout(&[3, 4])));
        let b = plan.next_batch(100);
        assert_eq!(
            b,
            vec![
                Run {
                    region: 0,
                    first: 0,
                    count: 3
                },
                Run {
                    region: 1,
                    first: 0,
                    count: 4
                }
            ]
        );
    }

    #[test]
    fn concurrent_pushers_send_each_page_exactly_once() {
        let plan = std::sync::Arc::new(PushPlan::new(PageSpace::new(&layout(&[5000, 3001]))));
        for p in (0..5000).step_by(97) {
            plan.hint(0, p, 9);
        }
        let seen: Vec<Vec<Run>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let plan = plan.clone();
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        loop {
                            let b = plan.next_batch(64);
                            if b.is_empty() {
                                break;
                            }
                            mine.extend(b);
                        }
                        mine
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut hits = vec![0u8; 8001];
        for r in seen.iter().flatten() {
            let base = if r.region == 0 { 0 } else { 5000 };
            for p in r.first..r.first + r.count {
                hits[usize::try_from(base + p).unwrap()] += 1;
            }
        }
        assert!(hits.iter().all(|&h| h == 1), "every page exactly once");
    }

    proptest! {
        #[test]
        fn batches_cover_every_unsent_page_once(
            sizes in proptest::collection::vec(1u64..200, 1..4),
            hints in proptest::collection::vec((0u64..200, 1u64..20), 0..10),
            demand in proptest::collection::vec((0u64..200, 1u64..5), 0..10),
            batch in 1u64..50,
        ) {
            let space = PageSpace::new(&layout(&sizes));
            let total = space.total();
            let plan = PushPlan::new(space);
            let mut expect = vec![1u8; usize::try_from(total).unwrap()];
            for &(p, c) in &demand {
                let p = p % sizes[0];
                plan.mark_sent(0, p, c);
                for g in p..(p + c).min(sizes[0]) { expect[usize::try_from(g).unwrap()] = 0; }
            }
            for &(p, c) in &hints { plan.hint(0, p % sizes[0], c); }
            let mut got = vec![0u8; expect.len()];
            loop {
                let b = plan.next_batch(batch);
                if b.is_empty() { break; }
                let n: u64 = b.iter().map(|r| r.count).sum();
                prop_assert!(n <= batch);
                for r in b {
                    let s = plan.space().span(r.region).unwrap();
                    prop_assert!(r.first + r.count <= s.pages);
                    for p in r.first..r.first + r.count {
                        got[usize::try_from(s.first + p).unwrap()] += 1;
                    }
                }
            }
            prop_assert_eq!(got, expect);
        }
    }
}
