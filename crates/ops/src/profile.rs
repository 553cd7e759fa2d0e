//! An opt-in wall-clock profile of the layers' forward passes (and of the backward kernels of a
//! training step, kinds ending in "(bwd)"), keyed by operation and shape.
//!
//! `deeplab bench --profile` turns it on to show where a pass or a step spends its time. When
//! off (the default) each instrumented call costs one relaxed atomic load. Timings are taken
//! around synchronous CPU work; on a GPU they would measure launch time only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<(String, String), Entry>> = Mutex::new(BTreeMap::new());

/// Accumulated calls of one `(kind, detail)` key.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Entry {
    /// Number of calls.
    pub calls: u64,
    /// Total seconds.
    pub seconds: f64,
}

/// Turns recording on or off (it starts off).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether recording is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Returns and clears everything recorded: `((kind, detail), entry)` sorted by key.
pub fn take() -> Vec<((String, String), Entry)> {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *t).into_iter().collect()
}

/// Runs `f`, adding its wall time under `(kind, detail())` when recording is on.
pub fn record<T>(kind: &str, detail: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let out = f();
    let dt = t.elapsed().as_secs_f64();
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let e = table.entry((kind.to_string(), detail())).or_default();
    e.calls += 1;
    e.seconds += dt;
    out
}

/// [`record`] for a convolution `x * w`: kind `kinds[0]` for a 1x1 kernel, `kinds[1]` for any
/// other, detail [`conv_detail`].
pub fn record_conv<T>(
    kinds: [&str; 2],
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    geom: &crate::Conv2dGeometry,
    f: impl FnOnce() -> T,
) -> T {
    let one = matches!(w.dims(), &[_, _, 1, 1]);
    record(
        if one { kinds[0] } else { kinds[1] },
        || conv_detail(x.dims(), w.dims(), geom),
        f,
    )
}

/// The detail of a convolution of an input shaped `x` with weights shaped `w`
/// (`[cout, cin, kh, kw]`): `"{kh}x{kw} s{stride} d{dilation} {x dims} -> {cout}"`.
pub fn conv_detail(x: &[usize], w: &[usize], geom: &crate::Conv2dGeometry) -> String {
    let (cout, kh, kw) = match w {
        &[cout, _, kh, kw] => (cout, kh, kw),
        _ => (0, 0, 0),
    };
    format!(
        "{kh}x{kw} s{} d{} {} -> {cout}",
        geom.stride.0,
        geom.dilation.0,
        shape(x)
    )
}

/// The detail of a depthwise convolution of an input shaped `x`:
/// `"s{stride} d{dilation} [relu-in ]{x dims}"` (`relu-in` when it applies a ReLU to its input).
pub fn depthwise_detail(x: &[usize], geom: &crate::Conv2dGeometry, relu_input: bool) -> String {
    format!(
        "s{} d{} {}{}",
        geom.stride.0,
        geom.dilation.0,
        if relu_input { "relu-in " } else { "" },
        shape(x)
    )
}

/// `"{n}x{c}x{h}x{w}"` of a tensor's dims (for `record`'s details).
pub fn dims(t: &candle_core::Tensor) -> String {
    shape(t.dims())
}

/// `"{n}x{c}x{h}x{w}"` of a shape (for `record`'s details).
pub fn shape(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_enabled() {
        let _ = take();
        assert_eq!(record("k", || "d".into(), || 3), 3);
        assert!(take().is_empty());
        enable(true);
        record("k", || "d".into(), || ());
        record("k", || "d".into(), || ());
        enable(false);
        let t = take();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, ("k".to_string(), "d".to_string()));
        assert_eq!(t[0].1.calls, 2);
        assert!(take().is_empty());
    }
}
