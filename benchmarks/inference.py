"""Inference speed of an exported SavedModel against ``model.predict`` on the same model.

    python benchmarks/inference.py RUN_DIR SAVED_MODEL_VERSION_DIR --images DIR [--json OUT]

Both run in this one process, on the same real images:

- ``model.predict`` and a direct ``model(x, training=False)`` call take float32 pixels already
  decoded and resized (decoding is not timed for them);
- the SavedModel's ``serving_default`` takes the JPEG/PNG bytes and decodes and resizes them in
  the graph (what TF Serving runs); ``serving_pixels`` takes uint8 pixels at the model's size.

Batch 1: p50 and p99 latency over ``--iters`` calls after warm-up. Batch 32: images per second,
median of ``--reps`` calls. The methods take turns call by call, so load from other processes
falls on all of them alike. Ratios are SavedModel / ``model.predict`` (latency: < 1 is faster;
throughput: > 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("saved_model", type=Path, help="an exported version folder (…/NAME/VERSION)")
    p.add_argument("--images", type=Path, required=True, help="a folder of real images (searched recursively)")
    p.add_argument("--iters", type=int, default=100, help="batch-1 calls timed per method")
    p.add_argument("--reps", type=int, default=5, help="batch-32 calls timed per method")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    import keras
    import tensorflow as tf

    from jewelclf.inference.predict import collect_images, read_image_file
    from jewelclf.inference.runtime import keras_pixels
    from jewelclf.runs import load_run

    run = load_run(args.run_dir)
    files = collect_images([str(args.images)])
    encoded = [d for d in (read_image_file(f)[0] for f in files) if d is not None][: args.batch]
    if len(encoded) < args.batch:
        sys.exit(f"need {args.batch} readable images under {args.images}, found {len(encoded)}")
    pixels = keras_pixels(encoded, run.image_size, run.resize)
    x32 = pixels.astype(np.float32)
    x1 = x32[:1]
    model = run.model
    loaded = tf.saved_model.load(str(args.saved_model))
    sd = loaded.signatures["serving_default"]
    sp = loaded.signatures["serving_pixels"]
    bytes1, bytes32 = tf.constant(encoded[:1]), tf.constant(encoded)
    pix1, pix32 = tf.constant(pixels[:1]), tf.constant(pixels)

    # The same answers first: a benchmark of two different computations would mean nothing.
    ref = model.predict(x32, verbose=0)
    for name, out in (("serving_default", sd(images=bytes32)), ("serving_pixels", sp(pixels=pix32))):
        diff = float(np.abs(out["probabilities"].numpy() - ref).max())
        assert diff <= 1e-4, f"{name} differs from model.predict by {diff}"

    methods = {
        "keras model.predict (pixels)": (lambda: model.predict(x1, verbose=0),
                                         lambda: model.predict(x32, verbose=0, batch_size=args.batch)),
        "keras model(x) call (pixels)": (lambda: model(x1, training=False),
                                         lambda: model(x32, training=False)),
        "SavedModel serving_default (JPEG bytes)": (lambda: sd(images=bytes1), lambda: sd(images=bytes32)),
        "SavedModel serving_pixels (uint8 pixels)": (lambda: sp(pixels=pix1), lambda: sp(pixels=pix32)),
    }
    # Interleaved, one call of each method in turn, so that load from other processes on a
    # shared machine falls on all methods alike and the ratios stay fair.
    load_before = os.getloadavg()[0]
    for one, many in methods.values():
        for _ in range(3):
            one()
        many()
    t1 = {name: [] for name in methods}
    tb = {name: [] for name in methods}
    for _ in range(args.iters):
        for name, (one, _many) in methods.items():
            t0 = time.perf_counter()
            one()
            t1[name].append(time.perf_counter() - t0)
    for _ in range(args.reps):
        for name, (_one, many) in methods.items():
            t0 = time.perf_counter()
            many()
            tb[name].append(time.perf_counter() - t0)
    results = {}
    for name in methods:
        results[name] = {"p50_ms": float(np.percentile(t1[name], 50) * 1e3),
                         "p99_ms": float(np.percentile(t1[name], 99) * 1e3),
                         f"batch{args.batch}_img_per_s": float(args.batch / np.median(tb[name]))}
    base = results["keras model.predict (pixels)"]
    for r in results.values():
        r["p50_ratio_vs_predict"] = r["p50_ms"] / base["p50_ms"]
        r["throughput_ratio_vs_predict"] = r[f"batch{args.batch}_img_per_s"] / base[f"batch{args.batch}_img_per_s"]

    meta = {"run_dir": str(args.run_dir), "saved_model": str(args.saved_model), "backbone": run.config.model.backbone,
            "image_size": run.image_size, "iters": args.iters, "reps": args.reps, "batch": args.batch,
            "cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0]}
    print(f"{run.config.model.backbone} {run.image_size}px, {os.cpu_count()} CPU cores, TF {tf.__version__}; "
          f"batch 1: {args.iters} calls, batch {args.batch}: median of {args.reps}; "
          f"1-min load average {meta['loadavg_1min_before']:.1f} before, {meta['loadavg_1min_after']:.1f} after")
    head = (f"| method | batch 1 p50 (ms) | batch 1 p99 (ms) | batch {args.batch} (img/s) "
            f"| p50 vs predict | img/s vs predict |")
    print(head)
    print("|" + "---|" * 6)
    for name, r in results.items():
        print(f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r[f'batch{args.batch}_img_per_s']:.1f} "
              f"| {r['p50_ratio_vs_predict']:.2f}x | {r['throughput_ratio_vs_predict']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
