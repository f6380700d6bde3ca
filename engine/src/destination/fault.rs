//! The fault worker: reads userfaultfd events, sends demand requests, and receives
//! and installs demand pages, all on one thread and one core.
//!
//! A faulting vCPU therefore pays, beyond the network round trip, one wake-up of this
//! thread at most, and none while it is polling: after any activity it polls the
//! userfaultfd and the demand socket for `cfg.spin` before it sleeps in its io_uring
//! ring (`POLL_ADD` on both, plus a notifier that bulk workers poke when the last
//! page arrives).
//!
//! Kernel: Linux 4.3 for MISSING faults, 4.11 for REMOVE events. Hazard: while a
//! REMOVE event is pending, every install ioctl returns `EAGAIN`; the installer then
//! calls back here to read events first.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ringfault_proto::{
    decode_frame, encode_demand_frame, DemandRequest, Message, PageKind, FRAME_HEADER_LEN,
};

use super::install::Payload;
use super::Shared;
use crate::addr::Stream;
use crate::conn::{peer_error, send_message};
use crate::error::EngineError;
use crate::schedule::{DemandTable, FaultAction};
use crate::stats::{new_histogram, record, ChannelReport, Counters, Timeline};
use crate::sys::guest::{recv_nonblocking, send_pieces, Piece};
use crate::sys::install::zero;
use crate::sys::ringio::Waiter;
use crate::sys::uffd::{Event, UffdMsg};

/// `SCHED_FIFO` priority of the fault worker (one below the source's demand
/// thread: see `source::DEMAND_PRIORITY`).
const DEMAND_PRIORITY: i32 = crate::source::DEMAND_PRIORITY - 1;

/// Lets bulk workers wake the fault worker (the last page arrived, or a failure).
#[derive(Debug)]
pub(crate) struct Notifier {
    rx: UnixStream,
    tx: UnixStream,
}

impl Notifier {
    pub(crate) fn new() -> Result<Notifier, EngineError> {
        let (rx, tx) =
            UnixStream::pair().map_err(|e| EngineError::io("creating the notifier", e))?;
        rx.set_nonblocking(true)
            .and_then(|_| tx.set_nonblocking(true))
            .map_err(|e| EngineError::io("creating the notifier", e))?;
        Ok(Notifier { rx, tx })
    }

    /// Wakes the fault worker; never blocks.
    pub(crate) fn notify(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    fn drain(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.rx).read(&mut b), Ok(n) if n > 0) {}
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

/// Runs the fault worker until every page is present and the source has been
/// released. Returns the service-latency histogram and the demand lane's traffic.
pub(crate) fn run(
    sh: &Shared<'_>,
    mut demand: Stream,
) -> Result<(Histogram<u64>, ChannelReport), EngineError> {
    crate::sys::affinity::place_current_thread(
        "fault worker",
        sh.cfg.pin_workers,
        0,
        sh.cfg
            .prioritize_demand
            .then_some(crate::sys::affinity::SchedClass::Realtime(DEMAND_PRIORITY)),
    );
    demand
        .set_nonblocking(true)
        .map_err(|e| EngineError::io("making the demand lane non-blocking", e))?;
    let mut w = FaultWorker {
        sh,
        table: DemandTable::new(),
        hist: new_histogram(),
        timeline: Timeline::new(sh.started),
        lane_bytes: 0,
        events: vec![UffdMsg::default(); 64],
        backlog: VecDeque::new(),
        requests: Vec::with_capacity(4096),
        buf: vec![0u8; 1 << 20],
        have: 0,
    };
    let mut waiter = Waiter::new().map_err(|e| EngineError::io("creating the fault ring", e))?;
    let mut last_active = Instant::now();
    let mut complete_sent = false;
    loop {
        // Each pass reads the userfaultfd and the demand socket until a read comes
        // back short, which means drained: then we sleep at once rather than spend
        // two more system calls finding nothing (every microsecond here is on the
        // faulting vCPU's clock).
        let mut active = w.read_faults()?;
        w.flush_requests(&demand)?;
        match w.receive(&demand)? {
            Received::Drained => {}
            Received::More => active = true,
            Received::CompleteAck => break,
        }
        if !complete_sent && sh.present.all_set() {
            let msg = Message::Complete(ringfault_proto::Complete {
                pages_present: sh.present.count(),
            });
            send_message(&mut demand, &msg)?;
            complete_sent = true;
            active = true;
        }
        if active {
            last_active = Instant::now();
        } else if last_active.elapsed() < sh.cfg.spin {
            std::hint::spin_loop();
        } else {
            let fds = [sh.uffd.as_fd(), demand.as_fd(), sh.notifier.fd()];
            waiter
                .wait(&fds, Duration::from_millis(50))
                .map_err(|e| EngineError::io("waiting for faults", e))?;
            sh.notifier.drain();
        }
    }
    // Every page is present and the source stopped sending: the userfaultfd has no
    // more work, and the source may free its memory.
    for r in sh.regions {
        sh.uffd.unregister(r.base, r.len)?;
    }
    // Release: bulk workers read `finished` after their sockets close.
    sh.finished.store(true, Ordering::Release);
    send_message(&mut demand, &Message::Release)?;
    let report = ChannelReport {
        channel: 0,
        lane: "demand",
        bytes: w.lane_bytes,
        bytes_per_step: w.timeline.samples().to_vec(),
    };
    Ok((w.hist, report))
}

enum Received {
    /// The socket had no more bytes.
    Drained,
    /// The receive buffer filled up: more may be waiting.
    More,
    /// The source acknowledged completion.
    CompleteAck,
}

struct FaultWorker<'a, 'b> {
    sh: &'a Shared<'b>,
    table: DemandTable,
    hist: Histogram<u64>,
    timeline: Timeline,
    lane_bytes: u64,
    events: Vec<UffdMsg>,
    backlog: VecDeque<Event>,
    requests: Vec<u8>,
    buf: Vec<u8>,
    have: usize,
}

impl FaultWorker<'_, '_> {
    /// Reads and handles pending userfaultfd events until a read comes back short.
    /// True if events may still be waiting (events were queued by an install's
    /// `EAGAIN` handling meanwhile).
    fn read_faults(&mut self) -> Result<bool, EngineError> {
        // Exclusive: no install may run between reading a REMOVE and marking its
        // range (see `RemoveGate`).
        let gate = self.sh.gate;
        let _g = gate.map(|g| g.exclusive());
        while let Some(ev) = self.backlog.pop_front() {
            self.handle(ev)?;
        }
        loop {
            let n = self.sh.uffd.read_events(&mut self.events)?;
            for i in 0..n {
                let ev = self.events[i].parse();
                self.handle(ev)?;
            }
            if n < self.events.len() {
                return Ok(!self.backlog.is_empty());
            }
        }
    }

    fn handle(&mut self, ev: Event) -> Result<(), EngineError> {
        match ev {
            Event::PageFault { addr, .. } => {
                let now = Instant::now();
                Counters::add(&self.sh.counters.faults, 1);
                let addr = usize::try_from(addr).unwrap_or(usize::MAX);
                let inst = self.sh.installer();
                let Some((ri, page)) = inst.locate(addr) else {
                    tracing::warn!("fault at {addr:#x} outside guest memory; ignored");
                    return Ok(());
                };
                let r = self.sh.regions[ri];
                let g = r.first_global + page;
                if self.sh.present.is_set(g) {
                    self.resolve_present(ri, page)?;
                    return Ok(());
                }
                match self.table.fault(g, now) {
                    FaultAction::Request(id) => {
                        let req = DemandRequest {
                            request_id: id,
                            region: r.id,
                            page,
                            before: self.sh.cfg.prefetch_before,
                            after: self.sh.cfg.prefetch_after,
                        };
                        self.requests.extend_from_slice(&encode_demand_frame(&req));
                    }
                    FaultAction::Coalesced => {
                        Counters::add(&self.sh.counters.coalesced_faults, 1);
                    }
                }
            }
            Event::Remove { start, end } => self.removed(start, end),
            Event::Unmap { start, end } => {
                tracing::warn!("guest memory {start:#x}..{end:#x} was unmapped");
            }
            other => tracing::debug!("userfaultfd event ignored: {other:?}"),
        }
        Ok(())
    }

    /// A fault on a page already present: either a stale fault (the page arrived
    /// after the fault was queued; wake the thread) or a page a balloon removed
    /// after it arrived (its content is gone: it reads as zeros from now on).
    fn resolve_present(&mut self, ri: usize, page: u64) -> Result<(), EngineError> {
        Counters::add(&self.sh.counters.stale_faults, 1);
        let r = self.sh.regions[ri];
        let dst = r.base + usize::try_from(page).unwrap_or(0) * r.page_size;
        if r.page_size == 4096 {
            match zero(self.sh.uffd, dst, r.page_size, true)? {
                crate::sys::uffd::Installed::Again { done: 0 } => {
                    // A REMOVE is pending; handle it, then the fault comes back.
                    take_pending(self.sh, &mut self.events, &mut self.backlog)?;
                    self.sh.uffd.wake(dst, r.page_size)?;
                }
                _ => self.sh.uffd.wake(dst, r.page_size)?,
            }
        } else {
            self.sh.uffd.wake(dst, r.page_size)?;
        }
        Ok(())
    }

    /// A balloon (MADV_DONTNEED) dropped `start..end`: see [`mark_removed`].
    fn removed(&mut self, start: u64, end: u64) {
        mark_removed(self.sh, start, end);
        if self.sh.present.all_set() {
            self.sh.notifier.notify();
        }
    }

    fn flush_requests(&mut self, demand: &Stream) -> Result<(), EngineError> {
        if self.requests.is_empty() {
            return Ok(());
        }
        send_pieces(demand.as_fd(), &[Piece::Bytes(&self.requests)])
            .map_err(|e| EngineError::io("sending demand requests", e))?;
        self.requests.clear();
        Ok(())
    }

    /// Receives whatever the demand lane has and handles every whole frame.
    fn receive(&mut self, demand: &Stream) -> Result<Received, EngineError> {
        let mut more = false;
        loop {
            if self.have == self.buf.len() {
                let grow = self.buf.len();
                self.buf.resize(grow * 2, 0);
            }
            match recv_nonblocking(demand.as_fd(), &mut self.buf[self.have..])
                .map_err(|e| EngineError::io("reading the demand lane", e))?
            {
                None => break,
                Some(0) => {
                    return Err(EngineError::ConnectionLost {
                        lane: "demand",
                        channel: 0,
                    })
                }
                Some(n) => {
                    let room = self.buf.len() - self.have;
                    self.have += n;
                    self.lane_bytes += n as u64;
                    Counters::add(&self.sh.counters.wire_bytes, n as u64);
                    self.timeline.record(n as u64);
                    if n < room {
                        break;
                    }
                    more = true;
                }
            }
        }
        let mut used = 0usize;
        let mut ack = false;
        loop {
            let avail = &self.buf[used..self.have];
            if avail.len() < FRAME_HEADER_LEN {
                break;
            }
            let Some((msg, len)) = decode_frame(avail)? else {
                break;
            };
            match msg {
                Message::Pages(h) => {
                    let payload = h.validate(self.sh.layout)?;
                    let payload = usize::try_from(payload)
                        .map_err(|_| EngineError::Protocol("payload too large".into()))?;
                    if avail.len() < len + payload {
                        if len + payload > self.buf.len() {
                            self.buf.resize(len + payload, 0);
                        }
                        break;
                    }
                    let start = used + len;
                    self.install_reply(&h, start, payload)?;
                    used += len + payload;
                }
                Message::CompleteAck => {
                    used += len;
                    ack = true;
                }
                Message::Error(e) => return Err(peer_error(e)),
                other => {
                    return Err(EngineError::Protocol(format!(
                        "unexpected {:?} on the demand lane",
                        other.kind()
                    )))
                }
            }
        }
        self.buf.copy_within(used..self.have, 0);
        self.have -= used;
        Ok(if ack {
            Received::CompleteAck
        } else if more {
            Received::More
        } else {
            Received::Drained
        })
    }

    fn install_reply(
        &mut self,
        h: &ringfault_proto::PagesHeader,
        start: usize,
        payload: usize,
    ) -> Result<(), EngineError> {
        let sh = self.sh;
        let ri = sh
            .regions
            .iter()
            .position(|r| r.id == h.region)
            .ok_or_else(|| EngineError::Protocol("reply for an unknown region".into()))?;
        let count = u64::from(h.count);
        let inst = sh.installer();
        let backlog = &mut self.backlog;
        let events = &mut self.events;
        let mut on_again = || {
            let _g = sh.gate.map(|g| g.exclusive());
            // A read error resurfaces at the next `read_faults`.
            let _ = take_pending(sh, events, backlog);
        };
        let p = match h.kind {
            PageKind::Data => Payload::Copy(&self.buf[start..start + payload]),
            PageKind::Zero | PageKind::Unpopulated => Payload::Zero,
        };
        let out = inst.install(ri, h.first_page, count, h.kind, p, &mut on_again)?;
        if h.kind == PageKind::Data {
            Counters::add(&sh.counters.demand_pages, out.installed);
        }
        let r = sh.regions[ri];
        let now = Instant::now();
        for i in 0..count {
            let g = r.first_global + h.first_page + i;
            if let Some(times) = self.table.resolved(g) {
                for t in times {
                    record(&mut self.hist, now.duration_since(t));
                }
                if out.installed < count {
                    // Not installed by us: make sure the waiters run again.
                    let dst = r.base + usize::try_from(h.first_page + i).unwrap_or(0) * r.page_size;
                    sh.uffd.wake(dst, r.page_size)?;
                }
            }
        }
        if sh.present.all_set() {
            sh.notifier.notify();
        }
        Ok(())
    }
}

/// Reads the pending events when an ioctl returned `EAGAIN`: marks removed ranges at
/// once (so that no install lands in them after the kernel's zap) and queues every
/// event for the fault loop. The caller holds the `RemoveGate` exclusive, if any.
fn take_pending(
    sh: &Shared<'_>,
    events: &mut [UffdMsg],
    backlog: &mut VecDeque<Event>,
) -> Result<(), EngineError> {
    let n = sh.uffd.read_events(events)?;
    for m in events.iter().take(n) {
        let ev = m.parse();
        if let Event::Remove { start, end } = ev {
            mark_removed(sh, start, end);
        }
        backlog.push_back(ev);
    }
    Ok(())
}

/// A balloon (MADV_DONTNEED) dropped `start..end`: whatever the source still has
/// for those pages is stale. Mark them present so that no lane installs old bytes;
/// a later fault there installs a zero page (`resolve_present`).
fn mark_removed(sh: &Shared<'_>, start: u64, end: u64) {
    for r in sh.regions {
        let lo = usize::try_from(start).unwrap_or(usize::MAX).max(r.base);
        let hi = usize::try_from(end).unwrap_or(0).min(r.base + r.len);
        if lo < hi {
            let first = ((lo - r.base) / r.page_size) as u64;
            let last = (hi - r.base).div_ceil(r.page_size) as u64;
            sh.present.set_range(r.first_global + first, last - first);
        }
    }
}
