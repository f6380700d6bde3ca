//! Remote mode: post-copy restore for Firecracker. The engine's destination is
//! attached to Firecracker's userfaultfd and regions ([`Destination::attach`]), and
//! fetches pages from a source on another host: demand lane, bulk lanes, prefetch
//! and completion exactly as for any VMM.
//!
//! The source's layout must match Firecracker's regions one to one, in order
//! (region sizes and page sizes); the engine refuses a mismatch before it
//! installs anything. The file offsets are the source's business.
//!
//! The engine runs on its own threads; this thread watches Firecracker's socket.
//! When Firecracker goes away the handler returns [`Ended::PeerGone`] at once,
//! whether or not the migration finished (the caller exits; the source keeps its
//! memory, since it was never released). Once every page is present the engine
//! releases the source and unregisters the regions, after which the kernel serves
//! a balloon's re-faults with zero pages itself.
//!
//! Balloon REMOVE events during the migration are handled by the engine: the range
//! is marked present so that no lane installs the source's stale bytes there, and a
//! later fault gets a zero page.

use std::sync::mpsc;
use std::sync::Arc;

use ringfault_proto::{Layout, RegionDesc};

use super::handshake::{peer_gone, wait_peer_gone, wait_readable, Handshake};
use super::local::EXIT_PATIENCE;
use super::stats::HandlerStats;
use super::{Ended, FirecrackerError, GuestRegionMapping};
use crate::addr::PeerAddr;
use crate::destination::AttachedRegion;
use crate::error::EngineError;
use crate::stats::DestinationReport;
use crate::{Destination, DestinationConfig};

/// How often the watching thread looks at the engine's result.
const WATCH_MS: i32 = 100;

/// Firecracker's regions as a layout: region ids are their indices.
pub fn layout_of(mappings: &[GuestRegionMapping]) -> Result<Layout, FirecrackerError> {
    let regions = mappings
        .iter()
        .enumerate()
        .map(|(i, m)| {
            Ok(RegionDesc {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                page_size: crate::source::page_size_of(usize::try_from(m.page_size).unwrap_or(0))?,
                size: m.size,
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    Ok(Layout { regions })
}

/// Firecracker's regions as the engine's attached regions, in order.
pub fn attached_regions(
    mappings: &[GuestRegionMapping],
) -> Result<Vec<AttachedRegion>, FirecrackerError> {
    mappings
        .iter()
        .enumerate()
        .map(|(index, m)| {
            let conv = |v: u64| {
                usize::try_from(v).map_err(|_| super::MappingsError::Overflow {
                    index,
                    what: "a region that does not fit this address space",
                })
            };
            Ok(AttachedRegion {
                base: conv(m.base_host_virt_addr)?,
                len: conv(m.size)?,
                page_size: conv(m.page_size)?,
            })
        })
        .collect()
}

/// Connects to the source at `addr`, attaches to Firecracker's userfaultfd, and
/// runs the migration until Firecracker goes away.
pub fn serve_remote(
    hs: Handshake,
    addr: &PeerAddr,
    cfg: DestinationConfig,
    stats: Arc<HandlerStats>,
) -> Result<Ended, FirecrackerError> {
    stats.begin();
    let regions = attached_regions(&hs.mappings)?;
    let stream = hs.stream;
    let dest = Destination::attach(addr, cfg, hs.uffd, regions)?;
    stats.set_progress(dest.progress());
    tracing::info!(
        "attached to the source at {addr}: {} regions, {} pages",
        dest.layout().regions.len(),
        dest.layout().total_pages()
    );
    let (tx, rx) = mpsc::channel::<Result<DestinationReport, EngineError>>();
    std::thread::Builder::new()
        .name("rf-destination".into())
        .spawn(move || {
            let _ = tx.send(dest.run());
        })
        .map_err(|e| FirecrackerError::io("starting the destination", e))?;
    let mut running = true;
    loop {
        let ready = wait_readable(&stream, WATCH_MS)
            .map_err(|e| FirecrackerError::io("watching Firecracker's socket", e))?;
        if ready && peer_gone(&stream) {
            // A migration that just completed may not have reported yet: give it a
            // moment, so that the statistics say so (well inside the 1 s exit budget).
            if running {
                if let Ok(Ok(report)) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
                    stats.set_engine_report(report);
                }
            }
            return Ok(Ended::PeerGone);
        }
        if !running {
            continue;
        }
        match rx.try_recv() {
            Err(mpsc::TryRecvError::Empty) => {}
            Ok(Ok(report)) => {
                tracing::info!(
                    "every page is present after {:.3} s; the source is released",
                    report.elapsed_s
                );
                stats.set_engine_report(report);
                running = false;
            }
            Ok(Err(e)) => {
                if wait_peer_gone(&stream, EXIT_PATIENCE) {
                    tracing::info!("Firecracker went away ({e})");
                    return Ok(Ended::PeerGone);
                }
                return Err(e.into());
            }
            Err(mpsc::TryRecvError::Disconnected) => {
                return Err(EngineError::WorkerPanicked {
                    worker: "destination".into(),
                }
                .into())
            }
        }
    }
}
