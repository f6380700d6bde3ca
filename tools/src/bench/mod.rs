//! `ringfault bench`: migrates a synthetic VM between two processes (or two
//! network namespaces) while its workload runs, and reports what the guest felt,
//! what the link carried, what it cost, and whether every byte arrived.
//!
//! One run, per design (ringfault, then the classic baseline if asked):
//! 1. the source process builds the VM's memory, the destination process starts;
//! 2. the workload runs on the source for the warm-up;
//! 3. switch-over: the source stops its workload and serves; the destination
//!    connects and resumes the workload at once, on memory that is still missing;
//! 4. post-copy until every page is present, then a short tail;
//! 5. both ends hash every page; the parent compares.
//!
//! A raw TCP stream over the same path gives the link's limit first.
//!
//! This module holds the options and the orchestration; `supervisor` runs
//! the child processes (`child`, `classic`; their protocol is `events`),
//! `report` turns what they measured into figures, `perf` profiles them, and
//! `procfs` reads the host.

pub mod child;
pub mod classic;
pub mod cpu;
pub mod events;
pub mod netns;
mod perf;
pub mod phases;
pub mod plot;
pub mod procfs;
pub mod report;
mod supervisor;
pub mod targets;
pub mod units;
pub mod vm;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use events::{Design, Event, Role, Spec};
use netns::{NetnsPair, Shaping};
use perf::Perf;
use report::{Gathered, Probe, Report, RunResult};
use supervisor::{Child, Ctx};
use units::{parse_duration, parse_fraction, parse_rate, parse_size};
use vm::VmSpec;
use workload::Pattern;

pub use child::Args as ChildArgs;

/// Baselines that can run in the same invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// One blocking fault thread, one connection, no prefetch (`bench::classic`).
    Classic,
    /// ringfault without pre-copy, the same workload (with `--precopy`).
    Postcopy,
}

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest memory size (e.g. 64M, 1G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Fraction of pages ever populated (the rest are never touched).
    #[arg(long, default_value = "1.0", value_parser = parse_fraction)]
    populated: f64,
    /// Workload access pattern.
    #[arg(long, value_enum, default_value = "random-write")]
    pattern: Pattern,
    /// Workload threads (vCPUs), 1 to 64.
    #[arg(long, default_value_t = 2, value_parser = units::parse_vcpus)]
    threads: usize,
    /// Transparent huge pages for guest memory on both ends, as a real VMM's
    /// guest memory usually has them (`off` to compare).
    #[arg(long, value_enum, default_value = "on")]
    thp: Switch,
    /// Back guest memory with hugetlbfs pages of this size (2M or 1G) on both
    /// ends, from the pool (`sysctl vm.nr_hugepages`).
    #[arg(long, value_parser = parse_huge_page)]
    hugepages: Option<u64>,
    #[command(flatten)]
    dest: crate::receive::DestOptions,
    /// How long the workload runs on the source before switch-over.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// How long the workload goes on once every page is present.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    tail: Duration,
    /// Seed of the VM's contents and the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run source and destination in two network namespaces joined by veth
    /// (needs root and iproute2); they are removed at the end, even on failure.
    #[arg(long)]
    netns: bool,
    /// Connect the two processes with a Unix socket instead of TCP over loopback
    /// (not with --netns).
    #[arg(long, conflicts_with = "netns")]
    unix: bool,
    /// Shape the link with tc (tbf), e.g. 10gbit (needs --netns).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<(String, u64)>,
    /// Add latency with tc netem, e.g. 1ms (needs --netns and a kernel with netem).
    #[arg(long)]
    delay: Option<String>,
    /// Add loss with tc netem, e.g. 0.1% (needs --netns and a kernel with netem).
    #[arg(long)]
    loss: Option<String>,
    /// Also run a baseline design in the same harness, and print ratios.
    #[arg(long, value_enum)]
    compare: Vec<Baseline>,
    /// Skip the raw TCP probe.
    #[arg(long)]
    no_probe: bool,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Check the report against the targets in this TOML file instead of the
    /// built-in `docs/targets.toml`.
    #[arg(long)]
    targets: Option<PathBuf>,
    /// Write a plot (fault-latency CDF, throughput and ops/s over time) as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Run each design this many times, alternating; the report shows the run of
    /// median total time in full and the spread of the headline figures.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Profile both processes of each design from switch-over until every page is
    /// present with `perf record -g`, into DIR/DESIGN.data, with a text summary in
    /// DIR/DESIGN.txt (perturbs the figures a little; the pause includes starting
    /// perf).
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    timeout: Duration,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

fn parse_huge_page(s: &str) -> Result<u64, String> {
    match s {
        "2M" | "2m" | "2MiB" => Ok(2 << 20),
        "1G" | "1g" | "1GiB" => Ok(1 << 30),
        _ => Err(format!("{s:?}: the huge page size is 2M or 1G")),
    }
}

/// The synthetic VM the options describe.
fn vm_spec(a: &Args) -> VmSpec {
    VmSpec {
        size: a.size,
        populated: a.populated,
        seed: a.seed,
        page_size: a.hugepages.unwrap_or(4096),
        thp: a.hugepages.is_none() && a.thp == Switch::On,
    }
}

fn base_spec(a: &Args, key_hex: &str, listen: &str) -> Spec {
    Spec {
        design: Design::Ringfault,
        role: Role::Source,
        vm: vm_spec(a),
        pattern: a.pattern,
        threads: a.threads,
        engine: a.dest.clone(),
        listen: listen.to_owned(),
        warmup_ms: u64::try_from(a.warmup.as_millis()).unwrap_or(u64::MAX),
        tail_ms: u64::try_from(a.tail.as_millis()).unwrap_or(u64::MAX),
        key_hex: key_hex.to_owned(),
        probe_bytes: 0,
    }
}

fn spawn_pair(ctx: &Ctx, spec: &Spec, label: &str) -> anyhow::Result<(Child, Child, String)> {
    let mut s = spec.clone();
    s.role = Role::Source;
    let mut src = Child::spawn(&format!("{label} source"), &s, ctx.src_ns.as_deref())?;
    s.role = Role::Destination;
    let mut dst = Child::spawn(&format!("{label} destination"), &s, ctx.dst_ns.as_deref())?;
    let addr = ctx.wait(&mut src, Some(&mut dst), |ev| match ev {
        Event::Ready { addr } => Some(addr),
        _ => None,
    })?;
    let addr = addr.ok_or_else(|| anyhow::anyhow!("the source gave no address"))?;
    ctx.wait(&mut dst, Some(&mut src), |ev| {
        matches!(ev, Event::Ready { .. }).then_some(())
    })?;
    Ok((src, dst, addr))
}

fn run_probe(ctx: &Ctx, spec: &Spec) -> anyhow::Result<Probe> {
    let mut s = spec.clone();
    s.design = Design::Probe;
    // The populated share of the VM (at least 256 MiB, for a steady figure).
    let populated = units::to_f64(spec.vm.size) * spec.vm.populated.clamp(0.0, 1.0);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0 <= v <= size
    let bytes = populated as u64;
    s.probe_bytes = bytes.max(256 << 20);
    ctx.pb.set_message("raw TCP probe");
    let (mut src, mut dst, addr) = spawn_pair(ctx, &s, "probe")?;
    dst.send(&format!("switch {addr}"))?;
    let (bytes, secs, rx_cpu) = ctx.wait(&mut dst, Some(&mut src), |ev| match ev {
        Event::ProbeDone {
            bytes,
            secs,
            cpu_ns,
        } => Some((bytes, secs, cpu_ns)),
        _ => None,
    })?;
    let tx_cpu = ctx.wait(&mut src, None, |ev| match ev {
        Event::ProbeSent { cpu_ns } => Some(cpu_ns),
        _ => None,
    })?;
    let gib = units::to_f64(bytes) / units::to_f64(1 << 30);
    Ok(Probe {
        transport: if spec.listen.starts_with("unix:") {
            "unix".into()
        } else {
            "tcp".into()
        },
        bytes,
        secs,
        gbps: units::to_f64(bytes) / secs.max(1e-9) / 1e9,
        runs_gbps: Vec::new(),
        cpu_s_per_gib: units::to_f64(rx_cpu + tx_cpu) / 1e9 / gib.max(1e-9),
    })
}

fn run_design(ctx: &Ctx, spec: &Spec, design: Design) -> anyhow::Result<RunResult> {
    run_labelled(ctx, spec, design, None)
}

/// Runs one design; `label` names it in the report (the design's name if
/// none).
fn run_labelled(
    ctx: &Ctx,
    spec: &Spec,
    design: Design,
    label: Option<&'static str>,
) -> anyhow::Result<RunResult> {
    let mut s = spec.clone();
    s.design = design;
    let label = label.unwrap_or(match design {
        Design::Ringfault => "ringfault",
        Design::Classic => "classic",
        Design::Probe => "probe",
    });
    ctx.pb.set_position(0);
    ctx.pb.set_message(format!(
        "{label}: building {} of guest memory",
        units::human_bytes(spec.vm.size)
    ));
    let (mut src, mut dst, addr) = spawn_pair(ctx, &s, label)?;
    let mut perf = match &ctx.perf {
        Some(dir) => Some(Perf::start(dir, label, &[src.proc.id(), dst.proc.id()])?),
        None => None,
    };
    ctx.pb
        .set_message(format!("{label}: workload on the source"));
    src.send("go")?;
    ctx.wait(&mut src, Some(&mut dst), |ev| {
        matches!(ev, Event::WarmedUp).then_some(())
    })?;
    if let Some(p) = perf.as_mut() {
        p.command("enable")?;
    }
    let switch = |ev: Event| match ev {
        Event::Switch { t_ns, ops_steps } => Some((t_ns, ops_steps)),
        _ => None,
    };
    // The ringfault source stops its VM in the handshake, once the
    // destination authenticated; the classic one has no handshake and stops
    // after its warm-up, and its destination must not resume before that.
    let (t_switch_ns, source_ops) = if design == Design::Classic {
        let sw = ctx.wait(&mut src, Some(&mut dst), switch)?;
        dst.send(&format!("switch {addr}"))?;
        sw
    } else {
        dst.send(&format!("switch {addr}"))?;
        ctx.wait(&mut src, Some(&mut dst), switch)?
    };
    ctx.pb.set_message(format!("{label}: post-copy"));
    ctx.wait(&mut dst, Some(&mut src), |ev| {
        matches!(ev, Event::AllPresent).then_some(())
    })?;
    if let Some(p) = perf {
        let txt = p.finish()?;
        ctx.pb
            .suspend(|| eprintln!("{label}: perf profile summary in {}", txt.display()));
    }
    ctx.pb.set_message(format!("{label}: tail"));
    let dest = ctx.wait(&mut dst, Some(&mut src), |ev| match ev {
        Event::DestDone(d) => Some(d),
        _ => None,
    })?;
    ctx.pb.set_message(format!("{label}: verifying"));
    src.send("verify")?;
    let (
        source_counts,
        source_cpu_ns,
        source_digests,
        source_scan_ms,
        source_stages,
        source_huge,
        source_precopy,
    ) = ctx.wait(&mut src, None, |ev| match ev {
        Event::SourceDone {
            counts,
            cpu_ns,
            digests,
            scan_ms,
            stages,
            anon_huge_bytes,
            precopy,
        } => Some((
            counts,
            cpu_ns,
            digests,
            scan_ms,
            stages,
            anon_huge_bytes,
            precopy,
        )),
        _ => None,
    })?;
    Ok(RunResult::compute(Gathered {
        design: label.to_owned(),
        size: spec.vm.size,
        t_switch_ns,
        source_ops,
        warmup_s: units::to_f64(spec.warmup_ms) / 1e3,
        source_counts,
        source_cpu_ns,
        source_digests,
        source_scan_ms,
        source_stages,
        source_anon_huge_bytes: source_huge,
        source_precopy,
        dest: *dest,
    }))
}

fn random_key_hex() -> anyhow::Result<String> {
    let mut k = [0u8; 32];
    getrandom::getrandom(&mut k).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
    Ok(k.iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs the subcommand.
pub fn run(a: Args) -> anyhow::Result<()> {
    vm_spec(&a).validate()?;
    // Every engine option is checked before any work (the children check
    // them again, with the run's key).
    let key = ringfault_proto::auth::PresharedKey::new(vec![0x5a; 32])?;
    a.dest.config(key.clone())?;
    a.dest.source_config(key)?;
    if a.compare.contains(&Baseline::Postcopy) && a.dest.engine.precopy.is_none() {
        anyhow::bail!(
            "--compare postcopy compares a pre-copy run with pure post-copy: add --precopy N or --precopy auto"
        );
    }
    if let Some(ps) = a.hugepages {
        if a.compare.contains(&Baseline::Classic) {
            anyhow::bail!("--compare classic runs on 4 KiB pages only: drop it with --hugepages");
        }
        procfs::check_huge_pool(ps, a.size)?;
    }
    // Both ends hold the populated memory (never-populated pages arrive as the
    // shared zero page).
    let need = units::to_f64(a.size) * a.populated * 2.0;
    if let Some(avail) = procfs::mem_available() {
        if need > units::to_f64(avail) * 0.9 {
            // `need` is at most twice the size, a u64.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let need_bytes = need as u64;
            anyhow::bail!(
                "a {} VM {:.0}% populated needs about {} of memory on this host (source and destination), and {} is available",
                units::human_bytes(a.size),
                a.populated * 100.0,
                units::human_bytes(need_bytes),
                units::human_bytes(avail)
            );
        }
    }
    if !a.netns && (a.rate.is_some() || a.delay.is_some() || a.loss.is_some()) {
        anyhow::bail!("--rate, --delay and --loss shape the veth link: they need --netns");
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, interrupted.clone())
            .context("installing a signal handler")?;
    }
    // The namespaces live until the end of this function, whatever happens.
    let ns = if a.netns {
        Some(NetnsPair::create(&Shaping {
            rate: a.rate.clone(),
            delay: a.delay.clone(),
            loss: a.loss.clone(),
        })?)
    } else {
        None
    };
    let unix_path = (a.unix && ns.is_none())
        .then(|| std::env::temp_dir().join(format!("ringfault-bench-{}.sock", std::process::id())));
    let listen = match (&ns, &unix_path) {
        (Some(n), _) => format!("tcp:{}:0", n.src_ip),
        (None, Some(p)) => format!("unix:{}", p.display()),
        (None, None) => "tcp:127.0.0.1:0".to_owned(),
    };
    let pb = if a.quiet {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new(a.size / 4096);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} pages  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(100));
        pb
    };
    let ctx = Ctx {
        deadline: Instant::now() + a.timeout,
        interrupted,
        pb,
        src_ns: ns.as_ref().map(|n| n.src.clone()),
        dst_ns: ns.as_ref().map(|n| n.dst.clone()),
        listen: listen.clone(),
        perf: a.perf.clone(),
    };
    let spec = base_spec(&a, &random_key_hex()?, &ctx.listen);
    let target_specs = match &a.targets {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading --targets {}", p.display()))?;
            targets::parse(&text).with_context(|| format!("--targets {}", p.display()))?
        }
        None => targets::parse(targets::BUILT_IN).context("the built-in targets")?,
    };
    let load_at_start = procfs::load_average();
    let started_at = cpu::utc_now();
    let result = (|| -> anyhow::Result<Report> {
        let probe = if a.no_probe {
            None
        } else {
            // The link's limit: the best of three streams (one is noisy on a
            // shared machine).
            let mut runs = Vec::new();
            for _ in 0..3 {
                runs.push(run_probe(&ctx, &spec)?);
            }
            let all: Vec<f64> = runs.iter().map(|p| p.gbps).collect();
            runs.into_iter()
                .max_by(|x, y| x.gbps.total_cmp(&y.gbps))
                .map(|mut best| {
                    best.runs_gbps = all;
                    best
                })
        };
        let mut rf_runs = Vec::new();
        let mut classic_runs = Vec::new();
        let mut postcopy_runs = Vec::new();
        let mut post_spec = spec.clone();
        post_spec.engine.engine.precopy = None;
        for _ in 0..a.runs {
            rf_runs.push(run_design(&ctx, &spec, Design::Ringfault)?);
            if a.compare.contains(&Baseline::Classic) {
                classic_runs.push(run_design(&ctx, &spec, Design::Classic)?);
            }
            if a.compare.contains(&Baseline::Postcopy) {
                postcopy_runs.push(run_labelled(
                    &ctx,
                    &post_spec,
                    Design::Ringfault,
                    Some("postcopy"),
                )?);
            }
        }
        let config = serde_json::json!({
            "size": a.size,
            "populated": a.populated,
            "pattern": a.pattern.name(),
            "threads": a.threads,
            "engine": spec.engine,
            "warmup_s": a.warmup.as_secs_f64(),
            "tail_s": a.tail.as_secs_f64(),
            "seed": a.seed,
            "netns": a.netns,
            "unix": a.unix,
            "rate": a.rate.as_ref().map(|r| r.0.clone()),
            "precopy": a.dest.engine.precopy.is_some(),
            "thp": spec.vm.thp,
            "page_size": spec.vm.page_size,
            "cores": ringfault_engine::sys::affinity::online_cores(),
            "load_average_at_start": load_at_start,
            "page_reporting_order": procfs::page_reporting_order(),
            "date": started_at,
            "kernel": procfs::kernel_release(),
        });
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        Report::new(command, config, probe, rf_runs, classic_runs, &target_specs)
            .map(|r| r.with_postcopy(postcopy_runs, &target_specs))
    })();
    ctx.pb.finish_and_clear();
    if let Some(p) = &unix_path {
        let _ = std::fs::remove_file(p);
    }
    let report = result?;
    print!("{}", report.table());
    if let Some(l) = load_at_start.filter(|&l| l > 0.5) {
        eprintln!(
            "ringfault: note: the 1-minute load average was {l:.2} when the run began: other work shared the CPUs, so the figures are pessimistic"
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        std::fs::write(p, plot::svg(&report))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    drop(ns);
    if !report.verified {
        anyhow::bail!("memory differs between source and destination");
    }
    Ok(())
}
