//! The 8-byte frame header and the message kinds.
//!
//! Every frame is `header (8 bytes) || body (body_len bytes)`, and a `Pages`
//! frame of kind `Data` is followed by its page payload, which `body_len`
//! does not count. [`FrameHeader::parse`] rejects anything the rest of the
//! decoder would reject from the header alone, before a single body byte is
//! buffered, so a reader never allocates more than [`MAX_BODY_LEN`] for a
//! body.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::DecodeError;
use crate::{
    CHALLENGE_BODY_LEN, COMPLETE_BODY_LEN, FRAME_HEADER_LEN, HELLO_BODY_LEN, MAX_BODY_LEN,
    PAGES_BODY_LEN, PHASE_BODY_LEN, PROOF_BODY_LEN,
};

/// Frame kind, `u16` on the wire.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgKind {
    /// Never valid on the wire.
    Invalid = 0,
    /// Destination -> source, first frame of every connection.
    Hello = 1,
    /// Source -> destination, answers `Hello`.
    Challenge = 2,
    /// Destination -> source, answers `Challenge`.
    Proof = 3,
    /// Source -> destination, after `Proof` verified: the layout.
    Welcome = 4,
    /// Source -> destination: a run of pages (payload follows for `Data`).
    Pages = 5,
    /// Destination -> source: the pages some vCPUs faulted on.
    Demand = 6,
    /// Destination -> source on resume: RLE chunk of present pages.
    PresentBitmap = 7,
    /// Source -> destination at switch-over: RLE chunk of pages to discard.
    DiscardList = 8,
    /// Destination -> source: every page is present.
    Complete = 9,
    /// Source -> destination: the source will send nothing more (but
    /// `Digests`, when it announced them with `WELCOME_VERIFY`).
    CompleteAck = 10,
    /// Destination -> source: the source may free guest memory.
    Release = 11,
    /// Either way: fatal error, the sender closes the connection.
    Error = 12,
    /// Either way: the sender is alive (sent on an otherwise idle lane).
    Heartbeat = 13,
    /// Source -> destination: RLE chunk of pages that read as zero and were
    /// never populated; nothing is installed for them.
    ZeroRanges = 14,
    /// Source -> destination on resume: the present bitmap was applied.
    Resumed = 15,
    /// Source -> destination: a phase boundary of a pre-copy migration.
    Phase = 16,
    /// Either way: digests of pages, to verify a finished migration.
    Digests = 17,
}

impl MsgKind {
    /// Every kind that may appear on the wire, in wire order.
    pub const ALL: [MsgKind; 17] = [
        MsgKind::Hello,
        MsgKind::Challenge,
        MsgKind::Proof,
        MsgKind::Welcome,
        MsgKind::Pages,
        MsgKind::Demand,
        MsgKind::PresentBitmap,
        MsgKind::DiscardList,
        MsgKind::Complete,
        MsgKind::CompleteAck,
        MsgKind::Release,
        MsgKind::Error,
        MsgKind::Heartbeat,
        MsgKind::ZeroRanges,
        MsgKind::Resumed,
        MsgKind::Phase,
        MsgKind::Digests,
    ];

    /// Decodes a wire value; `Invalid` (0) and unknown values are errors.
    pub fn from_wire(value: u16) -> Result<MsgKind, DecodeError> {
        MsgKind::ALL
            .get(usize::from(value).wrapping_sub(1))
            .copied()
            .ok_or(DecodeError::UnknownKind(value))
    }

    /// The wire value.
    pub const fn to_wire(self) -> u16 {
        self as u16
    }

    /// The body length of kinds whose body always has the same size.
    pub const fn fixed_body_len(self) -> Option<usize> {
        match self {
            MsgKind::Hello => Some(HELLO_BODY_LEN),
            MsgKind::Challenge => Some(CHALLENGE_BODY_LEN),
            MsgKind::Proof => Some(PROOF_BODY_LEN),
            MsgKind::Pages => Some(PAGES_BODY_LEN),
            MsgKind::Complete | MsgKind::Resumed => Some(COMPLETE_BODY_LEN),
            MsgKind::Phase => Some(PHASE_BODY_LEN),
            MsgKind::CompleteAck | MsgKind::Release | MsgKind::Heartbeat => Some(0),
            MsgKind::Invalid
            | MsgKind::Welcome
            | MsgKind::Demand
            | MsgKind::PresentBitmap
            | MsgKind::DiscardList
            | MsgKind::ZeroRanges
            | MsgKind::Digests
            | MsgKind::Error => None,
        }
    }
}

/// Wire image of the frame header.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct FrameHeaderWire {
    kind: U16,
    flags: U16,
    body_len: U32,
}

const _: () = assert!(size_of::<FrameHeaderWire>() == FRAME_HEADER_LEN);

/// 8 bytes on the wire: kind u16, flags u16 (must be 0), body_len u32.
/// Page payload (if any) follows the body and is NOT counted in body_len.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message kind.
    pub kind: MsgKind,
    /// Body length in bytes, payload excluded.
    pub body_len: u32,
}

impl FrameHeader {
    /// Parses and checks a header: unknown or `Invalid` kind, nonzero flags,
    /// `body_len > MAX_BODY_LEN`, and a `body_len` other than the fixed size
    /// of fixed-size kinds are errors.
    pub fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, DecodeError> {
        let wire = FrameHeaderWire::read_from_bytes(bytes).map_err(|_| DecodeError::Truncated {
            need: FRAME_HEADER_LEN,
            have: bytes.len(),
        })?;
        let kind = MsgKind::from_wire(wire.kind.get())?;
        let flags = wire.flags.get();
        if flags != 0 {
            return Err(DecodeError::NonzeroFlags { flags });
        }
        let body_len = wire.body_len.get();
        check_body_len(kind, body_len_usize(body_len))?;
        Ok(FrameHeader { kind, body_len })
    }

    /// The 8 wire bytes of this header (flags 0).
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let wire = FrameHeaderWire {
            kind: U16::new(self.kind.to_wire()),
            flags: U16::new(0),
            body_len: U32::new(self.body_len),
        };
        let mut out = [0u8; FRAME_HEADER_LEN];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// `body_len` as a `usize`, for slicing.
    pub fn body_len_usize(&self) -> usize {
        body_len_usize(self.body_len)
    }
}

/// `u32` to `usize`; saturates on (unsupported) 16-bit targets.
pub(crate) fn body_len_usize(len: u32) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX)
}

/// Checks a body length against the global limit and the kind's fixed size.
pub(crate) fn check_body_len(kind: MsgKind, len: usize) -> Result<(), DecodeError> {
    if len > MAX_BODY_LEN {
        return Err(DecodeError::BodyTooLarge {
            len: u64::try_from(len).unwrap_or(u64::MAX),
            max: MAX_BODY_LEN,
        });
    }
    match kind.fixed_body_len() {
        Some(expected) if expected != len => Err(DecodeError::BadBodyLength {
            kind,
            len,
            expected,
        }),
        _ => Ok(()),
    }
}
