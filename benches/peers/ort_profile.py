"""Per-node profile of a model in ONNX Runtime, to set beside `deeplab bench --profile` (issue 9).

Runs an exported model (`deeplab_torch.py --export-onnx F.onnx`) with ONNX Runtime's profiler
on, then prints the mean time per pass of each operator kind and of the costliest nodes with
their input shapes, in the same table layout as our profile:

    $VENV/bin/python benches/peers/deeplab_torch.py --model mobilenetv2 --export-onnx mnv2.onnx
    $VENV/bin/python benches/peers/ort_profile.py mnv2.onnx --threads 2 --iters 10

The fused operators ONNX Runtime runs (`FusedConv`, NCHWc `Conv` with an activation and a sum)
are reported under their own kinds; the first `--warmup` passes are left out.
"""
import argparse
import collections
import json
import os
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    x = np.random.default_rng(0).standard_normal((1, 3, a.size, a.size), dtype=np.float32)
    # The first `--warmup` passes are profiled too and left out of the tables below.
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(a.onnx, so, providers=["CPUExecutionProvider"])
        for _ in range(a.warmup + a.iters):
            sess.run(None, {"x": x})
        with open(sess.end_profiling()) as f:
            events = json.load(f)

    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    runs = runs[a.warmup:]
    start = runs[0]["ts"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and e["ts"] >= start]
    passes = len(runs)
    total = sum(r["dur"] for r in runs) / passes / 1e3
    kinds = collections.defaultdict(lambda: [0, 0.0])
    shapes = collections.defaultdict(lambda: [0, 0.0])
    for e in nodes:
        args = e.get("args", {})
        op = args.get("op_name", "?")
        ms = e["dur"] / 1e3 / passes
        kinds[op][0] += 1
        kinds[op][1] += ms
        ins = args.get("input_type_shape", [])
        dims = [list(d.values())[0] for d in ins if d]
        key = (op, " ".join("x".join(str(v) for v in d) for d in dims[:2]))
        shapes[key][0] += 1
        shapes[key][1] += ms
    print(f"ONNX Runtime {ort.__version__} profile of {os.path.basename(a.onnx)}: {total:.1f} ms "
          f"per pass (mean of {passes}), {a.threads} threads")
    print("| operator | calls | ms | share |")
    print("|---|---:|---:|---:|")
    for op, (n, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"| {op} | {n // passes} | {ms:.1f} | {100 * ms / total:.1f}% |")
    print("costliest nodes (operator, input and weight shapes):")
    print("| operator | shapes | calls | ms |")
    print("|---|---|---:|---:|")
    for (op, sh), (n, ms) in sorted(shapes.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"| {op} | {sh} | {n // passes} | {ms:.1f} |")


if __name__ == "__main__":
    main()
