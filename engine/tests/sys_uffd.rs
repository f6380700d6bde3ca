//! userfaultfd against the real kernel: faults, COPY, ZEROPAGE, MOVE, EEXIST,
//! partial progress, and a REMOVE event blocking installs until it is read.

use std::error::Error;

use ringfault_engine::sys::guest::{GuestError, GuestMemory, GuestRegion, RegionSpec};
use ringfault_engine::sys::install::{copy, zero, HugeStage};
use ringfault_engine::sys::mapping::{AlignedBuf, MapError, MapOptions, PAGE_2M, PAGE_4K};
use ringfault_engine::sys::pagemap::{Query, Scanner, PAGE_IS_HUGE};
use ringfault_engine::sys::uffd::{
    Event, Features, Installed, Ioctls, RegisterMode, Uffd, UffdError, UffdMsg, UffdOptions,
    PAGEFAULT_FLAG_WRITE,
};
use ringfault_testkit::{populated_pages, require, skip, uffd_move_supported};

type TestResult = Result<(), Box<dyn Error>>;

const NONBLOCK: UffdOptions = UffdOptions {
    nonblock: true,
    user_mode_only: false,
};

/// Private anonymous memory: one region of `pages` pages of `page_size`.
fn memory(pages: usize, page_size: usize) -> Result<GuestMemory, GuestError> {
    GuestMemory::anonymous(
        &[RegionSpec {
            id: 1,
            size: pages * page_size,
            page_size,
        }],
        MapOptions::default(),
    )
}

/// A uffd with `features`, and a registered anonymous region of `pages` pages.
fn setup(features: Features, pages: usize) -> Result<(Uffd, GuestMemory), Box<dyn Error>> {
    let uffd = Uffd::open(NONBLOCK)?;
    uffd.api(features)?;
    let m = memory(pages, PAGE_4K)?;
    let r = &m.regions()[0];
    let ioctls = uffd.register(r.addr(), r.len(), RegisterMode::Missing)?;
    ioctls.require(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE)?;
    Ok((uffd, m))
}

fn pattern(seed: u8) -> Result<AlignedBuf, Box<dyn Error>> {
    let mut b = AlignedBuf::new(PAGE_4K)?;
    for (x, k) in b.as_mut_slice().iter_mut().zip((0..251u8).cycle()) {
        *x = seed.wrapping_add(k);
    }
    Ok(b)
}

fn next_event(uffd: &Uffd) -> Result<Event, Box<dyn Error>> {
    if !uffd.poll_readable(5000)? {
        return Err("no uffd event within 5 s".into());
    }
    let mut msgs = [UffdMsg::default(); 4];
    let n = uffd.read_events(&mut msgs)?;
    if n != 1 {
        return Err(format!("expected 1 event, read {n}").into());
    }
    Ok(msgs[0].parse())
}

fn populated(r: &GuestRegion) -> Result<Vec<u64>, Box<dyn Error>> {
    Ok(populated_pages(r)?)
}

#[test]
fn fault_is_reported_and_copy_resolves_it() -> TestResult {
    let (uffd, m) = setup(Features::THREAD_ID, 4)?;
    let r = &m.regions()[0];
    let mut none = [UffdMsg::default(); 1];
    assert_eq!(uffd.read_events(&mut none)?, 0, "no event pending yet");
    let src = pattern(7)?;
    std::thread::scope(|s| -> TestResult {
        // A "vCPU" reads page 1 and blocks until we install it.
        let reader = s.spawn(|| {
            let mut b = [0u8; 16];
            r.read(PAGE_4K + 5, &mut b).map(|()| b)
        });
        let ev = next_event(&uffd)?;
        let Event::PageFault {
            addr,
            flags,
            thread_id,
        } = ev
        else {
            return Err(format!("expected a page fault, got {ev:?}").into());
        };
        assert_eq!(usize::try_from(addr)?, r.addr() + PAGE_4K);
        assert_eq!(flags & PAGEFAULT_FLAG_WRITE, 0, "a read fault");
        assert_ne!(thread_id, 0, "THREAD_ID negotiated");
        let done = copy(&uffd, r.addr() + PAGE_4K, src.as_slice(), true)?;
        assert_eq!(done, Installed::Done(PAGE_4K));
        let got = reader.join().map_err(|_| "reader panicked")??;
        assert_eq!(&got[..], &src.as_slice()[5..21]);
        Ok(())
    })?;
    let mut page = vec![0u8; PAGE_4K];
    r.read(PAGE_4K, &mut page)?;
    assert_eq!(&page[..], src.as_slice());

    // EEXIST on the first page: already there, not an error.
    let again = copy(&uffd, r.addr() + PAGE_4K, src.as_slice(), true)?;
    assert_eq!(again, Installed::Exists);

    // Partial progress: page 0 is missing, page 1 exists -> 4 KiB done, EAGAIN.
    let two = AlignedBuf::new(2 * PAGE_4K)?;
    let partial = copy(&uffd, r.addr(), two.as_slice(), true)?;
    assert_eq!(partial, Installed::Again { done: PAGE_4K });
    assert_eq!(populated(r)?, vec![0, 1]);
    Ok(())
}

#[test]
fn write_fault_flags_and_zeropage() -> TestResult {
    let (uffd, m) = setup(Features::NONE, 4)?;
    let r = &m.regions()[0];
    std::thread::scope(|s| -> TestResult {
        let writer = s.spawn(|| r.write(2 * PAGE_4K + 100, b"vcpu"));
        let ev = next_event(&uffd)?;
        let Event::PageFault { addr, flags, .. } = ev else {
            return Err(format!("expected a page fault, got {ev:?}").into());
        };
        assert_eq!(usize::try_from(addr)?, r.addr() + 2 * PAGE_4K);
        assert_ne!(flags & PAGEFAULT_FLAG_WRITE, 0, "a write fault");
        let done = zero(&uffd, r.addr() + 2 * PAGE_4K, PAGE_4K, true)?;
        assert_eq!(done, Installed::Done(PAGE_4K));
        writer.join().map_err(|_| "writer panicked")??;
        Ok(())
    })?;
    let mut b = [0u8; 6];
    r.read(2 * PAGE_4K + 99, &mut b)?;
    assert_eq!(&b, b"\0vcpu\0");

    // ZEROPAGE with nobody waiting, then EEXIST.
    assert_eq!(
        zero(&uffd, r.addr(), PAGE_4K, false)?,
        Installed::Done(PAGE_4K)
    );
    assert!(r.is_zero(0, PAGE_4K)?);
    assert_eq!(zero(&uffd, r.addr(), PAGE_4K, true)?, Installed::Exists);
    assert_eq!(populated(r)?, vec![0, 2]);
    Ok(())
}

#[test]
fn move_installs_without_copy() -> TestResult {
    require!(
        uffd_move_supported(),
        "UFFD_FEATURE_MOVE missing (needs Linux 6.8)"
    );
    let (uffd, m) = setup(Features::MOVE, 4)?;
    let r = &m.regions()[0];
    let ioctls = uffd.register(r.addr(), r.len(), RegisterMode::Missing)?;
    assert!(ioctls.has_move(), "MOVE on anonymous memory: {ioctls:?}");

    // The source of the move: private anonymous memory, page 0 written, page
    // 1 never touched.
    let from = memory(2, PAGE_4K)?;
    let from = &from.regions()[0];
    let pat = pattern(42)?;
    from.write(0, pat.as_slice())?;
    assert_eq!(populated(from)?, vec![0]);
    let src_ptr = from.addr() as *mut u8;
    // SAFETY: `from` page 0 is our populated private anonymous page, which
    // nothing reads afterwards; dst page 3 is missing and registered.
    let done = unsafe { uffd.move_pages(r.addr() + 3 * PAGE_4K, src_ptr, PAGE_4K, true, false)? };
    assert_eq!(done, Installed::Done(PAGE_4K));
    let mut page = vec![0u8; PAGE_4K];
    r.read(3 * PAGE_4K, &mut page)?;
    assert_eq!(&page[..], pat.as_slice());
    assert!(
        populated(from)?.is_empty(),
        "the source page was taken away"
    );

    // An unpopulated source: ENOENT, or skipped with ALLOW_SRC_HOLES.
    let hole = src_ptr.wrapping_add(PAGE_4K);
    // SAFETY: as above; `from` page 1 is ours and unpopulated.
    let e = unsafe { uffd.move_pages(r.addr(), hole, PAGE_4K, true, false) };
    match e {
        Err(UffdError::Range { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
        }
        other => return Err(format!("expected ENOENT, got {other:?}").into()),
    }
    // SAFETY: as above.
    let done = unsafe { uffd.move_pages(r.addr(), hole, PAGE_4K, true, true)? };
    assert_eq!(done, Installed::Done(PAGE_4K));
    assert_eq!(populated(r)?, vec![3], "a hole moves nothing");
    Ok(())
}

/// A whole 2 MiB range goes into THP guest memory as one huge page: copied
/// into a `HugeStage`, moved as a PMD; every byte arrives, the range is one
/// huge page (nothing to collapse), and the stage is ready again. Into a
/// range that already holds a page, the stage moves no further than that page
/// and leaves it alone.
#[test]
fn huge_stage_moves_a_whole_huge_page() -> TestResult {
    require!(
        uffd_move_supported(),
        "UFFD_FEATURE_MOVE missing (needs Linux 6.8)"
    );
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    require!(
        thp.contains("[madvise]") || thp.contains("[always]"),
        "transparent huge pages are off here ({})",
        thp.trim()
    );
    let uffd = Uffd::open(NONBLOCK)?;
    uffd.api(Features::MOVE)?;
    let m = GuestMemory::anonymous(
        &[RegionSpec {
            id: 1,
            size: 2 * PAGE_2M,
            page_size: PAGE_4K,
        }],
        MapOptions {
            thp: true,
            populate: false,
        },
    )?;
    let r = &m.regions()[0];
    uffd.register(r.addr(), r.len(), RegisterMode::Missing)?;
    let bytes: Vec<u8> = (0..PAGE_2M)
        .map(|i| u8::try_from(i * 7 % 253).unwrap_or(0))
        .collect();

    let mut stage = HugeStage::new()?;
    assert_eq!(
        stage.install(&uffd, r.addr(), &bytes)?,
        Installed::Done(PAGE_2M)
    );
    let mut back = vec![0u8; PAGE_2M];
    r.read(0, &mut back)?;
    assert!(
        back == bytes,
        "the moved huge page differs from what was staged"
    );
    let ranges = Scanner::new()?.scan(r.addr(), r.addr() + PAGE_2M, Query::Populated)?;
    let huge: usize = ranges
        .iter()
        .filter(|x| x.categories & PAGE_IS_HUGE != 0)
        .map(|x| x.end - x.start)
        .sum();
    if huge == 0 {
        skip!("the kernel had no free huge page for the stage: installed in 4 KiB pages");
    }
    assert_eq!(huge, PAGE_2M, "the range is one huge page: {ranges:?}");

    // The second range already holds page 5: the move stops there (EEXIST or
    // partial progress), page 5 keeps its bytes, and the stage is empty again.
    let five = pattern(9)?;
    copy(
        &uffd,
        r.addr() + PAGE_2M + 5 * PAGE_4K,
        five.as_slice(),
        true,
    )?;
    let out = stage.install(&uffd, r.addr() + PAGE_2M, &bytes)?;
    assert!(
        !matches!(out, Installed::Done(n) if n == PAGE_2M),
        "a move over a present page must not report the whole range: {out:?}"
    );
    let mut page = vec![0u8; PAGE_4K];
    r.read(PAGE_2M + 5 * PAGE_4K, &mut page)?;
    assert_eq!(
        &page[..],
        five.as_slice(),
        "the present page was overwritten"
    );
    // A misaligned destination is refused before the kernel is asked.
    assert!(stage.install(&uffd, r.addr() + PAGE_4K, &bytes).is_err());
    Ok(())
}

#[test]
fn pending_remove_event_blocks_installs_until_read() -> TestResult {
    let (uffd, m) = setup(Features::EVENT_REMOVE, 4)?;
    let r = &m.regions()[0];
    let src = pattern(1)?;
    assert_eq!(
        copy(&uffd, r.addr(), src.as_slice(), true)?,
        Installed::Done(PAGE_4K)
    );
    std::thread::scope(|s| -> TestResult {
        // MADV_DONTNEED sleeps until the REMOVE event is read.
        let zapper = s.spawn(|| r.discard(0, PAGE_4K));
        if !uffd.poll_readable(5000)? {
            return Err("no REMOVE event within 5 s".into());
        }
        let blocked = copy(&uffd, r.addr() + PAGE_4K, src.as_slice(), true)?;
        assert_eq!(
            blocked,
            Installed::Again { done: 0 },
            "a pending REMOVE blocks installs"
        );
        let ev = next_event(&uffd)?;
        let start = u64::try_from(r.addr())?;
        assert_eq!(
            ev,
            Event::Remove {
                start,
                end: start + 4096
            }
        );
        zapper.join().map_err(|_| "zapper panicked")??;
        Ok(())
    })?;
    // The event is read and the zapper has resumed: installs work again.
    assert_eq!(
        copy(&uffd, r.addr() + PAGE_4K, src.as_slice(), true)?,
        Installed::Done(PAGE_4K)
    );
    assert_eq!(
        populated(r)?,
        vec![1],
        "page 0 was zapped, page 1 installed"
    );
    Ok(())
}

#[test]
fn from_fd_skips_the_handshake() -> TestResult {
    let uffd = Uffd::open(NONBLOCK)?;
    let features = uffd.api(Features::EVENT_REMOVE)?;
    assert!(features.contains(Features::EVENT_REMOVE));
    // The VMM hands the fd over: wrap it and register, no second UFFDIO_API.
    let uffd = Uffd::from_fd(uffd.into_fd());
    let m = memory(1, PAGE_4K)?;
    let r = &m.regions()[0];
    let ioctls = uffd.register(r.addr(), r.len(), RegisterMode::Missing)?;
    assert!(ioctls.has_copy() && ioctls.has_zeropage());
    uffd.unregister(r.addr(), r.len())?;
    // Unregistered: a plain read now sees a zero page instead of faulting.
    assert!(r.is_zero(0, PAGE_4K)?);
    Ok(())
}

#[test]
fn hugetlbfs_copy_in_2mib_pages() -> TestResult {
    let m = match memory(1, PAGE_2M) {
        Ok(m) => m,
        Err(GuestError::Map(MapError::Mmap { source, .. })) => {
            skip!("no free 2 MiB huge page ({source}); set vm.nr_hugepages");
        }
        Err(e) => return Err(e.into()),
    };
    let r = &m.regions()[0];
    let uffd = Uffd::open(NONBLOCK)?;
    uffd.api(Features::MISSING_HUGETLBFS)?;
    let ioctls = uffd.register(r.addr(), r.len(), RegisterMode::Missing)?;
    ioctls.require(Ioctls::COPY)?;
    assert!(!ioctls.has_zeropage(), "no ZEROPAGE on hugetlbfs");
    let mut src = AlignedBuf::new(PAGE_2M)?;
    src.as_mut_slice()[PAGE_2M - 1] = 9;
    assert_eq!(
        copy(&uffd, r.addr(), src.as_slice(), true)?,
        Installed::Done(PAGE_2M)
    );
    let mut b = [0u8; 1];
    r.read(PAGE_2M - 1, &mut b)?;
    assert_eq!(b[0], 9);
    assert_eq!(populated(r)?, vec![0]);
    Ok(())
}
