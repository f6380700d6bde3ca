#![forbid(unsafe_code)]
//! ringfault wire protocol: fixed little-endian frames, no I/O.
//!
//! Post-copy migration of guest memory between a **source** (where the guest
//! ran) and a **destination** (where it runs now). The destination opens
//! every TCP connection; each channel `0..channel_count` has one connection
//! per lane: the **demand lane** carries only `Demand` requests and their
//! `Pages` replies, so a faulting vCPU never waits behind bulk traffic; the
//! **bulk lane** carries background `Pages`, `PresentBitmap`, `DiscardList`
//! and the completion exchange (the latter on channel 0). `docs/protocol.md`
//! has the byte layouts and sequence diagrams.
//!
//! # Frames
//! `kind: u16 | flags: u16 = 0 | body_len: u32` ([`FrameHeader`]), then
//! `body_len` bytes of body ([`Message`]), then, for `Pages` of kind `Data`
//! only, `payload_len` bytes of page contents not counted in `body_len`.
//! All integers are little-endian. Every enum reserves `0 = Invalid`.
//!
//! # Per-connection state machine (destination side)
//! ```text
//!  [Connect] --send Hello--> [AwaitChallenge]
//!  [AwaitChallenge] --Challenge, verify_source ok, send Proof--> [AwaitWelcome]
//!  [AwaitChallenge] --bad MAC--> send Error(AuthFailed), close
//!  [AwaitWelcome] --Welcome (layout; equal to the session's on resume)--> [Open]
//!  [Open]  demand lane: send Demand, recv Pages(request_id echo) ...
//!          bulk lane:   recv Pages(request_id 0), recv DiscardList chunks,
//!                       send PresentBitmap chunks (after a resume)
//!  [Open] --all pages present (channel 0 bulk): send Complete--> [AwaitAck]
//!  [AwaitAck] --CompleteAck--> send Release, close all connections --> [Done]
//!  any state --Error or decode failure--> close; on link loss with RESUME:
//!           reconnect with Hello{resume: true, same session} --> [AwaitChallenge]
//! ```
//!
//! # Per-connection state machine (source side)
//! ```text
//!  [Listen] --Hello (magic, version, role checked)--> send Challenge --> [AwaitProof]
//!  [AwaitProof] --Proof, verify_destination ok--> send Welcome --> [Open]
//!  [AwaitProof] --bad MAC--> send Error(AuthFailed), close (no layout leaked)
//!  [Open]  demand lane: recv Demand -> validate -> send Pages(request_id)
//!          bulk lane:   send Pages(request_id 0) for pages not yet sent,
//!                       send DiscardList at switch-over (pre+post),
//!                       recv PresentBitmap after a resume -> skip present pages
//!  [Open] --Complete (pages_present == total)--> stop sending, send CompleteAck --> [AwaitRelease]
//!  [AwaitRelease] --Release--> free guest memory --> [Done]
//! ```
//!
//! # Trust
//! Decoding checks syntax and every peer-given size before allocating
//! (never much more than [`MAX_BODY_LEN`]); references into guest memory are
//! checked against the negotiated [`Layout`] by the `validate` methods,
//! which the engine must call before it touches memory.

pub mod auth;
mod control;
mod demand;
mod error;
mod frame;
mod handshake;
mod layout;
mod message;
mod pages;
pub mod rle;
pub mod varint;

pub use control::{Complete, CompleteAck, ErrorCode, ErrorFrame, Release};
pub use demand::{encode_demand_frame, DemandRequest};
pub use error::DecodeError;
pub use frame::{FrameHeader, MsgKind};
pub use handshake::{
    Capabilities, Challenge, Hello, Lane, Mac, Nonce, Proof, Role, SessionId, Welcome,
};
pub use layout::{Layout, PageSize, RegionDesc};
pub use message::{decode_frame, Message};
pub use pages::{encode_pages_frame, PageKind, PagesHeader};
pub use rle::{encode_rle_chunks, RleChunk};

/// `b"RINGFLT1"` read as a little-endian `u64`; first field of `Hello` and
/// `Challenge`.
pub const MAGIC: u64 = 0x3154_4c46_474e_4952;
/// The protocol version this build speaks (exact match required).
pub const VERSION: u16 = 1;
/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// No body above this; caps every peer-sized allocation.
pub const MAX_BODY_LEN: usize = 64 * 1024 + 64;
/// Most regions in a layout.
pub const MAX_REGIONS: usize = 1024;
/// Most bytes in an error message.
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Most encoded run bytes per bitmap/discard chunk.
pub const MAX_RLE_CHUNK: usize = 64 * 1024;
/// Most pages in one `Pages` frame.
pub const MAX_PAGES_PER_FRAME: u32 = 1 << 16;
/// Most payload bytes after one `Pages` frame (1 GiB: one 1 GiB page).
pub const MAX_PAYLOAD_LEN: u32 = 1 << 30;
/// Most pages of prefetch on each side of a demanded page.
pub const MAX_PREFETCH: u32 = 4096;
/// Most channels in one migration (`Hello::channel_count`).
pub const MAX_CHANNELS: u16 = 256;

/// `Hello` body bytes.
pub const HELLO_BODY_LEN: usize = 80;
/// `Challenge` body bytes.
pub const CHALLENGE_BODY_LEN: usize = 104;
/// `Proof` body bytes.
pub const PROOF_BODY_LEN: usize = 32;
/// Fixed part of a `Welcome` body (before the region descriptors).
pub const WELCOME_HEADER_LEN: usize = 24;
/// One region descriptor in `Welcome`.
pub const REGION_DESC_LEN: usize = 16;
/// `Pages` body bytes.
pub const PAGES_BODY_LEN: usize = 32;
/// `Demand` body bytes.
pub const DEMAND_BODY_LEN: usize = 32;
/// Fixed part of a `PresentBitmap`/`DiscardList` body (before the runs).
pub const RLE_HEADER_LEN: usize = 24;
/// `Complete` body bytes.
pub const COMPLETE_BODY_LEN: usize = 8;
/// Fixed part of an `Error` body (before the message).
pub const ERROR_HEADER_LEN: usize = 4;
/// A whole `Pages` frame, header and body (payload excluded).
pub const PAGES_FRAME_LEN: usize = FRAME_HEADER_LEN + PAGES_BODY_LEN;
/// A whole `Demand` frame, header and body.
pub const DEMAND_FRAME_LEN: usize = FRAME_HEADER_LEN + DEMAND_BODY_LEN;

pub(crate) const PAGES_BODY_LEN_U32: u32 = 32;
pub(crate) const DEMAND_BODY_LEN_U32: u32 = 32;

const _: () = assert!(PAGES_BODY_LEN_U32 as usize == PAGES_BODY_LEN);
const _: () = assert!(DEMAND_BODY_LEN_U32 as usize == DEMAND_BODY_LEN);
const _: () = assert!(WELCOME_HEADER_LEN + MAX_REGIONS * REGION_DESC_LEN <= MAX_BODY_LEN);
const _: () = assert!(RLE_HEADER_LEN + MAX_RLE_CHUNK <= MAX_BODY_LEN);
const _: () = assert!(ERROR_HEADER_LEN + MAX_ERROR_MESSAGE <= MAX_BODY_LEN);
const _: () = assert!(u64::from_le_bytes(*b"RINGFLT1") == MAGIC);
