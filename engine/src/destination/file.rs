//! Pages from a local memory file: the [`PageSource`] of Firecracker's local
//! mode and of CRIU's local page images.
//!
//! # Mechanism
//! Extents map runs of global pages to offsets in the file. The file is
//! mapped private and read-only; a page is installed with one `UFFDIO_COPY`
//! straight from that mapping, which the kernel reads itself: the engine
//! never reads the mapping in user space, so a file that shrinks gives a
//! clear error ([`EngineError::MemoryFile`]), never `SIGBUS`. Holes in the
//! file (`SEEK_HOLE`) and pages outside every extent are zero: known-zero,
//! filled locally when they fault. After the first fault the loop fills
//! every other page in the background, one run of at most `run_bytes` per
//! turn, so a fault waits behind one run at most.
//!
//! # Hazards
//! The file must not be written while it is served (its pages would be
//! torn); shrinking it is detected at the first page past its new end.

use std::fs::File;
use std::os::fd::AsFd;

use ringfault_proto::PageKind;

use super::install::{Installer, Payload};
use super::pages::{Cx, Finish, PageSource, Work};
use crate::error::EngineError;
use crate::sys::mapping::Mapping;
use crate::sys::ring::Event;
use crate::sys::uffd::UffdError;

/// A run of pages backed by the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Region (layout index).
    pub region: usize,
    /// First page within the region.
    pub first_page: u64,
    /// Pages.
    pub pages: u64,
    /// Byte offset of the first page in the file.
    pub file_offset: u64,
}

/// Pages from a file.
#[derive(Debug)]
pub struct FilePages {
    path: String,
    file: File,
    map: Mapping,
    /// Sorted by (region, first_page).
    extents: Vec<Extent>,
    background: bool,
    run_bytes: usize,
    faulted: bool,
    cursor: u64,
    /// Once every page is present: keep serving (re-faults of removed pages
    /// get zero pages) instead of asking the loop to unregister and end.
    keep_serving: bool,
    unregister_asked: bool,
    /// Serving faults (counted as demand pages), not the background fill.
    in_fetch: bool,
    /// Pages installed from the file.
    pub pages_copied: u64,
    /// Bytes installed from the file.
    pub bytes_copied: u64,
    /// Pages found zero (holes, or outside every extent).
    pub pages_zero: u64,
}

impl FilePages {
    /// Serves `extents` of `file` (checked against its size now).
    pub fn new(
        path: &str,
        file: File,
        mut extents: Vec<Extent>,
        inst: &Installer,
        background: bool,
        run_bytes: usize,
    ) -> Result<FilePages, EngineError> {
        let bad = |why: String| EngineError::MemoryFile {
            path: path.to_owned(),
            why,
        };
        let len = file
            .metadata()
            .map_err(|e| bad(format!("cannot read its size: {e}")))?
            .len();
        let mut end = 0u64;
        for x in &extents {
            let span = inst
                .space
                .span(x.region)
                .ok_or_else(|| bad(format!("an extent names region index {}", x.region)))?;
            let bytes = x.pages << span.shift;
            let stop = x
                .file_offset
                .checked_add(bytes)
                .ok_or_else(|| bad("an extent overflows".into()))?;
            if stop > len {
                return Err(bad(format!(
                    "is {len} bytes, but the memory it serves needs {stop} (region {} from byte {})",
                    span.id, x.file_offset
                )));
            }
            if x.first_page + x.pages > span.pages {
                return Err(bad(format!("an extent runs past region {}", span.id)));
            }
            end = end.max(stop);
        }
        extents.sort_by_key(|x| (x.region, x.first_page));
        let map_len = usize::try_from(end.max(4096).next_multiple_of(4096))
            .map_err(|_| bad("larger than the address space".into()))?;
        let map = if len == 0 {
            Mapping::anonymous(4096, 4096, Default::default())?
        } else {
            Mapping::map_file_at(
                &file,
                0,
                map_len.min(usize::try_from(len.next_multiple_of(4096)).unwrap_or(map_len)),
            )?
        };
        Ok(FilePages {
            path: path.to_owned(),
            file,
            map,
            extents,
            background,
            run_bytes: run_bytes.max(4096),
            faulted: false,
            cursor: 0,
            keep_serving: false,
            unregister_asked: false,
            in_fetch: false,
            pages_copied: 0,
            bytes_copied: 0,
            pages_zero: 0,
        })
    }

    /// Keeps the loop serving after every page is present, for owners that
    /// stay registered (a balloon's removed pages then fault again, and get
    /// zero pages), until the loop is stopped from outside.
    pub fn keep_serving(mut self, keep: bool) -> FilePages {
        self.keep_serving = keep;
        self
    }

    fn extent_of(&self, region: usize, page: u64) -> Option<&Extent> {
        let i = self
            .extents
            .partition_point(|x| (x.region, x.first_page) <= (region, page));
        let x = self.extents.get(i.checked_sub(1)?)?;
        (x.region == region && page < x.first_page + x.pages).then_some(x)
    }

    /// Installs up to `max` pages of region `ri` from `page`; returns pages handled.
    fn serve(
        &mut self,
        inst: &Installer,
        ri: usize,
        page: u64,
        max: u64,
    ) -> Result<u64, EngineError> {
        let Some(span) = inst.space.span(ri).copied() else {
            return Ok(1);
        };
        let Some(x) = self.extent_of(ri, page).copied() else {
            // Not in the file: zero. Count up to the next extent.
            let next = self
                .extents
                .iter()
                .find(|x| x.region == ri && x.first_page > page)
                .map_or(span.pages, |x| x.first_page);
            let n = (next - page).min(max).max(1);
            let out = inst.install(ri, page, n, PageKind::Zero, Payload::Zero)?;
            self.pages_zero += out.installed;
            return Ok(n);
        };
        let n = (x.first_page + x.pages - page).min(max).max(1);
        let off = x.file_offset + ((page - x.first_page) << span.shift);
        // Holes read as zero: no need to copy them.
        let data = rustix::fs::seek(self.file.as_fd(), rustix::fs::SeekFrom::Data(off));
        if let Ok(d) = data {
            if d > off {
                let hole_pages = ((d - off) >> span.shift).min(n).max(1);
                if (d - off) >> span.shift >= 1 {
                    let out = inst.install(ri, page, hole_pages, PageKind::Zero, Payload::Zero)?;
                    self.pages_zero += out.installed;
                    return Ok(hole_pages);
                }
            }
        }
        let offset = usize::try_from(off).unwrap_or(usize::MAX);
        match inst.install(
            ri,
            page,
            n,
            PageKind::Data,
            Payload::Mapped(&self.map, offset),
        ) {
            Ok(out) => {
                self.pages_copied += out.installed;
                self.bytes_copied += out.installed << span.shift;
                let c = if self.in_fetch {
                    &inst.counters.demand_pages
                } else {
                    &inst.counters.bulk_pages
                };
                crate::stats::Counters::add(c, out.installed);
                Ok(n)
            }
            Err(EngineError::Uffd(UffdError::Range { source, .. }))
                if matches!(source.raw_os_error(), Some(libc::EFAULT | libc::EINVAL)) =>
            {
                let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
                Err(EngineError::MemoryFile {
                    path: self.path.clone(),
                    why: format!(
                        "shrank to {len} bytes while being served; byte {} is gone",
                        off.max(len)
                    ),
                })
            }
            Err(e) => Err(e),
        }
    }
}

impl PageSource for FilePages {
    fn start(&mut self, _cx: &mut Cx<'_>) -> Result<(), EngineError> {
        Ok(())
    }

    fn fetch(&mut self, cx: &mut Cx<'_>, pages: &[u64]) -> Result<(), EngineError> {
        self.faulted = true;
        self.in_fetch = true;
        let r = pages
            .iter()
            .try_for_each(|&g| match cx.inst.space.locate(g) {
                Some((ri, page)) => self.serve(cx.inst, ri, page, 1).map(drop),
                None => Ok(()),
            });
        self.in_fetch = false;
        r
    }

    fn event(&mut self, _cx: &mut Cx<'_>, _ev: Event) -> Result<(), EngineError> {
        Ok(())
    }

    fn work(&mut self, cx: &mut Cx<'_>) -> Result<Work, EngineError> {
        if !self.background || !self.faulted || cx.inst.present.all_set() {
            return Ok(Work::Idle);
        }
        let Some(g) = cx.inst.present.next_clear(self.cursor) else {
            return Ok(Work::Idle);
        };
        let Some((ri, page)) = cx.inst.space.locate(g) else {
            return Ok(Work::Idle);
        };
        let ps = cx.inst.space.span(ri).map_or(4096, |s| s.page_size);
        let max = (self.run_bytes / ps).max(1) as u64;
        let (_, run) = cx.inst.present.next_clear_run(g, max).unwrap_or((g, 1));
        let run = run.min(cx.inst.space.span(ri).map_or(1, |s| s.pages - page));
        let n = self.serve(cx.inst, ri, page, run.max(1))?;
        self.cursor = g + n;
        Ok(Work::Busy)
    }

    fn finish(&mut self, _cx: &mut Cx<'_>) -> Result<Finish, EngineError> {
        if self.keep_serving {
            return Ok(Finish::Pending);
        }
        // First the loop unregisters guest memory (from then on the kernel
        // serves every fault, removed pages included), then it ends.
        if std::mem::replace(&mut self.unregister_asked, true) {
            Ok(Finish::Done)
        } else {
            Ok(Finish::Unregister)
        }
    }

    fn stop(&mut self, _failed: Option<&EngineError>) {}
}
