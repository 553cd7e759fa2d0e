//! Stochastic gradient descent with momentum and L2 weight decay, as DeepLab trains
//! (official `research/deeplab/train.py`: `tf.train.MomentumOptimizer(lr, 0.9)` on the total
//! loss, which includes `weight_decay * sum(w^2) / 2` for every regularized convolution weight).
//!
//! One update of a parameter `w` with gradient `g`, momentum buffer `v` (zero before the first
//! step) and learning rate `lr`:
//!
//! ```text
//! g' = g + weight_decay * w        (only for weights that are decayed)
//! v  = momentum * v + g'
//! w  = w - lr * v
//! ```
//!
//! This is TensorFlow's `MomentumOptimizer` and PyTorch's `SGD(momentum, dampening=0)`.
//! Weight decay reaches convolution weights only: never BatchNorm scales, shifts or running
//! statistics (these are not parameters here at all) and never biases. Like the official code
//! (slim's `regularize_depthwise=False` in the Xception and MobileNetV2 scopes and DeepLab's
//! `split_separable_conv2d`), depthwise kernels are not decayed unless asked.

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use deeplab_backbones::BackboneConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Momentum and weight-decay settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Momentum (0.9 in the papers).
    pub momentum: f64,
    /// L2 weight decay on convolution weights (gradient `weight_decay * w`).
    pub weight_decay: f64,
    /// Also decay depthwise kernels (`[C, 1, k, k]`); the official code does not.
    pub decay_depthwise: bool,
}

impl SgdConfig {
    /// The paper's settings for a backbone: momentum 0.9 and weight decay 4e-5 for Xception
    /// and MobileNetV2, 1e-4 for ResNet.
    pub fn paper(backbone: &BackboneConfig) -> Self {
        Self {
            momentum: 0.9,
            weight_decay: paper_weight_decay(backbone),
            decay_depthwise: false,
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(format!("--momentum {} must be in [0, 1)", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!(
                "--weight-decay {} must be a non-negative number",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// The paper's weight decay for a backbone family: 4e-5 (Xception, MobileNetV2) or 1e-4
/// (ResNet).
pub fn paper_weight_decay(backbone: &BackboneConfig) -> f64 {
    match backbone {
        BackboneConfig::ResNet(_) => 1e-4,
        BackboneConfig::Xception(_) | BackboneConfig::MobileNetV2(_) => 4e-5,
    }
}

/// Whether a tensor is a convolution weight that gets weight decay: rank 4 and, unless
/// `decay_depthwise`, not a depthwise kernel `[C, 1, k, k]` with `k > 1`.
pub fn is_decayed(name: &str, shape: &[usize], decay_depthwise: bool) -> bool {
    if shape.len() != 4 || !name.ends_with("weight") {
        return false;
    }
    let depthwise = shape[1] == 1 && (shape[2] > 1 || shape[3] > 1);
    decay_depthwise || !depthwise
}

/// A parameter the optimizer updates.
#[derive(Clone, Debug)]
pub struct Param {
    /// Canonical tensor name.
    pub name: String,
    /// The variable (shared with the model).
    pub var: Var,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// SGD with momentum over a fixed, name-ordered set of parameters.
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    params: Vec<Param>,
    momentum: BTreeMap<String, Tensor>,
}

impl Sgd {
    /// An optimizer over `params` (name, variable); the update order is the name order, so
    /// runs are reproducible whatever order the caller used.
    pub fn new(params: Vec<(String, Var)>, config: SgdConfig) -> std::result::Result<Self, String> {
        config.validate()?;
        let mut params: Vec<Param> = params
            .into_iter()
            .map(|(name, var)| {
                let decay = is_decayed(&name, var.dims(), config.decay_depthwise);
                Param { name, var, decay }
            })
            .collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = params.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(format!("parameter '{}' given twice", w[0].name));
        }
        Ok(Self {
            config,
            params,
            momentum: BTreeMap::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// The parameters, in update order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Applies one update with learning rate `lr`. Parameters without a gradient (not reached
    /// by the loss) are left alone and keep their momentum.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let m = self.config.momentum;
        let wd = self.config.weight_decay;
        for p in &self.params {
            let w = p.var.as_tensor();
            let Some(g) = grads.get(w) else { continue };
            // Detached: a buffer must not keep this step's autograd graph (nor, through the
            // previous buffer, every earlier one) alive.
            let g = g.detach().to_dtype(DType::F32)?;
            let g = if p.decay && wd > 0.0 {
                (g + w.to_dtype(DType::F32)?.affine(wd, 0.0)?)?
            } else {
                g
            };
            let v = match self.momentum.get(&p.name) {
                Some(prev) if m > 0.0 => (prev.affine(m, 0.0)? + g)?,
                _ => g,
            };
            let v = v.detach();
            let updated = (w.detach().to_dtype(DType::F32)? - v.affine(lr, 0.0)?)?;
            p.var.set(&updated.to_dtype(w.dtype())?)?;
            self.momentum.insert(p.name.clone(), v);
        }
        Ok(())
    }

    /// The momentum buffers by parameter name (absent before a parameter's first update).
    pub fn momentum_buffers(&self) -> &BTreeMap<String, Tensor> {
        &self.momentum
    }

    /// Restores a momentum buffer (from a checkpoint); fails for an unknown parameter or a
    /// shape that differs from the parameter's.
    pub fn set_momentum_buffer(
        &mut self,
        name: &str,
        buffer: Tensor,
    ) -> std::result::Result<(), String> {
        let p = self
            .params
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("momentum buffer for unknown parameter '{name}'"))?;
        if p.var.dims() != buffer.dims() {
            return Err(format!(
                "momentum buffer '{name}' has shape {:?}, the parameter {:?}",
                buffer.dims(),
                p.var.dims()
            ));
        }
        self.momentum.insert(name.to_string(), buffer);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decay_selection() {
        assert!(is_decayed(
            "backbone.conv_stem.weight",
            &[32, 3, 3, 3],
            false
        ));
        assert!(is_decayed("classifier.weight", &[21, 256, 1, 1], false));
        assert!(!is_decayed(
            "backbone.blocks.1.0.conv_dw.weight",
            &[96, 1, 3, 3],
            false
        ));
        assert!(is_decayed(
            "backbone.blocks.1.0.conv_dw.weight",
            &[96, 1, 3, 3],
            true
        ));
        assert!(!is_decayed("aspp.project.bn.weight", &[256], false));
        assert!(!is_decayed("classifier.bias", &[21], false));
        assert!(!is_decayed("aspp.project.bn.running_var", &[256], false));
    }

    #[test]
    fn matches_hand_computed_momentum_updates() -> Result<()> {
        let dev = Device::Cpu;
        // a 1x1 convolution weight [Cout 1, Cin 2, 1, 1]
        let w = Var::from_tensor(&Tensor::new(&[[[[1.0f32]], [[-2.0]]]], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &dev)?)?;
        let cfg = SgdConfig {
            momentum: 0.9,
            weight_decay: 0.1,
            decay_depthwise: false,
        };
        let mut opt = Sgd::new(
            vec![("c.weight".into(), w.clone()), ("c.bias".into(), b.clone())],
            cfg,
        )
        .map_err(candle_core::Error::msg)?;
        // loss = sum(w * [1, 1]) + 3 * b  -> dL/dw = 1, dL/db = 3
        let mut wv = [1.0f32, -2.0];
        let mut bv = 0.5f32;
        let (mut vw, mut vb) = ([0f32; 2], 0f32);
        for step in 0..3 {
            let loss = (w.as_tensor().sum_all()? + b.as_tensor().affine(3.0, 0.0)?.sum_all()?)?;
            let grads = loss.backward()?;
            let lr = 0.1 / (step + 1) as f64;
            opt.step(&grads, lr)?;
            for i in 0..2 {
                let g = 1.0 + 0.1 * wv[i];
                vw[i] = 0.9 * vw[i] + g;
                wv[i] -= lr as f32 * vw[i];
            }
            vb = 0.9 * vb + 3.0;
            bv -= lr as f32 * vb;
        }
        let got = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for i in 0..2 {
            assert!((got[i] - wv[i]).abs() < 1e-6, "{got:?} vs {wv:?}");
        }
        assert!((b.as_tensor().to_vec1::<f32>()?[0] - bv).abs() < 1e-6);
        assert_eq!(opt.momentum_buffers().len(), 2);
        assert!(opt
            .set_momentum_buffer("c.bias", Tensor::zeros(3, DType::F32, &dev)?)
            .is_err());
        assert!(opt
            .set_momentum_buffer("nope", Tensor::zeros(1, DType::F32, &dev)?)
            .is_err());
        Ok(())
    }
}
