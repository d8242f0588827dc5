"""The Keras callbacks of both training stages that record a run's epochs.

:class:`HistoryRecorder` appends each epoch's row to ``history.csv``; :class:`EpochNumber` sets
the epoch variable the training data is permuted by, so a resumed run sees the same order.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import keras
import tensorflow as tf


class HistoryRecorder(keras.callbacks.Callback):
    """Append one row per epoch to ``history.csv`` as it ends, tagged with the phase.

    A resumed phase starts with the rows its earlier attempt wrote (see
    :func:`jewelclf.training.checkpoints.trim_history`), so :attr:`rows` always covers the whole phase.
    """

    FIELDS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy",
              "learning_rate", "seconds"]

    def __init__(self, path: Path, phase: str, epoch_offset: int):
        super().__init__()
        self.path, self.phase, self.epoch_offset = Path(path), phase, epoch_offset
        self.rows: list[dict[str, str]] = []
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if r["phase"] == phase]
        self._t0 = 0.0

    @property
    def epochs_done(self) -> int:
        return len(self.rows)

    @property
    def best_val_loss(self) -> float:
        values = [float(r["val_loss"]) for r in self.rows if r.get("val_loss")]
        return min(values) if values else math.inf

    @property
    def best_row(self) -> dict[str, str] | None:
        """The row of the lowest val_loss (the epoch whose weights are restored), else ``None``."""
        rows = [r for r in self.rows if r.get("val_loss")]
        return min(rows, key=lambda r: float(r["val_loss"])) if rows else None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        new = not self.path.exists()
        lr = self.model.optimizer.learning_rate
        row = {
            "epoch": self.epoch_offset + epoch + 1,
            "phase": self.phase,
            **{k: f"{float(logs[k]):.6f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in logs},
            "learning_rate": f"{float(keras.ops.convert_to_numpy(lr)):.3g}",
            "seconds": f"{time.perf_counter() - self._t0:.2f}",
        }
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        self.rows.append({k: str(v) for k, v in row.items()})


class EpochNumber(keras.callbacks.Callback):
    """Set ``epoch`` to each epoch's number in ``history.csv`` as it begins.

    The training data is permuted by that number (:func:`jewelclf.data.pipeline.permuted`), so
    epoch N sees the same order whether or not the run was interrupted and resumed before it.
    """

    def __init__(self, epoch: tf.Variable | None, epoch_offset: int):
        super().__init__()
        self.epoch, self.epoch_offset = epoch, epoch_offset

    def on_epoch_begin(self, epoch, logs=None):
        if self.epoch is not None:
            self.epoch.assign(self.epoch_offset + epoch + 1)

