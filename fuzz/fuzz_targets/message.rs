//! Arbitrary kind + body through `Message::decode`, and arbitrary bytes
//! through `decode_frame`: never panics; whatever decodes re-encodes to the
//! exact input bytes (the decoder accepts only canonical encodings).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfault_proto::{decode_frame, FrameHeader, Message, MsgKind, FRAME_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    // 1. decode_frame on the raw bytes, as a stream reader would.
    match decode_frame(data) {
        Ok(Some((m, used))) => {
            assert!(used <= data.len());
            assert_eq!(m.to_vec(), &data[..used]);
        }
        Ok(None) => assert!(
            data.len() < FRAME_HEADER_LEN
                || FrameHeader::parse(data.first_chunk().unwrap()).is_ok()
        ),
        Err(_) => {}
    }

    // 2. First byte picks a kind, the rest is the body, bypassing the
    //    header checks so every body decoder sees arbitrary lengths.
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = MsgKind::ALL[usize::from(selector) % MsgKind::ALL.len()];
    let Ok(body_len) = u32::try_from(body.len()) else {
        return;
    };
    let header = FrameHeader { kind, body_len };
    if let Ok(m) = Message::decode(&header, body) {
        assert_eq!(m.kind(), kind);
        let bytes = m.to_vec();
        assert_eq!(&bytes[..FRAME_HEADER_LEN], &header.encode());
        assert_eq!(&bytes[FRAME_HEADER_LEN..], body);
    }
});
