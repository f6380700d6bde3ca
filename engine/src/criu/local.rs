//! Lazy pages from the checkpoint's page images: the [`PageSource`] of
//! `ringfault criu-lazy-pages` without `--page-server`.
//!
//! # Mechanism
//! Each task's `pages-N.img` is mapped private and read-only. The
//! background installs every lazy page with one `UFFDIO_COPY` straight from
//! that mapping into the task (the kernel reads the page cache itself: the
//! daemon never copies those pages in user space), in runs of at most
//! `run_bytes` once the restore has finished, so a fault waits behind one
//! run at most (and no faster than the session's
//! [`Pace`](super::pace::Pace), if set). Ahead of each run it asks the
//! kernel to read [`READ_AHEAD`] bytes further (`POSIX_FADV_WILLNEED`), so
//! that a run rarely waits for the disk.
//!
//! Faults are served first, in the loop turn that read them, with `pread`
//! of just their pages: a fault through the mapping on a page the page cache
//! lacks would make the kernel read around it (up to the device's
//! `read_ahead_kb`, 8 MiB here) before the task could go on.
//!
//! # Hazards
//! The image files must not change while they are served. One that shrinks
//! gives an error naming it, never `SIGBUS` (the copy from the mapping
//! fails with `EFAULT`; `pread` comes up short).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ringfault_proto::PageKind;

use super::image::{pages_path, PAGE_SIZE};
use super::session::Session;
use super::tasks::TaskImage;
use super::CriuError;
use crate::destination::install::{Installer, Payload};
use crate::destination::pages::{Cx, Finish, PageSource, Work};
use crate::error::EngineError;
use crate::stats::Counters;
use crate::sys::mapping::Mapping;
use crate::sys::ring::Event;
use crate::sys::uffd::{Event as UffdEvent, UffdError};

/// Default of the background run: large enough that the per-run cost
/// vanishes, small enough that a fault behind one waits well under a
/// millisecond.
pub const RUN_BYTES: usize = 1 << 20;

/// How far ahead of a background run the pages image is read.
pub const READ_AHEAD: u64 = 32 << 20;

/// The largest read-ahead hint at once (the kernel caps each at the
/// device's read-ahead window anyway).
const READ_AHEAD_STEP: u64 = 2 << 20;

/// One task's pages image.
#[derive(Debug)]
struct PagesFile {
    path: String,
    file: File,
    map: Option<Mapping>,
    /// Bytes from 0 up to here were hinted with `POSIX_FADV_WILLNEED`.
    advised: u64,
}

impl PagesFile {
    /// Asks the kernel to read the file up to [`READ_AHEAD`] bytes past
    /// `end` (a hint: errors are ignored).
    fn read_ahead(&mut self, from: u64, end: u64) {
        let target = end.saturating_add(READ_AHEAD);
        if self.advised >= end.saturating_add(READ_AHEAD / 2) {
            return;
        }
        let mut at = self.advised.max(from);
        while at < target {
            let len = (target - at).min(READ_AHEAD_STEP);
            let Some(n) = std::num::NonZeroU64::new(len) else {
                break;
            };
            if let Err(e) =
                rustix::fs::fadvise(&self.file, at, Some(n), rustix::fs::Advice::WillNeed)
            {
                tracing::debug!("{}: read-ahead hint failed: {e}", self.path);
                break;
            }
            at += len;
        }
        self.advised = target;
    }
}

/// Lazy pages from `pages-N.img`.
#[derive(Debug)]
pub struct ImagePages {
    session: Session,
    /// By owner.
    files: Vec<PagesFile>,
    run_bytes: usize,
    cursor: u64,
    wrapped: bool,
    /// Where faults' pages are read to.
    buf: Vec<u8>,
    /// Pages installed from the images.
    pub pages_copied: u64,
}

impl ImagePages {
    /// Opens and maps the pages image of every task in `tasks` (by owner),
    /// checking that it holds every lazy range.
    pub fn new(
        dir: &Path,
        tasks: &[TaskImage],
        session: Session,
        run_bytes: usize,
    ) -> Result<ImagePages, CriuError> {
        let mut files = Vec::with_capacity(tasks.len());
        for t in tasks {
            let path = pages_path(dir, t.pages_id);
            let shown = path.display().to_string();
            if let Some(r) = t.ranges.iter().find(|r| r.pages_offset.is_none()) {
                return Err(CriuError::NotInImage {
                    pid: t.pid,
                    addr: r.start,
                    pages_id: t.pages_id,
                });
            }
            let file = File::open(&path).map_err(|e| CriuError::PagesImage {
                path: shown.clone(),
                why: format!("cannot open it: {e}"),
            })?;
            let len = file
                .metadata()
                .map_err(|e| CriuError::PagesImage {
                    path: shown.clone(),
                    why: format!("cannot read its size: {e}"),
                })?
                .len();
            if len < t.pages_bytes {
                return Err(CriuError::PagesImage {
                    path: shown,
                    why: format!(
                        "is {len} bytes, but pagemap-{}.img places {} bytes of pages in it",
                        t.pid, t.pages_bytes
                    ),
                });
            }
            let need = t
                .ranges
                .iter()
                .filter_map(|r| r.pages_offset.map(|o| o + r.pages * PAGE_SIZE))
                .max()
                .unwrap_or(0);
            let map = if need == 0 {
                None
            } else {
                let n = usize::try_from(need.next_multiple_of(4096)).map_err(|_| {
                    CriuError::PagesImage {
                        path: shown.clone(),
                        why: "is larger than this machine's address space".into(),
                    }
                })?;
                Some(
                    Mapping::map_file_at(&file, 0, n)
                        .map_err(|e| CriuError::Engine(EngineError::Map(e)))?,
                )
            };
            files.push(PagesFile {
                path: shown,
                file,
                map,
                advised: 0,
            });
        }
        Ok(ImagePages {
            session,
            files,
            run_bytes: run_bytes.max(4096),
            cursor: 0,
            wrapped: false,
            buf: Vec::new(),
            pages_copied: 0,
        })
    }

    /// The session (tasks, statistics).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Installs up to `max` pages of region `ri` from `page`; returns the
    /// pages handled. Faults (`demand`) are read with `pread`, the
    /// background is copied from the mapping (module docs).
    fn serve(
        &mut self,
        inst: &Installer,
        ri: usize,
        page: u64,
        max: u64,
        demand: bool,
    ) -> Result<u64, EngineError> {
        let (Some(span), Some(src)) = (inst.space.span(ri).copied(), self.session.regions.get(ri))
        else {
            return Ok(1);
        };
        let n = (span.pages - page).min(max).max(1);
        let task = usize::try_from(src.task).unwrap_or(usize::MAX);
        let Some(base) = src.pages_offset else {
            return Err(EngineError::Internal(format!(
                "region {ri} has no image offset"
            )));
        };
        let Some(pf) = self.files.get_mut(task) else {
            return Err(EngineError::Internal(format!(
                "no pages image for region {ri}"
            )));
        };
        let off = base + page * PAGE_SIZE;
        let bytes = n * PAGE_SIZE;
        let shrank = |pf: &PagesFile| {
            let len = pf.file.metadata().map(|m| m.len()).unwrap_or(0);
            EngineError::from(CriuError::PagesImage {
                path: pf.path.clone(),
                why: format!("shrank to {len} bytes while being served; byte {off} is gone"),
            })
        };
        let result = if demand {
            let len = usize::try_from(bytes).unwrap_or(usize::MAX);
            self.buf.resize(len, 0);
            if let Err(e) = pf.file.read_exact_at(&mut self.buf, off) {
                return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    shrank(pf)
                } else {
                    CriuError::PagesImage {
                        path: pf.path.clone(),
                        why: format!("cannot read {bytes} bytes at {off}: {e}"),
                    }
                    .into()
                });
            }
            inst.install(ri, page, n, PageKind::Data, Payload::Bytes(&self.buf))
        } else {
            pf.read_ahead(off, off + bytes);
            let Some(map) = pf.map.as_ref() else {
                return Err(EngineError::Internal(format!(
                    "region {ri} has no mapped pages image"
                )));
            };
            let offset = usize::try_from(off).unwrap_or(usize::MAX);
            inst.install(ri, page, n, PageKind::Data, Payload::Mapped(map, offset))
        };
        match result {
            Ok(out) => {
                self.pages_copied += out.installed;
                let c = if demand {
                    &inst.counters.demand_pages
                } else {
                    &inst.counters.bulk_pages
                };
                Counters::add(c, out.installed);
                Ok(n)
            }
            Err(EngineError::Uffd(UffdError::Range { source, .. }))
                if matches!(source.raw_os_error(), Some(libc::EFAULT | libc::EINVAL)) =>
            {
                Err(shrank(pf))
            }
            Err(e) => Err(e),
        }
    }
}

impl PageSource for ImagePages {
    fn start(&mut self, cx: &mut Cx<'_>) -> Result<(), EngineError> {
        self.session.start(cx)
    }

    fn fetch(&mut self, cx: &mut Cx<'_>, pages: &[u64]) -> Result<(), EngineError> {
        let mut i = 0;
        while i < pages.len() {
            let g = pages[i];
            // Faults on neighbouring pages of one region go in one install.
            let mut n = 1;
            while i + n < pages.len() && pages[i + n] == g + n as u64 {
                n += 1;
            }
            let mut done = 0u64;
            while done < n as u64 {
                let Some((ri, page)) = cx.inst.space.locate(g + done) else {
                    break;
                };
                done += self.serve(cx.inst, ri, page, n as u64 - done, true)?;
            }
            i += n;
        }
        Ok(())
    }

    fn event(&mut self, cx: &mut Cx<'_>, ev: Event) -> Result<(), EngineError> {
        self.session.event(cx, &ev).map(drop)
    }

    fn work(&mut self, cx: &mut Cx<'_>) -> Result<Work, EngineError> {
        if !self.session.background_ready(cx.now) || cx.inst.present.all_set() {
            return Ok(Work::Idle);
        }
        let g = match cx.inst.present.next_clear(self.cursor) {
            Some(g) => g,
            None if !self.wrapped => {
                self.wrapped = true;
                self.cursor = 0;
                return Ok(Work::Busy);
            }
            None => return Ok(Work::Idle),
        };
        let Some((ri, page)) = cx.inst.space.locate(g) else {
            return Ok(Work::Idle);
        };
        let max = (self.run_bytes / 4096).max(1) as u64;
        let (_, run) = cx.inst.present.next_clear_run(g, max).unwrap_or((g, 1));
        let n = self.serve(cx.inst, ri, page, run.max(1), false)?;
        self.session.pace.spend(cx.now, n * PAGE_SIZE);
        self.cursor = g + n;
        Ok(if self.session.pace.ready(cx.now) {
            Work::Busy
        } else {
            Work::Idle
        })
    }

    fn finish(&mut self, _cx: &mut Cx<'_>) -> Result<Finish, EngineError> {
        // `criu lazy-pages` exits once the restore finished and every task
        // has all its pages or has exited; its exit closes the userfaultfds.
        Ok(if self.session.finished() {
            Finish::Done
        } else {
            Finish::Pending
        })
    }

    fn stop(&mut self, _failed: Option<&EngineError>) {}

    fn sleep_limit(&self) -> std::time::Duration {
        self.session
            .sleep_limit(std::time::Duration::from_millis(500))
    }

    fn fault_outside(&mut self, cx: &mut Cx<'_>, owner: u32, addr: u64) -> Result<(), EngineError> {
        self.session.fault_outside(cx, owner, addr)
    }

    fn uffd_event(
        &mut self,
        cx: &mut Cx<'_>,
        owner: u32,
        ev: UffdEvent,
    ) -> Result<bool, EngineError> {
        self.session.uffd_event(cx, owner, ev)
    }
}
