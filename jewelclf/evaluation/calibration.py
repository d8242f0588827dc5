"""Calibrated confidence and selective prediction, on predicted probabilities (numpy and scipy).

The model ends in a softmax, so its log-probabilities serve as logits: ``softmax(log p / T)``
is temperature scaling (Guo et al., 2017). ``fit`` chooses ``T`` on the validation split by
minimising the negative log-likelihood, and a confidence threshold, the lowest one at which
the validation images it keeps reach a target accuracy. Dividing every logit of an image by
the same ``T > 0`` keeps their order, so the predicted class, the accuracy and F1 do not change.

The expected calibration error (ECE) uses 15 equal-width bins of the top-class confidence,
``(0, 1/15], (1/15, 2/15], ... (14/15, 1]``: the share of images in each bin times the gap
between the bin's accuracy and its mean confidence, summed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from jewelclf.errors import JewelclfError

BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
COVERAGE_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 21))
"""The coverages of the ``coverage`` table in ``metrics.json``: 5%, 10%, ... 100%."""
_TINY = float(np.finfo(np.float32).tiny)
"""A probability that underflowed to 0 counts as this (a finite logit of about -87); an export
scaling in float32 uses the same floor, so both agree."""


def as_logits(probs: np.ndarray) -> np.ndarray:
    """Logits whose softmax is ``probs`` (rows summing to 1): their logarithm, float64."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _TINY, None))


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)`` per row; ``probs`` itself when ``temperature`` is 1."""
    probs = np.asarray(probs)
    if temperature == 1.0 or probs.size == 0:
        return probs
    return softmax(as_logits(probs) / temperature, axis=1)


def nll(probs: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels ``y`` under ``probs`` scaled by ``temperature``."""
    y = np.asarray(y, dtype=int)
    if not len(y):
        return 0.0
    logp = log_softmax(as_logits(probs) / temperature, axis=1)
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(probs: np.ndarray, y: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature in ``bounds`` that minimises the NLL of ``y`` (1.0 for no images).

    The search runs over ``log T``: the NLL is convex in ``1/T``, so it has one minimum along
    ``log T`` as well and scipy's bounded Brent search finds it.
    """
    y = np.asarray(y, dtype=int)
    if not len(y):
        return 1.0
    logits = as_logits(probs)
    rows = np.arange(len(y))

    def loss(log_t: float) -> float:
        return float(-log_softmax(logits / math.exp(log_t), axis=1)[rows, y].mean())

    found = minimize_scalar(loss, bounds=(math.log(bounds[0]), math.log(bounds[1])),
                            method="bounded", options={"xatol": 1e-5})
    return float(math.exp(found.x))


def _confidence_and_correct(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    if not len(y):
        return np.zeros(0), np.zeros(0, dtype=bool)
    return probs.max(axis=1), probs.argmax(axis=1) == y


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> list[dict[str, Any]]:
    """The reliability diagram's data: per equal-width confidence bin, its edges, the number of
    images whose top-class confidence falls in it, their mean confidence and their accuracy
    (``None`` for an empty bin)."""
    conf, correct = _confidence_and_correct(probs, y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # side="left": a confidence on an edge belongs to the bin below it, (lower, upper].
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        out.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": n,
                    "confidence": float(conf[inside].mean()) if n else None,
                    "accuracy": float(correct[inside].mean()) if n else None})
    return out


def ece_of(bins: list[dict[str, Any]]) -> float:
    """The expected calibration error of :func:`reliability`'s bins."""
    total = sum(b["count"] for b in bins)
    if not total:
        return 0.0
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in bins if b["count"]))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """ECE with ``bins`` equal-width bins of the top-class confidence (0 for no images)."""
    return ece_of(reliability(probs, y, bins))


def coverage_curve(probs: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Selective prediction: for each confidence ``t`` that occurs, the share of images with
    confidence ``>= t`` (``coverage``) and their accuracy, most confident first."""
    conf, correct = _confidence_and_correct(probs, y)
    order = np.argsort(-conf, kind="stable")
    conf, correct = conf[order], correct[order]
    # Images of equal confidence are kept or sent to review together: one point per value.
    ends = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True]) if len(conf) else np.zeros(0, int)
    kept = ends + 1
    return {"threshold": conf[ends], "coverage": kept / max(len(conf), 1),
            "accuracy": np.cumsum(correct)[ends] / np.maximum(kept, 1), "kept": kept}


def choose_threshold(probs: np.ndarray, y: np.ndarray, target: float) -> dict[str, Any]:
    """The lowest confidence threshold whose kept images (confidence ``>=`` it) reach accuracy
    ``target``, i.e. the largest coverage that does.

    When no threshold reaches the target, the threshold is just above the highest confidence
    (every image goes to review) and ``target_met`` is false.
    """
    curve = coverage_curve(probs, y)
    ok = np.flatnonzero(curve["accuracy"] >= target)
    if not len(ok):
        top = float(curve["threshold"][0]) if len(curve["threshold"]) else 1.0
        return {"threshold": float(np.nextafter(max(top, 1.0), 2.0)), "coverage": 0.0,
                "accuracy": None, "target_met": False}
    best = ok[np.argmax(curve["coverage"][ok])]
    return {"threshold": float(curve["threshold"][best]), "coverage": float(curve["coverage"][best]),
            "accuracy": float(curve["accuracy"][best]), "target_met": True}


def coverage_table(probs: np.ndarray, y: np.ndarray,
                   levels: tuple[float, ...] = COVERAGE_LEVELS) -> list[dict[str, float]]:
    """:func:`coverage_curve` at ``levels``: per level, the first point whose coverage reaches
    it (equal confidences can carry it past the level), with its threshold and accuracy."""
    curve = coverage_curve(probs, y)
    rows = []
    for level in levels:
        at = np.flatnonzero(curve["coverage"] >= level - 1e-9)
        if len(at):
            i = at[0]
            rows.append({"coverage": float(curve["coverage"][i]), "threshold": float(curve["threshold"][i]),
                         "accuracy": float(curve["accuracy"][i])})
    return rows


def at_threshold(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
    """How many images a threshold keeps (confidence ``>=`` it) and their accuracy."""
    conf, correct = _confidence_and_correct(probs, y)
    kept = conf >= threshold
    n = int(kept.sum())
    return {"threshold": float(threshold), "kept": n, "needs_review": int(len(conf) - n),
            "coverage": n / len(conf) if len(conf) else 0.0,
            "accuracy": float(correct[kept].mean()) if n else None}


# --- the run's calibration file -------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """What ``fit`` chose on the validation split: the temperature and the review threshold.

    Images whose calibrated top probability is below ``threshold`` need review.
    """

    temperature: float = 1.0
    threshold: float | None = None
    target_accuracy: float | None = None
    val_coverage: float | None = None
    val_accuracy_at_threshold: float | None = None
    target_met: bool | None = None
    num_val: int = 0
    val_nll: float | None = None
    val_nll_uncalibrated: float | None = None
    val_ece: float | None = None
    val_ece_uncalibrated: float | None = None
    note: str = ""

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """The calibrated probabilities of the model's ``probs``."""
        return scale(probs, self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the log: the temperature, the threshold and what it keeps on val."""
        line = (f"calibration on {self.num_val} val images: temperature {self.temperature:.3f} "
                f"(NLL {self.val_nll_uncalibrated:.4f} -> {self.val_nll:.4f}, ECE "
                f"{self.val_ece_uncalibrated:.4f} -> {self.val_ece:.4f})")
        if self.note:
            line += f"; {self.note}"
        if self.target_met:
            line += (f"; review threshold {self.threshold:.4f} keeps {self.val_coverage:.1%} of val "
                     f"at accuracy {self.val_accuracy_at_threshold:.4f} (target {self.target_accuracy})")
        elif self.threshold is not None:
            line += (f"; no threshold reaches val accuracy {self.target_accuracy}: every image "
                     f"needs review (lower --target-accuracy)")
        return line


def calibrate(probs: np.ndarray, y: np.ndarray, target_accuracy: float) -> Calibration:
    """Fit the temperature on validation ``probs``/``y``, then the threshold for ``target_accuracy``
    on the calibrated probabilities."""
    y = np.asarray(y, dtype=int)
    _, correct = _confidence_and_correct(probs, y)
    note = ""
    if len(y) and correct.all():
        # With no error the likelihood keeps rising as T falls to 0: nothing to fit against.
        temperature, note = 1.0, "no val image is misclassified, so the temperature stays 1"
    else:
        temperature = fit_temperature(probs, y)
    scaled = scale(probs, temperature)
    chosen = choose_threshold(scaled, y, target_accuracy) if len(y) else {}
    return Calibration(
        temperature=temperature, threshold=chosen.get("threshold"), target_accuracy=target_accuracy,
        val_coverage=chosen.get("coverage"), val_accuracy_at_threshold=chosen.get("accuracy"),
        target_met=chosen.get("target_met"), num_val=len(y),
        val_nll=nll(scaled, y), val_nll_uncalibrated=nll(probs, y),
        val_ece=expected_calibration_error(scaled, y),
        val_ece_uncalibrated=expected_calibration_error(probs, y), note=note)


def write(path: Path, calibration: Calibration) -> None:
    """Save ``calibration`` as JSON at ``path`` (atomically)."""
    from jewelclf.fsio import atomic_write_json

    atomic_write_json(path, calibration.to_dict())


def read(path: Path) -> Calibration | None:
    """The calibration saved at ``path``; ``None`` when there is no such file (an older run).

    A damaged file is a one-line error naming it: guessing would serve wrong confidences.
    """
    path = Path(path)
    if not path.exists():
        return None
    fix = f"fit the run again, or delete '{path}' to use uncalibrated probabilities"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise JewelclfError(f"'{path}' cannot be read as JSON ({str(e).splitlines()[0]}); {fix}") from None
    if not isinstance(data, dict):
        raise JewelclfError(f"'{path}' holds no calibration mapping; {fix}")
    t, threshold = data.get("temperature"), data.get("threshold")
    if not _number(t) or not t > 0:
        raise JewelclfError(f"'{path}' has temperature {t!r}, not a positive number; {fix}")
    if threshold is not None and not _number(threshold):
        raise JewelclfError(f"'{path}' has threshold {threshold!r}, not a number; {fix}")
    known = {k: v for k, v in data.items() if k in Calibration.__dataclass_fields__}
    return Calibration(**known)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MISSING_NOTE = ("note: '{run}' has no calibration.json (it was trained before jewelclf calibrated "
                "runs): probabilities are uncalibrated (temperature 1) and there is no review "
                "threshold; fit it again to calibrate")


def report(y: np.ndarray, raw: np.ndarray, probs: np.ndarray,
           calibration: Calibration | None) -> dict[str, Any]:
    """The calibration and selective-prediction fields of ``metrics.json``: ``ece`` (of the
    calibrated ``probs``), ``ece_uncalibrated`` (of the model's ``raw``), the reliability bins
    of both, and the ``coverage`` table with what the run's threshold keeps."""
    after, before = reliability(probs, y), reliability(raw, y)
    threshold = calibration.threshold if calibration else None
    return {
        "ece": ece_of(after), "ece_uncalibrated": ece_of(before), "ece_bins": BINS,
        "calibration": ({"source": "run", **calibration.to_dict()} if calibration
                        else {"source": "none", "temperature": 1.0, "threshold": None}),
        "reliability": {"calibrated": after, "uncalibrated": before},
        "coverage": {
            "threshold": threshold,
            "target_accuracy": calibration.target_accuracy if calibration else None,
            "at_threshold": at_threshold(probs, y, threshold) if threshold is not None else None,
            "curve": coverage_table(probs, y)},
    }
