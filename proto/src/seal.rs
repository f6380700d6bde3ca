//! Frame protection after the handshake: a 16-byte tag on every frame, and
//! optionally encrypted page contents.
//!
//! # Construction
//! Each connection has one key per direction ([`crate::auth::derive_keys`]);
//! each direction counts its sealed frames from 0 (the implicit sequence
//! number `seq`, never sent). With `nonce = seq as u64 LE || 0u32` and
//! AES-256-GCM:
//!
//! * [`Protection::Mac`] (the default): the frame travels in clear and
//!   `tag = GCM-Seal(key, nonce, plaintext = head, aad = payload).tag`,
//!   where `head` is the frame header, body and any pad, and `payload` the
//!   page contents (empty for frames without). The ciphertext is discarded;
//!   the receiver recomputes the tag from what it received. This is GCM's
//!   authentication over both parts; it runs at GHASH speed over the payload.
//! * [`Protection::Aead`] (`--encrypt`): `payload` travels encrypted and
//!   `tag` is GCM's over `aad = head`, `plaintext = payload`. Headers stay in
//!   clear: page numbers and sizes are visible on the path, contents are not.
//! * [`Protection::None`] (`--integrity none`): no tag.
//!
//! The AEAD is one of three ([`Cipher`]), with the same constructions and
//! tag length: AES-256-GCM; AEGIS-128L (the default where the CPU has AES
//! instructions: it absorbs a payload 2.5 times as fast as GCM's GHASH here,
//! [`Cipher::Aegis128L`]), keyed with the first 16 bytes of the direction key
//! and a 16-byte nonce `seq as u64 LE || 0u64`; or ChaCha20-Poly1305 where
//! the CPU has no AES instructions (under `Mac`, the tag is then Poly1305's
//! over the payload as associated data). The destination proposes the
//! cipher in its `Hello`; both MACs of the handshake cover it.
//!
//! Because the sequence number is in the nonce, a frame that is injected,
//! altered, dropped, replayed or moved fails the next tag check; keys
//! differ per connection and direction, so a frame cannot be replayed on
//! another lane, another session or back to its sender.
//!
//! # Hazards
//! * A failed check leaves the opener's sequence number where it was: the
//!   connection cannot continue and must be closed.
//! * Under `Aead`, a payload that failed the check may have been partly
//!   decrypted in place: never use it.

use aegis::aegis128l::Aegis128L;
use aws_lc_rs::aead::{
    Aad, LessSafeKey, Nonce as GcmNonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305,
};

use crate::error::DecodeError;

/// Bytes in a frame tag.
pub const TAG_LEN: usize = 16;

/// How frames after the handshake are protected; `u8` on the wire, 0 is
/// invalid.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protection {
    /// No tag (an explicit operator choice, `--integrity none`).
    None = 1,
    /// Every frame authenticated (the default).
    #[default]
    Mac = 2,
    /// Every frame authenticated, page contents encrypted.
    Aead = 3,
}

impl Protection {
    /// Decodes a wire value.
    pub fn from_wire(v: u8, field: &'static str) -> Result<Protection, DecodeError> {
        match v {
            1 => Ok(Protection::None),
            2 => Ok(Protection::Mac),
            3 => Ok(Protection::Aead),
            _ => Err(DecodeError::BadEnum {
                field,
                value: u64::from(v),
            }),
        }
    }

    /// The wire value.
    pub const fn to_wire(self) -> u8 {
        self as u8
    }

    /// Bytes of tag after each frame.
    pub const fn tag_len(self) -> usize {
        match self {
            Protection::None => 0,
            Protection::Mac | Protection::Aead => TAG_LEN,
        }
    }

    /// The name operators use (`--integrity`, reports).
    pub const fn name(self) -> &'static str {
        match self {
            Protection::None => "none",
            Protection::Mac => "mac",
            Protection::Aead => "aead",
        }
    }
}

/// The AEAD behind [`Protection::Mac`] and [`Protection::Aead`]; `u8` on the
/// wire (`Hello::cipher`, echoed in the `Challenge`).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Cipher {
    /// AES-256-GCM: the fastest where the CPU has AES and carry-less
    /// multiply instructions (x86-64 AES-NI and PCLMULQDQ, arm64 AES and
    /// PMULL).
    #[default]
    Aes256Gcm = 0,
    /// ChaCha20-Poly1305: constant time and fast in software, for CPUs
    /// without them.
    ChaCha20Poly1305 = 1,
    /// AEGIS-128L (IRTF CFRG draft-irtf-cfrg-aegis-aead, in libsodium since
    /// 1.0.19): built on the AES round function alone, it absorbs data at
    /// about 14 GB/s per core on this machine's AMD EPYC against GHASH's 5–5.7
    /// (`cargo run --release -p ringfault-proto --example sealbench`). A
    /// 128-bit key, a 128-bit nonce, a 128-bit tag.
    Aegis128L = 2,
}

impl Cipher {
    /// Decodes a wire value.
    pub fn from_wire(v: u8, field: &'static str) -> Result<Cipher, DecodeError> {
        match v {
            0 => Ok(Cipher::Aes256Gcm),
            1 => Ok(Cipher::ChaCha20Poly1305),
            2 => Ok(Cipher::Aegis128L),
            _ => Err(DecodeError::BadEnum {
                field,
                value: u64::from(v),
            }),
        }
    }

    /// The wire value.
    pub const fn to_wire(self) -> u8 {
        self as u8
    }

    /// The name operators use (`--cipher`, reports).
    pub const fn name(self) -> &'static str {
        match self {
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
            Cipher::Aegis128L => "aegis-128l",
        }
    }

    /// Every cipher, in wire order.
    pub const ALL: [Cipher; 3] = [
        Cipher::Aes256Gcm,
        Cipher::ChaCha20Poly1305,
        Cipher::Aegis128L,
    ];

    /// The cipher for this CPU: AEGIS-128L where it has AES instructions,
    /// ChaCha20-Poly1305 elsewhere.
    pub fn for_this_cpu() -> Cipher {
        if Cipher::aes_rounds_in_hardware() {
            Cipher::Aegis128L
        } else {
            Cipher::ChaCha20Poly1305
        }
    }

    /// Whether this CPU runs the AES round function in hardware (x86-64
    /// AES-NI, arm64 AES), which AEGIS-128L needs to be fast.
    pub fn aes_rounds_in_hardware() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("aes")
        }
        #[cfg(target_arch = "aarch64")]
        {
            std::arch::is_aarch64_feature_detected!("aes")
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    }

    /// Whether this CPU runs AES-GCM in hardware (AES and carry-less
    /// multiply instructions).
    pub fn aes_in_hardware() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            Cipher::aes_rounds_in_hardware() && std::arch::is_x86_feature_detected!("pclmulqdq")
        }
        #[cfg(target_arch = "aarch64")]
        {
            Cipher::aes_rounds_in_hardware() && std::arch::is_aarch64_feature_detected!("pmull")
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    }
}

/// A tag check failed, or the sequence numbers ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The frame's tag does not match: it was altered, injected, replayed,
    /// reordered, or a frame before it was dropped.
    #[error("frame {seq} failed its integrity check (altered, injected, replayed or reordered on the path)")]
    BadTag {
        /// Sequence number the frame should have had.
        seq: u64,
    },
    /// 2^64 frames on one connection.
    #[error("sequence numbers exhausted on this connection")]
    SequenceExhausted,
    /// The cipher refused the key (cannot happen for a 32-byte AES-256 key).
    #[error("the cipher refused the frame key")]
    Key,
    /// [`Opener::open_detached`] on an encrypting connection, whose
    /// payload is opened in place before its tag ([`Opener::open`]).
    #[error("an encrypted frame opens only with its tag after its payload")]
    Detached,
    /// A buffer was shorter than its frame says.
    #[error("frame buffer of {have} bytes, {need} needed")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
}

/// One direction's key, in the form its cipher takes.
enum Keyed {
    /// AES-256-GCM or ChaCha20-Poly1305 (aws-lc). `scratch` is reused for
    /// the copy of a frame head that MAC mode passes as plaintext.
    Lc { key: LessSafeKey, scratch: Vec<u8> },
    /// AEGIS-128L: the first 16 bytes of the direction key (a PRF output,
    /// [`crate::auth::derive_keys`], so any 16 of its bytes are a key).
    Aegis { key: [u8; 16], scratch: Vec<u8> },
}

impl Keyed {
    fn new(cipher: Cipher, key: &[u8; 32]) -> Result<Keyed, SealError> {
        let alg = match cipher {
            Cipher::Aes256Gcm => &AES_256_GCM,
            Cipher::ChaCha20Poly1305 => &CHACHA20_POLY1305,
            Cipher::Aegis128L => {
                let mut k = [0u8; 16];
                k.copy_from_slice(&key[..16]);
                return Ok(Keyed::Aegis {
                    key: k,
                    scratch: Vec::with_capacity(256),
                });
            }
        };
        let unbound = UnboundKey::new(alg, key).map_err(|_| SealError::Key)?;
        Ok(Keyed::Lc {
            key: LessSafeKey::new(unbound),
            scratch: Vec::with_capacity(256),
        })
    }

    /// `tag = Seal(plaintext = head, aad = payload)`.
    fn mac(&mut self, seq: u64, head: &[u8], payload: &[u8]) -> Result<[u8; TAG_LEN], SealError> {
        match self {
            Keyed::Lc { key, scratch } => {
                scratch.clear();
                scratch.extend_from_slice(head);
                let tag = key
                    .seal_in_place_separate_tag(nonce(seq), Aad::from(payload), scratch)
                    .map_err(|_| SealError::BadTag { seq })?;
                let mut out = [0u8; TAG_LEN];
                out.copy_from_slice(tag.as_ref());
                Ok(out)
            }
            Keyed::Aegis { key, scratch } => {
                scratch.clear();
                scratch.extend_from_slice(head);
                Ok(Aegis128L::<TAG_LEN>::new(key, &aegis_nonce(seq))
                    .encrypt_in_place(scratch, payload))
            }
        }
    }

    /// `tag = Seal(aad = head, plaintext = payload)`, the payload encrypted
    /// from `payload` into `out` (same length).
    fn encrypt(
        &mut self,
        seq: u64,
        head: &[u8],
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], SealError> {
        match self {
            Keyed::Lc { key, .. } => {
                let mut tag = [0u8; TAG_LEN];
                key.seal_out_of_place_scatter(
                    nonce(seq),
                    Aad::from(head),
                    payload,
                    out,
                    &[],
                    &mut tag,
                )
                .map_err(|_| SealError::BadTag { seq })?;
                Ok(tag)
            }
            Keyed::Aegis { key, .. } => {
                // Out of place in one pass (the one-shot API encrypts in place,
                // which would need a copy first).
                let mut e = Aegis128L::<TAG_LEN>::new(key, &aegis_nonce(seq)).encryptor(head);
                e.update(payload, out);
                Ok(e.finalize())
            }
        }
    }

    /// Checks `tag` over `head` (associated data) and the ciphertext in
    /// `payload`, decrypting it in place.
    fn decrypt(
        &mut self,
        seq: u64,
        head: &[u8],
        payload_and_tag: &mut [u8],
    ) -> Result<(), SealError> {
        match self {
            Keyed::Lc { key, .. } => key
                .open_in_place(nonce(seq), Aad::from(head), payload_and_tag)
                .map(|_| ())
                .map_err(|_| SealError::BadTag { seq }),
            Keyed::Aegis { key, .. } => {
                let have = payload_and_tag.len();
                let split = have.checked_sub(TAG_LEN).ok_or(SealError::Short {
                    need: TAG_LEN,
                    have,
                })?;
                let (payload, tag) = payload_and_tag.split_at_mut(split);
                let mut t = [0u8; TAG_LEN];
                t.copy_from_slice(tag);
                Aegis128L::<TAG_LEN>::new(key, &aegis_nonce(seq))
                    .decrypt_in_place(payload, &t, head)
                    .map_err(|_| SealError::BadTag { seq })
            }
        }
    }
}

fn nonce(seq: u64) -> GcmNonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&seq.to_le_bytes());
    GcmNonce::assume_unique_for_key(n)
}

fn aegis_nonce(seq: u64) -> [u8; 16] {
    let mut n = [0u8; 16];
    n[..8].copy_from_slice(&seq.to_le_bytes());
    n
}

/// Seals the frames one direction of a connection sends.
pub struct Sealer {
    mode: Protection,
    keyed: Option<Keyed>,
    seq: u64,
}

impl core::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sealer")
            .field("mode", &self.mode)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Sealer {
    /// A sealer for `mode` under `key` (ignored for [`Protection::None`]),
    /// with AES-256-GCM.
    pub fn new(mode: Protection, key: &[u8; 32]) -> Result<Sealer, SealError> {
        Sealer::with_cipher(mode, Cipher::Aes256Gcm, key)
    }

    /// A sealer for `mode` with `cipher` under `key`.
    pub fn with_cipher(
        mode: Protection,
        cipher: Cipher,
        key: &[u8; 32],
    ) -> Result<Sealer, SealError> {
        let keyed = match mode {
            Protection::None => None,
            _ => Some(Keyed::new(cipher, key)?),
        };
        Ok(Sealer {
            mode,
            keyed,
            seq: 0,
        })
    }

    /// The protection mode.
    pub fn protection(&self) -> Protection {
        self.mode
    }

    /// Bytes of tag this sealer appends.
    pub fn tag_len(&self) -> usize {
        self.mode.tag_len()
    }

    /// Frames sealed so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn next_seq(&mut self) -> Result<u64, SealError> {
        let s = self.seq;
        self.seq = s.checked_add(1).ok_or(SealError::SequenceExhausted)?;
        Ok(s)
    }

    /// Seals a frame whose payload travels in clear: under `Mac` the tag, under
    /// `None` nothing. Under `Aead` only frames without payload may come here
    /// (payload frames go through [`Sealer::seal_encrypt`]).
    pub fn seal(
        &mut self,
        head: &[u8],
        payload: &[u8],
    ) -> Result<Option<[u8; TAG_LEN]>, SealError> {
        let mode = self.mode;
        if mode == Protection::None {
            return Ok(None);
        }
        // Refuse a misuse before it consumes a sequence number: a sealer that
        // skipped one would fail every later frame at the peer.
        if mode == Protection::Aead && !payload.is_empty() {
            return Err(SealError::Short {
                need: 0,
                have: payload.len(),
            });
        }
        let seq = self.next_seq()?;
        let Some(k) = self.keyed.as_mut() else {
            return Ok(None);
        };
        match mode {
            Protection::Aead => k.encrypt(seq, head, &[], &mut []).map(Some),
            _ => k.mac(seq, head, payload).map(Some),
        }
    }

    /// Under `Aead`: encrypts `payload` into `out` (same length) and returns the
    /// tag over `head` and the ciphertext. Under the other modes: copies the
    /// payload and returns what [`Sealer::seal`] would.
    pub fn seal_encrypt(
        &mut self,
        head: &[u8],
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<Option<[u8; TAG_LEN]>, SealError> {
        if out.len() != payload.len() {
            return Err(SealError::Short {
                need: payload.len(),
                have: out.len(),
            });
        }
        if self.mode != Protection::Aead {
            out.copy_from_slice(payload);
            return self.seal(head, payload);
        }
        let seq = self.next_seq()?;
        let Some(k) = self.keyed.as_mut() else {
            return Ok(None);
        };
        k.encrypt(seq, head, payload, out).map(Some)
    }
}

/// Checks (and under `Aead` decrypts) the frames one direction of a
/// connection receives.
pub struct Opener {
    mode: Protection,
    keyed: Option<Keyed>,
    seq: u64,
}

impl core::fmt::Debug for Opener {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Opener")
            .field("mode", &self.mode)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Opener {
    /// An opener for `mode` under `key` (ignored for [`Protection::None`]),
    /// with AES-256-GCM.
    pub fn new(mode: Protection, key: &[u8; 32]) -> Result<Opener, SealError> {
        Opener::with_cipher(mode, Cipher::Aes256Gcm, key)
    }

    /// An opener for `mode` with `cipher` under `key`.
    pub fn with_cipher(
        mode: Protection,
        cipher: Cipher,
        key: &[u8; 32],
    ) -> Result<Opener, SealError> {
        let keyed = match mode {
            Protection::None => None,
            _ => Some(Keyed::new(cipher, key)?),
        };
        Ok(Opener {
            mode,
            keyed,
            seq: 0,
        })
    }

    /// The protection mode.
    pub fn protection(&self) -> Protection {
        self.mode
    }

    /// Bytes of tag after each frame.
    pub fn tag_len(&self) -> usize {
        self.mode.tag_len()
    }

    /// Frames opened so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Checks one frame: `head` is its header, body and pad; `payload_and_tag`
    /// its payload followed by [`Opener::tag_len`] tag bytes. Under `Aead` the
    /// payload is decrypted in place. On success the sequence number advances.
    pub fn open(&mut self, head: &[u8], payload_and_tag: &mut [u8]) -> Result<(), SealError> {
        let tl = self.tag_len();
        if payload_and_tag.len() < tl {
            return Err(SealError::Short {
                need: tl,
                have: payload_and_tag.len(),
            });
        }
        let split = payload_and_tag.len() - tl;
        if self.mode == Protection::Aead {
            let seq = self.seq;
            if let Some(k) = self.keyed.as_mut() {
                k.decrypt(seq, head, payload_and_tag)?;
            }
            return self.advance();
        }
        let (payload, tag) = payload_and_tag.split_at(split);
        self.open_detached(head, payload, tag)
    }

    /// [`Opener::open`] of a frame whose payload and tag lie apart (a
    /// payload received straight into its own buffer), without encryption:
    /// `tag` must be [`Opener::tag_len`] bytes. Under `Aead`, which decrypts
    /// in place, [`SealError::Detached`].
    pub fn open_detached(
        &mut self,
        head: &[u8],
        payload: &[u8],
        tag: &[u8],
    ) -> Result<(), SealError> {
        let tl = self.tag_len();
        if tag.len() != tl {
            return Err(SealError::Short {
                need: tl,
                have: tag.len(),
            });
        }
        let seq = self.seq;
        let Some(k) = self.keyed.as_mut() else {
            return Ok(());
        };
        match self.mode {
            Protection::Aead => return Err(SealError::Detached),
            Protection::Mac => {
                let want = k.mac(seq, head, payload)?;
                aws_lc_rs::constant_time::verify_slices_are_equal(&want, tag)
                    .map_err(|_| SealError::BadTag { seq })?;
            }
            Protection::None => {}
        }
        self.advance()
    }

    fn advance(&mut self) -> Result<(), SealError> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(SealError::SequenceExhausted)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(mode: Protection) -> (Sealer, Opener) {
        (
            Sealer::new(mode, &[7; 32]).unwrap(),
            Opener::new(mode, &[7; 32]).unwrap(),
        )
    }

    /// Every cipher in both modes: round trip, a flipped bit in the payload,
    /// the head or the tag and a replay fail, the payload is hidden under
    /// `Aead`, and a frame sealed with one cipher never opens under another
    /// (same key).
    #[test]
    fn tamper_every_cipher_round_trip_and_rejections() {
        let head = b"header and body".to_vec();
        let payload = vec![0xab; 8192];
        for c in Cipher::ALL {
            let mut s = Sealer::with_cipher(Protection::Mac, c, &[7; 32]).unwrap();
            let tag = s.seal(&head, &payload).unwrap().unwrap();
            let mut buf = payload.clone();
            buf.extend_from_slice(&tag);
            for other in Cipher::ALL.into_iter().filter(|&o| o != c) {
                let mut o = Opener::with_cipher(Protection::Mac, other, &[7; 32]).unwrap();
                assert_eq!(
                    o.open(&head, &mut buf.clone()),
                    Err(SealError::BadTag { seq: 0 }),
                    "{c:?} opened as {other:?}"
                );
            }
            for flip in [100, payload.len() + 3] {
                let mut bad = buf.clone();
                bad[flip] ^= 1;
                let mut o = Opener::with_cipher(Protection::Mac, c, &[7; 32]).unwrap();
                assert_eq!(
                    o.open(&head, &mut bad),
                    Err(SealError::BadTag { seq: 0 }),
                    "{c:?}"
                );
            }
            let mut o = Opener::with_cipher(Protection::Mac, c, &[7; 32]).unwrap();
            let mut bad_head = head.clone();
            bad_head[0] ^= 1;
            assert_eq!(
                o.open(&bad_head, &mut buf.clone()),
                Err(SealError::BadTag { seq: 0 })
            );
            o.open(&head, &mut buf.clone()).unwrap();
            assert_eq!(
                o.open(&head, &mut buf),
                Err(SealError::BadTag { seq: 1 }),
                "{c:?}"
            );

            let mut s = Sealer::with_cipher(Protection::Aead, c, &[7; 32]).unwrap();
            let mut o = Opener::with_cipher(Protection::Aead, c, &[7; 32]).unwrap();
            let mut ct = vec![0u8; payload.len()];
            let tag = s.seal_encrypt(&head, &payload, &mut ct).unwrap().unwrap();
            assert_ne!(ct, payload, "{c:?}");
            ct.extend_from_slice(&tag);
            let mut bad = ct.clone();
            bad[5] ^= 1;
            assert_eq!(
                Opener::with_cipher(Protection::Aead, c, &[7; 32])
                    .unwrap()
                    .open(&head, &mut bad),
                Err(SealError::BadTag { seq: 0 }),
                "{c:?}"
            );
            o.open(&head, &mut ct).unwrap();
            assert_eq!(&ct[..payload.len()], &payload[..], "{c:?}");
            // A frame without payload under `Aead`: the tag covers the head.
            let tag = s.seal(&head, &[]).unwrap().unwrap();
            let mut t = tag.to_vec();
            o.open(&head, &mut t).unwrap();
            let mut t = tag.to_vec();
            assert_eq!(
                o.open(&bad_head, &mut t),
                Err(SealError::BadTag { seq: 2 }),
                "{c:?}"
            );
        }
    }

    #[test]
    fn cipher_wire_values_round_trip() {
        for (i, c) in Cipher::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(c.to_wire()), i);
            assert_eq!(Cipher::from_wire(c.to_wire(), "c"), Ok(c));
        }
        assert!(Cipher::from_wire(3, "c").is_err());
    }

    #[test]
    fn mac_round_trip_and_tamper() {
        let (mut s, mut o) = pair(Protection::Mac);
        let head = b"header and body".to_vec();
        let payload = vec![0xab; 8192];
        let tag = s.seal(&head, &payload).unwrap().unwrap();
        let mut buf = payload.clone();
        buf.extend_from_slice(&tag);
        let mut bad = buf.clone();
        bad[100] ^= 1;
        assert_eq!(o.open(&head, &mut bad), Err(SealError::BadTag { seq: 0 }));
        let mut o2 = Opener::new(Protection::Mac, &[7; 32]).unwrap();
        o2.open(&head, &mut buf).unwrap();
        assert_eq!(o2.seq(), 1);
        // Replaying the same frame fails: the sequence number moved on.
        let mut again = payload.clone();
        again.extend_from_slice(&tag);
        assert_eq!(
            o2.open(&head, &mut again),
            Err(SealError::BadTag { seq: 1 })
        );
    }

    #[test]
    fn aead_round_trip_hides_payload() {
        let (mut s, mut o) = pair(Protection::Aead);
        let head = b"head".to_vec();
        let payload = vec![0x5a; 4096];
        let mut ct = vec![0u8; payload.len()];
        let tag = s.seal_encrypt(&head, &payload, &mut ct).unwrap().unwrap();
        assert_ne!(ct, payload);
        ct.extend_from_slice(&tag);
        o.open(&head, &mut ct).unwrap();
        assert_eq!(&ct[..4096], &payload[..]);
    }

    #[test]
    fn wrong_key_and_none() {
        let mut s = Sealer::new(Protection::Mac, &[1; 32]).unwrap();
        let mut o = Opener::new(Protection::Mac, &[2; 32]).unwrap();
        let tag = s.seal(b"h", b"").unwrap().unwrap();
        let mut t = tag.to_vec();
        assert!(o.open(b"h", &mut t).is_err());
        let mut n = Sealer::new(Protection::None, &[0; 32]).unwrap();
        assert_eq!(n.seal(b"h", b"p").unwrap(), None);
        let mut on = Opener::new(Protection::None, &[0; 32]).unwrap();
        on.open(b"h", &mut []).unwrap();
    }
}
