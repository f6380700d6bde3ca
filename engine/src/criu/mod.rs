//! A drop-in for CRIU's `criu lazy-pages` daemon: the pages of a process
//! tree restored with `criu restore --lazy-pages` come through the engine's
//! one fault loop, from the checkpoint's page images or from CRIU's own
//! page server on the dump side.
//!
//! # Mechanism
//!
//! ```text
//!  criu restore --lazy-pages                 ringfault criu-lazy-pages
//!  -------------------------                 -------------------------
//!                                            read pstree.img (how many tasks)
//!                                            listen(WORK_DIR/lazy-pages.socket)
//!  connect ─────────────────────────────────▶ accept
//!  per task, as it is restored:
//!    uffd = userfaultfd(CLOEXEC|NONBLOCK),
//!      FORK|REMAP|UNMAP|REMOVE events
//!    send(int pid) ─────────────────────────▶ pid (negative: a zombie, no fd)
//!    sendmsg(1 byte + SCM_RIGHTS uffd) ─────▶ the task's userfaultfd
//!                                            read pagemap-PID.img + mm-PID.img:
//!                                            lazy ranges, split at VMAs
//!  restorer registers lazy VMAs (MISSING)    one fault loop for every uffd:
//!  tasks run; faults ──────────(uffd)──────▶   demand: fetch the page now
//!  send(u32 0x52535446 "restore finished") ─▶   then background: every other
//!  close                                       lazy page, while faults go first
//!                                            exit when every task has exited
//!                                            or has all its lazy pages
//! ```
//!
//! The page sources ([`local::ImagePages`] from `pages-N.img`,
//! [`server::ServerPages`] from `criu dump --lazy-pages --port P` or `criu
//! page-server --lazy-pages`) implement the engine's
//! [`PageSource`](crate::destination::pages::PageSource); the fault loop
//! dedups faults, the [`Installer`](crate::destination::install::Installer)
//! installs with `UFFDIO_COPY` on the faulting task's userfaultfd.
//!
//! - [`image`]: CRIU's image files, strictly decoded.
//! - [`tasks`]: the lazy ranges of each task and the page space they form.
//! - [`socket`]: `lazy-pages.socket`: the per-task handshake and the
//!   "restore finished" word.
//! - [`session`]: what both page sources share: the restore's socket, faults
//!   outside the lazy ranges, and the events CRIU enables.
//! - [`local`], [`server`] (with [`psi`], the page server's wire format):
//!   the two page sources; [`pace`]: an optional cap on their background
//!   rate.
//! - [`daemon`]: the whole daemon, as `ringfault criu-lazy-pages` runs it.
//!
//! # Kernel versions
//! Linux 4.11 (userfaultfd FORK/REMAP/UNMAP/REMOVE events, which CRIU asks
//! for when the kernel has them); the fault loop's io_uring needs 6.7.
//!
//! # Hazards
//! * The userfaultfds arrive before the restorer registers anything: an
//!   install before the restore says it finished could find nothing
//!   registered (`ENOENT`). Only faults are served until then, as CRIU does.
//! * A task that exits makes every ioctl on its userfaultfd fail with
//!   `ESRCH`; a range it unmapped gives `ENOENT`: both settle the pages
//!   instead of failing the daemon.
//! * If the daemon dies, the kernel closes the userfaultfds and the tasks'
//!   missing pages read as zeros, exactly as with `criu lazy-pages`.

pub mod daemon;
pub mod image;
pub mod local;
pub mod pace;
pub mod psi;
pub mod server;
pub mod session;
pub mod socket;
pub mod tasks;

pub use daemon::{run, DaemonOptions, PagesFrom, Summary};
pub use image::ImageError;

use crate::error::EngineError;

/// Why the lazy-pages daemon stopped. Each message is what an operator reads.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// An image file is missing, damaged or inconsistent.
    #[error("CRIU image")]
    Image(#[from] ImageError),
    /// `lazy-pages.socket` could not be set up or used.
    #[error("{path}: {what}")]
    Socket {
        /// The socket path.
        path: String,
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Binding `lazy-pages.socket` failed.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: EngineError,
    },
    /// `criu restore` closed the socket before every task was handed over.
    #[error("criu restore closed lazy-pages.socket after {got} of {want} tasks (did the restore fail? see its log)")]
    ClosedEarly {
        /// Tasks received.
        got: usize,
        /// Tasks in pstree.img.
        want: usize,
    },
    /// A task's pid came without its userfaultfd.
    #[error("criu restore sent pid {pid} without its userfaultfd")]
    NoUffd {
        /// The task.
        pid: i32,
    },
    /// A descriptor that is not a userfaultfd.
    #[error("the descriptor sent for pid {pid} is not a userfaultfd (it is {kind})")]
    NotUffd {
        /// The task.
        pid: i32,
        /// What `/proc/self/fd` calls it.
        kind: String,
    },
    /// A pid that is not in `pstree.img`, or sent twice.
    #[error("criu restore sent pid {pid}, which {why}")]
    UnexpectedPid {
        /// The pid.
        pid: i32,
        /// "is not in pstree.img" or "was sent before".
        why: &'static str,
    },
    /// The restore sent a word that is neither a pid nor "restore finished".
    #[error("criu restore sent {word:#010x} where \"restore finished\" (0x52535446) was expected")]
    BadFinish {
        /// What came.
        word: u32,
    },
    /// The restore closed the socket without saying it finished.
    #[error("criu restore closed lazy-pages.socket before the restore finished (did it fail? see its log)")]
    RestoreHungUp,
    /// A lazy range the pagemap and the VMAs disagree on.
    #[error("task {pid}: lazy pages at {addr:#x} {why} (pagemap-{pid}.img against mm-{pid}.img)")]
    Inconsistent {
        /// The task.
        pid: u32,
        /// Where.
        addr: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Lazy pages whose data is in a parent snapshot (`--prev-images-dir`).
    #[error("task {pid}: the lazy pages at {addr:#x} are in a parent snapshot (pre-dump); ringfault criu-lazy-pages does not read parent images")]
    ParentImages {
        /// The task.
        pid: u32,
        /// Where.
        addr: u64,
    },
    /// A pages image that cannot hold what its pagemap says.
    #[error("{path}: {why}")]
    PagesImage {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// Local images mode, but a lazy range is not in the pages image.
    #[error("task {pid}: the lazy pages at {addr:#x} are not in pages-{pages_id}.img (dumped with --lazy-pages? then serve them with --page-server)")]
    NotInImage {
        /// The task.
        pid: u32,
        /// Where.
        addr: u64,
        /// N of pages-N.img.
        pages_id: u32,
    },
    /// Something a restored task did that this daemon cannot serve.
    #[error("task {pid}: {what} is not supported by ringfault criu-lazy-pages")]
    Unsupported {
        /// The task.
        pid: u32,
        /// What it did.
        what: String,
    },
    /// Connecting to the page server failed.
    #[error("cannot connect to the page server at {addr}")]
    Connect {
        /// HOST:PORT.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The page server closed the connection while pages were missing.
    #[error("the page server closed the connection with {missing} lazy pages still missing")]
    PageServerClosed {
        /// Pages that never came.
        missing: u64,
    },
    /// The page server answered something that is not a valid reply.
    #[error("bad reply from the page server")]
    PageServerReply(#[from] psi::PsiError),
    /// The fault loop or an installer failed.
    #[error("fault loop")]
    Engine(#[source] EngineError),
}

impl From<EngineError> for CriuError {
    fn from(e: EngineError) -> CriuError {
        match e {
            EngineError::Criu(inner) => *inner,
            other => CriuError::Engine(other),
        }
    }
}

impl From<CriuError> for EngineError {
    fn from(e: CriuError) -> EngineError {
        match e {
            CriuError::Engine(inner) => inner,
            other => EngineError::Criu(Box::new(other)),
        }
    }
}

impl CriuError {
    fn socket(path: &std::path::Path, what: &'static str, source: std::io::Error) -> CriuError {
        CriuError::Socket {
            path: path.display().to_string(),
            what,
            source,
        }
    }
}
