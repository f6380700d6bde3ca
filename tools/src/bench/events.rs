//! What the parent and a child of a benchmark run say to each other: the
//! [`Spec`] a child gets as its one argument, the commands it reads from its
//! standard input (one a line: `go`, `switch ADDR`, `verify`), and the JSON
//! [`Event`]s it prints on its standard output, one a line. Both designs'
//! children (`child`, `classic`) and the parent (`supervisor`) use them.

use std::io::{BufRead, Write};

use anyhow::Context;
use ringfault_engine::stats::LatencySummary;
use ringfault_engine::PeerAddr;
use ringfault_proto::auth::PresharedKey;
use serde::{Deserialize, Serialize};

use super::vm::VmSpec;
use super::workload::Pattern;
use crate::receive::DestOptions;

/// Which design a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Design {
    /// The ringfault engine.
    Ringfault,
    /// The classic baseline (`bench::classic`).
    Classic,
    /// A raw TCP stream: the link's limit.
    Probe,
}

/// Which end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Listens, holds the VM first.
    Source,
    /// Connects at switch-over, runs the VM afterwards.
    Destination,
}

/// Everything a child needs, passed as one JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Design.
    pub design: Design,
    /// End.
    pub role: Role,
    /// The VM.
    pub vm: VmSpec,
    /// Workload pattern.
    pub pattern: Pattern,
    /// vCPU threads.
    pub threads: usize,
    /// Engine options.
    pub engine: DestOptions,
    /// Source: where to listen.
    pub listen: String,
    /// Source: how long the workload runs before switch-over.
    pub warmup_ms: u64,
    /// Destination: how long the workload goes on once every page is present.
    pub tail_ms: u64,
    /// The session key, hex.
    pub key_hex: String,
    /// Probe: bytes to stream.
    pub probe_bytes: u64,
}

/// Latency percentiles (µs), as in `ringfault_engine::stats::LatencySummary`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Lat {
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

impl From<&LatencySummary> for Lat {
    fn from(l: &LatencySummary) -> Lat {
        Lat {
            count: l.count,
            p50_us: l.p50_us,
            p90_us: l.p90_us,
            p99_us: l.p99_us,
            p999_us: l.p999_us,
            max_us: l.max_us,
            mean_us: l.mean_us,
        }
    }
}

/// Page and byte counts of one end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Faults read from userfaultfd (destination).
    pub faults: u64,
    /// Pages sent or installed on demand.
    pub demand_pages: u64,
    /// Data pages sent or installed in the background.
    pub bulk_pages: u64,
    /// Zero pages (flag only on the wire).
    pub zero_pages: u64,
    /// Never-populated pages (a range on the wire).
    pub unpopulated_pages: u64,
    /// Pages that arrived twice (destination).
    pub duplicate_pages: u64,
    /// 2 MiB ranges installed whole as huge pages (destination).
    #[serde(default)]
    pub huge_moves: u64,
    /// Of those, ranges received straight into a huge page (destination).
    #[serde(default)]
    pub landed_moves: u64,
    /// Bytes on the wire, headers included.
    pub wire_bytes: u64,
}

/// One line from a child.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "kebab-case")]
pub enum Event {
    /// Memory is built; a source gives its address.
    Ready {
        /// `tcp:...` or `unix:...` (source only).
        addr: Option<String>,
    },
    /// The source's warm-up is over: the destination may connect.
    WarmedUp,
    /// The source stopped its workload: switch-over begins.
    Switch {
        /// Wall clock, ns.
        t_ns: u64,
        /// Source workload operations per 100 ms step.
        ops_steps: Vec<u64>,
    },
    /// The destination's workload runs.
    Resumed {
        /// Wall clock, ns.
        t_ns: u64,
    },
    /// Every page is present (the tail and verification follow).
    AllPresent,
    /// Pages present so far.
    Progress {
        /// Present.
        present: u64,
        /// Total.
        total: u64,
    },
    /// The source is done.
    SourceDone {
        /// Counts.
        counts: Counts,
        /// CPU ns used while serving.
        cpu_ns: u64,
        /// Page digests after serving.
        digests: Vec<u64>,
        /// ms one page-map scan of the VM takes (timed after the session).
        scan_ms: Option<f64>,
        /// The engine's per-stage costs (ringfault only).
        #[serde(default)]
        stages: Option<serde_json::Value>,
        /// `AnonHugePages` of guest memory, bytes.
        #[serde(default)]
        anon_huge_bytes: Option<u64>,
        /// What pre-copy did (ringfault with `--precopy` only).
        #[serde(default)]
        precopy: Option<serde_json::Value>,
    },
    /// The destination is done.
    DestDone(Box<DestDone>),
    /// The probe's receiver is done.
    ProbeDone {
        /// Bytes received.
        bytes: u64,
        /// Seconds from connect to the last byte.
        secs: f64,
        /// CPU ns the receiver used.
        cpu_ns: u64,
    },
    /// The probe's sender is done.
    ProbeSent {
        /// CPU ns the sender used.
        cpu_ns: u64,
    },
    /// A fatal error.
    Error {
        /// One line.
        message: String,
    },
}

/// The destination's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestDone {
    /// When the switch command arrived (wall ns).
    pub t_switch_rx_ns: u64,
    /// When the workload resumed.
    pub t_resume_ns: u64,
    /// When every page was present.
    pub t_all_present_ns: u64,
    /// Seconds from the first connection to every page present.
    pub transfer_s: f64,
    /// Counts.
    pub counts: Counts,
    /// Engine-side fault service latency (none for designs that do not measure it).
    pub service: Option<Lat>,
    /// Its CDF (µs, fraction).
    pub service_cdf: Vec<(f64, f64)>,
    /// Its whole histogram: (µs, count) per recorded bucket.
    #[serde(default)]
    pub service_hist: Vec<(f64, u64)>,
    /// Workload-observed latency of touches of missing pages that faulted.
    pub fault: Lat,
    /// Touches of pages missing when checked that did not fault (under 1 µs).
    pub fast_touches: u64,
    /// When `Destination::connect` (connections, handshakes, memory) returned.
    pub t_connected_ns: u64,
    /// Its CDF.
    pub fault_cdf: Vec<(f64, f64)>,
    /// Its whole histogram: (µs, count) per recorded bucket.
    #[serde(default)]
    pub fault_hist: Vec<(f64, u64)>,
    /// Workload operations per 100 ms since resume.
    pub ops_steps: Vec<u64>,
    /// Bytes received per 100 ms since the first connection.
    pub bytes_steps: Vec<u64>,
    /// Bytes received per channel (demand lane first).
    pub channel_bytes: Vec<u64>,
    /// CPU ns of the migration machinery (the process less its vCPUs).
    pub cpu_ns: u64,
    /// Page digests at the end, as the pages arrived.
    pub digests: Vec<u64>,
    /// The engine's per-stage costs (ringfault only).
    #[serde(default)]
    pub stages: Option<serde_json::Value>,
    /// Fewest receives in flight on a bulk lane (ringfault only).
    #[serde(default)]
    pub recv_in_flight_min: Option<usize>,
    /// Frame protection (`none` for classic).
    #[serde(default)]
    pub protection: String,
    /// Its AEAD (empty under `none`).
    #[serde(default)]
    pub cipher: String,
    /// Bytes of page-state metadata on the destination.
    #[serde(default)]
    pub metadata_bytes: u64,
    /// `AnonHugePages` of guest memory at the end of the tail, bytes.
    #[serde(default)]
    pub anon_huge_bytes: Option<u64>,
}

/// Prints one event line.
pub fn emit(ev: &Event) {
    if let Ok(line) = serde_json::to_string(ev) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Reads the next command from the parent.
pub fn command() -> anyhow::Result<String> {
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading a command from the parent")?;
    if n == 0 {
        anyhow::bail!("the parent went away");
    }
    Ok(line.trim().to_owned())
}

/// Waits for `verify`: the source hashes its memory only once the destination's
/// tail is over, so as not to steal its CPU.
pub fn await_verify() -> anyhow::Result<()> {
    let c = command()?;
    anyhow::ensure!(c == "verify", "expected `verify`, got {c:?}");
    Ok(())
}

/// Waits for `switch ADDR` and returns ADDR.
pub fn await_switch() -> anyhow::Result<PeerAddr> {
    let c = command()?;
    let addr = c
        .strip_prefix("switch ")
        .ok_or_else(|| anyhow::anyhow!("expected `switch ADDR`, got {c:?}"))?;
    Ok(PeerAddr::parse(addr)?)
}

/// The session key.
pub fn key(spec: &Spec) -> anyhow::Result<PresharedKey> {
    let bytes = (0..spec.key_hex.len() / 2)
        .map(|i| u8::from_str_radix(&spec.key_hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .context("bad key")?;
    Ok(PresharedKey::new(bytes)?)
}
