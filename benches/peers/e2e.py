"""End-to-end speed of our DeepLab against PyTorch and ONNX Runtime, side by side (issue 9).

For each model runs, in rounds that alternate the runtimes (the machine is shared and noisy),
`deeplab bench` (ours) and benches/peers/deeplab_torch.py (PyTorch eager NCHW, eager
channels-last, ONNX Runtime), every measurement in its own process so that its peak RSS is its
own. Reports per runtime the median over rounds of: latency at batch 1, throughput at batch 4,
peak RSS at batch 1, achieved GFLOP/s (2 x our multiply-add count / latency), and ratios to ours;
for ours also the matmul-bound time (2 x multiply-adds at the rate candle's matmul reaches in
the same run). With --train, images/s of a training step (crop 321, batch 4).

Run with the peer environment's python (../shared/tools/peer-env.sh), after
`cargo build --release -p deeplab-cli`:
    ~/.cache/deeplab-peer-venv/bin/python benches/peers/e2e.py --threads 2 --rounds 3
    ~/.cache/deeplab-peer-venv/bin/python benches/peers/e2e.py --threads 2 --train
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# name: (our `deeplab bench` flags, peer model name, description)
MODELS = {
    "xception65": (["--backbone", "xception65"], "xception65",
                   "DeepLabv3+ Xception-65 OS16, separable ASPP + decoder"),
    "resnet101": (["--backbone", "resnet101"], "resnet101",
                  "DeepLabv3+ ResNet-101 OS16, plain ASPP + decoder"),
    "resnet101_sep": (["--backbone", "resnet101", "--separable", "true"], "resnet101_sep",
                      "DeepLabv3+ ResNet-101 OS16, separable ASPP + decoder"),
    "mobilenetv2": (["--backbone", "mobilenetv2_100", "--head", "v3", "--output-stride", "8",
                     "--atrous-rates", "none"], "mobilenetv2",
                    "DeepLabv3 MobileNetV2 OS8, image pooling + 1x1 ASPP"),
}
TRAIN_MODELS = {
    "xception65": (["--backbone", "xception65"], "xception65",
                   "DeepLabv3+ Xception-65 OS16 separable"),
    "mobilenetv2": (["--backbone", "mobilenetv2_100"], "mobilenetv2_v3plus",
                    "DeepLabv3+ MobileNetV2 OS16 separable"),
}


def run_json(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON from: {' '.join(cmd)}\n{out.stdout[-2000:]}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--models", default=None,
                    help="comma-separated (default: all of the mode's models)")
    ap.add_argument("--deeplab", default=os.path.join(ROOT, "target", "release", "deeplab"))
    ap.add_argument("--train", action="store_true", help="training step images/s instead")
    ap.add_argument("--train-size", type=int, default=321)
    ap.add_argument("--no-onnx", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(a.deeplab):
        raise SystemExit(f"{a.deeplab}: build it first (cargo build --release -p deeplab-cli)")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads))
    peer = [sys.executable, os.path.join(HERE, "deeplab_torch.py"), "--threads", str(a.threads)]
    ours_base = [a.deeplab, "--threads", str(a.threads), "--quiet", "bench", "--json"]
    print(f"threads {a.threads}, rounds {a.rounds}, python {sys.executable}")
    table = MODELS if not a.train else TRAIN_MODELS
    names = a.models.split(",") if a.models else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}: choose from {', '.join(table)}")
    for name in names:
        flags, peer_model, desc = table[name]
        res = {}  # runtime -> list of dicts per round (keys: lat, thr, rss)
        # The exported model lives only as long as this model's rounds.
        tmpdir = tempfile.TemporaryDirectory(prefix="deeplab-e2e-")
        onnx = os.path.join(tmpdir.name, f"{name}.onnx")
        runtimes = ["ours", "eager", "channels_last"]
        if not a.train and not a.no_onnx:
            subprocess.run(peer + ["--model", peer_model, "--size", str(a.size),
                                   "--export-onnx", onnx], env=env, check=True,
                           capture_output=True)
            runtimes.append("onnxruntime")
        gmacs = matmul = None
        for r in range(a.rounds):
            for rt in runtimes:
                row = {}
                if a.train:
                    batches = [4]
                else:
                    batches = [1, 4]
                for b in batches:
                    size = a.train_size if a.train else a.size
                    if rt == "ours":
                        cmd = ours_base + flags + ["--size", str(size), "--batch", str(b),
                                                   "--warmup", "1",
                                                   "--iters", str(a.iters if b == 1 else 3)]
                        if a.train:
                            cmd.append("--train")
                    else:
                        cmd = peer + ["--model", peer_model, "--size", str(size), "--runtime", rt,
                                      "--batch", str(b), "--warmup", "1",
                                      "--iters", str(a.iters if b == 1 else 3)]
                        if rt == "onnxruntime":
                            cmd += ["--onnx", onnx]
                        if a.train:
                            cmd.append("--train")
                    j = run_json(cmd, env)
                    if rt == "ours":
                        gmacs = j["gmacs"]
                        matmul = j.get("matmul_gflops", matmul)
                    if b == 1 or a.train:
                        row["lat"] = j["median_s"]
                        row["rss"] = j["peak_rss_mib"]
                        row["ver"] = j.get("version", "ours")
                    if b == 4:
                        row["thr"] = j["images_per_s"]
                res.setdefault(rt, []).append(row)
                print(f"  round {r + 1} {name} {rt}: {row}", file=sys.stderr)
        med = {rt: {k: statistics.median(x[k] for x in rows) for k in ("lat", "rss")
                    if all(k in x for x in rows)} | {"thr": statistics.median(
                        x["thr"] for x in rows)} for rt, rows in res.items()}
        ours = med["ours"]
        print()
        if a.train:
            print(f"### training step: {desc}, crop {a.train_size}, batch 4, {a.threads} threads "
                  f"({gmacs:.2f} GMACs forward per image)")
            print("| runtime | step (s) | images/s | ours / this (images/s) | peak RSS (MiB) |")
            print("|---|---:|---:|---:|---:|")
            for rt, m in med.items():
                print(f"| {label(rt)} | {m['lat']:.3f} | {m['thr']:.2f} | "
                      f"{ours['thr'] / m['thr']:.2f} | {m['rss']:.0f} |")
        else:
            bound = 2 * gmacs / matmul if matmul else float("nan")
            print(f"### {desc}, {a.size}x{a.size}, {a.threads} threads ({gmacs:.2f} GMACs; "
                  f"candle matmul {matmul:.0f} GFLOP/s in this run -> matmul-bound {bound:.3f} s)")
            print("| runtime | latency b1 (s) | ours / this | throughput b4 (img/s) | "
                  "peak RSS b1 (MiB) | ours / this (RSS) | GFLOP/s |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for rt, m in med.items():
                print(f"| {label(rt)} | {m['lat']:.3f} | {ours['lat'] / m['lat']:.2f} | "
                      f"{m['thr']:.2f} | {m['rss']:.0f} | {ours['rss'] / m['rss']:.2f} | "
                      f"{2 * gmacs / m['lat']:.0f} |")
            print(f"ours / matmul-bound: {ours['lat'] / bound:.2f}")
        sys.stdout.flush()
        tmpdir.cleanup()


def label(rt):
    return {"ours": "ours (deeplab bench)", "eager": "PyTorch eager NCHW",
            "channels_last": "PyTorch eager channels-last", "onnxruntime": "ONNX Runtime"}[rt]


if __name__ == "__main__":
    main()
