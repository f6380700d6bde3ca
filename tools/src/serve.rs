//! `ringfault serve`: the source of a migration by hand. It serves a synthetic VM
//! (whose workload runs until the destination connects, the switch-over) or a
//! memory file (e.g. a Firecracker snapshot, for a remote page-fault handler), to
//! one destination, and returns once the destination has every page.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use ringfault_engine::source::FileRegion;
use ringfault_engine::{PeerAddr, Source};
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
    #[arg(long, value_parser = parse_size)]
    synthetic: Option<u64>,
    /// Synthetic VM: the fraction of pages ever populated.
    #[arg(long, default_value = "1.0", value_parser = parse_fraction)]
    populated: f64,
    /// Synthetic VM: the workload's access pattern.
    #[arg(long, value_enum, default_value = "random-write")]
    pattern: Pattern,
    /// Synthetic VM: vCPU threads of the workload (0: none).
    #[arg(long, default_value_t = 2, value_parser = crate::bench::units::parse_vcpus_or_none)]
    threads: usize,
    /// Synthetic VM: seed of its contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Serve this file's contents (read, never written), e.g. a Firecracker
    /// snapshot memory file: all of it as one region of 4 KiB pages, or the
    /// regions given with --region.
    #[arg(long)]
    memory_file: Option<PathBuf>,
    /// A region of the memory file: `SIZE[@OFFSET][:PAGE]` (e.g. `128M`,
    /// `64M@128M`, `512M@0:2M`); repeat for several, in guest order.
    #[arg(long, value_parser = parse_region, requires = "memory_file")]
    region: Vec<FileRegion>,
    /// How the engine runs (protection, liveness, resume, scheduling).
    #[command(flatten)]
    engine: crate::receive::EngineOptions,
    /// The pre-shared key, shared with the destination (at least 16 bytes;
    /// trailing whitespace is ignored).
    #[arg(long)]
    key_file: PathBuf,
    /// Write the source's report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// After completion, send digests of every page so that the destination
    /// can check its memory (`receive` prints `verified: yes`); costs one
    /// more read of all the memory. The default for a synthetic VM; for a
    /// memory file it reads the whole file again.
    #[arg(long, conflicts_with = "no_verify")]
    verify: bool,
    /// Send no digests, even for a synthetic VM.
    #[arg(long)]
    no_verify: bool,
}

/// Reads a key file.
pub fn load_key(path: &std::path::Path) -> anyhow::Result<PresharedKey> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the key file {}", path.display()))?;
    PresharedKey::from_file_contents(&bytes)
        .with_context(|| format!("the key file {}", path.display()))
}

/// One region of a memory file: `SIZE[@OFFSET][:PAGE]`.
fn parse_region(s: &str) -> Result<FileRegion, String> {
    let (rest, page) = match s.split_once(':') {
        Some((r, p)) => (r, parse_size(p)?),
        None => (s, 4096),
    };
    let (size, offset) = match rest.split_once('@') {
        Some((z, o)) => (parse_size(z)?, parse_size(o)?),
        None => (parse_size(rest)?, 0),
    };
    let page_size = ringfault_engine::source::page_size_of(usize::try_from(page).unwrap_or(0))
        .map_err(|e| e.to_string())?;
    if size == 0 || size % page != 0 || offset % 4096 != 0 {
        return Err(format!(
            "region {s}: the size must be a non-zero multiple of the page size, the offset a multiple of 4 KiB"
        ));
    }
    Ok(FileRegion {
        id: 0,
        offset,
        size,
        page_size,
    })
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let key = load_key(&args.key_file)?;
    let mut cfg = args.engine.source_config(key)?;
    cfg.verify = !args.no_verify && (args.verify || args.synthetic.is_some());
    let addr = PeerAddr::parse(&args.listen).context("--listen")?;
    let (source, workload) = match (&args.memory_file, args.synthetic) {
        (Some(path), None) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("opening the memory file {}", path.display()))?;
            let len = file
                .metadata()
                .with_context(|| format!("reading the size of {}", path.display()))?
                .len();
            let mut regions = args.region.clone();
            if regions.is_empty() {
                if len == 0 || len % 4096 != 0 {
                    anyhow::bail!(
                        "the memory file {} is {len} bytes, not a non-zero multiple of 4 KiB (give --region to serve part of it)",
                        path.display()
                    );
                }
                regions.push(FileRegion {
                    id: 0,
                    offset: 0,
                    size: len,
                    page_size: ringfault_proto::PageSize::Size4K,
                });
            }
            for (i, r) in regions.iter_mut().enumerate() {
                r.id = u32::try_from(i)?;
            }
            let s = Source::from_file(&path.display().to_string(), file, regions, cfg)
                .context("serving the memory file")?;
            (s, None)
        }
        (None, Some(size)) => {
            let vm = VmSpec {
                size,
                populated: args.populated,
                seed: args.seed,
                page_size: 4096,
                thp: false,
            };
            vm.validate()?;
            let m = vm.build(2).context("building the synthetic VM")?;
            let s = Source::from_memory(m.clone(), cfg).context("serving the synthetic VM")?;
            let wl = if args.threads > 0 {
                Some(Workload::start(
                    Params {
                        vm,
                        pattern: args.pattern,
                        threads: args.threads,
                        log_writes: false,
                        salt: 1,
                    },
                    m,
                    None,
                )?)
            } else {
                None
            };
            (s, wl)
        }
        (None, None) => anyhow::bail!(
            "nothing to serve: give --synthetic SIZE (a synthetic VM) or --memory-file FILE (a memory snapshot)"
        ),
        (Some(_), Some(_)) => anyhow::bail!("give either --synthetic or --memory-file, not both"),
    };
    let listener = addr
        .listen()
        .with_context(|| format!("listening on {addr}"))?;
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    let report = source
        .serve_with(&listener, move || {
            if let Some(wl) = workload {
                let ops = wl.ops();
                let secs = wl.started().elapsed().as_secs_f64();
                let _ = wl.stop();
                println!(
                    "switch-over: an authenticated destination is ready; the workload stopped after {ops} operations in {secs:.1} s"
                );
            }
        })
        .context("serving the destination")?;
    let json = serde_json::to_string_pretty(&report)?;
    println!(
        "done: {} demand and {} bulk pages, {} zero, {} never populated, {} bytes sent in {:.2} s ({} resumes)",
        report.demand_pages,
        report.bulk_pages,
        report.zero_pages,
        report.unpopulated_pages,
        report.wire_bytes,
        report.elapsed_s,
        report.resumes
    );
    if let Some(p) = args.json {
        std::fs::write(&p, json).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
