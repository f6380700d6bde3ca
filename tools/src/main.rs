#![forbid(unsafe_code)]
//! The `ringfault` command: migrate by hand (`serve`, `receive`), benchmark
//! (`bench`), act as a Firecracker page-fault handler (`uffd-handler`), and
//! as CRIU's lazy-pages daemon (`criu-lazy-pages`).

mod bench;
mod criu_lazy_pages;
mod receive;
mod serve;
mod uffd_handler;

use clap::{Parser, Subcommand};

/// Post-copy live migration of VM memory over userfaultfd and io_uring.
#[derive(Debug, Parser)]
#[command(name = "ringfault", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Every command takes negative numbers as values (`--populated -0.5`), so
/// that they are refused by the option's own check, which names the range,
/// rather than read as an unknown flag.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the source: serve guest memory to one destination.
    #[command(allow_negative_numbers = true)]
    Serve(serve::Args),
    /// Run the destination: fetch guest memory from a source, post-copy.
    #[command(allow_negative_numbers = true)]
    Receive(receive::Args),
    /// Benchmark a migration of a synthetic VM between two processes.
    #[command(allow_negative_numbers = true)]
    Bench(bench::Args),
    /// Serve a Firecracker VM's page faults, from a memory file or a remote source.
    #[command(allow_negative_numbers = true)]
    UffdHandler(uffd_handler::Args),
    /// Serve a CRIU lazy restore's page faults: a drop-in for `criu lazy-pages`.
    CriuLazyPages(criu_lazy_pages::Args),
    /// One process of a benchmark run (started by `bench`).
    #[command(hide = true)]
    BenchChild(bench::ChildArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGFAULT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Receive(a) => receive::run(a),
        Command::Bench(a) => bench::run(a),
        Command::UffdHandler(a) => uffd_handler::run(a),
        Command::CriuLazyPages(a) => criu_lazy_pages::run(a),
        Command::BenchChild(a) => bench::child::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfault: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
