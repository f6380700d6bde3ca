//! What the handler tells an operator: faults, fault-service latency, bytes
//! served, and how long until every page was present. Updated by the fault loop
//! (local mode) or taken from the engine (remote mode); read from any thread, e.g.
//! a `SIGUSR1` handler thread, at any time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::destination::Progress;
use crate::stats::{new_histogram, record, DestinationReport, LatencySummary};

/// Live statistics of one handler session. Counters are event counts that no
/// thread uses to make a decision, so every access is `Relaxed`.
#[derive(Debug)]
pub struct HandlerStats {
    /// When Firecracker handed its memory over (or when these were created).
    started: Mutex<Instant>,
    mode: &'static str,
    /// Page faults read from the userfaultfd.
    pub faults: AtomicU64,
    /// Faults on pages that were present by the time they were served (woken only).
    pub stale_faults: AtomicU64,
    /// Faults on pages a balloon removed, served with zeros.
    pub removed_faults: AtomicU64,
    /// Pages copied from the memory file (`UFFDIO_COPY`).
    pub pages_copied: AtomicU64,
    /// Pages installed as zero (`UFFDIO_ZEROPAGE`, or a copy of zeros on hugetlbfs).
    pub pages_zeroed: AtomicU64,
    /// Bytes copied into guest memory.
    pub bytes_served: AtomicU64,
    /// Pages a balloon removed (`UFFD_EVENT_REMOVE`).
    pub removed_pages: AtomicU64,
    /// Installs retried after `EAGAIN` (a pending REMOVE event).
    pub eagain_retries: AtomicU64,
    /// Pages in all regions.
    pub pages_total: AtomicU64,
    /// Pages present (or removed, which reads as zeros without the source).
    pub pages_present: AtomicU64,
    /// Nanoseconds from start until every page was present, plus one (0: not yet).
    all_present_ns: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    remote: Mutex<Remote>,
}

#[derive(Debug, Default)]
struct Remote {
    progress: Option<Progress>,
    report: Option<DestinationReport>,
}

impl HandlerStats {
    /// Fresh statistics; `mode` is `local` or `remote`.
    pub fn new(mode: &'static str) -> HandlerStats {
        HandlerStats {
            started: Mutex::new(Instant::now()),
            mode,
            faults: AtomicU64::new(0),
            stale_faults: AtomicU64::new(0),
            removed_faults: AtomicU64::new(0),
            pages_copied: AtomicU64::new(0),
            pages_zeroed: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            removed_pages: AtomicU64::new(0),
            eagain_retries: AtomicU64::new(0),
            pages_total: AtomicU64::new(0),
            pages_present: AtomicU64::new(0),
            all_present_ns: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
            remote: Mutex::new(Remote::default()),
        }
    }

    /// Starts the clock: Firecracker has just handed its memory over.
    pub fn begin(&self) {
        if let Ok(mut s) = self.started.lock() {
            *s = Instant::now();
        }
    }

    fn elapsed(&self) -> Duration {
        self.started.lock().map(|s| s.elapsed()).unwrap_or_default()
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        // Relaxed: a statistic (see the type's doc).
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn get(c: &AtomicU64) -> u64 {
        // Relaxed: a statistic.
        c.load(Ordering::Relaxed)
    }

    fn set(c: &AtomicU64, v: u64) {
        // Relaxed: a statistic.
        c.store(v, Ordering::Relaxed);
    }

    /// Records one fault's service time (fault read to page installed).
    pub fn record_fault(&self, took: Duration) {
        if let Ok(mut h) = self.latency.lock() {
            record(&mut h, took);
        }
    }

    /// Records that every page is present now (the first call counts).
    pub fn mark_all_present(&self) {
        let ns = u64::try_from(self.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        // Relaxed: a statistic; compare_exchange keeps the first time.
        let _ = self
            .all_present_ns
            .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Time from the hand-over until every page was present, if that happened.
    pub fn all_present_after(&self) -> Option<Duration> {
        match Self::get(&self.all_present_ns) {
            0 => None,
            ns => Some(Duration::from_nanos(ns - 1)),
        }
    }

    /// Remote mode: where the engine's progress can be read.
    pub fn set_progress(&self, p: Progress) {
        Self::set(&self.pages_total, p.total());
        if let Ok(mut r) = self.remote.lock() {
            r.progress = Some(p);
        }
    }

    /// Remote mode: the engine's report once every page is present.
    pub fn set_engine_report(&self, report: DestinationReport) {
        self.mark_all_present();
        if let Ok(mut r) = self.remote.lock() {
            r.report = Some(report);
        }
    }

    /// A snapshot.
    pub fn report(&self) -> HandlerReport {
        let mut rep = HandlerReport {
            mode: self.mode,
            uptime_s: self.elapsed().as_secs_f64(),
            faults: Self::get(&self.faults),
            stale_faults: Self::get(&self.stale_faults),
            removed_faults: Self::get(&self.removed_faults),
            pages_copied: Self::get(&self.pages_copied),
            pages_zeroed: Self::get(&self.pages_zeroed),
            bytes_served: Self::get(&self.bytes_served),
            removed_pages: Self::get(&self.removed_pages),
            eagain_retries: Self::get(&self.eagain_retries),
            pages_total: Self::get(&self.pages_total),
            pages_present: Self::get(&self.pages_present),
            all_present_after_s: self.all_present_after().map(|d| d.as_secs_f64()),
            fault_latency: self
                .latency
                .lock()
                .map(|h| LatencySummary::of(&h))
                .unwrap_or_default(),
        };
        if let Ok(r) = self.remote.lock() {
            if let Some(p) = &r.progress {
                rep.pages_present = p.present();
                rep.pages_total = p.total();
                // Live figures of the engine's fault loop (both modes).
                let c = p.counters();
                rep.faults = Self::get(&c.faults);
                rep.stale_faults = Self::get(&c.stale_faults);
                rep.removed_faults = Self::get(&c.zero_faults);
                rep.removed_pages = Self::get(&c.removed_pages);
                rep.pages_copied = Self::get(&c.demand_pages) + Self::get(&c.bulk_pages);
                rep.pages_zeroed = Self::get(&c.zero_pages) + Self::get(&c.unpopulated_pages);
                rep.eagain_retries = Self::get(&c.eagain_retries);
            }
            if let Some(e) = &r.report {
                rep.bytes_served = e.wire_bytes;
                rep.fault_latency = e.fault_service.clone();
            }
        }
        rep
    }
}

/// A snapshot of [`HandlerStats`], for printing or JSON.
#[derive(Debug, Clone, Serialize)]
pub struct HandlerReport {
    /// `local` or `remote`.
    pub mode: &'static str,
    /// Seconds since Firecracker handed its memory over.
    pub uptime_s: f64,
    /// Page faults read (remote mode: known once every page is present).
    pub faults: u64,
    /// Faults on pages already present when served.
    pub stale_faults: u64,
    /// Faults on balloon-removed pages, served with zeros.
    pub removed_faults: u64,
    /// Pages installed with data.
    pub pages_copied: u64,
    /// Pages installed as zeros.
    pub pages_zeroed: u64,
    /// Local: bytes copied into guest memory. Remote: bytes received from the source.
    pub bytes_served: u64,
    /// Pages removed by a balloon.
    pub removed_pages: u64,
    /// Installs retried after `EAGAIN`.
    pub eagain_retries: u64,
    /// Pages in guest memory.
    pub pages_total: u64,
    /// Pages present now.
    pub pages_present: u64,
    /// Seconds until every page was present, if it happened.
    pub all_present_after_s: Option<f64>,
    /// Fault service time: fault read to page installed.
    pub fault_latency: LatencySummary,
}

impl HandlerReport {
    /// A few human-readable lines.
    pub fn summary(&self) -> String {
        let l = &self.fault_latency;
        let present = match self.all_present_after_s {
            Some(s) => format!("every page present after {s:.3} s"),
            None => format!(
                "{} of {} pages present",
                self.pages_present, self.pages_total
            ),
        };
        format!(
            "{} mode, up {:.3} s: {} faults ({} stale, {} on removed pages); \
             fault service p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us; \
             {} bytes served, {} pages copied, {} zeroed, {} removed, {} EAGAIN retries; {}",
            self.mode,
            self.uptime_s,
            self.faults,
            self.stale_faults,
            self.removed_faults,
            l.p50_us,
            l.p90_us,
            l.p99_us,
            l.max_us,
            self.bytes_served,
            self.pages_copied,
            self.pages_zeroed,
            self.removed_pages,
            self.eagain_retries,
            present
        )
    }

    /// One line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
