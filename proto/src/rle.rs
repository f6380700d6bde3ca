//! Run-length-encoded page sets: `PresentBitmap` and `DiscardList` chunks.
//!
//! A chunk covers pages `[first_page, first_page + page_count)` of one
//! region as alternating runs `clear, set, clear, ...`, the first of which
//! may be empty; each run is a canonical LEB128 varint and the runs take at
//! most [`MAX_RLE_CHUNK`] bytes. Metadata therefore grows with the number of
//! runs, not with the region size: a 128 Mi-page region that is all present
//! or all absent costs a handful of bytes. A region's set is sent as
//! consecutive chunks, the last flagged `last`.
//!
//! Hazard: decoding trusts nothing; `runs` is allocated while reading at most
//! `MAX_RLE_CHUNK` bytes, so a chunk holds at most `MAX_RLE_CHUNK` runs.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::DecodeError;
use crate::layout::Layout;
use crate::varint;
use crate::{MAX_RLE_CHUNK, RLE_HEADER_LEN};

/// `flags` bit: this is the final chunk of the region's set.
pub const RLE_FLAG_LAST: u32 = 1;

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RleWire {
    region: U32,
    flags: U32,
    first_page: U64,
    page_count: U64,
}

const _: () = assert!(size_of::<RleWire>() == RLE_HEADER_LEN);

/// Run-length-encoded page set chunk (used by PresentBitmap D->S for resume
/// and DiscardList S->D for pre+post switch-over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RleChunk {
    /// Region id.
    pub region: u32,
    /// First page covered.
    pub first_page: u64,
    /// Pages covered; nonzero, equal to the sum of `runs`.
    pub page_count: u64,
    /// Final chunk of this region's set.
    pub last: bool,
    /// Alternating clear/set run lengths, starting with clear; only the
    /// first may be 0.
    pub runs: Vec<u64>,
}

impl RleChunk {
    /// Bytes the runs take on the wire.
    pub fn encoded_runs_len(&self) -> usize {
        self.runs.iter().map(|&r| varint::encoded_len(r)).sum()
    }

    /// Checks the structure: nonzero page count, no empty run after the
    /// first, runs summing to `page_count`, encoded size, no overflow.
    pub fn check_structure(&self) -> Result<(), DecodeError> {
        let len = self.encoded_runs_len();
        if len > MAX_RLE_CHUNK {
            return Err(DecodeError::RleTooLarge {
                len,
                max: MAX_RLE_CHUNK,
            });
        }
        if self.page_count == 0 {
            return Err(DecodeError::ZeroCount);
        }
        self.first_page
            .checked_add(self.page_count)
            .ok_or(DecodeError::Overflow {
                what: "RLE first page + page count",
                base: self.first_page,
                add: self.page_count,
            })?;
        let mut sum = 0u64;
        for (index, &run) in self.runs.iter().enumerate() {
            if run == 0 && index > 0 {
                return Err(DecodeError::RleZeroRun { index });
            }
            sum = sum.checked_add(run).ok_or(DecodeError::Overflow {
                what: "RLE run sum",
                base: sum,
                add: run,
            })?;
        }
        if sum != self.page_count {
            return Err(DecodeError::RleSumMismatch {
                sum,
                expected: self.page_count,
            });
        }
        Ok(())
    }

    /// [`RleChunk::check_structure`] plus: the region exists and the chunk
    /// lies inside it.
    pub fn validate(&self, layout: &Layout) -> Result<(), DecodeError> {
        self.check_structure()?;
        layout
            .require_region(self.region)?
            .check_range(self.first_page, self.page_count)
    }

    /// The set runs as `(first, count)` absolute page indices, ascending.
    pub fn set_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut pos = self.first_page;
        self.runs.iter().enumerate().filter_map(move |(i, &run)| {
            let start = pos;
            pos = pos.saturating_add(run);
            (i % 2 == 1 && run > 0).then_some((start, run))
        })
    }

    /// Appends the body.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        let wire = RleWire {
            region: U32::new(self.region),
            flags: U32::new(if self.last { RLE_FLAG_LAST } else { 0 }),
            first_page: U64::new(self.first_page),
            page_count: U64::new(self.page_count),
        };
        out.extend_from_slice(wire.as_bytes());
        for &run in &self.runs {
            varint::write(run, out);
        }
    }

    /// Decodes a body and checks its structure (not the layout).
    pub fn decode_body(body: &[u8]) -> Result<RleChunk, DecodeError> {
        let (w, rest) = RleWire::read_from_prefix(body).map_err(|_| DecodeError::Truncated {
            need: RLE_HEADER_LEN,
            have: body.len(),
        })?;
        let flags = w.flags.get();
        if flags & !RLE_FLAG_LAST != 0 {
            return Err(DecodeError::ReservedNonzero { field: "rle.flags" });
        }
        if rest.len() > MAX_RLE_CHUNK {
            return Err(DecodeError::RleTooLarge {
                len: rest.len(),
                max: MAX_RLE_CHUNK,
            });
        }
        let mut runs = Vec::new();
        let mut pos = 0;
        while pos < rest.len() {
            runs.push(varint::read(rest, &mut pos)?);
        }
        let chunk = RleChunk {
            region: w.region.get(),
            first_page: w.first_page.get(),
            page_count: w.page_count.get(),
            last: flags & RLE_FLAG_LAST != 0,
            runs,
        };
        chunk.check_structure()?;
        Ok(chunk)
    }
}

/// Accumulates alternating runs into chunks of at most `MAX_RLE_CHUNK`
/// encoded bytes.
struct ChunkBuilder {
    region: u32,
    max_bytes: usize,
    chunks: Vec<RleChunk>,
    first_page: u64,
    page_count: u64,
    bytes: usize,
    runs: Vec<u64>,
}

impl ChunkBuilder {
    fn push(&mut self, set: bool, len: u64) {
        // Within a chunk, even indices are clear runs and odd ones set runs.
        let cost = |runs: &[u64]| {
            let pad = usize::from(runs.len() & 1 == 0 && set);
            pad + varint::encoded_len(len)
        };
        if !self.runs.is_empty() && self.bytes + cost(&self.runs) > self.max_bytes {
            self.flush(false);
        }
        if self.runs.len() & 1 == 0 && set {
            self.runs.push(0);
            self.bytes += 1;
        }
        self.runs.push(len);
        self.bytes += varint::encoded_len(len);
        self.page_count += len;
    }

    fn flush(&mut self, last: bool) {
        if self.page_count == 0 {
            return;
        }
        let runs = core::mem::take(&mut self.runs);
        self.chunks.push(RleChunk {
            region: self.region,
            first_page: self.first_page,
            page_count: self.page_count,
            last,
            runs,
        });
        self.first_page += self.page_count;
        self.page_count = 0;
        self.bytes = 0;
    }
}

/// Turns a set of pages of one region, given as an iterator of sorted
/// disjoint `(first, count)` set ranges over region pages `[0, page_count)`,
/// into chunks each under `MAX_RLE_CHUNK` encoded bytes. The last chunk has
/// `last = true`; `page_count == 0` gives no chunk.
///
/// Tolerant of sloppy input: ranges are clipped to `[0, page_count)`, parts
/// overlapping earlier ranges are dropped, adjacent ranges merge, and empty
/// ranges are skipped, so the output is always valid and canonical.
pub fn encode_rle_chunks(
    region: u32,
    page_count: u64,
    set_ranges: impl IntoIterator<Item = (u64, u64)>,
) -> Vec<RleChunk> {
    encode_rle_chunks_limited(region, page_count, set_ranges, MAX_RLE_CHUNK)
}

/// [`encode_rle_chunks`] with a smaller chunk limit (clamped to
/// `2 * MAX_VARINT_LEN ..= MAX_RLE_CHUNK`), for tests of chunk boundaries.
pub fn encode_rle_chunks_limited(
    region: u32,
    page_count: u64,
    set_ranges: impl IntoIterator<Item = (u64, u64)>,
    max_bytes: usize,
) -> Vec<RleChunk> {
    let mut b = ChunkBuilder {
        region,
        max_bytes: max_bytes.clamp(2 * varint::MAX_VARINT_LEN, MAX_RLE_CHUNK),
        chunks: Vec::new(),
        first_page: 0,
        page_count: 0,
        bytes: 0,
        runs: Vec::new(),
    };
    // Pages [0, cursor) are emitted, or pending as the set run [s, cursor).
    let mut cursor = 0u64;
    let mut pending: Option<u64> = None;
    for (first, count) in set_ranges {
        let end = first.saturating_add(count).min(page_count);
        let start = first.max(cursor);
        if start >= end {
            continue;
        }
        if pending.is_none() || start > cursor {
            if let Some(s) = pending.take() {
                b.push(true, cursor - s);
            }
            if start > cursor {
                b.push(false, start - cursor);
            }
            pending = Some(start);
        }
        cursor = end;
    }
    if let Some(s) = pending {
        b.push(true, cursor - s);
    }
    if cursor < page_count {
        b.push(false, page_count - cursor);
    }
    b.flush(true);
    b.chunks
}
