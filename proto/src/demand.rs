//! `Demand` frames: the destination asks for the page a vCPU faulted on.
//!
//! Sent on the demand lane. The reply is one or more `Pages` frames that
//! echo `request_id`; together they cover at least the faulting page and as
//! much of the window `[page - before, page + after]` (clamped to the region)
//! as the source chooses to send. The source may also answer with pages it
//! already sent in the background: the destination must tolerate pages that
//! are already present (`EEXIST`).

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::DecodeError;
use crate::frame::{FrameHeader, MsgKind};
use crate::layout::Layout;
use crate::{DEMAND_BODY_LEN, DEMAND_FRAME_LEN, FRAME_HEADER_LEN, MAX_PREFETCH};

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct DemandWire {
    request_id: U64,
    page: U64,
    region: U32,
    before: U32,
    after: U32,
    reserved: U32,
}

const _: () = assert!(size_of::<DemandWire>() == DEMAND_BODY_LEN);

/// Destination -> Source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemandRequest {
    /// Nonzero id chosen by the destination, echoed by the `Pages` replies.
    pub request_id: u64,
    /// Region id.
    pub region: u32,
    /// Faulting page index within the region.
    pub page: u64,
    /// Prefetch window before `page`, `<= MAX_PREFETCH`.
    pub before: u32,
    /// Prefetch window after `page`, `<= MAX_PREFETCH`.
    pub after: u32,
}

impl DemandRequest {
    /// Checks `request_id != 0`, region and page in range, and
    /// `before`/`after <= MAX_PREFETCH`.
    pub fn validate(&self, layout: &Layout) -> Result<(), DecodeError> {
        if self.request_id == 0 {
            return Err(DecodeError::ZeroRequestId);
        }
        let region = layout.require_region(self.region)?;
        region.check_range(self.page, 1)?;
        if self.before > MAX_PREFETCH || self.after > MAX_PREFETCH {
            return Err(DecodeError::PrefetchTooLarge {
                before: self.before,
                after: self.after,
                max: MAX_PREFETCH,
            });
        }
        Ok(())
    }

    /// The exact body bytes.
    pub fn encode_body(&self) -> [u8; DEMAND_BODY_LEN] {
        let wire = DemandWire {
            request_id: U64::new(self.request_id),
            page: U64::new(self.page),
            region: U32::new(self.region),
            before: U32::new(self.before),
            after: U32::new(self.after),
            reserved: U32::new(0),
        };
        let mut out = [0u8; DEMAND_BODY_LEN];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// Decodes a body (syntax only; call [`DemandRequest::validate`] next).
    pub fn decode_body(body: &[u8]) -> Result<DemandRequest, DecodeError> {
        let w = DemandWire::read_from_bytes(body).map_err(|_| DecodeError::BadBodyLength {
            kind: MsgKind::Demand,
            len: body.len(),
            expected: DEMAND_BODY_LEN,
        })?;
        if w.reserved.get() != 0 {
            return Err(DecodeError::ReservedNonzero {
                field: "demand.reserved",
            });
        }
        Ok(DemandRequest {
            request_id: w.request_id.get(),
            region: w.region.get(),
            page: w.page.get(),
            before: w.before.get(),
            after: w.after.get(),
        })
    }
}

/// Hot path helper: fixed-size encoded Demand frame (header+body) without
/// allocation.
pub fn encode_demand_frame(d: &DemandRequest) -> [u8; DEMAND_FRAME_LEN] {
    let mut out = [0u8; DEMAND_FRAME_LEN];
    let header = FrameHeader {
        kind: MsgKind::Demand,
        body_len: crate::DEMAND_BODY_LEN_U32,
    };
    out[..FRAME_HEADER_LEN].copy_from_slice(&header.encode());
    out[FRAME_HEADER_LEN..].copy_from_slice(&d.encode_body());
    out
}
