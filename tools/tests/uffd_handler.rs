//! `ringfault uffd-handler` as an operator runs it: the real binary, with this
//! test playing Firecracker (`ringfault_testkit::vmm`: anonymous regions, a
//! userfaultfd with `EVENT_REMOVE`, registered MISSING, handed over with one
//! `sendmsg`).

// Test code: sizes and page indexes fit in usize on 64-bit Linux.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ringfault_testkit::memfile::{region_page, write_memory_file};
use ringfault_testkit::{serial, ChildProc, FakeVmm, TestDir, MIB};

const SEED: u64 = 5;

fn ringfault(args: &[&str]) -> ChildProc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringfault"));
    cmd.args(args);
    ChildProc::spawn(cmd)
}

fn memory_file(dir: &TestDir, len: usize) -> std::path::PathBuf {
    let p = dir.path("mem");
    drop(write_memory_file(&p, SEED, len));
    p
}

/// Reads every page of the VM from two threads; returns the pages that differ
/// from the file, whose regions of `sizes` lie one after the other.
fn check_all(vmm: &FakeVmm, sizes: &[usize]) -> Vec<String> {
    vmm.touch(&vmm.all_pages(), 2, &|ri, p, out| {
        region_page(SEED, sizes, ri, p, out)
    })
}

fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", p.display()))
}

#[test]
fn local_mode_serves_every_page_reports_and_exits_0() {
    let _g = serial();
    let dir = TestDir::new("cli-local");
    let sizes = [12 * MIB, 4 * MIB];
    let mem = memory_file(&dir, sizes.iter().sum());
    let sock = dir.path("fc.sock");
    let json = dir.path("stats.json");
    let mut h = ringfault(&[
        "uffd-handler",
        "--socket",
        path_str(&sock),
        "--memory-file",
        path_str(&mem),
        "--stats-json",
        path_str(&json),
    ]);
    assert_eq!(
        h.expect("listening on ", Duration::from_secs(30)),
        format!("unix:{}", sock.display())
    );
    let mut vmm = FakeVmm::boot(&sock, &sizes);
    let bad = check_all(&vmm, &sizes);
    assert!(bad.is_empty(), "pages differ from the file: {bad:?}");

    // Statistics on SIGUSR1, while it runs.
    let pid = h.pid().to_string();
    assert!(Command::new("kill")
        .args(["-USR1", &pid])
        .status()
        .is_ok_and(|s| s.success()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !h.stderr().contains("fault service p50") {
        assert!(
            Instant::now() < deadline,
            "no statistics on SIGUSR1: {}",
            h.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    vmm.close();
    let (status, took) = h.wait_exit(Duration::from_secs(5));
    let err = h.stderr();
    assert!(status.success(), "{status:?}: {err}");
    assert!(took < Duration::from_secs(1), "took {took:?} to exit");
    assert!(err.contains("Firecracker (pid "), "{err}");
    assert!(err.contains("Firecracker went away"), "{err}");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{}: {e}", json.display()));
    let stats: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(stats["mode"], "local");
    assert!(stats["faults"].as_u64().is_some_and(|f| f > 0), "{stats}");
    assert!(
        stats["fault_latency"]["p99_us"]
            .as_f64()
            .is_some_and(|p| p > 0.0),
        "{stats}"
    );
    eprintln!("{err}");
}

#[test]
fn a_region_beyond_the_memory_file_exits_1_with_a_clear_message() {
    let _g = serial();
    let dir = TestDir::new("cli-short");
    let mem = memory_file(&dir, 4 * MIB);
    let sock = dir.path("fc.sock");
    let mut h = ringfault(&[
        "uffd-handler",
        "--socket",
        path_str(&sock),
        "--memory-file",
        path_str(&mem),
    ]);
    h.expect("listening on ", Duration::from_secs(30));
    // Firecracker claims 8 MiB of memory; the file has 4.
    let _vmm = FakeVmm::boot(&sock, &[8 * MIB]);
    let (status, _) = h.wait_exit(Duration::from_secs(5));
    let err = h.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("ringfault: error: "), "{err}");
    assert!(err.contains("memory file has only 0x400000 bytes"), "{err}");
}

#[test]
fn usage_errors_exit_before_listening() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ringfault"))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running ringfault: {e}"))
    };
    // Neither a memory file nor a source.
    let out = run(&["uffd-handler", "--socket", "/nonexistent/x.sock"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let out = run(&[
        "uffd-handler",
        "--socket",
        "/tmp/never.sock",
        "--memory-file",
        "/nonexistent/mem",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("opening the memory file /nonexistent/mem"),
        "{err}"
    );
    assert!(!Path::new("/tmp/never.sock").exists(), "it never listened");
}

#[test]
fn a_memory_file_that_is_not_whole_pages_is_refused_at_start() {
    let dir = TestDir::new("cli-odd");
    let mem = dir.path("mem");
    std::fs::write(&mem, vec![1u8; 1000]).unwrap_or_else(|e| panic!("{e}"));
    let sock = dir.path("fc.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_ringfault"))
        .args([
            "uffd-handler",
            "--socket",
            path_str(&sock),
            "--memory-file",
            path_str(&mem),
        ])
        .output()
        .unwrap_or_else(|e| panic!("running ringfault: {e}"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is 1000 bytes"), "{err}");
    assert!(!sock.exists(), "it never listened");
}

#[test]
fn remote_mode_from_serve_memory_file() {
    let _g = serial();
    let dir = TestDir::new("cli-remote");
    let size = 16 * MIB;
    let mem = memory_file(&dir, size);
    let key = dir.path("key");
    std::fs::write(&key, "uffd-handler-cli-test-key-0123456789\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut src = ringfault(&[
        "serve",
        "--listen",
        "tcp:127.0.0.1:0",
        "--memory-file",
        path_str(&mem),
        "--key-file",
        path_str(&key),
    ]);
    let addr = src.expect("listening on ", Duration::from_secs(30));
    let sock = dir.path("fc.sock");
    let mut h = ringfault(&[
        "uffd-handler",
        "--socket",
        path_str(&sock),
        "--from",
        &addr,
        "--key-file",
        path_str(&key),
    ]);
    h.expect("listening on ", Duration::from_secs(30));
    let mut vmm = FakeVmm::boot(&sock, &[size]);
    let bad = check_all(&vmm, &[size]);
    assert!(
        bad.is_empty(),
        "pages differ from the source's file: {bad:?}"
    );
    // The source returns once the destination has every page and released it.
    src.expect("done: ", Duration::from_secs(60));
    let (st, _) = src.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "serve: {}", src.stderr());
    vmm.close();
    let (status, took) = h.wait_exit(Duration::from_secs(5));
    let err = h.stderr();
    assert!(status.success(), "{status:?}: {err}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(err.contains("every page present after"), "{err}");
    eprintln!("{err}");
}
