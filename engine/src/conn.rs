//! Framed, blocking message I/O on a [`Stream`]: the control path (handshake,
//! completion, errors). The page hot paths parse frames themselves from their
//! receive buffers; see `destination::bulk` and `destination::fault`.

use std::io::Read;
use std::os::fd::AsFd;

use ringfault_proto::{ErrorCode, ErrorFrame, FrameHeader, Message, FRAME_HEADER_LEN};

use crate::addr::Stream;
use crate::error::EngineError;
use crate::sys::guest::{send_pieces, Piece};

/// Writes one message (header and body; never a page payload).
pub fn send_message(stream: &mut Stream, msg: &Message) -> Result<(), EngineError> {
    let mut out = Vec::with_capacity(128);
    msg.encode(&mut out);
    // Works on blocking and non-blocking sockets alike.
    send_pieces(stream.as_fd(), &[Piece::Bytes(&out)])
        .map(|_| ())
        .map_err(|e| EngineError::io(format!("sending {:?} to {}", msg.kind(), stream.peer()), e))
}

/// Tells the peer why we stop, best effort: the peer may already be gone.
pub fn send_error(stream: &mut Stream, code: ErrorCode, message: impl Into<String>) {
    let frame = Message::Error(ErrorFrame {
        code,
        message: message.into(),
    });
    let _ = send_message(stream, &frame);
}

/// Reads one whole message whose kind carries no page payload. A `Pages` frame is
/// returned as its header; the caller must then consume its payload. An `Error`
/// frame from the peer becomes [`EngineError::Peer`].
pub fn read_message(stream: &mut Stream) -> Result<Message, EngineError> {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    read_exact_or_lost(stream, &mut hdr)?;
    let header = FrameHeader::parse(&hdr)?;
    let len = usize::try_from(header.body_len)
        .map_err(|_| EngineError::Protocol("body length does not fit in memory".into()))?;
    let mut body = vec![0u8; len];
    read_exact_or_lost(stream, &mut body)?;
    match Message::decode(&header, &body)? {
        Message::Error(e) => Err(peer_error(e)),
        m => Ok(m),
    }
}

/// Turns a peer's error frame into our error.
pub fn peer_error(e: ErrorFrame) -> EngineError {
    EngineError::Peer {
        code: format!("{:?}", e.code),
        message: e.message,
    }
}

fn read_exact_or_lost(stream: &mut Stream, buf: &mut [u8]) -> Result<(), EngineError> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => EngineError::io(
            format!("the peer {} closed the connection", stream.peer()),
            e,
        ),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => EngineError::io(
            format!("the peer {} did not answer in time", stream.peer()),
            e,
        ),
        _ => EngineError::io(format!("reading from {}", stream.peer()), e),
    })
}
