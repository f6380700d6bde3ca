//! `ringfault uffd-handler`: a drop-in page-fault handler for Firecracker's
//! snapshot restore (`"mem_backend": {"backend_type": "Uffd", "backend_path":
//! SOCKET}`).
//!
//! - Local mode (`--memory-file FILE`): pages come from the snapshot memory file.
//! - Remote mode (`--from tcp:HOST:PORT --key-file K`): pages come, post-copy,
//!   from `ringfault serve --memory-file FILE` on another host.
//!
//! The handler exits with status 0 when Firecracker goes away, and with a clear
//! message and status 1 on bad input or failure. Statistics are printed at exit
//! and on `SIGUSR1`. The mechanism lives in `ringfault_engine::firecracker`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ringfault_engine::error::EngineError;
use ringfault_engine::firecracker::mappings::MappingsError;
use ringfault_engine::firecracker::{
    self, serve_local, serve_remote, Ended, FirecrackerError, HandlerStats, LocalOptions,
};
use ringfault_engine::PeerAddr;

use crate::receive::DestOptions;

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Unix socket Firecracker connects to: its snapshot-load `backend_path`.
    #[arg(long)]
    socket: PathBuf,
    /// Local mode: serve pages from this snapshot memory file.
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    memory_file: Option<PathBuf>,
    /// Remote mode: fetch pages from `ringfault serve --memory-file` at this
    /// address (`tcp:HOST:PORT` or `unix:PATH`).
    #[arg(long, requires = "key_file")]
    from: Option<String>,
    /// Remote mode: the pre-shared key, shared with the source.
    #[arg(long, requires = "from")]
    key_file: Option<PathBuf>,
    /// Local mode: install only the pages that fault; do not fill the rest in the
    /// background after the first fault.
    #[arg(long)]
    no_background: bool,
    /// Remote mode: how the destination runs.
    #[command(flatten)]
    dest: DestOptions,
    /// Also write the final statistics as JSON to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

enum Mode {
    Local(String, std::fs::File),
    Remote(PeerAddr, Box<ringfault_engine::DestinationConfig>),
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    // Everything that can be checked before Firecracker connects is checked now.
    let mode = match (&args.memory_file, &args.from, &args.key_file) {
        (Some(path), None, _) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("opening the memory file {}", path.display()))?;
            let len = file
                .metadata()
                .with_context(|| format!("reading the size of {}", path.display()))?
                .len();
            if len == 0 || len % 4096 != 0 {
                anyhow::bail!(
                    "the memory file {} is {len} bytes: a snapshot memory file is a non-zero multiple of 4 KiB",
                    path.display()
                );
            }
            Mode::Local(path.display().to_string(), file)
        }
        (None, Some(from), Some(key)) => {
            if args.dest.install == crate::receive::Install::Move {
                anyhow::bail!(
                    "--install move needs a userfaultfd with UFFD_FEATURE_MOVE; \
                     Firecracker's enables only EVENT_REMOVE"
                );
            }
            let key = crate::serve::load_key(key)?;
            let addr = PeerAddr::parse(from).context("--from")?;
            Mode::Remote(addr, Box::new(args.dest.config(key)?))
        }
        _ => anyhow::bail!("give --memory-file FILE, or --from ADDR with --key-file K"),
    };
    let stats = Arc::new(HandlerStats::new(match mode {
        Mode::Local(..) => "local",
        Mode::Remote(..) => "remote",
    }));
    report_on_sigusr1(stats.clone())?;

    let listener = firecracker::listen(&args.socket)?;
    println!("listening on unix:{}", args.socket.display());
    let _ = std::io::stdout().flush();
    let hs = firecracker::accept(&listener);
    // One Firecracker per handler: nobody else may connect.
    drop(listener);
    let _ = std::fs::remove_file(&args.socket);
    let hs = hs?;
    let mib: u64 = hs.mappings.iter().map(|m| m.size).sum::<u64>() >> 20;
    eprintln!(
        "ringfault uffd-handler: Firecracker (pid {}) connected: {} regions, {mib} MiB",
        hs.peer.pid,
        hs.mappings.len()
    );

    let mut local_file = None;
    let result = match mode {
        Mode::Local(path, file) => {
            let opts = LocalOptions {
                background: !args.no_background,
                ..LocalOptions::default()
            };
            let r = serve_local(hs, &path, file, opts, stats.clone());
            local_file = Some(path);
            r
        }
        Mode::Remote(addr, cfg) => serve_remote(hs, &addr, *cfg, stats.clone()),
    };
    let report = stats.report();
    eprintln!("ringfault uffd-handler: {}", report.summary());
    if let Some(p) = &args.stats_json {
        std::fs::write(p, report.to_json())
            .with_context(|| format!("writing the statistics to {}", p.display()))?;
    }
    match result {
        Ok(Ended::PeerGone) => {
            eprintln!("ringfault uffd-handler: Firecracker went away; exiting");
            Ok(())
        }
        // Local mode: the engine's error names the file itself (one that
        // shrank while served); a file too short for the mappings is named
        // here.
        Err(FirecrackerError::Engine(e)) if local_file.is_some() => Err(e.into()),
        Err(e @ FirecrackerError::Mappings(MappingsError::BeyondFile { .. })) => {
            let path = local_file.unwrap_or_default();
            Err(anyhow::Error::new(e).context(format!(
                "the memory file {path} does not hold Firecracker's guest memory"
            )))
        }
        Err(e @ FirecrackerError::Engine(EngineError::LayoutMismatch(_))) => {
            Err(anyhow::Error::new(e).context(
                "the source must serve one region per Firecracker mapping, in the same order and \
                 of the same sizes",
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints the statistics to stderr whenever the process gets `SIGUSR1`.
fn report_on_sigusr1(stats: Arc<HandlerStats>) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])
        .context("installing the SIGUSR1 handler")?;
    std::thread::Builder::new()
        .name("rf-sigusr1".into())
        .spawn(move || {
            for _ in signals.forever() {
                let r = stats.report();
                eprintln!("ringfault uffd-handler: {}", r.summary());
                eprintln!("ringfault uffd-handler: {}", r.to_json());
            }
        })
        .context("starting the SIGUSR1 thread")?;
    Ok(())
}
