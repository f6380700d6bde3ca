//! The destination's side of pre-copy (see `source::precopy`): pages arrive
//! while the VM still runs on the source, and the switch-over is a barrier.
//!
//! # Mechanism
//! * Guest memory is mapped but not registered with the userfaultfd yet, so a
//!   bulk worker writes each pre-copy page straight into it; a page sent again
//!   in a later round simply overwrites the earlier copy.
//! * The switch-over is a barrier. Each bulk lane carries a
//!   `Phase(SwitchOver)` before its first post-copy frame: its worker stops
//!   there ([`PrecopyGate::arrive_and_wait`]). The demand lane carries the
//!   discard list, ended by its own `Phase(SwitchOver)`. Once every lane has
//!   reached its marker, no pre-copy frame can arrive any more: the pages of
//!   the discard list are dropped (`MADV_DONTNEED`, and their present bits
//!   cleared), guest memory is registered (MISSING mode), and the workers go
//!   on, installing post-copy frames with `UFFDIO_COPY`, which never
//!   overwrites a present page. The VM resumes after that.
//! * So a page the destination's workload writes after the switch-over can
//!   never be overwritten by a late pre-copy frame: every pre-copy frame was
//!   handled before the VM resumed, and post-copy frames only fill missing
//!   pages.
//!
//! # Hazards
//! Pre-copy needs memory the destination maps itself (a VMM's memory cannot be
//! written or dropped from here) and copy installs (the pages land in guest
//! memory directly).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ringfault_proto::{Layout, Message, PageKind, PhaseKind};

use super::install::{Installer, Payload};
use super::remote::RemotePages;
use crate::error::{EngineError, LaneId};
use crate::stats::Counters;
use crate::sys::guest::GuestMemory;
use crate::sys::uffd::RegisterMode;
use crate::wire::peer_error;

#[derive(Debug, Default)]
struct GateState {
    arrived: u32,
    open: bool,
    aborted: bool,
}

/// The pre-copy phase's state, shared by the bulk workers and the
/// switch-over.
#[derive(Debug)]
pub struct PrecopyGate {
    memory: Arc<GuestMemory>,
    active: AtomicBool,
    state: Mutex<GateState>,
    cv: Condvar,
}

/// What the destination's pre-copy phase saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrecopyStats {
    /// Pages the discard list dropped.
    pub discarded: u64,
    /// Milliseconds from the demand lane's marker to registration done.
    pub barrier_ms: f64,
}

impl PrecopyGate {
    /// A gate for pre-copy into `memory` (unregistered until the switch-over).
    pub fn new(memory: Arc<GuestMemory>) -> PrecopyGate {
        PrecopyGate {
            memory,
            active: AtomicBool::new(true),
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
        }
    }

    /// Whether pages still go straight into memory (before the switch-over).
    pub fn active(&self) -> bool {
        // Acquire: pairs with `open`'s Release; after it, frames are post-copy.
        self.active.load(Ordering::Acquire)
    }

    /// Writes a pre-copy frame's pages into guest memory; returns the pages.
    pub fn write(
        &self,
        inst: &Installer,
        ri: usize,
        first: u64,
        count: u64,
        kind: PageKind,
        payload: Payload<'_>,
    ) -> Result<u64, EngineError> {
        let span = *inst
            .space
            .span(ri)
            .ok_or_else(|| EngineError::Internal(format!("pre-copy into region index {ri}")))?;
        let r = self
            .memory
            .region(ri)
            .ok_or_else(|| EngineError::Internal(format!("pre-copy into region index {ri}")))?;
        let ps = span.page_size;
        let off = usize::try_from(first)
            .unwrap_or(usize::MAX)
            .saturating_mul(ps);
        let len = usize::try_from(count)
            .unwrap_or(usize::MAX)
            .saturating_mul(ps);
        match (kind, payload) {
            (PageKind::Data, Payload::Bytes(b)) => {
                let b = b.get(..len).ok_or_else(|| {
                    EngineError::Internal("payload shorter than its pages".into())
                })?;
                r.write(off, b)?;
                Counters::add(&inst.counters.bulk_pages, count);
            }
            (PageKind::Data, _) => {
                return Err(EngineError::Internal("pre-copy needs copy installs".into()))
            }
            (_, _) => {
                // Zero: a page that held data from an earlier round is dropped
                // (it reads zero again); one never written reads zero already.
                let mut p = 0;
                while p < count {
                    let g = span.first + first + p;
                    if inst.present.is_set(g) {
                        r.discard(off + usize::try_from(p).unwrap_or(0) * ps, ps)?;
                    }
                    p += 1;
                }
                Counters::add(&inst.counters.zero_pages, count);
            }
        }
        inst.present.set_range(span.first + first, count);
        Ok(count)
    }

    /// A bulk lane reached its switch-over marker: waits until post-copy
    /// begins (or the switch-over failed).
    pub fn arrive_and_wait(&self, lane: LaneId) -> Result<(), EngineError> {
        let Ok(mut st) = self.state.lock() else {
            return Err(EngineError::Internal("pre-copy gate poisoned".into()));
        };
        st.arrived += 1;
        self.cv.notify_all();
        while !st.open && !st.aborted {
            st = self
                .cv
                .wait(st)
                .map_err(|_| EngineError::Internal("pre-copy gate poisoned".into()))?;
        }
        if st.aborted {
            return Err(EngineError::Session(format!(
                "the switch-over failed while {lane} waited for it"
            )));
        }
        Ok(())
    }

    fn wait_arrivals(&self, n: u32, limit: Duration) -> bool {
        let Ok(st) = self.state.lock() else {
            return false;
        };
        let (st, _) = self
            .cv
            .wait_timeout_while(st, limit, |s| s.arrived < n && !s.aborted)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.arrived >= n
    }

    /// Post-copy begins: the workers go on.
    fn open(&self) {
        // Release: a worker that sees `active == false` sees the registration.
        self.active.store(false, Ordering::Release);
        if let Ok(mut st) = self.state.lock() {
            st.open = true;
        }
        self.cv.notify_all();
    }

    /// The switch-over failed: waiting workers give up.
    pub fn abort(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.aborted = true;
        }
        self.cv.notify_all();
    }
}

/// Runs the pre-copy phase: bulk workers already write pre-copy frames into
/// memory; this reads the demand lane until the switch-over marker, waits for
/// every bulk lane's marker, drops the discarded pages, registers guest memory
/// and lets post-copy begin.
pub(crate) fn switch_over(
    rp: &mut RemotePages,
    gate: &PrecopyGate,
    inst: &Installer,
    layout: &Layout,
    channels: u16,
    liveness: Duration,
) -> Result<PrecopyStats, EngineError> {
    let mut discard: Vec<(usize, u64, u64)> = Vec::new();
    let lane = LaneId::DEMAND;
    let mut last_rx = Instant::now();
    let failures = rp.failures();
    let take_failure = || failures.lock().ok().and_then(|mut f| f.drain(..).next());
    {
        let link = rp
            .demand_link()
            .ok_or_else(|| EngineError::Internal("pre-copy without a demand lane".into()))?;
        link.stream
            .set_read_timeout(Some(liveness))
            .map_err(|e| EngineError::io("setting a timeout", e))?;
        loop {
            // Wait for a frame in short steps, to notice a failed bulk lane.
            let mut fds = [rustix::event::PollFd::new(
                &link.stream,
                rustix::event::PollFlags::IN,
            )];
            let ready = rustix::event::poll(
                &mut fds,
                Some(&rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                }),
            )
            .map_err(|e| EngineError::io("waiting on the demand lane", e.into()))?;
            if ready == 0 {
                if last_rx.elapsed() > liveness {
                    return Err(EngineError::Silent {
                        lane,
                        silent_s: last_rx.elapsed().as_secs_f64(),
                    });
                }
                if let Some(e) = take_failure() {
                    return Err(e);
                }
                continue;
            }
            let msg = link.recv()?;
            last_rx = Instant::now();
            match msg {
                Message::Heartbeat => {}
                Message::DiscardList(chunk) => {
                    chunk
                        .validate(layout)
                        .map_err(|source| EngineError::validation(lane, source))?;
                    let ri = inst
                        .space
                        .index_of(chunk.region)
                        .ok_or_else(|| EngineError::Internal("validated region vanished".into()))?;
                    discard.extend(chunk.set_ranges().map(|(f, c)| (ri, f, c)));
                }
                Message::Phase(p) if p.kind == PhaseKind::SwitchOver => break,
                Message::Error(e) => return Err(peer_error(e)),
                other => {
                    return Err(EngineError::Unexpected {
                        lane,
                        kind: other.kind(),
                        state: "during pre-copy (a discard list expected)",
                    })
                }
            }
        }
        link.stream
            .set_read_timeout(None)
            .map_err(|e| EngineError::io("clearing a timeout", e))?;
    }
    let t = Instant::now();
    // Every bulk lane at its marker: no pre-copy frame can come any more.
    while !gate.wait_arrivals(u32::from(channels), Duration::from_millis(200)) {
        if let Some(e) = take_failure() {
            return Err(e);
        }
        if t.elapsed() > liveness {
            return Err(EngineError::Session(format!(
                "the bulk lanes did not reach the switch-over within {:.0} s",
                liveness.as_secs_f64()
            )));
        }
    }
    let mut discarded = 0;
    for &(ri, first, count) in &discard {
        let Some(s) = inst.space.span(ri).copied() else {
            continue;
        };
        if let Some(r) = gate.memory.region(ri) {
            r.discard(
                s.offset_of(first),
                usize::try_from(count).unwrap_or(0) * s.page_size,
            )?;
        }
        discarded += inst.present.clear_range(s.first + first, count);
    }
    for s in inst.space.spans() {
        inst.uffd.register(s.base, s.len(), RegisterMode::Missing)?;
    }
    gate.open();
    Ok(PrecopyStats {
        discarded,
        barrier_ms: t.elapsed().as_secs_f64() * 1e3,
    })
}
