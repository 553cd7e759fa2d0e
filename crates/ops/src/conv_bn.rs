//! A convolution and the training-mode BatchNorm (and activation) after it as one autograd node.
//!
//! candle's backward pass gives every input of every graph node a zero-filled gradient buffer
//! and adds the node's gradient into it (a memset and a three-stream pass per edge). Between a
//! convolution and its BatchNorm that edge carries a whole activation-sized tensor and has
//! exactly one consumer. [`conv_batch_norm_train`] runs the convolution's forward kernel and the
//! BatchNorm's training kernel inside one custom op on `(x, weight, [gamma, beta])`, keeps the
//! convolution's output for the backward pass (as the separate BatchNorm op kept it as its
//! input), and chains the two ops' own backward passes: the values and gradients are those of
//! the two ops run in turn, bit for bit, with one activation-sized gradient buffer fewer.

use crate::batch_norm::{Activation, BnTrainCpu};
use crate::conv::ConvGemm;
use crate::cpu::f32_slice;
use crate::depthwise::DwFused;
use crate::Conv2dGeometry;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};
use std::sync::{Arc, Mutex};

/// The convolution before a training-mode BatchNorm, as [`conv_batch_norm_train`] runs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TrainConv {
    /// A dense convolution with one group and no bias (`weight: [Cout, Cin, kh, kw]`): a 1x1
    /// stride-1 unpadded one as one product per image, any other as im2col + gemm.
    Dense(Conv2dGeometry),
    /// A depthwise convolution (`weight: [C, 1, kh, kw]`), with a ReLU applied to its input
    /// as it is read when `input_relu` (Xception's pre-activation).
    Depthwise {
        /// Stride, dilation and padding.
        geom: Conv2dGeometry,
        /// ReLU on the input.
        input_relu: bool,
    },
}

impl TrainConv {
    /// Stride, dilation and padding.
    pub fn geom(&self) -> Conv2dGeometry {
        match *self {
            TrainConv::Dense(geom) | TrainConv::Depthwise { geom, .. } => geom,
        }
    }
}

/// The convolution half of [`ConvBnTrain`]: the existing ops, forward and backward.
enum Producer {
    Gemm(ConvGemm),
    /// With a zero bias and no activation after it.
    Depthwise(DwFused),
}

impl Producer {
    fn forward(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        match self {
            Producer::Gemm(op) => op.cpu_fwd(xs, xl, ws, wl),
            Producer::Depthwise(op) => {
                let c = xl.dims().get(1).copied().unwrap_or(0);
                let zeros = CpuStorage::F32(vec![0f32; c]);
                op.cpu_fwd(xs, xl, ws, wl, &zeros, &Layout::contiguous(c))
            }
        }
    }

    /// The profile kind of the forward pass (as the separate layers record it).
    fn kind(&self, wl: &Layout) -> &'static str {
        match self {
            Producer::Gemm(_) if wl.dims().ends_with(&[1, 1]) => "conv 1x1",
            Producer::Gemm(_) => "conv kxk",
            Producer::Depthwise(_) => "depthwise",
        }
    }

    /// The profile detail of the forward pass (as the separate layers record it).
    fn detail(&self, xl: &Layout, wl: &Layout) -> String {
        match self {
            Producer::Gemm(op) => crate::profile::conv_detail(xl.dims(), wl.dims(), &op.geom),
            Producer::Depthwise(op) => {
                crate::profile::depthwise_detail(xl.dims(), &op.geom, op.input_relu)
            }
        }
    }

    /// Gradients of `x` and `w` from the gradient `dz` of the output `z`.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        z: &Tensor,
        dz: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        match self {
            Producer::Gemm(op) => op.bwd(x, w, z, dz),
            Producer::Depthwise(op) => {
                let zeros = Tensor::zeros(x.dim(1)?, DType::F32, x.device())?;
                let (dx, dw, _) = op.bwd(x, w, &zeros, z, dz)?;
                Ok((dx, dw))
            }
        }
    }
}

/// `act(bn(conv(x, w)))` in training mode on `(x, w, [gamma, beta])`.
struct ConvBnTrain {
    conv: Producer,
    bn: BnTrainCpu,
    /// The convolution's output of the last forward pass, read by the backward pass.
    z: Arc<Mutex<Option<Tensor>>>,
}

impl CustomOp3 for ConvBnTrain {
    fn name(&self) -> &'static str {
        "conv-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gbs: &CpuStorage,
        gbl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, shape) = crate::profile::record(
            self.conv.kind(wl),
            || self.conv.detail(xl, wl),
            || self.conv.forward((xs, xl), (ws, wl)),
        )?;
        let c = shape.dims4()?.1;
        let gb = f32_slice(self.name(), gbs, gbl)?;
        if gb.len() != 2 * c {
            bail!(
                "conv_batch_norm_train: {} BatchNorm parameters for {c} channels (expected gamma \
                 and beta, {})",
                gb.len(),
                2 * c
            )
        }
        let (gamma, beta) = (
            CpuStorage::F32(gb[..c].to_vec()),
            CpuStorage::F32(gb[c..].to_vec()),
        );
        let cl = Layout::contiguous(c);
        let (y, y_shape) = crate::profile::record(
            "batchnorm train",
            || crate::profile::shape(shape.dims()),
            || {
                self.bn
                    .cpu_fwd(&z, &Layout::contiguous(&shape), &gamma, &cl, &beta, &cl)
            },
        )?;
        let CpuStorage::F32(z) = z else {
            bail!("conv_batch_norm_train: the convolution did not produce f32 values")
        };
        let z = Tensor::from_vec(z, shape, &Device::Cpu)?;
        match self.z.lock() {
            Ok(mut slot) => *slot = Some(z),
            Err(_) => bail!("conv_batch_norm_train: lock poisoned"),
        }
        Ok((y, y_shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gb: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let z = match self.z.lock() {
            Ok(slot) => slot.clone(),
            Err(_) => bail!("conv_batch_norm_train: lock poisoned"),
        };
        let Some(z) = z else {
            bail!("conv_batch_norm_train: backward before the forward pass ran")
        };
        let c = z.dim(1)?;
        let (gamma, beta) = (gb.narrow(0, 0, c)?, gb.narrow(0, c, c)?);
        let (dz, dgamma, dbeta) = self.bn.bwd(&z, &gamma, &beta, y, dy)?;
        let Some(dz) = dz else {
            bail!("conv_batch_norm_train: the BatchNorm gave no input gradient")
        };
        let (dx, dw) = self.conv.grads(x, w, &z, &dz)?;
        let zeros = || Tensor::zeros(c, DType::F32, gb.device());
        let dgb = Tensor::cat(
            &[
                dgamma.map_or_else(zeros, Ok)?,
                dbeta.map_or_else(zeros, Ok)?,
            ],
            0,
        )?;
        Ok((dx, dw, Some(dgb)))
    }
}

/// `act(batch_norm(conv(x, w)))` in training mode (batch statistics, biased variance for the
/// normalization) as one autograd node, with the batch `(mean, var)` per channel; `None` when
/// the fused op does not apply (not an f32 CPU tensor), in which case the caller runs the two
/// layers in turn. Gradients flow to `x`, `w`, `gamma` and `beta` and equal those of the
/// separate ops.
pub(crate) fn conv_batch_norm_train(
    x: &Tensor,
    w: &Tensor,
    conv: TrainConv,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f64,
    act: Activation,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if ![x, w, gamma, beta].into_iter().all(f32_cpu) {
        return Ok(None);
    }
    let (_, cin, _, _) = x.dims4()?;
    let (cout, cin_w, kh, kw) = w.dims4()?;
    let conv = match conv {
        TrainConv::Dense(geom) => {
            if cin_w != cin {
                bail!(
                    "conv_batch_norm_train: weight {:?} does not fit input {:?}",
                    w.dims(),
                    x.dims()
                )
            }
            Producer::Gemm(ConvGemm {
                geom,
                epi: None,
                pointwise: geom.is_pointwise((kh, kw)),
            })
        }
        TrainConv::Depthwise { geom, input_relu } => {
            if cout != cin || cin_w != 1 {
                bail!(
                    "conv_batch_norm_train: depthwise weight {:?} does not fit input {:?}",
                    w.dims(),
                    x.dims()
                )
            }
            Producer::Depthwise(DwFused {
                geom,
                input_relu,
                act: Activation::None,
            })
        }
    };
    if gamma.dims() != [cout] || beta.dims() != [cout] {
        bail!(
            "conv_batch_norm_train: gamma {:?} / beta {:?} do not fit {cout} channels",
            gamma.dims(),
            beta.dims()
        )
    }
    let bn = BnTrainCpu::new(eps, act);
    let stats = bn.stats();
    let op = ConvBnTrain {
        conv,
        bn,
        z: Arc::new(Mutex::new(None)),
    };
    let gb = Tensor::cat(&[gamma, beta], 0)?;
    let y = x.contiguous()?.apply_op3(&w.contiguous()?, &gb, op)?;
    let (mean, var) = crate::batch_norm::stored_mean_var_pair(&stats, x.device())?;
    Ok(Some((y, mean, var)))
}

#[cfg(test)]
mod tests {
    use crate::{
        Activation, BatchNorm2d, BatchNormConfig, Conv2d, Conv2dGeometry, DepthwiseConv2d,
    };
    use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// A seeded uniform tensor in [-2, 2).
    fn hashed(dims: &[usize], seed: u64) -> Result<Tensor> {
        crate::reference::seeded_uniform(dims, seed, &Device::Cpu)? * 2.0
    }

    /// Every element of `a` equals `b`'s (an exact match: the same kernels in the same order).
    fn same(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let (a, b) = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
        );
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(x == y, "{what}: element {i}: {x} vs {y}");
        }
        Ok(())
    }

    /// The fused training node against the convolution and the BatchNorm run in turn: output,
    /// the gradients of the input, the convolution's weights and the BatchNorm's scale and
    /// shift, and the running statistics, for 1x1, strided 3x3 and depthwise convolutions
    /// (with and without the input ReLU), each activation.
    #[test]
    fn fused_node_matches_the_two_layers() -> Result<()> {
        let dev = Device::Cpu;
        type Case = (
            &'static str,
            (usize, usize, usize, usize),
            usize,
            usize,
            usize,
        );
        // (kind, input NCHW, cout, kernel, stride)
        let cases: &[Case] = &[
            ("dense", (2, 6, 9, 7), 5, 1, 1),
            ("dense", (3, 4, 11, 10), 6, 3, 2),
            ("depthwise", (2, 5, 9, 8), 5, 3, 1),
            ("depthwise relu-in", (2, 5, 10, 9), 5, 3, 2),
        ];
        for &(kind, (n, c, h, w), cout, k, s) in cases {
            for act in [Activation::None, Activation::Relu, Activation::Relu6] {
                let what = format!("{kind} {:?} -> {cout} k{k} s{s} {act:?}", (n, c, h, w));
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
                let geom = Conv2dGeometry::deeplab(k, s, 1);
                let bn = BatchNorm2d::new(cout, BatchNormConfig::tf_head(), vb.pp("bn"))?
                    .with_activation(act);
                let x = Var::from_tensor(&hashed(&[n, c, h, w], 1)?)?;
                let relu_input = kind.ends_with("relu-in");
                let (weight, run): (Tensor, Box<dyn Fn(bool) -> Result<Tensor>>) =
                    if kind == "dense" {
                        let conv = Conv2d::new(c, cout, k, geom, false, vb.pp("conv"))?;
                        let wt = conv.weight().clone();
                        let (x, bn) = (x.as_tensor().clone(), bn.clone());
                        let run = move |fused: bool| {
                            if fused {
                                crate::conv_bn(&conv, &bn, &x, true)
                            } else {
                                bn.forward_t(&conv.forward(&x)?, true)
                            }
                        };
                        (wt, Box::new(run))
                    } else {
                        let conv = DepthwiseConv2d::new(c, k, geom, vb.pp("conv"))?;
                        let wt = conv.weight().clone();
                        let (x, bn) = (x.as_tensor().clone(), bn.clone());
                        let run = move |fused: bool| {
                            if fused {
                                bn.forward_after(
                                    &x,
                                    conv.train_conv(relu_input),
                                    |_| unreachable!("the fused node applies"),
                                    true,
                                )
                            } else if relu_input {
                                bn.forward_t(&conv.forward_relu_input(&x)?, true)
                            } else {
                                bn.forward_t(&conv.forward(&x)?, true)
                            }
                        };
                        (wt, Box::new(run))
                    };
                // Non-trivial BatchNorm parameters and running statistics.
                let vars = vm.data().lock().expect("var map").clone();
                vars["bn.weight"].set(&(hashed(&[cout], 2)? + 2.5)?)?;
                vars["bn.bias"].set(&hashed(&[cout], 3)?)?;
                let start = (hashed(&[cout], 4)?, (hashed(&[cout], 5)? + 2.5)?);
                let r = hashed(&[n, cout, (h - 1) / s + 1, (w - 1) / s + 1], 6)?;
                let mut results = Vec::new();
                for fused in [true, false] {
                    vars["bn.running_mean"].set(&start.0)?;
                    vars["bn.running_var"].set(&start.1)?;
                    let y = run(fused)?;
                    let g = (&y * &r)?.sum_all()?.backward()?;
                    let grad = |t: &Tensor| g.get(t).cloned().expect("a gradient");
                    results.push([
                        y.clone(),
                        grad(x.as_tensor()),
                        grad(&weight),
                        grad(vars["bn.weight"].as_tensor()),
                        grad(vars["bn.bias"].as_tensor()),
                        // copies: the next `set` overwrites the variables' storage
                        bn.running_mean().copy()?,
                        bn.running_var().copy()?,
                    ]);
                }
                let names = ["output", "dx", "dw", "dgamma", "dbeta", "mean", "var"];
                for ((a, b), name) in results[0].iter().zip(&results[1]).zip(names) {
                    same(a, b, &format!("{what}: {name}"))?;
                }
                // The running statistics moved: the check above compared something.
                let moved = (&results[0][5] - &start.0)?.abs()?.sum_all()?;
                assert!(moved.to_scalar::<f32>()? > 0.0, "{what}: running mean");
            }
        }
        Ok(())
    }
}
