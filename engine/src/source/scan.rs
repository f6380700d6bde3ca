//! Which pages hold data: classifying guest memory ahead of the sweep, a
//! window at a time, after switch-over and off its critical path.
//!
//! # Mechanism
//! Before the sweep may claim pages, one pusher scans the next window (up to
//! [`WINDOW_PAGES`]) of the address space with `PAGEMAP_SCAN`, which answers
//! in ranges: pages never populated, or mapped to the shared zero page, hold
//! nothing. They are marked sent and announced to the destination as one
//! `ZeroRanges` frame per window (run-length encoded), which costs O(ranges),
//! never O(pages). Everything else is a data candidate, checked for zeros by
//! content when it is sent. The switch-over itself scans nothing, so its
//! pause does not grow with the VM. A demand request for a page not scanned
//! yet is answered by content (a never-populated page reads as zero).
//!
//! A file-backed source has no page tables to scan: every page is a data
//! candidate, classified by content.

use std::time::Instant;

use ringfault_proto::{encode_rle_chunks, RleChunk};

use super::session::{Session, SourceCounters};
use super::Backing;
use crate::error::EngineError;
use crate::sys::pagemap::{Query, Scanner, PAGE_IS_PFNZERO};

/// Pages per scanned window (1 GiB of 4 KiB pages).
pub const WINDOW_PAGES: u64 = 1 << 18;

/// Scans the next window if the sweep needs it; returns the `ZeroRanges`
/// chunks to send (empty if another lane scanned it, or nothing was zero).
pub fn scan_next(sess: &Session<'_>) -> Result<Vec<RleChunk>, EngineError> {
    let t = Instant::now();
    let Ok(mut guard) = sess.scanner.lock() else {
        return Ok(Vec::new());
    };
    if !sess.plan.needs_scan() {
        return Ok(Vec::new());
    }
    let from = sess.plan.scanned();
    let total = sess.space.total();
    let Some((ri, page)) = sess.space.locate(from) else {
        sess.plan.scanned_until(total);
        return Ok(Vec::new());
    };
    let span = sess.space.spans()[ri];
    let n = (span.pages - page).min(WINDOW_PAGES.max(1));
    let mut chunks = Vec::new();
    if let Backing::Memory(_) = sess.backing {
        if guard.is_none() {
            match Scanner::new() {
                Ok(s) => *guard = Some(s),
                Err(e) => {
                    tracing::warn!("{e}: every page is sent as data or zero by content");
                    sess.plan.scanned_until(total);
                    return Ok(Vec::new());
                }
            }
        }
        if let Some(scanner) = guard.as_mut() {
            let start = span.addr_of(page);
            let end = span.addr_of(page + n);
            let ranges = scanner.scan(start, end, Query::Populated)?;
            // Data candidates, in region pages; the rest of the window is zero.
            let mut data: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
            for r in ranges {
                if r.categories & PAGE_IS_PFNZERO != 0 {
                    continue;
                }
                let a = ((r.start - span.base) >> span.shift) as u64;
                let b = ((r.end - span.base).div_ceil(span.page_size)) as u64;
                match data.last_mut() {
                    Some(last) if last.0 + last.1 >= a => last.1 = last.1.max(b - last.0),
                    _ => data.push((a, b - a)),
                }
            }
            let mut zero = Vec::new();
            let mut at = page;
            for &(a, c) in &data {
                if a > at {
                    zero.push((at, a - at));
                }
                at = at.max(a + c);
            }
            if at < page + n {
                zero.push((at, page + n - at));
            }
            let mut zero_pages = 0;
            for &(a, c) in &zero {
                zero_pages += sess.plan.mark_sent(span.first + a, c);
            }
            SourceCounters::add(&sess.counters.unpopulated_pages, zero_pages);
            if !zero.is_empty() {
                // Window-relative runs, then shifted to region pages.
                let rel = zero.iter().map(|&(a, c)| (a - page, c));
                for mut ch in encode_rle_chunks(span.id, n, rel) {
                    ch.first_page += page;
                    chunks.push(ch);
                }
            }
        }
    }
    sess.plan.scanned_until(span.first + page + n);
    SourceCounters::add(
        &sess.counters.scan_ns,
        u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX),
    );
    Ok(chunks)
}
