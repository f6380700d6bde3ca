//! Guest memory layout: regions, their page sizes and sizes.
//!
//! The source announces the layout in `Welcome`; every page index in later
//! frames is checked against it ([`Layout::region`] plus the range checks in
//! `pages`, `demand` and `rle`) before it is trusted.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::DecodeError;
use crate::{MAX_REGIONS, REGION_DESC_LEN};

/// Page size of a region; `page_shift` u8 on the wire (12, 21 or 30).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB base pages (shift 12).
    Size4K,
    /// 2 MiB huge pages (shift 21).
    Size2M,
    /// 1 GiB huge pages (shift 30).
    Size1G,
}

impl PageSize {
    /// Page size in bytes.
    pub const fn bytes(self) -> u64 {
        1u64 << self.shift()
    }

    /// log2 of the page size.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// Decodes the wire `page_shift`.
    pub fn from_shift(shift: u8) -> Result<PageSize, DecodeError> {
        match shift {
            12 => Ok(PageSize::Size4K),
            21 => Ok(PageSize::Size2M),
            30 => Ok(PageSize::Size1G),
            other => Err(DecodeError::BadPageShift(other)),
        }
    }

    /// The wire `page_shift`.
    pub const fn wire_shift(self) -> u8 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }
}

/// One guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionDesc {
    /// Region id, unique within the layout; page frames name it.
    pub id: u32,
    /// Its page size.
    pub page_size: PageSize,
    /// Size in bytes: a nonzero multiple of `page_size`.
    pub size: u64,
}

impl RegionDesc {
    /// Number of pages (`size / page_size`, rounded down).
    pub const fn page_count(&self) -> u64 {
        self.size >> self.page_size.shift()
    }

    /// Checks that the size is a nonzero multiple of the page size.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.size == 0 || self.size & (self.page_size.bytes() - 1) != 0 {
            return Err(DecodeError::RegionSize {
                region: self.id,
                size: self.size,
                page_size: self.page_size.bytes(),
            });
        }
        Ok(())
    }

    /// Checks that pages `[first, first + count)` lie inside the region.
    pub fn check_range(&self, first: u64, count: u64) -> Result<(), DecodeError> {
        let end = first.checked_add(count).ok_or(DecodeError::Overflow {
            what: "first page + page count",
            base: first,
            add: count,
        })?;
        if end > self.page_count() {
            return Err(DecodeError::PageOutOfRange {
                region: self.id,
                page: first,
                count,
                region_pages: self.page_count(),
            });
        }
        Ok(())
    }
}

/// Wire image of a region descriptor inside `Welcome`.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub(crate) struct RegionWire {
    id: U32,
    page_shift: u8,
    reserved: [u8; 3],
    size: U64,
}

const _: () = assert!(size_of::<RegionWire>() == REGION_DESC_LEN);

impl RegionWire {
    pub(crate) fn from_desc(r: &RegionDesc) -> RegionWire {
        RegionWire {
            id: U32::new(r.id),
            page_shift: r.page_size.wire_shift(),
            reserved: [0; 3],
            size: U64::new(r.size),
        }
    }

    pub(crate) fn to_desc(&self) -> Result<RegionDesc, DecodeError> {
        if self.reserved != [0; 3] {
            return Err(DecodeError::ReservedNonzero {
                field: "welcome.region.reserved",
            });
        }
        Ok(RegionDesc {
            id: self.id.get(),
            page_size: PageSize::from_shift(self.page_shift)?,
            size: self.size.get(),
        })
    }
}

/// The guest memory layout: regions with unique ids, at most [`MAX_REGIONS`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// Regions, in announcement order.
    pub regions: Vec<RegionDesc>,
}

impl Layout {
    /// The region with this id. O(1) when ids equal their index (the usual
    /// case), a linear scan otherwise.
    pub fn region(&self, id: u32) -> Option<&RegionDesc> {
        let by_index = usize::try_from(id).ok().and_then(|i| self.regions.get(i));
        match by_index {
            Some(r) if r.id == id => Some(r),
            _ => self.regions.iter().find(|r| r.id == id),
        }
    }

    /// The region with this id, or [`DecodeError::UnknownRegion`].
    pub fn require_region(&self, id: u32) -> Result<&RegionDesc, DecodeError> {
        self.region(id)
            .ok_or(DecodeError::UnknownRegion { region: id })
    }

    /// Pages in all regions (saturating; cannot overflow for a valid layout).
    pub fn total_pages(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.page_count()))
    }

    /// Checks the region count, unique ids and every region's size.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.regions.len() > MAX_REGIONS {
            return Err(DecodeError::TooManyRegions {
                count: u64::try_from(self.regions.len()).unwrap_or(u64::MAX),
                max: MAX_REGIONS,
            });
        }
        let mut ids: Vec<u32> = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            r.validate()?;
            ids.push(r.id);
        }
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(DecodeError::DuplicateRegion { region: w[0] });
        }
        Ok(())
    }
}
