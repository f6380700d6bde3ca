//! The engine's error type. Each variant's message is what an operator reads.

use ringfault_proto::auth::AuthError;
use ringfault_proto::DecodeError;

use crate::sys::mapping::MapError;
use crate::sys::pagemap::PagemapError;
use crate::sys::ring::RingError;
use crate::sys::uffd::UffdError;

/// Everything that can stop a migration.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An address string that is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("bad peer address {addr:?}: {why}")]
    BadAddress {
        /// What was given.
        addr: String,
        /// What is wrong with it.
        why: String,
    },
    /// Connecting to the peer failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The peer.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Binding the listener failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A socket read or write failed while doing `context`.
    #[error("{context}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed a connection that the session still needed.
    #[error("connection lost: {lane} lane, channel {channel}: the peer closed it or vanished")]
    ConnectionLost {
        /// `demand` or `bulk`.
        lane: &'static str,
        /// Channel index.
        channel: u16,
    },
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame from the peer")]
    Decode(#[from] DecodeError),
    /// The peer sent a valid frame at the wrong time.
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
    /// Authentication failed.
    #[error("authentication failed")]
    Auth(#[from] AuthError),
    /// The peer sent an error frame and stopped.
    #[error("the peer reported an error ({code}): {message}")]
    Peer {
        /// The peer's error code.
        code: String,
        /// The peer's message.
        message: String,
    },
    /// The two ends disagree on the guest memory layout.
    #[error("guest memory layout mismatch: {0}")]
    LayoutMismatch(String),
    /// A userfaultfd operation failed.
    #[error("userfaultfd")]
    Uffd(#[from] UffdError),
    /// Mapping memory failed.
    #[error("memory mapping")]
    Map(#[from] MapError),
    /// Reading the page map failed.
    #[error("page map")]
    Pagemap(#[from] PagemapError),
    /// An io_uring operation failed.
    #[error("io_uring")]
    Ring(#[from] RingError),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A worker thread panicked (a bug); the message is the panic's.
    #[error("internal error: worker {worker} panicked")]
    WorkerPanicked {
        /// Which worker.
        worker: String,
    },
}

impl EngineError {
    /// Wraps an I/O error with what the engine was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> EngineError {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }
}
