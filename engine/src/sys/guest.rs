//! Guest memory as the engine sees it: a raw area that is never turned into a Rust
//! reference or slice, because another thread (a vCPU, the kernel via userfaultfd)
//! may write it at any time. Reads go through raw pointers; sends go straight from
//! guest memory to the socket with `writev(2)`, with no staging copy.
//!
//! Who may write which page, and when:
//! - On the source, after switch-over, nothing writes guest memory (the VM is
//!   stopped); the engine only reads it.
//! - On the destination, only the kernel writes a page that is not present yet
//!   (`UFFDIO_COPY`/`ZEROPAGE`/`MOVE`); once present, only the guest does.
//!
//! Needs: nothing beyond Linux 2.6. Hazard: a `GuestArea` does not own its memory;
//! whoever builds one promises that it stays mapped for as long as the area is used.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A mapped range of guest memory that the engine may read.
#[derive(Debug, Clone, Copy)]
pub struct GuestArea {
    base: usize,
    len: usize,
}

impl GuestArea {
    /// Describes `len` bytes at `base`.
    ///
    /// # Safety
    /// `base..base+len` must stay mapped and readable for as long as this area (or a
    /// copy of it) is used, and nothing may unmap it meanwhile.
    pub unsafe fn new(base: *const u8, len: usize) -> GuestArea {
        GuestArea {
            base: base as usize,
            len,
        }
    }

    /// The address of the first byte.
    pub fn base(&self) -> usize {
        self.base
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the area is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset:#x}+{len:#x} outside guest area of {:#x} bytes",
                    self.len
                ),
            )),
        }
    }

    /// True when `len` bytes at `offset` are all zero (false if out of range).
    pub fn is_zero(&self, offset: usize, len: usize) -> bool {
        if self.check(offset, len).is_err() {
            return false;
        }
        // SAFETY: the range is inside the area (checked), which the constructor's
        // contract keeps mapped and readable; the scan uses volatile reads only.
        unsafe { super::mapping::is_zero_raw((self.base + offset) as *const u8, len) }
    }

    /// Copies `dst.len()` bytes at `offset` out of guest memory.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> io::Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: the source range is inside the mapped area (checked); `dst` is our
        // own buffer and cannot overlap guest memory we do not own a reference to.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + offset) as *const u8,
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Reads a little-endian u64 at `offset` (volatile).
    pub fn read_u64(&self, offset: usize) -> io::Result<u64> {
        self.check(offset, 8)?;
        // SAFETY: inside the area (checked); unaligned volatile-free read of 8 bytes.
        Ok(unsafe { std::ptr::read_unaligned((self.base + offset) as *const u64) })
    }

    /// Writes a u64 at `offset` (a guest store: used by synthetic workloads).
    pub fn write_u64(&self, offset: usize, v: u64) -> io::Result<()> {
        self.check(offset, 8)?;
        // SAFETY: inside the area (checked). The area's owner allows guest stores
        // (this is what a vCPU does); no Rust reference to the memory exists.
        unsafe { std::ptr::write_unaligned((self.base + offset) as *mut u64, v) };
        Ok(())
    }

    /// Copies `src` into guest memory at `offset` (used to build synthetic VMs).
    pub fn write(&self, offset: usize, src: &[u8]) -> io::Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: inside the area (checked); `src` is ours and does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), (self.base + offset) as *mut u8, src.len())
        };
        Ok(())
    }
}

/// One piece of a vectored send: header bytes of ours, or a range of guest memory.
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    /// Bytes owned by the caller (frame headers).
    Bytes(&'a [u8]),
    /// `len` bytes of `area` at `offset`.
    Guest {
        /// The area.
        area: GuestArea,
        /// Offset in the area.
        offset: usize,
        /// Length.
        len: usize,
    },
}

/// Most iovecs handed to one `writev` (the kernel's `UIO_MAXIOV` is 1024).
pub const MAX_IOV: usize = 1024;

/// The iovecs of `pieces`, empty pieces left out, guest ranges bounds-checked.
pub(crate) fn iovecs(pieces: &[Piece<'_>], out: &mut Vec<libc::iovec>) -> io::Result<usize> {
    out.clear();
    let mut total = 0usize;
    for p in pieces {
        let (base, len) = match *p {
            Piece::Bytes(b) => (b.as_ptr() as usize, b.len()),
            Piece::Guest { area, offset, len } => {
                area.check(offset, len)?;
                (area.base + offset, len)
            }
        };
        if len > 0 {
            out.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            });
            total += len;
        }
    }
    Ok(total)
}

/// Drops the first `n` bytes of `iov[*start..]`, advancing `start`.
pub(crate) fn advance(iov: &mut [libc::iovec], start: &mut usize, mut n: usize) {
    while n > 0 && *start < iov.len() {
        let v = &mut iov[*start];
        if n >= v.iov_len {
            n -= v.iov_len;
            *start += 1;
        } else {
            v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
            v.iov_len -= n;
            n = 0;
        }
    }
}

/// Writes every piece, in order, to `fd` with as few `writev(2)` calls as possible,
/// straight from guest memory. Blocks until all is written (a blocking socket), or
/// fails with the socket's error.
pub fn send_pieces(fd: BorrowedFd<'_>, pieces: &[Piece<'_>]) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(pieces.len().min(MAX_IOV));
    let total = iovecs(pieces, &mut iov)?;
    let mut start = 0usize;
    let mut sent = 0usize;
    while start < iov.len() {
        let end = (start + MAX_IOV).min(iov.len());
        let cnt = libc::c_int::try_from(end - start).unwrap_or(libc::c_int::MAX);
        // SAFETY: every iovec points at memory that stays valid for the call: the
        // caller's byte slices are borrowed for its duration, and guest ranges were
        // bounds-checked against areas whose owners keep them mapped.
        let n = unsafe { libc::writev(fd.as_raw_fd(), iov[start..end].as_ptr(), cnt) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if e.kind() == io::ErrorKind::WouldBlock {
                wait_writable(fd)?;
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "socket accepted no bytes",
            ));
        }
        sent += n;
        advance(&mut iov, &mut start, n);
    }
    debug_assert_eq!(sent, total);
    Ok(sent)
}

fn wait_writable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, 1000) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Waits until one of `fds` is readable or `timeout_ms` passes (-1 = forever).
/// Returns which were readable (or hung up).
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(p.len()).unwrap_or(0);
    // SAFETY: `p` is a valid array of `n` pollfds for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), n, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents != 0).collect())
}

/// Non-blocking `recv(2)` into `buf`: `Ok(None)` when no data is waiting, `Ok(Some(0))`
/// at end of stream.
pub fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(Some(usize::try_from(n).unwrap_or(0)));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn sends_headers_and_guest_ranges_in_order() {
        let mem: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        // SAFETY: `mem` outlives every use of the area in this test.
        let area = unsafe { GuestArea::new(mem.as_ptr(), mem.len()) };
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            b.read_to_end(&mut v).unwrap();
            v
        });
        let hdr = [9u8; 7];
        let pieces = [
            Piece::Bytes(&hdr),
            Piece::Guest {
                area,
                offset: 5,
                len: 200_000,
            },
            Piece::Bytes(&hdr),
            Piece::Guest {
                area,
                offset: 0,
                len: 3,
            },
        ];
        let n = send_pieces(a.as_fd(), &pieces).unwrap();
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(n, 200_017);
        let mut want = hdr.to_vec();
        want.extend_from_slice(&mem[5..200_005]);
        want.extend_from_slice(&hdr);
        want.extend_from_slice(&mem[0..3]);
        assert_eq!(got, want);
        assert!(send_pieces(
            b_fd_dummy().as_fd(),
            &[Piece::Guest {
                area,
                offset: 299_999,
                len: 2
            }]
        )
        .is_err());
    }

    fn b_fd_dummy() -> std::os::unix::net::UnixStream {
        std::os::unix::net::UnixStream::pair().unwrap().0
    }

    #[test]
    fn zero_detection_sees_a_single_byte() {
        let mut mem = vec![0u8; 8192 + 3];
        // SAFETY: `mem` outlives the area.
        let area = unsafe { GuestArea::new(mem.as_ptr(), mem.len()) };
        assert!(area.is_zero(0, 8195));
        assert!(!area.is_zero(8000, 500), "out of range is not zero");
        mem[8190] = 1;
        // SAFETY: as above (re-borrowed after the write).
        let area = unsafe { GuestArea::new(mem.as_ptr(), mem.len()) };
        assert!(!area.is_zero(4096, 4096 + 3));
        assert!(area.is_zero(0, 4096));
    }
}
