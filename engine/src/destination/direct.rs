//! A bulk lane whose pages are received straight into the memory they are
//! installed from, with no copy in user space.
//!
//! # Mechanism
//! The lane asks for aligned payloads (`LANE_ALIGN_PAYLOAD`): every `Data`
//! payload of at least 64 KiB ([`INLINE_LIMIT`]) starts on a 4 KiB boundary
//! of the lane's byte stream and is a whole number of 4 KiB pages, so
//! whatever lies between two such payloads (the previous frame's tag,
//! control frames, small frames, the next frame's header, body and pad)
//! ends on a 4 KiB boundary. The worker receives those bytes in *blocks*:
//! receives that stop at the stream's next 4 KiB boundary, or at the end of
//! a frame whose length it already knows, so that they never take bytes of
//! a payload. Once the bytes it has end exactly with the head of a `Data`
//! frame, it receives that frame's payload, exactly its length
//! (`MSG_WAITALL`), into a [`Landing`]:
//! - a 2 MiB huge landing when the frame is one whole aligned 2 MiB range
//!   none of whose pages is present: the kernel's socket copy is the only
//!   copy, and `UFFDIO_MOVE` hands the landing's huge page to guest memory
//!   as one PMD (the stream-ring path copies those 2 MiB once more, into a
//!   huge-page stage);
//! - a flat landing otherwise, installed with `UFFDIO_COPY` from there.
//!
//! A small payload the source left unaligned arrives inside the blocks and
//! is installed from there. The receive of the block after a payload is
//! linked behind it (`IOSQE_IO_LINK`, so the two fill in stream order), and
//! both are queued before the frame before them is checked and installed:
//! while the worker installs, the kernel has the next block to fetch, and the
//! next payload too when its head had already arrived (the lane report's
//! receives in flight, sampled at each install: 1 or 2). A frame's tag
//! arrives with the block after its payload; the payload is checked against
//! it before any of it is installed.
//!
//! # Hazards
//! - A payload of 64 KiB or more that begins inside a block means the peer
//!   ignored the alignment the lane asked for: [`EngineError::Misaligned`]. A payload longer than [`MAX_PAYLOAD`]:
//!   [`EngineError::FrameTooLarge`].
//! - `MSG_WAITALL` receives report nothing until they are complete, so a
//!   payload in flight on a slow link says nothing of the link's health:
//!   silence is judged by the socket ([`Stream::silent_for`]) too, not only by the
//!   last completion.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ringfault_proto::{
    FrameHeader, Layout, Message, Opener, PageKind, PagesHeader, FRAME_HEADER_LEN,
};

use super::bulk::{drive, handle, LaneRx, WorkerConfig};
use super::inbound::{pad_and_payload, Got};
use super::install::{Installer, Payload};
use super::pages::Work;
use crate::addr::Stream;
use crate::error::{EngineError, LaneId};
use crate::stats::{ChannelReport, Counters, Timeline};
use crate::sys::install::Landing;
use crate::sys::ring::{Event, Ring};
use crate::wire::Framed;

/// Bytes of one block receive: the alignment unit of the lane's payloads.
pub const BLOCK: usize = 4096;

/// `Data` payloads below this size may be taken in with the blocks around
/// them rather than landed on their own: a source aligns every payload of at
/// least this size (`ringfault_proto::ALIGN_MIN_PAYLOAD`), and may leave
/// smaller ones where they fall.
pub const INLINE_LIMIT: usize = ringfault_proto::ALIGN_MIN_PAYLOAD as usize;

/// Bytes of the block landing: room for the largest frame taken in blocks
/// (a control frame's largest body, or a head, its pad and an inline
/// payload, with a tag).
const BLOCK_LANDING: usize = 192 << 10;

/// A whole frame in the received blocks.
#[derive(Debug)]
struct Whole {
    msg: Message,
    begin: usize,
    head_end: usize,
    end: usize,
    payload: usize,
}

/// Largest payload one frame may carry on a direct lane (the stream ring's
/// capacity on a stream lane, 32 segments of 256 KiB).
pub const MAX_PAYLOAD: usize = 8 << 20;

/// Landings of each kind kept for reuse.
const SPARE: usize = 3;

const TOKEN_PAYLOAD: u32 = 1;
const TOKEN_BLOCK: u32 = 2;

/// A `Data` frame whose payload is on its way.
#[derive(Debug)]
struct Expect {
    header: PagesHeader,
    /// Header, body and pad: what the tag covers besides the payload.
    head: Vec<u8>,
    len: usize,
}

/// One bulk lane received into landings.
#[derive(Debug)]
pub struct Direct {
    lane: LaneId,
    sock: Stream,
    opener: Opener,
    /// Block bytes received and not yet handled.
    pending: Vec<u8>,
    /// The block landing, when no block receive is in flight.
    block: Option<Landing>,
    /// Receives in the kernel.
    in_flight: usize,
    huge: Vec<Landing>,
    flat: Vec<Landing>,
    /// The frame whose payload receive is in flight.
    expect: Option<Expect>,
    /// A payload in, waiting for its tag (in the next block).
    landed: Option<(Expect, Landing)>,
    /// Bytes of the stream before `pending`.
    consumed: u64,
    eof: bool,
    bytes: u64,
    frames: u64,
    last_rx: Instant,
    timeline: Timeline,
    in_flight_min: usize,
    in_flight_sum: u64,
    samples: u64,
}

impl Direct {
    /// Takes over an established lane and queues its first block receive.
    pub fn new(link: Framed, ring: &mut Ring, started: Instant) -> Result<Direct, EngineError> {
        let mut d = Direct {
            lane: link.lane,
            sock: link.stream,
            opener: link.opener,
            pending: Vec::with_capacity(2 * BLOCK),
            block: Some(Landing::flat(BLOCK_LANDING)?),
            in_flight: 0,
            huge: Vec::new(),
            flat: Vec::new(),
            expect: None,
            landed: None,
            consumed: 0,
            eof: false,
            bytes: 0,
            frames: 0,
            last_rx: Instant::now(),
            timeline: Timeline::new(started),
            in_flight_min: usize::MAX,
            in_flight_sum: 0,
            samples: 0,
        };
        d.want_block(ring, 0, 0)?;
        Ok(d)
    }

    /// Queues a receive of the bytes after `pending` and `after_payload`
    /// more, if none is in flight: up to the stream's next 4 KiB boundary
    /// (no aligned payload starts before it), or the `need` bytes the frame
    /// at the end of `pending` still lacks, whichever is more. Neither can
    /// take bytes of a payload that is to land.
    fn want_block(
        &mut self,
        ring: &mut Ring,
        after_payload: usize,
        need: usize,
    ) -> Result<(), EngineError> {
        if let Some(b) = self.block.take() {
            let end = self.consumed + (self.pending.len() + after_payload) as u64;
            let to_boundary = BLOCK - usize::try_from(end % BLOCK as u64).unwrap_or(0);
            let len = to_boundary.max(need);
            if len > b.len() {
                self.block = Some(b);
                return Err(EngineError::FrameTooLarge {
                    lane: self.lane,
                    len: self.pending.len() + need,
                    max: BLOCK_LANDING,
                });
            }
            ring.recv_into(self.sock.as_fd(), b, 0, len, TOKEN_BLOCK, false, false)?;
            self.in_flight += 1;
        }
        Ok(())
    }

    /// Handles one completion of this lane's ring.
    pub fn on_event(
        &mut self,
        ring: &mut Ring,
        ev: Event,
        inst: &Installer,
        layout: &Layout,
        now: Instant,
    ) -> Result<(), EngineError> {
        let Event::Landed {
            token,
            result,
            land,
        } = ev
        else {
            return Ok(());
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        let n = match result {
            Ok(n) => n,
            // A linked block receive after a payload that ended short.
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                self.eof = true;
                0
            }
            Err(e) => {
                self.eof = true;
                if crate::error::link_lost(&e) {
                    return Err(EngineError::ConnectionLost { lane: self.lane });
                }
                return Err(EngineError::io(
                    format!("receiving on the {}", self.lane),
                    e,
                ));
            }
        };
        if n > 0 {
            // Relaxed: a statistic.
            inst.counters
                .wire_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            self.bytes += n as u64;
            self.timeline.record(n as u64);
            self.last_rx = now;
        }
        match token {
            TOKEN_PAYLOAD => {
                let ex = self.expect.take().ok_or_else(|| {
                    EngineError::Internal("a payload landed that nobody expected".into())
                })?;
                if n < ex.len {
                    // The peer closed mid-payload.
                    self.eof = true;
                    self.recycle(land);
                    return Err(EngineError::ConnectionLost { lane: self.lane });
                }
                self.landed = Some((ex, land));
                // Installed as soon as its tag is in: at once without tags
                // (`--integrity none`), otherwise when the block after it
                // brings the tag (this call then finds nothing to do).
                self.advance(ring, inst, layout)
            }
            _ => {
                self.pending.extend_from_slice(&land.as_slice()[..n]);
                self.block = Some(land);
                if n == 0 {
                    self.eof = true;
                }
                self.advance(ring, inst, layout)
            }
        }
    }

    /// A landing for a payload of `len` bytes of `h`.
    fn landing_for(
        &mut self,
        inst: &Installer,
        h: &PagesHeader,
        len: usize,
    ) -> Result<Landing, EngineError> {
        let whole = len == Landing::HUGE
            && h.kind == PageKind::Data
            && inst.precopy.get().is_none_or(|g| !g.active())
            && inst.space.index_of(h.region).is_some_and(|ri| {
                inst.huge.get().is_some_and(|k| {
                    k.whole_at(ri, h.first_page, u64::from(h.count))
                        && inst.space.spans().get(ri).is_some_and(|s| {
                            inst.present
                                .count_range(s.first + h.first_page, u64::from(h.count))
                                == 0
                        })
                })
            });
        if whole {
            return match self.huge.pop() {
                Some(l) => Ok(l),
                None => Ok(Landing::huge()?),
            };
        }
        match self.flat.iter().position(|l| l.len() >= len) {
            Some(i) => Ok(self.flat.swap_remove(i)),
            None => Ok(Landing::flat(len.max(Landing::HUGE))?),
        }
    }

    fn recycle(&mut self, land: Landing) {
        let spare = if land.is_huge() {
            &mut self.huge
        } else {
            &mut self.flat
        };
        if spare.len() < SPARE {
            spare.push(land);
        }
    }

    /// Handles what the blocks received so far hold: queues the next
    /// payload's receive (and the block after it) first, then checks and
    /// installs the landed frame, then every whole frame up to that payload.
    fn advance(
        &mut self,
        ring: &mut Ring,
        inst: &Installer,
        layout: &Layout,
    ) -> Result<(), EngineError> {
        let lane = self.lane;
        let tl = self.opener.tag_len();
        let len = self.pending.len();
        let start = if self.landed.is_some() {
            tl.min(len)
        } else {
            0
        };
        // Whole frames after the landed one's tag, up to the next payload to
        // land; and how many more bytes the frame after them needs.
        let mut whole: Vec<Whole> = Vec::new();
        let mut next: Option<(PagesHeader, usize, usize, usize)> = None;
        let mut need = if self.landed.is_some() { tl - start } else { 0 };
        let mut at = start;
        while need == 0 {
            if len < at + FRAME_HEADER_LEN {
                need = at + FRAME_HEADER_LEN - len;
                break;
            }
            let mut hdr = [0u8; FRAME_HEADER_LEN];
            hdr.copy_from_slice(&self.pending[at..at + FRAME_HEADER_LEN]);
            let header =
                FrameHeader::parse(&hdr).map_err(|source| EngineError::Decode { lane, source })?;
            let body_end = at + FRAME_HEADER_LEN + header.body_len_usize();
            if body_end > len {
                need = body_end - len;
                break;
            }
            let msg = Message::decode(&header, &self.pending[at + FRAME_HEADER_LEN..body_end])
                .map_err(|source| EngineError::Decode { lane, source })?;
            let (pad, payload) = pad_and_payload(&msg, layout, lane)?;
            let head_end = body_end + pad;
            if payload > 0 && head_end >= len {
                if head_end > len {
                    need = head_end - len;
                    break;
                }
                // The head ends where the bytes received end: the payload
                // is received on its own, into a landing.
                if payload > MAX_PAYLOAD {
                    return Err(EngineError::FrameTooLarge {
                        lane,
                        len: payload,
                        max: MAX_PAYLOAD,
                    });
                }
                if let Message::Pages(h) = msg {
                    next = Some((h, at, head_end, payload));
                }
                break;
            }
            if payload >= INLINE_LIMIT {
                // Its payload began inside a block: the peer did not align
                // it, and it is too large to take in blocks.
                return Err(EngineError::Misaligned {
                    lane,
                    at: self.consumed + head_end as u64,
                });
            }
            let end = head_end + payload + tl;
            if end > len {
                need = end - len;
                break;
            }
            whole.push(Whole {
                msg,
                begin: at,
                head_end,
                end,
                payload,
            });
            at = end;
        }
        // The next bytes, queued before anything is checked or installed.
        if let Some((h, hs, he, plen)) = &next {
            let land = self.landing_for(inst, h, *plen)?;
            ring.recv_into(self.sock.as_fd(), land, 0, *plen, TOKEN_PAYLOAD, true, true)?;
            self.in_flight += 1;
            self.expect = Some(Expect {
                header: *h,
                head: self.pending[*hs..*he].to_vec(),
                len: *plen,
            });
            // The block after the payload: from the end of `pending`
            // (which ends with this head) plus the payload.
            self.want_block(ring, *plen, 0)?;
        } else if !self.eof {
            self.want_block(ring, 0, need)?;
        }
        if self.landed.is_some() && len >= tl {
            if let Some((ex, mut land)) = self.landed.take() {
                self.in_flight_min = self.in_flight_min.min(self.in_flight);
                self.in_flight_sum += self.in_flight as u64;
                self.samples += 1;
                let t0 = crate::stats::thread_cpu_ns();
                let checked = self.opener.open_detached(
                    &ex.head,
                    &land.as_slice()[..ex.len],
                    &self.pending[..tl],
                );
                Counters::add(
                    &inst.counters.stage_verify_ns,
                    crate::stats::thread_cpu_ns().saturating_sub(t0),
                );
                checked.map_err(|source| EngineError::Integrity { lane, source })?;
                let r = self.install(inst, ex.header, &mut land, ex.len);
                self.recycle(land);
                r?;
            }
        }
        for w in whole {
            let (head, rest) = self.pending[w.begin..w.end].split_at_mut(w.head_end - w.begin);
            let t0 = crate::stats::thread_cpu_ns();
            let checked = self.opener.open(head, rest);
            if w.payload > 0 {
                Counters::add(
                    &inst.counters.stage_verify_ns,
                    crate::stats::thread_cpu_ns().saturating_sub(t0),
                );
            }
            checked.map_err(|source| EngineError::Integrity { lane, source })?;
            let got = match w.msg {
                Message::Pages(h) if w.payload > 0 => {
                    Got::Pages(h, Payload::Bytes(&rest[..w.payload]))
                }
                Message::Pages(h) => Got::Pages(h, Payload::Zero),
                m => Got::Control(m),
            };
            self.frames += 1;
            // Phase markers matter only at the switch-over barrier, which
            // `handle` waits at; the pages were counted by the installer.
            let mut pages = 0;
            handle(inst, lane, got, &mut pages)?;
        }
        let used = match (&next, &self.landed) {
            // Its tag is not complete yet: nothing was handled.
            (_, Some(_)) => 0,
            (Some((_, _, he, _)), None) => *he,
            (None, None) => at,
        };
        self.pending.drain(..used);
        self.consumed += used as u64;
        Ok(())
    }

    fn install(
        &mut self,
        inst: &Installer,
        h: PagesHeader,
        land: &mut Landing,
        len: usize,
    ) -> Result<(), EngineError> {
        let mut pages = 0;
        let precopy = inst.precopy.get().is_some_and(|g| g.active());
        let payload = if precopy {
            Payload::Bytes(&land.as_slice()[..len])
        } else {
            Payload::Landed(land)
        };
        handle(inst, self.lane, Got::Pages(h, payload), &mut pages)?;
        self.frames += 1;
        Ok(())
    }
}

impl LaneRx for Direct {
    fn turn(
        &mut self,
        ring: &mut Ring,
        events: &mut Vec<Event>,
        inst: &Installer,
        layout: &Layout,
        _budget: usize,
        now: Instant,
    ) -> Result<Work, EngineError> {
        // Each completion is handled, and what it completes installed, as it
        // comes: nothing is left for a later turn.
        for ev in events.drain(..) {
            self.on_event(ring, ev, inst, layout, now)?;
        }
        Ok(Work::Idle)
    }

    /// The peer closed the lane and nothing is in flight any more: nothing
    /// more will come. (A frame cut short may remain: only a lane the session
    /// no longer needs ends cleanly.)
    fn drained(&self, _ring: &Ring) -> bool {
        self.eof && self.in_flight == 0
    }

    /// No completed receive for longer than `limit`, and the socket got no
    /// bytes either (a payload receive in flight reports nothing until it is
    /// complete).
    fn silent_beyond(&self, now: Instant, limit: Duration) -> Option<Duration> {
        let ours = now.saturating_duration_since(self.last_rx);
        if ours <= limit {
            return None;
        }
        let silent = match self.sock.silent_for() {
            Some(kernel) => ours.min(kernel),
            None => ours,
        };
        (silent > limit).then_some(silent)
    }

    fn report(&self, _ring: &Ring) -> ChannelReport {
        ChannelReport {
            channel: self.lane.channel,
            lane: self.lane.lane,
            bytes: self.bytes,
            frames: self.frames,
            bytes_per_step: self.timeline.samples().to_vec(),
            recv_in_flight_min: if self.samples == 0 {
                self.in_flight
            } else {
                self.in_flight_min
            },
            recv_in_flight_mean: if self.samples == 0 {
                0.0
            } else {
                crate::stats::ratio(self.in_flight_sum, self.samples)
            },
        }
    }
}

/// Runs one bulk lane received into landings on this thread until its
/// connection ends. A clean end (the peer closed after `finished` was set)
/// gives the lane's report.
pub fn run_worker(
    inst: &Installer,
    layout: &Layout,
    link: Framed,
    cfg: &WorkerConfig,
    finished: &AtomicBool,
    started: Instant,
) -> Result<ChannelReport, EngineError> {
    let lane = link.lane;
    cfg.place_current();
    let mut ring = Ring::deferred(16)?;
    let mut rx = Direct::new(link, &mut ring, started)?;
    drive(&mut rx, &mut ring, lane, inst, layout, cfg, finished)
}
