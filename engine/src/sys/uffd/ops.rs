//! Resolving faults: the install ioctls (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`,
//! `UFFDIO_MOVE`), write protection (`UFFDIO_WRITEPROTECT`) and their
//! outcomes.
//!
//! # Hazards
//! * A pending non-cooperative event makes every install return `EAGAIN`
//!   ([`Installed::Again`]) until it is read.
//! * An install can make partial progress ([`Installed::Again`] with
//!   `done > 0`): retry the remainder.

use std::os::fd::AsRawFd;

use super::abi::{
    request, u64_of, UffdioCopy, UffdioMove, UffdioRange, UffdioWriteprotect, UffdioZeropage,
    UFFDIO_COPY, UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_MOVE, UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
    UFFDIO_MOVE_MODE_DONTWAKE, UFFDIO_WRITEPROTECT, UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
    UFFDIO_WRITEPROTECT_MODE_WP, UFFDIO_ZEROPAGE, UFFDIO_ZEROPAGE_MODE_DONTWAKE,
};
use super::{errno, Uffd, UffdError};

/// The outcome of an install ioctl (COPY, ZEROPAGE, MOVE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The whole range was installed; the value is its length in bytes.
    Done(usize),
    /// `EEXIST`: the first page of the range is already present. Not an
    /// error: someone (another lane, a ZEROPAGE) installed it first.
    Exists,
    /// `EAGAIN`: `done` bytes were installed, then the kernel stopped, either
    /// because a non-cooperative event (REMOVE, UNMAP, ...) is pending and
    /// must be read first, or because a later page already exists. Read
    /// events, then retry from `dst + done`.
    Again {
        /// Bytes installed before stopping.
        done: usize,
    },
}

impl Uffd {
    /// Turns an install ioctl's return and its progress field into an outcome.
    fn outcome(
        op: &'static str,
        addr: usize,
        len: usize,
        ret: libc::c_int,
        progress: i64,
    ) -> Result<Installed, UffdError> {
        let bad = || UffdError::BadProgress {
            op,
            addr,
            len,
            reported: progress,
        };
        if ret == 0 {
            let done = usize::try_from(progress).map_err(|_| bad())?;
            return if done == len {
                Ok(Installed::Done(done))
            } else {
                Err(bad())
            };
        }
        let err = errno();
        match err.raw_os_error() {
            Some(libc::EEXIST) => Ok(Installed::Exists),
            Some(libc::EAGAIN) => {
                // Positive: partial progress; -EAGAIN (or untouched 0 on
                // kernels that do not write it back): nothing done.
                let done = usize::try_from(progress.max(0)).map_err(|_| bad())?;
                if done > len {
                    return Err(bad());
                }
                Ok(Installed::Again { done })
            }
            _ => Err(UffdError::Range {
                op,
                addr,
                len,
                source: err,
            }),
        }
    }

    /// `UFFDIO_COPY`: atomically installs a copy of `len` bytes at `src` into
    /// the missing pages at `dst`, waking faulting threads if `wake`.
    ///
    /// # Safety
    ///
    /// * `src..src + len` must be readable memory of this process for the whole
    ///   call (the kernel reads it; a bad pointer gives `EFAULT`, but the
    ///   bytes must also be the ones the caller means to publish: no other
    ///   thread may be writing them).
    /// * `dst..dst + len` must lie inside a range registered on this uffd
    ///   whose pages nobody else is installing with other contents, because
    ///   the new page becomes visible to every thread of the guest at once.
    pub unsafe fn copy(
        &self,
        dst: usize,
        src: *const u8,
        len: usize,
        wake: bool,
    ) -> Result<Installed, UffdError> {
        let mut arg = UffdioCopy {
            dst: u64_of(dst),
            src: u64_of(src as usize),
            len: u64_of(len),
            mode: if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes a `struct uffdio_copy` (mirrored
        // by `arg`); the caller guarantees `src` is readable and `dst` is a
        // registered range it may fill.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), request(UFFDIO_COPY), &mut arg) };
        Self::outcome("UFFDIO_COPY", dst, len, ret, arg.copy)
    }

    /// `UFFDIO_ZEROPAGE`: maps the zero page over the missing pages of
    /// `[dst, dst + len)`. Not available on hugetlbfs.
    ///
    /// # Safety
    ///
    /// `dst..dst + len` must lie inside a range registered on this uffd whose
    /// pages the caller may decide are zero (nobody else installs them with
    /// other contents).
    pub unsafe fn zeropage(
        &self,
        dst: usize,
        len: usize,
        wake: bool,
    ) -> Result<Installed, UffdError> {
        let mut arg = UffdioZeropage {
            range: UffdioRange {
                start: u64_of(dst),
                len: u64_of(len),
            },
            mode: if wake {
                0
            } else {
                UFFDIO_ZEROPAGE_MODE_DONTWAKE
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct uffdio_zeropage`
        // (mirrored by `arg`); the caller guarantees the destination contract.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), request(UFFDIO_ZEROPAGE), &mut arg) };
        Self::outcome("UFFDIO_ZEROPAGE", dst, len, ret, arg.zeropage)
    }

    /// `UFFDIO_MOVE` (Linux 6.8): moves the pages of `src..src + len` (private
    /// anonymous, page-aligned) to the missing pages at `dst` without copying.
    /// Afterwards `src` is unpopulated. With `allow_src_holes`, unpopulated
    /// source pages are skipped instead of failing with `ENOENT`.
    ///
    /// # Safety
    ///
    /// * `src..src + len` must be private anonymous memory of this process
    ///   that the caller owns and nobody reads or writes during the call or
    ///   relies on afterwards (its pages are taken away; it reads as zeros or
    ///   faults again after).
    /// * `dst..dst + len` must lie inside a range registered on this uffd
    ///   that the caller may fill, as for [`Uffd::copy`].
    pub unsafe fn move_pages(
        &self,
        dst: usize,
        src: *mut u8,
        len: usize,
        wake: bool,
        allow_src_holes: bool,
    ) -> Result<Installed, UffdError> {
        let mut mode = if wake { 0 } else { UFFDIO_MOVE_MODE_DONTWAKE };
        if allow_src_holes {
            mode |= UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
        }
        let mut arg = UffdioMove {
            dst: u64_of(dst),
            src: u64_of(src as usize),
            len: u64_of(len),
            mode,
            r#move: 0,
        };
        // SAFETY: UFFDIO_MOVE reads and writes a `struct uffdio_move` (mirrored
        // by `arg`); the caller owns `src` and may fill `dst`.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), request(UFFDIO_MOVE), &mut arg) };
        Self::outcome("UFFDIO_MOVE", dst, len, ret, arg.r#move)
    }

    /// `UFFDIO_WRITEPROTECT`: write-protects `[addr, addr + len)` (`protect`)
    /// or removes the protection. With `WP_ASYNC` the kernel resolves write
    /// faults itself and records them for `PAGEMAP_SCAN`; no event is sent.
    pub fn writeprotect(&self, addr: usize, len: usize, protect: bool) -> Result<(), UffdError> {
        let mut arg = UffdioWriteprotect {
            range: UffdioRange {
                start: u64_of(addr),
                len: u64_of(len),
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                UFFDIO_WRITEPROTECT_MODE_DONTWAKE
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect`
        // (mirrored by `arg`); it changes page protections of a registered
        // range, never memory contents.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), request(UFFDIO_WRITEPROTECT), &mut arg) };
        if ret < 0 {
            return Err(UffdError::Range {
                op: "UFFDIO_WRITEPROTECT",
                addr,
                len,
                source: errno(),
            });
        }
        Ok(())
    }
}
