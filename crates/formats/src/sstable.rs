//! The LevelDB table format TensorFlow uses for a bundle's `.index` file: reader and writer.
//!
//! Layout (tensorflow/core/lib/io/format.h, table_builder.cc, block.cc; identical to LevelDB):
//! data blocks, a metaindex block, an index block, then a 48-byte footer holding the metaindex and
//! index block handles (offset and size as varints, zero-padded to 40 bytes) and the 8-byte magic
//! `0xdb4775248b80fb57` (little endian). Every block is followed by a 5-byte trailer: a compression
//! byte (0 none, 1 Snappy) and the masked CRC-32C of the block contents plus that byte. A block holds
//! entries `shared_len, unshared_len, value_len (varints), key suffix, value` whose keys share a
//! prefix with the previous key, then the restart offsets (u32 each) and their count (u32). The
//! index block maps a key at or after the last key of each data block to that block's handle.

use std::borrow::Cow;
use std::path::Path;

use crate::checkpoint::CheckpointError;
use crate::crc32c;
use crate::proto::{put_varint, read_varint};

/// Size of the table footer.
pub(crate) const FOOTER_LEN: usize = 48;
/// Magic number at the end of every table.
pub(crate) const TABLE_MAGIC: u64 = 0xdb47_7524_8b80_fb57;
/// Size of the per-block trailer (compression byte + masked CRC).
const TRAILER_LEN: usize = 5;
/// Restart interval of data blocks in the writer (LevelDB's and TensorFlow's default).
const RESTART_INTERVAL: usize = 16;
/// Target uncompressed size of a data block in the writer (TensorFlow's `table::Options`).
const BLOCK_SIZE: usize = 262_144;

/// Key/value pairs in key order.
pub(crate) type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// Position and size of a block (without its trailer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockHandle {
    offset: u64,
    size: u64,
}

impl BlockHandle {
    fn decode(buf: &[u8], pos: &mut usize) -> Result<Self, String> {
        let offset = read_varint(buf, pos)?;
        let size = read_varint(buf, pos)?;
        Ok(BlockHandle { offset, size })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.offset);
        put_varint(out, self.size);
    }
}

fn corrupt(path: &Path, detail: String) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_path_buf(),
        detail,
    }
}

/// Reads every key/value pair of a table held in memory, in key order, verifying block CRCs and
/// that keys strictly increase.
pub(crate) fn read_table(path: &Path, file: &[u8]) -> Result<KeyValues, CheckpointError> {
    if file.len() < FOOTER_LEN {
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "the file is {} bytes, shorter than the {FOOTER_LEN}-byte table footer",
                file.len()
            ),
        });
    }
    let footer = &file[file.len() - FOOTER_LEN..];
    let magic = u64::from_le_bytes(
        footer[40..48]
            .try_into()
            .map_err(|_| corrupt(path, "footer".into()))?,
    );
    if magic != TABLE_MAGIC {
        return Err(CheckpointError::BadMagic {
            path: path.to_path_buf(),
            found: magic,
        });
    }
    let mut p = 0;
    let handles = BlockHandle::decode(&footer[..40], &mut p)
        .and_then(|meta| BlockHandle::decode(&footer[..40], &mut p).map(|idx| (meta, idx)));
    let (_metaindex, index) = handles.map_err(|e| corrupt(path, format!("table footer: {e}")))?;
    let index_block = read_block(path, file, index, "index block")?;
    let index_entries = block_entries(path, &index_block, "index block")?;
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for (i, (_, handle_bytes)) in index_entries.iter().enumerate() {
        let mut p = 0;
        let h = BlockHandle::decode(handle_bytes, &mut p)
            .map_err(|e| corrupt(path, format!("index entry {i}: bad block handle: {e}")))?;
        let what = format!("data block {i} (offset {})", h.offset);
        let block = read_block(path, file, h, &what)?;
        for (k, v) in block_entries(path, &block, &what)? {
            if let Some((prev, _)) = out.last() {
                if k.as_slice() <= prev.as_slice() {
                    return Err(corrupt(
                        path,
                        format!(
                            "{what}: key {:?} does not sort after {:?}",
                            String::from_utf8_lossy(&k),
                            String::from_utf8_lossy(prev)
                        ),
                    ));
                }
            }
            out.push((k, v));
        }
    }
    Ok(out)
}

/// Returns a block's contents (decompressed if needed) after checking its trailer CRC.
fn read_block<'a>(
    path: &Path,
    file: &'a [u8],
    h: BlockHandle,
    what: &str,
) -> Result<Cow<'a, [u8]>, CheckpointError> {
    let body_end = file.len() - FOOTER_LEN;
    let end = h
        .offset
        .checked_add(h.size)
        .and_then(|e| e.checked_add(TRAILER_LEN as u64))
        .filter(|&e| e <= body_end as u64)
        .ok_or_else(|| CheckpointError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "{what}: block at offset {} of {} bytes (+{TRAILER_LEN}-byte trailer) extends past the {body_end} bytes before the footer",
                h.offset, h.size
            ),
        })? as usize;
    let start = h.offset as usize;
    let contents_end = end - TRAILER_LEN;
    let contents = &file[start..contents_end];
    let kind = file[contents_end];
    let stored = u32::from_le_bytes([
        file[contents_end + 1],
        file[contents_end + 2],
        file[contents_end + 3],
        file[contents_end + 4],
    ]);
    let actual = crc32c::extend(crc32c::value(contents), &[kind]);
    if crc32c::unmask(stored) != actual {
        return Err(CheckpointError::BlockCrc {
            path: path.to_path_buf(),
            block: what.to_string(),
            stored: crc32c::unmask(stored),
            actual,
        });
    }
    match kind {
        0 => Ok(Cow::Borrowed(contents)),
        1 => crate::snappy::decompress(contents)
            .map(Cow::Owned)
            .map_err(|detail| CheckpointError::Snappy {
                path: path.to_path_buf(),
                block: what.to_string(),
                detail,
            }),
        k => Err(CheckpointError::Compression {
            path: path.to_path_buf(),
            block: what.to_string(),
            kind: k,
        }),
    }
}

/// Decodes all entries of one block (keys un-prefix-compressed).
fn block_entries(path: &Path, block: &[u8], what: &str) -> Result<KeyValues, CheckpointError> {
    let bad = |detail: String| corrupt(path, format!("{what}: {detail}"));
    if block.len() < 4 {
        return Err(bad(format!(
            "block of {} bytes is too short for its restart count",
            block.len()
        )));
    }
    let n = block.len();
    let num_restarts =
        u32::from_le_bytes([block[n - 4], block[n - 3], block[n - 2], block[n - 1]]) as usize;
    let restarts_start = num_restarts
        .checked_mul(4)
        .and_then(|r| r.checked_add(4))
        .and_then(|r| n.checked_sub(r))
        .ok_or_else(|| {
            bad(format!(
                "{num_restarts} restart points do not fit in a {n}-byte block"
            ))
        })?;
    for r in 0..num_restarts {
        let p = restarts_start + 4 * r;
        let off = u32::from_le_bytes([block[p], block[p + 1], block[p + 2], block[p + 3]]) as usize;
        if off > restarts_start || (restarts_start > 0 && off == restarts_start) {
            return Err(bad(format!(
                "restart point {r} at {off} is outside the {restarts_start} bytes of entries"
            )));
        }
    }
    let data = &block[..restarts_start];
    let mut pos = 0usize;
    let mut key: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    while pos < data.len() {
        let entry_at = pos;
        let var = |name: &str, pos: &mut usize| -> Result<usize, CheckpointError> {
            let v = read_varint(data, pos)
                .map_err(|e| bad(format!("entry at byte {entry_at}: {name}: {e}")))?;
            usize::try_from(v)
                .map_err(|_| bad(format!("entry at byte {entry_at}: {name} {v} too large")))
        };
        let shared = var("shared key length", &mut pos)?;
        let unshared = var("key length", &mut pos)?;
        let value_len = var("value length", &mut pos)?;
        if shared > key.len() {
            return Err(bad(format!(
                "entry at byte {entry_at} shares {shared} key bytes but the previous key has {}",
                key.len()
            )));
        }
        let key_end = pos.checked_add(unshared).filter(|&e| e <= data.len());
        let value_end = key_end
            .and_then(|k| k.checked_add(value_len))
            .filter(|&e| e <= data.len());
        let (Some(key_end), Some(value_end)) = (key_end, value_end) else {
            return Err(bad(format!(
                "entry at byte {entry_at} runs past the end of the block's {} bytes of entries",
                data.len()
            )));
        };
        key.truncate(shared);
        key.extend_from_slice(&data[pos..key_end]);
        out.push((key.clone(), data[key_end..value_end].to_vec()));
        pos = value_end;
    }
    Ok(out)
}

/// Incremental block writer (LevelDB's BlockBuilder).
struct BlockBuilder {
    buf: Vec<u8>,
    restarts: Vec<u32>,
    counter: usize,
    last_key: Vec<u8>,
    interval: usize,
}

impl BlockBuilder {
    fn new(interval: usize) -> Self {
        BlockBuilder {
            buf: Vec::new(),
            restarts: vec![0],
            counter: 0,
            last_key: Vec::new(),
            interval,
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn add(&mut self, key: &[u8], value: &[u8]) {
        let shared = if self.counter < self.interval {
            self.last_key
                .iter()
                .zip(key)
                .take_while(|(a, b)| a == b)
                .count()
        } else {
            self.restarts.push(self.buf.len() as u32);
            self.counter = 0;
            0
        };
        put_varint(&mut self.buf, shared as u64);
        put_varint(&mut self.buf, (key.len() - shared) as u64);
        put_varint(&mut self.buf, value.len() as u64);
        self.buf.extend_from_slice(&key[shared..]);
        self.buf.extend_from_slice(value);
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.counter += 1;
    }

    /// Size of the finished block (entries + restart array + count).
    fn size_estimate(&self) -> usize {
        self.buf.len() + 4 * self.restarts.len() + 4
    }

    /// Returns the block contents and resets the builder.
    fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        for r in &self.restarts {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&(self.restarts.len() as u32).to_le_bytes());
        *self = BlockBuilder::new(self.interval);
        out
    }
}

/// Builds one block from sorted entries with the given restart interval.
#[cfg(test)]
fn build_block(entries: &[(&[u8], &[u8])], restart_interval: usize) -> Vec<u8> {
    let mut b = BlockBuilder::new(restart_interval);
    for (k, v) in entries {
        b.add(k, v);
    }
    b.finish()
}

/// Appends an uncompressed block with its trailer and returns its handle.
fn write_block(out: &mut Vec<u8>, contents: &[u8]) -> BlockHandle {
    let h = BlockHandle {
        offset: out.len() as u64,
        size: contents.len() as u64,
    };
    out.extend_from_slice(contents);
    out.push(0);
    let crc = crc32c::extend(crc32c::value(contents), &[0]);
    out.extend_from_slice(&crc32c::mask(crc).to_le_bytes());
    h
}

/// The bytewise comparator's shortest key `k` with `start <= k < limit` (LevelDB's
/// `FindShortestSeparator`): used as the index key of a block that is followed by another.
fn shortest_separator(start: &[u8], limit: &[u8]) -> Vec<u8> {
    let common = start.iter().zip(limit).take_while(|(a, b)| a == b).count();
    if common < start.len().min(limit.len()) {
        let byte = start[common];
        if byte < 0xff && byte + 1 < limit[common] {
            let mut k = start[..=common].to_vec();
            k[common] += 1;
            return k;
        }
    }
    start.to_vec()
}

/// The shortest key `>= key` (LevelDB's `FindShortSuccessor`): index key of the last block.
fn short_successor(key: &[u8]) -> Vec<u8> {
    match key.iter().position(|&b| b != 0xff) {
        Some(i) => {
            let mut k = key[..=i].to_vec();
            k[i] += 1;
            k
        }
        None => key.to_vec(),
    }
}

/// Builds a complete uncompressed table from entries whose keys strictly increase, exactly as
/// TensorFlow's `table::TableBuilder` does with its defaults (256 KiB blocks, restart interval 16,
/// index keys shortened by the bytewise comparator), so the bytes match a TensorFlow-written
/// bundle index for the same entries.
pub(crate) fn build_table(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    build_table_with_block_size(entries, BLOCK_SIZE)
}

/// [`build_table`] with a chosen data-block size.
pub(crate) fn build_table_with_block_size(
    entries: &[(&[u8], &[u8])],
    block_size: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut data = BlockBuilder::new(RESTART_INTERVAL);
    let mut index = BlockBuilder::new(1);
    let mut pending: Option<BlockHandle> = None;
    let mut last_key: Vec<u8> = Vec::new();
    for (k, v) in entries {
        if let Some(h) = pending.take() {
            let mut hv = Vec::new();
            h.encode(&mut hv);
            index.add(&shortest_separator(&last_key, k), &hv);
        }
        data.add(k, v);
        last_key.clear();
        last_key.extend_from_slice(k);
        if data.size_estimate() >= block_size {
            pending = Some(write_block(&mut out, &data.finish()));
        }
    }
    if !data.is_empty() {
        pending = Some(write_block(&mut out, &data.finish()));
    }
    let metaindex = write_block(&mut out, &BlockBuilder::new(RESTART_INTERVAL).finish());
    if let Some(h) = pending {
        let mut hv = Vec::new();
        h.encode(&mut hv);
        index.add(&short_successor(&last_key), &hv);
    }
    let index_handle = write_block(&mut out, &index.finish());
    let mut footer = Vec::with_capacity(FOOTER_LEN);
    metaindex.encode(&mut footer);
    index_handle.encode(&mut footer);
    footer.resize(40, 0);
    footer.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&footer);
    out
}

/// Builds a table whose data blocks are Snappy-compressed (tests only: the reader must accept them).
#[cfg(test)]
pub(crate) fn build_table_snappy(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let block = build_block(entries, RESTART_INTERVAL);
    let compressed = crate::snappy::compress_for_tests(&block);
    let h = BlockHandle {
        offset: 0,
        size: compressed.len() as u64,
    };
    out.extend_from_slice(&compressed);
    out.push(1);
    out.extend_from_slice(
        &crc32c::mask(crc32c::extend(crc32c::value(&compressed), &[1])).to_le_bytes(),
    );
    let mut hv = Vec::new();
    h.encode(&mut hv);
    let last = entries.last().map(|e| e.0.to_vec()).unwrap_or_default();
    let metaindex = write_block(&mut out, &build_block(&[], RESTART_INTERVAL));
    let index_handle = write_block(&mut out, &build_block(&[(&last, &hv)], 1));
    let mut footer = Vec::new();
    metaindex.encode(&mut footer);
    index_handle.encode(&mut footer);
    footer.resize(40, 0);
    footer.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&footer);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Path used in unit-test error messages.
    fn test_path() -> PathBuf {
        PathBuf::from("test.index")
    }

    fn sample(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|i| {
                (
                    format!("model/layer_{:04}/weights", i).into_bytes(),
                    format!("value-{i}-{}", "x".repeat(i % 50)).into_bytes(),
                )
            })
            .collect()
    }

    fn refs(v: &[(Vec<u8>, Vec<u8>)]) -> Vec<(&[u8], &[u8])> {
        v.iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect()
    }

    #[test]
    fn roundtrip_many_blocks() {
        for n in [0, 1, 15, 16, 17, 300, 2000] {
            let e = sample(n);
            for block_size in [1, 300, 4096, BLOCK_SIZE] {
                let t = build_table_with_block_size(&refs(&e), block_size);
                let back = read_table(&test_path(), &t).unwrap();
                assert_eq!(back, e, "n={n} block_size={block_size}");
            }
        }
    }

    #[test]
    fn snappy_blocks_are_read() {
        let e = sample(200);
        let t = build_table_snappy(&refs(&e));
        assert_eq!(read_table(&test_path(), &t).unwrap(), e);
    }

    #[test]
    fn corruption_is_an_error_never_a_panic() {
        let e = sample(300);
        let t = build_table_with_block_size(&refs(&e), 2048);
        for cut in 0..t.len() {
            assert!(read_table(&test_path(), &t[..cut]).is_err(), "cut at {cut}");
        }
        let mut seed = 12345u64;
        for _ in 0..3000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut c = t.clone();
            let at = (seed >> 33) as usize % c.len();
            c[at] ^= 1 << ((seed >> 20) % 8);
            // A flipped bit is caught by a CRC, the magic or the structure checks, or it lies in
            // the footer's ignored padding and the table still reads back unchanged.
            match read_table(&test_path(), &c) {
                Err(_) => {}
                Ok(back) => assert_eq!(back, e, "flip at {at} accepted with different contents"),
            }
        }
    }

    #[test]
    fn key_shortening_matches_leveldb() {
        assert_eq!(shortest_separator(b"abc1xyz", b"abc5"), b"abc2");
        assert_eq!(shortest_separator(b"abc1xyz", b"abc2"), b"abc1xyz"); // no room
        assert_eq!(shortest_separator(b"abc", b"abcd"), b"abc"); // prefix
        assert_eq!(shortest_separator(b"a\xff", b"b"), b"a\xff");
        assert_eq!(short_successor(b"abc"), b"b");
        assert_eq!(short_successor(b"\xff\xffx"), b"\xff\xffy");
        assert_eq!(short_successor(b"\xff"), b"\xff");
        assert_eq!(short_successor(b""), b"");
    }

    #[test]
    fn block_crc_error_names_block() {
        let e = sample(10);
        let mut t = build_table(&refs(&e));
        t[3] ^= 0xff;
        let err = read_table(&test_path(), &t).unwrap_err().to_string();
        assert!(err.contains("data block 0"), "{err}");
        assert!(err.contains("test.index"), "{err}");
    }
}
