//! Decode and validation errors.
//!
//! Every way a peer's bytes can be wrong has its own variant with the
//! offending values, so the engine can log one precise line and map the
//! failure to an [`ErrorCode`] for the [`ErrorFrame`](crate::ErrorFrame) it
//! sends before closing.

use crate::control::ErrorCode;
use crate::frame::MsgKind;
use crate::handshake::Role;

/// Why bytes from the peer (or a message built locally) are not a valid
/// ringfault message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends before the structure does.
    #[error("truncated input: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Bytes are left after the structure ended.
    #[error("{extra} trailing bytes after the end of the message")]
    TrailingBytes {
        /// Number of bytes left over.
        extra: usize,
    },
    /// The frame kind is not one this version knows (0 is `Invalid`).
    #[error("unknown frame kind {0:#06x}")]
    UnknownKind(u16),
    /// The frame header's flags field must be zero in version 1.
    #[error("frame flags must be zero, got {flags:#06x}")]
    NonzeroFlags {
        /// The flags received.
        flags: u16,
    },
    /// A frame body longer than [`MAX_BODY_LEN`](crate::MAX_BODY_LEN).
    #[error("frame body of {len:#x} bytes exceeds the maximum of {max:#x}")]
    BodyTooLarge {
        /// The announced body length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A fixed-size message whose body length is not its fixed size.
    #[error("{kind:?} body must be {expected} bytes, got {len}")]
    BadBodyLength {
        /// The message kind.
        kind: MsgKind,
        /// The body length received.
        len: usize,
        /// The body length this kind always has.
        expected: usize,
    },
    /// `Hello`/`Challenge` did not start with [`MAGIC`](crate::MAGIC).
    #[error("bad magic {0:#018x}: peer does not speak ringfault")]
    BadMagic(u64),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {got}, this build supports only {supported}")]
    UnsupportedVersion {
        /// Version the peer sent.
        got: u16,
        /// The version this build speaks.
        supported: u16,
    },
    /// An enum field holds a value that is `Invalid` (0) or unknown.
    #[error("invalid value {value:#x} for field {field}")]
    BadEnum {
        /// `message.field` name.
        field: &'static str,
        /// The raw value received.
        value: u64,
    },
    /// A reserved field or reserved bits are not zero.
    #[error("reserved field {field} must be zero")]
    ReservedNonzero {
        /// `message.field` name.
        field: &'static str,
    },
    /// `Hello` must come from the destination, `Challenge` from the source.
    #[error("{message} must be sent by the {expected:?}, but says it is from the {got:?}")]
    WrongRole {
        /// The message that carried the role.
        message: &'static str,
        /// Role the sender of this message must have.
        expected: Role,
        /// Role it claims.
        got: Role,
    },
    /// `channel` must be below `channel_count`, which must be in `1..=MAX_CHANNELS`.
    #[error("channel {channel} of {count} is invalid (at most {max} channels)")]
    BadChannel {
        /// Channel index.
        channel: u16,
        /// Channel count.
        count: u16,
        /// [`MAX_CHANNELS`](crate::MAX_CHANNELS).
        max: u16,
    },
    /// A page shift other than 12, 21 or 30.
    #[error("unsupported page shift {0} (expected 12, 21 or 30)")]
    BadPageShift(u8),
    /// More than [`MAX_REGIONS`](crate::MAX_REGIONS) regions.
    #[error("layout has {count} regions, at most {max} are allowed")]
    TooManyRegions {
        /// Region count announced.
        count: u64,
        /// The limit.
        max: usize,
    },
    /// Two regions share an id.
    #[error("region id {region} appears twice in the layout")]
    DuplicateRegion {
        /// The repeated id.
        region: u32,
    },
    /// A region's size is zero or not a multiple of its page size.
    #[error(
        "region {region} size {size:#x} is not a nonzero multiple of its page size {page_size:#x}"
    )]
    RegionSize {
        /// Region id.
        region: u32,
        /// Its size in bytes.
        size: u64,
        /// Its page size in bytes.
        page_size: u64,
    },
    /// A region id not in the negotiated layout.
    #[error("region {region} is not in the negotiated layout")]
    UnknownRegion {
        /// The id received.
        region: u32,
    },
    /// Pages `[page, page + count)` do not lie inside the region.
    #[error("pages {page:#x}..+{count:#x} lie outside region {region} ({region_pages:#x} pages)")]
    PageOutOfRange {
        /// Region id.
        region: u32,
        /// First page index.
        page: u64,
        /// Number of pages.
        count: u64,
        /// Pages in the region.
        region_pages: u64,
    },
    /// A page count of zero where at least one page is required.
    #[error("page count is zero")]
    ZeroCount,
    /// More pages in one frame than allowed.
    #[error("{count:#x} pages in one frame, at most {max:#x} allowed")]
    CountTooLarge {
        /// Count received.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// The `Data` payload length is not `count * page_size`.
    #[error("payload length {got:#x} does not match count * page size = {expected:#x}")]
    PayloadLength {
        /// `count * page_size`.
        expected: u64,
        /// `payload_len` received.
        got: u64,
    },
    /// `count * page_size` exceeds [`MAX_PAYLOAD_LEN`](crate::MAX_PAYLOAD_LEN).
    #[error("payload of {len:#x} bytes exceeds the maximum of {max:#x}")]
    PayloadTooLarge {
        /// `count * page_size`.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A `Zero`/`Unpopulated` Pages frame announced a payload.
    #[error("{kind:?} pages carry no payload, but payload_len is {payload_len:#x}")]
    PayloadForNonData {
        /// The page kind.
        kind: crate::pages::PageKind,
        /// `payload_len` received.
        payload_len: u32,
    },
    /// A `Pages` pad longer than [`crate::MAX_PAD_LEN`].
    #[error("pad of {pad_len} bytes before a payload, at most {max} allowed")]
    PadTooLarge {
        /// Pad bytes announced.
        pad_len: u16,
        /// [`crate::MAX_PAD_LEN`].
        max: u16,
    },
    /// A prefetch window exceeds [`crate::MAX_PREFETCH`].
    #[error("prefetch window before={before} after={after} exceeds {max} pages per side")]
    PrefetchTooLarge {
        /// Pages requested before the faulting page.
        before: u16,
        /// Pages requested after it.
        after: u16,
        /// The limit.
        max: u16,
    },
    /// Demand requests must have a nonzero id (0 marks background Pages).
    #[error("demand request id 0 is reserved for background pages")]
    ZeroRequestId,
    /// A LEB128 varint is unterminated, longer than 10 bytes, above
    /// `u64::MAX`, or not in its shortest form.
    #[error("bad varint at byte offset {offset}")]
    BadVarint {
        /// Offset of the varint's first byte within the run bytes.
        offset: usize,
    },
    /// RLE runs do not add up to the chunk's page count.
    #[error("RLE runs cover {sum:#x} pages, the chunk says {expected:#x}")]
    RleSumMismatch {
        /// Sum of the runs.
        sum: u64,
        /// `page_count` of the chunk.
        expected: u64,
    },
    /// A zero-length run other than the first one.
    #[error("RLE run {index} has length zero (only the first run may)")]
    RleZeroRun {
        /// Index of the run.
        index: usize,
    },
    /// The encoded runs exceed [`MAX_RLE_CHUNK`](crate::MAX_RLE_CHUNK) bytes.
    #[error("RLE chunk of {len} encoded bytes exceeds the maximum of {max}")]
    RleTooLarge {
        /// Encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An addition of page indices or counts overflows `u64`.
    #[error("{what}: {base:#x} + {add:#x} overflows u64")]
    Overflow {
        /// What was being added.
        what: &'static str,
        /// Left operand.
        base: u64,
        /// Right operand.
        add: u64,
    },
    /// The error message is not UTF-8.
    #[error("error message is not UTF-8 (valid up to byte {valid_up_to})")]
    BadUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The error message exceeds [`MAX_ERROR_MESSAGE`](crate::MAX_ERROR_MESSAGE).
    #[error("error message of {len} bytes exceeds the maximum of {max}")]
    MessageTooLong {
        /// Length received.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl DecodeError {
    /// The [`ErrorCode`] to send to the peer when its input failed this way.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion { .. } => ErrorCode::VersionMismatch,
            DecodeError::UnknownRegion { .. } | DecodeError::PageOutOfRange { .. } => {
                ErrorCode::LayoutMismatch
            }
            _ => ErrorCode::Protocol,
        }
    }
}
