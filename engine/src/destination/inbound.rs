//! The receiving half of one lane: a multishot receive into a stream ring,
//! and frames parsed, checked and handed on where they landed.
//!
//! # Mechanism
//! The lane's socket has one multishot `RECV` armed into its stream ring
//! (`sys::bufring`): while the consumer installs one frame, the kernel keeps
//! filling the segments after it ([`Inbound::in_flight`] of them at least).
//! [`Inbound::next`] parses the frame at the ring's read position in place:
//! header, body (validated against the layout before any length is trusted),
//! pad, payload, tag. Only once the whole frame is there and its tag checks
//! out is it handed to the caller, who installs the pages straight from the
//! ring (`UFFDIO_COPY` from the frame's payload, or `UFFDIO_MOVE` out of a
//! private ring); then the frame's bytes are consumed and the segments it
//! spanned go back to the kernel.
//!
//! # Hazards
//! A frame larger than the ring can never complete: refused with
//! [`EngineError::FrameTooLarge`]. In a private (non-mirrored) ring, a frame
//! that wraps is copied into a bounce buffer first.

use std::os::fd::AsFd;
use std::time::Instant;

use ringfault_proto::{
    FrameHeader, Layout, Message, Opener, PageKind, PagesHeader, FRAME_HEADER_LEN,
};

use super::install::Payload;
use crate::addr::Stream;
use crate::error::{EngineError, LaneId};
use crate::stats::Timeline;
use crate::sys::bufring::{PostedStats, StreamRing};
use crate::sys::ring::{Event, Ring, StreamId};

/// One frame, checked.
#[derive(Debug)]
pub enum Got<'a> {
    /// Pages: header and where the payload is.
    Pages(PagesHeader, Payload<'a>),
    /// Any other message.
    Control(Message),
}

/// The receiving half of one lane.
#[derive(Debug)]
pub struct Inbound {
    /// Which lane.
    pub lane: LaneId,
    /// The socket (kept open while the receive is armed).
    pub sock: Stream,
    stream: StreamId,
    opener: Opener,
    token: u32,
    armed: bool,
    /// Move payloads out of the ring instead of copying them.
    moving: bool,
    /// The peer closed the connection.
    pub eof: bool,
    /// Bytes received.
    pub bytes: u64,
    /// Frames handled.
    pub frames: u64,
    /// When the last byte arrived.
    pub last_rx: Instant,
    /// Bytes per 100 ms.
    pub timeline: Timeline,
    /// Thread CPU ns spent checking tags.
    pub verify_ns: u64,
    bounce: Vec<u8>,
}

/// The pad and payload bytes after a decoded frame's body: a `Pages`
/// frame's, once its header checked out against `layout`; none for any other
/// message.
pub(super) fn pad_and_payload(
    msg: &Message,
    layout: &Layout,
    lane: LaneId,
) -> Result<(usize, usize), EngineError> {
    match msg {
        Message::Pages(h) => {
            let p = h
                .validate(layout)
                .map_err(|source| EngineError::validation(lane, source))?;
            Ok((
                usize::from(h.pad_len),
                usize::try_from(p).unwrap_or(usize::MAX),
            ))
        }
        _ => Ok((0, 0)),
    }
}

impl Inbound {
    /// Adds `ring_buf` to `ring` and arms the lane's receive.
    pub fn new(
        lane: LaneId,
        sock: Stream,
        ring: &mut Ring,
        ring_buf: StreamRing,
        opener: Opener,
        token: u32,
        started: Instant,
    ) -> Result<Inbound, EngineError> {
        let moving = !ring_buf.mirrored();
        let stream = ring.add_stream(ring_buf)?;
        let mut i = Inbound {
            lane,
            sock,
            stream,
            opener,
            token,
            armed: false,
            moving,
            eof: false,
            bytes: 0,
            frames: 0,
            last_rx: Instant::now(),
            timeline: Timeline::new(started),
            verify_ns: 0,
            bounce: Vec::new(),
        };
        i.arm(ring)?;
        Ok(i)
    }

    /// The token of this lane's receive.
    pub fn token(&self) -> u32 {
        self.token
    }

    fn arm(&mut self, ring: &mut Ring) -> Result<(), EngineError> {
        if !self.armed && !self.eof {
            ring.recv_multishot(self.sock.as_fd(), self.stream, self.token)?;
            self.armed = true;
        }
        Ok(())
    }

    /// Handles an event of this lane's receive; `wire` counts the bytes.
    pub fn on_event(
        &mut self,
        ring: &mut Ring,
        ev: &Event,
        now: Instant,
        wire: &std::sync::atomic::AtomicU64,
    ) -> Result<(), EngineError> {
        match ev {
            Event::Received { bytes, .. } => {
                // Relaxed: a statistic.
                wire.fetch_add(*bytes as u64, std::sync::atomic::Ordering::Relaxed);
                self.bytes += *bytes as u64;
                self.timeline.record(*bytes as u64);
                self.last_rx = now;
            }
            Event::ReceiveEnded { result, .. } => {
                self.armed = false;
                match result {
                    Ok(true) => self.eof = true,
                    Ok(false) => self.arm(ring)?,
                    // Every segment was full: re-armed once frames are
                    // consumed, or now if the consumer already handed
                    // segments back (it consumed before this event came; a
                    // frame waiting for more bytes would otherwise wait for
                    // good).
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        if ring.stream(self.stream).in_flight() > 0 {
                            self.arm(ring)?;
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => self.eof = true,
                    Err(e) => {
                        if crate::error::link_lost(e) {
                            return Err(EngineError::ConnectionLost { lane: self.lane });
                        }
                        return Err(EngineError::io(
                            format!("receiving on the {}", self.lane),
                            crate::error::copy_io(e),
                        ));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Bytes received and not yet handled.
    pub fn pending(&self, ring: &Ring) -> usize {
        ring.stream(self.stream).available()
    }

    /// Receive buffers the kernel can fill without the consumer.
    pub fn in_flight(&self, ring: &Ring) -> usize {
        ring.stream(self.stream).in_flight()
    }

    /// Receives-in-flight statistics of the lane.
    pub fn posted_stats(&self, ring: &Ring) -> PostedStats {
        ring.stream(self.stream).stats()
    }

    /// Whether the lane is finished: the peer closed it and every byte was handled.
    pub fn drained(&self, ring: &Ring) -> bool {
        self.eof && self.pending(ring) == 0
    }

    /// Hands the next whole, checked frame to `f`, then consumes it. `None`
    /// when no whole frame is there yet.
    pub fn next<R>(
        &mut self,
        ring: &mut Ring,
        layout: &Layout,
        f: impl FnOnce(Got<'_>) -> Result<R, EngineError>,
    ) -> Result<Option<R>, EngineError> {
        let lane = self.lane;
        let sr = ring.stream_mut(self.stream);
        let avail = sr.available();
        if avail < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        if sr.readable().len() >= FRAME_HEADER_LEN {
            hdr.copy_from_slice(&sr.readable()[..FRAME_HEADER_LEN]);
        } else {
            sr.copy_out(&mut hdr);
        }
        let header =
            FrameHeader::parse(&hdr).map_err(|source| EngineError::Decode { lane, source })?;
        let body_end = FRAME_HEADER_LEN + header.body_len_usize();
        if body_end > sr.size() {
            return Err(EngineError::FrameTooLarge {
                lane,
                len: body_end,
                max: sr.size(),
            });
        }
        if avail < body_end {
            return Ok(None);
        }
        let msg = if sr.readable().len() >= body_end {
            Message::decode(&header, &sr.readable()[FRAME_HEADER_LEN..body_end])
        } else {
            self.bounce.resize(body_end, 0);
            sr.copy_out(&mut self.bounce);
            Message::decode(&header, &self.bounce[FRAME_HEADER_LEN..body_end])
        }
        .map_err(|source| EngineError::Decode { lane, source })?;
        let (pad, payload) = pad_and_payload(&msg, layout, lane)?;
        let head_len = body_end + pad;
        let total = head_len
            .saturating_add(payload)
            .saturating_add(self.opener.tag_len());
        if total > sr.size() {
            return Err(EngineError::FrameTooLarge {
                lane,
                len: total,
                max: sr.size(),
            });
        }
        if avail < total {
            return Ok(None);
        }
        let contiguous = sr.readable().len() >= total;
        let timed = payload > 0 && self.opener.tag_len() > 0;
        let t0 = if timed {
            crate::stats::thread_cpu_ns()
        } else {
            0
        };
        let result = if contiguous {
            let frame = &mut sr.readable_mut()[..total];
            let (head, rest) = frame.split_at_mut(head_len);
            self.opener
                .open(head, rest)
                .map_err(|source| EngineError::Integrity { lane, source })?;
            if timed {
                self.verify_ns += crate::stats::thread_cpu_ns().saturating_sub(t0);
            }
            match msg {
                // Moved out only if page-aligned: a source aligns payloads
                // of `ALIGN_MIN_PAYLOAD` and more, smaller ones are copied.
                Message::Pages(h)
                    if h.kind == PageKind::Data
                        && self.moving
                        && (sr.readable().as_ptr() as usize + head_len).is_multiple_of(4096) =>
                {
                    f(Got::Pages(h, Payload::Ring(sr, head_len)))?
                }
                Message::Pages(h) if h.kind == PageKind::Data => {
                    let frame = &sr.readable()[..total];
                    f(Got::Pages(
                        h,
                        Payload::Bytes(&frame[head_len..head_len + payload]),
                    ))?
                }
                Message::Pages(h) => f(Got::Pages(h, Payload::Zero))?,
                m => f(Got::Control(m))?,
            }
        } else {
            self.bounce.resize(total, 0);
            sr.copy_out(&mut self.bounce);
            let (head, rest) = self.bounce.split_at_mut(head_len);
            self.opener
                .open(head, rest)
                .map_err(|source| EngineError::Integrity { lane, source })?;
            match msg {
                Message::Pages(h) if h.kind == PageKind::Data => f(Got::Pages(
                    h,
                    Payload::Bytes(&self.bounce[head_len..head_len + payload]),
                ))?,
                Message::Pages(h) => f(Got::Pages(h, Payload::Zero))?,
                m => f(Got::Control(m))?,
            }
        };
        let sr = ring.stream_mut(self.stream);
        sr.consume(total);
        self.frames += 1;
        if !self.armed {
            self.arm(ring)?;
        }
        Ok(Some(result))
    }
}
