//! A drop-in page-fault handler for Firecracker snapshot restores.
//!
//! Firecracker loads a snapshot with `"mem_backend": {"backend_type": "Uffd",
//! "backend_path": SOCKET}` and hands guest memory to an external handler:
//!
//! ```text
//!  Firecracker                                   ringfault uffd-handler
//!  -----------                                   ----------------------
//!  mmap guest regions (anonymous)                listen(SOCKET)
//!  uffd = userfaultfd(O_CLOEXEC|O_NONBLOCK)
//!  UFFDIO_API(EVENT_REMOVE)
//!  UFFDIO_REGISTER(MISSING) every region
//!  connect(SOCKET) ────────────────────────────▶ accept; SO_PEERCRED -> pid
//!  sendmsg(JSON mappings + SCM_RIGHTS uffd) ───▶ recvmsg; parse and check
//!  vCPUs run; faults ──────────(uffd)────────▶ PAGEFAULT -> COPY / ZEROPAGE
//!  balloon: madvise(DONTNEED) ─(uffd)────────▶ REMOVE -> range reads zeros
//!  exits / is killed: socket EOF ──────────────▶ exit 0
//! ```
//!
//! - [`mappings`]: the JSON message, checked before anything is trusted;
//! - [`handshake`]: the Unix-socket side: accept, receive the message and the
//!   userfaultfd, and notice when Firecracker goes away;
//! - [`local`]: the fault loop that serves pages from a snapshot memory file;
//! - [`remote`]: the engine's [`Destination`](crate::Destination) attached to
//!   Firecracker's userfaultfd, fed by a source on another host (post-copy);
//! - [`stats`]: what the handler reports at exit and on request.
//!
//! Kernel: Linux 4.11 (userfaultfd REMOVE events). Hazards, as Firecracker's own
//! handler documentation warns:
//! - the userfaultfd arrives already initialised (`UFFDIO_API` done); a second
//!   `UFFDIO_API` fails, so it is never issued here;
//! - while a REMOVE event is pending, every install ioctl fails with `EAGAIN`:
//!   read the events first, then retry;
//! - a fault can be read *before* the REMOVE that causally precedes it, so every
//!   event that has been read is applied (REMOVEs first) before a page is chosen;
//! - Firecracker waits forever on a handler that died, so bad input must give a
//!   clear error and a non-zero exit, never a panic or a silent hang.

pub mod handshake;
pub mod local;
pub mod mappings;
pub mod remote;
pub mod stats;

pub use handshake::{accept, hand_over, listen, Handshake};
pub use local::{serve_local, LocalOptions};
pub use mappings::{GuestRegionMapping, MappingsError};
pub use remote::serve_remote;
pub use stats::{HandlerReport, HandlerStats};

use crate::error::EngineError;
use crate::sys::mapping::MapError;
use crate::sys::uffd::UffdError;

/// How a handler session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Firecracker closed the socket or exited: the handler has nothing left to do.
    PeerGone,
}

/// Why the handler stopped. Each message is what an operator reads.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    /// Binding or accepting on the handler socket failed.
    #[error("handler socket {path}: {what}")]
    Socket {
        /// The socket path.
        path: String,
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Firecracker connected and closed the socket before its message was complete.
    #[error("Firecracker closed the socket before sending its guest memory mappings ({got} bytes received)")]
    ClosedEarly {
        /// Bytes that did arrive.
        got: usize,
    },
    /// The message did not arrive in time.
    #[error("no complete guest memory mappings message within {secs} s ({got} bytes received)")]
    Timeout {
        /// The deadline.
        secs: u64,
        /// Bytes that did arrive.
        got: usize,
    },
    /// The message is larger than any real one.
    #[error("the mappings message exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The message came without the userfaultfd.
    #[error(
        "Firecracker's message carried no userfaultfd (expected one descriptor as SCM_RIGHTS)"
    )]
    NoUffd,
    /// More than one descriptor came.
    #[error("Firecracker's message carried {count} descriptors; expected exactly one userfaultfd")]
    ExtraFds {
        /// How many.
        count: usize,
    },
    /// The descriptor is not a userfaultfd.
    #[error("the descriptor Firecracker sent is not a userfaultfd (it is {kind})")]
    NotUffd {
        /// What `/proc/self/fd` says it is.
        kind: String,
    },
    /// The mappings were refused.
    #[error("bad guest memory mappings from Firecracker")]
    Mappings(#[from] MappingsError),
    /// The memory file cannot be used.
    #[error("memory file: {what}")]
    MemoryFile {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memory file failed.
    #[error("mapping the memory file")]
    Map(#[from] MapError),
    /// A userfaultfd operation failed.
    #[error("userfaultfd")]
    Uffd(#[from] UffdError),
    /// A socket or poll operation failed while doing `context`.
    #[error("{context}")]
    Io {
        /// What the handler was doing.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Remote mode: the migration engine failed.
    #[error("post-copy from the remote source failed")]
    Engine(#[from] EngineError),
}

impl FirecrackerError {
    fn io(context: &'static str, source: std::io::Error) -> FirecrackerError {
        FirecrackerError::Io { context, source }
    }
}
