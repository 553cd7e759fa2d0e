//! A minimal protobuf wire-format decoder and encoder, enough for the two tensor-bundle messages.
//!
//! Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. Groups (3, 4) are not used by
//! these messages and are rejected.

/// Reads LEB128 varints; shared with the table format, which encodes block handles the same way.
pub(crate) fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for i in 0..10 {
        let Some(&b) = buf.get(*pos) else {
            return Err(format!(
                "varint runs past the end of its {}-byte buffer",
                buf.len()
            ));
        };
        *pos += 1;
        if i == 9 && b > 1 {
            return Err("varint longer than 64 bits".to_string());
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".to_string())
}

/// Appends `v` as a LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One decoded field value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Value<'a> {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 1.
    Fixed64(u64),
    /// Wire type 2.
    Bytes(&'a [u8]),
    /// Wire type 5.
    Fixed32(u32),
}

impl Value<'_> {
    /// The wire-type name, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Value::Varint(_) => "varint",
            Value::Fixed64(_) => "fixed64",
            Value::Bytes(_) => "length-delimited",
            Value::Fixed32(_) => "fixed32",
        }
    }
}

/// Iterates over the fields of one serialized message.
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0 }
    }

    /// The next `(field_number, value)`, `None` at the end of the message.
    pub(crate) fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let tag = read_varint(self.buf, &mut self.pos)?;
        let field = tag >> 3;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(format!("invalid field number {field}"));
        }
        let value = match tag & 7 {
            0 => Value::Varint(read_varint(self.buf, &mut self.pos)?),
            1 => Value::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().map_err(|_| "fixed64")?,
            )),
            2 => {
                let len = read_varint(self.buf, &mut self.pos)?;
                let len = usize::try_from(len).map_err(|_| format!("length {len} too large"))?;
                Value::Bytes(self.take(len)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().map_err(|_| "fixed32")?,
            )),
            w => return Err(format!("unsupported wire type {w} for field {field}")),
        };
        Ok(Some((field as u32, value)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "field of {n} bytes at offset {} runs past the end of the {}-byte message",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

/// Appends a field tag.
pub(crate) fn put_tag(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

/// Appends a varint field (proto3: callers skip zero values themselves where they want to).
pub(crate) fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_tag(out, field, 0);
    put_varint(out, v);
}

/// Appends a length-delimited field.
pub(crate) fn put_bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_tag(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends a fixed32 field.
pub(crate) fn put_fixed32_field(out: &mut Vec<u8>, field: u32, v: u32) {
    put_tag(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_roundtrip() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
            (-1i64) as u64,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut p = 0;
            assert_eq!(read_varint(&b, &mut p).unwrap(), v);
            assert_eq!(p, b.len());
        }
    }

    #[test]
    fn varint_errors() {
        let mut p = 0;
        assert!(read_varint(&[0x80, 0x80], &mut p).is_err());
        let mut p = 0;
        assert!(read_varint(&[0xff; 11], &mut p).is_err());
        let mut p = 0;
        assert!(read_varint(&[], &mut p).is_err());
    }

    #[test]
    fn fields_decode() {
        let mut m = Vec::new();
        put_varint_field(&mut m, 1, 19);
        put_bytes_field(&mut m, 2, b"abc");
        put_fixed32_field(&mut m, 6, 0x1234_5678);
        let mut f = Fields::new(&m);
        assert_eq!(f.next_field().unwrap(), Some((1, Value::Varint(19))));
        assert_eq!(f.next_field().unwrap(), Some((2, Value::Bytes(b"abc"))));
        assert_eq!(
            f.next_field().unwrap(),
            Some((6, Value::Fixed32(0x1234_5678)))
        );
        assert_eq!(f.next_field().unwrap(), None);
        // A truncated message is an error at every cut, never a panic.
        for cut in 0..m.len() {
            let mut f = Fields::new(&m[..cut]);
            let mut n = 0;
            while let Ok(Some(_)) = f.next_field() {
                n += 1;
            }
            assert!(n <= 3);
        }
    }
}
