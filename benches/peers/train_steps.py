"""The README's "What each training optimization bought" table: images/s and peak RSS of a
training step (crop 321, batch 4) of the two issue-9 training models for `deeplab` binaries built
at successive commits, every binary run alternately in one sitting (the machine is shared and
noisy: compare within a run).

Build the binaries first (commits of this repository; one shared target dir keeps rebuilds short):
    for c in ce4453e 8e160aa c1ba740; do
        git worktree add /tmp/dl-$c $c
        (cd /tmp/dl-$c && CARGO_TARGET_DIR=/tmp/dl-target cargo build --release -p deeplab-cli)
        cp /tmp/dl-target/release/deeplab /tmp/deeplab-$c
    done
    cargo build --release -p deeplab-cli
then
    python3 benches/peers/train_steps.py \\
        "session start=/tmp/deeplab-ce4453e" \\
        "+ sgemm backward=/tmp/deeplab-8e160aa" \\
        "+ BatchNorm op=/tmp/deeplab-c1ba740" \\
        "final=target/release/deeplab" --rounds 2
Each argument is `label=binary`; rows are printed in argument order.
"""
import argparse
import json
import statistics
import subprocess
import sys

MODELS = {
    "Xception-65 v3+ OS16": ["--backbone", "xception65"],
    "MobileNetV2 v3+ OS16": ["--backbone", "mobilenetv2_100"],
}


def run(binary, flags, threads):
    cmd = [binary, "--threads", str(threads), "bench", *flags, "--train", "--size", "321",
           "--batch", "4", "--warmup", "1", "--iters", "3", "--json", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"no JSON from: {' '.join(cmd)}\n{out.stdout[-2000:]}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("steps", nargs="+", help="label=path of a deeplab binary")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    steps = []
    for s in a.steps:
        label, sep, path = s.partition("=")
        if not sep:
            sys.exit(f"expected label=binary, got {s!r}")
        steps.append((label, path))
    results = {(m, l): [] for m in MODELS for l, _ in steps}
    for r in range(a.rounds):
        for model, flags in MODELS.items():
            for label, path in steps:
                j = run(path, flags, a.threads)
                results[(model, label)].append(j)
                print(f"  round {r + 1} {model} {label}: {j['images_per_s']:.2f} img/s, "
                      f"{j['peak_rss_mib'] or 0:.0f} MiB", file=sys.stderr, flush=True)
    print("| step | " + " | ".join(f"{m} img/s (peak RSS MiB)" for m in MODELS) + " |")
    print("|---|" + "---:|" * len(MODELS))
    for label, _ in steps:
        cells = []
        for model in MODELS:
            rs = results[(model, label)]
            ips = statistics.median(x["images_per_s"] for x in rs)
            rss = statistics.median(x["peak_rss_mib"] or 0 for x in rs)
            cells.append(f"{ips:.2f} ({rss:.0f})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
