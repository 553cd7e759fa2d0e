//! The crate's error type: every failure names the file (and the value or sizes) it is about.

use std::path::{Path, PathBuf};

/// Result alias used throughout the crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading a dataset, transforming it or computing metrics.
///
/// File-related variants carry the path, so a message read in a log is enough to find the culprit.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error on a file or directory (permission denied, unexpected EOF, ...).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file the dataset layout requires does not exist.
    #[error("missing {what} for sample '{id}': {path} does not exist")]
    MissingFile {
        /// What the file is ("image", "mask", ...).
        what: &'static str,
        /// The sample id.
        id: String,
        /// The expected path.
        path: PathBuf,
    },
    /// A required directory or file of the layout is missing.
    #[error("{what} {path} does not exist")]
    MissingPath {
        /// What the path is ("dataset root", "classes file", ...).
        what: &'static str,
        /// The expected path.
        path: PathBuf,
    },
    /// An image or mask could not be decoded (corrupt, truncated, not an image).
    #[error("cannot decode {path}: {message}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// A mask's pixel format is not one the loaders understand.
    #[error("unsupported mask format in {path}: {message}")]
    UnsupportedMask {
        /// The mask file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A mask whose size differs from its image.
    #[error("mask {mask} is {mask_width}x{mask_height} but its image {image} is {image_width}x{image_height}")]
    SizeMismatch {
        /// The image file.
        image: PathBuf,
        /// The mask file.
        mask: PathBuf,
        /// Image width.
        image_width: u32,
        /// Image height.
        image_height: u32,
        /// Mask width.
        mask_width: u32,
        /// Mask height.
        mask_height: u32,
    },
    /// A label value that is neither a class id nor the ignore label.
    #[error("mask {path} has label value {value} at (x={x}, y={y}), which is not {expected}")]
    InvalidLabel {
        /// The mask file.
        path: PathBuf,
        /// The offending value.
        value: u32,
        /// Column of the first offending pixel.
        x: u32,
        /// Row of the first offending pixel.
        y: u32,
        /// What the value should have been, e.g. "a class id in 0..21 or the ignore label 255".
        expected: String,
    },
    /// A color mask with a color that is in no class of the classes file.
    #[error("color mask {path} has color ({r}, {g}, {b}) at (x={x}, y={y}), which matches no class color in the classes file")]
    UnknownColor {
        /// The mask file.
        path: PathBuf,
        /// Red.
        r: u8,
        /// Green.
        g: u8,
        /// Blue.
        b: u8,
        /// Column of the first offending pixel.
        x: u32,
        /// Row of the first offending pixel.
        y: u32,
    },
    /// A split list (e.g. `ImageSets/Segmentation/val.txt`) does not exist.
    #[error("split file {path} does not exist")]
    MissingSplit {
        /// The expected split file or directory.
        path: PathBuf,
    },
    /// A split list exists but names no samples.
    #[error("split {path} lists no samples")]
    EmptySplit {
        /// The split file or directory.
        path: PathBuf,
    },
    /// A syntax or content error in a classes file.
    #[error("{path}:{line}: {message}")]
    ClassesFile {
        /// The classes file.
        path: PathBuf,
        /// 1-based line number (0 when the problem is the file as a whole).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Writing a file failed.
    #[error("cannot write {path}: {message}")]
    Encode {
        /// The destination file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An invalid parameter (crop size, batch size, class count, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Two buffers that must have the same length do not.
    #[error("{what}: expected {expected} elements, got {actual}")]
    LengthMismatch {
        /// What was compared.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        actual: usize,
    },
    /// A value outside `0..num_classes` (and not the ignore label) given to a metric.
    #[error("{what} value {value} is out of range for {num_classes} classes")]
    ClassOutOfRange {
        /// "prediction" or "ground truth".
        what: &'static str,
        /// The value.
        value: u32,
        /// Number of classes.
        num_classes: usize,
    },
}

impl DataError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// The file this error is about, when there is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataError::Io { path, .. }
            | DataError::MissingFile { path, .. }
            | DataError::MissingPath { path, .. }
            | DataError::Decode { path, .. }
            | DataError::UnsupportedMask { path, .. }
            | DataError::InvalidLabel { path, .. }
            | DataError::UnknownColor { path, .. }
            | DataError::MissingSplit { path }
            | DataError::EmptySplit { path }
            | DataError::ClassesFile { path, .. }
            | DataError::Encode { path, .. } => Some(path),
            DataError::SizeMismatch { mask, .. } => Some(mask),
            DataError::Config(_)
            | DataError::LengthMismatch { .. }
            | DataError::ClassOutOfRange { .. } => None,
        }
    }
}

/// What to do with a sample that cannot be read (missing file, corrupt image, bad mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorPolicy {
    /// Return the error (the default: training must not silently drop data).
    #[default]
    Fail,
    /// Print a warning naming the sample and the problem to stderr, record it, and go on without the
    /// sample (for evaluation over large, partly broken copies of a dataset).
    SkipWithWarning,
}

/// A sample left out under [`ErrorPolicy::SkipWithWarning`], with the reason.
#[derive(Debug)]
pub struct SkippedSample {
    /// The sample id.
    pub id: String,
    /// Why it was skipped.
    pub error: DataError,
}

impl SkippedSample {
    /// Records a skipped sample and prints the warning line.
    pub(crate) fn warn(id: impl Into<String>, error: DataError) -> Self {
        let id = id.into();
        eprintln!("warning: skipping sample '{id}': {error}");
        SkippedSample { id, error }
    }
}
