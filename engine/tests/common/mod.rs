//! Shared harness for migration tests: a synthetic VM whose pages are a pure
//! function of (seed, region, page), so both processes agree on every byte without
//! sending it; a source child process; and a destination-side workload that reads
//! and writes random pages from the first instant.

// Test harness only: it runs on 64-bit Linux, where page indexes and sizes fit in
// usize, and each test binary uses a subset of these helpers.
#![allow(dead_code, clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringfault_engine::sys::guest::{GuestMemory, RegionSpec};
use ringfault_engine::sys::mapping::MapOptions;
use ringfault_engine::{PeerAddr, Source, SourceConfig};
use ringfault_proto::auth::PresharedKey;

pub const PAGE: usize = 4096;

/// One migration tests at a time: they pin threads and use most of the machine.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a page holds on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageClass {
    Data,
    /// Touched, but all zero.
    Zero,
    /// Never touched.
    Unpopulated,
}

/// The synthetic VM's recipe.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub seed: u64,
    pub region_sizes: Vec<usize>,
    /// Per mille of pages ever populated.
    pub populated_permille: u64,
}

impl VmSpec {
    pub fn encode(&self) -> String {
        let sizes: Vec<String> = self.region_sizes.iter().map(|s| s.to_string()).collect();
        format!(
            "{};{};{}",
            self.seed,
            sizes.join(","),
            self.populated_permille
        )
    }
    pub fn decode(s: &str) -> VmSpec {
        let mut it = s.split(';');
        let seed = it.next().unwrap().parse().unwrap();
        let sizes = it
            .next()
            .unwrap()
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect();
        let permille = it.next().unwrap().parse().unwrap();
        VmSpec {
            seed,
            region_sizes: sizes,
            populated_permille: permille,
        }
    }

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
            PageClass::Data => {
                let mut x = mix(self.seed.wrapping_add(1) ^ ((region as u64) << 40) ^ page);
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
}

/// A tuning override from the environment (for experiments; tests run on defaults).
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Builds the source's memory: region ids 1.. in order.
pub fn build_source_memory(spec: &VmSpec) -> Arc<GuestMemory> {
    let specs: Vec<RegionSpec> = spec
        .region_sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| RegionSpec {
            id: i as u32 + 1,
            size,
            page_size: PAGE,
        })
        .collect();
    let mem = GuestMemory::anonymous(&specs, MapOptions::default()).unwrap();
    let mut page = vec![0u8; PAGE];
    for (ri, r) in mem.regions().iter().enumerate() {
        for p in 0..r.pages() {
            if spec.class(ri, p) == PageClass::Unpopulated {
                continue;
            }
            spec.fill(ri, p, &mut page);
            r.write(p as usize * PAGE, &page).unwrap();
        }
    }
    Arc::new(mem)
}

pub const KEY_A: &[u8] = b"ringfault-test-key-A-0123456789";
pub const KEY_B: &[u8] = b"ringfault-test-key-B-9876543210";

/// Body of the source child process: serves the VM described by the environment,
/// prints `READY <addr>` once listening, `SOURCE OK <json>` or `SOURCE ERROR: ...`.
pub fn source_child_main() {
    let Ok(spec) = std::env::var("RF_SOURCE_SPEC") else {
        return; // not the child
    };
    let spec = VmSpec::decode(&spec);
    let key = std::env::var("RF_SOURCE_KEY").unwrap();
    let mem = build_source_memory(&spec);
    let key = PresharedKey::new(key.into_bytes()).unwrap();
    let mut cfg = SourceConfig::new(key);
    if let Some(p) = env_u64("RF_PIN") {
        cfg.pin_workers = p != 0;
    }
    if let Some(p) = env_u64("RF_PRIO") {
        cfg.prioritize_demand = p != 0;
    }
    if std::env::var("RF_PROTECTION").as_deref() == Ok("none") {
        cfg.protection = ringfault_engine::Protection::None;
    }
    let source = Source::from_memory(mem, cfg).unwrap();
    let listen_on = std::env::var("RF_SOURCE_LISTEN").unwrap_or_else(|_| "tcp:127.0.0.1:0".into());
    let listener = PeerAddr::parse(&listen_on).unwrap().listen().unwrap();
    println!("READY {}", listener.local_addr().unwrap());
    match source.serve(&listener) {
        Ok(report) => {
            println!("SOURCE OK {}", serde_json::to_string(&report).unwrap());
            std::process::exit(0);
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            println!("SOURCE ERROR: {msg}");
            std::process::exit(1);
        }
    }
}

/// A source running in a child process (this test binary, re-executed).
pub struct SourceChild {
    pub child: Child,
    pub addr: PeerAddr,
    out: BufReader<std::process::ChildStdout>,
    finished: bool,
}

impl Drop for SourceChild {
    fn drop(&mut self) {
        // A failed test must not leave a source waiting for a resume.
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl SourceChild {
    pub fn spawn(test_name: &str, spec: &VmSpec, key: &[u8]) -> SourceChild {
        Self::spawn_on(test_name, spec, key, "tcp:127.0.0.1:0")
    }

    pub fn spawn_on(test_name: &str, spec: &VmSpec, key: &[u8], listen: &str) -> SourceChild {
        Self::spawn_with(test_name, spec, key, listen, false)
    }

    pub fn spawn_with(
        test_name: &str,
        spec: &VmSpec,
        key: &[u8],
        listen: &str,
        zero_copy: bool,
    ) -> SourceChild {
        #[allow(clippy::zombie_processes)] // waited for in `finish`
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
            .env("RF_SOURCE_LISTEN", listen)
            .env("RF_PROTECTION", if zero_copy { "none" } else { "mac" })
            .env("RF_SOURCE_SPEC", spec.encode())
            .env("RF_SOURCE_KEY", std::str::from_utf8(key).unwrap())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "source child died before READY"
            );
            // libtest may print "test source_child ... " before our line.
            if let Some(i) = line.find("READY ") {
                let addr = PeerAddr::parse(line[i + 6..].trim()).unwrap();
                return SourceChild {
                    child,
                    addr,
                    out,
                    finished: false,
                };
            }
        }
    }

    /// Waits for the child; returns (exit success, its result line).
    pub fn finish(mut self) -> (bool, String) {
        self.finished = true;
        let mut rest = String::new();
        let mut line = String::new();
        while self.out.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(i) = line.find("SOURCE ") {
                rest = line[i..].trim().to_owned();
            }
            line.clear();
        }
        let status = self.child.wait().unwrap();
        (status.success(), rest)
    }
}

/// Random reads and writes on the destination, from the first instant.
pub struct Workload {
    stop: Arc<AtomicBool>,
    pub ops: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<WorkloadResult>>,
}

#[derive(Debug, Default)]
pub struct WorkloadResult {
    /// (region, page) -> last value this thread wrote at offset thread*8.
    pub writes: HashMap<(usize, u64), u64>,
    /// Reads that did not see the source's bytes.
    pub bad_reads: Vec<String>,
}

impl Workload {
    pub fn start(spec: &VmSpec, mem: Arc<GuestMemory>, threads: usize) -> Workload {
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
                    let areas = mem.regions();
                    while !stop.load(Ordering::Relaxed) {
                        x = mix(x);
                        let ri = (x % areas.len() as u64) as usize;
                        let pages = areas[ri].pages();
                        let pg = (x >> 8) % pages;
                        let base = pg as usize * PAGE;
                        if x >> 60 < 8 {
                            n += 1;
                            let v = ((t as u64) << 56) | n;
                            areas[ri].store_u64(base + t * 8, v).unwrap();
                            res.writes.insert((ri, pg), v);
                        } else {
                            // Read a word no workload thread writes (offsets >= 64).
                            let off = 64 + ((x >> 20) as usize % ((PAGE - 64) / 8)) * 8;
                            let got = areas[ri].load_u64(base + off).unwrap();
                            spec.fill(ri, pg, &mut page);
                            let want = u64::from_le_bytes(page[off..off + 8].try_into().unwrap());
                            if got != want && res.bad_reads.len() < 10 {
                                res.bad_reads.push(format!(
                                    "region {ri} page {pg} offset {off}: read {got:#x}, source has {want:#x}"
                                ));
                            }
                        }
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    res
                })
            })
            .collect();
        Workload { stop, ops, handles }
    }

    pub fn stop(self) -> Vec<WorkloadResult> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    }
}

/// Compares every page of the destination with the source's bytes, overlaid with
/// the workload's writes. Returns the first few differences.
pub fn verify(spec: &VmSpec, mem: &GuestMemory, writes: &[WorkloadResult]) -> Vec<String> {
    let mut bad = Vec::new();
    let mut want = vec![0u8; PAGE];
    let mut got = vec![0u8; PAGE];
    for (ri, a) in mem.regions().iter().enumerate() {
        for pg in 0..a.pages() {
            spec.fill(ri, pg, &mut want);
            for (t, w) in writes.iter().enumerate() {
                if let Some(v) = w.writes.get(&(ri, pg)) {
                    want[t * 8..t * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            a.read(pg as usize * PAGE, &mut got).unwrap();
            if got != want {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                bad.push(format!(
                    "region {ri} page {pg} ({:?}) differs at byte {at}",
                    spec.class(ri, pg)
                ));
                if bad.len() >= 10 {
                    return bad;
                }
            }
        }
    }
    bad
}
