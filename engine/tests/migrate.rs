//! End-to-end post-copy migrations on the real kernel: the source runs in a child
//! process, the destination here, over TCP on loopback, while two threads read and
//! write random guest pages on the destination from the first instant.

use ringfault_engine::destination::AttachedRegion;
use ringfault_engine::sys::guest::{GuestMemory, RegionSpec};
use ringfault_engine::sys::mapping::MapOptions;
use ringfault_engine::sys::pagemap::{Query, Scanner};
use ringfault_engine::sys::uffd::{Features, RegisterMode, Uffd, UffdOptions};
use ringfault_engine::{
    BulkReceive, Destination, DestinationConfig, EngineError, InstallMode, Protection,
};
use ringfault_proto::auth::PresharedKey;
use ringfault_testkit::{
    env_u64, error_chain, require, serial, source_child_main, uffd_move_supported, verify,
    SourceChild, VmSpec, Workload, KEY_A, KEY_B, MIB, PAGE,
};

/// The source child's entry point: does nothing unless started by `SourceChild`.
#[test]
#[ignore = "child-process entry point, run by other tests"]
fn source_child() {
    source_child_main();
}

struct Case {
    spec: VmSpec,
    channels: u16,
    install: InstallMode,
    /// Where the source listens (`tcp:127.0.0.1:0` unless a test says otherwise).
    listen: Option<String>,
    /// Both ends run with `--integrity none`.
    zero_copy: bool,
    /// How bulk workers receive.
    receive: BulkReceive,
}

impl Case {
    /// `spec` over `channels` bulk lanes, on the defaults: copy installs,
    /// TCP on loopback, frames tagged, bulk payloads received directly.
    fn new(spec: VmSpec, channels: u16) -> Case {
        Case {
            spec,
            channels,
            install: InstallMode::Copy,
            listen: None,
            zero_copy: false,
            receive: BulkReceive::Direct,
        }
    }
}

fn migrate(case: Case) -> ringfault_engine::stats::DestinationReport {
    let _g = serial();
    let listen = case.listen.as_deref().unwrap_or("tcp:127.0.0.1:0");
    let protection = if case.zero_copy {
        Protection::None
    } else {
        Protection::Mac
    };
    let src = SourceChild::spawn_with("source_child", &case.spec, KEY_A, listen, protection);
    let mut cfg = DestinationConfig::new(PresharedKey::new(KEY_A.to_vec()).unwrap());
    cfg.bulk_channels = case.channels;
    cfg.install = case.install;
    cfg.bulk_receive = case.receive;
    if case.zero_copy {
        cfg.protection = Protection::None;
    }
    if let Some(p) = env_u64("RF_PIN") {
        cfg.pin_workers = p != 0;
    }
    if let Some(p) = env_u64("RF_PRIO") {
        cfg.prioritize_demand = p != 0;
    }
    let dest = Destination::connect(&src.addr, cfg).expect("connect");
    let mem = dest.memory().expect("own memory");
    let workload = Workload::start(&case.spec, mem.clone(), 2);
    let report = dest
        .run()
        .unwrap_or_else(|e| panic!("migration: {}", error_chain(&e)));
    // A short tail with every page present.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let results = workload.stop();
    let (ok, line) = src.finish();
    assert!(ok, "source failed: {line}");
    assert!(line.starts_with("SOURCE OK"), "{line}");
    for r in &results {
        assert!(
            r.bad_reads.is_empty(),
            "workload read wrong bytes: {:?}",
            r.bad_reads
        );
    }
    let bad = verify(&case.spec, &mem, &results);
    assert!(bad.is_empty(), "destination memory differs: {bad:#?}");
    assert_eq!(report.pages_total, case.spec.total_pages());
    assert!(
        report.faults > 0,
        "the workload must have faulted: {report:#?}"
    );
    eprintln!(
        "{}",
        report
            .to_json()
            .lines()
            .filter(|l| !l.contains('[') || l.contains("channels"))
            .take(24)
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("source: {line}");
    report
}

fn dense(size: usize, seed: u64) -> VmSpec {
    VmSpec::dense(size, seed)
}

#[test]
fn one_channel_copy() {
    migrate(Case::new(dense(256 * MIB, 1), 1));
}

/// The bulk lane receives straight into landings (the default): every byte
/// arrives, and the lane's report shows receives queued in the kernel while
/// each frame is installed: always the next block, and the next payload too
/// whenever its head had arrived (then 2).
#[test]
fn one_channel_direct_keeps_receives_in_flight_while_installing() {
    let r = migrate(Case::new(dense(256 * MIB, 11), 1));
    let bulk = r
        .channels
        .iter()
        .find(|c| c.lane == "bulk")
        .unwrap_or_else(|| panic!("no bulk lane in {:?}", r.channels));
    eprintln!(
        "bulk lane: receives in flight at installs: min {}, mean {:.2}",
        bulk.recv_in_flight_min, bulk.recv_in_flight_mean
    );
    assert!(
        bulk.recv_in_flight_min >= 1 && bulk.recv_in_flight_mean > 1.0,
        "the next receives must be in the kernel while a frame is installed: {bulk:?}"
    );
}

/// The stream ring (`--bulk-receive stream`) still migrates every byte.
#[test]
fn one_channel_stream_receive() {
    let r = migrate(Case {
        receive: BulkReceive::Stream,
        ..Case::new(dense(256 * MIB, 12), 1)
    });
    assert_eq!(r.landed_moves, 0, "nothing lands directly on a stream lane");
}

#[test]
fn four_channels_copy() {
    let r = migrate(Case::new(dense(256 * MIB, 2), 4));
    assert_eq!(r.channels.len(), 5, "one demand and four bulk lanes");
    assert!(
        r.channels
            .iter()
            .filter(|c| c.lane == "bulk" && c.bytes > 0)
            .count()
            >= 2,
        "bulk traffic must spread over channels: {:?}",
        r.channels.iter().map(|c| c.bytes).collect::<Vec<_>>()
    );
}

#[test]
fn move_install() {
    require!(
        uffd_move_supported(),
        "this kernel has no UFFDIO_MOVE (needs Linux 6.8)"
    );
    migrate(Case {
        install: InstallMode::Move,
        ..Case::new(dense(256 * MIB, 3), 1)
    });
}

#[test]
fn sparse_region_sends_little() {
    let size = 256 * MIB;
    let r = migrate(Case::new(
        VmSpec {
            seed: 4,
            region_sizes: vec![size],
            populated_permille: 100,
        },
        1,
    ));
    let limit = size as f64 * 0.15;
    assert!(
        (r.wire_bytes as f64) < limit,
        "{} bytes on the wire for a 90% empty region (limit {limit})",
        r.wire_bytes
    );
    assert!(r.unpopulated_pages > 0 && r.zero_pages > 0, "{r:#?}");
}

#[test]
fn two_regions_of_different_sizes() {
    migrate(Case::new(
        VmSpec {
            seed: 5,
            region_sizes: vec![160 * MIB, 96 * MIB],
            populated_permille: 900,
        },
        2,
    ));
}

#[test]
fn wrong_key_fails_on_both_sides_and_installs_nothing() {
    let _g = serial();
    let spec = dense(16 * MIB, 6);
    let src = SourceChild::spawn("source_child", &spec, KEY_A);
    // Memory registered by "a VMM", so that we can check afterwards that no page
    // was installed into it.
    let mem = GuestMemory::anonymous(
        &[RegionSpec {
            id: 1,
            size: 16 * MIB,
            page_size: PAGE,
        }],
        MapOptions::default(),
    )
    .unwrap();
    let m = &mem.regions()[0];
    let uffd = Uffd::open(UffdOptions {
        nonblock: true,
        user_mode_only: false,
    })
    .unwrap();
    uffd.api(Features::NONE).unwrap();
    uffd.register(m.addr(), m.len(), RegisterMode::Missing)
        .unwrap();
    let cfg = DestinationConfig::new(PresharedKey::new(KEY_B.to_vec()).unwrap());
    let regions = vec![AttachedRegion {
        base: m.addr(),
        len: m.len(),
        page_size: PAGE,
    }];
    let err = Destination::attach(&src.addr, cfg, uffd.into_fd(), regions)
        .expect_err("a wrong key must fail");
    assert!(
        matches!(err, EngineError::Auth(_)),
        "destination error must be an authentication error, got {err:?}"
    );
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(text.contains("authentication"), "{text}");
    let populated = Scanner::new()
        .unwrap()
        .scan(m.addr(), m.addr() + m.len(), Query::Populated)
        .unwrap();
    assert!(
        populated.is_empty(),
        "no page may be installed: {populated:?}"
    );
    // The source refused the stranger and goes on serving: the right key works.
    let mut cfg = DestinationConfig::new(PresharedKey::new(KEY_A.to_vec()).unwrap());
    cfg.bulk_channels = 1;
    let dest = Destination::connect(&src.addr, cfg).expect("connect with the right key");
    dest.run().expect("migration after a refused stranger");
    let (ok, line) = src.finish();
    assert!(ok && line.starts_with("SOURCE OK"), "{line}");
}

#[test]
fn unix_socket_address() {
    let path = std::env::temp_dir().join(format!("ringfault-test-{}.sock", std::process::id()));
    let r = migrate(Case {
        listen: Some(format!("unix:{}", path.display())),
        ..Case::new(dense(64 * MIB, 7), 2)
    });
    assert_eq!(r.pages_total, (64 * MIB / PAGE) as u64);
    let _ = std::fs::remove_file(path);
}

#[test]
fn integrity_none_migrates() {
    let r = migrate(Case {
        zero_copy: true,
        ..Case::new(dense(128 * MIB, 8), 2)
    });
    assert_eq!(r.protection, "none");
    assert_eq!(r.pages_total, (128 * MIB / PAGE) as u64);
}
