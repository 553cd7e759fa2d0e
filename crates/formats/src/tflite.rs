//! TFLite model reader: the flatbuffer schema subset needed to import a model's weights and
//! graph (tensors with quantization parameters and constant data, operators with builtin options).
//!
//! Field slots, enum numbers and union member numbers follow tensorflow/lite/schema/schema.fbs
//! (schema version 3 with the 3a-3c additions: `OperatorCode.builtin_code`, `Buffer.offset/size`).
//! In a FlatBuffers vtable each field takes the next slot in declaration order and a union field
//! takes two (its `_type` byte, then the value), so e.g. `Operator.builtin_options_type` is slot 3
//! and `builtin_options` slot 4.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::flatbuf::{FbError, Table};

/// Everything that can go wrong reading a TFLite model; every message names the file and, where
/// one is involved, the tensor or operator.
#[derive(Debug, thiserror::Error)]
pub enum TfliteError {
    /// An I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is too short to hold a flatbuffer header.
    #[error("{path}: {len} bytes is too short for a TFLite model (truncated or empty file)")]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The flatbuffer file identifier is not `TFL3`.
    #[error("{path}: not a TFLite model: file identifier is {found:?}, expected \"TFL3\"")]
    BadIdentifier {
        /// The file.
        path: PathBuf,
        /// The 4 identifier bytes found (escaped).
        found: String,
    },
    /// The flatbuffer structure is invalid (offsets out of bounds, bad enum values...).
    #[error("{path}: {context}: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Which object (e.g. `subgraph 0, tensor 17 'MobilenetV2/Conv/weights'`).
        context: String,
        /// What is wrong.
        detail: String,
    },
    /// An operator uses a builtin code outside the TFLite schema.
    #[error("{path}: {context}: unknown builtin operator code {code} (not in the TFLite schema this reader knows)")]
    UnknownOp {
        /// The file.
        path: PathBuf,
        /// Which operator.
        context: String,
        /// The builtin code.
        code: i32,
    },
    /// A tensor has a type code outside the schema.
    #[error("{path}: tensor {index} '{tensor}': unsupported tensor type code {code}")]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// Tensor index in its subgraph.
        index: usize,
        /// Tensor name.
        tensor: String,
        /// The type code.
        code: i8,
    },
    /// A tensor's data cannot be returned as asked (no data, wrong size, unsupported type, bad
    /// quantization parameters).
    #[error("{path}: tensor {index} '{tensor}': {detail}")]
    Data {
        /// The file.
        path: PathBuf,
        /// Tensor index in its subgraph.
        index: usize,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
}

/// Result alias for TFLite operations.
pub type Result<T, E = TfliteError> = std::result::Result<T, E>;

/// TFLite `TensorType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum TensorType {
    Float32,
    Float16,
    Int32,
    UInt8,
    Int64,
    String,
    Bool,
    Int16,
    Complex64,
    Int8,
    Float64,
    Complex128,
    UInt64,
    Resource,
    Variant,
    UInt32,
    UInt16,
    Int4,
}

impl TensorType {
    /// Schema order: the enum value is the index.
    const ALL: [TensorType; 18] = [
        TensorType::Float32,
        TensorType::Float16,
        TensorType::Int32,
        TensorType::UInt8,
        TensorType::Int64,
        TensorType::String,
        TensorType::Bool,
        TensorType::Int16,
        TensorType::Complex64,
        TensorType::Int8,
        TensorType::Float64,
        TensorType::Complex128,
        TensorType::UInt64,
        TensorType::Resource,
        TensorType::Variant,
        TensorType::UInt32,
        TensorType::UInt16,
        TensorType::Int4,
    ];

    /// The type with schema value `code`.
    pub fn from_code(code: i8) -> Option<Self> {
        usize::try_from(code)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
    }

    /// The schema value.
    pub fn code(self) -> i8 {
        Self::ALL.iter().position(|&t| t == self).unwrap_or(0) as i8
    }

    /// Lower-case name as numpy prints it (`float32`, `uint8`, ...).
    pub fn name(self) -> &'static str {
        match self {
            TensorType::Float32 => "float32",
            TensorType::Float16 => "float16",
            TensorType::Int32 => "int32",
            TensorType::UInt8 => "uint8",
            TensorType::Int64 => "int64",
            TensorType::String => "string",
            TensorType::Bool => "bool",
            TensorType::Int16 => "int16",
            TensorType::Complex64 => "complex64",
            TensorType::Int8 => "int8",
            TensorType::Float64 => "float64",
            TensorType::Complex128 => "complex128",
            TensorType::UInt64 => "uint64",
            TensorType::Resource => "resource",
            TensorType::Variant => "variant",
            TensorType::UInt32 => "uint32",
            TensorType::UInt16 => "uint16",
            TensorType::Int4 => "int4",
        }
    }

    /// Bytes per element for types stored one element per whole number of bytes.
    pub fn size_in_bytes(self) -> Option<usize> {
        match self {
            TensorType::UInt8 | TensorType::Int8 | TensorType::Bool => Some(1),
            TensorType::Float16 | TensorType::Int16 | TensorType::UInt16 => Some(2),
            TensorType::Float32 | TensorType::Int32 | TensorType::UInt32 => Some(4),
            TensorType::Float64
            | TensorType::Int64
            | TensorType::UInt64
            | TensorType::Complex64 => Some(8),
            TensorType::Complex128 => Some(16),
            TensorType::String | TensorType::Resource | TensorType::Variant | TensorType::Int4 => {
                None
            }
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A TFLite `BuiltinOperator` code, with the schema's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BuiltinOp(pub i32);

/// `BuiltinOperator` names in schema order (value = index), 0..=205.
#[rustfmt::skip]
const OP_NAMES: [&str; 206] = [
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEPTH_TO_SPACE",
    "DEQUANTIZE", "EMBEDDING_LOOKUP", "FLOOR", "FULLY_CONNECTED", "HASHTABLE_LOOKUP",
    "L2_NORMALIZATION", "L2_POOL_2D", "LOCAL_RESPONSE_NORMALIZATION", "LOGISTIC", "LSH_PROJECTION",
    "LSTM", "MAX_POOL_2D", "MUL", "RELU", "RELU_N1_TO_1", "RELU6", "RESHAPE", "RESIZE_BILINEAR",
    "RNN", "SOFTMAX", "SPACE_TO_DEPTH", "SVDF", "TANH", "CONCAT_EMBEDDINGS", "SKIP_GRAM", "CALL",
    "CUSTOM", "EMBEDDING_LOOKUP_SPARSE", "PAD", "UNIDIRECTIONAL_SEQUENCE_RNN", "GATHER",
    "BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND", "TRANSPOSE", "MEAN", "SUB", "DIV", "SQUEEZE",
    "UNIDIRECTIONAL_SEQUENCE_LSTM", "STRIDED_SLICE", "BIDIRECTIONAL_SEQUENCE_RNN", "EXP", "TOPK_V2",
    "SPLIT", "LOG_SOFTMAX", "DELEGATE", "BIDIRECTIONAL_SEQUENCE_LSTM", "CAST", "PRELU", "MAXIMUM",
    "ARG_MAX", "MINIMUM", "LESS", "NEG", "PADV2", "GREATER", "GREATER_EQUAL", "LESS_EQUAL", "SELECT",
    "SLICE", "SIN", "TRANSPOSE_CONV", "SPARSE_TO_DENSE", "TILE", "EXPAND_DIMS", "EQUAL", "NOT_EQUAL",
    "LOG", "SUM", "SQRT", "RSQRT", "SHAPE", "POW", "ARG_MIN", "FAKE_QUANT", "REDUCE_PROD",
    "REDUCE_MAX", "PACK", "LOGICAL_OR", "ONE_HOT", "LOGICAL_AND", "LOGICAL_NOT", "UNPACK",
    "REDUCE_MIN", "FLOOR_DIV", "REDUCE_ANY", "SQUARE", "ZEROS_LIKE", "FILL", "FLOOR_MOD", "RANGE",
    "RESIZE_NEAREST_NEIGHBOR", "LEAKY_RELU", "SQUARED_DIFFERENCE", "MIRROR_PAD", "ABS", "SPLIT_V",
    "UNIQUE", "CEIL", "REVERSE_V2", "ADD_N", "GATHER_ND", "COS", "WHERE", "RANK", "ELU",
    "REVERSE_SEQUENCE", "MATRIX_DIAG", "QUANTIZE", "MATRIX_SET_DIAG", "ROUND", "HARD_SWISH", "IF",
    "WHILE", "NON_MAX_SUPPRESSION_V4", "NON_MAX_SUPPRESSION_V5", "SCATTER_ND", "SELECT_V2",
    "DENSIFY", "SEGMENT_SUM", "BATCH_MATMUL", "PLACEHOLDER_FOR_GREATER_OP_CODES", "CUMSUM",
    "CALL_ONCE", "BROADCAST_TO", "RFFT2D", "CONV_3D", "IMAG", "REAL", "COMPLEX_ABS", "HASHTABLE",
    "HASHTABLE_FIND", "HASHTABLE_IMPORT", "HASHTABLE_SIZE", "REDUCE_ALL", "CONV_3D_TRANSPOSE",
    "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "BROADCAST_ARGS", "RANDOM_STANDARD_NORMAL",
    "BUCKETIZE", "RANDOM_UNIFORM", "MULTINOMIAL", "GELU", "DYNAMIC_UPDATE_SLICE", "RELU_0_TO_1",
    "UNSORTED_SEGMENT_PROD", "UNSORTED_SEGMENT_MAX", "UNSORTED_SEGMENT_SUM", "ATAN2",
    "UNSORTED_SEGMENT_MIN", "SIGN", "BITCAST", "BITWISE_XOR", "RIGHT_SHIFT", "STABLEHLO_LOGISTIC",
    "STABLEHLO_ADD", "STABLEHLO_DIVIDE", "STABLEHLO_MULTIPLY", "STABLEHLO_MAXIMUM",
    "STABLEHLO_RESHAPE", "STABLEHLO_CLAMP", "STABLEHLO_CONCATENATE", "STABLEHLO_BROADCAST_IN_DIM",
    "STABLEHLO_CONVOLUTION", "STABLEHLO_SLICE", "STABLEHLO_CUSTOM_CALL", "STABLEHLO_REDUCE",
    "STABLEHLO_ABS", "STABLEHLO_AND", "STABLEHLO_COSINE", "STABLEHLO_EXPONENTIAL", "STABLEHLO_FLOOR",
    "STABLEHLO_LOG", "STABLEHLO_MINIMUM", "STABLEHLO_NEGATE", "STABLEHLO_OR", "STABLEHLO_POWER",
    "STABLEHLO_REMAINDER", "STABLEHLO_RSQRT", "STABLEHLO_SELECT", "STABLEHLO_SUBTRACT",
    "STABLEHLO_TANH", "STABLEHLO_SCATTER", "STABLEHLO_COMPARE", "STABLEHLO_CONVERT",
    "STABLEHLO_DYNAMIC_SLICE", "STABLEHLO_DYNAMIC_UPDATE_SLICE", "STABLEHLO_PAD", "STABLEHLO_IOTA",
    "STABLEHLO_DOT_GENERAL", "STABLEHLO_REDUCE_WINDOW", "STABLEHLO_SORT", "STABLEHLO_WHILE",
    "STABLEHLO_GATHER", "STABLEHLO_TRANSPOSE", "DILATE", "STABLEHLO_RNG_BIT_GENERATOR",
    "REDUCE_WINDOW",
];

#[allow(missing_docs)]
impl BuiltinOp {
    pub const ADD: BuiltinOp = BuiltinOp(0);
    pub const AVERAGE_POOL_2D: BuiltinOp = BuiltinOp(1);
    pub const CONCATENATION: BuiltinOp = BuiltinOp(2);
    pub const CONV_2D: BuiltinOp = BuiltinOp(3);
    pub const DEPTHWISE_CONV_2D: BuiltinOp = BuiltinOp(4);
    pub const DEPTH_TO_SPACE: BuiltinOp = BuiltinOp(5);
    pub const DEQUANTIZE: BuiltinOp = BuiltinOp(6);
    pub const FULLY_CONNECTED: BuiltinOp = BuiltinOp(9);
    pub const L2_POOL_2D: BuiltinOp = BuiltinOp(12);
    pub const LOGISTIC: BuiltinOp = BuiltinOp(14);
    pub const MAX_POOL_2D: BuiltinOp = BuiltinOp(17);
    pub const MUL: BuiltinOp = BuiltinOp(18);
    pub const RELU: BuiltinOp = BuiltinOp(19);
    pub const RELU6: BuiltinOp = BuiltinOp(21);
    pub const RESHAPE: BuiltinOp = BuiltinOp(22);
    pub const RESIZE_BILINEAR: BuiltinOp = BuiltinOp(23);
    pub const SOFTMAX: BuiltinOp = BuiltinOp(25);
    pub const SPACE_TO_DEPTH: BuiltinOp = BuiltinOp(26);
    pub const CUSTOM: BuiltinOp = BuiltinOp(32);
    pub const PAD: BuiltinOp = BuiltinOp(34);
    pub const GATHER: BuiltinOp = BuiltinOp(36);
    pub const BATCH_TO_SPACE_ND: BuiltinOp = BuiltinOp(37);
    pub const SPACE_TO_BATCH_ND: BuiltinOp = BuiltinOp(38);
    pub const TRANSPOSE: BuiltinOp = BuiltinOp(39);
    pub const MEAN: BuiltinOp = BuiltinOp(40);
    pub const SUB: BuiltinOp = BuiltinOp(41);
    pub const DIV: BuiltinOp = BuiltinOp(42);
    pub const SQUEEZE: BuiltinOp = BuiltinOp(43);
    pub const STRIDED_SLICE: BuiltinOp = BuiltinOp(45);
    pub const CAST: BuiltinOp = BuiltinOp(53);
    pub const MAXIMUM: BuiltinOp = BuiltinOp(55);
    pub const ARG_MAX: BuiltinOp = BuiltinOp(56);
    pub const MINIMUM: BuiltinOp = BuiltinOp(57);
    pub const PADV2: BuiltinOp = BuiltinOp(60);
    pub const TRANSPOSE_CONV: BuiltinOp = BuiltinOp(67);
    pub const EXPAND_DIMS: BuiltinOp = BuiltinOp(70);
    pub const SUM: BuiltinOp = BuiltinOp(74);
    pub const REDUCE_PROD: BuiltinOp = BuiltinOp(81);
    pub const REDUCE_MAX: BuiltinOp = BuiltinOp(82);
    pub const REDUCE_MIN: BuiltinOp = BuiltinOp(89);
    pub const REDUCE_ANY: BuiltinOp = BuiltinOp(91);
    pub const RESIZE_NEAREST_NEIGHBOR: BuiltinOp = BuiltinOp(97);
    pub const LEAKY_RELU: BuiltinOp = BuiltinOp(98);
    pub const QUANTIZE: BuiltinOp = BuiltinOp(114);
    pub const HARD_SWISH: BuiltinOp = BuiltinOp(117);
    pub const TEMP_STREAMING_CONV_2D: BuiltinOp = BuiltinOp(225);
}

impl BuiltinOp {
    /// The schema name, `None` for a code the schema does not define.
    pub fn name(self) -> Option<&'static str> {
        if self.0 == 225 {
            return Some("TEMP_STREAMING_CONV_2D");
        }
        usize::try_from(self.0)
            .ok()
            .and_then(|i| OP_NAMES.get(i).copied())
    }
}

impl fmt::Display for BuiltinOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "BUILTIN_{}", self.0),
        }
    }
}

/// `BuiltinOptions` union member names in schema order (value = index, 0 = NONE).
#[rustfmt::skip]
const OPTION_NAMES: [&str; 127] = [
    "NONE", "Conv2DOptions", "DepthwiseConv2DOptions", "ConcatEmbeddingsOptions",
    "LSHProjectionOptions", "Pool2DOptions", "SVDFOptions", "RNNOptions", "FullyConnectedOptions",
    "SoftmaxOptions", "ConcatenationOptions", "AddOptions", "L2NormOptions",
    "LocalResponseNormalizationOptions", "LSTMOptions", "ResizeBilinearOptions", "CallOptions",
    "ReshapeOptions", "SkipGramOptions", "SpaceToDepthOptions", "EmbeddingLookupSparseOptions",
    "MulOptions", "PadOptions", "GatherOptions", "BatchToSpaceNDOptions", "SpaceToBatchNDOptions",
    "TransposeOptions", "ReducerOptions", "SubOptions", "DivOptions", "SqueezeOptions",
    "SequenceRNNOptions", "StridedSliceOptions", "ExpOptions", "TopKV2Options", "SplitOptions",
    "LogSoftmaxOptions", "CastOptions", "DequantizeOptions", "MaximumMinimumOptions",
    "ArgMaxOptions", "LessOptions", "NegOptions", "PadV2Options", "GreaterOptions",
    "GreaterEqualOptions", "LessEqualOptions", "SelectOptions", "SliceOptions",
    "TransposeConvOptions", "SparseToDenseOptions", "TileOptions", "ExpandDimsOptions",
    "EqualOptions", "NotEqualOptions", "ShapeOptions", "PowOptions", "ArgMinOptions",
    "FakeQuantOptions", "PackOptions", "LogicalOrOptions", "OneHotOptions", "LogicalAndOptions",
    "LogicalNotOptions", "UnpackOptions", "FloorDivOptions", "SquareOptions", "ZerosLikeOptions",
    "FillOptions", "BidirectionalSequenceLSTMOptions", "BidirectionalSequenceRNNOptions",
    "UnidirectionalSequenceLSTMOptions", "FloorModOptions", "RangeOptions",
    "ResizeNearestNeighborOptions", "LeakyReluOptions", "SquaredDifferenceOptions",
    "MirrorPadOptions", "AbsOptions", "SplitVOptions", "UniqueOptions", "ReverseV2Options",
    "AddNOptions", "GatherNdOptions", "CosOptions", "WhereOptions", "RankOptions",
    "ReverseSequenceOptions", "MatrixDiagOptions", "QuantizeOptions", "MatrixSetDiagOptions",
    "HardSwishOptions", "IfOptions", "WhileOptions", "DepthToSpaceOptions",
    "NonMaxSuppressionV4Options", "NonMaxSuppressionV5Options", "ScatterNdOptions",
    "SelectV2Options", "DensifyOptions", "SegmentSumOptions", "BatchMatMulOptions",
    "CumsumOptions", "CallOnceOptions", "BroadcastToOptions", "Rfft2dOptions", "Conv3DOptions",
    "HashtableOptions", "HashtableFindOptions", "HashtableImportOptions", "HashtableSizeOptions",
    "VarHandleOptions", "ReadVariableOptions", "AssignVariableOptions", "RandomOptions",
    "BucketizeOptions", "GeluOptions", "DynamicUpdateSliceOptions", "UnsortedSegmentProdOptions",
    "UnsortedSegmentMaxOptions", "UnsortedSegmentMinOptions", "UnsortedSegmentSumOptions",
    "ATan2Options", "SignOptions", "BitcastOptions", "BitwiseXorOptions", "RightShiftOptions",
];

/// Union member numbers of the options decoded here.
mod opt {
    pub const CONV_2D: u8 = 1;
    pub const DEPTHWISE_CONV_2D: u8 = 2;
    pub const POOL_2D: u8 = 5;
    pub const FULLY_CONNECTED: u8 = 8;
    pub const SOFTMAX: u8 = 9;
    pub const CONCATENATION: u8 = 10;
    pub const ADD: u8 = 11;
    pub const RESIZE_BILINEAR: u8 = 15;
    pub const RESHAPE: u8 = 17;
    pub const SPACE_TO_DEPTH: u8 = 19;
    pub const MUL: u8 = 21;
    pub const PAD: u8 = 22;
    pub const GATHER: u8 = 23;
    pub const BATCH_TO_SPACE_ND: u8 = 24;
    pub const SPACE_TO_BATCH_ND: u8 = 25;
    pub const TRANSPOSE: u8 = 26;
    pub const REDUCER: u8 = 27;
    pub const SUB: u8 = 28;
    pub const DIV: u8 = 29;
    pub const SQUEEZE: u8 = 30;
    pub const STRIDED_SLICE: u8 = 32;
    pub const CAST: u8 = 37;
    pub const DEQUANTIZE: u8 = 38;
    pub const MAXIMUM_MINIMUM: u8 = 39;
    pub const ARG_MAX: u8 = 40;
    pub const PADV2: u8 = 43;
    pub const TRANSPOSE_CONV: u8 = 49;
    pub const EXPAND_DIMS: u8 = 52;
    pub const RESIZE_NEAREST_NEIGHBOR: u8 = 74;
    pub const LEAKY_RELU: u8 = 75;
    pub const QUANTIZE: u8 = 89;
    pub const HARD_SWISH: u8 = 91;
    pub const DEPTH_TO_SPACE: u8 = 94;
}

/// The options member an operator must carry, for the operators whose options are decoded.
fn expected_options(op: BuiltinOp) -> Option<u8> {
    Some(match op {
        BuiltinOp::CONV_2D => opt::CONV_2D,
        BuiltinOp::DEPTHWISE_CONV_2D => opt::DEPTHWISE_CONV_2D,
        BuiltinOp::AVERAGE_POOL_2D | BuiltinOp::MAX_POOL_2D | BuiltinOp::L2_POOL_2D => opt::POOL_2D,
        BuiltinOp::FULLY_CONNECTED => opt::FULLY_CONNECTED,
        BuiltinOp::SOFTMAX => opt::SOFTMAX,
        BuiltinOp::CONCATENATION => opt::CONCATENATION,
        BuiltinOp::ADD => opt::ADD,
        BuiltinOp::RESIZE_BILINEAR => opt::RESIZE_BILINEAR,
        BuiltinOp::RESHAPE => opt::RESHAPE,
        BuiltinOp::SPACE_TO_DEPTH => opt::SPACE_TO_DEPTH,
        BuiltinOp::DEPTH_TO_SPACE => opt::DEPTH_TO_SPACE,
        BuiltinOp::MUL => opt::MUL,
        BuiltinOp::PAD => opt::PAD,
        BuiltinOp::PADV2 => opt::PADV2,
        BuiltinOp::GATHER => opt::GATHER,
        BuiltinOp::BATCH_TO_SPACE_ND => opt::BATCH_TO_SPACE_ND,
        BuiltinOp::SPACE_TO_BATCH_ND => opt::SPACE_TO_BATCH_ND,
        BuiltinOp::TRANSPOSE => opt::TRANSPOSE,
        BuiltinOp::MEAN
        | BuiltinOp::SUM
        | BuiltinOp::REDUCE_MAX
        | BuiltinOp::REDUCE_MIN
        | BuiltinOp::REDUCE_PROD
        | BuiltinOp::REDUCE_ANY => opt::REDUCER,
        BuiltinOp::SUB => opt::SUB,
        BuiltinOp::DIV => opt::DIV,
        BuiltinOp::SQUEEZE => opt::SQUEEZE,
        BuiltinOp::STRIDED_SLICE => opt::STRIDED_SLICE,
        BuiltinOp::CAST => opt::CAST,
        BuiltinOp::DEQUANTIZE => opt::DEQUANTIZE,
        BuiltinOp::MAXIMUM | BuiltinOp::MINIMUM => opt::MAXIMUM_MINIMUM,
        BuiltinOp::ARG_MAX => opt::ARG_MAX,
        BuiltinOp::TRANSPOSE_CONV => opt::TRANSPOSE_CONV,
        BuiltinOp::EXPAND_DIMS => opt::EXPAND_DIMS,
        BuiltinOp::RESIZE_NEAREST_NEIGHBOR => opt::RESIZE_NEAREST_NEIGHBOR,
        BuiltinOp::LEAKY_RELU => opt::LEAKY_RELU,
        BuiltinOp::QUANTIZE => opt::QUANTIZE,
        BuiltinOp::HARD_SWISH => opt::HARD_SWISH,
        _ => return None,
    })
}

/// TFLite `Padding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// `SAME`: output = ceil(input / stride), zero padding split with the extra at the end.
    Same,
    /// `VALID`: no padding.
    Valid,
}

/// TFLite `ActivationFunctionType`, fused into the op's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Activation {
    None,
    Relu,
    ReluN1To1,
    Relu6,
    Tanh,
    SignBit,
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Activation::None => "NONE",
            Activation::Relu => "RELU",
            Activation::ReluN1To1 => "RELU_N1_TO_1",
            Activation::Relu6 => "RELU6",
            Activation::Tanh => "TANH",
            Activation::SignBit => "SIGN_BIT",
        })
    }
}

/// `Conv2DOptions`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct Conv2DOptions {
    pub padding: Padding,
    pub stride_w: i32,
    pub stride_h: i32,
    pub activation: Activation,
    pub dilation_w: i32,
    pub dilation_h: i32,
}

/// `DepthwiseConv2DOptions`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct DepthwiseConv2DOptions {
    pub padding: Padding,
    pub stride_w: i32,
    pub stride_h: i32,
    pub depth_multiplier: i32,
    pub activation: Activation,
    pub dilation_w: i32,
    pub dilation_h: i32,
}

/// `Pool2DOptions` (average, max and L2 pooling).
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct Pool2DOptions {
    pub padding: Padding,
    pub stride_w: i32,
    pub stride_h: i32,
    pub filter_w: i32,
    pub filter_h: i32,
    pub activation: Activation,
}

/// Decoded `builtin_options` of an operator. Options tables without fields (PAD, QUANTIZE,
/// DEQUANTIZE, ...) are [`BuiltinOptions::Empty`]; members not decoded here are
/// [`BuiltinOptions::Other`] with their union name.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum BuiltinOptions {
    /// The operator carries no options table.
    None,
    Conv2D(Conv2DOptions),
    DepthwiseConv2D(DepthwiseConv2DOptions),
    Pool2D(Pool2DOptions),
    FullyConnected {
        activation: Activation,
        keep_num_dims: bool,
    },
    Softmax {
        beta: f32,
    },
    Concatenation {
        axis: i32,
        activation: Activation,
    },
    Add {
        activation: Activation,
    },
    Sub {
        activation: Activation,
    },
    Mul {
        activation: Activation,
    },
    Div {
        activation: Activation,
    },
    ResizeBilinear {
        align_corners: bool,
        half_pixel_centers: bool,
    },
    ResizeNearestNeighbor {
        align_corners: bool,
        half_pixel_centers: bool,
    },
    /// `new_shape` is `None` when the options omit it (the shape then comes from input 1).
    Reshape {
        new_shape: Option<Vec<i32>>,
    },
    /// MEAN, SUM, REDUCE_MAX, ...
    Reducer {
        keep_dims: bool,
    },
    Squeeze {
        squeeze_dims: Vec<i32>,
    },
    StridedSlice {
        begin_mask: i32,
        end_mask: i32,
        ellipsis_mask: i32,
        new_axis_mask: i32,
        shrink_axis_mask: i32,
    },
    ArgMax {
        output_type: TensorType,
    },
    Cast {
        in_type: Option<TensorType>,
        out_type: Option<TensorType>,
    },
    Gather {
        axis: i32,
        batch_dims: i32,
    },
    SpaceToDepth {
        block_size: i32,
    },
    DepthToSpace {
        block_size: i32,
    },
    LeakyRelu {
        alpha: f32,
    },
    TransposeConv {
        padding: Padding,
        stride_w: i32,
        stride_h: i32,
        activation: Activation,
    },
    /// A fieldless options table, named by its union member (e.g. `QuantizeOptions`).
    Empty(&'static str),
    /// A union member this reader does not decode.
    Other {
        member: u8,
        name: &'static str,
    },
}

impl fmt::Display for BuiltinOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pad = |p: &Padding| if *p == Padding::Same { "SAME" } else { "VALID" };
        match self {
            BuiltinOptions::None => write!(f, "-"),
            BuiltinOptions::Conv2D(o) => write!(
                f,
                "padding={} stride={}x{} dilation={}x{} act={}",
                pad(&o.padding),
                o.stride_h,
                o.stride_w,
                o.dilation_h,
                o.dilation_w,
                o.activation
            ),
            BuiltinOptions::DepthwiseConv2D(o) => write!(
                f,
                "padding={} stride={}x{} dilation={}x{} depth_multiplier={} act={}",
                pad(&o.padding),
                o.stride_h,
                o.stride_w,
                o.dilation_h,
                o.dilation_w,
                o.depth_multiplier,
                o.activation
            ),
            BuiltinOptions::Pool2D(o) => write!(
                f,
                "padding={} filter={}x{} stride={}x{} act={}",
                pad(&o.padding),
                o.filter_h,
                o.filter_w,
                o.stride_h,
                o.stride_w,
                o.activation
            ),
            BuiltinOptions::FullyConnected { activation, keep_num_dims } => write!(f, "act={activation} keep_num_dims={keep_num_dims}"),
            BuiltinOptions::Softmax { beta } => write!(f, "beta={beta}"),
            BuiltinOptions::Concatenation { axis, activation } => write!(f, "axis={axis} act={activation}"),
            BuiltinOptions::Add { activation } | BuiltinOptions::Sub { activation } | BuiltinOptions::Mul { activation } | BuiltinOptions::Div { activation } => {
                write!(f, "act={activation}")
            }
            BuiltinOptions::ResizeBilinear { align_corners, half_pixel_centers } | BuiltinOptions::ResizeNearestNeighbor { align_corners, half_pixel_centers } => {
                write!(f, "align_corners={align_corners} half_pixel_centers={half_pixel_centers}")
            }
            BuiltinOptions::Reshape { new_shape } => match new_shape {
                Some(s) => write!(f, "new_shape={s:?}"),
                None => write!(f, "new_shape=(from input)"),
            },
            BuiltinOptions::Reducer { keep_dims } => write!(f, "keep_dims={keep_dims}"),
            BuiltinOptions::Squeeze { squeeze_dims } => write!(f, "squeeze_dims={squeeze_dims:?}"),
            BuiltinOptions::StridedSlice { begin_mask, end_mask, ellipsis_mask, new_axis_mask, shrink_axis_mask } => write!(
                f,
                "begin_mask={begin_mask} end_mask={end_mask} ellipsis_mask={ellipsis_mask} new_axis_mask={new_axis_mask} shrink_axis_mask={shrink_axis_mask}"
            ),
            BuiltinOptions::ArgMax { output_type } => write!(f, "output_type={output_type}"),
            BuiltinOptions::Cast { in_type, out_type } => write!(f, "in={in_type:?} out={out_type:?}"),
            BuiltinOptions::Gather { axis, batch_dims } => write!(f, "axis={axis} batch_dims={batch_dims}"),
            BuiltinOptions::SpaceToDepth { block_size } | BuiltinOptions::DepthToSpace { block_size } => write!(f, "block_size={block_size}"),
            BuiltinOptions::LeakyRelu { alpha } => write!(f, "alpha={alpha}"),
            BuiltinOptions::TransposeConv { padding, stride_w, stride_h, activation } => {
                write!(f, "padding={} stride={}x{} act={}", pad(padding), stride_h, stride_w, activation)
            }
            BuiltinOptions::Empty(name) => write!(f, "{name}{{}}"),
            BuiltinOptions::Other { name, .. } => write!(f, "{name}(not decoded)"),
        }
    }
}

/// Asymmetric linear quantization: `real = scale * (q - zero_point)`, per tensor (one scale) or
/// per channel along `quantized_dimension`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantization {
    /// Calibration minimums (informational).
    pub min: Vec<f32>,
    /// Calibration maximums (informational).
    pub max: Vec<f32>,
    /// Scales: one, or one per channel.
    pub scale: Vec<f32>,
    /// Zero points, as many as scales.
    pub zero_point: Vec<i64>,
    /// Axis of the per-channel parameters.
    pub quantized_dimension: usize,
    /// Whether a custom `QuantizationDetails` member is present (then scale/zero_point do not apply).
    pub has_custom_details: bool,
}

/// One tensor of a subgraph.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Index in its subgraph's tensor list (the number operators refer to).
    pub index: usize,
    /// Name (TensorFlow op/variable name it came from).
    pub name: String,
    /// Shape (NHWC for activations; conv weights `[Cout, kh, kw, Cin]`, depthwise `[1, kh, kw, C]`).
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: TensorType,
    /// Index into the model's buffers (0 = no data).
    pub buffer: usize,
    /// Quantization parameters, when the tensor has any.
    pub quantization: Option<Quantization>,
    /// Whether this is a variable tensor (state).
    pub is_variable: bool,
    /// Whether the tensor is stored sparse (its data is then not a dense array).
    pub is_sparse: bool,
    /// Whether its buffer holds constant data (weights, biases, shape operands). Older
    /// converters give every tensor its own, empty, buffer, so `buffer != 0` does not imply this.
    pub has_data: bool,
}

impl Tensor {
    /// Number of elements (1 for a scalar). Parsing guarantees the product fits in `usize`.
    pub fn num_elements(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    fn shape_str(&self) -> String {
        if self.shape.is_empty() {
            return "scalar".into();
        }
        self.shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x")
    }
}

/// A tensor's constant data, decoded by type.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    F64(Vec<f64>),
    U8(Vec<u8>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    U16(Vec<u16>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
}

/// An entry of the model's operator-code table.
#[derive(Debug, Clone)]
pub struct OperatorCode {
    /// The builtin operator: `max(deprecated_builtin_code, builtin_code)`, as the TFLite runtime
    /// resolves it.
    pub builtin: BuiltinOp,
    /// Custom op name, for `CUSTOM`.
    pub custom_code: Option<String>,
    /// Op version.
    pub version: i32,
}

/// One operator of a subgraph, in execution order.
#[derive(Debug, Clone)]
pub struct Operator {
    /// Position in the subgraph's operator list.
    pub index: usize,
    /// Index into [`TfliteModel::operator_codes`].
    pub opcode_index: usize,
    /// The builtin operator.
    pub op: BuiltinOp,
    /// Custom op name, for `CUSTOM`.
    pub custom_code: Option<String>,
    /// Input tensor indices; `None` marks an omitted optional input (-1 in the file).
    pub inputs: Vec<Option<usize>>,
    /// Output tensor indices.
    pub outputs: Vec<usize>,
    /// Decoded builtin options.
    pub options: BuiltinOptions,
}

/// A subgraph: tensors, graph inputs/outputs and operators.
#[derive(Debug, Clone)]
pub struct SubGraph {
    /// Name, if recorded.
    pub name: Option<String>,
    /// All tensors.
    pub tensors: Vec<Tensor>,
    /// Graph input tensor indices.
    pub inputs: Vec<usize>,
    /// Graph output tensor indices.
    pub outputs: Vec<usize>,
    /// Operators in execution order.
    pub operators: Vec<Operator>,
}

impl SubGraph {
    /// The tensor with this exact name, if any.
    pub fn tensor_by_name(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn tensor_brief(&self, i: usize) -> String {
        match self.tensors.get(i) {
            Some(t) => {
                let q = match &t.quantization {
                    Some(q) if q.scale.len() == 1 => format!(
                        " q(s={},z={})",
                        q.scale[0],
                        q.zero_point.first().copied().unwrap_or(0)
                    ),
                    Some(q) if q.scale.len() > 1 => format!(
                        " q(per-channel x{} dim {})",
                        q.scale.len(),
                        q.quantized_dimension
                    ),
                    _ => String::new(),
                };
                let c = if t.has_data { " const" } else { "" };
                format!(
                    "t{} '{}' {} {}{}{}",
                    t.index,
                    t.name,
                    t.shape_str(),
                    t.dtype,
                    q,
                    c
                )
            }
            None => format!("t{i} (missing)"),
        }
    }

    /// One readable line for an operator: index, op, options, then its inputs and outputs with
    /// names, shapes, types and quantization.
    pub fn describe_operator(&self, op: &Operator) -> String {
        let ins: Vec<String> = op
            .inputs
            .iter()
            .map(|i| {
                i.map(|i| self.tensor_brief(i))
                    .unwrap_or_else(|| "(none)".into())
            })
            .collect();
        let outs: Vec<String> = op.outputs.iter().map(|&i| self.tensor_brief(i)).collect();
        let name = match &op.custom_code {
            Some(c) => format!("CUSTOM({c})"),
            None => op.op.to_string(),
        };
        format!(
            "#{:<3} {name} [{}]\n      in:  {}\n      out: {}",
            op.index,
            op.options,
            ins.join(" | "),
            outs.join(" | ")
        )
    }

    /// Number of operators of each kind, sorted by op name.
    pub fn op_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for op in &self.operators {
            *m.entry(op.op.to_string()).or_insert(0) += 1;
        }
        m
    }
}

/// A parsed TFLite model. The file bytes are kept so tensor data can be returned on demand.
pub struct TfliteModel {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Schema version (3).
    pub version: u32,
    /// Model description.
    pub description: Option<String>,
    /// Operator-code table.
    pub operator_codes: Vec<OperatorCode>,
    /// Subgraphs; the first is the main model.
    pub subgraphs: Vec<SubGraph>,
    /// Byte range of each buffer in the file (empty = no data).
    buffers: Vec<Range<usize>>,
}

impl fmt::Debug for TfliteModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TfliteModel")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("subgraphs", &self.subgraphs.len())
            .field("buffers", &self.buffers.len())
            .finish()
    }
}

/// Parsing state: the buffer and the file name for errors.
struct Parser<'a> {
    buf: &'a [u8],
    path: &'a Path,
}

impl Parser<'_> {
    fn malformed(&self, context: impl Into<String>) -> impl FnOnce(FbError) -> TfliteError + '_ {
        let context = context.into();
        move |e| TfliteError::Malformed {
            path: self.path.to_path_buf(),
            context,
            detail: e.0,
        }
    }

    fn invalid(&self, context: impl Into<String>, detail: impl Into<String>) -> TfliteError {
        TfliteError::Malformed {
            path: self.path.to_path_buf(),
            context: context.into(),
            detail: detail.into(),
        }
    }

    fn activation(
        &self,
        t: &Table<'_>,
        slot: usize,
        ctx: &dyn Fn() -> String,
    ) -> Result<Activation> {
        let v = t
            .scalar::<i8>(slot, 0, "fused_activation_function")
            .map_err(self.malformed(ctx()))?;
        Ok(match v {
            0 => Activation::None,
            1 => Activation::Relu,
            2 => Activation::ReluN1To1,
            3 => Activation::Relu6,
            4 => Activation::Tanh,
            5 => Activation::SignBit,
            v => return Err(self.invalid(ctx(), format!("unknown fused activation {v}"))),
        })
    }

    fn padding(&self, t: &Table<'_>, slot: usize, ctx: &dyn Fn() -> String) -> Result<Padding> {
        match t
            .scalar::<i8>(slot, 0, "padding")
            .map_err(self.malformed(ctx()))?
        {
            0 => Ok(Padding::Same),
            1 => Ok(Padding::Valid),
            v => Err(self.invalid(ctx(), format!("unknown padding {v}"))),
        }
    }

    fn tensor_type(&self, code: i8, ctx: &dyn Fn() -> String) -> Result<TensorType> {
        TensorType::from_code(code)
            .ok_or_else(|| self.invalid(ctx(), format!("unknown tensor type {code}")))
    }

    fn model(&self) -> Result<TfliteModel> {
        let ctx_model = || "model".to_string();
        let root = Table::root(self.buf).map_err(self.malformed("model root"))?;
        let version = root
            .scalar::<u32>(0, 0, "Model.version")
            .map_err(self.malformed("model"))?;
        if version != 3 {
            return Err(self.invalid(
                ctx_model(),
                format!("schema version {version}; only version 3 models are supported"),
            ));
        }
        let description = root
            .string(3, "Model.description")
            .map_err(self.malformed("model"))?;

        // Buffers first: tensors refer to them.
        let mut buffers = Vec::new();
        if let Some(v) = root
            .vector(4, "Model.buffers")
            .map_err(self.malformed("model"))?
        {
            v.check(4, "Model.buffers")
                .map_err(self.malformed("model"))?;
            for i in 0..v.len() {
                let ctx = || format!("buffer {i}");
                let b = v.table(i, "Buffer").map_err(self.malformed(ctx()))?;
                let offset = b
                    .scalar::<u64>(1, 0, "Buffer.offset")
                    .map_err(self.malformed(ctx()))?;
                let size = b
                    .scalar::<u64>(2, 0, "Buffer.size")
                    .map_err(self.malformed(ctx()))?;
                let range = if offset > 1 {
                    // Large models keep the data after the flatbuffer, at an absolute offset.
                    let end = offset.checked_add(size).filter(|&e| e <= self.buf.len() as u64).ok_or_else(|| {
                        self.invalid(ctx(), format!("external data at offset {offset} of {size} bytes lies past the end of the {}-byte file (truncated?)", self.buf.len()))
                    })?;
                    offset as usize..end as usize
                } else {
                    match b.vector(0, "Buffer.data").map_err(self.malformed(ctx()))? {
                        Some(d) => {
                            d.bytes("Buffer.data").map_err(self.malformed(ctx()))?;
                            d.start()..d.start() + d.len()
                        }
                        None => 0..0,
                    }
                };
                buffers.push(range);
            }
        }

        let mut operator_codes = Vec::new();
        if let Some(v) = root
            .vector(1, "Model.operator_codes")
            .map_err(self.malformed("model"))?
        {
            v.check(4, "Model.operator_codes")
                .map_err(self.malformed("model"))?;
            for i in 0..v.len() {
                let ctx = || format!("operator code {i}");
                let c = v.table(i, "OperatorCode").map_err(self.malformed(ctx()))?;
                let deprecated = c
                    .scalar::<i8>(0, 0, "deprecated_builtin_code")
                    .map_err(self.malformed(ctx()))?;
                let custom_code = c.string(1, "custom_code").map_err(self.malformed(ctx()))?;
                let version = c
                    .scalar::<i32>(2, 1, "version")
                    .map_err(self.malformed(ctx()))?;
                let builtin_code = c
                    .scalar::<i32>(3, 0, "builtin_code")
                    .map_err(self.malformed(ctx()))?;
                operator_codes.push(OperatorCode {
                    builtin: BuiltinOp(i32::from(deprecated).max(builtin_code)),
                    custom_code,
                    version,
                });
            }
        }

        let mut subgraphs = Vec::new();
        let sv = root
            .vector(2, "Model.subgraphs")
            .map_err(self.malformed("model"))?
            .ok_or_else(|| self.invalid("model", "no subgraphs"))?;
        sv.check(4, "Model.subgraphs")
            .map_err(self.malformed("model"))?;
        if sv.len() == 0 {
            return Err(self.invalid("model", "no subgraphs"));
        }
        for s in 0..sv.len() {
            subgraphs.push(
                self.subgraph(
                    s,
                    sv.table(s, "SubGraph")
                        .map_err(self.malformed(format!("subgraph {s}")))?,
                    &buffers,
                    &operator_codes,
                )?,
            );
        }
        Ok(TfliteModel {
            path: self.path.to_path_buf(),
            bytes: Vec::new(),
            version,
            description,
            operator_codes,
            subgraphs,
            buffers,
        })
    }

    fn subgraph(
        &self,
        s: usize,
        t: Table<'_>,
        buffers: &[Range<usize>],
        codes: &[OperatorCode],
    ) -> Result<SubGraph> {
        let sctx = || format!("subgraph {s}");
        let name = t
            .string(4, "SubGraph.name")
            .map_err(self.malformed(sctx()))?;
        let mut tensors = Vec::new();
        if let Some(v) = t
            .vector(0, "SubGraph.tensors")
            .map_err(self.malformed(sctx()))?
        {
            v.check(4, "SubGraph.tensors")
                .map_err(self.malformed(sctx()))?;
            for i in 0..v.len() {
                let tt = v
                    .table(i, "Tensor")
                    .map_err(self.malformed(format!("subgraph {s}, tensor {i}")))?;
                tensors.push(self.tensor(s, i, tt, buffers)?);
            }
        }
        let n = tensors.len();
        let index_list = |slot: usize, what: &str| -> Result<Vec<usize>> {
            let v = t.vector(slot, what).map_err(self.malformed(sctx()))?;
            let raw: Vec<i32> = match v {
                Some(v) => v.scalars(what).map_err(self.malformed(sctx()))?,
                None => Vec::new(),
            };
            raw.iter()
                .map(|&x| {
                    usize::try_from(x).ok().filter(|&x| x < n).ok_or_else(|| {
                        self.invalid(
                            sctx(),
                            format!("{what} refers to tensor {x}, but there are {n}"),
                        )
                    })
                })
                .collect()
        };
        let inputs = index_list(1, "SubGraph.inputs")?;
        let outputs = index_list(2, "SubGraph.outputs")?;
        let mut operators = Vec::new();
        if let Some(v) = t
            .vector(3, "SubGraph.operators")
            .map_err(self.malformed(sctx()))?
        {
            v.check(4, "SubGraph.operators")
                .map_err(self.malformed(sctx()))?;
            for i in 0..v.len() {
                let ot = v
                    .table(i, "Operator")
                    .map_err(self.malformed(format!("subgraph {s}, operator {i}")))?;
                operators.push(self.operator(s, i, ot, &tensors, codes)?);
            }
        }
        Ok(SubGraph {
            name,
            tensors,
            inputs,
            outputs,
            operators,
        })
    }

    fn tensor(&self, s: usize, i: usize, t: Table<'_>, buffers: &[Range<usize>]) -> Result<Tensor> {
        let name = t
            .string(3, "Tensor.name")
            .map_err(self.malformed(format!("subgraph {s}, tensor {i}")))?
            .unwrap_or_default();
        let ctx = || format!("subgraph {s}, tensor {i} '{name}'");
        let dims: Vec<i32> = match t.vector(0, "Tensor.shape").map_err(self.malformed(ctx()))? {
            Some(v) => v.scalars("Tensor.shape").map_err(self.malformed(ctx()))?,
            None => Vec::new(),
        };
        let shape = dims
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| {
                    self.invalid(ctx(), format!("negative dimension in shape {dims:?}"))
                })
            })
            .collect::<Result<Vec<usize>>>()?;
        if shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_none()
        {
            return Err(self.invalid(
                ctx(),
                format!("shape {dims:?} has more elements than fit in memory"),
            ));
        }
        let code = t
            .scalar::<i8>(1, 0, "Tensor.type")
            .map_err(self.malformed(ctx()))?;
        let dtype =
            TensorType::from_code(code).ok_or_else(|| TfliteError::UnsupportedTensorType {
                path: self.path.to_path_buf(),
                index: i,
                tensor: name.clone(),
                code,
            })?;
        let buffer = t
            .scalar::<u32>(2, 0, "Tensor.buffer")
            .map_err(self.malformed(ctx()))? as usize;
        if buffer >= buffers.len() && !(buffer == 0 && buffers.is_empty()) {
            return Err(self.invalid(
                ctx(),
                format!(
                    "refers to buffer {buffer}, but the model has {}",
                    buffers.len()
                ),
            ));
        }
        let quantization = match t
            .table(4, "Tensor.quantization")
            .map_err(self.malformed(ctx()))?
        {
            None => None,
            Some(q) => {
                let f32s = |slot: usize, what: &str| -> Result<Vec<f32>> {
                    Ok(match q.vector(slot, what).map_err(self.malformed(ctx()))? {
                        Some(v) => v.scalars(what).map_err(self.malformed(ctx()))?,
                        None => Vec::new(),
                    })
                };
                let min = f32s(0, "QuantizationParameters.min")?;
                let max = f32s(1, "QuantizationParameters.max")?;
                let scale = f32s(2, "QuantizationParameters.scale")?;
                let zero_point: Vec<i64> = match q
                    .vector(3, "QuantizationParameters.zero_point")
                    .map_err(self.malformed(ctx()))?
                {
                    Some(v) => v.scalars("zero_point").map_err(self.malformed(ctx()))?,
                    None => Vec::new(),
                };
                let details = q
                    .scalar::<u8>(4, 0, "QuantizationParameters.details_type")
                    .map_err(self.malformed(ctx()))?;
                let qd = q
                    .scalar::<i32>(6, 0, "QuantizationParameters.quantized_dimension")
                    .map_err(self.malformed(ctx()))?;
                let quantized_dimension = usize::try_from(qd).map_err(|_| {
                    self.invalid(ctx(), format!("negative quantized_dimension {qd}"))
                })?;
                let empty = min.is_empty()
                    && max.is_empty()
                    && scale.is_empty()
                    && zero_point.is_empty()
                    && details == 0;
                (!empty).then_some(Quantization {
                    min,
                    max,
                    scale,
                    zero_point,
                    quantized_dimension,
                    has_custom_details: details != 0,
                })
            }
        };
        let is_variable = t
            .scalar::<bool>(5, false, "Tensor.is_variable")
            .map_err(self.malformed(ctx()))?;
        let is_sparse = t
            .table(6, "Tensor.sparsity")
            .map_err(self.malformed(ctx()))?
            .is_some();
        let has_data = buffers.get(buffer).is_some_and(|r| !r.is_empty());
        Ok(Tensor {
            index: i,
            name,
            shape,
            dtype,
            buffer,
            quantization,
            is_variable,
            is_sparse,
            has_data,
        })
    }

    fn operator(
        &self,
        s: usize,
        i: usize,
        t: Table<'_>,
        tensors: &[Tensor],
        codes: &[OperatorCode],
    ) -> Result<Operator> {
        let base = || format!("subgraph {s}, operator {i}");
        let opcode_index = t
            .scalar::<u32>(0, 0, "Operator.opcode_index")
            .map_err(self.malformed(base()))? as usize;
        let code = codes.get(opcode_index).ok_or_else(|| {
            self.invalid(
                base(),
                format!(
                    "opcode_index {opcode_index} out of the {} operator codes",
                    codes.len()
                ),
            )
        })?;
        let op = code.builtin;
        let ctx = || format!("subgraph {s}, operator {i} ({op})");
        if op.name().is_none() {
            return Err(TfliteError::UnknownOp {
                path: self.path.to_path_buf(),
                context: base(),
                code: op.0,
            });
        }
        let n = tensors.len();
        let list = |slot: usize, what: &str| -> Result<Vec<i32>> {
            Ok(match t.vector(slot, what).map_err(self.malformed(ctx()))? {
                Some(v) => v.scalars(what).map_err(self.malformed(ctx()))?,
                None => Vec::new(),
            })
        };
        let inputs = list(1, "Operator.inputs")?
            .into_iter()
            .map(|x| match x {
                -1 => Ok(None),
                x => usize::try_from(x)
                    .ok()
                    .filter(|&x| x < n)
                    .map(Some)
                    .ok_or_else(|| {
                        self.invalid(
                            ctx(),
                            format!("input refers to tensor {x}, but there are {n}"),
                        )
                    }),
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = list(2, "Operator.outputs")?
            .into_iter()
            .map(|x| {
                usize::try_from(x).ok().filter(|&x| x < n).ok_or_else(|| {
                    self.invalid(
                        ctx(),
                        format!("output refers to tensor {x}, but there are {n}"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let member = t
            .scalar::<u8>(3, 0, "Operator.builtin_options_type")
            .map_err(self.malformed(ctx()))?;
        if usize::from(member) >= OPTION_NAMES.len() {
            return Err(self.invalid(ctx(), format!("unknown builtin_options member {member}")));
        }
        if let Some(expected) = expected_options(op) {
            if member != 0 && member != expected {
                return Err(self.invalid(
                    ctx(),
                    format!(
                        "carries {} but {op} takes {}",
                        OPTION_NAMES[usize::from(member)],
                        OPTION_NAMES[usize::from(expected)]
                    ),
                ));
            }
        }
        let options = match t
            .table(4, "Operator.builtin_options")
            .map_err(self.malformed(ctx()))?
        {
            Some(o) if member != 0 => self.options(member, &o, &ctx)?,
            _ => BuiltinOptions::None,
        };
        Ok(Operator {
            index: i,
            opcode_index,
            op,
            custom_code: code.custom_code.clone(),
            inputs,
            outputs,
            options,
        })
    }

    fn options(
        &self,
        member: u8,
        o: &Table<'_>,
        ctx: &dyn Fn() -> String,
    ) -> Result<BuiltinOptions> {
        let i32f = |slot: usize, default: i32, what: &str| {
            o.scalar::<i32>(slot, default, what)
                .map_err(self.malformed(ctx()))
        };
        let boolf = |slot: usize, what: &str| {
            o.scalar::<bool>(slot, false, what)
                .map_err(self.malformed(ctx()))
        };
        let i32v = |slot: usize, what: &str| -> Result<Option<Vec<i32>>> {
            match o.vector(slot, what).map_err(self.malformed(ctx()))? {
                Some(v) => Ok(Some(v.scalars(what).map_err(self.malformed(ctx()))?)),
                None => Ok(None),
            }
        };
        Ok(match member {
            opt::CONV_2D => BuiltinOptions::Conv2D(Conv2DOptions {
                padding: self.padding(o, 0, ctx)?,
                stride_w: i32f(1, 0, "stride_w")?,
                stride_h: i32f(2, 0, "stride_h")?,
                activation: self.activation(o, 3, ctx)?,
                dilation_w: i32f(4, 1, "dilation_w_factor")?,
                dilation_h: i32f(5, 1, "dilation_h_factor")?,
            }),
            opt::DEPTHWISE_CONV_2D => BuiltinOptions::DepthwiseConv2D(DepthwiseConv2DOptions {
                padding: self.padding(o, 0, ctx)?,
                stride_w: i32f(1, 0, "stride_w")?,
                stride_h: i32f(2, 0, "stride_h")?,
                depth_multiplier: i32f(3, 0, "depth_multiplier")?,
                activation: self.activation(o, 4, ctx)?,
                dilation_w: i32f(5, 1, "dilation_w_factor")?,
                dilation_h: i32f(6, 1, "dilation_h_factor")?,
            }),
            opt::POOL_2D => BuiltinOptions::Pool2D(Pool2DOptions {
                padding: self.padding(o, 0, ctx)?,
                stride_w: i32f(1, 0, "stride_w")?,
                stride_h: i32f(2, 0, "stride_h")?,
                filter_w: i32f(3, 0, "filter_width")?,
                filter_h: i32f(4, 0, "filter_height")?,
                activation: self.activation(o, 5, ctx)?,
            }),
            opt::FULLY_CONNECTED => BuiltinOptions::FullyConnected {
                activation: self.activation(o, 0, ctx)?,
                keep_num_dims: boolf(2, "keep_num_dims")?,
            },
            opt::SOFTMAX => BuiltinOptions::Softmax {
                beta: o
                    .scalar::<f32>(0, 0.0, "beta")
                    .map_err(self.malformed(ctx()))?,
            },
            opt::CONCATENATION => BuiltinOptions::Concatenation {
                axis: i32f(0, 0, "axis")?,
                activation: self.activation(o, 1, ctx)?,
            },
            opt::ADD => BuiltinOptions::Add {
                activation: self.activation(o, 0, ctx)?,
            },
            opt::SUB => BuiltinOptions::Sub {
                activation: self.activation(o, 0, ctx)?,
            },
            opt::MUL => BuiltinOptions::Mul {
                activation: self.activation(o, 0, ctx)?,
            },
            opt::DIV => BuiltinOptions::Div {
                activation: self.activation(o, 0, ctx)?,
            },
            // Slots 0 and 1 are the deprecated new_height/new_width.
            opt::RESIZE_BILINEAR => BuiltinOptions::ResizeBilinear {
                align_corners: boolf(2, "align_corners")?,
                half_pixel_centers: boolf(3, "half_pixel_centers")?,
            },
            opt::RESIZE_NEAREST_NEIGHBOR => BuiltinOptions::ResizeNearestNeighbor {
                align_corners: boolf(0, "align_corners")?,
                half_pixel_centers: boolf(1, "half_pixel_centers")?,
            },
            opt::RESHAPE => BuiltinOptions::Reshape {
                new_shape: i32v(0, "new_shape")?,
            },
            opt::REDUCER => BuiltinOptions::Reducer {
                keep_dims: boolf(0, "keep_dims")?,
            },
            opt::SQUEEZE => BuiltinOptions::Squeeze {
                squeeze_dims: i32v(0, "squeeze_dims")?.unwrap_or_default(),
            },
            opt::STRIDED_SLICE => BuiltinOptions::StridedSlice {
                begin_mask: i32f(0, 0, "begin_mask")?,
                end_mask: i32f(1, 0, "end_mask")?,
                ellipsis_mask: i32f(2, 0, "ellipsis_mask")?,
                new_axis_mask: i32f(3, 0, "new_axis_mask")?,
                shrink_axis_mask: i32f(4, 0, "shrink_axis_mask")?,
            },
            opt::ARG_MAX => {
                let code = o
                    .scalar::<i8>(0, 0, "output_type")
                    .map_err(self.malformed(ctx()))?;
                BuiltinOptions::ArgMax {
                    output_type: self.tensor_type(code, ctx)?,
                }
            }
            opt::CAST => {
                let a = o
                    .scalar::<i8>(0, -1, "in_data_type")
                    .map_err(self.malformed(ctx()))?;
                let b = o
                    .scalar::<i8>(1, -1, "out_data_type")
                    .map_err(self.malformed(ctx()))?;
                BuiltinOptions::Cast {
                    in_type: TensorType::from_code(a),
                    out_type: TensorType::from_code(b),
                }
            }
            opt::GATHER => BuiltinOptions::Gather {
                axis: i32f(0, 0, "axis")?,
                batch_dims: i32f(1, 0, "batch_dims")?,
            },
            opt::SPACE_TO_DEPTH => BuiltinOptions::SpaceToDepth {
                block_size: i32f(0, 0, "block_size")?,
            },
            opt::DEPTH_TO_SPACE => BuiltinOptions::DepthToSpace {
                block_size: i32f(0, 0, "block_size")?,
            },
            opt::LEAKY_RELU => BuiltinOptions::LeakyRelu {
                alpha: o
                    .scalar::<f32>(0, 0.0, "alpha")
                    .map_err(self.malformed(ctx()))?,
            },
            opt::TRANSPOSE_CONV => BuiltinOptions::TransposeConv {
                padding: self.padding(o, 0, ctx)?,
                stride_w: i32f(1, 0, "stride_w")?,
                stride_h: i32f(2, 0, "stride_h")?,
                activation: self.activation(o, 3, ctx)?,
            },
            opt::PAD
            | opt::PADV2
            | opt::QUANTIZE
            | opt::DEQUANTIZE
            | opt::SPACE_TO_BATCH_ND
            | opt::BATCH_TO_SPACE_ND
            | opt::TRANSPOSE
            | opt::MAXIMUM_MINIMUM
            | opt::EXPAND_DIMS
            | opt::HARD_SWISH => BuiltinOptions::Empty(OPTION_NAMES[usize::from(member)]),
            m => BuiltinOptions::Other {
                member: m,
                name: OPTION_NAMES[usize::from(m)],
            },
        })
    }
}

fn le_vec<T, const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    b.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

impl TfliteModel {
    /// Reads and parses a `.tflite` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TfliteError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(bytes, path)
    }

    /// Parses a model held in memory; `source` names it in error messages.
    ///
    /// The whole structure is validated here: every offset, every tensor's type, shape and buffer
    /// index, every operator's code, tensor indices and options, and every buffer's extent.
    pub fn from_bytes(bytes: Vec<u8>, source: impl AsRef<Path>) -> Result<Self> {
        let path = source.as_ref();
        if bytes.len() < 8 {
            return Err(TfliteError::TooSmall {
                path: path.to_path_buf(),
                len: bytes.len(),
            });
        }
        if &bytes[4..8] != b"TFL3" {
            let found = bytes[4..8]
                .iter()
                .flat_map(|b| std::ascii::escape_default(*b))
                .map(char::from)
                .collect();
            return Err(TfliteError::BadIdentifier {
                path: path.to_path_buf(),
                found,
            });
        }
        let mut model = Parser { buf: &bytes, path }.model()?;
        model.bytes = bytes;
        Ok(model)
    }

    /// The file the model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The main (first) subgraph.
    pub fn main_subgraph(&self) -> &SubGraph {
        // Parsing rejects models without subgraphs.
        &self.subgraphs[0]
    }

    /// Number of buffers.
    pub fn num_buffers(&self) -> usize {
        self.buffers.len()
    }

    /// The raw bytes of a buffer (empty when it holds no data or does not exist).
    pub fn buffer(&self, index: usize) -> &[u8] {
        self.buffers
            .get(index)
            .map(|r| &self.bytes[r.clone()])
            .unwrap_or(&[])
    }

    /// The raw little-endian bytes of a tensor's constant data (empty for activations).
    pub fn tensor_bytes(&self, t: &Tensor) -> &[u8] {
        self.buffer(t.buffer)
    }

    fn data_err(&self, t: &Tensor, detail: String) -> TfliteError {
        TfliteError::Data {
            path: self.path.clone(),
            index: t.index,
            tensor: t.name.clone(),
            detail,
        }
    }

    /// A tensor's constant data decoded by its type, after checking that the buffer size matches
    /// the shape. Errors for tensors without data, sparse tensors and string/resource/variant/
    /// int4/complex types.
    pub fn tensor_data(&self, t: &Tensor) -> Result<TensorData> {
        let b = self.tensor_bytes(t);
        if b.is_empty() && t.num_elements() > 0 {
            return Err(self.data_err(
                t,
                "has no constant data (it is computed at run time)".into(),
            ));
        }
        if t.is_sparse {
            return Err(self.data_err(
                t,
                "is stored sparse; sparse tensors are not supported".into(),
            ));
        }
        let elem = t
            .dtype
            .size_in_bytes()
            .filter(|_| !matches!(t.dtype, TensorType::Complex64 | TensorType::Complex128));
        let Some(elem) = elem else {
            return Err(self.data_err(t, format!("data of type {} is not supported", t.dtype)));
        };
        let expected = t.num_elements().checked_mul(elem);
        if expected != Some(b.len()) {
            return Err(self.data_err(
                t,
                format!(
                    "buffer {} holds {} bytes, but {} {:?} needs {:?}",
                    t.buffer,
                    b.len(),
                    t.dtype,
                    t.shape,
                    expected
                ),
            ));
        }
        Ok(match t.dtype {
            TensorType::Float32 => TensorData::F32(le_vec(b, f32::from_le_bytes)),
            TensorType::Float16 => TensorData::F16(le_vec(b, half::f16::from_le_bytes)),
            TensorType::Float64 => TensorData::F64(le_vec(b, f64::from_le_bytes)),
            TensorType::UInt8 => TensorData::U8(b.to_vec()),
            TensorType::Int8 => TensorData::I8(b.iter().map(|&x| x as i8).collect()),
            TensorType::Int16 => TensorData::I16(le_vec(b, i16::from_le_bytes)),
            TensorType::UInt16 => TensorData::U16(le_vec(b, u16::from_le_bytes)),
            TensorType::Int32 => TensorData::I32(le_vec(b, i32::from_le_bytes)),
            TensorType::UInt32 => TensorData::U32(le_vec(b, u32::from_le_bytes)),
            TensorType::Int64 => TensorData::I64(le_vec(b, i64::from_le_bytes)),
            TensorType::UInt64 => TensorData::U64(le_vec(b, u64::from_le_bytes)),
            TensorType::Bool => TensorData::Bool(b.iter().map(|&x| x != 0).collect()),
            other => return Err(self.data_err(t, format!("data of type {other} is not supported"))),
        })
    }

    /// A tensor's constant data as real `f32` values: float data as is (float16/float64
    /// converted); integer data through its quantization, `scale * (q - zero_point)`, per tensor
    /// or per channel along `quantized_dimension`. Integer tensors without quantization
    /// parameters are an error (read them with [`TfliteModel::tensor_data`]).
    pub fn dequantize(&self, t: &Tensor) -> Result<Vec<f32>> {
        let ints: Vec<i64> = match self.tensor_data(t)? {
            TensorData::F32(v) => return Ok(v),
            TensorData::F16(v) => return Ok(v.into_iter().map(|x| x.to_f32()).collect()),
            TensorData::F64(v) => return Ok(v.into_iter().map(|x| x as f32).collect()),
            TensorData::Bool(_) => {
                return Err(self.data_err(t, "bool data has no real-valued meaning".into()))
            }
            TensorData::U8(v) => v.into_iter().map(i64::from).collect(),
            TensorData::I8(v) => v.into_iter().map(i64::from).collect(),
            TensorData::I16(v) => v.into_iter().map(i64::from).collect(),
            TensorData::U16(v) => v.into_iter().map(i64::from).collect(),
            TensorData::I32(v) => v.into_iter().map(i64::from).collect(),
            TensorData::U32(v) => v.into_iter().map(i64::from).collect(),
            TensorData::I64(v) => v,
            TensorData::U64(v) => v.into_iter().map(|x| x as i64).collect(),
        };
        let q = match &t.quantization {
            Some(q) if !q.scale.is_empty() => q,
            _ => {
                return Err(self.data_err(
                    t,
                    format!(
                        "is {} without quantization scale; read it with tensor_data",
                        t.dtype
                    ),
                ))
            }
        };
        if q.has_custom_details {
            return Err(self.data_err(
                t,
                "uses custom quantization details, which are not supported".into(),
            ));
        }
        let nch = q.scale.len();
        if !(q.zero_point.is_empty() || q.zero_point.len() == nch) {
            return Err(self.data_err(
                t,
                format!("has {} scales but {} zero points", nch, q.zero_point.len()),
            ));
        }
        let zp = |c: usize| q.zero_point.get(c).copied().unwrap_or(0);
        if nch == 1 {
            let (s, z) = (q.scale[0], zp(0));
            return Ok(ints.into_iter().map(|x| s * (x - z) as f32).collect());
        }
        let d = q.quantized_dimension;
        if d >= t.shape.len() || t.shape[d] != nch {
            return Err(self.data_err(t, format!("has {nch} per-channel scales along dimension {d}, which does not match shape {:?}", t.shape)));
        }
        let inner: usize = t.shape[d + 1..].iter().product();
        Ok(ints
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                let c = (i / inner) % nch;
                q.scale[c] * (x - zp(c)) as f32
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::flatbuf::builder::{Builder, F};

    fn i32s(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// (name, shape, type code, buffer, quantization (scales, zero points, dimension)).
    pub(crate) type TensorSpec = (
        &'static str,
        Vec<i32>,
        i8,
        u32,
        Option<(Vec<f32>, Vec<i64>, i32)>,
    );
    /// (opcode index, inputs, outputs, options member, options fields).
    pub(crate) type OpSpec = (u32, Vec<i32>, Vec<i32>, u8, Vec<F>);

    /// Spec of a synthetic one-subgraph model.
    pub(crate) struct Spec {
        pub tensors: Vec<TensorSpec>,
        pub buffers: Vec<Vec<u8>>,
        pub ops: Vec<OpSpec>,
        pub opcodes: Vec<(i8, i32)>,
        /// Store buffer data after the flatbuffer (`Buffer.offset/size`, as >2 GB models do).
        pub external: bool,
    }

    /// Builds a TFLite flatbuffer (children written after parents, offsets patched forward).
    pub(crate) fn build(spec: Spec) -> Vec<u8> {
        let mut b = Builder::new(b"TFL3");
        let (root, rf) = b.table(&[
            F::Inline(3u32.to_le_bytes().to_vec()),
            F::Ref(0),
            F::Ref(0),
            F::None,
            F::Ref(0),
        ]);
        // operator_codes
        let (ocv, oslots) = b.table_vector(spec.opcodes.len());
        b.patch(rf[0].0, ocv);
        for (slot, (dep, code)) in oslots.iter().zip(&spec.opcodes) {
            let (t, _) = b.table(&[
                F::Inline(vec![*dep as u8]),
                F::None,
                F::Inline(1i32.to_le_bytes().to_vec()),
                F::Inline(code.to_le_bytes().to_vec()),
            ]);
            b.patch(*slot, t);
        }
        // subgraphs
        let (sgv, sslots) = b.table_vector(1);
        b.patch(rf[1].0, sgv);
        let (sg, sf) = b.table(&[F::Ref(0), F::Ref(0), F::Ref(0), F::Ref(0), F::Ref(0)]);
        b.patch(sslots[0], sg);
        let (tv, tslots) = b.table_vector(spec.tensors.len());
        b.patch(sf[0].0, tv);
        for (slot, (name, shape, ty, buf, q)) in tslots.iter().zip(&spec.tensors) {
            let fields = vec![
                F::Ref(0),
                F::Inline(vec![*ty as u8]),
                F::Inline(buf.to_le_bytes().to_vec()),
                F::Ref(0),
                if q.is_some() { F::Ref(0) } else { F::None },
            ];
            let (t, tf) = b.table(&fields);
            b.patch(*slot, t);
            let sv = b.vector(shape.len(), &i32s(shape));
            b.patch(tf[0].0, sv);
            let nv = b.string(name);
            b.patch(tf[1].0, nv);
            if let Some((scale, zp, qd)) = q {
                let (qt, qf) = b.table(&[
                    F::None,
                    F::None,
                    F::Ref(0),
                    F::Ref(0),
                    F::None,
                    F::None,
                    F::Inline(qd.to_le_bytes().to_vec()),
                ]);
                b.patch(tf[2].0, qt);
                let s: Vec<u8> = scale.iter().flat_map(|x| x.to_le_bytes()).collect();
                let sv = b.vector(scale.len(), &s);
                b.patch(qf[0].0, sv);
                let z: Vec<u8> = zp.iter().flat_map(|x| x.to_le_bytes()).collect();
                // i64 elements: align the element start to 8.
                let aligned = (b.buf.len() + 4).next_multiple_of(8) - 4;
                b.buf.resize(aligned, 0);
                let zv = b.vector(zp.len(), &z);
                b.patch(qf[1].0, zv);
            }
        }
        let iv = b.vector(1, &i32s(&[0]));
        b.patch(sf[1].0, iv);
        let ov = b.vector(1, &i32s(&[spec.tensors.len() as i32 - 1]));
        b.patch(sf[2].0, ov);
        let (opv, opslots) = b.table_vector(spec.ops.len());
        b.patch(sf[3].0, opv);
        for (slot, (opcode, ins, outs, member, opts)) in opslots.iter().zip(spec.ops) {
            let fields = vec![
                F::Inline(opcode.to_le_bytes().to_vec()),
                F::Ref(0),
                F::Ref(0),
                F::Inline(vec![member]),
                if member != 0 { F::Ref(0) } else { F::None },
            ];
            let (t, of) = b.table(&fields);
            b.patch(*slot, t);
            let iv = b.vector(ins.len(), &i32s(&ins));
            b.patch(of[0].0, iv);
            let ov = b.vector(outs.len(), &i32s(&outs));
            b.patch(of[1].0, ov);
            if member != 0 {
                let (ot, _) = b.table(&opts);
                b.patch(of[2].0, ot);
            }
        }
        let nm = b.string("main");
        b.patch(sf[4].0, nm);
        // buffers
        let (bv, bslots) = b.table_vector(spec.buffers.len());
        b.patch(rf[2].0, bv);
        let mut external = Vec::new();
        for (slot, data) in bslots.iter().zip(&spec.buffers) {
            if spec.external && !data.is_empty() {
                // data: absent; offset and size: u64 fields at body offsets 8 and 16.
                let z = 0u64.to_le_bytes().to_vec();
                let (t, _) = b.table(&[F::None, F::Inline(z.clone()), F::Inline(z)]);
                b.patch(*slot, t);
                external.push((t, data.clone()));
                continue;
            }
            let (t, bf) = b.table(&[if data.is_empty() { F::None } else { F::Ref(0) }]);
            b.patch(*slot, t);
            if !data.is_empty() {
                let dv = b.vector(data.len(), data);
                b.patch(bf[0].0, dv);
            }
        }
        let mut out = b.finish(root);
        for (t, data) in external {
            let at = out.len().next_multiple_of(16);
            out.resize(at, 0);
            out[t + 8..t + 16].copy_from_slice(&(at as u64).to_le_bytes());
            out[t + 16..t + 24].copy_from_slice(&(data.len() as u64).to_le_bytes());
            out.extend_from_slice(&data);
        }
        out
    }

    /// input [1,4,4,2] f32 -> CONV_2D(weights u8 per-channel [3,1,1,2], bias i32) -> output.
    pub(crate) fn small_spec() -> Spec {
        let w: Vec<u8> = vec![0, 1, 2, 3, 4, 5];
        let bias: Vec<u8> = i32s(&[10, -20, 30]);
        Spec {
            tensors: vec![
                ("input", vec![1, 4, 4, 2], 0, 0, None),
                (
                    "conv/weights",
                    vec![3, 1, 1, 2],
                    3,
                    1,
                    Some((vec![0.5, 1.0, 2.0], vec![1, 2, 3], 0)),
                ),
                ("conv/bias", vec![3], 2, 2, Some((vec![0.25], vec![0], 0))),
                ("output", vec![1, 4, 4, 3], 0, 0, None),
            ],
            buffers: vec![vec![], w, bias],
            ops: vec![(
                0,
                vec![0, 1, 2],
                vec![3],
                opt::CONV_2D,
                vec![
                    F::Inline(vec![1]),
                    F::Inline(2i32.to_le_bytes().to_vec()),
                    F::Inline(2i32.to_le_bytes().to_vec()),
                    F::Inline(vec![3]),
                    F::None,
                    F::Inline(4i32.to_le_bytes().to_vec()),
                ],
            )],
            opcodes: vec![(3, 0)],
            external: false,
        }
    }

    #[test]
    fn enum_tables_match_schema_numbers() {
        // Spot checks against the numbers in schema_generated.h.
        assert_eq!(OPTION_NAMES[usize::from(opt::QUANTIZE)], "QuantizeOptions");
        assert_eq!(OPTION_NAMES[usize::from(opt::ARG_MAX)], "ArgMaxOptions");
        assert_eq!(
            OPTION_NAMES[usize::from(opt::RESIZE_BILINEAR)],
            "ResizeBilinearOptions"
        );
        assert_eq!(
            OPTION_NAMES[usize::from(opt::RESIZE_NEAREST_NEIGHBOR)],
            "ResizeNearestNeighborOptions"
        );
        assert_eq!(
            OPTION_NAMES[usize::from(opt::DEQUANTIZE)],
            "DequantizeOptions"
        );
        assert_eq!(OPTION_NAMES[usize::from(opt::RESHAPE)], "ReshapeOptions");
        assert_eq!(
            OPTION_NAMES[usize::from(opt::HARD_SWISH)],
            "HardSwishOptions"
        );
        assert_eq!(
            OPTION_NAMES[usize::from(opt::DEPTH_TO_SPACE)],
            "DepthToSpaceOptions"
        );
        assert_eq!(
            OPTION_NAMES[usize::from(opt::TRANSPOSE_CONV)],
            "TransposeConvOptions"
        );
        assert_eq!(OPTION_NAMES[usize::from(opt::PADV2)], "PadV2Options");
        assert_eq!(OPTION_NAMES[98], "SelectV2Options");
        assert_eq!(OPTION_NAMES[123], "SignOptions");
        for (c, n) in [
            (0, "ADD"),
            (22, "RESHAPE"),
            (56, "ARG_MAX"),
            (97, "RESIZE_NEAREST_NEIGHBOR"),
            (114, "QUANTIZE"),
            (127, "PLACEHOLDER_FOR_GREATER_OP_CODES"),
            (150, "GELU"),
            (205, "REDUCE_WINDOW"),
        ] {
            assert_eq!(BuiltinOp(c).name(), Some(n));
        }
        for (op, name) in [
            (BuiltinOp::CONV_2D, "CONV_2D"),
            (BuiltinOp::DEPTHWISE_CONV_2D, "DEPTHWISE_CONV_2D"),
            (BuiltinOp::AVERAGE_POOL_2D, "AVERAGE_POOL_2D"),
            (BuiltinOp::RESIZE_BILINEAR, "RESIZE_BILINEAR"),
            (BuiltinOp::CONCATENATION, "CONCATENATION"),
            (BuiltinOp::ARG_MAX, "ARG_MAX"),
            (BuiltinOp::DEQUANTIZE, "DEQUANTIZE"),
            (BuiltinOp::QUANTIZE, "QUANTIZE"),
            (BuiltinOp::MEAN, "MEAN"),
            (BuiltinOp::PAD, "PAD"),
            (BuiltinOp::SPACE_TO_BATCH_ND, "SPACE_TO_BATCH_ND"),
            (BuiltinOp::BATCH_TO_SPACE_ND, "BATCH_TO_SPACE_ND"),
            (BuiltinOp::REDUCE_MIN, "REDUCE_MIN"),
            (BuiltinOp::REDUCE_ANY, "REDUCE_ANY"),
            (BuiltinOp::HARD_SWISH, "HARD_SWISH"),
            (BuiltinOp::LEAKY_RELU, "LEAKY_RELU"),
        ] {
            assert_eq!(op.name(), Some(name));
        }
        assert_eq!(BuiltinOp(206).name(), None);
        assert_eq!(BuiltinOp(-1).name(), None);
        for c in 0..18 {
            assert_eq!(TensorType::from_code(c).map(|t| t.code()), Some(c));
        }
        assert_eq!(TensorType::from_code(18), None);
    }

    #[test]
    fn synthetic_model_parses_and_dequantizes() {
        let bytes = build(small_spec());
        let m = TfliteModel::from_bytes(bytes, "small.tflite").unwrap();
        let g = m.main_subgraph();
        assert_eq!(g.tensors.len(), 4);
        assert_eq!(g.inputs, vec![0]);
        assert_eq!(g.outputs, vec![3]);
        let op = &g.operators[0];
        assert_eq!(op.op, BuiltinOp::CONV_2D);
        assert_eq!(
            op.options,
            BuiltinOptions::Conv2D(Conv2DOptions {
                padding: Padding::Valid,
                stride_w: 2,
                stride_h: 2,
                activation: Activation::Relu6,
                dilation_w: 1, // absent -> schema default 1
                dilation_h: 4,
            })
        );
        let w = &g.tensors[1];
        assert_eq!(
            m.tensor_data(w).unwrap(),
            TensorData::U8(vec![0, 1, 2, 3, 4, 5])
        );
        // Per channel along dim 0: channel c uses scale[c], zero_point[c].
        assert_eq!(
            m.dequantize(w).unwrap(),
            vec![-0.5, 0.0, 0.0, 1.0, 2.0, 4.0]
        );
        assert_eq!(m.dequantize(&g.tensors[2]).unwrap(), vec![2.5, -5.0, 7.5]);
        let err = m.dequantize(&g.tensors[0]).unwrap_err().to_string();
        assert!(
            err.contains("'input'") && err.contains("no constant data"),
            "{err}"
        );
        assert!(g
            .describe_operator(op)
            .contains("CONV_2D [padding=VALID stride=2x2 dilation=4x1 act=RELU6]"));
    }

    #[test]
    fn buffers_stored_after_the_flatbuffer() {
        let mut s = small_spec();
        s.external = true;
        let bytes = build(s);
        let m = TfliteModel::from_bytes(bytes.clone(), "big.tflite").unwrap();
        let g = m.main_subgraph();
        assert_eq!(
            m.tensor_data(&g.tensors[1]).unwrap(),
            TensorData::U8(vec![0, 1, 2, 3, 4, 5])
        );
        assert_eq!(m.dequantize(&g.tensors[2]).unwrap(), vec![2.5, -5.0, 7.5]);
        // Cutting the trailing data is an error naming the buffer.
        let err = TfliteModel::from_bytes(bytes[..bytes.len() - 3].to_vec(), "big.tflite")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("buffer 2") && err.contains("past the end"),
            "{err}"
        );
    }

    #[test]
    fn per_channel_on_last_dimension() {
        let mut s = small_spec();
        s.tensors[1] = (
            "conv/weights",
            vec![1, 1, 3, 2],
            3,
            1,
            Some((vec![1.0, 10.0], vec![0, 1], 3)),
        );
        let m = TfliteModel::from_bytes(build(s), "x.tflite").unwrap();
        let w = &m.main_subgraph().tensors[1];
        assert_eq!(
            m.dequantize(w).unwrap(),
            vec![0.0, 0.0, 2.0, 20.0, 4.0, 40.0]
        );
        // Scale count that does not match the quantized dimension is an error naming the tensor.
        let mut s = small_spec();
        s.tensors[1] = (
            "conv/weights",
            vec![3, 1, 1, 2],
            3,
            1,
            Some((vec![1.0, 10.0], vec![0, 1], 0)),
        );
        let m = TfliteModel::from_bytes(build(s), "x.tflite").unwrap();
        let err = m
            .dequantize(&m.main_subgraph().tensors[1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv/weights") && err.contains("per-channel"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_op_or_tensor() {
        let mut s = small_spec();
        s.opcodes = vec![(3, 250)];
        let err = TfliteModel::from_bytes(build(s), "u.tflite").unwrap_err();
        assert!(
            matches!(err, TfliteError::UnknownOp { code: 250, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("operator 0"), "{err}");

        let mut s = small_spec();
        s.tensors[2].2 = 42;
        let err = TfliteModel::from_bytes(build(s), "u.tflite").unwrap_err();
        assert!(
            matches!(err, TfliteError::UnsupportedTensorType { code: 42, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("conv/bias"), "{err}");

        let mut s = small_spec();
        s.ops[0].1 = vec![0, 1, 9];
        let err = TfliteModel::from_bytes(build(s), "u.tflite")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("operator 0 (CONV_2D)") && err.contains("tensor 9"),
            "{err}"
        );

        let mut s = small_spec();
        s.ops[0].3 = opt::POOL_2D;
        let err = TfliteModel::from_bytes(build(s), "u.tflite")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Pool2DOptions") && err.contains("CONV_2D takes Conv2DOptions"),
            "{err}"
        );

        let mut s = small_spec();
        s.tensors[1].3 = 7;
        let err = TfliteModel::from_bytes(build(s), "u.tflite")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv/weights") && err.contains("buffer 7"),
            "{err}"
        );

        let mut s = small_spec();
        s.buffers[1] = vec![1, 2, 3];
        let m = TfliteModel::from_bytes(build(s), "u.tflite").unwrap();
        let err = m
            .tensor_data(&m.main_subgraph().tensors[1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv/weights") && err.contains("holds 3 bytes"),
            "{err}"
        );
    }

    #[test]
    fn deprecated_code_and_extended_code_resolve_to_max() {
        // (deprecated_builtin_code, builtin_code) -> resolved op: old files leave builtin_code 0,
        // new ops put the placeholder 127 in the byte and the real code in builtin_code.
        for ((dep, code), want) in [
            ((3, 0), BuiltinOp::CONV_2D),
            ((3, 3), BuiltinOp::CONV_2D),
            ((127, 150), BuiltinOp(150)),
        ] {
            let mut s = small_spec();
            s.opcodes = vec![(dep, code)];
            if want != BuiltinOp::CONV_2D {
                s.ops[0].3 = 0;
            }
            let m = TfliteModel::from_bytes(build(s), "x.tflite").unwrap();
            assert_eq!(m.operator_codes[0].builtin, want);
            assert_eq!(m.main_subgraph().operators[0].op, want);
        }
    }

    #[test]
    fn truncation_and_bit_flips_never_panic() {
        let bytes = build(small_spec());
        for cut in 0..bytes.len() {
            let r = TfliteModel::from_bytes(bytes[..cut].to_vec(), "t.tflite");
            if let Ok(m) = r {
                // A cut that leaves a parseable model must still give consistent accessors.
                for t in &m.main_subgraph().tensors {
                    let _ = m.tensor_data(t);
                    let _ = m.dequantize(t);
                }
            }
        }
        let mut seed = 99u64;
        for _ in 0..5000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut c = bytes.clone();
            let at = (seed >> 33) as usize % c.len();
            c[at] = (seed >> 17) as u8;
            if let Ok(m) = TfliteModel::from_bytes(c, "f.tflite") {
                for g in &m.subgraphs {
                    for t in &g.tensors {
                        let _ = m.dequantize(t);
                    }
                    for op in &g.operators {
                        let _ = g.describe_operator(op);
                    }
                }
            }
        }
    }

    #[test]
    fn identifier_and_size_errors() {
        let mut bytes = build(small_spec());
        bytes[4..8].copy_from_slice(b"TFL2");
        let err = TfliteModel::from_bytes(bytes, "w.tflite").unwrap_err();
        assert!(matches!(err, TfliteError::BadIdentifier { .. }));
        assert!(
            err.to_string().contains("w.tflite") && err.to_string().contains("TFL2"),
            "{err}"
        );
        assert!(matches!(
            TfliteModel::from_bytes(vec![1, 2, 3], "s.tflite"),
            Err(TfliteError::TooSmall { len: 3, .. })
        ));
    }
}
