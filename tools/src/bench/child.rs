//! The two processes of a benchmark run: `ringfault bench-child SPEC` is the same
//! binary re-executed (inside a network namespace with `--netns`) as the source or
//! the destination of one design (ringfault, classic) or of the raw TCP probe.
//!
//! The parent speaks to a child through its standard input (one command a line:
//! `go`, `switch ADDR`) and hears from it on its standard output, one JSON
//! [`Event`] a line. Anything else a child prints goes to standard error.

use std::io::{BufRead, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ringfault_engine::stats::{cdf_points, LatencySummary};
use ringfault_engine::sys::mapping::AlignedBuf;
use ringfault_engine::{Destination, PeerAddr, Source};
use ringfault_proto::auth::PresharedKey;
use serde::{Deserialize, Serialize};

use super::cpu;
use super::vm::{digests_parallel, VmSpec};
use super::workload::{Params, Pattern, Presence, Workload, WorkloadResult};
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
        /// ms one page-map scan of the VM takes (timed after the session; the
        /// engine does one when it starts serving, inside the switch-over).
        scan_ms: Option<f64>,
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
    /// Workload-observed latency of touches of missing pages that faulted.
    pub fault: Lat,
    /// Touches of pages missing when checked that did not fault (under 1 µs).
    pub fast_touches: u64,
    /// When `Destination::connect` (connections, handshakes, memory) returned.
    pub t_connected_ns: u64,
    /// Its CDF.
    pub fault_cdf: Vec<(f64, f64)>,
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
}

/// Prints one event line.
pub fn emit(ev: &Event) {
    if let Ok(line) = serde_json::to_string(ev) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec, JSON.
    spec: String,
}

/// Runs a child; never returns an error to `main` (it reports it as an event).
pub fn run(args: Args) -> anyhow::Result<()> {
    // If the parent dies, so do we (no orphan holding a namespace or memory).
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let result = serde_json::from_str::<Spec>(&args.spec)
        .context("bad child spec")
        .and_then(|spec| match (spec.design, spec.role) {
            (Design::Ringfault, Role::Source) => ringfault_source(&spec),
            (Design::Ringfault, Role::Destination) => ringfault_destination(&spec),
            (Design::Classic, Role::Source) => super::classic::source(&spec),
            (Design::Classic, Role::Destination) => super::classic::destination(&spec),
            (Design::Probe, Role::Source) => probe_send(&spec),
            (Design::Probe, Role::Destination) => probe_receive(&spec),
        });
    if let Err(e) = result {
        emit(&Event::Error {
            message: format!("{e:#}"),
        });
        // Threads may be blocked on pages that will never arrive: leave now.
        std::process::exit(1);
    }
    std::process::exit(0);
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

/// Workload parameters for one end.
pub fn params(spec: &Spec, destination: bool) -> Params {
    Params {
        vm: spec.vm,
        pattern: spec.pattern,
        threads: spec.threads,
        log_writes: destination,
        salt: if destination { 2 } else { 1 },
    }
}

/// The source's workload for the warm-up: started on `go`; `WarmedUp` is
/// announced after the warm-up, while it still runs.
pub fn warm_up(spec: &Spec, mem: Arc<dyn super::vm::GuestMem>) -> anyhow::Result<Workload> {
    super::workload::prepare(&params(spec, false));
    let c = command()?;
    anyhow::ensure!(c == "go", "expected `go`, got {c:?}");
    let wl = Workload::start(params(spec, false), mem, None)?;
    std::thread::sleep(Duration::from_millis(spec.warmup_ms));
    emit(&Event::WarmedUp);
    Ok(wl)
}

/// The switch-over on the source: stops the vCPUs and announces it.
pub fn switch_over(spec: &Spec, wl: Workload) {
    let mut r = wl.stop();
    let t_ns = cpu::wall_ns();
    // The sampler's last step began at the stop: it is not part of the warm-up.
    let full = usize::try_from(r.ops_steps.len().saturating_sub(1)).unwrap_or(0);
    let _ = spec;
    r.ops_steps.truncate(full.max(1));
    emit(&Event::Switch {
        t_ns,
        ops_steps: r.ops_steps,
    });
}

/// The classic design's workload phase: warm-up, then the switch-over at once
/// (it has no handshake to wait for).
pub fn source_phase(spec: &Spec, mem: Arc<dyn super::vm::GuestMem>) -> anyhow::Result<()> {
    let wl = warm_up(spec, mem)?;
    switch_over(spec, wl);
    Ok(())
}

fn ringfault_source(spec: &Spec) -> anyhow::Result<()> {
    let m = spec.vm.build(2).context("building the source's memory")?;
    let source = Source::from_memory(m.clone(), spec.engine.source_config(key(spec)?)?)?;
    let addr = PeerAddr::parse(&spec.listen)?;
    let listener = addr
        .listen()
        .with_context(|| format!("listening on {addr}"))?;
    emit(&Event::Ready {
        addr: Some(listener.local_addr()?.to_string()),
    });
    let wl = warm_up(spec, m.clone())?;
    let mut cpu0 = 0u64;
    let report = source
        .serve_with(&listener, || {
            switch_over(spec, wl);
            cpu0 = cpu::process_ns();
        })
        .context("serving")?;
    let cpu_ns = cpu::process_ns() - cpu0;
    await_verify()?;
    let t = Instant::now();
    let r = &m.regions()[0];
    let scan_ms = ringfault_engine::sys::pagemap::Scanner::new()
        .and_then(|mut sc| {
            sc.scan(
                r.addr(),
                r.addr() + r.len(),
                ringfault_engine::sys::pagemap::Query::Populated,
            )
        })
        .ok()
        .map(|_| t.elapsed().as_secs_f64() * 1e3);
    let digests = digests_parallel(&*m, spec.vm.pages(), &|_, _| {});
    emit(&Event::SourceDone {
        counts: Counts {
            faults: report.demand_requests,
            demand_pages: report.demand_pages,
            bulk_pages: report.bulk_pages,
            zero_pages: report.zero_pages,
            unpopulated_pages: report.unpopulated_pages,
            duplicate_pages: 0,
            wire_bytes: report.wire_bytes,
        },
        cpu_ns,
        digests,
        scan_ms,
    });
    Ok(())
}

/// Prints progress every 100 ms until `done`.
pub fn progress_printer(
    done: Arc<AtomicBool>,
    f: impl Fn() -> (u64, u64) + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            // Relaxed: a stop flag, seen eventually.
            while !done.load(Ordering::Relaxed) {
                let (present, total) = f();
                emit(&Event::Progress { present, total });
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .ok()
}

/// The destination's end of a run: tail, verification digests, report.
pub struct Finish {
    /// The workload.
    pub workload: Workload,
    /// Process CPU ns when `switch` arrived.
    pub cpu0: u64,
}

impl Finish {
    /// Call as soon as every page is present: notes the time and CPU, runs the
    /// tail, stops the workload, hashes memory as it arrived, and returns the
    /// common fields.
    pub fn complete(
        self,
        spec: &Spec,
        mem: &dyn super::vm::GuestMem,
    ) -> (u64, u64, WorkloadResult, Vec<u64>) {
        let t_all = cpu::wall_ns();
        let cpu1 = cpu::process_ns();
        self.workload.mark();
        emit(&Event::AllPresent);
        std::thread::sleep(Duration::from_millis(spec.tail_ms));
        let w = self.workload.stop();
        let cpu_ns = (cpu1 - self.cpu0).saturating_sub(w.cpu_to_mark_ns);
        let restore = |page: u64, buf: &mut [u8]| {
            for (t, fw) in w.first_writes.iter().enumerate() {
                if let Some(v) = fw.get(page) {
                    buf[t * 8..t * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
        };
        let digests = digests_parallel(mem, spec.vm.pages(), &restore);
        (t_all, cpu_ns, w, digests)
    }
}

fn ringfault_destination(spec: &Spec) -> anyhow::Result<()> {
    super::workload::prepare(&params(spec, true));
    emit(&Event::Ready { addr: None });
    let addr = await_switch()?;
    let t_switch_rx_ns = cpu::wall_ns();
    let cpu0 = cpu::process_ns();
    let dest = Destination::connect(&addr, spec.engine.config(key(spec)?)?)
        .with_context(|| format!("connecting to the source at {addr}"))?;
    let t_connected_ns = cpu::wall_ns();
    let mem = dest
        .memory()
        .ok_or_else(|| anyhow::anyhow!("the destination holds no memory"))?;
    let progress = dest.progress();
    let p = progress.clone();
    let presence: Presence = Arc::new(move |page| p.is_present(page));
    let workload = Workload::start(params(spec, true), mem.clone(), Some(presence))?;
    let t_resume_ns = cpu::wall_ns();
    emit(&Event::Resumed { t_ns: t_resume_ns });
    let done = Arc::new(AtomicBool::new(false));
    let p = progress.clone();
    let printer = progress_printer(done.clone(), move || (p.present(), p.total()));
    let report = dest.run().context("post-copy migration")?;
    let fin = Finish { workload, cpu0 };
    let (t_all, cpu_ns, w, digests) = fin.complete(spec, &*mem);
    done.store(true, Ordering::Relaxed);
    if let Some(h) = printer {
        let _ = h.join();
    }
    let mut bytes_steps: Vec<u64> = Vec::new();
    for c in &report.channels {
        if bytes_steps.len() < c.bytes_per_step.len() {
            bytes_steps.resize(c.bytes_per_step.len(), 0);
        }
        for (i, b) in c.bytes_per_step.iter().enumerate() {
            bytes_steps[i] += b;
        }
    }
    let fault = LatencySummary::of(&w.fault_hist);
    emit(&Event::DestDone(Box::new(DestDone {
        t_switch_rx_ns,
        t_resume_ns,
        t_all_present_ns: t_all,
        transfer_s: report.elapsed_s,
        counts: Counts {
            faults: report.faults,
            demand_pages: report.demand_pages,
            bulk_pages: report.bulk_pages,
            zero_pages: report.zero_pages,
            unpopulated_pages: report.unpopulated_pages,
            duplicate_pages: report.duplicate_pages,
            wire_bytes: report.wire_bytes,
        },
        service: Some(Lat::from(&report.fault_service)),
        service_cdf: report.fault_service_cdf.clone(),
        fault: Lat::from(&fault),
        fast_touches: w.fast_touches,
        t_connected_ns,
        fault_cdf: cdf_points(&w.fault_hist),
        ops_steps: w.ops_steps,
        bytes_steps,
        channel_bytes: report.channels.iter().map(|c| c.bytes).collect(),
        cpu_ns,
        digests,
    })));
    drop(mem);
    Ok(())
}

/// The probe's sender: streams `probe_bytes` in 2 MiB writes from a pre-touched
/// buffer.
fn probe_send(spec: &Spec) -> anyhow::Result<()> {
    let addr = PeerAddr::parse(&spec.listen)?;
    let listener = addr
        .listen()
        .with_context(|| format!("listening on {addr}"))?;
    let buf = AlignedBuf::new(2 << 20)?;
    emit(&Event::Ready {
        addr: Some(listener.local_addr()?.to_string()),
    });
    let mut s = listener.accept().context("accepting the probe")?;
    let cpu0 = cpu::process_ns();
    let mut left = spec.probe_bytes;
    while left > 0 {
        let n = usize::try_from(left.min(2 << 20))?;
        s.write_all(&buf.as_slice()[..n]).context("probe send")?;
        left -= u64::try_from(n)?;
    }
    s.shutdown();
    emit(&Event::ProbeSent {
        cpu_ns: cpu::process_ns() - cpu0,
    });
    Ok(())
}

/// The probe's receiver: reads in 2 MiB reads until the end of the stream.
fn probe_receive(_spec: &Spec) -> anyhow::Result<()> {
    emit(&Event::Ready { addr: None });
    let addr = await_switch()?;
    let mut buf = AlignedBuf::new(2 << 20)?;
    let t0 = Instant::now();
    let cpu0 = cpu::process_ns();
    let mut s = addr.connect(Duration::from_secs(10))?;
    let mut bytes = 0u64;
    loop {
        let n = s.read(buf.as_mut_slice()).context("probe receive")?;
        if n == 0 {
            break;
        }
        bytes += u64::try_from(n)?;
    }
    emit(&Event::ProbeDone {
        bytes,
        secs: t0.elapsed().as_secs_f64(),
        cpu_ns: cpu::process_ns() - cpu0,
    });
    Ok(())
}
