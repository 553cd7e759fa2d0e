//! Decompression of raw Snappy blocks (the block compression LevelDB-format tables may use).
//!
//! Format: a varint with the uncompressed length, then elements whose tag byte's low two bits say
//! literal (0), copy with a 1-byte offset (1), 2-byte offset (2) or 4-byte offset (3).

use crate::proto::read_varint;

/// Decompresses one raw Snappy block; the error says what is wrong and where.
pub(crate) fn decompress(input: &[u8]) -> Result<Vec<u8>, String> {
    let mut pos = 0usize;
    let declared = read_varint(input, &mut pos).map_err(|e| format!("bad length preamble: {e}"))?;
    if declared > u64::from(u32::MAX) {
        return Err(format!(
            "declared length {declared} exceeds the 32-bit limit"
        ));
    }
    let declared = declared as usize;
    // Never trust the declared size for the allocation: a copy element expands at most ~64x.
    let mut out: Vec<u8> = Vec::with_capacity(declared.min(input.len().saturating_mul(64)));
    while pos < input.len() {
        let tag = input[pos];
        pos += 1;
        let (len, offset) = match tag & 3 {
            0 => {
                let code = usize::from(tag >> 2);
                let len = if code < 60 {
                    code + 1
                } else {
                    let n = code - 59;
                    let bytes = take(input, &mut pos, n, "literal length")?;
                    let mut v = 0usize;
                    for (i, b) in bytes.iter().enumerate() {
                        v |= usize::from(*b) << (8 * i);
                    }
                    v + 1
                };
                let lit = take(input, &mut pos, len, "literal")?;
                if out.len() + lit.len() > declared {
                    return Err(format!("output exceeds the declared length {declared}"));
                }
                out.extend_from_slice(lit);
                continue;
            }
            1 => {
                let b = take(input, &mut pos, 1, "copy offset")?[0];
                (
                    usize::from((tag >> 2) & 7) + 4,
                    (usize::from(tag >> 5) << 8) | usize::from(b),
                )
            }
            2 => {
                let b = take(input, &mut pos, 2, "copy offset")?;
                (
                    usize::from(tag >> 2) + 1,
                    usize::from(u16::from_le_bytes([b[0], b[1]])),
                )
            }
            _ => {
                let b = take(input, &mut pos, 4, "copy offset")?;
                let off = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                (usize::from(tag >> 2) + 1, off as usize)
            }
        };
        if offset == 0 || offset > out.len() {
            return Err(format!("copy offset {offset} at input byte {pos} points outside the {} bytes produced so far", out.len()));
        }
        if out.len() + len > declared {
            return Err(format!("output exceeds the declared length {declared}"));
        }
        let start = out.len() - offset;
        // Copies may overlap their own output (run-length style), so go byte by byte.
        for i in 0..len {
            let b = out[start + i];
            out.push(b);
        }
    }
    if out.len() != declared {
        return Err(format!(
            "produced {} bytes, the header declared {declared}",
            out.len()
        ));
    }
    Ok(out)
}

fn take<'a>(input: &'a [u8], pos: &mut usize, n: usize, what: &str) -> Result<&'a [u8], String> {
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= input.len())
        .ok_or_else(|| {
            format!(
                "{what} of {n} bytes at input byte {} runs past the end ({} bytes)",
                *pos,
                input.len()
            )
        })?;
    let s = &input[*pos..end];
    *pos = end;
    Ok(s)
}

/// A simple (not size-optimal) Snappy compressor, used by tests to produce compressed tables.
#[cfg(test)]
pub(crate) fn compress_for_tests(input: &[u8]) -> Vec<u8> {
    use crate::proto::put_varint;
    fn literal(out: &mut Vec<u8>, lit: &[u8]) {
        for chunk in lit.chunks(65536) {
            let n = chunk.len() - 1;
            if n < 60 {
                out.push((n as u8) << 2);
            } else if n < 256 {
                out.push(60 << 2);
                out.push(n as u8);
            } else {
                out.push(61 << 2);
                out.extend_from_slice(&(n as u16).to_le_bytes());
            }
            out.extend_from_slice(chunk);
        }
    }
    let mut out = Vec::new();
    put_varint(&mut out, input.len() as u64);
    let mut table = std::collections::HashMap::<[u8; 4], usize>::new();
    let (mut i, mut lit_start) = (0usize, 0usize);
    while i + 4 <= input.len() {
        let key = [input[i], input[i + 1], input[i + 2], input[i + 3]];
        if let Some(&cand) = table.get(&key) {
            let off = i - cand;
            if off > 0 && off < 65536 {
                let mut len = 4;
                while i + len < input.len() && len < 64 && input[cand + len] == input[i + len] {
                    len += 1;
                }
                literal(&mut out, &input[lit_start..i]);
                if (4..=11).contains(&len) && off < 2048 {
                    out.push(1 | (((len - 4) as u8) << 2) | (((off >> 8) as u8) << 5));
                    out.push(off as u8);
                } else {
                    out.push(2 | (((len - 1) as u8) << 2));
                    out.extend_from_slice(&(off as u16).to_le_bytes());
                }
                table.insert(key, i);
                i += len;
                lit_start = i;
                continue;
            }
        }
        table.insert(key, i);
        i += 1;
    }
    if lit_start < input.len() {
        literal(&mut out, &input[lit_start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_block() {
        // Length 15: literal "abcd", a 1-byte-offset copy of 8 at offset 4 (overlapping its own
        // output), then a 2-byte-offset copy of 3 at offset 12.
        let mut b = vec![
            15u8, 0x0c, b'a', b'b', b'c', b'd', 0x11, 0x04, 0x0a, 0x0c, 0x00,
        ];
        assert_eq!(decompress(&b).unwrap(), b"abcdabcdabcdabc");
        // Declared length mismatch is an error.
        b[0] = 16;
        assert!(decompress(&b).is_err());
    }

    #[test]
    fn roundtrip_and_truncation() {
        let mut data = Vec::new();
        for i in 0..5000u32 {
            data.extend_from_slice(format!("key{:04}value{} ", i % 97, i % 13).as_bytes());
        }
        let c = compress_for_tests(&data);
        assert!(
            c.len() < data.len() / 2,
            "test compressor should find matches"
        );
        assert_eq!(decompress(&c).unwrap(), data);
        for cut in (0..c.len()).step_by(97) {
            assert!(decompress(&c[..cut]).is_err());
        }
    }

    #[test]
    fn bad_offsets() {
        // copy before any output
        assert!(decompress(&[4, 0x01, 0x01]).is_err());
        // offset zero
        assert!(decompress(&[5, 0x00, b'a', 0x01, 0x00]).is_err());
        // absurd declared length does not allocate it
        let mut b = Vec::new();
        crate::proto::put_varint(&mut b, u32::MAX as u64);
        b.extend_from_slice(&[0x00, b'a']);
        assert!(decompress(&b).is_err());
    }
}
