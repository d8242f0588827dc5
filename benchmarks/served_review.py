"""The review outputs of an exported SavedModel on a labelled folder, read as a TF Serving client.

    python benchmarks/served_review.py exported_models/quick/1 ../shared/data/jewellery/test

Runs ``serving_default`` on every image of ``FOLDER/<class>/...`` in this process, which never
imports jewelclf (asserted), and prints how many images ``needs_review`` flags (by confidence,
by ``unknown_score``), the accuracy of the accepted and of the flagged ones, and how many
misclassified images it sends to review. The thresholds come from ``assets.extra/jewelclf.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved_model", type=Path, help="a version folder of a jewelclf export")
    parser.add_argument("folder", type=Path, help="labelled images: FOLDER/<class>/<image>")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    fn = tf.saved_model.load(str(args.saved_model)).signatures["serving_default"]
    files = sorted(p for p in args.folder.rglob("*") if p.is_file())
    truth, top, confidence, unknown, review = [], [], [], [], []
    for i in range(0, len(files), args.batch_size):
        batch = files[i:i + args.batch_size]
        out = {k: v.numpy() for k, v in fn(images=tf.constant([f.read_bytes() for f in batch])).items()}
        truth += [f.relative_to(args.folder).parts[0] for f in batch]
        top += [c.decode() for c in out["classes"][:, 0]]
        confidence += out["confidence"].tolist()
        unknown += out["unknown_score"].tolist()
        review += out["needs_review"].tolist()
    assert not any(m.split(".")[0] == "jewelclf" for m in sys.modules), "jewelclf was imported"

    info = json.loads((args.saved_model / "assets.extra" / "jewelclf.json").read_text())
    review_t, unknown_t = info["review_threshold"], info["unknown"]["threshold"]
    correct, review = np.array(truth) == np.array(top), np.array(review)
    by_conf = np.array(confidence) < (review_t if review_t is not None else -1)
    by_unknown = np.array(unknown) > (unknown_t if unknown_t is not None else np.inf)
    print(f"{len(files)} images; accuracy {correct.mean():.3f}; review threshold {review_t}, "
          f"unknown threshold {unknown_t}")
    print(f"needs_review {review.sum()} ({review.mean():.1%}): by confidence {by_conf.sum()}, "
          f"by unknown_score {by_unknown.sum()}, both {(by_conf & by_unknown).sum()}")
    print(f"accepted {(~review).sum()}: accuracy {correct[~review].mean():.3f}; flagged "
          f"{review.sum()}: accuracy {correct[review].mean():.3f}")
    print(f"misclassified images sent to review: {(~correct & review).sum()} of {(~correct).sum()}")


if __name__ == "__main__":
    main()
