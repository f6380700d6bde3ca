//! The fault loop: one thread, one io_uring ring, the userfaultfd's events,
//! and a [`PageSource`] that fetches what is missing. Every destination (a
//! post-copy migration, Firecracker's page-fault handler in local or remote
//! mode, CRIU's lazy pages) runs this one loop.
//!
//! # Mechanism
//! Each turn of the loop:
//! 1. takes every ready completion: userfaultfd events (a multishot read of
//!    the userfaultfd into a slot ring, so events arrive with no system call
//!    of their own), wake-ups from other threads (an eventfd), and the page
//!    source's own operations (its socket receives and sends);
//! 2. turns each fault into at most one fetch per page ([`DemandTable`]):
//!    a fault on a page that is already present, or known to be zero, is
//!    resolved here at once;
//! 3. passes the turn's new faults to the page source in one call (the
//!    remote source sends them as one request);
//! 4. lets the page source install what arrived;
//! 5. once every page is present, drives the end of the session;
//! 6. enters the kernel once: submitting what the turn queued, and sleeping
//!    until the next completion unless work is pending.
//!
//! # Kernel versions
//! Multishot reads: Linux 6.7. Everything else as `sys::ring`.
//!
//! # Hazards
//! * With a VMM's userfaultfd (balloons deliver REMOVE events), events are
//!   read with `read(2)` under the exclusive [`RemoveGate`] instead of by a
//!   multishot read, which the kernel would run at arbitrary moments outside
//!   the gate (see `install::RemoveGate`).
//! * io_uring's read on a userfaultfd only waits for events if the file is
//!   non-blocking (`O_NONBLOCK`); the loop sets it on a VMM's descriptor.
//!
//! [`RemoveGate`]: super::install::RemoveGate

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use super::install::Installer;
use super::pages::{Cx, Finish, PageSource, Work, TOKEN_SOURCE};
use crate::error::EngineError;
use crate::schedule::{DemandTable, FaultAction};
use crate::stats::{new_histogram, record, Counters};
use crate::sys::affinity::{place_current_thread, SchedClass};
use crate::sys::bufring::SlotRing;
use crate::sys::ring::{Event, Ring, SlotsId};
use crate::sys::uffd::{self, Event as UffdEvent, UffdMsg, UFFD_MSG_SIZE};

const TOKEN_UFFD: u32 = 1;
const TOKEN_POLL: u32 = 2;
const TOKEN_NOTIFY: u32 = 3;

/// Events per slot of the userfaultfd slot ring.
const EVENTS_PER_SLOT: usize = 64;

/// `SCHED_FIFO` priority of the fault loop when demand is prioritized.
pub const FAULT_PRIORITY: i32 = 10;

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Thread name, for messages.
    pub name: &'static str,
    /// Pin to this core.
    pub core: Option<usize>,
    /// Scheduling class.
    pub class: Option<SchedClass>,
    /// Unregister guest memory when the session ends.
    pub unregister: bool,
}

/// What the loop measured.
#[derive(Debug)]
pub struct LoopReport {
    /// Fault service latency: fault read to page present, in ns.
    pub hist: Histogram<u64>,
}

enum EventInput {
    /// A multishot read into this slot ring.
    Multishot,
    /// `read(2)` under the gate when the poll says so.
    Polled { ready: bool },
}

/// Runs the loop until the page source says the session is done.
pub fn run<S: PageSource>(
    inst: &Installer,
    source: &mut S,
    cfg: &LoopConfig,
) -> Result<LoopReport, EngineError> {
    place_current_thread(cfg.name, cfg.core.is_some(), cfg.core.unwrap_or(0), cfg.class);
    let mut l = Loop {
        inst,
        table: DemandTable::new(),
        hist: new_histogram(),
        fetch: Vec::new(),
        msgs: vec![UffdMsg::default(); EVENTS_PER_SLOT],
        unregistered: false,
    };
    let result = l.run(source, cfg);
    source.stop(result.as_ref().err());
    result.map(|()| LoopReport { hist: l.hist })
}

struct Loop<'a> {
    inst: &'a Installer,
    table: DemandTable,
    hist: Histogram<u64>,
    fetch: Vec<u64>,
    msgs: Vec<UffdMsg>,
    /// Guest memory is unregistered: faults read before that are over
    /// (unregistering woke their threads, which now fault normally).
    unregistered: bool,
}

impl Loop<'_> {
    fn run<S: PageSource>(&mut self, source: &mut S, cfg: &LoopConfig) -> Result<(), EngineError> {
        let inst = self.inst;
        uffd::ensure_nonblocking(&inst.uffd)
            .map_err(|e| EngineError::io("making the userfaultfd non-blocking", e))?;
        let mut ring = Ring::new(256)?;
        let note = ring.add_slots(SlotRing::new(8, 4)?)?;
        ring.read_multishot(inst.notifier.as_fd(), note, TOKEN_NOTIFY)?;
        let mut input = if inst.gate.is_some() {
            ring.poll_multishot(inst.uffd.as_fd(), TOKEN_POLL)?;
            EventInput::Polled { ready: true }
        } else {
            let slots = ring.add_slots(SlotRing::new(UFFD_MSG_SIZE * EVENTS_PER_SLOT, 16)?)?;
            ring.read_multishot(inst.uffd.as_fd(), slots, TOKEN_UFFD)?;
            EventInput::Multishot
        };
        source.start(&mut Cx {
            ring: &mut ring,
            inst,
            now: Instant::now(),
        })?;
        let mut events = Vec::with_capacity(256);
        loop {
            events.clear();
            ring.events(&mut events)?;
            let now = Instant::now();
            for ev in events.drain(..) {
                self.dispatch(&mut ring, &mut input, source, ev, now, note)?;
            }
            if let EventInput::Polled { ready } = &mut input {
                if std::mem::take(ready) {
                    self.read_gated(now)?;
                }
            }
            let backlog = inst
                .backlog
                .lock()
                .map(|mut b| std::mem::take(&mut *b))
                .unwrap_or_default();
            for ev in backlog {
                self.on_event(ev, now)?;
            }
            let mut cx = Cx {
                ring: &mut ring,
                inst,
                now,
            };
            if source.refetch() {
                self.fetch.extend(self.table.pages());
            }
            if !self.fetch.is_empty() {
                let pages = std::mem::take(&mut self.fetch);
                source.fetch(&mut cx, &pages)?;
                self.fetch = pages;
                self.fetch.clear();
            }
            let work = source.work(&mut cx)?;
            self.resolve(now);
            if inst.present.all_set() {
                match source.finish(&mut cx)? {
                    Finish::Pending => {}
                    Finish::Unregister => {
                        if cfg.unregister && !self.unregistered {
                            self.unregister()?;
                            self.unregistered = true;
                        }
                        if source.finish(&mut cx)? == Finish::Done {
                            break;
                        }
                    }
                    Finish::Done => break,
                }
            }
            if work == Work::Busy || !self.fetch.is_empty() {
                ring.submit()?;
            } else {
                ring.submit_and_wait(Some(source.sleep_limit()))?;
            }
        }
        self.resolve(Instant::now());
        Ok(())
    }

    fn dispatch<S: PageSource>(
        &mut self,
        ring: &mut Ring,
        input: &mut EventInput,
        source: &mut S,
        ev: Event,
        now: Instant,
        note: SlotsId,
    ) -> Result<(), EngineError> {
        let inst = self.inst;
        match ev {
            Event::Slot {
                token: TOKEN_UFFD,
                slots,
                bid,
                len,
            } => {
                let mut parsed = Vec::with_capacity(len / UFFD_MSG_SIZE);
                if let Some(bytes) = ring.slots(slots).slot(bid, len) {
                    parsed.extend(uffd::parse_all(bytes));
                }
                ring.slots_mut(slots).recycle(bid);
                for e in parsed {
                    self.on_event(e, now)?;
                }
            }
            Event::ReadEnded {
                token: TOKEN_UFFD,
                slots,
                result,
            } => match result {
                // The kernel stops a multishot read when the slots run out
                // (ENOBUFS) or at will; re-arm.
                Ok(()) => ring.read_multishot(inst.uffd.as_fd(), slots, TOKEN_UFFD)?,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EINTR | libc::EAGAIN)) => {
                    ring.read_multishot(inst.uffd.as_fd(), slots, TOKEN_UFFD)?
                }
                Err(e) => return Err(EngineError::io("reading userfaultfd events", e)),
            },
            Event::Polled {
                token: TOKEN_POLL,
                result,
            } => match result {
                Ok(true) => {
                    if let EventInput::Polled { ready } = input {
                        *ready = true;
                    }
                }
                Ok(false) => {
                    ring.poll_multishot(inst.uffd.as_fd(), TOKEN_POLL)?;
                    if let EventInput::Polled { ready } = input {
                        *ready = true;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    ring.poll_multishot(inst.uffd.as_fd(), TOKEN_POLL)?
                }
                Err(e) => return Err(EngineError::io("polling the userfaultfd", e)),
            },
            Event::Slot {
                token: TOKEN_NOTIFY,
                slots,
                bid,
                ..
            } => ring.slots_mut(slots).recycle(bid),
            Event::ReadEnded {
                token: TOKEN_NOTIFY,
                result,
                ..
            } => match result {
                Ok(()) => ring.read_multishot(inst.notifier.as_fd(), note, TOKEN_NOTIFY)?,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EINTR | libc::EAGAIN)) => {
                    ring.read_multishot(inst.notifier.as_fd(), note, TOKEN_NOTIFY)?
                }
                Err(e) => return Err(EngineError::io("reading the wake-up eventfd", e)),
            },
            other => {
                let token = match &other {
                    Event::Received { token, .. }
                    | Event::ReceiveEnded { token, .. }
                    | Event::Slot { token, .. }
                    | Event::ReadEnded { token, .. }
                    | Event::Polled { token, .. }
                    | Event::Sent { token, .. } => *token,
                };
                if token >= TOKEN_SOURCE {
                    source.event(
                        &mut Cx {
                            ring,
                            inst,
                            now,
                        },
                        other,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Reads every pending event with `read(2)` under the exclusive gate,
    /// marking removed ranges before any install can run again.
    fn read_gated(&mut self, now: Instant) -> Result<(), EngineError> {
        loop {
            let batch = {
                let _g = self.inst.gate.as_ref().map(|g| g.exclusive());
                let n = self.inst.uffd.read_events(&mut self.msgs)?;
                let evs: Vec<UffdEvent> = self.msgs[..n].iter().map(UffdMsg::parse).collect();
                for ev in &evs {
                    if let UffdEvent::Remove { start, end } = ev {
                        self.inst.mark_removed(*start, *end);
                    }
                }
                evs
            };
            let full = batch.len() == self.msgs.len();
            for ev in batch {
                self.on_event(ev, now)?;
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn on_event(&mut self, ev: UffdEvent, now: Instant) -> Result<(), EngineError> {
        let inst = self.inst;
        match ev {
            UffdEvent::PageFault { addr, .. } => {
                Counters::add(&inst.counters.faults, 1);
                if self.unregistered {
                    return Ok(());
                }
                let addr = usize::try_from(addr).unwrap_or(usize::MAX);
                let Some((ri, page)) = inst.space.locate_addr(addr) else {
                    tracing::error!("fault at {addr:#x} outside guest memory; the faulting thread stays blocked");
                    return Ok(());
                };
                let Some(g) = inst.space.global(ri, page) else {
                    return Ok(());
                };
                if inst.present.is_set(g) {
                    Counters::add(&inst.counters.stale_faults, 1);
                    inst.resolve_settled(ri, page)?;
                    return Ok(());
                }
                match self.table.fault(g, now) {
                    FaultAction::Fetch => self.fetch.push(g),
                    FaultAction::Coalesced => Counters::add(&inst.counters.coalesced_faults, 1),
                }
            }
            UffdEvent::Remove { start, end } => inst.mark_removed(start, end),
            UffdEvent::Unmap { start, end } => {
                tracing::warn!("guest memory {start:#x}..{end:#x} was unmapped by its owner");
            }
            UffdEvent::Remap { from, to, len } => {
                tracing::warn!(
                    "guest memory {from:#x}+{len:#x} was moved to {to:#x}; pages there are no longer served"
                );
            }
            UffdEvent::Fork { ufd } => {
                tracing::warn!("the guest's process forked; its userfaultfd {ufd} is closed, the child is not served");
                uffd::close_forked(ufd);
            }
            UffdEvent::Unknown(code) => tracing::debug!("userfaultfd event {code:#x} ignored"),
        }
        Ok(())
    }

    /// Records the latency of every pending fault whose page is present now.
    fn resolve(&mut self, now: Instant) {
        if self.table.is_empty() {
            return;
        }
        let present = &self.inst.present;
        let hist = &mut self.hist;
        let pages: Vec<u64> = self.table.pages().filter(|&g| present.is_set(g)).collect();
        for g in pages {
            if let Some(times) = self.table.resolved(g) {
                for t in times {
                    record(hist, now.saturating_duration_since(t));
                }
            }
        }
    }

    fn unregister(&self) -> Result<(), EngineError> {
        for s in self.inst.space.spans() {
            if s.base != 0 {
                self.inst.uffd.unregister(s.base, s.len())?;
            }
        }
        Ok(())
    }
}

/// How long the loop sleeps at most when nothing else sets a limit.
pub const DEFAULT_SLEEP: Duration = Duration::from_millis(500);
