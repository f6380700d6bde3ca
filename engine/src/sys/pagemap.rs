//! Which pages of a range are populated, zero-page mapped or written: the
//! `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap`.
//!
//! # Mechanism
//!
//! `PAGEMAP_SCAN` walks the page tables of a range and returns *ranges* of
//! pages whose categories (present, swapped, mapped to the shared zero page,
//! written since write-protected, ...) are equal, so its cost follows the
//! populated page tables, not the address space: a 1 TiB region that was
//! never touched is one empty walk. With `PM_SCAN_WP_MATCHING` it also
//! write-protects the pages it reports as written, atomically, which is how
//! the source collects one pre-copy round's dirty pages
//! (`UFFD_FEATURE_WP_ASYNC`).
//!
//! [`Scanner`] keeps `/proc/self/pagemap` open and walks in bounded steps
//! (at most [`MAX_REGIONS_PER_CALL`] ranges per call), so a caller can spread
//! a large walk over time.
//!
//! # Kernel versions
//!
//! `PAGEMAP_SCAN`: Linux 6.7 (`PAGE_IS_PFNZERO`, `PAGE_IS_HUGE` with it).
//! Older kernels get [`PagemapError::Unsupported`].
//!
//! # Hazards
//!
//! * The answer is a snapshot: pages can be faulted in or zapped right after.
//! * Ranges are reported in 4 KiB units even on huge-page mappings.
//! * Scanning never faults pages in, so it is safe on a uffd-registered
//!   region.
//! * `PM_SCAN_WP_MATCHING` needs the range registered with userfaultfd in
//!   write-protect mode with `WP_ASYNC`; elsewhere it fails with `EPERM`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Ranges asked for per ioctl.
pub const MAX_REGIONS_PER_CALL: usize = 4096;

/// `PAGE_IS_WRITTEN`.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_PRESENT`.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`: mapped to the shared zero page.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PAGE_IS_HUGE`: mapped by a huge page.
pub const PAGE_IS_HUGE: u64 = 1 << 6;

const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u32 = (3 << 30) | (96 << 16) | (0x66 << 8) | 16;
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// Errors from scanning.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// The kernel has no `PAGEMAP_SCAN`.
    #[error("unsupported: PAGEMAP_SCAN needs Linux 6.7")]
    Unsupported,
    /// Opening `/proc/self/pagemap` failed.
    #[error("opening /proc/self/pagemap failed")]
    Open(#[source] io::Error),
    /// The ioctl failed.
    #[error("PAGEMAP_SCAN of {addr:#x}..{end:#x} failed")]
    Scan {
        /// Start of the walk.
        addr: usize,
        /// End of the walk.
        end: usize,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// One range of pages with equal categories: `[start, end)` addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanRange {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// `PAGE_IS_*` bits (masked by what was asked).
    pub categories: u64,
}

/// What to look for.
#[derive(Debug, Clone, Copy)]
pub enum Query {
    /// Pages present or swapped, and which of them map the zero page.
    Populated,
    /// Pages written since last write-protected, write-protecting them again
    /// (needs `WP_ASYNC`).
    WrittenAndProtect,
}

/// An open `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Scanner {
    file: File,
    vec: Vec<PageRegion>,
}

impl Scanner {
    /// Opens `/proc/self/pagemap` and checks that `PAGEMAP_SCAN` exists.
    pub fn new() -> Result<Scanner, PagemapError> {
        let file = File::open("/proc/self/pagemap").map_err(PagemapError::Open)?;
        let mut s = Scanner {
            file,
            vec: vec![PageRegion::default(); MAX_REGIONS_PER_CALL],
        };
        // An empty walk: ENOTTY (or EINVAL) when the ioctl is unknown.
        let probe = s.scan_step(0, 0, Query::Populated, &mut Vec::new());
        match probe {
            Err(PagemapError::Scan { source, .. })
                if matches!(source.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) =>
            {
                Err(PagemapError::Unsupported)
            }
            _ => Ok(s),
        }
    }

    /// Scans `[start, end)` from its beginning as far as one ioctl goes,
    /// appending matching ranges to `out`. Returns where the walk stopped
    /// (`end` when it is complete).
    pub fn scan_step(
        &mut self,
        start: usize,
        end: usize,
        query: Query,
        out: &mut Vec<ScanRange>,
    ) -> Result<usize, PagemapError> {
        if start >= end {
            return Ok(end);
        }
        let (flags, mask, anyof, ret) = match query {
            Query::Populated => (
                0,
                0,
                PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE,
            ),
            Query::WrittenAndProtect => (
                PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                PAGE_IS_WRITTEN,
                0,
                PAGE_IS_WRITTEN,
            ),
        };
        let mut arg = PmScanArg {
            size: 96,
            flags,
            start: start as u64,
            end: end as u64,
            walk_end: 0,
            vec: self.vec.as_mut_ptr() as u64,
            vec_len: self.vec.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: mask,
            category_anyof_mask: anyof,
            return_mask: ret,
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` (a `struct pm_scan_arg`) and writes
        // at most `vec_len` `struct page_region`s into `self.vec`, which is that
        // long and lives across the call; it changes no memory contents (with
        // WP_MATCHING only page protections of a WP-registered range).
        let n = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                crate::sys::uffd::ioctl_request(PAGEMAP_SCAN),
                &mut arg,
            )
        };
        let n = usize::try_from(n).map_err(|_| PagemapError::Scan {
            addr: start,
            end,
            source: io::Error::last_os_error(),
        })?;
        for r in self.vec.iter().take(n) {
            out.push(ScanRange {
                start: usize::try_from(r.start).unwrap_or(usize::MAX),
                end: usize::try_from(r.end).unwrap_or(usize::MAX),
                categories: r.categories,
            });
        }
        let walked = usize::try_from(arg.walk_end).unwrap_or(end);
        // When the output fills, the kernel's walk_end may fall inside or
        // before the last range it reported: resume after that range, so that
        // no page is reported twice.
        let reported = if n > 0 {
            out.last().map_or(0, |r| r.end)
        } else {
            0
        };
        let next = walked.max(reported);
        Ok(if next <= start { end } else { next.min(end) })
    }

    /// Scans all of `[start, end)`.
    pub fn scan(
        &mut self,
        start: usize,
        end: usize,
        query: Query,
    ) -> Result<Vec<ScanRange>, PagemapError> {
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            at = self.scan_step(at, end, query, &mut out)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mapping::{MapOptions, Mapping};

    #[test]
    fn populated_ranges_and_zero_pages() {
        let m = Mapping::anonymous(64 * 4096, 4096, MapOptions::default()).unwrap();
        let mut s = match Scanner::new() {
            Ok(s) => s,
            Err(PagemapError::Unsupported) => {
                eprintln!("SKIP: PAGEMAP_SCAN needs Linux 6.7");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        m.write_from(4 * 4096, &[1]).unwrap();
        m.write_from(5 * 4096, &[1]).unwrap();
        std::hint::black_box(m.load_u64(9 * 4096).unwrap()); // a read maps the zero page
        let r = s
            .scan(m.addr(), m.addr() + m.len(), Query::Populated)
            .unwrap();
        let data: Vec<_> = r
            .iter()
            .filter(|x| x.categories & PAGE_IS_PFNZERO == 0)
            .map(|x| ((x.start - m.addr()) / 4096, (x.end - m.addr()) / 4096))
            .collect();
        assert_eq!(data, vec![(4, 6)], "{r:?}");
        assert!(
            r.iter()
                .any(|x| x.categories & PAGE_IS_PFNZERO != 0 && x.start == m.addr() + 9 * 4096),
            "{r:?} from {:#x}",
            m.addr()
        );
    }
}
