"""PyTorch / ONNX Runtime side of the end-to-end speed comparison (issue 9).

Builds the same architectures as our `deeplab bench` configs from timm backbones plus a head written
to match ours (separable ASPP rates 6/12/18 with image pooling, 48-channel low-level projection, two
separable 3x3x256 decoder convs, logits, align_corners bilinear upsampling), random weights, eval mode,
and prints for each: median latency at batch 1, throughput at batch 4, peak RSS, achieved GFLOP/s
(2 x multiply-adds / time, multiply-adds from our counter's convention passed in with --gmacs).

Run in the peer environment built by ../shared/tools/peer-env.sh, with the same thread count as ours:
    OMP_NUM_THREADS=2 $VENV/bin/python benches/peers/deeplab_torch.py --model xception65 --size 513
Models: xception65 (DeepLabv3+ OS16 separable), resnet101 (DeepLabv3+ OS16 with decoder),
mobilenetv2 (DeepLabv3 OS8, image pooling + 1x1 ASPP).
"""
import argparse
import os
import resource
import tempfile
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F



class SepConv(nn.Module):
    """depthwise 3x3 (rate) -> BN -> ReLU -> pointwise -> BN -> ReLU, as our heads' separable conv."""

    def __init__(self, cin, cout, rate=1):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, padding=rate, dilation=rate, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.bn1(self.dw(x)))
        return F.relu(self.bn2(self.pw(x)))


def cbr(cin, cout, k=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Head(nn.Module):
    def __init__(self, cin, low_c, rates, separable, decoder, classes=21):
        super().__init__()
        self.pool = cbr(cin, 256)
        self.branches = nn.ModuleList([cbr(cin, 256)] + [
            SepConv(cin, 256, r) if separable else cbr(cin, 256, 3) for r in rates
        ])
        # Plain 3x3 atrous branches need their dilation.
        if not separable:
            for b, r in zip(self.branches[1:], rates):
                b[0].dilation = (r, r)
                b[0].padding = (r, r)
        self.project = cbr(256 * (2 + len(rates)), 256)
        self.decoder = decoder
        if decoder:
            self.low = cbr(low_c, 48)
            self.convs = nn.Sequential(SepConv(304, 256), SepConv(256, 256))
        self.cls = nn.Conv2d(256, classes, 1)

    def forward(self, low, high, size):
        h, w = high.shape[-2:]
        p = self.pool(high.mean((2, 3), keepdim=True)).expand(-1, -1, h, w)
        x = self.project(torch.cat([p] + [b(high) for b in self.branches], 1))
        if self.decoder:
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
            x = self.convs(torch.cat([x, self.low(low)], 1))
        x = self.cls(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class DeepLab(nn.Module):
    def __init__(self, name):
        super().__init__()
        if name == "xception65":
            bb, os_, rates, sep, dec = "xception65", 16, [6, 12, 18], True, True
        elif name == "resnet101":
            bb, os_, rates, sep, dec = "resnet101", 16, [6, 12, 18], False, True
        elif name == "mobilenetv2":
            bb, os_, rates, sep, dec = "mobilenetv2_100", 8, [], False, False
        else:
            raise SystemExit(f"unknown model {name}")
        self.backbone = timm.create_model(bb, features_only=True, output_stride=os_, pretrained=False)
        info = self.backbone.feature_info
        red = info.reduction()
        self.low_i = red.index(4)
        self.high_i = len(red) - 1
        chans = info.channels()
        self.head = Head(chans[self.high_i], chans[self.low_i], rates, sep, dec)

    def forward(self, x):
        f = self.backbone(x)
        return self.head(f[self.low_i], f[self.high_i], x.shape[-2:])


def median_s(fn, runs):
    fn()
    ts = []
    for _ in range(runs):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="xception65")
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--onnx", action="store_true", help="also export to ONNX and time ONNX Runtime")
    ap.add_argument("--gmacs", type=float, default=None,
                    help="multiply-adds (billions) of this model at this size, from `deeplab info`")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = DeepLab(a.model).eval()
    gmacs = a.gmacs
    x1 = torch.randn(1, 3, a.size, a.size)
    x4 = torch.randn(4, 3, a.size, a.size)
    rows = []
    with torch.no_grad():
        t = median_s(lambda: m(x1), a.runs)
        rows.append(("torch eager NCHW", t, 4 / median_s(lambda: m(x4), max(1, a.runs // 2))))
        mc = m.to(memory_format=torch.channels_last)
        xc = x1.contiguous(memory_format=torch.channels_last)
        x4c = x4.contiguous(memory_format=torch.channels_last)
        t = median_s(lambda: mc(xc), a.runs)
        rows.append(("torch eager channels-last", t, 4 / median_s(lambda: mc(x4c), max(1, a.runs // 2))))
        m = m.to(memory_format=torch.contiguous_format)
    if a.onnx:
        import onnxruntime as ort

        path = os.path.join(tempfile.mkdtemp(), "m.onnx")
        torch.onnx.export(m, x1, path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        n1, n4 = x1.numpy(), x4.numpy()
        t = median_s(lambda: sess.run(None, {"x": n1}), a.runs)
        rows.append(("onnxruntime", t, 4 / median_s(lambda: sess.run(None, {"x": n4}), max(1, a.runs // 2))))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {a.model} {a.size}x{a.size}, threads {a.threads}, torch {torch.__version__}, "
          f"{gmacs or 0:.2f} GMACs (given), process peak RSS {rss:.0f} MiB")
    print("| runtime | latency b1 (s) | throughput b4 (img/s) | GFLOP/s |")
    print("|---|---:|---:|---:|")
    for name, t, thr in rows:
        flops = f"{2 * gmacs / t:.0f}" if gmacs else "-"
        print(f"| {name} | {t:.3f} | {thr:.2f} | {flops} |")


if __name__ == "__main__":
    main()
