//! The userfaultfd kernel ABI (`include/uapi/linux/userfaultfd.h`): ioctl
//! numbers, structures and flags, pinned at compile time.
//!
//! # Kernel versions
//! As in the parent module; `UFFDIO_WRITEPROTECT` is Linux 5.7, `UFFDIO_MOVE` 6.8.

use std::mem::size_of;

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
pub(crate) const UFFD_API: u64 = 0xAA;

pub(crate) const NR_REGISTER: u32 = 0x00;
pub(crate) const NR_UNREGISTER: u32 = 0x01;
pub(crate) const NR_WAKE: u32 = 0x02;
pub(crate) const NR_COPY: u32 = 0x03;
pub(crate) const NR_ZEROPAGE: u32 = 0x04;
pub(crate) const NR_MOVE: u32 = 0x05;
pub(crate) const NR_WRITEPROTECT: u32 = 0x06;
pub(crate) const NR_CONTINUE: u32 = 0x07;
pub(crate) const NR_POISON: u32 = 0x08;
pub(crate) const NR_API: u32 = 0x3F;

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
/// `UFFDIO_WRITEPROTECT` (Linux 5.7).
pub const UFFDIO_WRITEPROTECT: u32 = iowr(UFFDIO, NR_WRITEPROTECT, size_of::<UffdioWriteprotect>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1).
pub const USERFAULTFD_IOC_NEW: u32 = io(UFFDIO, 0x00);

// Pin the ABI: sizes and the ioctl numbers as they appear in strace/headers.

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
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);

/// `UFFD_USER_MODE_ONLY` flag of `userfaultfd(2)` (Linux 5.11).
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub(crate) const UFFD_EVENT_FORK: u8 = 0x13;
pub(crate) const UFFD_EVENT_REMAP: u8 = 0x14;
pub(crate) const UFFD_EVENT_REMOVE: u8 = 0x15;
pub(crate) const UFFD_EVENT_UNMAP: u8 = 0x16;

/// `UFFD_PAGEFAULT_FLAG_WRITE`: the fault was a write.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`: the fault is a write-protect fault.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `UFFD_PAGEFAULT_FLAG_MINOR`: the fault is a minor fault.
pub const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub(crate) const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub(crate) const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub(crate) const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub(crate) const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioWriteprotect {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub mode: u64,
}

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

/// `ioctl(2)` request argument; libc's type differs between glibc and musl.
pub(crate) fn request(nr: u32) -> libc::Ioctl {
    // The request is a bit pattern: glibc takes it as c_ulong (lossless),
    // musl as c_int (same bits, reinterpreted), which is what C does too.
    #[allow(clippy::cast_possible_wrap, clippy::cast_lossless)]
    let r = nr as libc::Ioctl;
    r
}

/// `len` as the kernel's `__u64`.
pub(crate) fn u64_of(v: usize) -> u64 {
    // usize is at most 64 bits on every Linux target.
    u64::try_from(v).unwrap_or(u64::MAX)
}
