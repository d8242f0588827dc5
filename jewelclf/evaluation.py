"""Honest evaluation: accuracy, top-k, per-class precision/recall/F1, and the confusion matrix."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf.errors import JewelclfError


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
                    top_k: int = 3) -> dict[str, Any]:
    """All metrics of ``metrics.json`` from true label indices and predicted probabilities."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    n_classes = len(class_names)
    y_pred = probs.argmax(axis=1)
    cm = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n_classes), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n_classes),
                   where=(precision + recall) > 0)
    present = support > 0  # macro averages over classes that occur in this data
    k = min(top_k, n_classes)
    topk = np.argsort(-probs, axis=1)[:, :k]
    top_k_hits = (topk == y_true[:, None]).any(axis=1)
    return {
        "num_examples": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "top_k": k,
        "top_k_accuracy": float(top_k_hits.mean()) if len(y_true) else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
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
                 f"({total} images)")
    if metrics["most_confused"]:
        lines.append("most confused (true -> predicted: count): " + "; ".join(
            f"{p['true']} -> {p['predicted']}: {p['count']}" for p in metrics["most_confused"]))
    return "\n".join(lines)


def write_evaluation(metrics: dict[str, Any], out_dir: Path, predictions: list[dict[str, Any]],
                     title: str = "") -> None:
    """Write ``metrics.json``, ``confusion_matrix.png`` and ``predictions.csv`` into ``out_dir``."""
    from jewelclf import plots
    from jewelclf.rundir import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
    cm = np.array(metrics["confusion_matrix"]["matrix"])
    plots.confusion_matrix(cm, metrics["confusion_matrix"]["class_names"],
                           out_dir / "confusion_matrix.png", title=title)
    if predictions:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(predictions[0]))
        w.writeheader()
        w.writerows(predictions)
        atomic_write_text(out_dir / "predictions.csv", buf.getvalue())


def predict_records(model, source, records, class_names: list[str], config) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` over ``records`` (no augmentation); return true indices and probabilities."""
    from jewelclf.data.pipeline import batched, decoded_dataset
    from jewelclf.model import image_size

    size = image_size(config)
    ds = decoded_dataset(source, records, config.data, size)
    ds = batched(ds, len(class_names), config.data.batch_size)
    probs = model.predict(ds, verbose=0)
    index = {c: i for i, c in enumerate(class_names)}
    y_true = np.array([index[r.label] for r in records], dtype=int)
    return y_true, probs


def prediction_rows(records, y_true, probs, class_names) -> list[dict[str, Any]]:
    pred = probs.argmax(axis=1)
    return [{"path": r.key, "label": r.label, "predicted": class_names[p],
             "confidence": f"{probs[i, p]:.4f}", "correct": int(p == y_true[i])}
            for i, (r, p) in enumerate(zip(records, pred))]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_")[-80:] or "data"


def evaluate_run(run_dir: Path, data_spec: str, output: Path | None = None,
                 split: str | None = None) -> tuple[dict[str, Any], Path]:
    """Evaluate a finished run's model on ``data_spec``; write the report; return it and its folder.

    The data's classes must be among the run's classes. With a split layout or a manifest with
    splits, the ``test`` split is used unless ``split`` names another; otherwise every image is.
    Unreadable files are reported in ``rejected_files.csv`` and left out.
    """
    import keras

    from jewelclf import config as config_mod
    from jewelclf.data.check import check_records, write_rejected
    from jewelclf.data.pipeline import tfds_bytes
    from jewelclf.data.sources import load_source
    from jewelclf.rundir import CLASS_NAMES, CONFIG, MODEL, require_finished_run

    import jewelclf.layers  # noqa: F401  (registers the custom layers for loading)

    run_dir = Path(run_dir)
    require_finished_run(run_dir)
    config = config_mod.from_dict(config_mod.load_yaml(run_dir / CONFIG), source=str(run_dir / CONFIG))
    class_names = json.loads((run_dir / CLASS_NAMES).read_text(encoding="utf-8"))
    source = load_source(data_spec)
    records = source.records
    splits_present = {r.split for r in records} - {None}
    if split:
        records = [r for r in records if r.split == split]
        if not records:
            raise JewelclfError(f"'{data_spec}' has no {split} split; present: "
                                f"{', '.join(sorted(splits_present)) or 'none'}")
    elif "test" in splits_present:
        records = [r for r in records if r.split == "test"]
    unknown = sorted({r.label for r in records} - set(class_names))
    if unknown:
        raise JewelclfError(
            f"'{data_spec}' has class(es) {', '.join(unknown)} that the model in '{run_dir}' was "
            f"not trained on (it knows {', '.join(class_names)}); remove or rename them"
        )
    source.class_names = class_names
    out_dir = Path(output) if output else run_dir / "evaluations" / slug(data_spec + (f"_{split}" if split else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = check_records(records, config.data.max_pixels, config.data.min_image_side,
                           config.data.check_workers,
                           read_bytes=tfds_bytes(source) if source.tfds else None)
    n_rejected = write_rejected(checks, out_dir / "rejected_files.csv")
    records = [c.record for c in checks if c.ok]
    if not records:
        raise JewelclfError(f"no readable images in '{data_spec}'; see {out_dir / 'rejected_files.csv'}")
    model = keras.saving.load_model(run_dir / MODEL, compile=False)
    y_true, probs = predict_records(model, source, records, class_names, config)
    metrics = compute_metrics(y_true, probs, class_names, config.train.top_k)
    metrics["data"] = data_spec
    metrics["rejected_files"] = n_rejected
    write_evaluation(metrics, out_dir, prediction_rows(records, y_true, probs, class_names),
                     title=f"{run_dir.name} on {data_spec}")
    return metrics, out_dir
