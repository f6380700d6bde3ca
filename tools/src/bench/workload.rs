//! The synthetic VM's vCPUs: threads that read and write guest memory in a chosen
//! pattern, count operations in 100 ms steps, and time every touch of a page that
//! is missing when they touch it: that is what a guest feels of post-copy.
//!
//! Thread `t` writes only the 8-byte word at offset `8 t` of a page, by a
//! read-modify-write; on the destination it logs the value it found there before
//! its first write, so that the verifier can rebuild each page as it arrived.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ringfault_engine::stats::{new_histogram, record};
use serde::{Deserialize, Serialize};

use super::cpu;
use super::vm::{mix, PageClass, VmSpec, PAGE};

/// How the vCPUs touch memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Uniformly random pages, read-modify-write of one word.
    RandomWrite,
    /// Uniformly random pages, read one word.
    RandomRead,
    /// Each thread walks its share of memory in order, reading one word a page.
    Scan,
    /// A Zipf-skewed (s = 0.99) working set, like an in-memory database: half
    /// reads, half read-modify-writes.
    Hotset,
    /// No guest activity: the vCPUs sleep (pure background transfer).
    Idle,
}

impl Pattern {
    /// The name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandomWrite => "random-write",
            Pattern::RandomRead => "random-read",
            Pattern::Scan => "scan",
            Pattern::Hotset => "hotset",
            Pattern::Idle => "idle",
        }
    }
}

/// A touch of a page that was missing when checked but took less than this found
/// it installed meanwhile (the install maps pages before it sets their present
/// bits): a userfault round trip cannot be this short (3.2 µs in-process on this
/// machine kind, LIMITS.md), a touch of a mapped page takes about 0.1 µs.
pub const FAULT_FLOOR: Duration = Duration::from_micros(1);

/// Tells whether a page is present (destination only).
pub type Presence = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// Most vCPU threads (each owns one word of every page).
pub const MAX_THREADS: usize = 64;

#[repr(align(64))]
#[derive(Debug, Default)]
struct Padded(AtomicU64);

/// States of the shared control word.
const RUN: u8 = 0;
/// Record thread CPU now (the migration just ended).
const MARK: u8 = 1;
const STOP: u8 = 2;

/// Running vCPU threads.
pub struct Workload {
    control: Arc<AtomicU8>,
    ops: Arc<Vec<Padded>>,
    threads: Vec<std::thread::JoinHandle<ThreadResult>>,
    sampler: Option<std::thread::JoinHandle<Vec<u64>>>,
    started: Instant,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("threads", &self.threads.len())
            .finish()
    }
}

struct ThreadResult {
    hist: Histogram<u64>,
    fast_touches: u64,
    first_writes: WriteLog,
    cpu_start: u64,
    cpu_mark: Option<u64>,
    cpu_end: u64,
}

/// What the vCPUs did.
#[derive(Debug)]
pub struct WorkloadResult {
    /// Latency of each touch of a missing page that faulted (took at least
    /// [`FAULT_FLOOR`]), in ns.
    pub fault_hist: Histogram<u64>,
    /// Touches of a page missing when checked that took less than
    /// [`FAULT_FLOOR`]: the page arrived in between.
    pub fast_touches: u64,
    /// Per thread: page -> the word at `8 t` before the thread first wrote it.
    pub first_writes: Vec<WriteLog>,
    /// Operations per 100 ms step since start.
    pub ops_steps: Vec<u64>,
    /// CPU ns the vCPUs used from start to the mark (or to the end without one).
    pub cpu_to_mark_ns: u64,
}

impl WorkloadResult {
    /// Puts back in `buf`, a copy of page `page`, the words the threads
    /// wrote, so that it reads as the page arrived (needs `log_writes`).
    pub fn restore_page(&self, page: u64, buf: &mut [u8]) {
        for (t, fw) in self.first_writes.iter().enumerate() {
            if let (Some(v), Some(word)) = (fw.get(page), buf.get_mut(t * 8..t * 8 + 8)) {
                word.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// For each page a thread wrote: the value its word held before the first write.
/// Dense arrays up to 8 Mi pages (32 GiB), a hash map above.
#[derive(Debug)]
pub enum WriteLog {
    /// Nothing logged.
    Off,
    /// `written` bits and `old` values, indexed by page.
    Dense {
        /// One bit per page.
        written: Vec<u64>,
        /// The old value per page.
        old: Vec<u64>,
    },
    /// Page -> old value.
    Sparse(HashMap<u64, u64>),
}

impl WriteLog {
    fn new(on: bool, pages: u64) -> WriteLog {
        match usize::try_from(pages) {
            _ if !on => WriteLog::Off,
            Ok(n) if n <= 8 << 20 => WriteLog::Dense {
                written: vec![0; n.div_ceil(64)],
                old: vec![0; n],
            },
            _ => WriteLog::Sparse(HashMap::new()),
        }
    }

    #[inline]
    fn note(&mut self, page: u64, old_value: u64) {
        match self {
            WriteLog::Off => {}
            WriteLog::Dense { written, old } => {
                let Ok(i) = usize::try_from(page) else { return };
                let (w, b) = (i / 64, 1u64 << (i % 64));
                if written[w] & b == 0 {
                    written[w] |= b;
                    old[i] = old_value;
                }
            }
            WriteLog::Sparse(m) => {
                m.entry(page).or_insert(old_value);
            }
        }
    }

    /// The value before the first write to `page`, if this thread wrote it.
    pub fn get(&self, page: u64) -> Option<u64> {
        match self {
            WriteLog::Off => None,
            WriteLog::Dense { written, old } => {
                let i = usize::try_from(page).ok()?;
                (written.get(i / 64)? & (1u64 << (i % 64)) != 0).then(|| old[i])
            }
            WriteLog::Sparse(m) => m.get(&page).copied(),
        }
    }
}

/// Parameters of a workload.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// The VM.
    pub vm: VmSpec,
    /// Access pattern.
    pub pattern: Pattern,
    /// vCPU threads.
    pub threads: usize,
    /// Log first writes (destination).
    pub log_writes: bool,
    /// Distinguishes the source's run from the destination's (different streams).
    pub salt: u64,
}

static ZIPF: std::sync::Mutex<Option<(u64, Arc<Zipf>)>> = std::sync::Mutex::new(None);

/// The Zipf table for `pages`, built once per process (it takes milliseconds, which
/// must not count in a switch-over pause).
fn zipf_for(pages: u64) -> Arc<Zipf> {
    let mut cache = ZIPF.lock().unwrap_or_else(|p| p.into_inner());
    match &*cache {
        Some((n, z)) if *n == pages => z.clone(),
        _ => {
            let z = Arc::new(Zipf::new(pages));
            *cache = Some((pages, z.clone()));
            z
        }
    }
}

/// Does the set-up work of a workload ahead of time (the hotset's Zipf table).
pub fn prepare(p: &Params) {
    if p.pattern == Pattern::Hotset {
        zipf_for(p.vm.pages());
    }
}

/// Zipf CDF over ranks, and the rank -> page map.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u64) -> Zipf {
        let n = n.clamp(1, 1 << 20);
        let mut cdf = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        let mut acc = 0.0;
        for r in 1..=n {
            acc += 1.0 / super::units::to_f64(r).powf(0.99);
            cdf.push(acc);
        }
        for v in &mut cdf {
            *v /= acc;
        }
        Zipf { cdf }
    }
    fn rank(&self, x: u64) -> u64 {
        let u = super::units::to_f64(x >> 11) / super::units::to_f64(1 << 53);
        let i = self.cdf.partition_point(|&c| c < u);
        u64::try_from(i).unwrap_or(0)
    }
}

impl Workload {
    /// Starts `p.threads` vCPUs on `mem`. With `presence`, every touch of a page
    /// that is not present is timed.
    pub fn start(
        p: Params,
        mem: Arc<dyn super::vm::GuestMem>,
        presence: Option<Presence>,
    ) -> anyhow::Result<Workload> {
        let control = Arc::new(AtomicU8::new(RUN));
        let threads = p.threads.clamp(1, MAX_THREADS);
        let ops: Arc<Vec<Padded>> = Arc::new((0..threads).map(|_| Padded::default()).collect());
        let zipf = Arc::new((p.pattern == Pattern::Hotset).then(|| zipf_for(p.vm.pages())));
        let started = Instant::now();
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let spawned = {
                let (control, ops, mem, presence, zipf) = (
                    control.clone(),
                    ops.clone(),
                    mem.clone(),
                    presence.clone(),
                    zipf.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("vcpu{t}"))
                    .spawn(move || {
                        vcpu(
                            p,
                            t,
                            threads,
                            &*mem,
                            presence.as_deref(),
                            (*zipf).as_deref(),
                            &control,
                            &ops[t].0,
                        )
                    })
            };
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The threads started so far may be waiting on missing pages:
                    // tell them to stop, but do not wait for them.
                    control.store(STOP, Ordering::Relaxed);
                    return Err(anyhow::Error::new(e).context("starting a vCPU thread"));
                }
            }
        }
        let sampler = {
            let (control, ops) = (control.clone(), ops.clone());
            std::thread::Builder::new()
                .name("ops-sampler".into())
                .spawn(move || {
                    let mut steps = Vec::new();
                    let mut last = 0u64;
                    let mut next = started + Duration::from_millis(100);
                    loop {
                        let now = Instant::now();
                        if next > now {
                            // `stop` unparks us, so it never waits for a step.
                            std::thread::park_timeout(next - now);
                            if Instant::now() < next && control.load(Ordering::Relaxed) != STOP {
                                continue;
                            }
                        }
                        // Relaxed: statistics only.
                        let total: u64 = ops.iter().map(|o| o.0.load(Ordering::Relaxed)).sum();
                        steps.push(total - last);
                        last = total;
                        next += Duration::from_millis(100);
                        if control.load(Ordering::Relaxed) == STOP {
                            return steps;
                        }
                    }
                })
                .ok()
        };
        Ok(Workload {
            control,
            ops,
            threads: handles,
            sampler,
            started,
        })
    }

    /// When the vCPUs started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Operations so far.
    pub fn ops(&self) -> u64 {
        // Relaxed: statistics only.
        self.ops.iter().map(|o| o.0.load(Ordering::Relaxed)).sum()
    }

    /// Asks every vCPU to note its CPU time now.
    pub fn mark(&self) {
        // Relaxed: the threads only need to see it eventually.
        self.control.store(MARK, Ordering::Relaxed);
    }

    /// Stops the vCPUs and collects what they measured.
    pub fn stop(self) -> WorkloadResult {
        self.control.store(STOP, Ordering::Relaxed);
        let mut fault_hist = new_histogram();
        let mut fast_touches = 0;
        let mut first_writes = Vec::new();
        let mut cpu_to_mark_ns = 0;
        for h in self.threads {
            if let Ok(r) = h.join() {
                let _ = fault_hist.add(&r.hist);
                fast_touches += r.fast_touches;
                first_writes.push(r.first_writes);
                cpu_to_mark_ns += r.cpu_mark.unwrap_or(r.cpu_end) - r.cpu_start;
            }
        }
        let ops_steps = self
            .sampler
            .and_then(|s| {
                s.thread().unpark();
                s.join().ok()
            })
            .unwrap_or_default();
        WorkloadResult {
            fault_hist,
            fast_touches,
            first_writes,
            ops_steps,
            cpu_to_mark_ns,
        }
    }
}

#[allow(clippy::too_many_arguments)]
impl ThreadResult {
    fn touched(&mut self, d: Duration) {
        if d < FAULT_FLOOR {
            self.fast_touches += 1;
        } else {
            record(&mut self.hist, d);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn vcpu(
    p: Params,
    t: usize,
    threads: usize,
    mem: &dyn super::vm::GuestMem,
    presence: Option<&(dyn Fn(u64) -> bool + Send + Sync)>,
    zipf: Option<&Zipf>,
    control: &AtomicU8,
    ops: &AtomicU64,
) -> ThreadResult {
    let cpu_start = cpu::thread_ns();
    let mut r = ThreadResult {
        hist: new_histogram(),
        fast_touches: 0,
        first_writes: WriteLog::new(p.log_writes, p.vm.pages()),
        cpu_start,
        cpu_mark: None,
        cpu_end: cpu_start,
    };
    let pages = p.vm.pages().max(1);
    let tu = u64::try_from(t).unwrap_or(0);
    let mut x = mix(p.vm.seed ^ p.salt ^ (tu + 1).wrapping_mul(0x5851_f42d_4c95_7f2d)) | 1;
    let mut scan = pages / u64::try_from(threads).unwrap_or(1).max(1) * tu;
    let word = t * 8;
    let mut n = 0u64;
    if p.pattern == Pattern::Idle {
        while control.load(Ordering::Relaxed) != STOP {
            std::thread::park_timeout(Duration::from_millis(20));
        }
        r.cpu_end = cpu::thread_ns();
        return r;
    }
    loop {
        if n & 63 == 0 {
            // Relaxed: a stop request only needs to be seen eventually.
            match control.load(Ordering::Relaxed) {
                RUN => {}
                MARK => {
                    if r.cpu_mark.is_none() {
                        r.cpu_mark = Some(cpu::thread_ns());
                    }
                }
                _ => break,
            }
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (page, write) = match p.pattern {
            Pattern::RandomWrite => (x % pages, true),
            Pattern::RandomRead => (x % pages, false),
            Pattern::Scan => {
                scan = (scan + 1) % pages;
                (scan, false)
            }
            Pattern::Hotset => {
                let rank = zipf.map_or(0, |z| z.rank(x));
                (mix(rank ^ p.vm.seed) % pages, x >> 63 == 1)
            }
            Pattern::Idle => (0, false),
        };
        // Only populated pages are written, so the populated share holds.
        let write = write && p.vm.class(page) != PageClass::Unpopulated;
        let base = usize::try_from(page).unwrap_or(0) * PAGE;
        let missing = presence.is_some_and(|f| !f(page));
        let t0 = missing.then(Instant::now);
        if write {
            let old = mem.load(base + word);
            mem.store(base + word, old.wrapping_mul(31).wrapping_add(n | 1));
            if let Some(t0) = t0 {
                r.touched(t0.elapsed());
            }
            r.first_writes.note(page, old);
        } else {
            let v = mem.load(base + PAGE / 2 + word);
            std::hint::black_box(v);
            if let Some(t0) = t0 {
                r.touched(t0.elapsed());
            }
        }
        n += 1;
        // Relaxed: statistics only.
        ops.fetch_add(1, Ordering::Relaxed);
    }
    r.cpu_end = cpu::thread_ns();
    r
}
