//! `RleChunk` decode + validate + `set_ranges`: never panics; an accepted
//! chunk re-encodes to the same bytes, its set ranges are ascending,
//! disjoint and inside the chunk, and re-encoding those ranges with
//! `encode_rle_chunks` gives back the same set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfault_proto::{encode_rle_chunks, Layout, PageSize, RegionDesc, RleChunk, MAX_RLE_CHUNK};

fn layout() -> Layout {
    Layout {
        regions: vec![
            RegionDesc {
                id: 0,
                page_size: PageSize::Size4K,
                size: 1 << 40,
            },
            RegionDesc {
                id: 3,
                page_size: PageSize::Size2M,
                size: 1 << 30,
            },
        ],
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(chunk) = RleChunk::decode_body(data) else {
        return;
    };
    let mut bytes = Vec::new();
    chunk.encode_body(&mut bytes);
    assert_eq!(bytes, data);
    assert!(chunk.encoded_runs_len() <= MAX_RLE_CHUNK);

    let end = chunk.first_page + chunk.page_count; // checked by decode
    let ranges: Vec<(u64, u64)> = chunk.set_ranges().collect();
    let mut prev_end = chunk.first_page;
    for &(first, count) in &ranges {
        assert!(count > 0);
        assert!(first >= prev_end, "ranges not ascending/disjoint");
        prev_end = first + count;
        assert!(prev_end <= end);
    }

    let _ = chunk.validate(&layout());

    // Same set, re-encoded relative to the chunk start, in full-size chunks.
    let relative = ranges.iter().map(|&(f, c)| (f - chunk.first_page, c));
    let again = encode_rle_chunks(chunk.region, chunk.page_count, relative);
    let back: Vec<(u64, u64)> = again
        .iter()
        .flat_map(|c| {
            c.set_ranges()
                .map(|(f, n)| (f + chunk.first_page, n))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(back, ranges);
    assert_eq!(again.last().map(|c| c.last), Some(true));
});
