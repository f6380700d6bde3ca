//! Property tests: every message survives encode -> parse -> decode.

mod common;

use common::*;
use proptest::prelude::*;
use ringfault_proto::*;

fn assert_round_trip(m: &Message) {
    let (bytes, decoded) = reencode(m);
    assert_eq!(decoded.as_ref(), Ok(m));
    // decode_frame agrees, consumes exactly the frame, and waits for more
    // on every strict prefix.
    let mut buf = bytes.clone();
    buf.extend_from_slice(b"next frame");
    assert_eq!(decode_frame(&buf), Ok(Some((m.clone(), bytes.len()))));
    for cut in [
        0,
        1,
        FRAME_HEADER_LEN - 1,
        FRAME_HEADER_LEN,
        bytes.len() - 1,
    ] {
        if cut < bytes.len() {
            assert_eq!(decode_frame(&bytes[..cut]), Ok(None), "prefix {cut}");
        }
    }
    let header = FrameHeader::parse(bytes[..FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!(header.kind, m.kind());
    assert_eq!(header.body_len_usize(), bytes.len() - FRAME_HEADER_LEN);
    assert_eq!(FrameHeader::parse(&header.encode()), Ok(header));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(m in arb_message()) {
        assert_round_trip(&m);
    }

    #[test]
    fn hello_round_trips(h in arb_hello()) {
        assert_round_trip(&Message::Hello(h));
    }

    #[test]
    fn challenge_round_trips(c in arb_challenge()) {
        assert_round_trip(&Message::Challenge(c));
    }

    #[test]
    fn welcome_round_trips(session in any::<[u8; 16]>(), layout in arb_layout(64)) {
        assert_round_trip(&Message::Welcome(Welcome { session, layout }));
    }

    #[test]
    fn rle_chunk_round_trips(c in arb_rle_chunk()) {
        assert_round_trip(&Message::PresentBitmap(c.clone()));
        assert_round_trip(&Message::DiscardList(c));
    }

    #[test]
    fn hot_path_frames_match_message_encode(m in arb_message()) {
        match &m {
            Message::Pages(p) => prop_assert_eq!(encode_pages_frame(p).to_vec(), m.to_vec()),
            Message::Demand(d) => prop_assert_eq!(encode_demand_frame(d).to_vec(), m.to_vec()),
            _ => {}
        }
    }

    #[test]
    fn valid_pages_validate(
        (region, first_page, count) in (0usize..3).prop_flat_map(|i| {
            let r = layout().regions[i];
            let max = r.page_count().min(u64::from(MAX_PAGES_PER_FRAME));
            (Just(r), 1..=max).prop_flat_map(|(r, count)| {
                (Just(r), 0..=r.page_count() - count, Just(count))
            })
        }),
        kind in arb_page_kind(),
        request_id in any::<u64>(),
    ) {
        let bytes = u64::from(u32::try_from(count).unwrap()) << region.page_size.shift();
        let data_fits = bytes <= u64::from(MAX_PAYLOAD_LEN);
        let payload_len = if kind == PageKind::Data { u32::try_from(bytes).unwrap_or(0) } else { 0 };
        let h = PagesHeader {
            region: region.id, kind, first_page, count: u32::try_from(count).unwrap(),
            payload_len, request_id,
        };
        let r = h.validate(&layout());
        if kind == PageKind::Data && !data_fits {
            prop_assert!(matches!(r, Err(DecodeError::PayloadTooLarge { .. })), "{r:?}");
        } else {
            prop_assert_eq!(r, Ok(u64::from(payload_len)));
        }
    }
}

#[test]
fn unit_messages_round_trip() {
    assert_round_trip(&Message::CompleteAck);
    assert_round_trip(&Message::Release);
    assert_round_trip(&Message::Welcome(Welcome {
        session: [1; 16],
        layout: Layout::default(),
    }));
}

#[test]
fn fixed_frame_lengths() {
    assert_eq!(
        Message::Hello(hello()).to_vec().len(),
        FRAME_HEADER_LEN + HELLO_BODY_LEN
    );
    assert_eq!(PAGES_FRAME_LEN, 40);
    assert_eq!(DEMAND_FRAME_LEN, 40);
    // Wire bytes are pinned: magic first in Hello, little-endian.
    let bytes = Message::Hello(hello()).to_vec();
    assert_eq!(&bytes[..8], &[1, 0, 0, 0, 80, 0, 0, 0]);
    assert_eq!(&bytes[8..16], b"RINGFLT1");
}

#[test]
fn error_message_truncates_at_char_boundary() {
    let long = "é".repeat(MAX_ERROR_MESSAGE); // 2 bytes per char
    let m = Message::Error(ErrorFrame {
        code: ErrorCode::Internal,
        message: format!("x{long}"),
    });
    let Ok(Message::Error(e)) = reencode(&m).1 else {
        panic!("decode failed")
    };
    assert_eq!(e.message.len(), MAX_ERROR_MESSAGE - 1);
    assert!(e.message.starts_with("xé"));
    assert_eq!(ErrorFrame::new(ErrorCode::Internal, format!("x{long}")), e);
}

#[test]
fn capabilities_intersect_drops_unknown_bits() {
    let peer = Capabilities(u64::MAX);
    let ours = Capabilities::ZERO_PAGES | Capabilities::RESUME;
    assert_eq!(peer.intersect(ours), ours);
    assert_eq!(peer.intersect(Capabilities(u64::MAX)), Capabilities::KNOWN);
    assert!(peer.contains(ours));
    assert!(!ours.contains(Capabilities::DISCARD));
}

#[test]
fn layout_lookup() {
    let l = layout();
    assert_eq!(l.region(7).map(|r| r.page_count()), Some(16));
    assert_eq!(l.region(0).map(|r| r.page_count()), Some(1024));
    assert!(l.region(1).is_none());
    assert_eq!(l.total_pages(), 1024 + 16 + 2);
    assert_eq!(l.validate(), Ok(()));
}

#[test]
fn docs_protocol_md_examples() {
    // §5.5 worked example.
    let h = PagesHeader {
        region: 0,
        kind: PageKind::Data,
        first_page: 0x10,
        count: 2,
        payload_len: 0x2000,
        request_id: 7,
    };
    let expected: [u8; PAGES_FRAME_LEN] = [
        5, 0, 0, 0, 32, 0, 0, 0, //
        0, 0, 0, 0, 1, 0, 0, 0, //
        0x10, 0, 0, 0, 0, 0, 0, 0, //
        2, 0, 0, 0, 0, 0x20, 0, 0, //
        7, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(encode_pages_frame(&h), expected);
    assert_eq!(h.validate(&layout()), Ok(0x2000));
    // §5.7 examples.
    let c = &encode_rle_chunks(0, 10, [(2, 3), (9, 1)])[0];
    assert_eq!(c.runs, vec![2, 3, 4, 1]);
    let frame = Message::PresentBitmap(c.clone()).to_vec();
    assert_eq!(&frame[FRAME_HEADER_LEN + RLE_HEADER_LEN..], &[2, 3, 4, 1]);
    let all = &encode_rle_chunks(0, 128 << 20, [(0, 128 << 20)])[0];
    let frame = Message::PresentBitmap(all.clone()).to_vec();
    assert_eq!(
        &frame[FRAME_HEADER_LEN + RLE_HEADER_LEN..],
        &[0, 0x80, 0x80, 0x80, 0x40]
    );
    assert_eq!(frame.len(), 37);
    // §4 MAC label lengths.
    assert_eq!(auth::SOURCE_LABEL.len(), 18);
    assert_eq!(auth::DESTINATION_LABEL.len(), 23);
}
