//! The classic post-copy design, as a baseline measured in the same harness: the
//! way a first implementation (or QEMU's postcopy, in outline) does it.
//!
//! - Destination: one thread blocks on the userfaultfd and, for each fault, sends
//!   a 16-byte request (`page: u64, 0: u64`); one thread reads the single
//!   connection in a plain loop: a 16-byte header (`page: u64, kind: u64`), then
//!   `read()` of the page into a buffer, then `UFFDIO_COPY` (zero pages:
//!   `UFFDIO_ZEROPAGE`). No prefetch, no pinning, no polling.
//! - Source: one connection; a reader thread queues requests; the sender pushes
//!   every page in address order through a 64 KiB buffered writer, and sends a
//!   requested page next (flushing at once), behind whatever is already queued in
//!   the socket.
//! - No authentication: this is a measuring stick, not a product.
//!
//! Page kinds on the wire: 1 data, 2 zero; `+ 0x100` marks a demand reply. The
//! destination ends the session with the request `page = u64::MAX`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ringfault_engine::bitmap::AtomicBitmap;
use ringfault_engine::stats::{cdf_points, histogram_points, LatencySummary, Timeline};
use ringfault_engine::sys::guest::{GuestMemory, RegionSpec};
use ringfault_engine::sys::install::{copy as copy_from, zero};
use ringfault_engine::sys::mapping::{AlignedBuf, MapOptions};
use ringfault_engine::sys::uffd::{
    Event as UffdEvent, Features, Installed, RegisterMode, Uffd, UffdMsg, UffdOptions,
};
use ringfault_engine::PeerAddr;

use super::cpu;
use super::events::{await_switch, await_verify, emit, Counts, DestDone, Event, Lat, Spec};
use super::phases::{params, progress_printer, source_phase, Finish};
use super::vm::{digests_parallel, page_offset, PAGE};
use super::workload::{Presence, Workload};

const KIND_DATA: u64 = 1;
const KIND_ZERO: u64 = 2;
const DEMAND: u64 = 0x100;
const END: u64 = u64::MAX;

fn word(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_le_bytes(w)
}

fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&b.to_le_bytes());
    out
}

/// The classic source.
pub fn source(spec: &Spec) -> anyhow::Result<()> {
    let m = spec.vm.build(2).context("building the source's memory")?;
    let addr = PeerAddr::parse(&spec.listen)?;
    let listener = addr
        .listen()
        .with_context(|| format!("listening on {addr}"))?;
    emit(&Event::Ready {
        addr: Some(listener.local_addr()?.to_string()),
    });
    source_phase(spec, m.clone())?;
    let cpu0 = cpu::process_ns();
    let stream = listener.accept().context("accepting the destination")?;
    let mut reader = stream.try_clone()?;
    let (tx, rx) = mpsc::channel::<u64>();
    std::thread::Builder::new()
        .name("classic-requests".into())
        .spawn(move || {
            let mut b = [0u8; 16];
            while reader.read_exact(&mut b).is_ok() {
                let p = word(&b, 0);
                if tx.send(p).is_err() || p == END {
                    return;
                }
            }
            let _ = tx.send(END);
        })?;
    let pages = spec.vm.pages();
    let mut out = BufWriter::with_capacity(64 << 10, stream);
    let mut buf = vec![0u8; PAGE];
    let mut c = Counts::default();
    let mut next = 0u64;
    let mut send = |page: u64, demand: bool, c: &mut Counts| -> anyhow::Result<()> {
        let off = page_offset(page)?;
        let flag = if demand { DEMAND } else { 0 };
        if m.regions()[0].is_zero(off, PAGE)? {
            out.write_all(&pair(page, KIND_ZERO | flag))?;
            c.zero_pages += 1;
            c.wire_bytes += 16;
        } else {
            m.regions()[0].read(off, &mut buf)?;
            out.write_all(&pair(page, KIND_DATA | flag))?;
            out.write_all(&buf)?;
            c.wire_bytes += 16 + PAGE as u64;
            if demand {
                c.demand_pages += 1;
            } else {
                c.bulk_pages += 1;
            }
        }
        if demand || page + 1 == pages {
            out.flush()?;
        }
        Ok(())
    };
    'session: loop {
        loop {
            match rx.try_recv() {
                Ok(END) | Err(mpsc::TryRecvError::Disconnected) => break 'session,
                Ok(p) if p < pages => {
                    c.faults += 1;
                    send(p, true, &mut c)?;
                }
                Ok(_) => anyhow::bail!("request for a page out of range"),
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if next < pages {
            send(next, false, &mut c)?;
            next += 1;
            continue;
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(END) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(p) if p < pages => {
                c.faults += 1;
                send(p, true, &mut c)?;
            }
            Ok(_) => anyhow::bail!("request for a page out of range"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let cpu_ns = cpu::process_ns() - cpu0;
    await_verify()?;
    let digests = digests_parallel(&*m, pages, &|_, _| {});
    emit(&Event::SourceDone {
        counts: c,
        cpu_ns,
        digests,
        scan_ms: None,
        stages: None,
        anon_huge_bytes: super::procfs::anon_huge_bytes(m.regions()[0].addr()),
        precopy: None,
    });
    Ok(())
}

/// The classic destination.
pub fn destination(spec: &Spec) -> anyhow::Result<()> {
    let len = usize::try_from(spec.vm.size)?;
    let pages = spec.vm.pages();
    let m = Arc::new(GuestMemory::anonymous(
        &[RegionSpec {
            id: 1,
            size: len,
            page_size: PAGE,
        }],
        MapOptions::default(),
    )?);
    super::workload::prepare(&params(spec, true));
    emit(&Event::Ready { addr: None });
    let addr = await_switch()?;
    let t_switch_rx_ns = cpu::wall_ns();
    let cpu0 = cpu::process_ns();
    let started = std::time::Instant::now();
    let stream = addr.connect(Duration::from_secs(10))?;
    let t_connected_ns = cpu::wall_ns();
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let uffd = Arc::new(Uffd::open(UffdOptions {
        nonblock: true,
        user_mode_only: false,
    })?);
    uffd.api(Features::NONE)?;
    uffd.register(
        m.regions()[0].addr(),
        m.regions()[0].len(),
        RegisterMode::Missing,
    )?;
    let present = Arc::new(AtomicBitmap::new(pages));
    let p = present.clone();
    let presence: Presence = Arc::new(move |page| p.is_set(page));
    let workload = Workload::start(params(spec, true), m.clone(), Some(presence))?;
    let t_resume_ns = cpu::wall_ns();
    emit(&Event::Resumed { t_ns: t_resume_ns });
    let done = Arc::new(AtomicBool::new(false));
    let p = present.clone();
    let printer = progress_printer(done.clone(), move || (p.count(), p.len()));
    let faults = Arc::new(AtomicU64::new(0));
    let fault_thread = {
        let (uffd, present, writer, done, faults, base) = (
            uffd.clone(),
            present.clone(),
            writer.clone(),
            done.clone(),
            faults.clone(),
            m.regions()[0].addr(),
        );
        std::thread::Builder::new()
            .name("classic-faults".into())
            .spawn(move || -> anyhow::Result<()> {
                let mut msgs = [UffdMsg::default(); 16];
                // Relaxed: a stop flag.
                while !done.load(Ordering::Relaxed) {
                    if !uffd.poll_readable(100)? {
                        continue;
                    }
                    let n = uffd.read_events(&mut msgs)?;
                    for msg in &msgs[..n] {
                        if let UffdEvent::PageFault { addr, .. } = msg.parse() {
                            let page = (usize::try_from(addr)? - base) / PAGE;
                            let page = u64::try_from(page)?;
                            // Relaxed: statistics only.
                            faults.fetch_add(1, Ordering::Relaxed);
                            if !present.is_set(page) {
                                let mut w = writer.lock().map_err(|_| {
                                    anyhow::anyhow!("the request writer is poisoned")
                                })?;
                                w.write_all(&pair(page, 0))?;
                            }
                        }
                    }
                }
                Ok(())
            })?
    };
    let mut c = Counts::default();
    let mut timeline = Timeline::new(started);
    let mut rx = BufReader::with_capacity(64 << 10, stream);
    let mut buf = AlignedBuf::new(PAGE)?;
    let mut hdr = [0u8; 16];
    let base = m.regions()[0].addr();
    let result = (|| -> anyhow::Result<()> {
        while !present.all_set() {
            rx.read_exact(&mut hdr).context("reading a page header")?;
            let (page, kind) = (word(&hdr, 0), word(&hdr, 1));
            anyhow::ensure!(page < pages, "page {page} out of range");
            let dst = base + page_offset(page)?;
            let mut bytes = 16u64;
            let outcome = if kind & 0xff == KIND_DATA {
                rx.read_exact(buf.as_mut_slice())
                    .context("reading a page")?;
                bytes += PAGE as u64;
                if kind & DEMAND != 0 {
                    c.demand_pages += 1;
                } else {
                    c.bulk_pages += 1;
                }
                loop {
                    match copy_from(&uffd, dst, buf.as_slice(), true)? {
                        Installed::Again { done: 0 } => continue,
                        o => break o,
                    }
                }
            } else {
                c.zero_pages += 1;
                loop {
                    match zero(&uffd, dst, PAGE, true)? {
                        Installed::Again { done: 0 } => continue,
                        o => break o,
                    }
                }
            };
            if outcome == Installed::Exists {
                c.duplicate_pages += 1;
            }
            present.set_range(page, 1);
            c.wire_bytes += bytes;
            timeline.record(bytes);
        }
        Ok(())
    })();
    let transfer_s = started.elapsed().as_secs_f64();
    if let Ok(mut w) = writer.lock() {
        let _ = w.write_all(&pair(END, 0));
    }
    result?;
    let fin = Finish { workload, cpu0 };
    let (t_all, cpu_ns, w, digests, anon_huge_bytes) = fin.complete(spec, &*m);
    done.store(true, Ordering::Relaxed);
    if let Some(h) = printer {
        let _ = h.join();
    }
    fault_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the fault thread panicked"))??;
    // Relaxed: read after join.
    c.faults = faults.load(Ordering::Relaxed);
    let fault = LatencySummary::of(&w.fault_hist);
    emit(&Event::DestDone(Box::new(DestDone {
        t_switch_rx_ns,
        t_resume_ns,
        t_all_present_ns: t_all,
        transfer_s,
        counts: c.clone(),
        service: None,
        service_cdf: Vec::new(),
        service_hist: Vec::new(),
        fault: Lat::from(&fault),
        fast_touches: w.fast_touches,
        t_connected_ns,
        fault_cdf: cdf_points(&w.fault_hist),
        fault_hist: histogram_points(&w.fault_hist),
        ops_steps: w.ops_steps,
        bytes_steps: timeline.samples().to_vec(),
        channel_bytes: vec![c.wire_bytes],
        cpu_ns,
        digests,
        stages: None,
        recv_in_flight_min: None,
        protection: "none".into(),
        cipher: String::new(),
        metadata_bytes: 0,
        anon_huge_bytes,
    })));
    Ok(())
}
