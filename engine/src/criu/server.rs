//! Lazy pages from CRIU's page server (`criu dump --lazy-pages --port P`,
//! or `criu page-server --lazy-pages`): the [`PageSource`] of `ringfault
//! criu-lazy-pages --page-server HOST:PORT`.
//!
//! # Mechanism
//! One TCP connection, in the fault loop's ring: requests
//! ([`PS_IOV_GET`](super::psi::PS_IOV_GET)) go out with one send at a time
//! (so they stay in order), replies are received by a multishot receive
//! into a mirrored stream ring, and each reply's pages are installed with
//! `UFFDIO_COPY` straight from where they landed. The page server answers
//! requests strictly in order, so outstanding requests are a FIFO queue and
//! each reply is checked against the one it answers.
//!
//! ```text
//!  fault on page P ──▶ P requested? ─yes─▶ (coalesced: its reply installs it)
//!                          │no
//!                          ▼
//!                 PS_IOV_GET(pid, P, 1) ─────────────▶ page server
//!  background (after "restore finished"):                   │
//!   next missing run, not requested, inside one pagemap     │ in order
//!   entry, while fewer than `window` pages are in flight    ▼
//!                 PS_IOV_GET(pid, run) ──────────────▶ PS_IOV_ADD_F + pages
//!  every page present ──▶ PS_IOV_CLOSE ──────────────▶ status 0
//! ```
//!
//! Demand goes first in two ways: a fault's request is sent in the turn
//! that read it, and the background keeps few pages in flight while faults
//! are frequent (the page server would answer them first), growing its
//! window only while none come. A background request never crosses a
//! pagemap entry: the dump side holds each entry as one run, and a request
//! past a run's end is cut short (the rest is asked again later).
//!
//! # Hazards
//! * A request for pages the page server does not hold (not lazy) makes it
//!   end the session; only lazy ranges from the pagemap are ever asked for.
//! * A reply for a task that exited meanwhile is read and dropped (the
//!   installer knows the task is gone).

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use ringfault_proto::PageKind;

use super::image::PAGE_SIZE;
use super::psi::{self, Psi, PsiError, CLOSE_STATUS_LEN, MAX_REQUEST_PAGES, PSI_LEN};
use super::session::Session;
use super::CriuError;
use crate::bitmap::AtomicBitmap;
use crate::destination::install::Payload;
use crate::destination::pages::{Cx, Finish, PageSource, Work, TOKEN_SOURCE};
use crate::error::{EngineError, LaneId};
use crate::stats::Counters;
use crate::sys::bufring::StreamRing;
use crate::sys::ring::{Event, StreamId};
use crate::sys::uffd::Event as UffdEvent;

const TOKEN_RECV: u32 = TOKEN_SOURCE + 1;
const TOKEN_SEND: u32 = TOKEN_SOURCE + 2;

/// Receive ring: 32 segments of 256 KiB (8 MiB), room for two of the
/// largest replies.
const SEGMENT: usize = 256 << 10;
const SEGMENTS: u16 = 32;

/// How the background transfer runs.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Pages in flight for the background while faults are frequent.
    pub min_window: u64,
    /// Pages in flight for the background while no fault comes.
    pub max_window: u64,
    /// How long after a fault the background stays at `min_window`.
    pub calm: Duration,
    /// Pages after a faulting page asked for with it (while not present
    /// and not requested): 0 asks for the page alone, as CRIU does.
    pub prefetch: u64,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            min_window: 32,
            max_window: 2048,
            calm: Duration::from_millis(2),
            prefetch: 0,
        }
    }
}

/// A request the page server has not answered yet.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    psi: Psi,
    /// Global page of its first page.
    first: u64,
    demand: bool,
}

/// Where the end of the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    Serving,
    /// `PS_IOV_CLOSE` queued or sent; waiting for the status word.
    Sent,
    Done,
}

/// Lazy pages from CRIU's page server.
#[derive(Debug)]
pub struct ServerPages {
    session: Session,
    addr: String,
    sock: TcpStream,
    stream: Option<StreamId>,
    ring: Option<StreamRing>,
    queue: VecDeque<Outstanding>,
    outbox: Vec<u8>,
    spare: Vec<u8>,
    sending: bool,
    /// Pages with a request in flight.
    requested: AtomicBitmap,
    bg_in_flight: u64,
    window: u64,
    last_fault: Option<Instant>,
    cursor: u64,
    closing: Closing,
    eof: bool,
    opts: ServerOptions,
    /// Requests sent for faults.
    pub demand_requests: u64,
    /// Requests sent by the background transfer.
    pub background_requests: u64,
    /// Replies shorter than asked (asked again later).
    pub short_replies: u64,
    /// Page bytes received.
    pub page_bytes: u64,
}

impl ServerPages {
    /// Connects to the page server at `addr` (`HOST:PORT`).
    pub fn connect(
        addr: &str,
        total_pages: u64,
        session: Session,
        opts: ServerOptions,
    ) -> Result<ServerPages, CriuError> {
        let sock = TcpStream::connect(addr).map_err(|source| CriuError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
        let _ = sock.set_nodelay(true);
        sock.set_nonblocking(true)
            .map_err(|source| CriuError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let ring = StreamRing::new(SEGMENT, SEGMENTS, false)
            .map_err(|e| CriuError::Engine(EngineError::Map(e)))?;
        Ok(ServerPages {
            session,
            addr: addr.to_owned(),
            sock,
            stream: None,
            ring: Some(ring),
            queue: VecDeque::new(),
            outbox: Vec::new(),
            spare: Vec::new(),
            sending: false,
            requested: AtomicBitmap::new(total_pages),
            bg_in_flight: 0,
            window: opts.min_window,
            last_fault: None,
            cursor: 0,
            closing: Closing::Serving,
            eof: false,
            opts,
            demand_requests: 0,
            background_requests: 0,
            short_replies: 0,
            page_bytes: 0,
        })
    }

    /// The session (tasks, statistics).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The page server's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Queues a request for `count` pages from global page `first` (all in
    /// region `ri`, from its page `page`).
    fn request(&mut self, cx: &Cx<'_>, ri: usize, page: u64, first: u64, count: u64, demand: bool) {
        let Some(src) = self.session.regions.get(ri) else {
            return;
        };
        let psi = Psi::get(
            self.session.pid(src.task),
            src.image_addr + page * PAGE_SIZE,
            count,
        );
        self.requested.set_range(first, count);
        self.outbox.extend_from_slice(&psi.encode());
        self.queue.push_back(Outstanding { psi, first, demand });
        if demand {
            self.demand_requests += 1;
            Counters::add(&cx.inst.counters.demand_requests, 1);
        } else {
            self.background_requests += 1;
            self.bg_in_flight += count;
        }
    }

    /// Sends the outbox if no send is in flight.
    fn flush(&mut self, cx: &mut Cx<'_>) -> Result<(), EngineError> {
        if self.sending || self.outbox.is_empty() {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        std::mem::swap(&mut buf, &mut self.outbox);
        cx.ring.send(self.sock.as_fd(), buf, TOKEN_SEND)?;
        self.sending = true;
        Ok(())
    }

    /// Installs every complete reply in the receive ring.
    fn parse(&mut self, cx: &mut Cx<'_>) -> Result<(), EngineError> {
        let Some(sid) = self.stream else {
            return Ok(());
        };
        loop {
            let ring = cx.ring.stream(sid);
            let bytes = ring.readable();
            if self.closing == Closing::Sent && self.queue.is_empty() {
                if bytes.len() < CLOSE_STATUS_LEN {
                    return Ok(());
                }
                let status = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                if bytes.len() > CLOSE_STATUS_LEN {
                    return Err(CriuError::from(PsiError::Trailing {
                        bytes: bytes.len() - CLOSE_STATUS_LEN,
                    })
                    .into());
                }
                if status != 0 {
                    return Err(CriuError::from(PsiError::CloseStatus { status }).into());
                }
                cx.ring.stream_mut(sid).consume(CLOSE_STATUS_LEN);
                self.closing = Closing::Done;
                return Ok(());
            }
            let Some(reply) = Psi::decode(bytes) else {
                return Ok(());
            };
            let Some(req) = self.queue.front().copied() else {
                return Err(CriuError::from(PsiError::Unsolicited).into());
            };
            let got = psi::check_reply(&reply, &req.psi).map_err(CriuError::from)?;
            let data = usize::try_from(got * PAGE_SIZE).unwrap_or(usize::MAX);
            if bytes.len() < PSI_LEN + data {
                return Ok(());
            }
            // Checked: at least one page, at most as many as asked for, all
            // inside the region the request was made for.
            let Some((ri, page)) = cx.inst.space.locate(req.first) else {
                return Err(EngineError::Internal(
                    "a request outside the page space".into(),
                ));
            };
            let out = cx.inst.install(
                ri,
                page,
                got,
                PageKind::Data,
                Payload::Bytes(&bytes[PSI_LEN..PSI_LEN + data]),
            )?;
            let c = if req.demand {
                &cx.inst.counters.demand_pages
            } else {
                &cx.inst.counters.bulk_pages
            };
            Counters::add(c, out.installed);
            cx.ring.stream_mut(sid).consume(PSI_LEN + data);
            self.page_bytes += got * PAGE_SIZE;
            Counters::add(&cx.inst.counters.wire_bytes, (PSI_LEN + data) as u64);
            self.queue.pop_front();
            self.requested.clear_range(req.first, req.psi.nr_pages);
            if got < req.psi.nr_pages {
                self.short_replies += 1;
            }
            if !req.demand {
                self.bg_in_flight = self.bg_in_flight.saturating_sub(req.psi.nr_pages);
            }
        }
    }

    /// Queues background requests while the window allows.
    fn background(&mut self, cx: &mut Cx<'_>) -> bool {
        let calm = self
            .last_fault
            .is_none_or(|t| cx.now.saturating_duration_since(t) >= self.opts.calm);
        self.window = if calm {
            (self.window * 2).min(self.opts.max_window)
        } else {
            self.opts.min_window
        };
        let mut queued = false;
        let mut wrapped = false;
        while self.bg_in_flight < self.window && self.session.pace.ready(cx.now) {
            let room = self.window - self.bg_in_flight;
            let Some(g) = self.next_wanted(cx, self.cursor) else {
                if wrapped || self.cursor == 0 {
                    break;
                }
                wrapped = true;
                self.cursor = 0;
                continue;
            };
            let Some((ri, page)) = cx.inst.space.locate(g) else {
                break;
            };
            let region_left = cx.inst.space.span(ri).map_or(1, |s| s.pages - page);
            // At most half the window per request, so that two are in flight.
            let max = region_left
                .min(MAX_REQUEST_PAGES)
                .min((self.window / 2).max(1))
                .min(room.max(1));
            let mut n = 1;
            while n < max && !cx.inst.present.is_set(g + n) && !self.requested.is_set(g + n) {
                n += 1;
            }
            self.request(cx, ri, page, g, n, false);
            self.session.pace.spend(cx.now, n * PAGE_SIZE);
            self.cursor = g + n;
            queued = true;
        }
        queued
    }

    /// The first page at or after `from` that is neither present nor requested.
    fn next_wanted(&self, cx: &Cx<'_>, mut from: u64) -> Option<u64> {
        loop {
            let g = cx.inst.present.next_clear(from)?;
            if !self.requested.is_set(g) {
                return Some(g);
            }
            from = self.requested.next_clear(g)?;
        }
    }

    fn missing(&self, cx: &Cx<'_>) -> u64 {
        cx.inst.present.len() - cx.inst.present.count()
    }
}

impl PageSource for ServerPages {
    fn start(&mut self, cx: &mut Cx<'_>) -> Result<(), EngineError> {
        let ring = self
            .ring
            .take()
            .ok_or_else(|| EngineError::Internal("page server source started twice".into()))?;
        let sid = cx.ring.add_stream(ring)?;
        cx.ring.recv_multishot(self.sock.as_fd(), sid, TOKEN_RECV)?;
        self.stream = Some(sid);
        self.session.start(cx)
    }

    fn fetch(&mut self, cx: &mut Cx<'_>, pages: &[u64]) -> Result<(), EngineError> {
        self.last_fault = Some(cx.now);
        self.window = self.opts.min_window;
        let mut i = 0;
        while i < pages.len() {
            let g = pages[i];
            i += 1;
            if self.requested.is_set(g) || cx.inst.present.is_set(g) {
                // In flight already (the background asked): its reply
                // resolves this fault too.
                Counters::add(&cx.inst.counters.coalesced_faults, 1);
                continue;
            }
            let Some((ri, page)) = cx.inst.space.locate(g) else {
                continue;
            };
            let region_left = cx.inst.space.span(ri).map_or(1, |s| s.pages - page);
            // Neighbouring faults of this turn, then the prefetch window.
            let mut n = 1;
            while i < pages.len()
                && pages[i] == g + n
                && n < region_left
                && n < MAX_REQUEST_PAGES
                && !self.requested.is_set(g + n)
            {
                n += 1;
                i += 1;
            }
            let extra = self.opts.prefetch.min(region_left - n);
            let mut k = 0;
            while k < extra
                && !cx.inst.present.is_set(g + n)
                && !self.requested.is_set(g + n)
                && n < MAX_REQUEST_PAGES
            {
                n += 1;
                k += 1;
            }
            self.request(cx, ri, page, g, n, true);
        }
        self.flush(cx)
    }

    fn event(&mut self, cx: &mut Cx<'_>, ev: Event) -> Result<(), EngineError> {
        match ev {
            Event::Received {
                token: TOKEN_RECV, ..
            } => self.parse(cx),
            Event::ReceiveEnded {
                token: TOKEN_RECV,
                stream,
                result,
            } => {
                self.parse(cx)?;
                match result {
                    Ok(true) => {
                        self.eof = true;
                        if self.closing != Closing::Done {
                            let missing = self.missing(cx);
                            if missing > 0 || self.closing == Closing::Sent {
                                return Err(CriuError::PageServerClosed { missing }.into());
                            }
                        }
                        Ok(())
                    }
                    Ok(false) => {
                        Ok(cx
                            .ring
                            .recv_multishot(self.sock.as_fd(), stream, TOKEN_RECV)?)
                    }
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOBUFS | libc::EINTR | libc::EAGAIN)
                        ) =>
                    {
                        Ok(cx
                            .ring
                            .recv_multishot(self.sock.as_fd(), stream, TOKEN_RECV)?)
                    }
                    Err(e) => Err(EngineError::io(
                        format!("receiving from the page server at {}", self.addr),
                        e,
                    )),
                }
            }
            Event::Sent {
                token: TOKEN_SEND,
                result,
                buf,
            } => {
                self.sending = false;
                self.spare = buf;
                match result {
                    Ok(_) => self.flush(cx),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::BrokenPipe
                            || e.kind() == std::io::ErrorKind::ConnectionReset =>
                    {
                        Err(EngineError::ConnectionLost {
                            lane: LaneId {
                                lane: "page server",
                                channel: 0,
                            },
                        })
                    }
                    Err(e) => Err(EngineError::io(
                        format!("sending to the page server at {}", self.addr),
                        e,
                    )),
                }
            }
            other => self.session.event(cx, &other).map(drop),
        }
    }

    fn work(&mut self, cx: &mut Cx<'_>) -> Result<Work, EngineError> {
        self.parse(cx)?;
        if self.session.finished() && self.closing == Closing::Serving && !cx.inst.present.all_set()
        {
            self.background(cx);
        }
        self.flush(cx)?;
        Ok(Work::Idle)
    }

    fn finish(&mut self, cx: &mut Cx<'_>) -> Result<Finish, EngineError> {
        if !self.session.finished() {
            return Ok(Finish::Pending);
        }
        match self.closing {
            Closing::Serving if self.queue.is_empty() => {
                self.outbox.extend_from_slice(&Psi::close().encode());
                self.closing = Closing::Sent;
                self.flush(cx)?;
                Ok(Finish::Pending)
            }
            Closing::Serving | Closing::Sent => {
                self.parse(cx)?;
                Ok(if self.closing == Closing::Done {
                    Finish::Done
                } else {
                    Finish::Pending
                })
            }
            Closing::Done => Ok(Finish::Done),
        }
    }

    fn stop(&mut self, _failed: Option<&EngineError>) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    fn sleep_limit(&self) -> Duration {
        // While faults hold the window small, look again soon to grow it.
        let idle = Duration::from_millis(500);
        let limit = if self.window < self.opts.max_window && self.session.finished() {
            self.opts.calm
        } else {
            idle
        };
        self.session.sleep_limit(limit)
    }

    fn fault_outside(&mut self, cx: &mut Cx<'_>, owner: u32, addr: u64) -> Result<(), EngineError> {
        self.session.fault_outside(cx, owner, addr)
    }

    fn uffd_event(
        &mut self,
        cx: &mut Cx<'_>,
        owner: u32,
        ev: UffdEvent,
    ) -> Result<bool, EngineError> {
        self.session.uffd_event(cx, owner, ev)
    }
}
