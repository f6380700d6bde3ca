//! End-of-migration and error frames: `Complete`, `CompleteAck`, `Release`,
//! `Error`.
//!
//! Also the small control frames: `Phase` (pre-copy boundaries) and
//! `Digests` (verification after completion).
//!
//! Safe completion is a three-step exchange on the demand lane:
//! the destination says every page is present (`Complete`), the source stops
//! sending and acknowledges (`CompleteAck`), and the destination, having
//! received nothing it still needs, lets the source free guest memory
//! (`Release`). The source must not free memory before `Release`. With
//! `WELCOME_VERIFY`, the source sends `Digests` of every page between its
//! `CompleteAck` and the destination's `Release`.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::DecodeError;
use crate::frame::MsgKind;
use crate::layout::Layout;
use crate::{
    COMPLETE_BODY_LEN, DIGESTS_HEADER_LEN, ERROR_HEADER_LEN, MAX_DIGESTS, MAX_ERROR_MESSAGE,
    PHASE_BODY_LEN,
};

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct CompleteWire {
    pages_present: U64,
}

const _: () = assert!(size_of::<CompleteWire>() == COMPLETE_BODY_LEN);

/// Destination -> Source: every page of the layout is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// Pages present at the destination; must equal `Layout::total_pages`.
    pub pages_present: u64,
}

impl Complete {
    /// The exact body bytes.
    pub fn encode_body(&self) -> [u8; COMPLETE_BODY_LEN] {
        self.pages_present.to_le_bytes()
    }

    /// Decodes an 8-byte body.
    pub fn decode_body(body: &[u8]) -> Result<Complete, DecodeError> {
        let w = CompleteWire::read_from_bytes(body).map_err(|_| DecodeError::BadBodyLength {
            kind: MsgKind::Complete,
            len: body.len(),
            expected: COMPLETE_BODY_LEN,
        })?;
        Ok(Complete {
            pages_present: w.pages_present.get(),
        })
    }
}

/// Source -> Destination: answer to `Complete`; the source sends nothing
/// after it. Empty body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompleteAck;

/// Destination -> Source: the source may free guest memory and close.
/// Empty body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Release;

/// Why a peer gives up; `u16` on the wire, 0 is invalid.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Never valid on the wire.
    Invalid = 0,
    /// The peer failed authentication.
    AuthFailed = 1,
    /// The peer speaks another protocol version.
    VersionMismatch = 2,
    /// The peer sent a malformed or unexpected frame.
    Protocol = 3,
    /// The layout (or a page reference) does not match the session's.
    LayoutMismatch = 4,
    /// The sender hit an internal failure.
    Internal = 5,
    /// The sender is shutting down.
    Shutdown = 6,
    /// A frame failed its integrity check.
    Integrity = 7,
    /// The peer stayed silent past the liveness timeout.
    Timeout = 8,
    /// The sender refuses more connections (another session, or a limit).
    Busy = 9,
}

impl ErrorCode {
    fn from_wire(v: u16) -> Result<ErrorCode, DecodeError> {
        Ok(match v {
            1 => ErrorCode::AuthFailed,
            2 => ErrorCode::VersionMismatch,
            3 => ErrorCode::Protocol,
            4 => ErrorCode::LayoutMismatch,
            5 => ErrorCode::Internal,
            6 => ErrorCode::Shutdown,
            7 => ErrorCode::Integrity,
            8 => ErrorCode::Timeout,
            9 => ErrorCode::Busy,
            _ => {
                return Err(DecodeError::BadEnum {
                    field: "error.code",
                    value: u64::from(v),
                })
            }
        })
    }
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct ErrorWire {
    code: U16,
    reserved: U16,
}

const _: () = assert!(size_of::<ErrorWire>() == ERROR_HEADER_LEN);

/// Either direction: a fatal error; the sender closes the connection after
/// it. `message` is UTF-8, at most [`MAX_ERROR_MESSAGE`] bytes (encoding
/// truncates at a char boundary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Error class.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl ErrorFrame {
    /// Builds a frame, truncating `message` to [`MAX_ERROR_MESSAGE`] bytes at
    /// a char boundary.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
        let mut message = message.into();
        message.truncate(truncated_len(&message));
        ErrorFrame { code, message }
    }

    /// Appends the body; the message is truncated at a char boundary.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        let wire = ErrorWire {
            code: U16::new(self.code as u16),
            reserved: U16::new(0),
        };
        out.extend_from_slice(wire.as_bytes());
        out.extend_from_slice(&self.message.as_bytes()[..truncated_len(&self.message)]);
    }

    /// Decodes a body.
    pub fn decode_body(body: &[u8]) -> Result<ErrorFrame, DecodeError> {
        let (w, rest) = ErrorWire::read_from_prefix(body).map_err(|_| DecodeError::Truncated {
            need: ERROR_HEADER_LEN,
            have: body.len(),
        })?;
        let code = ErrorCode::from_wire(w.code.get())?;
        if w.reserved.get() != 0 {
            return Err(DecodeError::ReservedNonzero {
                field: "error.reserved",
            });
        }
        if rest.len() > MAX_ERROR_MESSAGE {
            return Err(DecodeError::MessageTooLong {
                len: rest.len(),
                max: MAX_ERROR_MESSAGE,
            });
        }
        let message = core::str::from_utf8(rest)
            .map_err(|e| DecodeError::BadUtf8 {
                valid_up_to: e.valid_up_to(),
            })?
            .to_owned();
        Ok(ErrorFrame { code, message })
    }
}

/// Length of the longest prefix of `s` that is at most `MAX_ERROR_MESSAGE`
/// bytes and ends on a char boundary.
fn truncated_len(s: &str) -> usize {
    let mut end = s.len().min(MAX_ERROR_MESSAGE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// A pre-copy phase boundary; `u8` on the wire, 0 is invalid.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhaseKind {
    /// Never valid on the wire.
    Invalid = 0,
    /// The sender finished pre-copy round `round` on this lane.
    RoundEnd = 1,
    /// The VM stopped on the source: nothing sent before this frame on this
    /// lane is newer than the discard list that follows switch-over.
    SwitchOver = 2,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct PhaseWire {
    kind: u8,
    reserved: [u8; 3],
    round: U32,
    pages: U64,
}

const _: () = assert!(size_of::<PhaseWire>() == PHASE_BODY_LEN);

/// Source -> Destination: a phase boundary of a pre-copy migration, on every
/// lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    /// Which boundary.
    pub kind: PhaseKind,
    /// Pre-copy round (from 1).
    pub round: u32,
    /// Pages the sender put on this lane in the round (informational).
    pub pages: u64,
}

impl Phase {
    /// The exact body bytes.
    pub fn encode_body(&self) -> [u8; PHASE_BODY_LEN] {
        let w = PhaseWire {
            kind: self.kind as u8,
            reserved: [0; 3],
            round: U32::new(self.round),
            pages: U64::new(self.pages),
        };
        let mut out = [0u8; PHASE_BODY_LEN];
        out.copy_from_slice(w.as_bytes());
        out
    }

    /// Decodes a body.
    pub fn decode_body(body: &[u8]) -> Result<Phase, DecodeError> {
        let w = PhaseWire::read_from_bytes(body).map_err(|_| DecodeError::BadBodyLength {
            kind: MsgKind::Phase,
            len: body.len(),
            expected: PHASE_BODY_LEN,
        })?;
        let kind = match w.kind {
            1 => PhaseKind::RoundEnd,
            2 => PhaseKind::SwitchOver,
            v => {
                return Err(DecodeError::BadEnum {
                    field: "phase.kind",
                    value: u64::from(v),
                })
            }
        };
        if w.reserved != [0; 3] {
            return Err(DecodeError::ReservedNonzero {
                field: "phase.reserved",
            });
        }
        Ok(Phase {
            kind,
            round: w.round.get(),
            pages: w.pages.get(),
        })
    }
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct DigestsWire {
    region: U32,
    pages_per_digest: U32,
    first_page: U64,
    count: U32,
    reserved: U32,
}

const _: () = assert!(size_of::<DigestsWire>() == DIGESTS_HEADER_LEN);

/// Digests of consecutive groups of `pages_per_digest` pages of one region,
/// from `first_page` on (the last group may be cut short by the region's
/// end). Sent by the source after completion when verification was asked
/// for; the destination compares them with the digests of what it installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// Region id.
    pub region: u32,
    /// Pages per digest, nonzero.
    pub pages_per_digest: u32,
    /// First page of the first group.
    pub first_page: u64,
    /// One digest per group, 1 to [`MAX_DIGESTS`].
    pub digests: Vec<u64>,
}

impl Digests {
    /// Checks the region, the group size and that every group starts inside
    /// the region.
    pub fn validate(&self, layout: &Layout) -> Result<(), DecodeError> {
        let region = layout.require_region(self.region)?;
        if self.pages_per_digest == 0 || self.digests.is_empty() {
            return Err(DecodeError::ZeroCount);
        }
        let groups = u64::try_from(self.digests.len()).unwrap_or(u64::MAX);
        let span = (groups - 1)
            .checked_mul(u64::from(self.pages_per_digest))
            .ok_or(DecodeError::Overflow {
                what: "digest groups * pages per digest",
                base: groups,
                add: u64::from(self.pages_per_digest),
            })?;
        region.check_range(self.first_page, span.saturating_add(1))
    }

    /// Appends the body.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        let w = DigestsWire {
            region: U32::new(self.region),
            pages_per_digest: U32::new(self.pages_per_digest),
            first_page: U64::new(self.first_page),
            count: U32::new(u32::try_from(self.digests.len()).unwrap_or(u32::MAX)),
            reserved: U32::new(0),
        };
        out.extend_from_slice(w.as_bytes());
        for d in &self.digests {
            out.extend_from_slice(&d.to_le_bytes());
        }
    }

    /// Decodes a body (call [`Digests::validate`] next).
    pub fn decode_body(body: &[u8]) -> Result<Digests, DecodeError> {
        let (w, rest) =
            DigestsWire::read_from_prefix(body).map_err(|_| DecodeError::Truncated {
                need: DIGESTS_HEADER_LEN,
                have: body.len(),
            })?;
        if w.reserved.get() != 0 {
            return Err(DecodeError::ReservedNonzero {
                field: "digests.reserved",
            });
        }
        let count = usize::try_from(w.count.get()).unwrap_or(usize::MAX);
        if count == 0 {
            return Err(DecodeError::ZeroCount);
        }
        if count > MAX_DIGESTS {
            return Err(DecodeError::CountTooLarge {
                count: u64::from(w.count.get()),
                max: u64::try_from(MAX_DIGESTS).unwrap_or(u64::MAX),
            });
        }
        let need = count * 8;
        match rest.len().cmp(&need) {
            core::cmp::Ordering::Less => {
                return Err(DecodeError::Truncated {
                    need: DIGESTS_HEADER_LEN + need,
                    have: body.len(),
                })
            }
            core::cmp::Ordering::Greater => {
                return Err(DecodeError::TrailingBytes {
                    extra: rest.len() - need,
                })
            }
            core::cmp::Ordering::Equal => {}
        }
        let digests = rest
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(Digests {
            region: w.region.get(),
            pages_per_digest: w.pages_per_digest.get(),
            first_page: w.first_page.get(),
            digests,
        })
    }
}
