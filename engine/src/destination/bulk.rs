//! A bulk worker: one bulk lane, one io_uring ring, one core. It receives each frame
//! header, then the frame's pages straight into a page-aligned receive buffer
//! (registered with the ring for `UFFDIO_COPY`; unregistered for `UFFDIO_MOVE`), and
//! installs them from there: one copy after the kernel's socket copy, or none.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ringfault_proto::{FrameHeader, Message, PageKind, FRAME_HEADER_LEN, MAX_BODY_LEN};

use super::install::Payload;
use super::{InstallMode, Shared};
use crate::addr::Stream;
use crate::conn::peer_error;
use crate::error::EngineError;
use crate::stats::{ChannelReport, Counters, Timeline};
use crate::sys::ringio::PageReceiver;

/// Receives and installs pages from one bulk lane until the session ends.
pub(crate) fn run(
    sh: &Shared<'_>,
    stream: Stream,
    channel: u16,
) -> Result<ChannelReport, EngineError> {
    crate::sys::affinity::place_current_thread(
        "bulk worker",
        sh.cfg.pin_workers,
        usize::from(channel),
        sh.cfg
            .prioritize_demand
            .then_some(crate::sys::affinity::SchedClass::Batch),
    );
    let largest_page = sh.regions.iter().map(|r| r.page_size).max().unwrap_or(4096);
    let buf_len = sh.cfg.recv_buffer.max(largest_page).next_multiple_of(4096);
    let moving = sh.cfg.install == InstallMode::Move;
    let mut rx = PageReceiver::new(buf_len, 1, !moving)
        .map_err(|e| EngineError::io("allocating receive buffers", e))?;
    let mut timeline = Timeline::new(sh.started);
    let mut bytes = 0u64;
    let mut body = vec![0u8; MAX_BODY_LEN];
    let lost = || EngineError::ConnectionLost {
        lane: "bulk",
        channel,
    };
    let fd = stream.as_fd();
    let result = (|| -> Result<(), EngineError> {
        loop {
            let mut hdr = [0u8; FRAME_HEADER_LEN];
            if !rx
                .read_exact(fd, 0, 0, FRAME_HEADER_LEN)
                .map_err(|_| lost())?
            {
                return Err(lost());
            }
            hdr.copy_from_slice(&rx.buf(0).as_slice()[..FRAME_HEADER_LEN]);
            let header = FrameHeader::parse(&hdr)?;
            let blen = usize::try_from(header.body_len).unwrap_or(usize::MAX);
            if blen > MAX_BODY_LEN {
                return Err(EngineError::Protocol("frame body too large".into()));
            }
            if blen > 0 && !rx.read_exact(fd, 0, 0, blen).map_err(|_| lost())? {
                return Err(lost());
            }
            body[..blen].copy_from_slice(&rx.buf(0).as_slice()[..blen]);
            let h = match Message::decode(&header, &body[..blen])? {
                Message::Pages(h) => h,
                Message::Error(e) => return Err(peer_error(e)),
                other => {
                    return Err(EngineError::Protocol(format!(
                        "unexpected {:?} on bulk lane {channel}",
                        other.kind()
                    )))
                }
            };
            let payload = h.validate(sh.layout)?;
            let frame_bytes = (FRAME_HEADER_LEN + blen) as u64 + payload;
            bytes += frame_bytes;
            Counters::add(&sh.counters.wire_bytes, frame_bytes);
            timeline.record(frame_bytes);
            let ri = sh
                .regions
                .iter()
                .position(|r| r.id == h.region)
                .ok_or_else(|| EngineError::Protocol("pages for an unknown region".into()))?;
            let ps = sh.regions[ri].page_size;
            let inst = sh.installer();
            let mut on_again = || std::thread::sleep(Duration::from_micros(20));
            match h.kind {
                PageKind::Zero | PageKind::Unpopulated => {
                    inst.install(
                        ri,
                        h.first_page,
                        u64::from(h.count),
                        h.kind,
                        Payload::Zero,
                        &mut on_again,
                    )?;
                }
                PageKind::Data => {
                    // Large frames arrive in buffer-sized, page-aligned chunks.
                    let chunk_pages = (buf_len / ps).max(1) as u64;
                    let mut page = h.first_page;
                    let end = h.first_page + u64::from(h.count);
                    while page < end {
                        let n = chunk_pages.min(end - page);
                        let len = usize::try_from(n).unwrap_or(0) * ps;
                        if !rx.read_exact(fd, 0, 0, len).map_err(|_| lost())? {
                            return Err(lost());
                        }
                        let p = if moving {
                            Payload::Move(rx.buf_mut(0), 0)
                        } else {
                            Payload::Copy(&rx.buf(0).as_slice()[..len])
                        };
                        let out = inst.install(ri, page, n, PageKind::Data, p, &mut on_again)?;
                        Counters::add(&sh.counters.bulk_pages, out.installed);
                        page += n;
                    }
                }
            }
            if sh.present.all_set() {
                sh.notifier.notify();
            }
        }
    })();
    match result {
        // Acquire: pairs with the fault worker's Release store after completion.
        Err(_) if sh.finished.load(Ordering::Acquire) => Ok(ChannelReport {
            channel,
            lane: "bulk",
            bytes,
            bytes_per_step: timeline.samples().to_vec(),
        }),
        Err(e) => Err(e),
        Ok(()) => unreachable_ok(),
    }
}

fn unreachable_ok() -> Result<ChannelReport, EngineError> {
    Err(EngineError::Protocol(
        "bulk loop ended without a reason".into(),
    ))
}
