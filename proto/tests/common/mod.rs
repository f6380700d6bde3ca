//! Shared fixtures and strategies for the integration tests.
#![allow(dead_code)] // each test binary uses a subset

use proptest::prelude::*;
use ringfault_proto::*;

/// Encodes `m`, parses the header back and decodes the body.
pub fn reencode(m: &Message) -> (Vec<u8>, Result<Message, DecodeError>) {
    let bytes = m.to_vec();
    let r = decode_bytes(&bytes);
    (bytes, r)
}

/// Header + body through `FrameHeader::parse` and `Message::decode`.
pub fn decode_bytes(bytes: &[u8]) -> Result<Message, DecodeError> {
    let head: &[u8; FRAME_HEADER_LEN] = bytes[..FRAME_HEADER_LEN].try_into().unwrap();
    let header = FrameHeader::parse(head)?;
    Message::decode(&header, &bytes[FRAME_HEADER_LEN..])
}

/// Three regions: id 0 with 1024 4K pages, id 7 with 16 2M pages, id 9 with 2 1G pages.
pub fn layout() -> Layout {
    Layout {
        regions: vec![
            RegionDesc {
                id: 0,
                page_size: PageSize::Size4K,
                size: 1024 * 4096,
            },
            RegionDesc {
                id: 7,
                page_size: PageSize::Size2M,
                size: 16 << 21,
            },
            RegionDesc {
                id: 9,
                page_size: PageSize::Size1G,
                size: 2 << 30,
            },
        ],
    }
}

pub fn hello() -> Hello {
    Hello {
        version: VERSION,
        role: Role::Destination,
        lane: Lane::Bulk,
        channel: 1,
        channel_count: 4,
        capabilities: Capabilities::ZERO_PAGES | Capabilities::RESUME,
        session: [0x5a; 16],
        resume: false,
        protection: Protection::Mac,
        cipher: Cipher::Aes256Gcm,
        lane_flags: LANE_ALIGN_PAYLOAD,
        nonce: [0x11; 32],
    }
}

pub fn challenge(key: &auth::PresharedKey, hello: &Hello) -> Challenge {
    let nonce = [0x22; 32];
    Challenge {
        version: VERSION,
        role: Role::Source,
        capabilities: hello.capabilities.intersect(Capabilities(u64::MAX)),
        session: hello.session,
        protection: hello.protection,
        cipher: hello.cipher,
        nonce,
        mac: auth::source_mac(key, hello, &nonce, &hello.session),
    }
}

pub fn arb_page_size() -> impl Strategy<Value = PageSize> {
    prop_oneof![
        Just(PageSize::Size4K),
        Just(PageSize::Size2M),
        Just(PageSize::Size1G)
    ]
}

pub fn arb_layout(max_regions: usize) -> impl Strategy<Value = Layout> {
    proptest::collection::hash_set(any::<u32>(), 0..=max_regions).prop_flat_map(|ids| {
        let ids: Vec<u32> = ids.into_iter().collect();
        let n = ids.len();
        proptest::collection::vec((arb_page_size(), 1u64..1 << 20), n).prop_map(move |rs| Layout {
            regions: ids
                .iter()
                .zip(rs)
                .map(|(&id, (page_size, pages))| RegionDesc {
                    id,
                    page_size,
                    size: pages << page_size.shift(),
                })
                .collect(),
        })
    })
}

/// Every valid protection mode.
pub const PROTECTIONS: [Protection; 3] = [Protection::None, Protection::Mac, Protection::Aead];

pub fn arb_protection() -> impl Strategy<Value = Protection> {
    prop_oneof![
        Just(Protection::None),
        Just(Protection::Mac),
        Just(Protection::Aead)
    ]
}

pub fn arb_hello() -> impl Strategy<Value = Hello> {
    (
        prop_oneof![Just(Lane::Demand), Just(Lane::Bulk)],
        (1u16..=MAX_CHANNELS).prop_flat_map(|n| (0..n, Just(n))),
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<bool>(),
        (arb_protection(), 0..Cipher::ALL.len()),
        prop_oneof![Just(0u8), Just(LANE_ALIGN_PAYLOAD)],
        any::<[u8; 32]>(),
    )
        .prop_map(
            |(
                lane,
                (channel, channel_count),
                caps,
                session,
                resume,
                (protection, cipher),
                lane_flags,
                nonce,
            )| Hello {
                version: VERSION,
                role: Role::Destination,
                lane,
                channel,
                channel_count,
                capabilities: Capabilities(caps),
                session,
                resume,
                protection,
                cipher: if protection == Protection::None {
                    Cipher::default()
                } else {
                    Cipher::ALL[cipher]
                },
                lane_flags,
                nonce,
            },
        )
}

pub fn arb_challenge() -> impl Strategy<Value = Challenge> {
    (
        any::<u64>(),
        any::<[u8; 16]>(),
        (arb_protection(), 0..Cipher::ALL.len()),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
    )
        .prop_map(
            |(caps, session, (protection, cipher), nonce, mac)| Challenge {
                version: VERSION,
                role: Role::Source,
                capabilities: Capabilities(caps),
                session,
                protection,
                cipher: Cipher::ALL[cipher],
                nonce,
                mac,
            },
        )
}

pub fn arb_page_kind() -> impl Strategy<Value = PageKind> {
    prop_oneof![
        Just(PageKind::Data),
        Just(PageKind::Zero),
        Just(PageKind::Unpopulated)
    ]
}

/// Any `Pages` header that decodes (validation against a layout not implied).
pub fn arb_pages() -> impl Strategy<Value = PagesHeader> {
    (
        any::<u32>(),
        arb_page_kind(),
        any::<u16>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(region, kind, pad_len, first_page, count, payload_len, request_id)| PagesHeader {
                region,
                kind,
                pad_len,
                first_page,
                count,
                payload_len,
                request_id,
            },
        )
}

pub fn arb_demand_entry() -> impl Strategy<Value = DemandEntry> {
    (any::<u32>(), any::<u64>(), any::<u16>(), any::<u16>()).prop_map(
        |(region, page, before, after)| DemandEntry {
            region,
            page,
            before,
            after,
        },
    )
}

/// A `Demand` batch of `entries` entries (any ids and values: decoding does
/// not check them against a layout).
pub fn arb_demand(
    entries: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = DemandRequest> {
    (
        any::<u64>(),
        proptest::collection::vec(arb_demand_entry(), entries),
    )
        .prop_map(|(request_id, entries)| DemandRequest {
            request_id,
            entries,
        })
}

pub fn arb_phase() -> impl Strategy<Value = Phase> {
    (
        prop_oneof![Just(PhaseKind::RoundEnd), Just(PhaseKind::SwitchOver)],
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(|(kind, round, pages)| Phase { kind, round, pages })
}

/// `Digests` with `digests` digests (decodable; not checked against a layout).
pub fn arb_digests(digests: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Digests> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        proptest::collection::vec(any::<u64>(), digests),
    )
        .prop_map(|(region, pages_per_digest, first_page, digests)| Digests {
            region,
            pages_per_digest,
            first_page,
            digests,
        })
}

pub fn arb_rle_chunk() -> impl Strategy<Value = RleChunk> {
    (
        any::<u32>(),
        0u64..u64::MAX / 2,
        any::<bool>(),
        0u64..1000,
        proptest::collection::vec(1u64..1 << 40, 0..64),
    )
        .prop_map(|(region, first_page, last, first_run, rest)| {
            let mut runs = vec![first_run];
            runs.extend(rest);
            if runs.len() == 1 && first_run == 0 {
                runs[0] = 1;
            }
            RleChunk {
                region,
                first_page,
                page_count: runs.iter().sum(),
                last,
                runs,
            }
        })
}

pub fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::AuthFailed),
        Just(ErrorCode::VersionMismatch),
        Just(ErrorCode::Protocol),
        Just(ErrorCode::LayoutMismatch),
        Just(ErrorCode::Internal),
        Just(ErrorCode::Shutdown),
        Just(ErrorCode::Integrity),
        Just(ErrorCode::Timeout),
        Just(ErrorCode::Busy),
    ]
}

pub fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb_hello().prop_map(Message::Hello),
        arb_challenge().prop_map(Message::Challenge),
        any::<[u8; 32]>().prop_map(|mac| Message::Proof(Proof { mac })),
        (any::<[u8; 16]>(), arb_layout(16)).prop_map(|(session, layout)| Message::Welcome(
            Welcome {
                session,
                layout,
                flags: 0
            }
        )),
        arb_pages().prop_map(Message::Pages),
        arb_demand(1..=MAX_DEMAND_ENTRIES).prop_map(Message::Demand),
        arb_rle_chunk().prop_map(Message::PresentBitmap),
        arb_rle_chunk().prop_map(Message::DiscardList),
        arb_rle_chunk().prop_map(Message::ZeroRanges),
        any::<u64>().prop_map(|pages_present| Message::Complete(Complete { pages_present })),
        Just(Message::CompleteAck),
        Just(Message::Release),
        (arb_error_code(), "\\PC{0,200}")
            .prop_map(|(code, message)| Message::Error(ErrorFrame { code, message })),
        Just(Message::Heartbeat),
        any::<u64>().prop_map(Message::Resumed),
        arb_phase().prop_map(Message::Phase),
        arb_digests(1..=64).prop_map(Message::Digests),
    ]
}

/// One valid message of every kind, in wire order (`MsgKind::ALL`).
pub fn one_of_each_kind() -> Vec<Message> {
    let k = auth::PresharedKey::new(b"0123456789abcdef".to_vec()).unwrap();
    let h = hello();
    let c = challenge(&k, &h);
    let chunk = RleChunk {
        region: 0,
        first_page: 4,
        page_count: 10,
        last: true,
        runs: vec![2, 3, 5],
    };
    vec![
        Message::Hello(h),
        Message::Challenge(c),
        Message::Proof(Proof {
            mac: auth::destination_mac(&k, &h, &c),
        }),
        Message::Welcome(Welcome {
            session: h.session,
            layout: layout(),
            flags: 0,
        }),
        Message::Pages(PagesHeader {
            region: 0,
            kind: PageKind::Data,
            pad_len: 8,
            first_page: 3,
            count: 2,
            payload_len: 8192,
            request_id: 9,
        }),
        Message::Demand(DemandRequest {
            request_id: 9,
            entries: vec![
                DemandEntry {
                    region: 0,
                    page: 3,
                    before: 1,
                    after: 15,
                },
                DemandEntry {
                    region: 7,
                    page: 15,
                    before: 0,
                    after: 0,
                },
            ],
        }),
        Message::PresentBitmap(chunk.clone()),
        Message::DiscardList(chunk.clone()),
        Message::Complete(Complete {
            pages_present: 1042,
        }),
        Message::CompleteAck,
        Message::Release,
        Message::Error(ErrorFrame::new(ErrorCode::Integrity, "bad tag")),
        Message::Heartbeat,
        Message::ZeroRanges(chunk),
        Message::Resumed(1000),
        Message::Phase(Phase {
            kind: PhaseKind::SwitchOver,
            round: 3,
            pages: 77,
        }),
        Message::Digests(Digests {
            region: 7,
            pages_per_digest: 4,
            first_page: 0,
            digests: vec![1, 2, 3, 4],
        }),
    ]
}
