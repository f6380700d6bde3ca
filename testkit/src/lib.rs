//! The test harness shared by ringfault's integration tests (dev-only, never
//! published):
//!
//! - [`vm`]: a deterministic synthetic VM whose pages are a pure function of
//!   (seed, region, page), so that two processes agree on every byte without
//!   sending it; the source's guest memory built from it, a destination
//!   workload that reads and writes pages from the first instant, and a
//!   check of every page against the source's bytes plus the workload's
//!   writes;
//! - [`child`]: child processes with their output read line by line (the
//!   test binary re-executed as a source, a handler or a VM; or any program),
//!   killed when dropped, and the source child's `READY` line protocol;
//! - [`vmm`]: Firecracker's side of a snapshot restore: guest regions, a
//!   userfaultfd with `EVENT_REMOVE`, the JSON mappings and the descriptor in
//!   one `sendmsg`, and "vCPU" threads that touch pages;
//! - [`criu`]: a usable CRIU (or why to skip) and a workload tree to
//!   checkpoint, for the lazy-pages tests;
//! - [`memfile`]: snapshot memory files with known contents, in a temporary
//!   directory that is removed afterwards;
//! - [`netns`]: two network namespaces joined by a veth link that a test
//!   can shape with `tc` and cut with `ip link set DEV down`;
//! - [`proxy`]: a man in the middle that flips, forges, rewrites or replays
//!   frames between a destination and a source;
//! - [`skip!`] and [`require!`]: a test that cannot run here says so on the
//!   real standard error (which the test harness does not capture) and returns.
//!
//! Migration tests use most of the machine: they take [`serial`] first.

pub mod child;
pub mod criu;
pub mod memfile;
pub mod netns;
pub mod proxy;
pub mod vm;
pub mod vmm;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ringfault_engine::sys::guest::GuestRegion;
use ringfault_engine::sys::pagemap::{PagemapError, Query, Scanner};

pub use child::{serve_child_main, source_child_main, ChildProc, SourceChild};
pub use memfile::TestDir;
pub use vm::{verify, verify_with, PageClass, VmSpec, Workload, WorkloadResult, SOURCE_WORD};
pub use vmm::{FakeVmm, Handover};

/// 4 KiB.
pub const PAGE: usize = 4096;
/// 1 MiB.
pub const MIB: usize = 1 << 20;

/// Pre-shared keys for tests.
pub const KEY_A: &[u8] = b"ringfault-test-key-A-0123456789";
/// A key that is not [`KEY_A`].
pub const KEY_B: &[u8] = b"ringfault-test-key-B-9876543210";

/// One migration test at a time in a test binary: they pin threads and use most
/// of the machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the test binary's migration lock (a failed test does not poison it).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A 64-bit mixer (splitmix64's finaliser): the synthetic VM's hash.
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Fills `out` with xorshift64 output from `seed` (never zero).
pub fn fill_pseudo_random(seed: u64, out: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

/// A tuning override from the environment (for experiments; tests run on defaults).
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Polls `done` every 5 ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An error with its whole chain of sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Whether this kernel has `UFFDIO_MOVE` (`UFFD_FEATURE_MOVE`, Linux 6.8).
pub fn uffd_move_supported() -> bool {
    ringfault_engine::sys::uffd::Uffd::probe()
        .map(|f| f.contains(ringfault_engine::sys::uffd::Features::MOVE))
        .unwrap_or(false)
}

/// The pages of `region` that are populated (present, swapped out, or
/// mapping the shared zero page), by `PAGEMAP_SCAN`, in region pages.
pub fn populated_pages(region: &GuestRegion) -> Result<Vec<u64>, PagemapError> {
    populated_in(region.addr(), region.len(), region.page_size())
}

/// As [`populated_pages`], for any range: `len` bytes at `addr`, in pages of
/// `page_size` (a page counts if any of its 4 KiB is populated).
pub fn populated_in(addr: usize, len: usize, page_size: usize) -> Result<Vec<u64>, PagemapError> {
    let ranges = Scanner::new()?.scan(addr, addr + len, Query::Populated)?;
    let mut out: Vec<u64> = Vec::new();
    for r in ranges {
        let first = (r.start - addr) / page_size;
        let end = (r.end - addr).div_ceil(page_size);
        out.extend(first as u64..end as u64);
    }
    // `Scanner::scan` may report a range twice (it restarts a walk from a
    // stale `walk_end`; see `sys_pagemap.rs`): count each page once.
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Writes `SKIPPED <test>: <reason>` to the process's real standard error
/// (`eprintln!` would be captured by the test harness and hidden when the
/// test passes). Use [`skip!`] or [`require!`] rather than this.
pub fn report_skip(test: &str, reason: &str) {
    use std::io::Write;
    let line = format!("SKIPPED {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// The name of the test a [`skip!`] stands in, from the path of a function
/// item defined there: `crate::test_name::{{closure}}::f` gives `test_name`.
#[doc(hidden)]
pub fn test_name_of(item_path: &str) -> String {
    let path = item_path.strip_suffix("::f").unwrap_or(item_path);
    let parts: Vec<&str> = path.split("::").filter(|p| !p.starts_with("{{")).collect();
    match parts.split_first() {
        Some((_, rest)) if !rest.is_empty() => rest.join("::"),
        _ => std::thread::current()
            .name()
            .unwrap_or("<unnamed test>")
            .to_owned(),
    }
}

/// What a skipped test returns: `()` or `Ok(())`.
pub trait Skipped {
    /// The value a test returns when it skips.
    fn skipped() -> Self;
}

impl Skipped for () {
    fn skipped() -> Self {}
}

impl<E> Skipped for Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// Skips the current test: writes `SKIPPED <test name>: <reason>` to standard
/// error, uncaptured, and returns from the test (`()` or `Ok(())`). The
/// reason takes `format!` arguments.
#[macro_export]
macro_rules! skip {
    ($($reason:tt)+) => {{
        fn f() {}
        let name = $crate::test_name_of(::std::any::type_name_of_val(&f));
        $crate::report_skip(&name, &format!($($reason)+));
        return $crate::Skipped::skipped();
    }};
}

/// Skips the current test unless `cond` holds (see [`skip!`]).
#[macro_export]
macro_rules! require {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            $crate::skip!($($reason)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_from_item_paths() {
        assert_eq!(test_name_of("migrate::move_install::f"), "move_install");
        assert_eq!(
            test_name_of("sys_uffd::hugetlbfs::{{closure}}::f"),
            "hugetlbfs"
        );
        assert_eq!(test_name_of("cli::tests::x::f"), "tests::x");
    }

    #[test]
    fn skip_returns_from_the_test() {
        // The two shapes a test has: `()` and `Result<(), _>` (only the
        // paths that run on are taken: a skip here would print a SKIPPED line).
        fn unit(run: bool) -> bool {
            let mut ran = false;
            let mut body = || {
                require!(run, "unit test skips: {}", 42);
                ran = true;
            };
            body();
            ran
        }
        fn result(run: bool) -> Result<(), String> {
            require!(run, "result test skips");
            Err("ran".into())
        }
        assert!(unit(true));
        assert_eq!(result(true), Err("ran".into()));
    }
}
