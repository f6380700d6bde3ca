//! Connection handshake: `Hello`, `Challenge`, `Proof`, `Welcome`.
//!
//! The destination opens every connection and speaks first. Magic and
//! version lead the first two bodies so a stranger or an incompatible build
//! is refused before anything else is read. The layout travels only in
//! `Welcome`, i.e. after both sides proved knowledge of the pre-shared key
//! (see [`crate::auth`]). Decoding is canonical: reserved bytes must be zero
//! and booleans 0 or 1, so re-encoding a decoded message gives back the exact
//! bytes the MACs were computed over.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::DecodeError;
use crate::layout::{Layout, RegionWire};
use crate::seal::{Cipher, Protection};
use crate::{
    CHALLENGE_BODY_LEN, HELLO_BODY_LEN, MAGIC, MAX_CHANNELS, MAX_REGIONS, PROOF_BODY_LEN,
    REGION_DESC_LEN, VERSION, WELCOME_HEADER_LEN,
};

/// 16-byte migration session id, chosen at random by the destination and
/// shared by all connections of one migration (and kept across resumes).
pub type SessionId = [u8; 16];
/// 32-byte random nonce, fresh per connection and side.
pub type Nonce = [u8; 32];
/// HMAC-SHA256 tag.
pub type Mac = [u8; 32];

/// Which side sent a handshake message; `u8` on the wire.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Never valid on the wire.
    Invalid = 0,
    /// The host the memory comes from.
    Source = 1,
    /// The host the guest now runs on.
    Destination = 2,
}

impl Role {
    fn from_wire(v: u8, field: &'static str) -> Result<Role, DecodeError> {
        match v {
            1 => Ok(Role::Source),
            2 => Ok(Role::Destination),
            _ => Err(DecodeError::BadEnum {
                field,
                value: u64::from(v),
            }),
        }
    }
}

/// Which lane a connection carries; `u8` on the wire.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Never valid on the wire.
    Invalid = 0,
    /// Demand requests and their replies only: never queues behind bulk.
    Demand = 1,
    /// Background pages, bitmaps, discard lists and completion.
    Bulk = 2,
}

impl Lane {
    fn from_wire(v: u8) -> Result<Lane, DecodeError> {
        match v {
            1 => Ok(Lane::Demand),
            2 => Ok(Lane::Bulk),
            _ => Err(DecodeError::BadEnum {
                field: "hello.lane",
                value: u64::from(v),
            }),
        }
    }
}

/// Feature bits. Unknown bits are ignored (forward compatibility) but never
/// echoed: [`Capabilities::intersect`] keeps only bits this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// No optional feature.
    pub const NONE: Capabilities = Capabilities(0);
    /// `Pages` of kind `Zero`.
    pub const ZERO_PAGES: Capabilities = Capabilities(1 << 0);
    /// `Pages` of kind `Unpopulated`.
    pub const UNPOPULATED: Capabilities = Capabilities(1 << 1);
    /// Demand requests with `before`/`after` prefetch windows.
    pub const PREFETCH: Capabilities = Capabilities(1 << 2);
    /// Reconnect with `resume = true` and `PresentBitmap`.
    pub const RESUME: Capabilities = Capabilities(1 << 3);
    /// Pre-copy rounds followed by a `DiscardList` at switch-over.
    pub const DISCARD: Capabilities = Capabilities(1 << 4);
    /// Regions with 2 MiB / 1 GiB pages.
    pub const HUGE_PAGES: Capabilities = Capabilities(1 << 5);
    /// `Digests` after completion, to verify every page.
    pub const VERIFY: Capabilities = Capabilities(1 << 6);
    /// Every bit this build knows.
    pub const KNOWN: Capabilities = Capabilities((1 << 7) - 1);

    /// Bits set in both and known to this build.
    pub const fn intersect(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 & other.0 & Self::KNOWN.0)
    }

    /// True if every bit of `other` is set in `self`.
    pub const fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` without unknown bits.
    pub const fn known(self) -> Capabilities {
        Capabilities(self.0 & Self::KNOWN.0)
    }
}

impl core::ops::BitOr for Capabilities {
    type Output = Capabilities;
    fn bitor(self, rhs: Capabilities) -> Capabilities {
        Capabilities(self.0 | rhs.0)
    }
}

fn check_magic_version(magic: u64, version: u16) -> Result<(), DecodeError> {
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            got: version,
            supported: VERSION,
        });
    }
    Ok(())
}

fn expect_len(body: &[u8], expected: usize) -> Result<(), DecodeError> {
    match body.len().cmp(&expected) {
        core::cmp::Ordering::Less => Err(DecodeError::Truncated {
            need: expected,
            have: body.len(),
        }),
        core::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes {
            extra: body.len() - expected,
        }),
        core::cmp::Ordering::Equal => Ok(()),
    }
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct HelloWire {
    magic: U64,
    version: U16,
    role: u8,
    lane: u8,
    channel: U16,
    channel_count: U16,
    capabilities: U64,
    session: SessionId,
    resume: u8,
    protection: u8,
    lane_flags: u8,
    cipher: u8,
    reserved: [u8; 4],
    nonce: Nonce,
}

const _: () = assert!(size_of::<HelloWire>() == HELLO_BODY_LEN);

/// `Hello::lane_flags` bit: this bulk lane wants every `Data` payload to start
/// at a multiple of 4 KiB in its byte stream (so that pages can be moved out
/// of the receive buffer with `UFFDIO_MOVE`), using `Pages::pad_len`.
pub const LANE_ALIGN_PAYLOAD: u8 = 1;

/// Destination -> Source, first frame on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Must be [`VERSION`].
    pub version: u16,
    /// Must be [`Role::Destination`].
    pub role: Role,
    /// The lane this connection carries.
    pub lane: Lane,
    /// Channel index, `< channel_count`.
    pub channel: u16,
    /// Channels of this migration, `1..=MAX_CHANNELS`.
    pub channel_count: u16,
    /// Features the destination supports.
    pub capabilities: Capabilities,
    /// Migration session id.
    pub session: SessionId,
    /// Reconnect to an existing session after a lost link.
    pub resume: bool,
    /// How frames after the handshake are protected.
    pub protection: Protection,
    /// The AEAD of that protection (0 under [`Protection::None`]).
    pub cipher: Cipher,
    /// Per-lane options ([`LANE_ALIGN_PAYLOAD`]).
    pub lane_flags: u8,
    /// Destination nonce.
    pub nonce: Nonce,
}

impl Hello {
    /// The exact body bytes (MAC input).
    pub fn encode_body(&self) -> [u8; HELLO_BODY_LEN] {
        let wire = HelloWire {
            magic: U64::new(MAGIC),
            version: U16::new(self.version),
            role: self.role as u8,
            lane: self.lane as u8,
            channel: U16::new(self.channel),
            channel_count: U16::new(self.channel_count),
            capabilities: U64::new(self.capabilities.0),
            session: self.session,
            resume: u8::from(self.resume),
            protection: self.protection.to_wire(),
            lane_flags: self.lane_flags,
            cipher: self.cipher.to_wire(),
            reserved: [0; 4],
            nonce: self.nonce,
        };
        let mut out = [0u8; HELLO_BODY_LEN];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// Decodes and checks a body: magic, version, role, lane, channel.
    pub fn decode_body(body: &[u8]) -> Result<Hello, DecodeError> {
        expect_len(body, HELLO_BODY_LEN)?;
        let w = HelloWire::read_from_bytes(body).map_err(|_| DecodeError::Truncated {
            need: HELLO_BODY_LEN,
            have: body.len(),
        })?;
        check_magic_version(w.magic.get(), w.version.get())?;
        let role = Role::from_wire(w.role, "hello.role")?;
        if role != Role::Destination {
            return Err(DecodeError::WrongRole {
                message: "Hello",
                expected: Role::Destination,
                got: role,
            });
        }
        let lane = Lane::from_wire(w.lane)?;
        let (channel, channel_count) = (w.channel.get(), w.channel_count.get());
        if channel_count == 0 || channel_count > MAX_CHANNELS || channel >= channel_count {
            return Err(DecodeError::BadChannel {
                channel,
                count: channel_count,
                max: MAX_CHANNELS,
            });
        }
        let resume = match w.resume {
            0 => false,
            1 => true,
            v => {
                return Err(DecodeError::BadEnum {
                    field: "hello.resume",
                    value: u64::from(v),
                })
            }
        };
        let protection = Protection::from_wire(w.protection, "hello.protection")?;
        let cipher = Cipher::from_wire(w.cipher, "hello.cipher")?;
        if protection == Protection::None && cipher != Cipher::default() {
            return Err(DecodeError::ReservedNonzero {
                field: "hello.cipher (protection none)",
            });
        }
        if w.lane_flags & !LANE_ALIGN_PAYLOAD != 0 {
            return Err(DecodeError::ReservedNonzero {
                field: "hello.lane_flags",
            });
        }
        if w.reserved != [0; 4] {
            return Err(DecodeError::ReservedNonzero {
                field: "hello.reserved",
            });
        }
        Ok(Hello {
            version: w.version.get(),
            role,
            lane,
            channel,
            channel_count,
            capabilities: Capabilities(w.capabilities.get()),
            session: w.session,
            resume,
            protection,
            cipher,
            lane_flags: w.lane_flags,
            nonce: w.nonce,
        })
    }
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct ChallengeWire {
    magic: U64,
    version: U16,
    role: u8,
    protection: u8,
    cipher: u8,
    reserved: [u8; 3],
    capabilities: U64,
    session: SessionId,
    nonce: Nonce,
    mac: Mac,
}

const _: () = assert!(size_of::<ChallengeWire>() == CHALLENGE_BODY_LEN);

/// Source -> Destination: its nonce and its proof that it knows the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// Must be [`VERSION`].
    pub version: u16,
    /// Must be [`Role::Source`].
    pub role: Role,
    /// Negotiated features: `Hello` capabilities intersected with the
    /// source's, known bits only.
    pub capabilities: Capabilities,
    /// Echo of `Hello::session`.
    pub session: SessionId,
    /// Echo of `Hello::protection`: a source whose policy refuses it answers
    /// with an `Error` instead.
    pub protection: Protection,
    /// Echo of `Hello::cipher`.
    pub cipher: Cipher,
    /// Source nonce.
    pub nonce: Nonce,
    /// [`crate::auth::source_mac`].
    pub mac: Mac,
}

impl Challenge {
    /// The exact body bytes (MAC input).
    pub fn encode_body(&self) -> [u8; CHALLENGE_BODY_LEN] {
        let wire = ChallengeWire {
            magic: U64::new(MAGIC),
            version: U16::new(self.version),
            role: self.role as u8,
            protection: self.protection.to_wire(),
            cipher: self.cipher.to_wire(),
            reserved: [0; 3],
            capabilities: U64::new(self.capabilities.0),
            session: self.session,
            nonce: self.nonce,
            mac: self.mac,
        };
        let mut out = [0u8; CHALLENGE_BODY_LEN];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// Decodes and checks a body: magic, version, role.
    pub fn decode_body(body: &[u8]) -> Result<Challenge, DecodeError> {
        expect_len(body, CHALLENGE_BODY_LEN)?;
        let w = ChallengeWire::read_from_bytes(body).map_err(|_| DecodeError::Truncated {
            need: CHALLENGE_BODY_LEN,
            have: body.len(),
        })?;
        check_magic_version(w.magic.get(), w.version.get())?;
        let role = Role::from_wire(w.role, "challenge.role")?;
        if role != Role::Source {
            return Err(DecodeError::WrongRole {
                message: "Challenge",
                expected: Role::Source,
                got: role,
            });
        }
        let protection = Protection::from_wire(w.protection, "challenge.protection")?;
        let cipher = Cipher::from_wire(w.cipher, "challenge.cipher")?;
        if w.reserved != [0; 3] {
            return Err(DecodeError::ReservedNonzero {
                field: "challenge.reserved",
            });
        }
        Ok(Challenge {
            version: w.version.get(),
            role,
            capabilities: Capabilities(w.capabilities.get()),
            session: w.session,
            protection,
            cipher,
            nonce: w.nonce,
            mac: w.mac,
        })
    }
}

/// Destination -> Source: its proof ([`crate::auth::destination_mac`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proof {
    /// HMAC tag.
    pub mac: Mac,
}

impl Proof {
    /// Decodes a 32-byte body.
    pub fn decode_body(body: &[u8]) -> Result<Proof, DecodeError> {
        expect_len(body, PROOF_BODY_LEN)?;
        let mut mac = [0u8; PROOF_BODY_LEN];
        mac.copy_from_slice(body);
        Ok(Proof { mac })
    }
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct WelcomeWire {
    session: SessionId,
    region_count: U32,
    flags: U32,
}

const _: () = assert!(size_of::<WelcomeWire>() == WELCOME_HEADER_LEN);

/// Source -> Destination after it verified `Proof`, the first sealed frame of
/// the connection: the guest memory layout (only after mutual
/// authentication, and never alterable on the path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Echo of the session id.
    pub session: SessionId,
    /// Guest memory layout.
    pub layout: Layout,
    /// `WELCOME_*` bits: how the session runs.
    pub flags: u32,
}

/// [`Welcome::flags`]: pre-copy rounds come first, while the VM still runs on
/// the source; the switch-over follows (a `DiscardList` ended by
/// `Phase(SwitchOver)` on the demand lane, and a `Phase(SwitchOver)` on every
/// bulk lane before its first post-copy frame).
pub const WELCOME_PRECOPY: u32 = 1 << 0;
/// [`Welcome::flags`]: after `CompleteAck` the source sends `Digests` of every
/// page of every region, in layout order, before it waits for `Release`.
/// Set only when `VERIFY` was negotiated.
pub const WELCOME_VERIFY: u32 = 1 << 1;
/// Every `WELCOME_*` bit this build knows.
pub const WELCOME_KNOWN: u32 = WELCOME_PRECOPY | WELCOME_VERIFY;

impl Welcome {
    /// Appends the body.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        let count = u32::try_from(self.layout.regions.len()).unwrap_or(u32::MAX);
        let wire = WelcomeWire {
            session: self.session,
            region_count: U32::new(count),
            flags: U32::new(self.flags),
        };
        out.extend_from_slice(wire.as_bytes());
        for r in &self.layout.regions {
            out.extend_from_slice(RegionWire::from_desc(r).as_bytes());
        }
    }

    /// Decodes a body and validates the layout. Allocates at most
    /// `MAX_REGIONS` descriptors, and only after the body length matched.
    pub fn decode_body(body: &[u8]) -> Result<Welcome, DecodeError> {
        let (w, rest) =
            WelcomeWire::read_from_prefix(body).map_err(|_| DecodeError::Truncated {
                need: WELCOME_HEADER_LEN,
                have: body.len(),
            })?;
        let count = w.region_count.get();
        let count_usize = usize::try_from(count).unwrap_or(usize::MAX);
        if count_usize > MAX_REGIONS {
            return Err(DecodeError::TooManyRegions {
                count: u64::from(count),
                max: MAX_REGIONS,
            });
        }
        if w.flags.get() & !WELCOME_KNOWN != 0 {
            return Err(DecodeError::ReservedNonzero {
                field: "welcome.flags",
            });
        }
        // count <= MAX_REGIONS, so this cannot overflow.
        expect_len(rest, count_usize * REGION_DESC_LEN).map_err(|e| match e {
            DecodeError::Truncated { need, have } => DecodeError::Truncated {
                need: need + WELCOME_HEADER_LEN,
                have: have + WELCOME_HEADER_LEN,
            },
            other => other,
        })?;
        let mut regions = Vec::with_capacity(count_usize);
        for chunk in rest.chunks_exact(REGION_DESC_LEN) {
            let rw = RegionWire::read_from_bytes(chunk).map_err(|_| DecodeError::Truncated {
                need: REGION_DESC_LEN,
                have: chunk.len(),
            })?;
            regions.push(rw.to_desc()?);
        }
        let layout = Layout { regions };
        layout.validate()?;
        Ok(Welcome {
            session: w.session,
            layout,
            flags: w.flags.get(),
        })
    }
}
