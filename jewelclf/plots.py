"""Plots written into run and evaluation folders (matplotlib, no display needed)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jewelclf.rundir import atomic_save  # noqa: E402


def training_curves(history_csv: Path, out: Path) -> None:
    """Loss and accuracy per epoch for train and val, with the stage boundaries marked."""
    with open(history_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = np.arange(1, len(rows) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [float(r[prefix + metric]) if r.get(prefix + metric) else np.nan for r in rows]
            ax.plot(epochs, values, style, marker=".", label=(prefix or "train_") + metric)
        previous = rows[0]["phase"]
        for i, r in enumerate(rows):
            if r["phase"] != previous:
                ax.axvline(i + 0.5, color="grey", linewidth=0.8)
                ax.text(i + 0.6, ax.get_ylim()[1], r["phase"], fontsize=7, va="top", color="grey")
                previous = r["phase"]
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_save(out, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)


def confusion_matrix(cm: np.ndarray, class_names: list[str], out: Path, title: str = "") -> None:
    """Row-normalised confusion matrix with raw counts in each cell."""
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    side = max(4.5, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= 40:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    atomic_save(out, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
