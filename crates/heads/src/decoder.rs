//! The DeepLabv3+ decoder (Chen et al. 2018, §3.1 and Fig. 2; Table 2 for the number of 3x3
//! convs), following `refine_by_decoder` in the official `tensorflow/models`
//! `research/deeplab/model.py`.
//!
//! A 1x1 conv (48 channels) + BN + ReLU projects the backbone's low-level feature; the ASPP
//! output is bilinearly resized to the decoder size (official: `align_corners=True` to
//! `scale_dimension(input, 1/decoder_stride)`, which is the low-level feature's size; PyTorch
//! style: `align_corners=False` to the low-level size); the two are concatenated [ASPP,
//! low-level] and refined by 1-3 3x3 convs of 256 channels (plain, or separable with ReLU after
//! each BN).
//!
//! Keys (under the model's `decoder.` prefix): `project.{conv,bn}`, `convs.{k}.{conv,bn}` or
//! `convs.{k}.{conv_dw,bn_dw,conv_pw,bn_pw}`.

use crate::Intermediates;
use candle_core::{bail, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use deeplab_ops::{
    resize_bilinear, scale_dimension, Activation, BatchNormConfig, Conv2dGeometry, ConvBnAct,
    FoldBatchNorm, MacCounter, ResizeMode, SeparableActivation, SeparableConv2d,
    SeparableConv2dConfig,
};

/// Hyper-parameters of a [`Decoder`].
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    /// Channels of the ASPP output.
    pub in_channels: usize,
    /// Channels of the backbone's low-level feature.
    pub low_level_channels: usize,
    /// Channels of the low-level projection (48 in the paper).
    pub projection_channels: usize,
    /// Channels of the 3x3 refinement convs (256).
    pub channels: usize,
    /// Number of 3x3 refinement convs (1-3; 2 in the paper).
    pub num_convs: usize,
    /// Separable refinement convs.
    pub separable: bool,
    /// Reduction of the low-level feature (4 in the paper).
    pub output_stride: usize,
    /// `true`: official `align_corners=True` resizes to `scale_dimension` sizes; `false`:
    /// PyTorch's `align_corners=False` to the low-level feature's size.
    pub align_corners: bool,
    /// BatchNorm epsilon and momentum (official: epsilon 1e-5).
    pub bn: BatchNormConfig,
}

impl DecoderConfig {
    fn validate(&self) -> Result<()> {
        if !(1..=3).contains(&self.num_convs) {
            bail!(
                "decoder: {} refinement convs requested, 1 to 3 are supported",
                self.num_convs
            )
        }
        if self.in_channels == 0
            || self.low_level_channels == 0
            || self.projection_channels == 0
            || self.channels == 0
        {
            bail!("decoder: channel counts must be positive, got {self:?}")
        }
        if self.output_stride == 0 {
            bail!("decoder: output stride must be positive")
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum RefineConv {
    Plain(ConvBnAct),
    Separable(SeparableConv2d),
}

impl FoldBatchNorm for RefineConv {
    fn fold_batch_norm(&mut self) -> Result<()> {
        match self {
            RefineConv::Plain(c) => c.fold_batch_norm(),
            RefineConv::Separable(c) => c.fold_batch_norm(),
        }
    }
}

/// The decoder module.
#[derive(Clone, Debug)]
pub struct Decoder {
    project: ConvBnAct,
    convs: Vec<RefineConv>,
    output_stride: usize,
    mode: ResizeMode,
    channels: usize,
}

impl FoldBatchNorm for Decoder {
    fn fold_batch_norm(&mut self) -> Result<()> {
        self.project.fold_batch_norm()?;
        for c in &mut self.convs {
            c.fold_batch_norm()?;
        }
        Ok(())
    }
}

impl Decoder {
    /// Loads (or initializes) the module from `vb` (the `decoder` prefix).
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let project = ConvBnAct::new(
            cfg.low_level_channels,
            cfg.projection_channels,
            1,
            Conv2dGeometry::default(),
            cfg.bn,
            Activation::Relu,
            vb.pp("project"),
        )?;
        let mut convs = Vec::with_capacity(cfg.num_convs);
        let mut cin = cfg.in_channels + cfg.projection_channels;
        for k in 0..cfg.num_convs {
            let vb = vb.pp("convs").pp(k.to_string());
            let geom = Conv2dGeometry::same(3, 1);
            convs.push(if cfg.separable {
                let sc = SeparableConv2dConfig {
                    kernel: 3,
                    geom,
                    act: SeparableActivation::AfterEach(Activation::Relu),
                    bn: cfg.bn,
                };
                RefineConv::Separable(SeparableConv2d::new(cin, cfg.channels, &sc, vb)?)
            } else {
                RefineConv::Plain(ConvBnAct::new(
                    cin,
                    cfg.channels,
                    3,
                    geom,
                    cfg.bn,
                    Activation::Relu,
                    vb,
                )?)
            });
            cin = cfg.channels;
        }
        Ok(Self {
            project,
            convs,
            output_stride: cfg.output_stride,
            mode: ResizeMode::from_align_corners(cfg.align_corners),
            channels: cfg.channels,
        })
    }

    /// Output channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The size the decoder works at for an input image of `input_hw` whose low-level feature
    /// is `low_hw`.
    pub fn output_size(&self, input_hw: (usize, usize), low_hw: (usize, usize)) -> (usize, usize) {
        match self.mode {
            ResizeMode::AlignCorners => {
                let s = 1.0 / self.output_stride as f64;
                (
                    scale_dimension(input_hw.0, s),
                    scale_dimension(input_hw.1, s),
                )
            }
            _ => low_hw,
        }
    }

    /// Forward from the ASPP output and the low-level feature of an `input_hw` image; with `rec`,
    /// stores the official intermediate names (`decoder_feature_projection0`,
    /// `decoder_aspp_resized`, `decoder_lowlevel_resized`, `decoder_concat`,
    /// `decoder_conv{k}_depthwise`, `decoder_conv{k}`), NCHW.
    pub fn forward_rec(
        &self,
        aspp: &Tensor,
        low_level: &Tensor,
        input_hw: (usize, usize),
        train: bool,
        mut rec: Option<&mut Intermediates>,
    ) -> Result<Tensor> {
        let (_, _, lh, lw) = low_level.dims4()?;
        let proj = self.project.forward_t(low_level, train)?;
        let size = self.output_size(input_hw, (lh, lw));
        let resize = |t: &Tensor| -> Result<Tensor> {
            let (_, _, h, w) = t.dims4()?;
            if (h, w) == size {
                Ok(t.clone())
            } else {
                resize_bilinear(t, size, self.mode)
            }
        };
        let aspp_r = resize(aspp)?;
        let low_r = resize(&proj)?;
        let mut x = Tensor::cat(&[&aspp_r, &low_r], 1)?;
        if let Some(r) = rec.as_deref_mut() {
            r.insert("decoder_feature_projection0", &proj);
            r.insert("decoder_aspp_resized", &aspp_r);
            r.insert("decoder_lowlevel_resized", &low_r);
            r.insert("decoder_concat", &x);
        }
        for (k, conv) in self.convs.iter().enumerate() {
            x = match conv {
                RefineConv::Plain(c) => c.forward_t(&x, train)?,
                // Only a recording needs the depthwise activation: otherwise the layer may
                // run its two convolutions as one op.
                RefineConv::Separable(s) => match rec.as_deref_mut() {
                    Some(r) => {
                        let (d, p) = s.forward_parts(&x, train)?;
                        r.insert(&format!("decoder_conv{k}_depthwise"), &d);
                        p
                    }
                    None => s.forward_t(&x, train)?,
                },
            };
            if let Some(r) = rec.as_deref_mut() {
                r.insert(&format!("decoder_conv{k}"), &x);
            }
        }
        Ok(x)
    }

    /// Counts multiply-adds: the projection at the low-level size, the refinement convs at the
    /// decoder size. Returns the decoder size.
    pub fn count(
        &self,
        input_hw: (usize, usize),
        low_hw: (usize, usize),
        c: &mut MacCounter,
    ) -> Result<(usize, usize)> {
        self.project.count(low_hw, c)?;
        let mut size = self.output_size(input_hw, low_hw);
        for conv in &self.convs {
            size = match conv {
                RefineConv::Plain(p) => p.count(size, c)?,
                RefineConv::Separable(s) => s.count(size, c)?,
            };
        }
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn cfg(align_corners: bool) -> DecoderConfig {
        DecoderConfig {
            in_channels: 8,
            low_level_channels: 6,
            projection_channels: 3,
            channels: 5,
            num_convs: 2,
            separable: true,
            output_stride: 4,
            align_corners,
            bn: BatchNormConfig::tf_head(),
        }
    }

    #[test]
    fn works_at_the_official_or_the_low_level_size() -> Result<()> {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let official = Decoder::new(&cfg(true), vb.clone())?;
        let torch = Decoder::new(&cfg(false), vb.clone())?;
        // 130 -> scale_dimension(130, 1/4) = 33 whatever the low-level map is.
        assert_eq!(official.output_size((130, 129), (33, 32)), (33, 33));
        assert_eq!(torch.output_size((130, 129), (33, 32)), (33, 32));
        let aspp = Tensor::ones((1, 8, 9, 9), DType::F32, &Device::Cpu)?;
        let low = Tensor::ones((1, 6, 33, 32), DType::F32, &Device::Cpu)?;
        let mut rec = Intermediates::default();
        let y = official.forward_rec(&aspp, &low, (130, 129), false, Some(&mut rec))?;
        assert_eq!(y.dims(), &[1, 5, 33, 33]);
        assert_eq!(
            rec.get("decoder_concat").map(|t| t.dims().to_vec()),
            Some(vec![1, 11, 33, 33])
        );
        assert!(rec.get("decoder_conv1_depthwise").is_some());
        assert_eq!(
            torch
                .forward_rec(&aspp, &low, (130, 129), false, None)?
                .dims(),
            &[1, 5, 33, 32]
        );
        Ok(())
    }

    #[test]
    fn conv_count_is_checked() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        for n in [0, 4] {
            let e = Decoder::new(
                &DecoderConfig {
                    num_convs: n,
                    ..cfg(true)
                },
                vb.clone(),
            )
            .unwrap_err();
            assert!(e.to_string().contains("1 to 3"), "{e}");
        }
    }
}
