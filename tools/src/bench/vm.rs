//! The synthetic VM: one region of guest memory whose pages are a pure function
//! of (seed, page), so both ends agree on every byte without sending it; and
//! per-page digests that prove, at the end, that both ends hold the same bytes.
//!
//! A page is *unpopulated* (never touched, so the source's page map says so and the
//! engine sends a range, not data), *zero* (touched but all zero, about 2% of
//! populated pages), or *data* (pseudo-random bytes).

use std::sync::Arc;

use anyhow::Context;
use ringfault_engine::sys::guest::{GuestMemory, RegionSpec};
use ringfault_engine::sys::mapping::MapOptions;
use ringfault_engine::verify::page_hash;
use serde::{Deserialize, Serialize};

/// Bytes per page (the synthetic VM uses 4 KiB pages).
pub const PAGE: usize = 4096;
/// Pages per verification chunk (1 MiB).
pub const CHUNK_PAGES: u64 = 256;

/// The recipe of a synthetic VM.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct VmSpec {
    /// Bytes of guest memory (a multiple of [`PAGE`]).
    pub size: u64,
    /// Fraction of pages ever populated.
    pub populated: f64,
    /// Seed of the page contents and of the workload.
    pub seed: u64,
    /// Bytes per page of the mapping: 4 KiB, or 2 MiB / 1 GiB for hugetlbfs.
    #[serde(default = "default_page_size")]
    pub page_size: u64,
    /// 4 KiB mappings: back them with transparent huge pages.
    #[serde(default)]
    pub thp: bool,
}

fn default_page_size() -> u64 {
    PAGE as u64
}

/// What a page holds at the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageClass {
    /// Pseudo-random bytes.
    Data,
    /// Touched, all zero.
    Zero,
    /// Never touched.
    Unpopulated,
}

/// A 64-bit finaliser (SplitMix64's).
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl VmSpec {
    /// Pages in the VM.
    pub fn pages(&self) -> u64 {
        self.size / PAGE as u64
    }

    /// Populated share in parts per million.
    fn populated_ppm(&self) -> u64 {
        // The value is checked to lie in 0..=1, so the product is in 0..=1e6.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ppm = (self.populated.clamp(0.0, 1.0) * 1_000_000.0).round() as u64;
        ppm
    }

    /// Pages per population granule: a guest populates its memory in units
    /// of the pages that back it (2 MiB with transparent or hugetlbfs huge
    /// pages), so a sparse VM is sparse in those units.
    fn granule(&self) -> u64 {
        if self.thp {
            512
        } else {
            (self.page_size / PAGE as u64).max(1)
        }
    }

    /// The class of `page`.
    pub fn class(&self, page: u64) -> PageClass {
        let g = page / self.granule();
        let populated = mix(self.seed ^ g.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % 1_000_000
            < self.populated_ppm();
        let h = mix(self.seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if !populated {
            PageClass::Unpopulated
        } else if (h >> 32).is_multiple_of(50) {
            PageClass::Zero
        } else {
            PageClass::Data
        }
    }

    /// The initial bytes of `page`.
    pub fn fill(&self, page: u64, out: &mut [u8]) {
        match self.class(page) {
            PageClass::Data => {
                let mut x = mix(self.seed.wrapping_add(1) ^ page) | 1;
                for chunk in out.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.copy_from_slice(&x.to_le_bytes());
                }
            }
            _ => out.fill(0),
        }
    }

    /// Checks the size.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !matches!(self.page_size, 4096 | 0x20_0000 | 0x4000_0000) {
            anyhow::bail!("the page size must be 4 KiB, 2 MiB or 1 GiB");
        }
        if self.size == 0 || !self.size.is_multiple_of(self.page_size) {
            anyhow::bail!(
                "the VM size must be a non-zero multiple of its page size ({} KiB)",
                self.page_size / 1024
            );
        }
        usize::try_from(self.size).context("the VM size does not fit in memory")?;
        Ok(())
    }

    /// How the VM's memory is mapped (both ends use the same).
    pub fn map_options(&self) -> MapOptions {
        MapOptions {
            thp: self.thp,
            populate: false,
        }
    }

    /// Maps and fills the source's memory with `threads` threads: every populated
    /// page is written (zero pages with zeros), unpopulated pages are left alone.
    pub fn build(&self, threads: usize) -> anyhow::Result<Arc<GuestMemory>> {
        self.validate()?;
        let len = usize::try_from(self.size)?;
        let m = Arc::new(
            GuestMemory::anonymous(
                &[RegionSpec {
                    id: 1,
                    size: len,
                    page_size: usize::try_from(self.page_size)?,
                }],
                self.map_options(),
            )
            .with_context(|| match self.page_size {
                4096 => "mapping the synthetic VM's memory".to_owned(),
                ps => format!(
                    "mapping the synthetic VM's memory with {} KiB huge pages (is the pool big enough? sysctl vm.nr_hugepages)",
                    ps / 1024
                ),
            })?,
        );
        let pages = self.pages();
        let threads = u64::try_from(threads.max(1))?;
        let per = pages.div_ceil(threads);
        std::thread::scope(|s| -> anyhow::Result<()> {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let m = &m;
                    s.spawn(move || -> anyhow::Result<()> {
                        let mut buf = vec![0u8; PAGE];
                        for p in (t * per)..((t + 1) * per).min(pages) {
                            if self.class(p) == PageClass::Unpopulated {
                                continue;
                            }
                            self.fill(p, &mut buf);
                            m.regions()[0].write(page_offset(p)?, &buf)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a fill thread panicked"))??;
            }
            Ok(())
        })?;
        Ok(m)
    }
}

/// Byte offset of a page.
pub fn page_offset(page: u64) -> anyhow::Result<usize> {
    Ok(usize::try_from(page)? * PAGE)
}

/// Guest memory as the workload and the verifier reach it: never as a slice.
pub trait GuestMem: Send + Sync {
    /// Reads the u64 at `off`.
    fn load(&self, off: usize) -> u64;
    /// Writes the u64 at `off` (a guest store).
    fn store(&self, off: usize, v: u64);
    /// Copies `buf.len()` bytes at `off` out.
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Address of the first byte (for `/proc` lookups).
    fn base(&self) -> usize;
    /// Whether any page of `off..off + len` is mapped to memory of its own (a
    /// page never mapped, or mapped to the shared zero page, reads zero, so it
    /// need not be read to be hashed). True when unknown.
    fn mapped_any(&self, off: usize, len: usize) -> bool {
        let _ = (off, len);
        true
    }
}

impl GuestMem for GuestMemory {
    fn load(&self, off: usize) -> u64 {
        self.regions()[0].load_u64(off).unwrap_or(0)
    }
    fn store(&self, off: usize, v: u64) {
        let _ = self.regions()[0].store_u64(off, v);
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        let _ = self.regions()[0].read(off, buf);
    }
    fn base(&self) -> usize {
        self.regions()[0].addr()
    }
    fn mapped_any(&self, off: usize, len: usize) -> bool {
        use ringfault_engine::sys::pagemap::{Query, Scanner, PAGE_IS_PFNZERO};
        thread_local! {
            static SCANNER: std::cell::RefCell<Option<Scanner>> =
                std::cell::RefCell::new(Scanner::new().ok());
        }
        let start = self.regions()[0].addr() + off;
        SCANNER.with(|s| {
            s.borrow_mut()
                .as_mut()
                .and_then(|sc| sc.scan(start, start + len, Query::Populated).ok())
                // Pages mapped to the shared zero page read zero too.
                .is_none_or(|v| v.iter().any(|x| x.categories & PAGE_IS_PFNZERO == 0))
        })
    }
}

/// One digest per [`CHUNK_PAGES`] pages of `mem`, in order. `restore` may patch a
/// page's bytes before hashing (the destination puts back the words its workload
/// wrote, so that it hashes the page as it arrived).
pub fn digests(mem: &dyn GuestMem, pages: u64, restore: &dyn Fn(u64, &mut [u8])) -> Vec<u64> {
    digests_of(mem, 0, pages, restore)
}

/// The digests of pages `first..end`, where `first` starts a chunk; a chunk ends
/// every [`CHUNK_PAGES`] pages and at `end`.
fn digests_of(
    mem: &dyn GuestMem,
    first: u64,
    end: u64,
    restore: &dyn Fn(u64, &mut [u8]),
) -> Vec<u64> {
    let chunks = end.saturating_sub(first).div_ceil(CHUNK_PAGES);
    let mut out = Vec::with_capacity(usize::try_from(chunks).unwrap_or(0));
    let mut buf = vec![0u8; PAGE];
    let mut c = first;
    while c < end {
        let stop = (c / CHUNK_PAGES + 1) * CHUNK_PAGES;
        let stop = stop.min(end);
        let (Ok(off), Ok(n)) = (page_offset(c), usize::try_from(stop - c)) else {
            break;
        };
        // A chunk that reads all zero has a digest of its own, so that a
        // chunk never mapped on either side (a sparse VM) is not read.
        if !mem.mapped_any(off, n * PAGE) {
            out.push(zero_chunk_digest(c));
            c = stop;
            continue;
        }
        let mut d = 0u64;
        let mut zero = true;
        for p in c..stop {
            let Ok(off) = page_offset(p) else { break };
            mem.read(off, &mut buf);
            restore(p, &mut buf);
            zero &= buf.iter().all(|&b| b == 0);
            d = mix(d ^ page_hash(&buf)).wrapping_add(p);
        }
        out.push(if zero { zero_chunk_digest(c) } else { d });
        c = stop;
    }
    out
}

/// The digest of a chunk that reads all zero, by its first page.
fn zero_chunk_digest(first: u64) -> u64 {
    mix(first ^ 0x5a5a_0000_0000_0001)
}

/// Digests computed by two threads (the work is memory bound).
pub fn digests_parallel(
    mem: &dyn GuestMem,
    pages: u64,
    restore: &(dyn Fn(u64, &mut [u8]) + Sync),
) -> Vec<u64> {
    let chunks = pages.div_ceil(CHUNK_PAGES);
    let half = chunks / 2;
    let split = (half * CHUNK_PAGES).min(pages);
    std::thread::scope(|s| {
        let second = s.spawn(|| digests_of(mem, split, pages, restore));
        let mut first = digests(mem, split, restore);
        first.extend(second.join().unwrap_or_default());
        first
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_populated_share() {
        let spec = VmSpec {
            size: 4096 * 10_000,
            populated: 0.25,
            seed: 7,
            page_size: 4096,
            thp: false,
        };
        let populated = (0..10_000)
            .filter(|&p| spec.class(p) != PageClass::Unpopulated)
            .count();
        assert!((2_200..2_800).contains(&populated), "{populated}");
        let full = VmSpec {
            populated: 1.0,
            ..spec
        };
        assert!((0..10_000).all(|p| full.class(p) != PageClass::Unpopulated));
    }

    #[test]
    fn digests_see_one_byte() {
        let spec = VmSpec {
            size: 4096 * 600,
            populated: 1.0,
            seed: 1,
            page_size: 4096,
            thp: false,
        };
        let m = spec.build(2).unwrap();
        let a = digests_parallel(&*m, spec.pages(), &|_, _| {});
        assert_eq!(a.len(), 3);
        assert_eq!(a, digests(&*m, spec.pages(), &|_, _| {}));
        m.store(4096 * 300 + 5, 1);
        let b = digests_parallel(&*m, spec.pages(), &|_, _| {});
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
    }
}
