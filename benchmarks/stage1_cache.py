"""Stage 1 on cached features against stage 1 through the frozen backbone, in one process.

Both variants train the same head (same seed, same data, same epochs, early stopping off) on the
same prepared split; the cached variant computes the frozen backbone's pooled features once and
trains the head on them. Prints seconds per epoch and for the whole stage, and the speed-ups.

Usage::

    python benchmarks/stage1_cache.py ../shared/data/jewellery --backbone mobilenet_025 \\
        --weights ../shared/weights/mobilenet_0.25_224_imagenet_notop.h5 --image-size 128 --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from jewelclf.config import resolve  # noqa: E402
from jewelclf.data.prepare import make_datasets, prepare_data  # noqa: E402
from jewelclf.modeling.classifier import build_classifier  # noqa: E402
from jewelclf.training.stages import train_stage1  # noqa: E402


def run(mode: str, args, work: Path, quiet) -> tuple[float, list[float], float]:
    config = resolve(None, {
        "model": {"backbone": args.backbone, "weights": args.weights},
        "data": {"image_size": args.image_size, "cache": "memory"},
        "train": {"stage1": {"epochs": args.epochs, "patience": args.epochs + 1, "cache_features": mode}},
    })
    keras.utils.set_random_seed(config.train.seed)
    run_dir = work / mode
    run_dir.mkdir()
    data = prepare_data(args.data, config, run_dir, quiet)
    datasets = make_datasets(data, config, run_dir / "cache", quiet)
    # Fill the decoded-image cache first, so both variants start from decoded images.
    for _ in datasets.train_in_order:
        pass
    for _ in datasets.val:
        pass
    model = build_classifier(config, len(data.class_names))
    t0 = time.perf_counter()
    summary = train_stage1(model, config, datasets.train, datasets.val, datasets.train_in_order,
                           datasets.labels, datasets.class_weights, run_dir, quiet)
    total = time.perf_counter() - t0
    with open(run_dir / "history.csv") as f:
        epochs = [float(r["seconds"]) for r in csv.DictReader(f)]
    return total, epochs, summary["val_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--backbone", default="mobilenet_025")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    quiet = lambda msg: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run(mode, args, Path(tmp), quiet) for mode in ("off", "on")}
    (t_off, e_off, acc_off), (t_on, e_on, acc_on) = results["off"], results["on"]
    # Median: the first epoch of each variant also pays for tracing the train step.
    per_off, per_on = statistics.median(e_off), statistics.median(e_on)
    print(f"{args.backbone} at {args.image_size} px, {args.epochs} stage-1 epochs, {os.cpu_count()} CPU cores")
    print(f"{'variant':<34} {'median s/epoch':>15} {'stage s':>9} {'val acc':>8}")
    print(f"{'through the frozen backbone':<34} {per_off:15.3f} {t_off:9.1f} {acc_off:8.4f}")
    print(f"{'cached features (incl. one pass)':<34} {per_on:15.3f} {t_on:9.1f} {acc_on:8.4f}")
    print(f"speed-up per epoch: {per_off / per_on:.0f}x; whole stage: {t_off / t_on:.1f}x")


if __name__ == "__main__":
    main()
