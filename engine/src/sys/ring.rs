//! A thin io_uring wrapper over the `io-uring` crate.
//!
//! # Mechanism
//!
//! [`Ring`] owns one `io_uring` instance. [`Ring::push`] queues a submission
//! entry, submitting first when the submission queue is full;
//! [`Ring::submit`] / [`Ring::submit_and_wait`] enter the kernel;
//! [`Ring::completions`] drains the completion queue as
//! `(user_data, result)` pairs. The engine keys its in-flight operations by
//! `user_data` (a slab index) and owns every buffer an operation targets
//! until its completion is seen: the wrapper deliberately hides no buffer
//! ownership, which is why `push` is `unsafe`.
//!
//! [`RingFeatures`] probes which opcodes the kernel has
//! (`IORING_REGISTER_PROBE`) so a missing one becomes
//! [`RingError::Unsupported`] naming the kernel version.
//!
//! # Kernel versions
//!
//! * Linux 5.1: io_uring, `READV`/`WRITEV`, `READ_FIXED`/`WRITE_FIXED`,
//!   `POLL_ADD`, registered buffers.
//! * Linux 5.4: `TIMEOUT`. 5.5: `ASYNC_CANCEL`, `LINK_TIMEOUT`.
//! * Linux 5.6: `READ`/`WRITE`, `SEND`/`RECV`, and the opcode probe (before
//!   5.6 the probe reports nothing supported).
//! * Linux 6.0: `SEND_ZC`.
//!
//! # Hazards
//!
//! * Every buffer, iovec, and fd an entry names must stay valid until its
//!   completion has been reaped, even if the `Ring` is dropped first
//!   (dropping the ring cancels, but a cancelled op may still have written).
//! * Registered buffers pin their pages until unregistered or the ring is
//!   dropped; a fixed op targets them by index.
//! * If the completion queue overflows, the kernel (with `FEAT_NODROP`, 5.5)
//!   keeps the excess and `submit` returns `EBUSY` until completions are
//!   drained: drain before submitting more.
//! * `SEND_ZC` produces two completions (result, then a notification with
//!   `IORING_CQE_F_NOTIF`); on loopback every send reports "copied".

use std::io;

use io_uring::{opcode, squeue, IoUring, Probe};

use super::mapping::AlignedBuf;

/// Errors from the ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// `io_uring_setup` failed.
    #[error("io_uring_setup with {entries} entries failed")]
    Setup {
        /// Entries asked for.
        entries: u32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `io_uring_register` failed.
    #[error("io_uring_register({what}) failed")]
    Register {
        /// What was being registered.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `io_uring_enter` failed.
    #[error("io_uring_enter failed")]
    Submit {
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The submission queue stayed full after a submit.
    #[error("submission queue full ({entries} entries) after submitting")]
    Full {
        /// The queue's size.
        entries: u32,
    },
    /// The kernel lacks an opcode.
    #[error("unsupported: io_uring opcode {opcode} needs {needs}")]
    Unsupported {
        /// The opcode, e.g. "SEND_ZC".
        opcode: &'static str,
        /// The kernel version that brought it.
        needs: &'static str,
    },
}

/// One completion, with its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The entry's `user_data`.
    pub user_data: u64,
    /// Result: bytes or a value on success, `-errno` on failure.
    pub result: i32,
    /// `IORING_CQE_F_*`.
    pub flags: u32,
}

impl Completion {
    /// `IORING_CQE_F_MORE`: more completions follow for this entry.
    pub fn more(&self) -> bool {
        io_uring::cqueue::more(self.flags)
    }
    /// `IORING_CQE_F_NOTIF`: a zero-copy send's buffer notification.
    pub fn notif(&self) -> bool {
        io_uring::cqueue::notif(self.flags)
    }
}

/// An io_uring instance.
pub struct Ring {
    ring: IoUring,
    /// Number of buffers registered (fixed-buffer indices are `0..`).
    registered: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("sq_entries", &self.ring.params().sq_entries())
            .field("cq_entries", &self.ring.params().cq_entries())
            .field("registered", &self.registered)
            .finish()
    }
}

impl Ring {
    /// Creates a ring with `entries` submission entries (rounded up to a power
    /// of two by the kernel; the completion queue is twice that).
    pub fn new(entries: u32) -> Result<Ring, RingError> {
        let ring = IoUring::new(entries).map_err(|source| RingError::Setup { entries, source })?;
        Ok(Ring {
            ring,
            registered: 0,
        })
    }

    /// The ring's file descriptor.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.ring.as_raw_fd()
    }

    /// Registers `bufs` as fixed buffers `0..bufs.len()` for
    /// `READ_FIXED`/`WRITE_FIXED` (buf_index = position in `bufs`).
    ///
    /// # Safety
    ///
    /// Every buffer must stay alive (not dropped or moved out of its mapping;
    /// an `AlignedBuf` never moves its memory) until
    /// [`Ring::unregister_buffers`] or the ring is dropped, and while a fixed
    /// operation targeting a buffer is in flight no Rust slice of that buffer
    /// may be used.
    pub unsafe fn register_buffers(&mut self, bufs: &[AlignedBuf]) -> Result<(), RingError> {
        let iovecs: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the iovecs describe live mappings; the caller keeps them
        // alive for as long as they are registered.
        unsafe { self.ring.submitter().register_buffers(&iovecs) }.map_err(|source| {
            RingError::Register {
                what: "buffers",
                source,
            }
        })?;
        self.registered = bufs.len();
        Ok(())
    }

    /// Unregisters the fixed buffers.
    pub fn unregister_buffers(&mut self) -> Result<(), RingError> {
        self.ring
            .submitter()
            .unregister_buffers()
            .map_err(|source| RingError::Register {
                what: "unregister buffers",
                source,
            })?;
        self.registered = 0;
        Ok(())
    }

    /// Queues `entry`, first submitting queued entries if the submission
    /// queue is full.
    ///
    /// # Safety
    ///
    /// Every buffer, iovec, fd and fixed-buffer index that `entry` names must
    /// stay valid, and not be accessed through Rust references in a way that
    /// conflicts with the operation (e.g. no slice of a read's target), until
    /// its completion has been reaped from [`Ring::completions`].
    pub unsafe fn push(&mut self, entry: squeue::Entry) -> Result<(), RingError> {
        // SAFETY: the caller guarantees the entry's resources outlive it.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        self.submit()?;
        let entries = self.ring.params().sq_entries();
        // SAFETY: as above.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        pushed.map_err(|_| RingError::Full { entries })
    }

    /// Submits queued entries; returns how many the kernel consumed.
    pub fn submit(&mut self) -> Result<usize, RingError> {
        self.ring
            .submit()
            .map_err(|source| RingError::Submit { source })
    }

    /// Submits queued entries and waits until at least `want` completions are
    /// available.
    pub fn submit_and_wait(&mut self, want: usize) -> Result<usize, RingError> {
        self.ring
            .submit_and_wait(want)
            .map_err(|source| RingError::Submit { source })
    }

    /// Drains available completions as `(user_data, result)`.
    pub fn completions(&mut self) -> impl Iterator<Item = (u64, i32)> + '_ {
        self.ring.completion().map(|c| (c.user_data(), c.result()))
    }

    /// Drains available completions with their flags (for multishot and
    /// `SEND_ZC` notifications).
    pub fn completions_full(&mut self) -> impl Iterator<Item = Completion> + '_ {
        self.ring.completion().map(|c| Completion {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        })
    }

    /// The opcodes this kernel supports (all false before Linux 5.6).
    pub fn probe(&self) -> RingFeatures {
        let mut probe = Probe::new();
        if self.ring.submitter().register_probe(&mut probe).is_err() {
            return RingFeatures::default();
        }
        RingFeatures::from_probe(&probe)
    }
}

/// Opcodes the kernel supports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // one flag per opcode is the point
pub struct RingFeatures {
    /// `IORING_OP_NOP` (5.1).
    pub nop: bool,
    /// `IORING_OP_READ_FIXED` (5.1).
    pub read_fixed: bool,
    /// `IORING_OP_WRITE_FIXED` (5.1).
    pub write_fixed: bool,
    /// `IORING_OP_POLL_ADD` (5.1).
    pub poll_add: bool,
    /// `IORING_OP_TIMEOUT` (5.4).
    pub timeout: bool,
    /// `IORING_OP_ASYNC_CANCEL` (5.5).
    pub async_cancel: bool,
    /// `IORING_OP_LINK_TIMEOUT` (5.5).
    pub link_timeout: bool,
    /// `IORING_OP_READ` (5.6).
    pub read: bool,
    /// `IORING_OP_WRITE` (5.6).
    pub write: bool,
    /// `IORING_OP_SEND` (5.6).
    pub send: bool,
    /// `IORING_OP_RECV` (5.6).
    pub recv: bool,
    /// `IORING_OP_SEND_ZC` (6.0).
    pub send_zc: bool,
    /// `IORING_OP_SENDMSG_ZC` (6.1).
    pub sendmsg_zc: bool,
}

/// An opcode the engine may require, for [`RingFeatures::require`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `NOP`.
    Nop,
    /// `READ_FIXED`.
    ReadFixed,
    /// `WRITE_FIXED`.
    WriteFixed,
    /// `POLL_ADD`.
    PollAdd,
    /// `TIMEOUT`.
    Timeout,
    /// `ASYNC_CANCEL`.
    AsyncCancel,
    /// `LINK_TIMEOUT`.
    LinkTimeout,
    /// `READ`.
    Read,
    /// `WRITE`.
    Write,
    /// `SEND`.
    Send,
    /// `RECV`.
    Recv,
    /// `SEND_ZC`.
    SendZc,
    /// `SENDMSG_ZC`.
    SendMsgZc,
}

impl RingFeatures {
    fn from_probe(p: &Probe) -> RingFeatures {
        RingFeatures {
            nop: p.is_supported(opcode::Nop::CODE),
            read_fixed: p.is_supported(opcode::ReadFixed::CODE),
            write_fixed: p.is_supported(opcode::WriteFixed::CODE),
            poll_add: p.is_supported(opcode::PollAdd::CODE),
            timeout: p.is_supported(opcode::Timeout::CODE),
            async_cancel: p.is_supported(opcode::AsyncCancel::CODE),
            link_timeout: p.is_supported(opcode::LinkTimeout::CODE),
            read: p.is_supported(opcode::Read::CODE),
            write: p.is_supported(opcode::Write::CODE),
            send: p.is_supported(opcode::Send::CODE),
            recv: p.is_supported(opcode::Recv::CODE),
            send_zc: p.is_supported(opcode::SendZc::CODE),
            sendmsg_zc: p.is_supported(opcode::SendMsgZc::CODE),
        }
    }

    /// Probes with a throwaway ring.
    pub fn detect() -> Result<RingFeatures, RingError> {
        Ok(Ring::new(2)?.probe())
    }

    /// Typed error unless `op` is supported.
    pub fn require(&self, op: Op) -> Result<(), RingError> {
        let (have, opcode, needs) = match op {
            Op::Nop => (self.nop, "NOP", "Linux 5.1"),
            Op::ReadFixed => (self.read_fixed, "READ_FIXED", "Linux 5.1"),
            Op::WriteFixed => (self.write_fixed, "WRITE_FIXED", "Linux 5.1"),
            Op::PollAdd => (self.poll_add, "POLL_ADD", "Linux 5.1"),
            Op::Timeout => (self.timeout, "TIMEOUT", "Linux 5.4"),
            Op::AsyncCancel => (self.async_cancel, "ASYNC_CANCEL", "Linux 5.5"),
            Op::LinkTimeout => (self.link_timeout, "LINK_TIMEOUT", "Linux 5.5"),
            Op::Read => (self.read, "READ", "Linux 5.6"),
            Op::Write => (self.write, "WRITE", "Linux 5.6"),
            Op::Send => (self.send, "SEND", "Linux 5.6"),
            Op::Recv => (self.recv, "RECV", "Linux 5.6"),
            Op::SendZc => (self.send_zc, "SEND_ZC", "Linux 6.0"),
            Op::SendMsgZc => (self.sendmsg_zc, "SENDMSG_ZC", "Linux 6.1"),
        };
        if have {
            Ok(())
        } else {
            Err(RingError::Unsupported { opcode, needs })
        }
    }
}
