//! Local mode: serve Firecracker's page faults from a snapshot memory file.
//!
//! # Mechanism
//! The engine's one fault loop (`destination::faultloop`) with the file page
//! source (`destination::file`): a faulting page is installed with one
//! `UFFDIO_COPY` straight from the file (never read in user space, so a file
//! that shrinks gives an error naming it, not `SIGBUS`), holes with zero
//! pages; after the first fault the loop fills every other page in runs of
//! at most [`LocalOptions::background_run_bytes`], so a fault waits behind one
//! run at most. Once every page is present the regions are unregistered:
//! from then on the kernel itself serves a balloon's re-faults with zero
//! pages, and the handler only waits for Firecracker to go away.
//!
//! Firecracker's userfaultfd delivers REMOVE events (balloon): the loop reads
//! events under the exclusive remove gate, so that no install lands in a
//! removed range (see `destination::install::RemoveGate`).
//!
//! # Hazards
//! When Firecracker dies, its memory goes first (`ESRCH` from every ioctl)
//! and its socket closes a moment later: an ioctl error is taken as
//! Firecracker's exit if the socket closes within [`EXIT_PATIENCE`].

use std::fs::File;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::handshake::{peer_gone, wait_peer_gone, wait_readable, Handshake};
use super::mappings::{check_against_file, GuestRegionMapping};
use super::remote::layout_of;
use super::stats::HandlerStats;
use super::{Ended, FirecrackerError};
use crate::destination::faultloop::{self, LoopConfig};
use crate::destination::file::{Extent, FilePages};
use crate::destination::install::Installer;
use crate::destination::Progress;
use crate::error::EngineError;
use crate::space::PageSpace;
use crate::stats::{hex, DestinationReport};
use crate::sys::uffd::Uffd;

/// Default of [`LocalOptions::background_run_bytes`].
pub const BACKGROUND_RUN_BYTES: usize = 256 << 10;

/// How long an ioctl failure waits for Firecracker's socket to close.
pub const EXIT_PATIENCE: Duration = Duration::from_millis(500);

/// Local-mode settings.
#[derive(Debug, Clone, Copy)]
pub struct LocalOptions {
    /// Fill every page in the background after the first fault.
    pub background: bool,
    /// Unregister the regions once every page is present.
    pub unregister_when_complete: bool,
    /// Most bytes the background fill installs per loop turn (at least one
    /// page): a fault waits behind one such run at most.
    pub background_run_bytes: usize,
}

impl Default for LocalOptions {
    fn default() -> LocalOptions {
        LocalOptions {
            background: true,
            unregister_when_complete: true,
            background_run_bytes: BACKGROUND_RUN_BYTES,
        }
    }
}

/// Serves Firecracker's faults from the file at `path` until Firecracker goes
/// away.
///
/// Fails at once, before any fault is served, if a region does not fit in the
/// file.
pub fn serve_local(
    hs: Handshake,
    path: &str,
    file: File,
    opts: LocalOptions,
    stats: Arc<HandlerStats>,
) -> Result<Ended, FirecrackerError> {
    let file_len = file
        .metadata()
        .map_err(|e| FirecrackerError::MemoryFile {
            what: format!("{path}: reading its size"),
            source: e,
        })?
        .len();
    check_against_file(&hs.mappings, file_len)?;
    stats.begin();
    let layout = layout_of(&hs.mappings)?;
    let bases: Vec<usize> = hs
        .mappings
        .iter()
        .map(|m| usize::try_from(m.base_host_virt_addr).unwrap_or(0))
        .collect();
    let space = PageSpace::new(&layout, &bases);
    let inst = Arc::new(Installer::new(Uffd::from_fd(hs.uffd), space, true)?);
    let extents = extents_of(&hs.mappings);
    let source = FilePages::new(
        path,
        file,
        extents,
        &inst,
        opts.background,
        opts.background_run_bytes,
    )?
    .keep_serving(!opts.unregister_when_complete);
    stats.set_progress(Progress::of(inst.clone()));
    let stream = hs.stream;
    let (tx, rx) = mpsc::channel::<Result<DestinationReport, EngineError>>();
    let loop_inst = inst.clone();
    let unregister = opts.unregister_when_complete;
    let started = Instant::now();
    let loop_stats = stats.clone();
    std::thread::Builder::new()
        .name("rf-fault-loop".into())
        .spawn(move || {
            let mut source = source;
            let cfg = LoopConfig {
                name: "fault loop",
                core: None,
                class: None,
                unregister,
            };
            let r = faultloop::run(&loop_inst, &mut source, &cfg).map(|rep| {
                let mut r = DestinationReport::build(
                    hex(&[]),
                    started.elapsed(),
                    loop_inst.present.len(),
                    loop_inst.space.spans().iter().map(|s| s.len() as u64).sum(),
                    &loop_inst.counters,
                    &rep.hist,
                    Vec::new(),
                );
                r.wire_bytes = source.bytes_copied;
                r.protection = "none".into();
                r
            });
            if let Ok(rep) = &r {
                // At once, not when the watcher next looks.
                loop_stats.set_engine_report(rep.clone());
            }
            let _ = tx.send(r);
        })
        .map_err(|e| FirecrackerError::io("starting the fault loop", e))?;
    let mut running = true;
    loop {
        let ready = wait_readable(&stream, 100)
            .map_err(|e| FirecrackerError::io("watching Firecracker's socket", e))?;
        if ready && peer_gone(&stream) {
            return Ok(Ended::PeerGone);
        }
        if !running {
            continue;
        }
        if !unregister && inst.present.all_set() {
            // The loop keeps serving (a balloon's re-faults); the fill is done.
            stats.mark_all_present();
        }
        match rx.try_recv() {
            Err(mpsc::TryRecvError::Empty) => {}
            Ok(Ok(report)) => {
                stats.mark_all_present();
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
                    worker: "fault loop".into(),
                }
                .into())
            }
        }
    }
}

fn extents_of(mappings: &[GuestRegionMapping]) -> Vec<Extent> {
    mappings
        .iter()
        .enumerate()
        .map(|(i, m)| Extent {
            region: i,
            first_page: 0,
            pages: m.size / m.page_size.max(1),
            file_offset: m.offset,
        })
        .collect()
}
