//! Unsigned LEB128 varints, canonical form only.
//!
//! 7 bits per byte, least significant group first, high bit set on every
//! byte but the last; at most 10 bytes for a `u64`. The decoder rejects
//! overlong encodings (a final `0x00` byte after the first) and values above
//! `u64::MAX`, so every value has exactly one encoding.

use crate::error::DecodeError;

/// Longest encoding of a `u64`.
pub const MAX_VARINT_LEN: usize = 10;

/// Number of bytes `value` encodes to (1..=10).
pub const fn encoded_len(value: u64) -> usize {
    let bits = 64 - value.leading_zeros();
    if bits == 0 {
        1
    } else {
        // bits <= 64, so the quotient <= 10 and fits any usize.
        bits.div_ceil(7) as usize
    }
}

/// Appends the encoding of `value`.
pub fn write(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let low = u8::try_from(value & 0x7f).unwrap_or(0);
        value >>= 7;
        if value == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// Reads one varint at `*pos` and advances `*pos` past it.
pub fn read(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    let start = *pos;
    let bad = DecodeError::BadVarint { offset: start };
    let mut value = 0u64;
    for i in 0..MAX_VARINT_LEN {
        let byte = *buf.get(start + i).ok_or(bad.clone())?;
        let group = u64::from(byte & 0x7f);
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(bad); // bits above 2^64
        }
        value |= group << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err(bad); // overlong
            }
            *pos = start + i + 1;
            return Ok(value);
        }
    }
    Err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_round_trip() {
        for v in [0, 1, 127, 128, 16383, 16384, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            write(v, &mut b);
            assert_eq!(b.len(), encoded_len(v), "{v}");
            let mut pos = 0;
            assert_eq!(read(&b, &mut pos), Ok(v));
            assert_eq!(pos, b.len());
        }
    }

    #[test]
    fn rejects_non_canonical() {
        let mut pos = 0;
        assert_eq!(
            read(&[0x80, 0x00], &mut pos),
            Err(DecodeError::BadVarint { offset: 0 })
        );
        assert_eq!(
            read(&[0x80], &mut pos),
            Err(DecodeError::BadVarint { offset: 0 })
        );
        let mut too_big = vec![0xff; 9];
        too_big.push(0x02);
        assert_eq!(
            read(&too_big, &mut pos),
            Err(DecodeError::BadVarint { offset: 0 })
        );
        assert_eq!(
            read(&[0xff; 11], &mut pos),
            Err(DecodeError::BadVarint { offset: 0 })
        );
    }
}
