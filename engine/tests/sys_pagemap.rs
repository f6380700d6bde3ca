//! `/proc/self/pagemap` against the real kernel.

use std::error::Error;

use ringfault_engine::sys::mapping::{GuestMapping, MapOptions, PAGE_4K};
use ringfault_engine::sys::pagemap::{is_populated, populated_pages, PagemapError};

#[test]
fn every_third_page_touched() -> Result<(), Box<dyn Error>> {
    let pages = 200; // spans several bitset words
    let m = GuestMapping::anonymous(pages * PAGE_4K, PAGE_4K, MapOptions::default())?;
    for p in (0..pages).step_by(3) {
        m.write_from(p * PAGE_4K + 1, &[1])?;
    }
    let bits = populated_pages(m.addr(), m.len(), PAGE_4K)?;
    assert_eq!(bits.len(), pages.div_ceil(64));
    for p in 0..pages {
        assert_eq!(is_populated(&bits, p), p % 3 == 0, "page {p}");
    }
    assert!(matches!(
        populated_pages(m.addr() + 1, PAGE_4K, PAGE_4K),
        Err(PagemapError::Misaligned { .. })
    ));
    Ok(())
}

#[test]
fn huge_pages_sampled_by_first_entry() -> Result<(), Box<dyn Error>> {
    // A 2 MiB "page size" view of a 4 KiB mapping: a huge page counts as
    // populated iff its first 4 KiB entry is.
    let huge = 2 << 20;
    let m = GuestMapping::anonymous(
        4 * huge,
        PAGE_4K,
        MapOptions {
            thp: true,
            populate: false,
        },
    )?;
    m.write_from(huge, &[1])?;
    m.write_from(3 * huge, &[1])?;
    let bits = populated_pages(m.addr(), m.len(), huge)?;
    assert_eq!(bits, vec![0b1010]);
    Ok(())
}
