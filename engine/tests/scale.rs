//! Cost proportional to populated memory: pages the source never populated
//! travel as ranges, the destination installs nothing for them, and after
//! the migration they read zero by themselves, in memory the destination
//! maps itself and in memory a VMM registered with its own userfaultfd.
//!
//! `cargo test never_populated` selects them (the 64 GiB and huge-page runs
//! are `ringfault bench` tests in `tools/tests/scale.rs`).

// Test harness: page indexes and offsets fit in usize on 64-bit Linux.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ringfault_engine::destination::AttachedRegion;
use ringfault_engine::stats::DestinationReport;
use ringfault_engine::sys::guest::{GuestMemory, RegionSpec};
use ringfault_engine::sys::mapping::MapOptions;
use ringfault_engine::sys::uffd::{Features, RegisterMode, Uffd, UffdOptions};
use ringfault_engine::{Destination, DestinationConfig};
use ringfault_proto::auth::PresharedKey;
use ringfault_testkit::{
    error_chain, populated_pages, serial, source_child_main, verify, PageClass, SourceChild,
    VmSpec, KEY_A, MIB, PAGE,
};

/// The source child's entry point: does nothing unless started by `SourceChild`.
#[test]
#[ignore = "child-process entry point, run by other tests"]
fn source_child() {
    source_child_main();
}

const SIZE: usize = 256 * MIB;

fn sparse(seed: u64) -> VmSpec {
    VmSpec {
        seed,
        region_sizes: vec![SIZE],
        populated_permille: 50,
    }
}

/// Migrates `spec` into memory of the destination's own, or a VMM's
/// registered with its userfaultfd (`vmm`), while a guest thread reads some
/// never-populated pages; checks every page and returns the report and the
/// never-populated pages nobody touched that were populated at the end
/// (before the check read them).
fn migrate(spec: &VmSpec, vmm: bool) -> (DestinationReport, Vec<u64>) {
    let src = SourceChild::spawn("source_child", spec, KEY_A);
    let mut cfg = DestinationConfig::new(PresharedKey::new(KEY_A.to_vec()).expect("key"));
    cfg.bulk_channels = 1;
    let (dest, mem) = if vmm {
        // A VMM's guest memory, registered with the VMM's own userfaultfd.
        let mem = GuestMemory::anonymous(
            &[RegionSpec {
                id: 1,
                size: SIZE,
                page_size: PAGE,
            }],
            MapOptions::default(),
        )
        .expect("guest memory");
        let r = &mem.regions()[0];
        let uffd = Uffd::open(UffdOptions {
            nonblock: true,
            user_mode_only: false,
        })
        .expect("userfaultfd");
        uffd.api(Features::NONE).expect("UFFDIO_API");
        uffd.register(r.addr(), r.len(), RegisterMode::Missing)
            .expect("register");
        let regions = vec![AttachedRegion {
            base: r.addr(),
            len: r.len(),
            page_size: PAGE,
        }];
        let dest = Destination::attach(&src.addr, cfg, uffd.into_fd(), regions)
            .unwrap_or_else(|e| panic!("attach: {}", error_chain(&e)));
        (dest, Arc::new(mem))
    } else {
        let dest = Destination::connect(&src.addr, cfg)
            .unwrap_or_else(|e| panic!("connect: {}", error_chain(&e)));
        let mem = dest.memory().expect("own memory");
        (dest, mem)
    };
    // The guest touches some never-populated pages while the migration runs:
    // each read faults and is resolved here with the zero page.
    let touched: Vec<u64> = (0..spec.total_pages())
        .filter(|&p| spec.class(0, p) == PageClass::Unpopulated)
        .step_by(997)
        .collect();
    let toucher = {
        let (mem, touched) = (mem.clone(), touched.clone());
        std::thread::spawn(move || {
            touched
                .iter()
                .filter(|&&p| mem.regions()[0].load_u64(p as usize * PAGE).ok() != Some(0))
                .count()
        })
    };
    let report = dest
        .run()
        .unwrap_or_else(|e| panic!("migration: {}", error_chain(&e)));
    assert_eq!(
        toucher.join().expect("toucher"),
        0,
        "a touched never-populated page read non-zero"
    );
    let (ok, line) = src.finish();
    assert!(ok && line.starts_with("SOURCE OK"), "{line}");
    let populated = populated_pages(&mem.regions()[0]).expect("PAGEMAP_SCAN");
    // Read every page, never-populated ones included, on another thread: a
    // page still registered and missing would block the reader for good.
    let (tx, rx) = std::sync::mpsc::channel();
    let (spec2, mem2) = (spec.clone(), mem.clone());
    std::thread::spawn(move || {
        let _ = tx.send(verify(&spec2, &mem2, &[]));
    });
    let bad = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("reading the destination's memory blocked: a page is still registered and missing");
    assert!(bad.is_empty(), "destination memory differs: {bad:#?}");
    assert_eq!(report.pages_total, spec.total_pages());
    let populated: HashSet<u64> = populated.into_iter().collect();
    let installed: Vec<u64> = (0..spec.total_pages())
        .filter(|&p| spec.class(0, p) == PageClass::Unpopulated && populated.contains(&p))
        .filter(|p| touched.binary_search(p).is_err())
        .collect();
    (report, installed)
}

fn never_populated_read_zero(vmm: bool) {
    let _g = serial();
    let spec = sparse(if vmm { 32 } else { 31 });
    let (report, installed) = migrate(&spec, vmm);
    let never: Vec<u64> = (0..spec.total_pages())
        .filter(|&p| spec.class(0, p) == PageClass::Unpopulated)
        .collect();
    assert!(never.len() > 50_000, "{}", never.len());
    // The source sent them as ranges, and the destination installed nothing
    // for them: only those the guest touched during the migration were
    // populated when it ended (with the zero page).
    // (A touched one whose range had not arrived yet was asked for, and came
    // as a zero page.)
    let touched = never.iter().step_by(997).count() as u64;
    assert!(
        report.unpopulated_pages + touched >= never.len() as u64,
        "{} never-populated pages, {} sent as such",
        never.len(),
        report.unpopulated_pages
    );
    assert!(
        installed.is_empty(),
        "{} never-populated pages nobody touched were installed, the first {:?}",
        installed.len(),
        installed.first()
    );
    eprintln!(
        "never populated: {} pages, none installed; {} bytes on the wire",
        never.len(),
        report.wire_bytes
    );
}

#[test]
fn never_populated_pages_read_zero_in_own_memory() {
    never_populated_read_zero(false);
}

#[test]
fn never_populated_pages_read_zero_with_the_vmms_userfaultfd() {
    never_populated_read_zero(true);
}
