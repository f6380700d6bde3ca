//! `ringfault serve`: the source of a migration by hand. It serves a synthetic VM
//! (whose workload runs until the destination connects, the switch-over) or a
//! memory file (e.g. a Firecracker snapshot, for a remote page-fault handler), to
//! one destination, and returns once the destination has every page.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ringfault_engine::addr::Listener;
use ringfault_engine::sys::mapping::GuestMapping;
use ringfault_engine::{PeerAddr, Source, SourceConfig, SourceRegion};
use ringfault_proto::auth::PresharedKey;

use crate::bench::units::{parse_fraction, parse_size};
use crate::bench::vm::VmSpec;
use crate::bench::workload::{Params, Pattern, Workload};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to listen: `tcp:ADDR:PORT` (port 0 picks one) or `unix:PATH`.
    #[arg(long)]
    listen: String,
    /// Serve a synthetic VM of this size (e.g. `256M`, `1G`); its workload runs
    /// until the destination connects.
    #[arg(long, value_parser = parse_size, required_unless_present = "memory_file", conflicts_with = "memory_file")]
    synthetic: Option<u64>,
    /// Synthetic VM: the fraction of pages ever populated.
    #[arg(long, default_value = "1.0", value_parser = parse_fraction)]
    populated: f64,
    /// Synthetic VM: the workload's access pattern.
    #[arg(long, value_enum, default_value = "random-write")]
    pattern: Pattern,
    /// Synthetic VM: vCPU threads of the workload (0: none).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Synthetic VM: seed of its contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Serve this file's contents (mapped read-only; its length must be a multiple
    /// of 4 KiB), e.g. a Firecracker snapshot memory file.
    #[arg(long)]
    memory_file: Option<PathBuf>,
    /// The pre-shared key, shared with the destination (at least 16 bytes;
    /// trailing whitespace is ignored).
    #[arg(long)]
    key_file: PathBuf,
    /// Write the source's report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Reads a key file.
pub fn load_key(path: &std::path::Path) -> anyhow::Result<PresharedKey> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the key file {}", path.display()))?;
    PresharedKey::from_file_contents(&bytes)
        .with_context(|| format!("the key file {}", path.display()))
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let key = load_key(&args.key_file)?;
    let (region, workload) = match (&args.memory_file, args.synthetic) {
        (Some(path), _) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("opening the memory file {}", path.display()))?;
            let len = file
                .metadata()
                .with_context(|| format!("reading the size of {}", path.display()))?
                .len();
            let len = usize::try_from(len)
                .with_context(|| format!("{} is too large to map", path.display()))?;
            let m = GuestMapping::map_file(&file, len)
                .with_context(|| format!("mapping the memory file {}", path.display()))?;
            let r = SourceRegion::from_file_mapping(1, Arc::new(m))
                .context("serving the memory file")?;
            (r, None)
        }
        (None, Some(size)) => {
            let vm = VmSpec {
                size,
                populated: args.populated,
                seed: args.seed,
            };
            let m = vm.build(2).context("building the synthetic VM")?;
            let r = SourceRegion::from_mapping(1, m).context("serving the synthetic VM")?;
            (r, Some(vm))
        }
        (None, None) => anyhow::bail!("give --synthetic SIZE or --memory-file FILE"),
    };
    let area = region.area();
    let source =
        Source::new(vec![region], SourceConfig::new(key)).context("setting up the source")?;
    let addr = PeerAddr::parse(&args.listen).context("--listen")?;
    let listener = addr
        .listen()
        .with_context(|| format!("listening on {addr}"))?;
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    if let (Some(vm), true) = (workload, args.threads > 0) {
        let wl = Workload::start(
            Params {
                vm,
                pattern: args.pattern,
                threads: args.threads,
                log_writes: false,
                salt: 1,
            },
            Arc::new(area),
            None,
        )?;
        while !wait_connection(&listener, Duration::from_millis(100))? {}
        let ops = wl.ops();
        let secs = wl.started().elapsed().as_secs_f64();
        let _ = wl.stop();
        println!(
            "switch-over: the workload stopped after {ops} operations in {secs:.1} s; serving"
        );
    }
    let report = source.serve(&listener).context("serving the destination")?;
    let json = serde_json::to_string_pretty(&report)?;
    println!(
        "done: {} demand and {} bulk pages, {} zero, {} never populated, {} bytes sent in {:.2} s",
        report.demand_pages,
        report.bulk_pages,
        report.zero_pages,
        report.unpopulated_pages,
        report.wire_bytes,
        report.elapsed_s
    );
    if let Some(p) = args.json {
        std::fs::write(&p, json).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Waits up to `timeout` for a connection to be pending on `listener`.
fn wait_connection(listener: &Listener, timeout: Duration) -> anyhow::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags};
    let fd = match listener {
        Listener::Tcp(l) => l.as_fd(),
        Listener::Unix(l) => l.as_fd(),
    };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let ts = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: i64::try_from(timeout.as_nanos().min(999_999_999)).unwrap_or(0),
    };
    match poll(&mut fds, Some(&ts)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("waiting for the destination")),
    }
}
