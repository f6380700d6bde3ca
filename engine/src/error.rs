//! The engine's error type. Each variant's message is what an operator reads;
//! variants differ where a caller can act on the difference.

use ringfault_proto::auth::AuthError;
use ringfault_proto::{DecodeError, ErrorCode, MsgKind, Protection, SealError};

use crate::sys::guest::GuestError;
use crate::sys::mapping::MapError;
use crate::sys::pagemap::PagemapError;
use crate::sys::ring::RingError;
use crate::sys::uffd::UffdError;

/// Which connection of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneId {
    /// `demand` or `bulk`.
    pub lane: &'static str,
    /// Channel index (0 for the demand lane).
    pub channel: u16,
}

impl LaneId {
    /// The demand lane.
    pub const DEMAND: LaneId = LaneId {
        lane: "demand",
        channel: 0,
    };

    /// Bulk lane `channel`.
    pub fn bulk(channel: u16) -> LaneId {
        LaneId {
            lane: "bulk",
            channel,
        }
    }
}

impl std::fmt::Display for LaneId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} lane {}", self.lane, self.channel)
    }
}

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
    /// The address is taken by something the engine must not replace.
    #[error("cannot listen on {addr}: {why}")]
    AddressInUse {
        /// The address.
        addr: String,
        /// What is there.
        why: String,
    },
    /// A system call failed while doing `context`.
    #[error("{context}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed a connection that the session still needed.
    #[error("connection lost: {lane}: the peer closed it or vanished")]
    ConnectionLost {
        /// Which connection.
        lane: LaneId,
    },
    /// The peer stayed silent past the liveness timeout.
    #[error(
        "connection lost: {lane}: the peer has been silent for {silent_s:.1} s (liveness timeout)"
    )]
    Silent {
        /// Which connection.
        lane: LaneId,
        /// Seconds since the last byte.
        silent_s: f64,
    },
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame from the peer on the {lane}")]
    Decode {
        /// Which connection.
        lane: LaneId,
        /// What was wrong.
        #[source]
        source: DecodeError,
    },
    /// A valid frame that names a region the session's layout does not have.
    #[error("the peer named region {region} on the {lane}, which is not in the session's layout")]
    UnknownRegion {
        /// Which connection.
        lane: LaneId,
        /// The region id it named.
        region: u32,
    },
    /// A valid frame that names pages outside their region.
    #[error("the peer named pages {page:#x}..+{count:#x} of region {region} on the {lane}, which has {region_pages:#x} pages")]
    PageOutOfRange {
        /// Which connection.
        lane: LaneId,
        /// Region id.
        region: u32,
        /// First page.
        page: u64,
        /// Pages.
        count: u64,
        /// Pages in the region.
        region_pages: u64,
    },
    /// A frame failed its integrity check: altered, injected, replayed or
    /// reordered on the path. Nothing from it was installed.
    #[error("integrity check failed on the {lane}: a frame was altered, injected, replayed or reordered on the path; nothing from it was used")]
    Integrity {
        /// Which connection.
        lane: LaneId,
        /// The check.
        #[source]
        source: SealError,
    },
    /// A valid frame at the wrong time (the session's state machine).
    #[error("protocol violation on the {lane}: {kind:?} is not allowed {state}")]
    Unexpected {
        /// Which connection.
        lane: LaneId,
        /// The frame.
        kind: MsgKind,
        /// When it came, e.g. "before Complete was sent".
        state: &'static str,
    },
    /// A frame larger than the receive ring can hold.
    #[error("a {len}-byte frame on the {lane} exceeds the receive ring ({max} bytes)")]
    FrameTooLarge {
        /// Which connection.
        lane: LaneId,
        /// Frame bytes.
        len: usize,
        /// Ring bytes.
        max: usize,
    },
    /// A `Data` payload that does not start on a 4 KiB boundary of a lane
    /// that asked for aligned payloads (`LANE_ALIGN_PAYLOAD`).
    #[error("a payload on the {lane} starts at byte {at} of the stream, off the 4 KiB boundary the lane asked for")]
    Misaligned {
        /// Which connection.
        lane: LaneId,
        /// Where the payload starts in the lane's byte stream.
        at: u64,
    },
    /// Authentication failed.
    #[error("authentication failed")]
    Auth(#[from] AuthError),
    /// The two ends want different frame protection.
    #[error("frame protection mismatch: this side requires {ours}, the peer asked for {theirs} (both ends must use the same --integrity/--encrypt)")]
    Protection {
        /// Ours.
        ours: &'static str,
        /// Theirs.
        theirs: &'static str,
    },
    /// The peer sent an error frame and stopped.
    #[error("the peer reported an error ({code:?}): {message}")]
    Peer {
        /// The peer's error code.
        code: ErrorCode,
        /// The peer's message.
        message: String,
    },
    /// The two ends disagree on the guest memory layout.
    #[error("guest memory layout mismatch: {0}")]
    LayoutMismatch(String),
    /// A resume named a session this source does not hold, or the source
    /// serves another one.
    #[error("session refused: {0}")]
    Session(String),
    /// The link stayed down longer than the resume timeout.
    #[error("the link to the peer stayed down for {waited_s:.0} s, longer than --resume-timeout; giving up (the destination's memory is incomplete; its faulting threads stay blocked)")]
    ResumeTimeout {
        /// Seconds waited.
        waited_s: f64,
    },
    /// A memory file is shorter than the memory it is said to hold.
    #[error("memory file {path}: {why}")]
    MemoryFile {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A userfaultfd operation failed.
    #[error("userfaultfd")]
    Uffd(#[from] UffdError),
    /// Mapping memory failed.
    #[error("memory mapping")]
    Map(#[from] MapError),
    /// Guest memory access failed.
    #[error("guest memory")]
    Guest(#[from] GuestError),
    /// Scanning the page tables failed.
    #[error("page map")]
    Pagemap(#[from] PagemapError),
    /// An io_uring operation failed.
    #[error("io_uring")]
    Ring(#[from] RingError),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// This kernel lacks a feature the requested mode needs.
    #[error("not supported here: {0}")]
    Unsupported(String),
    /// A worker thread panicked (a bug).
    #[error("internal error: worker {worker} panicked")]
    WorkerPanicked {
        /// Which worker.
        worker: String,
    },
    /// An engine invariant broke (a bug, never the peer's doing).
    #[error("internal error: {0}")]
    Internal(String),
    /// CRIU's lazy pages: the restore, its images or its page server.
    #[error("CRIU lazy pages")]
    Criu(#[source] Box<crate::criu::CriuError>),
}

impl EngineError {
    /// A frame from the peer on `lane` that failed a check against the
    /// session's layout: an unknown region or pages out of range get their
    /// own variants (the layouts differ, or the peer is wrong about them);
    /// anything else is [`EngineError::Decode`].
    pub fn validation(lane: LaneId, source: DecodeError) -> EngineError {
        match source {
            DecodeError::UnknownRegion { region } => EngineError::UnknownRegion { lane, region },
            DecodeError::PageOutOfRange {
                region,
                page,
                count,
                region_pages,
            } => EngineError::PageOutOfRange {
                lane,
                region,
                page,
                count,
                region_pages,
            },
            source => EngineError::Decode { lane, source },
        }
    }

    /// Wraps an I/O error with what the engine was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> EngineError {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }

    /// The error code to send the peer before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Auth(_) => ErrorCode::AuthFailed,
            EngineError::Decode { .. }
            | EngineError::Unexpected { .. }
            | EngineError::FrameTooLarge { .. }
            | EngineError::Misaligned { .. } => ErrorCode::Protocol,
            EngineError::Integrity { .. } => ErrorCode::Integrity,
            EngineError::LayoutMismatch(_)
            | EngineError::UnknownRegion { .. }
            | EngineError::PageOutOfRange { .. } => ErrorCode::LayoutMismatch,
            EngineError::Silent { .. } | EngineError::ResumeTimeout { .. } => ErrorCode::Timeout,
            EngineError::Session(_) => ErrorCode::Busy,
            EngineError::Protection { .. } => ErrorCode::AuthFailed,
            _ => ErrorCode::Internal,
        }
    }

    /// Whether the link failed (so a resume may help), as opposed to the
    /// peer misbehaving or a local failure.
    pub fn is_link_loss(&self) -> bool {
        matches!(
            self,
            EngineError::ConnectionLost { .. } | EngineError::Silent { .. }
        ) || matches!(self, EngineError::Io { source, .. } if link_lost(source))
    }
}

/// A copy of `e` for an error of our own, keeping its OS error code (which
/// [`link_lost`] and the operator's message rely on).
pub fn copy_io(e: &std::io::Error) -> std::io::Error {
    e.raw_os_error().map_or_else(
        || std::io::Error::new(e.kind(), e.to_string()),
        std::io::Error::from_raw_os_error,
    )
}

/// Whether an error on a connected socket means that the link to the peer
/// is gone (reset, timed out, unreachable, or the local interface down), so
/// that a resume may help. Every lane classifies its socket errors here.
pub fn link_lost(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::TimedOut
            | K::UnexpectedEof
            | K::NetworkUnreachable
            | K::HostUnreachable
            | K::NetworkDown
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::ETIMEDOUT
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::ENETDOWN
                | libc::EHOSTDOWN
                | libc::ENETRESET
        )
    )
}

/// A name for a protection mode, for [`EngineError::Protection`].
pub fn protection_name(p: Protection) -> &'static str {
    p.name()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link that goes down mid-migration shows up as any of these errors,
    /// depending on which end lost its interface and when: each must lead
    /// to a resume, not to the end of the session (an unreachable network
    /// once ended a handler whose link was down for 3 s).
    #[test]
    fn resume_follows_every_link_loss_errno() {
        for errno in [
            libc::ECONNRESET,
            libc::ECONNABORTED,
            libc::EPIPE,
            libc::ETIMEDOUT,
            libc::ENETUNREACH,
            libc::EHOSTUNREACH,
            libc::ENETDOWN,
            libc::EHOSTDOWN,
            libc::ENETRESET,
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(link_lost(&e), "errno {errno}");
            let copy = copy_io(&e);
            assert_eq!(copy.raw_os_error(), Some(errno));
            assert!(
                EngineError::io("receiving", copy).is_link_loss(),
                "errno {errno}"
            );
        }
        for errno in [libc::EINVAL, libc::EBADF, libc::ENOMEM, libc::EACCES] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(!link_lost(&e), "errno {errno}");
            assert!(!EngineError::io("receiving", e).is_link_loss());
        }
    }
}
