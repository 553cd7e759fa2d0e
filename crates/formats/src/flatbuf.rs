//! A minimal, bounds-checked FlatBuffers reader: tables through their vtables, scalars, strings,
//! vectors of scalars and vectors of tables. Every access is checked against the buffer, so a
//! truncated or corrupt file gives an error, never a panic or an out-of-bounds read.
//!
//! Encoding facts (flatbuffers.dev "internals"): the buffer starts with a `u32` offset to the root
//! table; a table starts with an `i32` soffset such that `vtable = table - soffset`; a vtable is
//! `u16 vtable_len, u16 table_len, u16 field_offset[n]` (0 = field absent, use the default);
//! offsets to sub-objects are `u32` relative to where they are stored; vectors and strings are a
//! `u32` length followed by the elements. All little endian.

/// Why a read failed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FbError(pub String);

pub(crate) type FbResult<T> = Result<T, FbError>;

fn oob(pos: usize, n: usize, len: usize, what: &str) -> FbError {
    FbError(format!("{what}: {n} bytes at offset {pos} lie past the end of the {len}-byte buffer (truncated or corrupt file)"))
}

/// Bounds-checked `n` bytes at `pos`.
pub(crate) fn bytes<'a>(buf: &'a [u8], pos: usize, n: usize, what: &str) -> FbResult<&'a [u8]> {
    pos.checked_add(n)
        .filter(|&e| e <= buf.len())
        .map(|e| &buf[pos..e])
        .ok_or_else(|| oob(pos, n, buf.len(), what))
}

fn arr<const N: usize>(buf: &[u8], pos: usize, what: &str) -> FbResult<[u8; N]> {
    let b = bytes(buf, pos, N, what)?;
    let mut a = [0u8; N];
    a.copy_from_slice(b);
    Ok(a)
}

pub(crate) fn read_u32(buf: &[u8], pos: usize, what: &str) -> FbResult<u32> {
    arr::<4>(buf, pos, what).map(u32::from_le_bytes)
}

/// Follows a `u32` forward offset stored at `pos`.
fn follow(buf: &[u8], pos: usize, what: &str) -> FbResult<usize> {
    let off = read_u32(buf, pos, what)? as usize;
    let target = pos
        .checked_add(off)
        .ok_or_else(|| FbError(format!("{what}: offset overflow at {pos}")))?;
    if target >= buf.len() {
        return Err(oob(target, 1, buf.len(), what));
    }
    Ok(target)
}

/// Little-endian scalar types a table field can hold.
pub(crate) trait Scalar: Sized + Copy {
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
}

macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_le(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(&b[..Self::SIZE]);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}
scalar!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

impl Scalar for bool {
    const SIZE: usize = 1;
    fn from_le(b: &[u8]) -> Self {
        b[0] != 0
    }
}

/// A table: its position and vtable.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
}

impl<'a> Table<'a> {
    /// The root table of a buffer.
    pub(crate) fn root(buf: &'a [u8]) -> FbResult<Self> {
        let pos = follow(buf, 0, "root table offset")?;
        Table::at(buf, pos, "root table")
    }

    /// The table at `pos`.
    pub(crate) fn at(buf: &'a [u8], pos: usize, what: &str) -> FbResult<Self> {
        let soffset = i32::from_le_bytes(arr::<4>(buf, pos, what)?);
        let vtable = (pos as i64) - i64::from(soffset);
        if vtable < 0 || vtable as u64 >= buf.len() as u64 {
            return Err(FbError(format!("{what}: vtable of the table at {pos} would be at {vtable}, outside the {}-byte buffer", buf.len())));
        }
        let vtable = vtable as usize;
        let vtable_len = usize::from(u16::from_le_bytes(arr::<2>(buf, vtable, what)?));
        let table_len = usize::from(u16::from_le_bytes(arr::<2>(buf, vtable + 2, what)?));
        if vtable_len < 4 || vtable_len % 2 != 0 {
            return Err(FbError(format!(
                "{what}: invalid vtable length {vtable_len} at {vtable}"
            )));
        }
        bytes(buf, vtable, vtable_len, what)?;
        bytes(buf, pos, table_len.max(4), what)?;
        Ok(Table {
            buf,
            pos,
            vtable,
            vtable_len,
        })
    }

    /// Position of field `slot` (its index in schema order, unions counting twice), if present.
    fn field(&self, slot: usize) -> Option<usize> {
        let entry = 4 + 2 * slot;
        if entry + 2 > self.vtable_len {
            return None;
        }
        let p = self.vtable + entry;
        // In bounds: the whole vtable was checked in `at`.
        let off = u16::from_le_bytes([self.buf[p], self.buf[p + 1]]);
        (off != 0).then(|| self.pos + usize::from(off))
    }

    /// A scalar field, or `default` when absent.
    pub(crate) fn scalar<T: Scalar>(&self, slot: usize, default: T, what: &str) -> FbResult<T> {
        match self.field(slot) {
            None => Ok(default),
            Some(p) => bytes(self.buf, p, T::SIZE, what).map(T::from_le),
        }
    }

    /// A sub-table field.
    pub(crate) fn table(&self, slot: usize, what: &str) -> FbResult<Option<Table<'a>>> {
        match self.field(slot) {
            None => Ok(None),
            Some(p) => {
                let t = follow(self.buf, p, what)?;
                Table::at(self.buf, t, what).map(Some)
            }
        }
    }

    /// A vector field.
    pub(crate) fn vector(&self, slot: usize, what: &str) -> FbResult<Option<Vector<'a>>> {
        match self.field(slot) {
            None => Ok(None),
            Some(p) => {
                let v = follow(self.buf, p, what)?;
                let len = read_u32(self.buf, v, what)? as usize;
                Ok(Some(Vector {
                    buf: self.buf,
                    start: v + 4,
                    len,
                }))
            }
        }
    }

    /// A string field (invalid UTF-8 is replaced, names are for display and matching).
    pub(crate) fn string(&self, slot: usize, what: &str) -> FbResult<Option<String>> {
        match self.vector(slot, what)? {
            None => Ok(None),
            Some(v) => Ok(Some(String::from_utf8_lossy(v.bytes(what)?).into_owned())),
        }
    }
}

/// A vector: element storage starts at `start`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Vector<'a> {
    buf: &'a [u8],
    start: usize,
    len: usize,
}

impl<'a> Vector<'a> {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Byte offset of the first element in the buffer.
    pub(crate) fn start(&self) -> usize {
        self.start
    }

    /// The elements of a `[ubyte]` vector.
    pub(crate) fn bytes(&self, what: &str) -> FbResult<&'a [u8]> {
        bytes(self.buf, self.start, self.len, what)
    }

    /// All elements of a scalar vector.
    pub(crate) fn scalars<T: Scalar>(&self, what: &str) -> FbResult<Vec<T>> {
        let n = self
            .len
            .checked_mul(T::SIZE)
            .ok_or_else(|| FbError(format!("{what}: vector length {} overflows", self.len)))?;
        let b = bytes(self.buf, self.start, n, what)?;
        Ok(b.chunks_exact(T::SIZE).map(T::from_le).collect())
    }

    /// Element `i` of a vector of tables.
    pub(crate) fn table(&self, i: usize, what: &str) -> FbResult<Table<'a>> {
        if i >= self.len {
            return Err(FbError(format!(
                "{what}: index {i} out of a vector of {}",
                self.len
            )));
        }
        let p = self.start + 4 * i;
        let t = follow(self.buf, p, what)?;
        Table::at(self.buf, t, what)
    }

    /// Checks that a vector of `elem_size`-byte elements fits in the buffer (before iterating a
    /// vector of tables whose length may be corrupt).
    pub(crate) fn check(&self, elem_size: usize, what: &str) -> FbResult<()> {
        let n = self
            .len
            .checked_mul(elem_size)
            .ok_or_else(|| FbError(format!("{what}: vector length {} overflows", self.len)))?;
        bytes(self.buf, self.start, n, what).map(|_| ())
    }
}

#[cfg(test)]
pub(crate) mod builder {
    //! A tiny FlatBuffers writer for unit tests: objects are appended front to back and referenced
    //! by absolute position; offsets are patched when a table is written.

    /// Serialized buffer under construction.
    pub(crate) struct Builder {
        pub(crate) buf: Vec<u8>,
    }

    /// A field value of a table being written.
    pub(crate) enum F {
        /// Absent.
        None,
        /// Inline scalar bytes (little endian).
        Inline(Vec<u8>),
        /// Reference (u32 offset) to the object at this absolute position.
        Ref(usize),
    }

    impl Builder {
        pub(crate) fn new(file_identifier: &[u8; 4]) -> Self {
            let mut buf = vec![0u8; 4];
            buf.extend_from_slice(file_identifier);
            Builder { buf }
        }

        fn align4(&mut self) {
            let aligned = self.buf.len().next_multiple_of(4);
            self.buf.resize(aligned, 0);
        }

        /// Writes a vector of raw little-endian element bytes; returns its position.
        pub(crate) fn vector(&mut self, len: usize, elems: &[u8]) -> usize {
            self.align4();
            let p = self.buf.len();
            self.buf.extend_from_slice(&(len as u32).to_le_bytes());
            self.buf.extend_from_slice(elems);
            p
        }

        pub(crate) fn string(&mut self, s: &str) -> usize {
            let mut b = s.as_bytes().to_vec();
            b.push(0);
            self.vector(s.len(), &b)
        }

        /// Writes a vector of `n` table references with zero placeholders; returns its position
        /// and the slot of each element, to [`Builder::patch`] once the tables are written.
        pub(crate) fn table_vector(&mut self, n: usize) -> (usize, Vec<usize>) {
            self.align4();
            let p = self.buf.len();
            self.buf.extend_from_slice(&(n as u32).to_le_bytes());
            let slots = (0..n).map(|i| p + 4 + 4 * i).collect();
            self.buf.extend(std::iter::repeat_n(0u8, 4 * n));
            (p, slots)
        }

        /// Writes a table: vtable first, then the table (soffset negative => vtable before it).
        /// References must point forward, so referenced objects are written later and patched
        /// through the returned fix-up list.
        pub(crate) fn table(&mut self, fields: &[F]) -> (usize, Vec<(usize, usize)>) {
            self.align4();
            // Layout the table body: soffset then fields, each 4- or 8-byte aligned by size.
            let mut body: Vec<u8> = vec![0; 4];
            let mut offsets = Vec::new();
            let mut refs = Vec::new();
            for f in fields {
                match f {
                    F::None => offsets.push(0u16),
                    F::Inline(b) => {
                        let aligned = body.len().next_multiple_of(b.len().clamp(1, 8));
                        body.resize(aligned, 0);
                        offsets.push(body.len() as u16);
                        body.extend_from_slice(b);
                    }
                    F::Ref(target) => {
                        let aligned = body.len().next_multiple_of(4);
                        body.resize(aligned, 0);
                        offsets.push(body.len() as u16);
                        refs.push((body.len(), *target));
                        body.extend_from_slice(&0u32.to_le_bytes());
                    }
                }
            }
            let vt_len = 4 + 2 * offsets.len();
            let vt_pos = self.buf.len();
            self.buf.extend_from_slice(&(vt_len as u16).to_le_bytes());
            self.buf
                .extend_from_slice(&(body.len() as u16).to_le_bytes());
            for o in &offsets {
                self.buf.extend_from_slice(&o.to_le_bytes());
            }
            let aligned = self.buf.len().next_multiple_of(8);
            self.buf.resize(aligned, 0);
            let t_pos = self.buf.len();
            body[0..4].copy_from_slice(&((t_pos - vt_pos) as i32).to_le_bytes());
            self.buf.extend_from_slice(&body);
            let fixups = refs
                .into_iter()
                .map(|(rel, target)| (t_pos + rel, target))
                .collect();
            (t_pos, fixups)
        }

        /// Patches a u32 forward offset at `slot` to point at `target`.
        pub(crate) fn patch(&mut self, slot: usize, target: usize) {
            assert!(target > slot);
            self.buf[slot..slot + 4].copy_from_slice(&((target - slot) as u32).to_le_bytes());
        }

        pub(crate) fn finish(mut self, root: usize) -> Vec<u8> {
            self.patch(0, root);
            self.buf
        }
    }
}

#[cfg(test)]
mod tests {
    use super::builder::{Builder, F};
    use super::*;

    #[test]
    fn reads_fields_defaults_and_rejects_out_of_bounds() {
        let mut b = Builder::new(b"TEST");
        let (root, fix) = b.table(&[
            F::Inline(7u32.to_le_bytes().to_vec()),
            F::None,
            F::Ref(0),
            F::Inline(vec![1]),
        ]);
        let s = b.string("hello");
        let slot = fix[0].0;
        b.patch(slot, s);
        let buf = b.finish(root);
        // Everything up to the last string byte is needed (the NUL terminator is not read).
        let needed = s + 4 + 5;
        let t = Table::root(&buf).unwrap();
        assert_eq!(t.scalar::<u32>(0, 0, "a").unwrap(), 7);
        assert_eq!(t.scalar::<i32>(1, 42, "b").unwrap(), 42);
        assert_eq!(t.string(2, "c").unwrap().as_deref(), Some("hello"));
        assert!(t.scalar::<bool>(3, false, "d").unwrap());
        assert_eq!(t.scalar::<i32>(9, -1, "beyond vtable").unwrap(), -1);
        for cut in 0..needed {
            let r = Table::root(&buf[..cut]).and_then(|t| {
                t.scalar::<u32>(0, 0, "a")?;
                t.string(2, "c")
            });
            assert!(r.is_err(), "cut {cut}");
        }
    }

    #[test]
    fn hostile_offsets() {
        // Root offset past the end; vtable offset pointing before the buffer.
        assert!(Table::root(&[100, 0, 0, 0]).is_err());
        let mut buf = vec![8u8, 0, 0, 0, 0, 0, 0, 0];
        buf.extend_from_slice(&(1000i32).to_le_bytes());
        assert!(Table::root(&buf).is_err());
        // A vector claiming 2^32-1 elements.
        let v = Vector {
            buf: &buf,
            start: 4,
            len: u32::MAX as usize,
        };
        assert!(v.scalars::<i64>("v").is_err());
        assert!(v.check(4, "v").is_err());
    }
}
