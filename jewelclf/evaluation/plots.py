"""Plots written into run and evaluation folders (matplotlib, no display needed).

Each function saves its PNG (atomically) and returns the closed :class:`~matplotlib.figure.Figure`,
whose texts a caller or a test can still read (``figure_texts``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from jewelclf.fsio import atomic_save  # noqa: E402

DPI = 110
CELL_TEXT_MAX_CLASSES = 40
"""Above this many classes the cells carry no numbers (they would not be legible)."""


def _save(fig: Figure, out: Path) -> Figure:
    atomic_save(out, lambda p: fig.savefig(p, dpi=DPI))
    plt.close(fig)
    return fig


def figure_texts(fig: Figure) -> list[str]:
    """Every text of ``fig``: titles, axis labels, cell and phase labels, legend entries."""
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _epochs(rows: list[dict[str, str]]) -> np.ndarray:
    """``history.csv``'s epoch numbers (1, 2, ... when the column is missing or damaged)."""
    try:
        return np.array([int(r["epoch"]) for r in rows])
    except (KeyError, TypeError, ValueError):
        return np.arange(1, len(rows) + 1)


def _lowest_val_loss_epoch(rows: list[dict[str, str]], epochs: np.ndarray) -> int | None:
    losses = [float(r["val_loss"]) if r.get("val_loss") else np.inf for r in rows]
    if not losses or not np.isfinite(min(losses)):
        return None
    return int(epochs[int(np.argmin(losses))])


def training_curves(history_csv: Path, out: Path, *, run: str = "",
                    restored_epoch: int | None = None) -> Figure | None:
    """Loss and accuracy per epoch for train and val, the phase boundaries and names, and the
    restored epoch (the one whose weights the final model holds) marked.

    ``run`` titles the figure. ``restored_epoch`` is ``history.csv``'s epoch number (the run
    summary's; 0: no marker); ``None`` marks the epoch of the lowest val_loss, which is the
    restored one unless stage 2 restored the weights it started from. Returns ``None`` for an
    empty history.
    """
    with open(history_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    epochs = _epochs(rows)
    if restored_epoch is None:
        restored_epoch = _lowest_val_loss_epoch(rows, epochs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style, name in (("", "-", "train"), ("val_", "--", "validation")):
            values = [float(r[prefix + metric]) if r.get(prefix + metric) else np.nan for r in rows]
            ax.plot(epochs, values, style, marker=".", color="C0" if not prefix else "C1", label=name)
        if restored_epoch:
            ax.axvline(restored_epoch, color="tab:red", linestyle=":", linewidth=1.4,
                       label=f"restored (epoch {restored_epoch})")
        _mark_phases(ax, rows, epochs)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    # One legend under both plots: inside a frame it would cover a curve or a phase name.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    if run:
        fig.suptitle(run)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, out)


def _mark_phases(ax, rows: list[dict[str, str]], epochs: np.ndarray) -> None:
    """A line between phases, and each phase's name centred over its epochs, inside the frame."""
    # x in data units, y in axes units: the name sits just under the top edge whatever the
    # data's range (at the y limit it fell outside the frame once the axes were padded).
    where = ax.get_xaxis_transform()
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.1 * (high - low))  # headroom, so the names cover no point
    starts = [i for i in range(len(rows)) if i == 0 or rows[i].get("phase") != rows[i - 1].get("phase")]
    for k, i in enumerate(starts):
        last = (starts[k + 1] if k + 1 < len(starts) else len(rows)) - 1
        if i:
            ax.axvline(epochs[i] - 0.5, color="grey", linewidth=0.8)
        ax.text((epochs[i] + epochs[last]) / 2, 0.97, rows[i].get("phase", ""), transform=where,
                fontsize=7, va="top", ha="center", color="dimgrey", clip_on=True,
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none",
                          alpha=0.7))


def confusion_title(run: str = "", split: str | None = None, images: int | None = None,
                    data: str | None = None) -> str:
    """``"quick — test split (250 images)"``: the run, what was scored, and how many images.

    ``split`` ``None`` or ``"all"`` reads "all images"; ``data`` names a DATA other than the
    run's own ("test split of other_photos").
    """
    what = f"{split} split" if split and split != "all" else "all images"
    if data:
        what += f" of {data}"
    if images is not None:
        what += f" ({images} image{'s' if images != 1 else ''})"
    return f"{run} — {what}" if run else what


def confusion_matrix(cm: np.ndarray, class_names: list[str], out: Path, title: str = "", *,
                     run: str | None = None, split: str | None = None,
                     data: str | None = None) -> Figure:
    """Row-normalised confusion matrix: each cell holds its count and its share of the true
    class ("12\\n24%"), the colour is that share (see the colour bar).

    The title is :func:`confusion_title` of ``run``, ``split`` and ``data`` (with the number of
    images the matrix counts) when any of them is given, else ``title``.
    """
    cm = np.asarray(cm)
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    if run is not None or split is not None or data is not None:
        title = confusion_title(run or "", split, int(cm.sum()), data)
    side = max(4.5, 0.6 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, format=PercentFormatter(1.0))
    bar.set_label("share of the true class (row)")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= CELL_TEXT_MAX_CLASSES:
        size = 8 if n <= 15 else 6
        for i in range(n):
            for j in range(n):
                # Empty off-diagonal cells stay blank; the diagonal of a scored class always
                # shows, so a class never predicted right reads 0 and 0%.
                if cm[i, j] or (i == j and rows[i, 0]):
                    ax.text(j, i, f"{int(cm[i, j])}\n{norm[i, j]:.0%}", ha="center",
                            va="center", fontsize=size, linespacing=1.1,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return _save(fig, out)


def reliability_diagram(metrics: dict, out: Path, title: str = "") -> Figure:
    """Accuracy against confidence per confidence bin, calibrated (bars) and uncalibrated
    (markers), with the diagonal of perfect calibration and each ECE in the legend; below it,
    how many images fall in each bin.

    ``metrics`` holds ``reliability`` (``calibrated`` and ``uncalibrated`` bins), ``ece``,
    ``ece_uncalibrated`` and ``calibration.temperature``, as ``metrics.json`` does.
    """
    after, before = metrics["reliability"]["calibrated"], metrics["reliability"]["uncalibrated"]
    lower = np.array([b["lower"] for b in after])
    width = np.array([b["upper"] - b["lower"] for b in after])
    mid = lower + width / 2
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 6.6), sharex=True,
                                   gridspec_kw={"height_ratios": (3, 1)})
    acc = [b["accuracy"] if b["count"] else 0.0 for b in after]
    ax.bar(lower, acc, width=width, align="edge", color="C0", alpha=0.75, edgecolor="white",
           label=f"calibrated (T={metrics['calibration']['temperature']:.2f}): "
                 f"ECE {metrics['ece']:.3f}")
    shown = [(b["confidence"], b["accuracy"]) for b in before if b["count"]]
    if shown:
        ax.plot(*zip(*shown), "o--", color="C3", markersize=4, linewidth=1,
                label=f"uncalibrated: ECE {metrics['ece_uncalibrated']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy in the bin")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.bar(mid - width / 4, [b["count"] for b in after], width=width / 2, color="C0",
             label="calibrated")
    hist.bar(mid + width / 4, [b["count"] for b in before], width=width / 2, color="C3", alpha=0.7,
             label="uncalibrated")
    hist.set_xlabel("confidence (top-class probability)")
    hist.set_ylabel("images")
    hist.legend(loc="upper left", fontsize=7)
    hist.grid(alpha=0.3)
    ax.set_title(f"{title}\nreliability ({len(after)} bins)" if title else
                 f"reliability ({len(after)} bins)")
    fig.tight_layout()
    return _save(fig, out)


def coverage_accuracy(coverage: dict, out: Path, title: str = "") -> Figure:
    """Accuracy of the images kept against the share kept (most confident first), from
    ``metrics.json``'s ``coverage`` table, with the run's threshold marked and its target accuracy."""
    curve = coverage["curve"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.plot([r["coverage"] for r in curve], [r["accuracy"] for r in curve], ".-", color="C0",
            label="kept images, most confident first")
    kept = coverage.get("at_threshold")
    if coverage.get("target_accuracy") is not None:
        ax.axhline(coverage["target_accuracy"], color="grey", linestyle=":", linewidth=1,
                   label=f"target accuracy {coverage['target_accuracy']:g} (on val)")
    if kept is not None and kept["accuracy"] is not None:
        ax.plot([kept["coverage"]], [kept["accuracy"]], "o", color="tab:red",
                label=f"threshold {kept['threshold']:.3f}: keeps {kept['coverage']:.0%}, "
                      f"accuracy {kept['accuracy']:.3f}")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy of the answered images")
    ax.set_title(f"{title}\ncoverage and accuracy" if title else "coverage and accuracy")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)
