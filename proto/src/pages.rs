//! `Pages` frames: a run of consecutive pages of one region.
//!
//! Hot path. The header is fixed-size ([`PAGES_FRAME_LEN`] bytes with the
//! frame header) so the source can build it on the stack and send it with
//! the page payload in one vectored write, straight from guest memory. The
//! destination must call [`PagesHeader::validate`] before it posts a receive
//! for the payload: it is the check that bounds the payload and keeps the
//! write inside the region.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::DecodeError;
use crate::frame::{FrameHeader, MsgKind};
use crate::layout::Layout;
use crate::{
    FRAME_HEADER_LEN, MAX_PAD_LEN, MAX_PAGES_PER_FRAME, MAX_PAYLOAD_LEN, PAGES_BODY_LEN,
    PAGES_FRAME_LEN,
};

/// What a `Pages` frame carries; `u8` on the wire, 0 is invalid.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageKind {
    /// Page contents follow the body.
    Data = 1,
    /// The pages are all zero bytes; no payload.
    Zero = 2,
    /// The pages were never populated on the source; no payload.
    Unpopulated = 3,
}

impl PageKind {
    fn from_wire(v: u8) -> Result<PageKind, DecodeError> {
        match v {
            1 => Ok(PageKind::Data),
            2 => Ok(PageKind::Zero),
            3 => Ok(PageKind::Unpopulated),
            _ => Err(DecodeError::BadEnum {
                field: "pages.kind",
                value: u64::from(v),
            }),
        }
    }
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct PagesWire {
    region: U32,
    kind: u8,
    reserved: u8,
    pad_len: U16,
    first_page: U64,
    count: U32,
    payload_len: U32,
    request_id: U64,
}

const _: () = assert!(size_of::<PagesWire>() == PAGES_BODY_LEN);

/// Source -> Destination. For `Data`, `pad_len` zero bytes and then
/// `payload_len == count * page_size` bytes of pages follow the body (at most
/// [`MAX_PAGES_PER_FRAME`] pages). `Zero`/`Unpopulated`: no pad, no payload,
/// and up to `u32::MAX` pages in one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesHeader {
    /// Region id.
    pub region: u32,
    /// Payload kind.
    pub kind: PageKind,
    /// Zero bytes between the body and the payload (`Data` only, at most
    /// [`MAX_PAD_LEN`]): they align the payload in the lane's byte stream
    /// when the lane asked for it (`LANE_ALIGN_PAYLOAD`).
    pub pad_len: u16,
    /// First page index within the region.
    pub first_page: u64,
    /// Number of pages, nonzero.
    pub count: u32,
    /// Payload bytes after the pad.
    pub payload_len: u32,
    /// Echo of the `DemandRequest::request_id` this answers; 0 = background.
    pub request_id: u64,
}

impl PagesHeader {
    /// Checks region exists, `count > 0`, `count <= MAX_PAGES_PER_FRAME` for
    /// data, `first_page + count` within the region without overflow, the pad
    /// and the payload length rule; returns the byte length of the payload.
    pub fn validate(&self, layout: &Layout) -> Result<u64, DecodeError> {
        let region = layout.require_region(self.region)?;
        if self.count == 0 {
            return Err(DecodeError::ZeroCount);
        }
        region.check_range(self.first_page, u64::from(self.count))?;
        match self.kind {
            PageKind::Data => {
                if self.count > MAX_PAGES_PER_FRAME {
                    return Err(DecodeError::CountTooLarge {
                        count: u64::from(self.count),
                        max: u64::from(MAX_PAGES_PER_FRAME),
                    });
                }
                if self.pad_len > MAX_PAD_LEN {
                    return Err(DecodeError::PadTooLarge {
                        pad_len: self.pad_len,
                        max: MAX_PAD_LEN,
                    });
                }
                // count <= 2^16 and page size <= 2^30: no overflow.
                let expected = u64::from(self.count) << region.page_size.shift();
                if expected > u64::from(MAX_PAYLOAD_LEN) {
                    return Err(DecodeError::PayloadTooLarge {
                        len: expected,
                        max: u64::from(MAX_PAYLOAD_LEN),
                    });
                }
                let got = u64::from(self.payload_len);
                if got != expected {
                    return Err(DecodeError::PayloadLength { expected, got });
                }
                Ok(expected)
            }
            PageKind::Zero | PageKind::Unpopulated => {
                if self.payload_len != 0 || self.pad_len != 0 {
                    return Err(DecodeError::PayloadForNonData {
                        kind: self.kind,
                        payload_len: self.payload_len,
                    });
                }
                Ok(0)
            }
        }
    }

    /// The exact body bytes.
    pub fn encode_body(&self) -> [u8; PAGES_BODY_LEN] {
        let wire = PagesWire {
            region: U32::new(self.region),
            kind: self.kind as u8,
            reserved: 0,
            pad_len: U16::new(self.pad_len),
            first_page: U64::new(self.first_page),
            count: U32::new(self.count),
            payload_len: U32::new(self.payload_len),
            request_id: U64::new(self.request_id),
        };
        let mut out = [0u8; PAGES_BODY_LEN];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// Decodes a body (syntax only; call [`PagesHeader::validate`] next).
    pub fn decode_body(body: &[u8]) -> Result<PagesHeader, DecodeError> {
        let w = PagesWire::read_from_bytes(body).map_err(|_| DecodeError::BadBodyLength {
            kind: MsgKind::Pages,
            len: body.len(),
            expected: PAGES_BODY_LEN,
        })?;
        let kind = PageKind::from_wire(w.kind)?;
        if w.reserved != 0 {
            return Err(DecodeError::ReservedNonzero {
                field: "pages.reserved",
            });
        }
        Ok(PagesHeader {
            region: w.region.get(),
            kind,
            pad_len: w.pad_len.get(),
            first_page: w.first_page.get(),
            count: w.count.get(),
            payload_len: w.payload_len.get(),
            request_id: w.request_id.get(),
        })
    }
}

/// Hot path: the frame header and body of a `Pages` frame, without
/// allocation (the pad, payload and tag follow).
pub fn encode_pages_head(h: &PagesHeader) -> [u8; PAGES_FRAME_LEN] {
    let mut out = [0u8; PAGES_FRAME_LEN];
    let header = FrameHeader {
        kind: MsgKind::Pages,
        body_len: crate::PAGES_BODY_LEN_U32,
    };
    out[..FRAME_HEADER_LEN].copy_from_slice(&header.encode());
    out[FRAME_HEADER_LEN..].copy_from_slice(&h.encode_body());
    out
}
