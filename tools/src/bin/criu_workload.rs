#![forbid(unsafe_code)]
//! `ringfault-criu-workload`: the process that the CRIU tests and the CRIU
//! benchmark checkpoint and restore lazily. Standard library only, one
//! thread per process, standard streams on `/dev/null`: nothing CRIU cannot
//! dump.
//!
//! It fills `--mib` MiB with a known pattern, writes `DIR/ready-INDEX`, and
//! then, until `DIR/go` exists (the restore has happened), keeps rewriting
//! pages. After `go`, by `--mode`:
//! - `verify`: reads every byte and writes `DIR/result-INDEX`: `OK <bytes>`
//!   or `BAD <what>`; then exits;
//! - `exit`: writes `EXITED` and exits at once, touching nothing;
//! - `bench`: random 8-byte stores; the first store to each page is timed
//!   (a fault while its page is missing). Until `DIR/stop` exists, or every
//!   page has been touched and `--linger` seconds passed; then writes
//!   `OK first_touches=N p50_ns=.. p99_ns=.. max_ns=.. faults=N
//!   fault_p50_ns=.. fault_p99_ns=.. stores=.. seconds=.. touched_all_s=..
//!   timeline_100ms=S1,S2,..` (`faults`: first touches slower than 5 µs,
//!   which found their page missing; the timeline: stores done by the end
//!   of each 100 ms) and exits.
//!
//! `--children K` starts K more copies (indices 1..=K) as its children, so
//! that the checkpoint is a process tree; `--child-mode` sets their mode.
//!
//! The pattern: word `j` of page `k` is `mix(seed, k, j, gen[k])`, where
//! `gen` (also in memory) counts the rewrites of page `k`. A rewrite marks
//! the page in progress, writes it with the next generation, bumps `gen`,
//! and clears the mark, so a checkpoint taken at any instruction verifies.

use std::path::{Path, PathBuf};
use std::sync::atomic::{compiler_fence, Ordering};
use std::time::{Duration, Instant};

const PAGE_WORDS: usize = 4096 / 8;
/// A first touch slower than this was a fault: a userfaultfd round trip
/// takes tens of µs at least, a store to a present page well under 1 µs.
const FAULT_NS: u32 = 5_000;
const NONE: usize = usize::MAX;

struct Args {
    mib: usize,
    seed: u64,
    dir: PathBuf,
    index: u32,
    mode: String,
    children: u32,
    child_mode: String,
    linger: f64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        mib: 64,
        seed: 1,
        dir: PathBuf::from("."),
        index: 0,
        mode: "verify".into(),
        children: 0,
        child_mode: "verify".into(),
        linger: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => a.mib = val()?.parse().map_err(|e| format!("--mib: {e}"))?,
            "--seed" => a.seed = val()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--dir" => a.dir = PathBuf::from(val()?),
            "--index" => a.index = val()?.parse().map_err(|e| format!("--index: {e}"))?,
            "--mode" => a.mode = val()?,
            "--children" => a.children = val()?.parse().map_err(|e| format!("--children: {e}"))?,
            "--child-mode" => a.child_mode = val()?,
            "--linger" => a.linger = val()?.parse().map_err(|e| format!("--linger: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !["verify", "exit", "bench"].contains(&a.mode.as_str()) {
        return Err(format!("--mode {}: verify, exit or bench", a.mode));
    }
    if a.mib == 0 {
        return Err("--mib must be at least 1".into());
    }
    Ok(a)
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn word(seed: u64, page: usize, j: usize, gen: u32) -> u64 {
    mix(seed ^ ((page as u64) << 24) ^ ((j as u64) << 4) ^ (u64::from(gen) << 52))
}

struct Memory {
    words: Vec<u64>,
    gen: Vec<u32>,
    in_progress: usize,
    seed: u64,
}

impl Memory {
    fn new(mib: usize, seed: u64) -> Memory {
        let pages = mib * 256;
        let mut m = Memory {
            words: vec![0u64; pages * PAGE_WORDS],
            gen: vec![0u32; pages],
            in_progress: NONE,
            seed,
        };
        for k in 0..pages {
            m.write_page(k, 0);
        }
        m
    }

    fn pages(&self) -> usize {
        self.gen.len()
    }

    fn write_page(&mut self, k: usize, gen: u32) {
        let seed = self.seed;
        for (j, w) in self.words[k * PAGE_WORDS..(k + 1) * PAGE_WORDS]
            .iter_mut()
            .enumerate()
        {
            *w = word(seed, k, j, gen);
        }
    }

    /// Rewrites page `k` with its next generation, safe against a
    /// checkpoint at any point (see the module docs).
    fn rewrite(&mut self, k: usize) {
        let next = self.gen[k].wrapping_add(1);
        self.in_progress = k;
        compiler_fence(Ordering::SeqCst);
        self.write_page(k, next);
        compiler_fence(Ordering::SeqCst);
        self.gen[k] = next;
        compiler_fence(Ordering::SeqCst);
        self.in_progress = NONE;
    }

    fn verify(&self) -> Result<usize, String> {
        for k in 0..self.pages() {
            let g = self.gen[k];
            for j in 0..PAGE_WORDS {
                let got = self.words[k * PAGE_WORDS + j];
                if got == word(self.seed, k, j, g) {
                    continue;
                }
                if k == self.in_progress && got == word(self.seed, k, j, g.wrapping_add(1)) {
                    continue;
                }
                return Err(format!(
                    "page {k} word {j}: {got:#018x}, expected {:#018x} (generation {g})",
                    word(self.seed, k, j, g)
                ));
            }
        }
        Ok(self.words.len() * 8)
    }
}

fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn bench(m: &mut Memory, dir: &Path, linger: f64) -> String {
    let pages = m.pages();
    let mut touched = vec![false; pages];
    let mut left = pages;
    let mut lat: Vec<u32> = Vec::with_capacity(pages);
    let mut x = m.seed | 1;
    let n = m.words.len();
    let start = Instant::now();
    let mut all_at: Option<Duration> = None;
    let mut stores: u64 = 0;
    let stop = dir.join("stop");
    // Stores done by the end of each 100 ms since go.
    let mut timeline: Vec<u64> = Vec::new();
    let mut last_look = 0usize;
    loop {
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = usize::try_from(x % n as u64).unwrap_or(0);
            let k = i / PAGE_WORDS;
            if touched[k] {
                m.words[i] = m.words[i].wrapping_add(x);
            } else {
                let t0 = Instant::now();
                m.words[i] = m.words[i].wrapping_add(x);
                let dt = t0.elapsed();
                lat.push(u32::try_from(dt.as_nanos()).unwrap_or(u32::MAX));
                touched[k] = true;
                left -= 1;
            }
        }
        stores += 4096;
        let slot = usize::try_from(start.elapsed().as_millis() / 100).unwrap_or(usize::MAX);
        if slot < 1 << 20 {
            while timeline.len() <= slot {
                timeline.push(stores);
            }
            timeline[slot] = stores;
        }
        if left == 0 && all_at.is_none() {
            all_at = Some(start.elapsed());
        }
        // Look for the end once per 100 ms slot (and every 1M stores).
        if slot != last_look || stores.is_multiple_of(1 << 20) {
            last_look = slot;
            let done = match all_at {
                Some(t) => start.elapsed().as_secs_f64() - t.as_secs_f64() >= linger,
                None => false,
            };
            if done || stop.exists() {
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    // Quantile by per mille.
    let q = |v: &[u32], permille: usize| {
        v.get(v.len().saturating_sub(1) * permille / 1000)
            .copied()
            .unwrap_or(0)
    };
    // The first touches that were faults (their page was missing).
    let faults = &lat[lat.partition_point(|&ns| ns < FAULT_NS)..];
    format!(
        "OK first_touches={} p50_ns={} p99_ns={} max_ns={} faults={} fault_p50_ns={} fault_p99_ns={} stores={} seconds={:.3} touched_all_s={:.3} timeline_100ms={}\n",
        lat.len(),
        q(&lat, 500),
        q(&lat, 990),
        lat.last().copied().unwrap_or(0),
        faults.len(),
        q(faults, 500),
        q(faults, 990),
        stores,
        secs,
        all_at.map_or(-1.0, |d| d.as_secs_f64()),
        timeline
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    )
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ringfault-criu-workload: {e}");
            std::process::exit(2);
        }
    };
    let mut kids = Vec::new();
    if a.index == 0 {
        for i in 1..=a.children {
            let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
            let kid = std::process::Command::new(exe)
                .args(["--mib", &a.mib.to_string()])
                .args(["--seed", &(a.seed + u64::from(i) * 1000).to_string()])
                .arg("--dir")
                .arg(&a.dir)
                .args(["--index", &i.to_string()])
                .args(["--mode", &a.child_mode])
                .args(["--linger", &a.linger.to_string()])
                .spawn();
            match kid {
                Ok(k) => kids.push(k),
                Err(e) => {
                    eprintln!("ringfault-criu-workload: starting child {i}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let mut m = Memory::new(a.mib, a.seed);
    write_file(&a.dir.join(format!("ready-{}", a.index)), "ready\n");
    let go = a.dir.join("go");
    let mut k = 0usize;
    let mut n = 0u64;
    while !go.exists() {
        // Keep writing until the restore says go: 64 page rewrites, then look.
        for _ in 0..64 {
            m.rewrite(k);
            k = (k * 7 + 13) % m.pages();
            n += 1;
        }
        if n.is_multiple_of(4096) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let out = a.dir.join(format!("result-{}", a.index));
    let text = match a.mode.as_str() {
        "exit" => "EXITED\n".to_owned(),
        "bench" => bench(&mut m, &a.dir, a.linger),
        _ => match m.verify() {
            Ok(bytes) => format!("OK {bytes} bytes, {n} page rewrites\n"),
            Err(e) => format!("BAD {e}\n"),
        },
    };
    write_file(&out, &text);
    if a.mode != "exit" {
        for mut kid in kids {
            let _ = kid.wait();
        }
    }
}
