//! A small reader and writer of NumPy `.npy` files (format versions 1-3, little-endian numeric
//! dtypes, C order): enough for reference inputs and outputs and for `--logits` dumps.

use crate::error::{ModelError, Result};
use std::io::Write;
use std::path::Path;

/// The element values of an [`Npy`] array, in C (row-major) order.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    /// `<f4`.
    F32(Vec<f32>),
    /// `<f8`.
    F64(Vec<f64>),
    /// Signed integers (`|i1`, `<i2`, `<i4`, `<i8`), widened.
    I64(Vec<i64>),
    /// Unsigned integers (`|u1`, `<u2`, `<u4`, `<u8`) and booleans (`|b1`), widened.
    U64(Vec<u64>),
}

/// An n-dimensional array read from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct Npy {
    /// Dimensions, outermost first (`()` scalars have an empty shape).
    pub shape: Vec<usize>,
    /// The values.
    pub data: NpyData,
}

impl Npy {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            NpyData::F32(v) => v.len(),
            NpyData::F64(v) => v.len(),
            NpyData::I64(v) => v.len(),
            NpyData::U64(v) => v.len(),
        }
    }

    /// `true` when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as `f32` (integers and doubles are converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::U64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The values as `i64`; fails (naming `path`) for floating-point arrays.
    pub fn to_i64(&self, path: &Path) -> Result<Vec<i64>> {
        match &self.data {
            NpyData::I64(v) => Ok(v.clone()),
            NpyData::U64(v) => v
                .iter()
                .map(|&x| {
                    i64::try_from(x)
                        .map_err(|_| npy_err(path, format!("value {x} does not fit in i64")))
                })
                .collect(),
            _ => Err(npy_err(
                path,
                "expected an integer array, found floating point".into(),
            )),
        }
    }
}

fn npy_err(path: &Path, detail: String) -> ModelError {
    ModelError::Npy {
        path: path.to_path_buf(),
        detail,
    }
}

/// Reads a `.npy` file.
pub fn read_npy(path: impl AsRef<Path>) -> Result<Npy> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    parse_npy(&bytes, path)
}

/// Parses the bytes of a `.npy` file; `path` is only used in error messages.
pub fn parse_npy(bytes: &[u8], path: &Path) -> Result<Npy> {
    let err = |d: &str| npy_err(path, d.to_string());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(err("not a .npy file (bad magic)"));
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(err("truncated header"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => {
            return Err(npy_err(
                path,
                format!("unsupported .npy format version {v}"),
            ))
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| err("truncated header"))?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| err("header is not text"))?;
    let descr = dict_value(header, "descr").ok_or_else(|| err("header has no 'descr'"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran =
        dict_value(header, "fortran_order").ok_or_else(|| err("header has no 'fortran_order'"))?;
    if fortran.trim() != "False" {
        return Err(err("Fortran-order arrays are not supported"));
    }
    let shape_s = dict_value(header, "shape").ok_or_else(|| err("header has no 'shape'"))?;
    let shape =
        parse_shape(shape_s).ok_or_else(|| npy_err(path, format!("bad shape {shape_s}")))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| npy_err(path, format!("shape {shape:?} overflows")))?;
    let (kind, size) =
        parse_descr(descr).ok_or_else(|| npy_err(path, format!("unsupported dtype '{descr}'")))?;
    let payload = &bytes[end..];
    let need = count
        .checked_mul(size)
        .ok_or_else(|| err("size overflows"))?;
    if payload.len() < need {
        return Err(npy_err(
            path,
            format!(
                "truncated data: shape {shape:?} of '{descr}' needs {need} bytes, the file has {}",
                payload.len()
            ),
        ));
    }
    let payload = &payload[..need];
    let data = match (kind, size) {
        ('f', 4) => NpyData::F32(
            payload
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        ('f', 8) => NpyData::F64(
            payload
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(arr8(c)))
                .collect(),
        ),
        ('i', _) => NpyData::I64(payload.chunks_exact(size).map(sign_extend).collect()),
        ('u' | 'b', _) => NpyData::U64(payload.chunks_exact(size).map(zero_extend).collect()),
        _ => return Err(npy_err(path, format!("unsupported dtype '{descr}'"))),
    };
    Ok(Npy { shape, data })
}

fn arr8(c: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(c);
    a
}

fn zero_extend(c: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[..c.len()].copy_from_slice(c);
    u64::from_le_bytes(a)
}

fn sign_extend(c: &[u8]) -> i64 {
    let neg = c.last().is_some_and(|b| b & 0x80 != 0);
    let mut a = [if neg { 0xff } else { 0 }; 8];
    a[..c.len()].copy_from_slice(c);
    i64::from_le_bytes(a)
}

/// `(kind, item size)` of a little-endian or byte-order-free dtype string.
fn parse_descr(d: &str) -> Option<(char, usize)> {
    let mut chars = d.chars();
    let order = chars.next()?;
    if !matches!(order, '<' | '|' | '=') {
        return None;
    }
    let kind = chars.next()?;
    let size: usize = chars.as_str().parse().ok()?;
    let ok = match kind {
        'f' => size == 4 || size == 8,
        'i' | 'u' => matches!(size, 1 | 2 | 4 | 8),
        'b' => size == 1,
        _ => false,
    };
    ok.then_some((kind, size))
}

/// The raw text of `'key': value` in a Python dict literal (value ends at the next top-level comma).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat1 = format!("'{key}':");
    let pat2 = format!("\"{key}\":");
    let at = header
        .find(&pat1)
        .map(|i| i + pat1.len())
        .or_else(|| header.find(&pat2).map(|i| i + pat2.len()))?;
    let rest = &header[at..];
    let mut depth = 0i32;
    for (i, ch) in rest.char_indices() {
        match ch {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

fn parse_shape(s: &str) -> Option<Vec<usize>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.trim_end_matches('L').parse().ok())
        .collect()
}

/// Writes a C-order `<f4` `.npy` file atomically (temporary file in the same directory, then
/// rename).
pub fn write_npy_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(npy_err(
            path,
            format!("shape {shape:?} holds {count} values, got {}", data.len()),
        ));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    // Pad so that the data starts on a 64-byte boundary; the header ends with a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + 4 * data.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    let hl = u16::try_from(header.len()).map_err(|_| npy_err(path, "header too long".into()))?;
    bytes.extend_from_slice(&hl.to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    crate::weights::write_atomically(path, |f| f.write_all(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_f32() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| ModelError::io(Path::new("."), e))?;
        let p = dir.path().join("a.npy");
        write_npy_f32(&p, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5])?;
        let a = read_npy(&p)?;
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, NpyData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]));
        let bytes = std::fs::read(&p).map_err(|e| ModelError::io(&p, e))?;
        assert_eq!(
            (bytes.len() - 24) % 64,
            0,
            "data starts on a 64-byte boundary"
        );
        Ok(())
    }

    #[test]
    fn parses_integers_and_scalars() -> Result<()> {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        let h = "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }          \n";
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        for v in [-1i64, 0, 7] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let a = parse_npy(&b, Path::new("x.npy"))?;
        assert_eq!(a.to_i64(Path::new("x.npy"))?, vec![-1, 0, 7]);
        let h = "{'descr': '|u1', 'fortran_order': False, 'shape': (), }\n";
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.push(200);
        let a = parse_npy(&b, Path::new("x.npy"))?;
        assert_eq!((a.shape.len(), a.to_f32()), (0, vec![200.0]));
        Ok(())
    }

    #[test]
    fn bad_files_name_the_file() {
        let e = parse_npy(b"hello world", Path::new("bad.npy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.npy") && e.contains("magic"), "{e}");
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }\n";
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&[0u8; 7]);
        let e = parse_npy(&b, Path::new("short.npy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("short.npy") && e.contains("truncated"), "{e}");
        let h = "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }\n";
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&[0u8; 4]);
        assert!(parse_npy(&b, Path::new("be.npy"))
            .unwrap_err()
            .to_string()
            .contains(">f4"));
    }
}
