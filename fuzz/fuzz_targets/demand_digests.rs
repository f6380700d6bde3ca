//! `Demand` and `Digests` bodies: decode, then validate against a fixed
//! layout. Never panics; an accepted body re-encodes to the same bytes (and
//! a `Demand` to the same frame through the hot-path encoder); a validated
//! one only names pages inside the layout, within every limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfault_proto::{
    encode_demand_frame, DemandRequest, Digests, Layout, Message, PageSize, RegionDesc,
    DEMAND_ENTRY_LEN, DEMAND_HEADER_LEN, MAX_DEMAND_ENTRIES, MAX_DIGESTS, MAX_PREFETCH,
};

fn layout() -> Layout {
    Layout {
        regions: vec![
            RegionDesc {
                id: 0,
                page_size: PageSize::Size4K,
                size: 1 << 20,
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
                size: 1 << 44,
            },
        ],
    }
}

fn demand(body: &[u8]) {
    let Ok(d) = DemandRequest::decode_body(body) else {
        return;
    };
    assert!((1..=MAX_DEMAND_ENTRIES).contains(&d.entries.len()));
    assert_eq!(
        body.len(),
        DEMAND_HEADER_LEN + d.entries.len() * DEMAND_ENTRY_LEN
    );
    let mut out = Vec::new();
    d.encode_body(&mut out);
    assert_eq!(out, body);
    let mut frame = Vec::new();
    let n = encode_demand_frame(d.request_id, &d.entries, &mut frame);
    assert_eq!(n, frame.len());
    assert_eq!(frame, Message::Demand(d.clone()).to_vec());

    let layout = layout();
    if d.validate(&layout).is_ok() {
        assert_ne!(d.request_id, 0);
        for e in &d.entries {
            let region = layout.region(e.region).expect("validated region exists");
            assert!(e.page < region.page_count());
            assert!(e.before <= MAX_PREFETCH && e.after <= MAX_PREFETCH);
        }
    }
}

fn digests(body: &[u8]) {
    let Ok(d) = Digests::decode_body(body) else {
        return;
    };
    assert!((1..=MAX_DIGESTS).contains(&d.digests.len()));
    let mut out = Vec::new();
    d.encode_body(&mut out);
    assert_eq!(out, body);

    let layout = layout();
    if d.validate(&layout).is_ok() {
        let region = layout.region(d.region).expect("validated region exists");
        assert!(d.pages_per_digest > 0);
        // Every group starts inside the region.
        let groups = u64::try_from(d.digests.len()).expect("at most MAX_DIGESTS");
        let last_start = (groups - 1)
            .checked_mul(u64::from(d.pages_per_digest))
            .and_then(|span| span.checked_add(d.first_page))
            .expect("validated span does not overflow");
        assert!(last_start < region.page_count());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        demand(body);
    } else {
        digests(body);
    }
});
