//! What a new user meets (issue 12): every user-facing defect fixed there has
//! a test here that asserts the message and the exit status.
//!
//! - Bad values fail before any work, in words that name the option: at
//!   parse time (exit status 2, clap's `invalid value ... for '--option'`),
//!   or, for combinations, before the warm-up (exit status 1).
//! - `serve` with nothing to serve names both choices.
//! - The netem error says what to do.
//! - `receive` checks every page against the source's digests (the default
//!   for a synthetic VM), says `verified: yes`, and puts it in `--json`;
//!   `receive --verify` fails at once when the source sends no digests.
//! - `receive` shows a progress bar on a terminal, unless `--quiet`.
//! - The plot says what ran; the JSON report keeps its keys and adds the
//!   whole latency histograms and the run's date and kernel.
//!
//! Tests that need root, iproute2 or `script` say why they skip (`SKIPPED ...`
//! on standard error).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ringfault_testkit::netns::{ip_unavailable, netem_available};
use ringfault_testkit::{require, serial, ChildProc};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringfault"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringfault-ux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    dir.join(name)
}

/// The key file, written once (tests run in parallel and read it meanwhile).
fn key() -> PathBuf {
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let k = tmp("key");
        std::fs::write(&k, "a-key-of-at-least-sixteen-bytes\n").unwrap_or_else(|e| panic!("{e}"));
        k
    })
    .clone()
}

/// Runs `ringfault ARGS`; returns its output and how long it took.
fn run(args: &[&str]) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = bin()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    (out, t0.elapsed())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts a parse-time refusal: status 2, the option named, `want` said,
/// nothing done.
fn refused_at_parse(args: &[&str], option: &str, want: &str) {
    let (out, took) = run(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        err.contains(&format!("for '{option}")),
        "{args:?}: the message names {option}: {err}"
    );
    assert!(err.contains(want), "{args:?}: {err}");
    assert!(stdout(&out).is_empty(), "{args:?}: nothing ran");
    assert!(took < Duration::from_secs(2), "{args:?} took {took:?}");
}

#[test]
fn bad_values_are_refused_at_parse_time_naming_the_option() {
    refused_at_parse(&["bench", "--channels", "0"], "--channels", "1..=64");
    refused_at_parse(
        &["bench", "--populated", "-0.5"],
        "--populated",
        "is not between 0 and 1",
    );
    refused_at_parse(
        &["bench", "--threads", "0"],
        "--threads",
        "a whole number from 1 to 64",
    );
    refused_at_parse(
        &[
            "serve",
            "--listen",
            "tcp:127.0.0.1:0",
            "--synthetic",
            "16M",
            "--threads",
            "-1",
            "--key-file",
            "k",
        ],
        "--threads",
        "a whole number from 0 to 64",
    );
    refused_at_parse(
        &[
            "receive",
            "--from",
            "tcp:127.0.0.1:1",
            "--key-file",
            "k",
            "--liveness",
            "100ms",
        ],
        "--liveness",
        "at least 500ms",
    );
    refused_at_parse(
        &[
            "receive",
            "--from",
            "tcp:127.0.0.1:1",
            "--key-file",
            "k",
            "--channels",
            "0",
        ],
        "--channels",
        "1..=64",
    );
}

#[test]
fn bench_checks_engine_options_before_the_warm_up() {
    let (out, took) = run(&[
        "bench",
        "--size",
        "64M",
        "--install",
        "move",
        "--encrypt",
        "--quiet",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("ringfault: error:") && err.contains("--install move"),
        "{err}"
    );
    assert!(err.contains("--encrypt"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(
        took < Duration::from_secs(2),
        "refused before any work, not after {took:?}"
    );
}

#[test]
fn compare_postcopy_without_precopy_says_what_to_add() {
    let (out, took) = run(&["bench", "--size", "64M", "--compare", "postcopy", "--quiet"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("ringfault: error:") && err.contains("--precopy"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(2),
        "refused before any work, not after {took:?}"
    );
}

#[test]
fn serve_with_nothing_to_serve_names_both_choices() {
    let k = key();
    let ks = k.to_str().unwrap_or_default();
    let (out, took) = run(&["serve", "--listen", "tcp:127.0.0.1:0", "--key-file", ks]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--synthetic") && err.contains("--memory-file"),
        "{err}"
    );
    assert!(!stdout(&out).contains("listening"), "it never listened");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn the_netem_error_says_what_to_do() {
    require!(ip_unavailable().is_none(), "needs root and iproute2");
    require!(
        !netem_available("rfux"),
        "this kernel has netem, so --delay works and there is no error to read"
    );
    let _g = serial();
    let (out, took) = run(&[
        "bench",
        "--size",
        "64M",
        "--quiet",
        "--netns",
        "--delay",
        "1ms",
        "--no-probe",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("sch_netem"), "names the module: {err}");
    assert!(
        err.contains("a kernel with sch_netem") && err.contains("--rate alone"),
        "says what to do: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(took < Duration::from_secs(10), "before any run: {took:?}");
}

/// `serve ARGS` on a free port; returns the child and its address.
fn serve(extra: &[&str]) -> (ChildProc, String) {
    let mut cmd = bin();
    cmd.args(["serve", "--listen", "tcp:127.0.0.1:0", "--key-file"])
        .arg(key())
        .args(extra);
    let mut child = ChildProc::spawn(cmd);
    let addr = child.expect("listening on ", Duration::from_secs(30));
    (child, addr)
}

fn receive(addr: &str, extra: &[&str]) -> Output {
    bin()
        .args(["receive", "--from", addr, "--key-file"])
        .arg(key())
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn finish(mut serve: ChildProc) {
    serve.expect("done: ", Duration::from_secs(30));
    let (status, _) = serve.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{}", serve.stderr());
}

#[test]
fn receive_verifies_a_synthetic_vm_by_default_and_says_so_in_json() {
    let _g = serial();
    let (src, addr) = serve(&["--synthetic", "64M", "--threads", "1"]);
    let json = tmp("verified.json");
    let out = receive(
        &addr,
        &[
            "--threads",
            "1",
            "--channels",
            "2",
            "--json",
            json.to_str().unwrap_or_default(),
        ],
    );
    let so = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{so}\n{}", stderr(&out));
    assert_eq!(
        so.lines()
            .filter(|l| l.starts_with("verified: yes"))
            .count(),
        1,
        "{so}"
    );
    finish(src);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["verify"]["verified"], true, "{v}");
    assert_eq!(v["verify"]["mismatches"], serde_json::json!([]), "{v}");
    // The report's keys are still there.
    assert_eq!(v["pages_total"], 16384, "{v}");
    assert!(v["fault_service"]["p50_us"].is_number(), "{v}");
    assert!(v["fault_service_histogram"].is_array(), "{v}");
}

#[test]
fn receive_says_when_memory_was_not_checked_and_verify_insists() {
    let _g = serial();
    // A synthetic VM told not to send digests: not checked, and said so.
    let (src, addr) = serve(&["--synthetic", "16M", "--threads", "0", "--no-verify"]);
    let out = receive(&addr, &["--threads", "0", "--quiet"]);
    let so = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        so.contains("verified: not checked") && so.contains("serve --verify"),
        "{so}"
    );
    finish(src);
    // A memory file is not hashed again unless asked: `receive --verify`
    // fails at once, saying how to ask.
    let mem = tmp("mem");
    let contents: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    std::fs::write(&mem, &contents).unwrap_or_else(|e| panic!("{e}"));
    let mem = mem.to_str().unwrap_or_default().to_owned();
    let (mut src, addr) = serve(&["--memory-file", &mem]);
    let t0 = Instant::now();
    let out = receive(&addr, &["--threads", "0", "--verify"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("does not send digests") && err.contains("ringfault serve --verify"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "at connect");
    src.kill();
    // With `serve --verify`, the memory file is checked.
    let (src, addr) = serve(&["--memory-file", &mem, "--verify"]);
    let out = receive(&addr, &["--threads", "1", "--verify"]);
    let so = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{so}\n{}", stderr(&out));
    assert!(so.contains("verified: yes"), "{so}");
    finish(src);
}

#[test]
fn receive_shows_a_progress_bar_on_a_terminal_unless_quiet() {
    let has_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    require!(has_script, "needs `script` (util-linux) for a terminal");
    let _g = serial();
    // `script` gives the command a terminal and copies what it drew.
    let under_tty = |quiet: bool| {
        let (src, addr) = serve(&["--synthetic", "256M", "--threads", "1"]);
        let cmd = format!(
            "{} receive --from {addr} --key-file {} --threads 1{}",
            env!("CARGO_BIN_EXE_ringfault"),
            key().display(),
            if quiet { " --quiet" } else { "" }
        );
        let out = Command::new("script")
            .args(["-qefc", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        finish(src);
        assert!(out.status.success(), "{}", stdout(&out));
        stdout(&out)
    };
    let drawn = under_tty(false);
    for part in ["pages (", "GB/s", "faults/s", "ETA"] {
        assert!(drawn.contains(part), "the bar shows {part:?}: {drawn}");
    }
    let quiet = under_tty(true);
    assert!(!quiet.contains("faults/s"), "--quiet draws no bar: {quiet}");
    assert!(quiet.contains("verified: yes"), "{quiet}");
}

#[test]
fn the_plot_says_what_ran_and_the_json_keeps_its_keys() {
    let _g = serial();
    let (json, svg) = (tmp("plot.json"), tmp("plot.svg"));
    // `--thp off`: faults then bring 4 KiB pages, not whole 2 MiB ranges, so
    // there are enough of them to fill more than 19 histogram buckets.
    let out = bin()
        .args([
            "bench",
            "--size",
            "64M",
            "--thp",
            "off",
            "--warmup",
            "300ms",
            "--tail",
            "200ms",
            "--quiet",
            "--no-probe",
            "--json",
        ])
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert_eq!(v["config"]["kernel"], kernel.as_str(), "{}", v["config"]);
    let date = v["config"]["date"].as_str().unwrap_or_default();
    assert!(
        date.len() == 20 && date.ends_with('Z') && date.contains('T'),
        "{date}"
    );
    let r = &v["ringfault"];
    // The old keys, and the whole histogram beside the 19 quantiles.
    assert_eq!(
        r["fault_latency_cdf"].as_array().map(Vec::len),
        Some(19),
        "{r}"
    );
    let hist = r["fault_latency_histogram"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let counted: u64 = hist.iter().filter_map(|b| b[1].as_u64()).sum();
    assert_eq!(counted, r["fault_latency"]["count"].as_u64().unwrap_or(0));
    assert!(hist.len() > 19, "more than 19 points: {}", hist.len());
    let svg = std::fs::read_to_string(&svg).unwrap_or_default();
    for part in [
        "bench --size 64M",
        &format!("Linux {kernel}"),
        " cores",
        date,
    ] {
        assert!(svg.contains(part), "the title says {part:?}");
    }
}

/// The README's first command, `cargo run --release -p ringfault-tools --
/// bench`, must pick the `ringfault` binary although the package has two
/// (the CRIU workload is the other): without `default-run`, cargo refuses
/// with "could not determine which binary to run".
#[test]
fn the_readme_main_command_names_a_runnable_binary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let first = readme
        .lines()
        .find(|l| l.starts_with("cargo run"))
        .unwrap_or_else(|| panic!("no `cargo run` line in the README"));
    assert!(
        first.contains("-p ringfault-tools -- bench"),
        "the README's main command changed: {first}"
    );
    let manifest = std::fs::read_to_string(root.join("tools/Cargo.toml")).unwrap();
    let bins = manifest.matches("[[bin]]").count();
    assert!(
        bins <= 1 || manifest.contains("default-run = \"ringfault\""),
        "tools/Cargo.toml has {bins} binaries and no `default-run = \"ringfault\"`"
    );
    // And the binary it runs is the one the tests run.
    assert!(env!("CARGO_BIN_EXE_ringfault").ends_with("/ringfault"));
}
