//! Hot-path frame encoding and decoding: what every page run and every demand
//! request costs in header work.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringfault_proto::{
    decode_frame, encode_demand_frame, encode_pages_frame, DemandRequest, FrameHeader, Layout,
    PageKind, PageSize, PagesHeader, RegionDesc, FRAME_HEADER_LEN,
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
        first_page: 12_345,
        count: 64,
        payload_len: 64 * 4096,
        request_id: 0,
    };
    let demand = DemandRequest {
        request_id: 7,
        region: 1,
        page: 99_999,
        before: 0,
        after: 15,
    };
    let mut g = c.benchmark_group("frames");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pages/encode", |b| {
        b.iter(|| encode_pages_frame(black_box(&pages)))
    });
    let wire = encode_pages_frame(&pages);
    g.bench_function("pages/decode+validate", |b| {
        b.iter(|| {
            let hdr: &[u8; FRAME_HEADER_LEN] = black_box(&wire)[..FRAME_HEADER_LEN]
                .try_into()
                .unwrap_or(&[0; FRAME_HEADER_LEN]);
            let h = FrameHeader::parse(hdr).ok();
            let p = PagesHeader::decode_body(&wire[FRAME_HEADER_LEN..]).ok();
            (h, p.and_then(|p| p.validate(&layout).ok()))
        })
    });
    g.bench_function("demand/encode", |b| {
        b.iter(|| encode_demand_frame(black_box(&demand)))
    });
    let wire = encode_demand_frame(&demand);
    g.bench_function("demand/decode_frame+validate", |b| {
        b.iter(|| {
            decode_frame(black_box(&wire)).ok().flatten().map(|(m, n)| {
                let ok = match &m {
                    ringfault_proto::Message::Demand(d) => d.validate(&layout).is_ok(),
                    _ => false,
                };
                (ok, n)
            })
        })
    });
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
