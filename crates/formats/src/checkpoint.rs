//! TensorFlow checkpoints in the tensor-bundle V2 format: reader (with model-zoo `.tar.gz` support)
//! and a single-shard writer.
//!
//! A bundle with prefix `P` is `P.index`, a LevelDB-format table (the `sstable` module), plus data
//! shards `P.data-00000-of-0000N` holding raw tensor bytes. The table's empty key holds a
//! `BundleHeaderProto` {num_shards = 1, endianness = 2, version = 3 {producer = 1, min_consumer = 2}};
//! every other key is a tensor name whose value is a `BundleEntryProto` {dtype = 1, shape = 2
//! (TensorShapeProto: dim = 2 {size = 1}, unknown_rank = 3), shard_id = 3, offset = 4, size = 5,
//! crc32c = 6 (masked CRC-32C of the tensor bytes), slices = 7}. Field numbers from
//! tensorflow/core/protobuf/tensor_bundle.proto; layout and checks follow
//! tensorflow/core/util/tensor_bundle/tensor_bundle.cc.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::crc32c;
use crate::proto::{self, Fields, Value};
use crate::sstable;

/// Everything that can go wrong reading or writing a checkpoint. Every message names the file,
/// and the variable where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// No checkpoint could be found at the given location.
    #[error("{path}: no TensorFlow checkpoint found: {detail}")]
    NotFound {
        /// Where we looked.
        path: PathBuf,
        /// What was missing.
        detail: String,
    },
    /// The index file is shorter than its own structure says.
    #[error("{path}: truncated checkpoint index: {detail}")]
    Truncated {
        /// The index file.
        path: PathBuf,
        /// What ran past the end.
        detail: String,
    },
    /// The table footer does not end with the LevelDB/TensorFlow table magic.
    #[error("{path}: bad table magic {found:#018x} (expected 0xdb4775248b80fb57): not a TensorFlow checkpoint index, or the file is truncated")]
    BadMagic {
        /// The index file.
        path: PathBuf,
        /// The 8 bytes found where the magic belongs.
        found: u64,
    },
    /// A table block's CRC does not match its contents.
    #[error("{path}: {block}: block checksum mismatch (stored crc32c {stored:#010x}, computed {actual:#010x}); the index file is corrupt")]
    BlockCrc {
        /// The index file.
        path: PathBuf,
        /// Which block.
        block: String,
        /// Unmasked CRC stored in the trailer.
        stored: u32,
        /// CRC of the bytes read.
        actual: u32,
    },
    /// A block uses a compression we do not know.
    #[error("{path}: {block}: unknown block compression type {kind} (only 0 = none and 1 = Snappy exist)")]
    Compression {
        /// The index file.
        path: PathBuf,
        /// Which block.
        block: String,
        /// The compression byte.
        kind: u8,
    },
    /// A Snappy-compressed block failed to decompress.
    #[error("{path}: {block}: invalid Snappy-compressed block: {detail}")]
    Snappy {
        /// The index file.
        path: PathBuf,
        /// Which block.
        block: String,
        /// What is wrong.
        detail: String,
    },
    /// The index is structurally invalid (bad varints, keys out of order, undecodable protos...).
    #[error("{path}: corrupt checkpoint index: {detail}")]
    Corrupt {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The index has no header entry (the empty key), so it is not a V2 tensor bundle.
    #[error("{path}: no bundle header (empty key) in the index: not a TensorFlow V2 checkpoint (V1 checkpoints are not supported)")]
    MissingHeader {
        /// The index file.
        path: PathBuf,
    },
    /// The bundle needs something this reader does not implement.
    #[error("{path}: unsupported checkpoint: {detail}")]
    Unsupported {
        /// The index file.
        path: PathBuf,
        /// What is unsupported.
        detail: String,
    },
    /// A variable's bytes lie past the end of its data shard.
    #[error("{path}: truncated data shard: variable '{name}' needs bytes up to {needed}, the file has {len}")]
    DataTruncated {
        /// The data shard.
        path: PathBuf,
        /// The variable.
        name: String,
        /// End offset the variable needs.
        needed: u64,
        /// Actual file length.
        len: u64,
    },
    /// A variable's bytes do not match the CRC recorded in the index.
    #[error("{path}: variable '{name}': data checksum mismatch (index says crc32c {stored:#010x}, data has {actual:#010x}); the data shard is corrupt")]
    TensorCrc {
        /// The data shard.
        path: PathBuf,
        /// The variable.
        name: String,
        /// Unmasked CRC from the index.
        stored: u32,
        /// CRC of the bytes read.
        actual: u32,
    },
    /// A variable's byte size disagrees with its dtype and shape.
    #[error("{path}: variable '{name}': {dtype} {shape:?} needs {expected} bytes but the index records {size}")]
    SizeMismatch {
        /// The index file.
        path: PathBuf,
        /// The variable.
        name: String,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes implied by dtype and shape.
        expected: u64,
        /// Bytes recorded in the entry.
        size: u64,
    },
    /// A variable has a dtype code outside TensorFlow's `DataType` enum.
    #[error("{path}: variable '{name}': unknown dtype code {code}")]
    UnknownDtype {
        /// The index file.
        path: PathBuf,
        /// The variable.
        name: String,
        /// The raw `DataType` number.
        code: i64,
    },
    /// A variable's dtype cannot be returned in the requested form.
    #[error("{path}: variable '{name}': cannot read a {dtype} tensor as {wanted}")]
    UnsupportedDtype {
        /// The index file.
        path: PathBuf,
        /// The variable.
        name: String,
        /// Its dtype.
        dtype: DType,
        /// What the caller asked for.
        wanted: &'static str,
    },
    /// A partitioned variable (stored as slices) was requested.
    #[error("{path}: variable '{name}' is partitioned into {slices} slices; partitioned variables are not supported")]
    Partitioned {
        /// The index file.
        path: PathBuf,
        /// The variable.
        name: String,
        /// Number of slices.
        slices: usize,
    },
    /// The requested variable is not in the checkpoint.
    #[error("{path}: no variable named '{name}' in the checkpoint")]
    NoSuchVariable {
        /// The index file.
        path: PathBuf,
        /// The name asked for.
        name: String,
    },
    /// A `.tar.gz` archive could not be read or holds no single checkpoint.
    #[error("{path}: {detail}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The writer was given invalid input.
    #[error("{path}: cannot write variable '{name}': {detail}")]
    Write {
        /// The checkpoint prefix being written.
        path: PathBuf,
        /// The variable.
        name: String,
        /// What is wrong.
        detail: String,
    },
}

/// Result alias for checkpoint operations.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// TensorFlow's `DataType` (tensorflow/core/framework/types.proto), as stored in a bundle entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum DType {
    F32,
    F64,
    I32,
    U8,
    I16,
    I8,
    String,
    Complex64,
    I64,
    Bool,
    QInt8,
    QUInt8,
    QInt32,
    BF16,
    QInt16,
    QUInt16,
    U16,
    Complex128,
    F16,
    Resource,
    Variant,
    U32,
    U64,
}

impl DType {
    const TABLE: [(DType, i32, &'static str, usize); 23] = [
        (DType::F32, 1, "float32", 4),
        (DType::F64, 2, "float64", 8),
        (DType::I32, 3, "int32", 4),
        (DType::U8, 4, "uint8", 1),
        (DType::I16, 5, "int16", 2),
        (DType::I8, 6, "int8", 1),
        (DType::String, 7, "string", 0),
        (DType::Complex64, 8, "complex64", 8),
        (DType::I64, 9, "int64", 8),
        (DType::Bool, 10, "bool", 1),
        (DType::QInt8, 11, "qint8", 1),
        (DType::QUInt8, 12, "quint8", 1),
        (DType::QInt32, 13, "qint32", 4),
        (DType::BF16, 14, "bfloat16", 2),
        (DType::QInt16, 15, "qint16", 2),
        (DType::QUInt16, 16, "quint16", 2),
        (DType::U16, 17, "uint16", 2),
        (DType::Complex128, 18, "complex128", 16),
        (DType::F16, 19, "float16", 2),
        (DType::Resource, 20, "resource", 0),
        (DType::Variant, 21, "variant", 0),
        (DType::U32, 22, "uint32", 4),
        (DType::U64, 23, "uint64", 8),
    ];

    /// The dtype with TensorFlow `DataType` number `code`, if it is one.
    pub fn from_code(code: i64) -> Option<DType> {
        Self::TABLE
            .iter()
            .find(|e| i64::from(e.1) == code)
            .map(|e| e.0)
    }

    fn entry(self) -> &'static (DType, i32, &'static str, usize) {
        // Every variant is in the table (checked by a unit test).
        Self::TABLE
            .iter()
            .find(|e| e.0 == self)
            .unwrap_or(&Self::TABLE[0])
    }

    /// The TensorFlow `DataType` number.
    pub fn code(self) -> i32 {
        self.entry().1
    }

    /// The Python-side name (`float32`, `int64`, ...), as printed by `tf.train.list_variables`.
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Bytes per element, `None` for variable-size types (string, resource, variant).
    pub fn size_in_bytes(self) -> Option<usize> {
        Some(self.entry().3).filter(|&s| s > 0)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Dtype and shape of one checkpoint variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first (TensorFlow layout, e.g. conv `[kh, kw, cin, cout]`).
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar; saturates at `usize::MAX` for absurd shapes).
    pub fn num_elements(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }
}

/// Where a variable's bytes live.
#[derive(Debug, Clone)]
struct Entry {
    info: TensorInfo,
    shard: usize,
    offset: u64,
    size: u64,
    /// Unmasked CRC-32C of the bytes.
    crc: u32,
    slices: usize,
}

/// An open TensorFlow V2 checkpoint: the parsed index plus the paths of its data shards.
///
/// Tensor bytes are read on demand and verified against the index's CRC on every read.
pub struct Checkpoint {
    prefix: PathBuf,
    index_path: PathBuf,
    shards: Vec<PathBuf>,
    big_endian: bool,
    names: Vec<String>,
    entries: Vec<Entry>,
    lookup: HashMap<String, usize>,
    /// Keeps an extracted archive alive as long as the checkpoint.
    _extracted: Option<tempfile::TempDir>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("prefix", &self.prefix)
            .field("shards", &self.shards.len())
            .field("variables", &self.names.len())
            .finish()
    }
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The data shard file name TensorFlow uses: `PREFIX.data-00003-of-00008`.
pub fn data_shard_path(prefix: &Path, shard: usize, num_shards: usize) -> PathBuf {
    with_suffix(prefix, &format!(".data-{shard:05}-of-{num_shards:05}"))
}

fn is_archive(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    path.is_file() && (name.ends_with(".tar.gz") || name.ends_with(".tgz"))
}

/// Turns a prefix, an `.index` path, a `.data-*` path or a directory into a bundle prefix.
fn resolve_prefix(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let mut found = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err(path))? {
            let e = e.map_err(io_err(path))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".index") {
                if e.path().is_file() {
                    found.push(stem.to_string());
                }
            }
        }
        found.sort();
        return match found.len() {
            1 => Ok(path.join(&found[0])),
            0 => Err(CheckpointError::NotFound {
                path: path.to_path_buf(),
                detail: "the directory holds no *.index file".into(),
            }),
            _ => Err(CheckpointError::NotFound {
                path: path.to_path_buf(),
                detail: format!(
                    "the directory holds {} checkpoints ({}); name one prefix",
                    found.len(),
                    found.join(", ")
                ),
            }),
        };
    }
    if let Some(s) = path.to_str() {
        if let Some(prefix) = s.strip_suffix(".index") {
            return Ok(PathBuf::from(prefix));
        }
        if let Some(pos) = s.rfind(".data-") {
            let tail = &s[pos + 6..];
            let shard_like = tail.len() == 14
                && tail.as_bytes()[5..9] == *b"-of-"
                && tail.bytes().filter(u8::is_ascii_digit).count() == 10;
            if shard_like {
                return Ok(PathBuf::from(&s[..pos]));
            }
        }
    }
    Ok(path.to_path_buf())
}

/// Decodes a `BundleHeaderProto`: (num_shards, endianness, min_consumer).
fn parse_header(path: &Path, bytes: &[u8]) -> Result<(i64, i64, i64)> {
    let bad = |d: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("bundle header: {d}"),
    };
    let (mut num_shards, mut endianness, mut min_consumer) = (0i64, 0i64, 0i64);
    let mut f = Fields::new(bytes);
    while let Some((field, v)) = f.next_field().map_err(bad)? {
        match (field, v) {
            (1, Value::Varint(n)) => num_shards = n as i64,
            (2, Value::Varint(n)) => endianness = n as i64,
            (3, Value::Bytes(b)) => {
                let mut vf = Fields::new(b);
                while let Some((vfield, vv)) =
                    vf.next_field().map_err(|e| bad(format!("version: {e}")))?
                {
                    if let (2, Value::Varint(n)) = (vfield, vv) {
                        min_consumer = n as i64;
                    }
                }
            }
            (1..=3, v) => {
                return Err(bad(format!(
                    "field {field} has unexpected wire type {}",
                    v.kind()
                )))
            }
            _ => {}
        }
    }
    Ok((num_shards, endianness, min_consumer))
}

/// The fields of a `BundleEntryProto`, as decoded (not yet validated).
#[derive(Debug, Default)]
struct RawEntry {
    dtype: i64,
    dims: Vec<i64>,
    unknown_rank: bool,
    shard: i64,
    offset: i64,
    size: i64,
    /// Masked, as stored.
    crc: u32,
    slices: usize,
}

/// Decodes a `BundleEntryProto` for variable `name`.
fn parse_entry(path: &Path, name: &str, bytes: &[u8]) -> Result<RawEntry> {
    let bad = |d: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("entry of variable '{name}': {d}"),
    };
    let mut r = RawEntry::default();
    let mut f = Fields::new(bytes);
    while let Some((field, v)) = f.next_field().map_err(bad)? {
        match (field, v) {
            (1, Value::Varint(n)) => r.dtype = n as i64,
            (2, Value::Bytes(shape)) => {
                let mut sf = Fields::new(shape);
                while let Some((sfield, sv)) =
                    sf.next_field().map_err(|e| bad(format!("shape: {e}")))?
                {
                    match (sfield, sv) {
                        (2, Value::Bytes(dim)) => {
                            let mut size = 0i64;
                            let mut df = Fields::new(dim);
                            while let Some((dfield, dv)) = df
                                .next_field()
                                .map_err(|e| bad(format!("shape dim: {e}")))?
                            {
                                if let (1, Value::Varint(n)) = (dfield, dv) {
                                    size = n as i64;
                                }
                            }
                            r.dims.push(size);
                        }
                        (3, Value::Varint(n)) => r.unknown_rank = n != 0,
                        _ => {}
                    }
                }
            }
            (3, Value::Varint(n)) => r.shard = n as i64,
            (4, Value::Varint(n)) => r.offset = n as i64,
            (5, Value::Varint(n)) => r.size = n as i64,
            (6, Value::Fixed32(c)) => r.crc = c,
            (7, Value::Bytes(_)) => r.slices += 1,
            (1..=7, v) => {
                return Err(bad(format!(
                    "field {field} has unexpected wire type {}",
                    v.kind()
                )))
            }
            _ => {}
        }
    }
    Ok(r)
}

impl Checkpoint {
    /// Opens a checkpoint from its prefix (`.../model.ckpt`), its `.index` file, one of its
    /// `.data-*` shards, a directory holding exactly one checkpoint, or a model-zoo `.tar.gz`/`.tgz`
    /// (see [`Checkpoint::open_tar_gz`]).
    ///
    /// The whole index is parsed and checked (block CRCs, header, every entry's dtype, shape and
    /// size, and that every variable lies inside its data shard); tensor bytes are read later.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if is_archive(path) {
            return Self::open_tar_gz(path);
        }
        let prefix = resolve_prefix(path)?;
        Self::open_prefix(&prefix, None)
    }

    /// Extracts the checkpoint files (`*.index` and `*.data-*`, wherever they sit in the archive)
    /// of a `.tar.gz` such as the DeepLab model-zoo tarballs into a private temporary directory,
    /// which lives as long as the returned `Checkpoint`, and opens the one checkpoint found there.
    /// Other members (e.g. `frozen_inference_graph.pb`) are skipped without being written.
    pub fn open_tar_gz(archive: impl AsRef<Path>) -> Result<Self> {
        let archive = archive.as_ref();
        let arch_err = |detail: String| CheckpointError::Archive {
            path: archive.to_path_buf(),
            detail,
        };
        let file = File::open(archive).map_err(io_err(archive))?;
        let dir = tempfile::Builder::new()
            .prefix("deeplab-ckpt-")
            .tempdir()
            .map_err(|e| arch_err(format!("cannot create a temporary directory: {e}")))?;
        let mut tar =
            tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
        let entries = tar
            .entries()
            .map_err(|e| arch_err(format!("not a readable .tar.gz: {e}")))?;
        let mut seen: HashMap<OsString, PathBuf> = HashMap::new();
        for entry in entries {
            let mut entry =
                entry.map_err(|e| arch_err(format!("corrupt or truncated archive: {e}")))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let member = entry
                .path()
                .map_err(|e| arch_err(format!("bad member name: {e}")))?
                .into_owned();
            let Some(file_name) = member.file_name().map(|n| n.to_os_string()) else {
                continue;
            };
            let name = file_name.to_string_lossy();
            if !(name.ends_with(".index") || name.contains(".data-")) {
                continue;
            }
            if let Some(prev) = seen.get(&file_name) {
                return Err(arch_err(format!(
                    "two members named {name}: {} and {}; extract the archive and open one of them",
                    prev.display(),
                    member.display()
                )));
            }
            // Only the bare file name is used, so no member can write outside the temp dir.
            let target = dir.path().join(&file_name);
            let mut out = File::create(&target).map_err(io_err(&target))?;
            std::io::copy(&mut entry, &mut out).map_err(|e| {
                arch_err(format!(
                    "corrupt or truncated archive while extracting {}: {e}",
                    member.display()
                ))
            })?;
            seen.insert(file_name, member);
        }
        // Read to the end so the gzip trailer (CRC and length) is checked too.
        std::io::copy(&mut tar.into_inner(), &mut std::io::sink())
            .map_err(|e| arch_err(format!("corrupt or truncated archive: {e}")))?;
        let index_count = seen
            .keys()
            .filter(|n| n.to_string_lossy().ends_with(".index"))
            .count();
        if index_count != 1 {
            let mut names: Vec<String> = seen.values().map(|p| p.display().to_string()).collect();
            names.sort();
            return Err(arch_err(format!(
                "expected exactly one checkpoint (*.index) in the archive, found {index_count} (checkpoint files: [{}])",
                names.join(", ")
            )));
        }
        let prefix = resolve_prefix(dir.path())?;
        Self::open_prefix(&prefix, Some(dir))
    }

    fn open_prefix(prefix: &Path, extracted: Option<tempfile::TempDir>) -> Result<Self> {
        let index_path = with_suffix(prefix, ".index");
        if !index_path.is_file() {
            return Err(CheckpointError::NotFound {
                path: prefix.to_path_buf(),
                detail: format!("index file {} does not exist", index_path.display()),
            });
        }
        let bytes = std::fs::read(&index_path).map_err(io_err(&index_path))?;
        let table = sstable::read_table(&index_path, &bytes)?;
        let ip = index_path.as_path();
        let corrupt = |detail: String| CheckpointError::Corrupt {
            path: ip.to_path_buf(),
            detail,
        };
        let mut rows = table.into_iter();
        let header = match rows.next() {
            Some((k, v)) if k.is_empty() => v,
            _ => {
                return Err(CheckpointError::MissingHeader {
                    path: index_path.clone(),
                })
            }
        };
        let (num_shards, endianness, min_consumer) = parse_header(ip, &header)?;
        if !(1..=99_999).contains(&num_shards) {
            return Err(corrupt(format!(
                "bundle header declares {num_shards} data shards"
            )));
        }
        let big_endian = match endianness {
            0 => false,
            1 => true,
            e => return Err(corrupt(format!("bundle header has unknown endianness {e}"))),
        };
        if min_consumer > 1 {
            return Err(CheckpointError::Unsupported {
                path: index_path.clone(),
                detail: format!("the bundle requires a format-version {min_consumer} reader; this one reads version 1"),
            });
        }
        let num_shards = num_shards as usize;
        let shards: Vec<PathBuf> = (0..num_shards)
            .map(|i| data_shard_path(prefix, i, num_shards))
            .collect();
        let mut names = Vec::new();
        let mut entries = Vec::new();
        for (key, value) in rows {
            // Keys of partition slices start with a 0 byte (checkpoint::EncodeTensorNameSlice);
            // they belong to a partitioned variable, which is reported when it is read.
            if key.first() == Some(&0) {
                continue;
            }
            let name = String::from_utf8(key).map_err(|e| {
                corrupt(format!(
                    "variable name is not UTF-8: {:?}",
                    String::from_utf8_lossy(e.as_bytes())
                ))
            })?;
            let RawEntry {
                dtype: code,
                dims,
                unknown_rank,
                shard,
                offset,
                size,
                crc,
                slices,
            } = parse_entry(ip, &name, &value)?;
            let dtype = DType::from_code(code).ok_or_else(|| CheckpointError::UnknownDtype {
                path: index_path.clone(),
                name: name.clone(),
                code,
            })?;
            if unknown_rank || dims.iter().any(|&d| d < 0) {
                return Err(corrupt(format!(
                    "variable '{name}' has an unknown or negative shape {dims:?}"
                )));
            }
            let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
            if shard < 0 || shard as usize >= num_shards {
                return Err(corrupt(format!(
                    "variable '{name}' is in shard {shard}, but the bundle has {num_shards}"
                )));
            }
            if offset < 0 || size < 0 || offset.checked_add(size).is_none() {
                return Err(corrupt(format!(
                    "variable '{name}' has invalid offset {offset} / size {size}"
                )));
            }
            let info = TensorInfo { dtype, shape };
            if slices == 0 {
                if let Some(elem) = dtype.size_in_bytes() {
                    let expected = info
                        .shape
                        .iter()
                        .try_fold(elem as u64, |acc, &d| acc.checked_mul(d as u64));
                    if expected != Some(size as u64) {
                        return Err(CheckpointError::SizeMismatch {
                            path: index_path.clone(),
                            name,
                            dtype,
                            shape: info.shape,
                            expected: expected.unwrap_or(u64::MAX),
                            size: size as u64,
                        });
                    }
                }
            }
            names.push(name);
            entries.push(Entry {
                info,
                shard: shard as usize,
                offset: offset as u64,
                size: size as u64,
                crc: crc32c::unmask(crc),
                slices,
            });
        }
        // Every data shard that holds a variable must exist and be long enough for all of them.
        for (s, shard_path) in shards.iter().enumerate() {
            let mut last: Option<(usize, u64)> = None;
            for (i, e) in entries.iter().enumerate() {
                if e.shard == s
                    && e.slices == 0
                    && last.is_none_or(|(_, end)| e.offset + e.size > end)
                {
                    last = Some((i, e.offset + e.size));
                }
            }
            let Some((i, needed)) = last else { continue };
            let len = std::fs::metadata(shard_path)
                .map_err(|source| CheckpointError::Io {
                    path: shard_path.clone(),
                    source,
                })?
                .len();
            if len < needed {
                // Name the first variable (in key order) that does not fit.
                let first = entries
                    .iter()
                    .position(|e| e.shard == s && e.slices == 0 && e.offset + e.size > len)
                    .unwrap_or(i);
                return Err(CheckpointError::DataTruncated {
                    path: shard_path.clone(),
                    name: names[first].clone(),
                    needed: entries[first].offset + entries[first].size,
                    len,
                });
            }
        }
        let lookup = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Ok(Checkpoint {
            prefix: prefix.to_path_buf(),
            index_path,
            shards,
            big_endian,
            names,
            entries,
            lookup,
            _extracted: extracted,
        })
    }

    /// The bundle prefix (inside a temporary directory for an archive).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The `.index` file.
    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// The data shard files, in shard order.
    pub fn shard_paths(&self) -> &[PathBuf] {
        &self.shards
    }

    /// Variable names in key (byte-wise sorted) order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the checkpoint holds no variables.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether a variable exists.
    pub fn contains(&self, name: &str) -> bool {
        self.lookup.contains_key(name)
    }

    /// `(name, info)` for every variable, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TensorInfo)> + '_ {
        self.names
            .iter()
            .zip(&self.entries)
            .map(|(n, e)| (n.as_str(), &e.info))
    }

    fn get(&self, name: &str) -> Result<&Entry> {
        self.lookup
            .get(name)
            .map(|&i| &self.entries[i])
            .ok_or_else(|| CheckpointError::NoSuchVariable {
                path: self.index_path.clone(),
                name: name.to_string(),
            })
    }

    /// Dtype and shape of a variable.
    pub fn entry(&self, name: &str) -> Result<&TensorInfo> {
        self.get(name).map(|e| &e.info)
    }

    /// Where a variable's bytes are stored: `(data shard index, byte offset, byte size)`.
    pub fn location(&self, name: &str) -> Result<(usize, u64, u64)> {
        self.get(name).map(|e| (e.shard, e.offset, e.size))
    }

    /// The variable's raw bytes exactly as stored (file byte order), after checking their CRC.
    pub fn read_raw(&self, name: &str) -> Result<Vec<u8>> {
        let e = self.get(name)?;
        self.read_entry(name, e)
    }

    fn read_entry(&self, name: &str, e: &Entry) -> Result<Vec<u8>> {
        if e.slices > 0 {
            return Err(CheckpointError::Partitioned {
                path: self.index_path.clone(),
                name: name.to_string(),
                slices: e.slices,
            });
        }
        if e.info.dtype.size_in_bytes().is_none() {
            return Err(CheckpointError::UnsupportedDtype {
                path: self.index_path.clone(),
                name: name.to_string(),
                dtype: e.info.dtype,
                wanted: "raw fixed-size bytes",
            });
        }
        let shard_path = &self.shards[e.shard];
        let mut f = File::open(shard_path).map_err(io_err(shard_path))?;
        let len = f.metadata().map_err(io_err(shard_path))?.len();
        if len < e.offset + e.size {
            return Err(CheckpointError::DataTruncated {
                path: shard_path.clone(),
                name: name.to_string(),
                needed: e.offset + e.size,
                len,
            });
        }
        f.seek(SeekFrom::Start(e.offset))
            .map_err(io_err(shard_path))?;
        let size = usize::try_from(e.size).map_err(|_| CheckpointError::Unsupported {
            path: shard_path.clone(),
            detail: format!(
                "variable '{name}' of {} bytes does not fit in memory",
                e.size
            ),
        })?;
        let mut buf = vec![0u8; size];
        f.read_exact(&mut buf).map_err(io_err(shard_path))?;
        let actual = crc32c::value(&buf);
        if actual != e.crc {
            return Err(CheckpointError::TensorCrc {
                path: shard_path.clone(),
                name: name.to_string(),
                stored: e.crc,
                actual,
            });
        }
        Ok(buf)
    }

    /// The variable's values as `f32`, converted from any real numeric dtype (float16, bfloat16,
    /// float64, signed/unsigned integers, bool). Strings, complex, quantized, resource and variant
    /// tensors are an error.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.get(name)?;
        let raw = self.read_entry(name, e)?;
        let unsupported = || CheckpointError::UnsupportedDtype {
            path: self.index_path.clone(),
            name: name.to_string(),
            dtype: e.info.dtype,
            wanted: "f32",
        };
        decode_numeric(&raw, e.info.dtype, self.big_endian, |v| v as f32).ok_or_else(unsupported)
    }

    /// The variable's values as `i64`, for integer and bool dtypes (e.g. `global_step`).
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>> {
        let e = self.get(name)?;
        let unsupported = || CheckpointError::UnsupportedDtype {
            path: self.index_path.clone(),
            name: name.to_string(),
            dtype: e.info.dtype,
            wanted: "i64",
        };
        if matches!(
            e.info.dtype,
            DType::F32 | DType::F64 | DType::F16 | DType::BF16 | DType::U64
        ) {
            return Err(unsupported());
        }
        let raw = self.read_entry(name, e)?;
        decode_integer(&raw, e.info.dtype, self.big_endian).ok_or_else(unsupported)
    }

    /// Reads every variable once, checking sizes and CRCs; returns the number of bytes verified.
    /// Partitioned and variable-size (string) entries are skipped.
    pub fn verify_all(&self) -> Result<u64> {
        let mut total = 0;
        for (name, e) in self.names.iter().zip(&self.entries) {
            if e.slices > 0 || e.info.dtype.size_in_bytes().is_none() {
                continue;
            }
            total += self.read_entry(name, e)?.len() as u64;
        }
        Ok(total)
    }
}

/// Reads one element of `size` bytes in the file's byte order into native-endian bytes.
fn elem<const N: usize>(c: &[u8], big_endian: bool) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&c[..N]);
    if big_endian {
        a.reverse();
    }
    a
}

fn decode_numeric(
    raw: &[u8],
    dtype: DType,
    be: bool,
    cast: impl Fn(f64) -> f32,
) -> Option<Vec<f32>> {
    let out: Vec<f32> = match dtype {
        DType::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(elem::<4>(c, be)))
            .collect(),
        DType::F64 => raw
            .chunks_exact(8)
            .map(|c| cast(f64::from_le_bytes(elem::<8>(c, be))))
            .collect(),
        DType::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes(elem::<2>(c, be)).to_f32())
            .collect(),
        DType::BF16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes(elem::<2>(c, be)).to_f32())
            .collect(),
        DType::U64 => raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(elem::<8>(c, be)) as f32)
            .collect(),
        _ => decode_integer(raw, dtype, be)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
    };
    Some(out)
}

fn decode_integer(raw: &[u8], dtype: DType, be: bool) -> Option<Vec<i64>> {
    let out: Vec<i64> = match dtype {
        DType::I8 => raw.iter().map(|&b| i64::from(b as i8)).collect(),
        DType::U8 => raw.iter().map(|&b| i64::from(b)).collect(),
        DType::Bool => raw.iter().map(|&b| i64::from(b != 0)).collect(),
        DType::I16 => raw
            .chunks_exact(2)
            .map(|c| i64::from(i16::from_le_bytes(elem::<2>(c, be))))
            .collect(),
        DType::U16 => raw
            .chunks_exact(2)
            .map(|c| i64::from(u16::from_le_bytes(elem::<2>(c, be))))
            .collect(),
        DType::I32 => raw
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes(elem::<4>(c, be))))
            .collect(),
        DType::U32 => raw
            .chunks_exact(4)
            .map(|c| i64::from(u32::from_le_bytes(elem::<4>(c, be))))
            .collect(),
        DType::I64 => raw
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(elem::<8>(c, be)))
            .collect(),
        DType::U64 => raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(elem::<8>(c, be)) as i64)
            .collect(),
        _ => return None,
    };
    Some(out)
}

/// Writes a single-shard, uncompressed V2 checkpoint that TensorFlow's `tf.train.load_checkpoint`
/// can read: tensors stream into `PREFIX.data-00000-of-00001` as they are added; [`finish`]
/// writes `PREFIX.index`. Both files are written to temporary files in the target directory and
/// renamed into place, so an interrupted write never leaves a half-written checkpoint.
///
/// [`finish`]: CheckpointWriter::finish
pub struct CheckpointWriter {
    prefix: PathBuf,
    data: BufWriter<tempfile::NamedTempFile>,
    offset: u64,
    entries: BTreeMap<String, Entry>,
}

impl fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("prefix", &self.prefix)
            .field("variables", &self.entries.len())
            .finish()
    }
}

impl CheckpointWriter {
    /// Starts a checkpoint at `prefix` (e.g. `out/model.ckpt`); the directory must exist.
    pub fn create(prefix: impl AsRef<Path>) -> Result<Self> {
        let prefix = prefix.as_ref().to_path_buf();
        let dir = match prefix.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if prefix.file_name().is_none() {
            return Err(CheckpointError::NotFound {
                path: prefix,
                detail: "the prefix needs a file-name part, e.g. dir/model.ckpt".into(),
            });
        }
        let tmp = tempfile::Builder::new()
            .prefix(".ckpt-data-")
            .tempfile_in(&dir)
            .map_err(io_err(&dir))?;
        Ok(CheckpointWriter {
            prefix,
            data: BufWriter::new(tmp),
            offset: 0,
            entries: BTreeMap::new(),
        })
    }

    /// Adds an `f32` variable with the given shape (row-major values).
    pub fn add_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_raw(name, DType::F32, shape, &bytes)
    }

    /// Adds a variable of any fixed-size dtype from its little-endian bytes.
    pub fn add_raw(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<()> {
        let fail = |detail: String| CheckpointError::Write {
            path: self.prefix.clone(),
            name: name.to_string(),
            detail,
        };
        if name.is_empty() || name.as_bytes()[0] == 0 {
            return Err(fail("variable names must be non-empty and must not start with a NUL byte (reserved keys)".into()));
        }
        if self.entries.contains_key(name) {
            return Err(fail("a variable of this name was already added".into()));
        }
        let Some(elem) = dtype.size_in_bytes() else {
            return Err(fail(format!("dtype {dtype} has no fixed element size; the writer stores fixed-size tensors only")));
        };
        let expected = shape.iter().try_fold(elem, |acc, &d| acc.checked_mul(d));
        if expected != Some(bytes.len()) {
            return Err(fail(format!(
                "shape {shape:?} of {dtype} needs {expected:?} bytes, got {}",
                bytes.len()
            )));
        }
        let data_path = data_shard_path(&self.prefix, 0, 1);
        self.data.write_all(bytes).map_err(io_err(&data_path))?;
        let entry = Entry {
            info: TensorInfo {
                dtype,
                shape: shape.to_vec(),
            },
            shard: 0,
            offset: self.offset,
            size: bytes.len() as u64,
            crc: crc32c::value(bytes),
            slices: 0,
        };
        self.offset += bytes.len() as u64;
        self.entries.insert(name.to_string(), entry);
        Ok(())
    }

    /// Writes the index and moves both files into place; returns the `.index` path.
    pub fn finish(self) -> Result<PathBuf> {
        let data_path = data_shard_path(&self.prefix, 0, 1);
        let index_path = with_suffix(&self.prefix, ".index");
        let data_tmp = self.data.into_inner().map_err(|e| CheckpointError::Io {
            path: data_path.clone(),
            source: e.into_error(),
        })?;
        data_tmp.as_file().sync_all().map_err(io_err(&data_path))?;

        let mut header = Vec::new();
        proto::put_varint_field(&mut header, 1, 1); // num_shards
        let mut version = Vec::new();
        proto::put_varint_field(&mut version, 1, 1); // producer = kTensorBundleVersion
        proto::put_bytes_field(&mut header, 3, &version);
        let mut rows: Vec<(Vec<u8>, Vec<u8>)> = vec![(Vec::new(), header)];
        for (name, e) in &self.entries {
            let mut m = Vec::new();
            proto::put_varint_field(&mut m, 1, e.info.dtype.code() as u64);
            let mut shape = Vec::new();
            for &d in &e.info.shape {
                let mut dim = Vec::new();
                if d != 0 {
                    proto::put_varint_field(&mut dim, 1, d as u64);
                }
                proto::put_bytes_field(&mut shape, 2, &dim);
            }
            proto::put_bytes_field(&mut m, 2, &shape);
            if e.offset != 0 {
                proto::put_varint_field(&mut m, 4, e.offset);
            }
            if e.size != 0 {
                proto::put_varint_field(&mut m, 5, e.size);
            }
            proto::put_fixed32_field(&mut m, 6, crc32c::mask(e.crc));
            rows.push((name.as_bytes().to_vec(), m));
        }
        let refs: Vec<(&[u8], &[u8])> = rows
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        let table = sstable::build_table(&refs);
        let dir = index_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".ckpt-index-")
            .tempfile_in(dir)
            .map_err(io_err(dir))?;
        tmp.write_all(&table).map_err(io_err(&index_path))?;
        tmp.as_file().sync_all().map_err(io_err(&index_path))?;
        // Both files are complete on disk before either replaces anything at the prefix.
        data_tmp
            .persist(&data_path)
            .map_err(|e| CheckpointError::Io {
                path: data_path.clone(),
                source: e.error,
            })?;
        tmp.persist(&index_path).map_err(|e| CheckpointError::Io {
            path: index_path.clone(),
            source: e.error,
        })?;
        Ok(index_path)
    }
}

/// Names of files a checkpoint consists of, for callers that copy or list them.
pub fn checkpoint_files(prefix: &Path, num_shards: usize) -> Vec<PathBuf> {
    let mut v = vec![with_suffix(prefix, ".index")];
    v.extend((0..num_shards).map(|i| data_shard_path(prefix, i, num_shards)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_table_is_complete_and_consistent() {
        let all = [
            DType::F32,
            DType::F64,
            DType::I32,
            DType::U8,
            DType::I16,
            DType::I8,
            DType::String,
            DType::Complex64,
            DType::I64,
            DType::Bool,
            DType::QInt8,
            DType::QUInt8,
            DType::QInt32,
            DType::BF16,
            DType::QInt16,
            DType::QUInt16,
            DType::U16,
            DType::Complex128,
            DType::F16,
            DType::Resource,
            DType::Variant,
            DType::U32,
            DType::U64,
        ];
        for (i, d) in all.iter().enumerate() {
            assert_eq!(d.code(), i as i32 + 1, "{d}");
            assert_eq!(DType::from_code(i as i64 + 1), Some(*d));
        }
        assert_eq!(DType::from_code(0), None);
        assert_eq!(DType::from_code(101), None);
        assert_eq!(DType::F16.size_in_bytes(), Some(2));
        assert_eq!(DType::String.size_in_bytes(), None);
    }

    #[test]
    fn prefix_resolution() {
        assert_eq!(
            resolve_prefix(Path::new("/x/model.ckpt.index")).unwrap(),
            Path::new("/x/model.ckpt")
        );
        assert_eq!(
            resolve_prefix(Path::new("/x/model.ckpt-30000.data-00000-of-00001")).unwrap(),
            Path::new("/x/model.ckpt-30000")
        );
        assert_eq!(
            resolve_prefix(Path::new("/x/model.ckpt")).unwrap(),
            Path::new("/x/model.ckpt")
        );
        assert_eq!(
            data_shard_path(Path::new("a/b"), 3, 12),
            Path::new("a/b.data-00003-of-00012")
        );
    }

    /// Encodes a `BundleEntryProto` by hand.
    fn entry_proto(
        dtype: u64,
        dims: &[u64],
        shard: u64,
        offset: u64,
        size: u64,
        crc: u32,
        slices: usize,
    ) -> Vec<u8> {
        let mut m = Vec::new();
        proto::put_varint_field(&mut m, 1, dtype);
        let mut shape = Vec::new();
        for &d in dims {
            let mut dim = Vec::new();
            proto::put_varint_field(&mut dim, 1, d);
            proto::put_bytes_field(&mut shape, 2, &dim);
        }
        proto::put_bytes_field(&mut m, 2, &shape);
        proto::put_varint_field(&mut m, 3, shard);
        proto::put_varint_field(&mut m, 4, offset);
        proto::put_varint_field(&mut m, 5, size);
        proto::put_fixed32_field(&mut m, 6, crc);
        for _ in 0..slices {
            proto::put_bytes_field(&mut m, 7, &[]);
        }
        m
    }

    fn header_proto(num_shards: u64, endianness: u64, min_consumer: u64) -> Vec<u8> {
        let mut h = Vec::new();
        proto::put_varint_field(&mut h, 1, num_shards);
        proto::put_varint_field(&mut h, 2, endianness);
        let mut v = Vec::new();
        proto::put_varint_field(&mut v, 1, 1);
        proto::put_varint_field(&mut v, 2, min_consumer);
        proto::put_bytes_field(&mut h, 3, &v);
        h
    }

    /// Writes `rows` as `dir/model.ckpt.index` and `data` as its single shard; returns the prefix.
    fn write_bundle(dir: &Path, rows: &[(&[u8], Vec<u8>)], data: &[u8]) -> PathBuf {
        let prefix = dir.join("model.ckpt");
        let refs: Vec<(&[u8], &[u8])> = rows.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        std::fs::write(with_suffix(&prefix, ".index"), sstable::build_table(&refs)).unwrap();
        std::fs::write(data_shard_path(&prefix, 0, 1), data).unwrap();
        prefix
    }

    #[test]
    fn crafted_index_errors_name_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let crc = crc32c::mask(crc32c::value(&data));
        let ok = entry_proto(1, &[3], 0, 0, 12, crc, 0);
        let hdr = header_proto(1, 0, 0);

        // Size that disagrees with the shape.
        let p = write_bundle(
            dir.path(),
            &[
                (b"", hdr.clone()),
                (b"w", entry_proto(1, &[4], 0, 0, 12, crc, 0)),
            ],
            &data,
        );
        let e = Checkpoint::open(&p).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::SizeMismatch { name, expected: 16, size: 12, .. } if name == "w"),
            "{e}"
        );

        // Unknown dtype.
        let p = write_bundle(
            dir.path(),
            &[
                (b"", hdr.clone()),
                (b"v", entry_proto(77, &[3], 0, 0, 12, crc, 0)),
            ],
            &data,
        );
        let e = Checkpoint::open(&p).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::UnknownDtype { name, code: 77, .. } if name == "v"),
            "{e}"
        );

        // No header entry.
        let p = write_bundle(dir.path(), &[(b"w", ok.clone())], &data);
        assert!(matches!(
            Checkpoint::open(&p),
            Err(CheckpointError::MissingHeader { .. })
        ));

        // Shard id beyond num_shards.
        let p = write_bundle(
            dir.path(),
            &[
                (b"", hdr.clone()),
                (b"w", entry_proto(1, &[3], 2, 0, 12, crc, 0)),
            ],
            &data,
        );
        let e = Checkpoint::open(&p).unwrap_err().to_string();
        assert!(e.contains("'w'") && e.contains("shard 2"), "{e}");

        // A reader for a newer format version.
        let p = write_bundle(
            dir.path(),
            &[(b"", header_proto(1, 0, 5)), (b"w", ok.clone())],
            &data,
        );
        assert!(matches!(
            Checkpoint::open(&p),
            Err(CheckpointError::Unsupported { .. })
        ));

        // Big-endian bundle: values are byte-swapped after the CRC check.
        let be: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let be_crc = crc32c::mask(crc32c::value(&be));
        let p = write_bundle(
            dir.path(),
            &[
                (b"", header_proto(1, 1, 0)),
                (b"w", entry_proto(1, &[3], 0, 0, 12, be_crc, 0)),
            ],
            &be,
        );
        assert_eq!(
            Checkpoint::open(&p).unwrap().read_f32("w").unwrap(),
            vec![1.0, 2.0, 3.0]
        );

        // Partitioned variable: listed, but reading it is a clear error; slice keys are hidden.
        let p = write_bundle(
            dir.path(),
            &[
                (b"", hdr.clone()),
                (b"\x00slice-key", ok.clone()),
                (b"part", entry_proto(1, &[3], 0, 0, 0, 0, 2)),
                (b"w", ok.clone()),
            ],
            &data,
        );
        let c = Checkpoint::open(&p).unwrap();
        assert_eq!(c.names(), ["part", "w"]);
        assert!(matches!(
            c.read_f32("part"),
            Err(CheckpointError::Partitioned { slices: 2, .. })
        ));
        assert_eq!(c.read_f32("w").unwrap(), vec![1.0, 2.0, 3.0]);

        // A string variable is listed but not readable as numbers.
        let p = write_bundle(
            dir.path(),
            &[
                (b"", hdr.clone()),
                (b"s", entry_proto(7, &[], 0, 0, 5, 0, 0)),
                (b"w", ok.clone()),
            ],
            &data,
        );
        let c = Checkpoint::open(&p).unwrap();
        let e = c.read_f32("s").unwrap_err().to_string();
        assert!(e.contains("'s'") && e.contains("string"), "{e}");
        let e = c.read_f32("nope").unwrap_err().to_string();
        assert!(
            e.contains("no variable named 'nope'") && e.contains("model.ckpt.index"),
            "{e}"
        );

        // Bad wire type for a known field.
        let mut bad = Vec::new();
        proto::put_bytes_field(&mut bad, 1, b"x");
        let p = write_bundle(dir.path(), &[(b"", hdr.clone()), (b"w", bad)], &data);
        let e = Checkpoint::open(&p).unwrap_err().to_string();
        assert!(e.contains("'w'") && e.contains("wire type"), "{e}");
    }

    #[test]
    fn snappy_compressed_index_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = [4.0f32, 5.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let crc = crc32c::mask(crc32c::value(&data));
        let rows: Vec<(&[u8], Vec<u8>)> = vec![
            (b"", header_proto(1, 0, 0)),
            (b"a/b", entry_proto(1, &[2], 0, 0, 8, crc, 0)),
        ];
        let prefix = dir.path().join("model.ckpt");
        let refs: Vec<(&[u8], &[u8])> = rows.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        std::fs::write(
            with_suffix(&prefix, ".index"),
            sstable::build_table_snappy(&refs),
        )
        .unwrap();
        std::fs::write(data_shard_path(&prefix, 0, 1), &data).unwrap();
        assert_eq!(
            Checkpoint::open(&prefix).unwrap().read_f32("a/b").unwrap(),
            vec![4.0, 5.0]
        );
    }

    #[test]
    fn numeric_decoding() {
        let raw: Vec<u8> = [1.5f64, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            decode_numeric(&raw, DType::F64, false, |v| v as f32).unwrap(),
            vec![1.5, -2.0]
        );
        let raw: Vec<u8> = [half::f16::from_f32(0.5), half::f16::from_f32(-3.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            decode_numeric(&raw, DType::F16, false, |v| v as f32).unwrap(),
            vec![0.5, -3.0]
        );
        let raw: Vec<u8> = 1.25f32.to_be_bytes().to_vec();
        assert_eq!(
            decode_numeric(&raw, DType::F32, true, |v| v as f32).unwrap(),
            vec![1.25]
        );
        assert_eq!(
            decode_integer(&[0xff, 1], DType::I8, false).unwrap(),
            vec![-1, 1]
        );
        assert!(decode_numeric(&[0; 8], DType::Complex64, false, |v| v as f32).is_none());
        assert!(decode_numeric(&[0; 1], DType::QUInt8, false, |v| v as f32).is_none());
    }
}
