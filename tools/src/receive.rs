//! `ringfault receive`: the destination of a migration by hand. It connects to a
//! `ringfault serve`, registers guest memory with userfaultfd, and runs the
//! synthetic VM's workload on it from the first instant, while every page arrives
//! on demand and in the background.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ringfault_engine::stats::LatencySummary;
use ringfault_engine::{Destination, DestinationConfig, InstallMode, PeerAddr};

use crate::bench::vm::VmSpec;
use crate::bench::workload::{Params, Pattern, Presence, Workload};

/// How pages are installed (`UFFDIO_COPY` or `UFFDIO_MOVE`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Install {
    /// One copy from the receive buffer.
    Copy,
    /// Move the receive buffer's pages in (Linux 6.8).
    Move,
}

impl From<Install> for InstallMode {
    fn from(i: Install) -> InstallMode {
        match i {
            Install::Copy => InstallMode::Copy,
            Install::Move => InstallMode::Move,
        }
    }
}

/// How frames are protected on the wire.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Integrity {
    /// Every frame authenticated with a tag (the default).
    Mac,
    /// No tags: anyone on the path can change pages. An explicit choice.
    None,
}

/// Options of both ends (`serve`, `receive`, `uffd-handler`, `bench`).
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct EngineOptions {
    /// Frame integrity: `mac` authenticates every frame (the default); `none`
    /// turns that off, and must be set on both ends.
    #[arg(long, value_enum, default_value = "mac")]
    pub integrity: Integrity,
    /// Encrypt page contents too (AES-256-GCM); both ends must set it.
    #[arg(long)]
    pub encrypt: bool,
    /// Declare a lane dead after this long without a byte from the peer.
    #[arg(long, default_value = "10s", value_parser = crate::bench::units::parse_duration)]
    pub liveness: Duration,
    /// Keep trying to resume a broken link for this long (0s: never resume).
    #[arg(long, default_value = "300s", value_parser = crate::bench::units::parse_duration)]
    pub resume_timeout: Duration,
    /// Do not pin the engine's workers to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Do not run the demand path SCHED_FIFO and bulk work SCHED_BATCH.
    #[arg(long)]
    pub no_realtime: bool,
    /// Source: pages per bulk data frame (tuning).
    #[arg(long, hide = true, default_value_t = 256)]
    pub frame_pages: u32,
    /// Source: bytes per bulk send (tuning).
    #[arg(long, hide = true, default_value = "2M", value_parser = crate::bench::units::parse_size)]
    pub batch_bytes: u64,
}

impl EngineOptions {
    /// The frame protection both ends use.
    pub fn protection(&self) -> anyhow::Result<ringfault_engine::Protection> {
        Ok(match (self.encrypt, self.integrity) {
            (true, Integrity::None) => {
                anyhow::bail!("--encrypt authenticates every frame too: it cannot be combined with --integrity none")
            }
            (true, Integrity::Mac) => ringfault_engine::Protection::Aead,
            (false, Integrity::Mac) => ringfault_engine::Protection::Mac,
            (false, Integrity::None) => ringfault_engine::Protection::None,
        })
    }

    /// The source's configuration.
    pub fn source_config(
        &self,
        key: ringfault_proto::auth::PresharedKey,
    ) -> anyhow::Result<ringfault_engine::SourceConfig> {
        let mut cfg = ringfault_engine::SourceConfig::new(key);
        cfg.pin_workers &= !self.no_pin;
        cfg.prioritize_demand &= !self.no_realtime;
        cfg.protection = self.protection()?;
        cfg.liveness = self.liveness;
        cfg.resume_timeout = self.resume_timeout;
        cfg.frame_pages = self.frame_pages;
        cfg.batch_bytes = usize::try_from(self.batch_bytes)?;
        Ok(cfg)
    }
}

/// Destination options (`receive`, `uffd-handler`, `bench`).
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct DestOptions {
    /// Bulk connections (each with its own worker thread), plus one demand lane.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: u16,
    /// How pages are installed.
    #[arg(long, value_enum, default_value = "copy")]
    pub install: Install,
    /// Pages prefetched after a faulting page (0: none).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=4096))]
    pub prefetch: u16,
    /// Pages prefetched before a faulting page.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=4096))]
    pub prefetch_before: u16,
    /// Run the first bulk lane in the fault loop's ring instead of its own thread.
    #[arg(long, hide = true)]
    pub host_bulk: bool,
    /// Demand pacing: at most one demand request per this interval on
    /// average, after a burst (0s: none); faults meanwhile join the next.
    #[arg(long, default_value = "0s", value_parser = crate::bench::units::parse_duration)]
    pub demand_interval: Duration,
    /// Demand requests allowed back to back before pacing applies.
    #[arg(long, default_value_t = 64)]
    pub demand_burst: u32,
    /// Options of both ends.
    #[command(flatten)]
    pub engine: EngineOptions,
}

impl DestOptions {
    /// The destination's configuration.
    pub fn config(
        &self,
        key: ringfault_proto::auth::PresharedKey,
    ) -> anyhow::Result<DestinationConfig> {
        let mut cfg = DestinationConfig::new(key);
        cfg.bulk_channels = self.channels;
        cfg.install = self.install.into();
        cfg.prefetch_after = self.prefetch;
        cfg.prefetch_before = self.prefetch_before;
        cfg.protection = self.engine.protection()?;
        cfg.liveness = self.engine.liveness;
        cfg.resume_timeout = self.engine.resume_timeout;
        cfg.host_first_bulk = self.host_bulk;
        cfg.demand_interval = self.demand_interval;
        cfg.demand_burst = self.demand_burst;
        cfg.pin_workers &= !self.engine.no_pin;
        cfg.prioritize_demand &= !self.engine.no_realtime;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The source's configuration (for the bench, which runs both ends).
    pub fn source_config(
        &self,
        key: ringfault_proto::auth::PresharedKey,
    ) -> anyhow::Result<ringfault_engine::SourceConfig> {
        self.engine.source_config(key)
    }
}

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The source: `tcp:HOST:PORT` or `unix:PATH`.
    #[arg(long)]
    from: String,
    /// The pre-shared key, shared with the source.
    #[arg(long)]
    key_file: PathBuf,
    #[command(flatten)]
    dest: DestOptions,
    /// The workload's access pattern on the destination.
    #[arg(long, value_enum, default_value = "random-write")]
    pattern: Pattern,
    /// vCPU threads of the workload (0: none).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Write the destination's report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let key = crate::serve::load_key(&args.key_file)?;
    let addr = PeerAddr::parse(&args.from).context("--from")?;
    let dest = Destination::connect(&addr, args.dest.config(key)?)
        .with_context(|| format!("connecting to the source at {addr}"))?;
    let mem = dest.memory();
    let progress = dest.progress();
    let workload = match &mem {
        Some(m) if args.threads > 0 && m.regions().len() == 1 => {
            let vm = VmSpec {
                size: m.size(),
                populated: 1.0,
                seed: 2,
            };
            let p = progress.clone();
            let presence: Presence = Arc::new(move |page| p.is_present(page));
            Some(Workload::start(
                Params {
                    vm,
                    pattern: args.pattern,
                    threads: args.threads,
                    log_writes: false,
                    salt: 2,
                },
                m.clone(),
                Some(presence),
            )?)
        }
        _ => None,
    };
    eprintln!("receiving {} pages from {addr}", progress.total());
    let report = dest.run().context("post-copy migration")?;
    std::thread::sleep(Duration::from_millis(200));
    let wl = workload.map(Workload::stop);
    println!(
        "done in {:.2} s: {} faults, {} demand and {} bulk pages, {} zero, {} never populated, {} duplicates, {} bytes received",
        report.elapsed_s,
        report.faults,
        report.demand_pages,
        report.bulk_pages,
        report.zero_pages,
        report.unpopulated_pages,
        report.duplicate_pages,
        report.wire_bytes
    );
    let s = &report.fault_service;
    println!(
        "engine fault service: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({} faults)",
        s.p50_us, s.p99_us, s.max_us, s.count
    );
    if let Some(w) = &wl {
        let l = LatencySummary::of(&w.fault_hist);
        println!(
            "workload-observed first touches of missing pages: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({} touches)",
            l.p50_us, l.p99_us, l.max_us, l.count
        );
    }
    if let Some(p) = args.json {
        std::fs::write(&p, report.to_json()).with_context(|| format!("writing {}", p.display()))?;
    }
    drop(mem);
    Ok(())
}
