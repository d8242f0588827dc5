"""A run's unknown reference: its training images' features, from which ``unknown_score`` is measured.

``unknown_score`` is the cosine distance of an image's square-rooted pooled features to the
nearest training image (:func:`jewelclf.evaluation.unknown.knn_distance`). ``fit`` stores the
training images' unit vectors and its validation images' distances to them in the run
(``unknown_reference.npz``), so ``evaluate --unknown``, ``export`` and ``predict`` need neither
the training data nor a pass over it. The unknown threshold is the 95th percentile of the
validation distances: 95% of the run's known validation images pass it.

A run trained before the reference existed gets one built from the data it trained on, on
first use (:func:`ensure`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf.errors import JewelclfError
from jewelclf.evaluation.unknown import KNN_K, nearest_distance, unit
from jewelclf.layout import SPLITS, UNKNOWN_REFERENCE

SCORE = "knn"
VAL_PERCENTILE = 95.0
"""The share (in %) of the run's known val images whose distance the unknown threshold passes."""


def unknown_threshold(val_distances: np.ndarray) -> float | None:
    """The smallest val distance that at least :data:`VAL_PERCENTILE` % of them do not exceed
    (``None`` without val images). "higher": a val distance itself, so that at least 95% pass
    on few images too."""
    if not len(val_distances):
        return None
    return float(np.percentile(val_distances, VAL_PERCENTILE, method="higher"))


@dataclass
class UnknownReference:
    """The training images' unit feature vectors and the val images' distances to them."""

    train: np.ndarray  # float32 [n, dim]
    val_distances: np.ndarray  # float64 [m]

    @property
    def threshold(self) -> float | None:
        return unknown_threshold(self.val_distances)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """The unknown score of pooled ``features`` (higher: further from every training image)."""
        return nearest_distance(self.train, features)

    def describe(self) -> dict[str, Any]:
        """What an export records of it (``jewelclf.json``)."""
        return {"score": SCORE, "k": KNN_K, "threshold": self.threshold,
                "threshold_rule": f"{VAL_PERCENTILE:g}th percentile of the run's "
                                  f"{len(self.val_distances)} val images' distances",
                "train_images": int(len(self.train)), "dim": int(self.train.shape[1])}

    def describe_line(self) -> str:
        threshold = "none (no val images)" if self.threshold is None else f"{self.threshold:.4f}"
        return (f"unknown reference: {len(self.train)} training images' features; unknown "
                f"threshold {threshold} ({VAL_PERCENTILE:g}% of {len(self.val_distances)} val "
                f"images lie closer)")


def from_features(train_features: np.ndarray, val_features: np.ndarray) -> UnknownReference:
    """The reference of pooled train and val features."""
    train = unit(train_features).astype(np.float32)
    return UnknownReference(train, nearest_distance(train, val_features))


def model_features(model, source, records, config) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities and pooled backbone features of ``records``, decoded as ``evaluate``
    decodes them, in one pass of ``model``."""
    from jewelclf.data.pipeline import evaluation_batches
    from jewelclf.modeling.classifier import with_features

    if not records:  # never run the model on zero rows
        return np.zeros((0, len(source.class_names)), np.float32), np.zeros((0, 0), np.float32)
    ds = evaluation_batches(source, records, config.data, len(source.class_names))
    out = with_features(model).predict(ds, verbose=0)
    return np.asarray(out["probabilities"]), np.asarray(out["features"], np.float32)


def write(path: Path, reference: UnknownReference) -> None:
    """Save ``reference`` at ``path`` (atomically)."""
    from jewelclf.fsio import atomic_save

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, train=reference.train, val_distances=reference.val_distances)

    atomic_save(Path(path), save)


def read(path: Path) -> UnknownReference | None:
    """The reference saved at ``path``; ``None`` when there is none (a run from before it existed)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            train, val = np.asarray(z["train"], np.float32), np.asarray(z["val_distances"], np.float64)
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise JewelclfError(f"'{path}' cannot be read ({type(e).__name__}); delete it, and it is "
                            f"built again from the run's training images") from None
    if train.ndim != 2 or not len(train) or val.ndim != 1 or not np.isfinite(train).all():
        raise JewelclfError(f"'{path}' holds no usable training vectors; delete it, and it is "
                            f"built again from the run's training images")
    return UnknownReference(train, val)


def split_rows(run_dir: Path, needed_for: str) -> dict[str, str]:
    """The run's ``splits.csv`` as ``{path: split}``; a one-line error when missing."""
    from jewelclf.runs import read_splits

    rows = {row["path"]: row["split"] for row in read_splits(run_dir)}
    if not rows:
        raise JewelclfError(f"'{Path(run_dir) / SPLITS}' is missing or unreadable, and {needed_for} "
                            f"needs the run's training images; fit the run again")
    return rows


def train_and_val(run, needed_for: str, data_source=None):
    """The run's data source and its train and val records (from ``data_source`` when it is the
    run's data, else from the data the run trained on); one-line errors when missing."""
    run_dir = Path(run.run_dir)
    rows = split_rows(run_dir, needed_for)
    source = data_source if data_source is not None else run.training_source(
        f"{needed_for} needs the images the run trained on: restore them, or fit the run again")
    source.class_names = list(run.class_names)
    known = set(run.class_names)
    by_key = {r.key: r for r in source.records if r.label in known}
    picked = {s: [replace(by_key[k], split=s) for k, split in rows.items() if split == s and k in by_key]
              for s in ("train", "val")}
    for s in ("train", "val"):
        if not picked[s]:
            raise JewelclfError(
                f"{needed_for} needs the run's {s} images, but none of the {s} split of "
                f"'{run_dir / SPLITS}' is in '{source.spec}'; restore the data the run trained on")
    return source, picked["train"], picked["val"]


def ensure(run, log=print, data_source=None) -> UnknownReference:
    """The run's reference: read from the run, or (a run from before it existed) built from
    the data it trained on and saved in the run."""
    path = Path(run.run_dir) / UNKNOWN_REFERENCE
    found = read(path)
    if found is not None:
        return found
    source, train, val = train_and_val(run, "the unknown score", data_source)
    log(f"'{run.run_dir}' has no {UNKNOWN_REFERENCE} (trained before jewelclf kept one): "
        f"embedding its {len(train)} train and {len(val)} val images once...")
    _, features = model_features(run.model, source, train + val, run.config)  # one pass
    built = from_features(features[:len(train)], features[len(train):])
    write(path, built)
    log(built.describe_line())
    return built
