//! RLE page sets: arbitrary sets round-trip across chunk boundaries, and
//! the size bounds the migration relies on.

mod common;

use common::*;
use proptest::prelude::*;
use ringfault_proto::rle::encode_rle_chunks_limited;
use ringfault_proto::*;

/// Normalised (merged, sorted, non-empty) ranges of a page set.
fn normalise(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(f, c) in ranges.iter().filter(|r| r.1 > 0) {
        match out.last_mut() {
            Some((lf, lc)) if *lf + *lc == f => *lc += c,
            _ => out.push((f, c)),
        }
    }
    out
}

/// Sends each chunk through the wire, validates it, checks the chunks tile
/// the region in order with `last` only at the end, and returns the set.
fn decode_all(
    region: u32,
    page_count: u64,
    chunks: &[RleChunk],
    layout: &Layout,
) -> Vec<(u64, u64)> {
    let mut next = 0u64;
    let mut set = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let m = Message::PresentBitmap(c.clone());
        let bytes = m.to_vec();
        assert!(bytes.len() <= FRAME_HEADER_LEN + MAX_BODY_LEN);
        assert!(c.encoded_runs_len() <= MAX_RLE_CHUNK);
        let Ok(Message::PresentBitmap(d)) = decode_bytes(&bytes) else {
            panic!("chunk {i} did not decode")
        };
        assert_eq!(&d, c);
        assert_eq!(d.validate(layout), Ok(()));
        assert_eq!(d.region, region);
        assert_eq!(d.first_page, next, "chunk {i} is not contiguous");
        assert_eq!(d.last, i + 1 == chunks.len());
        next += d.page_count;
        set.extend(d.set_ranges());
    }
    assert_eq!(next, page_count);
    normalise(&set)
}

fn one_region(page_count: u64) -> Layout {
    Layout {
        regions: vec![RegionDesc {
            id: 3,
            page_size: PageSize::Size4K,
            size: page_count << 12,
        }],
    }
}

fn arb_set() -> impl Strategy<Value = (u64, Vec<(u64, u64)>)> {
    (
        proptest::collection::vec((0u64..300, 1u64..300), 0..400),
        0u64..300,
    )
        .prop_map(|(pairs, tail)| {
            let mut pos = 0;
            let mut ranges = Vec::new();
            for (gap, len) in pairs {
                pos += gap;
                ranges.push((pos, len));
                pos += len;
            }
            (pos + tail, ranges)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_sets_round_trip((page_count, ranges) in arb_set(), limit in 20usize..200) {
        prop_assume!(page_count > 0);
        let layout = one_region(page_count);
        let expected = normalise(&ranges);
        // Small limit: many chunk boundaries, including ones falling on set runs.
        let chunks = encode_rle_chunks_limited(3, page_count, ranges.iter().copied(), limit);
        prop_assert!(chunks.iter().all(|c| c.encoded_runs_len() <= limit));
        prop_assert_eq!(decode_all(3, page_count, &chunks, &layout), expected.clone());
        // Full-size chunks: one chunk for a set this small.
        let chunks = encode_rle_chunks(3, page_count, ranges.iter().copied());
        prop_assert_eq!(chunks.len(), 1);
        prop_assert_eq!(decode_all(3, page_count, &chunks, &layout), expected);
    }

    #[test]
    fn sloppy_input_is_normalised(
        page_count in 1u64..5000,
        ranges in proptest::collection::vec((0u64..6000, 0u64..500), 0..50),
    ) {
        let mut bits = vec![false; usize::try_from(page_count).unwrap()];
        let mut cursor = 0u64; // earlier ranges win, as documented
        for &(f, c) in &ranges {
            let end = (f + c).min(page_count);
            if f.max(cursor) >= end {
                continue; // empty after clipping: skipped, cursor unchanged
            }
            for p in f.max(cursor)..end {
                bits[usize::try_from(p).unwrap()] = true;
            }
            cursor = cursor.max(end);
        }
        let expected: Vec<(u64, u64)> = normalise(
            &bits.iter().enumerate().filter(|(_, b)| **b).map(|(i, _)| (u64::try_from(i).unwrap(), 1)).collect::<Vec<_>>(),
        );
        let chunks = encode_rle_chunks_limited(3, page_count, ranges, 24);
        prop_assert_eq!(decode_all(3, page_count, &chunks, &one_region(page_count)), expected);
    }
}

#[test]
fn huge_region_all_set_or_clear_is_tiny() {
    let pages = 128u64 << 20; // 128 Mi pages = 512 GiB of 4K pages
    let layout = one_region(pages);
    for ranges in [vec![(0, pages)], vec![]] {
        let chunks = encode_rle_chunks(3, pages, ranges.clone());
        assert_eq!(chunks.len(), 1);
        let frame = Message::PresentBitmap(chunks[0].clone()).to_vec();
        assert!(frame.len() < 64, "{} bytes", frame.len());
        assert_eq!(decode_all(3, pages, &chunks, &layout), ranges);
    }
}

#[test]
fn random_half_full_bitmap_splits_into_chunks() {
    let pages = 1u64 << 20;
    let mut state = 0x9e37_79b9_7f4a_7c15u64; // xorshift64: deterministic
    let mut ranges = Vec::new();
    for p in 0..pages {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if state & 1 == 1 {
            ranges.push((p, 1));
        }
    }
    let chunks = encode_rle_chunks(3, pages, ranges.iter().copied());
    assert!(chunks.len() > 1, "{} chunks", chunks.len());
    for c in &chunks {
        assert!(c.encoded_runs_len() <= MAX_RLE_CHUNK);
        // Greedy packing: every chunk but the last is nearly full.
        if !c.last {
            assert!(c.encoded_runs_len() > MAX_RLE_CHUNK - 2 * varint::MAX_VARINT_LEN);
        }
    }
    assert_eq!(
        decode_all(3, pages, &chunks, &one_region(pages)),
        normalise(&ranges)
    );
}

#[test]
fn empty_region_gives_no_chunk() {
    assert!(encode_rle_chunks(3, 0, [(0, 5)]).is_empty());
}

#[test]
fn zero_ranges_chunks_round_trip() {
    // ZeroRanges carries the same chunks as PresentBitmap, under its own kind.
    let pages = 5000u64;
    let ranges = [(0u64, 10u64), (100, 1), (4990, 10)];
    let chunks = encode_rle_chunks_limited(3, pages, ranges, 24);
    let mut next = 0;
    let mut set = Vec::new();
    for c in &chunks {
        let bytes = Message::ZeroRanges(c.clone()).to_vec();
        assert_eq!(bytes[..2], MsgKind::ZeroRanges.to_wire().to_le_bytes());
        let Ok(Message::ZeroRanges(d)) = decode_bytes(&bytes) else {
            panic!("ZeroRanges chunk did not decode")
        };
        assert_eq!(&d, c);
        assert_eq!(d.validate(&one_region(pages)), Ok(()));
        assert_eq!(d.first_page, next);
        next += d.page_count;
        set.extend(d.set_ranges());
    }
    assert_eq!(next, pages);
    assert_eq!(normalise(&set), ranges);
}
