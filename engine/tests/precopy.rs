//! Hybrid migrations: pre-copy rounds while the source's guest keeps writing,
//! then the switch-over and post-copy. The source runs in a child process
//! (this binary re-executed) whose guest writes a word at [`SOURCE_WORD`] of
//! pages until the switch-over; the destination runs here, with a workload
//! that reads and writes from the instant the VM resumes. Every test checks
//! every page against the source's final bytes, overlaid with both guests'
//! writes.
//!
//! `cargo test precopy` selects them.

// Test harness: page indexes and offsets fit in usize on 64-bit Linux.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringfault_engine::source::precopy::{Precopy, Rounds};
use ringfault_engine::{Destination, DestinationConfig, PeerAddr, Source, SourceConfig};
use ringfault_proto::auth::PresharedKey;
use ringfault_testkit::{
    error_chain, mix, serial, verify_with, ChildProc, TestDir, VmSpec, Workload, WorkloadResult,
    KEY_A, MIB, PAGE, SOURCE_WORD,
};

const SPEC_ENV: &str = "RF_PRECOPY_SPEC";
const ROUNDS_ENV: &str = "RF_PRECOPY_ROUNDS";
/// `hot`: the guest rewrites a hot set until the switch-over; `last`: it
/// writes only one page, inside the switch-over, as the VM stops.
const WRITER_ENV: &str = "RF_PRECOPY_WRITER";
const WRITES_ENV: &str = "RF_PRECOPY_WRITES";

/// The page the source's guest writes as the very last thing before it
/// stops: region 0, page 7 (data in every spec here).
const LAST_PAGE: (usize, u64) = (0, 7);

fn last_value(seed: u64) -> u64 {
    mix(seed ^ 0x1a57_1a57)
}

/// The pages the `hot` writer rewrites: the first eighth of each region.
fn hot_pages(spec: &VmSpec, region: usize) -> u64 {
    (spec.region_sizes[region] / PAGE / 8) as u64
}

/// The source child's entry point: does nothing unless started by `Hybrid`.
#[test]
#[ignore = "child-process entry point, run by other tests"]
fn precopy_source_child() {
    let Ok(spec) = std::env::var(SPEC_ENV) else {
        return;
    };
    let spec = VmSpec::decode(&spec).expect("spec");
    let rounds = match std::env::var(ROUNDS_ENV).as_deref() {
        Ok("auto") => Rounds::Auto,
        Ok(n) => Rounds::Fixed(n.parse().expect("rounds")),
        Err(_) => Rounds::Auto,
    };
    let writer_kind = std::env::var(WRITER_ENV).unwrap_or_default();
    let writes_file = std::env::var(WRITES_ENV).expect("writes file");
    let mut cfg = SourceConfig::new(PresharedKey::new(KEY_A.to_vec()).expect("key"));
    cfg.precopy = Some(Precopy {
        rounds,
        max_pause: Duration::from_millis(20),
    });
    let mem = spec.build_source_memory();
    let source = Source::from_memory(mem.clone(), cfg)
        .unwrap_or_else(|e| panic!("the source: {}", error_chain(&e)));

    // The guest: rewrites hot pages until the switch-over stops it.
    let writes: Arc<Mutex<HashMap<(usize, u64), u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = (writer_kind == "hot").then(|| {
        let (mem, stop, writes, spec) = (mem.clone(), stop.clone(), writes.clone(), spec.clone());
        std::thread::spawn(move || {
            let mut local = HashMap::new();
            let mut x = mix(spec.seed ^ 0xd1d1);
            let mut n = 0u64;
            // Relaxed: a stop flag; the join publishes `local`.
            while !stop.load(Ordering::Relaxed) {
                x = mix(x);
                let ri = (x % spec.region_sizes.len() as u64) as usize;
                let pg = (x >> 16) % hot_pages(&spec, ri);
                n += 1;
                let v = (1 << 63) | n;
                mem.regions()[ri]
                    .store_u64(pg as usize * PAGE + SOURCE_WORD, v)
                    .expect("source guest store");
                local.insert((ri, pg), v);
                if n.is_multiple_of(256) {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            writes.lock().expect("writes").extend(local);
        })
    });
    let switch_over = {
        let (mem, writes, seed) = (mem.clone(), writes.clone(), spec.seed);
        move || {
            // Relaxed: the join below orders the writer's stores.
            stop.store(true, Ordering::Relaxed);
            if let Some(w) = writer {
                w.join().expect("the guest writer panicked");
            }
            // The very last store before the VM stops.
            let (ri, pg) = LAST_PAGE;
            mem.regions()[ri]
                .store_u64(pg as usize * PAGE + SOURCE_WORD, last_value(seed))
                .expect("source guest store");
            writes
                .lock()
                .expect("writes")
                .insert(LAST_PAGE, last_value(seed));
        }
    };
    let listener = PeerAddr::parse("tcp:127.0.0.1:0")
        .and_then(|a| a.listen())
        .expect("listen");
    println!("READY {}", listener.local_addr().expect("address"));
    match source.serve_with(&listener, switch_over) {
        Ok(report) => {
            let mut f = std::fs::File::create(&writes_file).expect("writes file");
            for ((ri, pg), v) in writes.lock().expect("writes").iter() {
                writeln!(f, "{ri} {pg} {v}").expect("writes file");
            }
            let json = serde_json::to_string(&report).expect("report");
            println!("SOURCE OK {json}");
            std::process::exit(0);
        }
        Err(e) => {
            println!("SOURCE ERROR: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}

struct Hybrid {
    spec: VmSpec,
    rounds: &'static str,
    writer: &'static str,
    channels: u16,
}

struct Outcome {
    /// The source's pre-copy report (JSON).
    precopy: serde_json::Value,
    /// Pages the destination dropped at the switch-over.
    discarded: u64,
    /// The source guest's last word per page it wrote.
    source_writes: HashMap<(usize, u64), u64>,
    /// Pages whose marker the destination wrote as soon as it resumed.
    marked: usize,
}

/// The marker the destination writes at offset 56 (a word no workload thread
/// writes: threads use `t * 8` for `t < 2`) of each hot page as it resumes.
fn marker(ri: usize, pg: u64) -> u64 {
    mix(0x3a7c_0000 ^ ((ri as u64) << 40) ^ pg)
}

fn hybrid(h: Hybrid) -> Outcome {
    let _g = serial();
    let dir = TestDir::new("precopy");
    let writes_file = dir.path("writes");
    let mut src = ChildProc::reexec(
        "precopy_source_child",
        &[
            (SPEC_ENV, &h.spec.encode()),
            (ROUNDS_ENV, h.rounds),
            (WRITER_ENV, h.writer),
            (WRITES_ENV, writes_file.to_str().expect("path")),
        ],
    );
    let addr = src.expect("READY ", Duration::from_secs(120));
    let addr = PeerAddr::parse(&addr).expect("address");
    let mut cfg = DestinationConfig::new(PresharedKey::new(KEY_A.to_vec()).expect("key"));
    cfg.bulk_channels = h.channels;
    // `connect` returns after the pre-copy rounds and the switch-over.
    let dest = Destination::connect(&addr, cfg)
        .unwrap_or_else(|e| panic!("connect: {}\nsource: {}", error_chain(&e), src.stderr()));
    let stats = dest.precopy().expect("the source asked for pre-copy");
    let mem = dest.memory().expect("own memory");
    // The VM resumes: mark every hot page at once, racing any pre-copy frame
    // still in flight, then run the workload.
    let mut marks = WorkloadResult::default();
    for (ri, r) in mem.regions().iter().enumerate() {
        for pg in 0..hot_pages(&h.spec, ri) {
            let v = marker(ri, pg);
            r.store_u64(pg as usize * PAGE + 56, v).expect("store");
            marks.writes.insert((ri, pg), v);
        }
    }
    let marked = marks.writes.len();
    let workload = Workload::start(&h.spec, mem.clone(), 2);
    let report = dest
        .run()
        .unwrap_or_else(|e| panic!("migration: {}\nsource: {}", error_chain(&e), src.stderr()));
    std::thread::sleep(Duration::from_millis(100));
    let mut results = workload.stop();
    let lines = src.rest_of_output(Duration::from_secs(60));
    let line = lines
        .iter()
        .rev()
        .find_map(|l| l.find("SOURCE ").map(|i| l[i..].to_owned()))
        .unwrap_or_else(|| format!("no result line; stderr: {}", src.stderr()));
    let json = line
        .strip_prefix("SOURCE OK ")
        .unwrap_or_else(|| panic!("the source failed: {line}"));
    let source_report: serde_json::Value = serde_json::from_str(json).expect("source report");
    for r in &results {
        assert!(r.bad_reads.is_empty(), "workload read: {:?}", r.bad_reads);
    }
    let source_writes: HashMap<(usize, u64), u64> = std::fs::read_to_string(&writes_file)
        .expect("the source's writes")
        .lines()
        .map(|l| {
            let v: Vec<u64> = l.split(' ').map(|x| x.parse().expect("number")).collect();
            ((v[0] as usize, v[1]), v[2])
        })
        .collect();
    // Thread slots 0 and 1 are the workload's; slot 7 (offset 56) the markers.
    results.resize_with(7, WorkloadResult::default);
    results.push(marks);
    let bad = verify_with(&h.spec, &mem, &results, &source_writes);
    assert!(bad.is_empty(), "destination memory differs: {bad:#?}");
    assert_eq!(report.pages_total, h.spec.total_pages());
    let (ri, pg) = LAST_PAGE;
    assert_eq!(
        mem.regions()[ri]
            .load_u64(pg as usize * PAGE + SOURCE_WORD)
            .expect("load"),
        last_value(h.spec.seed),
        "the page written as the source stopped"
    );
    eprintln!(
        "pre-copy: {}\ndestination discarded {} pages, barrier {:.2} ms",
        source_report["precopy"], stats.discarded, stats.barrier_ms
    );
    Outcome {
        precopy: source_report["precopy"].clone(),
        discarded: stats.discarded,
        source_writes,
        marked,
    }
}

fn spec(seed: u64) -> VmSpec {
    VmSpec {
        seed,
        region_sizes: vec![96 * MIB, 32 * MIB],
        populated_permille: 700,
    }
}

#[test]
fn precopy_pages_dirtied_during_rounds_are_resent_and_stale_ones_discarded() {
    let o = hybrid(Hybrid {
        spec: spec(11),
        rounds: "3",
        writer: "hot",
        channels: 1,
    });
    assert_eq!(o.precopy["rounds"], 3, "{}", o.precopy);
    let resent = o.precopy["pages_resent"].as_u64().unwrap_or(0);
    assert!(resent > 0, "no page was dirtied and re-sent: {}", o.precopy);
    assert!(
        o.precopy["discarded"].as_u64().unwrap_or(0) > 0 && o.discarded > 0,
        "no stale page was discarded at the switch-over: {} (destination: {})",
        o.precopy,
        o.discarded
    );
    assert!(o.source_writes.len() > 100, "{}", o.source_writes.len());
}

#[test]
fn precopy_page_dirtied_at_the_last_moment_arrives() {
    let o = hybrid(Hybrid {
        spec: spec(12),
        rounds: "2",
        writer: "last",
        channels: 2,
    });
    // Only the last-moment store dirtied anything: the final collect found
    // exactly it, and the destination dropped its stale copy.
    let per_round: Vec<u64> = o.precopy["dirty_per_round"]
        .as_array()
        .expect("dirty_per_round")
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect();
    assert_eq!(per_round.last(), Some(&1), "{}", o.precopy);
    assert_eq!(o.discarded, 1, "{}", o.precopy);
    assert_eq!(o.source_writes.len(), 1);
}

#[test]
fn precopy_late_frame_never_overwrites_a_destination_write() {
    // Four bulk lanes full of pre-copy frames when the switch-over comes,
    // an auto policy that gives up on the hot set, and a destination that
    // writes every hot page the instant it resumes: `verify_with` finds any
    // marker a late pre-copy frame overwrote.
    for seed in [21, 22] {
        let o = hybrid(Hybrid {
            spec: spec(seed),
            rounds: "auto",
            writer: "hot",
            channels: 4,
        });
        assert!(o.marked > 1000, "{}", o.marked);
        assert!(o.precopy["rounds"].as_u64().unwrap_or(0) >= 1);
    }
}

#[test]
fn precopy_dirty_log_sees_every_write() {
    // The built-in dirty log against a writer that never stops: every page
    // written after a collect shows up in a later one.
    use ringfault_engine::source::precopy::{DirtyLog, DirtyRange, WpAsyncLog};
    use std::sync::atomic::AtomicU64;
    let _g = serial();
    let spec = VmSpec {
        seed: 5,
        region_sizes: vec![32 * MIB],
        populated_permille: 700,
    };
    let mem = spec.build_source_memory();
    let mut log = WpAsyncLog::new(&mem).expect("log");
    log.start().expect("start");
    let seq = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pages = (32 * MIB / PAGE) as u64;
    let writer = {
        let (mem, seq, stop) = (mem.clone(), seq.clone(), stop.clone());
        std::thread::spawn(move || {
            // (page, sequence number of its last write)
            let mut last = vec![0u64; pages as usize];
            let mut x = 77u64;
            while !stop.load(Ordering::Relaxed) {
                x = mix(x);
                let pg = (x >> 16) % 2048;
                let n = seq.fetch_add(1, Ordering::SeqCst) + 1;
                mem.regions()[0]
                    .store_u64(pg as usize * PAGE + SOURCE_WORD, n)
                    .expect("store");
                last[pg as usize] = n;
            }
            last
        })
    };
    // For each collect: the sequence number before it began, and its pages.
    let mut collects: Vec<(u64, HashSet<u64>)> = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(3));
        let before = seq.load(Ordering::SeqCst);
        let mut out: Vec<DirtyRange> = Vec::new();
        log.collect(&mut out).expect("collect");
        let set: HashSet<u64> = out
            .iter()
            .flat_map(|d| d.first..d.first + d.count)
            .collect();
        collects.push((before, set));
    }
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().expect("writer");
    let mut out: Vec<DirtyRange> = Vec::new();
    log.collect(&mut out).expect("collect");
    collects.push((
        seq.load(Ordering::SeqCst),
        out.iter()
            .flat_map(|d| d.first..d.first + d.count)
            .collect(),
    ));
    log.stop();
    // A page whose last write came after collect k began... must be in a
    // collect after k-1 (a write racing collect k may land in k or k+1).
    let mut missed = Vec::new();
    for (pg, &n) in last.iter().enumerate() {
        if n == 0 {
            continue;
        }
        // The first collect that began after the write.
        let k = collects.iter().position(|(b, _)| *b >= n);
        let seen = match k {
            Some(k) => collects[k.saturating_sub(1)..]
                .iter()
                .any(|(_, s)| s.contains(&(pg as u64))),
            None => false,
        };
        if !seen {
            missed.push((pg, n, k));
        }
    }
    assert!(
        missed.is_empty(),
        "{} writes missed, e.g. {:?}",
        missed.len(),
        &missed[..missed.len().min(5)]
    );
}
