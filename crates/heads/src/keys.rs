//! A `VarBuilder` backend that records the name and shape of every tensor a model asks for and
//! hands back zeros without allocating them: the key contract of a configuration, its
//! parameter count and its multiply-adds, all without weights.

use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use std::sync::{Arc, Mutex};

/// One requested tensor: canonical name and shape.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TensorKey {
    /// Canonical (safetensors) name, e.g. `aspp.project.conv.weight`.
    pub name: String,
    /// Shape, PyTorch layout.
    pub shape: Vec<usize>,
}

impl TensorKey {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `true` for BatchNorm running statistics (buffers, not trained by the optimizer).
    pub fn is_buffer(&self) -> bool {
        self.name.ends_with(".running_mean") || self.name.ends_with(".running_var")
    }
}

/// Records requested tensors; see [`KeyRecorder::var_builder`].
#[derive(Clone, Debug, Default)]
pub struct KeyRecorder {
    keys: Arc<Mutex<Vec<TensorKey>>>,
}

struct RecorderBackend {
    keys: Arc<Mutex<Vec<TensorKey>>>,
}

impl candle_nn::var_builder::SimpleBackend for RecorderBackend {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let Ok(mut keys) = self.keys.lock() else {
            bail!("key recorder: lock poisoned")
        };
        if keys.iter().any(|k| k.name == name) {
            // A second request must agree on the shape (VarMap semantics).
            if let Some(k) = keys.iter().find(|k| k.name == name && k.shape != s.dims()) {
                bail!(
                    "tensor '{name}' requested with shapes {:?} and {:?}",
                    k.shape,
                    s.dims()
                )
            }
        } else {
            keys.push(TensorKey {
                name: name.to_string(),
                shape: s.dims().to_vec(),
            });
        }
        // A broadcast scalar: zero bytes per element, enough to build layers and count them.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        bail!("key recorder: tensor '{name}' requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        // Behaves like `VarBuilder::zeros`: every tensor exists.
        true
    }
}

impl KeyRecorder {
    /// A new, empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A `VarBuilder` (f32, CPU) whose requests are recorded here.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(RecorderBackend {
            keys: self.keys.clone(),
        });
        VarBuilder::from_backend(backend, DType::F32, Device::Cpu)
    }

    /// Everything requested so far, in request order.
    pub fn keys(&self) -> Vec<TensorKey> {
        match self.keys.lock() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;
    use deeplab_ops::{Conv2d, Conv2dGeometry};

    #[test]
    fn records_names_and_shapes() -> Result<()> {
        let rec = KeyRecorder::new();
        let vb = rec.var_builder();
        let conv = Conv2d::new(3, 4, 3, Conv2dGeometry::same(3, 1), true, vb.pp("c"))?;
        let y = conv.forward(&Tensor::ones((1, 3, 5, 5), DType::F32, &Device::Cpu)?)?;
        assert_eq!(y.dims(), &[1, 4, 5, 5]);
        let keys = rec.keys();
        assert_eq!(
            keys[0],
            TensorKey {
                name: "c.weight".into(),
                shape: vec![4, 3, 3, 3]
            }
        );
        assert_eq!(
            keys[1],
            TensorKey {
                name: "c.bias".into(),
                shape: vec![4]
            }
        );
        Ok(())
    }
}
