//! A thin io_uring wrapper over the `io-uring` crate, and the start-up probe
//! of every opcode the engine uses.
//!
//! # Mechanism
//!
//! [`Ring`] owns one `io_uring` instance, set up for one submitting thread
//! (`SINGLE_ISSUER`) whose task work runs when that thread next enters or
//! leaves the kernel (`COOP_TASKRUN`), so completions never interrupt it
//! with an inter-processor interrupt. A ring made by [`Ring::deferred`]
//! defers that work further (`DEFER_TASKRUN`, 6.1): completions, and the
//! receive copies they carry, run only when its thread asks for them (the
//! kernel flags pending work, `TASKRUN_FLAG`, and every [`Ring::submit`] and
//! [`Ring::submit_and_wait`] then asks), in one batch
//! right before it reads the data, instead of at whatever system call the
//! thread makes next. [`Ring::push`] queues a submission
//! entry; [`Ring::submit_and_wait`] enters the kernel once per loop turn;
//! [`Ring::completions`] drains the completion queue. The engine keys
//! operations by `user_data` and owns every buffer an operation targets until
//! its completion is seen: the wrapper hides no buffer ownership, which is
//! why `push` is `unsafe`.
//!
//! [`Opcodes::probe`] asks the kernel which opcodes exist
//! (`IORING_REGISTER_PROBE`) and [`Opcodes::require_engine`] turns a missing
//! one into [`RingError::Unsupported`] naming it and the kernel version that
//! brought it. The environment variable `RINGFAULT_HIDE_OPCODES` (a comma
//! list such as `RECV,READ_MULTISHOT`) makes the probe report those as
//! missing: a test hook for the error path, documented in `docs/tuning.md`.
//!
//! # Kernel versions
//!
//! * 5.1: io_uring, `NOP`, `POLL_ADD`. 5.4: `TIMEOUT`. 5.5: `ASYNC_CANCEL`.
//! * 5.6: `READ`, `SEND`, `RECV`, `SENDMSG`, and the probe itself.
//! * 5.11: timed waits (`EXT_ARG`). 5.19: provided-buffer rings.
//! * 6.0: multishot `RECV`, `SINGLE_ISSUER`, `SEND_ZC`. 6.1: `SENDMSG_ZC`.
//! * 6.7: `READ_MULTISHOT`. 6.12: incrementally consumed buffer rings.
//!
//! # Hazards
//!
//! * Every buffer, iovec, and fd an entry names must stay valid until its
//!   completion has been reaped, even if the `Ring` is dropped first.
//! * If the completion queue overflows, the kernel (`FEAT_NODROP`) keeps the
//!   excess and `submit` may return `EBUSY` until completions are drained:
//!   the loops here drain every turn.
//! * Several receives in flight on one stream socket may complete out of
//!   order; the engine therefore receives with one multishot request per
//!   socket, into a provided-buffer ring (`sys::bufring`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::bufring::{SlotRing, StreamError, StreamRing};
use super::guest::GuestMemory;
use super::install::Landing;

/// Errors from the ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// `io_uring_setup` failed.
    #[error("io_uring_setup with {entries} entries failed")]
    Setup {
        /// Entries asked for.
        entries: u32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `io_uring_register` failed.
    #[error("io_uring_register({what}) failed")]
    Register {
        /// What was being registered.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `io_uring_enter` failed.
    #[error("io_uring_enter failed")]
    Submit {
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The submission queue stayed full after a submit.
    #[error("submission queue full ({entries} entries) after submitting")]
    Full {
        /// The queue's size.
        entries: u32,
    },
    /// A stream ring's accounting broke (a kernel or engine bug).
    #[error("receive ring out of step")]
    Stream(#[source] StreamError),
    /// A send named bytes outside its buffer or its guest memory.
    #[error("a vectored send named a range outside its buffers")]
    BadPiece,
    /// The kernel lacks an opcode or feature.
    #[error("unsupported: io_uring {opcode} needs {needs}")]
    Unsupported {
        /// The opcode or feature, e.g. "READ_MULTISHOT".
        opcode: &'static str,
        /// The kernel version that brought it.
        needs: &'static str,
    },
}

/// One completion, with its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The entry's `user_data`.
    pub user_data: u64,
    /// Result: bytes or a value on success, `-errno` on failure.
    pub result: i32,
    /// `IORING_CQE_F_*`.
    pub flags: u32,
}

/// `IORING_CQE_F_BUF_MORE`: an incrementally consumed buffer has room left.
const CQE_F_BUF_MORE: u32 = 1 << 4;

impl Completion {
    /// `IORING_CQE_F_MORE`: more completions follow for this (multishot) entry.
    pub fn more(&self) -> bool {
        io_uring::cqueue::more(self.flags)
    }
    /// `IORING_CQE_F_NOTIF`: a zero-copy send's buffer notification.
    pub fn notif(&self) -> bool {
        io_uring::cqueue::notif(self.flags)
    }
    /// The provided buffer the kernel picked, if any.
    pub fn buffer(&self) -> Option<u16> {
        io_uring::cqueue::buffer_select(self.flags)
    }
    /// `IORING_CQE_F_BUF_MORE`: the (incrementally consumed) buffer is not full.
    pub fn buffer_more(&self) -> bool {
        self.flags & CQE_F_BUF_MORE != 0
    }
    /// The result as a byte count, or the error.
    pub fn bytes(&self) -> io::Result<usize> {
        usize::try_from(self.result).map_err(|_| io::Error::from_raw_os_error(-self.result))
    }
}

/// A stream ring added to a [`Ring`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(usize);

/// A slot ring added to a [`Ring`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotsId(usize);

/// One part of a vectored send.
#[derive(Debug, Clone, Copy)]
pub enum Piece {
    /// Bytes `start..end` of the send's own buffer.
    Own {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
    /// `len` bytes at `offset` of guest region `region` (by index), straight
    /// from guest memory.
    Guest {
        /// Region index in the [`GuestMemory`].
        region: usize,
        /// Byte offset in the region.
        offset: usize,
        /// Bytes.
        len: usize,
    },
}

/// A `msghdr` and its iovecs, owned by an in-flight send.
struct MsgHdr(#[allow(dead_code)] Box<libc::msghdr>);

// SAFETY: the msghdr only points into buffers owned by the same op record
// (its iovec vector, its byte buffer, and guest memory kept alive by the
// record's `Arc`), which move with it; it is never shared between threads.
unsafe impl Send for MsgHdr {}

/// What an in-flight operation owns until its last completion.
enum OpRecord {
    Recv {
        stream: usize,
        token: u32,
    },
    Read {
        slots: usize,
        token: u32,
    },
    Poll {
        token: u32,
    },
    Send {
        buf: Vec<u8>,
        token: u32,
    },
    SendV {
        buf: Vec<u8>,
        _iovs: Vec<libc::iovec>,
        _msg: MsgHdr,
        _keep: Option<Arc<GuestMemory>>,
        token: u32,
    },
    RecvInto {
        land: Landing,
        token: u32,
    },
    Cancel,
}

// SAFETY: the iovecs in `SendV` point into the record's own buffer and into
// guest memory kept alive by `_keep`; moving the record to another thread
// moves what they point to (heap) along with the owner, and no thread but the
// ring's owner touches them.
unsafe impl Send for OpRecord {}

/// What a completion means, for the engine.
#[derive(Debug)]
pub enum Event {
    /// Bytes were appended to a stream ring.
    Received {
        /// The engine's token of the receive.
        token: u32,
        /// Which stream.
        stream: StreamId,
        /// Bytes appended.
        bytes: usize,
    },
    /// A multishot receive ended: `Ok(true)` at end of stream, `Ok(false)`
    /// when the kernel stopped it (re-arm), `ENOBUFS` when the ring was full
    /// (re-arm after consuming), another error otherwise.
    ReceiveEnded {
        /// The engine's token.
        token: u32,
        /// Which stream.
        stream: StreamId,
        /// Why.
        result: io::Result<bool>,
    },
    /// A slot was filled.
    Slot {
        /// The engine's token.
        token: u32,
        /// Which slot ring.
        slots: SlotsId,
        /// The slot.
        bid: u16,
        /// Bytes in it.
        len: usize,
    },
    /// A multishot read ended.
    ReadEnded {
        /// The engine's token.
        token: u32,
        /// Which slot ring.
        slots: SlotsId,
        /// Why.
        result: io::Result<()>,
    },
    /// A polled descriptor is ready (`Ok(true)`), or the multishot poll ended
    /// (`Ok(false)`: re-arm) or failed.
    Polled {
        /// The engine's token.
        token: u32,
        /// Ready, ended, or the error.
        result: io::Result<bool>,
    },
    /// A receive into a landing ([`Ring::recv_into`]) finished: the bytes
    /// received (fewer than asked only at the end of the stream), or the
    /// error; the landing comes back.
    Landed {
        /// The engine's token.
        token: u32,
        /// Bytes received, or the error (`ECANCELED` when a linked receive
        /// before it ended short).
        result: io::Result<usize>,
        /// The landing.
        land: Landing,
    },
    /// A send completed; its buffer comes back for reuse.
    Sent {
        /// The engine's token.
        token: u32,
        /// Bytes sent, or the error.
        result: io::Result<usize>,
        /// The send's buffer.
        buf: Vec<u8>,
    },
}

impl Event {
    /// The engine's token of the operation the event is about.
    pub fn token(&self) -> u32 {
        match self {
            Event::Received { token, .. }
            | Event::ReceiveEnded { token, .. }
            | Event::Slot { token, .. }
            | Event::ReadEnded { token, .. }
            | Event::Polled { token, .. }
            | Event::Landed { token, .. }
            | Event::Sent { token, .. } => *token,
        }
    }
}

/// An io_uring instance for one thread, owning everything its in-flight
/// operations reference.
pub struct Ring {
    ring: IoUring,
    entries: u32,
    streams: Vec<StreamRing>,
    slot_rings: Vec<SlotRing>,
    ops: Vec<Option<OpRecord>>,
    free: Vec<usize>,
    in_flight: usize,
    next_group: u16,
    cqes: Vec<Completion>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("sq_entries", &self.ring.params().sq_entries())
            .field("cq_entries", &self.ring.params().cq_entries())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// `msg_flags` of every send: all bytes or an error (io_uring retries short
/// sends on stream sockets), and no `SIGPIPE`.
const SEND_FLAGS: i32 = libc::MSG_WAITALL | libc::MSG_NOSIGNAL;

impl Ring {
    /// Creates a ring with `entries` submission entries (a power of two; the
    /// completion queue is eight times that, so multishot receives rarely
    /// overflow it), for use by the calling thread only (`SINGLE_ISSUER`:
    /// create it on the thread that uses it).
    pub fn new(entries: u32) -> Result<Ring, RingError> {
        Ring::build(entries, false)
    }

    /// [`Ring::new`], with completions deferred to the moments the calling
    /// thread enters the ring (`DEFER_TASKRUN`; a plain ring on kernels
    /// before 6.1). For a thread whose every wait is on this ring, and that
    /// reads what its receives bring right after: the destination's bulk
    /// worker, whose multishot receives then copy a batch of segments just
    /// before it verifies and installs them, while they are in cache
    /// (`DEFER_TASKRUN` against `COOP_TASKRUN` in the same invocation,
    /// defaults: destination CPU per bulk page 2.6 against 2.9 µs, CPU-s per
    /// GiB both ends 1.16 and 1.09 against 1.26 and 1.14; design.md).
    pub fn deferred(entries: u32) -> Result<Ring, RingError> {
        Ring::build(entries, true)
    }

    fn build(entries: u32, defer: bool) -> Result<Ring, RingError> {
        let mut b = IoUring::builder();
        b.setup_cqsize(entries.saturating_mul(8))
            .setup_single_issuer()
            .setup_coop_taskrun()
            // Deferred rings rely on it: the kernel flags pending work and
            // the `io-uring` crate then enters with `GETEVENTS` even when not
            // waiting, which is what runs deferred completions.
            .setup_taskrun_flag();
        let built = if defer {
            let mut d = b.clone();
            d.setup_defer_taskrun();
            // Before 6.1: the same ring without deferral.
            d.build(entries).or_else(|_| b.build(entries))
        } else {
            b.build(entries)
        };
        let ring = built
            .or_else(|_| IoUring::new(entries))
            .map_err(|source| RingError::Setup { entries, source })?;
        Ok(Ring {
            ring,
            entries,
            streams: Vec::new(),
            slot_rings: Vec::new(),
            ops: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            next_group: 1,
            cqes: Vec::with_capacity(256),
        })
    }

    /// Operations submitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn record(&mut self, op: OpRecord) -> u64 {
        self.in_flight += 1;
        match self.free.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i as u64
            }
            None => {
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u64
            }
        }
    }

    fn forget_record(&mut self, ud: u64) -> Option<OpRecord> {
        let i = usize::try_from(ud).ok()?;
        let op = self.ops.get_mut(i)?.take()?;
        self.free.push(i);
        self.in_flight -= 1;
        Some(op)
    }

    /// Queues one entry whose `user_data` is set, submitting first if full.
    ///
    /// # Safety
    /// Every buffer, iovec array, `msghdr` and descriptor the entry names must
    /// stay valid until the entry's last completion has been reaped: here,
    /// they are owned by the entry's [`OpRecord`] or by a buffer ring in `self`.
    unsafe fn push(&mut self, entry: squeue::Entry) -> Result<(), RingError> {
        // SAFETY: forwarded from this function's contract.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        self.submit()?;
        // SAFETY: as above.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| RingError::Full {
            entries: self.entries,
        })
    }

    /// Adds a stream ring (registered as a new buffer group, every segment posted).
    pub fn add_stream(&mut self, mut stream: StreamRing) -> Result<StreamId, RingError> {
        let group = self.next_group;
        // SAFETY: the descriptor array and the segments belong to `stream`,
        // which `self` owns from here on and drops only after draining every
        // operation (see `Drop`).
        unsafe {
            self.register_buffer_ring(stream.desc.addr(), stream.desc.entries(), group, true)?;
        }
        self.next_group += 1;
        stream.group = group;
        stream.post_all();
        self.streams.push(stream);
        Ok(StreamId(self.streams.len() - 1))
    }

    /// Adds a slot ring (a new buffer group, every slot posted).
    pub fn add_slots(&mut self, mut slots: SlotRing) -> Result<SlotsId, RingError> {
        let group = self.next_group;
        // SAFETY: as for `add_stream`.
        unsafe {
            self.register_buffer_ring(slots.desc.addr(), slots.desc.entries(), group, false)?;
        }
        self.next_group += 1;
        slots.group = group;
        slots.post_all();
        self.slot_rings.push(slots);
        Ok(SlotsId(self.slot_rings.len() - 1))
    }

    /// A stream ring.
    pub fn stream(&self, id: StreamId) -> &StreamRing {
        &self.streams[id.0]
    }

    /// A stream ring, mutably (to consume).
    pub fn stream_mut(&mut self, id: StreamId) -> &mut StreamRing {
        &mut self.streams[id.0]
    }

    /// A slot ring.
    pub fn slots(&self, id: SlotsId) -> &SlotRing {
        &self.slot_rings[id.0]
    }

    /// A slot ring, mutably (to recycle).
    pub fn slots_mut(&mut self, id: SlotsId) -> &mut SlotRing {
        &mut self.slot_rings[id.0]
    }

    /// Arms a multishot receive of `fd` into stream ring `stream`.
    pub fn recv_multishot(
        &mut self,
        fd: BorrowedFd<'_>,
        stream: StreamId,
        token: u32,
    ) -> Result<(), RingError> {
        let group = self.streams[stream.0].group;
        let ud = self.record(OpRecord::Recv {
            stream: stream.0,
            token,
        });
        let e = opcode::RecvMulti::new(types::Fd(fd.as_raw_fd()), group)
            .build()
            .user_data(ud);
        // SAFETY: the receive writes only into buffers of group `group`, which
        // belong to a stream ring owned by `self`; the kernel holds its own
        // reference to the socket for the life of the request.
        unsafe { self.push(e) }
    }

    /// Receives up to `len` bytes of `fd` into `land` from byte `offset`;
    /// with `all`, exactly `len` (`MSG_WAITALL`: the kernel retries short
    /// receives; fewer bytes only at the end of the stream or on an error).
    /// The ring owns `land` until the receive ends ([`Event::Landed`] gives
    /// it back). `link`: the next entry queued starts only once this one has
    /// completed in full, so two receives of one stream, queued together,
    /// fill their buffers in order.
    #[allow(clippy::too_many_arguments)]
    pub fn recv_into(
        &mut self,
        fd: BorrowedFd<'_>,
        mut land: Landing,
        offset: usize,
        len: usize,
        token: u32,
        all: bool,
        link: bool,
    ) -> Result<(), RingError> {
        let n = u32::try_from(len)
            .ok()
            .filter(|_| offset.checked_add(len).is_some_and(|end| end <= land.len()));
        let Some(n) = n else {
            return Err(RingError::Submit {
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a receive of {len} bytes at {offset} into a landing of {}",
                        land.len()
                    ),
                ),
            });
        };
        // In bounds (checked above).
        let ptr = land.as_mut_ptr().wrapping_add(offset);
        let ud = self.record(OpRecord::RecvInto { land, token });
        let mut e = opcode::Recv::new(types::Fd(fd.as_raw_fd()), ptr, n)
            .flags(if all { libc::MSG_WAITALL } else { 0 })
            .build()
            .user_data(ud);
        if link {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        // SAFETY: `land` moved into the op record: its mapping (what `ptr`
        // points into, `len` bytes in bounds) stays mapped and unread by safe
        // code until the completion is reaped and gives it back.
        unsafe { self.push(e) }
    }

    /// Arms a multishot read of `fd` into slot ring `slots`.
    pub fn read_multishot(
        &mut self,
        fd: BorrowedFd<'_>,
        slots: SlotsId,
        token: u32,
    ) -> Result<(), RingError> {
        let group = self.slot_rings[slots.0].group;
        let ud = self.record(OpRecord::Read {
            slots: slots.0,
            token,
        });
        let e = opcode::ReadMulti::new(types::Fd(fd.as_raw_fd()), 0, group)
            .build()
            .user_data(ud);
        // SAFETY: as for `recv_multishot`, with a slot ring.
        unsafe { self.push(e) }
    }

    /// Arms a multishot poll for readability of `fd`.
    pub fn poll_multishot(&mut self, fd: BorrowedFd<'_>, token: u32) -> Result<(), RingError> {
        let ud = self.record(OpRecord::Poll { token });
        let e = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(ud);
        // SAFETY: a poll references no memory; the kernel holds its own
        // reference to the file for the life of the request.
        unsafe { self.push(e) }
    }

    /// Sends all of `buf`.
    pub fn send(&mut self, fd: BorrowedFd<'_>, buf: Vec<u8>, token: u32) -> Result<(), RingError> {
        let (ptr, len) = (buf.as_ptr(), u32::try_from(buf.len()).unwrap_or(u32::MAX));
        let ud = self.record(OpRecord::Send { buf, token });
        let e = opcode::Send::new(types::Fd(fd.as_raw_fd()), ptr, len)
            .flags(SEND_FLAGS)
            .build()
            .user_data(ud);
        // SAFETY: `buf` moved into the op record; its heap block (what `ptr`
        // points to) does not move and lives until the completion is reaped.
        unsafe { self.push(e) }
    }

    /// Sends `pieces` in order with one `sendmsg`: parts of `buf` and ranges of
    /// `mem` (guest memory, not copied: the record keeps `mem` alive).
    pub fn send_vectored(
        &mut self,
        fd: BorrowedFd<'_>,
        mem: Option<&Arc<GuestMemory>>,
        buf: Vec<u8>,
        pieces: &[Piece],
        token: u32,
    ) -> Result<(), RingError> {
        let mut iovs = Vec::with_capacity(pieces.len());
        for p in pieces {
            match *p {
                Piece::Own { start, end } => {
                    let bytes = buf.get(start..end).ok_or(RingError::BadPiece)?;
                    iovs.push(libc::iovec {
                        iov_base: bytes.as_ptr() as *mut libc::c_void,
                        iov_len: bytes.len(),
                    });
                }
                Piece::Guest {
                    region,
                    offset,
                    len,
                } => {
                    let m = mem.ok_or(RingError::BadPiece)?;
                    let r = m.region(region).ok_or(RingError::BadPiece)?;
                    let s = r.slice(offset, len).map_err(|_| RingError::BadPiece)?;
                    iovs.push(s.iovec());
                }
            }
        }
        let mut msg: Box<libc::msghdr> = Box::new(
            // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
            unsafe { std::mem::zeroed() },
        );
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = iovs.len();
        let msg_ptr: *const libc::msghdr = &*msg;
        let ud = self.record(OpRecord::SendV {
            buf,
            _iovs: iovs,
            _msg: MsgHdr(msg),
            _keep: mem.cloned(),
            token,
        });
        let e = opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), msg_ptr)
            .flags(SEND_FLAGS as u32)
            .build()
            .user_data(ud);
        // SAFETY: the msghdr, its iovec array and the byte buffer moved into
        // the op record (heap blocks, which do not move); the guest ranges were
        // bounds-checked against `mem`, whose `Arc` the record holds, so they
        // stay mapped until the completion is reaped.
        unsafe { self.push(e) }
    }

    /// Asks the kernel to cancel every operation in flight.
    pub fn cancel_all(&mut self) -> Result<(), RingError> {
        if self.in_flight == 0 {
            return Ok(());
        }
        let ud = self.record(OpRecord::Cancel);
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(ud);
        // SAFETY: a cancel request references no memory.
        unsafe { self.push(e) }?;
        self.submit().map(drop)
    }

    /// Submits queued entries without waiting.
    pub fn submit(&mut self) -> Result<usize, RingError> {
        self.enter(0, None)
    }

    /// Submits queued entries and waits until one completion is ready or
    /// `timeout` passed.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> Result<usize, RingError> {
        self.enter(1, timeout)
    }

    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> Result<usize, RingError> {
        loop {
            let r = match timeout {
                Some(t) if want > 0 => {
                    let ts = types::Timespec::from(t);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(want, &args)
                }
                _ => self.ring.submitter().submit_and_wait(want),
            };
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Completions must be drained first; the caller's loop does.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(0),
                Err(source) => return Err(RingError::Submit { source }),
            }
        }
    }

    /// Whether completions are ready, without entering the kernel.
    pub fn has_completions(&mut self) -> bool {
        let mut cq = self.ring.completion();
        cq.sync();
        !cq.is_empty()
    }

    /// Turns every ready completion into [`Event`]s (stream rings are
    /// advanced; finished operations release what they owned).
    pub fn events(&mut self, out: &mut Vec<Event>) -> Result<(), RingError> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        {
            let mut cq = self.ring.completion();
            cq.sync();
            for c in cq {
                cqes.push(Completion {
                    user_data: c.user_data(),
                    result: c.result(),
                    flags: c.flags(),
                });
            }
        }
        for c in &cqes {
            self.dispatch(c, out)?;
        }
        self.cqes = cqes;
        Ok(())
    }

    fn dispatch(&mut self, c: &Completion, out: &mut Vec<Event>) -> Result<(), RingError> {
        let Some(Some(op)) = usize::try_from(c.user_data)
            .ok()
            .and_then(|i| self.ops.get(i))
        else {
            return Ok(());
        };
        let finished = !c.more();
        match *op {
            OpRecord::Recv { stream, token } => {
                let sid = StreamId(stream);
                if c.result > 0 {
                    let n = usize::try_from(c.result).unwrap_or(0);
                    self.streams[stream]
                        .on_receive(c.buffer(), n, c.buffer_more())
                        .map_err(RingError::Stream)?;
                    out.push(Event::Received {
                        token,
                        stream: sid,
                        bytes: n,
                    });
                }
                if finished || c.result <= 0 {
                    let result = match c.result {
                        0 => Ok(true),
                        r if r > 0 => Ok(false),
                        r => Err(io::Error::from_raw_os_error(-r)),
                    };
                    if finished {
                        self.forget_record(c.user_data);
                    }
                    out.push(Event::ReceiveEnded {
                        token,
                        stream: sid,
                        result,
                    });
                }
            }
            OpRecord::Read { slots, token } => {
                let sid = SlotsId(slots);
                if c.result > 0 {
                    if let Some(bid) = c.buffer() {
                        out.push(Event::Slot {
                            token,
                            slots: sid,
                            bid,
                            len: usize::try_from(c.result).unwrap_or(0),
                        });
                    }
                }
                if finished {
                    self.forget_record(c.user_data);
                    let result = match c.result {
                        r if r >= 0 => Ok(()),
                        r => Err(io::Error::from_raw_os_error(-r)),
                    };
                    out.push(Event::ReadEnded {
                        token,
                        slots: sid,
                        result,
                    });
                }
            }
            OpRecord::Poll { token } => {
                let result = if c.result < 0 {
                    Err(io::Error::from_raw_os_error(-c.result))
                } else {
                    Ok(!finished)
                };
                if finished {
                    self.forget_record(c.user_data);
                }
                out.push(Event::Polled { token, result });
            }
            OpRecord::RecvInto { .. } => {
                if let Some(OpRecord::RecvInto { land, token }) = self.forget_record(c.user_data) {
                    out.push(Event::Landed {
                        token,
                        result: c.bytes(),
                        land,
                    });
                }
            }
            OpRecord::Send { .. } | OpRecord::SendV { .. } | OpRecord::Cancel => {
                if !finished {
                    return Ok(());
                }
                match self.forget_record(c.user_data) {
                    Some(OpRecord::Send { buf, token })
                    | Some(OpRecord::SendV { buf, token, .. }) => {
                        out.push(Event::Sent {
                            token,
                            result: c.bytes(),
                            buf,
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Registers a provided-buffer ring.
    ///
    /// # Safety
    /// `addr` must point to `entries` page-aligned `io_uring_buf` descriptors
    /// that stay mapped until the ring is dropped, and every buffer they name
    /// must stay valid and unused by anyone but the kernel while posted.
    unsafe fn register_buffer_ring(
        &mut self,
        addr: u64,
        entries: u16,
        group: u16,
        incremental: bool,
    ) -> Result<(), RingError> {
        const IOU_PBUF_RING_INC: u16 = 2;
        let flags = if incremental { IOU_PBUF_RING_INC } else { 0 };
        // SAFETY: forwarded from this function's contract.
        unsafe {
            self.ring
                .submitter()
                .register_buf_ring_with_flags(addr, entries, group, flags)
        }
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EINVAL) if incremental => RingError::Unsupported {
                opcode: "incrementally consumed buffer rings (IOU_PBUF_RING_INC)",
                needs: "Linux 6.12",
            },
            _ => RingError::Register {
                what: "PBUF_RING",
                source,
            },
        })
    }

    /// The kernel's opcode probe for this ring.
    pub fn opcodes(&self) -> Opcodes {
        let mut probe = Probe::new();
        if self.ring.submitter().register_probe(&mut probe).is_err() {
            return Opcodes::default();
        }
        Opcodes::from_probe(&probe)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Nothing the kernel may still write may be freed: cancel, then reap
        // until every operation finished (bounded; on timeout the buffers are
        // leaked rather than freed under the kernel).
        if self.in_flight == 0 {
            return;
        }
        let _ = self.cancel_all();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut sink = Vec::new();
        while self.in_flight > 0 && std::time::Instant::now() < deadline {
            if self.enter(1, Some(Duration::from_millis(50))).is_err() {
                break;
            }
            sink.clear();
            if self.events(&mut sink).is_err() {
                break;
            }
        }
        if self.in_flight > 0 {
            tracing::error!(
                "{} io_uring operations did not finish; leaking their buffers",
                self.in_flight
            );
            std::mem::forget(std::mem::take(&mut self.streams));
            std::mem::forget(std::mem::take(&mut self.slot_rings));
            std::mem::forget(std::mem::take(&mut self.ops));
        }
    }
}

/// An opcode the engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `NOP` (5.1).
    Nop,
    /// `POLL_ADD` (5.1).
    PollAdd,
    /// `TIMEOUT` (5.4).
    Timeout,
    /// `ASYNC_CANCEL` (5.5).
    AsyncCancel,
    /// `READ` (5.6).
    Read,
    /// `SENDMSG` (5.3).
    SendMsg,
    /// `SEND` (5.6).
    Send,
    /// `RECV` (5.6; multishot 6.0).
    Recv,
    /// `SENDMSG_ZC` (6.1).
    SendMsgZc,
    /// `READ_MULTISHOT` (6.7).
    ReadMultishot,
}

impl Op {
    /// Every opcode, with its name and the kernel version that brought it.
    pub const ALL: [(Op, &'static str, &'static str); 10] = [
        (Op::Nop, "NOP", "Linux 5.1"),
        (Op::PollAdd, "POLL_ADD", "Linux 5.1"),
        (Op::Timeout, "TIMEOUT", "Linux 5.4"),
        (Op::AsyncCancel, "ASYNC_CANCEL", "Linux 5.5"),
        (Op::Read, "READ", "Linux 5.6"),
        (Op::SendMsg, "SENDMSG", "Linux 5.3"),
        (Op::Send, "SEND", "Linux 5.6"),
        (Op::Recv, "RECV", "Linux 5.6 (multishot: 6.0)"),
        (Op::SendMsgZc, "SENDMSG_ZC", "Linux 6.1"),
        (Op::ReadMultishot, "READ_MULTISHOT", "Linux 6.7"),
    ];

    /// The opcodes every destination and source ring needs.
    pub const ENGINE: [Op; 6] = [
        Op::Nop,
        Op::Read,
        Op::SendMsg,
        Op::Send,
        Op::Recv,
        Op::ReadMultishot,
    ];

    fn code(self) -> u8 {
        match self {
            Op::Nop => opcode::Nop::CODE,
            Op::PollAdd => opcode::PollAdd::CODE,
            Op::Timeout => opcode::Timeout::CODE,
            Op::AsyncCancel => opcode::AsyncCancel::CODE,
            Op::Read => opcode::Read::CODE,
            Op::SendMsg => opcode::SendMsg::CODE,
            Op::Send => opcode::Send::CODE,
            Op::Recv => opcode::Recv::CODE,
            Op::SendMsgZc => opcode::SendMsgZc::CODE,
            Op::ReadMultishot => opcode::ReadMulti::CODE,
        }
    }

    /// The opcode's name.
    pub fn name(self) -> &'static str {
        Op::ALL
            .iter()
            .find(|(o, _, _)| *o == self)
            .map_or("?", |&(_, n, _)| n)
    }

    fn needs(self) -> &'static str {
        Op::ALL
            .iter()
            .find(|(o, _, _)| *o == self)
            .map_or("?", |&(_, _, v)| v)
    }
}

/// The opcodes this kernel supports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opcodes {
    supported: Vec<Op>,
}

/// The test hook: opcodes to report as missing.
pub const HIDE_OPCODES_ENV: &str = "RINGFAULT_HIDE_OPCODES";

impl Opcodes {
    fn from_probe(p: &Probe) -> Opcodes {
        let hidden = std::env::var(HIDE_OPCODES_ENV).unwrap_or_default();
        let hidden: Vec<&str> = hidden.split(',').map(str::trim).collect();
        Opcodes {
            supported: Op::ALL
                .iter()
                .filter(|(op, name, _)| p.is_supported(op.code()) && !hidden.contains(name))
                .map(|&(op, _, _)| op)
                .collect(),
        }
    }

    /// Probes with a throwaway ring.
    pub fn probe() -> Result<Opcodes, RingError> {
        Ok(Ring::new(2)?.opcodes())
    }

    /// Whether `op` is supported.
    pub fn has(&self, op: Op) -> bool {
        self.supported.contains(&op)
    }

    /// Typed error naming the first of `ops` that is missing.
    pub fn require(&self, ops: &[Op]) -> Result<(), RingError> {
        match ops.iter().find(|op| !self.has(**op)) {
            None => Ok(()),
            Some(op) => Err(RingError::Unsupported {
                opcode: op.name(),
                needs: op.needs(),
            }),
        }
    }

    /// Probes and checks every opcode the engine's rings use
    /// ([`Op::ENGINE`]).
    pub fn require_engine() -> Result<Opcodes, RingError> {
        let o = Opcodes::probe()?;
        o.require(&Op::ENGINE)?;
        Ok(o)
    }
}
