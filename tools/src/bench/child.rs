//! The two processes of a benchmark run: `ringfault bench-child SPEC` is the same
//! binary re-executed (inside a network namespace with `--netns`) as the source or
//! the destination of one design (ringfault, classic) or of the raw TCP probe.
//!
//! The parent speaks to a child through its standard input (one command a line:
//! `go`, `switch ADDR`) and hears from it on its standard output, one JSON
//! `Event` a line. Anything else a child prints goes to standard error.
//!
//! The protocol between parent and child is in `events`; the workload phases
//! both designs share are in `phases`.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ringfault_engine::stats::{cdf_points, histogram_points, LatencySummary};
use ringfault_engine::sys::mapping::AlignedBuf;
use ringfault_engine::{Destination, PeerAddr, Source};

use super::cpu;
use super::events::{
    await_switch, await_verify, emit, key, Counts, Design, DestDone, Event, Lat, Role, Spec,
};
use super::phases::{params, progress_printer, switch_over, warm_up, Finish};
use super::vm::digests_parallel;
use super::workload::{Presence, Workload};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec, JSON.
    spec: String,
}

/// Runs a child; never returns an error to `main` (it reports it as an event).
pub fn run(args: Args) -> anyhow::Result<()> {
    // If the parent dies, so do we (no orphan holding a namespace or memory).
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let result = serde_json::from_str::<Spec>(&args.spec)
        .context("bad child spec")
        .and_then(|spec| match (spec.design, spec.role) {
            (Design::Ringfault, Role::Source) => ringfault_source(&spec),
            (Design::Ringfault, Role::Destination) => ringfault_destination(&spec),
            (Design::Classic, Role::Source) => super::classic::source(&spec),
            (Design::Classic, Role::Destination) => super::classic::destination(&spec),
            (Design::Probe, Role::Source) => probe_send(&spec),
            (Design::Probe, Role::Destination) => probe_receive(&spec),
        });
    if let Err(e) = result {
        emit(&Event::Error {
            message: format!("{e:#}"),
        });
        // Threads may be blocked on pages that will never arrive: leave now.
        std::process::exit(1);
    }
    std::process::exit(0);
}

fn ringfault_source(spec: &Spec) -> anyhow::Result<()> {
    let m = spec.vm.build(2).context("building the source's memory")?;
    let source = Source::from_memory(m.clone(), spec.engine.source_config(key(spec)?)?)?;
    let addr = PeerAddr::parse(&spec.listen)?;
    let listener = addr
        .listen()
        .with_context(|| format!("listening on {addr}"))?;
    emit(&Event::Ready {
        addr: Some(listener.local_addr()?.to_string()),
    });
    let wl = warm_up(spec, m.clone())?;
    let mut cpu0 = 0u64;
    let report = source
        .serve_with(&listener, || {
            switch_over(spec, wl);
            cpu0 = cpu::process_ns();
        })
        .context("serving")?;
    let cpu_ns = cpu::process_ns() - cpu0;
    await_verify()?;
    let t = Instant::now();
    let r = &m.regions()[0];
    let scan_ms = ringfault_engine::sys::pagemap::Scanner::new()
        .and_then(|mut sc| {
            sc.scan(
                r.addr(),
                r.addr() + r.len(),
                ringfault_engine::sys::pagemap::Query::Populated,
            )
        })
        .ok()
        .map(|_| t.elapsed().as_secs_f64() * 1e3);
    let digests = digests_parallel(&*m, spec.vm.pages(), &|_, _| {});
    emit(&Event::SourceDone {
        counts: Counts {
            faults: report.demand_requests,
            demand_pages: report.demand_pages,
            bulk_pages: report.bulk_pages,
            zero_pages: report.zero_pages,
            unpopulated_pages: report.unpopulated_pages,
            duplicate_pages: 0,
            huge_moves: 0,
            landed_moves: 0,
            wire_bytes: report.wire_bytes,
        },
        cpu_ns,
        digests,
        scan_ms,
        stages: serde_json::to_value(&report.stages).ok(),
        anon_huge_bytes: super::procfs::anon_huge_bytes(m.regions()[0].addr()),
        precopy: report
            .precopy
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok()),
    });
    Ok(())
}

fn ringfault_destination(spec: &Spec) -> anyhow::Result<()> {
    super::workload::prepare(&params(spec, true));
    emit(&Event::Ready { addr: None });
    let addr = await_switch()?;
    let t_switch_rx_ns = cpu::wall_ns();
    let cpu0 = cpu::process_ns();
    let mut cfg = spec.engine.config(key(spec)?)?;
    cfg.thp = spec.vm.thp;
    let dest = Destination::connect(&addr, cfg)
        .with_context(|| format!("connecting to the source at {addr}"))?;
    let t_connected_ns = cpu::wall_ns();
    let mem = dest
        .memory()
        .ok_or_else(|| anyhow::anyhow!("the destination holds no memory"))?;
    let progress = dest.progress();
    let p = progress.clone();
    let presence: Presence = Arc::new(move |page| p.is_present(page));
    let workload = Workload::start(params(spec, true), mem.clone(), Some(presence))?;
    let t_resume_ns = cpu::wall_ns();
    emit(&Event::Resumed { t_ns: t_resume_ns });
    let done = Arc::new(AtomicBool::new(false));
    let p = progress.clone();
    let printer = progress_printer(done.clone(), move || (p.present(), p.total()));
    let report = dest.run().context("post-copy migration")?;
    let fin = Finish { workload, cpu0 };
    let (t_all, cpu_ns, w, digests, anon_huge_bytes) = fin.complete(spec, &*mem);
    done.store(true, Ordering::Relaxed);
    if let Some(h) = printer {
        let _ = h.join();
    }
    let mut bytes_steps: Vec<u64> = Vec::new();
    for c in &report.channels {
        if bytes_steps.len() < c.bytes_per_step.len() {
            bytes_steps.resize(c.bytes_per_step.len(), 0);
        }
        for (i, b) in c.bytes_per_step.iter().enumerate() {
            bytes_steps[i] += b;
        }
    }
    let fault = LatencySummary::of(&w.fault_hist);
    emit(&Event::DestDone(Box::new(DestDone {
        t_switch_rx_ns,
        t_resume_ns,
        t_all_present_ns: t_all,
        transfer_s: report.elapsed_s,
        counts: Counts {
            faults: report.faults,
            demand_pages: report.demand_pages,
            bulk_pages: report.bulk_pages,
            zero_pages: report.zero_pages,
            unpopulated_pages: report.unpopulated_pages,
            duplicate_pages: report.duplicate_pages,
            huge_moves: report.huge_moves,
            landed_moves: report.landed_moves,
            wire_bytes: report.wire_bytes,
        },
        service: Some(Lat::from(&report.fault_service)),
        service_cdf: report.fault_service_cdf.clone(),
        service_hist: report.fault_service_histogram.clone(),
        fault: Lat::from(&fault),
        fast_touches: w.fast_touches,
        t_connected_ns,
        fault_cdf: cdf_points(&w.fault_hist),
        fault_hist: histogram_points(&w.fault_hist),
        ops_steps: w.ops_steps,
        bytes_steps,
        channel_bytes: report.channels.iter().map(|c| c.bytes).collect(),
        cpu_ns,
        digests,
        stages: serde_json::to_value(&report.stages).ok(),
        recv_in_flight_min: report
            .channels
            .iter()
            .filter(|c| c.lane == "bulk")
            .map(|c| c.recv_in_flight_min)
            .min(),
        protection: report.protection.clone(),
        cipher: report.cipher.clone(),
        metadata_bytes: report.metadata_bytes,
        anon_huge_bytes,
    })));
    drop(mem);
    Ok(())
}

/// The probe's sender: streams `probe_bytes` in 2 MiB writes from a pre-touched
/// buffer.
fn probe_send(spec: &Spec) -> anyhow::Result<()> {
    let addr = PeerAddr::parse(&spec.listen)?;
    let listener = addr
        .listen()
        .with_context(|| format!("listening on {addr}"))?;
    let buf = AlignedBuf::new(2 << 20)?;
    emit(&Event::Ready {
        addr: Some(listener.local_addr()?.to_string()),
    });
    let mut s = listener.accept().context("accepting the probe")?;
    let cpu0 = cpu::process_ns();
    let mut left = spec.probe_bytes;
    while left > 0 {
        let n = usize::try_from(left.min(2 << 20))?;
        s.write_all(&buf.as_slice()[..n]).context("probe send")?;
        left -= u64::try_from(n)?;
    }
    s.shutdown();
    emit(&Event::ProbeSent {
        cpu_ns: cpu::process_ns() - cpu0,
    });
    Ok(())
}

/// The probe's receiver: reads in 2 MiB reads until the end of the stream.
fn probe_receive(_spec: &Spec) -> anyhow::Result<()> {
    emit(&Event::Ready { addr: None });
    let addr = await_switch()?;
    let mut buf = AlignedBuf::new(2 << 20)?;
    let t0 = Instant::now();
    let cpu0 = cpu::process_ns();
    let mut s = addr.connect(Duration::from_secs(10))?;
    let mut bytes = 0u64;
    loop {
        let n = s.read(buf.as_mut_slice()).context("probe receive")?;
        if n == 0 {
            break;
        }
        bytes += u64::try_from(n)?;
    }
    emit(&Event::ProbeDone {
        bytes,
        secs: t0.elapsed().as_secs_f64(),
        cpu_ns: cpu::process_ns() - cpu0,
    });
    Ok(())
}
