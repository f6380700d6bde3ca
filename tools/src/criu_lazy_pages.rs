//! `ringfault criu-lazy-pages`: a drop-in for `criu lazy-pages`.
//!
//! Start it before `criu restore --lazy-pages`, with the same images and
//! work directories; it listens on `WORK_DIR/lazy-pages.socket`, serves
//! every restored task's faults and then the rest of its lazy pages, and
//! exits when every task has exited or has all its pages:
//!
//! ```text
//! ringfault criu-lazy-pages --images-dir D --work-dir W [--page-server HOST:PORT] &
//! criu restore --lazy-pages -D D -W W -d
//! ```
//!
//! Pages come from `pages-*.img` in `D`, or with `--page-server` from CRIU's
//! dump side (`criu dump --lazy-pages --port P`, or `criu page-server
//! --lazy-pages`). The mechanism lives in `ringfault_engine::criu`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ringfault_engine::criu::daemon::Daemon;
use ringfault_engine::criu::server::ServerOptions;
use ringfault_engine::criu::{DaemonOptions, PagesFrom};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The checkpoint's images directory (`criu dump -D`): pstree.img,
    /// pagemap-*.img, mm-*.img, and without --page-server the pages-*.img.
    #[arg(long, short = 'D')]
    images_dir: PathBuf,
    /// The restore's work directory (`criu restore -W`), where
    /// lazy-pages.socket is created. Default: the images directory, as CRIU.
    #[arg(long, short = 'W')]
    work_dir: Option<PathBuf>,
    /// Fetch lazy pages from CRIU's page server at HOST:PORT (`criu dump
    /// --lazy-pages --port PORT` on the dump side) instead of pages-*.img.
    #[arg(long, value_name = "HOST:PORT")]
    page_server: Option<String>,
    /// Write one zero byte to this descriptor once listening (as `criu
    /// --status-fd`).
    #[arg(long, value_name = "FD")]
    status_fd: Option<u32>,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Page server: pages asked for after each faulting page with it.
    #[arg(long, default_value_t = 0)]
    prefetch: u64,
    /// Page server: background pages in flight while no fault comes (up to
    /// 2048 = 8 MiB).
    #[arg(long, default_value_t = ServerOptions::default().max_window)]
    max_window: u64,
    /// Page server: background pages in flight while faults are frequent.
    #[arg(long, default_value_t = ServerOptions::default().min_window)]
    min_window: u64,
    /// Local images: most bytes the background installs per loop turn.
    #[arg(long, default_value_t = ringfault_engine::criu::local::RUN_BYTES)]
    run_bytes: usize,
    /// Cap the background transfer at this many MiB/s (0: no cap). Faults
    /// are never held back.
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 0)]
    background_rate: u64,
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.images_dir.is_dir() {
        anyhow::bail!(
            "--images-dir {}: not a directory (give the checkpoint's images directory)",
            args.images_dir.display()
        );
    }
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| args.images_dir.clone());
    if !work_dir.is_dir() {
        anyhow::bail!("--work-dir {}: not a directory", work_dir.display());
    }
    let from = match &args.page_server {
        None => PagesFrom::Images,
        Some(a) => {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !ok {
                anyhow::bail!("--page-server {a:?}: expected HOST:PORT, e.g. 127.0.0.1:27000");
            }
            PagesFrom::PageServer(a.clone())
        }
    };
    if !(1..=2048).contains(&args.max_window) || !(1..=args.max_window).contains(&args.min_window) {
        anyhow::bail!("--min-window and --max-window: 1 <= min <= max <= 2048 pages");
    }
    let mut opts = DaemonOptions::new(&args.images_dir, from);
    opts.work_dir = work_dir;
    opts.run_bytes = args.run_bytes.max(4096);
    opts.background_rate = args.background_rate.saturating_mul(1 << 20);
    opts.server = ServerOptions {
        prefetch: args.prefetch.min(1023),
        max_window: args.max_window,
        min_window: args.min_window,
        calm: Duration::from_millis(2),
    };
    let daemon = Daemon::listen(opts).with_context(|| {
        format!(
            "starting the lazy-pages daemon for {}",
            args.images_dir.display()
        )
    })?;
    println!(
        "listening on {} for {} task(s)",
        daemon.socket_path().display(),
        daemon.task_count()
    );
    let _ = std::io::stdout().flush();
    if let Some(fd) = args.status_fd {
        let path = format!("/proc/self/fd/{fd}");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&[0]))
            .with_context(|| format!("--status-fd {fd}: writing the ready byte"))?;
    }
    let summary = daemon.serve().context("serving lazy pages")?;
    eprintln!("ringfault criu-lazy-pages: {}", summary.line());
    if let Some(p) = &args.stats_json {
        std::fs::write(p, summary.to_json())
            .with_context(|| format!("--stats-json: writing {}", p.display()))?;
    }
    Ok(())
}
