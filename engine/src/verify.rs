//! Verification of a finished migration: digests of every page, sent by the
//! source after `CompleteAck` and compared by the destination with what it
//! holds (`VERIFY`, `docs/protocol.md` §10).
//!
//! # Mechanism
//! Each region is cut into groups of [`PAGES_PER_DIGEST`] pages (the last
//! one may be shorter). A group's digest folds the hash of each page's bytes
//! with the page's index in its region, in order:
//!
//! ```text
//! d = 0
//! for each page p of the group:  d = mix(d ^ page_hash(bytes of p)) + p   (wrapping)
//! ```
//!
//! [`page_hash`] runs four independent multiply-xorshift lanes over the
//! page's little-endian 64-bit words (memory bandwidth, not a cryptographic
//! hash: the frames that carry the pages and the digests are authenticated;
//! this catches an engine bug, not an attacker). The source hashes its
//! memory, frozen since the switch-over, or its memory file; the destination
//! hashes its guest memory.
//!
//! # Hazards
//! The destination's guest may have written pages since they arrived: the
//! caller of [`compare`] passes `restore`, which puts back in a page's copy
//! what the guest wrote, so that the page is hashed as it arrived. Pages are
//! read with volatile copies, never through a slice.

use crate::error::EngineError;
use crate::sys::guest::GuestMemory;

/// Pages per digest (1 MiB of 4 KiB pages).
pub const PAGES_PER_DIGEST: u32 = 256;
/// Digests per `Digests` frame: 256 MiB of 4 KiB pages hashed per frame, so
/// that the source's demand lane is never busy long between two frames.
pub const DIGESTS_PER_FRAME: usize = 256;

/// A 64-bit mixer (splitmix64's finaliser).
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// A fast 64-bit hash of one page's bytes (a multiple of 32 bytes long).
pub fn page_hash(buf: &[u8]) -> u64 {
    let mut lanes = [
        0x243f_6a88_85a3_08d3u64,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    for block in buf.chunks_exact(32) {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&block[i * 8..i * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(w)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            *lane ^= *lane >> 29;
        }
    }
    mix(lanes[0] ^ lanes[1].rotate_left(17) ^ lanes[2].rotate_left(31) ^ lanes[3].rotate_left(47))
}

/// The digests of one region, as the source sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDigests {
    /// Region id.
    pub region: u32,
    /// Pages per digest.
    pub pages_per_digest: u32,
    /// One digest per group, from the region's first page.
    pub digests: Vec<u64>,
}

/// Pages where the destination's memory differs from the source's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// Region id.
    pub region: u32,
    /// First page (index in the region).
    pub first_page: u64,
    /// Pages, from `first_page` on (whole groups: a group that differs
    /// anywhere counts whole).
    pub pages: u64,
}

/// Copies page `page` of a region into the buffer (a page long).
pub type PageReader<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), EngineError> + 'a;

/// The digests of `groups` groups of `pages_per_digest` pages from group
/// `first_group` on, of a region of `region_pages` pages of `page_size`
/// bytes; `read(page, buf)` copies a page out.
pub fn digests_of(
    region_pages: u64,
    page_size: usize,
    pages_per_digest: u32,
    first_group: u64,
    groups: usize,
    read: &mut PageReader<'_>,
) -> Result<Vec<u64>, EngineError> {
    let per = u64::from(pages_per_digest.max(1));
    let mut buf = vec![0u8; page_size];
    let mut out = Vec::with_capacity(groups);
    for g in first_group..first_group.saturating_add(groups as u64) {
        let first = g.saturating_mul(per);
        if first >= region_pages {
            break;
        }
        let end = first.saturating_add(per).min(region_pages);
        let mut d = 0u64;
        for p in first..end {
            read(p, &mut buf)?;
            d = mix(d ^ page_hash(&buf)).wrapping_add(p);
        }
        out.push(d);
    }
    Ok(out)
}

/// Groups of a region of `pages` pages.
pub fn groups_in(pages: u64, pages_per_digest: u32) -> u64 {
    pages.div_ceil(u64::from(pages_per_digest.max(1)))
}

/// Compares `mem` with the source's digests, region by region, and returns
/// the ranges that differ (adjacent groups merged; empty: every page is
/// equal). `restore(region, page, buf)` may patch a page's copy before it is
/// hashed. Two threads share the work (it is memory bound).
pub fn compare(
    mem: &GuestMemory,
    expected: &[RegionDigests],
    restore: &(dyn Fn(u32, u64, &mut [u8]) + Sync),
) -> Result<Vec<Mismatch>, EngineError> {
    let mut out: Vec<Mismatch> = Vec::new();
    for want in expected {
        let region = mem.by_id(want.region).ok_or_else(|| {
            EngineError::LayoutMismatch(format!(
                "the source sent digests of region {}, which this memory does not have",
                want.region
            ))
        })?;
        let groups = groups_in(region.pages(), want.pages_per_digest);
        if groups != want.digests.len() as u64 {
            return Err(EngineError::LayoutMismatch(format!(
                "region {}: {} digests for {groups} groups of pages",
                want.region,
                want.digests.len()
            )));
        }
        let half = groups / 2;
        let hash = |first: u64, n: u64| {
            let mut read = |p: u64, buf: &mut [u8]| -> Result<(), EngineError> {
                let off = usize::try_from(p)
                    .ok()
                    .and_then(|p| p.checked_mul(region.page_size()))
                    .ok_or_else(|| EngineError::Internal(format!("page {p} offset")))?;
                region.read(off, buf)?;
                restore(want.region, p, buf);
                Ok(())
            };
            digests_of(
                region.pages(),
                region.page_size(),
                want.pages_per_digest,
                first,
                usize::try_from(n).unwrap_or(usize::MAX),
                &mut read,
            )
        };
        let (a, b) = std::thread::scope(|s| {
            let second = s.spawn(|| hash(half, groups - half));
            let first = hash(0, half);
            (first, second.join())
        });
        let mut got = a?;
        got.extend(b.map_err(|_| EngineError::WorkerPanicked {
            worker: "digest".into(),
        })??);
        let per = u64::from(want.pages_per_digest.max(1));
        for (g, (x, y)) in got.iter().zip(&want.digests).enumerate() {
            if x == y {
                continue;
            }
            let first = g as u64 * per;
            let pages = per.min(region.pages() - first);
            match out.last_mut() {
                Some(m) if m.region == want.region && m.first_page + m.pages == first => {
                    m.pages += pages;
                }
                _ => out.push(Mismatch {
                    region: want.region,
                    first_page: first,
                    pages,
                }),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_digest_sees_one_byte_and_the_page_index() {
        let pages = 600u64;
        let mut mem = vec![0u8; 4096 * 600];
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0];
        }
        let run = |m: &[u8]| {
            let mut read = |p: u64, buf: &mut [u8]| {
                let o = usize::try_from(p).unwrap() * 4096;
                buf.copy_from_slice(&m[o..o + 4096]);
                Ok(())
            };
            digests_of(pages, 4096, PAGES_PER_DIGEST, 0, 10, &mut read).unwrap()
        };
        let a = run(&mem);
        assert_eq!(a.len(), 3, "600 pages: two groups of 256 and one of 88");
        assert_eq!(groups_in(pages, PAGES_PER_DIGEST), 3);
        mem[4096 * 300 + 5] ^= 1;
        let b = run(&mem);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_eq!(a[2], b[2]);
        // Two zero pages swapped still differ: the index is folded in.
        let z = vec![0u8; 4096];
        assert_ne!(
            mix(page_hash(&z)).wrapping_add(0),
            mix(page_hash(&z)).wrapping_add(1)
        );
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;
    use crate::sys::guest::RegionSpec;
    use crate::sys::mapping::MapOptions;

    #[test]
    fn compare_names_the_ranges_that_differ() {
        let mem = GuestMemory::anonymous(
            &[RegionSpec {
                id: 3,
                size: 4096 * 1000,
                page_size: 4096,
            }],
            MapOptions::default(),
        )
        .unwrap();
        let r = mem.by_id(3).unwrap();
        for p in 0..1000usize {
            r.store_u64(p * 4096 + 8, p as u64 * 7 + 1).unwrap();
        }
        let mut read = |p: u64, buf: &mut [u8]| -> Result<(), EngineError> {
            Ok(r.read(usize::try_from(p).unwrap() * 4096, buf)?)
        };
        let want = RegionDigests {
            region: 3,
            pages_per_digest: PAGES_PER_DIGEST,
            digests: digests_of(1000, 4096, PAGES_PER_DIGEST, 0, 4, &mut read).unwrap(),
        };
        assert_eq!(
            compare(&mem, std::slice::from_ref(&want), &|_, _, _| {}).unwrap(),
            []
        );
        // Pages 300 and 600 change: groups 1 and 2, adjacent, one range; the
        // last group is 232 pages long.
        r.store_u64(300 * 4096, 9).unwrap();
        r.store_u64(600 * 4096, 9).unwrap();
        assert_eq!(
            compare(&mem, std::slice::from_ref(&want), &|_, _, _| {}).unwrap(),
            [Mismatch {
                region: 3,
                first_page: 256,
                pages: 512,
            }]
        );
        // `restore` puts back what a guest wrote since.
        let restore = |_: u32, p: u64, buf: &mut [u8]| {
            if p == 300 || p == 600 {
                buf[..8].fill(0);
            }
        };
        assert_eq!(compare(&mem, &[want], &restore).unwrap(), []);
    }
}
