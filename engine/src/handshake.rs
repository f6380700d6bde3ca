//! The per-connection handshake: hello, mutual HMAC-SHA256 challenge-response on the
//! pre-shared key, then the guest memory layout. See `docs/protocol.md`.
//!
//! The destination connects and speaks first; the source proves that it knows the
//! key before the destination proves it, and the layout travels only after both
//! proofs checked. A wrong key is reported on both sides: the side that detects it
//! sends an `Error(AuthFailed)` frame before closing.

use std::time::Duration;

use ringfault_proto::auth::{self, PresharedKey};
use ringfault_proto::{
    Capabilities, Challenge, ErrorCode, Hello, Lane, Layout, Message, Nonce, Proof, Role,
    SessionId, Welcome, VERSION,
};

use crate::addr::Stream;
use crate::conn::{read_message, send_error, send_message};
use crate::error::EngineError;

/// How long either side waits for the next handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What this build of the engine can do.
pub fn our_capabilities() -> Capabilities {
    Capabilities(
        Capabilities::ZERO_PAGES.0
            | Capabilities::UNPOPULATED.0
            | Capabilities::PREFETCH.0
            | Capabilities::HUGE_PAGES.0,
    )
}

/// Fresh random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], EngineError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| {
        EngineError::io("reading random bytes", std::io::Error::other(e.to_string()))
    })?;
    Ok(b)
}

/// Which connection of a session the destination opens.
#[derive(Debug, Clone, Copy)]
pub struct ChannelId {
    /// Demand or bulk.
    pub lane: Lane,
    /// 0 for the demand lane, 1.. for bulk lanes.
    pub channel: u16,
    /// Connections in the session.
    pub channel_count: u16,
}

/// The destination's side of the handshake. Returns the agreed capabilities and the
/// source's layout.
pub fn destination_handshake(
    stream: &mut Stream,
    key: &PresharedKey,
    id: ChannelId,
    session: SessionId,
    resume: bool,
) -> Result<(Capabilities, Welcome), EngineError> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| EngineError::io("setting the handshake timeout", e))?;
    let nonce: Nonce = random_bytes()?;
    let hello = Hello {
        version: VERSION,
        role: Role::Destination,
        lane: id.lane,
        channel: id.channel,
        channel_count: id.channel_count,
        capabilities: our_capabilities(),
        session,
        resume,
        nonce,
    };
    send_message(stream, &Message::Hello(hello))?;
    let challenge = match read_message(stream)? {
        Message::Challenge(c) => c,
        other => return Err(unexpected(stream, "Challenge", &other)),
    };
    if challenge.role != Role::Source {
        send_error(stream, ErrorCode::Protocol, "peer is not a source");
        return Err(EngineError::Protocol(format!(
            "the peer says it is a {:?}, not a source",
            challenge.role
        )));
    }
    if let Err(e) = auth::verify_source(key, &hello, &challenge) {
        send_error(
            stream,
            ErrorCode::AuthFailed,
            "authentication failed: the source's proof does not match our pre-shared key",
        );
        return Err(e.into());
    }
    let offered = challenge.capabilities.0;
    if offered & !hello.capabilities.0 != 0 {
        send_error(
            stream,
            ErrorCode::Protocol,
            "capabilities not a subset of ours",
        );
        return Err(EngineError::Protocol(
            "the source claimed capabilities we did not offer".into(),
        ));
    }
    if challenge.session != session {
        send_error(stream, ErrorCode::Protocol, "session id changed");
        return Err(EngineError::Protocol(
            "the source answered with another session id".into(),
        ));
    }
    let proof = Proof {
        mac: auth::destination_mac(key, &hello, &challenge),
    };
    send_message(stream, &Message::Proof(proof))?;
    let welcome = match read_message(stream)? {
        Message::Welcome(w) => w,
        other => return Err(unexpected(stream, "Welcome", &other)),
    };
    if welcome.session != session {
        return Err(EngineError::Protocol(
            "the source's welcome names another session".into(),
        ));
    }
    stream
        .set_read_timeout(None)
        .map_err(|e| EngineError::io("clearing the handshake timeout", e))?;
    Ok((challenge.capabilities, welcome))
}

/// The source's side. `accept_session` sees the authenticated hello and says whether
/// its session id may join (a new session, or the current one).
pub fn source_handshake(
    stream: &mut Stream,
    key: &PresharedKey,
    layout: &Layout,
    accept_session: impl FnOnce(&Hello) -> Result<(), EngineError>,
) -> Result<Hello, EngineError> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| EngineError::io("setting the handshake timeout", e))?;
    let hello = match read_message(stream)? {
        Message::Hello(h) => h,
        other => return Err(unexpected(stream, "Hello", &other)),
    };
    if hello.role != Role::Destination {
        send_error(
            stream,
            ErrorCode::Protocol,
            "only a destination may connect",
        );
        return Err(EngineError::Protocol(format!(
            "a {:?} connected; only a destination may",
            hello.role
        )));
    }
    let nonce: Nonce = random_bytes()?;
    let mac = auth::source_mac(key, &hello, &nonce, &hello.session);
    let challenge = Challenge {
        version: VERSION,
        role: Role::Source,
        capabilities: hello.capabilities.intersect(our_capabilities()),
        session: hello.session,
        nonce,
        mac,
    };
    send_message(stream, &Message::Challenge(challenge))?;
    let proof = match read_message(stream)? {
        Message::Proof(p) => p,
        other => return Err(unexpected(stream, "Proof", &other)),
    };
    if let Err(e) = auth::verify_destination(key, &hello, &challenge, &proof) {
        send_error(
            stream,
            ErrorCode::AuthFailed,
            "authentication failed: the destination's proof does not match our pre-shared key",
        );
        return Err(e.into());
    }
    if let Err(e) = accept_session(&hello) {
        send_error(stream, ErrorCode::Protocol, e.to_string());
        return Err(e);
    }
    let welcome = Welcome {
        session: hello.session,
        layout: layout.clone(),
    };
    send_message(stream, &Message::Welcome(welcome))?;
    stream
        .set_read_timeout(None)
        .map_err(|e| EngineError::io("clearing the handshake timeout", e))?;
    Ok(hello)
}

fn unexpected(stream: &mut Stream, wanted: &str, got: &Message) -> EngineError {
    send_error(
        stream,
        ErrorCode::Protocol,
        format!("expected {wanted}, got {:?}", got.kind()),
    );
    EngineError::Protocol(format!("expected {wanted}, got {:?}", got.kind()))
}
