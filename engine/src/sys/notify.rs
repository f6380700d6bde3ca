//! Waking a thread that sleeps in its io_uring ring, from another thread.
//!
//! # Mechanism
//! An eventfd: [`Notifier::notify`] adds 1 to its counter; the sleeping
//! thread's ring has a multishot read of the eventfd armed into a small slot
//! ring, so the write completes that read and the thread wakes with no extra
//! system call to reset the counter (the read does).
//!
//! # Kernel versions
//! eventfd: Linux 2.6.22; multishot read: 6.7.
//!
//! # Hazards
//! Notifications coalesce: one wake-up may stand for many notifies, so the
//! woken thread must re-check all shared state, not count wake-ups.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// An eventfd.
#[derive(Debug)]
pub struct Notifier {
    fd: OwnedFd,
}

impl Notifier {
    /// A non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Notifier> {
        let fd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        Ok(Notifier { fd })
    }

    /// Wakes the reader; never blocks (a saturated counter is already a wake-up).
    pub fn notify(&self) {
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Resets the counter without a ring (returns whether it was set).
    pub fn drain(&self) -> bool {
        let mut b = [0u8; 8];
        matches!(rustix::io::read(&self.fd, &mut b), Ok(8))
    }
}

impl AsFd for Notifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
