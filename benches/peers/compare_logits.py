"""Compares two logits files written by `deeplab predict --logits` (N x classes x H x W, f32):
max |difference|, the logits' scale, and argmax agreement overall and per image. Used for the
README's half-precision table:
    deeplab --dtype f32 predict IMAGES --weights W --preprocess resize:257 --out /tmp/a --logits /tmp/f32.npy
    deeplab --dtype f16 predict IMAGES --weights W --preprocess resize:257 --out /tmp/b --logits /tmp/f16.npy
    python3 benches/peers/compare_logits.py /tmp/f32.npy /tmp/f16.npy
"""
import sys

import numpy as np


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: compare_logits.py REFERENCE.npy OTHER.npy")
    a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
    if a.shape != b.shape:
        raise SystemExit(f"shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    agree = [(a[i].argmax(0) == b[i].argmax(0)).mean() for i in range(a.shape[0])]
    print(f"max |logit difference| {d.max():.4f} (logits up to {np.abs(a).max():.1f})")
    print(f"argmax agreement {(a.argmax(1) == b.argmax(1)).mean() * 100:.2f}% "
          f"(per image {min(agree) * 100:.2f}-{max(agree) * 100:.2f}%)")


if __name__ == "__main__":
    main()
