//! A hostile or vanished source: the destination stops with a clear error, never
//! writes outside guest memory, never hangs, and never lets a vCPU read a page that
//! did not arrive.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use ringfault_engine::addr::PeerAddr;
use ringfault_engine::handshake::source_handshake;
use ringfault_engine::{Destination, DestinationConfig, EngineError};
use ringfault_proto::auth::PresharedKey;
use ringfault_proto::{
    encode_pages_frame, DecodeError, Layout, PageKind, PageSize, PagesHeader, RegionDesc,
};

const MIB: usize = 1 << 20;

#[test]
fn source_child() {
    source_child_main();
}

fn layout() -> Layout {
    Layout {
        regions: vec![RegionDesc {
            id: 1,
            page_size: PageSize::Size4K,
            size: 4 * MIB as u64,
        }],
    }
}

/// A fake source that authenticates every connection, then sends `poison` on the
/// first bulk lane.
fn hostile_source(poison: Vec<u8>) -> (PeerAddr, std::thread::JoinHandle<()>) {
    let listener = PeerAddr::parse("tcp:127.0.0.1:0")
        .unwrap()
        .listen()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let key = PresharedKey::new(KEY_A.to_vec()).unwrap();
        let mut kept = Vec::new();
        for i in 0..2 {
            let mut s = listener.accept().unwrap();
            source_handshake(&mut s, &key, &layout(), |_| Ok(())).unwrap();
            if i == 1 {
                let _ = s.write_all(&poison);
            }
            kept.push(s);
        }
        std::thread::sleep(Duration::from_secs(2));
    });
    (addr, h)
}

fn expect_failure(poison: Vec<u8>) -> EngineError {
    let _g = serial();
    let (addr, h) = hostile_source(poison);
    let cfg = DestinationConfig::new(PresharedKey::new(KEY_A.to_vec()).unwrap());
    let dest = Destination::connect(&addr, cfg).unwrap();
    let started = Instant::now();
    let err = dest
        .run()
        .expect_err("a hostile frame must stop the destination");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it must stop promptly"
    );
    h.join().unwrap();
    err
}

#[test]
fn pages_outside_the_region_are_refused() {
    let frame = encode_pages_frame(&PagesHeader {
        region: 1,
        kind: PageKind::Zero,
        first_page: 1020,
        count: 8,
        payload_len: 0,
        request_id: 0,
    });
    let err = expect_failure(frame.to_vec());
    assert!(
        matches!(
            err,
            EngineError::Decode(DecodeError::PageOutOfRange {
                region: 1,
                page: 1020,
                count: 8,
                region_pages: 1024
            })
        ),
        "{err:?}"
    );
}

#[test]
fn an_unknown_region_is_refused() {
    let frame = encode_pages_frame(&PagesHeader {
        region: 9,
        kind: PageKind::Data,
        first_page: 0,
        count: 1,
        payload_len: 4096,
        request_id: 0,
    });
    let err = expect_failure(frame.to_vec());
    assert!(
        matches!(
            err,
            EngineError::Decode(DecodeError::UnknownRegion { region: 9 })
        ),
        "{err:?}"
    );
}

#[test]
fn a_wrong_payload_length_is_refused() {
    let frame = encode_pages_frame(&PagesHeader {
        region: 1,
        kind: PageKind::Data,
        first_page: 0,
        count: 2,
        payload_len: 4096,
        request_id: 0,
    });
    let err = expect_failure(frame.to_vec());
    assert!(matches!(err, EngineError::Decode(_)), "{err:?}");
}

#[test]
fn garbage_is_refused() {
    let err = expect_failure(vec![0xff; 64]);
    assert!(matches!(err, EngineError::Decode(_)), "{err:?}");
}

#[test]
fn a_vanished_source_leaves_faulting_threads_waiting() {
    let _g = serial();
    let spec = VmSpec {
        seed: 11,
        region_sizes: vec![256 * MIB],
        populated_permille: 1000,
    };
    let mut src = SourceChild::spawn("source_child", &spec, KEY_A);
    let mut cfg = DestinationConfig::new(PresharedKey::new(KEY_A.to_vec()).unwrap());
    // Slow the bulk lane down so that pages are still missing when the source dies.
    cfg.recv_buffer = 64 * 1024;
    let dest = Destination::connect(&src.addr, cfg).unwrap();
    let areas = dest.regions();
    let progress = dest.progress();
    src.child.kill().unwrap();
    let err = dest.run().expect_err("the source vanished");
    assert!(
        matches!(
            err,
            EngineError::ConnectionLost { .. } | EngineError::Io { .. }
        ),
        "{err:?}"
    );
    let missing = (0..progress.total())
        .rev()
        .find(|&p| !progress.is_present(p))
        .expect("some page must still be missing");
    let area = areas[0];
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let v = area
            .read_u64(usize::try_from(missing).unwrap() * PAGE + 64)
            .unwrap();
        let _ = tx.send(v);
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "a vCPU touching a page that never arrived must wait, not read zeros"
    );
    let _ = src.finish();
}
