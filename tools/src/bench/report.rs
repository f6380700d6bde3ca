//! The benchmark's report: the figures of each run, the ratios against the
//! baselines and the targets, as the JSON report's schema (`docs/json.md`).
//! `compute` derives them from what the two processes measured; `table`
//! prints them.

mod compute;
mod table;

use serde::Serialize;

use super::events::Lat;
use super::targets::Target;

pub use compute::Gathered;

/// Workload operations per second.
#[derive(Debug, Clone, Serialize)]
pub struct Ops {
    /// On the source, before switch-over.
    pub before: f64,
    /// On the destination, until every page was present.
    pub during: f64,
    /// On the destination, in the tail.
    pub after: f64,
    /// The worst 100 ms step during post-copy (as ops/s).
    pub worst_100ms: f64,
    /// `after ÷ before`: how fast the workload runs on the destination once
    /// every page is present, against the source (0 when unknown).
    pub after_over_before: f64,
}

/// Transparent huge pages of guest memory, source against destination.
#[derive(Debug, Clone, Serialize)]
pub struct HugePages {
    /// `AnonHugePages` of the source's guest memory, bytes.
    pub source_bytes: Option<u64>,
    /// `AnonHugePages` of the destination's guest memory at the end, bytes.
    pub destination_bytes: Option<u64>,
    /// Destination ÷ source (none when the source had none).
    pub kept: Option<f64>,
    /// 2 MiB ranges the destination installed whole, as huge pages
    /// (`UFFDIO_MOVE` from a huge-page stage: never split, never collapsed).
    pub moved_whole: u64,
    /// Of those, ranges a bulk lane received straight into the huge page it
    /// moved in (`--bulk-receive direct`: no staging copy).
    pub landed_whole: u64,
}

/// CPU time of the migration machinery (vCPU threads excluded).
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    /// Source, seconds.
    pub source_s: f64,
    /// Destination, seconds.
    pub destination_s: f64,
    /// Source, seconds per GiB of guest memory.
    pub source_s_per_gib: f64,
    /// Destination, seconds per GiB.
    pub destination_s_per_gib: f64,
    /// Both ends, seconds per GiB.
    pub total_s_per_gib: f64,
}

/// Pages.
#[derive(Debug, Clone, Serialize)]
pub struct Pages {
    /// In the VM.
    pub total: u64,
    /// Faults the destination read from userfaultfd.
    pub faults: u64,
    /// Installed from demand replies.
    pub demand: u64,
    /// Data pages from the background push.
    pub bulk: u64,
    /// Zero pages (flag only).
    pub zero: u64,
    /// Never populated (range only).
    pub unpopulated: u64,
    /// Arrived twice.
    pub duplicate: u64,
}

/// Timelines for the plot, in 100 ms steps.
#[derive(Debug, Clone, Serialize)]
pub struct Timelines {
    /// Source workload ops per step; the last step ends at switch-over.
    pub source_ops: Vec<u64>,
    /// Destination workload ops per step from its resume.
    pub destination_ops: Vec<u64>,
    /// ms from switch-over to the destination's resume.
    pub resume_ms: f64,
    /// Bytes received per step from the destination's first connection.
    pub bytes: Vec<u64>,
    /// ms from switch-over to the first connection.
    pub connect_ms: f64,
    /// ms from switch-over to every page present.
    pub all_present_ms: f64,
}

/// The switch-over pause, stage by stage (ms).
#[derive(Debug, Clone, Serialize)]
pub struct PauseBreakdown {
    /// Source stopped its workload to the destination receiving `switch` (the
    /// benchmark's own relay through the parent).
    pub relay_ms: f64,
    /// Connections, handshakes, mapping and registering memory (includes the
    /// source's page-map scan, which runs before it accepts).
    pub connect_ms: f64,
    /// Starting the destination's vCPUs.
    pub resume_ms: f64,
    /// One page-map scan of the source's memory, timed separately.
    pub source_scan_ms: Option<f64>,
}

/// One design's run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// `ringfault` or `classic`.
    pub design: String,
    /// Switch-over to every page present, seconds.
    pub total_s: f64,
    /// Source workload stopped to destination workload running, ms.
    pub switchover_pause_ms: f64,
    /// Where the pause went.
    pub pause_breakdown: PauseBreakdown,
    /// First connection to every page present, seconds.
    pub transfer_s: f64,
    /// Workload-observed latency of touches of missing pages that faulted.
    pub fault_latency: Lat,
    /// Touches of pages missing when checked that took under 1 µs (the page was
    /// installed in between; not counted as faults).
    pub fast_touches: u64,
    /// Its CDF (µs, fraction), 19 quantiles.
    pub fault_latency_cdf: Vec<(f64, f64)>,
    /// Its whole histogram: (µs, count) per recorded bucket.
    pub fault_latency_histogram: Vec<(f64, u64)>,
    /// Engine-side service latency (fault read to install), if measured.
    pub engine_service: Option<Lat>,
    /// Its CDF, 19 quantiles.
    pub engine_service_cdf: Vec<(f64, f64)>,
    /// Its whole histogram: (µs, count) per recorded bucket.
    pub engine_service_histogram: Vec<(f64, u64)>,
    /// Bytes received / transfer time, GB/s (10^9 B/s).
    pub bulk_gbps: f64,
    /// Best 100 ms step, GB/s.
    pub peak_gbps: f64,
    /// Workload ops/s.
    pub ops: Ops,
    /// Workload-seconds lost: the post-copy phase's missing operations in
    /// seconds of the pre-switch-over rate, `total × (1 − during ÷ before)`.
    pub workload_lost_s: f64,
    /// CPU.
    pub cpu: Cpu,
    /// Pages.
    pub pages: Pages,
    /// Bytes the source sent.
    pub wire_bytes_sent: u64,
    /// Bytes the destination received.
    pub wire_bytes_received: u64,
    /// Bytes received per channel (demand lane first).
    pub channel_bytes: Vec<u64>,
    /// Both ends byte-identical at the end.
    pub verified: bool,
    /// 1 MiB chunks that differ.
    pub mismatched_chunks: u64,
    /// The first one, as a MiB offset.
    pub first_mismatch_mib: Option<u64>,
    /// Timelines.
    pub timelines: Timelines,
    /// Per-stage CPU costs of both ends (ringfault only): `source` and
    /// `destination` objects as the engine reports them.
    pub stages: serde_json::Value,
    /// Fewest receive buffers posted on a bulk lane at any receive.
    pub recv_in_flight_min: Option<usize>,
    /// Frame protection used.
    pub protection: String,
    /// Its AEAD: `aegis-128l`, `aes-256-gcm` or `chacha20-poly1305` (empty under `none`).
    pub cipher: String,
    /// Bytes of page-state metadata on the destination.
    pub metadata_bytes: u64,
    /// Transparent huge pages of guest memory.
    pub huge_pages: HugePages,
    /// Pre-copy, when it ran.
    pub precopy: Option<PrecopyFigures>,
}

/// What pre-copy did, and what it cost the running workload.
#[derive(Debug, Clone, Serialize)]
pub struct PrecopyFigures {
    /// Rounds.
    pub rounds: u64,
    /// Why the rounds stopped.
    pub stopped_because: String,
    /// Pages sent before the switch-over.
    pub pages_before_switch: u64,
    /// Pages sent after it (demand and bulk).
    pub pages_after_switch: u64,
    /// Pages sent twice or more (written after they were sent).
    pub pages_resent: u64,
    /// Pages the destination dropped at the switch-over.
    pub discarded: u64,
    /// Dirty pages after each round (the last: at the switch-over).
    pub dirty_per_round: Vec<u64>,
    /// Seconds of pre-copy.
    pub duration_s: f64,
    /// Workload ops/s during pre-copy (tracked).
    pub ops_during: f64,
    /// `ops_during ÷ ops/s before pre-copy`: the cost of tracking.
    pub tracked_over_untracked: f64,
}

/// The raw stream probe (TCP, or Unix with `--unix`).
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// `tcp` or `unix`.
    pub transport: String,
    /// Bytes streamed.
    pub bytes: u64,
    /// Seconds.
    pub secs: f64,
    /// GB/s (the best of the runs).
    pub gbps: f64,
    /// Every run's GB/s.
    pub runs_gbps: Vec<f64>,
    /// CPU seconds per GiB, both ends (the kernel's TCP copy and little else).
    pub cpu_s_per_gib: f64,
}

/// ringfault ÷ a baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// The baseline.
    pub baseline: String,
    /// Throughput ratio (higher is better for ringfault).
    pub throughput: Option<f64>,
    /// p50 fault latency ratio (lower is better).
    pub fault_p50: Option<f64>,
    /// p99 fault latency ratio (lower is better).
    pub fault_p99: Option<f64>,
    /// CPU per GiB ratio (lower is better).
    pub cpu_per_gib: Option<f64>,
}

/// Everything.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command line.
    pub command: String,
    /// Settings.
    pub config: serde_json::Value,
    /// Link limit.
    pub link_probe: Option<Probe>,
    /// ringfault: the run of median total time.
    pub ringfault: RunResult,
    /// The classic baseline, if run: the run of median total time.
    pub classic: Option<RunResult>,
    /// Headline figures over every run (with `--runs` above 1).
    pub spread: Vec<Spread>,
    /// Every ringfault run, in order (with `--runs` above 1).
    pub ringfault_runs: Vec<RunResult>,
    /// Every classic run, in order.
    pub classic_runs: Vec<RunResult>,
    /// Pure post-copy (`--compare postcopy`): the run of median total time.
    pub postcopy: Option<RunResult>,
    /// Every pure post-copy run, in order.
    pub postcopy_runs: Vec<RunResult>,
    /// Ratios ringfault ÷ baseline.
    pub ratios: Vec<Ratios>,
    /// Targets.
    pub targets: Vec<Target>,
    /// Every run verified.
    pub verified: bool,
}

/// One headline figure over several runs.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    /// Design.
    pub design: String,
    /// Figure.
    pub what: String,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest.
    pub max: f64,
    /// Runs.
    pub runs: usize,
}
