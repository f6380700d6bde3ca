//! ringfault engine: post-copy migration of guest memory over TCP.
//!
//! - [`Source`](source::Source) serves guest memory (or a memory file);
//!   [`Destination`](destination::Destination) registers its memory with
//!   userfaultfd, fetches faulting pages on a demand lane and receives every
//!   other page on bulk lanes until all are present.
//! - One fault loop ([`destination::faultloop`]) serves every destination,
//!   whatever the [`PageSource`](destination::pages::PageSource): a remote
//!   source, a local memory file, CRIU's page images or page server
//!   ([`criu`], a drop-in for `criu lazy-pages`).
//! - The socket-free core ([`schedule`], [`bitmap`], [`space`]) decides which
//!   page goes next.
//! - [`verify`]: digests of every page after completion, to prove that both
//!   ends hold the same bytes.
//! - All `unsafe` code lives in [`sys`]; everything else is safe Rust.
//!
//! Guest memory is never a Rust slice: see [`sys::guest`].
#![deny(unsafe_code)]

pub mod addr;
pub mod bitmap;
pub mod criu;
pub mod destination;
pub mod error;
pub mod firecracker;
pub mod handshake;
pub mod schedule;
pub mod source;
pub mod space;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
pub mod verify;
pub mod wire;

pub use addr::PeerAddr;
pub use destination::{BulkReceive, Destination, DestinationConfig, InstallMode, Verify};
pub use error::EngineError;
pub use ringfault_proto::{Cipher, Protection};
pub use source::{Source, SourceConfig};
pub use sys::guest::GuestMemory;
