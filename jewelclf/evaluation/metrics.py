"""What a set of predictions scores: accuracy, top-k, per-class precision/recall/F1, the
confusion matrix and its most confused pairs, the calibration fields, and the report printed
from them. No model and no files here: ``evaluate``, ``fit`` and ``tune`` all score through it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jewelclf.evaluation import calibration as calibration_mod
from jewelclf.evaluation.calibration import Calibration


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
                    top_k: int = 3) -> dict[str, Any]:
    """All metrics of ``metrics.json`` from true label indices and predicted probabilities.

    The figures are sklearn's on the same predictions (``y_pred = probs.argmax(1)``):
    ``accuracy_score``, ``precision_recall_fscore_support(average="macro")``, which averages
    over the classes that occur in the labels *or* the predictions, with 0 where a ratio is
    undefined, and ``top_k_accuracy_score``, whose ties go to the higher class index.
    ``per_class`` lists every class of the run, with support 0 where it does not occur.
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    n_classes = len(class_names)
    y_pred = probs.argmax(axis=1) if len(y_true) else np.zeros(0, dtype=int)
    cm = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n_classes), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n_classes),
                   where=(precision + recall) > 0)
    present = (support > 0) | (predicted > 0)
    k = min(top_k, n_classes)
    # sklearn's order: a stable ascending sort, reversed, so a tie ranks the higher index first.
    topk = np.argsort(probs, axis=1, kind="mergesort")[:, ::-1][:, :k]
    top_k_hits = (topk == y_true[:, None]).any(axis=1)

    def macro(values: np.ndarray) -> float:
        return float(values[present].mean()) if present.any() else 0.0

    return {
        "num_examples": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "top_k": k,
        "top_k_accuracy": float(top_k_hits.mean()) if len(y_true) else 0.0,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "macro_classes": int(present.sum()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": {"class_names": list(class_names), "matrix": cm.tolist()},
        "most_confused": most_confused(cm, class_names),
    }


def most_confused(cm: np.ndarray, class_names: list[str], n: int = 5) -> list[dict[str, Any]]:
    """The largest off-diagonal cells: which true class is most often taken for which."""
    pairs = []
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            if i != j and cm[i, j] > 0:
                pairs.append({"true": class_names[i], "predicted": class_names[j],
                              "count": int(cm[i, j])})
    pairs.sort(key=lambda p: (-p["count"], p["true"], p["predicted"]))
    return pairs[:n]


def format_report(metrics: dict[str, Any]) -> str:
    """The per-class table, the headline figures and the most-confused pairs, as text."""
    names = list(metrics["per_class"])
    width = max([len("class")] + [len(n) for n in names])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}"
                     f"  {m['support']:7d}")
    total = metrics["num_examples"]
    lines.append(f"{'macro avg':<{width}}  {metrics['macro_precision']:9.3f}  "
                 f"{metrics['macro_recall']:6.3f}  {metrics['macro_f1']:5.3f}  {total:7d}")
    lines.append(f"accuracy {metrics['accuracy']:.4f}   top-{metrics['top_k']} accuracy "
                 f"{metrics['top_k_accuracy']:.4f}   macro-F1 {metrics['macro_f1']:.4f}   "
                 f"({total} images{_scored_what(metrics)})")
    lines.extend(_calibration_lines(metrics))
    if metrics.get("unknown"):
        from jewelclf.evaluation.unknown_eval import summary_line

        lines.append(summary_line(metrics["unknown"]))
    if metrics.get("warning"):
        lines.append(f"warning: {metrics['warning']}")
    if metrics["most_confused"]:
        lines.append("most confused (true -> predicted: count): " + "; ".join(
            f"{p['true']} -> {p['predicted']}: {p['count']}" for p in metrics["most_confused"]))
    return "\n".join(lines)


def _calibration_lines(metrics: dict[str, Any]) -> list[str]:
    """The temperature and ECE, and what the run's review threshold keeps of these images."""
    if "ece" not in metrics:
        return []
    cal = metrics["calibration"]
    lines = [(f"calibration: temperature {cal['temperature']:.3f}; ECE ({metrics['ece_bins']} "
              f"bins) {metrics['ece_uncalibrated']:.4f} uncalibrated, {metrics['ece']:.4f} calibrated")]
    kept = metrics["coverage"]["at_threshold"]
    if kept is not None:
        accuracy = "n/a" if kept["accuracy"] is None else f"{kept['accuracy']:.4f}"
        lines.append(f"review threshold {kept['threshold']:.4f} (chosen for val accuracy "
                     f"{metrics['coverage']['target_accuracy']}): keeps {kept['coverage']:.1%} of "
                     f"these images at accuracy {accuracy}; {kept['needs_review']} need review")
    if metrics.get("calibration_note"):
        lines.append(metrics["calibration_note"])
    return lines


def _scored_what(metrics: dict[str, Any]) -> str:
    split = metrics.get("split")
    if split is None or split == "all":
        return ""
    return f", the run's {split} split" if metrics.get("split_source") == "run" else f", {split} split"


def score(y_true: np.ndarray, raw: np.ndarray, class_names: list[str], top_k: int,
          calibration: Calibration | None) -> tuple[dict[str, Any], np.ndarray]:
    """The metrics of the calibrated probabilities of the model's ``raw`` ones (``calibration``
    ``None``: an older run, scored as it is), with the calibration and coverage fields; and
    those probabilities."""
    probs = calibration.apply(raw) if calibration is not None else np.asarray(raw)
    metrics = compute_metrics(y_true, probs, class_names, top_k)
    metrics.update(calibration_mod.report(y_true, raw, probs, calibration))
    return metrics, probs
