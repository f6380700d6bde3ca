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
        let n = 1024;
        let mut out = vec![0u8; payload.len() + 16];
        let t = Instant::now();
        let mut tags = Vec::new();
        for _ in 0..n {
            let tag = if mode == Protection::Aead {
                s.seal_encrypt(&head, &payload, &mut out[..payload.len()])
                    .unwrap()
                    .unwrap()
            } else {
                s.seal(&head, &payload).unwrap().unwrap()
            };
            tags.push(tag);
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
        let mut ok = 0;
        for tag in &tags {
            let l = buf.len();
            buf[l - 16..].copy_from_slice(tag);
            if o.open(&head, &mut buf).is_ok() {
                ok += 1;
            }
            if mode == Protection::Aead {
                break;
            }
        }
        let e = t.elapsed().as_secs_f64();
        println!(
            "{name} {mode:?} open: {:.2} GB/s ({ok} ok)",
            f64::from(ok.max(1) << 20) / e / 1e9
        );
    }
}
