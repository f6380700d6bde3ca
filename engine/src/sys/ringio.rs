//! Safe io_uring operations for the destination's workers, on top of [`Ring`]:
//!
//! - [`PageReceiver`]: reads exact byte counts from a socket into page-aligned,
//!   pre-touched receive buffers. With `fixed`, the buffers are registered with the
//!   ring and filled by `IORING_OP_READ_FIXED` (Linux 5.1); without, by
//!   `IORING_OP_RECV` with `MSG_WAITALL` (5.6; the kernel retries short receives
//!   itself). Registration pins the buffers, and `UFFDIO_MOVE` cannot move a pinned
//!   page, so the MOVE install path uses unregistered buffers.
//! - [`Waiter`]: sleeps until one of a few file descriptors is readable, with
//!   `IORING_OP_POLL_ADD` (5.1) and a `TIMEOUT` (5.4); a poll stays armed across
//!   calls until it fires, so waiting again costs no new submission.
//!
//! - [`ZeroCopySender`]: sends frames straight from guest memory with
//!   `IORING_OP_SENDMSG_ZC` (Linux 6.1): the kernel pins the pages instead of copying
//!   them, and posts a notification once the NIC is done with them. On loopback the
//!   kernel copies anyway and every notification says so (LIMITS.md); it exists to be
//!   judged on a real NIC, behind `SendMode::ZeroCopy`.
//!
//! Hazard: every operation is submitted and reaped within one call (a zero-copy send
//! waits for its buffer notifications too), so no buffer is ever borrowed while the
//! kernel may still read or write it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use io_uring::{opcode, types};

use super::guest::{advance, iovecs, Piece};
use super::mapping::AlignedBuf;
use super::ring::{Ring, RingError};

fn ring_io(e: RingError) -> io::Error {
    io::Error::other(e)
}

/// Receive buffers and the ring that fills them.
#[derive(Debug)]
pub struct PageReceiver {
    ring: Ring,
    bufs: Vec<AlignedBuf>,
    fixed: bool,
}

impl PageReceiver {
    /// `count` buffers of `len` bytes each (a multiple of 4 KiB).
    pub fn new(len: usize, count: usize, fixed: bool) -> Result<PageReceiver, io::Error> {
        let mut ring = Ring::new(8).map_err(ring_io)?;
        let bufs = (0..count)
            .map(|_| AlignedBuf::new(len).map_err(io::Error::other))
            .collect::<Result<Vec<_>, _>>()?;
        if fixed {
            // SAFETY: the buffers live in `self.bufs` as long as the ring (they are
            // dropped after it: fields drop in declaration order, ring first), and
            // `read_exact` borrows no slice of a buffer while a read into it runs.
            unsafe { ring.register_buffers(&bufs) }.map_err(ring_io)?;
        }
        Ok(PageReceiver { ring, bufs, fixed })
    }

    /// Buffer `i`.
    pub fn buf(&self, i: usize) -> &AlignedBuf {
        &self.bufs[i]
    }

    /// Buffer `i`, mutably (for `UFFDIO_MOVE` out of it).
    pub fn buf_mut(&mut self, i: usize) -> &mut AlignedBuf {
        &mut self.bufs[i]
    }

    /// Size of each buffer.
    pub fn buf_len(&self) -> usize {
        self.bufs.first().map_or(0, AlignedBuf::len)
    }

    /// Reads exactly `len` bytes from `fd` into buffer `i` at `offset`. Returns
    /// `Ok(false)` if the stream ended cleanly before the first byte.
    pub fn read_exact(
        &mut self,
        fd: BorrowedFd<'_>,
        i: usize,
        offset: usize,
        len: usize,
    ) -> io::Result<bool> {
        let buf = self
            .bufs
            .get_mut(i)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such buffer"))?;
        if offset.checked_add(len).is_none_or(|e| e > buf.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "read of {len} bytes at {offset} overflows a {}-byte buffer",
                    buf.len()
                ),
            ));
        }
        let index = u16::try_from(i).map_err(|_| io::Error::other("buffer index"))?;
        let base = buf.as_mut_ptr();
        let mut done = 0usize;
        while done < len {
            let want = u32::try_from(len - done).unwrap_or(u32::MAX);
            // SAFETY: `offset + done + want <= buf.len()` (checked above), so the
            // pointer stays inside our buffer.
            let ptr = unsafe { base.add(offset + done) };
            let entry = if self.fixed {
                opcode::ReadFixed::new(types::Fd(fd.as_raw_fd()), ptr, want, index)
                    .offset(u64::MAX)
                    .build()
            } else {
                opcode::Recv::new(types::Fd(fd.as_raw_fd()), ptr, want)
                    .flags(libc::MSG_WAITALL)
                    .build()
            };
            // SAFETY: the target range lies in a buffer we own (and, when fixed, is
            // registered under `index`); no slice of it is borrowed until we reap
            // the completion below, inside this call.
            unsafe { self.ring.push(entry.user_data(1)) }.map_err(ring_io)?;
            self.ring.submit_and_wait(1).map_err(ring_io)?;
            let res = self
                .ring
                .completions()
                .next()
                .map(|(_, r)| r)
                .ok_or_else(|| io::Error::other("io_uring returned no completion"))?;
            if res < 0 {
                let e = io::Error::from_raw_os_error(-res);
                if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(e);
            }
            if res == 0 {
                if done == 0 {
                    return Ok(false);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("stream ended {done} bytes into a {len}-byte read"),
                ));
            }
            done += usize::try_from(res).unwrap_or(0);
        }
        Ok(true)
    }
}

const TIMEOUT_TAG: u64 = u64::MAX;

/// Sleeps on several file descriptors through io_uring polls.
#[derive(Debug)]
pub struct Waiter {
    ring: Ring,
    armed: Vec<RawFd>,
    timeout: Box<types::Timespec>,
    timeout_armed: bool,
}

impl Waiter {
    /// A waiter with its own small ring.
    pub fn new() -> io::Result<Waiter> {
        Ok(Waiter {
            ring: Ring::new(16).map_err(ring_io)?,
            armed: Vec::new(),
            timeout: Box::new(types::Timespec::new()),
            timeout_armed: false,
        })
    }

    /// Waits until one of `fds` is readable (or hung up), or `timeout` passes.
    pub fn wait(&mut self, fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<()> {
        for (i, fd) in fds.iter().enumerate() {
            let raw = fd.as_raw_fd();
            if self.armed.contains(&raw) {
                continue;
            }
            let entry =
                opcode::PollAdd::new(types::Fd(raw), u32::from(libc::POLLIN.unsigned_abs()))
                    .build()
                    .user_data(u64::try_from(raw).unwrap_or(0) | ((i as u64) << 32));
            // SAFETY: a poll names no memory of ours; the kernel holds its own
            // reference to the file while the poll is armed.
            unsafe { self.ring.push(entry) }.map_err(ring_io)?;
            self.armed.push(raw);
        }
        if !self.timeout_armed {
            *self.timeout = types::Timespec::new()
                .sec(timeout.as_secs())
                .nsec(timeout.subsec_nanos());
            let entry = opcode::Timeout::new(&*self.timeout)
                .build()
                .user_data(TIMEOUT_TAG);
            // SAFETY: the timespec lives in a Box owned by `self` and is not
            // changed while this timeout is armed (`timeout_armed`).
            unsafe { self.ring.push(entry) }.map_err(ring_io)?;
            self.timeout_armed = true;
        }
        self.ring.submit_and_wait(1).map_err(ring_io)?;
        let done: Vec<u64> = self.ring.completions().map(|(u, _)| u).collect();
        for u in done {
            if u == TIMEOUT_TAG {
                self.timeout_armed = false;
            } else {
                let raw = RawFd::try_from(u & 0xffff_ffff).unwrap_or(-1);
                self.armed.retain(|&f| f != raw);
            }
        }
        Ok(())
    }
}

/// `IORING_NOTIF_USAGE_ZC_COPIED`: the notification says the kernel copied after all.
const ZC_COPIED: i32 = i32::MIN;

/// Zero-copy vectored sends through io_uring.
#[derive(Debug)]
pub struct ZeroCopySender {
    ring: Ring,
    iov: Vec<libc::iovec>,
    /// Sends whose notification said the kernel copied the data after all.
    pub copied: u64,
    /// Sends in all.
    pub sends: u64,
}

impl ZeroCopySender {
    /// A sender with its own ring. Fails with a typed error before Linux 6.1.
    pub fn new() -> io::Result<ZeroCopySender> {
        let ring = Ring::new(16).map_err(ring_io)?;
        ring.probe()
            .require(super::ring::Op::SendMsgZc)
            .map_err(ring_io)?;
        Ok(ZeroCopySender {
            ring,
            iov: Vec::new(),
            copied: 0,
            sends: 0,
        })
    }

    fn note(&mut self, result: i32) {
        if result & ZC_COPIED != 0 {
            self.copied += 1;
        }
    }

    /// Sends every piece, in order; returns once every byte is sent and the kernel
    /// has released every page it pinned.
    pub fn send(&mut self, fd: BorrowedFd<'_>, pieces: &[Piece<'_>]) -> io::Result<usize> {
        let total = iovecs(pieces, &mut self.iov)?;
        let mut start = 0usize;
        let mut sent = 0usize;
        let mut notifications = 0usize;
        while sent < total {
            let end = (start + super::guest::MAX_IOV).min(self.iov.len());
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iov[start..end].as_mut_ptr();
            msg.msg_iovlen = end - start;
            let entry = opcode::SendMsgZc::new(types::Fd(fd.as_raw_fd()), &msg)
                .build()
                .user_data(1);
            // SAFETY: `msg` and the iovecs it points to live until the result
            // completion is reaped below; the memory they describe (the caller's
            // headers, guest memory kept mapped by its owner) until every
            // notification is, before this function returns.
            unsafe { self.ring.push(entry) }.map_err(ring_io)?;
            let mut result = None;
            while result.is_none() {
                self.ring.submit_and_wait(1).map_err(ring_io)?;
                let done: Vec<_> = self.ring.completions_full().collect();
                for c in done {
                    if c.notif() {
                        notifications = notifications.saturating_sub(1);
                        self.note(c.result);
                    } else {
                        if c.more() {
                            notifications += 1;
                        }
                        result = Some(c.result);
                    }
                }
            }
            self.sends += 1;
            let res = result.unwrap_or(0);
            if res < 0 {
                let e = io::Error::from_raw_os_error(-res);
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                return Err(e);
            }
            let n = usize::try_from(res).unwrap_or(0);
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket accepted no bytes",
                ));
            }
            sent += n;
            advance(&mut self.iov, &mut start, n);
        }
        while notifications > 0 {
            self.ring.submit_and_wait(1).map_err(ring_io)?;
            let done: Vec<_> = self.ring.completions_full().collect();
            for c in done.into_iter().filter(|c| c.notif()) {
                notifications -= 1;
                self.note(c.result);
            }
        }
        Ok(sent)
    }
}
