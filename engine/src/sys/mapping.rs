//! Memory mappings: guest RAM, page-aligned buffers, and double-mapped
//! (mirrored) receive rings.
//!
//! # Mechanism
//!
//! [`Mapping`] is an address range with a page size: anonymous private
//! memory we map ourselves (4 KiB pages, optionally transparent huge pages,
//! or hugetlbfs 2 MiB / 1 GiB pages via `MAP_HUGETLB`), a private read-only
//! file mapping, or memory a VMM owns and lends us ([`Mapping::from_raw`]).
//! It is the building block of [`crate::sys::guest::GuestMemory`], the one
//! type through which the engine reaches guest memory. [`AlignedBuf`] is a
//! pre-touched, page-aligned anonymous buffer that the engine owns.
//! [`Mirror`] maps one memfd twice, back to back, so that a byte stream
//! received into it as a ring is contiguous across the wrap-around.
//!
//! # The rule: guest memory is never a Rust reference
//!
//! Nothing here hands out `&[u8]` or `&mut [u8]` into a `Mapping`: the
//! guest's vCPUs and the kernel (uffd installs) change it behind the
//! compiler's back. It is reached only through raw pointers
//! ([`Mapping::as_ptr`]) and the copying helpers here. Who may write
//! which page, and when, is the engine's contract:
//!
//! * destination, before a page's bit is set in the present bitmap: only the
//!   kernel, through one `UFFDIO_COPY`/`ZEROPAGE`/`MOVE` issued by the lane
//!   that won the bitmap's test-and-set; no thread reads or writes it (a read
//!   would fault and block on the uffd);
//! * destination, after: the guest only;
//! * source, during post-copy: the VM is paused, so nothing writes; the
//!   engine only reads.
//!
//! `read_page_into`/`write_from` are plain `memcpy`s (speed matters: 4 KiB
//! pages at GB/s), so a racing write to the same bytes is a contract
//! violation that yields torn data. `is_zero` scans with volatile word reads.
//!
//! # Kernel versions
//!
//! `MAP_HUGETLB` with `MAP_HUGE_2MB`/`MAP_HUGE_1GB`: Linux 3.8.
//! `MADV_HUGEPAGE`: 2.6.38. `MADV_POPULATE_WRITE`: 5.14.
//!
//! # Hazards
//!
//! * hugetlbfs mappings need pages in the pool
//!   (`/sys/kernel/mm/hugepages/hugepages-*/nr_hugepages`): they are mapped
//!   without `MAP_NORESERVE`, so an empty pool fails at `mmap` with `ENOMEM`.
//!   Unreserved, the pool running dry makes `UFFDIO_COPY` fail with a
//!   misleading `EEXIST` (observed on Linux 6.18), which a fault loop would
//!   take for "already installed" while the guest keeps faulting.
//! * Reading or writing a missing page of a uffd-registered mapping blocks
//!   until the fault is resolved: never touch one from the fault-handling
//!   thread.
//! * With `thp: false` the mapping is `MADV_NOHUGEPAGE`, so that pages stay
//!   4 KiB as the present bitmap assumes (`UFFDIO_COPY` installs 4 KiB pages
//!   anyway).
//! * The first touch of fresh memory costs ~11 µs/page on this machine kind,
//!   which is why [`AlignedBuf`] and [`Mirror`] are touched at creation.
//! * A [`Mirror`] is shared memory: `UFFDIO_MOVE` refuses it as a source.
//! * Reading a file mapping past the end of a file that shrank raises
//!   `SIGBUS`: the engine never reads file mappings in user space (file
//!   sources use `pread`: `source::frames`, `destination::file`).

use std::io;
use std::ptr::{self, NonNull};

/// 4 KiB base page.
pub const PAGE_4K: usize = 4096;
/// 2 MiB huge page.
pub const PAGE_2M: usize = 2 << 20;
/// 1 GiB huge page.
pub const PAGE_1G: usize = 1 << 30;

/// Errors from mapping memory.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The page size is not 4 KiB, 2 MiB or 1 GiB.
    #[error("unsupported page size {page_size:#x} (4 KiB, 2 MiB or 1 GiB)")]
    PageSize {
        /// The page size asked for.
        page_size: usize,
    },
    /// The length is zero or not a multiple of the page size.
    #[error("length {len:#x} is not a non-zero multiple of the page size {page_size:#x}")]
    Length {
        /// The length asked for.
        len: usize,
        /// The page size.
        page_size: usize,
    },
    /// A raw region is null or not aligned to its page size.
    #[error("address {addr:#x} is not aligned to the page size {page_size:#x}")]
    Misaligned {
        /// The address.
        addr: usize,
        /// The page size.
        page_size: usize,
    },
    /// `mmap(2)` failed.
    #[error("mmap of {len:#x} bytes with {page_size:#x}-byte pages failed")]
    Mmap {
        /// The length.
        len: usize,
        /// The page size.
        page_size: usize,
        /// The kernel's error (`ENOMEM` for hugetlbfs: no pages reserved).
        #[source]
        source: io::Error,
    },
    /// `madvise(2)` failed.
    #[error("madvise({advice}) of {addr:#x}+{len:#x} failed")]
    Madvise {
        /// The advice, e.g. "MADV_DONTNEED".
        advice: &'static str,
        /// Start address.
        addr: usize,
        /// Length.
        len: usize,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// An access outside the mapping.
    #[error("access {offset:#x}+{len:#x} is outside the {size:#x}-byte mapping")]
    OutOfBounds {
        /// Offset into the mapping.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// The mapping's size.
        size: usize,
    },
}

/// `memfd_create` or `ftruncate` for a mirrored ring failed.
fn memfd_error(len: usize, source: io::Error) -> MapError {
    MapError::Mmap {
        len,
        page_size: PAGE_4K,
        source,
    }
}

/// Options for [`Mapping::anonymous`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MapOptions {
    /// For 4 KiB mappings: align to 2 MiB and `MADV_HUGEPAGE`; otherwise
    /// `MADV_NOHUGEPAGE`. Ignored for hugetlbfs.
    pub thp: bool,
    /// Populate (write-fault) every page now.
    pub populate: bool,
}

fn check_page_size(page_size: usize) -> Result<libc::c_int, MapError> {
    match page_size {
        PAGE_4K => Ok(0),
        PAGE_2M => Ok(libc::MAP_HUGETLB | libc::MAP_HUGE_2MB),
        PAGE_1G => Ok(libc::MAP_HUGETLB | libc::MAP_HUGE_1GB),
        _ => Err(MapError::PageSize { page_size }),
    }
}

/// `mmap` a private anonymous read-write region.
fn mmap_anon(len: usize, extra_flags: libc::c_int) -> io::Result<NonNull<u8>> {
    // hugetlbfs: reserve the pages now, so an empty pool fails here with
    // ENOMEM rather than later inside UFFDIO_COPY (which then reports EEXIST
    // on Linux 6.18). 4 KiB: no swap accounting for a sparse guest region.
    let noreserve = if extra_flags & libc::MAP_HUGETLB != 0 {
        0
    } else {
        libc::MAP_NORESERVE
    };
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases
    // nothing we own.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | noreserve | extra_flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// `munmap`, ignoring errors (only used on regions we mapped).
///
/// # Safety
///
/// `[addr, addr + len)` must be a region this module mapped and that nobody
/// uses any more.
unsafe fn munmap(addr: *mut u8, len: usize) {
    // SAFETY: guaranteed by the caller.
    unsafe { libc::munmap(addr.cast(), len) };
}

fn madvise(
    addr: *mut u8,
    len: usize,
    advice: libc::c_int,
    name: &'static str,
) -> Result<(), MapError> {
    // SAFETY: madvise only changes paging policy of our own range; the advice
    // values used here (HUGEPAGE, NOHUGEPAGE, POPULATE_WRITE, DONTNEED on
    // memory the caller may discard) do not invalidate Rust-visible state.
    let ret = unsafe { libc::madvise(addr.cast(), len, advice) };
    if ret < 0 {
        return Err(MapError::Madvise {
            advice: name,
            addr: addr as usize,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A region of guest RAM, reached through raw pointers only.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    page_size: usize,
    /// Whether we mapped it (and unmap it on drop).
    owned: bool,
}

// SAFETY: a Mapping is an address range, not Rust-owned data: it hands
// out no references, and all access goes through raw pointers or copies whose
// concurrency rule (who writes which page when) is the engine's contract
// documented in the module doc. Moving it to or sharing it with another
// thread changes none of that; munmap on drop happens once, from the owner.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`: `&Mapping` only gives the pointer, sizes, and
// copying helpers; there is no interior state besides the memory itself.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of private anonymous memory with pages of
    /// `page_size` (4 KiB, 2 MiB or 1 GiB; the latter two from hugetlbfs).
    pub fn anonymous(len: usize, page_size: usize, opts: MapOptions) -> Result<Mapping, MapError> {
        let huge_flags = check_page_size(page_size)?;
        if len == 0 || !len.is_multiple_of(page_size) {
            return Err(MapError::Length { len, page_size });
        }
        let mmap_err = |source| MapError::Mmap {
            len,
            page_size,
            source,
        };
        let ptr = if page_size == PAGE_4K && opts.thp {
            // Over-map by 2 MiB and trim, so huge pages can back the region.
            let total = len
                .checked_add(PAGE_2M)
                .ok_or(MapError::Length { len, page_size })?;
            let raw = mmap_anon(total, 0).map_err(mmap_err)?;
            let base = raw.as_ptr() as usize;
            let head = base.next_multiple_of(PAGE_2M) - base;
            let tail = total - head - len;
            // SAFETY: head..head+len is within the `total` bytes just mapped.
            let aligned = unsafe { raw.as_ptr().add(head) };
            if head > 0 {
                // SAFETY: the head is part of our fresh mapping, unused.
                unsafe { munmap(raw.as_ptr(), head) };
            }
            if tail > 0 {
                // SAFETY: the tail is part of our fresh mapping, unused.
                unsafe { munmap(aligned.add(len), tail) };
            }
            NonNull::new(aligned).ok_or_else(|| mmap_err(io::Error::other("null")))?
        } else {
            let populate = if opts.populate && page_size != PAGE_4K {
                libc::MAP_POPULATE
            } else {
                0
            };
            mmap_anon(len, huge_flags | populate).map_err(mmap_err)?
        };
        let mapping = Mapping {
            ptr,
            len,
            page_size,
            owned: true,
        };
        if page_size == PAGE_4K {
            if opts.thp {
                madvise(ptr.as_ptr(), len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
            } else {
                madvise(ptr.as_ptr(), len, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?;
            }
            if opts.populate {
                madvise(
                    ptr.as_ptr(),
                    len,
                    libc::MADV_POPULATE_WRITE,
                    "MADV_POPULATE_WRITE",
                )?;
            }
        }
        Ok(mapping)
    }

    /// Maps the first `len` bytes of `file` private and read-only, e.g. a
    /// snapshot memory file served to a destination. Pages are read from the
    /// page cache on first touch; the mapping never writes the file.
    pub fn map_file(file: &std::fs::File, len: usize) -> Result<Mapping, MapError> {
        Self::map_file_at(file, 0, len)
    }

    /// Maps `len` bytes of `file` from byte `offset` (4 KiB-aligned), private and
    /// read-only, like [`Mapping::map_file`]: e.g. one region of a snapshot
    /// memory file that holds several one after the other.
    pub fn map_file_at(file: &std::fs::File, offset: u64, len: usize) -> Result<Mapping, MapError> {
        use std::os::fd::AsRawFd;
        if len == 0 || !len.is_multiple_of(PAGE_4K) {
            return Err(MapError::Length {
                len,
                page_size: PAGE_4K,
            });
        }
        let off = libc::off_t::try_from(offset)
            .ok()
            .filter(|o| o % 4096 == 0)
            .ok_or(MapError::Misaligned {
                addr: usize::try_from(offset).unwrap_or(usize::MAX),
                page_size: PAGE_4K,
            })?;
        // SAFETY: a fresh private read-only mapping of a file we hold open, at
        // a kernel-chosen address: it aliases nothing we own, and a private
        // mapping is not changed by this process writing the file.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapError::Mmap {
                len,
                page_size: PAGE_4K,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(MapError::Length {
            len,
            page_size: PAGE_4K,
        })?;
        Ok(Mapping {
            ptr,
            len,
            page_size: PAGE_4K,
            owned: true,
        })
    }

    /// Wraps memory a VMM owns; it is not unmapped on drop.
    ///
    /// # Safety
    ///
    /// `[ptr, ptr + len)` must stay mapped read-write, with pages of
    /// `page_size`, for the lifetime of the returned value, and its writers
    /// must follow the contract in the module doc.
    pub unsafe fn from_raw(
        ptr: *mut u8,
        len: usize,
        page_size: usize,
    ) -> Result<Mapping, MapError> {
        check_page_size(page_size)?;
        if len == 0 || !len.is_multiple_of(page_size) {
            return Err(MapError::Length { len, page_size });
        }
        let addr = ptr as usize;
        let ptr = match NonNull::new(ptr) {
            Some(p) if addr.is_multiple_of(page_size) => p,
            _ => return Err(MapError::Misaligned { addr, page_size }),
        };
        Ok(Mapping {
            ptr,
            len,
            page_size,
            owned: false,
        })
    }

    /// Start of the region.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Start of the region as an address (for uffd ioctls).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never, for a constructed mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / self.page_size
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8, MapError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: offset <= self.len, so the result stays within (or
                // one past the end of) the mapping.
                Ok(unsafe { self.ptr.as_ptr().add(offset) })
            }
            _ => Err(MapError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`.
    ///
    /// Blocks if the bytes are in a missing page of a uffd-registered region.
    pub fn read_into(&self, offset: usize, dst: &mut [u8]) -> Result<(), MapError> {
        let src = self.check(offset, dst.len())?;
        // SAFETY: `src..src+len` is inside the mapping (checked) and readable;
        // `dst` is a distinct Rust buffer (guest memory is never a Rust
        // slice), so they do not overlap. Concurrent writers are excluded by
        // the engine's contract (module doc).
        unsafe { ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the mapping at `offset`.
    ///
    /// Only for pages the caller may write under the engine's contract (e.g.
    /// tests, or a source that is paused).
    pub fn write_from(&self, offset: usize, src: &[u8]) -> Result<(), MapError> {
        let dst = self.check(offset, src.len())?;
        // SAFETY: `dst..dst+len` is inside the writable mapping (checked);
        // `src` is a Rust buffer, hence not guest memory, so no overlap.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    /// `MADV_DONTNEED` on `[offset, offset + len)`: the pages read as missing
    /// (zero, or a uffd fault plus a REMOVE event if registered with
    /// `EVENT_REMOVE`) afterwards. Blocks until a REMOVE event is read.
    pub fn madvise_dontneed(&self, offset: usize, len: usize) -> Result<(), MapError> {
        let p = self.check(offset, len)?;
        madvise(p, len, libc::MADV_DONTNEED, "MADV_DONTNEED")
    }

    /// Whether `[offset, offset + len)` is all zero bytes (volatile word
    /// scan; blocks on missing pages of a registered region).
    pub fn is_zero(&self, offset: usize, len: usize) -> Result<bool, MapError> {
        let p = self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked) and readable.
        Ok(unsafe { is_zero_raw(p, len) })
    }

    /// Reads the little-endian `u64` at `offset` (volatile, any alignment).
    pub fn load_u64(&self, offset: usize) -> Result<u64, MapError> {
        let p = self.check(offset, 8)?;
        // SAFETY: 8 bytes inside the mapping (checked), readable; unaligned
        // reads are fine on the platforms Linux runs this on.
        Ok(unsafe { p.cast::<u64>().read_unaligned() })
    }

    /// Writes a `u64` at `offset` (a guest store).
    pub fn store_u64(&self, offset: usize, v: u64) -> Result<(), MapError> {
        let p = self.check(offset, 8)?;
        // SAFETY: 8 bytes inside the writable mapping (checked); no Rust
        // reference to guest memory exists that this could alias.
        unsafe { p.cast::<u64>().write_unaligned(v) };
        Ok(())
    }

    /// `MADV_COLLAPSE` (Linux 6.1) of `[offset, offset + len)`: rebuilds
    /// transparent huge pages where every 4 KiB page of a 2 MiB range is
    /// present. Synchronous; costs a copy of each range it collapses.
    pub fn collapse(&self, offset: usize, len: usize) -> Result<(), MapError> {
        const MADV_COLLAPSE: libc::c_int = 25;
        let p = self.check(offset, len)?;
        madvise(p, len, MADV_COLLAPSE, "MADV_COLLAPSE")
    }

    /// `MADV_POPULATE_WRITE` (Linux 5.14): allocates every page of the range now.
    pub fn populate_write(&self, offset: usize, len: usize) -> Result<(), MapError> {
        let p = self.check(offset, len)?;
        madvise(p, len, libc::MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")
    }

    /// Whether the mapping is ours to unmap (false for [`Mapping::from_raw`]).
    pub fn is_owned(&self) -> bool {
        self.owned
    }
}

/// One memfd mapped twice, back to back: bytes `[size, 2 * size)` alias
/// `[0, size)`, so a ring of `size` bytes reads contiguously across its end.
#[derive(Debug)]
pub struct Mirror {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: a Mirror owns its two mappings like a Box<[u8]>; all access goes
// through raw pointers handed to its owner (`sys::bufring`), which enforces
// who reads and writes which bytes.
unsafe impl Send for Mirror {}

impl Mirror {
    /// Maps `size` bytes (a multiple of 4 KiB) twice and touches every page.
    pub fn new(size: usize) -> Result<Mirror, MapError> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        if size == 0 || !size.is_multiple_of(PAGE_4K) {
            return Err(MapError::Length {
                len: size,
                page_size: PAGE_4K,
            });
        }
        let total = size.checked_mul(2).ok_or(MapError::Length {
            len: size,
            page_size: PAGE_4K,
        })?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags only.
        let fd = unsafe { libc::memfd_create(c"ringfault-rx".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(memfd_error(size, io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let flen = libc::off_t::try_from(size)
            .map_err(|_| memfd_error(size, io::Error::other("ring too large")))?;
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), flen) } < 0 {
            return Err(memfd_error(size, io::Error::last_os_error()));
        }
        // Reserve 2 * size of address space, then map the memfd over both halves.
        // SAFETY: a fresh PROT_NONE reservation at a kernel-chosen address.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(memfd_error(size, io::Error::last_os_error()));
        }
        let base = base.cast::<u8>();
        for half in 0..2 {
            // SAFETY: MAP_FIXED over our own reservation (half * size is within
            // it); the memfd is `size` bytes long.
            let p = unsafe {
                libc::mmap(
                    base.add(half * size).cast(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                let e = io::Error::last_os_error();
                // SAFETY: the reservation is ours and unused.
                unsafe { munmap(base, total) };
                return Err(memfd_error(size, e));
            }
        }
        for off in (0..size).step_by(PAGE_4K) {
            // SAFETY: off < size: inside the first half, writable.
            unsafe { base.add(off).write_volatile(0) };
        }
        let ptr = NonNull::new(base).ok_or_else(|| memfd_error(size, io::Error::other("null")))?;
        Ok(Mirror { ptr, size })
    }

    /// Start of the ring.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Ring size (half the mapped length).
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly 2 * size bytes at ptr; the memfd is closed
        // already and the mappings keep its pages until this munmap.
        unsafe { munmap(self.ptr.as_ptr(), 2 * self.size) };
    }
}

/// Scans `len` bytes at `p` for non-zero bytes with volatile reads.
///
/// # Safety
///
/// `p..p + len` must be readable.
pub(crate) unsafe fn is_zero_raw(p: *const u8, len: usize) -> bool {
    let head = p.align_offset(8).min(len);
    for i in 0..head {
        // SAFETY: i < len, readable per the caller.
        if unsafe { p.add(i).read_volatile() } != 0 {
            return false;
        }
    }
    let words = (len - head) / 8;
    // SAFETY: p + head is 8-aligned and within the readable range.
    let w = unsafe { p.add(head) }.cast::<u64>();
    let mut i = 0;
    while i + 8 <= words {
        let mut acc = 0u64;
        for k in 0..8 {
            // SAFETY: i + k < words, so the word is inside the range; aligned.
            acc |= unsafe { w.add(i + k).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    while i < words {
        // SAFETY: i < words: inside the range; aligned.
        if unsafe { w.add(i).read_volatile() } != 0 {
            return false;
        }
        i += 1;
    }
    for j in head + words * 8..len {
        // SAFETY: j < len, readable per the caller.
        if unsafe { p.add(j).read_volatile() } != 0 {
            return false;
        }
    }
    true
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: we mapped exactly this range and, being dropped, nobody
            // reaches it through us any more.
            unsafe { munmap(self.ptr.as_ptr(), self.len) };
        }
    }
}

/// A page-aligned, pre-touched anonymous buffer owned by the engine (receive
/// buffers, io_uring fixed buffers). Unlike guest memory, it may be borrowed
/// as a slice.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Mapped length (len rounded up to 4 KiB).
    map_len: usize,
}

// SAFETY: AlignedBuf exclusively owns its mapping like a Box<[u8]>: shared
// access only yields `&[u8]`, mutation needs `&mut self`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as for Send; `&AlignedBuf` gives only shared reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Maps `len` bytes (rounded up to 4 KiB), 4 KiB-aligned, and touches
    /// every page now.
    pub fn new(len: usize) -> Result<AlignedBuf, MapError> {
        let map_len = len
            .checked_next_multiple_of(PAGE_4K)
            .filter(|&l| l > 0)
            .ok_or(MapError::Length {
                len,
                page_size: PAGE_4K,
            })?;
        let ptr = mmap_anon(map_len, libc::MAP_POPULATE).map_err(|source| MapError::Mmap {
            len,
            page_size: PAGE_4K,
            source,
        })?;
        // MAP_POPULATE on a private writable mapping write-faults; touch each
        // page too, so the buffer is ready even if populate was skipped.
        for off in (0..map_len).step_by(PAGE_4K) {
            // SAFETY: off < map_len: inside our fresh, writable mapping.
            unsafe { ptr.as_ptr().add(off).write_volatile(0) };
        }
        Ok(AlignedBuf { ptr, len, map_len })
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the buffer, for writing (e.g. by the kernel).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (as requested).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: `new` rejects 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: we own `len` initialised (zero-filled) bytes at `ptr`, and
        // nothing mutates them while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer's bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, and `&mut self` makes this borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly `map_len` bytes at `ptr`; no borrow of
        // them outlives `self`.
        unsafe { munmap(self.ptr.as_ptr(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_zero() -> Result<(), MapError> {
        let m = Mapping::anonymous(4 * PAGE_4K, PAGE_4K, MapOptions::default())?;
        assert!(m.is_zero(0, m.len())?);
        m.write_from(PAGE_4K + 13, b"hello")?;
        assert!(!m.is_zero(0, m.len())?);
        assert!(!m.is_zero(PAGE_4K + 17, 1)?);
        assert!(m.is_zero(PAGE_4K + 18, PAGE_4K)?);
        let mut out = [0u8; 5];
        m.read_into(PAGE_4K + 13, &mut out)?;
        assert_eq!(&out, b"hello");
        assert!(matches!(
            m.write_from(m.len() - 2, b"abc"),
            Err(MapError::OutOfBounds { .. })
        ));
        m.madvise_dontneed(PAGE_4K, PAGE_4K)?;
        assert!(m.is_zero(0, m.len())?);
        Ok(())
    }

    #[test]
    fn thp_mapping_is_aligned() -> Result<(), MapError> {
        let m = Mapping::anonymous(
            PAGE_2M * 2,
            PAGE_4K,
            MapOptions {
                thp: true,
                populate: true,
            },
        )?;
        assert_eq!(m.addr() % PAGE_2M, 0);
        assert!(m.is_zero(0, m.len())?);
        Ok(())
    }

    #[test]
    fn from_raw_does_not_unmap() -> Result<(), MapError> {
        let owner = Mapping::anonymous(2 * PAGE_4K, PAGE_4K, MapOptions::default())?;
        owner.write_from(PAGE_4K, b"kept")?;
        {
            // SAFETY: `owner` keeps the region mapped for the borrow's life.
            let lent = unsafe { Mapping::from_raw(owner.as_ptr(), owner.len(), PAGE_4K)? };
            assert_eq!(lent.pages(), 2);
        }
        let mut b = [0u8; 4];
        owner.read_into(PAGE_4K, &mut b)?;
        assert_eq!(&b, b"kept");
        // SAFETY: rejected before use: misaligned.
        let bad = unsafe { Mapping::from_raw(owner.as_ptr().wrapping_add(1), PAGE_4K, PAGE_4K) };
        assert!(matches!(bad, Err(MapError::Misaligned { .. })));
        Ok(())
    }

    #[test]
    fn bad_sizes() {
        assert!(matches!(
            Mapping::anonymous(4096, 8192, MapOptions::default()),
            Err(MapError::PageSize { .. })
        ));
        assert!(matches!(
            Mapping::anonymous(4095, 4096, MapOptions::default()),
            Err(MapError::Length { .. })
        ));
    }

    #[test]
    fn mirror_aliases_its_halves() -> Result<(), MapError> {
        let m = Mirror::new(2 * PAGE_4K)?;
        // SAFETY: test: both offsets are inside the 4-page double mapping.
        unsafe {
            m.as_ptr().add(5).write(42);
            assert_eq!(m.as_ptr().add(2 * PAGE_4K + 5).read(), 42);
            m.as_ptr().add(3 * PAGE_4K + 1).write(7);
            assert_eq!(m.as_ptr().add(PAGE_4K + 1).read(), 7);
        }
        Ok(())
    }

    #[test]
    fn aligned_buf() -> Result<(), MapError> {
        let mut b = AlignedBuf::new(10_000)?;
        assert_eq!(b.len(), 10_000);
        assert_eq!(b.as_ptr() as usize % PAGE_4K, 0);
        b.as_mut_slice()[9_999] = 7;
        assert_eq!(b.as_slice()[9_999], 7);
        Ok(())
    }
}
