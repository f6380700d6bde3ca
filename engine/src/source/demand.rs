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

use ringfault_proto::{decode_frame, Message};

use super::pusher::{count_frames, frames_for_run, send_frames};
use super::{Session, SourceCounters};
use crate::addr::Stream;
use crate::conn::{peer_error, send_message};
use crate::error::EngineError;
use crate::schedule::prefetch_window;
use crate::sys::guest::{recv_nonblocking, wait_readable};

/// Serves the demand lane until `Release`.
pub(super) fn run(s: &Session<'_>, mut stream: Stream) -> Result<(), EngineError> {
    if s.cfg.pin_workers {
        let _ = crate::sys::affinity::pin_current_thread(0);
    }
    stream
        .set_nonblocking(true)
        .map_err(|e| EngineError::io("making the demand lane non-blocking", e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    let mut frames = Vec::new();
    let mut last_active = Instant::now();
    let mut released = false;
    while !released {
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
                last_active = Instant::now();
            }
            None => {
                if last_active.elapsed() < s.cfg.spin {
                    std::hint::spin_loop();
                } else {
                    wait_readable(&[stream.as_fd()], 100)
                        .map_err(|e| EngineError::io("waiting on the demand lane", e))?;
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
                    let n = send_frames(s, &stream, &frames)
                        .map_err(|e| EngineError::io("answering a demand request", e))?;
                    SourceCounters::add(&s.counters.wire_bytes, n as u64);
                    count_frames(&s.counters, &frames, true);
                    s.plan.mark_sent(region, req.page, 1);
                    let pages = s.plan.space().span(region).map_or(0, |x| x.pages);
                    let (first, count) = prefetch_window(req.page, pages, req.before, req.after);
                    s.plan.hint(region, first, count);
                }
                Message::Complete(c) => {
                    tracing::debug!("destination reports {} pages present", c.pages_present);
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
