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

/// A 2 MiB staging area for installing one whole transparent huge page.
///
/// `UFFDIO_COPY` only installs 4 KiB pages, which `MADV_COLLAPSE` must later
/// copy a second time into a huge page. A stage instead takes the 2 MiB of a
/// range in one copy into private, 2 MiB-aligned, `MADV_HUGEPAGE` memory (the
/// kernel backs it with a fresh huge page when it has one), and
/// `UFFDIO_MOVE` then hands that page to guest memory as one PMD: no second
/// copy, nothing left to collapse. If the kernel had no huge page for the
/// stage, or the destination range already holds a page, the move still
/// installs correctly, in 4 KiB pages.
#[derive(Debug)]
pub struct HugeStage {
    map: Mapping,
}

impl HugeStage {
    /// Bytes of a stage: one transparent huge page (x86-64, arm64 with 4 KiB
    /// base pages).
    pub const LEN: usize = 2 << 20;

    /// Maps an empty stage.
    pub fn new() -> Result<HugeStage, crate::sys::mapping::MapError> {
        let map = Mapping::anonymous(
            Self::LEN,
            4096,
            MapOptions {
                thp: true,
                populate: false,
            },
        )?;
        Ok(HugeStage { map })
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
            // Not `EINVAL`, which would say that the kernel refuses moves.
            return Err(UffdError::Range {
                op: "UFFDIO_MOVE",
                addr: dst,
                len: bytes.len(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a huge-page stage installs exactly 2 MiB at a 2 MiB-aligned address",
                ),
            });
        }
        self.map
            .write_from(0, bytes)
            .map_err(|e| UffdError::Range {
                op: "staging copy",
                addr: dst,
                len: bytes.len(),
                source: std::io::Error::other(e.to_string()),
            })?;
        // SAFETY: the stage is private anonymous memory of this process that
        // only `self` (borrowed mutably) reaches, 2 MiB-aligned; nobody reads
        // it during the move, and afterwards it is unpopulated (the next
        // `write_from` faults in fresh memory). The kernel only fills `dst`
        // if it lies in a range registered on `uffd` and is missing, as for
        // COPY.
        let r = unsafe { uffd.move_pages(dst, self.map.as_ptr(), Self::LEN, true, false) };
        if !matches!(r, Ok(Installed::Done(n)) if n == Self::LEN) {
            // A partial move left pages behind: drop them, so that the next
            // install starts from an empty stage. Not registered anywhere, so
            // no event: the pages are simply freed.
            let _ = self.map.madvise_dontneed(0, Self::LEN);
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
