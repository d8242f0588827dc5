"""Resize quality: how close jewelclf's decode+resize comes to a high-quality reference.

For every JPEG in a folder, the reference is a float Lanczos-3 antialiased resize of the full
decode. Prints the mean PSNR (dB, higher is closer) of three uint8 resizes against it, over all
JPEGs and split by whether the short side is at least twice the input side (where jewelclf
decodes at a reduced DCT scale, and where a plain bilinear resize aliases):

- ``jewelclf``: :func:`jewelclf.data.images.load_image`, what training and serving use;
- ``previous``: the full decode with an antialiased bilinear resize (jewelclf before 2026-11-23);
- ``plain bilinear``: Keras' default (``tf.image.resize`` without antialiasing).

Usage::

    python benchmarks/resize_quality.py ../shared/data/jewellery/training --size 224
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from jewelclf.data.images import load_image, sniff_format  # noqa: E402


def to_uint8(x) -> np.ndarray:
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8).numpy()


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = max(float(((x.astype(np.float64) - ref) ** 2).mean()), 1e-9)
    return 10 * np.log10(255.0 ** 2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a folder of images (searched recursively)")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    size = args.size
    rows = []
    for path in sorted(p for p in Path(args.folder).rglob("*") if p.is_file()):
        data = path.read_bytes()
        if sniff_format(data[:16]) != "JPEG":
            continue
        full = tf.io.decode_jpeg(data, channels=3)
        ref = tf.image.resize(tf.cast(full, tf.float32), [size, size], method="lanczos3",
                              antialias=True).numpy()
        large = min(full.shape[:2]) >= 2 * size
        rows.append((large,
                     psnr(load_image(tf.constant(data), size).numpy(), ref),
                     psnr(to_uint8(tf.image.resize(full, [size, size], antialias=True)), ref),
                     psnr(to_uint8(tf.image.resize(full, [size, size])), ref)))
    if not rows:
        raise SystemExit(f"no JPEGs under {args.folder}")
    large = np.array([r[0] for r in rows])
    scores = np.array([r[1:] for r in rows])
    print(f"{len(rows)} JPEGs, {size} px; mean PSNR (dB) against a float Lanczos-3 resize of the full decode")
    print(f"{'resize':<16} {'all':>7} {f'short side >= {2 * size} ({large.sum()})':>26} "
          f"{f'others ({(~large).sum()})':>16}")
    for i, name in enumerate(("jewelclf", "previous", "plain bilinear")):
        big = scores[large, i].mean() if large.any() else float("nan")
        small = scores[~large, i].mean() if (~large).any() else float("nan")
        print(f"{name:<16} {scores[:, i].mean():7.1f} {big:26.1f} {small:16.1f}")


if __name__ == "__main__":
    main()
