//! `Demand` frames: the destination asks for the pages its vCPUs faulted on.
//!
//! Sent on the demand lane. One frame carries every fault the destination
//! read in one pass (1 to [`MAX_DEMAND_ENTRIES`] pages), so many faults
//! pending at once cost one request. The reply is one or more `Pages` frames
//! that echo `request_id`; together they cover at least every faulting page,
//! plus as much of each window `[page - before, page + after]` (clamped to
//! the region) as the source chooses to send. The source may also answer
//! with pages it already sent in the background: the destination must
//! tolerate pages that are already present (`EEXIST`).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::DecodeError;
use crate::frame::{FrameHeader, MsgKind};
use crate::layout::Layout;
use crate::{
    DEMAND_ENTRY_LEN, DEMAND_HEADER_LEN, FRAME_HEADER_LEN, MAX_DEMAND_ENTRIES, MAX_PREFETCH,
};

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct DemandWire {
    request_id: U64,
    count: U16,
    reserved: U16,
    reserved2: U32,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct EntryWire {
    page: U64,
    region: U32,
    before: U16,
    after: U16,
}

const _: () = assert!(size_of::<DemandWire>() == DEMAND_HEADER_LEN);
const _: () = assert!(size_of::<EntryWire>() == DEMAND_ENTRY_LEN);

/// One faulting page and the prefetch window around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DemandEntry {
    /// Region id.
    pub region: u32,
    /// Faulting page index within the region.
    pub page: u64,
    /// Prefetch window before `page`, `<= MAX_PREFETCH`.
    pub before: u16,
    /// Prefetch window after `page`, `<= MAX_PREFETCH`.
    pub after: u16,
}

impl DemandEntry {
    fn wire(&self) -> EntryWire {
        EntryWire {
            page: U64::new(self.page),
            region: U32::new(self.region),
            before: U16::new(self.before),
            after: U16::new(self.after),
        }
    }
}

/// Destination -> Source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemandRequest {
    /// Nonzero id chosen by the destination, echoed by the `Pages` replies.
    pub request_id: u64,
    /// The faulting pages, `1..=MAX_DEMAND_ENTRIES` of them.
    pub entries: Vec<DemandEntry>,
}

impl DemandRequest {
    /// Checks `request_id != 0`, the entry count, every region and page, and
    /// `before`/`after <= MAX_PREFETCH`.
    pub fn validate(&self, layout: &Layout) -> Result<(), DecodeError> {
        if self.request_id == 0 {
            return Err(DecodeError::ZeroRequestId);
        }
        check_count(self.entries.len())?;
        for e in &self.entries {
            let region = layout.require_region(e.region)?;
            region.check_range(e.page, 1)?;
            if e.before > MAX_PREFETCH || e.after > MAX_PREFETCH {
                return Err(DecodeError::PrefetchTooLarge {
                    before: e.before,
                    after: e.after,
                    max: MAX_PREFETCH,
                });
            }
        }
        Ok(())
    }

    /// Appends the body.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        encode_body(self.request_id, &self.entries, out);
    }

    /// Decodes a body (syntax only; call [`DemandRequest::validate`] next).
    pub fn decode_body(body: &[u8]) -> Result<DemandRequest, DecodeError> {
        let (w, rest) = DemandWire::read_from_prefix(body).map_err(|_| DecodeError::Truncated {
            need: DEMAND_HEADER_LEN,
            have: body.len(),
        })?;
        if w.reserved.get() != 0 || w.reserved2.get() != 0 {
            return Err(DecodeError::ReservedNonzero {
                field: "demand.reserved",
            });
        }
        let count = usize::from(w.count.get());
        check_count(count)?;
        let need = count * DEMAND_ENTRY_LEN;
        match rest.len().cmp(&need) {
            core::cmp::Ordering::Less => {
                return Err(DecodeError::Truncated {
                    need: DEMAND_HEADER_LEN + need,
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
        let mut entries = Vec::with_capacity(count);
        for chunk in rest.chunks_exact(DEMAND_ENTRY_LEN) {
            let e = EntryWire::read_from_bytes(chunk).map_err(|_| DecodeError::Truncated {
                need: DEMAND_ENTRY_LEN,
                have: chunk.len(),
            })?;
            entries.push(DemandEntry {
                region: e.region.get(),
                page: e.page.get(),
                before: e.before.get(),
                after: e.after.get(),
            });
        }
        Ok(DemandRequest {
            request_id: w.request_id.get(),
            entries,
        })
    }
}

fn check_count(count: usize) -> Result<(), DecodeError> {
    if count == 0 {
        return Err(DecodeError::ZeroCount);
    }
    if count > MAX_DEMAND_ENTRIES {
        return Err(DecodeError::CountTooLarge {
            count: u64::try_from(count).unwrap_or(u64::MAX),
            max: u64::try_from(MAX_DEMAND_ENTRIES).unwrap_or(u64::MAX),
        });
    }
    Ok(())
}

fn encode_body(request_id: u64, entries: &[DemandEntry], out: &mut Vec<u8>) {
    let wire = DemandWire {
        request_id: U64::new(request_id),
        count: U16::new(u16::try_from(entries.len()).unwrap_or(u16::MAX)),
        reserved: U16::new(0),
        reserved2: U32::new(0),
    };
    out.extend_from_slice(wire.as_bytes());
    for e in entries {
        out.extend_from_slice(e.wire().as_bytes());
    }
}

/// Hot path: appends a whole `Demand` frame (header and body) for `entries`
/// (at most [`MAX_DEMAND_ENTRIES`]; the caller splits larger sets) without
/// building a [`DemandRequest`]. Returns the frame's length.
pub fn encode_demand_frame(request_id: u64, entries: &[DemandEntry], out: &mut Vec<u8>) -> usize {
    let start = out.len();
    let body_len = DEMAND_HEADER_LEN + entries.len() * DEMAND_ENTRY_LEN;
    let header = FrameHeader {
        kind: MsgKind::Demand,
        body_len: u32::try_from(body_len).unwrap_or(u32::MAX),
    };
    out.extend_from_slice(&header.encode());
    encode_body(request_id, entries, out);
    debug_assert_eq!(out.len() - start, FRAME_HEADER_LEN + body_len);
    out.len() - start
}
