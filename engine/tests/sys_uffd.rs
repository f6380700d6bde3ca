//! userfaultfd against the real kernel: faults, COPY, ZEROPAGE, MOVE, EEXIST,
//! partial progress, and a REMOVE event blocking installs until it is read.

use std::error::Error;

use ringfault_engine::sys::mapping::{AlignedBuf, GuestMapping, MapOptions, PAGE_4K};
use ringfault_engine::sys::pagemap::{is_populated, populated_pages};
use ringfault_engine::sys::uffd::{
    Event, Features, Installed, Ioctls, RegisterMode, Uffd, UffdError, UffdMsg, UffdOptions,
    PAGEFAULT_FLAG_WRITE,
};

type TestResult = Result<(), Box<dyn Error>>;

const NONBLOCK: UffdOptions = UffdOptions {
    nonblock: true,
    user_mode_only: false,
};

/// A uffd with `features`, and a registered 4-page anonymous mapping.
fn setup(features: Features, pages: usize) -> Result<(Uffd, GuestMapping), Box<dyn Error>> {
    let uffd = Uffd::open(NONBLOCK)?;
    uffd.api(features)?;
    let m = GuestMapping::anonymous(pages * PAGE_4K, PAGE_4K, MapOptions::default())?;
    let ioctls = uffd.register(m.addr(), m.len(), RegisterMode::Missing)?;
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

#[test]
fn fault_is_reported_and_copy_resolves_it() -> TestResult {
    let (uffd, m) = setup(Features::THREAD_ID, 4)?;
    let mut none = [UffdMsg::default(); 1];
    assert_eq!(uffd.read_events(&mut none)?, 0, "no event pending yet");
    let src = pattern(7)?;
    std::thread::scope(|s| -> TestResult {
        // A "vCPU" reads page 1 and blocks until we install it.
        let reader = s.spawn(|| {
            let mut b = [0u8; 16];
            m.read_page_into(PAGE_4K + 5, &mut b).map(|()| b)
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
        assert_eq!(usize::try_from(addr)?, m.addr() + PAGE_4K);
        assert_eq!(flags & PAGEFAULT_FLAG_WRITE, 0, "a read fault");
        assert_ne!(thread_id, 0, "THREAD_ID negotiated");
        // SAFETY: src is a live 4 KiB buffer; dst is a missing registered page.
        let r = unsafe { uffd.copy(m.addr() + PAGE_4K, src.as_ptr(), PAGE_4K, true)? };
        assert_eq!(r, Installed::Done(PAGE_4K));
        let got = reader.join().map_err(|_| "reader panicked")??;
        assert_eq!(&got[..], &src.as_slice()[5..21]);
        Ok(())
    })?;
    let mut page = vec![0u8; PAGE_4K];
    m.read_page_into(PAGE_4K, &mut page)?;
    assert_eq!(&page[..], src.as_slice());

    // EEXIST on the first page: already there, not an error.
    // SAFETY: as above; the page exists, so nothing is written.
    let r = unsafe { uffd.copy(m.addr() + PAGE_4K, src.as_ptr(), PAGE_4K, true)? };
    assert_eq!(r, Installed::Exists);

    // Partial progress: page 0 is missing, page 1 exists -> 4 KiB done, EAGAIN.
    let two = AlignedBuf::new(2 * PAGE_4K)?;
    // SAFETY: `two` is a live 8 KiB buffer; pages 0-1 are registered.
    let r = unsafe { uffd.copy(m.addr(), two.as_ptr(), 2 * PAGE_4K, true)? };
    assert_eq!(r, Installed::Again { done: PAGE_4K });
    Ok(())
}

#[test]
fn write_fault_flags_and_zeropage() -> TestResult {
    let (uffd, m) = setup(Features::NONE, 4)?;
    std::thread::scope(|s| -> TestResult {
        let writer = s.spawn(|| m.write_from(2 * PAGE_4K + 100, b"vcpu"));
        let ev = next_event(&uffd)?;
        let Event::PageFault { addr, flags, .. } = ev else {
            return Err(format!("expected a page fault, got {ev:?}").into());
        };
        assert_eq!(usize::try_from(addr)?, m.addr() + 2 * PAGE_4K);
        assert_ne!(flags & PAGEFAULT_FLAG_WRITE, 0, "a write fault");
        // SAFETY: dst is a missing registered page.
        let r = unsafe { uffd.zeropage(m.addr() + 2 * PAGE_4K, PAGE_4K, true)? };
        assert_eq!(r, Installed::Done(PAGE_4K));
        writer.join().map_err(|_| "writer panicked")??;
        Ok(())
    })?;
    let mut b = [0u8; 6];
    m.read_page_into(2 * PAGE_4K + 99, &mut b)?;
    assert_eq!(&b, b"\0vcpu\0");

    // ZEROPAGE with nobody waiting, then EEXIST.
    // SAFETY: dst is a missing registered page.
    let r = unsafe { uffd.zeropage(m.addr(), PAGE_4K, false)? };
    assert_eq!(r, Installed::Done(PAGE_4K));
    assert!(m.is_zero(0, PAGE_4K)?);
    // SAFETY: as above; already present.
    let r = unsafe { uffd.zeropage(m.addr(), PAGE_4K, true)? };
    assert_eq!(r, Installed::Exists);
    Ok(())
}

#[test]
fn move_installs_without_copy() -> TestResult {
    let supported = Uffd::probe()?;
    if !supported.contains(Features::MOVE) {
        println!("SKIP move_installs_without_copy: UFFD_FEATURE_MOVE missing (needs Linux 6.8)");
        return Ok(());
    }
    let (uffd, m) = setup(Features::MOVE, 4)?;
    let ioctls = uffd.register(m.addr(), m.len(), RegisterMode::Missing)?;
    assert!(ioctls.has_move(), "MOVE on anonymous memory: {ioctls:?}");

    let src = GuestMapping::anonymous(2 * PAGE_4K, PAGE_4K, MapOptions::default())?;
    let pat = pattern(42)?;
    src.write_from(0, pat.as_slice())?;
    // SAFETY: `src` page 0 is our populated private anonymous page, not used
    // afterwards; dst page 3 is missing and registered.
    let r = unsafe { uffd.move_pages(m.addr() + 3 * PAGE_4K, src.as_ptr(), PAGE_4K, true, false)? };
    assert_eq!(r, Installed::Done(PAGE_4K));
    let mut page = vec![0u8; PAGE_4K];
    m.read_page_into(3 * PAGE_4K, &mut page)?;
    assert_eq!(&page[..], pat.as_slice());
    let src_bits = populated_pages(src.addr(), src.len(), PAGE_4K)?;
    assert!(
        !is_populated(&src_bits, 0),
        "the source page was taken away"
    );

    // An unpopulated source: ENOENT, or skipped with ALLOW_SRC_HOLES.
    let hole = src.addr() + PAGE_4K;
    // SAFETY: as above; src page 1 is ours and unpopulated.
    let e = unsafe { uffd.move_pages(m.addr(), hole as *mut u8, PAGE_4K, true, false) };
    match e {
        Err(UffdError::Range { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
        }
        other => return Err(format!("expected ENOENT, got {other:?}").into()),
    }
    // SAFETY: as above.
    let r = unsafe { uffd.move_pages(m.addr(), hole as *mut u8, PAGE_4K, true, true)? };
    assert_eq!(r, Installed::Done(PAGE_4K));
    let bits = populated_pages(m.addr(), m.len(), PAGE_4K)?;
    assert!(!is_populated(&bits, 0), "a hole moves nothing");
    assert!(is_populated(&bits, 3));
    Ok(())
}

#[test]
fn pending_remove_event_blocks_installs_until_read() -> TestResult {
    let (uffd, m) = setup(Features::EVENT_REMOVE, 4)?;
    let src = pattern(1)?;
    // SAFETY: src is live; page 0 is missing and registered.
    let r = unsafe { uffd.copy(m.addr(), src.as_ptr(), PAGE_4K, true)? };
    assert_eq!(r, Installed::Done(PAGE_4K));
    std::thread::scope(|s| -> TestResult {
        // MADV_DONTNEED sleeps until the REMOVE event is read.
        let zapper = s.spawn(|| m.madvise_dontneed(0, PAGE_4K));
        if !uffd.poll_readable(5000)? {
            return Err("no REMOVE event within 5 s".into());
        }
        // SAFETY: src is live; page 1 is missing and registered.
        let r = unsafe { uffd.copy(m.addr() + PAGE_4K, src.as_ptr(), PAGE_4K, true)? };
        assert_eq!(
            r,
            Installed::Again { done: 0 },
            "a pending REMOVE blocks installs"
        );
        let ev = next_event(&uffd)?;
        let start = u64::try_from(m.addr())?;
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
    // SAFETY: as above.
    let r = unsafe { uffd.copy(m.addr() + PAGE_4K, src.as_ptr(), PAGE_4K, true)? };
    assert_eq!(r, Installed::Done(PAGE_4K));
    let bits = populated_pages(m.addr(), m.len(), PAGE_4K)?;
    assert!(!is_populated(&bits, 0), "page 0 was zapped");
    assert!(is_populated(&bits, 1));
    Ok(())
}

#[test]
fn from_fd_skips_the_handshake() -> TestResult {
    let uffd = Uffd::open(NONBLOCK)?;
    let features = uffd.api(Features::EVENT_REMOVE)?;
    assert!(features.contains(Features::EVENT_REMOVE));
    // The VMM hands the fd over: wrap it and register, no second UFFDIO_API.
    let uffd = Uffd::from_fd(uffd.into_fd());
    let m = GuestMapping::anonymous(PAGE_4K, PAGE_4K, MapOptions::default())?;
    let ioctls = uffd.register(m.addr(), m.len(), RegisterMode::Missing)?;
    assert!(ioctls.has_copy() && ioctls.has_zeropage());
    uffd.unregister(m.addr(), m.len())?;
    // Unregistered: a plain read now sees a zero page instead of faulting.
    assert!(m.is_zero(0, PAGE_4K)?);
    Ok(())
}

#[test]
fn hugetlbfs_copy_in_2mib_pages() -> TestResult {
    use ringfault_engine::sys::mapping::{MapError, PAGE_2M};
    let m = match GuestMapping::anonymous(PAGE_2M, PAGE_2M, MapOptions::default()) {
        Ok(m) => m,
        Err(MapError::Mmap { source, .. }) => {
            println!("SKIP hugetlbfs_copy_in_2mib_pages: no 2 MiB huge page ({source}); set vm.nr_hugepages");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let uffd = Uffd::open(NONBLOCK)?;
    uffd.api(Features::MISSING_HUGETLBFS)?;
    let ioctls = uffd.register(m.addr(), m.len(), RegisterMode::Missing)?;
    ioctls.require(Ioctls::COPY)?;
    assert!(!ioctls.has_zeropage(), "no ZEROPAGE on hugetlbfs");
    let mut src = AlignedBuf::new(PAGE_2M)?;
    src.as_mut_slice()[PAGE_2M - 1] = 9;
    // SAFETY: src is a live 2 MiB buffer; dst is a missing registered huge page.
    let r = unsafe { uffd.copy(m.addr(), src.as_ptr(), PAGE_2M, true)? };
    assert_eq!(r, Installed::Done(PAGE_2M));
    let mut b = [0u8; 1];
    m.read_page_into(PAGE_2M - 1, &mut b)?;
    assert_eq!(b[0], 9);
    Ok(())
}
