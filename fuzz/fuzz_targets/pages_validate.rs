//! Decode a `Pages` body, then validate it against a fixed layout: never
//! panics, and an accepted header really lies inside its region with a
//! payload of exactly `count * page_size` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfault_proto::{
    Layout, PageKind, PageSize, PagesHeader, RegionDesc, MAX_PAGES_PER_FRAME, MAX_PAYLOAD_LEN,
    PAGES_BODY_LEN,
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
    let layout = layout();
    if let Ok(payload) = h.validate(&layout) {
        let region = layout.region(h.region).expect("validated region exists");
        assert!(h.count > 0 && h.count <= MAX_PAGES_PER_FRAME);
        let end = h
            .first_page
            .checked_add(u64::from(h.count))
            .expect("no overflow");
        assert!(end <= region.page_count());
        match h.kind {
            PageKind::Data => {
                assert_eq!(payload, u64::from(h.count) * region.page_size.bytes());
                assert_eq!(payload, u64::from(h.payload_len));
                assert!(payload <= u64::from(MAX_PAYLOAD_LEN));
            }
            PageKind::Zero | PageKind::Unpopulated => assert_eq!(payload, 0),
        }
    }
});
