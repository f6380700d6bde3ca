//! One test per class of bad input; each asserts the specific error, so
//! removing the check makes it fail.

mod common;

use common::*;
use ringfault_proto::auth::{self, AuthError, PresharedKey};
use ringfault_proto::*;

const H: usize = FRAME_HEADER_LEN;

fn header(kind: u16, flags: u16, body_len: u32) -> [u8; H] {
    let mut b = [0u8; H];
    b[0..2].copy_from_slice(&kind.to_le_bytes());
    b[2..4].copy_from_slice(&flags.to_le_bytes());
    b[4..8].copy_from_slice(&body_len.to_le_bytes());
    b
}

/// Encodes `m`, lets `f` corrupt the body bytes, decodes.
fn mutate(m: Message, f: impl FnOnce(&mut Vec<u8>)) -> Result<Message, DecodeError> {
    let mut bytes = m.to_vec();
    let mut body = bytes.split_off(H);
    f(&mut body);
    let len = u32::try_from(body.len()).unwrap();
    bytes[4..8].copy_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&body);
    decode_bytes(&bytes)
}

fn pages(
    region: u32,
    kind: PageKind,
    first_page: u64,
    count: u32,
    payload_len: u32,
) -> PagesHeader {
    PagesHeader {
        region,
        kind,
        first_page,
        count,
        payload_len,
        request_id: 0,
    }
}

fn demand(region: u32, page: u64, before: u32, after: u32) -> DemandRequest {
    DemandRequest {
        request_id: 1,
        region,
        page,
        before,
        after,
    }
}

fn chunk(region: u32, first_page: u64, runs: Vec<u64>) -> RleChunk {
    RleChunk {
        region,
        first_page,
        page_count: runs.iter().sum(),
        last: true,
        runs,
    }
}

fn key(b: &[u8]) -> PresharedKey {
    PresharedKey::new(b.to_vec()).unwrap()
}

// ---- framing ------------------------------------------------------------

#[test]
fn truncated_input() {
    let bytes = Message::Hello(hello()).to_vec();
    // Streaming: not an error, just "need more".
    assert_eq!(decode_frame(&bytes[..H + 10]), Ok(None));
    assert_eq!(decode_frame(&bytes[..3]), Ok(None));
    // A body shorter than body_len.
    let header = FrameHeader::parse(bytes[..H].try_into().unwrap()).unwrap();
    assert_eq!(
        Message::decode(&header, &bytes[H..H + 10]),
        Err(DecodeError::Truncated {
            need: HELLO_BODY_LEN,
            have: 10
        })
    );
    // Variable-size bodies shorter than their fixed part.
    let rle = Message::PresentBitmap(chunk(0, 0, vec![0, 4]));
    assert_eq!(
        mutate(rle, |b| b.truncate(RLE_HEADER_LEN - 1)),
        Err(DecodeError::Truncated {
            need: RLE_HEADER_LEN,
            have: RLE_HEADER_LEN - 1
        })
    );
    let err = Message::Error(ErrorFrame::new(ErrorCode::Internal, "x"));
    assert_eq!(
        mutate(err, |b| b.truncate(3)),
        Err(DecodeError::Truncated { need: 4, have: 3 })
    );
    // Welcome announcing more regions than it carries.
    let w = Message::Welcome(Welcome {
        session: [0; 16],
        layout: layout(),
    });
    assert_eq!(
        mutate(w, |b| b.truncate(b.len() - 1)),
        Err(DecodeError::Truncated {
            need: WELCOME_HEADER_LEN + 3 * REGION_DESC_LEN,
            have: WELCOME_HEADER_LEN + 3 * REGION_DESC_LEN - 1
        })
    );
}

#[test]
fn trailing_bytes() {
    let bytes = Message::Complete(Complete { pages_present: 5 }).to_vec();
    let header = FrameHeader::parse(bytes[..H].try_into().unwrap()).unwrap();
    let mut body = bytes[H..].to_vec();
    body.push(0);
    assert_eq!(
        Message::decode(&header, &body),
        Err(DecodeError::TrailingBytes { extra: 1 })
    );
    // Welcome with one descriptor more than region_count.
    let w = Message::Welcome(Welcome {
        session: [0; 16],
        layout: layout(),
    });
    assert_eq!(
        mutate(w, |b| b.extend_from_slice(&[0; REGION_DESC_LEN])),
        Err(DecodeError::TrailingBytes {
            extra: REGION_DESC_LEN
        })
    );
}

#[test]
fn oversized_lengths() {
    let too_big = u32::try_from(MAX_BODY_LEN + 1).unwrap();
    let h = header(MsgKind::Welcome as u16, 0, too_big);
    let expected = DecodeError::BodyTooLarge {
        len: u64::from(too_big),
        max: MAX_BODY_LEN,
    };
    assert_eq!(FrameHeader::parse(&h), Err(expected.clone()));
    // decode_frame fails at once: it does not wait for 64 KiB that will never be accepted.
    assert_eq!(decode_frame(&h), Err(expected));
    assert_eq!(
        FrameHeader::parse(&header(MsgKind::Error as u16, 0, u32::MAX)),
        Err(DecodeError::BodyTooLarge {
            len: u64::from(u32::MAX),
            max: MAX_BODY_LEN
        })
    );
    // Fixed-size kinds must have exactly their size.
    assert_eq!(
        FrameHeader::parse(&header(MsgKind::Pages as u16, 0, 33)),
        Err(DecodeError::BadBodyLength {
            kind: MsgKind::Pages,
            len: 33,
            expected: PAGES_BODY_LEN
        })
    );
    assert_eq!(
        FrameHeader::parse(&header(MsgKind::Release as u16, 0, 1)),
        Err(DecodeError::BadBodyLength {
            kind: MsgKind::Release,
            len: 1,
            expected: 0
        })
    );
    // Message::decode re-checks for headers built by hand.
    let h = FrameHeader {
        kind: MsgKind::Demand,
        body_len: 8,
    };
    assert_eq!(
        Message::decode(&h, &[0; 8]),
        Err(DecodeError::BadBodyLength {
            kind: MsgKind::Demand,
            len: 8,
            expected: DEMAND_BODY_LEN
        })
    );
}

#[test]
fn unknown_kinds_and_flags() {
    assert_eq!(
        FrameHeader::parse(&header(0, 0, 0)),
        Err(DecodeError::UnknownKind(0))
    );
    assert_eq!(
        FrameHeader::parse(&header(13, 0, 0)),
        Err(DecodeError::UnknownKind(13))
    );
    assert_eq!(
        FrameHeader::parse(&header(0xffff, 0, 0)),
        Err(DecodeError::UnknownKind(0xffff))
    );
    assert_eq!(
        FrameHeader::parse(&header(MsgKind::Release as u16, 0x8000, 0)),
        Err(DecodeError::NonzeroFlags { flags: 0x8000 })
    );
    assert_eq!(
        Message::decode(
            &FrameHeader {
                kind: MsgKind::Invalid,
                body_len: 0
            },
            &[]
        ),
        Err(DecodeError::UnknownKind(0))
    );
}

// ---- handshake ----------------------------------------------------------

#[test]
fn bad_magic_and_version() {
    let h = Message::Hello(hello());
    assert_eq!(
        mutate(h.clone(), |b| b[0] ^= 1),
        Err(DecodeError::BadMagic(MAGIC ^ 1))
    );
    assert_eq!(
        mutate(h, |b| b[8] = 2),
        Err(DecodeError::UnsupportedVersion {
            got: 2,
            supported: VERSION
        })
    );
    let k = key(b"0123456789abcdef");
    let c = Message::Challenge(challenge(&k, &hello()));
    assert_eq!(
        mutate(c.clone(), |b| b[7] = 0),
        Err(DecodeError::BadMagic(MAGIC & !(0xff << 56)))
    );
    assert_eq!(
        mutate(c, |b| b[9] = 1),
        Err(DecodeError::UnsupportedVersion {
            got: 0x101,
            supported: VERSION
        })
    );
    assert_eq!(
        DecodeError::UnsupportedVersion {
            got: 2,
            supported: 1
        }
        .error_code(),
        ErrorCode::VersionMismatch
    );
}

#[test]
fn bad_enums() {
    let h = Message::Hello(hello());
    assert_eq!(
        mutate(h.clone(), |b| b[10] = 0),
        Err(DecodeError::BadEnum {
            field: "hello.role",
            value: 0
        })
    );
    assert_eq!(
        mutate(h.clone(), |b| b[10] = 3),
        Err(DecodeError::BadEnum {
            field: "hello.role",
            value: 3
        })
    );
    assert_eq!(
        mutate(h.clone(), |b| b[10] = Role::Source as u8),
        Err(DecodeError::WrongRole {
            message: "Hello",
            expected: Role::Destination,
            got: Role::Source
        })
    );
    assert_eq!(
        mutate(h.clone(), |b| b[11] = 0),
        Err(DecodeError::BadEnum {
            field: "hello.lane",
            value: 0
        })
    );
    assert_eq!(
        mutate(h.clone(), |b| b[40] = 2),
        Err(DecodeError::BadEnum {
            field: "hello.resume",
            value: 2
        })
    );
    assert_eq!(
        mutate(h, |b| b[47] = 1),
        Err(DecodeError::ReservedNonzero {
            field: "hello.reserved"
        })
    );

    let k = key(b"0123456789abcdef");
    let c = Message::Challenge(challenge(&k, &hello()));
    assert_eq!(
        mutate(c.clone(), |b| b[10] = Role::Destination as u8),
        Err(DecodeError::WrongRole {
            message: "Challenge",
            expected: Role::Source,
            got: Role::Destination
        })
    );
    assert_eq!(
        mutate(c, |b| b[10] = 9),
        Err(DecodeError::BadEnum {
            field: "challenge.role",
            value: 9
        })
    );

    let p = Message::Pages(pages(0, PageKind::Zero, 0, 1, 0));
    assert_eq!(
        mutate(p.clone(), |b| b[4] = 0),
        Err(DecodeError::BadEnum {
            field: "pages.kind",
            value: 0
        })
    );
    assert_eq!(
        mutate(p.clone(), |b| b[4] = 4),
        Err(DecodeError::BadEnum {
            field: "pages.kind",
            value: 4
        })
    );
    assert_eq!(
        mutate(p, |b| b[5] = 1),
        Err(DecodeError::ReservedNonzero {
            field: "pages.reserved"
        })
    );

    let e = Message::Error(ErrorFrame::new(ErrorCode::Shutdown, "bye"));
    assert_eq!(
        mutate(e.clone(), |b| b[0] = 0),
        Err(DecodeError::BadEnum {
            field: "error.code",
            value: 0
        })
    );
    assert_eq!(
        mutate(e, |b| b[0] = 7),
        Err(DecodeError::BadEnum {
            field: "error.code",
            value: 7
        })
    );

    let w = Message::Welcome(Welcome {
        session: [0; 16],
        layout: layout(),
    });
    // First descriptor's page_shift at 24 + 4.
    assert_eq!(
        mutate(w.clone(), |b| b[28] = 13),
        Err(DecodeError::BadPageShift(13))
    );
    assert_eq!(mutate(w, |b| b[28] = 0), Err(DecodeError::BadPageShift(0)));
}

#[test]
fn bad_channel() {
    let mut h = hello();
    h.channel = 4; // == channel_count
    assert_eq!(
        reencode(&Message::Hello(h)).1,
        Err(DecodeError::BadChannel {
            channel: 4,
            count: 4,
            max: MAX_CHANNELS
        })
    );
    h.channel = 0;
    h.channel_count = 0;
    assert_eq!(
        reencode(&Message::Hello(h)).1,
        Err(DecodeError::BadChannel {
            channel: 0,
            count: 0,
            max: MAX_CHANNELS
        })
    );
    h.channel_count = MAX_CHANNELS + 1;
    assert!(matches!(
        reencode(&Message::Hello(h)).1,
        Err(DecodeError::BadChannel { .. })
    ));
}

#[test]
fn too_many_regions() {
    let w = Message::Welcome(Welcome {
        session: [0; 16],
        layout: Layout::default(),
    });
    let count = u32::try_from(MAX_REGIONS + 1).unwrap();
    // Rejected from the count alone, before any descriptor is read.
    assert_eq!(
        mutate(w, |b| b[16..20].copy_from_slice(&count.to_le_bytes())),
        Err(DecodeError::TooManyRegions {
            count: u64::from(count),
            max: MAX_REGIONS
        })
    );
    let layout = Layout {
        regions: (0..=u32::try_from(MAX_REGIONS).unwrap())
            .map(|id| RegionDesc {
                id,
                page_size: PageSize::Size4K,
                size: 4096,
            })
            .collect(),
    };
    assert!(matches!(
        layout.validate(),
        Err(DecodeError::TooManyRegions { .. })
    ));
}

#[test]
fn bad_layouts() {
    let mut l = layout();
    l.regions[2].id = 0;
    let w = Message::Welcome(Welcome {
        session: [0; 16],
        layout: l,
    });
    assert_eq!(
        reencode(&w).1,
        Err(DecodeError::DuplicateRegion { region: 0 })
    );

    let mut l = layout();
    l.regions[1].size += 4096; // not a multiple of 2 MiB
    let w = Message::Welcome(Welcome {
        session: [0; 16],
        layout: l.clone(),
    });
    assert_eq!(
        reencode(&w).1,
        Err(DecodeError::RegionSize {
            region: 7,
            size: l.regions[1].size,
            page_size: 2 << 20
        })
    );
    let mut l = layout();
    l.regions[0].size = 0;
    assert_eq!(
        l.validate(),
        Err(DecodeError::RegionSize {
            region: 0,
            size: 0,
            page_size: 4096
        })
    );

    let w = Message::Welcome(Welcome {
        session: [0; 16],
        layout: layout(),
    });
    assert_eq!(
        mutate(w.clone(), |b| b[20] = 1),
        Err(DecodeError::ReservedNonzero {
            field: "welcome.reserved"
        })
    );
    assert_eq!(
        mutate(w, |b| b[29] = 1),
        Err(DecodeError::ReservedNonzero {
            field: "welcome.region.reserved"
        })
    );
}

// ---- page references against the layout --------------------------------

#[test]
fn region_outside_layout() {
    let l = layout();
    assert_eq!(
        pages(1, PageKind::Zero, 0, 1, 0).validate(&l),
        Err(DecodeError::UnknownRegion { region: 1 })
    );
    assert_eq!(
        demand(1, 0, 0, 0).validate(&l),
        Err(DecodeError::UnknownRegion { region: 1 })
    );
    assert_eq!(
        chunk(1, 0, vec![1]).validate(&l),
        Err(DecodeError::UnknownRegion { region: 1 })
    );
    assert_eq!(
        DecodeError::UnknownRegion { region: 1 }.error_code(),
        ErrorCode::LayoutMismatch
    );
}

#[test]
fn page_outside_region() {
    let l = layout();
    let oob = |page, count| DecodeError::PageOutOfRange {
        region: 0,
        page,
        count,
        region_pages: 1024,
    };
    assert_eq!(
        pages(0, PageKind::Zero, 1023, 2, 0).validate(&l),
        Err(oob(1023, 2))
    );
    assert_eq!(
        pages(0, PageKind::Zero, 1024, 1, 0).validate(&l),
        Err(oob(1024, 1))
    );
    assert_eq!(pages(0, PageKind::Zero, 1023, 1, 0).validate(&l), Ok(0));
    assert_eq!(demand(0, 1024, 0, 0).validate(&l), Err(oob(1024, 1)));
    assert_eq!(demand(0, 1023, 0, 0).validate(&l), Ok(()));
    assert_eq!(chunk(0, 1000, vec![20, 5]).validate(&l), Err(oob(1000, 25)));
    assert_eq!(chunk(0, 1000, vec![20, 4]).validate(&l), Ok(()));
    let msg = oob(1023, 2).to_string();
    assert!(msg.contains("0x3ff") && msg.contains("0x400"), "{msg}");
}

#[test]
fn count_overflow() {
    let l = layout();
    let h = pages(0, PageKind::Zero, u64::MAX - 1, 5, 0);
    assert_eq!(
        h.validate(&l),
        Err(DecodeError::Overflow {
            what: "first page + page count",
            base: u64::MAX - 1,
            add: 5
        })
    );
    assert!(matches!(
        demand(0, u64::MAX, 0, 0).validate(&l),
        Err(DecodeError::Overflow { .. })
    ));
    // An RLE chunk whose range overflows fails at decode already.
    let c = Message::DiscardList(chunk(0, u64::MAX - 3, vec![2, 2]));
    assert_eq!(
        reencode(&c).1,
        Err(DecodeError::Overflow {
            what: "RLE first page + page count",
            base: u64::MAX - 3,
            add: 4
        })
    );
    // Runs whose sum overflows.
    let c = RleChunk {
        region: 0,
        first_page: 0,
        page_count: 1,
        last: true,
        runs: vec![u64::MAX, 2],
    };
    assert!(matches!(
        reencode(&Message::DiscardList(c)).1,
        Err(DecodeError::Overflow {
            what: "RLE run sum",
            ..
        })
    ));
}

#[test]
fn count_limits() {
    let l = layout();
    assert_eq!(
        pages(0, PageKind::Zero, 0, 0, 0).validate(&l),
        Err(DecodeError::ZeroCount)
    );
    let big = Layout {
        regions: vec![RegionDesc {
            id: 0,
            page_size: PageSize::Size4K,
            size: 1 << 40,
        }],
    };
    assert_eq!(
        pages(0, PageKind::Zero, 0, MAX_PAGES_PER_FRAME + 1, 0).validate(&big),
        Err(DecodeError::CountTooLarge {
            count: u64::from(MAX_PAGES_PER_FRAME) + 1,
            max: u64::from(MAX_PAGES_PER_FRAME)
        })
    );
    assert_eq!(
        pages(0, PageKind::Zero, 0, MAX_PAGES_PER_FRAME, 0).validate(&big),
        Ok(0)
    );
}

#[test]
fn payload_length_mismatch() {
    let l = layout();
    assert_eq!(pages(0, PageKind::Data, 0, 2, 8192).validate(&l), Ok(8192));
    assert_eq!(
        pages(0, PageKind::Data, 0, 2, 4096).validate(&l),
        Err(DecodeError::PayloadLength {
            expected: 8192,
            got: 4096
        })
    );
    assert_eq!(
        pages(0, PageKind::Data, 0, 1, 0).validate(&l),
        Err(DecodeError::PayloadLength {
            expected: 4096,
            got: 0
        })
    );
    assert_eq!(
        pages(0, PageKind::Zero, 0, 1, 4096).validate(&l),
        Err(DecodeError::PayloadForNonData {
            kind: PageKind::Zero,
            payload_len: 4096
        })
    );
    assert_eq!(
        pages(0, PageKind::Unpopulated, 0, 1, 1).validate(&l),
        Err(DecodeError::PayloadForNonData {
            kind: PageKind::Unpopulated,
            payload_len: 1
        })
    );
    // One 1 GiB page is the most one frame may carry; two are too many.
    assert_eq!(
        pages(9, PageKind::Data, 1, 1, 1 << 30).validate(&l),
        Ok(1 << 30)
    );
    assert_eq!(
        pages(9, PageKind::Data, 0, 2, u32::MAX).validate(&l),
        Err(DecodeError::PayloadTooLarge {
            len: 2 << 30,
            max: 1 << 30
        })
    );
}

#[test]
fn demand_limits() {
    let l = layout();
    assert_eq!(
        demand(0, 5, MAX_PREFETCH + 1, 0).validate(&l),
        Err(DecodeError::PrefetchTooLarge {
            before: MAX_PREFETCH + 1,
            after: 0,
            max: MAX_PREFETCH
        })
    );
    assert_eq!(
        demand(0, 5, 0, MAX_PREFETCH + 1).validate(&l),
        Err(DecodeError::PrefetchTooLarge {
            before: 0,
            after: MAX_PREFETCH + 1,
            max: MAX_PREFETCH
        })
    );
    assert_eq!(
        demand(0, 5, MAX_PREFETCH, MAX_PREFETCH).validate(&l),
        Ok(())
    );
    let mut d = demand(0, 5, 0, 0);
    d.request_id = 0;
    assert_eq!(d.validate(&l), Err(DecodeError::ZeroRequestId));
    let m = Message::Demand(demand(0, 5, 0, 0));
    assert_eq!(
        mutate(m, |b| b[31] = 1),
        Err(DecodeError::ReservedNonzero {
            field: "demand.reserved"
        })
    );
}

// ---- RLE ------------------------------------------------------------------

#[test]
fn rle_sum_mismatch() {
    let c = RleChunk {
        region: 0,
        first_page: 0,
        page_count: 10,
        last: true,
        runs: vec![3, 4],
    };
    assert_eq!(
        c.validate(&layout()),
        Err(DecodeError::RleSumMismatch {
            sum: 7,
            expected: 10
        })
    );
    assert_eq!(
        reencode(&Message::PresentBitmap(c)).1,
        Err(DecodeError::RleSumMismatch {
            sum: 7,
            expected: 10
        })
    );
    let empty = RleChunk {
        region: 0,
        first_page: 0,
        page_count: 1,
        last: true,
        runs: vec![],
    };
    assert_eq!(
        reencode(&Message::PresentBitmap(empty)).1,
        Err(DecodeError::RleSumMismatch {
            sum: 0,
            expected: 1
        })
    );
    let zero = RleChunk {
        region: 0,
        first_page: 0,
        page_count: 0,
        last: true,
        runs: vec![],
    };
    assert_eq!(
        reencode(&Message::PresentBitmap(zero)).1,
        Err(DecodeError::ZeroCount)
    );
}

#[test]
fn rle_zero_run() {
    let c = chunk(0, 0, vec![0, 3, 0, 2]);
    assert_eq!(
        c.validate(&layout()),
        Err(DecodeError::RleZeroRun { index: 2 })
    );
    assert_eq!(
        reencode(&Message::DiscardList(c)).1,
        Err(DecodeError::RleZeroRun { index: 2 })
    );
    // A leading empty clear run is how a chunk starts with set pages.
    assert_eq!(chunk(0, 0, vec![0, 3]).validate(&layout()), Ok(()));
}

#[test]
fn rle_bad_varint() {
    let m = Message::PresentBitmap(chunk(0, 0, vec![1, 127]));
    // Unterminated: last byte has the continuation bit.
    assert_eq!(
        mutate(m.clone(), |b| *b.last_mut().unwrap() |= 0x80),
        Err(DecodeError::BadVarint { offset: 1 })
    );
    // Overlong: 0x81 0x00 encodes 1 in two bytes.
    assert_eq!(
        mutate(m.clone(), |b| {
            b.truncate(RLE_HEADER_LEN);
            b.extend_from_slice(&[0x81, 0x00]);
        }),
        Err(DecodeError::BadVarint { offset: 0 })
    );
    // Above u64::MAX.
    assert_eq!(
        mutate(m, |b| {
            b.truncate(RLE_HEADER_LEN + 2);
            b.extend_from_slice(&[0xff; 9]);
            b.push(0x02);
        }),
        Err(DecodeError::BadVarint { offset: 2 })
    );
}

#[test]
fn rle_too_long() {
    let runs: Vec<u64> = std::iter::once(0)
        .chain(std::iter::repeat_n(1, MAX_RLE_CHUNK))
        .collect();
    let c = chunk(0, 0, runs);
    assert_eq!(
        c.validate(&layout()),
        Err(DecodeError::RleTooLarge {
            len: MAX_RLE_CHUNK + 1,
            max: MAX_RLE_CHUNK
        })
    );
    // On the wire the body is within MAX_BODY_LEN, so only the RLE limit catches it.
    let bytes = Message::PresentBitmap(c).to_vec();
    assert!(bytes.len() - H <= MAX_BODY_LEN);
    assert_eq!(
        decode_bytes(&bytes),
        Err(DecodeError::RleTooLarge {
            len: MAX_RLE_CHUNK + 1,
            max: MAX_RLE_CHUNK
        })
    );
}

#[test]
fn rle_reserved_flags() {
    let m = Message::PresentBitmap(chunk(0, 0, vec![1]));
    assert_eq!(
        mutate(m, |b| b[4] = 2),
        Err(DecodeError::ReservedNonzero { field: "rle.flags" })
    );
}

// ---- error frames ---------------------------------------------------------

#[test]
fn error_message_checks() {
    let m = Message::Error(ErrorFrame::new(ErrorCode::Protocol, "bad"));
    assert_eq!(
        mutate(m.clone(), |b| b[5] = 0xff),
        Err(DecodeError::BadUtf8 { valid_up_to: 1 })
    );
    assert_eq!(
        mutate(m.clone(), |b| b
            .resize(ERROR_HEADER_LEN + MAX_ERROR_MESSAGE + 1, b'a')),
        Err(DecodeError::MessageTooLong {
            len: MAX_ERROR_MESSAGE + 1,
            max: MAX_ERROR_MESSAGE
        })
    );
    assert_eq!(
        mutate(m, |b| b[2] = 1),
        Err(DecodeError::ReservedNonzero {
            field: "error.reserved"
        })
    );
}

// ---- authentication -------------------------------------------------------

#[test]
fn handshake_with_same_key_verifies() {
    let k = key(b"correct horse battery staple");
    let h = hello();
    let c = challenge(&k, &h);
    assert_eq!(auth::verify_source(&k, &h, &c), Ok(()));
    let p = Proof {
        mac: auth::destination_mac(&k, &h, &c),
    };
    assert_eq!(auth::verify_destination(&k, &h, &c, &p), Ok(()));
    // The tags bind the messages: a flipped capability bit breaks the proof.
    let mut c2 = c;
    c2.capabilities = Capabilities(c.capabilities.0 ^ 1);
    assert_eq!(
        auth::verify_destination(&k, &h, &c2, &p),
        Err(AuthError::WrongKey)
    );
    // ... and a different Hello nonce breaks the source's tag.
    let mut h2 = h;
    h2.nonce[0] ^= 1;
    assert_eq!(auth::verify_source(&k, &h2, &c), Err(AuthError::WrongKey));
}

#[test]
fn wrong_key_fails_both_sides() {
    let source_key = key(b"source key 0123456789");
    let dest_key = key(b"destination key 0123");
    let h = hello();
    let c = challenge(&source_key, &h);
    assert_eq!(
        auth::verify_source(&dest_key, &h, &c),
        Err(AuthError::WrongKey)
    );
    let p = Proof {
        mac: auth::destination_mac(&dest_key, &h, &c),
    };
    assert_eq!(
        auth::verify_destination(&source_key, &h, &c, &p),
        Err(AuthError::WrongKey)
    );
    assert_eq!(
        AuthError::WrongKey.to_string(),
        "peer failed authentication: pre-shared keys differ"
    );
}

#[test]
fn session_mismatch() {
    let k = key(b"0123456789abcdef");
    let h = hello();
    let mut c = challenge(&k, &h);
    c.session = [0; 16];
    assert!(matches!(
        auth::verify_source(&k, &h, &c),
        Err(AuthError::SessionMismatch { .. })
    ));
}

#[test]
fn key_parsing() {
    assert_eq!(
        PresharedKey::new(vec![7; 15]).unwrap_err(),
        AuthError::KeyTooShort { len: 15, min: 16 }
    );
    assert_eq!(
        PresharedKey::from_file_contents(b"short-key-15byt \n\n").unwrap_err(),
        AuthError::KeyTooShort { len: 15, min: 16 }
    );
    // Trailing newline is not part of the key.
    let a = PresharedKey::from_file_contents(b"0123456789abcdef\r\n").unwrap();
    let b = key(b"0123456789abcdef");
    let h = hello();
    assert_eq!(auth::verify_source(&a, &h, &challenge(&b, &h)), Ok(()));
    // Raw binary keys are accepted as they are.
    assert!(PresharedKey::from_file_contents(&[
        0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 255
    ])
    .is_ok());
    assert_eq!(format!("{a:?}"), "PresharedKey(<redacted>)");
}
