//! Which pages of a region are populated, from `/proc/self/pagemap`.
//!
//! # Mechanism
//!
//! `/proc/self/pagemap` holds one native-endian `u64` per
//! 4 KiB virtual page: bit 63 = present in RAM, bit 62 = swapped out. We
//! `pread` it in batches of [`BATCH_ENTRIES`] entries (512 KiB per call) and
//! fold the result into a bitset with one bit per page of `page_size`. For a
//! huge page, the entry of its first 4 KiB subpage decides.
//!
//! The `PAGEMAP_SCAN` ioctl (Linux 6.7) could answer in ranges instead of
//! entries, but the plain file works on every kernel, needs no capability for
//! these two bits, and at 8 bytes per 4 KiB page reads a 64 GiB region in
//! ~128 MiB of pagemap, once, at start-up; so only the file is used.
//!
//! # Kernel versions
//!
//! `/proc/pid/pagemap`: Linux 2.6.25 (bits 62/63 always readable; PFNs need
//! `CAP_SYS_ADMIN` since 4.2, which we do not use).
//!
//! # Hazards
//!
//! * The answer is a snapshot: pages can be faulted in or zapped right after.
//! * The shared zero page (after a read fault or `UFFDIO_ZEROPAGE`) counts as
//!   present.
//! * Reading pagemap does not fault pages in, so it is safe on a
//!   uffd-registered region.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Entries read per `pread` (512 KiB of pagemap, 256 MiB of address space).
pub const BATCH_ENTRIES: usize = 64 * 1024;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const BASE_PAGE: usize = 4096;

/// Errors from reading pagemap.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// The region is not page-aligned, or the page size not a multiple of 4 KiB.
    #[error("region {addr:#x}+{len:#x} is not aligned to page size {page_size:#x}")]
    Misaligned {
        /// Start address.
        addr: usize,
        /// Length.
        len: usize,
        /// Page size.
        page_size: usize,
    },
    /// Opening or reading `/proc/self/pagemap` failed.
    #[error("reading /proc/self/pagemap for {addr:#x}+{len:#x} failed")]
    Read {
        /// Start of the batch being read.
        addr: usize,
        /// Length of the batch.
        len: usize,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Returns a bitset (64 pages per word, bit `i % 64` of word `i / 64`) of the
/// pages of `[addr, addr + len)` that are present or swapped.
pub fn populated_pages(
    addr: usize,
    len: usize,
    page_size: usize,
) -> Result<Vec<u64>, PagemapError> {
    let misaligned = || PagemapError::Misaligned {
        addr,
        len,
        page_size,
    };
    if page_size == 0
        || !page_size.is_multiple_of(BASE_PAGE)
        || !addr.is_multiple_of(page_size)
        || !len.is_multiple_of(page_size)
    {
        return Err(misaligned());
    }
    let pages = len / page_size;
    let mut bits = vec![0u64; pages.div_ceil(64)];
    if pages == 0 {
        return Ok(bits);
    }
    let file = File::open("/proc/self/pagemap").map_err(|source| PagemapError::Read {
        addr,
        len,
        source,
    })?;
    let stride = page_size / BASE_PAGE; // pagemap entries per page
    let first_entry = addr / BASE_PAGE;
    let total_entries = len / BASE_PAGE;
    let mut raw = vec![0u8; BATCH_ENTRIES.min(total_entries) * 8];
    let mut entry = 0usize; // entries done, relative to first_entry
    while entry < total_entries {
        let n = BATCH_ENTRIES.min(total_entries - entry);
        // Huge pages: only each page's first entry matters; reading entries
        // one by one would cost a syscall each, so read the batch and sample.
        let buf = &mut raw[..n * 8];
        let read_err = |source| PagemapError::Read {
            addr: (first_entry + entry) * BASE_PAGE,
            len: n * BASE_PAGE,
            source,
        };
        let offset = u64::try_from((first_entry + entry) * 8).map_err(|_| misaligned())?;
        file.read_exact_at(buf, offset).map_err(read_err)?;
        for (k, e) in buf.chunks_exact(8).enumerate() {
            let rel = entry + k;
            if !rel.is_multiple_of(stride) {
                continue;
            }
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            if u64::from_ne_bytes(w) & (PM_PRESENT | PM_SWAPPED) != 0 {
                let page = rel / stride;
                bits[page / 64] |= 1 << (page % 64);
            }
        }
        entry += n;
    }
    Ok(bits)
}

/// Whether bit `i` is set in a bitset from [`populated_pages`].
pub fn is_populated(bits: &[u64], i: usize) -> bool {
    bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}
