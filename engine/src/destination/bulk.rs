//! A bulk lane on the destination: background pages and known-zero ranges,
//! received into the lane's stream ring and installed from there.
//!
//! A [`BulkLane`] is driven either by a bulk worker ([`run_worker`], one
//! thread, one ring, one core per lane) or by the fault loop itself, which
//! then hosts it in its own ring (see `remote`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ringfault_proto::{Layout, Message, PageKind, Phase};

use super::inbound::{Got, Inbound};
use super::install::Installer;
use super::pages::Work;
use crate::error::{EngineError, LaneId};
use crate::stats::{ChannelReport, Counters};
use crate::sys::affinity::{place_current_thread, SchedClass};
use crate::sys::bufring::StreamRing;
use crate::sys::ring::{Event, Ring};
use crate::wire::{peer_error, Framed};

/// One bulk lane's receiving state.
#[derive(Debug)]
pub struct BulkLane {
    /// Frames arriving on this lane.
    pub inbound: Inbound,
    /// Pages installed from this lane.
    pub pages: u64,
    /// Phase markers received (pre-copy).
    pub phases: Vec<Phase>,
}

impl BulkLane {
    /// Wraps an established connection.
    pub fn new(
        link: Framed,
        ring: &mut Ring,
        buf: StreamRing,
        token: u32,
        started: Instant,
    ) -> Result<BulkLane, EngineError> {
        let lane = link.lane;
        let inbound = Inbound::new(lane, link.stream, ring, buf, link.opener, token, started)?;
        Ok(BulkLane {
            inbound,
            pages: 0,
            phases: Vec::new(),
        })
    }

    /// Installs whole frames until about `budget` payload bytes were handled
    /// or none is left. `Busy` when frames may remain.
    pub fn process(
        &mut self,
        ring: &mut Ring,
        inst: &Installer,
        layout: &Layout,
        budget: usize,
    ) -> Result<Work, EngineError> {
        let lane = self.inbound.lane;
        let mut used = 0usize;
        loop {
            let mut pages = 0u64;
            let before = self.inbound.verify_ns;
            let r = self
                .inbound
                .next(ring, layout, |got| handle(inst, lane, got, &mut pages))?;
            Counters::add(
                &inst.counters.stage_verify_ns,
                self.inbound.verify_ns - before,
            );
            let Some(frame) = r else {
                return Ok(Work::Idle);
            };
            self.pages += pages;
            match frame {
                Handled::Bytes(n) => used += n,
                Handled::Phase(p) => self.phases.push(p),
            }
            if used >= budget {
                return Ok(Work::Busy);
            }
        }
    }

    /// The lane's report.
    pub fn report(&self, ring: &Ring) -> ChannelReport {
        let s = self.inbound.posted_stats(ring);
        ChannelReport {
            channel: self.inbound.lane.channel,
            lane: self.inbound.lane.lane,
            bytes: self.inbound.bytes,
            frames: self.inbound.frames,
            bytes_per_step: self.inbound.timeline.samples().to_vec(),
            recv_in_flight_min: s.min,
            recv_in_flight_mean: if s.samples == 0 {
                0.0
            } else {
                crate::stats::ratio(s.sum, s.samples)
            },
        }
    }
}

pub(super) enum Handled {
    Bytes(usize),
    Phase(Phase),
}

pub(super) fn handle(
    inst: &Installer,
    lane: LaneId,
    got: Got<'_>,
    pages: &mut u64,
) -> Result<Handled, EngineError> {
    match got {
        Got::Pages(h, payload) => {
            let ri = inst.space.index_of(h.region).ok_or_else(|| {
                EngineError::Internal(format!("validated region {} vanished", h.region))
            })?;
            if let Some(g) = inst.precopy.get().filter(|g| g.active()) {
                // Pre-copy: straight into memory, which is not registered yet.
                let mut lap = crate::stats::Lap::start();
                *pages += g.write(inst, ri, h.first_page, u64::from(h.count), h.kind, payload)?;
                lap.lap(&inst.counters.stage_install_ns);
                return Ok(Handled::Bytes(usize::try_from(h.payload_len).unwrap_or(0)));
            }
            let mut lap = crate::stats::Lap::start();
            let out = inst.install(ri, h.first_page, u64::from(h.count), h.kind, payload)?;
            lap.lap(&inst.counters.stage_install_ns);
            if h.kind == PageKind::Data {
                Counters::add(&inst.counters.bulk_pages, out.installed);
            }
            *pages += out.installed;
            Ok(Handled::Bytes(usize::try_from(h.payload_len).unwrap_or(0)))
        }
        Got::Control(Message::ZeroRanges(chunk)) => {
            let layout_ok = inst.space.index_of(chunk.region);
            let Some(ri) = layout_ok else {
                return Err(EngineError::Decode {
                    lane,
                    source: ringfault_proto::DecodeError::UnknownRegion {
                        region: chunk.region,
                    },
                });
            };
            let span = inst.space.spans()[ri];
            if chunk.first_page.saturating_add(chunk.page_count) > span.pages {
                return Err(EngineError::Decode {
                    lane,
                    source: ringfault_proto::DecodeError::PageOutOfRange {
                        region: chunk.region,
                        page: chunk.first_page,
                        count: chunk.page_count,
                        region_pages: span.pages,
                    },
                });
            }
            for (first, count) in chunk.set_ranges() {
                inst.mark_zero(ri, first, count);
            }
            Ok(Handled::Bytes(0))
        }
        Got::Control(Message::Heartbeat) => Ok(Handled::Bytes(0)),
        Got::Control(Message::Phase(p)) => {
            if p.kind == ringfault_proto::PhaseKind::SwitchOver {
                match inst.precopy.get() {
                    Some(g) if g.active() => g.arrive_and_wait(lane)?,
                    _ => {
                        return Err(EngineError::Unexpected {
                            lane,
                            kind: ringfault_proto::MsgKind::Phase,
                            state: "outside pre-copy",
                        })
                    }
                }
            }
            Ok(Handled::Phase(p))
        }
        Got::Control(Message::Error(e)) => Err(peer_error(e)),
        Got::Control(other) => Err(EngineError::Unexpected {
            lane,
            kind: other.kind(),
            state: "on a bulk lane",
        }),
    }
}

/// How a bulk worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Pin to this core.
    pub core: Option<usize>,
    /// Scheduling class.
    pub class: Option<SchedClass>,
    /// Payload bytes installed between two looks at the ring.
    pub budget: usize,
    /// A lane silent this long is dead.
    pub liveness: Duration,
}

impl WorkerConfig {
    /// Pins the calling worker thread and sets its class, as configured.
    pub(super) fn place_current(&self) {
        place_current_thread(
            "bulk worker",
            self.core.is_some(),
            self.core.unwrap_or(0),
            self.class,
        );
    }
}

/// A bulk lane's receiving half, as a bulk worker drives it: through a
/// stream ring ([`BulkLane`]) or into landings
/// ([`super::direct::Direct`]).
pub(super) trait LaneRx {
    /// Handles this turn's completions (`events`, which it may drain), then
    /// installs what they completed, about `budget` payload bytes at most.
    /// `Busy` when more may be ready without waiting.
    fn turn(
        &mut self,
        ring: &mut Ring,
        events: &mut Vec<Event>,
        inst: &Installer,
        layout: &Layout,
        budget: usize,
        now: Instant,
    ) -> Result<Work, EngineError>;

    /// The peer closed the lane and nothing more will come.
    fn drained(&self, ring: &Ring) -> bool;

    /// How long the lane has been silent, if longer than `limit`.
    fn silent_beyond(&self, now: Instant, limit: Duration) -> Option<Duration>;

    /// The lane's report.
    fn report(&self, ring: &Ring) -> ChannelReport;
}

impl LaneRx for BulkLane {
    fn turn(
        &mut self,
        ring: &mut Ring,
        events: &mut Vec<Event>,
        inst: &Installer,
        layout: &Layout,
        budget: usize,
        now: Instant,
    ) -> Result<Work, EngineError> {
        for ev in events.iter() {
            if let Event::Received { .. } | Event::ReceiveEnded { .. } = ev {
                self.inbound
                    .on_event(ring, ev, now, &inst.counters.wire_bytes)?;
            }
        }
        self.process(ring, inst, layout, budget)
    }

    fn drained(&self, ring: &Ring) -> bool {
        self.inbound.drained(ring)
    }

    fn silent_beyond(&self, now: Instant, limit: Duration) -> Option<Duration> {
        let silent = now.saturating_duration_since(self.inbound.last_rx);
        (silent > limit).then_some(silent)
    }

    fn report(&self, ring: &Ring) -> ChannelReport {
        BulkLane::report(self, ring)
    }
}

/// Runs one bulk lane on this thread until its connection ends. A clean end
/// (the peer closed after `finished` was set) gives the lane's report.
pub fn run_worker(
    inst: &Installer,
    layout: &Layout,
    link: Framed,
    buf: StreamRing,
    cfg: &WorkerConfig,
    finished: &AtomicBool,
    started: Instant,
) -> Result<ChannelReport, EngineError> {
    let lane = link.lane;
    cfg.place_current();
    let mut ring = Ring::deferred(64)?;
    let mut bulk = BulkLane::new(link, &mut ring, buf, 1, started)?;
    drive(&mut bulk, &mut ring, lane, inst, layout, cfg, finished)
}

/// Drives `rx`, bulk lane `lane`, in `ring` until its connection ends: one
/// submission per turn, a wait when nothing is ready. An error, or the end
/// of the lane, after `finished` was set gives the lane's report; before,
/// the error, `ConnectionLost`, or `Silent` after `liveness` without a byte.
pub(super) fn drive(
    rx: &mut impl LaneRx,
    ring: &mut Ring,
    lane: LaneId,
    inst: &Installer,
    layout: &Layout,
    cfg: &WorkerConfig,
    finished: &AtomicBool,
) -> Result<ChannelReport, EngineError> {
    let mut events = Vec::with_capacity(64);
    let mut lap = crate::stats::Lap::start();
    loop {
        events.clear();
        ring.events(&mut events)?;
        let now = Instant::now();
        let work = match rx.turn(ring, &mut events, inst, layout, cfg.budget, now) {
            Ok(w) => w,
            // Acquire: pairs with the Release store after completion.
            Err(_) if finished.load(Ordering::Acquire) => return Ok(rx.report(ring)),
            Err(e) => return Err(e),
        };
        if rx.drained(ring) {
            // Acquire: as above.
            if finished.load(Ordering::Acquire) {
                return Ok(rx.report(ring));
            }
            return Err(EngineError::ConnectionLost { lane });
        }
        if let Some(silent) = rx.silent_beyond(now, cfg.liveness) {
            // Acquire: as above.
            if !finished.load(Ordering::Acquire) {
                return Err(EngineError::Silent {
                    lane,
                    silent_s: silent.as_secs_f64(),
                });
            }
        }
        lap.skip();
        if work == Work::Busy {
            ring.submit()?;
        } else {
            ring.submit_and_wait(Some(cfg.liveness / 4))?;
        }
        lap.lap(&inst.counters.stage_receive_ns);
    }
}
