"""PyTorch's depthwise 3x3 conv on the shapes of crates/ops/benches/cases.rs, NCHW and
channels-last, median of N runs, printed as markdown rows. Run in the peer environment
(../shared/tools/peer-env.sh) with the same thread count as our benchmark:
    OMP_NUM_THREADS=2 $VENV/bin/python benches/peers/ops_torch.py --threads 2

With --serve it answers requests on stdin instead, one JSON line per request, so that
crates/ops/examples/op_table.rs (--peer) can alternate its measurements with ours:
    "depthwise N"  ->  [[nchw_ms, channels_last_ms], ...] for each shape, median of N runs
    "quit"         ->  exits
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(728, 65, 65, 1), (728, 33, 33, 2), (728, 33, 33, 4), (2048, 33, 33, 4)]


def median_ms(fn, runs):
    fn()
    ts = []
    for _ in range(runs):
        s = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - s) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def serve():
    g = torch.Generator().manual_seed(0)
    cases = []
    for c, h, w, r in SHAPES:
        x = torch.rand(1, c, h, w, generator=g) * 2 - 1
        k = torch.rand(c, 1, 3, 3, generator=g) * 2 - 1
        xl = x.contiguous(memory_format=torch.channels_last)
        kl = k.contiguous(memory_format=torch.channels_last)
        cases.append((x, k, xl, kl, r, c))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] != "depthwise" or len(words) != 2:
            print(json.dumps({"error": f"unknown request {line.strip()!r}"}), flush=True)
            continue
        runs = int(words[1])
        out = []
        with torch.no_grad():
            for x, k, xl, kl, r, c in cases:
                nchw = median_ms(lambda: F.conv2d(x, k, padding=r, dilation=r, groups=c), runs)
                cl = median_ms(lambda: F.conv2d(xl, kl, padding=r, dilation=r, groups=c), runs)
                out.append([nchw, cl])
        print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--serve", action="store_true", help="answer requests on stdin (see above)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.serve:
        serve()
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| op | torch NCHW (ms) | torch channels-last (ms) | torch NCHW fwd+bwd (ms) |")
    print("|---|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for c, h, w, r in SHAPES:
        x = torch.rand(1, c, h, w, generator=g) * 2 - 1
        k = torch.rand(c, 1, 3, 3, generator=g) * 2 - 1
        xl = x.contiguous(memory_format=torch.channels_last)
        kl = k.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            nchw = median_ms(lambda: F.conv2d(x, k, padding=r, dilation=r, groups=c), a.runs)
            cl = median_ms(lambda: F.conv2d(xl, kl, padding=r, dilation=r, groups=c), a.runs)
        xg = x.clone().requires_grad_(True)
        kg = k.clone().requires_grad_(True)

        def fb():
            y = F.conv2d(xg, kg, padding=r, dilation=r, groups=c)
            y.sum().backward()

        fwbw = median_ms(fb, a.runs)
        print(f"| depthwise_fwd/1x{c}x{h}x{w}_d{r} | {nchw:.2f} | {cl:.2f} | {fwbw:.2f} |")
    x = torch.rand(1, 21, 129, 129, generator=g)
    with torch.no_grad():
        rs = median_ms(lambda: F.interpolate(x, size=(513, 513), mode="bilinear", align_corners=True), a.runs)
    print(f"| resize_fwd/1x21x129x129_to_513_align_corners | {rs:.2f} | | |")
    bn = torch.nn.BatchNorm2d(728, eps=1e-3).train()
    xb = (torch.rand(1, 728, 65, 65, generator=g) * 2 - 1).requires_grad_(True)

    def bnfb():
        bn(xb).sum().backward()

    print(f"| batchnorm_train_fwd_bwd/1x728x65x65 | {median_ms(bnfb, a.runs):.2f} | | |")


if __name__ == "__main__":
    main()
