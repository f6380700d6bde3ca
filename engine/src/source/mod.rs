//! The source side: serves guest memory to one destination session.
//!
//! Threads (see `docs/design.md`):
//! - the caller's thread accepts connections and runs each handshake;
//! - one demand thread per session answers demand requests on the demand lane,
//!   first and alone, straight from guest memory (`source::demand`);
//! - one pusher per bulk lane streams every page not yet sent, windows around recent
//!   faults first, then a sweep (`source::pusher`).
//!
//! The source never frees or changes guest memory: [`Source::serve`] returns only
//! after the destination has confirmed that every page is present and sent
//! `Release`, or with an error, in which case memory is still intact for a resume.

mod demand;
mod pusher;
mod scan;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfault_proto::auth::PresharedKey;
use ringfault_proto::{Lane, Layout, PageSize, RegionDesc, SessionId};

use crate::addr::{Listener, Stream};
use crate::error::EngineError;
use crate::handshake::source_handshake;
use crate::schedule::{PageSpace, PushPlan};
use crate::stats::{hex, SourceReport};
use crate::sys::guest::GuestArea;
use crate::sys::mapping::GuestMapping;

pub use demand::DEMAND_PRIORITY;
pub use scan::PopulatedMap;

/// One region of guest memory to serve.
#[derive(Debug, Clone)]
pub struct SourceRegion {
    id: u32,
    page_size: PageSize,
    area: GuestArea,
    /// False for file mappings: the page map cannot tell a file's holes, so every
    /// page counts as populated and zero pages are found by content.
    scan_populated: bool,
    _keep: Option<Arc<GuestMapping>>,
}

impl SourceRegion {
    /// Serves a mapping the engine allocated; the region keeps it alive.
    pub fn from_mapping(id: u32, mapping: Arc<GuestMapping>) -> Result<SourceRegion, EngineError> {
        let page_size = page_size_of(mapping.page_size())?;
        // SAFETY: the region holds an `Arc` of the mapping, so it stays mapped for as
        // long as the area can be used.
        let area = unsafe { GuestArea::new(mapping.as_ptr(), mapping.len()) };
        Ok(SourceRegion {
            id,
            page_size,
            area,
            scan_populated: true,
            _keep: Some(mapping),
        })
    }

    /// Serves a file mapping (`GuestMapping::map_file`), e.g. a snapshot memory
    /// file: every page counts as populated, and zero pages are found by content.
    pub fn from_file_mapping(
        id: u32,
        mapping: Arc<GuestMapping>,
    ) -> Result<SourceRegion, EngineError> {
        let mut r = Self::from_mapping(id, mapping)?;
        r.scan_populated = false;
        Ok(r)
    }

    /// Serves memory the VMM owns.
    ///
    /// # Safety
    /// `base..base+len` must stay mapped, and must not be written, for as long as the
    /// [`Source`] built from this region serves it.
    pub unsafe fn from_raw(
        id: u32,
        base: *const u8,
        len: usize,
        page_size: PageSize,
    ) -> SourceRegion {
        SourceRegion {
            id,
            page_size,
            // SAFETY: forwarded from this function's contract.
            area: unsafe { GuestArea::new(base, len) },
            scan_populated: true,
            _keep: None,
        }
    }

    /// The region's wire id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Its memory.
    pub fn area(&self) -> GuestArea {
        self.area
    }
}

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

/// How the source sends page data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendMode {
    /// `writev(2)` with iovecs pointing into guest memory.
    Writev,
    /// io_uring `SENDMSG_ZC` from guest memory (Linux 6.1): no copy on a real NIC;
    /// on loopback the kernel copies anyway.
    ZeroCopy,
}

/// Source settings.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The pre-shared key.
    pub key: PresharedKey,
    /// Pages per bulk data frame.
    pub frame_pages: u32,
    /// Bytes of page data gathered into one `writev`.
    pub batch_bytes: usize,
    /// How long the demand thread polls before sleeping.
    pub spin: Duration,
    /// Pin the demand thread and pushers to cores.
    pub pin_workers: bool,
    /// Run the demand thread `SCHED_FIFO` and pushers `SCHED_BATCH`, so that a
    /// demand request preempts bulk work at once (needs `CAP_SYS_NICE`; without it
    /// the threads keep their class and a warning is logged).
    pub prioritize_demand: bool,
    /// How data is sent.
    pub send: SendMode,
}

impl SourceConfig {
    /// Defaults picked by measurement (`docs/results.md`).
    pub fn new(key: PresharedKey) -> SourceConfig {
        SourceConfig {
            key,
            frame_pages: 256,
            batch_bytes: 2 << 20,
            spin: Duration::ZERO,
            pin_workers: true,
            prioritize_demand: true,
            send: SendMode::Writev,
        }
    }
}

/// Counters of the source; `Relaxed` throughout, read after the workers joined.
#[derive(Debug, Default)]
pub(crate) struct SourceCounters {
    pub demand_requests: AtomicU64,
    pub demand_pages: AtomicU64,
    pub bulk_pages: AtomicU64,
    pub zero_pages: AtomicU64,
    pub unpopulated_pages: AtomicU64,
    pub wire_bytes: AtomicU64,
}

impl SourceCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        // Relaxed: statistics only.
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Serves guest memory to a destination.
#[derive(Debug)]
pub struct Source {
    regions: Vec<SourceRegion>,
    layout: Layout,
    cfg: SourceConfig,
}

/// State one session shares between its threads.
pub(crate) struct Session<'a> {
    pub regions: &'a [SourceRegion],
    pub layout: &'a Layout,
    pub cfg: &'a SourceConfig,
    pub plan: PushPlan,
    pub populated: Vec<PopulatedMap>,
    pub counters: SourceCounters,
    /// Set once the destination released the source, or the session failed.
    pub done: AtomicBool,
    /// Set when the destination reported every page present: pushers stop.
    pub completing: AtomicBool,
}

impl Source {
    /// A source for `regions`. Region ids must be unique.
    pub fn new(regions: Vec<SourceRegion>, cfg: SourceConfig) -> Result<Source, EngineError> {
        let layout = Layout {
            regions: regions
                .iter()
                .map(|r| RegionDesc {
                    id: r.id,
                    page_size: r.page_size,
                    size: r.area.len() as u64,
                })
                .collect(),
        };
        layout
            .validate()
            .map_err(|e| EngineError::Config(format!("bad region list: {e}")))?;
        if cfg.frame_pages == 0 || cfg.frame_pages > ringfault_proto::MAX_PAGES_PER_FRAME {
            return Err(EngineError::Config("frame_pages out of range".into()));
        }
        Ok(Source {
            regions,
            layout,
            cfg,
        })
    }

    /// The layout the destination will receive.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Serves one session: accepts its connections on `listener`, answers demand
    /// requests, pushes every page, and returns once the destination released us.
    /// Before a session is established, a connection that fails authentication
    /// ends `serve` with that error; afterwards such a connection is refused and
    /// logged, and the session goes on.
    pub fn serve(&self, listener: &Listener) -> Result<SourceReport, EngineError> {
        let populated = self
            .regions
            .iter()
            .map(|r| {
                if r.scan_populated {
                    PopulatedMap::scan(r.area(), r.page_size.bytes())
                } else {
                    Ok(PopulatedMap::all(
                        r.area().len() as u64 / r.page_size.bytes(),
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let session = Session {
            regions: &self.regions,
            layout: &self.layout,
            cfg: &self.cfg,
            plan: PushPlan::new(PageSpace::new(&self.layout)),
            populated,
            counters: SourceCounters::default(),
            done: AtomicBool::new(false),
            completing: AtomicBool::new(false),
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| EngineError::io("making the listener non-blocking", e))?;
        let started = Instant::now();
        let mut session_id: Option<SessionId> = None;
        let streams: Mutex<Vec<Stream>> = Mutex::new(Vec::new());
        let result = std::thread::scope(|scope| -> Result<(), EngineError> {
            let mut demand_handle: Option<
                std::thread::ScopedJoinHandle<'_, Result<(), EngineError>>,
            > = None;
            let mut pushers = Vec::new();
            let mut joined: u16 = 0;
            loop {
                // Acquire: pairs with the demand thread's Release store of `done`.
                if session.done.load(Ordering::Acquire) {
                    break;
                }
                if demand_handle.as_ref().is_some_and(|h| h.is_finished()) {
                    break;
                }
                let mut stream = match listener.accept() {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(e) => return Err(EngineError::io("accepting a connection", e)),
                };
                if stream.set_nonblocking(false).is_err() {
                    continue;
                }
                let current = session_id;
                let hello =
                    source_handshake(
                        &mut stream,
                        &self.cfg.key,
                        &self.layout,
                        |h| match current {
                            None if h.resume => Err(EngineError::Protocol(
                                "resume of a session this source does not know".into(),
                            )),
                            Some(s) if s != h.session => Err(EngineError::Protocol(
                                "this source already serves another session".into(),
                            )),
                            _ => Ok(()),
                        },
                    );
                let hello = match hello {
                    Ok(h) => h,
                    Err(e) if session_id.is_none() => return Err(e),
                    Err(e) => {
                        tracing::warn!("refused a connection from {}: {e}", stream.peer());
                        continue;
                    }
                };
                session_id = Some(hello.session);
                joined += 1;
                if let Ok(c) = stream.try_clone() {
                    if let Ok(mut v) = streams.lock() {
                        v.push(c);
                    }
                }
                let s = &session;
                match hello.lane {
                    Lane::Demand if demand_handle.is_none() => {
                        let h = std::thread::Builder::new()
                            .name("rf-src-demand".into())
                            .spawn_scoped(scope, move || demand::run(s, stream))
                            .map_err(|e| EngineError::io("starting the demand thread", e))?;
                        demand_handle = Some(h);
                    }
                    Lane::Bulk => {
                        let ch = hello.channel;
                        let h = std::thread::Builder::new()
                            .name(format!("rf-src-push{ch}"))
                            .spawn_scoped(scope, move || pusher::run(s, stream, ch))
                            .map_err(|e| EngineError::io("starting a pusher", e))?;
                        pushers.push(h);
                    }
                    _ => {
                        tracing::warn!("refused a second demand lane or unknown lane");
                    }
                }
                if joined == hello.channel_count {
                    tracing::debug!("all {joined} channels joined");
                }
            }
            let demand_result = match demand_handle {
                Some(h) => h.join().unwrap_or_else(|_| {
                    Err(EngineError::WorkerPanicked {
                        worker: "source demand".into(),
                    })
                }),
                None => Ok(()),
            };
            // Release: pushers poll `done` to stop idling.
            session.done.store(true, Ordering::Release);
            if let Ok(v) = streams.lock() {
                for s in v.iter() {
                    s.shutdown();
                }
            }
            for p in pushers {
                match p.join() {
                    Ok(Err(e)) if demand_result.is_ok() => {
                        tracing::debug!("pusher ended after release: {e}");
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(EngineError::WorkerPanicked {
                            worker: "source pusher".into(),
                        })
                    }
                }
            }
            demand_result
        });
        result?;
        let c = &session.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(SourceReport {
            session: session_id.map(|s| hex(&s)).unwrap_or_default(),
            elapsed_s: started.elapsed().as_secs_f64(),
            demand_requests: get(&c.demand_requests),
            demand_pages: get(&c.demand_pages),
            bulk_pages: get(&c.bulk_pages),
            zero_pages: get(&c.zero_pages),
            unpopulated_pages: get(&c.unpopulated_pages),
            wire_bytes: get(&c.wire_bytes),
            released: true,
        })
    }
}
