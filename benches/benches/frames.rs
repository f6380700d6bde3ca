//! Hot-path frame work: what every page run and every demand request costs in
//! header encoding, decoding and validation, and what a frame tag costs.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringfault_proto::{
    decode_frame, encode_demand_frame, encode_pages_head, DemandEntry, FrameHeader, Layout,
    Message, PageKind, PageSize, PagesHeader, Protection, RegionDesc, Sealer, FRAME_HEADER_LEN,
};

fn layout() -> Layout {
    Layout {
        regions: vec![RegionDesc {
            id: 1,
            page_size: PageSize::Size4K,
            size: 1 << 30,
        }],
    }
}

fn frames(c: &mut Criterion) {
    let layout = layout();
    let pages = PagesHeader {
        region: 1,
        kind: PageKind::Data,
        pad_len: 0,
        first_page: 12_345,
        count: 64,
        payload_len: 64 * 4096,
        request_id: 0,
    };
    let entries = [DemandEntry {
        region: 1,
        page: 99_999,
        before: 0,
        after: 15,
    }];
    let mut g = c.benchmark_group("frames");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pages/encode", |b| {
        b.iter(|| encode_pages_head(black_box(&pages)))
    });
    let wire = encode_pages_head(&pages);
    g.bench_function("pages/decode+validate", |b| {
        b.iter(|| {
            let w = black_box(&wire);
            let h = w
                .first_chunk::<FRAME_HEADER_LEN>()
                .and_then(|hdr| FrameHeader::parse(hdr).ok());
            let p = PagesHeader::decode_body(&w[FRAME_HEADER_LEN..]).ok();
            (h, p.and_then(|p| p.validate(&layout).ok()))
        })
    });
    let mut out = Vec::with_capacity(64);
    g.bench_function("demand/encode", |b| {
        b.iter(|| {
            out.clear();
            encode_demand_frame(7, black_box(&entries), &mut out)
        })
    });
    let mut wire = Vec::new();
    encode_demand_frame(7, &entries, &mut wire);
    g.bench_function("demand/decode_frame+validate", |b| {
        b.iter(|| {
            decode_frame(black_box(&wire)).ok().flatten().map(|(m, n)| {
                let ok = match &m {
                    Message::Demand(d) => d.validate(&layout).is_ok(),
                    _ => false,
                };
                (ok, n)
            })
        })
    });
    g.finish();

    // The tag of a bulk frame of 64 pages (`--integrity mac`, the default).
    let mut g = c.benchmark_group("seal");
    let payload = vec![0x5a_u8; 64 * 4096];
    g.throughput(Throughput::Bytes(payload.len() as u64));
    let Ok(mut sealer) = Sealer::new(Protection::Mac, &[7; 32]) else {
        eprintln!("SKIPPED seal/mac: the cipher refused the key");
        g.finish();
        return;
    };
    let head = encode_pages_head(&pages);
    g.bench_function("mac/256KiB", |b| {
        b.iter(|| sealer.seal(black_box(&head), black_box(&payload)))
    });
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
