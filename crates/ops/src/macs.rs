//! Multiply-add counting with the convention of the DeepLab paper and model zoo.
//!
//! The published numbers are the TensorFlow profiler's FLOPs / 2 at a 513x513 input. For a
//! convolution that is `output positions x kh x kw x Cin-per-group x Cout` (depthwise:
//! Cin-per-group = 1). TensorFlow runs an atrous convolution with rate r > 1 as
//! space-to-batch on a grid padded to a multiple of r, so its output positions are counted as
//! `ceil(H / r) * r x ceil(W / r) * r` (a 33x33 map at rate 6 counts as 36x36). BatchNorm,
//! activations, resizes, concatenations, additions and pooling are not counted. Counted this
//! way the official graphs land 0.07-0.35% below the published numbers (TF also counts bias
//! adds and element-wise ops).

/// Accumulates multiply-adds and parameters of convolutions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MacCounter {
    /// Multiply-adds so far.
    pub macs: u64,
    /// Convolution weights so far.
    pub conv_params: u64,
}

impl MacCounter {
    /// A zeroed counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one convolution producing an `out` map with the given kernel, input channels per
    /// group, output channels and (vertical, horizontal) rate.
    pub fn conv(
        &mut self,
        out: (usize, usize),
        kernel: (usize, usize),
        cin_per_group: usize,
        cout: usize,
        rate: (usize, usize),
    ) {
        let pos = |d: usize, r: usize| if r > 1 { d.div_ceil(r) * r } else { d };
        let positions = (pos(out.0, rate.0) * pos(out.1, rate.1)) as u64;
        let per = (kernel.0 * kernel.1 * cin_per_group * cout) as u64;
        self.macs += positions * per;
        self.conv_params += per;
    }

    /// Multiply-adds in billions.
    pub fn gmacs(&self) -> f64 {
        self.macs as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atrous_positions_are_rounded_up_to_the_rate() {
        let mut c = MacCounter::new();
        c.conv((33, 33), (3, 3), 1, 1, (6, 6));
        assert_eq!(c.macs, 36 * 36 * 9);
        let mut c = MacCounter::new();
        c.conv((33, 33), (3, 3), 1, 1, (1, 1));
        assert_eq!(c.macs, 33 * 33 * 9);
    }
}
