//! Tampering on the path: a man in the middle without the key
//! (`ringfault_testkit::proxy`) sits between a real source process and a real
//! destination and flips a payload bit, forges a `CompleteAck`, rewrites the
//! layout in a `Welcome`, or replays a frame. In every case the destination
//! stops with the error that names it, installs nothing from the tampered
//! frame, and leaves no guest thread reading zeros or the attacker's bytes:
//!
//! - every page that is populated afterwards holds the source's bytes;
//! - the pages of the tampered frame are not populated;
//! - a "vCPU" that was faulting pages all along ends up blocked in the
//!   kernel (`handle_userfault`) on a page that never arrived, having read
//!   only the source's bytes before;
//! - the source is told why (an `Error` frame) and exits naming it.
//!
//! The proxy slows the bulk lane down (20 ms per 1 MiB frame), so that each
//! attack lands while the migration is still running.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfault_engine::destination::{AttachedRegion, Progress};
use ringfault_engine::error::LaneId;
use ringfault_engine::sys::guest::{GuestMemory, GuestRegion, RegionSpec};
use ringfault_engine::sys::mapping::MapOptions;
use ringfault_engine::sys::uffd::{Features, RegisterMode, Uffd, UffdOptions};
use ringfault_engine::{
    Cipher, Destination, DestinationConfig, EngineError, PeerAddr, Protection, Source, SourceConfig,
};
use ringfault_proto::auth::PresharedKey;
use ringfault_proto::{Lane, MsgKind, SealError};
use ringfault_testkit::proxy::{Attack, Proxy, Tampering};
use ringfault_testkit::{
    error_chain, populated_pages, serial, serve_child_main, wait_for, ChildProc, VmSpec, KEY_A,
    MIB, PAGE,
};

const SIZE: usize = 64 * MIB;
const SPEC_ENV: &str = "RF_TAMPER_SPEC";
const PROTECTION_ENV: &str = "RF_TAMPER_PROTECTION";

fn key() -> PresharedKey {
    PresharedKey::new(KEY_A.to_vec()).unwrap_or_else(|e| panic!("key: {e}"))
}

/// The source child: serves the synthetic VM of `RF_TAMPER_SPEC` with the
/// protection of `RF_TAMPER_PROTECTION`, and gives up on a broken session
/// after 20 s (not the default 5 minutes), so that a source that was never
/// told why the destination stopped shows up as a failed test, not a hang.
#[test]
#[ignore = "child-process entry point, run by other tests"]
fn tamper_source_child() {
    let Ok(spec) = std::env::var(SPEC_ENV) else {
        return;
    };
    let spec = VmSpec::decode(&spec).unwrap_or_else(|| panic!("bad {SPEC_ENV}"));
    let mut cfg = SourceConfig::new(key());
    cfg.protection = protection_named(&std::env::var(PROTECTION_ENV).unwrap_or_default());
    cfg.resume_timeout = Duration::from_secs(20);
    let source = Source::from_memory(spec.build_source_memory(), cfg)
        .unwrap_or_else(|e| panic!("the source: {}", error_chain(&e)));
    serve_child_main(&source, "tcp:127.0.0.1:0")
}

fn protection_named(s: &str) -> Protection {
    match s {
        "none" => Protection::None,
        "aead" => Protection::Aead,
        _ => Protection::Mac,
    }
}

fn spawn_source(spec: &VmSpec, protection: Protection) -> (ChildProc, PeerAddr) {
    let mut child = ChildProc::reexec(
        "tamper_source_child",
        &[
            (SPEC_ENV, &spec.encode()),
            (PROTECTION_ENV, protection.name()),
        ],
    );
    let addr = child.expect("READY ", Duration::from_secs(60));
    let addr = PeerAddr::parse(&addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    (child, addr)
}

/// The source was told why the destination stopped: it exits 1 within a few
/// seconds, reporting the destination's error, which contains `says`.
fn source_was_told(mut source: ChildProc, says: &str) {
    let line = source.expect("SOURCE ", Duration::from_secs(10));
    let (status, _) = source.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{line}");
    assert!(
        line.starts_with("ERROR:") && line.contains("the peer reported an error"),
        "the source must report the destination's error: {line}"
    );
    assert!(line.contains(says), "{line}");
}

/// A guest thread that reads one word of every page from the top of memory
/// down (so that it faults ahead of the bulk transfer, which goes up),
/// comparing each with the source's bytes, forever.
struct Vcpu {
    tid: Arc<AtomicI32>,
    /// The page it is reading (or last read).
    at: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    bad: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Vcpu {
    fn start(spec: &VmSpec, mem: Arc<GuestMemory>) -> Vcpu {
        let v = Vcpu {
            tid: Arc::new(AtomicI32::new(0)),
            at: Arc::new(AtomicU64::new(u64::MAX)),
            reads: Arc::new(AtomicU64::new(0)),
            bad: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (tid, at, reads, bad, stop) = (
            v.tid.clone(),
            v.at.clone(),
            v.reads.clone(),
            v.bad.clone(),
            v.stop.clone(),
        );
        let spec = spec.clone();
        std::thread::spawn(move || {
            tid.store(
                rustix::thread::gettid().as_raw_nonzero().get(),
                Ordering::SeqCst,
            );
            let r = &mem.regions()[0];
            let mut want = vec![0u8; PAGE];
            let mut page = r.pages();
            while !stop.load(Ordering::SeqCst) {
                page = if page == 0 { r.pages() - 1 } else { page - 1 };
                at.store(page, Ordering::SeqCst);
                let off = usize::try_from(page).unwrap_or(usize::MAX) * PAGE + 64;
                let got = r
                    .load_u64(off)
                    .unwrap_or_else(|e| panic!("guest load: {e}"));
                spec.fill(0, page, &mut want);
                let mut w = [0u8; 8];
                w.copy_from_slice(&want[64..72]);
                if got != u64::from_le_bytes(w) {
                    bad.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("page {page}: read {got:#x}"));
                }
                reads.fetch_add(1, Ordering::SeqCst);
            }
        });
        v
    }

    /// Waits until the thread sleeps in the kernel on a fault of a page
    /// that is missing, and checks that it read only the source's bytes.
    fn assert_left_waiting(&self, progress: &Progress) {
        assert!(
            self.reads.load(Ordering::SeqCst) > 0,
            "the vCPU must have faulted pages in before the attack"
        );
        wait_for(
            "the vCPU to wait on a missing page",
            Duration::from_secs(10),
            || {
                blocked_in_userfault(self.tid.load(Ordering::SeqCst)) && {
                    let at = self.at.load(Ordering::SeqCst);
                    at != u64::MAX && !progress.is_present(at)
                }
            },
        );
        let bad = self.bad.lock().unwrap_or_else(|p| p.into_inner());
        assert!(bad.is_empty(), "the vCPU read wrong bytes: {bad:?}");
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // A thread that waits on a page that never comes stays waiting.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Whether thread `tid` of this process sleeps in `handle_userfault`.
fn blocked_in_userfault(tid: i32) -> bool {
    tid > 0
        && std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
            .is_ok_and(|w| w.trim() == "handle_userfault")
}

/// Every populated page of `region` holds the source's bytes; returns how
/// many are populated.
fn populated_pages_are_the_sources(spec: &VmSpec, region: &GuestRegion) -> usize {
    let pages = populated_pages(region).unwrap_or_else(|e| panic!("page map: {e}"));
    let mut want = vec![0u8; PAGE];
    let mut got = vec![0u8; PAGE];
    for &p in &pages {
        spec.fill(0, p, &mut want);
        region
            .read(usize::try_from(p).unwrap_or(usize::MAX) * PAGE, &mut got)
            .unwrap_or_else(|e| panic!("reading page {p}: {e}"));
        assert!(
            got == want,
            "populated page {p} does not hold the source's bytes"
        );
    }
    pages.len()
}

/// The attack failed the tag of the tampered frame on bulk lane 1, and
/// nothing else stopped the session first.
fn assert_bulk_tag_failed(a: &Attacked) {
    assert!(
        matches!(
            &a.err,
            EngineError::Integrity { lane, source: SealError::BadTag { seq } }
                if *lane == LaneId::bulk(1) && *seq == a.tampering.seq
        ),
        "{:?} (tampered: {:?})",
        a.err,
        a.tampering
    );
}

/// A migration through a proxy that runs `attack`; returns the destination's
/// error and checks what every attack must leave behind.
struct Attacked {
    err: EngineError,
    tampering: Tampering,
    source: ChildProc,
}

fn attacked(seed: u64, attack: Attack, protection: Protection) -> Attacked {
    attacked_with(seed, attack, protection, Cipher::for_this_cpu())
}

fn attacked_with(seed: u64, attack: Attack, protection: Protection, cipher: Cipher) -> Attacked {
    let spec = VmSpec::dense(SIZE, seed);
    let (source, addr) = spawn_source(&spec, protection);
    let proxy = Proxy::start(&addr, attack, protection.tag_len());
    proxy.slow_bulk(Duration::from_millis(20));
    let mut cfg = DestinationConfig::new(key());
    cfg.protection = protection;
    cfg.cipher = cipher;
    // 4 KiB guest pages: each fault brings its page within a millisecond, so
    // the vCPU has read pages before the attacks on the first frames. (With
    // transparent huge pages a first fault waits for a whole 2 MiB range;
    // those are covered by the migration and hostile tests.)
    cfg.thp = false;
    let dest = Destination::connect(proxy.addr(), cfg)
        .unwrap_or_else(|e| panic!("connect: {}", error_chain(&e)));
    let mem = dest.memory().unwrap_or_else(|| panic!("own memory"));
    let progress = dest.progress();
    let vcpu = Vcpu::start(&spec, mem.clone());
    let started = Instant::now();
    let err = dest
        .run()
        .expect_err("a tampered session must not complete");
    let took = started.elapsed();
    let tampering = proxy
        .tampering()
        .unwrap_or_else(|| panic!("the attack never fired; the destination said: {err}"));
    eprintln!(
        "{attack:?}: {tampering:?}; stopped after {took:?} with: {}",
        error_chain(&err)
    );
    assert!(
        took < Duration::from_secs(10),
        "it must stop at once, not after {took:?}"
    );
    assert!(
        progress.present() < progress.total(),
        "the attack must land mid-transfer"
    );
    // The pages of an altered frame never arrived intact: none is installed.
    // (A replayed frame's pages are the original's, installed from it.)
    if let (Attack::FlipPayloadBit { .. }, Some((region, first, count))) = (attack, tampering.pages)
    {
        assert_eq!(region, 1);
        let populated = populated_pages(&mem.regions()[0]).unwrap_or_else(|e| panic!("{e}"));
        for p in first..first + u64::from(count) {
            assert!(
                !progress.is_present(p),
                "page {p} of the tampered frame is present"
            );
            assert!(
                populated.binary_search(&p).is_err(),
                "page {p} of the tampered frame is populated"
            );
        }
    }
    let n = populated_pages_are_the_sources(&spec, &mem.regions()[0]);
    eprintln!("{n} populated pages all hold the source's bytes");
    vcpu.assert_left_waiting(&progress);
    drop(proxy);
    Attacked {
        err,
        tampering,
        source,
    }
}

#[test]
fn tamper_flipped_payload_bit_fails_its_tag_and_is_not_installed() {
    let _g = serial();
    let a = attacked(31, Attack::FlipPayloadBit { nth: 3 }, Protection::Mac);
    assert_eq!((a.tampering.lane, a.tampering.channel), (Lane::Bulk, 1));
    assert_bulk_tag_failed(&a);
    let msg = error_chain(&a.err);
    assert!(
        msg.contains("integrity check failed on the bulk lane 1"),
        "{msg}"
    );
    assert!(
        msg.contains("altered, injected, replayed or reordered"),
        "{msg}"
    );
    source_was_told(a.source, "integrity check failed");
}

#[test]
fn tamper_flipped_payload_bit_under_encryption_fails_its_tag() {
    // `--encrypt`: the payload is ciphertext of the default cipher; a flipped bit
    // fails the same tag check, and nothing of the frame is installed.
    let _g = serial();
    let a = attacked(37, Attack::FlipPayloadBit { nth: 3 }, Protection::Aead);
    assert_eq!((a.tampering.lane, a.tampering.channel), (Lane::Bulk, 1));
    assert_bulk_tag_failed(&a);
    source_was_told(a.source, "integrity check failed on the bulk lane 1");
}

/// The destination proposes `cipher`; the source accepts it. Pages arrive
/// and verify until the proxy flips a bit, which fails that frame's tag.
fn flipped_bit_is_detected_under(seed: u64, cipher: Cipher) {
    let _g = serial();
    let a = attacked_with(
        seed,
        Attack::FlipPayloadBit { nth: 3 },
        Protection::Mac,
        cipher,
    );
    assert_bulk_tag_failed(&a);
    source_was_told(a.source, "integrity check failed on the bulk lane 1");
}

#[test]
fn tamper_chacha20_poly1305_flipped_bit_is_detected() {
    // As on a CPU without AES instructions.
    flipped_bit_is_detected_under(41, Cipher::ChaCha20Poly1305);
}

#[test]
fn tamper_aes_256_gcm_flipped_bit_is_detected() {
    // `--cipher aes-256-gcm`.
    flipped_bit_is_detected_under(43, Cipher::Aes256Gcm);
}

#[test]
fn tamper_forged_complete_ack_fails_its_tag() {
    let _g = serial();
    let a = attacked(32, Attack::ForgeCompleteAck { after: 12 }, Protection::Mac);
    assert_eq!(a.tampering.lane, Lane::Demand);
    assert!(
        matches!(
            &a.err,
            EngineError::Integrity { lane: LaneId::DEMAND, source: SealError::BadTag { seq } }
                if *seq == a.tampering.seq
        ),
        "{:?}",
        a.err
    );
    source_was_told(a.source, "integrity check failed on the demand lane");
}

#[test]
fn tamper_forged_complete_ack_without_integrity_is_refused_by_the_state_machine() {
    // With `--integrity none` the frame passes (there is no tag): the state
    // machine still refuses a CompleteAck before Complete.
    let _g = serial();
    let a = attacked(33, Attack::ForgeCompleteAck { after: 12 }, Protection::None);
    assert!(
        matches!(
            &a.err,
            EngineError::Unexpected {
                lane: LaneId::DEMAND,
                kind: MsgKind::CompleteAck,
                state: "before Complete was sent",
            }
        ),
        "{:?}",
        a.err
    );
    let msg = error_chain(&a.err);
    assert!(
        msg.contains("protocol violation on the demand lane"),
        "{msg}"
    );
    source_was_told(
        a.source,
        "CompleteAck is not allowed before Complete was sent",
    );
}

#[test]
fn tamper_replayed_frame_fails_its_tag() {
    let _g = serial();
    let a = attacked(34, Attack::Replay { nth: 2, later: 3 }, Protection::Mac);
    assert_eq!((a.tampering.lane, a.tampering.channel), (Lane::Bulk, 1));
    assert_bulk_tag_failed(&a);
    source_was_told(a.source, "integrity check failed on the bulk lane 1");
}

#[test]
fn tamper_rewritten_bulk_welcome_layout_is_refused() {
    let _g = serial();
    let a = attacked(
        35,
        Attack::RewriteWelcome {
            lane: Lane::Bulk,
            size: 64 << 40,
        },
        Protection::Mac,
    );
    assert!(
        matches!(
            &a.err,
            EngineError::Integrity { lane, source: SealError::BadTag { seq: 0 } }
                if *lane == LaneId::bulk(1)
        ),
        "{:?}",
        a.err
    );
    source_was_told(a.source, "integrity check failed on the bulk lane 1");
}

/// Guest memory "a VMM" registered with its own userfaultfd, which it keeps
/// open (as Firecracker does): a copy of the descriptor goes to the engine.
fn vmm_memory() -> (GuestMemory, Uffd, OwnedFd) {
    let mem = GuestMemory::anonymous(
        &[RegionSpec {
            id: 1,
            size: SIZE,
            page_size: PAGE,
        }],
        MapOptions::default(),
    )
    .unwrap_or_else(|e| panic!("guest memory: {e}"));
    let uffd = Uffd::open(UffdOptions {
        nonblock: true,
        user_mode_only: false,
    })
    .unwrap_or_else(|e| panic!("userfaultfd: {e}"));
    uffd.api(Features::NONE)
        .unwrap_or_else(|e| panic!("UFFDIO_API: {e}"));
    let r = &mem.regions()[0];
    uffd.register(r.addr(), r.len(), RegisterMode::Missing)
        .unwrap_or_else(|e| panic!("UFFDIO_REGISTER: {e}"));
    let fd = rustix::io::fcntl_dupfd_cloexec(&uffd, 0).unwrap_or_else(|e| panic!("dup: {e}"));
    (mem, uffd, fd)
}

#[test]
fn tamper_rewritten_welcome_layout_is_refused_before_anything_is_mapped() {
    let _g = serial();
    let spec = VmSpec::dense(SIZE, 36);
    let (source, addr) = spawn_source(&spec, Protection::Mac);
    // The attacker announces 64 TiB: an unauthenticated layout would make the
    // destination map (and the VMM check) memory of the attacker's choosing.
    let proxy = Proxy::start(
        &addr,
        Attack::RewriteWelcome {
            lane: Lane::Demand,
            size: 64 << 40,
        },
        Protection::Mac.tag_len(),
    );
    let (mem, uffd, fd) = vmm_memory();
    let r = &mem.regions()[0];
    let regions = vec![AttachedRegion {
        base: r.addr(),
        len: r.len(),
        page_size: PAGE,
    }];
    let err = Destination::attach(proxy.addr(), DestinationConfig::new(key()), fd, regions)
        .expect_err("a rewritten layout must be refused");
    let t = proxy.wait_tampering(Duration::from_secs(5));
    assert_eq!((t.lane, t.kind, t.seq), (Lane::Demand, MsgKind::Welcome, 0));
    assert!(
        matches!(
            err,
            EngineError::Integrity {
                lane: LaneId::DEMAND,
                source: SealError::BadTag { seq: 0 }
            }
        ),
        "{err:?}"
    );
    let msg = error_chain(&err);
    assert!(
        msg.contains("integrity check failed on the demand lane"),
        "{msg}"
    );
    assert!(
        populated_pages(r)
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty(),
        "nothing may be installed"
    );
    // A vCPU of the VMM touching its memory waits; it never reads zeros.
    let tid = Arc::new(AtomicI32::new(0));
    let read: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let (t2, r2) = (tid.clone(), read.clone());
    let mem = Arc::new(mem);
    let m2 = mem.clone();
    std::thread::spawn(move || {
        t2.store(
            rustix::thread::gettid().as_raw_nonzero().get(),
            Ordering::SeqCst,
        );
        let v = m2.regions()[0].load_u64(7 * PAGE + 8);
        *r2.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{v:?}"));
    });
    wait_for(
        "the vCPU to wait on its page",
        Duration::from_secs(10),
        || blocked_in_userfault(tid.load(Ordering::SeqCst)),
    );
    let got = read.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        got.is_none(),
        "a vCPU read {got:?} from a page that never arrived"
    );
    drop(proxy);
    source_was_told(source, "integrity check failed on the demand lane");
    // The VMM's memory and userfaultfd (and the thread waiting in it) stay
    // for the life of the test process.
    std::mem::forget(mem);
    std::mem::forget(uffd);
}
