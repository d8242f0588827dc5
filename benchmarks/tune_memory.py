"""Does memory stay flat across tuning trials? RSS after trial 3 and after the last trial.

Runs one random search of ``--trials`` trials on tiny generated images (in-process, the real
``jewelclf.tuning.tune``), then reads each trial's ``rss_mb`` (resident memory when the trial
ended) and ``peak_rss_mb`` (the process's high-water mark) from ``trials.csv``.

    python benchmarks/tune_memory.py                    # 20 trials, mobilenet_025, weights none, 32 px
    python benchmarks/tune_memory.py --trials 5 --backbone mobilenet_025 --image-size 32

The default space is searched, so trials with ``unfreeze_blocks > 0`` run stage 2 as well.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

COLOURS = {"necklace": (200, 40, 40), "ring": (40, 200, 40), "watch": (40, 40, 200)}


def make_data(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """``root/<class>/<i>.jpg``: noisy images dominated by their class colour."""
    rng = np.random.default_rng(seed)
    for label, colour in COLOURS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(colour) + rng.integers(-40, 40, (40, 48, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / label / f"{i:03d}.jpg")
    return root


def measure(data: Path, run_dir: Path, trials: int, overrides: dict, space_yaml: dict | None = None,
            log=print) -> dict:
    """Run the search; return the RSS figures after trial 3 and after the last trial (MiB)."""
    from jewelclf.config import resolve
    from jewelclf.tuning.tune import parse_space, tune

    config = resolve(None, overrides)
    t0 = time.perf_counter()
    tune(str(data), run_dir, config, parse_space(space_yaml or {}), tuner="random",
         max_trials=trials, log=log)
    seconds = time.perf_counter() - t0
    with open(run_dir / "trials.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "COMPLETED"]
    first = rows[min(2, len(rows) - 1)]
    last = rows[-1]
    return {"trials": len(rows), "seconds": round(seconds, 1),
            "rss_mb_after_3": float(first["rss_mb"]), "rss_mb_after_last": float(last["rss_mb"]),
            "peak_rss_mb_after_3": float(first["peak_rss_mb"]),
            "peak_rss_mb_after_last": float(last["peak_rss_mb"]),
            "rss_mb_per_trial": [float(r["rss_mb"]) for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--backbone", default="mobilenet_025")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4, help="stage-1 epochs per trial")
    ap.add_argument("--fine-tune-epochs", type=int, default=2, help="stage-2 epochs per trial")
    args = ap.parse_args()
    overrides = {"model": {"backbone": args.backbone, "weights": args.weights},
                 "data": {"image_size": args.image_size, "batch_size": 8},
                 "train": {"stage1": {"epochs": args.epochs, "learning_rate": 0.01},
                           "stage2": {"epochs": args.fine_tune_epochs}}}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data")
        r = measure(data, Path(tmp) / "run", args.trials, overrides, log=lambda s: None)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores, {platform.platform()}")
    print(f"search: random, {r['trials']} trials of {args.backbone} ({args.weights} weights, "
          f"{args.image_size} px), stage 1 {args.epochs} + stage 2 {args.fine_tune_epochs} epochs, "
          f"{r['seconds']:.0f}s")
    print(f"RSS after trial 3: {r['rss_mb_after_3']:.0f} MiB (peak {r['peak_rss_mb_after_3']:.0f} MiB)")
    print(f"RSS after trial {r['trials']}: {r['rss_mb_after_last']:.0f} MiB "
          f"(peak {r['peak_rss_mb_after_last']:.0f} MiB)")
    print("RSS per trial (MiB): " + " ".join(f"{v:.0f}" for v in r["rss_mb_per_trial"]))


if __name__ == "__main__":
    main()
