//! A memory file that shrinks under `ringfault serve --memory-file` or
//! `ringfault uffd-handler --memory-file` (local mode): each ends with one
//! line naming the file and exit status 1, never `SIGBUS` (status 135), both
//! when the file shrinks before the first page is served and when it shrinks
//! in the middle of the transfer. What did arrive is the file's, byte for
//! byte, and a guest thread touching a page that never arrived waits; it
//! never reads zeros.

// Test code: page indexes and offsets fit in usize on 64-bit Linux.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::Duration;

use ringfault_engine::{Destination, DestinationConfig, EngineError, PeerAddr, Protection};
use ringfault_proto::auth::PresharedKey;
use ringfault_testkit::memfile::{file_page, write_memory_file};
use ringfault_testkit::proxy::{Attack, Proxy};
use ringfault_testkit::{
    error_chain, populated_pages, serial, wait_for, ChildProc, FakeVmm, TestDir, KEY_A, MIB, PAGE,
};

const SEED: u64 = 41;

fn ringfault(args: &[&str]) -> ChildProc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringfault"));
    cmd.args(args);
    ChildProc::spawn(cmd)
}

fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", p.display()))
}

fn shrink(path: &Path, len: usize) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len as u64))
        .unwrap_or_else(|e| panic!("truncating {}: {e}", path.display()));
}

/// Exit status 1 (not 135, `SIGBUS`), and one `ringfault: error:` line that
/// names `file` and says it shrank; returns that line.
fn failed_naming(who: &str, status: ExitStatus, stderr: &str, file: &Path) -> String {
    use std::os::unix::process::ExitStatusExt;
    assert_ne!(status.signal(), Some(SIGBUS), "{who} died of SIGBUS");
    assert_ne!(status.code(), Some(135), "{who} died of SIGBUS: {stderr}");
    assert_eq!(status.code(), Some(1), "{who}: {status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{who}: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("ringfault: error: "))
        .unwrap_or_else(|| panic!("{who} printed no error line: {stderr}"))
        .to_owned();
    assert!(
        line.contains(&file.display().to_string()),
        "{who} must name the file: {line}"
    );
    line
}

/// The byte that `... byte N is gone` names: past the file's new end.
fn assert_names_a_gone_byte(line: &str, new_len: usize) {
    let n: usize = line
        .rsplit_once("byte ")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte named: {line}"));
    assert!(
        n >= new_len,
        "byte {n} is not past the new end {new_len}: {line}"
    );
}

/// `SIGBUS` on Linux x86_64.
const SIGBUS: i32 = 7;

fn key_file(dir: &TestDir) -> std::path::PathBuf {
    let k = dir.path("key");
    std::fs::write(&k, KEY_A).unwrap_or_else(|e| panic!("{e}"));
    k
}

/// Every page the destination holds is the file's.
fn present_pages_are_the_files(
    mem: &ringfault_engine::sys::guest::GuestMemory,
    present: impl Fn(u64) -> bool,
) -> u64 {
    let r = &mem.regions()[0];
    let (mut want, mut got) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    let mut n = 0;
    for p in (0..r.pages()).filter(|&p| present(p)) {
        file_page(SEED, p, &mut want);
        r.read(p as usize * PAGE, &mut got)
            .unwrap_or_else(|e| panic!("page {p}: {e}"));
        assert!(got == want, "present page {p} is not the file's");
        n += 1;
    }
    n
}

/// `serve --memory-file` whose file shrinks while it is being served: to 0
/// bytes before the destination connects, or to half while pages flow.
fn serve_shrinking(name: &str, size: usize, shrink_to: usize, mid_transfer: bool) {
    let _g = serial();
    let dir = TestDir::new(name);
    let mem = dir.path("guest.mem");
    drop(write_memory_file(&mem, SEED, size));
    let key = key_file(&dir);
    let mut serve = ringfault(&[
        "serve",
        "--listen",
        "tcp:127.0.0.1:0",
        "--memory-file",
        path_str(&mem),
        "--key-file",
        path_str(&key),
    ]);
    let addr = serve.expect("listening on ", Duration::from_secs(30));
    let addr = PeerAddr::parse(&addr).unwrap_or_else(|e| panic!("{e}"));
    if !mid_transfer {
        shrink(&mem, shrink_to);
    }
    // A slow path (20 ms per 1 MiB bulk frame), so that the file shrinks
    // while most of it is still to be sent.
    let proxy = Proxy::start(&addr, Attack::Relay, Protection::Mac.tag_len());
    proxy.slow_bulk(Duration::from_millis(20));
    let mut cfg =
        DestinationConfig::new(PresharedKey::new(KEY_A.to_vec()).unwrap_or_else(|e| panic!("{e}")));
    cfg.resume_timeout = Duration::from_secs(5);
    let dest = Destination::connect(proxy.addr(), cfg)
        .unwrap_or_else(|e| panic!("connect: {}", error_chain(&e)));
    let memory = dest.memory().unwrap_or_else(|| panic!("own memory"));
    let progress = dest.progress();
    let p2 = progress.clone();
    let shrinker = mid_transfer.then(|| {
        let mem = mem.clone();
        std::thread::spawn(move || {
            wait_for("4 MiB to arrive", Duration::from_secs(30), || {
                p2.present() >= (4 * MIB / PAGE) as u64
            });
            shrink(&mem, shrink_to);
        })
    });
    let err = dest
        .run()
        .expect_err("a migration of a file that shrank must not complete");
    if let Some(s) = shrinker {
        s.join().unwrap_or_else(|_| panic!("the shrinker panicked"));
    }
    let (status, _) = serve.wait_exit(Duration::from_secs(20));
    let line = failed_naming("serve", status, &serve.stderr(), &mem);
    assert!(line.contains("shrank to"), "{line}");
    assert_names_a_gone_byte(&line, shrink_to);
    eprintln!("serve: {line}");
    // The destination was told why, and keeps what arrived intact.
    let msg = error_chain(&err);
    eprintln!("destination: {msg}");
    assert!(
        matches!(err, EngineError::Peer { .. }),
        "the source must say why it stopped: {msg}"
    );
    assert!(msg.contains("shrank"), "{msg}");
    assert!(progress.present() < progress.total());
    let n = present_pages_are_the_files(&memory, |p| progress.is_present(p));
    if mid_transfer {
        assert!(n >= (4 * MIB / PAGE) as u64, "{n} pages arrived");
    }
    // A guest thread on a page that never arrived waits.
    let missing = (0..progress.total())
        .rev()
        .find(|&p| !progress.is_present(p))
        .unwrap_or_else(|| panic!("some page must be missing"));
    let (tx, rx) = mpsc::channel();
    let m2 = memory.clone();
    std::thread::spawn(move || {
        let v = m2.regions()[0].load_u64(missing as usize * PAGE + 64);
        let _ = tx.send(format!("{v:?}"));
    });
    let got = rx.recv_timeout(Duration::from_millis(500));
    assert!(
        got.is_err(),
        "a vCPU read {got:?} from a page that never arrived"
    );
}

#[test]
fn serve_memory_file_truncated_before_the_first_page() {
    serve_shrinking("trunc-serve-start", 16 * MIB, 0, false);
}

#[test]
fn serve_memory_file_truncated_during_the_migration() {
    serve_shrinking("trunc-serve-mid", 64 * MIB, 32 * MIB, true);
}

/// `uffd-handler --memory-file` in local mode: the file shrinks after the
/// handler checked it at start-up.
fn handler_shrinking(name: &str, size: usize, shrink_to: usize, after_connect: bool) {
    let _g = serial();
    let dir = TestDir::new(name);
    let mem = dir.path("snapshot.mem");
    drop(write_memory_file(&mem, SEED, size));
    let sock = dir.path("fc.sock");
    let mut h = ringfault(&[
        "uffd-handler",
        "--socket",
        path_str(&sock),
        "--memory-file",
        path_str(&mem),
    ]);
    h.expect("listening on ", Duration::from_secs(30));
    if !after_connect {
        // Before Firecracker connects: refused before any fault is served.
        shrink(&mem, shrink_to);
    }
    // The VMM and its memory outlive the handler, as Firecracker's would; a
    // vCPU waiting on a page that never comes stays waiting.
    let vmm: &'static FakeVmm = Box::leak(Box::new(FakeVmm::boot(&sock, &[size])));
    if after_connect {
        wait_for("Firecracker's handshake", Duration::from_secs(10), || {
            h.stderr().contains("connected:")
        });
        shrink(&mem, shrink_to);
        // The first fault (page 0 is still in the file) starts the
        // background fill, which reaches the end of what is left.
        let bad = vmm.touch(&[(0, 0)], 1, &|_, p, out| file_page(SEED, p, out));
        assert!(bad.is_empty(), "{bad:?}");
    }
    let (status, _) = h.wait_exit(Duration::from_secs(20));
    let err = h.stderr();
    let line = failed_naming("uffd-handler", status, &err, &mem);
    eprintln!("uffd-handler: {line}");
    let r = &vmm.regions()[0];
    let populated = populated_pages(r).unwrap_or_else(|e| panic!("page map: {e}"));
    if after_connect {
        assert!(line.contains("shrank to"), "{line}");
        assert_names_a_gone_byte(&line, shrink_to);
        assert!(
            populated.len() > 1,
            "the background fill ran before the end"
        );
    } else {
        assert!(line.contains("bytes"), "{line}");
        assert!(populated.is_empty(), "nothing may be installed");
    }
    // What was installed is the file's.
    let (mut want, mut got) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    for &p in &populated {
        file_page(SEED, p, &mut want);
        r.read(p as usize * PAGE, &mut got)
            .unwrap_or_else(|e| panic!("page {p}: {e}"));
        assert!(got == want, "installed page {p} is not the file's");
        assert!((p as usize) < shrink_to / PAGE || shrink_to == 0);
    }
    // A vCPU on a page past the new end waits: no zeros, no SIGBUS.
    let last = r.pages() - 1;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let v = vmm.regions()[0].load_u64(last as usize * PAGE + 64);
        let _ = tx.send(format!("{v:?}"));
    });
    let got = rx.recv_timeout(Duration::from_millis(500));
    assert!(
        got.is_err(),
        "a vCPU read {got:?} from a page that never arrived"
    );
}

#[test]
fn uffd_handler_memory_file_truncated_before_firecracker_connects() {
    handler_shrinking("trunc-fc-start", 16 * MIB, 4 * MIB, false);
}

#[test]
fn uffd_handler_memory_file_truncated_during_the_restore() {
    handler_shrinking("trunc-fc-mid", 64 * MIB, 16 * MIB, true);
}
