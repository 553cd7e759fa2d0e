//! Convolution geometry: explicit (possibly asymmetric) padding, stride, dilation and output sizes.
//!
//! TensorFlow DeepLab pads strided convolutions explicitly (`fixed_padding` in
//! `research/deeplab/core/xception.py` and `resnet_v1_beta.py`) and then runs them with `VALID`
//! padding; stride-1 convolutions use `SAME`, which for odd kernels is symmetric. Both are
//! expressed here as a [`Padding2d`] with independent top/bottom/left/right amounts.

use candle_core::{bail, Result};

/// Zero padding on each side of the two spatial axes of an NCHW tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Padding2d {
    /// Rows added above the input.
    pub top: usize,
    /// Rows added below the input.
    pub bottom: usize,
    /// Columns added left of the input.
    pub left: usize,
    /// Columns added right of the input.
    pub right: usize,
}

impl Padding2d {
    /// No padding (TensorFlow `VALID`).
    pub const ZERO: Padding2d = Padding2d {
        top: 0,
        bottom: 0,
        left: 0,
        right: 0,
    };

    /// The same amount on every side.
    pub fn uniform(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    /// Symmetric padding with separate vertical and horizontal amounts.
    pub fn symmetric(ph: usize, pw: usize) -> Self {
        Self {
            top: ph,
            bottom: ph,
            left: pw,
            right: pw,
        }
    }

    /// TensorFlow DeepLab's `fixed_padding`: pads `k_eff - 1` in total, `floor` of half before
    /// and the rest after, where `k_eff = k + (k - 1) * (rate - 1)`. Applied before every strided
    /// convolution of the official backbones, whatever the input size. For odd kernels at
    /// stride 1 it equals `SAME` padding.
    pub fn fixed(kernel: (usize, usize), dilation: (usize, usize)) -> Self {
        let total = |k: usize, d: usize| (k - 1) * d;
        let (th, tw) = (total(kernel.0, dilation.0), total(kernel.1, dilation.1));
        Self {
            top: th / 2,
            bottom: th - th / 2,
            left: tw / 2,
            right: tw - tw / 2,
        }
    }

    /// `true` when top == bottom and left == right.
    pub fn is_symmetric(&self) -> bool {
        self.top == self.bottom && self.left == self.right
    }

    /// `true` when no side is padded.
    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }
}

/// Stride, dilation and padding of a 2-D convolution or pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dGeometry {
    /// Vertical and horizontal stride.
    pub stride: (usize, usize),
    /// Vertical and horizontal dilation (atrous rate).
    pub dilation: (usize, usize),
    /// Explicit zero padding.
    pub padding: Padding2d,
}

impl Default for Conv2dGeometry {
    fn default() -> Self {
        Self {
            stride: (1, 1),
            dilation: (1, 1),
            padding: Padding2d::ZERO,
        }
    }
}

impl Conv2dGeometry {
    /// Stride-1 convolution at `rate` with `SAME` padding for a `k x k` kernel (k odd).
    pub fn same(k: usize, rate: usize) -> Self {
        Self {
            stride: (1, 1),
            dilation: (rate, rate),
            padding: Padding2d::uniform((k - 1) * rate / 2),
        }
    }

    /// The official DeepLab convention for a `k x k` kernel: stride 1 uses `SAME`, stride > 1
    /// uses [`Padding2d::fixed`] then `VALID`.
    pub fn deeplab(k: usize, stride: usize, rate: usize) -> Self {
        Self {
            stride: (stride, stride),
            dilation: (rate, rate),
            padding: Padding2d::fixed((k, k), (rate, rate)),
        }
    }

    /// Whether a `kernel`-sized convolution with this geometry is pointwise: 1x1, stride 1, no
    /// padding (its patch matrix is the input itself).
    pub fn is_pointwise(&self, kernel: (usize, usize)) -> bool {
        kernel == (1, 1) && self.stride == (1, 1) && self.padding.is_zero()
    }

    /// Rejects zero strides and dilations.
    pub fn validate(&self) -> Result<()> {
        if self.stride.0 == 0 || self.stride.1 == 0 {
            bail!("convolution stride must be positive, got {:?}", self.stride)
        }
        if self.dilation.0 == 0 || self.dilation.1 == 0 {
            bail!(
                "convolution dilation must be positive, got {:?}",
                self.dilation
            )
        }
        Ok(())
    }

    /// Output spatial size for an input of `(h, w)` and a `(kh, kw)` window.
    pub fn output_size(
        &self,
        input: (usize, usize),
        kernel: (usize, usize),
    ) -> Result<(usize, usize)> {
        self.validate()?;
        let one = |i: usize, k: usize, s: usize, d: usize, pb: usize, pa: usize, axis: &str| {
            let padded = i + pb + pa;
            let span = (k - 1) * d + 1;
            if k == 0 || padded < span {
                bail!(
                    "{axis}: input {i} padded by ({pb}, {pa}) is smaller than the kernel {k} at dilation {d} (span {span})"
                )
            }
            Ok((padded - span) / s + 1)
        };
        let p = &self.padding;
        Ok((
            one(
                input.0,
                kernel.0,
                self.stride.0,
                self.dilation.0,
                p.top,
                p.bottom,
                "height",
            )?,
            one(
                input.1,
                kernel.1,
                self.stride.1,
                self.dilation.1,
                p.left,
                p.right,
                "width",
            )?,
        ))
    }
}

/// TensorFlow DeepLab's `scale_dimension`: the size of a feature map of a `dim`-sized input at
/// `scale` (e.g. 1/16), `floor((dim - 1) * scale + 1)`. With align-corners resizes this is
/// the size every official feature map has (513 -> 129 at stride 4, 33 at stride 16).
pub fn scale_dimension(dim: usize, scale: f64) -> usize {
    ((dim as f64 - 1.0) * scale + 1.0).floor() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_padding_matches_tensorflow() {
        // k=3 rate=1: total 2 -> (1, 1); k=3 rate=2: total 4 -> (2, 2); k=4: total 3 -> (1, 2).
        assert_eq!(Padding2d::fixed((3, 3), (1, 1)), Padding2d::uniform(1));
        assert_eq!(Padding2d::fixed((3, 3), (2, 2)), Padding2d::uniform(2));
        let p = Padding2d::fixed((4, 1), (1, 1));
        assert_eq!((p.top, p.bottom, p.left, p.right), (1, 2, 0, 0));
    }

    #[test]
    fn output_sizes() -> Result<()> {
        let g = Conv2dGeometry::deeplab(3, 2, 1);
        assert_eq!(g.output_size((513, 513), (3, 3))?, (257, 257));
        assert_eq!(g.output_size((10, 9), (3, 3))?, (5, 5));
        assert_eq!(
            Conv2dGeometry::same(3, 12).output_size((33, 33), (3, 3))?,
            (33, 33)
        );
        assert!(Conv2dGeometry::default()
            .output_size((2, 2), (3, 3))
            .is_err());
        Ok(())
    }

    #[test]
    fn scale_dimension_matches_official() {
        assert_eq!(scale_dimension(513, 0.25), 129);
        assert_eq!(scale_dimension(513, 1.0 / 16.0), 33);
        assert_eq!(scale_dimension(513, 1.0 / 8.0), 65);
        assert_eq!(scale_dimension(129, 1.0 / 16.0), 9);
    }
}
