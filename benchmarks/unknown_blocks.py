"""Leave-one-class-out k-NN unknown detection on pooled features of VGG16's last two blocks.

    python benchmarks/feature_views.py --data ../shared/data/jewellery --weights W --steps concat
    python benchmarks/unknown_blocks.py --cache-dir /tmp/h19/views

Reads ``feature_views.py``'s cache of the original images (``view_orig_training.npz`` and
``view_orig_test.npz``: ``block4_pool`` and ``block5_pool`` globally pooled). For each class, the
other classes' ``training/`` photos are the reference, their ``test/`` photos the known images
and the held-out class's test photos the unknown ones; the score is jewelclf's
``knn_distance`` (k = 1, square-rooted, cosine). Prints the AUROC per held-out class, the mean
and the worst, for block5 (what ``unknown_score`` uses), block4, and both blocks' unit vectors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jewelclf.evaluation.unknown import detection_metrics, knn_distance, unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/h19/views"))
    args = parser.parse_args()
    tr, te = (np.load(args.cache_dir / f"view_orig_{s}.npz") for s in ("training", "test"))
    order_tr, order_te = np.argsort(tr["idx"]), np.argsort(te["idx"])
    y_tr, y_te = tr["y"][order_tr], te["y"][order_te]
    blocks = {"block5": (tr["x5"], te["x5"]), "block4": (tr["x4"], te["x4"]),
              "block4+5 (each unit)": (np.hstack([unit(tr["x4"]), unit(tr["x5"])]),
                                       np.hstack([unit(te["x4"]), unit(te["x5"])]))}
    for name, (a, b) in blocks.items():
        a, b = a[order_tr], b[order_te]
        aurocs = [detection_metrics(knn_distance(a[y_tr != c], b[y_te != c]),
                                    knn_distance(a[y_tr != c], b[y_te == c]))["auroc"]
                  for c in np.unique(y_tr)]
        print(f"{name:22s} " + " ".join(f"{x:.3f}" for x in aurocs)
              + f"  mean {np.mean(aurocs):.3f} worst {np.min(aurocs):.3f}")


if __name__ == "__main__":
    main()
