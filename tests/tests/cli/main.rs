//! End-to-end tests of the `deeplab` binary: eval, predict, train (resume, kill safety, NaN
//! stop), the bundled sample, and one-line errors on bad input.

mod common;
mod errors;
mod eval_predict;
mod sample;
mod tflite;
mod training;
