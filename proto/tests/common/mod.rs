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

/// Two regions: id 0 with 1024 4K pages, id 7 with 16 2M pages, id 9 with 2 1G pages.
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

pub fn arb_hello() -> impl Strategy<Value = Hello> {
    (
        prop_oneof![Just(Lane::Demand), Just(Lane::Bulk)],
        (1u16..=MAX_CHANNELS).prop_flat_map(|n| (0..n, Just(n))),
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<bool>(),
        any::<[u8; 32]>(),
    )
        .prop_map(
            |(lane, (channel, channel_count), caps, session, resume, nonce)| Hello {
                version: VERSION,
                role: Role::Destination,
                lane,
                channel,
                channel_count,
                capabilities: Capabilities(caps),
                session,
                resume,
                nonce,
            },
        )
}

pub fn arb_challenge() -> impl Strategy<Value = Challenge> {
    (
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(caps, session, nonce, mac)| Challenge {
            version: VERSION,
            role: Role::Source,
            capabilities: Capabilities(caps),
            session,
            nonce,
            mac,
        })
}

pub fn arb_page_kind() -> impl Strategy<Value = PageKind> {
    prop_oneof![
        Just(PageKind::Data),
        Just(PageKind::Zero),
        Just(PageKind::Unpopulated)
    ]
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
    ]
}

pub fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb_hello().prop_map(Message::Hello),
        arb_challenge().prop_map(Message::Challenge),
        any::<[u8; 32]>().prop_map(|mac| Message::Proof(Proof { mac })),
        (any::<[u8; 16]>(), arb_layout(16))
            .prop_map(|(session, layout)| Message::Welcome(Welcome { session, layout })),
        (
            any::<u32>(),
            arb_page_kind(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(
                |(region, kind, first_page, count, payload_len, request_id)| {
                    Message::Pages(PagesHeader {
                        region,
                        kind,
                        first_page,
                        count,
                        payload_len,
                        request_id,
                    })
                }
            ),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(request_id, region, page, before, after)| {
                Message::Demand(DemandRequest {
                    request_id,
                    region,
                    page,
                    before,
                    after,
                })
            }),
        arb_rle_chunk().prop_map(Message::PresentBitmap),
        arb_rle_chunk().prop_map(Message::DiscardList),
        any::<u64>().prop_map(|pages_present| Message::Complete(Complete { pages_present })),
        Just(Message::CompleteAck),
        Just(Message::Release),
        (arb_error_code(), "\\PC{0,200}")
            .prop_map(|(code, message)| Message::Error(ErrorFrame { code, message })),
    ]
}
