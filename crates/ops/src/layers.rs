//! Convolution layers built on this crate's ops, named like timm / PyTorch modules so their
//! checkpoints load with no renaming: `Conv2d` (`weight`, `bias`), `DepthwiseConv2d`,
//! `SeparableConv2d` (`conv_dw`, `bn_dw`, `conv_pw`, `bn_pw`, as timm's `xception_aligned`) and
//! `ConvBnAct` (`conv`, `bn`).

use crate::batch_norm::{Activation, BatchNorm2d, BatchNormConfig, Epilogue};
use crate::geometry::Conv2dGeometry;
use crate::macs::MacCounter;
use crate::pointwise::ConcatInput;
use candle_core::{bail, Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Kaiming-normal (fan-out, ReLU gain) initialization, as torchvision and timm use for convs.
fn kaiming(cout: usize, k: usize) -> Init {
    let fan_out = (cout * k) as f64;
    Init::Randn {
        mean: 0.0,
        stdev: (2.0 / fan_out).sqrt(),
    }
}

/// A dense (or grouped) 2-D convolution `weight: [Cout, Cin / groups, kh, kw]`, optional `bias`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    geom: Conv2dGeometry,
    groups: usize,
    /// A folded BatchNorm (and activation), applied in one pass with the bias.
    epilogue: Option<Box<Epilogue>>,
}

impl Conv2d {
    /// Loads (or initializes) a `cin -> cout` convolution with a square `k x k` kernel.
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        geom: Conv2dGeometry,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::grouped(cin, cout, k, geom, 1, bias, vb)
    }

    /// A grouped convolution.
    pub fn grouped(
        cin: usize,
        cout: usize,
        k: usize,
        geom: Conv2dGeometry,
        groups: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        geom.validate()?;
        if groups == 0 || !cin.is_multiple_of(groups) || !cout.is_multiple_of(groups) {
            bail!("conv2d: {cin} -> {cout} channels cannot be split into {groups} groups")
        }
        let weight =
            vb.get_with_hints((cout, cin / groups, k, k), "weight", kaiming(cout, k * k))?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            geom,
            groups,
            epilogue: None,
        })
    }

    /// Builds from existing tensors.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>, geom: Conv2dGeometry) -> Self {
        Self {
            weight,
            bias,
            geom,
            groups: 1,
            epilogue: None,
        }
    }

    /// Folds `bn` (the BatchNorm after this convolution, with its activation) into this
    /// layer's output pass for inference; `bn` becomes the identity (see
    /// [`BatchNorm2d::fold`]).
    pub fn fold_bn(&mut self, bn: &mut BatchNorm2d) -> Result<()> {
        if self.epilogue.is_some() {
            bail!("conv2d: a BatchNorm was already folded into this layer")
        }
        self.epilogue = Some(Box::new(Epilogue::fold(bn, self.bias.as_ref())?));
        self.bias = None;
        Ok(())
    }

    /// The folded BatchNorm epilogue, if any.
    pub fn epilogue(&self) -> Option<&Epilogue> {
        self.epilogue.as_deref()
    }

    /// The weight `[Cout, Cin / groups, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Stride, dilation and padding.
    pub fn geometry(&self) -> &Conv2dGeometry {
        &self.geom
    }

    /// Counts this layer's multiply-adds for an `input` map; returns the output size.
    pub fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<(usize, usize)> {
        let (cout, cin_g, kh, kw) = self.weight.dims4()?;
        let out = self.geom.output_size(input, (kh, kw))?;
        c.conv(out, (kh, kw), cin_g, cout, self.geom.dilation);
        Ok(out)
    }

    /// `act(self.forward(x) + residual)`, a residual block's last convolution, add and
    /// activation: with a folded BatchNorm that has no activation of its own (and f32 CPU
    /// tensors, one group) the add and `act` happen in the product's epilogue, otherwise as
    /// separate ops. The two agree bit for bit.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor, act: Activation) -> Result<Tensor> {
        match &self.epilogue {
            Some(e) if self.groups == 1 => e.conv2d_add(x, &self.weight, &self.geom, residual, act),
            _ => act.apply(&(self.forward(x)? + residual)?),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.epilogue {
            // folding moved any bias into the epilogue's shift
            Some(e) if self.groups == 1 => e.conv2d(x, &self.weight, &self.geom),
            e => {
                let y = crate::profile::record_conv(
                    ["conv 1x1", "conv kxk"],
                    x,
                    &self.weight,
                    &self.geom,
                    || {
                        crate::conv::conv2d(
                            x,
                            &self.weight,
                            self.bias.as_ref(),
                            &self.geom,
                            self.groups,
                        )
                    },
                )?;
                match e {
                    Some(e) => e.apply(&y),
                    None => Ok(y),
                }
            }
        }
    }
}

impl Conv2d {
    /// This convolution as [`BatchNorm2d::forward_after`] fuses it with the BatchNorm after it
    /// in training: its weights and kind, when it has one group, no bias and nothing folded.
    pub fn train_conv(&self) -> Option<(&Tensor, crate::TrainConv)> {
        (self.groups == 1 && self.bias.is_none() && self.epilogue.is_none())
            .then_some((&self.weight, crate::TrainConv::Dense(self.geom)))
    }
}

/// `bn(conv(x))`: in training, on f32 CPU tensors, one autograd node (see
/// [`BatchNorm2d::forward_after`]); the same values as `bn.forward_t(&conv.forward(x)?, train)`.
pub fn conv_bn(conv: &Conv2d, bn: &BatchNorm2d, x: &Tensor, train: bool) -> Result<Tensor> {
    bn.forward_after(x, conv.train_conv(), |x| conv.forward(x), train)
}

/// `act(bn(conv(x)) + residual)`, the tail of a residual block: in inference with `bn`
/// folded into `conv` the add and the activation run in the convolution's epilogue
/// ([`Conv2d::forward_add`]), otherwise as separate ops; the two agree bit for bit.
pub fn conv_bn_add(
    conv: &Conv2d,
    bn: &BatchNorm2d,
    x: &Tensor,
    residual: &Tensor,
    act: Activation,
    train: bool,
) -> Result<Tensor> {
    if bn.is_folded() && !train {
        conv.forward_add(x, residual, act)
    } else {
        act.apply(&(conv_bn(conv, bn, x, train)? + residual)?)
    }
}

/// A depthwise convolution `weight: [C, 1, kh, kw]` on the fast depthwise kernel.
#[derive(Clone, Debug)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    geom: Conv2dGeometry,
    /// A folded BatchNorm (and activation), set by [`DepthwiseConv2d::fold_bn`].
    epilogue: Option<Box<Epilogue>>,
    /// ReLU applied to the input while it is read (Xception's pre-activation), set by
    /// [`SeparableConv2d`]'s folding.
    input_relu: bool,
}

impl DepthwiseConv2d {
    /// Loads (or initializes) a `k x k` depthwise convolution over `channels`.
    pub fn new(channels: usize, k: usize, geom: Conv2dGeometry, vb: VarBuilder) -> Result<Self> {
        geom.validate()?;
        let weight = vb.get_with_hints((channels, 1, k, k), "weight", kaiming(1, k * k))?;
        Ok(Self {
            weight,
            geom,
            epilogue: None,
            input_relu: false,
        })
    }

    /// Folds `bn` (the BatchNorm after this convolution, with its activation) into this
    /// layer's output pass for inference; `bn` becomes the identity.
    pub fn fold_bn(&mut self, bn: &mut BatchNorm2d) -> Result<()> {
        if self.epilogue.is_some() {
            bail!("depthwise_conv2d: a BatchNorm was already folded into this layer")
        }
        self.epilogue = Some(Box::new(Epilogue::fold(bn, None)?));
        Ok(())
    }

    /// The folded BatchNorm epilogue, if any.
    pub fn epilogue(&self) -> Option<&Epilogue> {
        self.epilogue.as_deref()
    }

    /// The weight `[C, 1, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Stride, dilation and padding.
    pub fn geometry(&self) -> &Conv2dGeometry {
        &self.geom
    }

    /// Counts this layer's multiply-adds for an `input` map; returns the output size.
    pub fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<(usize, usize)> {
        let (ch, _, kh, kw) = self.weight.dims4()?;
        let out = self.geom.output_size(input, (kh, kw))?;
        c.conv(out, (kh, kw), 1, ch, self.geom.dilation);
        Ok(out)
    }

    /// `depthwise(relu(x))` (Xception's ReLU before a separable convolution) without a folded
    /// BatchNorm: on f32 CPU tensors one fused op whose kernels apply the ReLU as they read
    /// (no `relu(x)` tensor, one graph node); elsewhere the ReLU, then [`Module::forward`].
    pub fn forward_relu_input(&self, x: &Tensor) -> Result<Tensor> {
        if self.epilogue.is_some() || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
            return self.forward(&Activation::Relu.apply(x)?);
        }
        crate::profile::record(
            "depthwise",
            || crate::profile::depthwise_detail(x.dims(), &self.geom, true),
            || {
                crate::depthwise::depthwise_conv2d_fused(
                    x,
                    &self.weight,
                    None,
                    true,
                    Activation::None,
                    &self.geom,
                )
            },
        )
    }
}

impl DepthwiseConv2d {
    /// This convolution as [`BatchNorm2d::forward_after`] fuses it with the BatchNorm after it
    /// in training (with a ReLU on its input when `relu_input`): its weights and kind, when
    /// nothing is folded into it.
    pub fn train_conv(&self, relu_input: bool) -> Option<(&Tensor, crate::TrainConv)> {
        self.epilogue.is_none().then_some((
            &self.weight,
            crate::TrainConv::Depthwise {
                geom: self.geom,
                input_relu: relu_input || self.input_relu,
            },
        ))
    }
}

impl Module for DepthwiseConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(e) = &self.epilogue {
            return e.depthwise_conv2d(x, &self.weight, &self.geom, self.input_relu);
        }
        let x = if self.input_relu {
            Activation::Relu.apply(x)?
        } else {
            x.clone()
        };
        crate::profile::record(
            "depthwise",
            || crate::profile::depthwise_detail(x.dims(), &self.geom, false),
            || crate::depthwise::depthwise_conv2d(&x, &self.weight, &self.geom),
        )
    }
}

/// Inference-time BatchNorm folding: every BatchNorm of a layer (or model) is folded into the
/// convolution before it, whose output pass then applies the BatchNorm's per-channel scale
/// and shift and its activation (see [`BatchNorm2d::fold`] for why the weights are not
/// rescaled). Evaluation-mode outputs are unchanged, with fewer passes over memory; the
/// folded model cannot train (training-mode forwards of a folded BatchNorm are an error).
/// Fold once, after loading the weights.
pub trait FoldBatchNorm {
    /// Folds every BatchNorm of `self` into its preceding convolution.
    fn fold_batch_norm(&mut self) -> Result<()>;
}

/// Where a [`SeparableConv2d`] applies its activation. The official DeepLab uses all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SeparableActivation {
    /// ReLU on the input, none after the BatchNorms (Xception entry and middle flow,
    /// `activation_fn_in_separable_conv=False`).
    Input,
    /// An activation after each BatchNorm (Xception exit block 2, ASPP and decoder).
    AfterEach(Activation),
    /// No activation anywhere.
    None,
}

/// Hyper-parameters of a [`SeparableConv2d`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeparableConv2dConfig {
    /// Depthwise kernel size (square).
    pub kernel: usize,
    /// Stride, dilation and padding of the depthwise convolution.
    pub geom: Conv2dGeometry,
    /// Activation placement.
    pub act: SeparableActivation,
    /// BatchNorm epsilon and momentum of both BatchNorms.
    pub bn: BatchNormConfig,
}

/// Depthwise conv -> BN -> (act) -> pointwise 1x1 conv -> BN -> (act), timm's names. With
/// both BatchNorms folded, inference runs the two convolutions as one op
/// ([`crate::separable_epilogue`]: the depthwise activation is never stored) unless the
/// depthwise output is asked for ([`SeparableConv2d::forward_parts`]).
#[derive(Clone, Debug)]
pub struct SeparableConv2d {
    conv_dw: DepthwiseConv2d,
    bn_dw: BatchNorm2d,
    conv_pw: Conv2d,
    bn_pw: BatchNorm2d,
    act: SeparableActivation,
}

impl SeparableConv2d {
    /// Loads (or initializes) a `cin -> cout` separable convolution.
    pub fn new(
        cin: usize,
        cout: usize,
        cfg: &SeparableConv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv_dw = DepthwiseConv2d::new(cin, cfg.kernel, cfg.geom, vb.pp("conv_dw"))?;
        let post = match cfg.act {
            SeparableActivation::AfterEach(a) => a,
            _ => Activation::None,
        };
        let bn_dw = BatchNorm2d::new(cin, cfg.bn, vb.pp("bn_dw"))?.with_activation(post);
        let conv_pw = Conv2d::new(
            cin,
            cout,
            1,
            Conv2dGeometry::default(),
            false,
            vb.pp("conv_pw"),
        )?;
        let bn_pw = BatchNorm2d::new(cout, cfg.bn, vb.pp("bn_pw"))?.with_activation(post);
        Ok(Self {
            conv_dw,
            bn_dw,
            conv_pw,
            bn_pw,
            act: cfg.act,
        })
    }

    /// Output of the depthwise BatchNorm (after its activation, if any) and of the whole layer.
    /// Xception's decoder tap is the pointwise BN output of a specific layer.
    pub fn forward_parts(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let d = self.depthwise_part(x, train)?;
        let p = conv_bn(&self.conv_pw, &self.bn_pw, &d, train)?;
        Ok((d, p))
    }

    /// `self(x) + residual` (an Xception unit's tail): in inference with the BatchNorms folded
    /// (and no activation after the pointwise one) the add runs in the pointwise
    /// convolution's epilogue, with the same bits as the separate add.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(y) = self.fused(x, Some(residual), train)? {
            return Ok(y);
        }
        let d = self.depthwise_part(x, train)?;
        conv_bn_add(
            &self.conv_pw,
            &self.bn_pw,
            &d,
            residual,
            Activation::None,
            train,
        )
    }

    /// Inference with both BatchNorms folded: the two convolutions as one op
    /// ([`crate::separable_epilogue`], the same bits as running them in turn), plus `residual`
    /// when given; `None` otherwise.
    fn fused(&self, x: &Tensor, residual: Option<&Tensor>, train: bool) -> Result<Option<Tensor>> {
        let (Some(de), Some(pe), false) = (self.conv_dw.epilogue(), self.conv_pw.epilogue(), train)
        else {
            return Ok(None);
        };
        let dw = crate::DepthwisePart {
            weight: &self.conv_dw.weight,
            epilogue: de,
            geom: &self.conv_dw.geom,
            input_relu: self.conv_dw.input_relu,
        };
        let residual = residual.map(|r| (r, Activation::None));
        crate::separable_epilogue(x, dw, (self.conv_pw.weight(), pe), residual).map(Some)
    }

    /// The depthwise convolution and its BatchNorm (and activation).
    fn depthwise_part(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // once folded, the depthwise conv applies the input ReLU as it reads
        let relu_input = self.act == SeparableActivation::Input && !self.bn_dw.is_folded();
        self.bn_dw.forward_after(
            x,
            self.conv_dw.train_conv(relu_input),
            |x| {
                if relu_input {
                    self.conv_dw.forward_relu_input(x)
                } else {
                    self.conv_dw.forward(x)
                }
            },
            train,
        )
    }

    /// Counts this layer's multiply-adds for an `input` map; returns the output size.
    pub fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<(usize, usize)> {
        let out = self.conv_dw.count(input, c)?;
        self.conv_pw.count(out, c)
    }
}

impl FoldBatchNorm for SeparableConv2d {
    fn fold_batch_norm(&mut self) -> Result<()> {
        self.conv_dw.fold_bn(&mut self.bn_dw)?;
        self.conv_pw.fold_bn(&mut self.bn_pw)?;
        if self.act == SeparableActivation::Input {
            self.conv_dw.input_relu = true;
        }
        Ok(())
    }
}

impl ModuleT for SeparableConv2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(y) = self.fused(x, None, train)? {
            return Ok(y);
        }
        Ok(self.forward_parts(x, train)?.1)
    }
}

/// Conv -> BatchNorm -> activation, timm's `ConvNormAct` names (`conv`, `bn`).
#[derive(Clone, Debug)]
pub struct ConvBnAct {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBnAct {
    /// Loads (or initializes) a bias-free `cin -> cout` `k x k` convolution with BN and `act`.
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        geom: Conv2dGeometry,
        bn: BatchNormConfig,
        act: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv = Conv2d::new(cin, cout, k, geom, false, vb.pp("conv"))?;
        let bn = BatchNorm2d::new(cout, bn, vb.pp("bn"))?.with_activation(act);
        Ok(Self { conv, bn })
    }

    /// Builds from an existing conv and BN.
    pub fn from_parts(conv: Conv2d, bn: BatchNorm2d) -> Self {
        Self { conv, bn }
    }

    /// `self(concat(parts))` over the channel concatenation of `parts` (the maps' pixels,
    /// constants broadcast to them): with the BatchNorm folded, in inference, on f32 CPU
    /// tensors, a 1x1 convolution runs without building the concatenation (one product per
    /// map accumulating into the output, constants at the front as per-channel starting sums;
    /// the same bits); otherwise the concatenation, then [`ModuleT::forward_t`].
    pub fn forward_concat(&self, parts: &[ConcatInput<'_>], train: bool) -> Result<Tensor> {
        if let (Some(e), false, true) = (
            self.conv.epilogue(),
            train,
            self.conv.geom.is_pointwise((1, 1)) && self.conv.groups == 1,
        ) {
            if let Some(y) = crate::pointwise::concat_epilogue(parts, &self.conv.weight, e)? {
                return Ok(y);
            }
        }
        let Some((n, h, w)) = parts.iter().find_map(|p| match p {
            ConcatInput::Map(t) => t.dims4().ok().map(|(n, _, h, w)| (n, h, w)),
            ConcatInput::Constant(_) => None,
        }) else {
            bail!("conv over a concatenation: no map among the parts")
        };
        let maps = parts
            .iter()
            .map(|p| match p {
                ConcatInput::Map(t) => Ok((*t).clone()),
                ConcatInput::Constant(t) => {
                    let c = t.dim(1)?;
                    t.broadcast_as((n, c, h, w))?.contiguous()
                }
            })
            .collect::<Result<Vec<_>>>()?;
        self.forward_t(&Tensor::cat(&maps, 1)?, train)
    }

    /// Counts this layer's multiply-adds for an `input` map; returns the output size.
    pub fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<(usize, usize)> {
        self.conv.count(input, c)
    }
}

impl FoldBatchNorm for ConvBnAct {
    fn fold_batch_norm(&mut self) -> Result<()> {
        self.conv.fold_bn(&mut self.bn)
    }
}

impl ModuleT for ConvBnAct {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        conv_bn(&self.conv, &self.bn, x, train)
    }
}
