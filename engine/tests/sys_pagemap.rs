//! `PAGEMAP_SCAN` on `/proc/self/pagemap` against the real kernel: populated
//! ranges, the shared zero page, huge pages, and bounded steps.

use std::error::Error;

use ringfault_engine::sys::guest::{GuestMemory, GuestRegion, RegionSpec};
use ringfault_engine::sys::mapping::{MapOptions, PAGE_2M, PAGE_4K};
use ringfault_engine::sys::pagemap::{
    PagemapError, Query, ScanRange, Scanner, MAX_REGIONS_PER_CALL, PAGE_IS_HUGE, PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
};
use ringfault_testkit::skip;

type TestResult = Result<(), Box<dyn Error>>;

fn memory(size: usize, thp: bool) -> Result<GuestMemory, Box<dyn Error>> {
    Ok(GuestMemory::anonymous(
        &[RegionSpec {
            id: 1,
            size,
            page_size: PAGE_4K,
        }],
        MapOptions {
            thp,
            populate: false,
        },
    )?)
}

/// The populated ranges of a region, as (first page, end page, categories).
fn ranges(s: &mut Scanner, r: &GuestRegion) -> Result<Vec<(usize, usize, u64)>, PagemapError> {
    Ok(s.scan(r.addr(), r.addr() + r.len(), Query::Populated)?
        .iter()
        .map(|x: &ScanRange| {
            (
                (x.start - r.addr()) / PAGE_4K,
                (x.end - r.addr()) / PAGE_4K,
                x.categories,
            )
        })
        .collect())
}

/// A scanner, or `None` (after saying why) on a kernel without `PAGEMAP_SCAN`.
fn scanner() -> Result<Option<Scanner>, PagemapError> {
    match Scanner::new() {
        Ok(s) => Ok(Some(s)),
        Err(PagemapError::Unsupported) => Ok(None),
        Err(e) => Err(e),
    }
}

#[test]
fn every_third_page_touched() -> TestResult {
    let Some(mut s) = scanner()? else {
        skip!("PAGEMAP_SCAN needs Linux 6.7");
    };
    let pages = 200;
    let m = memory(pages * PAGE_4K, false)?;
    let r = &m.regions()[0];
    for p in (0..pages).step_by(3) {
        r.write(p * PAGE_4K + 1, &[1])?;
    }
    let got = ranges(&mut s, r)?;
    // Each written page is its own range: its neighbours are missing.
    let want: Vec<(usize, usize, u64)> = (0..pages)
        .step_by(3)
        .map(|p| (p, p + 1, PAGE_IS_PRESENT))
        .collect();
    assert_eq!(got, want);
    // A walk must start on a page boundary.
    match s.scan(r.addr() + 1, r.addr() + PAGE_4K, Query::Populated) {
        Err(PagemapError::Scan { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL), "{source}")
        }
        other => panic!("an unaligned start must be refused: {other:?}"),
    }
    Ok(())
}

#[test]
fn reads_map_the_zero_page_and_writes_do_not() -> TestResult {
    let Some(mut s) = scanner()? else {
        skip!("PAGEMAP_SCAN needs Linux 6.7");
    };
    let m = memory(16 * PAGE_4K, false)?;
    let r = &m.regions()[0];
    r.write(4 * PAGE_4K, &[1])?;
    r.write(5 * PAGE_4K, &[0])?; // written, even if with zeros
    assert_eq!(r.load_u64(9 * PAGE_4K)?, 0); // a read maps the shared zero page
    let got = ranges(&mut s, r)?;
    assert_eq!(
        got,
        vec![
            (4, 6, PAGE_IS_PRESENT),
            (9, 10, PAGE_IS_PRESENT | PAGE_IS_PFNZERO)
        ]
    );
    Ok(())
}

#[test]
fn huge_pages_are_reported_in_4k_units() -> TestResult {
    let Some(mut s) = scanner()? else {
        skip!("PAGEMAP_SCAN needs Linux 6.7");
    };
    // Transparent huge pages may or may not back a touched 2 MiB page (the
    // kernel falls back to 4 KiB pages when it has none free): either way only
    // huge pages 1 and 3 hold populated pages, and a range reported as huge
    // covers its whole 2 MiB page.
    let m = memory(4 * PAGE_2M, true)?;
    let r = &m.regions()[0];
    r.write(PAGE_2M, &[1])?;
    r.write(3 * PAGE_2M + 5 * PAGE_4K, &[1])?;
    let got = ranges(&mut s, r)?;
    let per_huge = PAGE_2M / PAGE_4K;
    assert!(!got.is_empty());
    for &(first, end, cat) in &got {
        let huge = first / per_huge;
        assert!(huge == 1 || huge == 3, "pages {first}..{end} populated");
        assert_eq!(huge, (end - 1) / per_huge, "a range stays in its huge page");
        if cat & PAGE_IS_HUGE != 0 {
            assert_eq!((first % per_huge, end - first), (0, per_huge), "{got:?}");
        }
    }
    let has = |page: usize| got.iter().any(|&(f, e, _)| f <= page && page < e);
    assert!(has(per_huge) && has(3 * per_huge + 5), "{got:?}");
    Ok(())
}

#[test]
fn a_long_walk_goes_in_bounded_steps() -> TestResult {
    let Some(mut s) = scanner()? else {
        skip!("PAGEMAP_SCAN needs Linux 6.7");
    };
    // More separate ranges than one ioctl returns.
    let pages = 2 * MAX_REGIONS_PER_CALL + 10;
    let m = memory(2 * pages * PAGE_4K, false)?;
    let r = &m.regions()[0];
    for p in 0..pages {
        r.write(2 * p * PAGE_4K, &[1])?;
    }
    let (start, end) = (r.addr(), r.addr() + r.len());
    let mut out = Vec::new();
    let stopped = s.scan_step(start, end, Query::Populated, &mut out)?;
    assert_eq!(
        out.len(),
        MAX_REGIONS_PER_CALL,
        "one step returns at most its share"
    );
    assert!(stopped > start && stopped < end, "the walk stopped early");
    let mut at = stopped;
    let mut steps = 1;
    while at < end {
        at = s.scan_step(at, end, Query::Populated, &mut out)?;
        steps += 1;
    }
    assert_eq!(steps, 3);
    assert_eq!(out.len(), pages);
    for (i, x) in out.iter().enumerate() {
        assert_eq!((x.start - start) / PAGE_4K, 2 * i, "range {i}");
        assert_eq!(x.end - x.start, PAGE_4K, "range {i}");
    }
    assert_eq!(s.scan(start, end, Query::Populated)?, out);
    Ok(())
}

#[test]
fn a_walk_past_the_kernels_own_buffer_reports_each_range_once() -> TestResult {
    let Some(mut s) = scanner()? else {
        skip!("PAGEMAP_SCAN needs Linux 6.7");
    };
    // More ranges than the kernel buffers internally (512) but fewer than one
    // call may return: the kernel flushes its buffer mid-walk and goes on.
    let pages = 1500;
    let m = memory(2 * pages * PAGE_4K, false)?;
    let r = &m.regions()[0];
    for p in 0..pages {
        r.write(2 * p * PAGE_4K, &[1])?;
    }
    let (start, end) = (r.addr(), r.addr() + r.len());
    let mut out = Vec::new();
    let stopped = s.scan_step(start, end, Query::Populated, &mut out)?;
    assert_eq!(out.len(), pages, "one call returns every range");
    let last_end = out.last().map_or(start, |r| r.end);
    assert!(
        stopped >= last_end,
        "the walk goes on after the last range reported, not from {:#x} before it",
        last_end - stopped.min(last_end)
    );
    let all = s.scan(start, end, Query::Populated)?;
    assert_eq!(all.len(), pages, "each range once");
    Ok(())
}
