//! The source side: serves guest memory (or a memory file) to one destination
//! session.
//!
//! Threads (see `docs/design.md`):
//! - an acceptor waits for connections and hands each to its own handshake
//!   thread, with a deadline and a per-address limit: a connection that fails,
//!   stalls or lies is logged and dropped, and the source keeps listening;
//! - the caller's thread dispatches authenticated lanes and drives the session
//!   (`source::session`): the switch-over happens only when an authenticated
//!   destination is ready, resumes are answered, and `serve` returns once the
//!   destination released the source;
//! - one demand lane thread answers requests first and alone
//!   (`source::demand`); one pusher per bulk lane streams every other page
//!   (`source::pusher`).
//!
//! The source never frees or changes guest memory: [`Source::serve`] returns
//! only after the destination has confirmed that every page is present and
//! sent `Release`, or with an error, in which case memory is still intact.

pub mod demand;
pub mod frames;
pub mod precopy;
pub mod pusher;
pub mod scan;
pub mod session;

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfault_proto::auth::PresharedKey;
use ringfault_proto::{
    Capabilities, ErrorCode, Lane, Layout, Message, MsgKind, PageSize, Protection, RegionDesc,
    LANE_ALIGN_PAYLOAD,
};

use crate::addr::{Listener, Stream};
use crate::error::{EngineError, LaneId};
use crate::handshake::{source_handshake, SourceLink, HANDSHAKE_TIMEOUT};
use crate::stats::{hex, SourceReport};
use crate::sys::guest::GuestMemory;
use crate::sys::notify::Notifier;
use crate::sys::ring::Opcodes;
use crate::wire::Framed;
use session::{Phase, Session, SourceCounters};

pub use demand::DEMAND_PRIORITY;

/// Maps a page size in bytes to the wire's page sizes.
pub fn page_size_of(bytes: usize) -> Result<PageSize, EngineError> {
    match bytes {
        4096 => Ok(PageSize::Size4K),
        0x20_0000 => Ok(PageSize::Size2M),
        0x4000_0000 => Ok(PageSize::Size1G),
        other => Err(EngineError::Config(format!(
            "page size {other} is not 4 KiB, 2 MiB or 1 GiB"
        ))),
    }
}

/// One region of a memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRegion {
    /// Wire id.
    pub id: u32,
    /// Byte offset of its first page in the file.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// Page size.
    pub page_size: PageSize,
}

/// A memory file served by `pread` (never through a mapping, so a file that
/// shrinks while served gives an error naming it, not `SIGBUS`).
#[derive(Debug)]
pub struct FileBacking {
    path: String,
    file: File,
    regions: Vec<FileRegion>,
}

impl FileBacking {
    /// Reads `buf.len()` bytes at `offset` of region index `region`.
    pub fn read_page(
        &self,
        region: usize,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), EngineError> {
        let r = self
            .regions
            .get(region)
            .ok_or_else(|| EngineError::Internal(format!("file region index {region}")))?;
        let at = r.offset + offset as u64;
        match self.file.read_exact_at(buf, at) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
                Err(EngineError::MemoryFile {
                    path: self.path.clone(),
                    why: format!("shrank to {len} bytes while being served; byte {at} is gone"),
                })
            }
            Err(e) => Err(EngineError::io(format!("reading {}", self.path), e)),
        }
    }
}

/// What a source serves.
#[derive(Debug)]
pub enum Backing {
    /// Guest memory in this process (frozen at switch-over).
    Memory(Arc<GuestMemory>),
    /// A memory file (a snapshot).
    File(FileBacking),
}

/// Source settings.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The pre-shared key.
    pub key: PresharedKey,
    /// Frame protection required of every destination.
    pub protection: Protection,
    /// Pages per bulk data frame (at most 1 MiB of payload is used for larger
    /// pages: one page per frame).
    pub frame_pages: u32,
    /// Bytes of page data gathered into one send.
    pub batch_bytes: usize,
    /// Pin the demand lane and pushers to cores.
    pub pin_workers: bool,
    /// Run the demand lane `SCHED_FIFO` and pushers `SCHED_BATCH` (needs
    /// `CAP_SYS_NICE`; without it a warning is logged). Off by default, as on
    /// the destination.
    pub prioritize_demand: bool,
    /// A lane silent this long is dead.
    pub liveness: Duration,
    /// How long to keep the session for a resume after a lane broke (0: never).
    pub resume_timeout: Duration,
    /// How long a connection may take to authenticate.
    pub handshake_timeout: Duration,
    /// Handshakes in progress from one address, at most.
    pub max_handshakes_per_address: usize,
    /// Pre-copy rounds before the switch-over (none: pure post-copy).
    pub precopy: Option<precopy::Precopy>,
    /// After completion, send digests of every page to a destination that
    /// can check them (`VERIFY`; `crate::verify`): one more read of all of
    /// guest memory or of the memory file.
    pub verify: bool,
}

impl SourceConfig {
    /// Defaults picked by measurement (`docs/design.md`).
    pub fn new(key: PresharedKey) -> SourceConfig {
        SourceConfig {
            key,
            protection: Protection::Mac,
            frame_pages: 512,
            batch_bytes: 2 << 20,
            pin_workers: true,
            prioritize_demand: false,
            liveness: Duration::from_secs(10),
            resume_timeout: Duration::from_secs(300),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_handshakes_per_address: 8,
            precopy: None,
            verify: false,
        }
    }
}

/// Serves guest memory to a destination.
#[derive(Debug)]
pub struct Source {
    backing: Backing,
    layout: Layout,
    cfg: SourceConfig,
    dirty_log: Mutex<Option<Box<dyn precopy::DirtyLog>>>,
}

enum Note {
    Link(Box<SourceLink>),
    Ended {
        lane: LaneId,
        epoch: u32,
        result: Result<Option<demand::End>, EngineError>,
    },
}

impl Source {
    /// A source for the regions of `mem` (ids unique, in order).
    pub fn from_memory(mem: Arc<GuestMemory>, cfg: SourceConfig) -> Result<Source, EngineError> {
        let regions = mem
            .regions()
            .iter()
            .map(|r| {
                Ok(RegionDesc {
                    id: r.id(),
                    page_size: page_size_of(r.page_size())?,
                    size: r.len() as u64,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Self::new(Backing::Memory(mem), regions, cfg)
    }

    /// A source for `regions` of the memory file at `path`. The file must hold
    /// them all now.
    pub fn from_file(
        path: &str,
        file: File,
        regions: Vec<FileRegion>,
        cfg: SourceConfig,
    ) -> Result<Source, EngineError> {
        let len = file
            .metadata()
            .map_err(|e| EngineError::io(format!("reading the size of {path}"), e))?
            .len();
        for r in &regions {
            let end = r.offset.saturating_add(r.size);
            if end > len {
                return Err(EngineError::MemoryFile {
                    path: path.to_owned(),
                    why: format!(
                        "is {len} bytes, but region {} needs bytes {}..{end}",
                        r.id, r.offset
                    ),
                });
            }
        }
        let descs = regions
            .iter()
            .map(|r| RegionDesc {
                id: r.id,
                page_size: r.page_size,
                size: r.size,
            })
            .collect();
        Self::new(
            Backing::File(FileBacking {
                path: path.to_owned(),
                file,
                regions,
            }),
            descs,
            cfg,
        )
    }

    fn new(
        backing: Backing,
        regions: Vec<RegionDesc>,
        cfg: SourceConfig,
    ) -> Result<Source, EngineError> {
        let layout = Layout { regions };
        layout
            .validate()
            .map_err(|e| EngineError::Config(format!("bad region list: {e}")))?;
        if cfg.frame_pages == 0 || cfg.frame_pages > ringfault_proto::MAX_PAGES_PER_FRAME {
            return Err(EngineError::Config(format!(
                "frame pages must be 1 to {}",
                ringfault_proto::MAX_PAGES_PER_FRAME
            )));
        }
        if cfg.liveness < Duration::from_millis(500) {
            return Err(EngineError::Config(
                "the liveness timeout must be at least 0.5 s".into(),
            ));
        }
        Ok(Source {
            backing,
            layout,
            cfg,
            dirty_log: Mutex::new(None),
        })
    }

    /// Pre-copy tracks the guest's writes with `log` (a VMM's own: KVM's dirty
    /// ring or bitmap) instead of the built-in [`precopy::WpAsyncLog`].
    pub fn with_dirty_log(self, log: Box<dyn precopy::DirtyLog>) -> Source {
        if let Ok(mut g) = self.dirty_log.lock() {
            *g = Some(log);
        }
        self
    }

    /// The layout the destination will receive.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Serves one session (see [`Source::serve_with`]).
    pub fn serve(&self, listener: &Listener) -> Result<SourceReport, EngineError> {
        self.serve_with(listener, || {})
    }

    /// Serves one session: accepts its connections on `listener`, calls
    /// `switch_over` once the first destination authenticated (stop the VM
    /// there: from then on guest memory is frozen), answers demand requests,
    /// pushes every page, resumes after a broken link, and returns once the
    /// destination released us.
    pub fn serve_with(
        &self,
        listener: &Listener,
        switch_over: impl FnOnce() + Send,
    ) -> Result<SourceReport, EngineError> {
        Opcodes::require_engine()?;
        let sess = Session::new(&self.backing, &self.layout, &self.cfg);
        let switch: session::SwitchOver<'_> = Mutex::new(Some(Box::new(switch_over)));
        if self.cfg.precopy.is_some() {
            let log: Box<dyn precopy::DirtyLog> =
                match self.dirty_log.lock().ok().and_then(|mut g| g.take()) {
                    Some(l) => l,
                    None => match &self.backing {
                        Backing::Memory(m) => Box::new(precopy::WpAsyncLog::new(m)?),
                        Backing::File(_) => return Err(EngineError::Config(
                            "pre-copy needs guest memory that runs: a memory file does not change"
                                .into(),
                        )),
                    },
                };
            if let Ok(mut g) = sess.dirty_log.lock() {
                *g = Some(log);
            }
        }
        let stop = Notifier::new().map_err(|e| EngineError::io("creating an eventfd", e))?;
        let (tx, rx) = mpsc::channel::<Note>();
        let started = Instant::now();
        let result = std::thread::scope(|scope| -> Result<(), EngineError> {
            let sess = &sess;
            let stop = &stop;
            let switch = &switch;
            let acceptor_tx = tx.clone();
            let acceptor = std::thread::Builder::new()
                .name("rf-accept".into())
                .spawn_scoped(scope, move || {
                    accept_loop(listener, sess, stop, acceptor_tx, switch, &self.backing)
                })
                .map_err(|e| EngineError::io("starting the acceptor", e))?;
            let mut lanes: Vec<(Stream, std::thread::ScopedJoinHandle<'_, ()>)> = Vec::new();
            let mut demand_started = false;
            let mut broken_since: Option<Instant> = None;
            let mut tell_by_demand = false;
            let outcome = loop {
                let wait = match broken_since {
                    Some(t) => self
                        .cfg
                        .resume_timeout
                        .saturating_sub(t.elapsed())
                        .max(Duration::from_millis(1)),
                    None => Duration::from_secs(3600),
                };
                let note = match rx.recv_timeout(wait) {
                    Ok(n) => n,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Some(t) = broken_since {
                            if t.elapsed() >= self.cfg.resume_timeout {
                                break Err(EngineError::ResumeTimeout {
                                    waited_s: t.elapsed().as_secs_f64(),
                                });
                            }
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        break Err(EngineError::Internal("the acceptor stopped".into()))
                    }
                };
                match note {
                    Note::Link(link) => {
                        let link = *link;
                        let hello = link.hello;
                        let mut framed = link.framed;
                        let current = sess.id.lock().map(|g| *g).unwrap_or(None);
                        match (hello.lane, hello.resume, current) {
                            (Lane::Demand, false, Some(id))
                                if id == hello.session
                                    && (sess.phase() == Phase::Open
                                        || (self.cfg.precopy.is_some()
                                            && sess.phase() == Phase::Waiting))
                                    && !demand_started =>
                            {
                                // The switch-over happened in the handshake,
                                // before the Welcome.
                                demand_started = true;
                                set_verify(sess, &hello);
                                lanes.push(spawn_demand(
                                    scope, sess, framed, 0, started, &tx, switch,
                                )?);
                            }
                            (Lane::Demand, true, Some(id)) if id == hello.session => {
                                if sess.phase() == Phase::Released {
                                    framed.send_error(ErrorCode::Busy, "the session is over");
                                    continue;
                                }
                                if matches!(sess.phase(), Phase::Waiting | Phase::PreCopy) {
                                    // The destination gives up on a link lost
                                    // before post-copy began: nothing to resume.
                                    framed.send_error(
                                        ErrorCode::Busy,
                                        "a session is resumable only after the switch-over",
                                    );
                                    continue;
                                }
                                let epoch = sess.next_epoch();
                                for (s, h) in lanes.drain(..) {
                                    s.shutdown();
                                    let _ = h.join();
                                }
                                match resync(sess, &mut framed) {
                                    Ok(n) => {
                                        tracing::warn!(
                                            "the destination resumed the session; it holds {n} of {} pages",
                                            sess.space.total()
                                        );
                                        SourceCounters::add(&sess.counters.resumes, 1);
                                        broken_since = None;
                                        set_verify(sess, &hello);
                                        lanes.push(spawn_demand(
                                            scope, sess, framed, epoch, started, &tx, switch,
                                        )?);
                                    }
                                    Err(e) => {
                                        tracing::warn!("a resume failed: {e}");
                                        framed.send_error(e.code(), e.to_string());
                                        if broken_since.is_none() {
                                            broken_since = Some(Instant::now());
                                        }
                                    }
                                }
                            }
                            (Lane::Bulk, _, Some(id)) if id == hello.session => {
                                let epoch = sess.epoch.load(std::sync::atomic::Ordering::Acquire);
                                let align = hello.lane_flags & LANE_ALIGN_PAYLOAD != 0;
                                let stop_handle = framed
                                    .stream
                                    .try_clone()
                                    .map_err(|e| EngineError::io("cloning a lane's socket", e))?;
                                let lane = framed.lane;
                                let txc = tx.clone();
                                let h = std::thread::Builder::new()
                                    .name(format!("rf-push{}", lane.channel))
                                    .spawn_scoped(scope, move || {
                                        let r = pusher::run(sess, framed, epoch, align);
                                        let _ = txc.send(Note::Ended {
                                            lane,
                                            epoch,
                                            result: r.map(|()| None),
                                        });
                                    })
                                    .map_err(|e| EngineError::io("starting a pusher", e))?;
                                lanes.push((stop_handle, h));
                            }
                            _ => {
                                tracing::warn!(
                                    "refused a {:?} lane of another session from {}",
                                    hello.lane,
                                    framed.stream.peer()
                                );
                                framed.send_error(
                                    ErrorCode::Busy,
                                    "this source serves another session",
                                );
                            }
                        }
                    }
                    Note::Ended {
                        lane,
                        epoch,
                        result,
                    } => {
                        if sess.stale(epoch) {
                            continue;
                        }
                        match result {
                            Ok(Some(demand::End::Released)) => break Ok(()),
                            Ok(_) => {}
                            Err(e) if lane == LaneId::DEMAND => {
                                if e.is_link_loss() && !self.cfg.resume_timeout.is_zero() {
                                    tracing::warn!(
                                        "{e}; keeping the session for a resume (up to {:.0} s)",
                                        self.cfg.resume_timeout.as_secs_f64()
                                    );
                                    let _ = sess.transition(
                                        &[Phase::Open, Phase::Completing],
                                        Phase::Broken,
                                    );
                                    broken_since = Some(Instant::now());
                                } else {
                                    break Err(e);
                                }
                            }
                            Err(e) => {
                                tracing::warn!("{lane} ended: {e}");
                                if !e.is_link_loss() {
                                    // The demand lane tells the destination
                                    // why (below): it would otherwise take
                                    // the close for a lost link and resume.
                                    tell_by_demand = sess.phase() != Phase::Broken;
                                    break Err(e);
                                }
                            }
                        }
                    }
                }
            };
            if let (true, Err(e)) = (tell_by_demand, &outcome) {
                if let Ok(mut f) = sess.fatal.lock() {
                    *f = Some(ringfault_proto::ErrorFrame::new(e.code(), e.to_string()));
                }
                // The demand lane sends it at its next turn (within a
                // heartbeat interval) and ends.
                let deadline = Instant::now() + self.cfg.liveness;
                while let Ok(note) =
                    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    if matches!(
                        note,
                        Note::Ended {
                            lane: LaneId::DEMAND,
                            ..
                        }
                    ) {
                        break;
                    }
                }
            }
            // Stop everything: the acceptor, then every lane.
            stop.notify();
            sess.completing
                .store(true, std::sync::atomic::Ordering::Release);
            sess.next_epoch();
            for (s, h) in lanes {
                s.shutdown();
                let _ = h.join();
            }
            let _ = acceptor.join();
            outcome
        });
        drop(tx);
        result?;
        let c = &sess.counters;
        let get = SourceCounters::get;
        let session = sess
            .id
            .lock()
            .ok()
            .and_then(|g| g.map(|s| hex(&s)))
            .unwrap_or_default();
        Ok(SourceReport {
            session,
            elapsed_s: started.elapsed().as_secs_f64(),
            demand_requests: get(&c.demand_requests),
            demand_pages: get(&c.demand_pages),
            bulk_pages: get(&c.bulk_pages),
            zero_pages: get(&c.zero_pages),
            unpopulated_pages: get(&c.unpopulated_pages),
            wire_bytes: get(&c.wire_bytes),
            released: true,
            resumes: get(&c.resumes),
            protection: self.cfg.protection.name().into(),
            classify_s: crate::stats::ns_to_us(get(&c.scan_ns)) / 1e6,
            metadata_bytes: sess.plan.sent().allocated_bytes(),
            stages: {
                let pages = (get(&c.bulk_pages) + get(&c.zero_pages)).max(1);
                let per = |a: &std::sync::atomic::AtomicU64| crate::stats::ratio(get(a), pages);
                crate::stats::SourceStageCosts {
                    claim_ns_per_page: per(&c.stage_claim_ns),
                    classify_ns_per_page: per(&c.stage_classify_ns) - per(&c.stage_seal_ns),
                    seal_ns_per_page: per(&c.stage_seal_ns),
                    send_ns_per_page: per(&c.stage_send_ns),
                    demand_us_per_request: crate::stats::ratio(
                        get(&c.demand_cpu_ns),
                        get(&c.demand_requests).max(1),
                    ) / 1000.0,
                }
            },
            precopy: sess.precopy.lock().ok().and_then(|g| g.clone()),
        })
    }
}

/// Notes whether the destination of a new demand lane gets digests after
/// completion: it can check them and this source sends them.
fn set_verify(sess: &Session<'_>, hello: &ringfault_proto::Hello) {
    // Release: the demand lane thread, spawned after this, reads it.
    sess.verify.store(
        sess.cfg.verify && hello.capabilities.contains(Capabilities::VERIFY),
        std::sync::atomic::Ordering::Release,
    );
}

fn spawn_demand<'scope, 'env, 'f: 'scope>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    sess: &'scope Session<'env>,
    framed: Framed,
    epoch: u32,
    started: Instant,
    tx: &mpsc::Sender<Note>,
    switch: &'scope session::SwitchOver<'f>,
) -> Result<(Stream, std::thread::ScopedJoinHandle<'scope, ()>), EngineError> {
    let stop = framed
        .stream
        .try_clone()
        .map_err(|e| EngineError::io("cloning the demand socket", e))?;
    let txc = tx.clone();
    let h = std::thread::Builder::new()
        .name("rf-src-demand".into())
        .spawn_scoped(scope, move || {
            let r = demand::run(sess, framed, epoch, started, switch);
            let _ = txc.send(Note::Ended {
                lane: LaneId::DEMAND,
                epoch,
                result: r.map(Some),
            });
        })
        .map_err(|e| EngineError::io("starting the demand lane", e))?;
    Ok((stop, h))
}

/// Applies a resuming destination's present bitmap: what it lacks will be
/// sent again, whatever was in flight when the link broke.
fn resync(sess: &Session<'_>, framed: &mut Framed) -> Result<u64, EngineError> {
    framed
        .stream
        .set_read_timeout(Some(sess.cfg.liveness))
        .map_err(|e| EngineError::io("setting a timeout", e))?;
    let total = sess.space.total();
    let sent = sess.plan.sent();
    sent.clear_range(0, total);
    let mut last_seen = vec![false; sess.space.spans().len()];
    while last_seen.iter().any(|s| !s) {
        match framed.recv()? {
            Message::PresentBitmap(chunk) => {
                chunk
                    .validate(sess.layout)
                    .map_err(|source| EngineError::validation(LaneId::DEMAND, source))?;
                let ri = sess
                    .space
                    .index_of(chunk.region)
                    .ok_or_else(|| EngineError::Internal("validated region vanished".into()))?;
                let first = sess.space.spans()[ri].first;
                for (f, c) in chunk.set_ranges() {
                    sent.set_range(first + f, c);
                }
                if chunk.last {
                    last_seen[ri] = true;
                }
            }
            other => {
                return Err(EngineError::Unexpected {
                    lane: LaneId::DEMAND,
                    kind: other.kind(),
                    state: "while resuming (PresentBitmap expected)",
                })
            }
        }
    }
    sess.plan.restart_sweep();
    sess.completing
        .store(false, std::sync::atomic::Ordering::Release);
    let _ = sess.transition(
        &[Phase::Open, Phase::Completing, Phase::Broken],
        Phase::Open,
    );
    let n = sent.count();
    framed.send(&Message::Resumed(n))?;
    framed
        .stream
        .set_read_timeout(None)
        .map_err(|e| EngineError::io("clearing a timeout", e))?;
    let _ = MsgKind::Resumed;
    Ok(n)
}

/// Accepts connections until `stop`; each handshake runs on its own thread
/// with a deadline, at most `max_handshakes_per_address` at once per address.
fn accept_loop(
    listener: &Listener,
    sess: &Session<'_>,
    stop: &Notifier,
    tx: mpsc::Sender<Note>,
    switch: &session::SwitchOver<'_>,
    backing: &Backing,
) {
    let _ = listener.set_nonblocking(true);
    let per_ip: Arc<Mutex<HashMap<Option<IpAddr>, usize>>> = Arc::new(Mutex::new(HashMap::new()));
    std::thread::scope(|scope| loop {
        let mut fds = [
            rustix::event::PollFd::new(listener, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(stop, rustix::event::PollFlags::IN),
        ];
        if rustix::event::poll(&mut fds, None).is_err() {
            continue;
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                continue;
            }
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let ip = stream.peer_ip();
        {
            let Ok(mut m) = per_ip.lock() else { continue };
            let n = m.entry(ip).or_insert(0);
            if *n >= sess.cfg.max_handshakes_per_address {
                tracing::warn!(
                    "refused a connection from {}: {} handshakes in progress from that address",
                    stream.peer(),
                    *n
                );
                continue;
            }
            *n += 1;
        }
        let tx = tx.clone();
        let per_ip = per_ip.clone();
        let spawned = std::thread::Builder::new()
            .name("rf-handshake".into())
            .spawn_scoped(scope, move || {
                let peer = stream.peer();
                let peer = peer.as_str();
                let r = source_handshake(
                    stream,
                    &sess.cfg.key,
                    sess.layout,
                    sess.cfg.protection,
                    sess.cfg.handshake_timeout,
                    (if sess.cfg.precopy.is_some() {
                        ringfault_proto::WELCOME_PRECOPY
                    } else {
                        0
                    }) | (if sess.cfg.verify {
                        ringfault_proto::WELCOME_VERIFY
                    } else {
                        0
                    }),
                    |h| {
                        let Ok(mut current) = sess.id.lock() else {
                            return Err(EngineError::Internal("session lock poisoned".into()));
                        };
                        match *current {
                            None if h.resume => Err(EngineError::Session(
                                "resume of a session this source does not know".into(),
                            )),
                            None if h.lane == Lane::Demand && sess.cfg.precopy.is_some() => {
                                // Pre-copy: the VM keeps running; the demand
                                // lane's thread runs the rounds and the
                                // switch-over (`precopy`).
                                *current = Some(h.session);
                                tracing::info!("destination {peer} authenticated: pre-copy begins");
                                Ok(())
                            }
                            None if h.lane == Lane::Demand => {
                                // The switch-over: the first authenticated
                                // destination is ready. Stop the VM and freeze
                                // its memory before the Welcome lets the
                                // destination resume it.
                                *current = Some(h.session);
                                drop(current);
                                tracing::info!("destination {peer} authenticated: switch-over");
                                session::switch_over(switch);
                                if let Backing::Memory(m) = backing {
                                    m.freeze();
                                }
                                let _ = sess.transition(&[Phase::Waiting], Phase::Open);
                                Ok(())
                            }
                            None => Err(EngineError::Session(
                                "a bulk lane before the demand lane".into(),
                            )),
                            Some(s) if s != h.session => Err(EngineError::Session(
                                "this source serves another session".into(),
                            )),
                            _ => Ok(()),
                        }
                    },
                );
                if let Ok(mut m) = per_ip.lock() {
                    if let Some(n) = m.get_mut(&ip) {
                        *n = n.saturating_sub(1);
                    }
                }
                match r {
                    Ok(link) => {
                        let _ = tx.send(Note::Link(Box::new(link)));
                    }
                    Err(e) => tracing::warn!("refused a connection from {peer}: {e}"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a handshake thread: {e}");
        }
        let _ = stop.as_fd();
    })
}
