//! `ringfault uffd-handler` as an operator runs it: the real binary, with this
//! test playing Firecracker (anonymous regions, a userfaultfd with
//! `EVENT_REMOVE`, registered MISSING, handed over with one `sendmsg`).

// Test code: sizes and page indexes fit in usize on 64-bit Linux.
#![allow(clippy::cast_possible_truncation)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfault_engine::firecracker::{hand_over, GuestRegionMapping};
use ringfault_engine::sys::mapping::{GuestMapping, MapOptions};
use ringfault_engine::sys::uffd::{Features, RegisterMode, Uffd, UffdOptions};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn page_bytes(page: u64, out: &mut [u8]) {
    if page.is_multiple_of(5) {
        out.fill(0);
        return;
    }
    let mut x = page.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("rf-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
    fn memory_file(&self, len: usize) -> PathBuf {
        let p = self.path("mem");
        let mut w = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
        let mut page = vec![0u8; PAGE];
        for i in 0..(len / PAGE) as u64 {
            page_bytes(i, &mut page);
            w.write_all(&page).unwrap();
        }
        w.flush().unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `ringfault` process with its output collected.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringfault"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc {
            child,
            lines,
            stderr,
        }
    }

    fn expect(&mut self, tag: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
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
                    panic!("never printed {tag:?}; stderr: {}", self.stderr());
                }
            }
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_exit(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the stderr reader drain.
                std::thread::sleep(Duration::from_millis(50));
                return (st, t0.elapsed());
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("no exit within {limit:?}; stderr: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Firecracker's side: regions of `sizes`, laid out in the file one after the
/// other, registered with a userfaultfd as Firecracker does, and handed over.
struct Vmm {
    regions: Vec<GuestMapping>,
    _uffd: Uffd,
    stream: Option<UnixStream>,
}

impl Vmm {
    fn boot(socket: &Path, sizes: &[usize], file_sizes: &[usize]) -> Vmm {
        let regions: Vec<GuestMapping> = sizes
            .iter()
            .map(|&s| GuestMapping::anonymous(s, PAGE, MapOptions::default()).unwrap())
            .collect();
        let uffd = Uffd::open(UffdOptions {
            nonblock: true,
            user_mode_only: false,
        })
        .unwrap();
        uffd.api(Features::EVENT_REMOVE).unwrap();
        let mut offset = 0u64;
        let mappings: Vec<GuestRegionMapping> = regions
            .iter()
            .zip(file_sizes)
            .map(|(r, &claimed)| {
                uffd.register(r.addr(), r.len(), RegisterMode::Missing)
                    .unwrap();
                let m = GuestRegionMapping {
                    base_host_virt_addr: r.addr() as u64,
                    size: claimed as u64,
                    offset,
                    page_size: PAGE as u64,
                };
                offset += claimed as u64;
                m
            })
            .collect();
        let stream = hand_over(socket, &mappings, uffd.as_fd()).unwrap();
        Vmm {
            regions,
            _uffd: uffd,
            stream: Some(stream),
        }
    }

    /// Reads every page from two threads; returns pages that differ from the file.
    fn check_all(&self) -> Vec<String> {
        let mut first = 0u64;
        let mut jobs = Vec::new();
        for (ri, r) in self.regions.iter().enumerate() {
            jobs.push((ri, first, r.len() / PAGE));
            first += (r.len() / PAGE) as u64;
        }
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..2usize)
                .map(|t| {
                    let jobs = &jobs;
                    s.spawn(move || {
                        let mut bad = Vec::new();
                        let (mut got, mut want) = (vec![0u8; PAGE], vec![0u8; PAGE]);
                        for &(ri, first, pages) in jobs {
                            // Thread 1 walks backwards, so both ends fault at once.
                            for k in 0..pages {
                                let p = if t == 0 { k } else { pages - 1 - k };
                                self.regions[ri].read_page_into(p * PAGE, &mut got).unwrap();
                                page_bytes(first + p as u64, &mut want);
                                if got != want && bad.len() < 10 {
                                    bad.push(format!("region {ri} page {p}"));
                                }
                            }
                        }
                        bad
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        })
    }

    /// Firecracker exits: its end of the socket closes.
    fn close(&mut self) {
        self.stream = None;
    }
}

#[test]
fn local_mode_serves_every_page_reports_and_exits_0() {
    let _g = serial();
    let dir = Dir::new("local");
    let sizes = [12 * MIB, 4 * MIB];
    let mem = dir.memory_file(sizes.iter().sum());
    let sock = dir.path("fc.sock");
    let json = dir.path("stats.json");
    let mut h = Proc::spawn(&[
        "uffd-handler",
        "--socket",
        sock.to_str().unwrap(),
        "--memory-file",
        mem.to_str().unwrap(),
        "--stats-json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(
        h.expect("listening on "),
        format!("unix:{}", sock.display())
    );
    let mut vmm = Vmm::boot(&sock, &sizes, &sizes);
    let bad = vmm.check_all();
    assert!(bad.is_empty(), "pages differ from the file: {bad:?}");

    // Statistics on SIGUSR1, while it runs.
    let pid = h.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-USR1", &pid])
        .status()
        .unwrap()
        .success());
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
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(stats["mode"], "local");
    assert!(stats["faults"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        stats["fault_latency"]["p99_us"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    eprintln!("{err}");
}

#[test]
fn a_region_beyond_the_memory_file_exits_1_with_a_clear_message() {
    let _g = serial();
    let dir = Dir::new("short");
    let mem = dir.memory_file(4 * MIB);
    let sock = dir.path("fc.sock");
    let mut h = Proc::spawn(&[
        "uffd-handler",
        "--socket",
        sock.to_str().unwrap(),
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    h.expect("listening on ");
    // Firecracker claims 8 MiB of memory; the file has 4.
    let _vmm = Vmm::boot(&sock, &[8 * MIB], &[8 * MIB]);
    let (status, _) = h.wait_exit(Duration::from_secs(5));
    let err = h.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("ringfault: error: "), "{err}");
    assert!(err.contains("memory file has only 0x400000 bytes"), "{err}");
}

#[test]
fn usage_errors_exit_before_listening() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfault"))
        .args(["uffd-handler", "--socket", "/nonexistent/x.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_ringfault"))
        .args([
            "uffd-handler",
            "--socket",
            "/tmp/never.sock",
            "--memory-file",
            "/nonexistent/mem",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("opening the memory file /nonexistent/mem"),
        "{err}"
    );
}

#[test]
fn remote_mode_from_serve_memory_file() {
    let _g = serial();
    let dir = Dir::new("remote");
    let size = 16 * MIB;
    let mem = dir.memory_file(size);
    let key = dir.path("key");
    std::fs::write(&key, "uffd-handler-cli-test-key-0123456789\n").unwrap();
    let mut src = Proc::spawn(&[
        "serve",
        "--listen",
        "tcp:127.0.0.1:0",
        "--memory-file",
        mem.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    let addr = src.expect("listening on ");
    let sock = dir.path("fc.sock");
    let mut h = Proc::spawn(&[
        "uffd-handler",
        "--socket",
        sock.to_str().unwrap(),
        "--from",
        &addr,
        "--key-file",
        key.to_str().unwrap(),
    ]);
    h.expect("listening on ");
    let mut vmm = Vmm::boot(&sock, &[size], &[size]);
    let bad = vmm.check_all();
    assert!(
        bad.is_empty(),
        "pages differ from the source's file: {bad:?}"
    );
    // The source returns once the destination has every page and released it.
    src.expect("done: ");
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
