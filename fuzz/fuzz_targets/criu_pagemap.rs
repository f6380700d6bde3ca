//! CRIU image readers (`ringfault_engine::criu::image`): any bytes as
//! `pagemap-1.img`, `pstree.img` and `mm-1.img`, and as a page server reply.
//! Nothing may panic or allocate beyond the input's bounds, and an accepted
//! pagemap must hold what its checks promise.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ringfault_engine::criu::image::{self, MAX_USER_ADDR, PAGE_SIZE, PE_PRESENT};
use ringfault_engine::criu::psi::{self, Psi};

fuzz_target!(|data: &[u8]| {
    if let Ok(pm) = image::parse_pagemap(Path::new("pagemap-1.img"), data) {
        let mut prev_end = 0u64;
        let mut offset = 0u64;
        for e in &pm.entries {
            assert!(e.pages > 0);
            assert_eq!(e.vaddr % PAGE_SIZE, 0);
            assert!(e.vaddr >= prev_end);
            assert!(e.end() <= MAX_USER_ADDR);
            prev_end = e.end();
            if e.flags & PE_PRESENT != 0 {
                assert_eq!(e.pages_offset, Some(offset));
                offset += e.pages * PAGE_SIZE;
            } else {
                assert_eq!(e.pages_offset, None);
            }
        }
        assert_eq!(offset, pm.pages_bytes);
    }
    let _ = image::parse_pstree(Path::new("pstree.img"), data);
    if let Ok(vmas) = image::parse_mm(Path::new("mm-1.img"), data) {
        for w in vmas.windows(2) {
            assert!(w[0].end <= w[1].start);
        }
    }
    if let (Some(reply), Some(asked)) = (Psi::decode(data), data.get(32..).and_then(Psi::decode)) {
        if let Ok(n) = psi::check_reply(&reply, &asked) {
            assert!(n >= 1 && n <= asked.nr_pages);
        }
    }
});
