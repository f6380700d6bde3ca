//! The lazy memory of each restored task, and the one page space that
//! numbers the lazy pages of all of them.
//!
//! # Mechanism
//! A task's lazy ranges are its `PE_LAZY` pagemap entries, split where they
//! cross a VMA boundary (one `UFFDIO_COPY` may not span two VMAs, and the
//! restorer registers VMAs one by one). Each range becomes one region of the
//! engine's [`PageSpace`], owned by the task's userfaultfd, so that one
//! bitmap says which lazy page of which task is present, and regions of
//! different tasks may sit at the same addresses (a parent and its child).
//! Pages of a registered VMA outside every lazy range were never populated:
//! they read as zero (CRIU maps the zero page for them).

use std::path::Path;

use ringfault_proto::{Layout, PageSize, RegionDesc};

use super::image::{self, Pagemap, Vma, PAGE_SIZE};
use super::CriuError;
use crate::space::PageSpace;

/// `MAP_PRIVATE`.
const MAP_PRIVATE: u32 = 0x02;
/// `MAP_ANONYMOUS`.
const MAP_ANONYMOUS: u32 = 0x20;
/// `MAP_LOCKED`.
const MAP_LOCKED: u32 = 0x2000;
/// `MAP_HUGETLB`.
const MAP_HUGETLB: u32 = 0x4_0000;
/// `VMA_AREA_VSYSCALL | VMA_AREA_VDSO | VMA_AREA_VVAR` (criu/include/image.h).
const VMA_SPECIAL: u32 = (1 << 2) | (1 << 3) | (1 << 12);

/// Whether the restorer registers `vma` with the userfaultfd
/// (`vma_entry_can_be_lazy` in criu/include/vma.h).
pub fn can_be_lazy(vma: &Vma) -> bool {
    vma.flags & MAP_ANONYMOUS != 0
        && vma.flags & MAP_PRIVATE != 0
        && vma.flags & (MAP_LOCKED | MAP_HUGETLB) == 0
        && vma.status & VMA_SPECIAL == 0
}

/// A run of lazy pages inside one VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyRange {
    /// First address (as dumped, and as restored).
    pub start: u64,
    /// Pages.
    pub pages: u64,
    /// Byte offset of its first page in `pages-N.img`, if the pages are there.
    pub pages_offset: Option<u64>,
}

/// What the daemon knows of one task from the images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskImage {
    /// The pid the restore sends (as in the images).
    pub pid: u32,
    /// N of its `pages-N.img`.
    pub pages_id: u32,
    /// Bytes its `pages-N.img` must hold.
    pub pages_bytes: u64,
    /// Its lazy ranges, in address order.
    pub ranges: Vec<LazyRange>,
}

impl TaskImage {
    /// Lazy pages in all its ranges.
    pub fn lazy_pages(&self) -> u64 {
        self.ranges.iter().map(|r| r.pages).sum()
    }
}

/// Reads the pagemap and VMAs of task `pid` from `dir`.
pub fn load(dir: &Path, pid: u32) -> Result<TaskImage, CriuError> {
    let pagemap = image::read_pagemap(dir, pid)?;
    let vmas = image::read_mm(dir, pid)?;
    let ranges = lazy_ranges(pid, &pagemap, &vmas)?;
    Ok(TaskImage {
        pid,
        pages_id: pagemap.pages_id,
        pages_bytes: pagemap.pages_bytes,
        ranges,
    })
}

/// The lazy entries of `pagemap`, split at the boundaries of `vmas` (both
/// sorted and disjoint, as their readers check). A lazy page outside every
/// VMA, or in a VMA the restorer does not register, is an inconsistency.
pub fn lazy_ranges(pid: u32, pagemap: &Pagemap, vmas: &[Vma]) -> Result<Vec<LazyRange>, CriuError> {
    let mut out = Vec::new();
    let mut v = 0usize;
    for e in pagemap.entries.iter().filter(|e| e.is_lazy()) {
        if e.in_parent() {
            return Err(CriuError::ParentImages { pid, addr: e.vaddr });
        }
        let mut at = e.vaddr;
        let end = e.end();
        while at < end {
            while vmas.get(v).is_some_and(|m| m.end <= at) {
                v += 1;
            }
            let vma = match vmas.get(v) {
                Some(m) if m.start <= at => m,
                _ => {
                    return Err(CriuError::Inconsistent {
                        pid,
                        addr: at,
                        why: "lie outside every VMA",
                    })
                }
            };
            if !can_be_lazy(vma) {
                return Err(CriuError::Inconsistent {
                    pid,
                    addr: at,
                    why: "lie in a VMA that is not restored lazily",
                });
            }
            let stop = end.min(vma.end);
            let pages = (stop - at) / PAGE_SIZE;
            out.push(LazyRange {
                start: at,
                pages,
                pages_offset: e.pages_offset.map(|o| o + (at - e.vaddr)),
            });
            at = stop;
        }
    }
    Ok(out)
}

/// Where one region of the page space comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSource {
    /// Its task: the index in the task list, which is also its owner
    /// (userfaultfd) in the page space.
    pub task: u32,
    /// Its first address in the images (where the page server and the
    /// pages image know it).
    pub image_addr: u64,
    /// Byte offset of its first page in the task's `pages-N.img`, if there.
    pub pages_offset: Option<u64>,
}

/// The page space of a set of tasks and, per region, where its pages are.
#[derive(Debug, Clone)]
pub struct TaskSpace {
    /// Every lazy range of every task, as one region each.
    pub space: PageSpace,
    /// By region index.
    pub regions: Vec<RegionSource>,
}

/// Numbers the lazy pages of `tasks`; task `i` is owner `i`.
pub fn space_of(tasks: &[TaskImage]) -> TaskSpace {
    let mut descs = Vec::new();
    let mut bases = Vec::new();
    let mut owners = Vec::new();
    let mut regions = Vec::new();
    for (owner, t) in (0u32..).zip(tasks) {
        for r in &t.ranges {
            descs.push(RegionDesc {
                id: u32::try_from(descs.len()).unwrap_or(u32::MAX),
                page_size: PageSize::Size4K,
                size: r.pages * PAGE_SIZE,
            });
            bases.push(usize::try_from(r.start).unwrap_or(usize::MAX));
            owners.push(owner);
            regions.push(RegionSource {
                task: owner,
                image_addr: r.start,
                pages_offset: r.pages_offset,
            });
        }
    }
    let layout = Layout { regions: descs };
    TaskSpace {
        space: PageSpace::with_owners(&layout, &bases, &owners),
        regions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::image::{PagemapEntry, PE_LAZY, PE_PARENT, PE_PRESENT};

    fn vma(start: u64, end: u64) -> Vma {
        Vma {
            start,
            end,
            flags: MAP_PRIVATE | MAP_ANONYMOUS,
            status: 1,
        }
    }

    fn pm(entries: &[(u64, u64, u32, Option<u64>)]) -> Pagemap {
        Pagemap {
            pages_id: 1,
            entries: entries
                .iter()
                .map(|&(vaddr, pages, flags, pages_offset)| PagemapEntry {
                    vaddr,
                    pages,
                    flags,
                    pages_offset,
                    record: 0,
                })
                .collect(),
            pages_bytes: 0,
        }
    }

    #[test]
    fn lazy_entries_are_split_at_vma_boundaries() {
        let p = pm(&[
            (0x1000, 1, PE_PRESENT, Some(0)),
            (0x10000, 8, PE_LAZY | PE_PRESENT, Some(4096)),
            (0x20000, 2, PE_LAZY, None),
        ]);
        let vmas = [
            vma(0x1000, 0x2000),
            vma(0x10000, 0x14000),
            vma(0x14000, 0x30000),
        ];
        let r = lazy_ranges(7, &p, &vmas).unwrap();
        assert_eq!(
            r,
            vec![
                LazyRange {
                    start: 0x10000,
                    pages: 4,
                    pages_offset: Some(4096)
                },
                LazyRange {
                    start: 0x14000,
                    pages: 4,
                    pages_offset: Some(4096 + 0x4000)
                },
                LazyRange {
                    start: 0x20000,
                    pages: 2,
                    pages_offset: None
                },
            ]
        );
        let ts = space_of(&[
            TaskImage {
                pid: 7,
                pages_id: 1,
                pages_bytes: 0,
                ranges: r.clone(),
            },
            TaskImage {
                pid: 8,
                pages_id: 2,
                pages_bytes: 0,
                ranges: r,
            },
        ]);
        assert_eq!(ts.space.total(), 20);
        assert_eq!(ts.space.owners(), 2);
        assert_eq!(ts.space.locate_addr_in(1, 0x14000), Some((4, 0)));
        assert_eq!(ts.regions[4].task, 1);
    }

    #[test]
    fn inconsistent_images_are_refused() {
        let p = pm(&[(0x10000, 8, PE_LAZY, None)]);
        let e = lazy_ranges(7, &p, &[vma(0x10000, 0x12000)]).unwrap_err();
        assert!(
            matches!(e, CriuError::Inconsistent { addr: 0x12000, .. }),
            "{e}"
        );
        let mut locked = vma(0x10000, 0x20000);
        locked.flags |= MAP_LOCKED;
        let e = lazy_ranges(7, &p, &[locked]).unwrap_err();
        assert!(e.to_string().contains("not restored lazily"), "{e}");
        let p = pm(&[(0x10000, 8, PE_LAZY | PE_PARENT, None)]);
        let e = lazy_ranges(7, &p, &[vma(0x10000, 0x20000)]).unwrap_err();
        assert!(matches!(e, CriuError::ParentImages { .. }), "{e}");
    }
}
