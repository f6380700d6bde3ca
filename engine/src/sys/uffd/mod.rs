//! userfaultfd: the destination's page-fault channel.
//!
//! # Mechanism
//!
//! A userfaultfd (uffd) is a file descriptor through which the kernel reports
//! faults on registered ranges of our address space. A thread touching a
//! missing page sleeps until we resolve the fault with an ioctl that installs
//! the page atomically (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_MOVE`) and
//! wakes it. Faults and non-cooperative events (REMOVE, UNMAP, REMAP, FORK)
//! are read from the fd as fixed 32-byte [`UffdMsg`] records, either with
//! [`Uffd::read_events`] or by an `IORING_OP_READ` on [`Uffd::as_raw_fd`]
//! followed by [`UffdMsg::parse`] / [`parse_bytes`].
//!
//! This module talks to the kernel directly through `libc`: the `userfaultfd`
//! crate has no `UFFDIO_MOVE` and no `WP_ASYNC`, and keeps its event parser
//! private, so it cannot parse messages read through io_uring. It is split by
//! concern: [`abi`] (structures and ioctl numbers), [`events`] (reading and
//! decoding events), [`features`] (feature and ioctl masks), [`ops`]
//! (installs and write protection); this file holds the descriptor itself.
//!
//! # Kernel versions
//!
//! * userfaultfd on anonymous memory, `UFFDIO_COPY`/`ZEROPAGE`/`WAKE`: Linux 4.3.
//! * `EVENT_REMOVE`/`UNMAP`/`REMAP`/`FORK`, `MISSING_HUGETLBFS`/`SHMEM`: 4.11.
//! * `THREAD_ID`: 4.14. `UFFD_USER_MODE_ONLY`: 5.11. `EXACT_ADDRESS`: 5.18.
//! * `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW`: 6.1.
//! * `WP_ASYNC`: 6.7. `UFFDIO_MOVE` (`FEATURE_MOVE`): 6.8.
//!
//! Missing features are reported as [`UffdError::Unsupported`], naming the
//! version that brought them.
//!
//! # Hazards
//!
//! * **A pending non-cooperative event blocks installs.** While a REMOVE,
//!   UNMAP, REMAP or FORK event has not been read, every COPY/ZEROPAGE/MOVE on
//!   that uffd fails with `EAGAIN` ([`Installed::Again`]). The thread that
//!   caused the event (e.g. `madvise(MADV_DONTNEED)`) sleeps until the event is
//!   read, and a short window remains after the read until that thread runs
//!   again; so the fault loop must read events and retry, never spin on the
//!   ioctl alone.
//! * An install can make partial progress: the kernel reports the bytes done
//!   and returns `EAGAIN`. This also happens when a *later* page of the range
//!   is already present (the first present page gives `EEXIST` only when it is
//!   the first page). Retry the remainder.
//! * `user_mode_only` faults only user-mode accesses: a kernel access (KVM's
//!   `get_user_pages`, a `read(2)` into guest memory) to a missing page then
//!   fails with `EFAULT` instead of being reported. Do not set it for memory
//!   a KVM guest runs on.
//! * On hugetlbfs, `UFFDIO_ZEROPAGE` and `UFFDIO_MOVE` fail with `EINVAL`, and
//!   all addresses and lengths must be huge-page aligned.
//!   On an unreserved hugetlb mapping (`MAP_NORESERVE`) whose pool is empty,
//!   `UFFDIO_COPY` fails with `EEXIST` although nothing is installed
//!   (observed on Linux 6.18): [`Installed::Exists`] is then a lie, so map
//!   hugetlb guest memory with a reservation (as `mapping` does).
//! * `UFFDIO_MOVE` needs a private anonymous, page-aligned, populated source
//!   (else `EINVAL`/`ENOENT`), and fails with `EBUSY` on a page shared
//!   copy-on-write after `fork()`. With another thread of the process running
//!   on another CPU it costs a TLB shootdown (~15 µs here); COPY is the default.
//! * A FORK event carries a new uffd that the reader owns and must close.
//! * `UFFDIO_API` may be issued once per uffd. A uffd handed over by a VMM is
//!   already initialised: use [`Uffd::from_fd`] and never [`Uffd::api`] on it.

mod abi;
mod events;
mod features;
mod ops;

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub(crate) use abi::request as ioctl_request;
use abi::{
    request, u64_of, UffdioApi, UffdioRange, UffdioRegister, UFFDIO_API, UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP, UFFDIO_UNREGISTER, UFFDIO_WAKE,
    UFFD_API, UFFD_USER_MODE_ONLY, USERFAULTFD_IOC_NEW,
};
pub use abi::{
    PAGEFAULT_FLAG_MINOR, PAGEFAULT_FLAG_WP, PAGEFAULT_FLAG_WRITE, UFFDIO_COPY, UFFDIO_MOVE,
    UFFDIO_WRITEPROTECT, UFFDIO_ZEROPAGE,
};
pub use events::{parse_all, parse_bytes, Event, UffdMsg, UFFD_MSG_SIZE};
pub use features::{Features, Ioctls};
pub use ops::Installed;

/// Errors from userfaultfd operations.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` nor the `userfaultfd(2)` syscall gave a uffd.
    #[error("cannot create a userfaultfd (/dev/userfaultfd: {dev}; userfaultfd(2) follows)")]
    Open {
        /// Why `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW` failed.
        dev: io::Error,
        /// Why the `userfaultfd(2)` syscall failed.
        #[source]
        source: io::Error,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake failed (features requested {features:#x})")]
    Api {
        /// The feature bits requested.
        features: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks a feature the engine needs.
    #[error("unsupported: userfaultfd feature {feature} needs {needs}")]
    Unsupported {
        /// The feature's name (`UFFD_FEATURE_*` or `UFFDIO_*`).
        feature: &'static str,
        /// The kernel version that brought it, e.g. "Linux 6.8".
        needs: &'static str,
    },
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER of {addr:#x}+{len:#x} (mode {mode:?}) failed")]
    Register {
        /// Start of the range.
        addr: usize,
        /// Length of the range in bytes.
        len: usize,
        /// The registration mode.
        mode: RegisterMode,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// A range ioctl (`UNREGISTER`, `WAKE`, `COPY`, `ZEROPAGE`, `MOVE`) failed.
    #[error("{op} of {addr:#x}+{len:#x} failed")]
    Range {
        /// The ioctl, e.g. "UFFDIO_COPY".
        op: &'static str,
        /// Destination (or range) start.
        addr: usize,
        /// Length in bytes.
        len: usize,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The kernel reported more bytes done than requested (ABI mismatch).
    #[error("{op} of {addr:#x}+{len:#x} reported {reported} bytes done")]
    BadProgress {
        /// The ioctl.
        op: &'static str,
        /// Destination start.
        addr: usize,
        /// Requested length.
        len: usize,
        /// What the kernel wrote back.
        reported: i64,
    },
    /// Reading or polling the uffd failed.
    #[error("reading userfaultfd events failed")]
    Read {
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// Options for [`Uffd::open`].
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdOptions {
    /// `O_NONBLOCK`: reads return `EAGAIN` (→ 0 events) instead of blocking.
    pub nonblock: bool,
    /// `UFFD_USER_MODE_ONLY`: only user-mode faults are reported (see hazards:
    /// not for KVM guest memory).
    pub user_mode_only: bool,
}

/// How a range is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterMode {
    /// Report faults on missing pages.
    Missing,
    /// Report writes to write-protected pages.
    Wp,
    /// Both.
    MissingWp,
}

impl RegisterMode {
    fn bits(self) -> u64 {
        match self {
            RegisterMode::Missing => UFFDIO_REGISTER_MODE_MISSING,
            RegisterMode::Wp => UFFDIO_REGISTER_MODE_WP,
            RegisterMode::MissingWp => UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
        }
    }
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Creates a new uffd: `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW` first
    /// (Linux 6.1; access is governed by the device's permissions), then the
    /// `userfaultfd(2)` syscall (which may need `CAP_SYS_PTRACE` or
    /// `vm.unprivileged_userfaultfd=1` unless `user_mode_only`).
    ///
    /// The uffd is close-on-exec. Call [`Uffd::api`] on it before registering.
    pub fn open(opts: UffdOptions) -> Result<Uffd, UffdError> {
        let mut flags = libc::O_CLOEXEC;
        if opts.nonblock {
            flags |= libc::O_NONBLOCK;
        }
        if opts.user_mode_only {
            flags |= UFFD_USER_MODE_ONLY;
        }
        let dev = match Self::open_dev(flags) {
            Ok(fd) => return Ok(Uffd { fd }),
            Err(e) => e,
        };
        // SAFETY: userfaultfd(2) takes one int of flags and touches no memory.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if ret < 0 {
            return Err(UffdError::Open {
                dev,
                source: errno(),
            });
        }
        let raw = RawFd::try_from(ret).map_err(move |_| UffdError::Open {
            dev,
            source: io::Error::other("userfaultfd(2) returned an out-of-range fd"),
        })?;
        // SAFETY: the syscall just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Uffd { fd })
    }

    fn open_dev(flags: libc::c_int) -> io::Result<OwnedFd> {
        const PATH: &CStr = c"/dev/userfaultfd";
        // SAFETY: PATH is a NUL-terminated string that outlives the call.
        let dev = unsafe { libc::open(PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev < 0 {
            return Err(errno());
        }
        // SAFETY: open(2) just returned this fd; nothing else owns it.
        let dev = unsafe { OwnedFd::from_raw_fd(dev) };
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value, no memory.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), request(USERFAULTFD_IOC_NEW), flags) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: the ioctl just returned this new fd; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Wraps a uffd handed over by a VMM. It must already have completed its
    /// `UFFDIO_API` handshake: do not call [`Uffd::api`] on it.
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd { fd }
    }

    /// Gives the fd back.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Reports the features of this kernel, using a throwaway uffd.
    pub fn probe() -> Result<Features, UffdError> {
        let uffd = Uffd::open(UffdOptions {
            nonblock: true,
            user_mode_only: false,
        })
        .or_else(|_| {
            Uffd::open(UffdOptions {
                nonblock: true,
                user_mode_only: true,
            })
        })?;
        uffd.handshake(Features::NONE)
    }

    /// The `UFFDIO_API` handshake, enabling `wanted`. Returns every feature
    /// the kernel supports. A wanted feature the kernel lacks is reported as
    /// [`UffdError::Unsupported`] (checked first on a throwaway uffd, because
    /// the kernel only answers `EINVAL` and the handshake is once per uffd).
    pub fn api(&self, wanted: Features) -> Result<Features, UffdError> {
        if wanted != Features::NONE {
            let supported = Uffd::probe()?;
            if let Some((feature, needs)) = supported.first_missing(wanted) {
                return Err(UffdError::Unsupported { feature, needs });
            }
        }
        self.handshake(wanted)
    }

    fn handshake(&self, wanted: Features) -> Result<Features, UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features: wanted.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `api` mirrors and which lives across the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request(UFFDIO_API), &mut api) };
        if ret < 0 {
            return Err(UffdError::Api {
                features: wanted.bits(),
                source: errno(),
            });
        }
        Ok(Features::from_bits(api.features))
    }

    /// Registers `[addr, addr + len)` (page-aligned) and returns the ioctls
    /// the kernel allows on it; check them with [`Ioctls::require`].
    pub fn register(
        &self,
        addr: usize,
        len: usize,
        mode: RegisterMode,
    ) -> Result<Ioctls, UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: u64_of(addr),
                len: u64_of(len),
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`,
        // which `reg` mirrors. Registration changes how faults on the range are
        // handled but does not touch its memory.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request(UFFDIO_REGISTER), &mut reg) };
        if ret < 0 {
            return Err(UffdError::Register {
                addr,
                len,
                mode,
                source: errno(),
            });
        }
        Ok(Ioctls::from_bits(reg.ioctls))
    }

    /// Unregisters `[addr, addr + len)`; threads blocked on it are woken.
    pub fn unregister(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.range_ioctl(UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER", addr, len)
    }

    /// Wakes threads blocked on faults in `[addr, addr + len)` (after installs
    /// done with `wake = false`).
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.range_ioctl(UFFDIO_WAKE, "UFFDIO_WAKE", addr, len)
    }

    fn range_ioctl(
        &self,
        nr: u32,
        op: &'static str,
        addr: usize,
        len: usize,
    ) -> Result<(), UffdError> {
        let range = UffdioRange {
            start: u64_of(addr),
            len: u64_of(len),
        };
        // SAFETY: these ioctls only read a `struct uffdio_range`, which
        // `range` mirrors.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request(nr), &range) };
        if ret < 0 {
            return Err(UffdError::Range {
                op,
                addr,
                len,
                source: errno(),
            });
        }
        Ok(())
    }
    /// Reads as many pending events as fit in `buf`; returns how many were
    /// read. On a non-blocking uffd, 0 means none is pending; on a blocking
    /// uffd this sleeps until one arrives.
    pub fn read_events(&self, buf: &mut [UffdMsg]) -> Result<usize, UffdError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            // SAFETY: `buf` is writable for `size_of_val(buf)` bytes and
            // `UffdMsg` is plain old data, valid for any bytes the kernel writes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    std::mem::size_of_val(buf),
                )
            };
            if let Ok(n) = usize::try_from(n) {
                return Ok(n / UFFD_MSG_SIZE);
            }
            let err = errno();
            match err.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(UffdError::Read { source: err }),
            }
        }
    }

    /// Waits up to `timeout_ms` (-1: forever) for the uffd to become readable.
    /// Returns whether it is.
    pub fn poll_readable(&self, timeout_ms: i32) -> Result<bool, UffdError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: `pfd` is one valid pollfd that lives across the call.
            let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if ret >= 0 {
                return Ok(ret > 0 && pfd.revents & libc::POLLIN != 0);
            }
            let err = errno();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(UffdError::Read { source: err });
            }
        }
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Sets `O_NONBLOCK` on a userfaultfd (a VMM may hand over a blocking one;
/// io_uring reads wait for events only on a non-blocking one).
pub fn ensure_nonblocking(uffd: &Uffd) -> io::Result<()> {
    let fl = rustix::fs::fcntl_getfl(uffd)?;
    if !fl.contains(rustix::fs::OFlags::NONBLOCK) {
        rustix::fs::fcntl_setfl(uffd, fl | rustix::fs::OFlags::NONBLOCK)?;
    }
    Ok(())
}

/// Closes the userfaultfd a FORK event carried (the engine does not serve
/// the child).
pub fn close_forked(fd: u32) {
    if let Ok(raw) = RawFd::try_from(fd) {
        // SAFETY: the kernel installed this descriptor in our table for the
        // FORK event and nothing else owns it; taking ownership closes it once.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}
