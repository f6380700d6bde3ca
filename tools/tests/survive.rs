//! `ringfault serve` can't be knocked over: the real binary, serving a memory
//! file, gets 200 bare connects, a client that stays silent, garbage, a
//! health check and a destination with the wrong key, and then serves a
//! legitimate destination (while the silent client is still connected) to
//! the end, where every byte of its memory is compared with the file.

// Test code: page indexes and offsets fit in usize on 64-bit Linux.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use ringfault_engine::{Destination, DestinationConfig, EngineError, PeerAddr};
use ringfault_proto::auth::PresharedKey;
use ringfault_testkit::memfile::{file_page, write_memory_file};
use ringfault_testkit::{error_chain, serial, ChildProc, TestDir, KEY_A, KEY_B, MIB, PAGE};

const SEED: u64 = 17;
const SIZE: usize = 32 * MIB;

fn key(k: &[u8]) -> PresharedKey {
    PresharedKey::new(k.to_vec()).unwrap_or_else(|e| panic!("key: {e}"))
}

/// Reads from `s` until the source closes it (or `limit` passes); returns
/// the bytes and whether it was closed.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
    }
}

#[test]
fn serve_survives_bare_connects_silence_garbage_and_a_wrong_key() {
    let _g = serial();
    let dir = TestDir::new("survive");
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, SEED, SIZE));
    let keyfile = dir.path("key");
    std::fs::write(&keyfile, KEY_A).unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringfault"));
    cmd.args(["serve", "--listen", "tcp:127.0.0.1:0", "--memory-file"])
        .arg(&mem)
        .arg("--key-file")
        .arg(&keyfile)
        .env("RINGFAULT_LOG", "info");
    let mut serve = ChildProc::spawn(cmd);
    let addr = serve.expect("listening on ", Duration::from_secs(30));
    let sock = addr
        .strip_prefix("tcp:")
        .unwrap_or_else(|| panic!("{addr}"))
        .to_owned();
    let alive = |serve: &mut ChildProc, after: &str| {
        assert!(
            serve.try_exit().is_none(),
            "serve died after {after}: {}",
            serve.stderr()
        );
    };

    // 200 bare connects: connect and close, as a port scan or a TCP health
    // check does.
    for i in 0..200 {
        let s = TcpStream::connect(&sock).unwrap_or_else(|e| panic!("bare connect {i}: {e}"));
        drop(s);
    }
    alive(&mut serve, "200 bare connects");

    // A silent client: connects and never says a word. It stays connected
    // through everything below, including the legitimate migration, so a
    // handshake that waited for it would stall the session.
    let silent = TcpStream::connect(&sock).unwrap_or_else(|e| panic!("silent client: {e}"));
    let silent_since = Instant::now();

    // Garbage, then an HTTP health check: each is answered at most with an
    // Error frame and closed.
    for junk in [
        {
            let mut b = vec![0u8; 4096];
            ringfault_testkit::fill_pseudo_random(99, &mut b);
            b
        },
        b"GET /healthz HTTP/1.1\r\nHost: source\r\n\r\n".to_vec(),
    ] {
        let mut s = TcpStream::connect(&sock).unwrap_or_else(|e| panic!("{e}"));
        let _ = s.write_all(&junk);
        let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5));
        assert!(closed, "the source must close a connection that sent junk");
    }
    alive(&mut serve, "garbage");

    // A destination with the wrong key: refused, nothing of the layout seen.
    let wrong = Destination::connect(
        &PeerAddr::parse(&addr).unwrap_or_else(|e| panic!("{e}")),
        DestinationConfig::new(key(KEY_B)),
    );
    let err = wrong
        .err()
        .unwrap_or_else(|| panic!("a wrong key must be refused"));
    assert!(matches!(err, EngineError::Auth(_)), "{err:?}");
    alive(&mut serve, "a wrong key");

    // The legitimate destination, while the silent client still holds its
    // connection open (well within the 10 s handshake deadline).
    let mut cfg = DestinationConfig::new(key(KEY_A));
    cfg.bulk_channels = 2;
    let dest = Destination::connect(
        &PeerAddr::parse(&addr).unwrap_or_else(|e| panic!("{e}")),
        cfg,
    )
    .unwrap_or_else(|e| panic!("the legitimate destination: {}", error_chain(&e)));
    assert!(
        silent_since.elapsed() < Duration::from_secs(8),
        "the legitimate handshake must not wait for the silent client"
    );
    let memory = dest.memory().unwrap_or_else(|| panic!("own memory"));
    let report = dest
        .run()
        .unwrap_or_else(|e| panic!("the migration: {}", error_chain(&e)));
    assert_eq!(report.pages_total, (SIZE / PAGE) as u64);

    // Every byte is the file's.
    let r = &memory.regions()[0];
    let (mut want, mut got) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    let mut bad = Vec::new();
    for p in 0..r.pages() {
        file_page(SEED, p, &mut want);
        r.read(p as usize * PAGE, &mut got)
            .unwrap_or_else(|e| panic!("page {p}: {e}"));
        if got != want && bad.len() < 10 {
            bad.push(p);
        }
    }
    assert!(bad.is_empty(), "pages differ from the file: {bad:?}");
    // The source's session is over; the silent client goes too (its
    // handshake would otherwise end at its deadline).
    drop(silent);

    serve.expect("done: ", Duration::from_secs(30));
    let (status, _) = serve.wait_exit(Duration::from_secs(10));
    let log = serve.stderr();
    assert!(status.success(), "{status:?}: {log}");
    // Each intruder was logged and dropped.
    assert!(log.contains("refused a connection"), "{log}");
    assert!(log.contains("authentication"), "{log}");
    eprintln!("{log}");
}
