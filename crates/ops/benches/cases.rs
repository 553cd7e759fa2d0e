//! Benchmark cases shared by the criterion bench and the `op_table` example: each case runs
//! our op and candle's own path for the same computation.

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use deeplab_ops::reference::seeded_uniform;
use deeplab_ops::{
    batch_norm_train, depthwise_conv2d, depthwise_conv2d_fused, resize_bilinear, Activation,
    Conv2dGeometry, ResizeMode,
};

/// A named benchmark with our implementation and candle's.
pub struct Case {
    pub name: String,
    pub ours: Box<dyn Fn() -> Result<()>>,
    pub candle: Box<dyn Fn() -> Result<()>>,
}

fn sync(t: &Tensor) -> Result<()> {
    t.device().synchronize()
}

/// Depthwise 3x3 shapes of the issue: (C, H, W, rate).
pub const DW_SHAPES: [(usize, usize, usize, usize); 4] = [
    (728, 65, 65, 1),
    (728, 33, 33, 2),
    (728, 33, 33, 4),
    (2048, 33, 33, 4),
];

pub fn cases(dev: &Device, with_backward: bool) -> Result<Vec<Case>> {
    let tag = if dev.is_cpu() { "cpu" } else { "cuda" };
    let mut v = Vec::new();
    for (c, h, w, r) in DW_SHAPES {
        let x = seeded_uniform(&[1, c, h, w], 1, dev)?;
        let k = seeded_uniform(&[c, 1, 3, 3], 2, dev)?;
        let g = Conv2dGeometry::same(3, r);
        let (x1, k1, x2, k2) = (x.clone(), k.clone(), x.clone(), k.clone());
        v.push(Case {
            name: format!("{tag}/depthwise_fwd/1x{c}x{h}x{w}_d{r}"),
            ours: Box::new(move || sync(&depthwise_conv2d(&x1, &k1, &g)?)),
            candle: Box::new(move || sync(&x2.conv2d(&k2, r, 1, r, c)?)),
        });
        if with_backward {
            let xv = Var::from_tensor(&x)?;
            let kv = Var::from_tensor(&k)?;
            let (xv2, kv2) = (xv.clone(), kv.clone());
            v.push(Case {
                name: format!("{tag}/depthwise_bwd/1x{c}x{h}x{w}_d{r}"),
                ours: Box::new(move || {
                    let y = depthwise_conv2d(xv.as_tensor(), kv.as_tensor(), &g)?;
                    let gr = y.sum_all()?.backward()?;
                    sync(gr.get(&xv).expect("grad"))
                }),
                candle: Box::new(move || {
                    let y = xv2.as_tensor().conv2d(kv2.as_tensor(), r, 1, r, c)?;
                    let gr = y.sum_all()?.backward()?;
                    sync(gr.get(&xv2).expect("grad"))
                }),
            });
        }
    }
    // The BN-folded inference path of a separable conv: ReLU -> depthwise -> + bias -> ReLU.
    let (c, h, r) = (728, 33, 2);
    let x = seeded_uniform(&[1, c, h, h], 1, dev)?;
    let k = seeded_uniform(&[c, 1, 3, 3], 2, dev)?;
    let b = seeded_uniform(&[c], 5, dev)?;
    let g = Conv2dGeometry::same(3, r);
    let (x2, k2, b2) = (x.clone(), k.clone(), b.reshape((1, c, 1, 1))?);
    v.push(Case {
        name: format!("{tag}/depthwise_fused_fwd/1x{c}x{h}x{h}_d{r}_relu_bias_relu"),
        ours: Box::new(move || {
            sync(&depthwise_conv2d_fused(
                &x,
                &k,
                Some(&b),
                true,
                Activation::Relu,
                &g,
            )?)
        }),
        candle: Box::new(move || {
            let y = x2.relu()?.conv2d(&k2, r, 1, r, c)?;
            sync(&y.broadcast_add(&b2)?.relu()?)
        }),
    });
    let x = seeded_uniform(&[1, 21, 129, 129], 3, dev)?;
    let x2 = x.clone();
    v.push(Case {
        name: format!("{tag}/resize_fwd/1x21x129x129_to_513_align_corners"),
        ours: Box::new(move || sync(&resize_bilinear(&x, (513, 513), ResizeMode::AlignCorners)?)),
        candle: Box::new(move || sync(&x2.upsample_bilinear2d(513, 513, true)?)),
    });
    if with_backward {
        let c = 728;
        let x = Var::from_tensor(&seeded_uniform(&[1, c, 65, 65], 4, dev)?)?;
        let gamma = Var::from_tensor(&Tensor::ones(c, DType::F32, dev)?)?;
        let beta = Var::from_tensor(&Tensor::zeros(c, DType::F32, dev)?)?;
        let (x2, g2, b2) = (x.clone(), gamma.clone(), beta.clone());
        let bn = candle_nn::BatchNorm::new(
            c,
            Tensor::zeros(c, DType::F32, dev)?,
            Tensor::ones(c, DType::F32, dev)?,
            g2.as_tensor().clone(),
            b2.as_tensor().clone(),
            1e-3,
        )?;
        v.push(Case {
            name: format!("{tag}/batchnorm_train_fwd_bwd/1x728x65x65"),
            ours: Box::new(move || {
                let (y, _, _) =
                    batch_norm_train(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-3)?;
                let gr = y.sum_all()?.backward()?;
                sync(gr.get(&x).expect("grad"))
            }),
            candle: Box::new(move || {
                let y = bn.forward_t(x2.as_tensor(), true)?;
                let gr = y.sum_all()?.backward()?;
                sync(gr.get(&x2).expect("grad"))
            }),
        });
    }
    Ok(v)
}
