//! ringfault engine: post-copy migration of guest memory over TCP.
//!
//! - [`Source`](source::Source) serves guest memory regions;
//!   [`Destination`](destination::Destination) registers its memory with
//!   userfaultfd, fetches faulting pages on a demand lane and receives every other
//!   page on bulk lanes until all are present.
//! - The socket-free core ([`schedule`], [`bitmap`]) decides which page goes next.
//! - All `unsafe` code lives in [`sys`]: userfaultfd, io_uring, mappings, page map.
//!
//! Guest memory is never a Rust slice: see [`sys::guest`].

pub mod addr;
pub mod bitmap;
pub mod conn;
pub mod destination;
pub mod error;
pub mod firecracker;
pub mod handshake;
pub mod schedule;
pub mod source;
pub mod stats;
pub mod sys;

pub use addr::PeerAddr;
pub use destination::{Destination, DestinationConfig, InstallMode};
pub use error::EngineError;
pub use source::{Source, SourceConfig, SourceRegion};
