"""The README's "What each optimization bought" table: median `deeplab bench` latency of the three
issue-9 models for each step, every configuration run alternately in one sitting.

Build the three binaries first (the commits are this repository's):
    git worktree add /tmp/dl-start f9192f2 && (cd /tmp/dl-start && cargo build --release -p deeplab-cli)
    git worktree add /tmp/dl-presgemm 31c5f2c && (cd /tmp/dl-presgemm && cargo build --release -p deeplab-cli)
    cargo build --release -p deeplab-cli
then
    python3 benches/peers/steps.py /tmp/dl-start/target/release/deeplab \\
        /tmp/dl-presgemm/target/release/deeplab target/release/deeplab --rounds 2
Rows 2-4 are one binary: `DEEPLAB_ALLOC_PURGE=1` restores mimalloc's default purging and
`--no-fold` keeps BatchNorms separate.

Any other sequence of binaries: `--step LABEL=BINARY` (repeated, rows in that order) instead of
the three positional binaries, e.g. the issue-9 fourth session's table:
    python3 benches/peers/steps.py --rounds 3 --step "session start=/tmp/deeplab-1d27fdf" \
        --step "+ residual add in the epilogue=/tmp/deeplab-8be990a" \
        --step "+ padding taps skipped=/tmp/deeplab-e633106" \
        --step "+ Winograd F(2x2,3x3)=target/release/deeplab"
and the fifth session's:
    python3 benches/peers/steps.py --rounds 3 --step "session start=/tmp/deeplab-aa8f8f0" \
        --step "+ max pool by rows=/tmp/deeplab-0df0bdf" \
        --step "+ Winograd F(4x4,3x3)=/tmp/deeplab-760a84d" \
        --step "+ residual prefetch=target/release/deeplab"
and the sixth session's (the middle binary: f8e057b without the microkernel's write prefetch of `C`):
    python3 benches/peers/steps.py --rounds 3 --step "session start (2fbfdf1)=/tmp/deeplab-2fbfdf1" \
        --step "+ balanced sgemm grid=/tmp/deeplab-grid" \
        --step "+ write prefetch of C (008a3bb)=target/release/deeplab"
and the seventh session's (each binary built at its commit):
    python3 benches/peers/steps.py --rounds 3 --step "session start (58121f5)=/tmp/deeplab-base" \
        --step "+ atrous rectangles as pixel-row products (f66ae89)=/tmp/deeplab-f66ae89" \
        --step "+ max pool by phases (f4a4a72)=/tmp/deeplab-f4a4a72"
and the eighth session's (each binary built at its commit):
    python3 benches/peers/steps.py --rounds 3 --step "session start (7e687cc)=/tmp/deeplab-review" \
        --step "+ commands on a rayon worker (4019c95)=/tmp/deeplab-worker" \
        --step "+ fused separable convolution, microkernel epilogue unrolled (9b594a6)=/tmp/deeplab-final9" \
        --step "+ ASPP projection without concatenation (2212f6f)=/tmp/deeplab-2212f6f" \
        --step "+ depthwise packing cost (61a1f7d)=/tmp/deeplab-head"
"""
import argparse
import os
import statistics
import subprocess
import sys

MODELS = {
    "Xception-65 v3+ OS16": ["--backbone", "xception65"],
    "ResNet-101 v3+ OS16": ["--backbone", "resnet101"],
    "ResNet-101 v3+ OS16 separable": ["--backbone", "resnet101", "--separable", "true"],
    "MobileNetV2 v3 OS8": ["--backbone", "mobilenetv2_100", "--head", "v3", "--output-stride", "8",
                           "--atrous-rates", "none"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("start", nargs="?", help="deeplab binary at the session start (f9192f2)")
    ap.add_argument("presgemm", nargs="?", help="deeplab binary before the AVX-512 sgemm (31c5f2c)")
    ap.add_argument("final", nargs="?", help="deeplab binary with everything")
    ap.add_argument("--step", action="append", default=[], metavar="LABEL=BINARY",
                    help="a row of its own (repeatable; replaces the three positional binaries)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=None,
                    help="comma-separated substrings of the model names to run (default: all)")
    a = ap.parse_args()
    if a.step:
        steps = []
        for st in a.step:
            label, sep, binary = st.rpartition("=")
            if not sep or not label:
                ap.error(f"--step wants LABEL=BINARY, got {st!r}")
            steps.append((label, binary, {}, []))
    elif None in (a.start, a.presgemm, a.final):
        ap.error("give the three binaries (start presgemm final) or --step LABEL=BINARY rows")
    else:
        steps = legacy_steps(a)
    run(steps, a)


def legacy_steps(a):
    return [
        ("session start (glibc malloc, graph kept alive in eval, candle dense conv, old depthwise "
         "kernel)", a.start, {}, []),
        ("+ eval graph not retained, ReLU op, im2col+gemm conv, new depthwise kernel (mimalloc "
         "defaults)", a.presgemm, {"DEEPLAB_ALLOC_PURGE": "1"}, ["--no-fold"]),
        ("+ allocator keeps freed pages (no purging)", a.presgemm, {}, ["--no-fold"]),
        ("+ BatchNorm folded into fused conv / depthwise / gemm epilogues", a.presgemm, {}, []),
        ("+ AVX-512 sgemm for 1x1 and im2col convs", a.final, {}, []),
    ]


def run(steps, a):
    res = {}
    models = {m: mf for m, mf in MODELS.items()
              if a.models is None or any(k in m for k in a.models.split(","))}
    for r in range(a.rounds):
        # Odd rounds run the steps in reverse, so a drift of the machine's speed during the
        # sitting does not favour the first or the last step.
        order = list(enumerate(steps))
        if r % 2 == 1:
            order.reverse()
        for si, (_, binary, env, flags) in order:
            for m, mf in models.items():
                cmd = [binary, "--threads", str(a.threads), "--quiet"] + flags + ["bench"] + mf + [
                    "--iters", "5", "--warmup", "2"]
                out = subprocess.run(cmd, env=dict(os.environ, RAYON_NUM_THREADS=str(a.threads), **env),
                                     capture_output=True, text=True, check=True).stdout
                line = next(l for l in out.splitlines() if l.startswith("latency"))
                med = float(line.split("median ")[1].split(" ms")[0])
                res.setdefault((si, m), []).append(med)
                print(f"round {r + 1} step {si + 1} {m}: {med:.1f} ms", file=sys.stderr)
    print("| step | " + " | ".join(models) + " |")
    print("|---|" + "---:|" * len(models))
    for si, (name, _, _, _) in enumerate(steps):
        cells = " | ".join(f"{statistics.median(res[(si, m)]) / 1e3:.3f} s" for m in models)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
