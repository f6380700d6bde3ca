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

/// How the source sends page data.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Send {
    /// `writev(2)` straight from guest memory.
    Writev,
    /// io_uring `SENDMSG_ZC` from guest memory (copies anyway on loopback).
    #[value(name = "zerocopy")]
    #[serde(rename = "zerocopy")]
    ZeroCopy,
}

/// Engine options shared by `receive` and `bench`. The bench applies the
/// scheduling ones (`--spin-us`, `--no-pin`, `--no-realtime`) to both ends.
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct DestOptions {
    /// Bulk connections (each with its own worker thread), plus one demand lane.
    #[arg(long, default_value_t = 1)]
    pub channels: u16,
    /// How pages are installed.
    #[arg(long, value_enum, default_value = "copy")]
    pub install: Install,
    /// Pages prefetched after a faulting page (0: none).
    #[arg(long, default_value_t = 15)]
    pub prefetch: u32,
    /// Pages prefetched before a faulting page.
    #[arg(long, default_value_t = 0)]
    pub prefetch_before: u32,
    /// How long the fault worker (and the source's demand thread) polls before it
    /// sleeps, in µs (default: the engine's).
    #[arg(long)]
    pub spin_us: Option<u64>,
    /// Do not pin the engine's workers to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Do not run the demand path SCHED_FIFO and bulk work SCHED_BATCH.
    #[arg(long)]
    pub no_realtime: bool,
    /// How the source sends (set by `bench --send`; the source's choice).
    #[arg(skip = Send::Writev)]
    pub send: Send,
}

impl DestOptions {
    /// The destination's configuration.
    pub fn config(&self, key: ringfault_proto::auth::PresharedKey) -> DestinationConfig {
        let mut cfg = DestinationConfig::new(key);
        cfg.bulk_channels = self.channels;
        cfg.install = self.install.into();
        cfg.prefetch_after = self.prefetch;
        cfg.prefetch_before = self.prefetch_before;
        if let Some(us) = self.spin_us {
            cfg.spin = Duration::from_micros(us);
        }
        cfg.pin_workers &= !self.no_pin;
        cfg.prioritize_demand &= !self.no_realtime;
        cfg
    }

    /// The source's configuration (scheduling knobs and send mode).
    pub fn source_config(
        &self,
        key: ringfault_proto::auth::PresharedKey,
    ) -> ringfault_engine::SourceConfig {
        let mut cfg = ringfault_engine::SourceConfig::new(key);
        if let Some(us) = self.spin_us {
            cfg.spin = Duration::from_micros(us);
        }
        cfg.pin_workers &= !self.no_pin;
        cfg.prioritize_demand &= !self.no_realtime;
        cfg.send = match self.send {
            Send::Writev => ringfault_engine::source::SendMode::Writev,
            Send::ZeroCopy => ringfault_engine::source::SendMode::ZeroCopy,
        };
        cfg
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
    let dest = Destination::connect(&addr, args.dest.config(key))
        .with_context(|| format!("connecting to the source at {addr}"))?;
    let areas = dest.regions();
    let keep = dest.mappings();
    let progress = dest.progress();
    let workload = match areas.first() {
        Some(&area) if args.threads > 0 => {
            let vm = VmSpec {
                size: u64::try_from(area.len())?,
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
                Arc::new(area),
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
    drop(keep);
    Ok(())
}
