//! Safe page installs for the hot paths, on top of [`Uffd`]'s raw ioctls:
//! the source of a copy is a buffer the engine owns (a receive ring, a
//! staging buffer), and the kernel itself refuses a destination outside the
//! ranges registered on this userfaultfd (`ENOENT`) or already present
//! (`EEXIST`), so no call here can write outside guest memory or over a
//! page the guest already owns.
//!
//! # Kernel versions
//! Linux 4.3 (COPY, ZEROPAGE), 6.8 (MOVE).
//!
//! # Hazards
//! `UFFDIO_MOVE` takes the pages out of the receive ring: the ring must be
//! private anonymous memory ([`StreamRing::new`] with `private`), and the
//! moved range reads as zeros (or is refilled) afterwards. The same holds
//! for a [`HugeStage`], whose page is taken away by each install.

use crate::sys::bufring::StreamRing;
use crate::sys::mapping::{MapOptions, Mapping};
use crate::sys::uffd::{Installed, Uffd, UffdError};

/// Page-aligned private memory a receive lands in ([`Ring::recv_into`]):
/// the page bytes of one frame, installed from there with no further copy in
/// user space. Either a 2 MiB transparent-huge-page area, whose page
/// `UFFDIO_MOVE` hands to guest memory as one PMD ([`Landing::move_whole`]),
/// or flat 4 KiB memory for `UFFDIO_COPY`.
///
/// The ring owns a landing while a receive into it is in flight, so no safe
/// code reads it while the kernel writes it.
///
/// [`Ring::recv_into`]: crate::sys::ring::Ring::recv_into
#[derive(Debug)]
pub struct Landing {
    map: Mapping,
    huge: bool,
}

impl Landing {
    /// Bytes of a huge landing: one transparent huge page (x86-64, arm64
    /// with 4 KiB base pages).
    pub const HUGE: usize = 2 << 20;

    /// An empty 2 MiB, 2 MiB-aligned, `MADV_HUGEPAGE` landing: the kernel
    /// backs it with a fresh huge page at the first write, when it has one.
    pub fn huge() -> Result<Landing, crate::sys::mapping::MapError> {
        let map = Mapping::anonymous(
            Self::HUGE,
            4096,
            MapOptions {
                thp: true,
                populate: false,
            },
        )?;
        Ok(Landing { map, huge: true })
    }

    /// A flat landing of `len` bytes (rounded up to 4 KiB), 4 KiB pages,
    /// populated now (so receives into it never fault).
    pub fn flat(len: usize) -> Result<Landing, crate::sys::mapping::MapError> {
        let map = Mapping::anonymous(
            len.max(1).next_multiple_of(4096),
            4096,
            MapOptions {
                thp: false,
                populate: true,
            },
        )?;
        Ok(Landing { map, huge: false })
    }

    /// Whether this is a 2 MiB huge-page landing.
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    /// Bytes of the landing.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never: a landing has at least one page.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Start of the landing, for the kernel to write (the ring).
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// The landing's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `map` is private anonymous memory this landing alone owns,
        // mapped for its whole length (pages moved out read as fresh zero
        // pages); the kernel writes it only through a receive the ring owns
        // the landing for, so no write happens while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    /// The landing's bytes, mutably (decryption in place).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.map.len()) }
    }

    /// Copies `bytes` to the start of the landing.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), UffdError> {
        if bytes.len() > self.len() {
            return Err(UffdError::Range {
                op: "staging copy",
                addr: self.map.addr(),
                len: bytes.len(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        self.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    /// Moves the 2 MiB of a huge landing to the missing pages at `dst`
    /// (2 MiB-aligned, registered on `uffd`, which must have
    /// `UFFD_FEATURE_MOVE`), waking their waiters: one PMD when the landing
    /// holds a huge page. A move stops at the first page already present at
    /// `dst`: the bytes not moved stay where they were, for the caller to
    /// install another way, and then [`Landing::clear`] the landing.
    pub fn move_whole(&mut self, uffd: &Uffd, dst: usize) -> Result<Installed, UffdError> {
        if !self.huge || !dst.is_multiple_of(Self::HUGE) {
            return Err(not_whole(
                dst,
                self.len(),
                "a whole move takes a huge landing to a 2 MiB-aligned address",
            ));
        }
        // SAFETY: the landing is private anonymous memory of this process that
        // only `self` (borrowed mutably) reaches, 2 MiB-aligned; nobody reads
        // it during the move, and afterwards the moved part is unpopulated
        // (the next write faults in fresh memory). The kernel only fills `dst`
        // if it lies in a range registered on `uffd` and is missing, as for
        // COPY.
        unsafe { uffd.move_pages(dst, self.map.as_ptr(), Self::HUGE, true, false) }
    }

    /// Drops every page the landing holds, so that the next write starts
    /// from fresh memory (a huge page again, after a partial move split it).
    pub fn clear(&mut self) {
        // Not registered anywhere, so no event: the pages are simply freed.
        let _ = self.map.madvise_dontneed(0, self.len());
    }
}

/// A whole move asked of memory that cannot make one: `InvalidInput`, not
/// `EINVAL`, which would say that the kernel refuses moves.
fn not_whole(dst: usize, len: usize, why: &'static str) -> UffdError {
    UffdError::Range {
        op: "UFFDIO_MOVE",
        addr: dst,
        len,
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
    }
}

/// A 2 MiB staging area for installing one whole transparent huge page.
///
/// `UFFDIO_COPY` only installs 4 KiB pages, which `MADV_COLLAPSE` must later
/// copy a second time into a huge page. A stage instead takes the 2 MiB of a
/// range in one copy into a huge [`Landing`] (the kernel backs it with a
/// fresh huge page when it has one), and `UFFDIO_MOVE` then hands that page
/// to guest memory as one PMD: no second copy, nothing left to collapse. If
/// the kernel had no huge page for the stage, or the destination range
/// already holds a page, the move still installs correctly, in 4 KiB pages.
/// (A bulk lane that receives a whole range straight into a landing skips
/// the copy too.)
#[derive(Debug)]
pub struct HugeStage {
    land: Landing,
}

impl HugeStage {
    /// Bytes of a stage.
    pub const LEN: usize = Landing::HUGE;

    /// Maps an empty stage.
    pub fn new() -> Result<HugeStage, crate::sys::mapping::MapError> {
        Ok(HugeStage {
            land: Landing::huge()?,
        })
    }

    /// Copies `bytes` (exactly [`HugeStage::LEN`]) into the stage and moves
    /// it to the missing pages at `dst` (2 MiB-aligned, registered on
    /// `uffd`, which must have `UFFD_FEATURE_MOVE`), waking their waiters.
    /// Anything but a whole move leaves the stage empty again: what it did
    /// not move is dropped, and the caller installs those pages another way.
    pub fn install(
        &mut self,
        uffd: &Uffd,
        dst: usize,
        bytes: &[u8],
    ) -> Result<Installed, UffdError> {
        if bytes.len() != Self::LEN || !dst.is_multiple_of(Self::LEN) {
            return Err(not_whole(
                dst,
                bytes.len(),
                "a huge-page stage installs exactly 2 MiB at a 2 MiB-aligned address",
            ));
        }
        self.land.write(bytes)?;
        let r = self.land.move_whole(uffd, dst);
        if !matches!(r, Ok(Installed::Done(n)) if n == Self::LEN) {
            // A partial move left pages behind: drop them, so that the next
            // install starts from an empty stage.
            self.land.clear();
        }
        r
    }
}

/// `UFFDIO_COPY` of `src` to the missing pages at `dst`.
pub fn copy(uffd: &Uffd, dst: usize, src: &[u8], wake: bool) -> Result<Installed, UffdError> {
    // SAFETY: `src` is a live shared borrow, so it is readable and no safe code
    // writes it during the call; the kernel only fills `dst` if it lies in a
    // range registered on this uffd and its pages are missing, i.e. guest
    // memory that no Rust reference covers (sys::guest).
    unsafe { uffd.copy(dst, src.as_ptr(), src.len(), wake) }
}

/// `UFFDIO_ZEROPAGE` over the missing pages of `dst..dst+len`.
pub fn zero(uffd: &Uffd, dst: usize, len: usize, wake: bool) -> Result<Installed, UffdError> {
    // SAFETY: the kernel only maps the zero page into registered ranges whose
    // pages are missing; deciding that they are zero is the engine's job.
    unsafe { uffd.zeropage(dst, len, wake) }
}

/// `UFFDIO_MOVE` of `len` bytes at `offset` into the unconsumed bytes of a
/// private receive ring, to the missing pages at `dst`. Refused with `EINVAL`
/// before the kernel is asked if the range is not inside the contiguous
/// readable bytes, not page-aligned, or the ring is shared.
pub fn move_out(
    uffd: &Uffd,
    dst: usize,
    ring: &mut StreamRing,
    offset: usize,
    len: usize,
) -> Result<Installed, UffdError> {
    let private = !ring.mirrored();
    let bytes = ring.readable_mut();
    let ok = private
        && offset
            .checked_add(len)
            .is_some_and(|end| end <= bytes.len())
        && (bytes.as_ptr() as usize + offset).is_multiple_of(4096)
        && len.is_multiple_of(4096);
    if !ok {
        return Err(UffdError::Range {
            op: "UFFDIO_MOVE",
            addr: dst,
            len,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    let src = bytes[offset..offset + len].as_mut_ptr();
    // SAFETY: `src..src+len` is part of the ring's private anonymous memory,
    // borrowed mutably (no one else reads or writes it during the call), page
    // aligned (checked); after the move those bytes are consumed data the
    // ring never reads again, and the kernel refills them on the next lap.
    // The kernel only fills registered, missing pages at `dst`, as for COPY.
    unsafe { uffd.move_pages(dst, src, len, true, false) }
}

/// `UFFDIO_COPY` of `len` bytes at `offset` of `src`, a mapping the engine
/// holds (a snapshot memory file), straight to the missing pages at `dst`: no
/// staging copy, and no user-space read of the mapping, so a file that shrank
/// gives `EFAULT` here rather than `SIGBUS`. A range beyond the mapping is
/// refused with `EINVAL` before the kernel is asked.
pub fn copy_mapped(
    uffd: &Uffd,
    dst: usize,
    src: &crate::sys::mapping::Mapping,
    offset: usize,
    len: usize,
    wake: bool,
) -> Result<Installed, UffdError> {
    if offset.checked_add(len).is_none_or(|end| end > src.len()) {
        return Err(UffdError::Range {
            op: "UFFDIO_COPY",
            addr: dst,
            len,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    // SAFETY: `src` is borrowed, so it stays mapped for the call, and the range
    // was bounds-checked. The kernel reads it itself (a page it cannot read,
    // e.g. past the end of a truncated file, fails with EFAULT rather than a
    // signal); no Rust reference to it is made. Only the kernel writes `dst`,
    // and only into registered missing pages, as for `copy`.
    unsafe { uffd.copy(dst, src.as_ptr().add(offset), len, wake) }
}
