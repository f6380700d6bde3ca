//! `Hello`, `Challenge` and `Welcome` body decoders: never panic; an accepted
//! body re-encodes to the same bytes (the MAC inputs), and authentication
//! and key derivation over arbitrary accepted messages never panic and give
//! one key per direction.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfault_proto::auth::{self, PresharedKey};
use ringfault_proto::{
    Challenge, Hello, Proof, Welcome, HELLO_BODY_LEN, LANE_ALIGN_PAYLOAD, MAX_REGIONS, VERSION,
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            if let Ok(h) = Hello::decode_body(body) {
                assert_eq!(&h.encode_body()[..], body);
                assert!(h.channel < h.channel_count);
                assert_eq!(h.version, VERSION);
                assert_eq!(h.lane_flags & !LANE_ALIGN_PAYLOAD, 0);
            }
        }
        1 => {
            if let Ok(c) = Challenge::decode_body(body) {
                assert_eq!(&c.encode_body()[..], body);
                assert_eq!(c.version, VERSION);
            }
        }
        2 => {
            if let Ok(w) = Welcome::decode_body(body) {
                let mut out = Vec::new();
                w.encode_body(&mut out);
                assert_eq!(out, body);
                assert!(w.layout.regions.len() <= MAX_REGIONS);
                assert_eq!(w.layout.validate(), Ok(()));
            }
        }
        _ => {
            // A Hello followed by a Challenge, through both verifiers.
            let Some((h, c)) = body.split_at_checked(HELLO_BODY_LEN) else {
                return;
            };
            let (Ok(h), Ok(c)) = (Hello::decode_body(h), Challenge::decode_body(c)) else {
                return;
            };
            let key = PresharedKey::new(b"fuzzing key, 16+ bytes".to_vec()).expect("long enough");
            let _ = auth::verify_source(&key, &h, &c);
            let proof = Proof {
                mac: auth::destination_mac(&key, &h, &c),
            };
            assert_eq!(auth::verify_destination(&key, &h, &c, &proof), Ok(()));
            let keys = auth::derive_keys(&key, &h, &c, &proof);
            assert_ne!(keys.d2s, keys.s2d);
        }
    }
});
