//! The "poly" learning-rate schedule of DeepLab (DeepLabv2 §4 / DeepLabv3 §4.1; official
//! `research/deeplab/utils/train_utils.py` `get_model_learning_rate` with
//! `learning_policy='poly'`): `lr(step) = base_lr * (1 - step / total_steps) ^ power`, i.e.
//! TensorFlow's `polynomial_decay` with an end learning rate of 0, with an optional linear
//! warm-up.

use serde::{Deserialize, Serialize};

/// The poly schedule: `base_lr * (1 - step / total_steps) ^ power` for `step` in
/// `0..total_steps`, optionally ramped up linearly from `base_lr * warmup_start` during the first
/// `warmup_steps` steps (no warm-up in the official schedule).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolySchedule {
    /// Learning rate at step 0 (the official default is 0.007 for VOC).
    pub base_lr: f64,
    /// Exponent (0.9 in every DeepLab paper).
    pub power: f64,
    /// Number of training steps; the rate reaches 0 at this step.
    pub total_steps: usize,
    /// Steps of linear warm-up (0: none).
    pub warmup_steps: usize,
    /// Fraction of the rate at step 0 when warming up.
    pub warmup_start: f64,
}

impl PolySchedule {
    /// The official schedule: power 0.9, no warm-up. Fails on a non-positive or non-finite
    /// learning rate or a zero step count.
    pub fn new(base_lr: f64, power: f64, total_steps: usize) -> Result<Self, String> {
        let s = Self {
            base_lr,
            power,
            total_steps,
            warmup_steps: 0,
            warmup_start: 0.1,
        };
        s.validate()?;
        Ok(s)
    }

    /// The same schedule with a linear warm-up over `steps` steps starting at `start * base_lr`.
    pub fn with_warmup(mut self, steps: usize, start: f64) -> Result<Self, String> {
        self.warmup_steps = steps;
        self.warmup_start = start;
        self.validate()?;
        Ok(self)
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.base_lr.is_finite() && self.base_lr > 0.0) {
            return Err(format!("--lr {} must be a positive number", self.base_lr));
        }
        if !(self.power.is_finite() && self.power >= 0.0) {
            return Err(format!(
                "--lr-power {} must be a non-negative number",
                self.power
            ));
        }
        if self.total_steps == 0 {
            return Err("--steps must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.warmup_start) {
            return Err(format!(
                "warm-up start fraction {} must be in [0, 1]",
                self.warmup_start
            ));
        }
        Ok(())
    }

    /// The learning rate used for the update of `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        let t = (step.min(self.total_steps)) as f64 / self.total_steps as f64;
        let poly = self.base_lr * (1.0 - t).powf(self.power);
        if step < self.warmup_steps {
            let f = self.warmup_start
                + (1.0 - self.warmup_start) * step as f64 / self.warmup_steps as f64;
            poly * f
        } else {
            poly
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_values() {
        let s = PolySchedule::new(0.007, 0.9, 100).unwrap();
        assert_eq!(s.lr(0), 0.007);
        let mid = 0.007 * 0.5f64.powf(0.9);
        assert!((s.lr(50) - mid).abs() < 1e-15);
        assert_eq!(s.lr(100), 0.0);
        assert_eq!(s.lr(1000), 0.0);
        // monotonically decreasing
        assert!((1..100).all(|i| s.lr(i) < s.lr(i - 1)));
        // power 1 is linear
        let l = PolySchedule::new(1.0, 1.0, 4).unwrap();
        assert_eq!(
            (0..5).map(|i| l.lr(i)).collect::<Vec<_>>(),
            [1.0, 0.75, 0.5, 0.25, 0.0]
        );
    }

    #[test]
    fn warmup_and_validation() {
        let s = PolySchedule::new(1.0, 1.0, 10)
            .unwrap()
            .with_warmup(2, 0.5)
            .unwrap();
        assert_eq!(s.lr(0), 0.5);
        assert!((s.lr(1) - 0.9 * 0.75).abs() < 1e-12);
        assert_eq!(s.lr(2), 0.8);
        assert!(PolySchedule::new(0.0, 0.9, 10)
            .unwrap_err()
            .contains("--lr"));
        assert!(PolySchedule::new(f64::NAN, 0.9, 10).is_err());
        assert!(PolySchedule::new(0.1, 0.9, 0)
            .unwrap_err()
            .contains("--steps"));
    }
}
