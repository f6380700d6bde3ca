//! The per-connection handshake: hello, mutual HMAC-SHA256 challenge-response
//! on the pre-shared key, keys for this connection, then the guest memory
//! layout in the first sealed frame. See `docs/protocol.md`.
//!
//! The destination connects and speaks first; the source proves that it knows
//! the key before the destination proves it, and the layout travels only after
//! both proofs checked, sealed so that nobody on the path can change it. A
//! wrong key is reported on both sides: the side that detects it sends an
//! `Error(AuthFailed)` frame before closing. Both sides must use the same frame
//! protection; the mode is part of the authenticated transcript, so it cannot
//! be downgraded on the path.

use std::time::Duration;

use ringfault_proto::auth::{self, PresharedKey};
use ringfault_proto::{
    Capabilities, Challenge, Cipher, ErrorCode, Hello, Lane, Layout, Message, Nonce, Opener, Proof,
    Protection, Role, Sealer, SessionId, Welcome, VERSION, WELCOME_VERIFY,
};

use crate::addr::Stream;
use crate::error::{EngineError, LaneId};
use crate::wire::{recv_bare, send_bare, send_bare_error, Framed};

/// How long either side waits for the next handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What this build of the engine can do.
pub fn our_capabilities() -> Capabilities {
    Capabilities::ZERO_PAGES
        | Capabilities::UNPOPULATED
        | Capabilities::PREFETCH
        | Capabilities::HUGE_PAGES
        | Capabilities::RESUME
        | Capabilities::DISCARD
        | Capabilities::VERIFY
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
    /// `LANE_ALIGN_PAYLOAD` and friends.
    pub lane_flags: u8,
}

impl ChannelId {
    /// The lane's id for messages.
    pub fn lane_id(&self) -> LaneId {
        match self.lane {
            Lane::Demand => LaneId::DEMAND,
            _ => LaneId::bulk(self.channel),
        }
    }
}

/// A connection the destination finished the handshake on.
#[derive(Debug)]
pub struct DestinationLink {
    /// The connection, sealed from here on.
    pub framed: Framed,
    /// The source's layout.
    pub layout: Layout,
    /// Agreed capabilities.
    pub capabilities: Capabilities,
    /// The Welcome's `WELCOME_*` flags (pre-copy).
    pub flags: u32,
}

/// The destination's side of the handshake: it proposes `protection` with
/// `cipher`.
#[allow(clippy::too_many_arguments)]
pub fn destination_handshake(
    mut stream: Stream,
    key: &PresharedKey,
    id: ChannelId,
    session: SessionId,
    resume: bool,
    protection: Protection,
    cipher: Cipher,
    capabilities: Capabilities,
) -> Result<DestinationLink, EngineError> {
    // No cipher without protection (the codec refuses one).
    let cipher = if protection == Protection::None {
        Cipher::default()
    } else {
        cipher
    };
    let lane = id.lane_id();
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
        capabilities: capabilities.intersect(our_capabilities()),
        session,
        resume,
        protection,
        cipher,
        lane_flags: id.lane_flags,
        nonce,
    };
    send_bare(&mut stream, &Message::Hello(hello))?;
    let challenge = match recv_bare(&mut stream, lane)? {
        Message::Challenge(c) => c,
        other => {
            return Err(unexpected(
                &mut stream,
                lane,
                &other,
                "instead of Challenge",
            ))
        }
    };
    if let Err(e) = auth::verify_source(key, &hello, &challenge) {
        send_bare_error(
            &mut stream,
            ErrorCode::AuthFailed,
            "authentication failed: the source's proof does not match our pre-shared key",
        );
        return Err(e.into());
    }
    if challenge.protection != protection || challenge.cipher != cipher {
        send_bare_error(
            &mut stream,
            ErrorCode::AuthFailed,
            "frame protection differs",
        );
        return Err(EngineError::Protection {
            ours: protection.name(),
            theirs: if challenge.protection == protection {
                challenge.cipher.name()
            } else {
                challenge.protection.name()
            },
        });
    }
    if challenge.capabilities.0 & !hello.capabilities.0 != 0 {
        send_bare_error(
            &mut stream,
            ErrorCode::Protocol,
            "capabilities not a subset of ours",
        );
        return Err(EngineError::Unexpected {
            lane,
            kind: ringfault_proto::MsgKind::Challenge,
            state: "with capabilities we did not offer",
        });
    }
    let proof = Proof {
        mac: auth::destination_mac(key, &hello, &challenge),
    };
    send_bare(&mut stream, &Message::Proof(proof))?;
    let keys = auth::derive_keys(key, &hello, &challenge, &proof);
    let sealer = Sealer::with_cipher(protection, cipher, &keys.d2s)
        .map_err(|source| EngineError::Integrity { lane, source })?;
    let opener = Opener::with_cipher(protection, cipher, &keys.s2d)
        .map_err(|source| EngineError::Integrity { lane, source })?;
    let mut framed = Framed {
        stream,
        sealer,
        opener,
        lane,
    };
    let welcome = match framed.recv() {
        Ok(Message::Welcome(w)) => w,
        Err(e) => {
            // A Welcome that fails its tag (say a layout changed on the
            // path) or does not decode: tell the source why, then close.
            if !e.is_link_loss() && !matches!(e, EngineError::Peer { .. }) {
                framed.send_error(e.code(), e.to_string());
            }
            return Err(e);
        }
        Ok(other) => {
            framed.send_error(ErrorCode::Protocol, "expected Welcome");
            return Err(EngineError::Unexpected {
                lane,
                kind: other.kind(),
                state: "instead of Welcome",
            });
        }
    };
    if welcome.session != session {
        framed.send_error(ErrorCode::Protocol, "the Welcome names another session");
        return Err(EngineError::Session(
            "the source's Welcome names another session".into(),
        ));
    }
    framed
        .stream
        .set_read_timeout(None)
        .map_err(|e| EngineError::io("clearing the handshake timeout", e))?;
    Ok(DestinationLink {
        framed,
        layout: welcome.layout,
        capabilities: challenge.capabilities,
        flags: welcome.flags,
    })
}

/// A connection the source authenticated.
#[derive(Debug)]
pub struct SourceLink {
    /// The connection, sealed from here on.
    pub framed: Framed,
    /// The destination's hello (lane, channel, session, resume).
    pub hello: Hello,
}

/// The source's side. `accept_session` sees the authenticated hello and says
/// whether its session may join (a new session, or the current one); it runs
/// before the `Welcome` is sent, so whatever it does (the switch-over, for the
/// first demand lane) happens before the destination can resume the VM.
pub fn source_handshake(
    mut stream: Stream,
    key: &PresharedKey,
    layout: &Layout,
    protection: Protection,
    deadline: Duration,
    welcome_flags: u32,
    accept_session: impl FnOnce(&Hello) -> Result<(), EngineError>,
) -> Result<SourceLink, EngineError> {
    let mut lane = LaneId::DEMAND;
    stream
        .set_read_timeout(Some(deadline))
        .map_err(|e| EngineError::io("setting the handshake timeout", e))?;
    let hello = match recv_bare(&mut stream, lane)? {
        Message::Hello(h) => h,
        other => return Err(unexpected(&mut stream, lane, &other, "instead of Hello")),
    };
    if hello.lane == Lane::Bulk {
        lane = LaneId::bulk(hello.channel);
    }
    let nonce: Nonce = random_bytes()?;
    let mac = auth::source_mac(key, &hello, &nonce, &hello.session);
    let challenge = Challenge {
        version: VERSION,
        role: Role::Source,
        capabilities: hello.capabilities.intersect(our_capabilities()),
        session: hello.session,
        protection: hello.protection,
        cipher: hello.cipher,
        nonce,
        mac,
    };
    send_bare(&mut stream, &Message::Challenge(challenge))?;
    let proof = match recv_bare(&mut stream, lane)? {
        Message::Proof(p) => p,
        other => return Err(unexpected(&mut stream, lane, &other, "instead of Proof")),
    };
    if let Err(e) = auth::verify_destination(key, &hello, &challenge, &proof) {
        send_bare_error(
            &mut stream,
            ErrorCode::AuthFailed,
            "authentication failed: the destination's proof does not match our pre-shared key",
        );
        return Err(e.into());
    }
    if hello.protection != protection {
        send_bare_error(
            &mut stream,
            ErrorCode::AuthFailed,
            format!(
                "frame protection differs: this source requires {}",
                protection.name()
            ),
        );
        return Err(EngineError::Protection {
            ours: protection.name(),
            theirs: hello.protection.name(),
        });
    }
    if let Err(e) = accept_session(&hello) {
        send_bare_error(&mut stream, e.code(), e.to_string());
        return Err(e);
    }
    let keys = auth::derive_keys(key, &hello, &challenge, &proof);
    // The destination chooses the cipher (either is accepted: both are
    // AEADs of the same strength; its CPU decides which is faster).
    let sealer = Sealer::with_cipher(protection, hello.cipher, &keys.s2d)
        .map_err(|source| EngineError::Integrity { lane, source })?;
    let opener = Opener::with_cipher(protection, hello.cipher, &keys.d2s)
        .map_err(|source| EngineError::Integrity { lane, source })?;
    let mut framed = Framed {
        stream,
        sealer,
        opener,
        lane,
    };
    // Digests follow completion only for a destination that can check them.
    let flags = if hello.capabilities.contains(Capabilities::VERIFY) {
        welcome_flags
    } else {
        welcome_flags & !WELCOME_VERIFY
    };
    framed.send(&Message::Welcome(Welcome {
        session: hello.session,
        layout: layout.clone(),
        flags,
    }))?;
    framed
        .stream
        .set_read_timeout(None)
        .map_err(|e| EngineError::io("clearing the handshake timeout", e))?;
    Ok(SourceLink { framed, hello })
}

fn unexpected(
    stream: &mut Stream,
    lane: LaneId,
    got: &Message,
    state: &'static str,
) -> EngineError {
    send_bare_error(
        stream,
        ErrorCode::Protocol,
        format!("unexpected {:?} {state}", got.kind()),
    );
    EngineError::Unexpected {
        lane,
        kind: got.kind(),
        state,
    }
}
