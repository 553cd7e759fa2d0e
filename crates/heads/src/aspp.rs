//! Atrous Spatial Pyramid Pooling with image-level features (DeepLabv3, Chen et al. 2017, §3.3;
//! DeepLabv3+, Chen et al. 2018, §3.1), following `extract_features` in the official
//! `tensorflow/models` `research/deeplab/model.py`.
//!
//! Branches, concatenated in the official order: image pooling (global average → 1x1 conv +
//! BN + ReLU → broadcast back; the official bilinear resize of a 1x1 map is a broadcast), a 1x1
//! conv, then one 3x3 atrous conv per rate (plain, or separable: depthwise → BN → ReLU →
//! pointwise → BN → ReLU). A 1x1 projection + BN + ReLU and dropout (training only) follow.
//!
//! Keys (under the model's `aspp.` prefix): `pooling.{conv,bn}`, `convs.0.{conv,bn}` (1x1),
//! `convs.{i}.{conv,bn}` or `convs.{i}.{conv_dw,bn_dw,conv_pw,bn_pw}` for rate `i` (1-based),
//! `project.{conv,bn}`.

use crate::Intermediates;
use candle_core::{bail, ModuleT, Result, Tensor, D};
use candle_nn::VarBuilder;
use deeplab_ops::{
    Activation, BatchNormConfig, ConcatInput, Conv2dGeometry, ConvBnAct, FoldBatchNorm, MacCounter,
    SeparableActivation, SeparableConv2d, SeparableConv2dConfig,
};

/// Hyper-parameters of an [`Aspp`] module.
#[derive(Clone, Debug, PartialEq)]
pub struct AsppConfig {
    /// Channels of the backbone feature it reads.
    pub in_channels: usize,
    /// Channels of every branch and of the projection (256 in the paper).
    pub channels: usize,
    /// Atrous rates of the 3x3 branches (6/12/18 at output stride 16; empty for the
    /// MobileNetV2 "image pooling + 1x1" head).
    pub atrous_rates: Vec<usize>,
    /// Whether the image-pooling branch is present.
    pub image_pooling: bool,
    /// Atrous separable 3x3 branches instead of plain atrous convolutions.
    pub separable: bool,
    /// Dropout probability after the projection, in training only (the official keep_prob 0.9
    /// is 0.1 here).
    pub dropout: f32,
    /// BatchNorm epsilon and momentum (official: epsilon 1e-5).
    pub bn: BatchNormConfig,
}

impl AsppConfig {
    /// Channels entering the projection.
    pub fn concat_channels(&self) -> usize {
        self.channels * (1 + usize::from(self.image_pooling) + self.atrous_rates.len())
    }

    fn validate(&self) -> Result<()> {
        if self.in_channels == 0 || self.channels == 0 {
            bail!(
                "aspp: channels must be positive, got in {} out {}",
                self.in_channels,
                self.channels
            )
        }
        if let Some(r) = self.atrous_rates.iter().find(|&&r| r == 0) {
            bail!(
                "aspp: atrous rate {r} in {:?} must be positive",
                self.atrous_rates
            )
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!(
                "aspp: dropout probability {} must be in [0, 1)",
                self.dropout
            )
        }
        Ok(())
    }
}

/// One 3x3 atrous branch, plain or separable.
#[derive(Clone, Debug)]
enum AtrousBranch {
    Plain(ConvBnAct),
    Separable(SeparableConv2d),
}

impl FoldBatchNorm for AtrousBranch {
    fn fold_batch_norm(&mut self) -> Result<()> {
        match self {
            AtrousBranch::Plain(c) => c.fold_batch_norm(),
            AtrousBranch::Separable(c) => c.fold_batch_norm(),
        }
    }
}

/// The ASPP module.
#[derive(Clone, Debug)]
pub struct Aspp {
    pooling: Option<ConvBnAct>,
    conv1x1: ConvBnAct,
    atrous: Vec<AtrousBranch>,
    project: ConvBnAct,
    dropout: f32,
    channels: usize,
}

impl FoldBatchNorm for Aspp {
    fn fold_batch_norm(&mut self) -> Result<()> {
        if let Some(p) = &mut self.pooling {
            p.fold_batch_norm()?;
        }
        self.conv1x1.fold_batch_norm()?;
        for a in &mut self.atrous {
            a.fold_batch_norm()?;
        }
        self.project.fold_batch_norm()
    }
}

impl Aspp {
    /// Loads (or initializes) the module from `vb` (the `aspp` prefix).
    pub fn new(cfg: &AsppConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (cin, c) = (cfg.in_channels, cfg.channels);
        let one = Conv2dGeometry::default();
        let pooling = if cfg.image_pooling {
            Some(ConvBnAct::new(
                cin,
                c,
                1,
                one,
                cfg.bn,
                Activation::Relu,
                vb.pp("pooling"),
            )?)
        } else {
            None
        };
        let convs = vb.pp("convs");
        let conv1x1 = ConvBnAct::new(cin, c, 1, one, cfg.bn, Activation::Relu, convs.pp("0"))?;
        let mut atrous = Vec::with_capacity(cfg.atrous_rates.len());
        for (i, &rate) in cfg.atrous_rates.iter().enumerate() {
            let vb = convs.pp((i + 1).to_string());
            let geom = Conv2dGeometry::same(3, rate);
            atrous.push(if cfg.separable {
                let sc = SeparableConv2dConfig {
                    kernel: 3,
                    geom,
                    act: SeparableActivation::AfterEach(Activation::Relu),
                    bn: cfg.bn,
                };
                AtrousBranch::Separable(SeparableConv2d::new(cin, c, &sc, vb)?)
            } else {
                AtrousBranch::Plain(ConvBnAct::new(
                    cin,
                    c,
                    3,
                    geom,
                    cfg.bn,
                    Activation::Relu,
                    vb,
                )?)
            });
        }
        let project = ConvBnAct::new(
            cfg.concat_channels(),
            c,
            1,
            one,
            cfg.bn,
            Activation::Relu,
            vb.pp("project"),
        )?;
        Ok(Self {
            pooling,
            conv1x1,
            atrous,
            project,
            dropout: cfg.dropout,
            channels: c,
        })
    }

    /// Output channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Forward; with `rec`, stores every branch under the official intermediate names
    /// (`aspp_image_pooling_avgpool`, `aspp_image_pooling_conv`, `aspp_image_pooling_resized`,
    /// `aspp0`, `aspp{i}_depthwise`, `aspp{i}`, `aspp_concat`, `aspp_output`), NCHW.
    pub fn forward_rec(
        &self,
        x: &Tensor,
        train: bool,
        mut rec: Option<&mut Intermediates>,
    ) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let mut pooled = None;
        if let Some(pool) = &self.pooling {
            if train && n == 1 {
                bail!("aspp: the image-pooling BatchNorm sees one value per channel at batch size 1; train with batch >= 2 or with frozen BatchNorm")
            }
            let avg = x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
            let y = pool.forward_t(&avg, train)?;
            if let Some(r) = rec.as_deref_mut() {
                // Bilinear resize of a 1x1 map (any coordinate convention) is a broadcast.
                let up = y.broadcast_as((n, self.channels, h, w))?.contiguous()?;
                r.insert("aspp_image_pooling_avgpool", &avg);
                r.insert("aspp_image_pooling_conv", &y);
                r.insert("aspp_image_pooling_resized", &up);
            }
            pooled = Some(y);
        }
        let mut branches = Vec::with_capacity(1 + self.atrous.len());
        let b0 = self.conv1x1.forward_t(x, train)?;
        if let Some(r) = rec.as_deref_mut() {
            r.insert("aspp0", &b0);
        }
        branches.push(b0);
        for (i, b) in self.atrous.iter().enumerate() {
            let y = match b {
                AtrousBranch::Plain(c) => c.forward_t(x, train)?,
                // Only a recording needs the depthwise activation: otherwise the layer may
                // run its two convolutions as one op.
                AtrousBranch::Separable(s) => match rec.as_deref_mut() {
                    Some(r) => {
                        let (d, p) = s.forward_parts(x, train)?;
                        r.insert(&format!("aspp{}_depthwise", i + 1), &d);
                        p
                    }
                    None => s.forward_t(x, train)?,
                },
            };
            if let Some(r) = rec.as_deref_mut() {
                r.insert(&format!("aspp{}", i + 1), &y);
            }
            branches.push(y);
        }
        // The projection of the concatenated branches, the pooled one constant over space
        // (folded, in inference, it runs without building the concatenation).
        let parts: Vec<ConcatInput> = pooled
            .iter()
            .map(ConcatInput::Constant)
            .chain(branches.iter().map(ConcatInput::Map))
            .collect();
        let y = self.project.forward_concat(&parts, train)?;
        if let Some(r) = rec {
            let mut all = Vec::with_capacity(parts.len());
            if let Some(p) = &pooled {
                all.push(p.broadcast_as((n, self.channels, h, w))?.contiguous()?);
            }
            all.extend(branches.iter().cloned());
            r.insert("aspp_concat", &Tensor::cat(&all, 1)?);
            r.insert("aspp_output", &y);
        }
        if train && self.dropout > 0.0 {
            candle_nn::ops::dropout(&y, self.dropout)
        } else {
            Ok(y)
        }
    }

    /// Counts multiply-adds for an `input` feature map: the image-pooling 1x1 conv at 1x1, every
    /// branch, and the projection.
    pub fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<(usize, usize)> {
        if let Some(p) = &self.pooling {
            p.count((1, 1), c)?;
        }
        let out = self.conv1x1.count(input, c)?;
        for b in &self.atrous {
            let o = match b {
                AtrousBranch::Plain(conv) => conv.count(input, c)?,
                AtrousBranch::Separable(s) => s.count(input, c)?,
            };
            if o != out {
                bail!("aspp: branch output {o:?} differs from the 1x1 branch {out:?}")
            }
        }
        self.project.count(out, c)
    }
}

impl ModuleT for Aspp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_rec(x, train, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use deeplab_ops::reference;

    /// Random values for every variable (BatchNorm variances positive).
    pub(crate) fn randomize(vm: &VarMap) -> Result<()> {
        let data = vm
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("lock"))?;
        for (i, (name, var)) in data.iter().enumerate() {
            let t = reference::seeded_uniform(var.dims(), 100 + i as u64, &Device::Cpu)?;
            let t = if name.ends_with("running_var") {
                (t.abs()? + 0.5)?
            } else {
                t
            };
            var.set(&t)?;
        }
        Ok(())
    }

    fn bn_eval(x: &Tensor, vm: &VarMap, p: &str, eps: f64) -> Result<Tensor> {
        let data = vm
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("lock"))?;
        let g = |n: &str| data[&format!("{p}.{n}")].as_tensor().reshape((1, (), 1, 1));
        let (w, b, m, v) = (
            g("weight")?,
            g("bias")?,
            g("running_mean")?,
            g("running_var")?,
        );
        x.broadcast_sub(&m)?
            .broadcast_div(&(v + eps)?.sqrt()?)?
            .broadcast_mul(&w)?
            .broadcast_add(&b)
    }

    fn weight(vm: &VarMap, name: &str) -> Result<Tensor> {
        let data = vm
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("lock"))?;
        Ok(data[name].as_tensor().clone())
    }

    /// The module against a plain composition of reference ops: global mean → 1x1 → BN → ReLU
    /// broadcast, the 1x1 and atrous branches, concatenation in the official order, projection.
    #[test]
    fn matches_a_plain_composition() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = AsppConfig {
            in_channels: 6,
            channels: 4,
            atrous_rates: vec![2, 3],
            image_pooling: true,
            separable: false,
            dropout: 0.1,
            bn: BatchNormConfig::tf_head(),
        };
        let aspp = Aspp::new(
            &cfg,
            VarBuilder::from_varmap(&vm, DType::F32, &dev).pp("aspp"),
        )?;
        randomize(&vm)?;
        let x = reference::seeded_uniform(&[2, 6, 7, 5], 1, &dev)?;
        let eps = 1e-5;
        let conv_bn_relu = |x: &Tensor, p: &str, geom: Conv2dGeometry| -> Result<Tensor> {
            let y = reference::conv2d(x, &weight(&vm, &format!("{p}.conv.weight"))?, None, &geom)?;
            bn_eval(&y, &vm, &format!("{p}.bn"), eps)?.relu()
        };
        let pooled = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let pool = conv_bn_relu(&pooled, "aspp.pooling", Conv2dGeometry::default())?
            .broadcast_as((2, 4, 7, 5))?;
        let b0 = conv_bn_relu(&x, "aspp.convs.0", Conv2dGeometry::default())?;
        let b1 = conv_bn_relu(&x, "aspp.convs.1", Conv2dGeometry::same(3, 2))?;
        let b2 = conv_bn_relu(&x, "aspp.convs.2", Conv2dGeometry::same(3, 3))?;
        let cat = Tensor::cat(&[&pool, &b0, &b1, &b2], 1)?;
        let want = conv_bn_relu(&cat, "aspp.project", Conv2dGeometry::default())?;
        let mut rec = Intermediates::default();
        let got = aspp.forward_rec(&x, false, Some(&mut rec))?;
        let err = (&got - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        assert_eq!(
            rec.get("aspp_concat").map(|t| t.dims().to_vec()),
            Some(vec![2, 16, 7, 5])
        );
        let mut counter = MacCounter::new();
        assert_eq!(aspp.count((7, 5), &mut counter)?, (7, 5));
        // pooling at 1x1, 1x1 branch, two 3x3 atrous branches (grid rounded up to the rate),
        // projection.
        let atrous =
            |r: usize| (7usize.div_ceil(r) * r * 5usize.div_ceil(r) * r * 9 * 6 * 4) as u64;
        assert_eq!(
            counter.macs,
            (6 * 4 + 35 * 6 * 4) as u64 + atrous(2) + atrous(3) + (35 * 16 * 4) as u64
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_configs() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let good = AsppConfig {
            in_channels: 8,
            channels: 4,
            atrous_rates: vec![6],
            image_pooling: true,
            separable: true,
            dropout: 0.1,
            bn: BatchNormConfig::tf_head(),
        };
        assert!(Aspp::new(&good, vb.clone()).is_ok());
        assert!(Aspp::new(
            &AsppConfig {
                atrous_rates: vec![0],
                ..good.clone()
            },
            vb.clone()
        )
        .is_err());
        assert!(Aspp::new(
            &AsppConfig {
                dropout: 1.0,
                ..good.clone()
            },
            vb.clone()
        )
        .is_err());
        assert!(Aspp::new(
            &AsppConfig {
                channels: 0,
                ..good
            },
            vb
        )
        .is_err());
    }
}
