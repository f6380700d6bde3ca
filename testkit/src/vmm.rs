//! Firecracker's side of a snapshot restore through an external page-fault
//! handler, byte for byte as `guest_memory_from_uffd` does it in Firecracker's
//! `persist.rs`: anonymous guest regions; a userfaultfd made with
//! `O_CLOEXEC | O_NONBLOCK`, not restricted to user-mode faults, `UFFDIO_API`
//! with `EVENT_REMOVE`; every region registered MISSING; then one `sendmsg`
//! to the handler's socket carrying the JSON mappings and the userfaultfd.
//! Afterwards "vCPU" threads touch guest pages ([`FakeVmm::touch`]).

// Test harness: page indexes and offsets fit in usize on 64-bit Linux.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ringfault_engine::sys::guest::{GuestError, GuestMemory, GuestRegion, RegionSpec};
use ringfault_engine::sys::mapping::MapOptions;
use ringfault_engine::sys::scm::send_with_fd;
use ringfault_engine::sys::uffd::{Features, RegisterMode, Uffd, UffdOptions};

use crate::mix;

/// What "Firecracker" sends the handler.
#[derive(Debug, Clone)]
pub enum Handover {
    /// The mappings of its regions, as Firecracker serialises them: the
    /// regions lie one after the other in the memory file.
    Real,
    /// These bytes instead.
    Raw(String),
}

/// A VMM that handed its guest memory to a page-fault handler.
#[derive(Debug)]
pub struct FakeVmm {
    memory: GuestMemory,
    /// Firecracker keeps its userfaultfd open for the life of the VM.
    uffd: Uffd,
    /// Firecracker keeps the socket open too; closing it tells the handler to go.
    stream: Option<UnixStream>,
}

impl FakeVmm {
    /// Maps anonymous guest regions of `sizes` bytes with pages of
    /// `page_size` (2 MiB or 1 GiB: hugetlbfs); region ids are 0.. in order,
    /// as the handler numbers Firecracker's regions.
    pub fn map(sizes: &[usize], page_size: usize) -> Result<GuestMemory, GuestError> {
        let specs: Vec<RegionSpec> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| RegionSpec {
                id: i as u32,
                size,
                page_size,
            })
            .collect();
        GuestMemory::anonymous(&specs, MapOptions::default())
    }

    /// Boots with 4 KiB regions of `sizes` and hands them over as Firecracker does.
    pub fn boot(socket: &Path, sizes: &[usize]) -> FakeVmm {
        let memory = Self::map(sizes, 4096).unwrap_or_else(|e| panic!("guest memory: {e}"));
        Self::boot_with(socket, memory, Handover::Real, true)
    }

    /// Registers `memory` with a new userfaultfd and sends `msg` (with the
    /// userfaultfd attached if `send_uffd`) to the handler at `socket`.
    pub fn boot_with(
        socket: &Path,
        memory: GuestMemory,
        msg: Handover,
        send_uffd: bool,
    ) -> FakeVmm {
        // UffdBuilder::new().close_on_exec(true).non_blocking(true)
        //     .user_mode_only(false).require_features(EVENT_REMOVE)
        let uffd = Uffd::open(UffdOptions {
            nonblock: true,
            user_mode_only: false,
        })
        .unwrap_or_else(|e| panic!("userfaultfd: {e}"));
        uffd.api(Features::EVENT_REMOVE)
            .unwrap_or_else(|e| panic!("UFFDIO_API: {e}"));
        for r in memory.regions() {
            uffd.register(r.addr(), r.len(), RegisterMode::Missing)
                .unwrap_or_else(|e| panic!("UFFDIO_REGISTER: {e}"));
        }
        let json = match msg {
            Handover::Real => mappings_json(memory.regions()),
            Handover::Raw(s) => s,
        };
        let stream = connect(socket);
        let fd = send_uffd.then(|| uffd.as_fd());
        let sent = send_with_fd(stream.as_fd(), json.as_bytes(), fd)
            .unwrap_or_else(|e| panic!("sendmsg to the handler: {e}"));
        assert_eq!(sent, json.len(), "one sendmsg carries the whole message");
        FakeVmm {
            memory,
            uffd,
            stream: Some(stream),
        }
    }

    /// The guest regions, in order.
    pub fn regions(&self) -> &[GuestRegion] {
        self.memory.regions()
    }

    /// Every page of every region, as (region index, page).
    pub fn all_pages(&self) -> Vec<(usize, u64)> {
        self.regions()
            .iter()
            .enumerate()
            .flat_map(|(ri, r)| (0..r.pages()).map(move |p| (ri, p)))
            .collect()
    }

    /// Reads every listed page (whole) from `threads` threads, in a shuffled
    /// order, and returns the pages that differ from `want` (the first few).
    pub fn touch(
        &self,
        pages: &[(usize, u64)],
        threads: usize,
        want: &(dyn Fn(usize, u64, &mut [u8]) + Sync),
    ) -> Vec<String> {
        let mut order = pages.to_vec();
        shuffle(&mut order, pages.len() as u64);
        let chunk = order.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = order
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut bad = Vec::new();
                        let mut got = Vec::new();
                        let mut exp = Vec::new();
                        for &(ri, p) in part {
                            let r = &self.regions()[ri];
                            let ps = r.page_size();
                            got.resize(ps, 0);
                            exp.resize(ps, 0);
                            if let Err(e) = r.read(p as usize * ps, &mut got) {
                                bad.push(format!("region {ri} page {p}: {e}"));
                                continue;
                            }
                            want(ri, p, &mut exp);
                            if got != exp && bad.len() < 10 {
                                bad.push(format!("region {ri} page {p}"));
                            }
                        }
                        bad
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|_| vec!["a vCPU panicked".into()]))
                .collect()
        })
    }

    /// Gives up on the handler: unregisters every region from the
    /// userfaultfd and wakes every thread blocked in a fault on it, so that
    /// a test whose handler died fails (a page that never came reads as
    /// zeros) instead of waiting for good.
    pub fn abandon(&self) {
        for r in self.regions() {
            let _ = self.uffd.unregister(r.addr(), r.len());
            let _ = self.uffd.wake(r.addr(), r.len());
        }
    }

    /// Firecracker exits: its end of the socket closes.
    pub fn close(&mut self) {
        self.stream = None;
    }
}

/// `[{"base_host_virt_addr":..,"size":..,"offset":..,"page_size":..,"page_size_kib":..}]`,
/// written here rather than by the engine, so that the handler's parser
/// meets Firecracker's format and not its own.
pub fn mappings_json(regions: &[GuestRegion]) -> String {
    let mut offset = 0usize;
    let items: Vec<String> = regions
        .iter()
        .map(|r| {
            let ps = r.page_size();
            let s = format!(
                r#"{{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":{ps},"page_size_kib":{ps}}}"#,
                r.addr(),
                r.len(),
                offset
            );
            offset += r.len();
            s
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// Connects to the handler's socket, waiting up to 10 s for it to appear.
fn connect(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot connect to the handler at {}: {e}", socket.display()),
        }
    }
}

/// Fisher-Yates with the harness's mixer: the same order for the same seed.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed;
    for i in (1..v.len()).rev() {
        x = mix(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
        let j = (x % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}
