//! The present bitmap: one bit per guest page, set by every install and read by
//! every fault and every pusher decision.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringfault_engine::bitmap::AtomicBitmap;

const PAGES: u64 = 1 << 18; // 1 GiB of 4 KiB pages

fn bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    g.throughput(Throughput::Elements(1));
    let bm = AtomicBitmap::new(PAGES);
    let mut i = 0u64;
    g.bench_function("test_and_set/sequential", |b| {
        b.iter(|| {
            i = (i + 1) % PAGES;
            if i == 0 {
                bm.clear_range(0, PAGES);
            }
            bm.test_and_set(black_box(i))
        })
    });
    let bm = AtomicBitmap::new(PAGES);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    g.bench_function("test_and_set/random", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bm.test_and_set(black_box(x % PAGES))
        })
    });
    g.bench_function("is_set/random", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bm.is_set(black_box(x % PAGES))
        })
    });
    g.throughput(Throughput::Elements(64));
    let bm = AtomicBitmap::new(PAGES);
    let mut first = 0u64;
    g.bench_function("set_range/64_pages_unaligned", |b| {
        b.iter(|| {
            first = (first + 64 + 3) % (PAGES - 128);
            bm.set_range(black_box(first), 64)
        })
    });
    g.throughput(Throughput::Elements(PAGES));
    let bm = AtomicBitmap::new(PAGES);
    bm.set_range(0, PAGES - 1);
    g.bench_function("next_clear_run/scan_1GiB", |b| {
        b.iter(|| bm.next_clear_run(black_box(0), 64))
    });
    g.bench_function("count", |b| b.iter(|| bm.count()));
    g.finish();
}

criterion_group!(benches, bitmap);
criterion_main!(benches);
