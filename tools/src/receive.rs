//! `ringfault receive`: the destination of a migration by hand. It connects to a
//! `ringfault serve`, registers guest memory with userfaultfd, and runs the
//! synthetic VM's workload on it from the first instant, while every page arrives
//! on demand and in the background. A progress bar (pages present, GB/s,
//! faults/s, time left) runs meanwhile, unless `--quiet`. Once every page is
//! present, memory is checked against the source's digests of every page
//! when the source sends them (`verified: yes`, or the ranges that differ).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use ringfault_engine::destination::Progress;
use ringfault_engine::stats::LatencySummary;
use ringfault_engine::verify::compare;
use ringfault_engine::{
    BulkReceive, Destination, DestinationConfig, InstallMode, PeerAddr, Verify,
};

use crate::bench::units::to_f64;

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

/// How bulk lanes are received.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum BulkRecv {
    /// Each payload straight into the memory it is installed from: a whole
    /// 2 MiB range lands in a huge page that is moved in as is (copy
    /// installs of 4 KiB pages without --encrypt; `stream` otherwise).
    Direct,
    /// Into a ring of receive buffers, frames parsed where they land.
    Stream,
}

impl From<BulkRecv> for BulkReceive {
    fn from(b: BulkRecv) -> BulkReceive {
        match b {
            BulkRecv::Direct => BulkReceive::Direct,
            BulkRecv::Stream => BulkReceive::Stream,
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

/// The AEAD of frame protection, chosen by the destination.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CipherChoice {
    /// AEGIS-128L where the CPU has AES instructions, ChaCha20-Poly1305
    /// elsewhere.
    Auto,
    /// AEGIS-128L.
    #[value(name = "aegis-128l")]
    Aegis128l,
    /// AES-256-GCM.
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    #[value(name = "chacha20-poly1305")]
    Chacha20Poly1305,
}

impl CipherChoice {
    /// The cipher this choice means here.
    pub fn cipher(self) -> ringfault_engine::Cipher {
        match self {
            CipherChoice::Auto => ringfault_engine::Cipher::for_this_cpu(),
            CipherChoice::Aegis128l => ringfault_engine::Cipher::Aegis128L,
            CipherChoice::Aes256Gcm => ringfault_engine::Cipher::Aes256Gcm,
            CipherChoice::Chacha20Poly1305 => ringfault_engine::Cipher::ChaCha20Poly1305,
        }
    }
}

/// How many pre-copy rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrecopyRounds {
    /// Until the dirty set converges.
    Auto,
    /// This many.
    Rounds(u32),
}

fn parse_precopy(s: &str) -> Result<PrecopyRounds, String> {
    if s == "auto" {
        return Ok(PrecopyRounds::Auto);
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=64).contains(&n) => Ok(PrecopyRounds::Rounds(n)),
        _ => Err(format!(
            "{s:?}: give a number of rounds (1 to 64) or `auto`"
        )),
    }
}

/// A liveness timeout: at least 0.5 s (a shorter one would declare a link
/// dead between two heartbeats).
fn parse_liveness(s: &str) -> Result<Duration, String> {
    let d = crate::bench::units::parse_duration(s)?;
    if d < Duration::from_millis(500) {
        return Err(format!(
            "{s:?}: the liveness timeout must be at least 500ms"
        ));
    }
    Ok(d)
}

/// Options of both ends (`serve`, `receive`, `uffd-handler`, `bench`).
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct EngineOptions {
    /// Frame integrity: `mac` authenticates every frame (the default); `none`
    /// turns that off, and must be set on both ends.
    #[arg(long, value_enum, default_value = "mac")]
    pub integrity: Integrity,
    /// Encrypt page contents too (with the cipher of `--cipher`); both ends
    /// must set it.
    #[arg(long)]
    pub encrypt: bool,
    /// Declare a lane dead after this long without a byte from the peer.
    #[arg(long, default_value = "10s", value_parser = parse_liveness)]
    pub liveness: Duration,
    /// Keep trying to resume a broken link for this long (0s: never resume).
    #[arg(long, default_value = "300s", value_parser = crate::bench::units::parse_duration)]
    pub resume_timeout: Duration,
    /// Do not pin the engine's workers to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Run the demand path `SCHED_FIFO` and bulk work `SCHED_BATCH` (needs
    /// `CAP_SYS_NICE`). Off by default: when cores are few, faults served at
    /// real-time priority starve the bulk transfer (see docs/design.md).
    #[arg(long)]
    pub realtime: bool,
    /// The default; kept so that older scripts still run.
    #[arg(long, hide = true, conflicts_with = "realtime")]
    pub no_realtime: bool,
    /// Source: run pre-copy rounds while the VM runs, then switch over and
    /// post-copy the rest: a number of rounds, or `auto` (until the dirty
    /// set converges or stops shrinking).
    #[arg(long, value_parser = parse_precopy)]
    pub precopy: Option<PrecopyRounds>,
    /// Source, with `--precopy auto`: switch over once the dirty pages can be
    /// sent within this pause.
    #[arg(long, default_value = "20ms", value_parser = crate::bench::units::parse_duration)]
    pub max_pause: Duration,
    /// Source: pages per bulk data frame (tuning).
    #[arg(long, hide = true, default_value_t = 512)]
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
        cfg.prioritize_demand = self.realtime;
        cfg.protection = self.protection()?;
        cfg.liveness = self.liveness;
        cfg.resume_timeout = self.resume_timeout;
        cfg.frame_pages = self.frame_pages;
        cfg.batch_bytes = usize::try_from(self.batch_bytes)?;
        cfg.precopy = self
            .precopy
            .map(|r| ringfault_engine::source::precopy::Precopy {
                rounds: match r {
                    PrecopyRounds::Auto => ringfault_engine::source::precopy::Rounds::Auto,
                    PrecopyRounds::Rounds(n) => ringfault_engine::source::precopy::Rounds::Fixed(n),
                },
                max_pause: self.max_pause,
            });
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
    /// How bulk lanes are received.
    #[arg(long, value_enum, default_value = "direct")]
    pub bulk_receive: BulkRecv,
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
    #[arg(long, default_value = "1ms", value_parser = crate::bench::units::parse_duration)]
    pub demand_interval: Duration,
    /// Demand requests allowed back to back before pacing applies.
    #[arg(long, default_value_t = 64)]
    pub demand_burst: u32,
    /// The AEAD behind frame tags and `--encrypt`, which the destination
    /// chooses (the source accepts any): `auto` takes AEGIS-128L where the
    /// CPU has AES instructions, ChaCha20-Poly1305 elsewhere.
    #[arg(long, value_enum, default_value = "auto")]
    pub cipher: CipherChoice,
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
        cfg.bulk_receive = self.bulk_receive.into();
        cfg.prefetch_after = self.prefetch;
        cfg.prefetch_before = self.prefetch_before;
        cfg.protection = self.engine.protection()?;
        cfg.cipher = self.cipher.cipher();
        cfg.liveness = self.engine.liveness;
        cfg.resume_timeout = self.engine.resume_timeout;
        cfg.host_first_bulk = self.host_bulk;
        cfg.demand_interval = self.demand_interval;
        cfg.demand_burst = self.demand_burst;
        cfg.pin_workers &= !self.engine.no_pin;
        cfg.prioritize_demand = self.engine.realtime;
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
    #[arg(long, default_value_t = 2, value_parser = crate::bench::units::parse_vcpus_or_none)]
    threads: usize,
    /// Write the destination's report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar (nor, when standard error is not a terminal, progress
    /// lines).
    #[arg(long)]
    quiet: bool,
    /// Check every page against the source's digests after completion, and
    /// fail if the source does not send them (`serve --verify`). Without it,
    /// memory is checked whenever the source sends digests (a synthetic VM
    /// does by default).
    #[arg(long, conflicts_with = "no_verify")]
    verify: bool,
    /// Do not ask the source for digests.
    #[arg(long)]
    no_verify: bool,
}

/// How often the progress display is brought up to date.
const TICK: Duration = Duration::from_millis(200);
/// How often a progress line is printed when standard error is not a
/// terminal (a log file).
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Shows the migration's progress until `done`: on a terminal, a bar with
/// pages present, GB/s, faults/s and the time left; otherwise one line every
/// [`LOG_EVERY`].
fn show_progress(
    progress: Progress,
    done: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rf-progress".into())
        .spawn(move || {
            let total = progress.total();
            let tty = std::io::stderr().is_terminal();
            let pb = if tty {
                let pb = ProgressBar::new(total);
                pb.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} pages ({percent}%)  {msg}  ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                pb
            } else {
                ProgressBar::hidden()
            };
            let t0 = Instant::now();
            let mut last = (t0, progress.wire_bytes(), progress.faults());
            let mut logged = t0;
            // Relaxed: a stop flag, seen on the next tick.
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                let now = Instant::now();
                let (bytes, faults) = (progress.wire_bytes(), progress.faults());
                let dt = now.duration_since(last.0).as_secs_f64().max(1e-6);
                let gbps = to_f64(bytes.saturating_sub(last.1)) / dt / 1e9;
                let fps = to_f64(faults.saturating_sub(last.2)) / dt;
                last = (now, bytes, faults);
                let present = progress.present();
                pb.set_position(present);
                pb.set_message(format!("{gbps:.2} GB/s, {fps:.0} faults/s"));
                if !tty && now.duration_since(logged) >= LOG_EVERY {
                    logged = now;
                    let pct = to_f64(present) * 100.0 / to_f64(total.max(1));
                    eprintln!(
                        "ringfault receive: {present}/{total} pages ({pct:.0}%), {gbps:.2} GB/s, {fps:.0} faults/s, {:.0} s",
                        now.duration_since(t0).as_secs_f64()
                    );
                }
            }
            pb.finish_and_clear();
        })
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let key = crate::serve::load_key(&args.key_file)?;
    let addr = PeerAddr::parse(&args.from).context("--from")?;
    let mut cfg = args.dest.config(key)?;
    cfg.verify = match (args.verify, args.no_verify) {
        (_, true) => Verify::Off,
        (true, false) => Verify::Required,
        (false, false) => Verify::IfSent,
    };
    let dest = Destination::connect(&addr, cfg).map_err(|e| {
        let hint = matches!(e, ringfault_engine::EngineError::Unsupported(_))
            .then_some(" (start the source with `ringfault serve --verify`)")
            .unwrap_or("");
        anyhow::Error::new(e).context(format!("connecting to the source at {addr}{hint}"))
    })?;
    let verifies = dest.verifies();
    let mem = dest.memory();
    let progress = dest.progress();
    let workload = match &mem {
        Some(m) if args.threads > 0 && m.regions().len() == 1 => {
            let vm = VmSpec {
                size: m.size(),
                populated: 1.0,
                seed: 2,
                page_size: m.regions()[0].page_size() as u64,
                thp: false,
            };
            let p = progress.clone();
            let presence: Presence = Arc::new(move |page| p.is_present(page));
            Some(Workload::start(
                Params {
                    vm,
                    pattern: args.pattern,
                    threads: args.threads,
                    // To hash pages as they arrived, the writes are undone.
                    log_writes: verifies,
                    salt: 2,
                },
                m.clone(),
                Some(presence),
            )?)
        }
        _ => None,
    };
    eprintln!("receiving {} pages from {addr}", progress.total());
    let done = Arc::new(AtomicBool::new(false));
    let shown = if args.quiet {
        None
    } else {
        Some(
            show_progress(progress.clone(), done.clone())
                .context("starting the progress display")?,
        )
    };
    let report = dest.run();
    // Relaxed: the display stops on its next tick.
    done.store(true, Ordering::Relaxed);
    if let Some(h) = shown {
        let _ = h.join();
    }
    let report = report.context("post-copy migration")?;
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
    let verdict = match (&report.source_digests, &mem) {
        (Some(digests), Some(m)) => {
            let restore = |_region: u32, page: u64, buf: &mut [u8]| {
                if let Some(w) = &wl {
                    w.restore_page(page, buf);
                }
            };
            Some(
                compare(m, digests, &restore)
                    .context("verifying memory against the source's digests")?,
            )
        }
        _ => None,
    };
    match &verdict {
        Some(bad) if bad.is_empty() => {
            println!("verified: yes (every page equals the source's)");
        }
        Some(bad) => {
            println!(
                "verified: NO: {} ranges differ from the source's:",
                bad.len()
            );
            for m in bad.iter().take(20) {
                println!(
                    "  region {} pages {}..{} ({} pages)",
                    m.region,
                    m.first_page,
                    m.first_page + m.pages,
                    m.pages
                );
            }
            if bad.len() > 20 {
                println!("  ... and {} more (all in --json)", bad.len() - 20);
            }
        }
        None if verifies => {
            println!("verified: not checked (this destination holds no memory of its own)");
        }
        None => {
            println!(
                "verified: not checked (the source sends no digests; `ringfault serve --verify` does)"
            );
        }
    }
    if let Some(p) = args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "verify".into(),
                serde_json::json!({
                    "verified": verdict.as_ref().map(Vec::is_empty),
                    "mismatches": verdict.clone().unwrap_or_default(),
                }),
            );
        }
        std::fs::write(&p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    drop(mem);
    if verdict.is_some_and(|bad| !bad.is_empty()) {
        anyhow::bail!("memory differs from the source's (see the ranges above)");
    }
    Ok(())
}
