//! The sending half of a lane on the destination: demand requests and
//! control frames, sealed, gathered per loop turn and sent with one io_uring
//! `SEND` at a time (a socket never has two sends in flight, so their bytes
//! cannot interleave).

use std::os::fd::BorrowedFd;
use std::time::Instant;

use ringfault_proto::{encode_demand_frame, DemandEntry, Message, Sealer};

use crate::error::{EngineError, LaneId};
use crate::sys::ring::Ring;

/// Frames waiting to go out on one lane.
#[derive(Debug)]
pub struct Outbox {
    lane: LaneId,
    sealer: Sealer,
    token: u32,
    pending: Vec<u8>,
    spare: Vec<u8>,
    in_flight: bool,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Frames queued.
    pub frames: u64,
    /// When the last frame was queued.
    pub last_tx: Instant,
}

impl Outbox {
    /// An empty outbox whose sends carry `token`.
    pub fn new(lane: LaneId, sealer: Sealer, token: u32) -> Outbox {
        Outbox {
            lane,
            sealer,
            token,
            pending: Vec::with_capacity(4096),
            spare: Vec::with_capacity(4096),
            in_flight: false,
            sent_bytes: 0,
            frames: 0,
            last_tx: Instant::now(),
        }
    }

    /// The token of this lane's sends.
    pub fn token(&self) -> u32 {
        self.token
    }

    fn seal_from(&mut self, start: usize) -> Result<(), EngineError> {
        let lane = self.lane;
        let tag = self
            .sealer
            .seal(&self.pending[start..], &[])
            .map_err(|source| EngineError::Integrity { lane, source })?;
        if let Some(t) = tag {
            self.pending.extend_from_slice(&t);
        }
        self.frames += 1;
        self.last_tx = Instant::now();
        Ok(())
    }

    /// Queues one message (no page payload).
    pub fn push(&mut self, msg: &Message) -> Result<(), EngineError> {
        let start = self.pending.len();
        msg.encode(&mut self.pending);
        self.seal_from(start)
    }

    /// Queues a demand request for `entries` (split into frames of at most
    /// `MAX_DEMAND_ENTRIES`).
    pub fn push_demand(
        &mut self,
        request_id: u64,
        entries: &[DemandEntry],
    ) -> Result<(), EngineError> {
        for chunk in entries.chunks(ringfault_proto::MAX_DEMAND_ENTRIES) {
            let start = self.pending.len();
            encode_demand_frame(request_id, chunk, &mut self.pending);
            self.seal_from(start)?;
        }
        Ok(())
    }

    /// Sends what is queued, unless a send is in flight (then it goes when
    /// that one completes).
    pub fn flush(&mut self, ring: &mut Ring, fd: BorrowedFd<'_>) -> Result<(), EngineError> {
        if self.in_flight || self.pending.is_empty() {
            return Ok(());
        }
        let mut next = std::mem::take(&mut self.spare);
        next.clear();
        let buf = std::mem::replace(&mut self.pending, next);
        self.sent_bytes += buf.len() as u64;
        ring.send(fd, buf, self.token)?;
        self.in_flight = true;
        Ok(())
    }

    /// Sends what is queued at once, without the ring and without blocking,
    /// unless a ring send is in flight (the bytes would interleave): for the
    /// `Error` frame that goes out just before the lane is closed. Best
    /// effort; what does not fit in the socket buffer is dropped.
    pub fn send_now(&mut self, sock: &crate::addr::Stream) {
        if self.in_flight || self.pending.is_empty() {
            return;
        }
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        if let Ok(n) = rustix::net::send(sock, &self.pending, flags) {
            self.sent_bytes += n as u64;
        }
        self.pending.clear();
    }

    /// A send of this outbox completed.
    pub fn on_sent(
        &mut self,
        result: &std::io::Result<usize>,
        buf: Vec<u8>,
    ) -> Result<(), EngineError> {
        self.in_flight = false;
        self.spare = buf;
        match result {
            Ok(_) => Ok(()),
            Err(e) if crate::error::link_lost(e) => {
                Err(EngineError::ConnectionLost { lane: self.lane })
            }
            Err(e) => Err(EngineError::io(
                format!("sending on the {}", self.lane),
                crate::error::copy_io(e),
            )),
        }
    }

    /// Whether everything queued has been sent.
    pub fn idle(&self) -> bool {
        !self.in_flight && self.pending.is_empty()
    }
}
