//! One migration session on the source: what its threads share, and its state
//! machine.
//!
//! ```text
//!  Waiting --first authenticated demand lane: switch-over, freeze--> Open
//!  Waiting --the same, with pre-copy: rounds while the VM runs--> PreCopy
//!  PreCopy --switch-over, discard list sent (see `precopy`)--> Open
//!  Open --Complete (pages_present == total): pushers stop, CompleteAck--> Completing
//!  Completing --Release--> Released (memory may be freed)
//!  Open|Completing --link lost--> Broken --resume (same session id), present
//!                                          bitmap applied, Resumed--> Open
//!  Broken --no resume within the resume timeout--> failed
//!  Release in Open, Complete in Completing, anything after Released: refused
//! ```
//!
//! Every lane thread belongs to an *epoch*: a resume starts a new one, and
//! threads of an older epoch stop.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use ringfault_proto::{Layout, SessionId};

use super::{Backing, SourceConfig};
use crate::schedule::PushPlan;
use crate::space::PageSpace;

/// Stops the VM, once (the caller's switch-over).
pub type SwitchOver<'f> = Mutex<Option<Box<dyn FnOnce() + Send + 'f>>>;

/// Runs the switch-over if it has not run yet.
pub fn switch_over(s: &SwitchOver<'_>) {
    if let Some(f) = s.lock().ok().and_then(|mut g| g.take()) {
        f();
    }
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No destination yet.
    Waiting,
    /// Pre-copy rounds: the VM runs, pages flow, written ones go again.
    PreCopy,
    /// Pages flow.
    Open,
    /// The destination has every page; we acknowledged.
    Completing,
    /// The destination released us.
    Released,
    /// A lane broke; waiting for a resume.
    Broken,
}

/// Counters of the source; `Relaxed` throughout (statistics, read after join).
#[derive(Debug, Default)]
pub struct SourceCounters {
    /// Demand requests served (frames).
    pub demand_requests: AtomicU64,
    /// Pages asked for in them.
    pub demand_entries: AtomicU64,
    /// Data pages sent on the demand lane.
    pub demand_pages: AtomicU64,
    /// Data pages sent on bulk lanes.
    pub bulk_pages: AtomicU64,
    /// Pages sent as zero.
    pub zero_pages: AtomicU64,
    /// Never-populated pages sent as ranges.
    pub unpopulated_pages: AtomicU64,
    /// Bytes written to all sockets.
    pub wire_bytes: AtomicU64,
    /// Bytes received from the destination.
    pub rx_bytes: AtomicU64,
    /// Resumes.
    pub resumes: AtomicU64,
    /// Nanoseconds spent classifying pages (scan and zero checks).
    pub scan_ns: AtomicU64,
    /// Thread CPU ns claiming pages.
    pub stage_claim_ns: AtomicU64,
    /// Thread CPU ns classifying pages and building frames (tags included).
    pub stage_classify_ns: AtomicU64,
    /// Thread CPU ns computing tags.
    pub stage_seal_ns: AtomicU64,
    /// Thread CPU ns in the kernel's send.
    pub stage_send_ns: AtomicU64,
    /// Thread CPU ns of the demand lane.
    pub demand_cpu_ns: AtomicU64,
}

impl SourceCounters {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        // Relaxed: statistics only.
        c.fetch_add(n, Ordering::Relaxed);
    }
    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        // Relaxed: read after the workers joined.
        c.load(Ordering::Relaxed)
    }
}

/// State the session's threads share.
#[derive(Debug)]
pub struct Session<'a> {
    /// What is served.
    pub backing: &'a Backing,
    /// The layout announced.
    pub layout: &'a Layout,
    /// Settings.
    pub cfg: &'a SourceConfig,
    /// The page numbering (with addresses when memory-backed).
    pub space: PageSpace,
    /// What goes next on the bulk lanes.
    pub plan: PushPlan,
    /// Statistics.
    pub counters: SourceCounters,
    /// The session id, once a destination authenticated.
    pub id: Mutex<Option<SessionId>>,
    phase: Mutex<Phase>,
    wake: Condvar,
    /// Current epoch: lane threads of older epochs stop.
    pub epoch: AtomicU32,
    /// Pushers stop sending (Complete received, or the session ends).
    pub completing: AtomicBool,
    /// The destination of the current demand lane asked for digests after
    /// completion (`VERIFY`, with `SourceConfig::verify`).
    pub verify: AtomicBool,
    /// The page map scanner, for one pusher at a time.
    pub scanner: Mutex<Option<crate::sys::pagemap::Scanner>>,
    /// Pushers between a claim and the completion of its send.
    busy: AtomicUsize,
    /// Pushers claim nothing (pre-copy's switch-over).
    held: AtomicBool,
    /// Pre-copy's dirty log, taken by the demand lane's thread.
    pub dirty_log: Mutex<Option<Box<dyn super::precopy::DirtyLog>>>,
    /// What pre-copy did.
    pub precopy: Mutex<Option<super::precopy::PrecopyReport>>,
    /// Why the session failed elsewhere (a bulk lane, a memory file that
    /// shrank): the demand lane sends it to the destination, then ends.
    pub fatal: Mutex<Option<ringfault_proto::ErrorFrame>>,
}

impl<'a> Session<'a> {
    /// A session in [`Phase::Waiting`].
    pub fn new(backing: &'a Backing, layout: &'a Layout, cfg: &'a SourceConfig) -> Session<'a> {
        let bases: Vec<usize> = match backing {
            Backing::Memory(m) => m.regions().iter().map(|r| r.addr()).collect(),
            Backing::File(_) => Vec::new(),
        };
        let space = PageSpace::new(layout, &bases);
        Session {
            backing,
            layout,
            cfg,
            plan: PushPlan::new(space.clone()),
            space,
            counters: SourceCounters::default(),
            id: Mutex::new(None),
            phase: Mutex::new(Phase::Waiting),
            wake: Condvar::new(),
            epoch: AtomicU32::new(0),
            completing: AtomicBool::new(false),
            verify: AtomicBool::new(false),
            scanner: Mutex::new(None),
            busy: AtomicUsize::new(0),
            held: AtomicBool::new(false),
            dirty_log: Mutex::new(None),
            precopy: Mutex::new(None),
            fatal: Mutex::new(None),
        }
    }

    /// A pusher is about to claim pages; false (and nothing counted) when
    /// pushers are held.
    pub fn begin_claim(&self) -> bool {
        // SeqCst: with `hold_pushers` and `round_drained_or_held`, either the
        // holder sees this pusher busy, or the pusher sees the hold.
        self.busy.fetch_add(1, Ordering::SeqCst);
        if self.held.load(Ordering::SeqCst) {
            self.end_claim();
            return false;
        }
        true
    }

    /// The pusher's claimed pages are on the wire (or it claimed none).
    pub fn end_claim(&self) {
        // SeqCst: as in `begin_claim`.
        if self.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.wake.notify_all();
        }
    }

    /// Holds (or releases) the pushers.
    pub fn hold_pushers(&self, hold: bool) {
        // SeqCst: as in `begin_claim`.
        self.held.store(hold, Ordering::SeqCst);
        self.wake.notify_all();
    }

    /// No pusher has a send in flight.
    pub fn round_drained_or_held(&self) -> bool {
        // SeqCst: as in `begin_claim`.
        self.busy.load(Ordering::SeqCst) == 0
    }

    /// A pre-copy round is over: nothing left to claim, no send in flight.
    pub fn round_drained(&self) -> bool {
        !self.plan.needs_scan() && self.plan.exhausted() && self.round_drained_or_held()
    }

    /// Whether pushers are held.
    pub fn pushers_held(&self) -> bool {
        // SeqCst: as in `begin_claim`.
        self.held.load(Ordering::SeqCst)
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase.lock().map(|p| *p).unwrap_or(Phase::Broken)
    }

    /// Moves to `to` if the phase is one of `from`; returns the phase before.
    pub fn transition(&self, from: &[Phase], to: Phase) -> Result<Phase, Phase> {
        let Ok(mut p) = self.phase.lock() else {
            return Err(Phase::Broken);
        };
        let was = *p;
        if !from.contains(&was) {
            return Err(was);
        }
        *p = to;
        drop(p);
        self.wake.notify_all();
        Ok(was)
    }

    /// Wakes every waiting pusher (new hints, a phase change, a new epoch).
    pub fn notify(&self) {
        self.wake.notify_all();
    }

    /// Waits until the phase leaves `Waiting`/`Broken`, the epoch moves past
    /// `epoch`, or `timeout` passes. Returns the phase.
    pub fn wait(&self, epoch: u32, timeout: Duration) -> Phase {
        let Ok(guard) = self.phase.lock() else {
            return Phase::Broken;
        };
        let (guard, _) = self
            .wake
            .wait_timeout_while(guard, timeout, |p| {
                // Relaxed: the epoch is re-read under the phase lock's ordering.
                matches!(*p, Phase::Waiting) && self.epoch.load(Ordering::Relaxed) == epoch
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard
    }

    /// Sleeps up to `timeout` or until notified (idle pushers: heartbeats).
    pub fn idle(&self, timeout: Duration) {
        let Ok(guard) = self.phase.lock() else {
            return;
        };
        let _ = self.wake.wait_timeout(guard, timeout);
    }

    /// Whether a thread of `epoch` should stop.
    pub fn stale(&self, epoch: u32) -> bool {
        // Acquire: pairs with the Release increment in `next_epoch`.
        self.epoch.load(Ordering::Acquire) != epoch
    }

    /// Starts a new epoch (a resume); returns it.
    pub fn next_epoch(&self) -> u32 {
        // Release: threads that see the new epoch see the state reset before it.
        let e = self.epoch.fetch_add(1, Ordering::Release) + 1;
        self.wake.notify_all();
        e
    }
}
