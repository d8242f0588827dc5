"""The review policy: what turns a model's probabilities and features into the served answer.

An answer is the calibrated probabilities (the run's temperature), their top value
(``confidence``), the distance to the nearest training image (``unknown_score``, the run's
:mod:`jewelclf.evaluation.reference`) and ``needs_review``: true when the confidence is below
the review threshold or the unknown score above the unknown threshold. ``tta`` names the
test-time augmentation the raw probabilities are computed with (:mod:`jewelclf.modeling.tta`):
``none``, or ``flip`` for the mean over a horizontal flip. The SavedModel's graph
computes the same in TensorFlow (:func:`jewelclf.export.serving.build_archive`); this NumPy
form is what ``predict`` with a Keras model answers and what the export's parity check holds
the graph to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jewelclf.errors import JewelclfError
from jewelclf.evaluation.calibration import scale


@dataclass
class ReviewPolicy:
    """The run's temperature, review threshold and unknown reference (``None``: no such part),
    and the test-time augmentation (``tta``) that computes the raw probabilities it answers from.

    ``review_threshold_source`` says where the threshold came from: ``run`` (chosen on val by
    ``fit``), ``--review-threshold`` (the export's override) or ``none``."""

    temperature: float = 1.0
    review_threshold: float | None = None
    review_threshold_source: str = "none"
    reference: Any = None  # jewelclf.evaluation.reference.UnknownReference
    tta: str = "none"

    @property
    def unknown_threshold(self) -> float | None:
        return self.reference.threshold if self.reference is not None else None

    def answer(self, raw: np.ndarray, features: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Calibrated ``probabilities``, ``confidence``, ``unknown_score`` (0 without a
        reference or ``features``) and ``needs_review`` of the model's ``raw`` probabilities."""
        probs = np.asarray(scale(np.asarray(raw, np.float64), self.temperature), np.float64)
        confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
        if self.reference is not None and features is not None:
            unknown = self.reference.distances(features)
        else:
            unknown = np.zeros(len(probs))
        review = np.zeros(len(probs), bool)
        if self.review_threshold is not None:
            review |= confidence < self.review_threshold
        if self.unknown_threshold is not None and features is not None:
            review |= unknown > self.unknown_threshold
        return {"probabilities": probs, "confidence": confidence, "unknown_score": unknown,
                "needs_review": review}

    def describe(self) -> dict[str, Any]:
        """What an export records in ``jewelclf.json`` (``unknown`` is absent without a reference)."""
        out: dict[str, Any] = {"temperature": self.temperature, "review_threshold": self.review_threshold,
                               "review_threshold_source": self.review_threshold_source, "tta": self.tta}
        if self.reference is not None:
            out["unknown"] = self.reference.describe()
        return out


def check_review_threshold(value: float | None) -> None:
    """``--review-threshold`` is a calibrated probability: 0 to 1."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise JewelclfError(f"--review-threshold {value:g} is not a probability; pass a value "
                            f"from 0 (never review for confidence) to 1")


def for_run(run, review_threshold: float | None = None, log=print, reference: bool = True,
            tta: str = "none") -> ReviewPolicy:
    """The policy of a finished run (a :class:`jewelclf.runs.RunModel`): its calibration, and
    its unknown reference (``reference``; built once for a run from before it was kept).
    ``review_threshold`` overrides the run's threshold; ``tta`` is the test-time augmentation."""
    from jewelclf.evaluation import reference as reference_mod
    from jewelclf.modeling.tta import check_mode

    check_review_threshold(review_threshold)
    check_mode(tta)
    calibration = run.calibration
    if review_threshold is not None:
        threshold, source = float(review_threshold), "--review-threshold"
    elif calibration is not None and calibration.threshold is not None:
        threshold, source = float(calibration.threshold), "run"
    else:
        threshold, source = None, "none"
    ref = reference_mod.ensure(run, log) if reference else None
    return ReviewPolicy(run.temperature, threshold, source, ref, tta)


def from_info(info: dict[str, Any], reference=None) -> ReviewPolicy:
    """The policy an export's ``jewelclf.json`` records (with the reference saved beside it)."""
    threshold = info.get("review_threshold")
    return ReviewPolicy(float(info.get("temperature") or 1.0),
                        None if threshold is None else float(threshold),
                        str(info.get("review_threshold_source") or ("none" if threshold is None else "run")),
                        reference, str(info.get("tta") or "none"))
