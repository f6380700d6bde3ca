//! Tests of the `ringfault` command as a user runs it: a small benchmark that must
//! verify and write a valid report, network-namespace runs whose namespaces are
//! gone afterwards (also when the run fails or is interrupted), netem options that
//! fail clearly on a kernel without netem, and a hand migration of a memory file
//! with `serve` and `receive`.
//!
//! Tests that need root, iproute2 or perf say why they skip (`SKIPPED ...` on
//! standard error).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringfault_testkit::netns::{ip_unavailable, netem_available};
use ringfault_testkit::{require, serial, ChildProc};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringfault"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringfault-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Why `--netns` cannot run here, if it cannot.
fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("rfb-{pid}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Why `perf record` cannot sample a program here, if it cannot.
fn perf_cannot_sample(dir: &std::path::Path) -> Option<String> {
    let data = dir.join("probe.data");
    let rec = Command::new("perf")
        .args(["record", "-q", "-g", "-o"])
        .arg(&data)
        .args([
            "--",
            "sh",
            "-c",
            "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
        ])
        .output();
    match rec {
        Err(e) => return Some(format!("perf is not installed ({e})")),
        Ok(o) if !o.status.success() => {
            return Some(format!(
                "perf record fails here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Ok(_) => {}
    }
    let rep = Command::new("perf")
        .args(["report", "--stdio", "-i"])
        .arg(&data)
        .output();
    match rep {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("Samples") => None,
        Ok(o) => Some(format!(
            "perf recorded no samples of a busy loop: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("perf report fails: {e}")),
    }
}

const QUICK: [&str; 6] = ["--warmup", "300ms", "--tail", "200ms", "--quiet", "--size"];

/// Runs `ringfault bench` with [`QUICK`] settings, `args` and `--json` into
/// a file named `name`; asserts that it succeeded and returns its output and
/// its JSON report.
fn quick_bench(name: &str, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let json = tmp(name);
    let out = bin()
        .arg("bench")
        .args(QUICK)
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (out, v)
}

#[test]
fn small_bench_verifies_and_writes_a_valid_report() {
    let _g = serial();
    let svg = tmp("small.svg");
    let (out, v) = quick_bench(
        "small.json",
        &[
            "64M",
            "--compare",
            "classic",
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("verified: yes"),
        "the report must end with `verified: yes`:\n{stdout}"
    );
    assert_eq!(
        stdout.matches("verified:").count(),
        1,
        "`verified` is said once:\n{stdout}"
    );
    assert_eq!(v["verified"], true);
    for run in ["ringfault", "classic"] {
        let r = &v[run];
        assert_eq!(r["verified"], true, "{run}");
        assert_eq!(r["pages"]["total"], 16384, "{run}");
        for field in [
            "total_s",
            "switchover_pause_ms",
            "bulk_gbps",
            "peak_gbps",
            "transfer_s",
        ] {
            assert!(r[field].as_f64().is_some_and(|x| x >= 0.0), "{run}.{field}");
        }
        for p in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            assert!(r["fault_latency"][p].is_number(), "{run}.fault_latency.{p}");
        }
        for f in ["before", "during", "after", "worst_100ms"] {
            assert!(r["ops"][f].is_number(), "{run}.ops.{f}");
        }
        for f in [
            "source_s_per_gib",
            "destination_s_per_gib",
            "total_s_per_gib",
        ] {
            assert!(
                r["cpu"][f].as_f64().is_some_and(|x| x > 0.0),
                "{run}.cpu.{f}"
            );
        }
        for f in [
            "demand",
            "bulk",
            "zero",
            "unpopulated",
            "duplicate",
            "faults",
        ] {
            assert!(r["pages"][f].is_u64(), "{run}.pages.{f}");
        }
        assert!(r["wire_bytes_received"].as_u64().unwrap() >= 64 << 20);
        assert!(
            r["pages"]["faults"].as_u64().unwrap() > 0,
            "the workload must fault"
        );
    }
    assert!(v["ringfault"]["engine_service"]["p50_us"].is_number());
    assert!(v["link_probe"]["gbps"].as_f64().unwrap() > 0.0);
    assert!(v["link_probe"]["cpu_s_per_gib"].as_f64().unwrap() > 0.0);
    let pause = &v["ringfault"]["pause_breakdown"];
    for f in ["relay_ms", "connect_ms", "resume_ms", "source_scan_ms"] {
        assert!(pause[f].is_number(), "pause_breakdown.{f}");
    }
    assert!(v["ringfault"]["fast_touches"].is_u64());
    let ratios = v["ratios"].as_array().unwrap();
    assert!(ratios.iter().any(|r| r["baseline"] == "classic"));
    assert!(ratios.iter().any(|r| r["baseline"] == "raw-tcp"));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

#[test]
fn a_unix_socket_run_verifies_and_leaves_no_socket() {
    let _g = serial();
    let json = tmp("unix.json");
    let child = bin()
        .arg("bench")
        .args(QUICK)
        .args(["64M", "--unix", "--compare", "classic", "--json"])
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["link_probe"]["transport"], "unix");
    let sock = std::env::temp_dir().join(format!("ringfault-bench-{pid}.sock"));
    assert!(!sock.exists(), "{} left behind", sock.display());
}

/// The ciphers `--cipher auto` does not pick here: ChaCha20-Poly1305 (its
/// pick on a CPU without AES instructions) and AES-256-GCM, each with
/// `--encrypt`: every page arrives, decrypted and checked, and the report
/// names the cipher.
#[test]
fn cipher_chosen_by_name_runs_verifies_and_reports_it() {
    let _g = serial();
    for cipher in ["chacha20-poly1305", "aes-256-gcm"] {
        let (out, v) = quick_bench(
            &format!("{cipher}.json"),
            &["64M", "--encrypt", "--cipher", cipher],
        );
        assert_eq!(v["verified"], true, "{cipher}");
        assert_eq!(v["ringfault"]["protection"], "aead");
        assert_eq!(v["ringfault"]["cipher"], cipher);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("aead ({cipher})")), "{text}");
    }
}

#[test]
fn sparse_vm_sends_ranges_not_data() {
    let _g = serial();
    let (_, v) = quick_bench(
        "sparse.json",
        &[
            "64M",
            "--populated",
            "0.2",
            "--pattern",
            "hotset",
            // Without transparent huge pages, so that a page never touched on
            // the source is not populated (zero-filled) by its huge page.
            "--thp",
            "off",
            "--no-probe",
        ],
    );
    let r = &v["ringfault"];
    assert_eq!(r["verified"], true);
    // Pages the source's workload only read map the shared zero page, which the
    // page map reports as present: those go as zero pages, the rest as ranges.
    let p = &r["pages"];
    assert!(p["unpopulated"].as_u64().unwrap() > 1_000, "{r}");
    assert!(
        p["unpopulated"].as_u64().unwrap() + p["zero"].as_u64().unwrap() > 11_000,
        "{r}"
    );
    assert!(r["wire_bytes_received"].as_u64().unwrap() < 30 << 20, "{r}");
}

#[test]
fn netns_run_removes_its_namespaces() {
    let why = ip_unavailable();
    require!(why.is_none(), "{}", why.unwrap_or_default());
    let _g = serial();
    let child = bin()
        .arg("bench")
        .args(QUICK)
        .args(["64M", "--netns", "--rate", "10gbit"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified: yes"), "{stdout}");
    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));
}

#[test]
fn netem_options_fail_clearly_and_clean_up() {
    let why = ip_unavailable();
    require!(why.is_none(), "{}", why.unwrap_or_default());
    let _g = serial();
    // Whether this kernel has netem, asked of tc itself, not of the bench.
    let netem = netem_available("rfnetem");
    let child = bin()
        .arg("bench")
        .args(QUICK)
        .args(["64M", "--netns", "--delay", "1ms", "--no-probe"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if netem {
        assert!(
            out.status.success(),
            "this kernel has netem, so --delay must work:\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains("verified: yes"), "{stdout}");
    } else {
        assert!(!out.status.success(), "{stdout}");
        assert!(
            stderr.contains("netem") && stderr.contains("does not have"),
            "the error must say that netem is missing: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    }
    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));
    // Without --netns the option is refused outright.
    let out = bin()
        .args(["bench", "--size", "64M", "--loss", "1%"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("need --netns"));
}

#[test]
fn interrupted_netns_run_removes_its_namespaces() {
    let why = ip_unavailable();
    require!(why.is_none(), "{}", why.unwrap_or_default());
    let _g = serial();
    let child = bin()
        .args([
            "bench", "--size", "512M", "--warmup", "5s", "--quiet", "--netns",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let t0 = Instant::now();
    while namespaces_of(pid).len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "namespaces never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));
}

#[test]
fn a_netns_run_sweeps_namespaces_left_by_a_killed_run() {
    let why = ip_unavailable();
    require!(why.is_none(), "{}", why.unwrap_or_default());
    let _g = serial();
    // A run killed with SIGKILL leaves its namespaces; its PID is gone.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let stale = format!("rfb-{dead}-src");
    let made = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(made.success());
    let out = bin()
        .arg("bench")
        .args(QUICK)
        .args(["64M", "--netns", "--no-probe"])
        .output()
        .unwrap();
    let left = namespaces_of(dead);
    if !left.is_empty() {
        let _ = Command::new("ip").args(["netns", "del", &stale]).status();
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        left.is_empty(),
        "the stale namespace must be removed: {left:?}"
    );
}

#[test]
fn perf_profiles_post_copy_only_when_asked() {
    let _g = serial();
    let dir = tmp("perf");
    std::fs::create_dir_all(&dir).unwrap();
    let why = perf_cannot_sample(&dir);
    require!(why.is_none(), "{}", why.unwrap_or_default());
    let out = bin()
        .arg("bench")
        .args(QUICK)
        .args(["64M", "--no-probe", "--perf"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("verified: yes"));
    let summary = std::fs::read_to_string(dir.join("ringfault.txt")).unwrap();
    assert!(
        summary.contains("Samples"),
        "perf can sample here: {summary}"
    );
    // Post-copy threads of both ends: the destination's bulk worker and the
    // source's pusher, which exist only after the switch-over.
    assert!(summary.contains("rf-bulk"), "{summary}");
    assert!(summary.contains("rf-push"), "{summary}");
}

#[test]
fn a_vm_larger_than_memory_is_refused_up_front() {
    let out = bin()
        .args(["bench", "--size", "64T", "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is available"), "{err}");
}

#[test]
fn serve_a_memory_file_and_receive_it() {
    let _g = serial();
    let key = tmp("key");
    std::fs::write(&key, "a-key-of-at-least-sixteen-bytes\n").unwrap();
    let mem = tmp("mem");
    let contents: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    std::fs::write(&mem, &contents).unwrap();
    let mut serve = bin()
        .args(["serve", "--listen", "tcp:127.0.0.1:0", "--memory-file"])
        .arg(&mem)
        .arg("--key-file")
        .arg(&key)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    assert!(addr.starts_with("tcp:127.0.0.1:"), "{addr}");
    let json = tmp("receive.json");
    let out = bin()
        .args([
            "receive",
            "--from",
            &addr,
            "--channels",
            "2",
            "--threads",
            "1",
            "--key-file",
        ])
        .arg(&key)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(serve.wait().unwrap().success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.starts_with("done:")), "{rest:?}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["pages_total"], 2048);
}

#[test]
fn a_wrong_key_fails_with_one_clear_line_and_the_source_keeps_serving() {
    let _g = serial();
    let (ka, kb) = (tmp("ka"), tmp("kb"));
    std::fs::write(&ka, "key-number-one-0123456789").unwrap();
    std::fs::write(&kb, "key-number-two-0123456789").unwrap();
    let mut cmd = bin();
    cmd.args([
        "serve",
        "--listen",
        "tcp:127.0.0.1:0",
        "--synthetic",
        "16M",
        "--threads",
        "0",
        "--key-file",
    ])
    .arg(&ka);
    let mut serve = ChildProc::spawn(cmd);
    let addr = serve.expect("listening on ", Duration::from_secs(30));
    let out = bin()
        .args(["receive", "--from", &addr, "--key-file"])
        .arg(&kb)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("ringfault: error:"), "{err}");
    assert!(err.contains("authentication"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    // The source refused the stranger, said so, and serves the right key.
    assert!(
        serve.try_exit().is_none(),
        "serve must survive a stranger: {}",
        serve.stderr()
    );
    let out = bin()
        .args(["receive", "--from", &addr, "--threads", "0", "--key-file"])
        .arg(&ka)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serve.expect("done: ", Duration::from_secs(30));
    let (status, _) = serve.wait_exit(Duration::from_secs(10));
    let serr = serve.stderr();
    assert!(status.success(), "{serr}");
    assert!(
        serr.contains("authentication"),
        "the refusal is logged: {serr}"
    );
    // A key file that is too short is refused before any connection.
    let short = tmp("short");
    std::fs::write(&short, "short").unwrap();
    let out = bin()
        .args([
            "serve",
            "--listen",
            "tcp:127.0.0.1:0",
            "--synthetic",
            "16M",
            "--key-file",
        ])
        .arg(&short)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "it never listened"
    );
}
