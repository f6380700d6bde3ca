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
        assert_round_trip(&Message::Welcome(Welcome { session, layout, flags: 0 }));
    }

    #[test]
    fn rle_chunk_round_trips(c in arb_rle_chunk()) {
        assert_round_trip(&Message::PresentBitmap(c.clone()));
        assert_round_trip(&Message::DiscardList(c));
    }

    #[test]
    fn hot_path_frames_match_message_encode(m in arb_message()) {
        match &m {
            Message::Pages(p) => prop_assert_eq!(encode_pages_head(p).to_vec(), m.to_vec()),
            Message::Demand(d) => {
                let mut out = Vec::new();
                let n = encode_demand_frame(d.request_id, &d.entries, &mut out);
                prop_assert_eq!(n, out.len());
                prop_assert_eq!(out, m.to_vec());
            }
            _ => {}
        }
    }

    #[test]
    fn hello_and_challenge_round_trip_with_each_protection(
        h in arb_hello(),
        c in arb_challenge(),
        protection in arb_protection(),
    ) {
        // No cipher without protection.
        let cipher = if protection == Protection::None { Cipher::default() } else { h.cipher };
        let h = Hello { protection, cipher, ..h };
        let c = Challenge { protection, ..c };
        assert_round_trip(&Message::Hello(h));
        assert_round_trip(&Message::Challenge(c));
        // The mode and cipher are in the MAC input: the peer's tag binds them.
        prop_assert_eq!(h.encode_body()[41], protection.to_wire());
        prop_assert_eq!(h.encode_body()[43], cipher.to_wire());
        prop_assert_eq!(c.encode_body()[11], protection.to_wire());
        prop_assert_eq!(c.encode_body()[12], c.cipher.to_wire());
    }

    #[test]
    fn demand_batch_round_trips(d in arb_demand(1..=MAX_DEMAND_ENTRIES)) {
        let m = Message::Demand(d.clone());
        assert_round_trip(&m);
        let bytes = m.to_vec();
        prop_assert_eq!(
            bytes.len(),
            FRAME_HEADER_LEN + DEMAND_HEADER_LEN + d.entries.len() * DEMAND_ENTRY_LEN
        );
        // The hot-path encoder appends after what the buffer already holds.
        let mut out = b"earlier frames".to_vec();
        let n = encode_demand_frame(d.request_id, &d.entries, &mut out);
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(&out[14..], &bytes[..]);
        prop_assert_eq!(decode_frame(&out[14..]), Ok(Some((m, n))));
    }

    #[test]
    fn demand_batch_edges_round_trip(
        d in arb_demand(1..=MAX_DEMAND_ENTRIES),
        full in any::<bool>(),
    ) {
        // Exactly 1 and exactly MAX_DEMAND_ENTRIES entries.
        let n = if full { MAX_DEMAND_ENTRIES } else { 1 };
        let entries: Vec<DemandEntry> = d.entries.iter().copied().cycle().take(n).collect();
        assert_round_trip(&Message::Demand(DemandRequest { request_id: d.request_id, entries }));
    }

    #[test]
    fn valid_demand_batches_validate(
        request_id in 1u64..,
        entries in proptest::collection::vec(
            (0usize..3, any::<u64>(), 0..=MAX_PREFETCH, 0..=MAX_PREFETCH)
                .prop_map(|(i, page, before, after)| {
                    let r = layout().regions[i];
                    DemandEntry { region: r.id, page: page % r.page_count(), before, after }
                }),
            1..=MAX_DEMAND_ENTRIES,
        ),
    ) {
        let d = DemandRequest { request_id, entries };
        prop_assert_eq!(d.validate(&layout()), Ok(()));
        let Ok(Message::Demand(back)) = reencode(&Message::Demand(d.clone())).1 else {
            panic!("valid demand did not decode");
        };
        prop_assert_eq!(back.validate(&layout()), Ok(()));
        prop_assert_eq!(back, d);
    }

    #[test]
    fn pages_with_pad_round_trip(p in arb_pages(), pad_len in 0..=MAX_PAD_LEN) {
        let p = PagesHeader { pad_len, ..p };
        assert_round_trip(&Message::Pages(p));
        prop_assert_eq!(encode_pages_head(&p).to_vec(), Message::Pages(p).to_vec());
        let head = encode_pages_head(&p);
        prop_assert_eq!(&head[FRAME_HEADER_LEN + 6..FRAME_HEADER_LEN + 8], &pad_len.to_le_bytes());
    }

    #[test]
    fn zero_ranges_round_trip(c in arb_rle_chunk()) {
        assert_round_trip(&Message::ZeroRanges(c));
    }

    #[test]
    fn resumed_round_trips(pages in any::<u64>()) {
        assert_round_trip(&Message::Resumed(pages));
    }

    #[test]
    fn phase_round_trips(p in arb_phase()) {
        assert_round_trip(&Message::Phase(p));
    }

    #[test]
    fn digests_round_trip(d in arb_digests(1..=64)) {
        let len = FRAME_HEADER_LEN + DIGESTS_HEADER_LEN + 8 * d.digests.len();
        let m = Message::Digests(d);
        assert_round_trip(&m);
        prop_assert_eq!(m.to_vec().len(), len);
    }

    #[test]
    fn valid_digests_validate(
        (region, pages_per_digest, first_page, groups) in (0usize..3).prop_flat_map(|i| {
            let r = layout().regions[i];
            (Just(r), 1u32..=2048, 0..r.page_count()).prop_flat_map(|(r, ppd, first)| {
                // Every group starts inside the region; the last may run past its end.
                let max = ((r.page_count() - 1 - first) / u64::from(ppd) + 1)
                    .min(u64::try_from(MAX_DIGESTS).unwrap());
                (Just(r), Just(ppd), Just(first), 1..=max)
            })
        }),
        seed in any::<u64>(),
    ) {
        let d = Digests {
            region: region.id,
            pages_per_digest,
            first_page,
            digests: (0..groups).map(|g| g ^ seed).collect(),
        };
        prop_assert_eq!(d.validate(&layout()), Ok(()));
        // One group more is fine exactly when it too starts inside the region.
        let mut more = d.clone();
        more.digests.push(0);
        let next_start = first_page + groups * u64::from(pages_per_digest);
        if next_start >= region.page_count() {
            prop_assert!(matches!(
                more.validate(&layout()),
                Err(DecodeError::PageOutOfRange { .. })
            ), "{:?}", more.validate(&layout()));
        } else {
            prop_assert_eq!(more.validate(&layout()), Ok(()));
        }
        let Ok(Message::Digests(back)) = reencode(&Message::Digests(d.clone())).1 else {
            panic!("valid digests did not decode");
        };
        prop_assert_eq!(back, d);
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
        pad in 0..=MAX_PAD_LEN,
        request_id in any::<u64>(),
    ) {
        let bytes = u64::from(u32::try_from(count).unwrap()) << region.page_size.shift();
        let data_fits = bytes <= u64::from(MAX_PAYLOAD_LEN);
        let (payload_len, pad_len) = if kind == PageKind::Data {
            (u32::try_from(bytes).unwrap_or(0), pad)
        } else {
            (0, 0)
        };
        let h = PagesHeader {
            region: region.id, kind, pad_len, first_page, count: u32::try_from(count).unwrap(),
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
    assert_round_trip(&Message::Heartbeat);
    assert_eq!(Message::Heartbeat.to_vec(), [13, 0, 0, 0, 0, 0, 0, 0]);
    assert_round_trip(&Message::Welcome(Welcome {
        session: [1; 16],
        layout: Layout::default(),
        flags: 0,
    }));
}

#[test]
fn fixed_frame_lengths() {
    assert_eq!(
        Message::Hello(hello()).to_vec().len(),
        FRAME_HEADER_LEN + HELLO_BODY_LEN
    );
    assert_eq!(
        Message::Challenge(challenge(
            &auth::PresharedKey::new(vec![1; 16]).unwrap(),
            &hello()
        ))
        .to_vec()
        .len(),
        FRAME_HEADER_LEN + CHALLENGE_BODY_LEN
    );
    assert_eq!((HELLO_BODY_LEN, CHALLENGE_BODY_LEN), (80, 104));
    assert_eq!(PAGES_FRAME_LEN, 40);
    assert_eq!((DEMAND_HEADER_LEN, DEMAND_ENTRY_LEN), (16, 16));
    assert_eq!((PHASE_BODY_LEN, DIGESTS_HEADER_LEN), (16, 24));
    assert_eq!(VERSION, 2);
    // A one-entry Demand is as long as a v1 Demand frame was.
    let mut out = Vec::new();
    let one = DemandEntry {
        region: 0,
        page: 1,
        before: 0,
        after: 0,
    };
    assert_eq!(encode_demand_frame(1, &[one], &mut out), 40);
    // The largest Demand and Digests bodies fit MAX_BODY_LEN.
    let d = DemandRequest {
        request_id: 1,
        entries: vec![one; MAX_DEMAND_ENTRIES],
    };
    assert!(Message::Demand(d).to_vec().len() - FRAME_HEADER_LEN <= MAX_BODY_LEN);
    let d = Digests {
        region: 0,
        pages_per_digest: 1,
        first_page: 0,
        digests: vec![0; MAX_DIGESTS],
    };
    assert_round_trip(&Message::Digests(d));
    // Wire bytes are pinned: magic first in Hello, little-endian.
    let bytes = Message::Hello(hello()).to_vec();
    assert_eq!(&bytes[..8], &[1, 0, 0, 0, 80, 0, 0, 0]);
    assert_eq!(&bytes[8..16], b"RINGFLT1");
    assert_eq!(&bytes[16..18], &[2, 0]);
}

#[test]
fn every_kind_round_trips() {
    let all = one_of_each_kind();
    let kinds: Vec<MsgKind> = all.iter().map(Message::kind).collect();
    assert_eq!(kinds, MsgKind::ALL);
    for (m, wire) in all.iter().zip(1u16..) {
        assert_eq!(m.kind().to_wire(), wire);
        assert_eq!(MsgKind::from_wire(wire), Ok(m.kind()));
        assert_round_trip(m);
    }
    // Back to back in one buffer, as a lane carries them.
    let mut stream = Vec::new();
    for m in &all {
        m.encode(&mut stream);
    }
    let mut pos = 0;
    for m in &all {
        let (got, used) = decode_frame(&stream[pos..]).unwrap().unwrap();
        assert_eq!(&got, m);
        pos += used;
    }
    assert_eq!(pos, stream.len());
}

#[test]
fn one_of_each_kind_validates() {
    let l = layout();
    for m in one_of_each_kind() {
        let r = match &m {
            Message::Pages(p) => p.validate(&l).map(|_| ()),
            Message::Demand(d) => d.validate(&l),
            Message::PresentBitmap(c) | Message::DiscardList(c) | Message::ZeroRanges(c) => {
                c.validate(&l)
            }
            Message::Digests(d) => d.validate(&l),
            _ => Ok(()),
        };
        assert_eq!(r, Ok(()), "{m:?}");
    }
}

#[test]
fn protection_wire_values() {
    for (p, wire, tag, name) in [
        (Protection::None, 1, 0, "none"),
        (Protection::Mac, 2, TAG_LEN, "mac"),
        (Protection::Aead, 3, TAG_LEN, "aead"),
    ] {
        assert_eq!(p.to_wire(), wire);
        assert_eq!(Protection::from_wire(wire, "f"), Ok(p));
        assert_eq!(p.tag_len(), tag);
        assert_eq!(p.name(), name);
    }
    assert_eq!(Protection::default(), Protection::Mac);
    assert_eq!(TAG_LEN, 16);
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
        pad_len: 0,
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
    assert_eq!(encode_pages_head(&h), expected);
    assert_eq!(h.validate(&layout()), Ok(0x2000));
    // The same frame with a pad: only bytes 14..16 change.
    let padded = PagesHeader {
        pad_len: 0xff8,
        ..h
    };
    let mut with_pad = expected;
    with_pad[14..16].copy_from_slice(&[0xf8, 0x0f]);
    assert_eq!(encode_pages_head(&padded), with_pad);
    assert_eq!(padded.validate(&layout()), Ok(0x2000));
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
    assert_eq!(auth::SOURCE_LABEL, b"ringfault/2 source");
    assert_eq!(auth::DESTINATION_LABEL, b"ringfault/2 destination");
    assert_eq!(auth::KEYS_LABEL, b"ringfault/2 keys");
}
