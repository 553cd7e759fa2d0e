//! Dense convolution benchmark cases (im2col + gemm against candle's conv2d) on ResNet-101 and
//! Xception-65 entry shapes, forward and forward + backward.

use crate::cases::Case;
use candle_core::{Device, Result, Tensor, Var};
use deeplab_ops::reference::seeded_uniform;
use deeplab_ops::{conv2d, Conv2dGeometry};

fn sync(t: &Tensor) -> Result<()> {
    t.device().synchronize()
}

/// `(Cin, H, W, Cout, kernel, stride, rate)`: Xception stem and entry conv, ResNet stem,
/// layer1 3x3, ResNet-101 OS16 dilated 3x3s in layer3/layer4, the 1x1 stride-2 downsample.
pub const CONV_SHAPES: [(usize, usize, usize, usize, usize, usize, usize); 8] = [
    (3, 513, 513, 32, 3, 2, 1),
    (3, 513, 513, 64, 7, 2, 1),
    (32, 257, 257, 64, 3, 1, 1),
    (64, 129, 129, 64, 3, 1, 1),
    (128, 129, 129, 128, 3, 2, 1),
    (256, 33, 33, 256, 3, 1, 2),
    (512, 33, 33, 512, 3, 1, 4),
    (512, 65, 65, 1024, 1, 2, 1),
];

pub fn conv_cases(dev: &Device, with_backward: bool) -> Result<Vec<Case>> {
    let tag = if dev.is_cpu() { "cpu" } else { "cuda" };
    let mut v = Vec::new();
    for (cin, h, w, cout, k, s, r) in CONV_SHAPES {
        let x = seeded_uniform(&[1, cin, h, w], 1, dev)?;
        let wt = (seeded_uniform(&[cout, cin, k, k], 2, dev)? * 0.1)?;
        // TF's fixed padding: symmetric for odd kernels, so candle's conv2d computes the same.
        let g = Conv2dGeometry::deeplab(k, s, r);
        let p = g.padding.top;
        let name = format!("{tag}/conv{k}x{k}_s{s}_d{r}/1x{cin}x{h}x{w}_to_{cout}");
        let (x1, w1, x2, w2) = (x.clone(), wt.clone(), x.clone(), wt.clone());
        v.push(Case {
            name: format!("{name}/fwd"),
            ours: Box::new(move || sync(&conv2d(&x1, &w1, None, &g, 1)?)),
            candle: Box::new(move || sync(&x2.conv2d(&w2, p, s, r, 1)?)),
        });
        if with_backward {
            let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&wt)?);
            let (xv2, wv2) = (xv.clone(), wv.clone());
            v.push(Case {
                name: format!("{name}/fwd_bwd"),
                ours: Box::new(move || {
                    let y = conv2d(xv.as_tensor(), wv.as_tensor(), None, &g, 1)?;
                    let gr = y.sum_all()?.backward()?;
                    sync(gr.get(&xv).expect("grad"))
                }),
                candle: Box::new(move || {
                    let y = xv2.as_tensor().conv2d(wv2.as_tensor(), p, s, r, 1)?;
                    let gr = y.sum_all()?.backward()?;
                    sync(gr.get(&xv2).expect("grad"))
                }),
            });
        }
    }
    // 1x1 stride-1 convolutions (Xception-65 middle flow, exit flow, ResNet layer1 at 129x129):
    // our per-image sgemm against candle's batched matmul of the same matrices.
    for (cin, hw, cout) in [(728, 33, 728), (1536, 33, 2048), (256, 129, 256)] {
        let x = seeded_uniform(&[1, cin, hw, hw], 3, dev)?;
        let wt = (seeded_uniform(&[cout, cin, 1, 1], 4, dev)? * 0.1)?;
        let (x1, w1) = (x.clone(), wt.clone());
        let (xm, wm) = (x.reshape((1, cin, hw * hw))?, wt.reshape((1, cout, cin))?);
        v.push(Case {
            name: format!("{tag}/conv1x1/1x{cin}x{hw}x{hw}_to_{cout}/fwd"),
            ours: Box::new(move || sync(&conv2d(&x1, &w1, None, &Conv2dGeometry::default(), 1)?)),
            candle: Box::new(move || sync(&wm.matmul(&xm)?)),
        });
    }
    Ok(v)
}
