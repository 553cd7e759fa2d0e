//! Kernels and layers for DeepLab on candle: atrous depthwise and separable convolution,
//! bilinear resize, BatchNorm, cross-entropy with an ignore label and padded max-pooling,
//! each forward and backward.
//!
//! Every op is one public function over a private candle custom op with a multi-threaded,
//! vectorized CPU kernel (CUDA kernels behind the `cuda` feature). The [`reference`](mod@reference) module
//! computes the same things with plain candle ops and is the oracle the tests compare against,
//! for values and gradients.
//!
//! ```
//! use candle_core::{DType, Device, Module, ModuleT, Tensor};
//! use candle_nn::VarBuilder;
//! use deeplab_ops::{
//!     BatchNormConfig, Conv2dGeometry, SeparableActivation, SeparableConv2d, SeparableConv2dConfig,
//! };
//! let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
//! let cfg = SeparableConv2dConfig {
//!     kernel: 3,
//!     geom: Conv2dGeometry::same(3, 6), // atrous rate 6
//!     act: SeparableActivation::AfterEach(deeplab_ops::Activation::Relu),
//!     bn: BatchNormConfig::tf_head(),
//! };
//! let conv = SeparableConv2d::new(32, 64, &cfg, vb)?;
//! let x = Tensor::zeros((1, 32, 33, 33), DType::F32, &Device::Cpu)?;
//! assert_eq!(conv.forward_t(&x, false)?.dims(), &[1, 64, 33, 33]);
//! # Ok::<(), candle_core::Error>(())
//! ```
#![deny(missing_docs)]

#[macro_use]
mod cpu;
mod batch_norm;
mod conv;
mod conv_bn;
#[cfg(feature = "cuda")]
mod cuda;
mod depthwise;
mod geometry;
mod im2col;
pub mod kernel_abi;
mod layers;
mod loss;
mod macs;
mod pointwise;
mod pool;
pub mod profile;
pub mod reference;
mod resize;
mod separable;
pub mod sgemm;
mod winograd;

pub use batch_norm::{
    batch_norm_train, batch_norm_train_act, channel_affine, Activation, BatchNorm2d,
    BatchNormConfig, Epilogue,
};
pub use conv::conv2d;
pub use conv_bn::TrainConv;
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_fused};
pub use geometry::{scale_dimension, Conv2dGeometry, Padding2d};
pub use im2col::{col2im, im2col};
pub use layers::{
    conv_bn, conv_bn_add, Conv2d, ConvBnAct, DepthwiseConv2d, FoldBatchNorm, SeparableActivation,
    SeparableConv2d, SeparableConv2dConfig,
};
pub use loss::cross_entropy;
pub use macs::MacCounter;
pub use pointwise::ConcatInput;
pub use pool::max_pool2d;
pub use resize::{resize_bilinear, ResizeMode};
pub use separable::{separable_epilogue, DepthwisePart};
