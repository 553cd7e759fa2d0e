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

use candle_core::{
    backprop::GradStore, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var,
};
use deeplab_backbones::BackboneConfig;
use rayon::prelude::*;
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
        for p in &self.params {
            let w = p.var.as_tensor();
            let Some(g) = grads.get(w) else { continue };
            let prev = self.momentum.get(&p.name);
            let v = match update_in_place(p, g, prev, &self.config, lr)? {
                Some(v) => v,
                None => update_composed(p, g, prev, &self.config, lr)?,
            };
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
        // A copy: the update writes the buffer in place, which must not reach the caller's
        // tensor (or whatever it shares storage with).
        let buffer = buffer.detach().copy().map_err(|e| e.to_string())?;
        self.momentum.insert(name.to_string(), buffer);
        Ok(())
    }
}

/// One parameter's update with candle ops (any device and dtype): the new weights are set into
/// the variable; returns the new momentum buffer.
fn update_composed(
    p: &Param,
    g: &Tensor,
    prev: Option<&Tensor>,
    config: &SgdConfig,
    lr: f64,
) -> Result<Tensor> {
    let (m, wd) = (config.momentum, config.weight_decay);
    let w = p.var.as_tensor();
    // Detached: a buffer must not keep this step's autograd graph (nor, through the
    // previous buffer, every earlier one) alive.
    let g = g.detach().to_dtype(DType::F32)?;
    let g = if p.decay && wd > 0.0 {
        (g + w.to_dtype(DType::F32)?.affine(wd, 0.0)?)?
    } else {
        g
    };
    let v = match prev {
        Some(prev) if m > 0.0 => (prev.affine(m, 0.0)? + g)?,
        _ => g,
    };
    let v = v.detach();
    let updated = (w.detach().to_dtype(DType::F32)? - v.affine(lr, 0.0)?)?;
    p.var.set(&updated.to_dtype(w.dtype())?)?;
    Ok(v)
}

/// One parameter's update as two in-place passes over contiguous f32 CPU tensors (the
/// momentum buffer, then the weights: no temporaries; the composed update takes seven passes
/// and as many fresh tensors), with the same arithmetic in the same order as
/// [`update_composed`], so the same values. Returns the new momentum buffer, or `None` (nothing
/// changed) when the tensors are not all contiguous f32 CPU tensors.
fn update_in_place(
    p: &Param,
    g: &Tensor,
    prev: Option<&Tensor>,
    config: &SgdConfig,
    lr: f64,
) -> Result<Option<Tensor>> {
    let w = p.var.as_tensor();
    let fits = |t: &Tensor| {
        t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && t.dims() == w.dims()
    };
    if !(fits(w) && fits(g) && prev.is_none_or(fits)) {
        return Ok(None);
    }
    let decay = (p.decay && config.weight_decay > 0.0).then_some(config.weight_decay as f32);
    let (v, momentum) = match prev {
        Some(prev) if config.momentum > 0.0 => (prev.clone(), Some(config.momentum as f32)),
        // The first step (or no momentum): the buffer is the decayed gradient alone.
        _ => (w.zeros_like()?, None),
    };
    v.inplace_op3(&g.detach(), &w.detach(), &MomentumPass { momentum, decay })?;
    w.inplace_op2(&v, &WeightPass { lr: lr as f32 })?;
    Ok(Some(v))
}

/// `v = momentum * v + (g + decay * w)` in place on `v` (`momentum: None` drops the old
/// `v`, `decay: None` the decay term), on `(v, g, w)`.
struct MomentumPass {
    momentum: Option<f32>,
    decay: Option<f32>,
}

/// `w = w - lr * v` in place on `w`, on `(w, v)`.
struct WeightPass {
    lr: f32,
}

/// Values per parallel task of the update passes.
const CHUNK: usize = 1 << 14;

/// The contiguous f32 values of a storage.
fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("sgd update: {what} is not a contiguous f32 tensor"),
    }
}

/// The contiguous f32 values of a storage, writable.
fn values_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("sgd update: {what} is not a contiguous f32 tensor"),
    }
}

impl InplaceOp3 for MomentumPass {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        vs: &mut CpuStorage,
        vl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<()> {
        let (g, w) = (values(gs, gl, "gradient")?, values(ws, wl, "weight")?);
        let v = values_mut(vs, vl, "momentum buffer")?;
        if g.len() != v.len() || w.len() != v.len() {
            candle_core::bail!(
                "sgd update: buffer {:?}, gradient {:?}, weight {:?}",
                vl.dims(),
                gl.dims(),
                wl.dims()
            )
        }
        let (momentum, decay) = (self.momentum, self.decay);
        v.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(w.par_chunks(CHUNK)))
            .for_each(|(v, (g, w))| {
                for ((v, g), w) in v.iter_mut().zip(g).zip(w) {
                    let g = match decay {
                        Some(d) => g + w * d,
                        None => *g,
                    };
                    *v = match momentum {
                        Some(m) => *v * m + g,
                        None => g,
                    };
                }
            });
        Ok(())
    }
}

impl InplaceOp2 for WeightPass {
    fn name(&self) -> &'static str {
        "sgd-weights"
    }

    fn cpu_fwd(
        &self,
        ws: &mut CpuStorage,
        wl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let v = values(vs, vl, "momentum buffer")?;
        let w = values_mut(ws, wl, "weight")?;
        if v.len() != w.len() {
            candle_core::bail!("sgd update: weight {:?}, buffer {:?}", wl.dims(), vl.dims())
        }
        let lr = self.lr;
        w.par_chunks_mut(CHUNK)
            .zip(v.par_chunks(CHUNK))
            .for_each(|(w, v)| {
                for (w, v) in w.iter_mut().zip(v) {
                    *w -= v * lr;
                }
            });
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

    /// The two-pass in-place update against the composed candle-op update, bit for bit, over
    /// three steps: decayed and undecayed parameters, the first step (no buffer yet), and a
    /// momentum of zero.
    #[test]
    fn in_place_update_matches_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let uniform = deeplab_ops::reference::seeded_uniform;
        for momentum in [0.9, 0.0] {
            let cfg = SgdConfig {
                momentum,
                weight_decay: 4e-5,
                decay_depthwise: false,
            };
            for decay in [true, false] {
                let start = uniform(&[700, 100], 1, &dev)?;
                let (a, b) = (Var::from_tensor(&start)?, Var::from_tensor(&start)?);
                let pa = Param {
                    name: "a".into(),
                    var: a.clone(),
                    decay,
                };
                let pb = Param {
                    var: b.clone(),
                    ..pa.clone()
                };
                let (mut va, mut vb): (Option<Tensor>, Option<Tensor>) = (None, None);
                for step in 0..3u32 {
                    let g = uniform(&[700, 100], 7 + step as u64, &dev)?;
                    let lr = 0.01 / (step + 1) as f64;
                    let v = update_in_place(&pa, &g, va.as_ref(), &cfg, lr)?;
                    va = Some(v.expect("contiguous f32 CPU tensors take the in-place update"));
                    vb = Some(update_composed(&pb, &g, vb.as_ref(), &cfg, lr)?);
                    for (x, y, what) in [
                        (a.as_tensor(), b.as_tensor(), "weights"),
                        (va.as_ref().unwrap(), vb.as_ref().unwrap(), "momentum"),
                    ] {
                        let (x, y) = (
                            x.flatten_all()?.to_vec1::<f32>()?,
                            y.flatten_all()?.to_vec1::<f32>()?,
                        );
                        assert!(
                            x == y,
                            "{what}, step {step}, momentum {momentum}, decay {decay}"
                        );
                    }
                }
                // The weights moved.
                let moved = (a.as_tensor() - &start)?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                assert!(moved > 0.0);
            }
        }
        Ok(())
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
