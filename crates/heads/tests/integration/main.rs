//! Integration tests of deeplab-heads: numeric parity with the official TensorFlow DeepLab,
//! checkpoint conversion, weight files, key contracts, shapes and multiply-adds.

mod common;
mod convert;
mod files;
mod keys;
mod macs;
mod parity;
