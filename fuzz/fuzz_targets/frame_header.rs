//! `FrameHeader::parse` on arbitrary 8 bytes: never panics, and an accepted
//! header re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfault_proto::{FrameHeader, FRAME_HEADER_LEN, MAX_BODY_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.first_chunk::<FRAME_HEADER_LEN>() else {
        return;
    };
    if let Ok(h) = FrameHeader::parse(bytes) {
        assert_eq!(&h.encode(), bytes);
        assert!(h.body_len_usize() <= MAX_BODY_LEN);
        if let Some(fixed) = h.kind.fixed_body_len() {
            assert_eq!(h.body_len_usize(), fixed);
        }
    }
});
