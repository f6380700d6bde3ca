//! Provided-buffer rings: where multishot receives and reads land.
//!
//! # Mechanism
//!
//! A provided-buffer ring is an array of `io_uring_buf` descriptors shared
//! with the kernel (Linux 5.19); a multishot receive picks the buffer at the
//! ring's head for each chunk of data it delivers. Two kinds are built here:
//!
//! * [`StreamRing`]: one byte stream (a socket) into a ring of `segments`
//!   page-aligned segments, registered *incrementally consumed*
//!   (`IOU_PBUF_RING_INC`, Linux 6.12): the kernel fills each segment from
//!   its start to its end over as many receives as it takes before moving to
//!   the next, so stream offset `s` always lands at ring offset
//!   `s mod size`. With a [`Mirror`] the whole ring is mapped twice, so any
//!   `size` bytes from any offset are contiguous: frames are parsed,
//!   checked and installed where they landed, with no copy. Segments are
//!   handed back to the kernel as soon as the consumer has passed them, so
//!   the kernel keeps receiving ahead while the consumer installs.
//! * [`SlotRing`]: independent fixed-size slots (userfaultfd events, eventfd
//!   counters), each returned as soon as its contents were read.
//!
//! # Kernel versions
//! 5.19 (buffer rings), 6.12 (incremental consumption).
//!
//! # Hazards
//! * The descriptor array and every posted buffer must stay mapped until the
//!   ring that uses them has no operation in flight: [`crate::sys::ring::Ring`]
//!   owns these objects for that reason and drains before dropping them.
//! * When every segment is full the multishot receive ends with `ENOBUFS`;
//!   the owner re-arms it after handing segments back.
//! * The ring's tail lives in the `resv` field of descriptor 0 and is
//!   published with a release store after the descriptors it covers.

use std::sync::atomic::{AtomicU16, Ordering};

use super::mapping::{AlignedBuf, MapError, Mirror};

/// `struct io_uring_buf`: one descriptor.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct BufDesc {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(std::mem::size_of::<BufDesc>() == 16);

/// The descriptor array of one buffer group.
#[derive(Debug)]
pub(crate) struct DescRing {
    mem: AlignedBuf,
    entries: u16,
    tail: u16,
}

impl DescRing {
    fn new(entries: u16) -> Result<DescRing, MapError> {
        let entries = entries.max(1).next_power_of_two();
        let mem = AlignedBuf::new(usize::from(entries) * std::mem::size_of::<BufDesc>())?;
        Ok(DescRing {
            mem,
            entries,
            tail: 0,
        })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.mem.as_ptr() as u64
    }

    pub(crate) fn entries(&self) -> u16 {
        self.entries
    }

    /// Writes one descriptor at the local tail (published by [`DescRing::publish`]).
    fn add(&mut self, addr: u64, len: u32, bid: u16) {
        let idx = usize::from(self.tail & (self.entries - 1));
        let d = BufDesc {
            addr,
            len,
            bid,
            resv: 0,
        };
        let base = self.mem.as_mut_ptr().cast::<BufDesc>();
        // SAFETY: idx < entries, so the descriptor lies inside `mem`, which is
        // page-aligned (so 16-aligned). The kernel only reads descriptors
        // between its head and the published tail, and this slot is past the
        // published tail, so nobody reads it concurrently. Writing the `addr`,
        // `len` and `bid` fields only (never `resv`, which in slot 0 is the
        // tail) keeps the tail word untouched.
        unsafe {
            let p = base.add(idx);
            std::ptr::addr_of_mut!((*p).addr).write(d.addr);
            std::ptr::addr_of_mut!((*p).len).write(d.len);
            std::ptr::addr_of_mut!((*p).bid).write(d.bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every added descriptor visible to the kernel.
    fn publish(&mut self) {
        // The tail is the `resv` field of descriptor 0: byte offset 14.
        let p = self.mem.as_mut_ptr().wrapping_add(14).cast::<AtomicU16>();
        // SAFETY: offset 14 is inside `mem` and 2-aligned (the buffer is
        // page-aligned); AtomicU16 has u16's layout, and the kernel reads the
        // word atomically (smp_load_acquire), so a shared atomic view is sound.
        let tail = unsafe { &*p };
        // Release: the descriptors written before must be visible to the
        // kernel before it sees the new tail.
        tail.store(self.tail, Ordering::Release);
    }
}

/// Where a stream ring's bytes live.
#[derive(Debug)]
enum Area {
    /// Double-mapped: contiguous across the wrap (the default).
    Mirror(Mirror),
    /// Private anonymous (for `UFFDIO_MOVE`, which refuses shared memory);
    /// a frame that wraps must be copied out.
    Private(AlignedBuf),
}

impl Area {
    fn base(&self) -> *mut u8 {
        match self {
            Area::Mirror(m) => m.as_ptr(),
            Area::Private(b) => b.as_ptr().cast_mut(),
        }
    }
}

/// Why a stream ring refused a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The kernel reported a buffer or length the ring did not expect.
    #[error("receive landed in buffer {got:?} ({len} bytes), expected buffer {expected} with {room} bytes of room")]
    OutOfOrder {
        /// The buffer the kernel named.
        got: Option<u16>,
        /// The buffer expected next.
        expected: u16,
        /// Bytes delivered.
        len: usize,
        /// Room left in the expected buffer.
        room: usize,
    },
}

/// A byte stream received into a ring of segments (see the module doc).
#[derive(Debug)]
pub struct StreamRing {
    area: Area,
    size: usize,
    seg: usize,
    nsegs: u16,
    pub(crate) desc: DescRing,
    /// Buffer group id, once added to a ring.
    pub(crate) group: u16,
    /// Stream bytes delivered by the kernel.
    write: u64,
    /// Stream bytes the consumer is done with.
    read: u64,
    /// Stream offset up to which segments are posted.
    posted_end: u64,
    stats: PostedStats,
}

/// Receives in flight (posted, unfilled segments), sampled at each receive.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostedStats {
    /// Fewest seen.
    pub min: usize,
    /// Sum over samples.
    pub sum: u64,
    /// Samples.
    pub samples: u64,
}

impl StreamRing {
    /// A ring of `segments` segments of `segment` bytes (a multiple of 4 KiB),
    /// mirrored unless `private` (needed for `UFFDIO_MOVE`).
    pub fn new(segment: usize, segments: u16, private: bool) -> Result<StreamRing, MapError> {
        let seg = segment.next_multiple_of(4096).max(4096);
        let nsegs = segments.max(2);
        let size = seg * usize::from(nsegs);
        let area = if private {
            Area::Private(AlignedBuf::new(size)?)
        } else {
            Area::Mirror(Mirror::new(size)?)
        };
        Ok(StreamRing {
            area,
            size,
            seg,
            nsegs,
            desc: DescRing::new(nsegs)?,
            group: 0,
            write: 0,
            read: 0,
            posted_end: 0,
            stats: PostedStats {
                min: usize::MAX,
                ..PostedStats::default()
            },
        })
    }

    /// Ring bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether any span of up to [`StreamRing::size`] bytes is contiguous.
    pub fn mirrored(&self) -> bool {
        matches!(self.area, Area::Mirror(_))
    }

    /// Posts every segment (after registration).
    pub(crate) fn post_all(&mut self) {
        self.post_ready();
        self.desc.publish();
    }

    /// Posts every segment whose previous lap is consumed: segment `k` reuses
    /// the memory of `k - nsegs`, free once `read >= (k - nsegs + 1) * seg`.
    fn post_ready(&mut self) -> usize {
        let mut n = 0;
        while self.posted_end + self.seg as u64 <= self.read + self.size as u64 {
            self.post_next();
            n += 1;
        }
        n
    }

    fn post_next(&mut self) {
        let k = self.posted_end / self.seg as u64;
        let bid = u16::try_from(k % u64::from(self.nsegs)).unwrap_or(0);
        let addr = self.area.base() as u64 + u64::from(bid) * self.seg as u64;
        self.desc
            .add(addr, u32::try_from(self.seg).unwrap_or(u32::MAX), bid);
        self.posted_end += self.seg as u64;
    }

    /// Accounts for a receive completion of `len` bytes into buffer `bid`.
    pub(crate) fn on_receive(
        &mut self,
        bid: Option<u16>,
        len: usize,
        buffer_more: bool,
    ) -> Result<(), StreamError> {
        let seg = self.seg as u64;
        let expected = u16::try_from((self.write / seg) % u64::from(self.nsegs)).unwrap_or(0);
        let room = usize::try_from(seg - self.write % seg).unwrap_or(0);
        let full_after = len == room;
        if bid != Some(expected) || len > room || full_after == buffer_more {
            return Err(StreamError::OutOfOrder {
                got: bid,
                expected,
                len,
                room,
            });
        }
        self.write += len as u64;
        let posted = usize::try_from((self.posted_end - self.write).div_ceil(seg)).unwrap_or(0);
        self.stats.min = self.stats.min.min(posted);
        self.stats.sum += posted as u64;
        self.stats.samples += 1;
        Ok(())
    }

    /// Bytes received and not consumed.
    pub fn available(&self) -> usize {
        usize::try_from(self.write - self.read).unwrap_or(0)
    }

    /// Stream offset of the next unconsumed byte.
    pub fn position(&self) -> u64 {
        self.read
    }

    /// The unconsumed bytes that are contiguous in memory: all of them when
    /// mirrored, up to the ring's end otherwise.
    pub fn readable(&self) -> &[u8] {
        let (p, n) = self.span();
        // SAFETY: [read, write) holds bytes the kernel delivered and will not
        // write again: their segments are not re-posted until `consume` passes
        // them, and the segment being filled is written only past `write`. The
        // span lies inside the (mirrored) area, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(p, n) }
    }

    /// As [`StreamRing::readable`], mutably (for in-place decryption).
    pub fn readable_mut(&mut self) -> &mut [u8] {
        let (p, n) = self.span();
        // SAFETY: as for `readable`; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(p, n) }
    }

    fn span(&self) -> (*mut u8, usize) {
        let off = usize::try_from(self.read % self.size as u64).unwrap_or(0);
        let avail = self.available();
        let n = if self.mirrored() {
            avail
        } else {
            avail.min(self.size - off)
        };
        (self.area.base().wrapping_add(off), n)
    }

    /// Copies `out.len()` unconsumed bytes (across the wrap) into `out`.
    pub fn copy_out(&self, out: &mut [u8]) -> bool {
        if out.len() > self.available() {
            return false;
        }
        let off = usize::try_from(self.read % self.size as u64).unwrap_or(0);
        let first = out.len().min(self.size - off);
        // SAFETY: both pieces lie inside the area and inside [read, write)
        // (checked: out.len() <= available), which nobody writes (see
        // `readable`); `out` is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.area.base().add(off), out.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(
                self.area.base(),
                out.as_mut_ptr().add(first),
                out.len() - first,
            );
        }
        true
    }

    /// The consumer is done with `n` more bytes: segments it passed go back
    /// to the kernel. Returns how many segments were handed back.
    pub fn consume(&mut self, n: usize) -> usize {
        self.read = (self.read + n as u64).min(self.write);
        let posted = self.post_ready();
        if posted > 0 {
            self.desc.publish();
        }
        posted
    }

    /// Segments posted and not yet filled: receives the kernel can complete
    /// without the consumer.
    pub fn in_flight(&self) -> usize {
        usize::try_from((self.posted_end - self.write).div_ceil(self.seg as u64)).unwrap_or(0)
    }

    /// Receives-in-flight statistics.
    pub fn stats(&self) -> PostedStats {
        let mut s = self.stats;
        if s.samples == 0 {
            s.min = self.in_flight();
        }
        s
    }
}

/// Independent fixed-size slots (see the module doc).
#[derive(Debug)]
pub struct SlotRing {
    mem: AlignedBuf,
    slot: usize,
    slots: u16,
    pub(crate) desc: DescRing,
    /// Buffer group id, once added to a ring.
    pub(crate) group: u16,
}

impl SlotRing {
    /// `slots` slots of `slot` bytes.
    pub fn new(slot: usize, slots: u16) -> Result<SlotRing, MapError> {
        let slots = slots.max(1);
        let mem = AlignedBuf::new(slot * usize::from(slots))?;
        Ok(SlotRing {
            mem,
            slot,
            slots,
            desc: DescRing::new(slots)?,
            group: 0,
        })
    }

    pub(crate) fn post_all(&mut self) {
        for bid in 0..self.slots {
            self.post(bid);
        }
        self.desc.publish();
    }

    fn post(&mut self, bid: u16) {
        let addr = self.mem.as_ptr() as u64 + u64::from(bid) * self.slot as u64;
        self.desc
            .add(addr, u32::try_from(self.slot).unwrap_or(u32::MAX), bid);
    }

    /// The `len` bytes the kernel put in slot `bid`; `None` if out of range.
    pub fn slot(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.slots || len > self.slot {
            return None;
        }
        let start = usize::from(bid) * self.slot;
        self.mem.as_slice().get(start..start + len)
    }

    /// Hands slot `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        if bid < self.slots {
            self.post(bid);
            self.desc.publish();
        }
    }
}
