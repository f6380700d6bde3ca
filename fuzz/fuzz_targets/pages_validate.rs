//! Decode a `Pages` body, then validate it against a fixed layout: never
//! panics, and an accepted header really lies inside its region; `Data` has
//! at most `MAX_PAGES_PER_FRAME` pages, a pad of at most `MAX_PAD_LEN` bytes
//! and a payload of exactly `count * page_size` bytes; `Zero`/`Unpopulated`
//! (up to `u32::MAX` pages) have neither pad nor payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfault_proto::{
    encode_pages_head, Layout, PageKind, PageSize, PagesHeader, RegionDesc, FRAME_HEADER_LEN,
    MAX_PAD_LEN, MAX_PAGES_PER_FRAME, MAX_PAYLOAD_LEN, PAGES_BODY_LEN,
};

fn layout() -> Layout {
    Layout {
        regions: vec![
            RegionDesc {
                id: 0,
                page_size: PageSize::Size4K,
                size: 1 << 32,
            },
            RegionDesc {
                id: 1,
                page_size: PageSize::Size2M,
                size: 64 << 21,
            },
            RegionDesc {
                id: 5,
                page_size: PageSize::Size1G,
                size: 4 << 30,
            },
            // 2^32 pages: room for a `Zero` frame of u32::MAX pages.
            RegionDesc {
                id: 2,
                page_size: PageSize::Size4K,
                size: 1 << 44,
            },
            RegionDesc {
                id: 0xffff_ffff,
                page_size: PageSize::Size4K,
                size: 4096,
            },
        ],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(body) = data.get(..PAGES_BODY_LEN) else {
        return;
    };
    let Ok(h) = PagesHeader::decode_body(body) else {
        return;
    };
    assert_eq!(&h.encode_body()[..], body);
    assert_eq!(&encode_pages_head(&h)[FRAME_HEADER_LEN..], body);
    let layout = layout();
    if let Ok(payload) = h.validate(&layout) {
        let region = layout.region(h.region).expect("validated region exists");
        assert!(h.count > 0);
        let end = h
            .first_page
            .checked_add(u64::from(h.count))
            .expect("no overflow");
        assert!(end <= region.page_count());
        match h.kind {
            PageKind::Data => {
                assert!(h.count <= MAX_PAGES_PER_FRAME);
                assert!(h.pad_len <= MAX_PAD_LEN);
                assert_eq!(payload, u64::from(h.count) * region.page_size.bytes());
                assert_eq!(payload, u64::from(h.payload_len));
                assert!(payload <= u64::from(MAX_PAYLOAD_LEN));
            }
            PageKind::Zero | PageKind::Unpopulated => {
                assert_eq!(payload, 0);
                assert_eq!((h.pad_len, h.payload_len), (0, 0));
            }
        }
    }
});
