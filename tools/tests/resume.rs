//! Resume after a lost link, with the real binaries in two network namespaces
//! joined by a veth link (`ringfault_testkit::netns`), shaped with `tc` so
//! that a migration lasts long enough to be cut:
//!
//! - `ringfault serve --memory-file` in one namespace and `ringfault
//!   uffd-handler --from` in the other, with this test playing Firecracker
//!   (its "vCPUs" read every page and compare it with the file). The link is
//!   cut with `ip link set DEV down` at a random point of the migration, on a
//!   random end, for longer than the liveness timeout, ten times: each time
//!   both ends notice, the handler reconnects, the session resumes and the
//!   guest ends byte-exact;
//! - `ringfault serve --synthetic` and `ringfault receive`, with the link cut
//!   for longer than `--resume-timeout`: both ends give up with a clear error
//!   and a nonzero exit status.
//!
//! Without root or iproute2 the tests say why they skip (`SKIPPED ...`).

// Test code: page indexes and offsets fit in usize on 64-bit Linux.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringfault_testkit::memfile::{file_page, write_memory_file};
use ringfault_testkit::netns::{End, NetPair};
use ringfault_testkit::{mix, require, serial, skip, wait_for, ChildProc, FakeVmm, TestDir, MIB};

const BIN: &str = env!("CARGO_BIN_EXE_ringfault");
const SEED: u64 = 23;
/// Guest memory of the cut test: with one page in eight a hole, 28 MiB of
/// data, which the link's rate stretches to about 3 s.
const SIZE: usize = 32 * MIB;
const RATE: &str = "80mbit";
/// Both ends declare a lane dead after this long without a byte.
const LIVENESS: &str = "1s";

fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", p.display()))
}

/// The namespaces with a shaped link, or why they cannot be made here.
fn shaped_pair() -> Result<NetPair, String> {
    if let Some(why) = NetPair::unavailable() {
        return Err(why);
    }
    let pair = NetPair::create().map_err(|e| format!("cannot make network namespaces: {e}"))?;
    pair.rate_limit(RATE)
        .map_err(|e| format!("cannot shape the link with tc: {e}"))?;
    Ok(pair)
}

/// The seed of the random cut points: `RF_CUT_SEED`, or the clock.
fn cut_seed() -> u64 {
    std::env::var("RF_CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// `ringfault serve` inside the source's namespace, listening on its address.
fn serve_in(net: &NetPair, args: &[&str]) -> (ChildProc, String) {
    let mut cmd = net.command(End::Source, BIN);
    cmd.args([
        "serve",
        "--listen",
        &format!("tcp:{}:0", NetPair::SOURCE_IP),
    ])
    .args(args)
    // The switch-over is logged at info.
    .env("RINGFAULT_LOG", "info");
    let mut serve = ChildProc::spawn(cmd);
    let addr = serve.expect("listening on ", Duration::from_secs(30));
    (serve, addr)
}

/// The session's pre-shared key, written to `dir`; its path.
fn write_key(dir: &TestDir) -> PathBuf {
    let key = dir.path("key");
    std::fs::write(&key, "resume-test-key-0123456789abcdef\n").unwrap_or_else(|e| panic!("{e}"));
    key
}

/// `ringfault receive --from ADDR --threads THREADS ARGS` inside the
/// destination's namespace.
fn receive_in(net: &NetPair, addr: &str, threads: &str, args: &[&str]) -> ChildProc {
    let mut cmd = net.command(End::Destination, BIN);
    cmd.args(["receive", "--from", addr, "--threads", threads])
        .args(args);
    ChildProc::spawn(cmd)
}

/// The number in serve's `done: ... (N resumes)` line.
fn resumes_in(done: &str) -> u64 {
    done.rsplit_once('(')
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume count in {done:?}"))
}

#[test]
fn resume_after_ten_link_cuts_at_random_points_is_byte_exact() {
    let _g = serial();
    let net = shaped_pair();
    require!(
        net.is_ok(),
        "{}",
        net.as_ref().err().cloned().unwrap_or_default()
    );
    let net = net.unwrap_or_else(|e| panic!("{e}"));
    let dir = TestDir::new("resume-cuts");
    let mem = dir.path("mem");
    drop(write_memory_file(&mem, SEED, SIZE));
    let key = write_key(&dir);
    let seed = cut_seed();
    eprintln!("cut points from RF_CUT_SEED={seed}");
    let mut x = seed;
    let mut next = |bound: u64| {
        x = mix(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
        x % bound
    };
    let started = Instant::now();
    for i in 0..10 {
        // Where the cut lands (from the switch-over; the transfer takes about
        // 3 s), how long the link stays down (more than the 1 s liveness
        // timeout, so that both ends declare it dead and a resume is needed),
        // and which end goes down.
        let at = Duration::from_millis(50 + next(1900));
        let down_for = Duration::from_millis(2000 + next(1000));
        let end = if next(2) == 0 {
            End::Source
        } else {
            End::Destination
        };
        let what = format!(
            "cut {i}: {} down {at:?} after the switch-over, for {down_for:?}",
            NetPair::device(end)
        );
        eprintln!("{what}");

        let (mut serve, addr) = serve_in(
            &net,
            &[
                "--memory-file",
                path_str(&mem),
                "--key-file",
                path_str(&key),
                "--liveness",
                LIVENESS,
                "--resume-timeout",
                "60s",
            ],
        );
        let sock = dir.path(&format!("fc{i}.sock"));
        let mut cmd = net.command(End::Destination, BIN);
        cmd.args([
            "uffd-handler",
            "--socket",
            path_str(&sock),
            "--from",
            &addr,
            "--key-file",
            path_str(&key),
            "--channels",
            "2",
            "--liveness",
            LIVENESS,
            "--resume-timeout",
            "60s",
        ]);
        let mut handler = ChildProc::spawn(cmd);
        handler.expect("listening on ", Duration::from_secs(30));
        let mut vmm = FakeVmm::boot(&sock, &[SIZE]);
        wait_for("the switch-over", Duration::from_secs(30), || {
            serve.stderr().contains("switch-over")
        });
        let t0 = Instant::now();

        // The vCPUs read every page while the link goes down and up again.
        let pages = vmm.all_pages();
        let want = |_: usize, p: u64, out: &mut [u8]| file_page(SEED, p, out);
        let mut stuck = None;
        let bad = std::thread::scope(|s| {
            let vcpus = s.spawn(|| vmm.touch(&pages, 2, &want));
            std::thread::sleep(at.saturating_sub(t0.elapsed()));
            net.set_link(end, false);
            std::thread::sleep(down_for);
            net.set_link(end, true);
            // The vCPUs must finish. If an end exits first, or they take
            // far longer than the transfer, nothing will wake them: free
            // them (they read zeros) so that the test fails with the logs.
            while !vcpus.is_finished() {
                let gone = [
                    ("uffd-handler", handler.try_exit()),
                    ("serve", serve.try_exit()),
                ]
                .into_iter()
                .find_map(|(who, st)| st.map(|st| format!("{who} exited ({st})")));
                let why = gone.or_else(|| {
                    (t0.elapsed() > Duration::from_secs(90)).then(|| "90 s passed".to_owned())
                });
                if let Some(why) = why {
                    // Give a last page in flight a moment, then let go.
                    std::thread::sleep(Duration::from_secs(2));
                    if !vcpus.is_finished() {
                        stuck = Some(why);
                        vmm.abandon();
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            vcpus
                .join()
                .unwrap_or_else(|_| vec!["a vCPU panicked".into()])
        });
        assert!(
            stuck.is_none(),
            "{what}: the vCPUs were still waiting for pages when {}\nhandler: {}\nserve: {}",
            stuck.unwrap_or_default(),
            handler.stderr(),
            serve.stderr()
        );
        let took = t0.elapsed();
        assert!(
            bad.is_empty(),
            "{what}: pages differ from the file: {bad:?}\nhandler: {}\nserve: {}",
            handler.stderr(),
            serve.stderr()
        );

        let done = serve.expect("done: ", Duration::from_secs(30));
        let (st, _) = serve.wait_exit(Duration::from_secs(10));
        assert!(st.success(), "{what}: serve {st:?}: {}", serve.stderr());
        vmm.close();
        let (st, _) = handler.wait_exit(Duration::from_secs(10));
        let log = handler.stderr();
        assert!(st.success(), "{what}: uffd-handler {st:?}: {log}");
        assert!(log.contains("every page present after"), "{what}: {log}");
        // The cut broke the session, which resumed (a cut that TCP alone
        // rode out would not prove anything).
        assert!(
            resumes_in(&done) >= 1,
            "{what}: the session must have resumed: {done}\nhandler: {log}"
        );
        assert!(log.contains("post-copy resumes"), "{what}: {log}");
        // Once more, with every page present and the handler gone: every
        // byte of guest memory is the file's.
        let bad = vmm.touch(&pages, 2, &want);
        assert!(bad.is_empty(), "{what}: pages differ at the end: {bad:?}");
        eprintln!(
            "cut {i}: every byte of {} MiB matches after {took:.1?} ({})",
            SIZE / MIB,
            done.rsplit_once('(')
                .map_or("", |(_, r)| r.trim_end_matches(')'))
        );
    }
    eprintln!("10 cuts in {:.1?}", started.elapsed());
}

#[test]
fn resume_gives_up_after_resume_timeout_with_a_clear_error_on_both_ends() {
    let _g = serial();
    let net = shaped_pair();
    require!(
        net.is_ok(),
        "{}",
        net.as_ref().err().cloned().unwrap_or_default()
    );
    let net = net.unwrap_or_else(|e| panic!("{e}"));
    let dir = TestDir::new("resume-timeout");
    let key = write_key(&dir);
    let common = [
        "--key-file",
        path_str(&key),
        "--liveness",
        LIVENESS,
        "--resume-timeout",
        "3s",
    ];
    let args = [&["--synthetic", "64M", "--threads", "0"][..], &common[..]].concat();
    let (mut serve, addr) = serve_in(&net, &args);
    let mut receive = receive_in(&net, &addr, "1", &common);
    wait_for("the switch-over", Duration::from_secs(30), || {
        serve.stderr().contains("switch-over")
    });
    std::thread::sleep(Duration::from_millis(500));
    // The source's end goes down: the destination's reconnects send SYNs
    // into the void, the hardest case for a bounded give-up.
    net.set_link(End::Source, false);
    let cut = Instant::now();
    // Both give up while the link is still down: 1 s to notice, 3 s of
    // trying to resume, and some slack.
    let (serve_st, serve_took) = serve.wait_exit(Duration::from_secs(20));
    let (recv_st, recv_took) = receive.wait_exit(Duration::from_secs(20));
    let down = cut.elapsed();
    net.set_link(End::Source, true);
    let (serr, rerr) = (serve.stderr(), receive.stderr());
    eprintln!("serve gave up after {serve_took:.1?}, receive after {recv_took:.1?}");
    eprintln!("serve: {}", serr.lines().last().unwrap_or_default());
    eprintln!("receive: {}", rerr.lines().last().unwrap_or_default());
    for (who, st, err) in [("serve", serve_st, &serr), ("receive", recv_st, &rerr)] {
        assert_eq!(st.code(), Some(1), "{who} must fail with status 1: {err}");
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(last.starts_with("ringfault: error: "), "{who}: {err}");
        assert!(
            last.contains("the link to the peer stayed down for")
                && last.contains("longer than --resume-timeout"),
            "{who} must say why: {last}"
        );
        assert!(!err.contains("panicked"), "{who}: {err}");
    }
    assert!(
        down < Duration::from_secs(12),
        "both ends must give up within the liveness and resume timeouts, not after {down:?}"
    );
}

/// A bulk lane receives each payload whole (`MSG_WAITALL`) and hears of it
/// only when all of it is in: on a link so slow that one 2 MiB payload takes
/// twice the liveness timeout, the destination must still see the lane as
/// alive (the socket keeps receiving) and finish without a resume, every
/// page checked.
#[test]
fn liveness_a_payload_slower_than_the_timeout_is_not_silence() {
    let _g = serial();
    if let Some(why) = NetPair::unavailable() {
        skip!("{why}");
    }
    let net = NetPair::create().unwrap_or_else(|e| panic!("network namespaces: {e}"));
    if let Err(why) = net.rate_limit("8mbit") {
        skip!("cannot shape the link with tc: {why}");
    }
    let dir = TestDir::new("liveness-slow");
    let key = write_key(&dir);
    // 8 Mbit/s: a 2 MiB payload takes about 2.1 s, the liveness timeout is 1 s.
    let common = ["--key-file", path_str(&key), "--liveness", LIVENESS];
    let args = [&["--synthetic", "6M", "--threads", "0"][..], &common[..]].concat();
    let (mut serve, addr) = serve_in(&net, &args);
    let mut receive = receive_in(&net, &addr, "0", &common);
    let verified = receive.expect("verified: ", Duration::from_secs(60));
    let done = serve.expect("done: ", Duration::from_secs(10));
    let (serve_st, _) = serve.wait_exit(Duration::from_secs(10));
    let (recv_st, _) = receive.wait_exit(Duration::from_secs(10));
    let rerr = receive.stderr();
    assert!(serve_st.success(), "serve: {}", serve.stderr());
    assert!(recv_st.success(), "receive: {rerr}");
    assert!(verified.starts_with("yes"), "verified: {verified}\n{rerr}");
    assert_eq!(
        resumes_in(&done),
        0,
        "no lane may be declared silent while it receives: {done}\nreceive: {rerr}"
    );
}
