//! The Firecracker page-fault handler on the real kernel. The test plays
//! Firecracker's side byte for byte (`ringfault_testkit::vmm`): anonymous guest
//! regions of two sizes, a userfaultfd with `EVENT_REMOVE` registered MISSING
//! on each, the JSON mappings and the userfaultfd handed over in one
//! `sendmsg`; then several threads touch guest pages, as vCPUs would.
//!
//! Cases: local mode, remote mode (source in a child process, over loopback),
//! balloon (`MADV_DONTNEED` while pages are being served), and peer exit and bad
//! input with the handler and "Firecracker" in child processes.

// Test code: sizes and page indexes fit in usize on 64-bit Linux, and the
// measurement prints figures as floats.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfault_engine::firecracker::{
    self, serve_local, serve_remote, Ended, FirecrackerError, HandlerStats, LocalOptions,
};
use ringfault_engine::source::FileRegion;
use ringfault_engine::sys::mapping::PAGE_2M;
use ringfault_engine::{DestinationConfig, PeerAddr, Source, SourceConfig};
use ringfault_proto::auth::PresharedKey;
use ringfault_proto::PageSize;
use ringfault_testkit::memfile::{region_page, write_memory_file};
use ringfault_testkit::{
    error_chain, mix, populated_pages, serial, serve_child_main, skip, wait_for, ChildProc,
    FakeVmm, Handover, TestDir, MIB, PAGE,
};

/// Two regions of different sizes, laid out one after the other in the memory
/// file, as Firecracker writes them.
const SIZES: [usize; 2] = [24 * MIB, 8 * MIB];
const KEY: &str = "ringfault-firecracker-test-key-0123";

fn key() -> PresharedKey {
    PresharedKey::new(KEY.as_bytes().to_vec()).unwrap_or_else(|e| panic!("key: {e}"))
}

/// The file's bytes for page `p` of region `ri`.
fn file_bytes(seed: u64) -> impl Fn(usize, u64, &mut [u8]) + Sync {
    move |ri, p, out| region_page(seed, &SIZES, ri, p, out)
}

fn zeros(_: usize, _: u64, out: &mut [u8]) {
    out.fill(0);
}

/// Every page of both regions.
fn all_pages() -> Vec<(usize, u64)> {
    SIZES
        .iter()
        .enumerate()
        .flat_map(|(ri, &s)| (0..(s / PAGE) as u64).map(move |p| (ri, p)))
        .collect()
}

type HandlerThread = std::thread::JoinHandle<Result<Ended, FirecrackerError>>;

/// Runs a local-mode handler for the memory file at `path` on a thread of
/// this process.
fn local_handler(
    socket: &Path,
    path: &Path,
    opts: LocalOptions,
) -> (Arc<HandlerStats>, HandlerThread) {
    let listener = firecracker::listen(socket).unwrap_or_else(|e| panic!("listen: {e}"));
    let stats = Arc::new(HandlerStats::new("local"));
    let st = stats.clone();
    let path = path.display().to_string();
    let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let h = std::thread::spawn(move || {
        let hs = firecracker::accept(&listener)?;
        serve_local(hs, &path, file, opts, st)
    });
    (stats, h)
}

/// Runs a remote-mode handler, fed by the source at `addr`.
fn remote_handler(socket: &Path, addr: PeerAddr) -> (Arc<HandlerStats>, HandlerThread) {
    let listener = firecracker::listen(socket).unwrap_or_else(|e| panic!("listen: {e}"));
    let stats = Arc::new(HandlerStats::new("remote"));
    let st = stats.clone();
    let h = std::thread::spawn(move || {
        let hs = firecracker::accept(&listener)?;
        serve_remote(hs, &addr, DestinationConfig::new(key()), st)
    });
    (stats, h)
}

/// Closes "Firecracker" and checks that the handler ends cleanly within 1 s.
fn shut_down(vm: FakeVmm, handler: HandlerThread) {
    let t0 = Instant::now();
    drop(vm);
    wait_for("the handler to notice", Duration::from_secs(1), || {
        handler.is_finished()
    });
    let ended = handler
        .join()
        .unwrap_or_else(|_| panic!("the handler panicked"));
    assert!(
        matches!(ended, Ok(Ended::PeerGone)),
        "the handler must end cleanly: {ended:?}"
    );
    eprintln!("handler ended {:?} after the peer closed", t0.elapsed());
}

// ---------------------------------------------------------------------------
// 1. Local mode
// ---------------------------------------------------------------------------

#[test]
fn local_mode_every_page_matches_the_memory_file() {
    let _g = serial();
    let dir = TestDir::new("fc-local");
    let total: usize = SIZES.iter().sum();
    drop(write_memory_file(&dir.path("mem"), 11, total));
    let sock = dir.path("uffd.sock");
    let (stats, handler) = local_handler(&sock, &dir.path("mem"), LocalOptions::default());
    let vm = FakeVmm::boot(&sock, &SIZES);
    // A "vCPU" writes the first word of every third page (its first touch of
    // most of them) while others read and the background fill runs: no install
    // may ever overwrite a guest write.
    let marked = |ri: usize, p: u64| p % 3 == (ri as u64);
    let marker = |ri: usize, p: u64| mix(((ri as u64) << 32) ^ p) | 1;
    let want = |ri: usize, p: u64, out: &mut [u8]| {
        file_bytes(11)(ri, p, out);
        if marked(ri, p) {
            out[..8].copy_from_slice(&marker(ri, p).to_le_bytes());
        }
    };
    let (writes, reads): (Vec<_>, Vec<_>) =
        all_pages().into_iter().partition(|&(ri, p)| marked(ri, p));
    let vm_ref = &vm;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for &(ri, p) in &writes {
                vm_ref.regions()[ri]
                    .write(p as usize * PAGE, &marker(ri, p).to_le_bytes())
                    .unwrap_or_else(|e| panic!("guest write: {e}"));
            }
        });
        let bad = vm_ref.touch(&reads, 3, &file_bytes(11));
        assert!(bad.is_empty(), "pages differ from the memory file: {bad:?}");
        writer
            .join()
            .unwrap_or_else(|_| panic!("the writer panicked"));
    });
    wait_for("every page present", Duration::from_secs(30), || {
        stats.all_present_after().is_some()
    });
    // After completion (regions unregistered) every page reads right, with the
    // guest's writes in place.
    let bad = vm.touch(&all_pages(), 2, &want);
    assert!(bad.is_empty(), "after completion: {bad:?}");
    let r = stats.report();
    eprintln!("{}", r.summary());
    assert!(r.faults > 0, "{r:?}");
    assert!(
        r.pages_zeroed > 0,
        "holes of the file are installed as zero pages: {r:?}"
    );
    assert_eq!(
        r.pages_copied + r.pages_zeroed,
        (total / PAGE) as u64,
        "{r:?}"
    );
    assert_eq!(r.pages_present, r.pages_total, "{r:?}");
    assert_eq!(r.bytes_served, r.pages_copied * PAGE as u64, "{r:?}");
    shut_down(vm, handler);
}

#[test]
fn local_mode_without_background_fills_only_what_faults() {
    let _g = serial();
    let dir = TestDir::new("fc-nobg");
    let total: usize = SIZES.iter().sum();
    drop(write_memory_file(&dir.path("mem"), 12, total));
    let sock = dir.path("uffd.sock");
    let opts = LocalOptions {
        background: false,
        ..LocalOptions::default()
    };
    let (stats, handler) = local_handler(&sock, &dir.path("mem"), opts);
    let vm = FakeVmm::boot(&sock, &SIZES);
    let some: Vec<(usize, u64)> = all_pages().into_iter().step_by(7).collect();
    let bad = vm.touch(&some, 3, &file_bytes(12));
    assert!(bad.is_empty(), "{bad:?}");
    // One more fault, on a page nobody touched, served after every turn of the
    // handler's loop in which a background fill could have run.
    let sync = (1, 3u64);
    assert!(!some.contains(&sync));
    assert!(vm.touch(&[sync], 1, &file_bytes(12)).is_empty());
    wait_for(
        "the handler to count every faulted page",
        Duration::from_secs(10),
        || stats.report().pages_present > some.len() as u64,
    );
    // The kernel's page tables: exactly the touched pages are there.
    let mut touched = some.clone();
    touched.push(sync);
    touched.sort_unstable();
    let mut present = Vec::new();
    for (ri, r) in vm.regions().iter().enumerate() {
        let pages = populated_pages(r).unwrap_or_else(|e| panic!("PAGEMAP_SCAN: {e}"));
        present.extend(pages.into_iter().map(|p| (ri, p)));
    }
    let extra: Vec<_> = present
        .iter()
        .filter(|p| !touched.contains(p))
        .take(10)
        .collect();
    let missing: Vec<_> = touched
        .iter()
        .filter(|p| !present.contains(p))
        .take(10)
        .collect();
    assert!(
        present == touched,
        "only faulted pages are installed: {} present, {} touched; not touched: {extra:?}; \
         touched but missing: {missing:?}",
        present.len(),
        touched.len()
    );
    let r = stats.report();
    assert_eq!(r.pages_present, touched.len() as u64, "{r:?}");
    assert!(r.all_present_after_s.is_none(), "{r:?}");
    shut_down(vm, handler);
}

// ---------------------------------------------------------------------------
// 2. Remote mode, and the child processes
// ---------------------------------------------------------------------------

const ROLE_ENV: &str = "RF_FC_ROLE";
const ARG_ENV: &str = "RF_FC_ARG";

fn spawn_child(role: &str, arg: &str) -> ChildProc {
    ChildProc::reexec("child_entry", &[(ROLE_ENV, role), (ARG_ENV, arg)])
}

/// Child processes: "Firecracker", the handler, and the remote source.
#[test]
#[ignore = "child-process entry point, run by other tests"]
fn child_entry() {
    let (Ok(role), Ok(arg)) = (std::env::var(ROLE_ENV), std::env::var(ARG_ENV)) else {
        return; // not a child
    };
    match role.as_str() {
        "source" => source_main(&arg),
        "handler" => handler_main(&arg),
        "vm" => vm_main(&arg),
        other => panic!("unknown role {other}"),
    }
}

/// The remote source: serves the memory file `arg` as Firecracker's two
/// regions, each at its offset in the file.
fn source_main(arg: &str) -> ! {
    let file = File::open(arg).unwrap_or_else(|e| panic!("{arg}: {e}"));
    let mut offset = 0u64;
    let regions: Vec<FileRegion> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let r = FileRegion {
                id: i as u32,
                offset,
                size: size as u64,
                page_size: PageSize::Size4K,
            };
            offset += size as u64;
            r
        })
        .collect();
    let source = Source::from_file(arg, file, regions, SourceConfig::new(key()))
        .unwrap_or_else(|e| panic!("source: {}", error_chain(&e)));
    serve_child_main(&source, "tcp:127.0.0.1:0")
}

/// The handler, as the CLI runs it: `arg` is `SOCKET;MEMORY_FILE`.
fn handler_main(arg: &str) -> ! {
    let (sock, mem) = arg
        .split_once(';')
        .unwrap_or_else(|| panic!("bad handler argument {arg}"));
    let file = File::open(mem).unwrap_or_else(|e| panic!("{mem}: {e}"));
    let listener = firecracker::listen(Path::new(sock)).unwrap_or_else(|e| panic!("listen: {e}"));
    println!("LISTENING");
    let stats = Arc::new(HandlerStats::new("local"));
    let result = firecracker::accept(&listener)
        .and_then(|hs| serve_local(hs, mem, file, LocalOptions::default(), stats));
    match result {
        Ok(ended) => {
            println!("HANDLER ENDED {ended:?}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("HANDLER ERROR: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}

/// "Firecracker" in its own process: boots, touches pages, then waits to be
/// killed. `arg` is `SOCKET;SEED`.
fn vm_main(arg: &str) -> ! {
    let (sock, seed) = arg
        .split_once(';')
        .unwrap_or_else(|| panic!("bad vm argument {arg}"));
    let seed: u64 = seed.parse().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let vm = FakeVmm::boot(Path::new(sock), &SIZES);
    let pages: Vec<(usize, u64)> = all_pages().into_iter().take(2000).collect();
    let bad = vm.touch(&pages, 2, &file_bytes(seed));
    assert!(bad.is_empty(), "{bad:?}");
    println!("TOUCHED");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Starts the remote source child on the memory file at `mem`.
fn remote_source(mem: &Path) -> (ChildProc, PeerAddr) {
    let mut source = spawn_child("source", &mem.display().to_string());
    let addr = source.expect("READY ", Duration::from_secs(30));
    let addr = PeerAddr::parse(&addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    (source, addr)
}

/// Waits for the source child's report and checks that it was released.
fn source_released(source: &mut ChildProc) {
    let json = source.expect("SOURCE OK ", Duration::from_secs(10));
    let report: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
    assert_eq!(report["released"], true, "{report}");
    let (st, _) = source.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{}", source.stderr());
}

#[test]
fn remote_mode_every_page_matches_the_source() {
    let _g = serial();
    let dir = TestDir::new("fc-remote");
    let total: usize = SIZES.iter().sum();
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, 21, total));
    let (mut source, addr) = remote_source(&mem);
    let sock = dir.path("uffd.sock");
    let (stats, handler) = remote_handler(&sock, addr);
    let vm = FakeVmm::boot(&sock, &SIZES);
    let bad = vm.touch(&all_pages(), 4, &file_bytes(21));
    assert!(
        bad.is_empty(),
        "pages differ from the source's file: {bad:?}"
    );
    wait_for("the migration to complete", Duration::from_secs(60), || {
        stats.all_present_after().is_some()
    });
    let r = stats.report();
    eprintln!("{}", r.summary());
    assert!(r.faults > 0, "{r:?}");
    assert_eq!(r.pages_present, r.pages_total);
    source_released(&mut source);
    // Pages still read right after the engine unregistered the regions.
    let bad = vm.touch(&all_pages(), 2, &file_bytes(21));
    assert!(bad.is_empty(), "after completion: {bad:?}");
    shut_down(vm, handler);
}

// ---------------------------------------------------------------------------
// 3. Balloon
// ---------------------------------------------------------------------------

#[test]
fn balloon_removed_ranges_read_zeros() {
    balloon(false);
}

#[test]
fn balloon_during_background_fill() {
    balloon(true);
}

fn balloon(background: bool) {
    let _g = serial();
    let dir = TestDir::new(if background {
        "fc-balloon-bg"
    } else {
        "fc-balloon"
    });
    let total: usize = SIZES.iter().sum();
    drop(write_memory_file(&dir.path("mem"), 31, total));
    let sock = dir.path("uffd.sock");
    let opts = LocalOptions {
        background,
        ..LocalOptions::default()
    };
    let (stats, handler) = local_handler(&sock, &dir.path("mem"), opts);
    let vm = FakeVmm::boot(&sock, &SIZES);

    // First faults: the start of each region.
    let first: Vec<(usize, u64)> = (0..2)
        .flat_map(|ri| (0..512u64).map(move |p| (ri, p)))
        .collect();
    assert!(vm.touch(&first, 2, &file_bytes(31)).is_empty());

    // The balloon inflates: many small ranges, some already served, some not,
    // while two "vCPUs" keep faulting elsewhere and the background fill runs.
    let mut removed: Vec<(usize, u64, u64)> = Vec::new();
    for i in 0..48u64 {
        let ri = (i % 2) as usize;
        let pages = (SIZES[ri] / PAGE) as u64;
        let start = (i * 97 + 100) % (pages - 64);
        removed.push((ri, start, 1 + i % 16));
    }
    let is_removed = |ri: usize, p: u64| {
        removed
            .iter()
            .any(|&(r, s, n)| r == ri && p >= s && p < s + n)
    };
    // Without background fill, leave pages untouched so that the handler is
    // still registered (not complete) when removed pages fault again.
    let step = if background { 1 } else { 3 };
    let others: Vec<(usize, u64)> = all_pages()
        .into_iter()
        .filter(|&(ri, p)| !is_removed(ri, p))
        .step_by(step)
        .collect();
    let vm_ref = &vm;
    std::thread::scope(|s| {
        let touching = s.spawn(|| vm_ref.touch(&others, 2, &file_bytes(31)));
        for &(ri, start, n) in &removed {
            vm_ref.regions()[ri]
                .discard(start as usize * PAGE, n as usize * PAGE)
                .unwrap_or_else(|e| panic!("MADV_DONTNEED: {e}"));
        }
        let bad = touching
            .join()
            .unwrap_or_else(|_| vec!["the vCPUs panicked".into()]);
        assert!(bad.is_empty(), "pages outside the balloon: {bad:?}");
    });

    // Later faults in removed ranges read zeros, never the snapshot's bytes.
    let gone: Vec<(usize, u64)> = removed
        .iter()
        .flat_map(|&(ri, s, n)| (s..s + n).map(move |p| (ri, p)))
        .collect();
    let bad = vm.touch(&gone, 3, &zeros);
    assert!(bad.is_empty(), "removed pages must read zeros: {bad:?}");
    // And everything else is still the file's.
    let bad = vm.touch(&others, 2, &file_bytes(31));
    assert!(bad.is_empty(), "{bad:?}");

    // A range removed again, served (by the handler, or by the kernel once the
    // handler has unregistered the regions) with zeros again.
    vm.regions()[0]
        .discard(0, 64 * PAGE)
        .unwrap_or_else(|e| panic!("MADV_DONTNEED: {e}"));
    let bad = vm.touch(&(0..64u64).map(|p| (0, p)).collect::<Vec<_>>(), 1, &zeros);
    assert!(bad.is_empty(), "{bad:?}");

    assert!(!handler.is_finished(), "the handler must still be serving");
    let r = stats.report();
    eprintln!("{}", r.summary());
    if background {
        assert!(r.all_present_after_s.is_some(), "{r:?}");
    }
    // With the background fill, every page may be present (and the regions
    // unregistered, so that the kernel itself serves the removed ranges
    // with zeros, checked above) before the balloon inflates.
    assert!(
        r.removed_pages > 0 || background,
        "the handler counts the pages REMOVE events took away: {r:?}"
    );
    if !background {
        // Every removed page was faulted again, and the handler served zeros.
        assert!(r.removed_faults >= gone.len() as u64, "{r:?}");
    }
    shut_down(vm, handler);
}

#[test]
fn local_mode_hugetlbfs_2mib_pages() {
    let _g = serial();
    // Firecracker with `"huge_pages": "2M"`: hugetlbfs guest memory, 2 MiB pages.
    let memory = match FakeVmm::map(&SIZES, PAGE_2M) {
        Ok(m) => m,
        Err(e) => skip!(
            "needs {} free 2 MiB huge pages (vm.nr_hugepages): {e}",
            SIZES.iter().sum::<usize>() / PAGE_2M
        ),
    };
    let dir = TestDir::new("fc-huge");
    let total: usize = SIZES.iter().sum();
    drop(write_memory_file(&dir.path("mem"), 13, total));
    let sock = dir.path("uffd.sock");
    let (stats, handler) = local_handler(&sock, &dir.path("mem"), LocalOptions::default());
    let vm = FakeVmm::boot_with(&sock, memory, Handover::Real, true);
    // Whole 2 MiB pages, compared with the file's 4 KiB pages they hold.
    let huge_bytes = |ri: usize, p: u64, out: &mut [u8]| {
        for (k, chunk) in out.chunks_exact_mut(PAGE).enumerate() {
            file_bytes(13)(ri, p * (PAGE_2M / PAGE) as u64 + k as u64, chunk);
        }
    };
    let bad = vm.touch(&vm.all_pages(), 4, &huge_bytes);
    assert!(bad.is_empty(), "pages differ from the memory file: {bad:?}");
    wait_for("every page present", Duration::from_secs(30), || {
        stats.all_present_after().is_some()
    });
    let r = stats.report();
    eprintln!("{}", r.summary());
    assert_eq!(r.pages_total, (total / PAGE_2M) as u64);
    assert_eq!(
        r.bytes_served, total as u64,
        "hugetlbfs: zeros are copied too"
    );
    shut_down(vm, handler);
}

#[test]
fn remote_mode_balloon_during_the_migration() {
    let _g = serial();
    let dir = TestDir::new("fc-remote-balloon");
    let total: usize = SIZES.iter().sum();
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, 22, total));
    let (mut source, addr) = remote_source(&mem);
    let sock = dir.path("uffd.sock");
    let (stats, handler) = remote_handler(&sock, addr);
    let vm = FakeVmm::boot(&sock, &SIZES);
    // The balloon inflates at once, while pages stream in and "vCPUs" fault.
    let removed: Vec<(usize, u64, u64)> = (0..32u64)
        .map(|i| {
            let ri = (i % 2) as usize;
            let pages = (SIZES[ri] / PAGE) as u64;
            (ri, (i * 211 + 7) % (pages - 32), 1 + i % 8)
        })
        .collect();
    let is_removed = |ri: usize, p: u64| {
        removed
            .iter()
            .any(|&(r, s, n)| r == ri && p >= s && p < s + n)
    };
    let others: Vec<(usize, u64)> = all_pages()
        .into_iter()
        .filter(|&(ri, p)| !is_removed(ri, p))
        .collect();
    let vm_ref = &vm;
    std::thread::scope(|s| {
        let touching = s.spawn(|| vm_ref.touch(&others, 2, &file_bytes(22)));
        for &(ri, start, n) in &removed {
            vm_ref.regions()[ri]
                .discard(start as usize * PAGE, n as usize * PAGE)
                .unwrap_or_else(|e| panic!("MADV_DONTNEED: {e}"));
        }
        let bad = touching
            .join()
            .unwrap_or_else(|_| vec!["the vCPUs panicked".into()]);
        assert!(bad.is_empty(), "pages outside the balloon: {bad:?}");
    });
    let gone: Vec<(usize, u64)> = removed
        .iter()
        .flat_map(|&(ri, s, n)| (s..s + n).map(move |p| (ri, p)))
        .collect();
    wait_for("the migration to complete", Duration::from_secs(60), || {
        stats.all_present_after().is_some()
    });
    let bad = vm.touch(&gone, 2, &zeros);
    assert!(bad.is_empty(), "removed pages must read zeros: {bad:?}");
    let bad = vm.touch(&others, 2, &file_bytes(22));
    assert!(bad.is_empty(), "{bad:?}");
    eprintln!("{}", stats.report().summary());
    source_released(&mut source);
    shut_down(vm, handler);
}

// ---------------------------------------------------------------------------
// 4. Peer exit and bad input
// ---------------------------------------------------------------------------

#[test]
fn killing_firecracker_makes_the_handler_exit_0_within_1s() {
    let _g = serial();
    let dir = TestDir::new("fc-kill");
    let total: usize = SIZES.iter().sum();
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, 41, total));
    let sock = dir.path("uffd.sock");
    let mut handler = spawn_child("handler", &format!("{};{}", sock.display(), mem.display()));
    handler.expect("LISTENING", Duration::from_secs(30));
    let mut vm = spawn_child("vm", &format!("{};41", sock.display()));
    vm.expect("TOUCHED", Duration::from_secs(30));
    vm.kill();
    let (status, took) = handler.wait_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "handler exit {status:?}: {}",
        handler.stderr()
    );
    assert!(
        took < Duration::from_secs(1),
        "the handler took {took:?} to exit"
    );
    eprintln!("handler exited 0 {took:?} after Firecracker was killed");
}

/// Starts a handler child, plays a Firecracker that sends `msg`, and returns the
/// handler's error line after checking it failed cleanly (exit 1, no panic).
fn bad_input(name: &str, file_len: usize, msg: Handover, send_uffd: bool) -> String {
    let dir = TestDir::new(name);
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, 51, file_len));
    let sock = dir.path("uffd.sock");
    let mut handler = spawn_child("handler", &format!("{};{}", sock.display(), mem.display()));
    handler.expect("LISTENING", Duration::from_secs(30));
    let memory = FakeVmm::map(&SIZES, PAGE).unwrap_or_else(|e| panic!("guest memory: {e}"));
    let vm = FakeVmm::boot_with(&sock, memory, msg, send_uffd);
    let (status, _) = handler.wait_exit(Duration::from_secs(5));
    drop(vm);
    let stderr = handler.stderr();
    assert_eq!(status.code(), Some(1), "a clean failure: {stderr}");
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("HANDLER ERROR"))
        .unwrap_or_else(|| panic!("no error message: {stderr}"))
        .to_owned();
    eprintln!("{name}: {line}");
    line
}

#[test]
fn malformed_json_is_a_clear_error() {
    let _g = serial();
    let total: usize = SIZES.iter().sum();
    let line = bad_input(
        "fc-badjson",
        total,
        Handover::Raw(r#"[{"base_host_virt_addr": "not a number"}]"#.into()),
        true,
    );
    assert!(
        line.contains("not a JSON array of guest memory mappings"),
        "{line}"
    );
}

#[test]
fn a_missing_uffd_is_a_clear_error() {
    let _g = serial();
    let total: usize = SIZES.iter().sum();
    let line = bad_input("fc-nofd", total, Handover::Real, false);
    assert!(line.contains("carried no userfaultfd"), "{line}");
}

#[test]
fn a_region_larger_than_the_memory_file_is_a_clear_error() {
    let _g = serial();
    // The file holds the first region and half of the second.
    let short = SIZES[0] + SIZES[1] / 2;
    let line = bad_input("fc-short", short, Handover::Real, true);
    assert!(line.contains("region 1 needs file bytes"), "{line}");
    assert!(line.contains("memory file has only"), "{line}");
}

// ---------------------------------------------------------------------------
// Fault latency as a vCPU sees it (a measurement, not a check)
// ---------------------------------------------------------------------------

/// `cargo test --release -p ringfault-engine --test firecracker -- --ignored --exact local_mode_fault_latency --nocapture`
#[test]
#[ignore = "measurement: run in release with --ignored --nocapture"]
fn local_mode_fault_latency() {
    let _g = serial();
    let dir = TestDir::new("fc-latency");
    let sizes = [192 * MIB, 64 * MIB];
    let total: usize = sizes.iter().sum();
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, 61, total));
    for (background, run) in [
        (false, 0),
        (true, 64 << 10),
        (true, 128 << 10),
        (true, 256 << 10),
        (true, 1 << 20),
    ] {
        let sock = dir.path("uffd.sock");
        let opts = LocalOptions {
            background,
            background_run_bytes: run.max(PAGE),
            ..LocalOptions::default()
        };
        let (stats, handler) = local_handler(&sock, &mem, opts);
        let vm = FakeVmm::boot(&sock, &sizes);
        // One "vCPU" touches random pages until every page is present (or it has
        // touched 20000): the reads that waited are its faults.
        let mut x = 0x1234_5678u64;
        let mut waits = Vec::new();
        let t0 = Instant::now();
        for _ in 0..20_000 {
            if stats.all_present_after().is_some() {
                break;
            }
            x = mix(x);
            // Three faults in four in the large region.
            let ri = usize::from(x.is_multiple_of(4));
            let p = (x >> 8) as usize % (sizes[ri] / PAGE);
            let t = Instant::now();
            let v = vm.regions()[ri]
                .load_u64(p * PAGE)
                .unwrap_or_else(|e| panic!("guest load: {e}"));
            std::hint::black_box(v);
            let ns = t.elapsed().as_nanos() as u64;
            if ns > 2_000 {
                waits.push(ns);
            }
        }
        let took = t0.elapsed();
        waits.sort_unstable();
        let q = |per_mille: usize| {
            waits
                .get((waits.len() * per_mille / 1000).min(waits.len().saturating_sub(1)))
                .map_or(0.0, |&n| n as f64 / 1000.0)
        };
        let r = stats.report();
        println!(
            "background {background:5} run {:4} KiB: {} waits in {took:.2?}: p50 {:.1} us, p90 {:.1} us, \
             p99 {:.1} us, max {:.1} us; all present after {:?} s; handler p50 {:.1} us",
            run >> 10,
            waits.len(),
            q(500),
            q(900),
            q(990),
            q(1000),
            r.all_present_after_s,
            r.fault_latency.p50_us
        );
        shut_down(vm, handler);
    }
}
