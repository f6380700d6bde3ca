//! Pre-copy rounds before the switch-over (the hybrid): memory is sent while
//! the VM still runs, pages it writes meanwhile are tracked and sent again,
//! and only what is still dirty when it stops is left to post-copy.
//!
//! # Mechanism
//! * Dirty tracking ([`DirtyLog`]): by default [`WpAsyncLog`], which
//!   write-protects guest memory with a userfaultfd in asynchronous mode
//!   (`UFFD_FEATURE_WP_ASYNC`: the kernel resolves the write fault itself and
//!   marks the page written, no message, no thread woken) and collects each
//!   round's written pages with `PAGEMAP_SCAN`, which re-protects them in the
//!   same call. A VMM passes its own log instead (KVM's dirty ring or
//!   bitmap: a real guest's writes through KVM are what count).
//! * The bulk lanes push from the [`PushPlan`](crate::schedule::PushPlan) as in
//!   post-copy, staging each page (a copy, then the tag) because the VM still
//!   writes it. When the plan is exhausted and no send is in flight, a round
//!   ends: the dirty pages of the round are cleared from `sent`, so that the
//!   next round sends them again.
//! * The policy ([`Rounds`]): a fixed number of rounds, or `Auto`, which
//!   switches over when the dirty set fits in the pause budget at the
//!   measured rate, stops shrinking, or stays above half of what a round sent
//!   (a working set that never converges: random writes over all memory).
//! * The switch-over, on the demand lane's thread (it owns that lane's
//!   sequence numbers): pushers are held, the VM stopped (the caller's
//!   `switch_over`), memory frozen, the last dirty set collected and tracking
//!   stopped. Every page the destination may hold stale (sent at some round,
//!   not sent since its last write) goes out in a `DiscardList`, ended by
//!   `Phase(SwitchOver)`; each bulk lane sends `Phase(SwitchOver)` before its
//!   first post-copy frame. The destination applies the discard list only
//!   after every lane's marker, so that no pre-copy frame can land after it.
//!
//! # Kernel versions
//! `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN`: Linux 6.7. Probed at start, with
//! an error naming what is missing.

use std::time::{Duration, Instant};

use ringfault_proto::{encode_rle_chunks, Message, Phase as WirePhase, PhaseKind};

use super::session::{switch_over, Phase, Session, SourceCounters, SwitchOver};
use super::Backing;
use crate::bitmap::AtomicBitmap;
use crate::error::EngineError;
use crate::sys::guest::GuestMemory;
use crate::sys::pagemap::{PagemapError, Query, Scanner};
use crate::sys::uffd::{Features, RegisterMode, Uffd, UffdOptions};
use crate::wire::Framed;

/// Most rounds `Auto` runs.
pub const AUTO_MAX_ROUNDS: u32 = 8;

/// How many pre-copy rounds run before the switch-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounds {
    /// Exactly this many (at least 1).
    Fixed(u32),
    /// Until the dirty set converges (see the module doc).
    Auto,
}

/// Pre-copy settings.
#[derive(Debug, Clone, Copy)]
pub struct Precopy {
    /// The round policy.
    pub rounds: Rounds,
    /// `Auto` switches over once the dirty set can be sent in this long.
    pub max_pause: Duration,
}

/// Pages written, as a range of one region (by layout index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRange {
    /// Region index in layout order.
    pub region: usize,
    /// First page within the region.
    pub first: u64,
    /// Pages.
    pub count: u64,
}

/// A log of the pages the guest writes.
pub trait DirtyLog: Send + std::fmt::Debug {
    /// Starts tracking every page of every region (all clean).
    fn start(&mut self) -> Result<(), EngineError>;
    /// Appends the pages written since `start` or the last `collect`, and
    /// starts the next interval, atomically with respect to guest writes.
    fn collect(&mut self, out: &mut Vec<DirtyRange>) -> Result<(), EngineError>;
    /// Stops tracking.
    fn stop(&mut self);
}

/// The built-in dirty log: asynchronous userfaultfd write protection plus
/// `PAGEMAP_SCAN` (see the module doc).
#[derive(Debug)]
pub struct WpAsyncLog {
    regions: Vec<(usize, usize, usize)>,
    uffd: Option<Uffd>,
    scanner: Option<Scanner>,
}

impl WpAsyncLog {
    /// A log over the regions of `mem` (4 KiB pages, with or without
    /// transparent huge pages).
    pub fn new(mem: &GuestMemory) -> Result<WpAsyncLog, EngineError> {
        let mut regions = Vec::new();
        for r in mem.regions() {
            if r.page_size() != 4096 {
                return Err(EngineError::Config(format!(
                    "pre-copy tracks 4 KiB pages only; region {} has {} KiB pages",
                    r.id(),
                    r.page_size() / 1024
                )));
            }
            regions.push((r.addr(), r.len(), r.page_size()));
        }
        Ok(WpAsyncLog {
            regions,
            uffd: None,
            scanner: None,
        })
    }
}

impl DirtyLog for WpAsyncLog {
    fn start(&mut self) -> Result<(), EngineError> {
        let need = Features::WP_ASYNC | Features::WP_UNPOPULATED;
        let have = Uffd::probe()?;
        if !have.contains(need) {
            return Err(EngineError::Unsupported(
                "pre-copy dirty tracking needs userfaultfd's WP_ASYNC and WP_UNPOPULATED (Linux 6.7)"
                    .into(),
            ));
        }
        let scanner = Scanner::new().map_err(|e| match e {
            PagemapError::Unsupported => EngineError::Unsupported(
                "pre-copy dirty tracking needs PAGEMAP_SCAN (Linux 6.7)".into(),
            ),
            e => EngineError::Pagemap(e),
        })?;
        let uffd = Uffd::open(UffdOptions {
            nonblock: true,
            user_mode_only: false,
        })?;
        uffd.api(need)?;
        for &(addr, len, _) in &self.regions {
            uffd.register(addr, len, RegisterMode::Wp)?;
            uffd.writeprotect(addr, len, true)?;
        }
        self.uffd = Some(uffd);
        self.scanner = Some(scanner);
        Ok(())
    }

    fn collect(&mut self, out: &mut Vec<DirtyRange>) -> Result<(), EngineError> {
        let Some(scanner) = self.scanner.as_mut() else {
            return Err(EngineError::Internal(
                "dirty log collected before start".into(),
            ));
        };
        for (i, &(addr, len, ps)) in self.regions.iter().enumerate() {
            for r in scanner.scan(addr, addr + len, Query::WrittenAndProtect)? {
                out.push(DirtyRange {
                    region: i,
                    first: ((r.start - addr) / ps) as u64,
                    count: (r.end - r.start).div_ceil(ps) as u64,
                });
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(u) = self.uffd.take() {
            for &(addr, len, _) in &self.regions {
                let _ = u.unregister(addr, len);
            }
        }
        self.scanner = None;
    }
}

/// What pre-copy did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PrecopyReport {
    /// Rounds run.
    pub rounds: u32,
    /// Pages put on the wire before the switch-over (data and zero).
    pub pages_before_switch: u64,
    /// Pages sent again because the guest wrote them after they were sent.
    pub pages_resent: u64,
    /// Dirty pages collected after each round.
    pub dirty_per_round: Vec<u64>,
    /// Pages the destination was told to discard at switch-over.
    pub discarded: u64,
    /// Seconds from the first round to the switch-over.
    pub duration_s: f64,
    /// Why the rounds stopped.
    pub stopped_because: String,
    /// Switch-over: ms from holding the pushers to the discard list sent
    /// (the VM's stop included).
    pub switch_ms: f64,
}

/// Runs the rounds and the switch-over on the demand lane's thread; returns
/// once the destination has the discard list and post-copy may start.
pub fn run(
    sess: &Session<'_>,
    link: &mut Framed,
    log: &mut dyn DirtyLog,
    epoch: u32,
    switch: &SwitchOver<'_>,
) -> Result<PrecopyReport, EngineError> {
    let Some(cfg) = sess.cfg.precopy else {
        return Err(EngineError::Internal("pre-copy without settings".into()));
    };
    let started = Instant::now();
    let total = sess.space.total();
    let ever = AtomicBitmap::new(total);
    let mut rep = PrecopyReport::default();
    let beat = (sess.cfg.liveness / 4).max(Duration::from_millis(100));
    let mut dirty = Vec::new();
    let mut last_dirty: Option<u64> = None;
    let wire = || SourceCounters::get(&sess.counters.wire_bytes);
    let mut wire_at_start = wire();
    log.start()?;
    // Pushers start round 1 now.
    sess.transition(&[Phase::Waiting], Phase::PreCopy)
        .map_err(|p| EngineError::Internal(format!("pre-copy began in phase {p:?}")))?;
    let stopped_because = loop {
        rep.rounds += 1;
        let round_start = Instant::now();
        let sent_before = sess.plan.sent_count();
        // Wait for the round to drain: nothing left to claim, no send in flight.
        let mut last_beat = Instant::now();
        while !sess.round_drained() {
            sess.idle(beat.min(Duration::from_millis(50)));
            if sess.stale(epoch) {
                return Err(EngineError::Session(
                    "the session ended during pre-copy".into(),
                ));
            }
            if last_beat.elapsed() >= beat {
                link.send(&Message::Heartbeat)?;
                last_beat = Instant::now();
            }
        }
        let round_pages = sess.plan.sent_count().saturating_sub(sent_before);
        let round_s = round_start.elapsed().as_secs_f64().max(1e-6);
        let wire_now = wire();
        let rate = (wire_now.saturating_sub(wire_at_start)) as f64 / round_s;
        wire_at_start = wire_now;
        dirty.clear();
        log.collect(&mut dirty)?;
        or_into(&ever, sess.plan.sent());
        let n = clear_dirty(sess, &dirty);
        rep.dirty_per_round.push(n);
        rep.pages_resent += n;
        let bytes = n as f64 * 4096.0;
        let why = match cfg.rounds {
            Rounds::Fixed(k) if rep.rounds >= k.max(1) => Some(format!("{k} rounds done")),
            Rounds::Fixed(_) => None,
            Rounds::Auto if n == 0 => Some("nothing was written".into()),
            Rounds::Auto if rate > 0.0 && bytes / rate <= cfg.max_pause.as_secs_f64() => {
                Some(format!(
                    "{n} dirty pages fit in the pause budget of {:.1} ms",
                    cfg.max_pause.as_secs_f64() * 1e3
                ))
            }
            Rounds::Auto if rep.rounds == 1 && n * 2 > round_pages.max(1) => Some(format!(
                "round 1 left {n} of {round_pages} pages dirty: the working set does not converge"
            )),
            Rounds::Auto if last_dirty.is_some_and(|l| n * 10 >= l * 9) => {
                Some(format!("the dirty set stopped shrinking ({n} pages)"))
            }
            Rounds::Auto if rep.rounds >= AUTO_MAX_ROUNDS => {
                Some(format!("{AUTO_MAX_ROUNDS} rounds done"))
            }
            Rounds::Auto => None,
        };
        last_dirty = Some(n);
        if let Some(w) = why {
            break w;
        }
        sess.plan.restart_sweep();
        sess.notify();
    };
    // The switch-over: hold the pushers, stop the VM, take the last dirty set.
    let t_switch = Instant::now();
    sess.hold_pushers(true);
    while !sess.round_drained_or_held() {
        sess.idle(Duration::from_millis(5));
        if sess.stale(epoch) {
            return Err(EngineError::Session(
                "the session ended during pre-copy".into(),
            ));
        }
    }
    switch_over(switch);
    if let Backing::Memory(m) = sess.backing {
        m.freeze();
    }
    dirty.clear();
    log.collect(&mut dirty)?;
    log.stop();
    or_into(&ever, sess.plan.sent());
    let n = clear_dirty(sess, &dirty);
    rep.dirty_per_round.push(n);
    rep.pages_resent += n;
    rep.pages_before_switch = SourceCounters::get(&sess.counters.bulk_pages)
        + SourceCounters::get(&sess.counters.zero_pages);
    // Stale on the destination: sent at some point, not sent since written.
    let sent = sess.plan.sent();
    let mut discarded = 0u64;
    for s in sess.space.spans() {
        let mut ranges = Vec::new();
        let mut g = s.first;
        let end = s.first + s.pages;
        while let Some(a) = ever.next_set(g).filter(|&a| a < end) {
            let b = ever.next_clear(a).unwrap_or(end).min(end);
            // Within [a, b): the pages whose `sent` bit is clear.
            let mut x = a;
            while let Some(c) = sent.next_clear(x).filter(|&c| c < b) {
                let d = sent.next_set(c).unwrap_or(b).min(b);
                ranges.push((c - s.first, d - c));
                discarded += d - c;
                x = d;
            }
            g = b;
        }
        for chunk in encode_rle_chunks(s.id, s.pages, ranges) {
            link.send(&Message::DiscardList(chunk))?;
        }
    }
    rep.discarded = discarded;
    link.send(&Message::Phase(WirePhase {
        kind: PhaseKind::SwitchOver,
        round: rep.rounds,
        pages: discarded,
    }))?;
    rep.switch_ms = t_switch.elapsed().as_secs_f64() * 1e3;
    rep.duration_s = started.elapsed().as_secs_f64();
    rep.stopped_because = stopped_because;
    tracing::info!(
        "pre-copy: {} rounds ({}); switch-over with {} pages to discard",
        rep.rounds,
        rep.stopped_because,
        discarded
    );
    // Post-copy: pushers send their SwitchOver marker, then what is left.
    // `Open` first, then the pushers go on: a pusher that claims pages after
    // this sees `Open` and puts its marker before them (see `pusher::run`).
    sess.plan.restart_sweep();
    sess.transition(&[Phase::PreCopy], Phase::Open)
        .map_err(|p| EngineError::Internal(format!("switch-over in phase {p:?}")))?;
    sess.hold_pushers(false);
    Ok(rep)
}

/// Clears the dirty pages from `sent`, so that they go out again; returns how
/// many were sent before (and so are sent again).
fn clear_dirty(sess: &Session<'_>, dirty: &[DirtyRange]) -> u64 {
    let mut n = 0;
    for d in dirty {
        if let Some(s) = sess.space.span(d.region) {
            let count = d.count.min(s.pages.saturating_sub(d.first));
            n += sess.plan.sent().clear_range(s.first + d.first, count);
        }
    }
    n
}

/// `dst |= src`.
fn or_into(dst: &AtomicBitmap, src: &AtomicBitmap) {
    for (f, c) in src.set_ranges() {
        dst.set_range(f, c);
    }
}
