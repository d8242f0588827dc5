"""``jewelclf evaluate --unknown DIR``: how well the run tells photos of classes it was never
trained on (DIR) from the known images ``evaluate`` scores.

The score is :func:`jewelclf.evaluation.unknown.knn_distance`: the cosine distance of an
image's (square-rooted) pooled backbone features to the nearest image of the run's training
split, measured against the run's :mod:`jewelclf.evaluation.reference`. The unknown threshold
is chosen on the run's validation split: the 95th percentile of its images' distances (the
smallest of them that at least 95% of them do not exceed), so that 95% of known val images
pass; the export's ``unknown_score`` and ``needs_review`` use the same. A known image is
accepted when its
calibrated confidence reaches the run's review threshold and its distance is at or below the
unknown threshold.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf.data.sources import DataSource, Record, data_key, walk_files
from jewelclf.errors import JewelclfError
from jewelclf.evaluation import reference as reference_mod
from jewelclf.evaluation.reference import SCORE, VAL_PERCENTILE, unknown_threshold
from jewelclf.evaluation.unknown import KNN_K, detection_metrics

UNKNOWN_LABEL = "unknown"
REJECTED_UNKNOWN = "rejected_unknown_files.csv"
SCORES_CSV = "unknown_scores.csv"
FIX = "pass --unknown a folder of photos of classes the run was never trained on"
NO_THRESHOLD_NOTE = ("the run in '{run}' has no review threshold (no calibration.json): known "
                     "images are accepted at any confidence (confidence threshold 0)")


@dataclass
class KnnScores:
    """k-NN distances to the run's training split: of its val images, of the known images
    scored (in their order) and of the unknown photos (in :attr:`UnknownPlan.photos`' order)."""

    val: np.ndarray
    known: np.ndarray
    unknown: np.ndarray


@dataclass
class UnknownPlan:
    """The unknown photos of DIR and the run's reference they are measured against."""

    folder: Path
    run: Any  # jewelclf.runs.RunModel
    photos: list[Record]
    reference: Any = None  # jewelclf.evaluation.reference.UnknownReference
    rejected: int = 0

    def load_training(self, data_source: DataSource | None, log=print) -> None:
        """The run's reference (:func:`jewelclf.evaluation.reference.ensure`; built from
        ``data_source`` when it is the run's data, for a run that has none yet)."""
        self.reference = reference_mod.ensure(self.run, log, data_source)

    def check_photos(self, data_config, out_dir: Path) -> None:
        """Keep DIR's readable images (``evaluate``'s file check); list the others in
        :data:`REJECTED_UNKNOWN`; a one-line error when none is readable."""
        from jewelclf.data.validate import check_records, write_rejected

        checks = check_records(self.photos, data_config.max_pixels, data_config.min_image_side,
                               data_config.check_workers, desc="checking unknown photos")
        self.rejected = write_rejected(checks, out_dir / REJECTED_UNKNOWN)
        self.photos = [c.record for c in checks if c.ok]
        if not self.photos:
            raise JewelclfError(f"--unknown folder '{self.folder}' holds no readable image (see "
                                f"{out_dir / REJECTED_UNKNOWN}); {FIX}")

    def evaluate(self, records: list[Record], features: np.ndarray, y_true: np.ndarray,
                 probs: np.ndarray, out_dir: Path) -> dict[str, Any]:
        """The ``unknown`` fields of ``metrics.json`` for the known ``records`` (with their
        pooled ``features``, true indices and calibrated ``probs``); writes :data:`SCORES_CSV`
        into ``out_dir``."""
        scores = knn_scores(self, features)
        out = report(scores, y_true, probs, self.run.calibration)
        if out.get("note"):
            out["note"] = out["note"].format(run=self.run.run_dir)
        out.update(folder=str(self.folder), rejected_files=self.rejected)
        write_scores(out_dir / SCORES_CSV, records, self.photos, scores, out["threshold"])
        return out


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _refuse_overlap(folder: Path, files: list[Path], source: DataSource) -> None:
    """DIR must neither lie in DATA nor hold it (for a CSV manifest: nor hold its files)."""
    if source.tfds is not None:
        return
    where, real = Path(data_key(source.spec)), folder.resolve()
    if _inside(real, where):
        raise JewelclfError(f"--unknown folder '{folder}' is inside DATA '{source.spec}': its "
                            f"photos belong to the known data; {FIX}, outside DATA")
    if _inside(where, real):
        raise JewelclfError(f"DATA '{source.spec}' is inside the --unknown folder '{folder}': its "
                            f"known images would count as unknown; {FIX}, apart from DATA")
    listed = {str(Path(r.path).resolve()) for r in source.records}
    shared = next((p for p in files if str(p.resolve()) in listed), None)
    if shared is not None:
        raise JewelclfError(f"--unknown folder '{folder}' holds '{shared}', an image DATA "
                            f"'{source.spec}' lists; {FIX}, apart from DATA")


def prepare(folder: Path, run, source: DataSource) -> UnknownPlan:
    """Check ``folder`` (DIR) against the run and DATA's ``source`` before any image is read:
    it exists and is a folder, holds files, lies apart from DATA, and has no subfolder named
    like one of the run's classes. The plan holds DIR's files, any layout."""
    folder = Path(folder)
    if not folder.exists():
        raise JewelclfError(f"--unknown folder '{folder}' does not exist; {FIX}")
    if not folder.is_dir():
        raise JewelclfError(f"--unknown '{folder}' is not a folder; {FIX}")
    files = walk_files(folder)
    _refuse_overlap(folder, files, source)
    if not files:
        raise JewelclfError(f"--unknown folder '{folder}' holds no image files; {FIX}")
    classes = {c.lower(): c for c in run.class_names}
    if folder.resolve().name.lower() in classes:
        raise JewelclfError(
            f"--unknown folder '{folder}' is named like the run's class "
            f"'{classes[folder.resolve().name.lower()]}': that class was trained, so its photos "
            f"are not unknown; {FIX}")
    for path in files:
        rel = path.relative_to(folder)
        trained = next((p for p in rel.parts[:-1] if p.lower() in classes), None)
        if trained is not None:
            raise JewelclfError(
                f"--unknown folder '{folder}' has a subfolder '{trained}' named like the run's "
                f"class '{classes[trained.lower()]}': that class was trained, so its photos are "
                f"not unknown; move them out of '{folder}'")
    photos = [Record(str(p.resolve()), str(p.relative_to(folder)), UNKNOWN_LABEL) for p in files]
    return UnknownPlan(folder, run, photos)


def knn_scores(plan: UnknownPlan, known_features: np.ndarray) -> KnnScores:
    """The k-NN distances of the run's val images, of the known images (their pooled
    ``known_features``) and of the plan's unknown photos (``plan.load_training`` first)."""
    photos = DataSource(str(plan.folder), plan.folder, [UNKNOWN_LABEL], plan.photos)
    _, unknown_features = reference_mod.model_features(plan.run.model, photos, plan.photos,
                                                       plan.run.config)
    ref = plan.reference
    return KnnScores(val=ref.val_distances, known=ref.distances(known_features),
                     unknown=ref.distances(unknown_features))


def report(scores: KnnScores, y_true: np.ndarray, probs: np.ndarray, calibration) -> dict[str, Any]:
    """AUROC and FPR at 95% TPR (unknown photos positive), the val-chosen threshold, the share
    of unknown photos it flags, and what the known images keep at both thresholds."""
    threshold = unknown_threshold(scores.val)
    confidence_threshold = getattr(calibration, "threshold", None)
    probs, y_true = np.asarray(probs, np.float64), np.asarray(y_true, int)
    accepted = scores.known <= threshold
    if confidence_threshold is not None:
        accepted &= probs.max(axis=1) >= confidence_threshold
    correct = probs.argmax(axis=1) == y_true
    out: dict[str, Any] = {
        "score": SCORE, "k": KNN_K, **detection_metrics(scores.known, scores.unknown),
        "threshold": threshold,
        "threshold_rule": f"{VAL_PERCENTILE:g}th percentile of the run's {len(scores.val)} val "
                          f"images' distances",
        "n_known": int(len(scores.known)), "n_unknown": int(len(scores.unknown)),
        "unknown_flagged": float(np.mean(scores.unknown > threshold)),
        "confidence_threshold": float(confidence_threshold or 0.0),
        "known_coverage": float(accepted.mean()),
        "known_accuracy": float(correct[accepted].mean()) if accepted.any() else None,
    }
    if confidence_threshold is None:
        out["note"] = NO_THRESHOLD_NOTE
    return out


def write_scores(path: Path, known: list[Record], unknown: list[Record], scores: KnnScores,
                 threshold: float) -> None:
    """One row per image: its path, ``known`` or ``unknown``, its distance, whether it is flagged."""
    from jewelclf.fsio import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "kind", "distance", "flagged"])
    for kind, records, dist in (("known", known, scores.known), ("unknown", unknown, scores.unknown)):
        w.writerows([r.key, kind, f"{d:.6f}", int(d > threshold)] for r, d in zip(records, dist))
    atomic_write_text(path, buf.getvalue())


def summary_line(unknown: dict[str, Any]) -> str:
    """The line ``evaluate`` prints for the ``unknown`` fields."""
    accuracy = "n/a" if unknown["known_accuracy"] is None else f"{unknown['known_accuracy']:.2f}"
    return (f"unknown: AUROC {unknown['auroc']:.2f}, FPR at 95% TPR {unknown['fpr_at_95_tpr']:.2f}, "
            f"threshold {unknown['threshold']:.2f} (flags {unknown['unknown_flagged']:.0%} of "
            f"{unknown['n_unknown']} unknown photos); known images: coverage "
            f"{unknown['known_coverage']:.2f}, accuracy {accuracy}")
