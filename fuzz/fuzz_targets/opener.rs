//! `Opener::open` on arbitrary frames under every protection mode and
//! cipher: never
//! panics, never accepts a frame it was not sealed for, and a failed check
//! leaves the sequence number where it was. Frames the matching `Sealer`
//! sealed from the same bytes open, and give back the payload.
//!
//! Input: `mode and cipher selector | key byte | head_len u16 | rest`; `rest` is split
//! into `head` (`head_len` bytes, clamped) and `payload_and_tag`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfault_proto::{Cipher, Opener, Protection, SealError, Sealer, TAG_LEN};

const MODES: [Protection; 3] = [Protection::None, Protection::Mac, Protection::Aead];

fuzz_target!(|data: &[u8]| {
    let Some((&[selector, key_byte, l0, l1], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let mode = MODES[usize::from(selector) % MODES.len()];
    let cipher = Cipher::ALL[usize::from(selector / 3) % Cipher::ALL.len()];
    let key = [key_byte; 32];
    let head_len = usize::from(u16::from_le_bytes([l0, l1])).min(rest.len());
    let (head, tail) = rest.split_at(head_len);

    // 1. Arbitrary bytes: whatever happens, no panic, and no advance on failure.
    let mut opener = Opener::with_cipher(mode, cipher, &key).expect("32-byte key");
    let mut buf = tail.to_vec();
    match opener.open(head, &mut buf) {
        Ok(()) => {
            assert_eq!(opener.seq(), u64::from(mode != Protection::None));
            // Under None nothing is checked or changed.
            if mode == Protection::None {
                assert_eq!(buf, tail);
            }
        }
        Err(SealError::Short { need, have }) => {
            assert_eq!((need, have), (TAG_LEN, tail.len()));
            assert_eq!(opener.seq(), 0);
        }
        Err(SealError::BadTag { seq }) => {
            assert_ne!(mode, Protection::None);
            assert_eq!((seq, opener.seq()), (0, 0));
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }

    // 2. The same bytes, sealed as a frame whose payload is `tail`: it opens
    //    exactly once, and gives back the payload.
    let mut sealer = Sealer::with_cipher(mode, cipher, &key).expect("32-byte key");
    let mut sealed = vec![0u8; tail.len()];
    let tag = sealer
        .seal_encrypt(head, tail, &mut sealed)
        .expect("seal_encrypt with matching buffers");
    assert_eq!(tag.is_some(), mode != Protection::None);
    if let Some(tag) = tag {
        sealed.extend_from_slice(&tag);
    }
    let mut opener = Opener::with_cipher(mode, cipher, &key).expect("32-byte key");
    let mut again = sealed.clone();
    opener.open(head, &mut sealed).expect("own frame opens");
    assert_eq!(&sealed[..tail.len()], tail);
    if mode != Protection::None {
        // A replay of the same frame fails.
        assert_eq!(
            opener.open(head, &mut again),
            Err(SealError::BadTag { seq: 1 })
        );
    }
});
