use ringfault_proto::{Cipher, Opener, Protection, Sealer};
use std::time::Instant;
fn main() {
    let payload = vec![0x5au8; 1 << 20];
    let head = [1u8; 40];
    for (cipher, mode) in Cipher::ALL
        .into_iter()
        .flat_map(|c| [(c, Protection::Mac), (c, Protection::Aead)])
    {
        let mut s = Sealer::with_cipher(mode, cipher, &[3; 32]).unwrap();
        let mut o = Opener::with_cipher(mode, cipher, &[3; 32]).unwrap();
        // Under `Aead` every frame's ciphertext is kept for the opener, so
        // fewer frames (128 MiB of them).
        let n: u32 = if mode == Protection::Aead { 128 } else { 1024 };
        // Ciphertext buffers are allocated (and touched) before the clock.
        let mut frames: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                vec![
                    1u8;
                    if mode == Protection::Aead {
                        payload.len() + 16
                    } else {
                        16
                    }
                ]
            })
            .collect();
        let t = Instant::now();
        for f in &mut frames {
            if mode == Protection::Aead {
                let (ct, tag) = f.split_at_mut(payload.len());
                let t = s.seal_encrypt(&head, &payload, ct).unwrap().unwrap();
                tag.copy_from_slice(&t);
            } else {
                f.copy_from_slice(&s.seal(&head, &payload).unwrap().unwrap());
            }
        }
        let e = t.elapsed().as_secs_f64();
        let name = cipher.name();
        println!(
            "{name} {mode:?} seal: {:.2} GB/s",
            f64::from(n << 20) / e / 1e9
        );
        let mut buf = payload.clone();
        buf.extend_from_slice(&[0; 16]);
        let t = Instant::now();
        let mut ok = 0u32;
        for f in &mut frames {
            let opened = if mode == Protection::Aead {
                o.open(&head, f)
            } else {
                let l = buf.len();
                buf[l - 16..].copy_from_slice(f);
                o.open(&head, &mut buf)
            };
            if opened.is_ok() {
                ok += 1;
            }
        }
        let e = t.elapsed().as_secs_f64();
        println!(
            "{name} {mode:?} open: {:.2} GB/s ({ok} of {n} ok)",
            f64::from(ok.max(1) << 20) / e / 1e9
        );
    }
}
