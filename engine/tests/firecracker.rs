//! The Firecracker page-fault handler on the real kernel. The test plays
//! Firecracker's side byte for byte, as `guest_memory_from_uffd` does in its
//! `persist.rs`: anonymous guest regions of two sizes; a userfaultfd made with
//! `O_CLOEXEC | O_NONBLOCK`, not restricted to user-mode faults, `UFFDIO_API` with
//! `EVENT_REMOVE`; every region registered MISSING; connect to the handler's
//! socket and one `sendmsg` carrying the JSON mappings and the userfaultfd. Then
//! several threads touch guest pages, as vCPUs would.
//!
//! Cases: local mode, remote mode (source in a child process, over loopback),
//! balloon (`MADV_DONTNEED` while pages are being served), and peer exit and bad
//! input with the handler and "Firecracker" in child processes.

// Test code: sizes and page indexes fit in usize on 64-bit Linux, and the
// measurement prints figures as floats.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use ringfault_engine::firecracker::{
    self, serve_local, serve_remote, Ended, FirecrackerError, HandlerStats, LocalOptions,
};
use ringfault_engine::sys::mapping::{GuestMapping, MapOptions};
use ringfault_engine::sys::scm::send_with_fd;
use ringfault_engine::sys::uffd::{Features, RegisterMode, Uffd, UffdOptions};
use ringfault_engine::{DestinationConfig, PeerAddr, Source, SourceConfig, SourceRegion};
use ringfault_proto::auth::PresharedKey;

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
/// Two regions of different sizes, laid out one after the other in the memory
/// file, as Firecracker writes them.
const SIZES: [usize; 2] = [24 * MIB, 8 * MIB];
const KEY: &str = "ringfault-firecracker-test-key-0123";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// The snapshot memory file
// ---------------------------------------------------------------------------

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The file's page `page`: one page in eight is all zeros (served with
/// `UFFDIO_ZEROPAGE`), the rest pseudo-random.
fn file_page(seed: u64, page: u64, out: &mut [u8]) {
    let h = mix(seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    if h.is_multiple_of(8) {
        out.fill(0);
        return;
    }
    let mut x = h | 1;
    for c in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
}

fn write_memory_file(path: &Path, seed: u64, len: usize) -> File {
    let mut w = BufWriter::new(File::create(path).unwrap());
    let mut page = vec![0u8; PAGE];
    for p in 0..(len / PAGE) as u64 {
        file_page(seed, p, &mut page);
        w.write_all(&page).unwrap();
    }
    w.flush().unwrap();
    drop(w);
    File::open(path).unwrap()
}

struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!("rf-fc-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Firecracker's side
// ---------------------------------------------------------------------------

/// What "Firecracker" sends.
#[derive(Clone)]
enum Message {
    /// The mappings of its regions, as Firecracker serialises them.
    Real,
    /// These bytes instead.
    Raw(String),
}

/// A VMM restoring a snapshot through an external handler.
struct FakeFirecracker {
    regions: Vec<GuestMapping>,
    /// Firecracker keeps its userfaultfd open for the life of the VM.
    _uffd: Uffd,
    /// Firecracker keeps the socket open too; closing it tells the handler to go.
    _stream: UnixStream,
}

impl FakeFirecracker {
    fn boot(socket: &Path) -> FakeFirecracker {
        Self::boot_with(socket, Message::Real, true)
    }

    fn boot_with(socket: &Path, msg: Message, send_uffd: bool) -> FakeFirecracker {
        let regions: Vec<GuestMapping> = SIZES
            .iter()
            .map(|&s| GuestMapping::anonymous(s, PAGE, MapOptions::default()).unwrap())
            .collect();
        Self::hand_over(socket, regions, msg, send_uffd)
    }

    /// Hands already mapped regions (any page size) to the handler.
    fn hand_over(
        socket: &Path,
        regions: Vec<GuestMapping>,
        msg: Message,
        send_uffd: bool,
    ) -> FakeFirecracker {
        // UffdBuilder::new().close_on_exec(true).non_blocking(true)
        //     .user_mode_only(false).require_features(EVENT_REMOVE)
        let uffd = Uffd::open(UffdOptions {
            nonblock: true,
            user_mode_only: false,
        })
        .unwrap();
        uffd.api(Features::EVENT_REMOVE).unwrap();
        for r in &regions {
            uffd.register(r.addr(), r.len(), RegisterMode::Missing)
                .unwrap();
        }
        let json = match msg {
            Message::Real => mappings_json(&regions),
            Message::Raw(s) => s,
        };
        let stream = connect(socket);
        let fd = send_uffd.then(|| uffd.as_fd());
        let sent = send_with_fd(stream.as_fd(), json.as_bytes(), fd).unwrap();
        assert_eq!(sent, json.len(), "one sendmsg carries the whole message");
        FakeFirecracker {
            regions,
            _uffd: uffd,
            _stream: stream,
        }
    }

    /// Reads every listed page from `threads` threads in a shuffled order and
    /// returns the pages that differ from `want`.
    fn touch(
        &self,
        pages: &[(usize, u64)],
        threads: usize,
        want: &(dyn Fn(usize, u64, &mut [u8]) + Sync),
    ) -> Vec<String> {
        let mut order = pages.to_vec();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(pages.len() as u64));
        let chunk = order.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = order
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut bad = Vec::new();
                        let mut got = vec![0u8; PAGE];
                        let mut exp = vec![0u8; PAGE];
                        for &(ri, p) in part {
                            self.regions[ri]
                                .read_page_into(p as usize * PAGE, &mut got)
                                .unwrap();
                            want(ri, p, &mut exp);
                            if got != exp && bad.len() < 10 {
                                bad.push(format!("region {ri} page {p}"));
                            }
                        }
                        bad
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    }
}

/// `[{"base_host_virt_addr":..,"size":..,"offset":..,"page_size":4096,"page_size_kib":4096}]`
fn mappings_json(regions: &[GuestMapping]) -> String {
    let mut offset = 0usize;
    let items: Vec<String> = regions
        .iter()
        .map(|r| {
            let ps = r.page_size();
            let s = format!(
                r#"{{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":{ps},"page_size_kib":{ps}}}"#,
                r.addr(),
                r.len(),
                offset
            );
            offset += r.len();
            s
        })
        .collect();
    format!("[{}]", items.join(","))
}

fn connect(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot connect to the handler at {}: {e}", socket.display()),
        }
    }
}

/// Every page of both regions.
fn all_pages() -> Vec<(usize, u64)> {
    SIZES
        .iter()
        .enumerate()
        .flat_map(|(ri, &s)| (0..(s / PAGE) as u64).map(move |p| (ri, p)))
        .collect()
}

/// The file's bytes for page `p` of region `ri`.
fn file_bytes(seed: u64) -> impl Fn(usize, u64, &mut [u8]) + Sync {
    move |ri, p, out| {
        let first: usize = SIZES[..ri].iter().sum::<usize>() / PAGE;
        file_page(seed, first as u64 + p, out);
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a local-mode handler on a thread of this process.
fn local_handler(
    socket: &Path,
    file: File,
    opts: LocalOptions,
) -> (
    Arc<HandlerStats>,
    std::thread::JoinHandle<Result<Ended, FirecrackerError>>,
) {
    let listener = firecracker::listen(socket).unwrap();
    let stats = Arc::new(HandlerStats::new("local"));
    let st = stats.clone();
    let h = std::thread::spawn(move || {
        let hs = firecracker::accept(&listener)?;
        serve_local(hs, &file, opts, st)
    });
    (stats, h)
}

/// Closes "Firecracker" and checks that the handler ends cleanly within 1 s.
fn shut_down(
    vm: FakeFirecracker,
    handler: std::thread::JoinHandle<Result<Ended, FirecrackerError>>,
) {
    let t0 = Instant::now();
    drop(vm);
    wait_for("the handler to notice", Duration::from_secs(1), || {
        handler.is_finished()
    });
    let ended = handler.join().unwrap();
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
    let dir = TestDir::new("local");
    let total: usize = SIZES.iter().sum();
    let file = write_memory_file(&dir.path("mem"), 11, total);
    let sock = dir.path("uffd.sock");
    let (stats, handler) = local_handler(&sock, file, LocalOptions::default());
    let vm = FakeFirecracker::boot(&sock);
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
                vm_ref.regions[ri]
                    .write_from(p as usize * PAGE, &marker(ri, p).to_le_bytes())
                    .unwrap();
            }
        });
        let bad = vm_ref.touch(&reads, 3, &file_bytes(11));
        assert!(bad.is_empty(), "pages differ from the memory file: {bad:?}");
        writer.join().unwrap();
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
        "zero pages of the file use ZEROPAGE: {r:?}"
    );
    assert_eq!(
        r.pages_copied + r.pages_zeroed,
        (total / PAGE) as u64,
        "{r:?}"
    );
    assert_eq!(r.bytes_served, r.pages_copied * PAGE as u64);
    shut_down(vm, handler);
}

#[test]
fn local_mode_without_background_fills_only_what_faults() {
    let _g = serial();
    let dir = TestDir::new("nobg");
    let total: usize = SIZES.iter().sum();
    let file = write_memory_file(&dir.path("mem"), 12, total);
    let sock = dir.path("uffd.sock");
    let opts = LocalOptions {
        background: false,
        ..LocalOptions::default()
    };
    let (stats, handler) = local_handler(&sock, file, opts);
    let vm = FakeFirecracker::boot(&sock);
    let some: Vec<(usize, u64)> = all_pages().into_iter().step_by(7).collect();
    let bad = vm.touch(&some, 3, &file_bytes(12));
    assert!(bad.is_empty(), "{bad:?}");
    std::thread::sleep(Duration::from_millis(200));
    let r = stats.report();
    assert_eq!(
        r.pages_present,
        some.len() as u64,
        "only faulted pages are installed: {r:?}"
    );
    assert!(r.all_present_after_s.is_none());
    shut_down(vm, handler);
}

// ---------------------------------------------------------------------------
// 2. Remote mode
// ---------------------------------------------------------------------------

/// A child process of this test binary, with its stdout read line by line.
struct ChildProc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ChildProc {
    fn spawn(role: &str, arg: &str) -> ChildProc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env("RF_FC_ROLE", role)
            .env("RF_FC_ARG", arg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildProc { child, lines: rx }
    }

    /// Waits for a line containing `tag`; returns what follows it.
    fn expect(&mut self, tag: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(i) = l.find(tag) {
                        return l[i + tag.len()..].trim().to_owned();
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let mut err = String::new();
                    if let Some(mut e) = self.child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    panic!("child never printed {tag:?}; stderr: {err}");
                }
            }
        }
    }

    /// Waits up to `limit` for the exit; returns (status, how long, stderr).
    fn wait_exit(mut self, limit: Duration) -> (std::process::ExitStatus, Duration, String) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (st, t0.elapsed(), err);
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("child did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Child processes: "Firecracker", the handler, and the remote source.
#[test]
fn child_entry() {
    let (Ok(role), Ok(arg)) = (std::env::var("RF_FC_ROLE"), std::env::var("RF_FC_ARG")) else {
        return; // not a child
    };
    match role.as_str() {
        "source" => source_main(&arg),
        "handler" => handler_main(&arg),
        "vm" => vm_main(&arg),
        other => panic!("unknown role {other}"),
    }
}

/// The remote source: serves the memory file `arg` as Firecracker's two regions,
/// each mapped from its offset in the file.
fn source_main(arg: &str) -> ! {
    let file = File::open(arg).unwrap();
    let mut offset = 0u64;
    let regions: Vec<SourceRegion> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let map = GuestMapping::map_file_at(&file, offset, size).unwrap();
            offset += size as u64;
            SourceRegion::from_file_mapping(i as u32 + 1, Arc::new(map)).unwrap()
        })
        .collect();
    let key = PresharedKey::new(KEY.as_bytes().to_vec()).unwrap();
    let source = Source::new(regions, SourceConfig::new(key)).unwrap();
    let listener = PeerAddr::parse("tcp:127.0.0.1:0")
        .unwrap()
        .listen()
        .unwrap();
    println!("READY {}", listener.local_addr().unwrap());
    let code = match source.serve(&listener) {
        Ok(report) => {
            println!("SOURCE OK released={}", report.released);
            0
        }
        Err(e) => {
            println!("SOURCE ERROR: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// The handler, as the CLI runs it: `arg` is `SOCKET;MEMORY_FILE`.
fn handler_main(arg: &str) -> ! {
    let (sock, mem) = arg.split_once(';').unwrap();
    let file = File::open(mem).unwrap();
    let listener = firecracker::listen(Path::new(sock)).unwrap();
    println!("LISTENING");
    let stats = Arc::new(HandlerStats::new("local"));
    let result = firecracker::accept(&listener)
        .and_then(|hs| serve_local(hs, &file, LocalOptions::default(), stats));
    match result {
        Ok(ended) => {
            println!("HANDLER ENDED {ended:?}");
            std::process::exit(0);
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("HANDLER ERROR: {msg}");
            std::process::exit(1);
        }
    }
}

/// "Firecracker" in its own process: boots, touches pages, then waits to be
/// killed. `arg` is `SOCKET;SEED`.
fn vm_main(arg: &str) -> ! {
    let (sock, seed) = arg.split_once(';').unwrap();
    let vm = FakeFirecracker::boot(Path::new(sock));
    let pages: Vec<(usize, u64)> = all_pages().into_iter().take(2000).collect();
    let bad = vm.touch(&pages, 2, &file_bytes(seed.parse().unwrap()));
    assert!(bad.is_empty(), "{bad:?}");
    println!("TOUCHED");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn remote_mode_every_page_matches_the_source() {
    let _g = serial();
    let dir = TestDir::new("remote");
    let total: usize = SIZES.iter().sum();
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, 21, total));
    let mut source = ChildProc::spawn("source", mem.to_str().unwrap());
    let addr = PeerAddr::parse(&source.expect("READY ", Duration::from_secs(30))).unwrap();

    let sock = dir.path("uffd.sock");
    let listener = firecracker::listen(&sock).unwrap();
    let stats = Arc::new(HandlerStats::new("remote"));
    let st = stats.clone();
    let handler = std::thread::spawn(move || {
        let hs = firecracker::accept(&listener)?;
        let cfg = DestinationConfig::new(PresharedKey::new(KEY.as_bytes().to_vec()).unwrap());
        serve_remote(hs, &addr, cfg, st)
    });
    let vm = FakeFirecracker::boot(&sock);
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
    let released = source.expect("SOURCE OK ", Duration::from_secs(10));
    assert_eq!(released, "released=true");
    let (st, _, _) = source.wait_exit(Duration::from_secs(10));
    assert!(st.success());
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
    let dir = TestDir::new(if background { "balloon-bg" } else { "balloon" });
    let total: usize = SIZES.iter().sum();
    let file = write_memory_file(&dir.path("mem"), 31, total);
    let sock = dir.path("uffd.sock");
    let opts = LocalOptions {
        background,
        ..LocalOptions::default()
    };
    let (stats, handler) = local_handler(&sock, file, opts);
    let vm = FakeFirecracker::boot(&sock);

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
    let regions = &vm.regions;
    let vm_ref = &vm;
    std::thread::scope(|s| {
        let touching = s.spawn(|| vm_ref.touch(&others, 2, &file_bytes(31)));
        for &(ri, start, n) in &removed {
            regions[ri]
                .madvise_dontneed(start as usize * PAGE, n as usize * PAGE)
                .unwrap();
        }
        let bad = touching.join().unwrap();
        assert!(bad.is_empty(), "pages outside the balloon: {bad:?}");
    });

    // Later faults in removed ranges read zeros, never the snapshot's bytes.
    let gone: Vec<(usize, u64)> = removed
        .iter()
        .flat_map(|&(ri, s, n)| (s..s + n).map(move |p| (ri, p)))
        .collect();
    let bad = vm.touch(&gone, 3, &|_, _, out: &mut [u8]| out.fill(0));
    assert!(bad.is_empty(), "removed pages must read zeros: {bad:?}");
    // And everything else is still the file's.
    let bad = vm.touch(&others, 2, &file_bytes(31));
    assert!(bad.is_empty(), "{bad:?}");

    // A range removed again, served (by the handler, or by the kernel once the
    // handler has unregistered the regions) with zeros again.
    regions[0].madvise_dontneed(0, 64 * PAGE).unwrap();
    let bad = vm.touch(
        &(0..64u64).map(|p| (0, p)).collect::<Vec<_>>(),
        1,
        &|_, _, out: &mut [u8]| out.fill(0),
    );
    assert!(bad.is_empty(), "{bad:?}");

    let r = stats.report();
    eprintln!("{}", r.summary());
    assert!(r.removed_pages > 0, "{r:?}");
    if background {
        assert!(r.all_present_after_s.is_some(), "{r:?}");
    } else {
        // Every removed page was faulted again, and the handler served zeros.
        assert!(r.removed_faults >= gone.len() as u64, "{r:?}");
    }
    assert!(!handler.is_finished(), "the handler must still be serving");
    shut_down(vm, handler);
}

#[test]
fn local_mode_hugetlbfs_2mib_pages() {
    use ringfault_engine::sys::mapping::PAGE_2M;
    let _g = serial();
    // Firecracker with `"huge_pages": "2M"`: hugetlbfs guest memory, 2 MiB pages.
    let regions: Result<Vec<GuestMapping>, _> = SIZES
        .iter()
        .map(|&s| GuestMapping::anonymous(s, PAGE_2M, MapOptions::default()))
        .collect();
    let regions = match regions {
        Ok(r) => r,
        Err(e) => {
            println!(
                "SKIPPED local_mode_hugetlbfs_2mib_pages: needs {} free 2 MiB huge pages \
                 (vm.nr_hugepages): {e}",
                SIZES.iter().sum::<usize>() / PAGE_2M
            );
            return;
        }
    };
    let dir = TestDir::new("huge");
    let total: usize = SIZES.iter().sum();
    let file = write_memory_file(&dir.path("mem"), 13, total);
    let sock = dir.path("uffd.sock");
    let (stats, handler) = local_handler(&sock, file, LocalOptions::default());
    let vm = FakeFirecracker::hand_over(&sock, regions, Message::Real, true);
    let bad = vm.touch(&all_pages(), 4, &file_bytes(13));
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
    let dir = TestDir::new("remote-balloon");
    let total: usize = SIZES.iter().sum();
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, 22, total));
    let mut source = ChildProc::spawn("source", mem.to_str().unwrap());
    let addr = PeerAddr::parse(&source.expect("READY ", Duration::from_secs(30))).unwrap();
    let sock = dir.path("uffd.sock");
    let listener = firecracker::listen(&sock).unwrap();
    let stats = Arc::new(HandlerStats::new("remote"));
    let st = stats.clone();
    let handler = std::thread::spawn(move || {
        let hs = firecracker::accept(&listener)?;
        let cfg = DestinationConfig::new(PresharedKey::new(KEY.as_bytes().to_vec()).unwrap());
        serve_remote(hs, &addr, cfg, st)
    });
    let vm = FakeFirecracker::boot(&sock);
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
            vm_ref.regions[ri]
                .madvise_dontneed(start as usize * PAGE, n as usize * PAGE)
                .unwrap();
        }
        let bad = touching.join().unwrap();
        assert!(bad.is_empty(), "pages outside the balloon: {bad:?}");
    });
    let gone: Vec<(usize, u64)> = removed
        .iter()
        .flat_map(|&(ri, s, n)| (s..s + n).map(move |p| (ri, p)))
        .collect();
    wait_for("the migration to complete", Duration::from_secs(60), || {
        stats.all_present_after().is_some()
    });
    let bad = vm.touch(&gone, 2, &|_, _, out: &mut [u8]| out.fill(0));
    assert!(bad.is_empty(), "removed pages must read zeros: {bad:?}");
    let bad = vm.touch(&others, 2, &file_bytes(22));
    assert!(bad.is_empty(), "{bad:?}");
    eprintln!("{}", stats.report().summary());
    let released = source.expect("SOURCE OK ", Duration::from_secs(10));
    assert_eq!(released, "released=true");
    let _ = source.wait_exit(Duration::from_secs(10));
    shut_down(vm, handler);
}

// ---------------------------------------------------------------------------
// 4. Peer exit and bad input
// ---------------------------------------------------------------------------

#[test]
fn killing_firecracker_makes_the_handler_exit_0_within_1s() {
    let _g = serial();
    let dir = TestDir::new("kill");
    let total: usize = SIZES.iter().sum();
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, 41, total));
    let sock = dir.path("uffd.sock");
    let mut handler = ChildProc::spawn("handler", &format!("{};{}", sock.display(), mem.display()));
    handler.expect("LISTENING", Duration::from_secs(30));
    let mut vm = ChildProc::spawn("vm", &format!("{};41", sock.display()));
    vm.expect("TOUCHED", Duration::from_secs(30));
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    let (status, took, stderr) = handler.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "handler exit {status:?}: {stderr}");
    assert!(
        took < Duration::from_secs(1),
        "the handler took {took:?} to exit"
    );
    eprintln!("handler exited 0 {took:?} after Firecracker was killed");
}

/// Starts a handler child, plays a Firecracker that sends `msg`, and returns the
/// handler's stderr after checking it failed cleanly (exit 1, no panic).
fn bad_input(name: &str, file_len: usize, msg: Message, send_uffd: bool) -> String {
    let dir = TestDir::new(name);
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, 51, file_len));
    let sock = dir.path("uffd.sock");
    let mut handler = ChildProc::spawn("handler", &format!("{};{}", sock.display(), mem.display()));
    handler.expect("LISTENING", Duration::from_secs(30));
    let vm = FakeFirecracker::boot_with(&sock, msg, send_uffd);
    let (status, _, stderr) = handler.wait_exit(Duration::from_secs(5));
    drop(vm);
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
        "badjson",
        total,
        Message::Raw(r#"[{"base_host_virt_addr": "not a number"}]"#.into()),
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
    let line = bad_input("nofd", total, Message::Real, false);
    assert!(line.contains("carried no userfaultfd"), "{line}");
}

#[test]
fn a_region_larger_than_the_memory_file_is_a_clear_error() {
    let _g = serial();
    // The file holds the first region and half of the second.
    let short = SIZES[0] + SIZES[1] / 2;
    let line = bad_input("short", short, Message::Real, true);
    assert!(line.contains("region 1 needs file bytes"), "{line}");
    assert!(line.contains("memory file has only"), "{line}");
}

// ---------------------------------------------------------------------------
// Fault latency as a vCPU sees it (a measurement, not a check)
// ---------------------------------------------------------------------------

/// `cargo test --release -p ringfault-engine --test firecracker -- --ignored --nocapture`
#[test]
#[ignore = "measurement: run in release with --ignored --nocapture"]
fn local_mode_fault_latency() {
    let _g = serial();
    let dir = TestDir::new("latency");
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
        let (stats, handler) = local_handler(&sock, File::open(&mem).unwrap(), opts);
        let regions: Vec<GuestMapping> = sizes
            .iter()
            .map(|&s| GuestMapping::anonymous(s, PAGE, MapOptions::default()).unwrap())
            .collect();
        let vm = FakeFirecracker::hand_over(&sock, regions, Message::Real, true);
        // One "vCPU" touches random pages until every page is present (or it has
        // touched 20000): the reads that waited are its faults.
        let mut x = 0x1234_5678u64;
        let mut waits = Vec::new();
        let mut b = [0u8; 8];
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
            vm.regions[ri].read_page_into(p * PAGE, &mut b).unwrap();
            std::hint::black_box(&b);
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
