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
            let kind = self.class(region, p, staged);
            let mut n = 1u64;
            let cap = match kind {
                Class::Data => u64::from(self.frame_pages).max(1),
                Class::Zero => u64::from(u32::MAX),
            };
            let mut staged_run: Vec<u8> = Vec::new();
            if staging && kind == Class::Data {
                staged_run.extend_from_slice(staged.unwrap_or(&[]));
            }
            while p + n < end && n < cap {
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
                    let pad = if self.align {
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
