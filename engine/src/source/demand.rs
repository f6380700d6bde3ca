//! The demand lane on the source: answers each demand request at once with the
//! faulting page, straight from guest memory, and queues the request's prefetch
//! window for the pushers. It also carries the end of the session: `Complete`
//! from the destination, our `CompleteAck`, then `Release`.
//!
//! The thread polls its socket for `cfg.spin` after the last request before it
//! sleeps in `poll(2)`: a wake-up across cores costs about 64 µs on this machine.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ringfault_proto::{decode_frame, ErrorCode, Message};

use super::pusher::{count_frames, frames_for_run, send_frames};
use super::{Session, SourceCounters};
use crate::addr::Stream;
use crate::conn::{peer_error, send_error, send_message};
use crate::error::EngineError;
use crate::schedule::prefetch_window;
use crate::sys::affinity::SchedClass;
use crate::sys::guest::{recv_nonblocking, wait_readable};

/// `SCHED_FIFO` priority of the source's demand thread: above every ordinary
/// thread, below the kernel's own realtime threads, and one above the destination's
/// fault worker, so that when both share a core (a benchmark on one host) a request
/// preempts the fault worker that sent it and is answered before it even sleeps.
pub const DEMAND_PRIORITY: i32 = 11;

/// Serves the demand lane until `Release`.
pub(super) fn run(s: &Session<'_>, mut stream: Stream) -> Result<(), EngineError> {
    crate::sys::affinity::place_current_thread(
        "source demand lane",
        s.cfg.pin_workers,
        0,
        s.cfg
            .prioritize_demand
            .then_some(SchedClass::Realtime(DEMAND_PRIORITY)),
    );
    stream
        .set_nonblocking(true)
        .map_err(|e| EngineError::io("making the demand lane non-blocking", e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    let mut frames = Vec::new();
    let mut last_active = Instant::now();
    let mut released = false;
    let mut drained = false;
    while !released {
        if drained && last_active.elapsed() >= s.cfg.spin {
            // The last receive came back short: sleep at once instead of spending a
            // system call to find the socket empty.
            wait_readable(&[stream.as_fd()], 100)
                .map_err(|e| EngineError::io("waiting on the demand lane", e))?;
        }
        if buf.len() == have {
            return Err(EngineError::Protocol(
                "a frame on the demand lane is larger than any demand frame".into(),
            ));
        }
        let room = buf.len() - have;
        let got = recv_nonblocking(stream.as_fd(), &mut buf[have..])
            .map_err(|e| EngineError::io("reading the demand lane", e))?;
        match got {
            Some(0) => {
                return Err(EngineError::ConnectionLost {
                    lane: "demand",
                    channel: 0,
                })
            }
            Some(n) => {
                have += n;
                drained = n < room;
                last_active = Instant::now();
            }
            None => {
                drained = true;
                if last_active.elapsed() < s.cfg.spin {
                    std::hint::spin_loop();
                }
                continue;
            }
        }
        let mut used = 0usize;
        while let Some((msg, len)) = decode_frame(&buf[used..have])? {
            used += len;
            match msg {
                Message::Demand(req) => {
                    req.validate(s.layout)?;
                    SourceCounters::add(&s.counters.demand_requests, 1);
                    let Some(region) = s.plan.space().index_of(req.region) else {
                        return Err(EngineError::Protocol("demand for an unknown region".into()));
                    };
                    frames.clear();
                    frames_for_run(s, region, req.page, 1, 1, req.request_id, &mut frames);
                    let n = send_frames(s, &stream, &frames, None)
                        .map_err(|e| EngineError::io("answering a demand request", e))?;
                    SourceCounters::add(&s.counters.wire_bytes, n as u64);
                    count_frames(&s.counters, &frames, true);
                    s.plan.mark_sent(region, req.page, 1);
                    let pages = s.plan.space().span(region).map_or(0, |x| x.pages);
                    let (first, count) = prefetch_window(req.page, pages, req.before, req.after);
                    s.plan.hint(region, first, count);
                }
                Message::Complete(c) => {
                    let total = s.plan.space().total();
                    if c.pages_present != total {
                        let why = format!(
                            "Complete says {} pages present, the layout has {total}",
                            c.pages_present
                        );
                        send_error(&mut stream, ErrorCode::Protocol, why.clone());
                        return Err(EngineError::Protocol(why));
                    }
                    // Release: pushers stop sending before we acknowledge.
                    s.completing.store(true, Ordering::Release);
                    send_message(&mut stream, &Message::CompleteAck)?;
                }
                Message::Release => {
                    released = true;
                    break;
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
        buf.copy_within(used..have, 0);
        have -= used;
    }
    // Release: the session is over; pushers and the accept loop stop.
    s.done.store(true, Ordering::Release);
    Ok(())
}
