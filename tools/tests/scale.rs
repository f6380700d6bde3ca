//! Scale, through the real program: `ringfault bench` runs the source and the
//! destination as separate processes and checks every page of the result
//! (page digests on both ends). A 64 GiB sparse VM against a 64 MiB dense
//! one, hugetlbfs guest memory, transparent huge pages kept on the
//! destination, and pre-copy runs.
//!
//! `cargo test scale`, `cargo test huge` and `cargo test precopy` select them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use ringfault_testkit::{require, skip, uffd_move_supported};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ringfault-scale-{}-{name}", std::process::id()))
}

/// Runs `ringfault bench ARGS --json F` on short defaults; returns the report
/// (the run must succeed and verify).
fn bench(name: &str, args: &[&str]) -> serde_json::Value {
    let json = tmp(&format!("{name}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_ringfault"))
        .arg("bench")
        .args(["--warmup", "300ms", "--quiet", "--no-probe"])
        .args(if args.contains(&"--tail") {
            &[][..]
        } else {
            &["--tail", "300ms"][..]
        })
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("running ringfault");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench {args:?} failed:\n{stdout}\n{stderr}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("JSON");
    let _ = std::fs::remove_file(&json);
    assert_eq!(v["ringfault"]["verified"], true, "{args:?}:\n{stdout}");
    v
}

fn f(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{} missing in {v}", path.join(".")))
}

#[test]
fn scale_64gib_sparse_costs_what_its_64mib_populated_cost() {
    let _g = serial();
    let sparse_args = ["--size", "64G", "--populated", "0.001", "--pattern", "idle"];
    let dense_args = ["--size", "64M", "--pattern", "idle"];
    // The first run of a size pays for fresh memory: one warm-up each, then
    // the better of two (the test is about structure, not noise).
    let _ = bench("dense-warm", &dense_args);
    let mut dense = f64::MAX;
    let mut sparse = f64::MAX;
    let mut last_sparse = serde_json::Value::Null;
    for i in 0..2 {
        dense = dense.min(f(
            &bench(&format!("dense{i}"), &dense_args),
            &["ringfault", "total_s"],
        ));
        let v = bench(&format!("sparse{i}"), &sparse_args);
        sparse = sparse.min(f(&v, &["ringfault", "total_s"]));
        last_sparse = v;
    }
    let r = &last_sparse["ringfault"];
    eprintln!(
        "64 GiB at 0.1%: {sparse:.3} s; 64 MiB dense: {dense:.3} s; pause {} ms; metadata {} bytes",
        r["switchover_pause_ms"], r["metadata_bytes"]
    );
    assert!(
        sparse <= 2.0 * dense.max(0.05),
        "64 GiB with 64 MiB populated took {sparse:.3} s, a dense 64 MiB VM {dense:.3} s"
    );
    // Page state within the target of 64 MiB per side per TiB: 4 MiB here
    // (a bitmap of 64 GiB of pages takes 2 MiB).
    let meta = f(&last_sparse, &["ringfault", "metadata_bytes"]);
    assert!(
        meta > 0.0 && meta <= f64::from(4u32 << 20),
        "{meta} bytes of metadata"
    );
    let p = &r["pages"];
    assert!(
        p["unpopulated"].as_u64().unwrap_or(0) > 16_000_000,
        "never-populated pages travel as ranges: {p}"
    );
}

fn free_huge_pages_2m() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn huge_hugetlbfs_2m_migration_checks_every_byte() {
    let _g = serial();
    // Source and destination each map 128 MiB of 2 MiB pages.
    let free = free_huge_pages_2m();
    require!(
        free >= 128,
        "needs 128 free 2 MiB huge pages, {free} free (sysctl vm.nr_hugepages=128; .ci/run sets it)"
    );
    let v = bench("hugetlbfs", &["--size", "128M", "--hugepages", "2M"]);
    let r = &v["ringfault"];
    // Pages are counted in 4 KiB units whatever the page size.
    assert_eq!(r["pages"]["total"], 32768, "{r}");
    assert!(f(&v, &["ringfault", "bulk_gbps"]) > 0.0);
}

#[test]
fn huge_pool_too_small_names_the_sysctl() {
    let _g = serial();
    let free = free_huge_pages_2m();
    require!(
        free < 8192,
        "{free} free 2 MiB huge pages: the pool holds 2 x 8 GiB"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ringfault"))
        .args([
            "bench",
            "--quiet",
            "--no-probe",
            "--size",
            "8G",
            "--hugepages",
            "2M",
        ])
        .output()
        .expect("running ringfault");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{free} free; {stderr}");
    assert!(
        stderr.contains("--hugepages") && stderr.contains("sysctl vm.nr_hugepages="),
        "{stderr}"
    );
}

/// A `ringfault bench` run on transparent huge pages, and its huge-page
/// figures.
struct ThpRun {
    report: serde_json::Value,
    /// `AnonHugePages` of the source's guest memory, bytes.
    src: u64,
    /// 2 MiB ranges the destination installed whole.
    moved: u64,
    /// Of those, ranges received straight into the huge page moved in.
    landed: u64,
}

/// Runs `ringfault bench ARGS` (see [`bench`]) and requires the destination
/// to end with at least 90% of the source's huge-page bytes. `Err`: why the
/// run says nothing here (THP off, or the source got no huge pages).
fn thp_bench(name: &str, args: &[&str]) -> Result<ThpRun, String> {
    let enabled =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !(enabled.contains("[madvise]") || enabled.contains("[always]")) {
        return Err(format!(
            "transparent huge pages are off here ({})",
            enabled.trim()
        ));
    }
    let report = bench(name, args);
    let h = &report["ringfault"]["huge_pages"];
    let src = h["source_bytes"].as_u64().unwrap_or(0);
    let dst = h["destination_bytes"].as_u64().unwrap_or(0);
    let moved = h["moved_whole"].as_u64().unwrap_or(0);
    let landed = h["landed_whole"].as_u64().unwrap_or(0);
    eprintln!(
        "AnonHugePages: source {src}, destination {dst}; 2 MiB ranges moved whole: {moved}, received in place: {landed}"
    );
    if src == 0 {
        return Err("the source's memory got no transparent huge pages (none free?)".into());
    }
    assert!(
        dst * 10 >= src * 9,
        "the destination kept {dst} of the source's {src} bytes of huge pages"
    );
    Ok(ThpRun {
        report,
        src,
        moved,
        landed,
    })
}

#[test]
fn huge_transparent_huge_pages_are_kept_on_the_destination() {
    let _g = serial();
    // The keeper collapses the last ranges once every page arrived: a tail
    // of a second leaves it time to.
    let ThpRun {
        src, moved, landed, ..
    } = match thp_bench(
        "thp",
        &["--size", "256M", "--pattern", "idle", "--tail", "1s"],
    ) {
        Ok(r) => r,
        Err(why) => skip!("{why}"),
    };
    // Nothing faults during an idle run, so every 2 MiB range arrives whole
    // and is installed as one huge page by `UFFDIO_MOVE`: none is collapsed.
    require!(
        uffd_move_supported(),
        "this kernel has no UFFDIO_MOVE (needs Linux 6.8): ranges are collapsed instead"
    );
    assert!(
        moved * (2 << 20) * 10 >= src * 9,
        "only {moved} ranges of 2 MiB were installed whole, for {src} bytes of huge pages"
    );
    // The bulk lane received each of them straight into the huge page it
    // moved in: no staging copy.
    assert_eq!(
        landed, moved,
        "ranges moved whole that were not received in place"
    );
}

/// With the workload faulting from the first instant, a fault in a range none
/// of whose pages is here asks for the whole 2 MiB range, which comes in one
/// demand frame and goes in as one huge page; ranges a fault reaches while
/// their pages are on the way go in as 4 KiB pages and are collapsed. The
/// destination must end with the source's huge pages, and faults must have
/// brought whole ranges.
#[test]
fn huge_pages_of_faulted_ranges_are_kept() {
    let _g = serial();
    let ThpRun { report, moved, .. } = match thp_bench(
        "thp-faults",
        &[
            "--size",
            "256M",
            "--pattern",
            "random-write",
            "--tail",
            "1s",
        ],
    ) {
        Ok(r) => r,
        Err(why) => skip!("{why}"),
    };
    let demand = report["ringfault"]["pages"]["demand"].as_u64().unwrap_or(0);
    eprintln!("demand pages {demand}");
    require!(
        uffd_move_supported(),
        "this kernel has no UFFDIO_MOVE (needs Linux 6.8)"
    );
    assert!(
        demand >= 512,
        "faults brought {demand} pages: no whole 2 MiB range came by demand"
    );
    assert!(moved > 0, "no range was installed whole");
}

/// Ranges installed in 4 KiB pages (frames of 256 pages, so no frame holds a
/// whole 2 MiB range, and no fault asks for one in an idle run): the keeper
/// must collapse every range into a huge page.
#[test]
fn huge_pages_installed_in_4k_pages_are_collapsed() {
    let _g = serial();
    let ThpRun { moved, .. } = match thp_bench(
        "thp-collapse",
        &[
            "--size",
            "256M",
            "--pattern",
            "idle",
            "--frame-pages",
            "256",
            "--tail",
            "1s",
        ],
    ) {
        Ok(r) => r,
        Err(why) => skip!("{why}"),
    };
    assert_eq!(moved, 0, "frames of 256 pages were installed whole");
}

#[test]
fn precopy_hybrid_bench_verifies_against_post_copy() {
    let _g = serial();
    let v = bench(
        "precopy",
        &[
            "--size",
            "128M",
            "--pattern",
            "hotset",
            "--precopy",
            "auto",
            "--compare",
            "postcopy",
        ],
    );
    let pc = &v["ringfault"]["precopy"];
    assert!(pc["rounds"].as_u64().unwrap_or(0) >= 1, "{pc}");
    assert!(pc["pages_before_switch"].as_u64().unwrap_or(0) > 0, "{pc}");
    assert_eq!(v["postcopy"]["verified"], true);
}
