//! The whole lazy-pages daemon, as `ringfault criu-lazy-pages` runs it:
//! read `pstree.img`, listen on `lazy-pages.socket`, take every task's
//! userfaultfd, read each task's pagemap and VMAs, and serve all of them
//! from one fault loop until the restore finished and every task has all
//! its lazy pages or has exited.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::image::{self, PstreeEntry};
use super::local::{ImagePages, RUN_BYTES};
use super::server::{ServerOptions, ServerPages};
use super::session::{Session, TaskState};
use super::socket::{self, Listener};
use super::tasks::{self, TaskImage};
use super::CriuError;
use crate::destination::faultloop::{self, LoopConfig, LoopReport};
use crate::destination::install::Installer;
use crate::destination::pages::PageSource;
use crate::stats::Counters;
use crate::sys::uffd::Uffd;

/// Where the lazy pages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PagesFrom {
    /// `pages-N.img` in the images directory.
    Images,
    /// CRIU's page server at `HOST:PORT`.
    PageServer(String),
}

/// The daemon's settings.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Where `pstree.img`, `pagemap-*.img`, `mm-*.img` (and, for
    /// [`PagesFrom::Images`], `pages-*.img`) are.
    pub images_dir: PathBuf,
    /// Where `lazy-pages.socket` is created (`criu restore --work-dir`).
    pub work_dir: PathBuf,
    /// Where the pages come from.
    pub from: PagesFrom,
    /// Local images: most bytes the background installs per loop turn.
    pub run_bytes: usize,
    /// Page server: the background transfer's settings.
    pub server: ServerOptions,
    /// Most bytes per second the background transfer may move (0: no cap,
    /// the default). Faults are never held back.
    pub background_rate: u64,
}

impl DaemonOptions {
    /// Defaults for `images_dir`, with the socket in the same directory (as
    /// CRIU's default work directory).
    pub fn new(images_dir: &Path, from: PagesFrom) -> DaemonOptions {
        DaemonOptions {
            images_dir: images_dir.to_owned(),
            work_dir: images_dir.to_owned(),
            from,
            run_bytes: RUN_BYTES,
            server: ServerOptions::default(),
            background_rate: 0,
        }
    }
}

/// One task at the end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskSummary {
    /// Its pid in the images.
    pub pid: u32,
    /// Lazy pages it had.
    pub lazy_pages: u64,
    /// It exited before all its pages were present.
    pub exited: bool,
    /// Faults outside its lazy ranges (served with zero pages).
    pub zero_faults: u64,
}

/// What the daemon did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// "images" or "page-server HOST:PORT".
    pub source: String,
    /// Live tasks served.
    pub tasks: Vec<TaskSummary>,
    /// Zombies (nothing to serve).
    pub zombies: Vec<u32>,
    /// Lazy pages of all tasks.
    pub lazy_pages: u64,
    /// From the handover to the end (every page present, or its task gone).
    pub elapsed_s: f64,
    /// Faults read from the userfaultfds.
    pub faults: u64,
    /// Pages installed for faults.
    pub demand_pages: u64,
    /// Pages installed by the background transfer.
    pub background_pages: u64,
    /// Faults served with a zero page (outside every lazy range, or dropped).
    pub zero_faults: u64,
    /// Faults on a page already being fetched.
    pub coalesced_faults: u64,
    /// Fault service time (fault read to page present), µs.
    pub fault_p50_us: f64,
    /// Fault service time, 99th percentile, µs.
    pub fault_p99_us: f64,
    /// Fault service time, worst, µs.
    pub fault_max_us: f64,
    /// Page server: requests sent for faults, and by the background.
    pub requests: (u64, u64),
    /// Page bytes that came from the images or the page server.
    pub page_bytes: u64,
    /// CPU time of the fault loop, s.
    pub cpu_s: f64,
}

impl Summary {
    /// One line for an operator.
    pub fn line(&self) -> String {
        let exited = self.tasks.iter().filter(|t| t.exited).count();
        format!(
            "{} task(s) ({} exited early, {} zombie(s)), {} lazy pages ({:.1} MiB) from {} in {:.3} s: \
             {} faults (p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs), {} demand + {} background pages, \
             {} zero-page faults, {:.2} s CPU",
            self.tasks.len(),
            exited,
            self.zombies.len(),
            self.lazy_pages,
            self.lazy_pages as f64 * 4096.0 / f64::from(1 << 20),
            self.source,
            self.elapsed_s,
            self.faults,
            self.fault_p50_us,
            self.fault_p99_us,
            self.fault_max_us,
            self.demand_pages,
            self.background_pages,
            self.zero_faults,
            self.cpu_s,
        )
    }

    /// As JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A daemon listening for the restore.
#[derive(Debug)]
pub struct Daemon {
    opts: DaemonOptions,
    pstree: Vec<PstreeEntry>,
    listener: Listener,
}

impl Daemon {
    /// Reads `pstree.img` and listens on `WORK_DIR/lazy-pages.socket`.
    pub fn listen(opts: DaemonOptions) -> Result<Daemon, CriuError> {
        let pstree = image::read_pstree(&opts.images_dir)?;
        let listener = socket::listen(&opts.work_dir)?;
        Ok(Daemon {
            opts,
            pstree,
            listener,
        })
    }

    /// Where the restore connects.
    pub fn socket_path(&self) -> &Path {
        self.listener.path()
    }

    /// The tasks `pstree.img` lists.
    pub fn task_count(&self) -> usize {
        self.pstree.len()
    }

    /// Waits for the restore, then serves its tasks until the end.
    pub fn serve(self) -> Result<Summary, CriuError> {
        let pids: Vec<u32> = self.pstree.iter().map(|e| e.pid).collect();
        let hand = socket::accept(&self.listener, &pids)?;
        drop(self.listener);
        let started = Instant::now();
        let opts = &self.opts;
        let mut images = Vec::with_capacity(hand.tasks.len());
        let mut uffds = Vec::with_capacity(hand.tasks.len());
        for t in hand.tasks {
            images.push(tasks::load(&opts.images_dir, t.pid)?);
            uffds.push(Uffd::from_fd(t.uffd));
        }
        let source_name = match &opts.from {
            PagesFrom::Images => "images".to_owned(),
            PagesFrom::PageServer(a) => format!("page-server {a}"),
        };
        if uffds.is_empty() {
            // Only zombies: nothing to serve but the restore's end.
            wait_finished(&hand.stream)?;
            return Ok(summary(source_name, &images, hand.zombies, started));
        }
        let ts = tasks::space_of(&images);
        let total = ts.space.total();
        // CRIU's userfaultfds deliver REMOVE events: read them under the gate.
        let inst = Installer::for_tasks(uffds, ts.space, true)?;
        let states: Vec<TaskState> = images
            .iter()
            .map(|t| TaskState {
                pid: t.pid,
                lazy_pages: t.lazy_pages(),
                zero_faults: 0,
            })
            .collect();
        tracing::info!(
            "{} task(s), {} lazy pages, {} region(s)",
            states.len(),
            total,
            ts.regions.len()
        );
        let session = Session::new(hand.stream, states, ts.regions)
            .with_background_rate(opts.background_rate);
        let cfg = LoopConfig {
            name: "criu lazy pages",
            core: None,
            class: None,
            unregister: false,
        };
        let (rep, states, extra) = match &opts.from {
            PagesFrom::Images => {
                let mut src = ImagePages::new(&opts.images_dir, &images, session, opts.run_bytes)?;
                let rep = run_loop(&inst, &mut src, &cfg)?;
                let bytes = src.pages_copied * 4096;
                (rep, src.session().tasks.clone(), (0, 0, bytes))
            }
            PagesFrom::PageServer(addr) => {
                let mut src = ServerPages::connect(addr, total, session, opts.server)?;
                let rep = run_loop(&inst, &mut src, &cfg)?;
                let extra = (src.demand_requests, src.background_requests, src.page_bytes);
                (rep, src.session().tasks.clone(), extra)
            }
        };
        let mut sum = summary(source_name, &images, hand.zombies, started);
        fill(&mut sum, &inst, &rep, &states);
        sum.requests = (extra.0, extra.1);
        sum.page_bytes = extra.2;
        Ok(sum)
    }
}

fn run_loop<S: PageSource>(
    inst: &Installer,
    src: &mut S,
    cfg: &LoopConfig,
) -> Result<LoopReport, CriuError> {
    faultloop::run(inst, src, cfg).map_err(CriuError::from)
}

/// Waits (blocking) for "restore finished" and the close.
fn wait_finished(stream: &UnixStream) -> Result<(), CriuError> {
    use std::io::Read;
    stream
        .set_nonblocking(false)
        .map_err(|e| CriuError::socket(Path::new(socket::SOCKET_NAME), "reading", e))?;
    let mut word = [0u8; 4];
    let mut s = stream;
    match s.read_exact(&mut word) {
        Ok(()) => {
            let w = u32::from_ne_bytes(word);
            if w == socket::RESTORE_FINISHED {
                Ok(())
            } else {
                Err(CriuError::BadFinish { word: w })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(CriuError::RestoreHungUp),
        Err(e) => Err(CriuError::socket(
            Path::new(socket::SOCKET_NAME),
            "reading",
            e,
        )),
    }
}

fn summary(source: String, images: &[TaskImage], zombies: Vec<u32>, started: Instant) -> Summary {
    Summary {
        source,
        tasks: images
            .iter()
            .map(|t| TaskSummary {
                pid: t.pid,
                lazy_pages: t.lazy_pages(),
                exited: false,
                zero_faults: 0,
            })
            .collect(),
        zombies,
        lazy_pages: images.iter().map(TaskImage::lazy_pages).sum(),
        elapsed_s: started.elapsed().as_secs_f64(),
        faults: 0,
        demand_pages: 0,
        background_pages: 0,
        zero_faults: 0,
        coalesced_faults: 0,
        fault_p50_us: 0.0,
        fault_p99_us: 0.0,
        fault_max_us: 0.0,
        requests: (0, 0),
        page_bytes: 0,
        cpu_s: 0.0,
    }
}

/// Adds what the fault loop counted.
fn fill(s: &mut Summary, inst: &Installer, rep: &LoopReport, states: &[TaskState]) {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let c: &Counters = &inst.counters;
    s.elapsed_s = s.elapsed_s.max(0.0);
    s.faults = load(&c.faults);
    s.demand_pages = load(&c.demand_pages);
    s.background_pages = load(&c.bulk_pages);
    s.zero_faults = load(&c.zero_faults);
    s.coalesced_faults = load(&c.coalesced_faults);
    s.cpu_s = load(&c.fault_loop_cpu_ns) as f64 / 1e9;
    let h = &rep.hist;
    if !h.is_empty() {
        s.fault_p50_us = h.value_at_quantile(0.5) as f64 / 1000.0;
        s.fault_p99_us = h.value_at_quantile(0.99) as f64 / 1000.0;
        s.fault_max_us = h.max() as f64 / 1000.0;
    }
    for (owner, t) in (0u32..).zip(s.tasks.iter_mut()) {
        t.exited = inst.is_gone(owner);
        if let Some(st) = states.get(usize::try_from(owner).unwrap_or(usize::MAX)) {
            t.zero_faults = st.zero_faults;
        }
    }
}

/// Runs the daemon: listen, wait for the restore, serve until the end.
pub fn run(opts: DaemonOptions) -> Result<Summary, CriuError> {
    Daemon::listen(opts)?.serve()
}
