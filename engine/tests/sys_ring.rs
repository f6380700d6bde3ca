//! io_uring against the real kernel: the opcode probe and its test hook, a
//! stream ring that delivers a byte stream contiguously across its wrap-around,
//! vectored sends from the ring's own buffer and from guest memory, multishot
//! polls, and submission when the queue is full.

// Test code: byte offsets of a few hundred KiB fit every integer type here.
#![allow(clippy::cast_possible_truncation)]

use std::error::Error;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfault_engine::sys::bufring::StreamRing;
use ringfault_engine::sys::guest::{GuestMemory, RegionSpec};
use ringfault_engine::sys::install::Landing;
use ringfault_engine::sys::mapping::MapOptions;
use ringfault_engine::sys::notify::Notifier;
use ringfault_engine::sys::ring::{Event, Op, Opcodes, Piece, Ring, RingError, HIDE_OPCODES_ENV};
use ringfault_engine::{
    Destination, DestinationConfig, EngineError, PeerAddr, Source, SourceConfig,
};
use ringfault_proto::auth::PresharedKey;
use ringfault_testkit::{error_chain, mix, require, skip, ChildProc, KEY_A, PAGE};

type TestResult = Result<(), Box<dyn Error>>;

/// A connected pair of loopback TCP sockets, as the engine's lanes are.
fn tcp_pair() -> Result<(TcpStream, TcpStream), Box<dyn Error>> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    a.set_nodelay(true)?;
    Ok((a, b))
}

/// Byte `at` of the test stream.
fn stream_byte(at: usize) -> u8 {
    (mix(at as u64 / 8) >> ((at % 8) * 8)) as u8
}

/// Submits, waits up to 100 ms, and collects what completed.
fn turn(ring: &mut Ring, out: &mut Vec<Event>) -> Result<(), RingError> {
    ring.submit_and_wait(Some(Duration::from_millis(100)))?;
    ring.events(out)
}

/// Drains the events of the multishot receive `token`: whether it ended and
/// must be re-armed (stopped, or out of buffers), and whether it met the end
/// of the stream. Any other event or error fails the test.
fn receive_events(events: &mut Vec<Event>, token: u32) -> Result<(bool, bool), Box<dyn Error>> {
    let (mut rearm, mut eof) = (false, false);
    for ev in events.drain(..) {
        match ev {
            Event::Received { token: t, .. } if t == token => {}
            Event::ReceiveEnded {
                token: t, result, ..
            } if t == token => match result {
                Ok(false) => rearm = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => rearm = true,
                Ok(true) => eof = true,
                Err(e) => return Err(e.into()),
            },
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    Ok((rearm, eof))
}

// ---------------------------------------------------------------------------
// The opcode probe
// ---------------------------------------------------------------------------

#[test]
fn probe_reports_this_kernel() -> TestResult {
    let o = Opcodes::probe()?;
    for op in [Op::Nop, Op::PollAdd, Op::Read, Op::Send, Op::SendMsg] {
        assert!(o.has(op), "{} is Linux 5.6 or older: {o:?}", op.name());
    }
    assert!(o.require(&[Op::Nop, Op::PollAdd]).is_ok());
    Ok(())
}

const HIDDEN_ENTRY: &str = "hidden_opcode_child";
const HIDDEN_ROLE_ENV: &str = "RF_RING_TEST_CHILD";

/// Runs with `RINGFAULT_HIDE_OPCODES=READ_MULTISHOT`, which the probe reads
/// when it runs: a child process, so that no other test of this binary sees
/// the hidden opcode.
#[test]
#[ignore = "child-process entry point, run by other tests"]
fn hidden_opcode_child() {
    if std::env::var(HIDDEN_ROLE_ENV).is_err() {
        return;
    }
    let o = Opcodes::probe().unwrap_or_else(|e| panic!("probe: {e}"));
    assert!(
        !o.has(Op::ReadMultishot),
        "the hook hides READ_MULTISHOT: {o:?}"
    );
    assert!(o.has(Op::Recv), "and nothing else: {o:?}");
    match Opcodes::require_engine() {
        Err(RingError::Unsupported { opcode, needs }) => {
            assert_eq!((opcode, needs), ("READ_MULTISHOT", "Linux 6.7"));
        }
        other => panic!("the engine's check must name READ_MULTISHOT: {other:?}"),
    }

    // A destination refuses to start, before it connects anywhere.
    let key = || PresharedKey::new(KEY_A.to_vec()).unwrap_or_else(|e| panic!("key: {e}"));
    let mut cfg = DestinationConfig::new(key());
    cfg.connect_patience = Duration::ZERO;
    let nowhere = PeerAddr::parse("tcp:127.0.0.1:9").unwrap_or_else(|e| panic!("{e}"));
    let err = Destination::connect(&nowhere, cfg).expect_err("READ_MULTISHOT is missing");
    assert!(
        matches!(
            err,
            EngineError::Ring(RingError::Unsupported {
                opcode: "READ_MULTISHOT",
                needs: "Linux 6.7"
            })
        ),
        "{err:?}"
    );
    let text = error_chain(&err);
    assert!(
        text.contains("READ_MULTISHOT") && text.contains("Linux 6.7"),
        "the message names the opcode and the kernel: {text}"
    );

    // So does a source.
    let mem = GuestMemory::anonymous(
        &[RegionSpec {
            id: 1,
            size: PAGE,
            page_size: PAGE,
        }],
        MapOptions::default(),
    )
    .unwrap_or_else(|e| panic!("memory: {e}"));
    let source = Source::from_memory(Arc::new(mem), SourceConfig::new(key()))
        .unwrap_or_else(|e| panic!("source: {e}"));
    let listener = PeerAddr::parse("tcp:127.0.0.1:0")
        .and_then(|a| a.listen())
        .unwrap_or_else(|e| panic!("listen: {e}"));
    let serr = source
        .serve(&listener)
        .expect_err("READ_MULTISHOT is missing");
    assert!(
        matches!(
            serr,
            EngineError::Ring(RingError::Unsupported {
                opcode: "READ_MULTISHOT",
                ..
            })
        ),
        "{serr:?}"
    );
    println!("HIDDEN OK {text}");
}

#[test]
fn a_hidden_opcode_is_named_by_the_probe_and_refused_by_both_ends() -> TestResult {
    require!(
        Opcodes::probe()?.has(Op::ReadMultishot),
        "this kernel has no READ_MULTISHOT (needs Linux 6.7), so there is nothing to hide"
    );
    let mut child = ChildProc::reexec(
        HIDDEN_ENTRY,
        &[(HIDDEN_ROLE_ENV, "1"), (HIDE_OPCODES_ENV, "READ_MULTISHOT")],
    );
    let text = child.expect("HIDDEN OK ", Duration::from_secs(30));
    let (status, _) = child.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "the child's checks: {}", child.stderr());
    assert!(text.contains("READ_MULTISHOT"), "{text}");
    // The hook is the child's alone: this process still has the opcode.
    assert!(Opcodes::probe()?.has(Op::ReadMultishot));
    Ok(())
}

// ---------------------------------------------------------------------------
// Stream rings
// ---------------------------------------------------------------------------

/// The destination's bulk worker runs a `DEFER_TASKRUN` ring and, while it
/// has work, enters it without waiting: those entries must still bring
/// completions (deferred work runs only when an entry asks for it, which
/// needs the kernel's pending-work flag), or a busy worker would never see
/// another byte. Every byte arrives, in order, with no waiting entry.
#[test]
fn a_deferred_ring_delivers_receives_to_a_thread_that_never_waits() -> TestResult {
    require!(
        Opcodes::probe()?.has(Op::Recv),
        "no multishot RECV (needs Linux 6.0)"
    );
    let (mut tx, rx) = tcp_pair()?;
    let mut ring = Ring::deferred(16)?;
    let sid = match ring.add_stream(StreamRing::new(4096, 4, false)?) {
        Ok(id) => id,
        Err(RingError::Unsupported { opcode, needs }) => skip!("{opcode} needs {needs}"),
        Err(e) => return Err(e.into()),
    };
    ring.recv_multishot(rx.as_fd(), sid, 3)?;
    let total = 5 * 4096 + 77;
    let sent: Vec<u8> = (0..total).map(stream_byte).collect();
    let writer = std::thread::spawn(move || tx.write_all(&sent));
    let (mut pos, mut events) = (0usize, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while pos < total {
        assert!(
            Instant::now() < deadline,
            "byte {pos} of {total}: a non-waiting entry brought no completion"
        );
        ring.submit()?;
        ring.events(&mut events)?;
        let (rearm, _eof) = receive_events(&mut events, 3)?;
        let s = ring.stream_mut(sid);
        let n = s.available();
        for (i, &b) in s.readable()[..n].iter().enumerate() {
            assert_eq!(b, stream_byte(pos + i), "byte {}", pos + i);
        }
        s.consume(n);
        pos += n;
        if rearm && pos < total {
            ring.recv_multishot(rx.as_fd(), sid, 3)?;
        }
        std::thread::yield_now();
    }
    writer.join().map_err(|_| "writer panicked")??;
    Ok(())
}

#[test]
fn a_stream_ring_delivers_bytes_contiguously_across_its_wrap() -> TestResult {
    require!(
        Opcodes::probe()?.has(Op::Recv),
        "no multishot RECV (needs Linux 6.0)"
    );
    let (mut tx, rx) = tcp_pair()?;
    let mut ring = Ring::new(64)?;
    // Four 4 KiB segments, mirrored: 16 KiB of ring.
    let sr = StreamRing::new(4096, 4, false)?;
    assert!(sr.mirrored());
    let size = sr.size();
    let sid = match ring.add_stream(sr) {
        Ok(id) => id,
        Err(RingError::Unsupported { opcode, needs }) => skip!("{opcode} needs {needs}"),
        Err(e) => return Err(e.into()),
    };
    ring.recv_multishot(rx.as_fd(), sid, 7)?;
    // More than twice the ring, in odd-sized writes.
    let total = 7 * size + 1237;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut at, mut k) = (0usize, 0u64);
        while at < total {
            k = mix(k + 1);
            let n = (1 + (k % 3001) as usize).min(total - at);
            let chunk: Vec<u8> = (at..at + n).map(stream_byte).collect();
            tx.write_all(&chunk)?;
            at += n;
        }
        Ok(())
    });
    // The consumer takes odd-sized bites (a frame at a time: it waits until a
    // whole bite is there), so that bites straddle the wrap at positions that
    // do not depend on how the kernel split the stream. None is larger than a
    // segment plus one byte, so that at least two segments stay posted.
    let bites = [1usize, 7, 4095, 4096, 4097, 1000, 13];
    let (mut pos, mut nbite, mut straddled) = (0usize, 0usize, 0usize);
    let (mut rearms, mut eof) = (0, false);
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pos < total {
        assert!(
            Instant::now() < deadline,
            "stalled at byte {pos} of {total}"
        );
        turn(&mut ring, &mut events)?;
        let (rearm, ended) = receive_events(&mut events, 7)?;
        eof |= ended;
        let s = ring.stream_mut(sid);
        while s.available() >= bites[nbite % bites.len()] || (eof && s.available() > 0) {
            assert_eq!(s.position(), pos as u64);
            let avail = s.available();
            let bytes = s.readable();
            assert_eq!(bytes.len(), avail, "a mirrored ring is contiguous");
            let bite = avail.min(bites[nbite % bites.len()]);
            nbite += 1;
            for (i, &b) in bytes[..bite].iter().enumerate() {
                if b != stream_byte(pos + i) {
                    return Err(format!(
                        "byte {} is {b:#x}, the stream has {:#x}",
                        pos + i,
                        stream_byte(pos + i)
                    )
                    .into());
                }
            }
            if pos % size + bite > size {
                straddled += 1;
            }
            s.consume(bite);
            pos += bite;
        }
        if eof && pos < total {
            return Err(format!("end of stream at byte {pos} of {total}").into());
        }
        // The consumer keeps up: receives stay posted ahead of it.
        assert!(
            s.in_flight() >= 2,
            "{} receive buffers posted after consuming",
            s.in_flight()
        );
        if rearm {
            rearms += 1;
            ring.recv_multishot(rx.as_fd(), sid, 7)?;
        }
    }
    writer.join().map_err(|_| "writer panicked")??;
    assert!(straddled > 0, "some bites crossed the wrap");
    eprintln!("{total} bytes through a {size}-byte ring; {straddled} reads across the wrap, {rearms} re-arms");
    Ok(())
}

#[test]
fn vectored_sends_join_own_bytes_and_guest_memory_in_order() -> TestResult {
    let (a, mut b) = tcp_pair()?;
    let mem = GuestMemory::anonymous(
        &[
            RegionSpec {
                id: 1,
                size: 4 * PAGE,
                page_size: PAGE,
            },
            RegionSpec {
                id: 2,
                size: 2 * PAGE,
                page_size: PAGE,
            },
        ],
        MapOptions::default(),
    )?;
    for (ri, r) in mem.regions().iter().enumerate() {
        let bytes: Vec<u8> = (0..r.len())
            .map(|i| stream_byte(i + ri * 100_000))
            .collect();
        r.write(0, &bytes)?;
    }
    let mem = Arc::new(mem);
    let own = b"HEADER-A|trailer|".to_vec();
    let pieces = [
        Piece::Own { start: 0, end: 9 },
        Piece::Guest {
            region: 0,
            offset: 100,
            len: 5000,
        },
        Piece::Own { start: 9, end: 17 },
        Piece::Guest {
            region: 1,
            offset: PAGE,
            len: PAGE,
        },
    ];
    let mut want = own[..9].to_vec();
    want.extend((100..5100).map(stream_byte));
    want.extend_from_slice(&own[9..17]);
    want.extend((PAGE..2 * PAGE).map(|i| stream_byte(i + 100_000)));

    let mut ring = Ring::new(8)?;
    ring.send_vectored(a.as_fd(), Some(&mem), own.clone(), &pieces, 9)?;
    let expected = want.len();
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let mut got = vec![0u8; expected];
        b.read_exact(&mut got)?;
        Ok(got)
    });
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let sent = loop {
        assert!(Instant::now() < deadline, "the send never completed");
        turn(&mut ring, &mut events)?;
        if let Some(Event::Sent { token, result, buf }) = events.pop() {
            assert_eq!(token, 9);
            assert_eq!(buf, own, "the buffer comes back for reuse");
            break result?;
        }
    };
    assert_eq!(sent, want.len());
    let got = reader.join().map_err(|_| "reader panicked")??;
    assert!(got == want, "the bytes arrive in piece order");

    // Pieces outside their buffers are refused before anything is sent.
    for bad in [
        Piece::Own { start: 10, end: 18 },
        Piece::Guest {
            region: 1,
            offset: PAGE + 1,
            len: PAGE,
        },
        Piece::Guest {
            region: 2,
            offset: 0,
            len: 1,
        },
    ] {
        let r = ring.send_vectored(a.as_fd(), Some(&mem), own.clone(), &[bad], 10);
        assert!(matches!(r, Err(RingError::BadPiece)), "{bad:?}: {r:?}");
    }
    let no_mem = ring.send_vectored(a.as_fd(), None, own.clone(), &pieces, 10);
    assert!(matches!(no_mem, Err(RingError::BadPiece)), "{no_mem:?}");
    assert_eq!(ring.in_flight(), 0);
    Ok(())
}

#[test]
fn sends_beyond_the_queue_size_are_submitted_as_they_queue() -> TestResult {
    let (a, mut b) = tcp_pair()?;
    // Four submission entries, seven sends: queuing the fifth submits first.
    let mut ring = Ring::new(4)?;
    for i in 0..7u32 {
        ring.send(a.as_fd(), vec![b'a' + i as u8; 3], i)?;
    }
    let mut done = Vec::new();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.len() < 7 {
        assert!(Instant::now() < deadline, "sends done: {done:?}");
        turn(&mut ring, &mut events)?;
        for ev in events.drain(..) {
            match ev {
                Event::Sent { token, result, .. } => {
                    assert_eq!(result?, 3);
                    done.push(token);
                }
                other => return Err(format!("unexpected {other:?}").into()),
            }
        }
    }
    done.sort_unstable();
    assert_eq!(done, (0..7).collect::<Vec<_>>());
    let mut got = [0u8; 21];
    b.read_exact(&mut got)?;
    let mut letters = got.to_vec();
    letters.sort_unstable();
    let want: Vec<u8> = (0..7u8).flat_map(|i| [b'a' + i; 3]).collect();
    assert_eq!(letters, want);
    Ok(())
}

#[test]
fn a_multishot_poll_reports_each_readiness() -> TestResult {
    let mut ring = Ring::new(4)?;
    let efd = Notifier::new()?;
    ring.poll_multishot(efd.as_fd(), 3)?;
    let mut events = Vec::new();
    turn(&mut ring, &mut events)?;
    assert!(events.is_empty(), "not readable yet: {events:?}");
    for round in 0..2 {
        efd.notify();
        let deadline = Instant::now() + Duration::from_secs(5);
        while events.is_empty() {
            assert!(Instant::now() < deadline, "no poll event in round {round}");
            turn(&mut ring, &mut events)?;
        }
        match events.pop() {
            Some(Event::Polled {
                token: 3,
                result: Ok(true),
            }) => {}
            other => return Err(format!("round {round}: {other:?}").into()),
        }
        assert!(efd.drain(), "the counter was set");
        events.clear();
    }
    assert_eq!(ring.in_flight(), 1, "the multishot poll stays armed");
    Ok(())
}

/// The next completion of `ring`, taken from `events` (refilled by a turn
/// when empty, for up to 10 s): it must be the end of receive `token` into a
/// landing; its byte count and the landing.
fn next_landed(
    ring: &mut Ring,
    events: &mut Vec<Event>,
    token: u32,
) -> Result<(usize, Landing), Box<dyn Error>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while events.is_empty() {
        if Instant::now() > deadline {
            return Err(format!("no completion of receive {token}").into());
        }
        turn(ring, events)?;
    }
    match events.remove(0) {
        Event::Landed {
            token: t,
            result,
            land,
        } if t == token => Ok((result?, land)),
        other => Err(format!("expected receive {token} to end, got {other:?}").into()),
    }
}

/// Receives straight into landings: a 2 MiB `MSG_WAITALL` receive into a
/// huge landing, linked to a block receive queued in the same submission,
/// fill their landings in stream order even though the sender writes the
/// bytes in small pieces, with a pause; a receive without `MSG_WAITALL`
/// stops at its length, never taking the bytes after it; each landing comes
/// back with its bytes; the end of the stream gives 0.
#[test]
fn landed_receives_fill_their_landings_in_order() -> TestResult {
    let (tx, rx) = tcp_pair()?;
    let huge = Landing::HUGE;
    let total = 4096 + huge + 100;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut tx = tx;
        let bytes: Vec<u8> = (0..total).map(stream_byte).collect();
        // A pause after the first 1000 bytes: the first block receive
        // (up to 4096 bytes, no MSG_WAITALL) may end short there.
        tx.write_all(&bytes[..1000])?;
        std::thread::sleep(Duration::from_millis(50));
        for chunk in bytes[1000..].chunks(48 << 10) {
            tx.write_all(chunk)?;
        }
        Ok(())
    });
    let mut ring = Ring::new(8)?;
    let mut events = Vec::new();
    let mut got: Vec<u8> = Vec::new();
    // The first block, up to 4096 bytes, until all of it is in.
    let mut block = Landing::flat(4096)?;
    while got.len() < 4096 {
        ring.recv_into(rx.as_fd(), block, 0, 4096 - got.len(), 1, false, false)?;
        let (n, b) = next_landed(&mut ring, &mut events, 1)?;
        assert!(
            n > 0 && got.len() + n <= 4096,
            "{n} bytes after {}",
            got.len()
        );
        got.extend_from_slice(&b.as_slice()[..n]);
        block = b;
    }
    // The payload and the block after it, linked, in one submission: the
    // payload's completion comes first, whole.
    ring.recv_into(rx.as_fd(), Landing::huge()?, 0, huge, 2, true, true)?;
    ring.recv_into(rx.as_fd(), block, 0, 4096, 3, false, false)?;
    let (n, payload) = next_landed(&mut ring, &mut events, 2)?;
    assert_eq!(n, huge, "a MSG_WAITALL receive is whole");
    assert!(payload.is_huge());
    let (mut tail, mut block) = next_landed(&mut ring, &mut events, 3)?;
    assert!(tail > 0 && tail <= 100, "{tail} bytes after the payload");
    got.extend_from_slice(&block.as_slice()[..tail]);
    writer.join().map_err(|_| "writer panicked")??;
    let first_bad = payload.as_slice()[..huge]
        .iter()
        .enumerate()
        .position(|(i, &b)| b != stream_byte(4096 + i));
    assert_eq!(first_bad, None, "payload bytes differ from the stream's");
    // The rest of the 100 bytes, then the end of the stream.
    loop {
        ring.recv_into(rx.as_fd(), block, 0, 4096, 4, false, false)?;
        let (n, b) = next_landed(&mut ring, &mut events, 4)?;
        got.extend_from_slice(&b.as_slice()[..n]);
        block = b;
        if n == 0 {
            break;
        }
        tail += n;
    }
    assert_eq!(tail, 100, "the bytes after the payload");
    let want: Vec<u8> = (0..4096)
        .chain(4096 + huge..total)
        .map(stream_byte)
        .collect();
    assert!(got == want, "block bytes differ from the stream's");
    Ok(())
}
