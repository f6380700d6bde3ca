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
        pad_len: 0,
        first_page,
        count,
        payload_len,
        request_id: 0,
    }
}

fn entry(region: u32, page: u64, before: u16, after: u16) -> DemandEntry {
    DemandEntry {
        region,
        page,
        before,
        after,
    }
}

/// A one-entry demand with request id 1.
fn demand(region: u32, page: u64, before: u16, after: u16) -> DemandRequest {
    DemandRequest {
        request_id: 1,
        entries: vec![entry(region, page, before, after)],
    }
}

/// A demand with `n` valid entries (pages of region 0) and request id 1.
fn demand_batch(n: usize) -> DemandRequest {
    DemandRequest {
        request_id: 1,
        entries: (0..n)
            .map(|i| entry(0, u64::try_from(i).unwrap() % 1024, 1, 1))
            .collect(),
    }
}

fn digests(region: u32, pages_per_digest: u32, first_page: u64, n: usize) -> Digests {
    Digests {
        region,
        pages_per_digest,
        first_page,
        digests: (0..u64::try_from(n).unwrap()).collect(),
    }
}

/// A layout with one huge 4 KiB-page region, id 0, of `pages` pages.
fn big_layout(pages: u64) -> Layout {
    Layout {
        regions: vec![RegionDesc {
            id: 0,
            page_size: PageSize::Size4K,
            size: pages << 12,
        }],
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
        flags: 0,
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
        flags: 0,
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
    assert_eq!(
        FrameHeader::parse(&header(MsgKind::Heartbeat as u16, 0, 1)),
        Err(DecodeError::BadBodyLength {
            kind: MsgKind::Heartbeat,
            len: 1,
            expected: 0
        })
    );
    assert_eq!(
        FrameHeader::parse(&header(MsgKind::Resumed as u16, 0, 4)),
        Err(DecodeError::BadBodyLength {
            kind: MsgKind::Resumed,
            len: 4,
            expected: COMPLETE_BODY_LEN
        })
    );
    assert_eq!(
        FrameHeader::parse(&header(MsgKind::Phase as u16, 0, 17)),
        Err(DecodeError::BadBodyLength {
            kind: MsgKind::Phase,
            len: 17,
            expected: PHASE_BODY_LEN
        })
    );
    // Message::decode re-checks for headers built by hand.
    let h = FrameHeader {
        kind: MsgKind::Phase,
        body_len: 8,
    };
    assert_eq!(
        Message::decode(&h, &[0; 8]),
        Err(DecodeError::BadBodyLength {
            kind: MsgKind::Phase,
            len: 8,
            expected: PHASE_BODY_LEN
        })
    );
    // Variable-size kinds pass the header check and fail on the body.
    let h = FrameHeader {
        kind: MsgKind::Demand,
        body_len: 8,
    };
    assert_eq!(
        Message::decode(&h, &[0; 8]),
        Err(DecodeError::Truncated {
            need: DEMAND_HEADER_LEN,
            have: 8
        })
    );
    // The largest possible Demand and Digests bodies are within MAX_BODY_LEN,
    // so only their count limits reject more entries.
    let max_demand = DEMAND_HEADER_LEN + MAX_DEMAND_ENTRIES * DEMAND_ENTRY_LEN;
    let max_digests = DIGESTS_HEADER_LEN + MAX_DIGESTS * 8;
    for (kind, len) in [
        (MsgKind::Demand, max_demand),
        (MsgKind::Digests, max_digests),
    ] {
        let len = u32::try_from(len).unwrap();
        assert_eq!(
            FrameHeader::parse(&header(kind as u16, 0, len)),
            Ok(FrameHeader {
                kind,
                body_len: len
            })
        );
    }
}

#[test]
fn unknown_kinds_and_flags() {
    assert_eq!(
        FrameHeader::parse(&header(0, 0, 0)),
        Err(DecodeError::UnknownKind(0))
    );
    // 13..=17 are new in version 2; 18 is the first unknown kind.
    assert_eq!(
        FrameHeader::parse(&header(13, 0, 0)),
        Ok(FrameHeader {
            kind: MsgKind::Heartbeat,
            body_len: 0
        })
    );
    assert_eq!(
        FrameHeader::parse(&header(18, 0, 0)),
        Err(DecodeError::UnknownKind(18))
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
    // A version 1 peer.
    assert_eq!(
        mutate(h.clone(), |b| b[8] = 1),
        Err(DecodeError::UnsupportedVersion {
            got: 1,
            supported: VERSION
        })
    );
    assert_eq!(
        mutate(h, |b| b[8] = 3),
        Err(DecodeError::UnsupportedVersion {
            got: 3,
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
            got: 0x102,
            supported: VERSION
        })
    );
    assert_eq!(
        DecodeError::UnsupportedVersion {
            got: 1,
            supported: 2
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
    // 7..=9 are new in version 2; 10 is the first unknown code.
    assert_eq!(
        mutate(e.clone(), |b| b[0] = 10),
        Err(DecodeError::BadEnum {
            field: "error.code",
            value: 10
        })
    );
    for (wire, code) in [
        (7, ErrorCode::Integrity),
        (8, ErrorCode::Timeout),
        (9, ErrorCode::Busy),
    ] {
        let Ok(Message::Error(f)) = mutate(e.clone(), |b| b[0] = wire) else {
            panic!("error code {wire} did not decode")
        };
        assert_eq!(f.code, code);
    }

    let w = Message::Welcome(Welcome {
        session: [0; 16],
        layout: layout(),
        flags: 0,
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
        flags: 0,
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
        flags: 0,
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
        flags: 0,
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
        flags: 0,
    });
    assert_eq!(
        mutate(w.clone(), |b| b[20] = 0x80),
        Err(DecodeError::ReservedNonzero {
            field: "welcome.flags"
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
    // Only Data frames are limited to MAX_PAGES_PER_FRAME (they carry a payload).
    assert_eq!(
        pages(0, PageKind::Data, 0, MAX_PAGES_PER_FRAME + 1, 0).validate(&big),
        Err(DecodeError::CountTooLarge {
            count: u64::from(MAX_PAGES_PER_FRAME) + 1,
            max: u64::from(MAX_PAGES_PER_FRAME)
        })
    );
    assert_eq!(
        pages(
            0,
            PageKind::Data,
            0,
            MAX_PAGES_PER_FRAME,
            MAX_PAGES_PER_FRAME << 12
        )
        .validate(&big),
        Ok(u64::from(MAX_PAGES_PER_FRAME) << 12)
    );
    assert_eq!(
        pages(0, PageKind::Zero, 0, MAX_PAGES_PER_FRAME + 1, 0).validate(&big),
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

// ---- handshake fields new in version 2 ---------------------------------------

#[test]
fn hello_and_challenge_bad_protection() {
    let h = Message::Hello(hello());
    let k = key(b"0123456789abcdef");
    let c = Message::Challenge(challenge(&k, &hello()));
    for bad in [0u8, 4, 0xff] {
        assert_eq!(
            mutate(h.clone(), |b| b[41] = bad),
            Err(DecodeError::BadEnum {
                field: "hello.protection",
                value: u64::from(bad)
            })
        );
        assert_eq!(
            mutate(c.clone(), |b| b[11] = bad),
            Err(DecodeError::BadEnum {
                field: "challenge.protection",
                value: u64::from(bad)
            })
        );
        assert_eq!(
            Protection::from_wire(bad, "x"),
            Err(DecodeError::BadEnum {
                field: "x",
                value: u64::from(bad)
            })
        );
    }
    for p in PROTECTIONS {
        let Ok(Message::Hello(got)) = mutate(h.clone(), |b| b[41] = p.to_wire()) else {
            panic!("{p:?}")
        };
        assert_eq!(got.protection, p);
        let Ok(Message::Challenge(got)) = mutate(c.clone(), |b| b[11] = p.to_wire()) else {
            panic!("{p:?}")
        };
        assert_eq!(got.protection, p);
    }
}

#[test]
fn hello_and_challenge_cipher() {
    let h = Message::Hello(hello());
    let k = key(b"0123456789abcdef");
    let c = Message::Challenge(challenge(&k, &hello()));
    for bad in [3u8, 0x80, 0xff] {
        assert_eq!(
            mutate(h.clone(), |b| b[43] = bad),
            Err(DecodeError::BadEnum {
                field: "hello.cipher",
                value: u64::from(bad)
            })
        );
        assert_eq!(
            mutate(c.clone(), |b| b[12] = bad),
            Err(DecodeError::BadEnum {
                field: "challenge.cipher",
                value: u64::from(bad)
            })
        );
    }
    for cipher in Cipher::ALL {
        let Ok(Message::Hello(got)) = mutate(h.clone(), |b| b[43] = cipher.to_wire()) else {
            panic!("{cipher:?}")
        };
        assert_eq!(got.cipher, cipher);
        let Ok(Message::Challenge(got)) = mutate(c.clone(), |b| b[12] = cipher.to_wire()) else {
            panic!("{cipher:?}")
        };
        assert_eq!(got.cipher, cipher);
    }
    // Without protection there is no cipher to name.
    let none = Message::Hello(Hello {
        protection: Protection::None,
        ..hello()
    });
    assert!(matches!(
        mutate(none, |b| b[43] = Cipher::ChaCha20Poly1305.to_wire()),
        Err(DecodeError::ReservedNonzero { .. })
    ));
}

#[test]
fn handshake_binds_cipher() {
    // A path that swaps the cipher breaks both tags and changes the keys.
    let k = key(b"correct horse battery staple");
    let h = hello();
    let c = challenge(&k, &h);
    let swapped = Hello {
        cipher: Cipher::ChaCha20Poly1305,
        ..h
    };
    assert_eq!(
        auth::verify_source(&k, &swapped, &c),
        Err(AuthError::WrongKey)
    );
    let p = Proof {
        mac: auth::destination_mac(&k, &h, &c),
    };
    let c_swapped = Challenge {
        cipher: Cipher::ChaCha20Poly1305,
        ..c
    };
    assert_eq!(
        auth::verify_destination(&k, &h, &c_swapped, &p),
        Err(AuthError::WrongKey)
    );
    assert_ne!(
        auth::derive_keys(&k, &h, &c, &p),
        auth::derive_keys(&k, &swapped, &c_swapped, &p)
    );
}

#[test]
fn hello_unknown_lane_flags() {
    let h = Message::Hello(hello());
    for flags in [2u8, 0x80, 0xff, LANE_ALIGN_PAYLOAD | 4] {
        assert_eq!(
            mutate(h.clone(), |b| b[42] = flags),
            Err(DecodeError::ReservedNonzero {
                field: "hello.lane_flags"
            })
        );
    }
    for flags in [0, LANE_ALIGN_PAYLOAD] {
        let Ok(Message::Hello(got)) = mutate(h.clone(), |b| b[42] = flags) else {
            panic!("lane_flags {flags}")
        };
        assert_eq!(got.lane_flags, flags);
    }
}

#[test]
fn challenge_reserved() {
    let k = key(b"0123456789abcdef");
    let c = Message::Challenge(challenge(&k, &hello()));
    for i in 13..16 {
        assert_eq!(
            mutate(c.clone(), |b| b[i] = 1),
            Err(DecodeError::ReservedNonzero {
                field: "challenge.reserved"
            }),
            "byte {i}"
        );
    }
}

#[test]
fn handshake_binds_protection() {
    // A path that downgrades the protection mode breaks both tags.
    let k = key(b"correct horse battery staple");
    let h = hello();
    let c = challenge(&k, &h);
    let downgraded = Hello {
        protection: Protection::None,
        ..h
    };
    assert_eq!(
        auth::verify_source(&k, &downgraded, &c),
        Err(AuthError::WrongKey)
    );
    let p = Proof {
        mac: auth::destination_mac(&k, &h, &c),
    };
    let c_none = Challenge {
        protection: Protection::None,
        ..c
    };
    assert_eq!(
        auth::verify_destination(&k, &h, &c_none, &p),
        Err(AuthError::WrongKey)
    );
    // ... and changes the frame keys.
    assert_ne!(
        auth::derive_keys(&k, &h, &c, &p),
        auth::derive_keys(&k, &h, &c_none, &p)
    );
}

// ---- Demand batches ------------------------------------------------------------

#[test]
fn demand_zero_entries() {
    // Built locally.
    let empty = DemandRequest {
        request_id: 1,
        entries: vec![],
    };
    assert_eq!(empty.validate(&layout()), Err(DecodeError::ZeroCount));
    // On the wire: the header alone.
    assert_eq!(
        reencode(&Message::Demand(empty)).1,
        Err(DecodeError::ZeroCount)
    );
    // A count of 0 with an entry behind it.
    assert_eq!(
        mutate(Message::Demand(demand(0, 5, 0, 0)), |b| b[8] = 0),
        Err(DecodeError::ZeroCount)
    );
}

#[test]
fn demand_too_many_entries() {
    let max = demand_batch(MAX_DEMAND_ENTRIES);
    assert_eq!(max.validate(&layout()), Ok(()));
    assert_eq!(
        reencode(&Message::Demand(max.clone())).1,
        Ok(Message::Demand(max))
    );
    let over = demand_batch(MAX_DEMAND_ENTRIES + 1);
    let expected = DecodeError::CountTooLarge {
        count: 257,
        max: 256,
    };
    assert_eq!(over.validate(&layout()), Err(expected.clone()));
    assert_eq!(reencode(&Message::Demand(over)).1, Err(expected.clone()));
    // Rejected from the count alone: no entry is read.
    assert_eq!(
        mutate(Message::Demand(demand(0, 5, 0, 0)), |b| b[8..10]
            .copy_from_slice(&257u16.to_le_bytes())),
        Err(expected)
    );
    assert_eq!(
        mutate(Message::Demand(demand(0, 5, 0, 0)), |b| b[8..10]
            .copy_from_slice(&u16::MAX.to_le_bytes())),
        Err(DecodeError::CountTooLarge {
            count: u64::from(u16::MAX),
            max: 256
        })
    );
}

#[test]
fn demand_truncated_entries() {
    let m = Message::Demand(demand_batch(3));
    let full = DEMAND_HEADER_LEN + 3 * DEMAND_ENTRY_LEN;
    // Half an entry missing.
    assert_eq!(
        mutate(m.clone(), |b| b.truncate(full - 8)),
        Err(DecodeError::Truncated {
            need: full,
            have: full - 8
        })
    );
    // A whole entry missing.
    assert_eq!(
        mutate(m.clone(), |b| b.truncate(full - DEMAND_ENTRY_LEN)),
        Err(DecodeError::Truncated {
            need: full,
            have: full - DEMAND_ENTRY_LEN
        })
    );
    // The count says more than there are.
    assert_eq!(
        mutate(m.clone(), |b| b[8] = 200),
        Err(DecodeError::Truncated {
            need: DEMAND_HEADER_LEN + 200 * DEMAND_ENTRY_LEN,
            have: full
        })
    );
    // Shorter than the fixed part.
    assert_eq!(
        mutate(m, |b| b.truncate(DEMAND_HEADER_LEN - 1)),
        Err(DecodeError::Truncated {
            need: DEMAND_HEADER_LEN,
            have: DEMAND_HEADER_LEN - 1
        })
    );
}

#[test]
fn demand_trailing_bytes() {
    let m = Message::Demand(demand_batch(3));
    assert_eq!(
        mutate(m.clone(), |b| b.push(0)),
        Err(DecodeError::TrailingBytes { extra: 1 })
    );
    assert_eq!(
        mutate(m.clone(), |b| b.extend_from_slice(&[0; DEMAND_ENTRY_LEN])),
        Err(DecodeError::TrailingBytes {
            extra: DEMAND_ENTRY_LEN
        })
    );
    // The count says fewer than there are.
    assert_eq!(
        mutate(m, |b| b[8] = 2),
        Err(DecodeError::TrailingBytes {
            extra: DEMAND_ENTRY_LEN
        })
    );
}

#[test]
fn demand_reserved_nonzero() {
    let m = Message::Demand(demand_batch(2));
    for i in 10..16 {
        assert_eq!(
            mutate(m.clone(), |b| b[i] = 1),
            Err(DecodeError::ReservedNonzero {
                field: "demand.reserved"
            }),
            "byte {i}"
        );
    }
}

#[test]
fn demand_request_id_zero() {
    let mut d = demand_batch(4);
    d.request_id = 0;
    assert_eq!(d.validate(&layout()), Err(DecodeError::ZeroRequestId));
    // Syntax is fine: decoding keeps it, validation refuses it.
    let Ok(Message::Demand(back)) = reencode(&Message::Demand(d.clone())).1 else {
        panic!("did not decode")
    };
    assert_eq!(back.validate(&layout()), Err(DecodeError::ZeroRequestId));
    // The id check comes first, even before the entry count.
    let empty = DemandRequest {
        request_id: 0,
        entries: vec![],
    };
    assert_eq!(empty.validate(&layout()), Err(DecodeError::ZeroRequestId));
}

#[test]
fn demand_prefetch_too_large() {
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
    // One bad entry in the middle of a batch spoils it.
    let mut d = demand_batch(10);
    d.entries[6].after = u16::MAX;
    assert_eq!(
        d.validate(&l),
        Err(DecodeError::PrefetchTooLarge {
            before: 1,
            after: u16::MAX,
            max: MAX_PREFETCH
        })
    );
}

#[test]
fn demand_page_out_of_range() {
    let l = layout();
    let oob = |region, page, region_pages| DecodeError::PageOutOfRange {
        region,
        page,
        count: 1,
        region_pages,
    };
    assert_eq!(demand(0, 1024, 0, 0).validate(&l), Err(oob(0, 1024, 1024)));
    assert_eq!(demand(7, 16, 0, 0).validate(&l), Err(oob(7, 16, 16)));
    assert_eq!(demand(7, 15, 0, 0).validate(&l), Ok(()));
    // The last entry of a full batch.
    let mut d = demand_batch(MAX_DEMAND_ENTRIES);
    d.entries[MAX_DEMAND_ENTRIES - 1] = entry(9, 2, 0, 0);
    assert_eq!(d.validate(&l), Err(oob(9, 2, 2)));
    d.entries[MAX_DEMAND_ENTRIES - 1] = entry(3, 0, 0, 0);
    assert_eq!(
        d.validate(&l),
        Err(DecodeError::UnknownRegion { region: 3 })
    );
    // The window may reach past the region: the source clamps it.
    assert_eq!(
        demand(0, 1023, MAX_PREFETCH, MAX_PREFETCH).validate(&l),
        Ok(())
    );
}

// ---- Pages fields new in version 2 -------------------------------------------

#[test]
fn pages_pad_too_large() {
    let l = layout();
    let with_pad = |pad_len| PagesHeader {
        pad_len,
        ..pages(0, PageKind::Data, 0, 2, 8192)
    };
    assert_eq!(with_pad(MAX_PAD_LEN).validate(&l), Ok(8192));
    for pad_len in [MAX_PAD_LEN + 1, 4096, u16::MAX] {
        assert_eq!(
            with_pad(pad_len).validate(&l),
            Err(DecodeError::PadTooLarge {
                pad_len,
                max: MAX_PAD_LEN
            })
        );
        // Decoding keeps the value; validation is what refuses it.
        let Ok(Message::Pages(back)) = reencode(&Message::Pages(with_pad(pad_len))).1 else {
            panic!("did not decode")
        };
        assert_eq!(back.pad_len, pad_len);
    }
}

#[test]
fn pages_pad_on_zero_frame() {
    let l = layout();
    for kind in [PageKind::Zero, PageKind::Unpopulated] {
        let h = PagesHeader {
            pad_len: 1,
            ..pages(0, kind, 0, 2, 0)
        };
        assert_eq!(
            h.validate(&l),
            Err(DecodeError::PayloadForNonData {
                kind,
                payload_len: 0
            })
        );
        assert_eq!(pages(0, kind, 0, 2, 0).validate(&l), Ok(0));
    }
}

#[test]
fn pages_data_count_too_large() {
    // A region large enough that only the per-frame limit can refuse.
    let big = big_layout(1 << 28);
    let count = MAX_PAGES_PER_FRAME + 1;
    assert_eq!(
        pages(0, PageKind::Data, 0, count, u32::MAX).validate(&big),
        Err(DecodeError::CountTooLarge {
            count: u64::from(count),
            max: u64::from(MAX_PAGES_PER_FRAME)
        })
    );
    assert_eq!(
        pages(0, PageKind::Data, 0, u32::MAX, 0).validate(&big_layout(1 << 32)),
        Err(DecodeError::CountTooLarge {
            count: u64::from(u32::MAX),
            max: u64::from(MAX_PAGES_PER_FRAME)
        })
    );
}

#[test]
fn pages_zero_count_u32_max() {
    let count = u32::MAX;
    // 2^32 pages: room for u32::MAX pages at page 0 or 1, not at page 2.
    let big = big_layout(1 << 32);
    for kind in [PageKind::Zero, PageKind::Unpopulated] {
        assert_eq!(pages(0, kind, 0, count, 0).validate(&big), Ok(0));
        assert_eq!(pages(0, kind, 1, count, 0).validate(&big), Ok(0));
        assert_eq!(
            pages(0, kind, 2, count, 0).validate(&big),
            Err(DecodeError::PageOutOfRange {
                region: 0,
                page: 2,
                count: u64::from(count),
                region_pages: 1 << 32
            })
        );
        // One page too small a region.
        assert_eq!(
            pages(0, kind, 0, count, 0).validate(&big_layout(u64::from(count) - 1)),
            Err(DecodeError::PageOutOfRange {
                region: 0,
                page: 0,
                count: u64::from(count),
                region_pages: u64::from(count) - 1
            })
        );
        // Overflowing u64 is reported as such.
        assert_eq!(
            pages(0, kind, u64::MAX, count, 0).validate(&big),
            Err(DecodeError::Overflow {
                what: "first page + page count",
                base: u64::MAX,
                add: u64::from(count)
            })
        );
    }
}

// ---- Phase ------------------------------------------------------------------------

#[test]
fn phase_bad_kind() {
    let m = Message::Phase(Phase {
        kind: PhaseKind::RoundEnd,
        round: 1,
        pages: 5,
    });
    for kind in [0u8, 3, 0xff] {
        assert_eq!(
            mutate(m.clone(), |b| b[0] = kind),
            Err(DecodeError::BadEnum {
                field: "phase.kind",
                value: u64::from(kind)
            })
        );
    }
    // Built locally with the Invalid kind: encoded as is, refused by the peer.
    let invalid = Message::Phase(Phase {
        kind: PhaseKind::Invalid,
        round: 1,
        pages: 0,
    });
    assert_eq!(
        reencode(&invalid).1,
        Err(DecodeError::BadEnum {
            field: "phase.kind",
            value: 0
        })
    );
}

#[test]
fn phase_reserved_nonzero() {
    let m = Message::Phase(Phase {
        kind: PhaseKind::SwitchOver,
        round: 2,
        pages: 0,
    });
    for i in 1..4 {
        assert_eq!(
            mutate(m.clone(), |b| b[i] = 1),
            Err(DecodeError::ReservedNonzero {
                field: "phase.reserved"
            }),
            "byte {i}"
        );
    }
}

// ---- Digests ----------------------------------------------------------------------

#[test]
fn digests_zero_count() {
    let l = layout();
    let d = digests(0, 4, 0, 0);
    assert_eq!(d.validate(&l), Err(DecodeError::ZeroCount));
    assert_eq!(
        reencode(&Message::Digests(d)).1,
        Err(DecodeError::ZeroCount)
    );
    // A zero group size decodes but does not validate.
    let d = digests(0, 0, 0, 3);
    assert_eq!(d.validate(&l), Err(DecodeError::ZeroCount));
}

#[test]
fn digests_count_too_large() {
    let expected = DecodeError::CountTooLarge {
        count: u64::try_from(MAX_DIGESTS).unwrap() + 1,
        max: u64::try_from(MAX_DIGESTS).unwrap(),
    };
    let over = digests(0, 1, 0, MAX_DIGESTS + 1);
    assert_eq!(reencode(&Message::Digests(over)).1, Err(expected.clone()));
    // Rejected from the count alone.
    let m = Message::Digests(digests(0, 1, 0, 1));
    let count = u32::try_from(MAX_DIGESTS + 1).unwrap();
    assert_eq!(
        mutate(m.clone(), |b| b[16..20]
            .copy_from_slice(&count.to_le_bytes())),
        Err(expected)
    );
    assert_eq!(
        mutate(m, |b| b[16..20].copy_from_slice(&u32::MAX.to_le_bytes())),
        Err(DecodeError::CountTooLarge {
            count: u64::from(u32::MAX),
            max: u64::try_from(MAX_DIGESTS).unwrap()
        })
    );
    // MAX_DIGESTS itself is fine.
    let max = digests(0, 1, 0, MAX_DIGESTS);
    assert_eq!(
        reencode(&Message::Digests(max.clone())).1,
        Ok(Message::Digests(max))
    );
}

#[test]
fn digests_length_mismatch() {
    let m = Message::Digests(digests(0, 4, 0, 3));
    let full = DIGESTS_HEADER_LEN + 3 * 8;
    assert_eq!(
        mutate(m.clone(), |b| b.truncate(full - 1)),
        Err(DecodeError::Truncated {
            need: full,
            have: full - 1
        })
    );
    assert_eq!(
        mutate(m.clone(), |b| b[16] = 4),
        Err(DecodeError::Truncated {
            need: full + 8,
            have: full
        })
    );
    assert_eq!(
        mutate(m.clone(), |b| b.extend_from_slice(&[0; 5])),
        Err(DecodeError::TrailingBytes { extra: 5 })
    );
    assert_eq!(
        mutate(m.clone(), |b| b[16] = 2),
        Err(DecodeError::TrailingBytes { extra: 8 })
    );
    assert_eq!(
        mutate(m, |b| b.truncate(DIGESTS_HEADER_LEN - 1)),
        Err(DecodeError::Truncated {
            need: DIGESTS_HEADER_LEN,
            have: DIGESTS_HEADER_LEN - 1
        })
    );
}

#[test]
fn digests_reserved_nonzero() {
    let m = Message::Digests(digests(0, 4, 0, 3));
    for i in 20..24 {
        assert_eq!(
            mutate(m.clone(), |b| b[i] = 1),
            Err(DecodeError::ReservedNonzero {
                field: "digests.reserved"
            }),
            "byte {i}"
        );
    }
}

#[test]
fn digests_groups_past_region() {
    let l = layout();
    // Region 0 has 1024 pages: groups of 512 from page 0 start at 0 and 512.
    assert_eq!(digests(0, 512, 0, 2).validate(&l), Ok(()));
    assert_eq!(
        digests(0, 512, 0, 3).validate(&l),
        Err(DecodeError::PageOutOfRange {
            region: 0,
            page: 0,
            count: 1025,
            region_pages: 1024
        })
    );
    // The last group may be cut short by the region's end...
    assert_eq!(digests(0, 100, 1000, 1).validate(&l), Ok(()));
    assert_eq!(digests(0, 10, 1000, 3).validate(&l), Ok(()));
    // ...but must start inside it.
    assert_eq!(
        digests(0, 10, 1000, 4).validate(&l),
        Err(DecodeError::PageOutOfRange {
            region: 0,
            page: 1000,
            count: 31,
            region_pages: 1024
        })
    );
    assert_eq!(
        digests(9, 1, 2, 1).validate(&l),
        Err(DecodeError::PageOutOfRange {
            region: 9,
            page: 2,
            count: 1,
            region_pages: 2
        })
    );
    assert_eq!(
        digests(3, 1, 0, 1).validate(&l),
        Err(DecodeError::UnknownRegion { region: 3 })
    );
    // Huge groups: the span overflows u64 only through first_page.
    assert_eq!(
        digests(0, u32::MAX, u64::MAX - 1, 2).validate(&l),
        Err(DecodeError::Overflow {
            what: "first page + page count",
            base: u64::MAX - 1,
            add: u64::from(u32::MAX) + 1
        })
    );
}

// ---- frame sealing ------------------------------------------------------------------

/// A handshake between a destination and a source that share `k`, with the
/// given nonces; returns its frame keys.
fn handshake_keys(
    k: &PresharedKey,
    protection: Protection,
    nonce_d: [u8; 32],
    nonce_s: [u8; 32],
) -> auth::ConnectionKeys {
    let h = Hello {
        protection,
        nonce: nonce_d,
        ..hello()
    };
    let c = Challenge {
        nonce: nonce_s,
        mac: auth::source_mac(k, &h, &nonce_s, &h.session),
        ..challenge(k, &h)
    };
    assert_eq!(auth::verify_source(k, &h, &c), Ok(()));
    let p = Proof {
        mac: auth::destination_mac(k, &h, &c),
    };
    assert_eq!(auth::verify_destination(k, &h, &c, &p), Ok(()));
    auth::derive_keys(k, &h, &c, &p)
}

const SEALED_MODES: [Protection; 2] = [Protection::Mac, Protection::Aead];

/// A `Pages` frame head (header, body, pad) and a payload of `pages` 4 KiB
/// pages with a recognisable pattern.
fn data_frame(first_page: u64, pages_n: u32, pad_len: u16) -> (Vec<u8>, Vec<u8>) {
    let h = PagesHeader {
        pad_len,
        ..pages(0, PageKind::Data, first_page, pages_n, pages_n << 12)
    };
    let mut head = encode_pages_head(&h).to_vec();
    head.resize(head.len() + usize::from(pad_len), 0);
    let payload: Vec<u8> = (0..usize::try_from(pages_n).unwrap() << 12)
        .map(|i| u8::try_from((i * 31 + 7) % 251).unwrap())
        .collect();
    (head, payload)
}

/// Seals one frame: payload (encrypted under Aead) followed by the tag.
fn seal_frame(s: &mut Sealer, head: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; payload.len()];
    let tag = s.seal_encrypt(head, payload, &mut out).unwrap();
    assert_eq!(tag.is_some(), s.protection() != Protection::None);
    out.extend_from_slice(&tag.unwrap_or_default());
    out.truncate(payload.len() + s.tag_len());
    out
}

fn sealer_opener(mode: Protection, key: &[u8; 32]) -> (Sealer, Opener) {
    (
        Sealer::new(mode, key).unwrap(),
        Opener::new(mode, key).unwrap(),
    )
}

#[test]
fn seal_multi_kib_payload_verifies() {
    let keys = handshake_keys(&key(b"0123456789abcdef"), Protection::Mac, [1; 32], [2; 32]);
    for mode in SEALED_MODES {
        let (mut s, mut o) = sealer_opener(mode, &keys.d2s);
        let (head, payload) = data_frame(16, 3, 100);
        let mut sealed = seal_frame(&mut s, &head, &payload);
        assert_eq!(sealed.len(), payload.len() + TAG_LEN);
        match mode {
            Protection::Aead => assert_ne!(&sealed[..payload.len()], &payload[..]),
            _ => assert_eq!(&sealed[..payload.len()], &payload[..]),
        }
        assert_eq!(o.open(&head, &mut sealed), Ok(()), "{mode:?}");
        assert_eq!(&sealed[..payload.len()], &payload[..], "{mode:?}");
        assert_eq!((s.seq(), o.seq()), (1, 1));
        // A frame without payload (a Demand) next.
        let mut control = Vec::new();
        encode_demand_frame(5, &[entry(0, 9, 0, 0)], &mut control);
        let mut tag = s.seal(&control, &[]).unwrap().unwrap().to_vec();
        assert_eq!(o.open(&control, &mut tag), Ok(()), "{mode:?}");
        assert_eq!((s.seq(), o.seq()), (2, 2));
    }
}

#[test]
fn seal_mac_payload_stays_clear_and_seal_encrypt_agrees() {
    // Under Mac, seal_encrypt copies the payload and gives seal's tag.
    let k = [9u8; 32];
    let (head, payload) = data_frame(0, 2, 0);
    let mut a = Sealer::new(Protection::Mac, &k).unwrap();
    let mut b = Sealer::new(Protection::Mac, &k).unwrap();
    let tag = a.seal(&head, &payload).unwrap().unwrap();
    let mut out = vec![0u8; payload.len()];
    assert_eq!(b.seal_encrypt(&head, &payload, &mut out), Ok(Some(tag)));
    assert_eq!(out, payload);
    // Under Aead the same frame is encrypted, and differently in every frame.
    let mut e = Sealer::new(Protection::Aead, &k).unwrap();
    let first = seal_frame(&mut e, &head, &payload);
    let second = seal_frame(&mut e, &head, &payload);
    assert_ne!(first[..payload.len()], second[..payload.len()]);
    assert_ne!(first[..payload.len()], payload[..]);
}

#[test]
fn seal_single_bit_flips_fail() {
    let keys = handshake_keys(
        &key(b"0123456789abcdef"),
        Protection::Aead,
        [3; 32],
        [4; 32],
    );
    for mode in SEALED_MODES {
        let (mut s, mut o) = sealer_opener(mode, &keys.s2d);
        let (head, payload) = data_frame(40, 2, 24);
        let sealed = seal_frame(&mut s, &head, &payload);
        let bad = Err(SealError::BadTag { seq: 0 });
        // Every bit of the head.
        for bit in 0..head.len() * 8 {
            let mut h = head.clone();
            h[bit / 8] ^= 1 << (bit % 8);
            let mut buf = sealed.clone();
            assert_eq!(o.open(&h, &mut buf), bad, "{mode:?} head bit {bit}");
        }
        // Every bit of the payload and of the tag.
        let mut buf = sealed.clone();
        for bit in 0..sealed.len() * 8 {
            buf.copy_from_slice(&sealed);
            buf[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(o.open(&head, &mut buf), bad, "{mode:?} sealed bit {bit}");
        }
        // Failures left the sequence number alone: the genuine frame opens.
        assert_eq!(o.seq(), 0);
        buf.copy_from_slice(&sealed);
        assert_eq!(o.open(&head, &mut buf), Ok(()), "{mode:?}");
        assert_eq!(&buf[..payload.len()], &payload[..]);
        // Moving bytes between head and payload is detected too.
        let (mut s, mut o) = sealer_opener(mode, &keys.s2d);
        let mut buf = seal_frame(&mut s, &head, &payload);
        let mut longer_head = head.clone();
        longer_head.push(buf[0]);
        let mut shorter = buf.split_off(1);
        assert_eq!(
            o.open(&longer_head, &mut shorter),
            Err(SealError::BadTag { seq: 0 }),
            "{mode:?}"
        );
    }
}

#[test]
fn seal_replay_drop_and_swap_fail() {
    let keys = handshake_keys(&key(b"0123456789abcdef"), Protection::Mac, [5; 32], [6; 32]);
    for mode in SEALED_MODES {
        let (mut s, _) = sealer_opener(mode, &keys.s2d);
        let frames: Vec<(Vec<u8>, Vec<u8>)> = (0..4)
            .map(|i| {
                let (head, payload) = data_frame(i * 2, 2, 0);
                let sealed = seal_frame(&mut s, &head, &payload);
                (head, sealed)
            })
            .collect();
        let open = |o: &mut Opener, i: usize| {
            let (head, sealed) = &frames[i];
            let mut buf = sealed.clone();
            o.open(head, &mut buf)
        };
        // In order: all open.
        let mut o = Opener::new(mode, &keys.s2d).unwrap();
        for i in 0..4 {
            assert_eq!(open(&mut o, i), Ok(()), "{mode:?} frame {i}");
        }
        // Replay: frame 0 again where frame 1 is expected.
        let mut o = Opener::new(mode, &keys.s2d).unwrap();
        assert_eq!(open(&mut o, 0), Ok(()));
        assert_eq!(
            open(&mut o, 0),
            Err(SealError::BadTag { seq: 1 }),
            "{mode:?}"
        );
        // Drop: frame 2 where frame 1 is expected.
        let mut o = Opener::new(mode, &keys.s2d).unwrap();
        assert_eq!(open(&mut o, 0), Ok(()));
        assert_eq!(
            open(&mut o, 2),
            Err(SealError::BadTag { seq: 1 }),
            "{mode:?}"
        );
        // Swap: frames 1 and 2 in the other order.
        let mut o = Opener::new(mode, &keys.s2d).unwrap();
        assert_eq!(open(&mut o, 0), Ok(()));
        assert_eq!(
            open(&mut o, 2),
            Err(SealError::BadTag { seq: 1 }),
            "{mode:?}"
        );
        assert_eq!(open(&mut o, 1), Ok(()));
        assert_eq!(
            open(&mut o, 3),
            Err(SealError::BadTag { seq: 2 }),
            "{mode:?}"
        );
        // Frame 1 of a frame's header with frame 2's payload and tag.
        let mut o = Opener::new(mode, &keys.s2d).unwrap();
        assert_eq!(open(&mut o, 0), Ok(()));
        let mut mixed = frames[2].1.clone();
        assert_eq!(
            o.open(&frames[1].0, &mut mixed),
            Err(SealError::BadTag { seq: 1 }),
            "{mode:?}"
        );
    }
}

#[test]
fn seal_keys_differ_per_direction_and_handshake() {
    let k = key(b"0123456789abcdef");
    let a = handshake_keys(&k, Protection::Mac, [1; 32], [2; 32]);
    assert_ne!(a.d2s, a.s2d);
    // Deterministic for the same transcript.
    assert_eq!(a, handshake_keys(&k, Protection::Mac, [1; 32], [2; 32]));
    // A fresh nonce on either side gives fresh keys in both directions.
    let mut nonce = [1; 32];
    nonce[31] = 0;
    for other in [
        handshake_keys(&k, Protection::Mac, nonce, [2; 32]),
        handshake_keys(&k, Protection::Mac, [1; 32], [3; 32]),
        handshake_keys(&k, Protection::Aead, [1; 32], [2; 32]),
        handshake_keys(&key(b"another key 0123"), Protection::Mac, [1; 32], [2; 32]),
    ] {
        for x in [other.d2s, other.s2d] {
            assert_ne!(x, a.d2s);
            assert_ne!(x, a.s2d);
        }
        assert_ne!(other.d2s, other.s2d);
    }
    assert_eq!(format!("{a:?}"), "ConnectionKeys(<redacted>)");
}

#[test]
fn seal_wrong_direction_or_connection_fails() {
    let k = key(b"0123456789abcdef");
    let a = handshake_keys(&k, Protection::Mac, [1; 32], [2; 32]);
    let b = handshake_keys(&k, Protection::Mac, [7; 32], [8; 32]);
    for mode in SEALED_MODES {
        let (head, payload) = data_frame(0, 1, 0);
        let mut s2d = Sealer::new(mode, &a.s2d).unwrap();
        let sealed = seal_frame(&mut s2d, &head, &payload);
        // The d2s key of the same connection, and both keys of another one.
        for wrong in [a.d2s, b.d2s, b.s2d] {
            let mut o = Opener::new(mode, &wrong).unwrap();
            let mut buf = sealed.clone();
            assert_eq!(
                o.open(&head, &mut buf),
                Err(SealError::BadTag { seq: 0 }),
                "{mode:?}"
            );
        }
        let mut o = Opener::new(mode, &a.s2d).unwrap();
        let mut buf = sealed.clone();
        assert_eq!(o.open(&head, &mut buf), Ok(()));
        // A frame sealed under one mode does not open under the other.
        let other = if mode == Protection::Mac {
            Protection::Aead
        } else {
            Protection::Mac
        };
        let mut o = Opener::new(other, &a.s2d).unwrap();
        let mut buf = sealed.clone();
        assert_eq!(
            o.open(&head, &mut buf),
            Err(SealError::BadTag { seq: 0 }),
            "{mode:?} opened as {other:?}"
        );
    }
}

#[test]
fn seal_short_and_misused_buffers() {
    for mode in SEALED_MODES {
        let (mut s, mut o) = sealer_opener(mode, &[1; 32]);
        let mut short = [0u8; TAG_LEN - 1];
        assert_eq!(
            o.open(b"head", &mut short),
            Err(SealError::Short {
                need: TAG_LEN,
                have: TAG_LEN - 1
            })
        );
        assert_eq!(
            s.seal_encrypt(b"head", &[0; 8], &mut [0; 7]),
            Err(SealError::Short { need: 8, have: 7 })
        );
        // Neither failure used up a sequence number.
        assert_eq!((s.seq(), o.seq()), (0, 0));
        let mut tag = s.seal(b"head", &[]).unwrap().unwrap().to_vec();
        assert_eq!(o.open(b"head", &mut tag), Ok(()));
    }
}

#[test]
fn seal_aead_refuses_clear_payload_without_losing_sync() {
    let (mut s, mut o) = sealer_opener(Protection::Aead, &[2; 32]);
    assert_eq!(
        s.seal(b"head", b"payload"),
        Err(SealError::Short { need: 0, have: 7 })
    );
    assert_eq!(s.seq(), 0);
    // The next frame still opens: the refused call consumed no sequence number.
    let (head, payload) = data_frame(0, 1, 0);
    let mut sealed = seal_frame(&mut s, &head, &payload);
    assert_eq!(o.open(&head, &mut sealed), Ok(()));
}

#[test]
fn seal_none_mode_adds_nothing() {
    let (mut s, mut o) = sealer_opener(Protection::None, &[0; 32]);
    assert_eq!((s.tag_len(), o.tag_len()), (0, 0));
    let (head, payload) = data_frame(0, 1, 0);
    assert_eq!(s.seal(&head, &payload), Ok(None));
    let sealed = seal_frame(&mut s, &head, &payload);
    assert_eq!(sealed, payload);
    let mut buf = sealed.clone();
    assert_eq!(o.open(&head, &mut buf), Ok(()));
    assert_eq!(buf, payload);
    assert_eq!(format!("{s:?}"), "Sealer { mode: None, seq: 0 }");
}
