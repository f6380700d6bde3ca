//! The [`Message`] sum type: frame-level encode and decode.

use crate::control::{Complete, Digests, ErrorFrame, Phase};
use crate::demand::DemandRequest;
use crate::error::DecodeError;
use crate::frame::{body_len_usize, check_body_len, FrameHeader, MsgKind};
use crate::handshake::{Challenge, Hello, Proof, Welcome};
use crate::pages::PagesHeader;
use crate::rle::RleChunk;
use crate::FRAME_HEADER_LEN;

/// Any ringfault frame (page payloads excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Challenge`].
    Challenge(Challenge),
    /// See [`Proof`].
    Proof(Proof),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`PagesHeader`]; a `Data` payload follows the frame.
    Pages(PagesHeader),
    /// See [`DemandRequest`].
    Demand(DemandRequest),
    /// Destination -> source on resume: pages already present.
    PresentBitmap(RleChunk),
    /// Source -> destination at switch-over: pages to discard.
    DiscardList(RleChunk),
    /// Source -> destination: never-populated pages, which read as zero.
    ZeroRanges(RleChunk),
    /// See [`Complete`].
    Complete(Complete),
    /// See [`crate::CompleteAck`].
    CompleteAck,
    /// See [`crate::Release`].
    Release,
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
    /// The sender is alive.
    Heartbeat,
    /// Source -> destination on resume: the present bitmap was applied; the
    /// value is the number of pages the source now counts as present.
    Resumed(u64),
    /// See [`Phase`].
    Phase(Phase),
    /// See [`Digests`].
    Digests(Digests),
}

impl Message {
    /// The frame kind.
    pub fn kind(&self) -> MsgKind {
        match self {
            Message::Hello(_) => MsgKind::Hello,
            Message::Challenge(_) => MsgKind::Challenge,
            Message::Proof(_) => MsgKind::Proof,
            Message::Welcome(_) => MsgKind::Welcome,
            Message::Pages(_) => MsgKind::Pages,
            Message::Demand(_) => MsgKind::Demand,
            Message::PresentBitmap(_) => MsgKind::PresentBitmap,
            Message::DiscardList(_) => MsgKind::DiscardList,
            Message::ZeroRanges(_) => MsgKind::ZeroRanges,
            Message::Complete(_) => MsgKind::Complete,
            Message::CompleteAck => MsgKind::CompleteAck,
            Message::Release => MsgKind::Release,
            Message::Error(_) => MsgKind::Error,
            Message::Heartbeat => MsgKind::Heartbeat,
            Message::Resumed(_) => MsgKind::Resumed,
            Message::Phase(_) => MsgKind::Phase,
            Message::Digests(_) => MsgKind::Digests,
        }
    }

    /// Appends frame header + body (never the page payload).
    ///
    /// Encoding does not validate: a locally built message that breaks a
    /// rule (say an `RleChunk` with too many runs) is encoded as is and the
    /// peer rejects it. Call the `validate` methods first where in doubt.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
        match self {
            Message::Hello(m) => out.extend_from_slice(&m.encode_body()),
            Message::Challenge(m) => out.extend_from_slice(&m.encode_body()),
            Message::Proof(m) => out.extend_from_slice(&m.mac),
            Message::Welcome(m) => m.encode_body(out),
            Message::Pages(m) => out.extend_from_slice(&m.encode_body()),
            Message::Demand(m) => m.encode_body(out),
            Message::PresentBitmap(m) | Message::DiscardList(m) | Message::ZeroRanges(m) => {
                m.encode_body(out)
            }
            Message::Complete(m) => out.extend_from_slice(&m.encode_body()),
            Message::CompleteAck | Message::Release | Message::Heartbeat => {}
            Message::Error(m) => m.encode_body(out),
            Message::Resumed(n) => out.extend_from_slice(&n.to_le_bytes()),
            Message::Phase(p) => out.extend_from_slice(&p.encode_body()),
            Message::Digests(d) => d.encode_body(out),
        }
        let body_len = out.len() - start - FRAME_HEADER_LEN;
        let header = FrameHeader {
            kind: self.kind(),
            body_len: u32::try_from(body_len).unwrap_or(u32::MAX),
        };
        out[start..start + FRAME_HEADER_LEN].copy_from_slice(&header.encode());
    }

    /// Frame header + body as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// `body` = exactly `body_len` bytes after the header. Strict: trailing
    /// bytes, truncation, bad enums, bad magic/version in Hello/Challenge,
    /// too many regions, bad varints, overflow -> typed errors. Never
    /// allocates more than about `MAX_BODY_LEN` from peer-given sizes.
    ///
    /// Does not check page references against the layout: call
    /// `PagesHeader::validate`, `DemandRequest::validate`,
    /// `RleChunk::validate` or `Digests::validate` with the session's layout.
    pub fn decode(header: &FrameHeader, body: &[u8]) -> Result<Message, DecodeError> {
        let announced = body_len_usize(header.body_len);
        if body.len() < announced {
            return Err(DecodeError::Truncated {
                need: announced,
                have: body.len(),
            });
        }
        if body.len() > announced {
            return Err(DecodeError::TrailingBytes {
                extra: body.len() - announced,
            });
        }
        check_body_len(header.kind, body.len())?;
        Ok(match header.kind {
            MsgKind::Invalid => return Err(DecodeError::UnknownKind(0)),
            MsgKind::Hello => Message::Hello(Hello::decode_body(body)?),
            MsgKind::Challenge => Message::Challenge(Challenge::decode_body(body)?),
            MsgKind::Proof => Message::Proof(Proof::decode_body(body)?),
            MsgKind::Welcome => Message::Welcome(Welcome::decode_body(body)?),
            MsgKind::Pages => Message::Pages(PagesHeader::decode_body(body)?),
            MsgKind::Demand => Message::Demand(DemandRequest::decode_body(body)?),
            MsgKind::PresentBitmap => Message::PresentBitmap(RleChunk::decode_body(body)?),
            MsgKind::DiscardList => Message::DiscardList(RleChunk::decode_body(body)?),
            MsgKind::ZeroRanges => Message::ZeroRanges(RleChunk::decode_body(body)?),
            MsgKind::Complete => Message::Complete(Complete::decode_body(body)?),
            MsgKind::CompleteAck => Message::CompleteAck,
            MsgKind::Release => Message::Release,
            MsgKind::Error => Message::Error(ErrorFrame::decode_body(body)?),
            MsgKind::Heartbeat => Message::Heartbeat,
            MsgKind::Resumed => Message::Resumed(Complete::decode_body(body)?.pages_present),
            MsgKind::Phase => Message::Phase(Phase::decode_body(body)?),
            MsgKind::Digests => Message::Digests(Digests::decode_body(body)?),
        })
    }
}

/// Convenience for a whole frame in one buffer: returns the message and bytes
/// consumed (header + body), or `Ok(None)` if more bytes are needed. Page
/// payload not included. The header is checked as soon as its 8 bytes are
/// there, so a bad or oversized frame fails before its body is awaited.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(head) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(head)?;
    let total = FRAME_HEADER_LEN + header.body_len_usize();
    let Some(body) = buf.get(FRAME_HEADER_LEN..total) else {
        return Ok(None);
    };
    Ok(Some((Message::decode(&header, body)?, total)))
}
