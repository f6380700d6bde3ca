//! Pages from a source host: the [`PageSource`] of a post-copy migration.
//!
//! # Mechanism
//! The demand lane lives in the fault loop's ring: faults of one loop turn
//! go out as one `Demand` frame; replies arrive by a multishot receive into
//! the lane's stream ring and are installed from there. Bulk lanes run on
//! worker threads (`direct::run_worker`, payloads received into landings;
//! `bulk::run_worker` through a stream ring), or the first one in the loop's
//! own ring when configured so. The session ends with `Complete` (every page
//! present), `CompleteAck` (the source sends nothing more), the loop's
//! unregistering, then `Release` (the source may free memory); each step is
//! accepted only in its state.
//!
//! # Resume
//! When a lane breaks (closed, reset, or silent past the liveness timeout),
//! the session is not lost: every lane is closed, every bulk worker joined
//! (so no install runs any more), and a reconnector thread dials the source
//! again with the same session id, sends the present bitmap, waits for
//! `Resumed`, and opens new bulk lanes. Meanwhile the loop keeps reading
//! faults; faulting vCPUs wait, they never get zeros. Pages that were in
//! flight when the link broke are sent again, because the source resets what
//! it counts as sent to the bitmap. After the resume every fault still
//! waiting is requested again. A link that stays down past the resume
//! timeout ends the session with [`EngineError::ResumeTimeout`].

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringfault_proto::auth::PresharedKey;
use ringfault_proto::{
    encode_rle_chunks, Capabilities, Complete, DemandEntry, Digests, ErrorFrame, Lane, Layout,
    Message, MsgKind, PageKind, Protection, SessionId,
};

use super::bulk::{run_worker, BulkLane, WorkerConfig};
use super::inbound::{Got, Inbound};
use super::install::Installer;
use super::outbox::Outbox;
use super::pages::{Cx, Finish, PageSource, Work, TOKEN_SOURCE};
use crate::addr::{PeerAddr, Stream};
use crate::error::{EngineError, LaneId};
use crate::handshake::{destination_handshake, our_capabilities, ChannelId};
use crate::stats::{ChannelReport, Counters};
use crate::sys::bufring::StreamRing;
use crate::sys::ring::Event;
use crate::verify::{self, RegionDigests};
use crate::wire::{peer_error, Framed};

/// Bytes per stream-ring segment.
pub const SEGMENT: usize = 256 << 10;

/// How to reach the source, and the session's fixed parameters.
#[derive(Debug, Clone)]
pub struct Link {
    /// The source's address.
    pub addr: PeerAddr,
    /// The pre-shared key.
    pub key: PresharedKey,
    /// The session id.
    pub session: SessionId,
    /// Frame protection.
    pub protection: Protection,
    /// Its AEAD.
    pub cipher: ringfault_proto::Cipher,
    /// Bulk lanes.
    pub bulk_channels: u16,
    /// Move pages out of private receive rings instead of copying them.
    pub moving: bool,
    /// Bulk workers receive payloads straight into landings
    /// (`destination::direct`) rather than through a stream ring.
    pub direct: bool,
    /// How long to keep retrying a refused connection at the start.
    pub connect_patience: Duration,
    /// Offer `VERIFY`: digests of every page after completion, if the
    /// source sends them.
    pub verify: bool,
}

impl Link {
    fn channel(&self, lane: Lane, channel: u16) -> ChannelId {
        ChannelId {
            lane,
            channel,
            channel_count: self.bulk_channels + 1,
            lane_flags: if (self.moving || self.direct) && lane == Lane::Bulk {
                ringfault_proto::LANE_ALIGN_PAYLOAD
            } else {
                0
            },
        }
    }

    /// Opens and authenticates one lane.
    pub fn open(
        &self,
        lane: Lane,
        channel: u16,
        resume: bool,
        patience: Duration,
        liveness: Duration,
    ) -> Result<(Framed, Layout), EngineError> {
        self.open_flags(lane, channel, resume, patience, liveness)
            .map(|(f, l, _)| (f, l))
    }

    /// [`Link::open`], with the Welcome's flags.
    pub fn open_flags(
        &self,
        lane: Lane,
        channel: u16,
        resume: bool,
        patience: Duration,
        liveness: Duration,
    ) -> Result<(Framed, Layout, u32), EngineError> {
        // An attempt unanswered for the liveness timeout is a dead link
        // (a resume retries it; it must not outlast the resume deadline).
        let stream = self
            .addr
            .connect_within(patience, Some(liveness.max(patience)))?;
        stream
            .set_liveness(liveness)
            .map_err(|e| EngineError::io("setting keepalive on a lane", e))?;
        let l = destination_handshake(
            stream,
            &self.key,
            self.channel(lane, channel),
            self.session,
            resume,
            self.protection,
            self.cipher,
            if self.verify {
                our_capabilities()
            } else {
                Capabilities(our_capabilities().0 & !Capabilities::VERIFY.0)
            },
        )?;
        Ok((l.framed, l.layout, l.flags))
    }

    /// A receive ring for a lane: mirrored, or private when moving pages.
    pub fn ring_for(&self, lane: Lane, largest_page: usize) -> Result<StreamRing, EngineError> {
        let (seg, segs) = match lane {
            // 16 segments: room for a whole 2 MiB range in one frame.
            Lane::Demand => (SEGMENT.max(largest_page + 4096), 16),
            _ => (SEGMENT.max(largest_page + 4096), 32),
        };
        Ok(StreamRing::new(
            seg,
            segs,
            self.moving && lane == Lane::Bulk,
        )?)
    }
}

/// Tuning of the remote page source.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Pages fetched before a faulting page.
    pub prefetch_before: u16,
    /// Pages fetched after a faulting page.
    pub prefetch_after: u16,
    /// Host the first bulk lane in the fault loop's ring instead of a thread.
    pub host_first_bulk: bool,
    /// Bulk workers' placement.
    pub worker: WorkerConfig,
    /// A lane silent this long is dead (and a resume starts).
    pub liveness: Duration,
    /// How long to keep trying to resume a broken link.
    pub resume_timeout: Duration,
    /// Demand pacing: on average at most one request per this interval
    /// (zero: no pacing), after a burst of `demand_burst` requests. Faults
    /// that arrive meanwhile join the next request.
    pub demand_interval: Duration,
    /// Requests allowed back to back before pacing applies.
    pub demand_burst: u32,
    /// The source sends `Digests` after `CompleteAck` (`WELCOME_VERIFY`).
    pub verify: bool,
}

/// How long a fault in a 2 MiB range asked for whole waits for that range
/// before its page is asked for alone (the source sends a range whole only
/// if none of its pages went out yet; otherwise it sends the first faulting
/// page and queues the rest for the bulk lanes).
const WHOLE_WAIT: Duration = Duration::from_millis(20);

/// Ranges asked for whole that are remembered before old ones are dropped.
const WHOLE_TRACKED: usize = 4096;

/// A token bucket for demand requests.
#[derive(Debug)]
struct Pacer {
    interval: Duration,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    fn new(interval: Duration, burst: u32) -> Pacer {
        Pacer {
            interval,
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.interval.is_zero() {
            return;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt / self.interval.as_secs_f64()).min(self.burst);
    }

    /// Takes a token if one is there.
    fn take(&mut self, now: Instant) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token is there.
    fn wait(&self) -> Duration {
        if self.interval.is_zero() || self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        self.interval.mul_f64(1.0 - self.tokens)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    CompleteSent,
    /// `CompleteAck` came; the source's digests are arriving (`verify`).
    Verifying,
    Acked,
    ReleaseQueued,
    Done,
    Reconnecting,
}

struct Worker {
    lane: LaneId,
    /// The lane's socket, once open, to shut it down.
    stop: Arc<Mutex<Option<Stream>>>,
    /// Set by `shutdown`: a lane still opening then is shut as soon as it
    /// is open (else `join` would wait for the whole lane's life).
    halted: Arc<AtomicBool>,
    handle: JoinHandle<Result<ChannelReport, ()>>,
}

impl Worker {
    fn shutdown(&self) {
        if let Ok(s) = self.stop.lock() {
            // Relaxed: written and read under the `stop` lock.
            self.halted.store(true, Ordering::Relaxed);
            if let Some(s) = s.as_ref() {
                s.shutdown();
            }
        }
    }
}

struct DemandLane {
    inbound: Inbound,
    outbox: Outbox,
}

/// New connections from the reconnector.
struct Resumed {
    demand: Framed,
    bulk: Vec<Framed>,
}

/// The remote page source.
pub struct RemotePages {
    link: Link,
    cfg: RemoteConfig,
    layout: Layout,
    inst: Arc<Installer>,
    started: Instant,
    state: State,
    gen: u32,
    demand: Option<DemandLane>,
    first: Option<Framed>,
    hosted: Option<BulkLane>,
    workers: Vec<Worker>,
    failures: Arc<Mutex<Vec<EngineError>>>,
    finished: Arc<AtomicBool>,
    next_request: u64,
    /// Faulting pages not requested yet (pacing).
    queued: Vec<u64>,
    /// 2 MiB ranges asked for whole (region index, first page), and when: a
    /// later fault in one of them waits for it instead of asking again.
    whole: std::collections::HashMap<(usize, u64), Instant>,
    /// Faulting pages waiting for a range asked for whole (global page, when
    /// the range was asked): asked for alone if it has not come within
    /// [`WHOLE_WAIT`].
    parked: Vec<(u64, Instant)>,
    pacer: Pacer,
    refetch: bool,
    reconnect: Option<(mpsc::Receiver<Result<Resumed, EngineError>>, Instant)>,
    reports: Vec<ChannelReport>,
    /// Resumes done.
    pub resumes: u32,
    demand_bytes: u64,
    demand_frames: u64,
    /// The bulk workers were started before the loop (pre-copy).
    spawned_early: bool,
    /// The source's digests so far, region by region (`verify`).
    digests: Vec<RegionDigests>,
    /// When `Complete` went out: every page present.
    pub complete_at: Option<Instant>,
}

impl std::fmt::Debug for RemotePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePages")
            .field("state", &self.state)
            .field("resumes", &self.resumes)
            .finish()
    }
}

impl RemotePages {
    /// A remote page source over an established demand lane; the bulk lanes
    /// are opened when the loop starts, each by its own worker, so that the VM
    /// can resume as soon as the demand lane is up.
    pub fn new(
        link: Link,
        cfg: RemoteConfig,
        layout: Layout,
        inst: Arc<Installer>,
        demand: Framed,
        started: Instant,
    ) -> RemotePages {
        let pacer = Pacer::new(cfg.demand_interval, cfg.demand_burst);
        RemotePages {
            link,
            cfg,
            layout,
            inst,
            started,
            state: State::Running,
            gen: 0,
            demand: None,
            first: Some(demand),
            hosted: None,
            workers: Vec::new(),
            failures: Arc::new(Mutex::new(Vec::new())),
            finished: Arc::new(AtomicBool::new(false)),
            next_request: 1,
            queued: Vec::new(),
            whole: std::collections::HashMap::new(),
            parked: Vec::new(),
            pacer,
            refetch: false,
            reconnect: None,
            reports: Vec::new(),
            resumes: 0,
            demand_bytes: 0,
            demand_frames: 0,
            spawned_early: false,
            digests: Vec::new(),
            complete_at: None,
        }
    }

    /// Pre-copy: starts every bulk worker now, before the loop runs.
    pub fn spawn_bulk_early(&mut self) -> Result<(), EngineError> {
        for ch in 1..=self.link.bulk_channels {
            self.spawn_worker(ch, None)?;
        }
        self.spawned_early = true;
        Ok(())
    }

    /// The demand lane, until the loop starts.
    pub(crate) fn demand_link(&mut self) -> Option<&mut Framed> {
        self.first.as_mut()
    }

    /// Where bulk workers report failures.
    pub(crate) fn failures(&self) -> Arc<Mutex<Vec<EngineError>>> {
        self.failures.clone()
    }

    fn tokens(&self) -> (u32, u32, u32) {
        let base = TOKEN_SOURCE + self.gen * 4;
        (base, base + 1, base + 2)
    }

    /// Per-lane reports (the demand lane first).
    pub fn reports(&self) -> Vec<ChannelReport> {
        self.reports.clone()
    }

    fn attach(
        &mut self,
        cx: &mut Cx<'_>,
        demand: Framed,
        bulk: Vec<Option<Framed>>,
    ) -> Result<(), EngineError> {
        let (t_recv, t_send, t_hosted) = self.tokens();
        let largest = self.inst.space.largest_page();
        let Framed {
            stream,
            sealer,
            opener,
            lane,
        } = demand;
        let inbound = Inbound::new(
            lane,
            stream,
            cx.ring,
            self.link.ring_for(Lane::Demand, largest)?,
            opener,
            t_recv,
            self.started,
        )?;
        self.demand = Some(DemandLane {
            inbound,
            outbox: Outbox::new(lane, sealer, t_send),
        });
        let mut bulk = bulk.into_iter().enumerate();
        if self.cfg.host_first_bulk {
            if let Some((_, first)) = bulk.next() {
                let first = match first {
                    Some(f) => f,
                    None => self.open_bulk(1)?,
                };
                let buf = self.link.ring_for(Lane::Bulk, largest)?;
                self.hosted = Some(BulkLane::new(first, cx.ring, buf, t_hosted, self.started)?);
            }
        }
        if !std::mem::take(&mut self.spawned_early) {
            for (i, b) in bulk {
                let ch = u16::try_from(i + 1).unwrap_or(u16::MAX);
                self.spawn_worker(ch, b)?;
            }
        }
        Ok(())
    }

    fn open_bulk(&self, ch: u16) -> Result<Framed, EngineError> {
        let (b, l) = self.link.open(
            Lane::Bulk,
            ch,
            false,
            self.link.connect_patience,
            self.cfg.liveness,
        )?;
        if l != self.layout {
            return Err(EngineError::LayoutMismatch(format!(
                "bulk lane {ch} announced another layout than the demand lane"
            )));
        }
        Ok(b)
    }

    /// Starts the worker of bulk lane `ch`; it opens the lane itself unless
    /// `link` is given.
    fn spawn_worker(&mut self, ch: u16, link: Option<Framed>) -> Result<(), EngineError> {
        let lane = LaneId::bulk(ch);
        let (link, stop) = match link {
            Some(l) => {
                let stop = l
                    .stream
                    .try_clone()
                    .map_err(|e| EngineError::io("cloning a bulk lane's socket", e))?;
                (Some(l), Some(stop))
            }
            None => (None, None),
        };
        let stop = Arc::new(Mutex::new(stop));
        let stop_w = stop.clone();
        let halted = Arc::new(AtomicBool::new(false));
        let halted_w = halted.clone();
        let opener = self.link.clone();
        let liveness = self.cfg.liveness;
        let direct = self.link.direct;
        let buf = if direct {
            None
        } else {
            Some(
                self.link
                    .ring_for(Lane::Bulk, self.inst.space.largest_page())?,
            )
        };
        let inst = self.inst.clone();
        let layout = self.layout.clone();
        let mut wcfg = self.cfg.worker.clone();
        let cores = crate::sys::affinity::online_cores().max(1);
        if wcfg.core.is_some() {
            wcfg.core = Some(usize::from(lane.channel) % cores);
        }
        let finished = self.finished.clone();
        let failures = self.failures.clone();
        let started = self.started;
        let handle = std::thread::Builder::new()
            .name(format!("rf-bulk{}", lane.channel))
            .spawn(move || {
                let r = (|| {
                    let link = match link {
                        Some(l) => l,
                        None => {
                            let (l, got) = opener.open(
                                Lane::Bulk,
                                ch,
                                false,
                                opener.connect_patience,
                                liveness,
                            )?;
                            if got != layout {
                                return Err(EngineError::LayoutMismatch(format!(
                                    "bulk lane {ch} announced another layout than the demand lane"
                                )));
                            }
                            if let (Ok(mut s), Ok(c)) = (stop_w.lock(), l.stream.try_clone()) {
                                // Relaxed: under the `stop` lock, as in `Worker::shutdown`.
                                if halted_w.load(Ordering::Relaxed) {
                                    c.shutdown();
                                }
                                *s = Some(c);
                            }
                            l
                        }
                    };
                    match buf {
                        Some(buf) => {
                            run_worker(&inst, &layout, link, buf, &wcfg, &finished, started)
                        }
                        None => super::direct::run_worker(
                            &inst, &layout, link, &wcfg, &finished, started,
                        ),
                    }
                })();
                match r {
                    Ok(r) => Ok(r),
                    Err(e) => {
                        if let Ok(mut f) = failures.lock() {
                            f.push(e);
                        }
                        inst.notifier.notify();
                        Err(())
                    }
                }
            })
            .map_err(|e| EngineError::io("starting a bulk worker", e))?;
        self.workers.push(Worker {
            lane,
            stop,
            halted,
            handle,
        });
        Ok(())
    }

    /// Whether the source may close lanes now (it acknowledged completion).
    fn ending(&self) -> bool {
        matches!(
            self.state,
            State::Verifying | State::Acked | State::ReleaseQueued | State::Done
        )
    }

    /// Whether the demand lane must stay up and speaking: until the last
    /// frame the session waits for has come.
    fn demand_awaited(&self) -> bool {
        !self.ending() || self.state == State::Verifying
    }

    /// The source's digests of every page, once all have come (`verify`).
    pub fn take_digests(&mut self) -> Option<Vec<RegionDigests>> {
        (self.cfg.verify && matches!(self.state, State::ReleaseQueued | State::Done))
            .then(|| std::mem::take(&mut self.digests))
    }

    /// Whether the session can resume after `e`.
    fn resumable(&self, e: &EngineError) -> bool {
        !self.cfg.resume_timeout.is_zero()
            && matches!(
                self.state,
                State::Running | State::CompleteSent | State::Acked
            )
            && e.is_link_loss()
    }

    /// A lane failed: resume, or give up with `e`.
    fn lane_failed(&mut self, e: EngineError) -> Result<(), EngineError> {
        if self.state == State::Reconnecting {
            return Ok(());
        }
        if !self.resumable(&e) {
            return Err(e);
        }
        tracing::warn!(
            "{e}; keeping the session and reconnecting (for up to {:.0} s)",
            self.cfg.resume_timeout.as_secs_f64()
        );
        self.begin_resume()
    }

    fn begin_resume(&mut self) -> Result<(), EngineError> {
        // Stop every lane: nothing may be installed after the bitmap snapshot.
        if let Some(d) = self.demand.take() {
            d.inbound.sock.shutdown();
        }
        if let Some(h) = self.hosted.take() {
            h.inbound.sock.shutdown();
        }
        for w in &self.workers {
            w.shutdown();
        }
        for w in self.workers.drain(..) {
            let _ = w.handle.join();
        }
        if let Ok(mut f) = self.failures.lock() {
            f.clear();
        }
        self.state = State::Reconnecting;
        self.gen += 1;
        let chunks = snapshot(&self.inst);
        let link = self.link.clone();
        let layout = self.layout.clone();
        let liveness = self.cfg.liveness;
        let deadline = Instant::now() + self.cfg.resume_timeout;
        let (tx, rx) = mpsc::channel();
        let notifier_inst = self.inst.clone();
        std::thread::Builder::new()
            .name("rf-resume".into())
            .spawn(move || {
                let r = reconnect(&link, &layout, chunks, deadline, liveness);
                let _ = tx.send(r);
                notifier_inst.notifier.notify();
            })
            .map_err(|e| EngineError::io("starting the reconnector", e))?;
        self.reconnect = Some((rx, Instant::now()));
        Ok(())
    }

    fn poll_reconnect(&mut self, cx: &mut Cx<'_>) -> Result<(), EngineError> {
        let Some((rx, since)) = &self.reconnect else {
            return Ok(());
        };
        match rx.try_recv() {
            Err(mpsc::TryRecvError::Empty) => Ok(()),
            Err(mpsc::TryRecvError::Disconnected) => Err(EngineError::Internal(
                "the reconnector ended without an answer".into(),
            )),
            Ok(Err(e)) => Err(e),
            Ok(Ok(r)) => {
                tracing::warn!(
                    "link restored after {:.1} s; post-copy resumes",
                    since.elapsed().as_secs_f64()
                );
                self.reconnect = None;
                self.resumes += 1;
                self.state = State::Running;
                self.queued.clear();
                self.whole.clear();
                self.parked.clear();
                self.attach(cx, r.demand, r.bulk.into_iter().map(Some).collect())?;
                self.refetch = true;
                Ok(())
            }
        }
    }

    fn handle_demand(&mut self, cx: &mut Cx<'_>) -> Result<bool, EngineError> {
        let inst = cx.inst;
        let layout = &self.layout;
        let verify = self.cfg.verify;
        let digests = &mut self.digests;
        let Some(d) = self.demand.as_mut() else {
            return Ok(false);
        };
        let lane = d.inbound.lane;
        let mut any = false;
        let mut state = self.state;
        loop {
            let st = &mut state;
            let r = d.inbound.next(cx.ring, layout, |got| match got {
                Got::Pages(h, payload) => {
                    if matches!(
                        *st,
                        State::Verifying | State::Acked | State::ReleaseQueued | State::Done
                    ) {
                        return Err(EngineError::Unexpected {
                            lane,
                            kind: ringfault_proto::MsgKind::Pages,
                            state: "after CompleteAck",
                        });
                    }
                    let ri = inst.space.index_of(h.region).ok_or_else(|| {
                        EngineError::Internal(format!("validated region {} vanished", h.region))
                    })?;
                    let out =
                        inst.install(ri, h.first_page, u64::from(h.count), h.kind, payload)?;
                    if h.kind == PageKind::Data {
                        Counters::add(&inst.counters.demand_pages, out.installed);
                    }
                    Ok(())
                }
                Got::Control(Message::CompleteAck) => {
                    if *st != State::CompleteSent {
                        return Err(EngineError::Unexpected {
                            lane,
                            kind: ringfault_proto::MsgKind::CompleteAck,
                            state: "before Complete was sent",
                        });
                    }
                    *st = if verify && !layout.regions.is_empty() {
                        State::Verifying
                    } else {
                        State::Acked
                    };
                    Ok(())
                }
                Got::Control(Message::Digests(dg)) => {
                    if *st != State::Verifying {
                        return Err(EngineError::Unexpected {
                            lane,
                            kind: MsgKind::Digests,
                            state: "outside verification (after CompleteAck, when announced)",
                        });
                    }
                    if accept_digests(layout, digests, dg, lane)? {
                        *st = State::Acked;
                    }
                    Ok(())
                }
                Got::Control(Message::Heartbeat) => Ok(()),
                Got::Control(Message::Error(e)) => Err(peer_error(e)),
                Got::Control(other) => Err(EngineError::Unexpected {
                    lane,
                    kind: other.kind(),
                    state: "on the demand lane",
                }),
            });
            match r {
                Ok(Some(())) => any = true,
                Ok(None) => break,
                Err(e) => {
                    self.state = state;
                    return Err(e);
                }
            }
        }
        self.state = state;
        if self.ending() {
            // Release: the source may close the bulk lanes from now on; a
            // worker that sees its lane end then reports, not fails.
            self.finished.store(true, Ordering::Release);
        }
        Ok(any)
    }

    /// Sends the queued faults as one request, if the pacer allows. Faults
    /// whose pages arrived while they waited for a token are dropped, and
    /// nothing is sent once `Complete` is: every page is present then, and
    /// the source refuses a `Demand` after `Complete`.
    fn send_queued(&mut self, now: Instant) -> Result<(), EngineError> {
        let present = &self.inst.present;
        if !self.parked.is_empty() {
            // A range asked for whole that has not come in time (the source
            // sent only the first faulting page): its other faults go alone.
            let queued = &mut self.queued;
            self.parked.retain(|&(g, t)| {
                if present.is_set(g) {
                    return false;
                }
                if now.saturating_duration_since(t) >= WHOLE_WAIT {
                    queued.push(g);
                    return false;
                }
                true
            });
        }
        if self.queued.is_empty() {
            return Ok(());
        }
        self.queued.retain(|&g| !present.is_set(g));
        if self.state != State::Running {
            self.queued.clear();
            self.parked.clear();
        }
        if self.queued.is_empty() || !self.pacer.take(now) {
            return Ok(());
        }
        let Some(d) = self.demand.as_mut() else {
            return Ok(());
        };
        let space = &self.inst.space;
        let huge = self.inst.huge.get();
        if self.whole.len() > WHOLE_TRACKED {
            self.whole
                .retain(|_, t| now.saturating_duration_since(*t) < WHOLE_WAIT);
        }
        let mut entries: Vec<DemandEntry> = Vec::with_capacity(self.queued.len());
        for g in self.queued.drain(..) {
            let Some((ri, page)) = space.locate(g) else {
                continue;
            };
            let Some(s) = space.span(ri) else { continue };
            // A fault in a THP range none of whose pages is here yet asks for
            // the whole range, which the source sends in one frame and the
            // installer moves in as one huge page (no collapse later). A
            // fault in a range asked for whole a moment ago waits for it.
            let per = s.pages_per_huge();
            let wfirst = page - page % per;
            if huge.is_some_and(|h| h.whole_at(ri, wfirst, s.pages - wfirst)) {
                let asked = self.whole.get(&(ri, wfirst)).copied();
                if let Some(t) = asked.filter(|&t| now.saturating_duration_since(t) < WHOLE_WAIT) {
                    Counters::add(&self.inst.counters.coalesced_faults, 1);
                    self.parked.push((g, t));
                    continue;
                }
                if asked.is_none() && self.inst.present.count_range(s.first + wfirst, per) == 0 {
                    self.whole.insert((ri, wfirst), now);
                    let at = u16::try_from(page - wfirst).unwrap_or(0);
                    entries.push(DemandEntry {
                        region: s.id,
                        page,
                        before: at,
                        after: u16::try_from(per - 1).unwrap_or(0) - at,
                    });
                    continue;
                }
            }
            entries.push(DemandEntry {
                region: s.id,
                page,
                before: self.cfg.prefetch_before,
                after: self.cfg.prefetch_after,
            });
        }
        if entries.is_empty() {
            return Ok(());
        }
        let id = self.next_request;
        self.next_request += 1;
        d.outbox.push_demand(id, &entries)?;
        Counters::add(&self.inst.counters.demand_requests, 1);
        Ok(())
    }

    fn fail_link(&mut self, e: EngineError) -> Result<(), EngineError> {
        if !e.is_link_loss() {
            // Tell the source why we stop, best effort, before closing.
            if let Some(d) = self.demand.as_mut() {
                let _ = d
                    .outbox
                    .push(&Message::Error(ErrorFrame::new(e.code(), e.to_string())));
                // Now: the loop ends with this error, before another flush.
                d.outbox.send_now(&d.inbound.sock);
            }
        }
        self.lane_failed(e)
    }
}

/// Takes one `Digests` frame of the source's: it must continue the digests
/// so far, in layout order, region by region, with one group size per
/// region. Returns whether it was the last (it covers the last page of the
/// last region).
fn accept_digests(
    layout: &Layout,
    so_far: &mut Vec<RegionDigests>,
    dg: Digests,
    lane: crate::error::LaneId,
) -> Result<bool, EngineError> {
    dg.validate(layout)
        .map_err(|source| EngineError::validation(lane, source))?;
    let out_of_order = EngineError::Unexpected {
        lane,
        kind: MsgKind::Digests,
        state: "out of layout order",
    };
    // The region being filled: the last one, until it is whole.
    let whole = |r: &RegionDigests| {
        layout.region(r.region).is_some_and(|d| {
            verify::groups_in(d.page_count(), r.pages_per_digest) == r.digests.len() as u64
        })
    };
    let next_index = match so_far.last() {
        None => 0,
        Some(r) if whole(r) => so_far.len(),
        Some(_) => so_far.len() - 1,
    };
    let Some(desc) = layout.regions.get(next_index) else {
        return Err(out_of_order);
    };
    if desc.id != dg.region {
        return Err(out_of_order);
    }
    if next_index == so_far.len() {
        so_far.push(RegionDigests {
            region: dg.region,
            pages_per_digest: dg.pages_per_digest,
            digests: Vec::new(),
        });
    }
    let Some(cur) = so_far.last_mut() else {
        return Err(out_of_order);
    };
    let next_page = cur.digests.len() as u64 * u64::from(cur.pages_per_digest);
    if cur.pages_per_digest != dg.pages_per_digest || dg.first_page != next_page {
        return Err(out_of_order);
    }
    let groups = verify::groups_in(desc.page_count(), cur.pages_per_digest);
    if cur.digests.len() as u64 + dg.digests.len() as u64 > groups {
        return Err(EngineError::PageOutOfRange {
            lane,
            region: dg.region,
            page: dg.first_page,
            count: dg.digests.len() as u64 * u64::from(dg.pages_per_digest),
            region_pages: desc.page_count(),
        });
    }
    cur.digests.extend_from_slice(&dg.digests);
    let done = cur.digests.len() as u64 == groups;
    Ok(done && next_index + 1 == layout.regions.len())
}

/// The present bitmap as RLE chunks, region by region.
fn snapshot(inst: &Installer) -> Vec<ringfault_proto::RleChunk> {
    let mut out = Vec::new();
    let ranges = inst.present.set_ranges();
    for s in inst.space.spans() {
        let lo = s.first;
        let hi = s.first + s.pages;
        let local = ranges
            .iter()
            .filter(|&&(f, c)| f < hi && f + c > lo)
            .map(|&(f, c)| {
                let a = f.max(lo);
                let b = (f + c).min(hi);
                (a - lo, b - a)
            });
        out.extend(encode_rle_chunks(s.id, s.pages, local));
    }
    out
}

/// Dials the source again until `deadline`: demand lane with the present
/// bitmap, then the bulk lanes. The source must announce the layout the
/// session began with: guest memory is already laid out by it.
fn reconnect(
    link: &Link,
    expected: &Layout,
    chunks: Vec<ringfault_proto::RleChunk>,
    deadline: Instant,
    liveness: Duration,
) -> Result<Resumed, EngineError> {
    let started = Instant::now();
    let mut last_err: Option<EngineError> = None;
    while Instant::now() < deadline {
        let attempt = (|| -> Result<Resumed, EngineError> {
            let (mut demand, layout) =
                link.open(Lane::Demand, 0, true, Duration::from_millis(500), liveness)?;
            if layout != *expected {
                return Err(EngineError::LayoutMismatch(
                    "the source announced another layout on resuming than at the start".into(),
                ));
            }
            for c in &chunks {
                demand.send(&Message::PresentBitmap(c.clone()))?;
            }
            demand
                .stream
                .set_read_timeout(Some(liveness))
                .map_err(|e| EngineError::io("setting a timeout", e))?;
            match demand.recv()? {
                Message::Resumed(_) => {}
                other => {
                    return Err(EngineError::Unexpected {
                        lane: LaneId::DEMAND,
                        kind: other.kind(),
                        state: "instead of Resumed",
                    })
                }
            }
            demand
                .stream
                .set_read_timeout(None)
                .map_err(|e| EngineError::io("clearing a timeout", e))?;
            let mut bulk = Vec::new();
            for ch in 1..=link.bulk_channels {
                let (b, l) =
                    link.open(Lane::Bulk, ch, true, Duration::from_millis(500), liveness)?;
                if l != *expected {
                    return Err(EngineError::LayoutMismatch(format!(
                        "bulk lane {ch} announced another layout on resuming than at the start"
                    )));
                }
                bulk.push(b);
            }
            Ok(Resumed { demand, bulk })
        })();
        match attempt {
            Ok(r) => return Ok(r),
            Err(e)
                if e.is_link_loss()
                    || matches!(e, EngineError::Connect { .. } | EngineError::Io { .. }) =>
            {
                tracing::debug!("resume attempt failed: {e}");
                last_err = Some(e);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
    let _ = last_err;
    Err(EngineError::ResumeTimeout {
        waited_s: started.elapsed().as_secs_f64(),
    })
}

impl PageSource for RemotePages {
    fn start(&mut self, cx: &mut Cx<'_>) -> Result<(), EngineError> {
        if let Some(demand) = self.first.take() {
            let bulk = (0..self.link.bulk_channels).map(|_| None).collect();
            self.attach(cx, demand, bulk)?;
        }
        Ok(())
    }

    fn fetch(&mut self, cx: &mut Cx<'_>, pages: &[u64]) -> Result<(), EngineError> {
        if self.demand.is_none() {
            // Reconnecting: every page still waited for is fetched after it.
            return Ok(());
        }
        self.queued.extend_from_slice(pages);
        self.send_queued(cx.now)
    }
    fn event(&mut self, cx: &mut Cx<'_>, ev: Event) -> Result<(), EngineError> {
        let (t_recv, t_send, t_hosted) = self.tokens();
        let token = ev.token();
        let r = if token == t_recv {
            match self.demand.as_mut() {
                Some(d) => d
                    .inbound
                    .on_event(cx.ring, &ev, cx.now, &cx.inst.counters.wire_bytes),
                None => Ok(()),
            }
        } else if token == t_send {
            match (self.demand.as_mut(), ev) {
                (Some(d), Event::Sent { result, buf, .. }) => d.outbox.on_sent(&result, buf),
                _ => Ok(()),
            }
        } else if token == t_hosted {
            match self.hosted.as_mut() {
                Some(h) => h
                    .inbound
                    .on_event(cx.ring, &ev, cx.now, &cx.inst.counters.wire_bytes),
                None => Ok(()),
            }
        } else {
            // A late event of a lane from before a resume.
            Ok(())
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.fail_link(e),
        }
    }

    fn work(&mut self, cx: &mut Cx<'_>) -> Result<Work, EngineError> {
        let failed = self
            .failures
            .lock()
            .map(|mut f| f.drain(..).next())
            .unwrap_or(None);
        if let Some(e) = failed {
            if self.state != State::Reconnecting && self.state != State::Done {
                // A bulk lane's failure: the source hears why on the demand lane.
                self.fail_link(e)?;
            }
        }
        if self.state == State::Reconnecting {
            self.poll_reconnect(cx)?;
            return Ok(Work::Idle);
        }
        let mut busy = false;
        let ending = self.ending();
        self.send_queued(cx.now)?;
        match self.handle_demand(cx) {
            Ok(b) => busy |= b,
            Err(e) => {
                self.fail_link(e)?;
                return Ok(Work::Idle);
            }
        }
        if let Some(h) = self.hosted.as_mut() {
            match h.process(cx.ring, cx.inst, &self.layout, self.cfg.worker.budget) {
                Ok(Work::Busy) => busy = true,
                Ok(Work::Idle) => {}
                Err(e) => {
                    self.fail_link(e)?;
                    return Ok(Work::Idle);
                }
            }
            if h.inbound.drained(cx.ring) && !ending {
                let lane = h.inbound.lane;
                self.fail_link(EngineError::ConnectionLost { lane })?;
                return Ok(Work::Idle);
            }
        }
        let awaited = self.demand_awaited();
        if let Some(d) = self.demand.as_mut() {
            let lane = d.inbound.lane;
            if d.inbound.drained(cx.ring) && awaited {
                self.fail_link(EngineError::ConnectionLost { lane })?;
                return Ok(Work::Idle);
            }
            let silent = cx.now.saturating_duration_since(d.inbound.last_rx);
            if silent > self.cfg.liveness && awaited {
                self.fail_link(EngineError::Silent {
                    lane,
                    silent_s: silent.as_secs_f64(),
                })?;
                return Ok(Work::Idle);
            }
            if d.outbox.idle()
                && cx.now.saturating_duration_since(d.outbox.last_tx) > self.cfg.liveness / 4
            {
                d.outbox.push(&Message::Heartbeat)?;
            }
            d.outbox.flush(cx.ring, d.inbound.sock.as_fd())?;
        }
        Ok(if busy { Work::Busy } else { Work::Idle })
    }

    fn finish(&mut self, cx: &mut Cx<'_>) -> Result<Finish, EngineError> {
        match self.state {
            State::Reconnecting => Ok(Finish::Pending),
            State::Running => {
                let total = cx.inst.present.len();
                if let Some(d) = self.demand.as_mut() {
                    d.outbox.push(&Message::Complete(Complete {
                        pages_present: total,
                    }))?;
                    d.outbox.flush(cx.ring, d.inbound.sock.as_fd())?;
                }
                self.state = State::CompleteSent;
                self.complete_at.get_or_insert(cx.now);
                Ok(Finish::Pending)
            }
            State::CompleteSent | State::Verifying => Ok(Finish::Pending),
            State::Acked => {
                if let Some(d) = self.demand.as_mut() {
                    d.outbox.push(&Message::Release)?;
                    d.outbox.flush(cx.ring, d.inbound.sock.as_fd())?;
                }
                self.state = State::ReleaseQueued;
                Ok(Finish::Unregister)
            }
            State::ReleaseQueued => {
                let sent = self.demand.as_ref().is_none_or(|d| d.outbox.idle());
                if sent {
                    self.state = State::Done;
                    Ok(Finish::Done)
                } else {
                    Ok(Finish::Pending)
                }
            }
            State::Done => Ok(Finish::Done),
        }
    }

    fn refetch(&mut self) -> bool {
        std::mem::take(&mut self.refetch)
    }

    fn sleep_limit(&self) -> Duration {
        let mut t = (self.cfg.liveness / 4).min(Duration::from_millis(250));
        if !self.queued.is_empty() {
            t = t.min(self.pacer.wait().max(Duration::from_micros(1)));
        }
        if let Some(&(_, asked)) = self.parked.iter().min_by_key(|(_, at)| *at) {
            let due = (asked + WHOLE_WAIT).saturating_duration_since(Instant::now());
            t = t.min(due.max(Duration::from_micros(100)));
        }
        t
    }

    fn stop(&mut self, failed: Option<&EngineError>) {
        if failed.is_none() {
            // Release: bulk workers that see their socket close after this
            // treat it as the end of the session.
            self.finished.store(true, Ordering::Release);
        }
        let mut reports = Vec::new();
        if let Some(d) = self.demand.take() {
            self.demand_bytes = d.inbound.bytes;
            self.demand_frames = d.inbound.frames;
            reports.push(ChannelReport {
                channel: 0,
                lane: "demand",
                bytes: d.inbound.bytes,
                frames: d.inbound.frames,
                bytes_per_step: d.inbound.timeline.samples().to_vec(),
                recv_in_flight_min: 0,
                recv_in_flight_mean: 0.0,
            });
            d.inbound.sock.shutdown();
        }
        for w in &self.workers {
            w.shutdown();
        }
        if let Some(h) = self.hosted.take() {
            h.inbound.sock.shutdown();
        }
        for w in self.workers.drain(..) {
            match w.handle.join() {
                Ok(Ok(r)) => reports.push(r),
                Ok(Err(())) => tracing::debug!("{} ended with an error", w.lane),
                Err(_) => tracing::error!("{} panicked", w.lane),
            }
        }
        self.reports = reports;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringfault_proto::{PageSize, RegionDesc};

    fn layout() -> Layout {
        Layout {
            regions: vec![
                RegionDesc {
                    id: 7,
                    page_size: PageSize::Size4K,
                    size: 4096 * 600,
                },
                RegionDesc {
                    id: 2,
                    page_size: PageSize::Size4K,
                    size: 4096 * 10,
                },
            ],
        }
    }

    fn dg(region: u32, first_page: u64, n: usize) -> Digests {
        Digests {
            region,
            pages_per_digest: verify::PAGES_PER_DIGEST,
            first_page,
            digests: vec![1; n],
        }
    }

    #[test]
    fn digests_are_taken_in_layout_order_to_the_last_page() {
        let l = layout();
        let mut got = Vec::new();
        let lane = LaneId::DEMAND;
        assert!(!accept_digests(&l, &mut got, dg(7, 0, 2), lane).unwrap());
        assert!(!accept_digests(&l, &mut got, dg(7, 512, 1), lane).unwrap());
        assert!(accept_digests(&l, &mut got, dg(2, 0, 1), lane).unwrap());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].digests.len(), 3);
    }

    #[test]
    fn digests_out_of_order_or_beyond_the_region_are_refused() {
        let l = layout();
        let lane = LaneId::DEMAND;
        let unexpected = |e: EngineError| {
            matches!(
                e,
                EngineError::Unexpected {
                    kind: MsgKind::Digests,
                    ..
                }
            )
        };
        // The second region first.
        let mut got = Vec::new();
        assert!(unexpected(
            accept_digests(&l, &mut got, dg(2, 0, 1), lane).unwrap_err()
        ));
        // A gap.
        let mut got = Vec::new();
        accept_digests(&l, &mut got, dg(7, 0, 1), lane).unwrap();
        assert!(unexpected(
            accept_digests(&l, &mut got, dg(7, 512, 1), lane).unwrap_err()
        ));
        // More groups than the region has.
        let mut got = Vec::new();
        assert!(matches!(
            accept_digests(&l, &mut got, dg(7, 0, 4), lane).unwrap_err(),
            EngineError::PageOutOfRange { region: 7, .. }
        ));
        // An unknown region.
        let mut got = Vec::new();
        assert!(matches!(
            accept_digests(&l, &mut got, dg(9, 0, 1), lane).unwrap_err(),
            EngineError::UnknownRegion { region: 9, .. }
        ));
    }
}
