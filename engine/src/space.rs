//! One numbering of every guest page: regions in layout order, their pages
//! numbered `0..total` ("global pages"), and where each region lives in this
//! process, if it does. Every lane, bitmap, plan and page source uses this
//! one type to go between a wire reference (region id, page), a global page
//! and an address.

use ringfault_proto::Layout;

/// One region's place in the global numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpan {
    /// Wire id.
    pub id: u32,
    /// Global page of its first page.
    pub first: u64,
    /// Pages.
    pub pages: u64,
    /// Page size in bytes.
    pub page_size: usize,
    /// log2 of the page size.
    pub shift: u32,
    /// Address of its first byte in this process (0 when it does not live
    /// here, e.g. on a source serving from a file), or in the address space
    /// of its owner (see `owner`).
    pub base: usize,
    /// Which userfaultfd serves it: 0 unless the space spans several
    /// address spaces ([`PageSpace::with_owners`], one per process of a
    /// CRIU restore), whose regions may then lie at the same addresses.
    pub owner: u32,
}

impl RegionSpan {
    /// Bytes.
    pub fn len(&self) -> usize {
        usize::try_from(self.pages << self.shift).unwrap_or(usize::MAX)
    }

    /// Pages per 2 MiB (one transparent huge page; 1 for larger pages).
    pub fn pages_per_huge(&self) -> u64 {
        ((2u64 << 20) >> self.shift).max(1)
    }

    /// Whether the region has no pages (never, for a valid layout).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Address of page `page` (which must be `< pages`).
    pub fn addr_of(&self, page: u64) -> usize {
        self.base + usize::try_from(page << self.shift).unwrap_or(0)
    }

    /// Byte offset of page `page` in the region.
    pub fn offset_of(&self, page: u64) -> usize {
        usize::try_from(page << self.shift).unwrap_or(usize::MAX)
    }

    /// Whether `addr` lies in the region.
    pub fn contains(&self, addr: usize) -> bool {
        self.base != 0 && addr >= self.base && addr - self.base < self.len()
    }
}

/// Every region of a layout, numbered.
#[derive(Debug, Clone, Default)]
pub struct PageSpace {
    spans: Vec<RegionSpan>,
    /// Span indices sorted by base address (regions that live here).
    by_addr: Vec<usize>,
    total: u64,
    owners: u32,
}

impl PageSpace {
    /// Numbers `layout`'s pages; `bases[i]` is where region `i` lives here
    /// (pass an empty slice when none does).
    pub fn new(layout: &Layout, bases: &[usize]) -> PageSpace {
        PageSpace::with_owners(layout, bases, &[])
    }

    /// Numbers `layout`'s pages for several address spaces: region `i`
    /// lives at `bases[i]` in the address space of userfaultfd `owners[i]`
    /// (0 where `owners` is short). Regions of different owners may overlap
    /// in address; those of one owner must not.
    pub fn with_owners(layout: &Layout, bases: &[usize], owners: &[u32]) -> PageSpace {
        let mut spans = Vec::with_capacity(layout.regions.len());
        let mut total = 0u64;
        for (i, r) in layout.regions.iter().enumerate() {
            let pages = r.page_count();
            spans.push(RegionSpan {
                id: r.id,
                first: total,
                pages,
                page_size: usize::try_from(r.page_size.bytes()).unwrap_or(usize::MAX),
                shift: r.page_size.shift(),
                base: bases.get(i).copied().unwrap_or(0),
                owner: owners.get(i).copied().unwrap_or(0),
            });
            total = total.saturating_add(pages);
        }
        let mut by_addr: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].base != 0).collect();
        by_addr.sort_by_key(|&i| (spans[i].owner, spans[i].base));
        let owners = spans.iter().map(|s| s.owner).max().map_or(1, |m| m + 1);
        PageSpace {
            spans,
            by_addr,
            total,
            owners,
        }
    }

    /// How many userfaultfds the regions name (at least 1).
    pub fn owners(&self) -> u32 {
        self.owners
    }

    /// Pages in all regions.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The regions, in layout order.
    pub fn spans(&self) -> &[RegionSpan] {
        &self.spans
    }

    /// Region `index` (layout order).
    pub fn span(&self, index: usize) -> Option<&RegionSpan> {
        self.spans.get(index)
    }

    /// Layout index of the region with wire id `id`.
    pub fn index_of(&self, id: u32) -> Option<usize> {
        let direct = usize::try_from(id)
            .ok()
            .filter(|&i| self.spans.get(i).is_some_and(|s| s.id == id));
        direct.or_else(|| self.spans.iter().position(|s| s.id == id))
    }

    /// Global page of `(region index, page)`.
    pub fn global(&self, index: usize, page: u64) -> Option<u64> {
        let s = self.spans.get(index)?;
        (page < s.pages).then(|| s.first + page)
    }

    /// `(region index, page)` of a global page.
    pub fn locate(&self, global: u64) -> Option<(usize, u64)> {
        let idx = self.spans.partition_point(|s| s.first + s.pages <= global);
        let s = self.spans.get(idx)?;
        (global >= s.first && global < s.first + s.pages).then(|| (idx, global - s.first))
    }

    /// `(region index, page)` holding address `addr`, for regions that live here.
    pub fn locate_addr(&self, addr: usize) -> Option<(usize, u64)> {
        self.locate_addr_in(0, addr)
    }

    /// `(region index, page)` holding address `addr` in the address space of
    /// userfaultfd `owner`.
    pub fn locate_addr_in(&self, owner: u32, addr: usize) -> Option<(usize, u64)> {
        let k = self
            .by_addr
            .partition_point(|&i| (self.spans[i].owner, self.spans[i].base) <= (owner, addr))
            .checked_sub(1)?;
        let i = self.by_addr[k];
        let s = &self.spans[i];
        (s.owner == owner && s.contains(addr)).then(|| (i, ((addr - s.base) >> s.shift) as u64))
    }

    /// The largest page size, in bytes.
    pub fn largest_page(&self) -> usize {
        self.spans.iter().map(|s| s.page_size).max().unwrap_or(4096)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringfault_proto::{PageSize, RegionDesc};

    #[test]
    fn numbering_and_addresses() {
        let layout = Layout {
            regions: vec![
                RegionDesc {
                    id: 3,
                    page_size: PageSize::Size4K,
                    size: 16 * 4096,
                },
                RegionDesc {
                    id: 0,
                    page_size: PageSize::Size2M,
                    size: 4 << 21,
                },
            ],
        };
        let s = PageSpace::new(&layout, &[0x40_0000_0000, 0x10_0000_0000]);
        assert_eq!(s.total(), 20);
        assert_eq!(s.index_of(0), Some(1));
        assert_eq!(s.locate(16), Some((1, 0)));
        assert_eq!(s.locate(20), None);
        assert_eq!(s.global(0, 15), Some(15));
        assert_eq!(s.global(0, 16), None);
        assert_eq!(s.locate_addr(0x10_0000_0000 + (3 << 21) + 5), Some((1, 3)));
        assert_eq!(s.locate_addr(0x40_0000_0000 + 4096 * 15), Some((0, 15)));
        assert_eq!(s.locate_addr(0x40_0000_0000 + 4096 * 16), None);
        assert_eq!(s.locate_addr(5), None);
        assert_eq!(s.span(0).map(|x| x.addr_of(2)), Some(0x40_0000_0000 + 8192));
        assert_eq!(s.owners(), 1);
    }

    #[test]
    fn owners_may_share_addresses() {
        let r = |id| RegionDesc {
            id,
            page_size: PageSize::Size4K,
            size: 4 * 4096,
        };
        let layout = Layout {
            regions: vec![r(0), r(1), r(2)],
        };
        let s = PageSpace::with_owners(&layout, &[0x10000, 0x10000, 0x20000], &[0, 1, 1]);
        assert_eq!(s.owners(), 2);
        assert_eq!(s.locate_addr_in(0, 0x10000 + 4096), Some((0, 1)));
        assert_eq!(s.locate_addr_in(1, 0x10000 + 4096), Some((1, 1)));
        assert_eq!(s.locate_addr_in(1, 0x20000 + 3 * 4096), Some((2, 3)));
        assert_eq!(s.locate_addr_in(0, 0x20000), None);
        assert_eq!(s.locate_addr_in(2, 0x10000), None);
        assert_eq!(s.locate_addr(0x10000), Some((0, 0)));
    }
}
