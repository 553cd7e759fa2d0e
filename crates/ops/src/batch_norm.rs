//! BatchNorm2d: fused training kernel (batch statistics, running-stat update) and the folded
//! per-channel affine used in evaluation, with an optional fused ReLU / ReLU6.
//!
//! Parameter names follow PyTorch (`weight`, `bias`, `running_mean`, `running_var`) so timm and
//! torchvision checkpoints load directly. The running variance is updated with the unbiased
//! batch variance, as PyTorch does.

use crate::cpu::f32_slice;
use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Layout, ModuleT, Result, Shape, Tensor, Var,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Element-wise activation that may be fused after a convolution or normalization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)` (MobileNetV2).
    Relu6,
}

impl Activation {
    /// Applies the activation (differentiable). On the CPU with f32 it is one custom op whose
    /// backward is a single masked pass; candle's own `relu` / `clamp` backwards take four to
    /// eight passes and as many temporaries. Elsewhere it is candle's ops.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::None => Ok(x.clone()),
            _ if x.device().is_cpu() && x.dtype() == DType::F32 => crate::profile::record(
                "activation",
                || format!("{self:?} {}", crate::profile::dims(x)),
                || x.contiguous()?.apply_op1(ActFwd { act: self }),
            ),
            Activation::Relu => x.relu(),
            Activation::Relu6 => x.clamp(0f32, 6f32),
        }
    }

    /// Where the activation passes the gradient, as bounds on its output `y`: where `lo < y`
    /// and not `y >= hi` (a NaN `hi` is no upper bound; ReLU passes `y > 0`, ReLU6
    /// `0 < y < 6`). Two compares with no match
    /// on the activation, so loops that gate by it vectorize.
    #[inline(always)]
    fn pass_bounds(self) -> (f32, f32) {
        match self {
            Activation::None => (f32::NEG_INFINITY, f32::NAN),
            Activation::Relu => (0.0, f32::NAN),
            Activation::Relu6 => (0.0, 6.0),
        }
    }

    /// The activation of one value.
    #[inline(always)]
    pub(crate) fn scalar(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
        }
    }
}

/// Whether the gradient passes an activation at its output `y`, for the activation's
/// [`Activation::pass_bounds`].
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(y >= NaN)` is the intended "no bound"
fn passes(y: f32, (lo, hi): (f32, f32)) -> bool {
    y > lo && !(y >= hi)
}

/// `$body` with `$f` bound to `$act`'s function as a closure: the `match` on the activation
/// sits outside the loops in `$body` (one copy of them per activation), so they vectorize; a
/// `match` on an activation read inside a loop (through a captured reference the stores may
/// alias) kept BatchNorm's normalize pass scalar.
macro_rules! with_activation {
    ($act:expr, |$f:ident| $body:expr) => {
        match $act {
            Activation::None => {
                let $f = |v: f32| v;
                $body
            }
            Activation::Relu => {
                let $f = |v: f32| v.max(0.0);
                $body
            }
            Activation::Relu6 => {
                let $f = |v: f32| v.clamp(0.0, 6.0);
                $body
            }
        }
    };
}

/// Forward of an activation on an f32 CPU tensor (one pass); backward: [`ActBwd`].
struct ActFwd {
    act: Activation,
}

impl candle_core::CustomOp1 for ActFwd {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), xs, xl)?;
        let mut out: Vec<f32> = Vec::with_capacity(x.len());
        let act = self.act;
        out.spare_capacity_mut()
            .par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, x)| {
                with_activation!(act, |f| multiversion!(|| o.iter_mut().zip(x).for_each(
                    |(o, v)| {
                        o.write(f(*v));
                    }
                )))
            });
        // SAFETY: the chunks cover the output; every element was written.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        crate::profile::record(
            "activation (bwd)",
            || crate::profile::dims(res),
            || Ok(Some(activation_grad(self.act, grad, res)?)),
        )
    }
}

/// `grad * passes(y)` for an activation's output `y` (or, for ReLU, equally its input): the
/// activation's backward as one pass over contiguous f32 CPU tensors.
pub(crate) fn activation_grad(act: Activation, grad: &Tensor, y: &Tensor) -> Result<Tensor> {
    match act {
        Activation::None => Ok(grad.clone()),
        act => grad
            .contiguous()?
            .apply_op2_no_bwd(&y.contiguous()?, &ActBwd { act }),
    }
}

/// Gradient of an activation from its output: `grad * passes(y)`, one pass.
struct ActBwd {
    act: Activation,
}

impl candle_core::CustomOp2 for ActBwd {
    fn name(&self) -> &'static str {
        "activation-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(self.name(), gs, gl)?;
        let y = f32_slice(self.name(), ys, yl)?;
        if g.len() != y.len() {
            bail!(
                "activation backward: gradient {:?} vs output {:?}",
                gl.dims(),
                yl.dims()
            )
        }
        let mut out: Vec<f32> = Vec::with_capacity(g.len());
        let act = self.act;
        out.spare_capacity_mut()
            .par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14).zip(y.par_chunks(1 << 14)))
            .for_each(|(o, (g, y))| {
                let bounds = act.pass_bounds();
                multiversion!(
                    || o.iter_mut().zip(g.iter().zip(y)).for_each(|(o, (g, y))| {
                        o.write(if passes(*y, bounds) { *g } else { 0.0 });
                    })
                )
            });
        // SAFETY: the chunks cover the output; every element was written.
        unsafe { out.set_len(g.len()) };
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// Epsilon and momentum of a batch normalization layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance before the square root.
    pub eps: f64,
    /// Weight of the new batch statistic in the running average (PyTorch convention:
    /// `running = (1 - momentum) * running + momentum * batch`).
    pub momentum: f64,
}

impl BatchNormConfig {
    /// The official TF DeepLab Xception / MobileNetV2 setting: epsilon 1e-3, decay 0.9997.
    pub fn tf_backbone() -> Self {
        Self {
            eps: 1e-3,
            momentum: 3e-4,
        }
    }

    /// The official ResNet and ASPP / decoder setting: epsilon 1e-5, decay 0.9997.
    pub fn tf_head() -> Self {
        Self {
            eps: 1e-5,
            momentum: 3e-4,
        }
    }

    /// PyTorch's default: epsilon 1e-5, momentum 0.1.
    pub fn torch() -> Self {
        Self {
            eps: 1e-5,
            momentum: 0.1,
        }
    }

    /// The same config with another epsilon.
    pub fn with_eps(self, eps: f64) -> Self {
        Self { eps, ..self }
    }

    /// The same config with another momentum.
    pub fn with_momentum(self, momentum: f64) -> Self {
        Self { momentum, ..self }
    }
}

#[inline(always)]
fn sum_sq_dev(x: &[f32], mean: f32) -> (f64, f64) {
    let mut s = [0f32; 16];
    let mut q = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for j in 0..16 {
            let d = c[j] - mean;
            s[j] += d;
            q[j] = d.mul_add(d, q[j]);
        }
    }
    let mut ss = 0f64;
    let mut qq = 0f64;
    for v in it.remainder() {
        let d = v - mean;
        ss += d as f64;
        qq += (d * d) as f64;
    }
    ss += s.iter().map(|&v| v as f64).sum::<f64>();
    qq += q.iter().map(|&v| v as f64).sum::<f64>();
    (ss, qq)
}

/// Mean and biased variance of each channel of an NCHW buffer (shifted two-pass, f64 sums).
fn channel_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f32, f32)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let m = (n * hw) as f64;
            // Shift by the first value for stability, then correct.
            let shift = x[ch * hw];
            let (mut s, mut q) = (0f64, 0f64);
            for b in 0..n {
                let p = &x[(b * c + ch) * hw..(b * c + ch + 1) * hw];
                let (ps, pq) = multiversion!(|| sum_sq_dev(p, shift));
                s += ps;
                q += pq;
            }
            let mean_d = s / m;
            let var = (q / m - mean_d * mean_d).max(0.0);
            ((shift as f64 + mean_d) as f32, var as f32)
        })
        .collect()
}

/// Training forward on `(x, weight, bias)`; output `[y (N*C*H*W), mean (C), var (C)]` flat.
struct BnTrainFwd {
    eps: f64,
}

impl CustomOp3 for BnTrainFwd {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = xl.shape().dims4()?.1;
        let (mut out, stats) = bn_train_forward_cpu(
            self.name(),
            (xs, xl),
            (ws, wl),
            (bs, bl),
            (self.eps, Activation::None),
            2 * c,
        )?;
        let total = out.len();
        out.extend(stats.iter().map(|s| s.0));
        out.extend(stats.iter().map(|s| s.1));
        Ok((CpuStorage::F32(out), Shape::from(total + 2 * c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::bn_train_fwd(xs, xl, ws, wl, bs, bl, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, wd) = x.dims4()?;
        let total = n * c * h * wd;
        let dy = grad.narrow(0, 0, total)?.reshape((n, c, h, wd))?;
        bn_train_grads(x, w, &dy, &res.narrow(0, total, 2 * c)?, self.eps)
    }
}

/// The gradients of a training-mode BatchNorm from its input `x`, weight `w`, output gradient
/// `dy` and batch statistics `mean_var` (`[mean (C), var (C)]`): `(dx, dweight, dbias)`.
fn bn_train_grads(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    mean_var: &Tensor,
    eps: f64,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, c, h, wd) = x.dims4()?;
    let total = n * c * h * wd;
    let params = Tensor::cat(&[&w.to_dtype(DType::F32)?, mean_var], 0)?;
    let packed = x.apply_op3_no_bwd(&dy.contiguous()?, &params, &BnTrainBwd { eps })?;
    let dx = packed.narrow(0, 0, total)?.reshape((n, c, h, wd))?;
    let dg = packed.narrow(0, total, c)?;
    let db = packed.narrow(0, total + c, c)?;
    Ok((Some(dx), Some(dg), Some(db)))
}

/// Training forward on the CPU: `(x, weight, bias) -> y = act(bn(x))` with the shape of `x`;
/// the batch statistics are kept in the op (read back by [`batch_norm_train_act`], used by the
/// backward). Unlike the packed output of [`BnTrainFwd`] followed by an activation op, `y`
/// needs no narrow and reshape (whose backward passes would each add a zero-filled copy of the
/// gradient), and the normalized values before the activation are never stored.
pub(crate) struct BnTrainCpu {
    eps: f64,
    act: Activation,
    stats: std::sync::Arc<std::sync::Mutex<ChannelStats>>,
}

impl BnTrainCpu {
    /// The op for `act(bn(x))` with epsilon `eps`, no statistics stored yet.
    pub(crate) fn new(eps: f64, act: Activation) -> Self {
        Self {
            eps,
            act,
            stats: Default::default(),
        }
    }

    /// Where the forward pass stores the batch statistics (read them with
    /// [`stored_mean_var_pair`]).
    pub(crate) fn stats(&self) -> std::sync::Arc<std::sync::Mutex<ChannelStats>> {
        self.stats.clone()
    }
}

/// The batch mean and biased variance a [`BnTrainCpu`] forward stored, as two `[C]` tensors.
pub(crate) fn stored_mean_var_pair(
    stats: &std::sync::Mutex<ChannelStats>,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let mean_var = stored_mean_var(stats, device)?;
    let c = mean_var.dim(0)? / 2;
    Ok((mean_var.narrow(0, 0, c)?, mean_var.narrow(0, c, c)?))
}

/// The batch statistics a [`BnTrainCpu`] forward stored.
fn stored_stats(stats: &std::sync::Mutex<ChannelStats>) -> Result<ChannelStats> {
    match stats.lock() {
        Ok(s) if !s.is_empty() => Ok(s.clone()),
        Ok(_) => bail!("batch_norm: statistics read before the forward pass ran"),
        Err(_) => bail!("batch_norm: statistics lock poisoned"),
    }
}

/// The batch `(mean, var)` a [`BnTrainCpu`] forward stored, as one `[2 * C]` tensor.
fn stored_mean_var(
    stats: &std::sync::Mutex<ChannelStats>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let (mean, var): (Vec<f32>, Vec<f32>) = stored_stats(stats)?.into_iter().unzip();
    let c = mean.len();
    Tensor::from_vec([mean, var].concat(), 2 * c, device)
}

impl CustomOp3 for BnTrainCpu {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, stats) = bn_train_forward_cpu(
            self.name(),
            (xs, xl),
            (ws, wl),
            (bs, bl),
            (self.eps, self.act),
            0,
        )?;
        match self.stats.lock() {
            Ok(mut s) => *s = stats,
            Err(_) => bail!("batch_norm: statistics lock poisoned"),
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::profile::record(
            "batchnorm train (bwd)",
            || crate::profile::dims(x),
            || {
                if self.act == Activation::None {
                    return bn_train_grads(
                        x,
                        w,
                        grad,
                        &stored_mean_var(&self.stats, x.device())?,
                        self.eps,
                    );
                }
                // The activation's mask and the normalization's backward in one op.
                let op = BnActBwd {
                    eps: self.eps,
                    act: self.act,
                    gamma: w.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    stats: stored_stats(&self.stats)?,
                };
                let (n, c, h, wd) = x.dims4()?;
                let total = n * c * h * wd;
                let packed = x.apply_op3_no_bwd(&grad.contiguous()?, &res.contiguous()?, &op)?;
                let dx = packed.narrow(0, 0, total)?.reshape((n, c, h, wd))?;
                let dg = packed.narrow(0, total, c)?;
                let db = packed.narrow(0, total + c, c)?;
                Ok((Some(dx), Some(dg), Some(db)))
            },
        )
    }
}

/// Batch `(mean, biased variance)` per channel.
pub(crate) type ChannelStats = Vec<(f32, f32)>;

/// The CPU training forward of both BatchNorm ops on `(x, gamma, beta)` storages: returns
/// `act(normalized x)` (with capacity for `spare` more values) and the batch `(mean, var)` per
/// channel.
fn bn_train_forward_cpu(
    op: &str,
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    (bs, bl): (&CpuStorage, &Layout),
    (eps, act): (f64, Activation),
    spare: usize,
) -> Result<(Vec<f32>, ChannelStats)> {
    let (n, c, h, w) = xl.shape().dims4()?;
    let hw = h * w;
    let x = f32_slice(op, xs, xl)?;
    let g = f32_slice(op, ws, wl)?;
    let b = f32_slice(op, bs, bl)?;
    if g.len() != c || b.len() != c {
        bail!(
            "{op}: weight {:?} / bias {:?} do not fit input {:?}",
            wl.dims(),
            bl.dims(),
            xl.dims()
        )
    }
    let stats = channel_stats(x, n, c, hw);
    let mut y: Vec<f32> = Vec::with_capacity(n * c * hw + spare);
    normalize(x, y.spare_capacity_mut(), &stats, (g, b), (c, hw), eps, act);
    // SAFETY: `normalize` wrote the first `n * c * hw` elements.
    unsafe { y.set_len(n * c * hw) };
    Ok((y, stats))
}

/// `y = act((x - mean) / sqrt(var + eps) * gamma + beta)` per channel plane, in parallel;
/// writes every element of `y`.
fn normalize(
    x: &[f32],
    y: &mut [std::mem::MaybeUninit<f32>],
    stats: &[(f32, f32)],
    (g, b): (&[f32], &[f32]),
    (c, hw): (usize, usize),
    eps: f64,
    act: Activation,
) {
    y.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(plane, yp)| {
            let ch = plane % c;
            let (m, v) = stats[ch];
            let inv = (1.0 / (v as f64 + eps).sqrt()) as f32;
            let scale = g[ch] * inv;
            let shift = b[ch] - m * scale;
            let xp = &x[plane * hw..(plane + 1) * hw];
            with_activation!(act, |f| multiversion!(|| {
                for (o, v) in yp.iter_mut().zip(xp) {
                    o.write(f(v.mul_add(scale, shift)));
                }
            }))
        });
}

/// Training backward on `(x, dy, [weight, mean, var])`; output `[dx, dweight, dbias]` flat.
struct BnTrainBwd {
    eps: f64,
}

impl CustomOp3 for BnTrainBwd {
    fn name(&self) -> &'static str {
        "batch-norm-train-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let x = f32_slice(self.name(), xs, xl)?;
        let dy = f32_slice(self.name(), gs, gl)?;
        let p = f32_slice(self.name(), ps, pl)?;
        if p.len() != 3 * c || dy.len() != x.len() {
            bail!(
                "batch_norm backward: {} parameters / gradient {:?} for input {:?}",
                p.len(),
                gl.dims(),
                xl.dims()
            )
        }
        let (gamma, mean, var) = (&p[..c], &p[c..2 * c], &p[2 * c..3 * c]);
        let out = bn_bwd_cpu::<false>(
            (x, dy, dy),
            Activation::None,
            (gamma, mean, var),
            (n, c, h * w),
            self.eps,
        );
        let total = n * c * h * w;
        Ok((CpuStorage::F32(out), Shape::from(total + 2 * c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::bn_train_bwd(xs, xl, gs, gl, ps, pl, self.eps)
    }
}

/// The CPU backward of a training-mode BatchNorm, optionally followed by an activation: from
/// the input `x`, the output gradient `dy` and (with `MASK`) the output `y`, whose activation
/// mask gates `dy`, returns `[dx, dgamma, dbeta]` flat. Two passes: per-channel sums of the
/// gated gradient and of its product with the centred input, then `dx`.
fn bn_bwd_cpu<const MASK: bool>(
    (x, dy, y): (&[f32], &[f32], &[f32]),
    act: Activation,
    (gamma, mean, var): (&[f32], &[f32], &[f32]),
    (n, c, hw): (usize, usize, usize),
    eps: f64,
) -> Vec<f32> {
    let m = (n * hw) as f64;
    // The gradient reaching the normalization.
    #[inline(always)]
    fn gate<const MASK: bool>(g: f32, y: f32, bounds: (f32, f32)) -> f32 {
        if !MASK || passes(y, bounds) {
            g
        } else {
            0.0
        }
    }
    let act = act.pass_bounds();
    // Per channel: sum(dz) and sum(dz * xhat).
    let sums: Vec<(f64, f64, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let inv = (1.0 / (var[ch] as f64 + eps).sqrt()) as f32;
            let mu = mean[ch];
            let (mut sd, mut sdx) = (0f64, 0f64);
            for b in 0..n {
                let off = (b * c + ch) * hw;
                let (xp, gp, yp) = (&x[off..off + hw], &dy[off..off + hw], &y[off..off + hw]);
                let (a, bb) = multiversion!(|| {
                    let mut s1 = [0f32; 16];
                    let mut s2 = [0f32; 16];
                    let mut cx = xp.chunks_exact(16);
                    let mut cg = gp.chunks_exact(16);
                    let mut cy = yp.chunks_exact(16);
                    for ((vx, vg), vy) in (&mut cx).zip(&mut cg).zip(&mut cy) {
                        for j in 0..16 {
                            let g = gate::<MASK>(vg[j], vy[j], act);
                            s1[j] += g;
                            s2[j] = g.mul_add(vx[j] - mu, s2[j]);
                        }
                    }
                    let mut a: f64 = s1.iter().map(|&v| v as f64).sum();
                    let mut bb: f64 = s2.iter().map(|&v| v as f64).sum();
                    let rest = cx
                        .remainder()
                        .iter()
                        .zip(cg.remainder())
                        .zip(cy.remainder());
                    for ((vx, vg), vy) in rest {
                        let g = gate::<MASK>(*vg, *vy, act);
                        a += g as f64;
                        bb += (g * (vx - mu)) as f64;
                    }
                    (a, bb)
                });
                sd += a;
                sdx += b_to(bb, inv);
            }
            (sd, sdx, inv)
        })
        .collect();
    let total = n * c * hw;
    let mut out: Vec<f32> = Vec::with_capacity(total + 2 * c);
    let (dx, tail) = out.spare_capacity_mut().split_at_mut(total);
    for (ch, (sd, sdx, _)) in sums.iter().enumerate() {
        tail[ch].write(*sdx as f32);
        tail[c + ch].write(*sd as f32);
    }
    dx.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(plane, dxp)| {
            let ch = plane % c;
            let (sd, sdx, inv) = sums[ch];
            let k = gamma[ch] * inv;
            let mean_dy = (sd / m) as f32;
            let mean_dyx = (sdx / m) as f32;
            let mu = mean[ch];
            let off = plane * hw;
            let (xp, gp, yp) = (&x[off..off + hw], &dy[off..off + hw], &y[off..off + hw]);
            multiversion!(|| {
                for (((o, vx), vg), vy) in dxp.iter_mut().zip(xp).zip(gp).zip(yp) {
                    let xhat = (vx - mu) * inv;
                    o.write(k * (gate::<MASK>(*vg, *vy, act) - mean_dy - xhat * mean_dyx));
                }
            })
        });
    // SAFETY: every element of `dx` (one plane per task) and of the tail was written.
    unsafe { out.set_len(total + 2 * c) };
    out
}

/// The CPU backward of [`BnTrainCpu`] with an activation, on `(x, dy, y)`: the activation's
/// mask (from the output `y`) gates `dy` inside the two passes of the normalization's
/// backward, so no gated copy of the gradient is made. Output `[dx, dgamma, dbeta]` flat.
struct BnActBwd {
    eps: f64,
    act: Activation,
    gamma: Vec<f32>,
    stats: Vec<(f32, f32)>,
}

impl CustomOp3 for BnActBwd {
    fn name(&self) -> &'static str {
        "batch-norm-act-train-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let x = f32_slice(self.name(), xs, xl)?;
        let dy = f32_slice(self.name(), gs, gl)?;
        let y = f32_slice(self.name(), ys, yl)?;
        if dy.len() != x.len()
            || y.len() != x.len()
            || self.gamma.len() != c
            || self.stats.len() != c
        {
            bail!(
                "batch_norm backward: gradient {:?} / output {:?} / {} parameters for input {:?}",
                gl.dims(),
                yl.dims(),
                self.gamma.len(),
                xl.dims()
            )
        }
        let (mean, var): (Vec<f32>, Vec<f32>) = self.stats.iter().copied().unzip();
        let out = bn_bwd_cpu::<true>(
            (x, dy, y),
            self.act,
            (&self.gamma, &mean, &var),
            (n, c, h * w),
            self.eps,
        );
        Ok((CpuStorage::F32(out), Shape::from(n * c * h * w + 2 * c)))
    }
}

#[inline(always)]
fn b_to(sum_dy_xc: f64, inv: f32) -> f64 {
    sum_dy_xc * inv as f64
}

/// Training-mode batch normalization of an NCHW tensor with the fused kernel. Returns the
/// normalized output and the batch mean and biased batch variance (`[C]` each, detached).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_act(x, weight, bias, eps, Activation::None)
}

/// [`batch_norm_train`] followed by `act`, as one op on the CPU (one output tensor, one
/// backward node: the activation's gradient is taken from the output). Returns
/// `act(normalized)` and the batch mean and biased variance.
pub fn batch_norm_train_act(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    act: Activation,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, h, w) = x.dims4()?;
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!(
            "batch_norm: weight {:?} / bias {:?} do not fit input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        )
    }
    if n * h * w < 2 {
        bail!(
            "batch_norm: training needs more than one value per channel, got input {:?}",
            x.dims()
        )
    }
    if !crate::cpu::has_kernel(x.device()) {
        let (y, mean, var) = crate::reference::batch_norm_train(x, weight, bias, eps)?;
        return Ok((act.apply(&y)?, mean, var));
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let (w32, b32) = (
        weight.to_dtype(DType::F32)?.contiguous()?,
        bias.to_dtype(DType::F32)?.contiguous()?,
    );
    if x.device().is_cpu() {
        let op = BnTrainCpu::new(eps, act);
        let stats = op.stats();
        let y = crate::profile::record(
            "batchnorm train",
            || crate::profile::dims(x),
            || x32.apply_op3(&w32, &b32, op),
        )?;
        let (mean, var) = stored_mean_var_pair(&stats, x.device())?;
        return Ok((y.to_dtype(dtype)?, mean, var));
    }
    // Other devices: one packed `[y, mean, var]` output.
    let packed = x32.apply_op3(&w32, &b32, BnTrainFwd { eps })?;
    let total = n * c * h * w;
    let y = packed
        .narrow(0, 0, total)?
        .reshape((n, c, h, w))?
        .to_dtype(dtype)?;
    let mean = packed.narrow(0, total, c)?.detach();
    let var = packed.narrow(0, total + c, c)?.detach();
    Ok((act.apply(&y)?, mean, var))
}

/// `act(x * scale[c] + shift[c])` over an NCHW tensor: the folded evaluation form of
/// BatchNorm (and of a conv bias), one pass.
struct ChannelAffine {
    act: Activation,
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let hw = h * w;
        let x = f32_slice(self.name(), xs, xl)?;
        let s = f32_slice(self.name(), ss, sl)?;
        let b = f32_slice(self.name(), bs, bl)?;
        let mut out = vec![0f32; n * c * hw];
        let act = self.act;
        out.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(plane, o)| {
                let ch = plane % c;
                let (sc, sh) = (s[ch], b[ch]);
                let xp = &x[plane * hw..(plane + 1) * hw];
                multiversion!(|| match act {
                    Activation::None => o
                        .iter_mut()
                        .zip(xp)
                        .for_each(|(o, v)| *o = v.mul_add(sc, sh)),
                    Activation::Relu => o
                        .iter_mut()
                        .zip(xp)
                        .for_each(|(o, v)| *o = v.mul_add(sc, sh).max(0.0)),
                    Activation::Relu6 => o
                        .iter_mut()
                        .zip(xp)
                        .for_each(|(o, v)| *o = Activation::Relu6.scalar(v.mul_add(sc, sh))),
                })
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::channel_affine(xs, xl, ss, sl, bs, bl, self.act)
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let g = match self.act {
            Activation::None => grad.clone(),
            Activation::Relu => (grad * res.gt(0f32)?.to_dtype(grad.dtype())?)?,
            Activation::Relu6 => {
                let m = (res.gt(0f32)?.to_dtype(grad.dtype())?
                    * res.lt(6f32)?.to_dtype(grad.dtype())?)?;
                (grad * m)?
            }
        };
        let dx = g.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?;
        let sum = |t: &Tensor| -> Result<Tensor> {
            t.sum_keepdim(0)?
                .sum_keepdim(2)?
                .sum_keepdim(3)?
                .flatten_all()
        };
        let dscale = sum(&(&g * x)?)?;
        let dshift = sum(&g)?;
        Ok((Some(dx), Some(dscale), Some(dshift)))
    }
}

/// The fused epilogue on one row of an output, in place: `row = act(row.mul_add(s, t) (+ res))`,
/// the same bits as [`channel_affine`] without activation, an add and the activation as
/// separate passes. Inlined into the caller's vectorized (multiversioned) context.
#[inline(always)]
pub(crate) fn epilogue_row(
    row: &mut [f32],
    (s, t): (f32, f32),
    act: Activation,
    res: Option<&[f32]>,
) {
    match res {
        None => match act {
            Activation::None => row.iter_mut().for_each(|v| *v = v.mul_add(s, t)),
            Activation::Relu => row.iter_mut().for_each(|v| *v = v.mul_add(s, t).max(0.0)),
            Activation::Relu6 => row
                .iter_mut()
                .for_each(|v| *v = v.mul_add(s, t).clamp(0.0, 6.0)),
        },
        Some(r) => with_activation!(act, |f| row
            .iter_mut()
            .zip(r)
            .for_each(|(v, r)| *v = f(v.mul_add(s, t) + r))),
    }
}

/// `act(x * scale[c] + shift[c])` for an NCHW tensor in one pass, differentiable in all three
/// inputs.
pub fn channel_affine(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    crate::profile::record(
        "bn / epilogue",
        || format!("{act:?} {}", crate::profile::dims(x)),
        || channel_affine_inner(x, scale, shift, act),
    )
}

fn channel_affine_inner(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if scale.dims() != [c] || shift.dims() != [c] {
        bail!(
            "channel_affine: scale {:?} / shift {:?} do not fit input {:?}",
            scale.dims(),
            shift.dims(),
            x.dims()
        )
    }
    if !crate::cpu::has_kernel(x.device()) {
        let y = x
            .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
        return act.apply(&y);
    }
    let dtype = x.dtype();
    x.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op3(
            &scale.to_dtype(DType::F32)?.contiguous()?,
            &shift.to_dtype(DType::F32)?.contiguous()?,
            ChannelAffine { act },
        )?
        .to_dtype(dtype)
}

/// The per-channel epilogue of a convolution whose BatchNorm was folded into it:
/// `act(y * scale[c] + shift[c])`, applied in the pass that produces `y` where the kernel
/// supports it, else in one extra pass ([`channel_affine`]).
#[derive(Clone, Debug)]
pub struct Epilogue {
    /// Per-channel multiplier `[C]` (f32).
    pub scale: Tensor,
    /// Per-channel offset `[C]` (f32).
    pub shift: Tensor,
    /// Activation after the affine map.
    pub act: Activation,
    /// `scale` and `shift` on the host, for kernels that fuse the epilogue.
    pub(crate) host: Option<(Vec<f32>, Vec<f32>)>,
}

impl Epilogue {
    /// The epilogue that folds `bn` (see [`BatchNorm2d::fold`]), with the bias of the
    /// convolution (if any) moved into the shift: `(y + b) * s + t = y * s + (b * s + t)`.
    pub fn fold(bn: &mut BatchNorm2d, conv_bias: Option<&Tensor>) -> Result<Self> {
        let c = bn.channels();
        if conv_bias.is_some_and(|b| b.dims() != [c]) {
            bail!(
                "batch_norm: {c} channels cannot fold over a conv bias {:?}",
                conv_bias.map(|b| b.dims().to_vec())
            )
        }
        let (scale, shift, act) = bn.fold()?;
        let shift = match conv_bias {
            Some(b) => ((b.detach().to_dtype(DType::F32)? * &scale)? + shift)?,
            None => shift,
        };
        let host = if scale.device().is_cpu() {
            Some((scale.to_vec1::<f32>()?, shift.to_vec1::<f32>()?))
        } else {
            None
        };
        Ok(Self {
            scale,
            shift,
            act,
            host,
        })
    }

    /// Applies the epilogue to an NCHW tensor in one pass.
    pub fn apply(&self, y: &Tensor) -> Result<Tensor> {
        channel_affine(y, &self.scale, &self.shift, self.act)
    }

    /// The host copies of scale and shift when `x` and `w` can take the fused f32 CPU kernels.
    pub(crate) fn fused_f32(&self, x: &Tensor, w: &Tensor) -> Option<(&[f32], &[f32])> {
        let (s, t) = self.host.as_ref()?;
        let f32_cpu = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
        f32_cpu.then_some((s.as_slice(), t.as_slice()))
    }

    /// `act(depthwise_conv2d(relu?(x), w) * scale + shift)`: one pass over the data with the
    /// fused CPU kernel (f32), else the convolution followed by [`Epilogue::apply`]. The two
    /// agree bit for bit.
    pub fn depthwise_conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        geom: &crate::Conv2dGeometry,
        input_relu: bool,
    ) -> Result<Tensor> {
        if let Some(st) = self.fused_f32(x, w) {
            return crate::profile::record(
                "depthwise + epilogue",
                || {
                    format!(
                        "s{} d{} {}",
                        geom.stride.0,
                        geom.dilation.0,
                        crate::profile::dims(x)
                    )
                },
                || crate::depthwise::depthwise_epilogue(x, w, st, input_relu, self.act, geom),
            );
        }
        let x = if input_relu {
            Activation::Relu.apply(x)?
        } else {
            x.clone()
        };
        self.apply(&crate::depthwise::depthwise_conv2d(&x, w, geom)?)
    }

    /// `act(conv2d(x, w) * scale + shift)` for a convolution with one group: on the CPU (f32) a
    /// 1x1 stride-1 unpadded one is a single sgemm per image with the epilogue at the tile
    /// store, any other im2col + sgemm with the same fused epilogue; elsewhere the convolution
    /// followed by [`Epilogue::apply`]. All paths agree bit for bit.
    pub fn conv2d(&self, x: &Tensor, w: &Tensor, geom: &crate::Conv2dGeometry) -> Result<Tensor> {
        let Some(st) = self.fused_f32(x, w) else {
            return self.apply(&crate::conv::conv2d(x, w, None, geom, 1)?);
        };
        let (_, _, kh, kw) = w.dims4()?;
        let pointwise = geom.is_pointwise((kh, kw));
        crate::profile::record_conv(
            ["conv 1x1 + epilogue", "conv kxk + epilogue"],
            x,
            w,
            geom,
            || {
                if pointwise {
                    crate::pointwise::pointwise_epilogue(x, w, st, self.act)
                } else {
                    crate::conv::conv_gemm_epilogue(x, w, geom, st, self.act)
                }
            },
        )
    }

    /// `act(self(conv2d(x, w)) + residual)` for a convolution with one group and a `residual`
    /// shaped like its output: when this epilogue has no activation of its own and the
    /// tensors are f32 on the CPU, the add and `act` run at the product's tile stores (no pass
    /// over the output, no temporaries); otherwise [`Epilogue::conv2d`], an add and `act`.
    /// Both agree bit for bit.
    pub fn conv2d_add(
        &self,
        x: &Tensor,
        w: &Tensor,
        geom: &crate::Conv2dGeometry,
        residual: &Tensor,
        act: Activation,
    ) -> Result<Tensor> {
        let fused = self.fused_f32(x, w).filter(|_| {
            self.act == Activation::None
                && residual.device().is_cpu()
                && residual.dtype() == DType::F32
        });
        let Some(st) = fused else {
            return act.apply(&(self.conv2d(x, w, geom)? + residual)?);
        };
        crate::profile::record_conv(
            ["conv 1x1 + epilogue + add", "conv kxk + epilogue + add"],
            x,
            w,
            geom,
            || crate::conv::conv_residual_epilogue(x, w, geom, st, act, residual),
        )
    }
}

/// 2-D batch normalization over the channels of an NCHW tensor.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    config: BatchNormConfig,
    act: Activation,
    folded: bool,
}

impl BatchNorm2d {
    /// Loads `weight`, `bias`, `running_mean`, `running_var` (PyTorch names) for `channels`.
    /// With a `VarMap`-backed builder the running statistics are shared with the map, so
    /// training updates are saved with it.
    pub fn new(channels: usize, config: BatchNormConfig, vb: VarBuilder) -> Result<Self> {
        use candle_nn::Init;
        if config.eps.is_nan() || config.eps <= 0.0 || !(0.0..=1.0).contains(&config.momentum) {
            bail!("batch_norm: invalid config {config:?}")
        }
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            config,
            act: Activation::None,
            folded: false,
        })
    }

    /// The same layer with an activation fused after it.
    pub fn with_activation(mut self, act: Activation) -> Self {
        self.act = act;
        self
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// The layer's epsilon and momentum.
    pub fn config(&self) -> BatchNormConfig {
        self.config
    }

    /// The fused activation.
    pub fn activation(&self) -> Activation {
        self.act
    }

    /// The running mean.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running variance.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// The evaluation-mode per-channel `(scale, shift)`: `y = x * scale + shift`.
    ///
    /// The running statistics enter detached: they are `Var`s (so training can update them in
    /// place) but never need a gradient, and a tracked `Var` here would make every
    /// evaluation-mode output record its computation graph, keeping all intermediate
    /// activations of a forward pass alive until its output is dropped. `weight` and `bias`
    /// stay attached, so frozen-BN training still trains them.
    pub fn folded(&self) -> Result<(Tensor, Tensor)> {
        let inv = (self.running_var.as_tensor().detach().to_dtype(DType::F32)? + self.config.eps)?
            .sqrt()?
            .recip()?;
        let scale = (self.weight.to_dtype(DType::F32)? * inv)?;
        let shift = (self.bias.to_dtype(DType::F32)?
            - (self
                .running_mean
                .as_tensor()
                .detach()
                .to_dtype(DType::F32)?
                * &scale)?)?;
        Ok((scale, shift))
    }

    /// Folds this layer into the convolution before it, for inference: returns the
    /// evaluation-mode `(scale, shift)` and activation that convolution applies to its output
    /// in the same pass (`act(conv * scale + shift)`), and turns this layer into the identity.
    /// A folded layer refuses training-mode forwards.
    ///
    /// The convolution's weights are not rescaled: `act(conv(x, w) * scale + shift)` is the
    /// exact arithmetic of the unfolded layers, so folding changes no output bit, while
    /// `conv(x, w * scale)` rounds differently, and deep networks amplify that (on the
    /// official reference models it moves the logits by 1e-4 of their scale).
    pub fn fold(&mut self) -> Result<(Tensor, Tensor, Activation)> {
        if self.folded {
            bail!("batch_norm: already folded into its convolution")
        }
        let (scale, shift) = self.folded()?;
        self.folded = true;
        Ok((scale, shift, self.act))
    }

    /// Whether [`BatchNorm2d::fold`] turned this layer into the identity.
    pub fn is_folded(&self) -> bool {
        self.folded
    }

    fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let m = self.config.momentum;
        let unbiased = (var * (count as f64 / (count as f64 - 1.0)))?;
        let rm = self.running_mean.as_tensor();
        let rv = self.running_var.as_tensor();
        let new_mean =
            ((rm.to_dtype(DType::F32)? * (1.0 - m))? + (mean * m)?)?.to_dtype(rm.dtype())?;
        let new_var =
            ((rv.to_dtype(DType::F32)? * (1.0 - m))? + (unbiased * m)?)?.to_dtype(rv.dtype())?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)
    }
}

impl BatchNorm2d {
    /// `self.forward_t(&conv(x), train)` for the convolution `conv` (its weights and kind)
    /// before this BatchNorm: in training, on f32 CPU tensors, the convolution and this
    /// BatchNorm (with its activation) run as one autograd node (the same values, gradients and
    /// running-statistics update as in turn, with one activation-sized gradient buffer fewer in
    /// the backward pass); otherwise, or when `conv` is `None`, `fallback(x)` computes the
    /// convolution's output and this layer is applied to it.
    pub fn forward_after(
        &self,
        x: &Tensor,
        conv: Option<(&Tensor, crate::TrainConv)>,
        fallback: impl FnOnce(&Tensor) -> Result<Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        if let (Some((w, kind)), true, false) = (conv, train, self.folded) {
            let (n, _, h, wd) = x.dims4()?;
            let (_, _, kh, kw) = w.dims4()?;
            let (ho, wo) = kind.geom().output_size((h, wd), (kh, kw))?;
            let channels_match = w.dim(0)? == self.channels();
            // Fewer than two values per channel: the separate layer reports it.
            if channels_match && n * ho * wo >= 2 {
                if let Some((y, mean, var)) = crate::conv_bn::conv_batch_norm_train(
                    x,
                    w,
                    kind,
                    (&self.weight, &self.bias),
                    self.config.eps,
                    self.act,
                )? {
                    self.update_running(&mean, &var, n * ho * wo)?;
                    return Ok(y);
                }
            }
        }
        self.forward_t(&fallback(x)?, train)
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.channels() {
            bail!(
                "batch_norm: {} channels, input {:?}",
                self.channels(),
                x.dims()
            )
        }
        if self.folded {
            if train {
                bail!("batch_norm: this layer was folded into its convolution for inference and cannot train")
            }
            return Ok(x.clone());
        }
        if train {
            let (y, mean, var) =
                batch_norm_train_act(x, &self.weight, &self.bias, self.config.eps, self.act)?;
            self.update_running(&mean, &var, n * h * w)?;
            Ok(y)
        } else {
            let (scale, shift) = self.folded()?;
            channel_affine(x, &scale, &shift, self.act)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused activation op against candle's `relu` / `clamp`: values and gradients.
    #[test]
    fn activation_op_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        // values spread over [-9, 9], away from the kinks at 0 and 6
        let v: Vec<f32> = (0..2 * 3 * 7 * 5)
            .map(|i| ((i * 37 % 181) as f32 - 90.0) / 10.0 + 0.05)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(v, (2, 3, 7, 5), &dev)?)?;
        let w = Tensor::arange(0f32, 210.0, &dev)?.reshape((2, 3, 7, 5))?;
        for (act, reference) in [
            (Activation::Relu, x.as_tensor().relu()?),
            (Activation::Relu6, x.as_tensor().clamp(0f32, 6f32)?),
        ] {
            let y = act.apply(x.as_tensor())?;
            assert_eq!(y.dims(), &[2, 3, 7, 5]);
            let d = (&y - &reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{act:?} forward");
            let g = (y * &w)?.sum_all()?.backward()?;
            let g_ref = (reference * &w)?.sum_all()?.backward()?;
            let (a, b) = (g.get(&x).expect("grad"), g_ref.get(&x).expect("grad"));
            let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{act:?} gradient");
            // the gradient is not trivially zero or the identity
            let s = a.sum_all()?.to_scalar::<f32>()?;
            assert!(
                s > 0.0 && s < w.sum_all()?.to_scalar::<f32>()?,
                "{act:?}: {s}"
            );
        }
        Ok(())
    }
}
