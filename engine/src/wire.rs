//! Framed, blocking message I/O on a [`Stream`]: the handshake and the
//! control path (resume, completion, errors). The page hot paths parse
//! frames where they land in their receive rings; see `destination::inbound`.
//!
//! Handshake frames travel bare; every frame after travels sealed
//! ([`Framed`]): header, body, then the tag ([`ringfault_proto::seal`]).

use std::io::{Read, Write};

use ringfault_proto::{
    ErrorCode, ErrorFrame, FrameHeader, Message, Opener, Sealer, FRAME_HEADER_LEN,
};

use crate::addr::Stream;
use crate::error::{EngineError, LaneId};

/// Writes one bare message (handshake only).
pub fn send_bare(stream: &mut Stream, msg: &Message) -> Result<(), EngineError> {
    let out = msg.to_vec();
    stream
        .write_all(&out)
        .map_err(|e| EngineError::io(format!("sending {:?} to {}", msg.kind(), stream.peer()), e))
}

/// Reads one bare message (handshake only). An `Error` frame from the peer
/// becomes [`EngineError::Peer`].
pub fn recv_bare(stream: &mut Stream, lane: LaneId) -> Result<Message, EngineError> {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    read_exact(stream, &mut hdr, lane)?;
    let header = FrameHeader::parse(&hdr).map_err(|source| EngineError::Decode { lane, source })?;
    let mut body = vec![0u8; header.body_len_usize()];
    read_exact(stream, &mut body, lane)?;
    match Message::decode(&header, &body).map_err(|source| EngineError::Decode { lane, source })? {
        Message::Error(e) => Err(peer_error(e)),
        m => Ok(m),
    }
}

/// Tells the peer why we stop, bare (before keys exist), best effort.
pub fn send_bare_error(stream: &mut Stream, code: ErrorCode, message: impl Into<String>) {
    let _ = send_bare(stream, &Message::Error(ErrorFrame::new(code, message)));
}

/// Turns a peer's error frame into our error.
pub fn peer_error(e: ErrorFrame) -> EngineError {
    EngineError::Peer {
        code: e.code,
        message: e.message,
    }
}

fn read_exact(stream: &mut Stream, buf: &mut [u8], lane: LaneId) -> Result<(), EngineError> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            EngineError::ConnectionLost { lane }
        }
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => EngineError::io(
            format!(
                "the peer {} did not answer in time on the {lane}",
                stream.peer()
            ),
            e,
        ),
        _ if crate::error::link_lost(&e) => EngineError::ConnectionLost { lane },
        _ => EngineError::io(format!("reading from {} on the {lane}", stream.peer()), e),
    })
}

/// Appends the tag of a frame without payload (header and body in `frame`).
pub fn seal_control(
    sealer: &mut Sealer,
    frame: &mut Vec<u8>,
    lane: LaneId,
) -> Result<(), EngineError> {
    if let Some(tag) = sealer
        .seal(frame, &[])
        .map_err(|source| EngineError::Integrity { lane, source })?
    {
        frame.extend_from_slice(&tag);
    }
    Ok(())
}

/// A connection past its handshake, with blocking framed I/O.
#[derive(Debug)]
pub struct Framed {
    /// The socket.
    pub stream: Stream,
    /// Seals what we send.
    pub sealer: Sealer,
    /// Checks what we receive.
    pub opener: Opener,
    /// Which lane, for messages.
    pub lane: LaneId,
}

impl Framed {
    /// Sends one sealed message without page payload.
    pub fn send(&mut self, msg: &Message) -> Result<(), EngineError> {
        let mut out = msg.to_vec();
        seal_control(&mut self.sealer, &mut out, self.lane)?;
        self.stream.write_all(&out).map_err(|e| {
            EngineError::io(
                format!(
                    "sending {:?} on the {} to {}",
                    msg.kind(),
                    self.lane,
                    self.stream.peer()
                ),
                e,
            )
        })
    }

    /// Sends an `Error` frame, best effort.
    pub fn send_error(&mut self, code: ErrorCode, message: impl Into<String>) {
        let _ = self.send(&Message::Error(ErrorFrame::new(code, message)));
    }

    /// Receives and checks one sealed message. `Pages` frames with a payload
    /// are refused here (they belong to the receive rings). An `Error` frame
    /// becomes [`EngineError::Peer`].
    pub fn recv(&mut self) -> Result<Message, EngineError> {
        let lane = self.lane;
        let mut frame = vec![0u8; FRAME_HEADER_LEN];
        read_exact(&mut self.stream, &mut frame, lane)?;
        let head: [u8; FRAME_HEADER_LEN] = frame[..]
            .try_into()
            .map_err(|_| EngineError::Internal("header length".into()))?;
        let header =
            FrameHeader::parse(&head).map_err(|source| EngineError::Decode { lane, source })?;
        let body_len = header.body_len_usize();
        frame.resize(FRAME_HEADER_LEN + body_len, 0);
        read_exact(&mut self.stream, &mut frame[FRAME_HEADER_LEN..], lane)?;
        let msg = Message::decode(&header, &frame[FRAME_HEADER_LEN..])
            .map_err(|source| EngineError::Decode { lane, source })?;
        if let Message::Pages(h) = &msg {
            if h.payload_len != 0 {
                return Err(EngineError::Unexpected {
                    lane,
                    kind: header.kind,
                    state: "on a control path",
                });
            }
        }
        let mut tag = vec![0u8; self.opener.tag_len()];
        read_exact(&mut self.stream, &mut tag, lane)?;
        self.opener
            .open(&frame, &mut tag)
            .map_err(|source| EngineError::Integrity { lane, source })?;
        match msg {
            Message::Error(e) => Err(peer_error(e)),
            m => Ok(m),
        }
    }
}
