//! What both CRIU page sources share: the restore's connection (its
//! "restore finished" word gates the background transfer), the tasks and
//! where each region's pages are, faults outside the lazy ranges, and the
//! userfaultfd events CRIU enables (UNMAP, REMAP, FORK).
//!
//! # Mechanism
//! The restore's socket is watched by a multishot poll in the fault loop's
//! ring ([`TOKEN_RESTORE`]); its bytes are read without blocking. Until the
//! word [`RESTORE_FINISHED`] arrives only faults are served (the restorer
//! registers the lazy VMAs after the task's userfaultfd was handed over, so
//! an early background install could find nothing registered); the session
//! may end only after it. A close before it is the restore failing.
//!
//! Events, as `criu lazy-pages` handles them (criu/uffd.c):
//! - a fault outside every lazy range of its task is on memory that was
//!   never populated: a zero page;
//! - UNMAP: the range's lazy pages are dropped (marked present);
//! - REMOVE (applied by the fault loop): the same, and a later fault there
//!   gets a zero page;
//! - REMAP and FORK: see [`Session::uffd_event`].
//!
//! # Hazards
//! A REMAP moves pages that may still be missing to addresses the page
//! space does not know; serving them there would need the regions to move.
//! Rather than ever install a zero page where data belongs, the daemon
//! fails with a clear error ([`CriuError::Unsupported`]) and the restored
//! process keeps waiting on its fault.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use super::pace::Pace;
use super::socket::RESTORE_FINISHED;
use super::tasks::RegionSource;
use super::CriuError;
use crate::destination::pages::{Cx, TOKEN_SOURCE};
use crate::error::EngineError;
use crate::sys::ring::Event;
use crate::sys::uffd::{self, Event as UffdEvent};

/// Token of the poll on the restore's socket.
pub const TOKEN_RESTORE: u32 = TOKEN_SOURCE;

/// One restored task, as the session tracks it.
#[derive(Debug, Clone)]
pub struct TaskState {
    /// Its pid in the images (the page server's `dst_id`).
    pub pid: u32,
    /// Lazy pages it had.
    pub lazy_pages: u64,
    /// Faults outside its lazy ranges served with a zero page.
    pub zero_faults: u64,
}

/// What the session counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionStats {
    /// Faults outside every lazy range (zero pages).
    pub outside_faults: u64,
    /// UNMAP events.
    pub unmaps: u64,
    /// FORK events (the children were not served: see [`Session::uffd_event`]).
    pub forks: u64,
}

/// The restore's connection and the tasks.
#[derive(Debug)]
pub struct Session {
    stream: UnixStream,
    word: [u8; 4],
    have: usize,
    finished: bool,
    closed: bool,
    /// By owner (the task's index).
    pub tasks: Vec<TaskState>,
    /// By region index.
    pub regions: Vec<RegionSource>,
    /// Counts.
    pub stats: SessionStats,
    /// The background transfer's rate cap (none by default).
    pub pace: Pace,
}

impl Session {
    /// A session over the restore's connection (non-blocking).
    pub fn new(stream: UnixStream, tasks: Vec<TaskState>, regions: Vec<RegionSource>) -> Session {
        Session {
            stream,
            word: [0; 4],
            have: 0,
            finished: false,
            closed: false,
            tasks,
            regions,
            stats: SessionStats::default(),
            pace: Pace::new(0),
        }
    }

    /// Caps the background transfer at `rate` bytes per second (0: no cap).
    pub fn with_background_rate(mut self, rate: u64) -> Session {
        self.pace = Pace::new(rate);
        self
    }

    /// Whether the background may run now: the restore finished and the
    /// rate cap allows it.
    pub fn background_ready(&self, now: std::time::Instant) -> bool {
        self.finished && self.pace.ready(now)
    }

    /// Whether the restore said it finished (background transfers may run).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// How long the fault loop may sleep, at most `limit`: a paced
    /// background wakes itself when it may go on (after at least 1 ms).
    pub fn sleep_limit(&self, limit: std::time::Duration) -> std::time::Duration {
        if self.pace.limited() && self.finished {
            let wait = self.pace.wait(std::time::Instant::now());
            limit.min(wait.max(std::time::Duration::from_millis(1)))
        } else {
            limit
        }
    }

    /// The pid of the task that owns userfaultfd `owner`.
    pub fn pid(&self, owner: u32) -> u32 {
        self.tasks
            .get(usize::try_from(owner).unwrap_or(usize::MAX))
            .map_or(0, |t| t.pid)
    }

    /// Arms the watch on the restore's socket.
    pub fn start(&mut self, cx: &mut Cx<'_>) -> Result<(), EngineError> {
        cx.ring.poll_multishot(self.stream.as_fd(), TOKEN_RESTORE)?;
        // Whatever came before the loop started.
        self.read_restore()?;
        Ok(())
    }

    /// Handles `ev` if it is the session's; returns whether it was.
    pub fn event(&mut self, cx: &mut Cx<'_>, ev: &Event) -> Result<bool, EngineError> {
        let Event::Polled {
            token: TOKEN_RESTORE,
            result,
        } = ev
        else {
            return Ok(false);
        };
        match result {
            Ok(true) => self.read_restore()?,
            Ok(false) => {
                self.read_restore()?;
                if !self.closed {
                    cx.ring.poll_multishot(self.stream.as_fd(), TOKEN_RESTORE)?;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                cx.ring.poll_multishot(self.stream.as_fd(), TOKEN_RESTORE)?;
            }
            Err(e) => {
                return Err(EngineError::io(
                    "polling lazy-pages.socket",
                    std::io::Error::from(e.kind()),
                ))
            }
        }
        Ok(true)
    }

    /// Reads what the restore sent: the finished word, then its close.
    fn read_restore(&mut self) -> Result<(), EngineError> {
        if self.closed {
            return Ok(());
        }
        let mut buf = [0u8; 64];
        loop {
            match rustix::net::recv(&self.stream, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((0, _)) => {
                    self.closed = true;
                    if !self.finished {
                        return Err(CriuError::RestoreHungUp.into());
                    }
                    return Ok(());
                }
                Ok((n, _)) => {
                    for &b in &buf[..n] {
                        if self.finished {
                            tracing::warn!(
                                "criu restore sent bytes after \"restore finished\"; ignored"
                            );
                            break;
                        }
                        self.word[self.have] = b;
                        self.have += 1;
                        if self.have == 4 {
                            let w = u32::from_ne_bytes(self.word);
                            if w != RESTORE_FINISHED {
                                return Err(CriuError::BadFinish { word: w }.into());
                            }
                            self.finished = true;
                            tracing::info!("criu restore finished; background transfer starts");
                        }
                    }
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(EngineError::io(
                        "reading lazy-pages.socket",
                        std::io::Error::from(e),
                    ))
                }
            }
        }
    }

    /// A fault outside every lazy range of task `owner`: the page was never
    /// populated (or was dropped): a zero page, as CRIU maps.
    pub fn fault_outside(
        &mut self,
        cx: &mut Cx<'_>,
        owner: u32,
        addr: u64,
    ) -> Result<(), EngineError> {
        let page = usize::try_from(addr & !0xfff).unwrap_or(usize::MAX);
        self.stats.outside_faults += 1;
        if let Some(t) = self
            .tasks
            .get_mut(usize::try_from(owner).unwrap_or(usize::MAX))
        {
            t.zero_faults += 1;
        }
        cx.inst.zero_fill(owner, page, 4096)
    }

    /// UNMAP drops the range's lazy pages. FORK: the child shares the pages
    /// its parent had and lacks those its parent lacked; this daemon does not
    /// serve a forked child (its descriptor is closed, and its missing pages
    /// then read as zeros), so a fork while pages are missing is refused.
    /// REMAP of a range with missing pages is refused the same way (module
    /// docs).
    pub fn uffd_event(
        &mut self,
        cx: &mut Cx<'_>,
        owner: u32,
        ev: UffdEvent,
    ) -> Result<bool, EngineError> {
        let pid = self.pid(owner);
        match ev {
            UffdEvent::Unmap { start, end } => {
                self.stats.unmaps += 1;
                cx.inst.mark_removed_in(owner, start, end);
                Ok(true)
            }
            UffdEvent::Remap { from, to, len } => {
                if self.missing_in(cx, owner, from, from.saturating_add(len)) == 0 {
                    // Nothing missing moved: the kernel serves the new range.
                    cx.inst
                        .mark_removed_in(owner, from, from.saturating_add(len));
                    return Ok(true);
                }
                Err(CriuError::Unsupported {
                    pid,
                    what: format!(
                        "mremap() of {from:#x}+{len:#x} to {to:#x} while lazy pages there were missing"
                    ),
                }
                .into())
            }
            UffdEvent::Fork { ufd } => {
                self.stats.forks += 1;
                let missing = self.missing_of(cx, owner);
                uffd::close_forked(ufd);
                if missing == 0 {
                    return Ok(true);
                }
                Err(CriuError::Unsupported {
                    pid,
                    what: format!("fork() while {missing} of its lazy pages were missing"),
                }
                .into())
            }
            _ => Ok(false),
        }
    }

    fn missing_of(&self, cx: &Cx<'_>, owner: u32) -> u64 {
        cx.inst
            .space
            .spans()
            .iter()
            .filter(|s| s.owner == owner)
            .map(|s| s.pages - cx.inst.present.count_range(s.first, s.pages))
            .sum()
    }

    fn missing_in(&self, cx: &Cx<'_>, owner: u32, start: u64, end: u64) -> u64 {
        let mut n = 0;
        for s in cx.inst.space.spans().iter().filter(|s| s.owner == owner) {
            let (b, e) = (s.base as u64, s.base as u64 + s.len() as u64);
            let lo = b.max(start);
            let hi = e.min(end);
            if lo < hi {
                let first = (lo - b) / 4096;
                let last = (hi - b).div_ceil(4096);
                n += (last - first) - cx.inst.present.count_range(s.first + first, last - first);
            }
        }
        n
    }
}
