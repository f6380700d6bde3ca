//! Page installs into a real userfaultfd-registered anonymous mapping, in pages
//! per second: `UFFDIO_COPY` (4 KiB and 64 KiB calls), `UFFDIO_MOVE` (the
//! source buffer refilled before each move, as a receive would), and
//! `UFFDIO_ZEROPAGE` (4 KiB and 2 MiB calls).
//!
//! Each timed call installs into missing pages; when the mapping is full it is
//! emptied with `MADV_DONTNEED` outside the timed part. Skips, saying why, when
//! userfaultfd (or MOVE) is unavailable.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringfault_engine::sys::install::{copy, zero};
use ringfault_engine::sys::mapping::{AlignedBuf, MapOptions, Mapping, PAGE_4K};
use ringfault_engine::sys::uffd::{Features, RegisterMode, Uffd, UffdOptions};

const REGION: usize = 64 << 20;

struct Target {
    uffd: Uffd,
    m: Mapping,
    next: usize,
}

impl Target {
    fn new(features: Features) -> Option<Target> {
        let uffd = Uffd::open(UffdOptions {
            nonblock: true,
            user_mode_only: false,
        })
        .map_err(|e| eprintln!("SKIPPED install benches: no userfaultfd: {e}"))
        .ok()?;
        uffd.api(features)
            .map_err(|e| eprintln!("SKIPPED install bench: {e}"))
            .ok()?;
        let m = Mapping::anonymous(REGION, PAGE_4K, MapOptions::default())
            .map_err(|e| eprintln!("SKIPPED install benches: mapping: {e}"))
            .ok()?;
        uffd.register(m.addr(), m.len(), RegisterMode::Missing)
            .map_err(|e| eprintln!("SKIPPED install benches: register: {e}"))
            .ok()?;
        Some(Target { uffd, m, next: 0 })
    }

    /// The address of `len` missing bytes; empties the mapping (untimed) when full.
    fn slot(&mut self, len: usize, untimed: &mut Duration) -> usize {
        if self.next + len > REGION {
            let t = Instant::now();
            let _ = self.m.madvise_dontneed(0, REGION);
            *untimed += t.elapsed();
            self.next = 0;
        }
        let a = self.m.addr() + self.next;
        self.next += len;
        a
    }
}

fn timed(t: &mut Target, iters: u64, len: usize, mut f: impl FnMut(&Uffd, usize)) -> Duration {
    let mut untimed = Duration::ZERO;
    let start = Instant::now();
    for _ in 0..iters {
        let dst = t.slot(len, &mut untimed);
        f(&t.uffd, dst);
    }
    start.elapsed().saturating_sub(untimed)
}

fn install(c: &mut Criterion) {
    let Some(mut t) = Target::new(Features::NONE) else {
        return;
    };
    let buf = AlignedBuf::new(64 << 10).unwrap_or_else(|e| panic!("buffer: {e}"));
    let mut g = c.benchmark_group("install");
    g.throughput(Throughput::Elements(1));
    g.bench_function("copy/4KiB", |b| {
        b.iter_custom(|n| {
            timed(&mut t, n, PAGE_4K, |u, dst| {
                let _ = copy(u, dst, &buf.as_slice()[..PAGE_4K], true);
            })
        })
    });
    g.bench_function("zeropage/4KiB", |b| {
        b.iter_custom(|n| {
            timed(&mut t, n, PAGE_4K, |u, dst| {
                let _ = zero(u, dst, PAGE_4K, true);
            })
        })
    });
    g.throughput(Throughput::Elements(16));
    g.bench_function("copy/64KiB", |b| {
        b.iter_custom(|n| {
            timed(&mut t, n, 64 << 10, |u, dst| {
                let _ = copy(u, dst, buf.as_slice(), true);
            })
        })
    });
    g.throughput(Throughput::Elements(512));
    g.bench_function("zeropage/2MiB", |b| {
        b.iter_custom(|n| {
            timed(&mut t, n, 2 << 20, |u, dst| {
                let _ = zero(u, dst, 2 << 20, true);
            })
        })
    });
    drop(t);
    let Some(mut t) = Uffd::probe()
        .ok()
        .filter(|f| f.contains(Features::MOVE))
        .and_then(|_| Target::new(Features::MOVE))
    else {
        eprintln!("SKIPPED install/move: this kernel has no UFFDIO_MOVE (needs Linux 6.8)");
        g.finish();
        return;
    };
    let mut mbuf = AlignedBuf::new(64 << 10).unwrap_or_else(|e| panic!("buffer: {e}"));
    for (len, name) in [
        (PAGE_4K, "move/4KiB+refill"),
        (64 << 10, "move/64KiB+refill"),
    ] {
        g.throughput(Throughput::Elements(
            u64::try_from(len / PAGE_4K).unwrap_or(1),
        ));
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                timed(&mut t, n, len, |u, dst| {
                    // Refill: a receive would write these pages again.
                    for off in (0..len).step_by(PAGE_4K) {
                        mbuf.as_mut_slice()[off] = 1;
                    }
                    let src = mbuf.as_mut_ptr();
                    // SAFETY: `mbuf` is our private anonymous, page-aligned
                    // buffer, populated just above and borrowed mutably here,
                    // so nothing reads or writes it during the move; its bytes
                    // are not read afterwards (the next round refills them).
                    // `dst` is a missing page range of the registered mapping.
                    let _ = unsafe { u.move_pages(dst, src, len, true, false) };
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, install);
criterion_main!(benches);
