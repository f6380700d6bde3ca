//! A bulk lane on the source: claims runs of pages from the session's plan
//! and sends them straight from guest memory, at least `batch_bytes` per
//! io_uring `SENDMSG` (the sender's write size decides loopback throughput:
//! 64 KiB writes reach 1.75 GB/s here, 2 MiB writes 4.6 GB/s). Ahead of the
//! sweep it classifies the next window of memory (`source::scan`). When every
//! page is out it idles, sending a heartbeat now and then so the destination
//! can tell an idle lane from a dead one, until the session ends.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use ringfault_proto::Message;

use super::frames::{Batch, Framer};
use super::scan::scan_next;
use super::session::{Phase, Session, SourceCounters};
use super::Backing;
use crate::error::EngineError;
use crate::sys::affinity::{place_current_thread, SchedClass};
use crate::sys::ring::{Event, Piece, Ring};
use crate::wire::{seal_control, Framed};

/// Runs one bulk lane until the session ends or the lane's epoch is over.
pub fn run(sess: &Session<'_>, link: Framed, epoch: u32, align: bool) -> Result<(), EngineError> {
    let lane = link.lane;
    let cores = crate::sys::affinity::online_cores().max(1);
    place_current_thread(
        "source bulk lane",
        sess.cfg.pin_workers,
        // Lane k on core k-1: on one host (a benchmark) the destination's bulk
        // worker of lane k is on core k, so the two ends of a lane do not
        // share a core; the demand lane's threads are on core 0.
        usize::from(lane.channel.saturating_sub(1)) % cores,
        sess.cfg.prioritize_demand.then_some(SchedClass::Batch),
    );
    let Framed {
        stream,
        mut sealer,
        opener: _,
        lane,
    } = link;
    let mut ring = Ring::new(16)?;
    let mem = match sess.backing {
        Backing::Memory(m) => Some(m.clone()),
        Backing::File(_) => None,
    };
    let framer = Framer {
        backing: sess.backing,
        space: &sess.space,
        frame_pages: sess.cfg.frame_pages,
        align,
        lane,
    };
    let ps_min = sess
        .space
        .spans()
        .iter()
        .map(|s| s.page_size)
        .min()
        .unwrap_or(4096);
    let batch_pages = (sess.cfg.batch_bytes / ps_min).max(1) as u64;
    let mut batch = Batch::default();
    let mut stream_pos = 0u64;
    let mut events = Vec::with_capacity(4);
    let mut last_tx = Instant::now();
    let beat = (sess.cfg.liveness / 4).max(Duration::from_millis(100));
    // Wait for the switch-over.
    loop {
        if sess.stale(epoch) {
            return Ok(());
        }
        match sess.wait(epoch, beat) {
            Phase::Waiting => continue,
            _ => break,
        }
    }
    // Pre-copy: the first frame after the switch-over is its marker, on the
    // session's first connections (a resume happens in post-copy only: its
    // connections carry no marker).
    let mut marker_due = sess.cfg.precopy.is_some() && epoch == 0;
    loop {
        let phase = sess.phase();
        if sess.stale(epoch) || phase == Phase::Released {
            return Ok(());
        }
        batch.clear();
        // Acquire: pairs with the demand lane's Release store at Complete.
        let completing = sess.completing.load(std::sync::atomic::Ordering::Acquire);
        // Pre-copy frames travel on the first bulk lane only: a page sent
        // again in a later round must reach the destination after its earlier
        // copy, and only one lane keeps that order (the destination reads its
        // lanes in parallel). The other lanes wait for the switch-over.
        let precopy_elsewhere = phase == Phase::PreCopy && lane.channel != 1;
        // Counted busy from the claim until its send completed, so that a
        // pre-copy round ends only when its pages are on the wire.
        let mut claim =
            (!completing && !precopy_elsewhere && sess.begin_claim()).then(|| ClaimGuard(sess));
        // The phase after the claim: the switch-over moves to `Open` before it
        // lets pushers claim again, so a claim made after the switch-over
        // sees `Open` here and its pages follow the marker (a pre-copy frame
        // the destination reads after its marker would be lost to the
        // discard list).
        if marker_due && sess.phase() == Phase::Open {
            let start = batch.buf.len();
            Message::Phase(ringfault_proto::Phase {
                kind: ringfault_proto::PhaseKind::SwitchOver,
                round: 0,
                pages: 0,
            })
            .encode(&mut batch.buf);
            let mut frame = batch.buf.split_off(start);
            seal_control(&mut sealer, &mut frame, lane)?;
            stream_pos += frame.len() as u64;
            batch.buf.extend_from_slice(&frame);
            batch.pieces.push(Piece::Own {
                start,
                end: batch.buf.len(),
            });
            marker_due = false;
        }
        if claim.is_some() {
            if sess.plan.needs_scan() {
                for chunk in scan_next(sess)? {
                    let start = batch.buf.len();
                    Message::ZeroRanges(chunk).encode(&mut batch.buf);
                    let mut frame = batch.buf.split_off(start);
                    seal_control(&mut sealer, &mut frame, lane)?;
                    stream_pos += frame.len() as u64;
                    batch.buf.extend_from_slice(&frame);
                    batch.pieces.push(Piece::Own {
                        start,
                        end: batch.buf.len(),
                    });
                }
            }
            let mut lap = crate::stats::Lap::start();
            let runs = sess.plan.next_batch(batch_pages);
            lap.lap(&sess.counters.stage_claim_ns);
            let t = Instant::now();
            for r in &runs {
                framer.append(
                    &mut batch,
                    &mut sealer,
                    r.region,
                    r.first,
                    r.count,
                    0,
                    &mut stream_pos,
                    &sess.counters,
                    false,
                )?;
            }
            lap.lap(&sess.counters.stage_classify_ns);
            if !runs.is_empty() {
                SourceCounters::add(
                    &sess.counters.scan_ns,
                    u64::try_from(t.elapsed().as_nanos()).unwrap_or(0),
                );
            }
        }
        if batch.is_empty() {
            claim = None;
            if !completing && !precopy_elsewhere && !sess.pushers_held() && sess.plan.needs_scan() {
                continue;
            }
            if last_tx.elapsed() >= beat {
                let start = batch.buf.len();
                Message::Heartbeat.encode(&mut batch.buf);
                let mut frame = batch.buf.split_off(start);
                seal_control(&mut sealer, &mut frame, lane)?;
                stream_pos += frame.len() as u64;
                batch.buf.extend_from_slice(&frame);
                batch.pieces.push(Piece::Own {
                    start,
                    end: batch.buf.len(),
                });
            } else {
                sess.idle(beat - last_tx.elapsed());
                continue;
            }
        }
        let wire = batch.buf.len() as u64
            + batch
                .pieces
                .iter()
                .map(|p| match p {
                    Piece::Guest { len, .. } => *len as u64,
                    Piece::Own { .. } => 0,
                })
                .sum::<u64>();
        let buf = std::mem::take(&mut batch.buf);
        let mut lap = crate::stats::Lap::start();
        ring.send_vectored(stream.as_fd(), mem.as_ref(), buf, &batch.pieces, 1)?;
        // One send in flight per socket: its bytes must not interleave with
        // the next batch's.
        let returned = loop {
            ring.submit_and_wait(Some(sess.cfg.liveness))?;
            events.clear();
            ring.events(&mut events)?;
            if let Some(pos) = events.iter().position(|e| matches!(e, Event::Sent { .. })) {
                if let Event::Sent { result, buf, .. } = events.swap_remove(pos) {
                    break result.map(|_| buf);
                }
            }
            if sess.stale(epoch) {
                ring.cancel_all()?;
            }
        };
        lap.lap(&sess.counters.stage_send_ns);
        match returned {
            Ok(b) => batch.buf = b,
            Err(e) => {
                if sess.stale(epoch) || sess.phase() == Phase::Released {
                    return Ok(());
                }
                return Err(if crate::error::link_lost(&e) {
                    EngineError::ConnectionLost { lane }
                } else {
                    EngineError::io(format!("sending on the {lane}"), e)
                });
            }
        }
        SourceCounters::add(&sess.counters.wire_bytes, wire);
        claim = None;
        last_tx = Instant::now();
    }
}

/// A pusher's claim, counted until dropped (see `Session::begin_claim`).
struct ClaimGuard<'s, 'a>(&'s Session<'a>);

impl Drop for ClaimGuard<'_, '_> {
    fn drop(&mut self) {
        self.0.end_claim();
    }
}
