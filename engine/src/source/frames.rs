//! Turning runs of pages into sealed `Pages` frames for one send.
//!
//! A batch is one byte buffer (frame heads, pads and tags) plus a list of
//! pieces: parts of that buffer and ranges of guest memory, in wire order, for
//! one vectored send straight from guest memory. Data pages are found by a
//! zero scan at memory speed (`sys::zero`); runs of zero pages become one
//! header each. With `Aead` the payload is encrypted into the buffer instead
//! (encryption needs a copy anyway). A file-backed source reads its pages
//! with `pread` into the buffer (never through a mapping, so a file that
//! shrinks gives an error, not `SIGBUS`).

use ringfault_proto::{
    encode_pages_head, PageKind, PagesHeader, Protection, Sealer, PAGES_FRAME_LEN,
};

use super::{Backing, SourceCounters};
use crate::error::{EngineError, LaneId};
use crate::space::PageSpace;
use crate::sys::ring::Piece;
use crate::sys::zero::is_zero;

/// One batch being built.
#[derive(Debug, Default)]
pub struct Batch {
    /// Heads, pads, tags (and staged payloads).
    pub buf: Vec<u8>,
    /// Wire order.
    pub pieces: Vec<Piece>,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Data pages in the batch.
    pub data_pages: u64,
    /// Zero pages in the batch.
    pub zero_pages: u64,
    /// Frames in the batch.
    pub frames: u64,
}

impl Batch {
    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pieces.clear();
        self.wire_bytes = 0;
        self.data_pages = 0;
        self.zero_pages = 0;
        self.frames = 0;
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    fn own(&mut self, start: usize) {
        let end = self.buf.len();
        if end > start {
            // Merge with the previous piece when contiguous in the buffer.
            if let Some(Piece::Own { end: e, .. }) = self.pieces.last_mut() {
                if *e == start {
                    *e = end;
                    return;
                }
            }
            self.pieces.push(Piece::Own { start, end });
        }
    }
}

/// A whole frame window goes out as data if at most one page in this many is
/// zero ([`Framer::whole_window`]).
const ABSORB_ZERO: u64 = 8;

/// What a batch builder needs.
#[derive(Debug)]
pub struct Framer<'a> {
    /// What is served.
    pub backing: &'a Backing,
    /// The page numbering.
    pub space: &'a PageSpace,
    /// Data pages per frame.
    pub frame_pages: u32,
    /// Pad payloads to 4 KiB stream offsets (the lane asked for it).
    pub align: bool,
    /// Which lane (for errors).
    pub lane: LaneId,
}

/// How a page reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Data,
    Zero,
}

impl Framer<'_> {
    fn class(&self, region: usize, page: u64, staged: Option<&[u8]>) -> Class {
        match staged {
            Some(b) => {
                if is_zero(b) {
                    Class::Zero
                } else {
                    Class::Data
                }
            }
            None => {
                let Backing::Memory(mem) = self.backing else {
                    return Class::Data;
                };
                let Some(r) = mem.region(region) else {
                    return Class::Data;
                };
                let ps = r.page_size();
                let off = usize::try_from(page)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(ps);
                match r.slice(off, ps) {
                    Ok(s) if s.is_zero() => Class::Zero,
                    _ => Class::Data,
                }
            }
        }
    }

    /// Data pages per frame for pages of `ps` bytes: `frame_pages`, but one
    /// 2 MiB page (or one larger page) per frame for larger pages.
    fn data_frame_pages(&self, ps: usize) -> u64 {
        if ps > 4096 {
            u64::from(self.frame_pages).min(((2usize << 20) / ps) as u64)
        } else {
            u64::from(self.frame_pages)
        }
        .max(1)
    }

    /// Whether pages `p..` of `region` (guest memory, not a file) start a
    /// whole frame window (aligned to the frame size, inside `..end`) whose
    /// zero pages are at most one in [`ABSORB_ZERO`]: then the window goes
    /// out as one data frame, its few zero pages as data, so that the
    /// destination can install it as one huge page instead of in pieces
    /// split at every zero page. A page that is populated with zeros on the
    /// source is then populated on the destination too; never-populated
    /// pages are not claimed here (they go out as ranges). Returns its pages.
    fn whole_window(&self, region: usize, p: u64, end: u64, ps: usize) -> Option<u64> {
        if !matches!(self.backing, Backing::Memory(_)) {
            return None;
        }
        let fp = self.data_frame_pages(ps);
        if fp < ABSORB_ZERO || !p.is_multiple_of(fp) || end - p < fp {
            return None;
        }
        let mut zeros = 0u64;
        for i in 0..fp {
            if self.class(region, p + i, None) == Class::Zero {
                zeros += 1;
                if zeros * ABSORB_ZERO > fp {
                    return None;
                }
            }
        }
        Some(fp)
    }

    /// Appends frames for pages `first..first+count` of region `region`,
    /// sealed with `sealer`; `request_id` is 0 for background pages.
    /// `stream_pos` is the lane's byte offset where the batch starts (for
    /// payload alignment); it is advanced.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &self,
        batch: &mut Batch,
        sealer: &mut Sealer,
        region: usize,
        first: u64,
        count: u64,
        request_id: u64,
        stream_pos: &mut u64,
        counters: &SourceCounters,
        demand: bool,
    ) -> Result<(), EngineError> {
        let Some(span) = self.space.span(region).copied() else {
            return Ok(());
        };
        let ps = span.page_size;
        let end = (first + count).min(span.pages);
        let mut p = first;
        // Staged: read into our own buffer before sealing and sending, for
        // files, for encryption, and for memory the VM still writes (pre-copy:
        // a tag must cover the bytes that go out, and io_uring reads guest
        // memory when it sends, not now).
        let staging = match self.backing {
            Backing::File(_) => true,
            Backing::Memory(m) => sealer.protection() == Protection::Aead || !m.is_frozen(),
        };
        let mut page_buf = Vec::new();
        while p < end {
            // Classify a run: data up to frame_pages, zero as long as it lasts.
            let staged = if let Backing::File(f) = self.backing {
                page_buf.resize(ps, 0);
                f.read_page(region, span.offset_of(p), &mut page_buf)?;
                Some(&page_buf[..])
            } else {
                None
            };
            let whole = self.whole_window(region, p, end, ps);
            let kind = if whole.is_some() {
                Class::Data
            } else {
                self.class(region, p, staged)
            };
            let mut n = whole.unwrap_or(1);
            // Data frames end at multiples of `frame_pages` within the
            // region, so a run that starts on a 2 MiB boundary goes out as
            // whole aligned 2 MiB frames (at the default of 512 pages), which
            // the destination installs as huge pages.
            let cap = match kind {
                Class::Data => {
                    let fp = self.data_frame_pages(ps);
                    fp - p % fp
                }
                Class::Zero => u64::from(u32::MAX),
            };
            let mut staged_run: Vec<u8> = Vec::new();
            if staging && kind == Class::Data {
                staged_run.extend_from_slice(staged.unwrap_or(&[]));
            }
            while whole.is_none() && p + n < end && n < cap {
                let next_staged = if let Backing::File(f) = self.backing {
                    page_buf.resize(ps, 0);
                    f.read_page(region, span.offset_of(p + n), &mut page_buf)?;
                    Some(&page_buf[..])
                } else {
                    None
                };
                if self.class(region, p + n, next_staged) != kind {
                    break;
                }
                if staging && kind == Class::Data {
                    if let Some(b) = next_staged {
                        staged_run.extend_from_slice(b);
                    }
                }
                n += 1;
            }
            let count32 = u32::try_from(n).unwrap_or(u32::MAX);
            match kind {
                Class::Zero => {
                    let h = PagesHeader {
                        region: span.id,
                        kind: PageKind::Zero,
                        pad_len: 0,
                        first_page: p,
                        count: count32,
                        payload_len: 0,
                        request_id,
                    };
                    let start = batch.buf.len();
                    batch.buf.extend_from_slice(&encode_pages_head(&h));
                    let tag = sealer.seal(&batch.buf[start..], &[]).map_err(|source| {
                        EngineError::Integrity {
                            lane: self.lane,
                            source,
                        }
                    })?;
                    if let Some(t) = tag {
                        batch.buf.extend_from_slice(&t);
                    }
                    batch.own(start);
                    let bytes = (batch.buf.len() - start) as u64;
                    *stream_pos += bytes;
                    batch.wire_bytes += bytes;
                    batch.zero_pages += n;
                    SourceCounters::add(&counters.zero_pages, n);
                }
                Class::Data => {
                    let len = usize::try_from(n).unwrap_or(0) * ps;
                    let pad = if self.align && len >= ringfault_proto::ALIGN_MIN_PAYLOAD as usize {
                        let at = *stream_pos + PAGES_FRAME_LEN as u64;
                        u16::try_from(at.next_multiple_of(4096) - at).unwrap_or(0)
                    } else {
                        0
                    };
                    let h = PagesHeader {
                        region: span.id,
                        kind: PageKind::Data,
                        pad_len: pad,
                        first_page: p,
                        count: count32,
                        payload_len: u32::try_from(len).unwrap_or(u32::MAX),
                        request_id,
                    };
                    let start = batch.buf.len();
                    batch.buf.extend_from_slice(&encode_pages_head(&h));
                    batch.buf.resize(batch.buf.len() + usize::from(pad), 0);
                    let head_end = batch.buf.len();
                    let offset = span.offset_of(p);
                    if staging {
                        // Encrypt (or copy) the staged payload into the buffer.
                        if staged_run.is_empty() {
                            if let Backing::Memory(mem) = self.backing {
                                let r = mem.region(region).ok_or_else(|| {
                                    EngineError::Internal("region vanished".into())
                                })?;
                                staged_run.resize(len, 0);
                                r.read(offset, &mut staged_run)?;
                            }
                        }
                        batch.buf.resize(head_end + len, 0);
                        let (head, out) = batch.buf[start..].split_at_mut(head_end - start);
                        let tag =
                            sealer
                                .seal_encrypt(head, &staged_run, out)
                                .map_err(|source| EngineError::Integrity {
                                    lane: self.lane,
                                    source,
                                })?;
                        if let Some(t) = tag {
                            batch.buf.extend_from_slice(&t);
                        }
                        batch.own(start);
                    } else {
                        let Backing::Memory(mem) = self.backing else {
                            return Err(EngineError::Internal("unstaged file payload".into()));
                        };
                        let r = mem
                            .region(region)
                            .ok_or_else(|| EngineError::Internal("region vanished".into()))?;
                        let slice = r.slice(offset, len)?;
                        let tag = match sealer.protection() {
                            Protection::None => sealer
                                .seal(&batch.buf[start..head_end], &[])
                                .map_err(|source| EngineError::Integrity {
                                    lane: self.lane,
                                    source,
                                })?,
                            _ => {
                                let bytes = slice.frozen_bytes()?;
                                let mut lap = crate::stats::Lap::start();
                                let t = sealer.seal(&batch.buf[start..head_end], bytes).map_err(
                                    |source| EngineError::Integrity {
                                        lane: self.lane,
                                        source,
                                    },
                                )?;
                                if !demand {
                                    lap.lap(&counters.stage_seal_ns);
                                }
                                t
                            }
                        };
                        batch.own(start);
                        batch.pieces.push(Piece::Guest {
                            region,
                            offset,
                            len,
                        });
                        if let Some(t) = tag {
                            let ts = batch.buf.len();
                            batch.buf.extend_from_slice(&t);
                            batch.pieces.push(Piece::Own {
                                start: ts,
                                end: batch.buf.len(),
                            });
                        }
                    }
                    let bytes = (head_end - start + len + sealer.tag_len()) as u64;
                    *stream_pos += bytes;
                    batch.wire_bytes += bytes;
                    batch.data_pages += n;
                    if demand {
                        SourceCounters::add(&counters.demand_pages, n);
                    } else {
                        SourceCounters::add(&counters.bulk_pages, n);
                    }
                }
            }
            batch.frames += 1;
            p += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ringfault_proto::{Layout, PageSize, RegionDesc};

    use super::*;
    use crate::sys::guest::{GuestMemory, RegionSpec};
    use crate::sys::mapping::MapOptions;

    const PAGES: u64 = 1024;

    /// The batch for pages `first..first+count` of one 1024-page region
    /// whose pages all hold data except `zeros`, at 512 pages per frame.
    fn frames_of(zeros: &[u64], first: u64, count: u64) -> Batch {
        let size = usize::try_from(PAGES).unwrap() * 4096;
        let mem = GuestMemory::anonymous(
            &[RegionSpec {
                id: 1,
                size,
                page_size: 4096,
            }],
            MapOptions::default(),
        )
        .unwrap();
        let r = &mem.regions()[0];
        for p in (0..PAGES).filter(|p| !zeros.contains(p)) {
            r.write(usize::try_from(p).unwrap() * 4096 + 100, &[7u8; 8])
                .unwrap();
        }
        let layout = Layout {
            regions: vec![RegionDesc {
                id: 1,
                page_size: PageSize::Size4K,
                size: size as u64,
            }],
        };
        let space = PageSpace::new(&layout, &[r.addr()]);
        let backing = Backing::Memory(Arc::new(mem));
        let framer = Framer {
            backing: &backing,
            space: &space,
            frame_pages: 512,
            align: true,
            lane: LaneId::DEMAND,
        };
        let mut sealer = Sealer::new(Protection::Mac, &[3u8; 32]).unwrap();
        let counters = SourceCounters::default();
        let mut batch = Batch::default();
        let mut pos = 0u64;
        framer
            .append(
                &mut batch,
                &mut sealer,
                0,
                first,
                count,
                0,
                &mut pos,
                &counters,
                false,
            )
            .unwrap();
        batch
    }

    #[test]
    fn whole_windows_absorb_a_few_zero_pages() {
        // One zero page in each 2 MiB window: two whole data frames.
        let b = frames_of(&[3, 700], 0, PAGES);
        assert_eq!((b.frames, b.data_pages, b.zero_pages), (2, PAGES, 0));
    }

    #[test]
    fn a_window_with_many_zero_pages_is_split_at_them() {
        // 100 zero pages (more than one in 8) open window 0: a zero frame,
        // then the window's data; window 1 is whole.
        let zeros: Vec<u64> = (0..100).collect();
        let b = frames_of(&zeros, 0, PAGES);
        assert_eq!(
            (b.frames, b.data_pages, b.zero_pages),
            (3, PAGES - 100, 100)
        );
    }

    #[test]
    fn data_frames_end_on_window_boundaries() {
        // A run that starts off a boundary stops at the next one, so the
        // frame after it is a whole aligned window.
        let b = frames_of(&[], 1, PAGES - 1);
        assert_eq!((b.frames, b.data_pages), (2, PAGES - 1));
    }
}
