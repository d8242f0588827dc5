"""Fast mode against the plain tuner: the same search on the same data, in one process.

Each variant runs ``jewelclf.tuning.tune`` with the random tuner and the same seed, so the
trials (their hyperparameter values) are the same; only how stage 1 reaches the features differs:

- ``fast``: the frozen backbone's features are computed once for the whole search (the default
  of ``jewelclf tune``);
- ``per-trial``: each trial computes them itself, as ``jewelclf fit`` does once per run
  (``--no-fast``);
- ``plain``: stage 1 trains through the backbone on the images every epoch, as a plain Keras
  Tuner search over the whole model does (``train.stage1.cache_features: off``).

Trials are head-only (``unfreeze_blocks`` fixed at 0): what fast mode speeds up. Wall times
include the data check and decoding of each run (the same work in every variant; the files are
read once beforehand so that no variant pays for a cold disk cache).

    python benchmarks/tune_speed.py ../shared/data/jewellery --backbone mobilenet_025 \\
        --weights ../shared/weights/mobilenet_0.25_224_imagenet_notop.h5 --image-size 128 --trials 5
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = {"fast": ({}, True), "per-trial": ({}, False),
            "plain": ({"train": {"stage1": {"cache_features": "off"}}}, False)}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def run_variants(data: str, work: Path, overrides: dict, trials: int, variants: list[str],
                 log=print) -> dict[str, dict]:
    from jewelclf.config import resolve
    from jewelclf.tuning.tune import parse_space, tune

    for p in Path(data).rglob("*"):  # warm the disk cache once, for every variant alike
        if p.is_file():
            p.read_bytes()
    results = {}
    for name in variants:
        extra, fast = VARIANTS[name]
        config = resolve(None, _merge(overrides, extra))
        run_dir = work / name
        t0 = time.perf_counter()
        tune(data, run_dir, config, parse_space({"unfreeze_blocks": {"fixed": 0}}), tuner="random",
             max_trials=trials, fast=fast, log=lambda s: None)
        wall = time.perf_counter() - t0
        info = json.loads((run_dir / "run_info.json").read_text())
        with open(run_dir / "trials.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        results[name] = {"wall_seconds": round(wall, 1), "search_seconds": info["search_seconds"],
                         "feature_seconds": info.get("fast_mode_seconds") or 0.0,
                         "trials": [(r["head_units"], r["dropout"], r["stage1_learning_rate"]) for r in rows],
                         "best": max(float(r["score"]) for r in rows if r["status"] == "COMPLETED")}
        log(f"{name}: {results[name]['wall_seconds']:.1f}s wall, best val_accuracy "
            f"{results[name]['best']:.4f}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--backbone", default="mobilenet_025")
    ap.add_argument("--weights", required=True, help="imagenet or a no-top weights file (not none)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10, help="stage-1 epochs per trial")
    ap.add_argument("--variants", default="fast,per-trial,plain")
    args = ap.parse_args()
    overrides = {"model": {"backbone": args.backbone, "weights": args.weights},
                 "data": {"image_size": args.image_size},
                 "train": {"stage1": {"epochs": args.epochs, "patience": args.epochs},
                           "stage2": {"epochs": 0}}}
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        r = run_variants(args.data, Path(tmp), overrides, args.trials, variants)
    print(f"machine: {os.cpu_count()} CPU cores, {platform.platform()}")
    print(f"search: random, {args.trials} head-only trials of {args.backbone} at {args.image_size} px, "
          f"{args.epochs} stage-1 epochs each, on {args.data}")
    same = len({tuple(v["trials"]) for v in r.values()}) == 1
    print(f"same trials in every variant: {'yes' if same else 'NO'}")
    for name, v in r.items():
        print(f"{name:>9}: {v['wall_seconds']:7.1f}s wall ({v['search_seconds']:.1f}s search"
              + (f" + {v['feature_seconds']:.1f}s features once" if v["feature_seconds"] else "")
              + f"), best val_accuracy {v['best']:.4f}")
    if "fast" in r:
        for name in r:
            if name != "fast":
                print(f"speed-up of fast mode over {name}: {r[name]['wall_seconds'] / r['fast']['wall_seconds']:.1f}x")


if __name__ == "__main__":
    main()
