//! Safe page installs for the destination's hot paths, on top of [`Uffd`]'s raw
//! ioctls: the source of a copy or move is a buffer the engine owns, and the kernel
//! itself refuses a destination outside the ranges registered on this userfaultfd
//! (`ENOENT`), so no call here can write outside guest memory.
//!
//! Needs Linux 4.3 (COPY, ZEROPAGE) and 6.8 (MOVE).

use crate::sys::mapping::{AlignedBuf, GuestMapping};
use crate::sys::uffd::{Installed, Uffd, UffdError};

/// `UFFDIO_COPY` of `src` to the missing pages at `dst`.
pub fn copy_from(uffd: &Uffd, dst: usize, src: &[u8], wake: bool) -> Result<Installed, UffdError> {
    // SAFETY: `src` is a live shared borrow, so it is readable and no safe code
    // writes it during the call; the kernel only fills `dst` if it lies in a range
    // registered on this uffd (else ENOENT), i.e. guest memory whose missing pages
    // the engine alone installs.
    unsafe { uffd.copy(dst, src.as_ptr(), src.len(), wake) }
}

/// `UFFDIO_COPY` of `len` bytes at `offset` of `src`, a mapping the engine holds
/// (e.g. a snapshot memory file), straight to the missing pages at `dst`: no staging
/// copy. A range beyond `src` is refused with `EINVAL` before the kernel is asked.
pub fn copy_from_mapping(
    uffd: &Uffd,
    dst: usize,
    src: &GuestMapping,
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
    // was bounds-checked. The kernel reads it itself (a page it cannot read, e.g.
    // past the end of a truncated file, fails with EFAULT rather than a signal).
    // Only the kernel writes `dst`, and only into registered missing pages, as
    // for `copy_from`.
    unsafe { uffd.copy(dst, src.as_ptr().add(offset), len, wake) }
}

/// `UFFDIO_ZEROPAGE` over the missing pages of `dst..dst+len`.
pub fn zero(uffd: &Uffd, dst: usize, len: usize, wake: bool) -> Result<Installed, UffdError> {
    // SAFETY: the kernel only maps the zero page into ranges registered on this
    // uffd whose pages are missing; deciding that they are zero is the engine's
    // job (the source said so).
    unsafe { uffd.zeropage(dst, len, wake) }
}

/// `UFFDIO_MOVE` of `len` bytes of `buf` at `offset` to the missing pages at `dst`.
/// Afterwards that part of `buf` is unpopulated (it reads as zeros, or is filled
/// again by the next receive).
pub fn move_from(
    uffd: &Uffd,
    dst: usize,
    buf: &mut AlignedBuf,
    offset: usize,
    len: usize,
) -> Result<Installed, UffdError> {
    let in_range = offset.checked_add(len).is_some_and(|end| end <= buf.len());
    if !in_range {
        return Err(UffdError::Range {
            op: "UFFDIO_MOVE",
            addr: dst,
            len,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    // SAFETY: `buf` is private anonymous memory we borrow mutably, so no one else
    // reads or writes it during the call; the range was bounds-checked; the kernel
    // only fills registered, missing pages at `dst`, as for COPY.
    unsafe { uffd.move_pages(dst, buf.as_mut_ptr().add(offset), len, true, true) }
}
