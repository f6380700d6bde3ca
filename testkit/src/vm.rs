//! The deterministic synthetic VM: its pages are a pure function of (seed,
//! region, page), so that the source child and the destination agree on every
//! byte without sending it. The destination runs a [`Workload`] on its memory
//! from the first instant, and [`verify`] compares every page with the
//! source's bytes overlaid with the workload's writes.

// Test harness: it runs on 64-bit Linux, where page indexes and byte offsets
// fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ringfault_engine::sys::guest::{GuestMemory, RegionSpec};
use ringfault_engine::sys::mapping::MapOptions;

use crate::{fill_pseudo_random, mix, PAGE};

/// What a page holds on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageClass {
    /// Pseudo-random bytes.
    Data,
    /// Touched, but all zero.
    Zero,
    /// Never touched.
    Unpopulated,
}

/// The synthetic VM's recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Seed of every page.
    pub seed: u64,
    /// Region sizes in bytes (4 KiB pages); region ids are 1.. in order.
    pub region_sizes: Vec<usize>,
    /// Per mille of pages ever populated.
    pub populated_permille: u64,
}

impl VmSpec {
    /// One region of `size` bytes, every page populated.
    pub fn dense(size: usize, seed: u64) -> VmSpec {
        VmSpec {
            seed,
            region_sizes: vec![size],
            populated_permille: 1000,
        }
    }

    /// The recipe as one environment-safe string (see [`VmSpec::decode`]).
    pub fn encode(&self) -> String {
        let sizes: Vec<String> = self.region_sizes.iter().map(|s| s.to_string()).collect();
        format!(
            "{};{};{}",
            self.seed,
            sizes.join(","),
            self.populated_permille
        )
    }

    /// Parses [`VmSpec::encode`]'s output.
    pub fn decode(s: &str) -> Option<VmSpec> {
        let mut it = s.split(';');
        let seed = it.next()?.parse().ok()?;
        let sizes = it
            .next()?
            .split(',')
            .map(|x| x.parse().ok())
            .collect::<Option<Vec<usize>>>()?;
        let permille = it.next()?.parse().ok()?;
        Some(VmSpec {
            seed,
            region_sizes: sizes,
            populated_permille: permille,
        })
    }

    /// Bytes in all regions.
    pub fn total_bytes(&self) -> usize {
        self.region_sizes.iter().sum()
    }

    /// Pages in all regions.
    pub fn total_pages(&self) -> u64 {
        (self.total_bytes() / PAGE) as u64
    }

    /// What page `page` of region index `region` holds.
    pub fn class(&self, region: usize, page: u64) -> PageClass {
        let h = mix(self.seed ^ ((region as u64) << 48) ^ page.wrapping_mul(0x9e37_79b9));
        if h % 1000 >= self.populated_permille {
            PageClass::Unpopulated
        } else if (h >> 20).is_multiple_of(50) {
            PageClass::Zero
        } else {
            PageClass::Data
        }
    }

    /// The source's bytes of a page.
    pub fn fill(&self, region: usize, page: u64, out: &mut [u8]) {
        match self.class(region, page) {
            PageClass::Data => fill_pseudo_random(
                mix(self.seed.wrapping_add(1) ^ ((region as u64) << 40) ^ page),
                out,
            ),
            _ => out.fill(0),
        }
    }

    /// Builds the source's guest memory: region ids 1.. in order, every page
    /// that is not [`PageClass::Unpopulated`] written.
    pub fn build_source_memory(&self) -> Arc<GuestMemory> {
        let specs: Vec<RegionSpec> = self
            .region_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| RegionSpec {
                id: i as u32 + 1,
                size,
                page_size: PAGE,
            })
            .collect();
        let mem = GuestMemory::anonymous(&specs, MapOptions::default())
            .unwrap_or_else(|e| panic!("mapping the source's memory: {e}"));
        let mut page = vec![0u8; PAGE];
        for (ri, r) in mem.regions().iter().enumerate() {
            for p in 0..r.pages() {
                if self.class(ri, p) == PageClass::Unpopulated {
                    continue;
                }
                self.fill(ri, p, &mut page);
                r.write(p as usize * PAGE, &page)
                    .unwrap_or_else(|e| panic!("writing source page {p}: {e}"));
            }
        }
        Arc::new(mem)
    }
}

/// Random reads and writes on the destination, from the first instant.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    /// Operations done so far.
    pub ops: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<WorkloadResult>>,
}

/// What one workload thread did.
#[derive(Debug, Default)]
pub struct WorkloadResult {
    /// (region, page) -> last value this thread wrote at offset thread*8.
    pub writes: HashMap<(usize, u64), u64>,
    /// Reads that did not see the source's bytes.
    pub bad_reads: Vec<String>,
}

impl Workload {
    /// Starts `threads` threads (at most 8) on `mem`: each either stores a
    /// counter at its own offset (`thread * 8`) of a random page or loads a word
    /// no thread writes and compares it with the source's.
    pub fn start(spec: &VmSpec, mem: Arc<GuestMemory>, threads: usize) -> Workload {
        assert!(threads <= 8, "workload threads write words 0..8 of a page");
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let handles = (0..threads)
            .map(|t| {
                let (stop, ops, spec, mem) = (stop.clone(), ops.clone(), spec.clone(), mem.clone());
                std::thread::spawn(move || {
                    let mut res = WorkloadResult::default();
                    let mut x = mix(spec.seed ^ (t as u64 + 99));
                    let mut page = vec![0u8; PAGE];
                    let mut n = 0u64;
                    let regions = mem.regions();
                    // Relaxed: a stop flag; the join publishes the results.
                    while !stop.load(Ordering::Relaxed) {
                        x = mix(x);
                        let ri = (x % regions.len() as u64) as usize;
                        let pg = (x >> 8) % regions[ri].pages();
                        let base = pg as usize * PAGE;
                        if x >> 60 < 8 {
                            n += 1;
                            let v = ((t as u64) << 56) | n;
                            regions[ri]
                                .store_u64(base + t * 8, v)
                                .unwrap_or_else(|e| panic!("guest store: {e}"));
                            res.writes.insert((ri, pg), v);
                        } else {
                            // A word no workload thread writes (offsets 64..)
                            // and the source's guest does not either (the last
                            // 64 bytes, see [`SOURCE_WORD`]).
                            let off = 64 + ((x >> 20) as usize % ((PAGE - 128) / 8)) * 8;
                            let got = regions[ri]
                                .load_u64(base + off)
                                .unwrap_or_else(|e| panic!("guest load: {e}"));
                            spec.fill(ri, pg, &mut page);
                            let mut w = [0u8; 8];
                            w.copy_from_slice(&page[off..off + 8]);
                            let want = u64::from_le_bytes(w);
                            if got != want && res.bad_reads.len() < 10 {
                                res.bad_reads.push(format!(
                                    "region {ri} page {pg} offset {off}: read {got:#x}, source has {want:#x}"
                                ));
                            }
                        }
                        // Relaxed: a statistic.
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    res
                })
            })
            .collect();
        Workload { stop, ops, handles }
    }

    /// Stops every thread; returns what each did, in thread order.
    pub fn stop(self) -> Vec<WorkloadResult> {
        // Relaxed: see `start`.
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| panic!("a workload thread panicked"))
            })
            .collect()
    }
}

/// The offset in a page where a test's source-side guest writes its word
/// while the source runs (pre-copy): the destination's [`Workload`] neither
/// reads nor writes the last 64 bytes of a page.
pub const SOURCE_WORD: usize = PAGE - 8;

/// Compares every page of the destination with the source's bytes, overlaid
/// with the workload's writes. Returns the first few differences.
pub fn verify(spec: &VmSpec, mem: &GuestMemory, writes: &[WorkloadResult]) -> Vec<String> {
    verify_with(spec, mem, writes, &HashMap::new())
}

/// As [`verify`], for a source whose guest ran on: `source_writes` holds the
/// last word it stored at [`SOURCE_WORD`] of each (region, page) it wrote.
pub fn verify_with(
    spec: &VmSpec,
    mem: &GuestMemory,
    writes: &[WorkloadResult],
    source_writes: &HashMap<(usize, u64), u64>,
) -> Vec<String> {
    let mut bad = Vec::new();
    let mut want = vec![0u8; PAGE];
    let mut got = vec![0u8; PAGE];
    for (ri, r) in mem.regions().iter().enumerate() {
        for pg in 0..r.pages() {
            spec.fill(ri, pg, &mut want);
            if let Some(v) = source_writes.get(&(ri, pg)) {
                want[SOURCE_WORD..].copy_from_slice(&v.to_le_bytes());
            }
            for (t, w) in writes.iter().enumerate() {
                if let Some(v) = w.writes.get(&(ri, pg)) {
                    want[t * 8..t * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            if let Err(e) = r.read(pg as usize * PAGE, &mut got) {
                bad.push(format!("region {ri} page {pg}: read failed: {e}"));
            } else if got != want {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                let word = |b: &[u8]| {
                    let w = at / 8 * 8;
                    let mut x = [0u8; 8];
                    x.copy_from_slice(&b[w..w + 8]);
                    u64::from_le_bytes(x)
                };
                bad.push(format!(
                    "region {ri} page {pg} ({:?}) differs at byte {at}: word {:#x}, expected {:#x}",
                    spec.class(ri, pg),
                    word(&got),
                    word(&want)
                ));
            }
            if bad.len() >= 10 {
                return bad;
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_and_classes_follow_the_share() {
        let spec = VmSpec {
            seed: 7,
            region_sizes: vec![8 * PAGE, 4 * PAGE],
            populated_permille: 100,
        };
        assert_eq!(VmSpec::decode(&spec.encode()), Some(spec.clone()));
        assert_eq!(VmSpec::decode("x;1;2"), None);
        let unpopulated = (0..10_000)
            .filter(|&p| spec.class(0, p) == PageClass::Unpopulated)
            .count();
        assert!((8_500..9_500).contains(&unpopulated), "{unpopulated}");
        let mut a = vec![0u8; PAGE];
        let mut b = vec![0u8; PAGE];
        let data = (0..100)
            .find(|&p| spec.class(0, p) == PageClass::Data)
            .unwrap();
        spec.fill(0, data, &mut a);
        spec.fill(0, data, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }
}
