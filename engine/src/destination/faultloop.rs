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
//! # Several userfaultfds
//! An installer built with [`Installer::for_tasks`] serves one userfaultfd
//! per process (CRIU restores a process tree). The loop then reads every
//! one of them: one multishot read per userfaultfd, each into its own slot
//! ring (whose id names the owner), or, when REMOVE events are possible, one
//! multishot poll per userfaultfd whose token names the owner
//! ([`TOKEN_POLL_BASE`] + owner, above every page-source token). A fault is
//! located among its owner's regions only ([`PageSpace::locate_addr_in`]).
//! Faults outside every region and the events the loop does not apply
//! itself (FORK, REMAP, UNMAP) go to [`PageSource::fault_outside`] and
//! [`PageSource::uffd_event`], in the order they were read.
//!
//! [`PageSpace::locate_addr_in`]: crate::space::PageSpace::locate_addr_in
//!
//! [`RemoveGate`]: super::install::RemoveGate

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::install::Installer;
use super::pages::{Cx, Finish, PageSource, Work, TOKEN_SOURCE};
use crate::error::EngineError;
use crate::schedule::{DemandTable, FaultAction};
use crate::stats::{new_histogram, record, Counters};
use crate::sys::affinity::{place_current_thread, SchedClass};
use crate::sys::bufring::SlotRing;
use crate::sys::ring::{Event, Ring, SlotsId};
use crate::sys::uffd::{self, Event as UffdEvent, UffdMsg, UFFD_MSG_SIZE};
use hdrhistogram::Histogram;

const TOKEN_UFFD: u32 = 1;
const TOKEN_NOTIFY: u32 = 3;
/// Token of the multishot poll of the userfaultfd of owner `k`: this plus
/// `k`. Page sources use tokens from [`TOKEN_SOURCE`] up to this.
pub const TOKEN_POLL_BASE: u32 = 1 << 31;

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
    Multishot(SlotsId),
    /// `read(2)` under the gate when the poll says so.
    Polled { ready: bool },
}

/// What the loop hands the page source after a batch of events.
enum Forward {
    /// A fault outside every region of its owner.
    Outside(u64),
    /// A non-cooperative event the loop does not apply itself.
    Event(UffdEvent),
}

fn poll_token(owner: u32) -> u32 {
    TOKEN_POLL_BASE.saturating_add(owner)
}

/// Runs the loop until the page source says the session is done.
pub fn run<S: PageSource>(
    inst: &Installer,
    source: &mut S,
    cfg: &LoopConfig,
) -> Result<LoopReport, EngineError> {
    place_current_thread(
        cfg.name,
        cfg.core.is_some(),
        cfg.core.unwrap_or(0),
        cfg.class,
    );
    let mut l = Loop {
        inst,
        table: DemandTable::new(),
        hist: new_histogram(),
        fetch: Vec::new(),
        msgs: vec![UffdMsg::default(); EVENTS_PER_SLOT],
        unregistered: false,
        forward: Vec::new(),
    };
    let cpu0 = crate::stats::thread_cpu_ns();
    let result = l.run(source, cfg);
    Counters::add(
        &inst.counters.fault_loop_cpu_ns,
        crate::stats::thread_cpu_ns().saturating_sub(cpu0),
    );
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
    /// Faults and events for the page source, by owner, in reading order.
    forward: Vec<(u32, Forward)>,
}

impl Loop<'_> {
    fn run<S: PageSource>(&mut self, source: &mut S, cfg: &LoopConfig) -> Result<(), EngineError> {
        let inst = self.inst;
        let mut ring = Ring::new(256)?;
        let note = ring.add_slots(SlotRing::new(8, 4)?)?;
        ring.read_multishot(inst.notifier.as_fd(), note, TOKEN_NOTIFY)?;
        let mut inputs = Vec::new();
        for owner in 0..inst.uffd_count() {
            let u = inst.uffd_of(owner).ok_or_else(|| {
                EngineError::Internal(format!("no userfaultfd for owner {owner}"))
            })?;
            uffd::ensure_nonblocking(u)
                .map_err(|e| EngineError::io("making the userfaultfd non-blocking", e))?;
            inputs.push(if inst.gate.is_some() {
                ring.poll_multishot(u.as_fd(), poll_token(owner))?;
                EventInput::Polled { ready: true }
            } else {
                let slots = ring.add_slots(SlotRing::new(UFFD_MSG_SIZE * EVENTS_PER_SLOT, 16)?)?;
                ring.read_multishot(u.as_fd(), slots, TOKEN_UFFD)?;
                EventInput::Multishot(slots)
            });
        }
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
                self.dispatch(&mut ring, &mut inputs, source, ev, now, note)?;
            }
            for (owner, input) in (0u32..).zip(inputs.iter_mut()) {
                if let EventInput::Polled { ready } = input {
                    if std::mem::take(ready) {
                        self.read_gated(owner, now)?;
                    }
                }
            }
            let backlog = inst
                .backlog
                .lock()
                .map(|mut b| std::mem::take(&mut *b))
                .unwrap_or_default();
            for (owner, ev) in backlog {
                self.on_event(owner, ev, now)?;
            }
            let mut cx = Cx {
                ring: &mut ring,
                inst,
                now,
            };
            for (owner, f) in std::mem::take(&mut self.forward) {
                match f {
                    Forward::Outside(addr) => source.fault_outside(&mut cx, owner, addr)?,
                    Forward::Event(ev) => {
                        if !source.uffd_event(&mut cx, owner, ev)? {
                            unhandled(owner, ev);
                        }
                    }
                }
            }
            if source.refetch() {
                self.fetch.extend(self.table.pages());
            }
            if !self.fetch.is_empty() {
                let pages = std::mem::take(&mut self.fetch);
                source.fetch(&mut cx, &pages)?;
                self.fetch = pages;
                self.fetch.clear();
                // A source that installs at once (a local file) resolved
                // these faults now, not after the turn's background work.
                self.resolve(Instant::now());
            }
            let work = source.work(&mut cx)?;
            self.resolve(Instant::now());
            if inst.present.all_set() {
                match source.finish(&mut cx)? {
                    Finish::Pending => {}
                    Finish::Unregister => {
                        if cfg.unregister && !self.unregistered {
                            self.unregister()?;
                            self.unregistered = true;
                            if let Some(h) = inst.huge.get() {
                                h.sweep();
                            }
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
        if self.unregistered {
            for (owner, input) in (0u32..).zip(inputs.iter()) {
                if matches!(input, EventInput::Polled { .. }) {
                    // An event queued before unregistering (a balloon's
                    // REMOVE) holds the thread that caused it until it is
                    // read: read what is left, so that no madvise() in the
                    // guest's owner waits forever.
                    self.read_gated(owner, Instant::now())?;
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch<S: PageSource>(
        &mut self,
        ring: &mut Ring,
        inputs: &mut [EventInput],
        source: &mut S,
        ev: Event,
        now: Instant,
        note: SlotsId,
    ) -> Result<(), EngineError> {
        let inst = self.inst;
        let owner_of_slots = |inputs: &[EventInput], slots: SlotsId| {
            (0u32..)
                .zip(inputs.iter())
                .find(|(_, i)| matches!(i, EventInput::Multishot(s) if *s == slots))
                .map(|(k, _)| k)
        };
        let uffd_of = |owner: u32| {
            inst.uffd_of(owner)
                .ok_or_else(|| EngineError::Internal(format!("no userfaultfd for owner {owner}")))
        };
        match ev {
            Event::Slot {
                token: TOKEN_UFFD,
                slots,
                bid,
                len,
            } => {
                let owner = owner_of_slots(inputs, slots).unwrap_or(0);
                let mut parsed = Vec::with_capacity(len / UFFD_MSG_SIZE);
                if let Some(bytes) = ring.slots(slots).slot(bid, len) {
                    parsed.extend(uffd::parse_all(bytes));
                }
                ring.slots_mut(slots).recycle(bid);
                for e in parsed {
                    self.on_event(owner, e, now)?;
                }
            }
            Event::ReadEnded {
                token: TOKEN_UFFD,
                slots,
                result,
            } => {
                let owner = owner_of_slots(inputs, slots).unwrap_or(0);
                match result {
                    // The kernel stops a multishot read when the slots run out
                    // (ENOBUFS) or at will; re-arm.
                    Ok(()) => ring.read_multishot(uffd_of(owner)?.as_fd(), slots, TOKEN_UFFD)?,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOBUFS | libc::EINTR | libc::EAGAIN)
                        ) =>
                    {
                        ring.read_multishot(uffd_of(owner)?.as_fd(), slots, TOKEN_UFFD)?
                    }
                    Err(e) => return Err(EngineError::io("reading userfaultfd events", e)),
                }
            }
            Event::Polled { token, result } if token >= TOKEN_POLL_BASE => {
                let owner = token - TOKEN_POLL_BASE;
                let input = inputs.get_mut(usize::try_from(owner).unwrap_or(usize::MAX));
                match result {
                    Ok(true) => {
                        if let Some(EventInput::Polled { ready }) = input {
                            *ready = true;
                        }
                    }
                    Ok(false) => {
                        ring.poll_multishot(uffd_of(owner)?.as_fd(), token)?;
                        if let Some(EventInput::Polled { ready }) = input {
                            *ready = true;
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                        ring.poll_multishot(uffd_of(owner)?.as_fd(), token)?
                    }
                    Err(e) => return Err(EngineError::io("polling the userfaultfd", e)),
                }
            }
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
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOBUFS | libc::EINTR | libc::EAGAIN)
                    ) =>
                {
                    ring.read_multishot(inst.notifier.as_fd(), note, TOKEN_NOTIFY)?
                }
                Err(e) => return Err(EngineError::io("reading the wake-up eventfd", e)),
            },
            other => {
                let token = other.token();
                if (TOKEN_SOURCE..TOKEN_POLL_BASE).contains(&token) {
                    source.event(&mut Cx { ring, inst, now }, other)?;
                }
            }
        }
        Ok(())
    }

    /// Reads every pending event of `owner`'s userfaultfd with `read(2)`
    /// under the exclusive gate, marking removed ranges before any install
    /// can run again.
    fn read_gated(&mut self, owner: u32, now: Instant) -> Result<(), EngineError> {
        let uffd = self
            .inst
            .uffd_of(owner)
            .ok_or_else(|| EngineError::Internal(format!("no userfaultfd for owner {owner}")))?;
        loop {
            let batch = {
                let _g = self.inst.gate.as_ref().map(|g| g.exclusive());
                let n = uffd.read_events(&mut self.msgs)?;
                let evs: Vec<UffdEvent> = self.msgs[..n].iter().map(UffdMsg::parse).collect();
                for ev in &evs {
                    if let UffdEvent::Remove { start, end } = ev {
                        self.inst.mark_removed_in(owner, *start, *end);
                    }
                }
                evs
            };
            let full = batch.len() == self.msgs.len();
            for ev in batch {
                self.on_event(owner, ev, now)?;
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn on_event(&mut self, owner: u32, ev: UffdEvent, now: Instant) -> Result<(), EngineError> {
        let inst = self.inst;
        match ev {
            UffdEvent::PageFault { addr, .. } => {
                Counters::add(&inst.counters.faults, 1);
                if self.unregistered {
                    return Ok(());
                }
                let at = usize::try_from(addr).unwrap_or(usize::MAX);
                let Some((ri, page)) = inst.space.locate_addr_in(owner, at) else {
                    self.forward.push((owner, Forward::Outside(addr)));
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
            UffdEvent::Remove { start, end } => inst.mark_removed_in(owner, start, end),
            ev @ (UffdEvent::Unmap { .. }
            | UffdEvent::Remap { .. }
            | UffdEvent::Fork { .. }
            | UffdEvent::Unknown(_)) => self.forward.push((owner, Forward::Event(ev))),
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
            if s.base != 0 && !self.inst.is_gone(s.owner) {
                if let Some(u) = self.inst.uffd_of(s.owner) {
                    u.unregister(s.base, s.len())?;
                    // Unregistering wakes the threads blocked on faults in
                    // the range, but a vCPU was seen (Linux 6.18, twice in
                    // the suite) still blocked in `handle_userfault` on an
                    // unregistered range afterwards: wake the range too.
                    // Nothing waits on it normally, so this costs one ioctl.
                    let _ = u.wake(s.base, s.len());
                }
            }
        }
        Ok(())
    }
}

/// What the loop does with an event no page source handled.
fn unhandled(owner: u32, ev: UffdEvent) {
    match ev {
        UffdEvent::Unmap { start, end } => {
            tracing::warn!("guest memory {start:#x}..{end:#x} was unmapped by its owner ({owner})");
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
        UffdEvent::PageFault { .. } | UffdEvent::Remove { .. } => {}
    }
}

/// How long the loop sleeps at most when nothing else sets a limit.
pub const DEFAULT_SLEEP: Duration = Duration::from_millis(500);
