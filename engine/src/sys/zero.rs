//! Zero detection at memory speed.
//!
//! # Mechanism
//! An OR-fold over 256-byte blocks, which the compiler turns into wide
//! vector ORs; a data page usually fails on its first block, so a page of
//! random contents costs about 256 bytes of reads, and a zero page one pass
//! at memory bandwidth.
//!
//! # Kernel versions
//! None.
//!
//! # Hazards
//! Only for bytes nobody writes meanwhile (frozen guest memory, receive
//! buffers the engine owns): see `sys::guest`.

/// Whether every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (blocks, tail) = b.as_chunks::<256>();
    for blk in blocks {
        if blk.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_and_not() {
        let mut b = vec![0u8; 4096 + 17];
        assert!(is_zero(&b));
        for i in [0, 255, 256, 4095, 4096, 4112] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
