//! Where missing pages come from: the [`PageSource`] trait, which the one
//! fault loop (`destination::faultloop`) drives, whatever serves the pages.
//!
//! Implementations:
//! - `destination::remote::RemotePages`: a source host, over the demand lane
//!   (and the bulk lanes it hosts in the loop's ring, if any);
//! - `destination::file::FilePages`: a local memory file (Firecracker's local
//!   mode, CRIU's page images), read with `pread`, never through a mapping;
//! - CRIU's lazy pages: `criu::local::ImagePages` (page images) and
//!   `criu::server::ServerPages` (CRIU's page server).
//!
//! The loop owns the ring and the userfaultfd events; a page source owns the
//! ring operations it submits (their tokens are at or above
//! [`TOKEN_SOURCE`]) and installs pages through the shared
//! [`Installer`](super::install::Installer).

use std::time::{Duration, Instant};

use crate::destination::install::Installer;
use crate::error::EngineError;
use crate::sys::ring::{Event, Ring};
use crate::sys::uffd::Event as UffdEvent;

/// Tokens below this belong to the fault loop itself, and so do those from
/// [`TOKEN_POLL_BASE`](super::faultloop::TOKEN_POLL_BASE) up.
pub const TOKEN_SOURCE: u32 = 100;

/// What a page source sees of the loop.
#[derive(Debug)]
pub struct Cx<'a> {
    /// The loop's ring: submit here, events come back through
    /// [`PageSource::event`].
    pub ring: &'a mut Ring,
    /// Installs pages and records them present.
    pub inst: &'a Installer,
    /// The time of this loop turn.
    pub now: Instant,
}

/// Whether a page source has more work right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Call again before sleeping.
    Busy,
    /// Nothing until the next event.
    Idle,
}

/// How far the end of the session got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Waiting for the peer.
    Pending,
    /// The peer will send nothing more: the loop may unregister guest memory,
    /// then call `finish` again.
    Unregister,
    /// Done: the loop may exit.
    Done,
}

/// Where missing pages come from.
pub trait PageSource {
    /// Arms the source's ring operations before the loop runs.
    fn start(&mut self, cx: &mut Cx<'_>) -> Result<(), EngineError>;

    /// Fetches pages (global numbers) that faulted and are missing; each page
    /// is passed once until it becomes present or [`PageSource::refetch`].
    fn fetch(&mut self, cx: &mut Cx<'_>, pages: &[u64]) -> Result<(), EngineError>;

    /// An event whose token the source submitted.
    fn event(&mut self, cx: &mut Cx<'_>, ev: Event) -> Result<(), EngineError>;

    /// Work that needs no new event (parse and install received frames,
    /// background fill, sends).
    fn work(&mut self, cx: &mut Cx<'_>) -> Result<Work, EngineError>;

    /// Every page is present: drives the end of the session.
    fn finish(&mut self, cx: &mut Cx<'_>) -> Result<Finish, EngineError>;

    /// Pages the loop still waits for, to fetch again (after a reconnect).
    fn refetch(&mut self) -> bool {
        false
    }

    /// Longest the loop may sleep before calling [`PageSource::work`] again
    /// (liveness checks, heartbeats).
    fn sleep_limit(&self) -> Duration {
        Duration::from_millis(500)
    }

    /// The loop ends (done or failed): stop helpers, close connections.
    fn stop(&mut self, failed: Option<&EngineError>);

    /// A fault at `addr` on userfaultfd `owner` (0 unless the installer
    /// serves several) outside every region. By default the faulting thread
    /// stays blocked and an error is logged: nothing is known about the page.
    fn fault_outside(&mut self, cx: &mut Cx<'_>, owner: u32, addr: u64) -> Result<(), EngineError> {
        let _ = cx;
        tracing::error!(
            "fault at {addr:#x} (userfaultfd {owner}) outside guest memory; the faulting thread stays blocked"
        );
        Ok(())
    }

    /// A non-cooperative event of userfaultfd `owner` that the loop does not
    /// apply itself (UNMAP, REMAP, FORK, unknown). Returns whether the source
    /// handled it; for FORK, handling means taking ownership of the new
    /// descriptor. Unhandled events are logged, and a FORK's descriptor is
    /// closed. REMOVE is applied by the loop and not passed here.
    fn uffd_event(
        &mut self,
        cx: &mut Cx<'_>,
        owner: u32,
        ev: UffdEvent,
    ) -> Result<bool, EngineError> {
        let _ = (cx, owner, ev);
        Ok(false)
    }
}
