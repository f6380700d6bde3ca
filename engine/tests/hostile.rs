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

use ringfault_engine::addr::Listener;
use ringfault_engine::destination::remote::Link;
use ringfault_engine::error::LaneId;
use ringfault_engine::handshake::source_handshake;
use ringfault_engine::wire::{seal_control, Framed};
use ringfault_engine::{Cipher, Destination, DestinationConfig, EngineError, PeerAddr, Protection};
use ringfault_proto::auth::PresharedKey;
use ringfault_proto::{
    encode_pages_head, Complete, DecodeError, DemandEntry, DemandRequest, Lane, Layout, Message,
    MsgKind, PageKind, PageSize, PagesHeader, RegionDesc, SealError,
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

/// [`sealed_pages`] at byte `pos` of its lane's stream, its payload on a 4
/// KiB boundary of the stream (what a bulk lane asks for,
/// `LANE_ALIGN_PAYLOAD`); `pos` moves past the frame.
fn sealed_aligned_pages(
    framed: &mut Framed,
    h: &PagesHeader,
    payload: &[u8],
    pos: &mut u64,
) -> Vec<u8> {
    let head_len = encode_pages_head(h).len() as u64;
    let pad = (*pos + head_len).next_multiple_of(PAGE as u64) - (*pos + head_len);
    let pad = u16::try_from(pad).unwrap_or_else(|e| panic!("pad: {e}"));
    let h = PagesHeader { pad_len: pad, ..*h };
    let mut head = encode_pages_head(&h).to_vec();
    head.resize(head.len() + usize::from(pad), 0);
    let tag = framed
        .sealer
        .seal(&head, payload)
        .unwrap_or_else(|e| panic!("seal: {e}"));
    let mut out = head;
    out.extend_from_slice(payload);
    out.extend_from_slice(tag.as_ref().map_or(&[][..], |t| &t[..]));
    *pos += out.len() as u64;
    out
}

/// A listener on a free loopback port, and its address.
fn listen() -> (Listener, PeerAddr) {
    let listener = PeerAddr::parse("tcp:127.0.0.1:0")
        .and_then(|a| a.listen())
        .unwrap_or_else(|e| panic!("listen: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"));
    (listener, addr)
}

/// Accepts one connection and completes the source's side of the handshake
/// with the right key, announcing `layout`; the lane, ready for frames.
fn accept_lane(listener: &Listener, layout: &Layout) -> Framed {
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
    .framed
}

/// A source that authenticates the demand lane and one bulk lane with the
/// right key, then writes what `poison` makes on lane `on`, and keeps both
/// connections open until the test is done.
fn hostile_source(
    on: On,
    poison: impl FnOnce(&mut Framed) -> Vec<u8> + Send + 'static,
) -> (PeerAddr, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (listener, addr) = listen();
    let (done_tx, done_rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut lanes: Vec<Framed> = (0..2).map(|_| accept_lane(&listener, &layout())).collect();
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

/// A bulk lane asks for payloads of 64 KiB and more on 4 KiB boundaries of
/// its stream (`LANE_ALIGN_PAYLOAD`), which its payloads are received
/// straight into memory by; one that starts elsewhere is refused, and
/// nothing of it installed.
#[test]
fn a_misaligned_payload_is_refused() {
    let (err, present) = expect_failure(On::Bulk, 0, |f| {
        sealed_pages(
            f,
            &pages(1, PageKind::Data, 0, 16, 16 << 12),
            &[7; 16 * PAGE],
        )
    });
    assert!(
        matches!(err, EngineError::Misaligned { lane, at: 40 } if lane == LaneId::bulk(1)),
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
    let (listener, addr) = listen();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        let accept = |layout: &Layout| accept_lane(&listener, layout);
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

/// A destination's demand lane to the source child `src`, authenticated
/// (MAC, AES-256-GCM) for session `session`, and the layout it announced.
fn demand_lane(src: &SourceChild, session: [u8; 16]) -> (Framed, Layout) {
    let link = Link {
        addr: src.addr.clone(),
        key: key(),
        session,
        protection: Protection::Mac,
        cipher: Cipher::Aes256Gcm,
        bulk_channels: 1,
        moving: false,
        direct: false,
        connect_patience: Duration::from_secs(5),
        verify: false,
    };
    link.open(
        Lane::Demand,
        0,
        false,
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("handshake: {}", error_chain(&e)))
}

/// A destination that sends `Complete` and, in the same write, a `Demand`
/// (which the source refuses after `Complete`). The source must answer with
/// its `CompleteAck` and then the `Error` naming the violation, in that order
/// and each under a valid tag. The `Error` once overtook the queued
/// `CompleteAck` (it was written to the socket at once, with the next
/// sequence number), and a real destination, whose pacing had held a fault
/// back until after `Complete`, reported a failed integrity check instead of
/// the source's reason.
#[test]
fn a_demand_after_complete_is_refused_with_its_reason_in_order() {
    let _g = serial();
    let spec = VmSpec::dense(4 * MIB, 5);
    let src = SourceChild::spawn("source_child", &spec, KEY_A);
    let (mut demand, layout) = demand_lane(&src, [7; 16]);
    let mut bytes = Vec::new();
    for m in [
        Message::Complete(Complete {
            pages_present: layout.total_pages(),
        }),
        Message::Demand(DemandRequest {
            request_id: 1,
            entries: vec![DemandEntry {
                region: layout.regions[0].id,
                page: 0,
                before: 0,
                after: 0,
            }],
        }),
    ] {
        let mut frame = m.to_vec();
        seal_control(&mut demand.sealer, &mut frame, demand.lane)
            .unwrap_or_else(|e| panic!("seal: {e}"));
        bytes.extend_from_slice(&frame);
    }
    demand
        .stream
        .write_all(&bytes)
        .unwrap_or_else(|e| panic!("write: {e}"));
    demand
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("timeout: {e}"));
    // `recv` opens each frame in sequence and turns an `Error` frame into
    // `EngineError::Peer`.
    let mut got = Vec::new();
    let why = loop {
        match demand.recv() {
            Ok(Message::Heartbeat) => {}
            Ok(m) => got.push(m),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(got.as_slice(), [Message::CompleteAck]),
        "{got:?}, then {why}"
    );
    assert!(
        matches!(&why, EngineError::Peer { message, .. } if message.contains("after Complete")),
        "after {got:?}: {}",
        error_chain(&why)
    );
    let (ok, line) = src.finish();
    assert!(!ok, "the source must fail the session: {line}");
}

/// Demand pacing holds a fault back; the bulk lane then brings every page
/// and the destination sends `Complete`. The held-back request must be
/// dropped, not sent when its token comes: the source refuses a `Demand`
/// after `Complete`, which once failed migrations at their very end.
#[test]
fn a_paced_fault_is_not_requested_after_complete() {
    let _g = serial();
    let (listener, addr) = listen();
    let source = std::thread::spawn(move || -> Result<usize, String> {
        let mut lanes: Vec<Framed> = (0..2).map(|_| accept_lane(&listener, &layout())).collect();
        let mut bulk = lanes.pop().ok_or("no bulk lane")?;
        let mut demand = lanes.pop().ok_or("no demand lane")?;
        let next = |d: &mut Framed| loop {
            match d.recv() {
                Ok(Message::Heartbeat) => {}
                other => return other.map_err(|e| error_chain(&e)),
            }
        };
        // The first fault's request; the second fault is held back by the
        // pacer meanwhile. Then every page, on the bulk lane, unasked.
        match next(&mut demand)? {
            Message::Demand(_) => {}
            other => return Err(format!("expected a Demand, got {other:?}")),
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut pos = 0;
        for first in (0..1024u64).step_by(256) {
            let h = pages(1, PageKind::Data, first, 256, 256 << 12);
            let frame = sealed_aligned_pages(&mut bulk, &h, &vec![0x5a; 256 * PAGE], &mut pos);
            bulk.stream
                .write_all(&frame)
                .map_err(|e| format!("bulk write: {e}"))?;
        }
        // Everything after Complete, for longer than the pacing interval.
        let mut late_demands = 0;
        loop {
            match next(&mut demand)? {
                Message::Complete(_) => break,
                Message::Demand(_) => {}
                other => return Err(format!("expected Complete, got {other:?}")),
            }
        }
        demand
            .stream
            .set_read_timeout(Some(Duration::from_millis(700)))
            .map_err(|e| format!("timeout: {e}"))?;
        loop {
            match demand.recv() {
                Ok(Message::Demand(_)) => late_demands += 1,
                Ok(Message::Heartbeat) => {}
                Ok(other) => return Err(format!("unexpected {other:?} after Complete")),
                Err(_) => break,
            }
        }
        // A timed-out read leaves the stream where it was: carry on.
        demand
            .stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| format!("timeout: {e}"))?;
        demand
            .send(&Message::CompleteAck)
            .map_err(|e| error_chain(&e))?;
        match next(&mut demand)? {
            Message::Release => Ok(late_demands),
            other => Err(format!("expected Release, got {other:?}")),
        }
    });
    let mut cfg = DestinationConfig::new(key());
    cfg.demand_interval = Duration::from_millis(300);
    cfg.demand_burst = 1;
    let dest =
        Destination::connect(&addr, cfg).unwrap_or_else(|e| panic!("connect: {}", error_chain(&e)));
    let mem = dest.memory().unwrap_or_else(|| panic!("own memory"));
    let vcpus: Vec<_> = [(10usize, 0u64), (20, 50)]
        .into_iter()
        .map(|(page, delay_ms)| {
            let mem = mem.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay_ms));
                mem.regions()[0].load_u64(page * PAGE)
            })
        })
        .collect();
    dest.run()
        .unwrap_or_else(|e| panic!("the migration must complete: {}", error_chain(&e)));
    for v in vcpus {
        let got = v
            .join()
            .unwrap_or_else(|_| panic!("a vCPU panicked"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, 0x5a5a_5a5a_5a5a_5a5a);
    }
    let late = source
        .join()
        .unwrap_or_else(|_| panic!("the source panicked"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(late, 0, "the destination requested pages after Complete");
}

/// Reads the next frame off a lane, payload included: its message and its
/// payload, tag checked. Heartbeats are skipped.
fn recv_with_payload(f: &mut Framed) -> Result<(Message, Vec<u8>), String> {
    use std::io::Read;
    loop {
        let mut head = vec![0u8; ringfault_proto::FRAME_HEADER_LEN];
        f.stream.read_exact(&mut head).map_err(|e| e.to_string())?;
        let hdr: [u8; ringfault_proto::FRAME_HEADER_LEN] =
            head[..].try_into().map_err(|_| "header length")?;
        let header = ringfault_proto::FrameHeader::parse(&hdr).map_err(|e| e.to_string())?;
        let mut body = vec![0u8; header.body_len_usize()];
        f.stream.read_exact(&mut body).map_err(|e| e.to_string())?;
        head.extend_from_slice(&body);
        let msg = Message::decode(&header, &body).map_err(|e| e.to_string())?;
        let (pad, payload) = match &msg {
            Message::Pages(h) => (usize::from(h.pad_len), h.payload_len as usize),
            _ => (0, 0),
        };
        let mut padding = vec![0u8; pad];
        f.stream
            .read_exact(&mut padding)
            .map_err(|e| e.to_string())?;
        head.extend_from_slice(&padding);
        let mut rest = vec![0u8; payload + f.opener.tag_len()];
        f.stream.read_exact(&mut rest).map_err(|e| e.to_string())?;
        f.opener.open(&head, &mut rest).map_err(|e| e.to_string())?;
        rest.truncate(payload);
        if !matches!(msg, Message::Heartbeat) {
            return Ok((msg, rest));
        }
    }
}

/// A destination that holds no page of a transparent-huge-page range asks for
/// the whole aligned 2 MiB range (a `Demand` entry whose window is exactly
/// the range): the source answers with the whole range in one `Data` frame,
/// which the destination installs as one huge page. For a range some page of
/// which already went out, the source answers with the faulting page alone.
#[test]
fn a_whole_range_demand_is_answered_in_one_frame() {
    let _g = serial();
    let spec = VmSpec::dense(4 * MIB, 6);
    let src = SourceChild::spawn("source_child", &spec, KEY_A);
    let (mut demand, layout) = demand_lane(&src, [9; 16]);
    demand
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("timeout: {e}"));
    let region = layout.regions[0].id;
    let ask = |d: &mut Framed, id: u64, page: u64, before: u16, after: u16| {
        d.send(&Message::Demand(DemandRequest {
            request_id: id,
            entries: vec![DemandEntry {
                region,
                page,
                before,
                after,
            }],
        }))
        .unwrap_or_else(|e| panic!("demand: {}", error_chain(&e)));
    };
    // Page 5 of range 0, asking for all of range 0.
    ask(&mut demand, 1, 5, 5, 506);
    let (m, payload) = recv_with_payload(&mut demand).unwrap_or_else(|e| panic!("reply: {e}"));
    match m {
        Message::Pages(h) => {
            assert_eq!(
                (h.kind, h.first_page, h.count, h.request_id),
                (PageKind::Data, 0, 512, 1),
                "{h:?}"
            );
            assert_eq!(payload.len(), 2 * MIB);
            let mut want = vec![0u8; PAGE];
            for (i, got) in payload.chunks(PAGE).enumerate() {
                spec.fill(0, i as u64, &mut want);
                assert!(
                    got == want,
                    "page {i} of the range differs from the source's"
                );
            }
        }
        other => panic!("expected the whole range, got {other:?}"),
    }
    // Range 1: page p alone first, then a whole-range request from page
    // p + 1: the range is no longer untouched, so only page p + 1 comes.
    let p = (512..1023u64)
        .find(|&p| {
            [p, p + 1]
                .iter()
                .all(|&q| spec.class(0, q) == ringfault_testkit::vm::PageClass::Data)
        })
        .unwrap_or_else(|| panic!("no two data pages in a row"));
    let at = u16::try_from(p + 1 - 512).unwrap_or(0);
    ask(&mut demand, 2, p, 0, 0);
    ask(&mut demand, 3, p + 1, at, 511 - at);
    let mut got = Vec::new();
    while got.len() < 2 {
        match recv_with_payload(&mut demand) {
            Ok((Message::Pages(h), payload)) => {
                assert_eq!(payload.len(), h.count as usize * PAGE);
                let mut want = vec![0u8; PAGE];
                spec.fill(0, h.first_page, &mut want);
                assert!(payload[..PAGE] == want, "page {} differs", h.first_page);
                got.push((h.request_id, h.first_page, h.count));
            }
            other => panic!("expected pages, got {other:?}"),
        }
    }
    assert_eq!(got, vec![(2, p, 1), (3, p + 1, 1)]);
    // The source would keep the session for a resume: stop it.
    drop(demand);
    let mut src = src;
    src.kill();
}
