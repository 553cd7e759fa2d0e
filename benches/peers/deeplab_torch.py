"""PyTorch / ONNX Runtime side of the end-to-end speed comparison (issue 9).

Builds the same architectures as our `deeplab bench` configurations from timm backbones plus a
head written to match ours, random weights, and times ONE runtime per process (so the process's
peak RSS belongs to that runtime): median latency of a forward pass at a batch size, or of a
training step (forward in train mode, pixel-wise cross-entropy with ignore label 255, backward,
SGD momentum 0.9 with weight decay). Prints one JSON line.

Heads (all bilinear resizes align_corners=True, as the official DeepLab):
  xception65  DeepLabv3+ OS16: image pooling + 1x1 + separable 3x3 rates 6/12/18 ASPP, 48-channel
              low-level projection, two separable 3x3x256 decoder convs (ReLU after each BN)
  resnet101   DeepLabv3+ OS16: the same with plain 3x3 convs (ASPP and decoder), as the paper's
              ResNet-101 model
  resnet101_sep  DeepLabv3+ OS16 ResNet-101 with separable ASPP and decoder convs (the official
              code's default flags; segmentation-models-pytorch's ASPP is separable too)
  mobilenetv2 DeepLabv3 OS8: image pooling + 1x1 ASPP only, no decoder (the model-zoo setting)
  mobilenetv2_v3plus  DeepLabv3+ OS16 with separable ASPP and decoder (training comparison)

Run in the peer environment built by ../shared/tools/peer-env.sh; benches/peers/e2e.py runs it
next to `deeplab bench` and prints the comparison:
    OMP_NUM_THREADS=2 $VENV/bin/python benches/peers/deeplab_torch.py --model xception65 \\
        --runtime eager --batch 1
"""
import argparse
import json
import resource
import sys
import time


def run_onnxruntime(a):
    """Times an exported model (--onnx) in ONNX Runtime; torch is never imported here, so the
    peak RSS is ONNX Runtime's own."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.onnx, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((a.batch, 3, a.size, a.size), dtype=np.float32)
    med, ts = timed(lambda: sess.run(None, {"x": x}), a.warmup, a.iters)
    report(a, med, ts, "onnxruntime " + ort.__version__)


def report(a, med, ts, version):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "model": a.model, "runtime": a.runtime, "mode": "train" if a.train else "inference",
        "batch": a.batch, "size": a.size, "threads": a.threads, "version": version,
        "median_s": med, "min_s": ts[0], "max_s": ts[-1], "images_per_s": a.batch / med,
        "peak_rss_mib": rss,
    }))


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    ts.sort()
    n = len(ts)
    med = ts[n // 2] if n % 2 else 0.5 * (ts[n // 2 - 1] + ts[n // 2])
    return med, ts


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="xception65",
                    choices=["xception65", "resnet101", "resnet101_sep", "mobilenetv2",
                             "mobilenetv2_v3plus"])
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--runtime", default="eager", choices=["eager", "channels_last", "onnxruntime"])
    ap.add_argument("--onnx", help="onnxruntime: the exported model to time")
    ap.add_argument("--export-onnx", help="only export the model (dynamic batch) to this path")
    ap.add_argument("--train", action="store_true",
                    help="time a training step (eager or channels_last) instead of inference")
    return ap.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.runtime == "onnxruntime" and not ARGS.export_onnx:
        if ARGS.train or not ARGS.onnx:
            sys.exit("onnxruntime times inference of a model exported with --export-onnx (pass --onnx)")
        run_onnxruntime(ARGS)
        sys.exit(0)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class SepConv(nn.Module):
    """depthwise 3x3 (rate) -> BN -> ReLU -> pointwise -> BN -> ReLU, as our heads' separable conv."""

    def __init__(self, cin, cout, rate=1):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, padding=rate, dilation=rate, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x):
        x = F.relu(self.bn1(self.dw(x)))
        return F.relu(self.bn2(self.pw(x)))


def cbr(cin, cout, k=1, rate=1):
    """conv (k x k, rate) -> BN -> ReLU."""
    pad = rate * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=rate, bias=False),
        nn.BatchNorm2d(cout, eps=1e-5),
        nn.ReLU(),
    )


class Head(nn.Module):
    def __init__(self, cin, low_c, rates, separable, decoder, classes=21):
        super().__init__()
        self.pool = cbr(cin, 256)
        atrous = [SepConv(cin, 256, r) if separable else cbr(cin, 256, 3, r) for r in rates]
        self.branches = nn.ModuleList([cbr(cin, 256)] + atrous)
        self.project = cbr(256 * (2 + len(rates)), 256)
        self.decoder = decoder
        if decoder:
            self.low = cbr(low_c, 48)
            if separable:
                self.convs = nn.Sequential(SepConv(304, 256), SepConv(256, 256))
            else:
                self.convs = nn.Sequential(cbr(304, 256, 3), cbr(256, 256, 3))
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


MODELS = {
    # name: (timm backbone, output stride, ASPP rates, separable, decoder)
    "xception65": ("xception65", 16, [6, 12, 18], True, True),
    "resnet101": ("resnet101", 16, [6, 12, 18], False, True),
    "resnet101_sep": ("resnet101", 16, [6, 12, 18], True, True),
    "mobilenetv2": ("mobilenetv2_100", 8, [], False, False),
    "mobilenetv2_v3plus": ("mobilenetv2_100", 16, [6, 12, 18], True, True),
}


class DeepLab(nn.Module):
    def __init__(self, name):
        super().__init__()
        if name not in MODELS:
            raise SystemExit(f"unknown model {name}: {', '.join(MODELS)}")
        bb, os_, rates, sep, dec = MODELS[name]
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


def main(a):
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = DeepLab(a.model)
    x = torch.randn(a.batch, 3, a.size, a.size)
    if a.export_onnx:
        m.eval()
        with torch.no_grad():
            torch.onnx.export(m, x, a.export_onnx, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17,
                              dynamo=False)
        return
    if a.runtime == "channels_last":
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if a.train:
        m.train()
        # the same label pattern as `deeplab bench --train`: 16-pixel diagonal stripes of classes
        ii = torch.arange(a.size).view(-1, 1) // 16
        jj = torch.arange(a.size).view(1, -1) // 16
        y = ((ii + jj) % 21).expand(a.batch, -1, -1).contiguous()
        wd = 1e-4 if a.model.startswith("resnet") else 4e-5
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9, weight_decay=wd)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y, ignore_index=255)
            loss.backward()
            opt.step()

        med, ts = timed(step, a.warmup, a.iters)
    else:
        m.eval()
        with torch.no_grad():
            med, ts = timed(lambda: m(x), a.warmup, a.iters)
    report(a, med, ts, "torch " + torch.__version__)


if __name__ == "__main__":
    main(ARGS)
