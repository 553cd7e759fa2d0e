//! Helpers shared by the backbone builders: output-stride bookkeeping (strides turned into
//! atrous rates), TensorFlow `SAME` padding, channel rounding and the classifier head.
//!
//! Follows the output-stride rule of the official DeepLab `stack_blocks_dense`
//! (tensorflow/models `research/deeplab/core/xception.py`, slim `resnet_utils.py`,
//! `mobilenet.py`), which is also timm's: once the accumulated stride equals the output stride,
//! each further stride becomes 1 and multiplies the atrous rate of the layers *after* it; the
//! layer whose stride was removed keeps the rate it had. Loads no weights itself.

use candle_core::{bail, Result, Tensor};
use deeplab_ops::{Conv2dGeometry, Padding2d};

/// Turns nominal strides into (stride, rate) pairs for a target output stride.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StrideTracker {
    /// Accumulated stride so far.
    pub current: usize,
    /// Atrous rate applied to stride-1 layers from here on.
    pub rate: usize,
    /// The target output stride.
    pub target: usize,
}

impl StrideTracker {
    /// Starts after a stem of `stem_stride`.
    pub fn new(stem_stride: usize, target: usize) -> Self {
        Self {
            current: stem_stride,
            rate: 1,
            target,
        }
    }

    /// Takes one unit of nominal `stride`; returns the unit's (stride, rate).
    pub fn unit(&mut self, stride: usize) -> Result<(usize, usize)> {
        if stride == 0 {
            bail!("a unit stride must be positive")
        }
        if self.current > self.target {
            bail!(
                "output stride {} cannot be reached: already at stride {}",
                self.target,
                self.current
            )
        }
        let rate = self.rate;
        if self.current == self.target {
            self.rate *= stride;
            Ok((1, rate))
        } else {
            self.current *= stride;
            Ok((stride, rate))
        }
    }

    /// Fails unless the accumulated stride equals the target.
    pub fn finish(&self) -> Result<()> {
        if self.current != self.target {
            bail!(
                "output stride {} cannot be reached: the network's total stride is {}",
                self.target,
                self.current
            )
        }
        Ok(())
    }
}

/// TensorFlow's `SAME` padding of one axis for a window of `k` at `stride` and `dilation`:
/// output `ceil(n / stride)`, total padding split with the smaller half before.
fn same_axis(n: usize, k: usize, stride: usize, dilation: usize) -> (usize, usize) {
    let out = n.div_ceil(stride);
    let span = (k - 1) * dilation + 1;
    let total = ((out.max(1) - 1) * stride + span).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// The geometry of a TensorFlow `SAME` convolution on an `input` map (asymmetric, bottom /
/// right heavier, when the input size and stride make the total padding odd).
pub(crate) fn tf_same_geometry(
    input: (usize, usize),
    k: usize,
    stride: usize,
    dilation: usize,
) -> Conv2dGeometry {
    let (top, bottom) = same_axis(input.0, k, stride, dilation);
    let (left, right) = same_axis(input.1, k, stride, dilation);
    Conv2dGeometry {
        stride: (stride, stride),
        dilation: (dilation, dilation),
        padding: Padding2d {
            top,
            bottom,
            left,
            right,
        },
    }
}

/// The channel rounding of the official MobileNet code and timm (`_make_divisible` /
/// `make_divisible`): the multiple of `divisor` nearest to `v` (halves up), at least
/// `divisor`, and bumped by one `divisor` when rounding lost more than 10%.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor.max(1);
    let rounded = ((v + d as f64 / 2.0) as usize / d) * d;
    let mut new_v = rounded.max(d);
    if (new_v as f64) < 0.9 * v {
        new_v += d;
    }
    new_v
}

/// Global average pooling of an NCHW tensor to `[N, C]`.
pub(crate) fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}

/// The spatial size of an NCHW tensor.
pub(crate) fn hw(x: &Tensor) -> Result<(usize, usize)> {
    let (_, _, h, w) = x.dims4()?;
    Ok((h, w))
}

/// Checks an NCHW input with `channels` channels.
pub(crate) fn check_input(x: &Tensor, channels: usize, what: &str) -> Result<()> {
    match x.dims() {
        [_, c, h, w] if *c == channels && *h > 0 && *w > 0 => Ok(()),
        d => bail!("{what}: expected an NCHW input with {channels} channels, got {d:?}"),
    }
}

/// Checks an input size given to a `count` / `feature_sizes`.
pub(crate) fn check_hw(input: (usize, usize), what: &str) -> Result<()> {
    if input.0 == 0 || input.1 == 0 {
        bail!("{what}: input size must be positive, got {input:?}")
    }
    Ok(())
}

/// Validates BatchNorm settings of a config.
pub(crate) fn check_bn(eps: f64, momentum: f64, what: &str) -> Result<()> {
    if !(eps > 0.0 && eps.is_finite()) {
        bail!("{what}: BatchNorm epsilon must be positive, got {eps}")
    }
    if !(0.0..=1.0).contains(&momentum) {
        bail!("{what}: BatchNorm momentum must be in [0, 1], got {momentum}")
    }
    Ok(())
}

/// Validates multi-grid rates against the number of layers they apply to.
pub(crate) fn check_multi_grid(mg: &Option<Vec<usize>>, len: usize, what: &str) -> Result<()> {
    if let Some(mg) = mg {
        if mg.len() != len || mg.contains(&0) {
            bail!("{what}: multi_grid must hold {len} positive rates, got {mg:?}")
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_divisible_matches_the_reference_rounding() {
        // timm / slim: make_divisible(32 * 0.5, 8) = 16, (24 * 0.5) = 16, (16 * 0.5) = 8,
        // (160 * 0.5) = 80, (24 * 0.75) = 24 (18 -> 16 would lose > 10%).
        assert_eq!(make_divisible(16.0, 8), 16);
        assert_eq!(make_divisible(12.0, 8), 16);
        assert_eq!(make_divisible(8.0, 8), 8);
        assert_eq!(make_divisible(80.0, 8), 80);
        assert_eq!(make_divisible(18.0, 8), 24);
        assert_eq!(make_divisible(3.0, 8), 8);
        // Divisor 1 (the official DeepLab MobileNetV2 at depth multiplier != 1).
        assert_eq!(make_divisible(12.0, 1), 12);
        assert_eq!(make_divisible(11.2, 1), 11);
    }

    #[test]
    fn tf_same_padding_is_asymmetric_for_even_inputs() {
        let g = tf_same_geometry((129, 128), 3, 2, 1);
        assert_eq!(
            g.padding,
            Padding2d {
                top: 1,
                bottom: 1,
                left: 0,
                right: 1
            }
        );
        assert_eq!(g.output_size((129, 128), (3, 3)).unwrap(), (65, 64));
        // Stride 1, dilation 2: symmetric (k - 1) * d / 2.
        let g = tf_same_geometry((9, 10), 3, 1, 2);
        assert_eq!(g.padding, Padding2d::uniform(2));
    }

    #[test]
    fn stride_tracker_follows_the_official_rule() {
        // Xception-65 at OS16: stem 2, entry strides 2, 2, 2, exit block 1 stride 2.
        let mut t = StrideTracker::new(2, 16);
        assert_eq!(t.unit(2).unwrap(), (2, 1));
        assert_eq!(t.unit(2).unwrap(), (2, 1));
        assert_eq!(t.unit(2).unwrap(), (2, 1));
        assert_eq!(t.unit(1).unwrap(), (1, 1));
        assert_eq!(t.unit(2).unwrap(), (1, 1)); // stride removed, keeps rate 1
        assert_eq!(t.unit(1).unwrap(), (1, 2)); // exit block 2 at rate 2
        t.finish().unwrap();
        let mut t = StrideTracker::new(2, 64);
        t.unit(2).unwrap();
        assert!(t.finish().is_err());
    }
}
