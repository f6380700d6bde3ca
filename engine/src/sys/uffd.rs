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
//! crate has no `UFFDIO_MOVE` and keeps its event parser private, so it cannot
//! parse messages read through io_uring.
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

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::mem::size_of;
use std::ops::BitOr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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

// ---------------------------------------------------------------------------
// Kernel ABI (include/uapi/linux/userfaultfd.h)
// ---------------------------------------------------------------------------

const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` from `asm-generic/ioctl.h`.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    // The size field is 14 bits; every struct here is < 64 bytes, which the
    // assertions on the resulting numbers below pin.
    #[allow(clippy::cast_possible_truncation)] // size < 2^14, checked by the const asserts
    let size = size as u32;
    (dir << IOC_DIRSHIFT) | (size << IOC_SIZESHIFT) | (ty << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT)
}
const fn iowr(ty: u32, nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size)
}
const fn ior(ty: u32, nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, ty, nr, size)
}
const fn io(ty: u32, nr: u32) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;

const NR_REGISTER: u32 = 0x00;
const NR_UNREGISTER: u32 = 0x01;
const NR_WAKE: u32 = 0x02;
const NR_COPY: u32 = 0x03;
const NR_ZEROPAGE: u32 = 0x04;
const NR_MOVE: u32 = 0x05;
const NR_WRITEPROTECT: u32 = 0x06;
const NR_CONTINUE: u32 = 0x07;
const NR_POISON: u32 = 0x08;
const NR_API: u32 = 0x3F;

/// `UFFDIO_API`.
pub const UFFDIO_API: u32 = iowr(UFFDIO, NR_API, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u32 = iowr(UFFDIO, NR_REGISTER, size_of::<UffdioRegister>());
/// `UFFDIO_UNREGISTER`.
pub const UFFDIO_UNREGISTER: u32 = ior(UFFDIO, NR_UNREGISTER, size_of::<UffdioRange>());
/// `UFFDIO_WAKE`.
pub const UFFDIO_WAKE: u32 = ior(UFFDIO, NR_WAKE, size_of::<UffdioRange>());
/// `UFFDIO_COPY`.
pub const UFFDIO_COPY: u32 = iowr(UFFDIO, NR_COPY, size_of::<UffdioCopy>());
/// `UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE: u32 = iowr(UFFDIO, NR_ZEROPAGE, size_of::<UffdioZeropage>());
/// `UFFDIO_MOVE`.
pub const UFFDIO_MOVE: u32 = iowr(UFFDIO, NR_MOVE, size_of::<UffdioMove>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1).
pub const USERFAULTFD_IOC_NEW: u32 = io(UFFDIO, 0x00);

// Pin the ABI: sizes and the ioctl numbers as they appear in strace/headers.
const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioZeropage>() == 32);
const _: () = assert!(size_of::<UffdioMove>() == 40);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
const _: () = assert!(UFFDIO_MOVE == 0xc028_aa05);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);

/// `UFFD_USER_MODE_ONLY` flag of `userfaultfd(2)` (Linux 5.11).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

/// `UFFD_PAGEFAULT_FLAG_WRITE`: the fault was a write.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`: the fault is a write-protect fault.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `UFFD_PAGEFAULT_FLAG_MINOR`: the fault is a minor fault.
pub const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioApi {
    /// Must be `UFFD_API` (0xAA).
    pub api: u64,
    /// In: wanted features. Out: all features the kernel supports.
    pub features: u64,
    /// Out: ioctls available on the uffd.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioRange {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioRegister {
    /// The range to register.
    pub range: UffdioRange,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// Out: ioctls available on the range.
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioCopy {
    /// Destination (registered) address.
    pub dst: u64,
    /// Source address, read by the kernel.
    pub src: u64,
    /// Length in bytes.
    pub len: u64,
    /// `UFFDIO_COPY_MODE_*`.
    pub mode: u64,
    /// Out: bytes copied, or `-errno`.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioZeropage {
    /// The range to fill with zero pages.
    pub range: UffdioRange,
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    pub mode: u64,
    /// Out: bytes zeroed, or `-errno`.
    pub zeropage: i64,
}

/// `struct uffdio_move`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioMove {
    /// Destination (registered) address.
    pub dst: u64,
    /// Source address (private anonymous); its pages are taken away.
    pub src: u64,
    /// Length in bytes.
    pub len: u64,
    /// `UFFDIO_MOVE_MODE_*`.
    pub mode: u64,
    /// Out: bytes moved, or `-errno`.
    pub r#move: i64,
}

/// `struct uffd_msg`: one record read from a uffd.
///
/// The kernel struct is `__packed`, but every member of its union sits at its
/// natural alignment, so this 8-aligned mirror has the same layout. It is
/// `Copy` and plain old data, so an io_uring `READ` may target a
/// `[UffdMsg; N]` buffer directly.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// The event's union argument, as three native-endian words.
    pub arg: [u64; 3],
}

/// Size in bytes of one [`UffdMsg`] record.
pub const UFFD_MSG_SIZE: usize = size_of::<UffdMsg>();

/// A decoded userfaultfd event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr` (page-aligned unless `EXACT_ADDRESS`).
    PageFault {
        /// Fault address.
        addr: u64,
        /// `PAGEFAULT_FLAG_*`.
        flags: u64,
        /// Faulting thread id (0 unless `THREAD_ID` was negotiated).
        thread_id: u32,
    },
    /// `[start, end)` was zapped (`MADV_DONTNEED`/`MADV_REMOVE`): its pages are
    /// missing again and will fault again.
    Remove {
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
    },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The process forked; `ufd` is a new uffd for the child, owned by the reader.
    Fork {
        /// The child's uffd.
        ufd: u32,
    },
    /// An event code this module does not know.
    Unknown(u8),
}

fn low_u32(word: u64) -> u32 {
    // A `__u32` at the start of a union member: the first four bytes in memory.
    let b = word.to_ne_bytes();
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

impl UffdMsg {
    /// Decodes this record.
    pub fn parse(&self) -> Event {
        let [a0, a1, a2] = self.arg;
        match self.event {
            UFFD_EVENT_PAGEFAULT => Event::PageFault {
                flags: a0,
                addr: a1,
                thread_id: low_u32(a2),
            },
            UFFD_EVENT_FORK => Event::Fork { ufd: low_u32(a0) },
            UFFD_EVENT_REMAP => Event::Remap {
                from: a0,
                to: a1,
                len: a2,
            },
            UFFD_EVENT_REMOVE => Event::Remove { start: a0, end: a1 },
            UFFD_EVENT_UNMAP => Event::Unmap { start: a0, end: a1 },
            other => Event::Unknown(other),
        }
    }

    /// Builds a record from the first 32 bytes of `bytes`, or `None` if short.
    pub fn from_bytes(bytes: &[u8]) -> Option<UffdMsg> {
        let b: &[u8; UFFD_MSG_SIZE] = bytes.get(..UFFD_MSG_SIZE)?.try_into().ok()?;
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_ne_bytes(w)
        };
        Some(UffdMsg {
            event: b[0],
            reserved1: b[1],
            reserved2: u16::from_ne_bytes([b[2], b[3]]),
            reserved3: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            arg: [word(8), word(16), word(24)],
        })
    }
}

/// Decodes one record from raw bytes (e.g. an io_uring read buffer); `None` if
/// fewer than 32 bytes are given.
pub fn parse_bytes(bytes: &[u8]) -> Option<Event> {
    UffdMsg::from_bytes(bytes).map(|m| m.parse())
}

/// Decodes every whole record in `bytes` (a completed read of `n` bytes).
pub fn parse_all(bytes: &[u8]) -> impl Iterator<Item = Event> + '_ {
    bytes.chunks_exact(UFFD_MSG_SIZE).filter_map(parse_bytes)
}

// ---------------------------------------------------------------------------
// Features and ioctl masks
// ---------------------------------------------------------------------------

/// A set of `UFFD_FEATURE_*` bits.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Features(u64);

/// Feature bit, name, and the kernel that brought it.
const FEATURE_TABLE: &[(u64, &str, &str)] = &[
    (1 << 0, "PAGEFAULT_FLAG_WP", "Linux 5.7"),
    (1 << 1, "EVENT_FORK", "Linux 4.11"),
    (1 << 2, "EVENT_REMAP", "Linux 4.11"),
    (1 << 3, "EVENT_REMOVE", "Linux 4.11"),
    (1 << 4, "MISSING_HUGETLBFS", "Linux 4.11"),
    (1 << 5, "MISSING_SHMEM", "Linux 4.11"),
    (1 << 6, "EVENT_UNMAP", "Linux 4.11"),
    (1 << 7, "SIGBUS", "Linux 4.14"),
    (1 << 8, "THREAD_ID", "Linux 4.14"),
    (1 << 9, "MINOR_HUGETLBFS", "Linux 5.13"),
    (1 << 10, "MINOR_SHMEM", "Linux 5.14"),
    (1 << 11, "EXACT_ADDRESS", "Linux 5.18"),
    (1 << 12, "WP_HUGETLBFS_SHMEM", "Linux 5.19"),
    (1 << 13, "WP_UNPOPULATED", "Linux 6.4"),
    (1 << 14, "POISON", "Linux 6.6"),
    (1 << 15, "WP_ASYNC", "Linux 6.7"),
    (1 << 16, "MOVE", "Linux 6.8"),
];

impl Features {
    /// No features.
    pub const NONE: Features = Features(0);
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP` (5.7).
    pub const PAGEFAULT_FLAG_WP: Features = Features(1 << 0);
    /// `UFFD_FEATURE_EVENT_FORK` (4.11; needs `CAP_SYS_PTRACE` unprivileged).
    pub const EVENT_FORK: Features = Features(1 << 1);
    /// `UFFD_FEATURE_EVENT_REMAP` (4.11).
    pub const EVENT_REMAP: Features = Features(1 << 2);
    /// `UFFD_FEATURE_EVENT_REMOVE` (4.11).
    pub const EVENT_REMOVE: Features = Features(1 << 3);
    /// `UFFD_FEATURE_MISSING_HUGETLBFS` (4.11).
    pub const MISSING_HUGETLBFS: Features = Features(1 << 4);
    /// `UFFD_FEATURE_MISSING_SHMEM` (4.11).
    pub const MISSING_SHMEM: Features = Features(1 << 5);
    /// `UFFD_FEATURE_EVENT_UNMAP` (4.11).
    pub const EVENT_UNMAP: Features = Features(1 << 6);
    /// `UFFD_FEATURE_SIGBUS` (4.14).
    pub const SIGBUS: Features = Features(1 << 7);
    /// `UFFD_FEATURE_THREAD_ID` (4.14).
    pub const THREAD_ID: Features = Features(1 << 8);
    /// `UFFD_FEATURE_MINOR_HUGETLBFS` (5.13).
    pub const MINOR_HUGETLBFS: Features = Features(1 << 9);
    /// `UFFD_FEATURE_MINOR_SHMEM` (5.14).
    pub const MINOR_SHMEM: Features = Features(1 << 10);
    /// `UFFD_FEATURE_EXACT_ADDRESS` (5.18).
    pub const EXACT_ADDRESS: Features = Features(1 << 11);
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (5.19).
    pub const WP_HUGETLBFS_SHMEM: Features = Features(1 << 12);
    /// `UFFD_FEATURE_WP_UNPOPULATED` (6.4).
    pub const WP_UNPOPULATED: Features = Features(1 << 13);
    /// `UFFD_FEATURE_POISON` (6.6).
    pub const POISON: Features = Features(1 << 14);
    /// `UFFD_FEATURE_WP_ASYNC` (6.7).
    pub const WP_ASYNC: Features = Features(1 << 15);
    /// `UFFD_FEATURE_MOVE` (6.8).
    pub const MOVE: Features = Features(1 << 16);

    /// Wraps raw feature bits.
    pub const fn from_bits(bits: u64) -> Features {
        Features(bits)
    }
    /// The raw feature bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// Whether every bit of `other` is in `self`.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    /// The first feature of `wanted` missing from `self`, as
    /// `(name, kernel version)`; an unknown bit is reported as "unknown".
    pub fn first_missing(self, wanted: Features) -> Option<(&'static str, &'static str)> {
        let missing = wanted.0 & !self.0;
        if missing == 0 {
            return None;
        }
        FEATURE_TABLE
            .iter()
            .find(|(bit, _, _)| missing & bit != 0)
            .map(|&(_, name, needs)| (name, needs))
            .or(Some(("unknown feature bit", "a newer kernel")))
    }
}

impl BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut set = f.debug_set();
        for (bit, name, _) in FEATURE_TABLE {
            if self.0 & bit != 0 {
                set.entry(name);
            }
        }
        let unknown = self.0 & !FEATURE_TABLE.iter().fold(0, |acc, (b, _, _)| acc | b);
        if unknown != 0 {
            set.entry(&format_args!("{unknown:#x}"));
        }
        set.finish()
    }
}

/// The ioctls the kernel allows on a registered range (`uffdio_register.ioctls`).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Ioctls(u64);

impl Ioctls {
    /// `UFFDIO_WAKE`.
    pub const WAKE: Ioctls = Ioctls(1 << NR_WAKE);
    /// `UFFDIO_COPY`.
    pub const COPY: Ioctls = Ioctls(1 << NR_COPY);
    /// `UFFDIO_ZEROPAGE` (not on hugetlbfs).
    pub const ZEROPAGE: Ioctls = Ioctls(1 << NR_ZEROPAGE);
    /// `UFFDIO_MOVE` (anonymous private memory only, Linux 6.8).
    pub const MOVE: Ioctls = Ioctls(1 << NR_MOVE);
    /// `UFFDIO_WRITEPROTECT`.
    pub const WRITEPROTECT: Ioctls = Ioctls(1 << NR_WRITEPROTECT);
    /// `UFFDIO_CONTINUE`.
    pub const CONTINUE: Ioctls = Ioctls(1 << NR_CONTINUE);
    /// `UFFDIO_POISON`.
    pub const POISON: Ioctls = Ioctls(1 << NR_POISON);

    /// Wraps raw bits (`1 << _UFFDIO_*`).
    pub const fn from_bits(bits: u64) -> Ioctls {
        Ioctls(bits)
    }
    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// Whether every ioctl of `other` is available.
    pub const fn contains(self, other: Ioctls) -> bool {
        self.0 & other.0 == other.0
    }
    /// `UFFDIO_COPY` is available.
    pub const fn has_copy(self) -> bool {
        self.contains(Ioctls::COPY)
    }
    /// `UFFDIO_ZEROPAGE` is available.
    pub const fn has_zeropage(self) -> bool {
        self.contains(Ioctls::ZEROPAGE)
    }
    /// `UFFDIO_MOVE` is available.
    pub const fn has_move(self) -> bool {
        self.contains(Ioctls::MOVE)
    }
    /// Typed error unless every ioctl of `needed` is available on the range.
    pub fn require(self, needed: Ioctls) -> Result<(), UffdError> {
        let missing = needed.0 & !self.0;
        let table: [(Ioctls, &str, &str); 7] = [
            (Ioctls::WAKE, "UFFDIO_WAKE", "Linux 4.3"),
            (Ioctls::COPY, "UFFDIO_COPY", "Linux 4.3"),
            (
                Ioctls::ZEROPAGE,
                "UFFDIO_ZEROPAGE (not on hugetlbfs)",
                "Linux 4.3",
            ),
            (
                Ioctls::MOVE,
                "UFFDIO_MOVE (anonymous private memory)",
                "Linux 6.8",
            ),
            (Ioctls::WRITEPROTECT, "UFFDIO_WRITEPROTECT", "Linux 5.7"),
            (Ioctls::CONTINUE, "UFFDIO_CONTINUE", "Linux 5.13"),
            (Ioctls::POISON, "UFFDIO_POISON", "Linux 6.6"),
        ];
        match table.iter().find(|(b, _, _)| missing & b.0 != 0) {
            None if missing == 0 => Ok(()),
            None => Err(UffdError::Unsupported {
                feature: "unknown userfaultfd ioctl",
                needs: "a newer kernel",
            }),
            Some(&(_, feature, needs)) => Err(UffdError::Unsupported { feature, needs }),
        }
    }
}

impl BitOr for Ioctls {
    type Output = Ioctls;
    fn bitor(self, rhs: Ioctls) -> Ioctls {
        Ioctls(self.0 | rhs.0)
    }
}

impl fmt::Debug for Ioctls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ioctls({:#x})", self.0)
    }
}

// ---------------------------------------------------------------------------
// The uffd
// ---------------------------------------------------------------------------

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

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// `ioctl(2)` request argument; libc's type differs between glibc and musl.
fn request(nr: u32) -> libc::Ioctl {
    // The request is a bit pattern: glibc takes it as c_ulong (lossless),
    // musl as c_int (same bits, reinterpreted), which is what C does too.
    #[allow(clippy::cast_possible_wrap, clippy::cast_lossless)]
    let r = nr as libc::Ioctl;
    r
}

/// `len` as the kernel's `__u64`.
fn u64_of(v: usize) -> u64 {
    // usize is at most 64 bits on every Linux target.
    u64::try_from(v).unwrap_or(u64::MAX)
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
            features: wanted.0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `api` mirrors and which lives across the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request(UFFDIO_API), &mut api) };
        if ret < 0 {
            return Err(UffdError::Api {
                features: wanted.0,
                source: errno(),
            });
        }
        Ok(Features(api.features))
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
        Ok(Ioctls(reg.ioctls))
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
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request(UFFDIO_COPY), &mut arg) };
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
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request(UFFDIO_ZEROPAGE), &mut arg) };
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
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request(UFFDIO_MOVE), &mut arg) };
        Self::outcome("UFFDIO_MOVE", dst, len, ret, arg.r#move)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_pagefault_bytes() {
        let mut b = [0u8; 32];
        b[0] = UFFD_EVENT_PAGEFAULT;
        b[8..16].copy_from_slice(&PAGEFAULT_FLAG_WRITE.to_ne_bytes());
        b[16..24].copy_from_slice(&0x7f00_1000u64.to_ne_bytes());
        b[24..28].copy_from_slice(&4242u32.to_ne_bytes());
        assert_eq!(
            parse_bytes(&b),
            Some(Event::PageFault {
                addr: 0x7f00_1000,
                flags: PAGEFAULT_FLAG_WRITE,
                thread_id: 4242
            })
        );
        assert_eq!(parse_bytes(&b[..31]), None);
    }

    #[test]
    fn parse_remove_and_unknown() {
        let m = UffdMsg {
            event: UFFD_EVENT_REMOVE,
            arg: [0x1000, 0x3000, 0],
            ..UffdMsg::default()
        };
        assert_eq!(
            m.parse(),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        let m = UffdMsg {
            event: 0x7e,
            ..UffdMsg::default()
        };
        assert_eq!(m.parse(), Event::Unknown(0x7e));
    }

    #[test]
    fn missing_feature_named() {
        let have = Features::EVENT_REMOVE;
        assert_eq!(
            have.first_missing(Features::EVENT_REMOVE | Features::MOVE),
            Some(("MOVE", "Linux 6.8"))
        );
        assert_eq!(have.first_missing(Features::EVENT_REMOVE), None);
    }
}
