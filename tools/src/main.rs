#![forbid(unsafe_code)]
//! The `ringfault` command: migrate by hand (`serve`, `receive`), benchmark
//! (`bench`), and act as a Firecracker page-fault handler (`uffd-handler`).

mod bench;
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the source: serve guest memory to one destination.
    Serve(serve::Args),
    /// Run the destination: fetch guest memory from a source, post-copy.
    Receive(receive::Args),
    /// Benchmark a migration of a synthetic VM between two processes.
    Bench(bench::Args),
    /// Serve a Firecracker VM's page faults, from a memory file or a remote source.
    UffdHandler(uffd_handler::Args),
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
