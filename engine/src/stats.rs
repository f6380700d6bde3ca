//! Migration statistics: counters shared by the workers, per-fault service latency
//! in an HDR histogram, and per-channel throughput in 100 ms steps. Everything ends
//! up in a [`DestinationReport`] or [`SourceReport`], which serialise to JSON.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Width of one throughput sample.
pub const STEP: Duration = Duration::from_millis(100);

/// Counters updated by every destination worker. All are plain event counts that no
/// thread reads to make a decision, so `Relaxed` suffices for each.
#[derive(Debug, Default)]
pub struct Counters {
    /// Faults read from userfaultfd.
    pub faults: AtomicU64,
    /// Faults that joined a request already in flight for the same page.
    pub coalesced_faults: AtomicU64,
    /// Faults on a page that was already present when the fault was read.
    pub stale_faults: AtomicU64,
    /// Pages installed from demand replies.
    pub demand_pages: AtomicU64,
    /// Data pages installed from the bulk lanes.
    pub bulk_pages: AtomicU64,
    /// Pages installed with `UFFDIO_ZEROPAGE` because the source sent them as zero.
    pub zero_pages: AtomicU64,
    /// Pages installed as zero because the source never populated them.
    pub unpopulated_pages: AtomicU64,
    /// Pages that arrived when already present (EEXIST): counted, never an error.
    pub duplicate_pages: AtomicU64,
    /// `EAGAIN` retries caused by a pending userfaultfd event.
    pub eagain_retries: AtomicU64,
    /// 2 MiB ranges installed whole by one `UFFDIO_MOVE` from a huge-page
    /// stage: one transparent huge page each, unless the kernel had none for
    /// the stage (then the final sweep collapses the range).
    pub huge_moves: AtomicU64,
    /// Of `huge_moves`, ranges a bulk lane received straight into a huge
    /// landing (no staging copy).
    pub landed_moves: AtomicU64,
    /// Bytes read from all sockets, headers included.
    pub wire_bytes: AtomicU64,
    /// Thread CPU ns of the bulk lanes inside the kernel's receive path
    /// (io_uring enter, where the socket copies run).
    pub stage_receive_ns: AtomicU64,
    /// Thread CPU ns parsing and checking frames (tags).
    pub stage_verify_ns: AtomicU64,
    /// Thread CPU ns installing pages (`UFFDIO_COPY`/`MOVE`, which also
    /// wake the faulting threads).
    pub stage_install_ns: AtomicU64,
    /// Thread CPU ns of the fault loop (all of it: the demand path's cost on
    /// this end).
    pub fault_loop_cpu_ns: AtomicU64,
    /// Demand requests sent.
    pub demand_requests: AtomicU64,
    /// Pages a balloon removed (`UFFD_EVENT_REMOVE`), counted per event.
    pub removed_pages: AtomicU64,
    /// Faults on pages known to read zero (removed by a balloon, or never
    /// populated on the source), served with a zero page.
    pub zero_faults: AtomicU64,
}

/// CPU time of the calling thread, ns.
pub fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// Attributes a thread's CPU time to stages: each [`Lap::lap`] adds the CPU
/// time since the previous one to a counter.
#[derive(Debug)]
pub struct Lap(u64);

impl Lap {
    /// Starts timing now.
    pub fn start() -> Lap {
        Lap(thread_cpu_ns())
    }
    /// Adds the CPU time since the last lap to `into`.
    pub fn lap(&mut self, into: &AtomicU64) {
        let now = thread_cpu_ns();
        // Relaxed: a statistic.
        into.fetch_add(now.saturating_sub(self.0), Ordering::Relaxed);
        self.0 = now;
    }
    /// Restarts without attributing.
    pub fn skip(&mut self) {
        self.0 = thread_cpu_ns();
    }
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        // Relaxed: a statistic, read only after the workers joined.
        c.fetch_add(n, Ordering::Relaxed);
    }
    fn get(c: &AtomicU64) -> u64 {
        // Relaxed: read after join(), which already orders it.
        c.load(Ordering::Relaxed)
    }
}

/// Bytes per [`STEP`] since a start instant, owned by one worker.
#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    buckets: Vec<u64>,
}

impl Timeline {
    /// A timeline whose step 0 begins at `start`.
    pub fn new(start: Instant) -> Timeline {
        Timeline {
            start,
            buckets: Vec::new(),
        }
    }

    /// Records `bytes` at the current time.
    pub fn record(&mut self, bytes: u64) {
        let step = self.start.elapsed().as_millis() / STEP.as_millis();
        let i = usize::try_from(step).unwrap_or(usize::MAX).min(1 << 20);
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, 0);
        }
        self.buckets[i] += bytes;
    }

    /// The samples, bytes per step.
    pub fn samples(&self) -> &[u64] {
        &self.buckets
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// A fresh latency histogram in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // 3 significant figures over 1 ns..100 s are valid bounds, so creation cannot fail;
    // fall back to an auto-resizing histogram rather than panic anyway.
    Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable_histogram())
}

fn unreachable_histogram() -> Histogram<u64> {
    // Histogram::new(3) only fails for sigfig > 5.
    Histogram::new(2).unwrap_or_else(|_| std::process::abort())
}

/// Records a duration in nanoseconds, saturating.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(ns);
}

impl LatencySummary {
    /// Percentiles of a nanosecond histogram.
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns_to_us(ns);
        LatencySummary {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// Nanoseconds as fractional microseconds (for reports only).
pub fn ns_to_us(ns: u64) -> f64 {
    // Lossy above 2^53 ns (104 days): fine for a report.
    #[allow(clippy::cast_precision_loss)]
    let v = ns as f64 / 1000.0;
    v
}

/// The CDF of a histogram as (microseconds, cumulative fraction) points, for plots.
pub fn cdf_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for q in [
        0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995,
        0.999, 0.9999, 1.0,
    ] {
        out.push((ns_to_us(h.value_at_quantile(q)), q));
    }
    out
}

/// Every recorded bucket of a histogram as (microseconds, count), in order:
/// the whole distribution, for a CDF drawn without losing its tail.
pub fn histogram_points(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    h.iter_recorded()
        .map(|v| (ns_to_us(v.value_iterated_to()), v.count_at_value()))
        .collect()
}

/// One channel's traffic.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelReport {
    /// Channel index (0 = demand lane).
    pub channel: u16,
    /// `demand` or `bulk`.
    pub lane: &'static str,
    /// Bytes read from this connection.
    pub bytes: u64,
    /// Frames handled.
    pub frames: u64,
    /// Bytes per 100 ms step since the session began.
    pub bytes_per_step: Vec<u64>,
    /// Receives in flight (receive buffers posted to the kernel and not yet
    /// filled), the fewest seen at any receive.
    pub recv_in_flight_min: usize,
    /// The same, on average over receives.
    pub recv_in_flight_mean: f64,
}

/// `a / b` as a float, for reports (0 when `b` is 0).
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        return 0.0;
    }
    // Lossy above 2^53: fine for a report.
    #[allow(clippy::cast_precision_loss)]
    let r = a as f64 / b as f64;
    r
}

/// What the destination measured.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationReport {
    /// Session id in hex.
    pub session: String,
    /// From the first connection to the moment every page was present.
    pub elapsed_s: f64,
    /// Pages in the layout.
    pub pages_total: u64,
    /// Bytes of guest memory in the layout.
    pub bytes_total: u64,
    /// Faults read from userfaultfd.
    pub faults: u64,
    /// Faults coalesced into a request in flight.
    pub coalesced_faults: u64,
    /// Faults on pages already present.
    pub stale_faults: u64,
    /// Pages installed from demand replies.
    pub demand_pages: u64,
    /// Data pages installed from bulk lanes.
    pub bulk_pages: u64,
    /// Zero pages (sent as a flag).
    pub zero_pages: u64,
    /// Never-populated pages (sent as a range).
    pub unpopulated_pages: u64,
    /// Pages that arrived twice (EEXIST).
    pub duplicate_pages: u64,
    /// EAGAIN retries.
    pub eagain_retries: u64,
    /// 2 MiB ranges installed whole as transparent huge pages (`UFFDIO_MOVE`
    /// from a huge-page stage).
    pub huge_moves: u64,
    /// Of `huge_moves`, ranges received straight into a huge landing by a
    /// bulk lane, so moved in with no copy in user space.
    pub landed_moves: u64,
    /// Bytes received, headers included.
    pub wire_bytes: u64,
    /// Engine-side service latency: fault read to install done.
    pub fault_service: LatencySummary,
    /// CDF points of the same, for plots.
    pub fault_service_cdf: Vec<(f64, f64)>,
    /// The whole histogram of the same: (µs, count) per recorded bucket.
    pub fault_service_histogram: Vec<(f64, u64)>,
    /// Per-channel traffic.
    pub channels: Vec<ChannelReport>,
    /// Frame protection: `none`, `mac` or `aead`.
    pub protection: String,
    /// Its AEAD: `aegis-128l`, `aes-256-gcm` or `chacha20-poly1305` (empty under `none`).
    pub cipher: String,
    /// Resumes after a broken link.
    pub resumes: u32,
    /// Bytes of page-state metadata (the present bitmap) allocated.
    pub metadata_bytes: u64,
    /// Per-stage CPU cost, ns per page received on the bulk lanes (receive,
    /// verify, install) and µs per demand request (the fault loop's CPU).
    pub stages: StageCosts,
    /// The source's digests of every page, when it sent them
    /// (`crate::verify::compare` checks memory against them). Not in the
    /// JSON: one per MiB of guest memory.
    #[serde(skip)]
    pub source_digests: Option<Vec<crate::verify::RegionDigests>>,
}

/// CPU cost of the stages of one end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageCosts {
    /// Bulk: kernel receive, ns per page.
    pub receive_ns_per_page: f64,
    /// Bulk: frame parse and tag check, ns per page.
    pub verify_ns_per_page: f64,
    /// Bulk: install (and wake), ns per page.
    pub install_ns_per_page: f64,
    /// Demand: this end's CPU per request, µs.
    pub demand_us_per_request: f64,
    /// Demand requests.
    pub demand_requests: u64,
}

impl DestinationReport {
    pub(crate) fn build(
        session: String,
        elapsed: Duration,
        pages_total: u64,
        bytes_total: u64,
        c: &Counters,
        h: &Histogram<u64>,
        channels: Vec<ChannelReport>,
    ) -> DestinationReport {
        DestinationReport {
            session,
            elapsed_s: elapsed.as_secs_f64(),
            pages_total,
            bytes_total,
            faults: Counters::get(&c.faults),
            coalesced_faults: Counters::get(&c.coalesced_faults),
            stale_faults: Counters::get(&c.stale_faults),
            demand_pages: Counters::get(&c.demand_pages),
            bulk_pages: Counters::get(&c.bulk_pages),
            zero_pages: Counters::get(&c.zero_pages),
            unpopulated_pages: Counters::get(&c.unpopulated_pages),
            duplicate_pages: Counters::get(&c.duplicate_pages),
            eagain_retries: Counters::get(&c.eagain_retries),
            huge_moves: Counters::get(&c.huge_moves),
            landed_moves: Counters::get(&c.landed_moves),
            wire_bytes: Counters::get(&c.wire_bytes),
            fault_service: LatencySummary::of(h),
            fault_service_cdf: cdf_points(h),
            fault_service_histogram: histogram_points(h),
            channels,
            protection: String::new(),
            cipher: String::new(),
            resumes: 0,
            metadata_bytes: 0,
            source_digests: None,
            stages: {
                let bulk = Counters::get(&c.bulk_pages).max(1);
                let per = |a: &AtomicU64| ratio(Counters::get(a), bulk);
                let reqs = Counters::get(&c.demand_requests);
                StageCosts {
                    receive_ns_per_page: per(&c.stage_receive_ns),
                    verify_ns_per_page: per(&c.stage_verify_ns),
                    install_ns_per_page: per(&c.stage_install_ns),
                    demand_us_per_request: ratio(Counters::get(&c.fault_loop_cpu_ns), reqs.max(1))
                        / 1000.0,
                    demand_requests: reqs,
                }
            },
        }
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// What the source measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceReport {
    /// Session id in hex.
    pub session: String,
    /// From the first connection to release.
    pub elapsed_s: f64,
    /// Demand requests served.
    pub demand_requests: u64,
    /// Data pages sent on the demand lane.
    pub demand_pages: u64,
    /// Data pages sent on bulk lanes.
    pub bulk_pages: u64,
    /// Pages sent as zero flags.
    pub zero_pages: u64,
    /// Pages sent as never-populated ranges.
    pub unpopulated_pages: u64,
    /// Bytes written to all sockets, headers included.
    pub wire_bytes: u64,
    /// True once the destination confirmed every page and released the source.
    pub released: bool,
    /// Resumes after a broken link.
    pub resumes: u64,
    /// Frame protection: `none`, `mac` or `aead`.
    pub protection: String,
    /// Seconds spent classifying pages (page-table scans and zero checks).
    pub classify_s: f64,
    /// Bytes of page-state metadata (the sent bitmap) allocated.
    pub metadata_bytes: u64,
    /// Per-stage CPU cost on the source.
    pub stages: SourceStageCosts,
    /// What pre-copy did (none: pure post-copy).
    pub precopy: Option<crate::source::precopy::PrecopyReport>,
}

/// CPU cost of the source's stages: ns per page sent on the bulk lanes, µs
/// per demand request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStageCosts {
    /// Claiming pages from the plan.
    pub claim_ns_per_page: f64,
    /// Classifying pages (page-table scan, zero check) and building frames.
    pub classify_ns_per_page: f64,
    /// Computing tags (or encrypting).
    pub seal_ns_per_page: f64,
    /// The kernel's send (copy into the socket).
    pub send_ns_per_page: f64,
    /// Demand lane thread CPU per request, µs.
    pub demand_us_per_request: f64,
}

/// Session ids in reports.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
