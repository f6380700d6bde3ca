//! The demand lane on the source: answers each demand request at once with
//! the faulting pages, straight from guest memory, and queues each request's
//! prefetch window for the bulk lanes; a window that is one whole aligned
//! 2 MiB range none of whose pages went out yet is sent here instead, in one
//! frame, which the destination installs as one huge page (design.md, "Whole
//! huge pages"). It also carries the end of the
//! session (`Complete`, our `CompleteAck`, with `VERIFY` our `Digests` of
//! every page, then `Release`), each step accepted only in its state.
//!
//! One thread, one ring: a multishot receive of requests into a small stream
//! ring, and replies of a whole loop turn gathered into one `SENDMSG` (one in
//! flight at a time). The thread runs `SCHED_FIFO` when demand is
//! prioritized, so a request preempts bulk work at once.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use std::io::Write;

use ringfault_proto::{Digests, ErrorFrame, Message, MsgKind};

use super::frames::{Batch, Framer};
use super::session::{Phase, Session, SourceCounters};
use super::Backing;
use crate::destination::inbound::{Got, Inbound};
use crate::error::EngineError;
use crate::schedule::prefetch_window;
use crate::sys::affinity::{place_current_thread, SchedClass};
use crate::sys::bufring::StreamRing;
use crate::sys::ring::{Event, Ring};
use crate::verify;
use crate::wire::{peer_error, seal_control, Framed};

/// `SCHED_FIFO` priority of the source's demand lane: above every ordinary
/// thread, one above the destination's fault loop, so that when both share a
/// core (a benchmark on one host) a request preempts the fault loop that sent
/// it and is answered before that one even sleeps.
pub const DEMAND_PRIORITY: i32 = 11;

/// How a demand lane ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The destination released the source.
    Released,
    /// A resume replaced this lane.
    Superseded,
    /// The session failed on another lane; the destination was told why.
    Aborted,
}

const TOKEN_RECV: u32 = 1;
const TOKEN_SEND: u32 = 2;

/// Serves the demand lane until `Release`, a newer epoch, or an error;
/// when the session verifies (`Session::verify`), sends the digests of
/// every page after `CompleteAck`.
pub fn run(
    sess: &Session<'_>,
    link: Framed,
    epoch: u32,
    started: Instant,
    switch: &super::session::SwitchOver<'_>,
) -> Result<End, EngineError> {
    let cpu0 = crate::stats::thread_cpu_ns();
    // Acquire: set before this thread was spawned.
    let verify = sess.verify.load(std::sync::atomic::Ordering::Acquire);
    let r = serve(sess, link, epoch, started, switch, verify);
    SourceCounters::add(
        &sess.counters.demand_cpu_ns,
        crate::stats::thread_cpu_ns().saturating_sub(cpu0),
    );
    r
}

/// Where the digests sent after `CompleteAck` have got to: the region's
/// index in the layout and its next group.
#[derive(Debug, Clone, Copy)]
struct DigestCursor {
    region: usize,
    group: u64,
}

/// How long a demand lane whose link broke still reads what arrived, for the
/// peer's reason.
const LOST_GRACE: Duration = Duration::from_millis(200);

/// The runs to send for a demand window that is one whole aligned 2 MiB range
/// of a 4 KiB region of guest memory, none of whose pages went out yet
/// (claimed here, so no pusher sends them too). `None`: any other window,
/// which is served as before (the faulting page here, the rest hinted to the
/// bulk lanes).
fn whole_window(
    sess: &Session,
    ri: usize,
    span: &crate::space::RegionSpan,
    first: u64,
    count: u64,
) -> Option<Vec<crate::schedule::Run>> {
    let per = span.pages_per_huge();
    if per <= 1 || count != per || !first.is_multiple_of(per) {
        return None;
    }
    if !matches!(sess.backing, Backing::Memory(_)) {
        return None;
    }
    // Never-populated pages go out as ranges, once the scan has found them:
    // a window the scan has not reached yet is sent whole only if it has
    // none (one page-map query of its 2 MiB).
    if span.first + first + count > sess.plan.scanned() {
        let mut guard = sess.scanner.try_lock().ok()?;
        if guard.is_none() {
            *guard = crate::sys::pagemap::Scanner::new().ok();
        }
        let scanner = guard.as_mut()?;
        let (start, end) = (span.addr_of(first), span.addr_of(first + count));
        let ranges = scanner
            .scan(start, end, crate::sys::pagemap::Query::Populated)
            .ok()?;
        let populated: usize = ranges.iter().map(|r| r.end - r.start).sum();
        if populated != end - start {
            return None;
        }
    }
    sess.plan.claim_window(ri, first, count)
}

/// The next `Digests` frame from `at` on, and the cursor after it (`None`:
/// that was the last).
fn next_digests(
    sess: &Session<'_>,
    at: DigestCursor,
) -> Result<(Digests, Option<DigestCursor>), EngineError> {
    let desc =
        sess.layout.regions.get(at.region).ok_or_else(|| {
            EngineError::Internal(format!("digests of region index {}", at.region))
        })?;
    let pages = desc.page_count();
    let page_size = usize::try_from(desc.page_size.bytes())
        .map_err(|_| EngineError::Internal("page size".into()))?;
    let groups = verify::groups_in(pages, verify::PAGES_PER_DIGEST);
    let n = (groups - at.group).min(verify::DIGESTS_PER_FRAME as u64);
    let mut read = |p: u64, buf: &mut [u8]| -> Result<(), EngineError> {
        let off = usize::try_from(p)
            .ok()
            .and_then(|p| p.checked_mul(page_size))
            .ok_or_else(|| EngineError::Internal(format!("page {p} offset")))?;
        match sess.backing {
            Backing::Memory(m) => {
                let r = m.by_id(desc.id).ok_or_else(|| {
                    EngineError::Internal(format!("no memory of region {}", desc.id))
                })?;
                Ok(r.read(off, buf)?)
            }
            Backing::File(f) => f.read_page(at.region, off, buf),
        }
    };
    let digests = verify::digests_of(
        pages,
        page_size,
        verify::PAGES_PER_DIGEST,
        at.group,
        usize::try_from(n).unwrap_or(usize::MAX),
        &mut read,
    )?;
    let frame = Digests {
        region: desc.id,
        pages_per_digest: verify::PAGES_PER_DIGEST,
        first_page: at.group * u64::from(verify::PAGES_PER_DIGEST),
        digests,
    };
    let next = if at.group + n < groups {
        Some(DigestCursor {
            region: at.region,
            group: at.group + n,
        })
    } else if at.region + 1 < sess.layout.regions.len() {
        Some(DigestCursor {
            region: at.region + 1,
            group: 0,
        })
    } else {
        None
    };
    Ok((frame, next))
}

fn serve(
    sess: &Session<'_>,
    link: Framed,
    epoch: u32,
    started: Instant,
    switch: &super::session::SwitchOver<'_>,
    verify: bool,
) -> Result<End, EngineError> {
    place_current_thread(
        "source demand lane",
        sess.cfg.pin_workers,
        0,
        sess.cfg
            .prioritize_demand
            .then_some(SchedClass::Realtime(DEMAND_PRIORITY)),
    );
    let mut link = link;
    if let Some(mut log) = sess.dirty_log.lock().ok().and_then(|mut g| g.take()) {
        // Pre-copy: the rounds and the switch-over run here, on the thread
        // that owns this lane's sequence numbers.
        let rep = super::precopy::run(sess, &mut link, log.as_mut(), epoch, switch);
        log.stop();
        let rep = rep?;
        if let Ok(mut g) = sess.precopy.lock() {
            *g = Some(rep);
        }
    }
    let Framed {
        stream,
        mut sealer,
        opener,
        lane,
    } = link;
    let mut ring = Ring::new(64)?;
    let mut inbound = Inbound::new(
        lane,
        stream,
        &mut ring,
        StreamRing::new(64 << 10, 8, false)?,
        opener,
        TOKEN_RECV,
        started,
    )?;
    let mem = match sess.backing {
        Backing::Memory(m) => Some(m.clone()),
        Backing::File(_) => None,
    };
    let framer = Framer {
        backing: sess.backing,
        space: &sess.space,
        frame_pages: sess.cfg.frame_pages,
        align: false,
        lane,
    };
    let total = sess.space.total();
    let beat = (sess.cfg.liveness / 4).max(Duration::from_millis(100));
    let mut out = Batch::default();
    let mut spare: Vec<u8> = Vec::new();
    let mut in_flight = false;
    let mut pos = 0u64;
    let mut released = false;
    // Digests still to send after CompleteAck (with `verify`).
    let mut digests: Option<DigestCursor> = None;
    let mut last_tx = Instant::now();
    let mut events = Vec::with_capacity(64);
    // The link broke (a send or the receive failed), and when: the frames
    // already received are still read, because the peer's `Error` may be
    // among them (a destination that stops sends its reason, then closes,
    // and its close can reset a send of ours before we read the reason).
    let mut lost: Option<(EngineError, Instant)> = None;
    let mut recv_over = false;
    loop {
        events.clear();
        ring.events(&mut events)?;
        let now = Instant::now();
        for ev in events.drain(..) {
            match ev {
                Event::Sent { result, buf, .. } => {
                    in_flight = false;
                    spare = buf;
                    if let Err(e) = result {
                        if sess.stale(epoch) {
                            return Ok(End::Superseded);
                        }
                        if !crate::error::link_lost(&e) {
                            return Err(EngineError::io(format!("answering on the {lane}"), e));
                        }
                        lost.get_or_insert((EngineError::ConnectionLost { lane }, now));
                    }
                }
                ev => {
                    if let Err(e) = inbound.on_event(&mut ring, &ev, now, &sess.counters.rx_bytes) {
                        if sess.stale(epoch) {
                            return Ok(End::Superseded);
                        }
                        if !e.is_link_loss() {
                            return Err(e);
                        }
                        recv_over = true;
                        lost.get_or_insert((e, now));
                    }
                }
            }
        }
        if sess.stale(epoch) {
            return Ok(End::Superseded);
        }
        loop {
            let r = inbound.next(&mut ring, sess.layout, |got| -> Result<(), EngineError> {
                let msg = match got {
                    Got::Control(m) => m,
                    Got::Pages(..) => {
                        return Err(EngineError::Unexpected {
                            lane,
                            kind: MsgKind::Pages,
                            state: "from a destination",
                        })
                    }
                };
                match msg {
                    Message::Demand(req) => {
                        req.validate(sess.layout)
                            .map_err(|source| EngineError::validation(lane, source))?;
                        if sess.phase() != Phase::Open {
                            return Err(EngineError::Unexpected {
                                lane,
                                kind: MsgKind::Demand,
                                state: "after Complete",
                            });
                        }
                        SourceCounters::add(&sess.counters.demand_requests, 1);
                        SourceCounters::add(
                            &sess.counters.demand_entries,
                            req.entries.len() as u64,
                        );
                        for e in &req.entries {
                            let ri = sess.space.index_of(e.region).ok_or_else(|| {
                                EngineError::Internal("validated region vanished".into())
                            })?;
                            let span = sess.space.span(ri).copied().ok_or_else(|| {
                                EngineError::Internal("validated region vanished".into())
                            })?;
                            let (first, count) =
                                prefetch_window(e.page, span.pages, e.before, e.after);
                            if let Some(runs) = whole_window(sess, ri, &span, first, count) {
                                // A whole 2 MiB range the destination installs as
                                // one huge page: sent here, in one frame.
                                let mut covered = false;
                                for r in &runs {
                                    covered |= (r.first..r.first + r.count).contains(&e.page);
                                    framer.append(
                                        &mut out,
                                        &mut sealer,
                                        ri,
                                        r.first,
                                        r.count,
                                        req.request_id,
                                        &mut pos,
                                        &sess.counters,
                                        true,
                                    )?;
                                }
                                if covered {
                                    continue;
                                }
                            }
                            framer.append(
                                &mut out,
                                &mut sealer,
                                ri,
                                e.page,
                                1,
                                req.request_id,
                                &mut pos,
                                &sess.counters,
                                true,
                            )?;
                            sess.plan.mark_sent_in(ri, e.page, 1);
                            if count > 1 {
                                sess.plan.hint(ri, first, count);
                            }
                        }
                        sess.notify();
                    }
                    Message::Complete(c) => {
                        if c.pages_present != total {
                            return Err(EngineError::Unexpected {
                                lane,
                                kind: MsgKind::Complete,
                                state: "with a page count other than the layout's",
                            });
                        }
                        sess.transition(&[Phase::Open], Phase::Completing)
                            .map_err(|_| EngineError::Unexpected {
                                lane,
                                kind: MsgKind::Complete,
                                state: "twice",
                            })?;
                        // Release: pushers stop sending before we acknowledge.
                        sess.completing
                            .store(true, std::sync::atomic::Ordering::Release);
                        sess.notify();
                        let start = out.buf.len();
                        Message::CompleteAck.encode(&mut out.buf);
                        let mut frame = out.buf.split_off(start);
                        seal_control(&mut sealer, &mut frame, lane)?;
                        out.buf.extend_from_slice(&frame);
                        out.pieces.push(crate::sys::ring::Piece::Own {
                            start,
                            end: out.buf.len(),
                        });
                        if verify && !sess.layout.regions.is_empty() {
                            digests = Some(DigestCursor {
                                region: 0,
                                group: 0,
                            });
                        }
                    }
                    Message::Release => {
                        if digests.is_some() {
                            return Err(EngineError::Unexpected {
                                lane,
                                kind: MsgKind::Release,
                                state: "before the last Digests frame was sent",
                            });
                        }
                        sess.transition(&[Phase::Completing], Phase::Released)
                            .map_err(|_| EngineError::Unexpected {
                                lane,
                                kind: MsgKind::Release,
                                state: "before CompleteAck",
                            })?;
                        released = true;
                    }
                    Message::Heartbeat => {}
                    Message::Error(e) => return Err(peer_error(e)),
                    other => {
                        return Err(EngineError::Unexpected {
                            lane,
                            kind: other.kind(),
                            state: "on the demand lane outside a resume",
                        })
                    }
                }
                Ok(())
            });
            match r {
                Ok(Some(())) => {}
                Ok(None) => break,
                Err(e) => {
                    if !e.is_link_loss() {
                        // Tell the destination why, best effort, then close.
                        let last = LastWords {
                            ring: &mut ring,
                            inbound: &inbound,
                            mem: mem.as_ref(),
                            sealer: &mut sealer,
                            lane,
                        };
                        last.say(
                            in_flight,
                            &mut out,
                            std::mem::take(&mut spare),
                            ErrorFrame::new(e.code(), e.to_string()),
                        );
                    }
                    return Err(e);
                }
            }
        }
        if released && !in_flight && out.is_empty() {
            return Ok(End::Released);
        }
        if let Some((e, at)) = lost.take() {
            // Every frame received is read (an `Error` among them was
            // returned above): the link is lost once the receive is over
            // too, or after a moment.
            if recv_over || inbound.eof || now.saturating_duration_since(at) > LOST_GRACE {
                return Err(e);
            }
            lost = Some((e, at));
            ring.submit_and_wait(Some(LOST_GRACE / 4))?;
            continue;
        }
        if inbound.drained(&ring) {
            return Err(EngineError::ConnectionLost { lane });
        }
        let silent = now.saturating_duration_since(inbound.last_rx);
        if silent > sess.cfg.liveness {
            return Err(EngineError::Silent {
                lane,
                silent_s: silent.as_secs_f64(),
            });
        }
        if let (Some(at), false, true) = (digests, in_flight, out.is_empty()) {
            // One frame per turn: requests and the peer's frames are read
            // between two.
            let (frame, next) = next_digests(sess, at)?;
            let start = out.buf.len();
            Message::Digests(frame).encode(&mut out.buf);
            let mut frame = out.buf.split_off(start);
            seal_control(&mut sealer, &mut frame, lane)?;
            out.buf.extend_from_slice(&frame);
            out.pieces.push(crate::sys::ring::Piece::Own {
                start,
                end: out.buf.len(),
            });
            digests = next;
        }
        if !in_flight && out.is_empty() {
            if let Some(why) = sess.fatal.lock().ok().and_then(|g| g.clone()) {
                // Every frame sealed so far is out: the Error is next in
                // sequence, and the destination stops instead of resuming.
                let mut frame = Message::Error(why).to_vec();
                if seal_control(&mut sealer, &mut frame, lane).is_ok() {
                    if let Ok(mut s) = inbound.sock.try_clone() {
                        let _ = s.write_all(&frame);
                    }
                }
                return Ok(End::Aborted);
            }
        }
        if !in_flight && out.is_empty() && now.saturating_duration_since(last_tx) > beat {
            let start = out.buf.len();
            Message::Heartbeat.encode(&mut out.buf);
            let mut frame = out.buf.split_off(start);
            seal_control(&mut sealer, &mut frame, lane)?;
            out.buf.extend_from_slice(&frame);
            out.pieces.push(crate::sys::ring::Piece::Own {
                start,
                end: out.buf.len(),
            });
        }
        if !in_flight && !out.is_empty() {
            let buf = std::mem::replace(&mut out.buf, std::mem::take(&mut spare));
            let wire = out.wire_bytes.max(buf.len() as u64);
            ring.send_vectored(
                inbound.sock.as_fd(),
                mem.as_ref(),
                buf,
                &out.pieces,
                TOKEN_SEND,
            )?;
            SourceCounters::add(&sess.counters.wire_bytes, wire);
            out.clear();
            in_flight = true;
            last_tx = now;
            ring.submit()?;
            continue;
        }
        ring.submit_and_wait(Some(beat))?;
    }
}

/// What a demand lane needs to send its last frame.
struct LastWords<'a> {
    ring: &'a mut Ring,
    inbound: &'a Inbound,
    mem: Option<&'a std::sync::Arc<crate::sys::guest::GuestMemory>>,
    sealer: &'a mut ringfault_proto::Sealer,
    lane: crate::error::LaneId,
}

impl LastWords<'_> {
    /// Sends `why` as an `Error` frame, best effort, within about a second.
    /// Its tag takes the next sequence number, so it must follow on the wire
    /// every frame sealed before it: the send in flight completes and the
    /// batch still queued (`out`) goes out first. Written straight away
    /// instead, it could overtake them, and the destination would report a
    /// failed integrity check instead of the reason.
    fn say(self, mut in_flight: bool, out: &mut Batch, mut spare: Vec<u8>, why: ErrorFrame) {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut events = Vec::new();
        while in_flight || !out.is_empty() {
            if Instant::now() > deadline {
                return;
            }
            if !in_flight {
                let buf = std::mem::replace(&mut out.buf, std::mem::take(&mut spare));
                if self
                    .ring
                    .send_vectored(
                        self.inbound.sock.as_fd(),
                        self.mem,
                        buf,
                        &out.pieces,
                        TOKEN_SEND,
                    )
                    .is_err()
                {
                    return;
                }
                out.clear();
                in_flight = true;
            }
            if self
                .ring
                .submit_and_wait(Some(Duration::from_millis(100)))
                .is_err()
            {
                return;
            }
            events.clear();
            if self.ring.events(&mut events).is_err() {
                return;
            }
            for ev in events.drain(..) {
                if let Event::Sent { result, buf, .. } = ev {
                    if result.is_err() {
                        return;
                    }
                    in_flight = false;
                    spare = buf;
                }
            }
        }
        let mut frame = Message::Error(why).to_vec();
        if seal_control(self.sealer, &mut frame, self.lane).is_ok() {
            if let Ok(mut s) = self.inbound.sock.try_clone() {
                let _ = s.write_all(&frame);
            }
        }
    }
}
