//! A hostile or vanished source: the destination stops with the error that
//! names what was wrong, never writes outside guest memory, never hangs, and
//! never lets a vCPU read a page that did not arrive.
//!
//! The hostile source completes the real handshake (so every frame it sends
//! carries a valid tag: the destination's checks of the frames themselves are
//! what is tested), then writes crafted frames on one lane.

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringfault_engine::error::LaneId;
use ringfault_engine::handshake::source_handshake;
use ringfault_engine::wire::{seal_control, Framed};
use ringfault_engine::{Destination, DestinationConfig, EngineError, PeerAddr, Protection};
use ringfault_proto::auth::PresharedKey;
use ringfault_proto::{
    encode_pages_head, DecodeError, Layout, Message, MsgKind, PageKind, PageSize, PagesHeader,
    RegionDesc, SealError,
};
use ringfault_testkit::{
    error_chain, serial, source_child_main, SourceChild, VmSpec, KEY_A, MIB, PAGE,
};

/// The source child's entry point: does nothing unless started by `SourceChild`.
#[test]
#[ignore = "child-process entry point, run by other tests"]
fn source_child() {
    source_child_main();
}

/// One region of 4 MiB (1024 pages), id 1.
fn layout() -> Layout {
    Layout {
        regions: vec![RegionDesc {
            id: 1,
            page_size: PageSize::Size4K,
            size: 4 * MIB as u64,
        }],
    }
}

fn key() -> PresharedKey {
    PresharedKey::new(KEY_A.to_vec()).unwrap_or_else(|e| panic!("key: {e}"))
}

/// Which lane the hostile source poisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    Demand,
    Bulk,
}

/// A `Pages` frame: header, body, `payload`, and the tag `framed`'s sealer
/// gives it (the next in the lane's sequence).
fn sealed_pages(framed: &mut Framed, h: &PagesHeader, payload: &[u8]) -> Vec<u8> {
    let head = encode_pages_head(h);
    let tag = framed
        .sealer
        .seal(&head, payload)
        .unwrap_or_else(|e| panic!("seal: {e}"));
    let mut out = head.to_vec();
    out.extend_from_slice(payload);
    out.extend_from_slice(tag.as_ref().map_or(&[][..], |t| &t[..]));
    out
}

/// A source that authenticates the demand lane and one bulk lane with the
/// right key, then writes what `poison` makes on lane `on`, and keeps both
/// connections open until the test is done.
fn hostile_source(
    on: On,
    poison: impl FnOnce(&mut Framed) -> Vec<u8> + Send + 'static,
) -> (PeerAddr, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let listener = PeerAddr::parse("tcp:127.0.0.1:0")
        .and_then(|a| a.listen())
        .unwrap_or_else(|e| panic!("listen: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"));
    let (done_tx, done_rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut lanes = Vec::new();
        for _ in 0..2 {
            let s = listener.accept().unwrap_or_else(|e| panic!("accept: {e}"));
            let link = source_handshake(
                s,
                &key(),
                &layout(),
                Protection::Mac,
                Duration::from_secs(10),
                0,
                |_| Ok(()),
            )
            .unwrap_or_else(|e| panic!("handshake: {}", error_chain(&e)));
            lanes.push(link.framed);
        }
        let lane = &mut lanes[usize::from(on == On::Bulk)];
        let bytes = poison(lane);
        let _ = lane.stream.write_all(&bytes);
        // Keep the connections open: the destination must stop on the frame,
        // not on a closed connection.
        let _ = done_rx.recv_timeout(Duration::from_secs(20));
    });
    (addr, done_tx, h)
}

/// Runs a destination against a hostile source; returns its error and
/// whether page `probe` of region 1 became present.
fn expect_failure(
    on: On,
    probe: u64,
    poison: impl FnOnce(&mut Framed) -> Vec<u8> + Send + 'static,
) -> (EngineError, bool) {
    let _g = serial();
    let (addr, done, h) = hostile_source(on, poison);
    let dest = Destination::connect(&addr, DestinationConfig::new(key()))
        .unwrap_or_else(|e| panic!("connect: {}", error_chain(&e)));
    let progress = dest.progress();
    let started = Instant::now();
    let err = dest
        .run()
        .expect_err("a hostile frame must stop the destination");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it must stop promptly, not after {:?}: {err:?}",
        started.elapsed()
    );
    let _ = done.send(());
    h.join()
        .unwrap_or_else(|_| panic!("the hostile source panicked"));
    (err, progress.is_present(probe))
}

fn pages(
    region: u32,
    kind: PageKind,
    first_page: u64,
    count: u32,
    payload_len: u32,
) -> PagesHeader {
    PagesHeader {
        region,
        kind,
        pad_len: 0,
        first_page,
        count,
        payload_len,
        request_id: 0,
    }
}

#[test]
fn pages_outside_the_region_are_refused() {
    let (err, _) = expect_failure(On::Bulk, 1020, |f| {
        sealed_pages(f, &pages(1, PageKind::Zero, 1020, 8, 0), &[])
    });
    assert!(
        matches!(
            err,
            EngineError::PageOutOfRange {
                lane,
                region: 1,
                page: 1020,
                count: 8,
                region_pages: 1024,
            } if lane == LaneId::bulk(1)
        ),
        "{err:?}"
    );
}

#[test]
fn an_unknown_region_is_refused() {
    let (err, _) = expect_failure(On::Bulk, 0, |f| {
        sealed_pages(f, &pages(9, PageKind::Data, 0, 1, 4096), &[7; 4096])
    });
    assert!(
        matches!(
            err,
            EngineError::UnknownRegion { lane, region: 9 } if lane == LaneId::bulk(1)
        ),
        "{err:?}"
    );
}

#[test]
fn a_wrong_payload_length_is_refused() {
    let (err, present) = expect_failure(On::Bulk, 0, |f| {
        sealed_pages(f, &pages(1, PageKind::Data, 0, 2, 4096), &[7; 4096])
    });
    assert!(
        matches!(
            err,
            EngineError::Decode {
                source: DecodeError::PayloadLength {
                    expected: 8192,
                    got: 4096
                },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!present, "nothing of a refused frame is installed");
}

#[test]
fn garbage_is_refused() {
    let (err, _) = expect_failure(On::Bulk, 0, |_| vec![0xff; 64]);
    assert!(
        matches!(
            err,
            EngineError::Decode {
                source: DecodeError::UnknownKind(0xffff),
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn an_altered_page_fails_its_tag_and_is_not_installed() {
    let (err, present) = expect_failure(On::Bulk, 5, |f| {
        let mut frame = sealed_pages(f, &pages(1, PageKind::Data, 5, 1, 4096), &[7; PAGE]);
        // Changed on the path, after the source sealed it.
        frame[40 + 100] ^= 1;
        frame
    });
    assert!(
        matches!(
            err,
            EngineError::Integrity {
                lane,
                source: SealError::BadTag { seq: 1 },
            } if lane == LaneId::bulk(1)
        ),
        "{err:?}"
    );
    assert!(!present, "a page whose tag failed must not be installed");
}

#[test]
fn a_complete_ack_out_of_turn_is_refused() {
    let (err, _) = expect_failure(On::Demand, 0, |f| {
        let mut frame = Message::CompleteAck.to_vec();
        seal_control(&mut f.sealer, &mut frame, f.lane).unwrap_or_else(|e| panic!("seal: {e}"));
        frame
    });
    assert!(
        matches!(
            err,
            EngineError::Unexpected {
                lane: LaneId::DEMAND,
                kind: MsgKind::CompleteAck,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_vanished_source_leaves_faulting_threads_waiting() {
    let _g = serial();
    let spec = VmSpec::dense(256 * MIB, 11);
    let mut src = SourceChild::spawn("source_child", &spec, KEY_A);
    let mut cfg = DestinationConfig::new(key());
    cfg.resume_timeout = Duration::from_secs(2);
    cfg.connect_patience = Duration::from_millis(500);
    let dest = Destination::connect(&src.addr, cfg)
        .unwrap_or_else(|e| panic!("connect: {}", error_chain(&e)));
    let mem = dest.memory().expect("own memory");
    let progress = dest.progress();
    // The source dies before a bulk lane opened: nearly every page is missing.
    src.kill();
    let started = Instant::now();
    let err = dest.run().expect_err("the source vanished");
    let took = started.elapsed();
    assert!(
        matches!(err, EngineError::ResumeTimeout { waited_s } if waited_s >= 1.9),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");
    let missing = (0..progress.total())
        .rev()
        .find(|&p| !progress.is_present(p))
        .expect("some page must still be missing");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let off = usize::try_from(missing).unwrap_or(usize::MAX) * PAGE + 64;
        let v = mem.regions()[0].load_u64(off);
        let _ = tx.send(v.map_err(|e| e.to_string()));
    });
    let got = rx.recv_timeout(Duration::from_millis(500));
    assert!(
        got.is_err(),
        "a vCPU touching a page that never arrived must wait, not read {got:?}"
    );
    let (ok, line) = src.finish();
    assert!(!ok, "the source was killed: {line}");
}

/// A source that, once the link is lost, answers the destination's resume
/// with a layout other than the session's: guest memory is already laid out,
/// so the destination must refuse it and stop, not install by the new one.
#[test]
fn resume_with_another_layout_is_refused() {
    let _g = serial();
    let listener = PeerAddr::parse("tcp:127.0.0.1:0")
        .and_then(|a| a.listen())
        .unwrap_or_else(|e| panic!("listen: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        let accept = |layout: &Layout| {
            let s = listener.accept().unwrap_or_else(|e| panic!("accept: {e}"));
            source_handshake(
                s,
                &key(),
                layout,
                Protection::Mac,
                Duration::from_secs(10),
                0,
                |_| Ok(()),
            )
            .unwrap_or_else(|e| panic!("handshake: {}", error_chain(&e)))
        };
        // The session begins on the 4 MiB layout, demand lane and one bulk
        // lane; then both connections drop (a lost link).
        let first: Vec<_> = (0..2).map(|_| accept(&layout())).collect();
        drop(first);
        // The resume's demand lane is welcomed with an 8 MiB region.
        let mut other = layout();
        other.regions[0].size *= 2;
        let resumed = accept(&other);
        let _ = done_rx.recv_timeout(Duration::from_secs(20));
        drop(resumed);
    });
    let mut cfg = DestinationConfig::new(key());
    cfg.resume_timeout = Duration::from_secs(10);
    let dest =
        Destination::connect(&addr, cfg).unwrap_or_else(|e| panic!("connect: {}", error_chain(&e)));
    let started = Instant::now();
    let err = dest
        .run()
        .expect_err("a resume with another layout must fail");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "it must stop at the resumed Welcome, not at the resume timeout: {err:?}"
    );
    assert!(
        matches!(&err, EngineError::LayoutMismatch(m) if m.contains("resuming")),
        "{err:?}"
    );
    let _ = done_tx.send(());
    h.join()
        .unwrap_or_else(|_| panic!("the hostile source panicked"));
}
