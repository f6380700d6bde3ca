//! Guest memory: the one type through which the engine (and the benchmark's
//! synthetic VM) reaches guest RAM in this process.
//!
//! # Mechanism
//!
//! [`GuestMemory`] owns (or, for a VMM's memory, borrows under an `unsafe`
//! contract) one [`Mapping`] per region and is shared as
//! `Arc<GuestMemory>`. Everything else borrows it: [`GuestRegion`] and
//! [`GuestSlice`] views cannot outlive the mappings, and a send that hands
//! guest addresses to the kernel keeps the `Arc` until its completion.
//!
//! # The rule: guest memory is never a Rust reference
//!
//! Other threads (vCPUs) and the kernel (userfaultfd installs) change guest
//! memory behind the compiler's back, so no `&[u8]` into it is ever made,
//! with one exception: [`GuestSlice::frozen_bytes`], which exists only after
//! [`GuestMemory::freeze`]. Who may write which page, and when:
//!
//! * source, before switch-over: the guest (vCPUs); the engine only reads,
//!   with copies, and treats what it read as possibly torn (pre-copy sends
//!   it anyway; the page is dirty and is sent again).
//! * source, after [`GuestMemory::freeze`] (switch-over): nobody. Safe code
//!   cannot write any more ([`GuestError::Frozen`]); for a VMM's memory the
//!   [`GuestMemory::from_raw`] contract promises the same. Only then may
//!   the bytes be borrowed as a slice (for zero detection at memory speed
//!   and for frame tags).
//! * destination, before a page is present: only the kernel, through one
//!   `UFFDIO_COPY`/`ZEROPAGE`/`MOVE`; a read or write by anyone else blocks
//!   in a fault until then.
//! * destination, after: the guest.
//!
//! Read-only regions ([`Access::ReadOnly`]) refuse every write from safe code.
//!
//! # Kernel versions
//!
//! As [`crate::sys::mapping`].
//!
//! # Hazards
//!
//! * A read of a missing page of a uffd-registered region blocks until it is
//!   installed: never read guest memory on the thread that resolves faults.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use super::mapping::{MapError, MapOptions, Mapping};

/// What safe code may do with a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only.
    ReadOnly,
    /// Reads and writes (guest stores).
    ReadWrite,
}

/// Errors of guest memory access.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Mapping or an access check failed.
    #[error(transparent)]
    Map(#[from] MapError),
    /// A write to a read-only region.
    #[error("region {region} is read-only")]
    ReadOnly {
        /// Region id.
        region: u32,
    },
    /// A write after switch-over on the source, or a borrow of unfrozen memory.
    #[error("region {region} is frozen (the VM stopped here); it can no longer be written")]
    Frozen {
        /// Region id.
        region: u32,
    },
    /// A slice borrow of memory that may still change.
    #[error("region {region} is not frozen; its bytes may still change and cannot be borrowed")]
    NotFrozen {
        /// Region id.
        region: u32,
    },
    /// Two regions with one id.
    #[error("region id {region} appears twice")]
    DuplicateId {
        /// Region id.
        region: u32,
    },
}

/// One region to map.
#[derive(Debug, Clone, Copy)]
pub struct RegionSpec {
    /// Wire id.
    pub id: u32,
    /// Bytes (a multiple of `page_size`).
    pub size: usize,
    /// 4 KiB, 2 MiB or 1 GiB.
    pub page_size: usize,
}

/// A VMM's region, for [`GuestMemory::from_raw`].
#[derive(Debug, Clone, Copy)]
pub struct RawRegion {
    /// Wire id.
    pub id: u32,
    /// First byte.
    pub ptr: *mut u8,
    /// Bytes.
    pub len: usize,
    /// Page size.
    pub page_size: usize,
    /// What the engine may do.
    pub access: Access,
}

/// One region of guest memory.
#[derive(Debug)]
pub struct GuestRegion {
    id: u32,
    map: Mapping,
    access: Access,
    frozen: AtomicBool,
}

/// Guest memory: its regions, in layout order.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
}

fn check_ids(ids: impl Iterator<Item = u32>) -> Result<(), GuestError> {
    let mut v: Vec<u32> = ids.collect();
    v.sort_unstable();
    match v.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(GuestError::DuplicateId { region: w[0] }),
        None => Ok(()),
    }
}

impl GuestMemory {
    /// Maps fresh private anonymous memory for each region (read-write).
    pub fn anonymous(specs: &[RegionSpec], opts: MapOptions) -> Result<GuestMemory, GuestError> {
        check_ids(specs.iter().map(|s| s.id))?;
        let mut regions = Vec::with_capacity(specs.len());
        for s in specs {
            regions.push(GuestRegion {
                id: s.id,
                map: Mapping::anonymous(s.size, s.page_size, opts)?,
                access: Access::ReadWrite,
                frozen: AtomicBool::new(false),
            });
        }
        Ok(GuestMemory { regions })
    }

    /// Wraps memory a VMM owns (never unmapped by the engine).
    ///
    /// # Safety
    /// Each region must stay mapped, with pages of its `page_size`, and
    /// readable (and writable for [`Access::ReadWrite`]) for as long as the
    /// returned value or any clone of its `Arc` lives. Once
    /// [`GuestMemory::freeze`] is called, nobody may write it any more.
    pub unsafe fn from_raw(regions: &[RawRegion]) -> Result<GuestMemory, GuestError> {
        check_ids(regions.iter().map(|r| r.id))?;
        let mut out = Vec::with_capacity(regions.len());
        for r in regions {
            // SAFETY: forwarded from this function's contract.
            let map = unsafe { Mapping::from_raw(r.ptr, r.len, r.page_size)? };
            out.push(GuestRegion {
                id: r.id,
                map,
                access: r.access,
                frozen: AtomicBool::new(false),
            });
        }
        Ok(GuestMemory { regions: out })
    }

    /// The regions, in order.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// The region at `index`.
    pub fn region(&self, index: usize) -> Option<&GuestRegion> {
        self.regions.get(index)
    }

    /// The region with wire id `id`.
    pub fn by_id(&self, id: u32) -> Option<&GuestRegion> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len() as u64).sum()
    }

    /// Switch-over: from now on safe code can no longer write any region, and
    /// slices of it may be borrowed ([`GuestSlice::frozen_bytes`]).
    pub fn freeze(&self) {
        for r in &self.regions {
            // Release: a thread that sees `frozen` (Acquire) also sees every
            // write made before the freeze.
            r.frozen.store(true, Ordering::Release);
        }
    }

    /// Whether [`GuestMemory::freeze`] was called.
    pub fn is_frozen(&self) -> bool {
        self.regions
            .iter()
            .all(|r| r.frozen.load(Ordering::Acquire))
    }
}

impl GuestRegion {
    /// Wire id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Address of the first byte (for userfaultfd ioctls and page maps).
    pub fn addr(&self) -> usize {
        self.map.addr()
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the region is empty (never, for a constructed region).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.map.page_size()
    }

    /// Pages.
    pub fn pages(&self) -> u64 {
        (self.map.len() / self.map.page_size()) as u64
    }

    /// What safe code may do.
    pub fn access(&self) -> Access {
        self.access
    }

    fn writable(&self) -> Result<(), GuestError> {
        if self.access == Access::ReadOnly {
            return Err(GuestError::ReadOnly { region: self.id });
        }
        // Acquire: pairs with `freeze`'s Release.
        if self.frozen.load(Ordering::Acquire) {
            return Err(GuestError::Frozen { region: self.id });
        }
        Ok(())
    }

    /// Copies bytes out of guest memory (blocks on a missing page of a
    /// registered region).
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), GuestError> {
        Ok(self.map.read_into(offset, dst)?)
    }

    /// Copies bytes into guest memory (a guest write).
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), GuestError> {
        self.writable()?;
        Ok(self.map.write_from(offset, src)?)
    }

    /// A guest load of 8 bytes.
    #[inline]
    pub fn load_u64(&self, offset: usize) -> Result<u64, GuestError> {
        Ok(self.map.load_u64(offset)?)
    }

    /// A guest store of 8 bytes.
    #[inline]
    pub fn store_u64(&self, offset: usize, v: u64) -> Result<(), GuestError> {
        self.writable()?;
        Ok(self.map.store_u64(offset, v)?)
    }

    /// Whether `len` bytes at `offset` are all zero.
    pub fn is_zero(&self, offset: usize, len: usize) -> Result<bool, GuestError> {
        Ok(self.map.is_zero(offset, len)?)
    }

    /// Drops the pages of a range (they read as zero, or fault again when
    /// registered with userfaultfd).
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), GuestError> {
        self.writable()?;
        Ok(self.map.madvise_dontneed(offset, len)?)
    }

    /// Rebuilds transparent huge pages over a fully present range.
    pub fn collapse(&self, offset: usize, len: usize) -> Result<(), GuestError> {
        Ok(self.map.collapse(offset, len)?)
    }

    /// Allocates every page of a range now.
    pub fn populate(&self, offset: usize, len: usize) -> Result<(), GuestError> {
        self.writable()?;
        Ok(self.map.populate_write(offset, len)?)
    }

    /// A view of `len` bytes at `offset`.
    pub fn slice(&self, offset: usize, len: usize) -> Result<GuestSlice<'_>, GuestError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(GuestSlice {
                region: self,
                offset,
                len,
            }),
            _ => Err(GuestError::Map(MapError::OutOfBounds {
                offset,
                len,
                size: self.len(),
            })),
        }
    }
}

/// A bounds-checked range of one region, borrowed from its [`GuestMemory`].
#[derive(Debug, Clone, Copy)]
pub struct GuestSlice<'a> {
    region: &'a GuestRegion,
    offset: usize,
    len: usize,
}

impl<'a> GuestSlice<'a> {
    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset in its region.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Address of its first byte.
    pub fn addr(&self) -> usize {
        self.region.addr() + self.offset
    }

    /// The bytes, once the memory is frozen (the VM stopped): nobody writes
    /// them any more, so a shared borrow is sound.
    pub fn frozen_bytes(&self) -> Result<&'a [u8], GuestError> {
        // Acquire: pairs with `freeze`'s Release; every write before the
        // freeze is visible, and none may follow.
        if !self.region.frozen.load(Ordering::Acquire) {
            return Err(GuestError::NotFrozen {
                region: self.region.id,
            });
        }
        // SAFETY: the range is inside the mapping (checked by `slice`), which
        // lives as long as `'a` (the region is borrowed); the region is frozen,
        // so safe code cannot write it (`writable`) and the `from_raw`
        // contract forbids other writers; the kernel never writes a source's
        // guest memory.
        Ok(unsafe {
            std::slice::from_raw_parts(self.region.map.as_ptr().add(self.offset), self.len)
        })
    }

    /// Whether every byte is zero: a vectorised scan over frozen memory, a
    /// word-by-word volatile scan otherwise.
    pub fn is_zero(&self) -> bool {
        match self.frozen_bytes() {
            Ok(b) => super::zero::is_zero(b),
            Err(_) => self.region.is_zero(self.offset, self.len).unwrap_or(false),
        }
    }

    /// Copies the bytes out.
    pub fn read_into(&self, dst: &mut [u8]) -> Result<(), GuestError> {
        if dst.len() != self.len {
            return Err(GuestError::Map(MapError::OutOfBounds {
                offset: self.offset,
                len: dst.len(),
                size: self.len,
            }));
        }
        self.region.read(self.offset, dst)
    }

    /// The `iovec` of this range, for a vectored send.
    pub(crate) fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: (self.region.map.as_ptr() as usize + self.offset) as *mut libc::c_void,
            iov_len: self.len,
        }
    }
}

/// An `io::Error` from a [`GuestError`], for I/O-shaped call sites.
impl From<GuestError> for io::Error {
    fn from(e: GuestError) -> io::Error {
        io::Error::other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::anonymous(
            &[
                RegionSpec {
                    id: 1,
                    size: 4 * 4096,
                    page_size: 4096,
                },
                RegionSpec {
                    id: 5,
                    size: 4096,
                    page_size: 4096,
                },
            ],
            MapOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn freeze_stops_writes_and_allows_borrows() {
        let m = mem();
        let r = m.by_id(1).unwrap();
        r.store_u64(4096, 7).unwrap();
        assert!(matches!(
            r.slice(4096, 8).unwrap().frozen_bytes(),
            Err(GuestError::NotFrozen { region: 1 })
        ));
        m.freeze();
        assert!(matches!(
            r.store_u64(0, 1),
            Err(GuestError::Frozen { region: 1 })
        ));
        assert_eq!(
            r.slice(4096, 8).unwrap().frozen_bytes().unwrap(),
            &7u64.to_le_bytes()
        );
        assert!(r.slice(0, 4096).unwrap().is_zero());
        assert!(!r.slice(4096, 4096).unwrap().is_zero());
    }

    #[test]
    fn bounds_and_ids() {
        let m = mem();
        let r = m.by_id(5).unwrap();
        assert!(r.slice(4000, 97).is_err());
        assert!(r.load_u64(4089).is_err());
        assert!(matches!(
            GuestMemory::anonymous(
                &[
                    RegionSpec {
                        id: 2,
                        size: 4096,
                        page_size: 4096
                    },
                    RegionSpec {
                        id: 2,
                        size: 4096,
                        page_size: 4096
                    }
                ],
                MapOptions::default()
            ),
            Err(GuestError::DuplicateId { region: 2 })
        ));
    }
}
