//! End-of-migration and error frames: `Complete`, `CompleteAck`, `Release`,
//! `Error`.
//!
//! Safe completion is a three-step exchange on the bulk lane of channel 0:
//! the destination says every page is present (`Complete`), the source stops
//! sending and acknowledges (`CompleteAck`), and the destination, having
//! received nothing it still needs, lets the source free guest memory
//! (`Release`). The source must not free memory before `Release`.

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::DecodeError;
use crate::frame::MsgKind;
use crate::{COMPLETE_BODY_LEN, ERROR_HEADER_LEN, MAX_ERROR_MESSAGE};

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
