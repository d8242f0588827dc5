"""How well ``jewelclf review`` finds wrong labels: flip a seeded share of the training labels
of a class-folder data set, fit on it, review the run, and score the flipped files' ranks.

    python benchmarks/label_noise.py ../shared/data/jewellery \\
        --config experiments/quick_mobilenet.yaml \\
        --weights ../shared/weights/mobilenet_0.25_224_imagenet_notop.h5

For each noise level (default 5% and 10%) the data is copied to a temp folder (DATA itself is
never touched) and the chosen training files are moved to another class's folder, drawn
uniformly. N is the number flipped. It prints, per head (logistic, keras), the precision and
recall of the flipped files among the top N and top 2N of ``label_issues.csv`` (cleanlab's
flagged files, most suspicious first; when it flags fewer than 2N, all of them), and the same
for the full ranking of every reviewed image under three of cleanlab's ranking methods, which
is how the ``self_confidence`` choice was made.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"}
METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


def noisy_copy(data: Path, dest: Path, fraction: float, seed: int) -> list[str]:
    """Copy ``data`` (``training/`` and ``test/`` of class folders) to ``dest``, moving a seeded
    ``fraction`` of the training files to another class; return their new relative paths."""
    shutil.copytree(data, dest)
    train = dest / "training"
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    files = sorted(p for c in classes for p in (train / c).iterdir()
                   if p.suffix.lower() in IMAGE_EXTS)
    rng = random.Random(seed)
    flipped = []
    for f in rng.sample(files, round(fraction * len(files))):
        new = rng.choice([c for c in classes if c != f.parent.name])
        target = train / new / f.name
        while target.exists():
            target = target.with_name(f"{target.stem}_x{target.suffix}")
        f.rename(target)
        flipped.append(target.relative_to(dest).as_posix())
    return flipped


def precision_recall(ranked: list[str], flipped: set[str], k: int) -> tuple[float, float]:
    top = ranked[:k]
    hits = sum(p in flipped for p in top)
    return (hits / len(top) if top else 0.0), hits / len(flipped)


def _line(name: str, ranked: list[str], flipped: set[str]) -> dict:
    n = len(flipped)
    p1, r1 = precision_recall(ranked, flipped, n)
    p2, r2 = precision_recall(ranked, flipped, 2 * n)
    print(f"  {name:<44} listed {len(ranked):>5}  top N: P {p1:.3f} R {r1:.3f}   "
          f"top 2N: P {p2:.3f} R {r2:.3f}")
    return {"listed": len(ranked), "precision_n": p1, "recall_n": r1, "precision_2n": p2,
            "recall_2n": r2}


def method_rankings(run: Path, data: str, head: str) -> dict[str, list[str]]:
    """The full ranking of every reviewed image under each of :data:`METHODS`."""
    import numpy as np
    from cleanlab.rank import get_label_quality_scores

    from jewelclf import config as config_mod
    from jewelclf import runs as rd
    from jewelclf.data.sources import load_source
    from jewelclf.review import label_issues as review

    info = rd.require_finished_run(run)
    config = config_mod.from_dict(config_mod.load_yaml(run / rd.CONFIG))
    names = rd.read_class_names(run)
    source = load_source(data)
    records = review.run_records(run, info, source, review.split_rows(run), names)
    reviewed = [r for s in review.REVIEWED_SPLITS for r in records if r.split == s]
    x, _ = review.stage1_features(run, config, source, reviewed, names, log=lambda _: None)
    y = np.array([names.index(r.label) for r in reviewed])
    probs = review.out_of_fold_probs(x, y, len(names), 5, config, head)
    out = {}
    for method in METHODS:
        scores = get_label_quality_scores(y, probs, method=method)
        out[method] = [reviewed[i].key for i in np.argsort(scores, kind="stable")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="a folder with training/ and test/ of class folders")
    ap.add_argument("--config", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", nargs="+", default=["logistic", "keras"])
    ap.add_argument("--work", type=Path, help="keep the copies and runs here (default: a temp "
                                              "folder, removed at the end)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()

    from jewelclf.review.label_issues import read_issues, review_run

    work = args.work or Path(tempfile.mkdtemp(prefix="label_noise_"))
    results = {}
    try:
        for fraction in args.noise:
            tag = f"noise{round(fraction * 100):02d}"
            copy = work / tag / "data"
            flipped = set(noisy_copy(args.data, copy, fraction, args.seed))
            run = work / tag / "run"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "jewelclf", "fit", str(copy), "--config",
                            args.config, "--weights", args.weights, "--run-dir", str(run),
                            "--seed", str(args.seed)], check=True, stdout=subprocess.DEVNULL)
            t_fit = time.perf_counter() - t0
            print(f"{fraction:.0%} noise: {len(flipped)} training labels flipped (N), fit "
                  f"{t_fit:.0f} s")
            results[tag] = {"flipped": len(flipped), "fit_seconds": round(t_fit, 1)}
            for head in args.heads:
                out = work / tag / f"review_{head}"
                t0 = time.perf_counter()
                summary = review_run(run, str(copy), out, overwrite=True, head=head,
                                     log=lambda _: None)
                t_review = time.perf_counter() - t0
                print(f" head {head}: review {t_review:.1f} s, {summary['reviewed']} reviewed, "
                      f"out-of-fold accuracy {summary['out_of_fold_accuracy']:.3f}, "
                      f"{summary['duplicate_label_conflicts']} duplicate-label groups")
                listed = [r["path"] for r in read_issues(out / "label_issues.csv")]
                figures = {"review_seconds": round(t_review, 1), "summary": summary,
                           "label_issues.csv": _line("label_issues.csv (cleanlab flagged)",
                                                     listed, flipped)}
                for method, ranked in method_rankings(run, str(copy), head).items():
                    figures[method] = _line(f"all reviewed, ranked by {method}", ranked, flipped)
                results[tag][head] = figures
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
