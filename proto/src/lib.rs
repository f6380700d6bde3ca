#![forbid(unsafe_code)]
//! ringfault wire protocol, version 2: fixed little-endian frames, no I/O.
//!
//! Post-copy migration of guest memory between a **source** (where the guest
//! ran) and a **destination** (where it runs now). The destination opens
//! every TCP connection. A session has one **demand lane** (channel 0),
//! which carries only `Demand` requests, their `Pages` replies and the
//! session's control frames, so a faulting vCPU never waits behind bulk
//! traffic; and one or more **bulk lanes** (channels `1..channel_count`),
//! which carry background `Pages` and `ZeroRanges`. `docs/protocol.md` has
//! the byte layouts and sequence diagrams.
//!
//! # Frames
//! `kind: u16 | flags: u16 = 0 | body_len: u32` ([`FrameHeader`]), then
//! `body_len` bytes of body ([`Message`]), then, for `Pages` of kind `Data`
//! only, `pad_len` zero bytes and `payload_len` bytes of page contents (not
//! counted in `body_len`), then, after the handshake, a 16-byte tag when the
//! session is protected ([`seal`]). All integers are little-endian. Every
//! enum reserves `0 = Invalid`.
//!
//! # Per-connection state machine (destination side)
//! ```text
//!  [Connect] --send Hello--> [AwaitChallenge]
//!  [AwaitChallenge] --Challenge, verify_source ok, send Proof--> [AwaitWelcome]
//!  [AwaitChallenge] --bad MAC--> send Error(AuthFailed), close
//!  [AwaitWelcome] --Welcome (sealed; layout equal to the session's on every
//!                  later lane and on resume)--> [Open]
//!  [Open]  demand lane: send Demand, recv Pages(request_id echo), Heartbeat
//!          bulk lane:   recv Pages(request_id 0), ZeroRanges, Heartbeat
//!  resume (demand lane): send PresentBitmap chunks --> recv Resumed --> [Open]
//!  [Open] --every page present: send Complete (demand lane)--> [AwaitAck]
//!  [AwaitAck] --CompleteAck--> unregister, send Release, close --> [Done]
//!  [AwaitAck] --CompleteAck, WELCOME_VERIFY--> [AwaitDigests]
//!  [AwaitDigests] --Digests (in layout order; the last covers the last page)-->
//!                 unregister, send Release, close --> [Done]
//!  CompleteAck in any other state, Digests outside AwaitDigests, Release
//!  ever: protocol error
//!  any decode, tag or validation failure: send Error, close
//! ```
//!
//! # Per-connection state machine (source side)
//! ```text
//!  [Listen] --Hello (magic, version, role checked)--> send Challenge --> [AwaitProof]
//!  [AwaitProof] --Proof, verify_destination ok--> send Welcome (sealed) --> [Open]
//!  [AwaitProof] --bad MAC--> send Error(AuthFailed), close (no layout leaked)
//!  [Open]  demand lane: recv Demand -> validate -> send Pages(request_id)
//!          bulk lane:   send Pages and ZeroRanges for pages not yet sent
//!  resume: recv PresentBitmap chunks (last flagged) -> sent := present -> send Resumed
//!  [Open] --Complete (pages_present == total)--> stop sending, send CompleteAck --> [AwaitRelease]
//!  WELCOME_VERIFY: then send Digests of every page, in layout order
//!  [AwaitRelease] --Release--> memory may be freed --> [Done]
//!  Release before CompleteAck or before the last Digests, a second
//!  Complete: protocol error
//! ```
//!
//! # Trust
//! Decoding checks syntax and every peer-given size before allocating
//! (never much more than [`MAX_BODY_LEN`]); references into guest memory are
//! checked against the negotiated [`Layout`] by the `validate` methods,
//! which the engine must call before it touches memory. After the
//! handshake every frame carries a tag under a key derived from that
//! connection's handshake and direction, over an implicit sequence number
//! ([`seal`]): injected, altered, replayed, reordered or dropped frames fail
//! the tag check.

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
pub mod seal;
pub mod varint;

pub use control::{
    Complete, CompleteAck, Digests, ErrorCode, ErrorFrame, Phase, PhaseKind, Release,
};
pub use demand::{encode_demand_frame, DemandEntry, DemandRequest};
pub use error::DecodeError;
pub use frame::{FrameHeader, MsgKind};
pub use handshake::{
    Capabilities, Challenge, Hello, Lane, Mac, Nonce, Proof, Role, SessionId, Welcome,
    LANE_ALIGN_PAYLOAD, WELCOME_KNOWN, WELCOME_PRECOPY, WELCOME_VERIFY,
};
pub use layout::{Layout, PageSize, RegionDesc};
pub use message::{decode_frame, Message};
pub use pages::{encode_pages_head, PageKind, PagesHeader};
pub use rle::{encode_rle_chunks, RleChunk};
pub use seal::{Cipher, Opener, Protection, SealError, Sealer, TAG_LEN};

/// `b"RINGFLT1"` read as a little-endian `u64`; first field of `Hello` and
/// `Challenge`.
pub const MAGIC: u64 = 0x3154_4c46_474e_4952;
/// The protocol version this build speaks (exact match required).
pub const VERSION: u16 = 2;
/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// No body above this; caps every peer-sized allocation.
pub const MAX_BODY_LEN: usize = 64 * 1024 + 64;
/// Most regions in a layout.
pub const MAX_REGIONS: usize = 1024;
/// Most bytes in an error message.
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Most encoded run bytes per bitmap/discard/zero-range chunk.
pub const MAX_RLE_CHUNK: usize = 64 * 1024;
/// Most pages in one `Pages` frame of kind `Data`.
pub const MAX_PAGES_PER_FRAME: u32 = 1 << 16;
/// Most payload bytes after one `Pages` frame (1 GiB: one 1 GiB page).
pub const MAX_PAYLOAD_LEN: u32 = 1 << 30;
/// Most zero bytes between a `Pages` body and its payload.
pub const MAX_PAD_LEN: u16 = 4095;

/// On a lane that asked for aligned payloads (`LANE_ALIGN_PAYLOAD`), every
/// `Data` payload of at least this many bytes starts on a 4 KiB boundary of
/// the lane's byte stream; a smaller one may start anywhere (its pad would
/// cost more than aligning it saves).
pub const ALIGN_MIN_PAYLOAD: u32 = 64 * 1024;
/// Most pages of prefetch on each side of a demanded page.
pub const MAX_PREFETCH: u16 = 4096;
/// Most faulting pages in one `Demand` frame.
pub const MAX_DEMAND_ENTRIES: usize = 256;
/// Most page digests in one `Digests` frame.
pub const MAX_DIGESTS: usize = 8192;
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
/// Fixed part of a `Demand` body (before the entries).
pub const DEMAND_HEADER_LEN: usize = 16;
/// One entry of a `Demand` body.
pub const DEMAND_ENTRY_LEN: usize = 16;
/// Fixed part of a `PresentBitmap`/`DiscardList`/`ZeroRanges` body (before the runs).
pub const RLE_HEADER_LEN: usize = 24;
/// `Complete` body bytes.
pub const COMPLETE_BODY_LEN: usize = 8;
/// `Phase` body bytes.
pub const PHASE_BODY_LEN: usize = 16;
/// Fixed part of a `Digests` body (before the digests).
pub const DIGESTS_HEADER_LEN: usize = 24;
/// Fixed part of an `Error` body (before the message).
pub const ERROR_HEADER_LEN: usize = 4;
/// A whole `Pages` frame head, header and body (pad and payload excluded).
pub const PAGES_FRAME_LEN: usize = FRAME_HEADER_LEN + PAGES_BODY_LEN;

pub(crate) const PAGES_BODY_LEN_U32: u32 = 32;

const _: () = assert!(PAGES_BODY_LEN_U32 as usize == PAGES_BODY_LEN);
const _: () = assert!(WELCOME_HEADER_LEN + MAX_REGIONS * REGION_DESC_LEN <= MAX_BODY_LEN);
const _: () = assert!(RLE_HEADER_LEN + MAX_RLE_CHUNK <= MAX_BODY_LEN);
const _: () = assert!(ERROR_HEADER_LEN + MAX_ERROR_MESSAGE <= MAX_BODY_LEN);
const _: () = assert!(DEMAND_HEADER_LEN + MAX_DEMAND_ENTRIES * DEMAND_ENTRY_LEN <= MAX_BODY_LEN);
const _: () = assert!(DIGESTS_HEADER_LEN + MAX_DIGESTS * 8 <= MAX_BODY_LEN);
const _: () = assert!(u64::from_le_bytes(*b"RINGFLT1") == MAGIC);
