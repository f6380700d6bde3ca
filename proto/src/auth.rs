//! Mutual authentication with a pre-shared key (HMAC-SHA256).
//!
//! ```text
//! D -> S  Hello      (nonce_d, session, ...)
//! S -> D  Challenge  (nonce_s, mac_s = HMAC(k, "ringfault/2 source" || Hello body || nonce_s || session))
//! D -> S  Proof      (mac_d = HMAC(k, "ringfault/2 destination" || Hello body || Challenge body))
//! S -> D  Welcome    (layout), only after mac_d verified
//! ```
//!
//! Both tags cover both fresh nonces, so neither can be replayed from an
//! earlier connection, and the distinct labels stop a tag from being
//! reflected to the other side. `mac_d` covers the whole Challenge, so a
//! tampered capability set or protection mode is caught by the source
//! before it sends the layout. Tags are compared in constant time.
//!
//! The handshake then yields one key per direction of this connection
//! ([`derive_keys`]), which seals every later frame ([`crate::seal`]):
//!
//! ```text
//! prk   = HMAC(k, "ringfault/2 keys" || Hello body || Challenge body || mac_d)
//! k_d2s = HMAC(prk, "destination to source"),  k_s2d = HMAC(prk, "source to destination")
//! ```
//!
//! Every connection has fresh nonces, so every lane and every resumed
//! connection has keys of its own.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::handshake::{Challenge, Hello, Mac, Nonce, Proof, SessionId};

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted key, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// Domain label of the source's tag.
pub const SOURCE_LABEL: &[u8] = b"ringfault/2 source";
/// Domain label of the destination's tag.
pub const DESTINATION_LABEL: &[u8] = b"ringfault/2 destination";
/// Domain label of the connection's key derivation.
pub const KEYS_LABEL: &[u8] = b"ringfault/2 keys";

/// Authentication failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The key is shorter than [`MIN_KEY_LEN`].
    #[error("pre-shared key is {len} bytes, at least {min} are required")]
    KeyTooShort {
        /// Key length after trimming.
        len: usize,
        /// [`MIN_KEY_LEN`].
        min: usize,
    },
    /// The peer's tag does not verify.
    #[error("peer failed authentication: pre-shared keys differ")]
    WrongKey,
    /// The Challenge names another session than the Hello.
    #[error("challenge is for session {challenge}, hello was for session {hello}")]
    SessionMismatch {
        /// Hex of `Hello::session`.
        hello: String,
        /// Hex of `Challenge::session`.
        challenge: String,
    },
}

/// A pre-shared key of at least [`MIN_KEY_LEN`] bytes. Only the keyed HMAC
/// state is kept, never the raw bytes; `Debug` prints
/// `PresharedKey(<redacted>)`.
#[derive(Clone)]
pub struct PresharedKey(HmacSha256);

impl core::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

impl PresharedKey {
    /// A key from raw bytes; rejects fewer than [`MIN_KEY_LEN`].
    pub fn new(mut bytes: Vec<u8>) -> Result<Self, AuthError> {
        let result = if bytes.len() < MIN_KEY_LEN {
            Err(AuthError::KeyTooShort {
                len: bytes.len(),
                min: MIN_KEY_LEN,
            })
        } else {
            // HMAC accepts keys of any length; the error arm is unreachable
            // but mapped rather than unwrapped.
            HmacSha256::new_from_slice(&bytes)
                .map(PresharedKey)
                .map_err(|_| AuthError::KeyTooShort {
                    len: bytes.len(),
                    min: MIN_KEY_LEN,
                })
        };
        // Best effort: do not leave the raw key in freed memory.
        bytes.fill(0);
        core::hint::black_box(&bytes);
        result
    }

    /// Parses a key file's contents: trailing ASCII whitespace (newline,
    /// `\r`, space, tab) is trimmed, everything else is taken as raw key
    /// bytes; fewer than [`MIN_KEY_LEN`] bytes are rejected.
    pub fn from_file_contents(b: &[u8]) -> Result<Self, AuthError> {
        let end = b
            .iter()
            .rposition(|c| !c.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        PresharedKey::new(b[..end].to_vec())
    }

    fn tag(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut m = self.0.clone();
        m.update(label);
        for p in parts {
            m.update(p);
        }
        m
    }
}

/// HMAC-SHA256(key, "ringfault/2 source" || encoded Hello body || challenge
/// nonce || session).
pub fn source_mac(key: &PresharedKey, hello: &Hello, nonce_s: &Nonce, session: &SessionId) -> Mac {
    key.tag(SOURCE_LABEL, &[&hello.encode_body(), nonce_s, session])
        .finalize()
        .into_bytes()
        .into()
}

/// HMAC-SHA256(key, "ringfault/2 destination" || encoded Hello body ||
/// encoded Challenge body).
pub fn destination_mac(key: &PresharedKey, hello: &Hello, challenge: &Challenge) -> Mac {
    key.tag(
        DESTINATION_LABEL,
        &[&hello.encode_body(), &challenge.encode_body()],
    )
    .finalize()
    .into_bytes()
    .into()
}

/// Destination side: checks the Challenge echoes the Hello's session and its
/// tag (constant-time).
pub fn verify_source(
    key: &PresharedKey,
    hello: &Hello,
    challenge: &Challenge,
) -> Result<(), AuthError> {
    if challenge.session != hello.session {
        return Err(AuthError::SessionMismatch {
            hello: hex(&hello.session),
            challenge: hex(&challenge.session),
        });
    }
    key.tag(
        SOURCE_LABEL,
        &[&hello.encode_body(), &challenge.nonce, &challenge.session],
    )
    .verify_slice(&challenge.mac)
    .map_err(|_| AuthError::WrongKey)
}

/// Source side: checks the destination's Proof (constant-time).
pub fn verify_destination(
    key: &PresharedKey,
    hello: &Hello,
    challenge: &Challenge,
    proof: &Proof,
) -> Result<(), AuthError> {
    key.tag(
        DESTINATION_LABEL,
        &[&hello.encode_body(), &challenge.encode_body()],
    )
    .verify_slice(&proof.mac)
    .map_err(|_| AuthError::WrongKey)
}

/// The two frame keys of one connection, one per direction.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionKeys {
    /// Seals frames from the destination to the source.
    pub d2s: [u8; 32],
    /// Seals frames from the source to the destination.
    pub s2d: [u8; 32],
}

impl core::fmt::Debug for ConnectionKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ConnectionKeys(<redacted>)")
    }
}

/// Derives the connection's frame keys from the pre-shared key and the
/// whole handshake transcript (both nonces, the protection mode, both tags).
pub fn derive_keys(
    key: &PresharedKey,
    hello: &Hello,
    challenge: &Challenge,
    proof: &Proof,
) -> ConnectionKeys {
    let prk: [u8; 32] = key
        .tag(
            KEYS_LABEL,
            &[&hello.encode_body(), &challenge.encode_body(), &proof.mac],
        )
        .finalize()
        .into_bytes()
        .into();
    let expand = |label: &[u8]| -> [u8; 32] {
        // HMAC accepts keys of any length: the error arm cannot happen.
        match <HmacSha256 as hmac::Mac>::new_from_slice(&prk) {
            Ok(mut m) => {
                m.update(label);
                m.finalize().into_bytes().into()
            }
            Err(_) => [0u8; 32],
        }
    };
    ConnectionKeys {
        d2s: expand(b"destination to source"),
        s2d: expand(b"source to destination"),
    }
}

/// Lower-case hex of `bytes`, for log lines.
pub fn hex(bytes: &[u8]) -> String {
    use core::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
