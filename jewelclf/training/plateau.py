"""Early stopping and learning-rate reduction on val_loss for the whole of stage 2.

Stage 2 recompiles the model at every unfreezing step (a new optimizer for the new trainable
set). Keras' ``EarlyStopping`` and ``ReduceLROnPlateau`` reset their counts at every
``fit``, and a new optimizer starts again from the initial learning rate, so with a few epochs
per step neither ever acted. :class:`StagePlateau` keeps one count for the stage: ``patience``
epochs in a row without a lower val_loss stop stage 2, whichever steps they fall in, and a
learning rate once lowered stays lowered in the next step. Its state follows from the
sequence of val_loss values alone, so a resumed run rebuilds it from ``history.csv``.

Stage 1 is one ``fit``, with Keras' ``EarlyStopping``; :class:`ResumedEarlyStopping` gives it
the same memory across a resume.
"""

from __future__ import annotations

import math
import types
from typing import Any

import keras


class StagePlateau(keras.callbacks.Callback):
    """The stage's best val_loss (and the val_accuracy of that epoch), patience and learning rate.

    ``best`` starts at the val_loss of the weights stage 2 starts from. Put it after the
    callback that records the epoch, so the row holds the learning rate the epoch trained with.
    """

    def __init__(self, best: float, best_accuracy: float | None, patience: int, lr_patience: int,
                 factor: float, learning_rate: float):
        super().__init__()
        self.best, self.best_accuracy, self.best_epoch = best, best_accuracy, 0
        self.epoch_offset = 0
        """Set before each step's ``fit``: the epochs of ``history.csv`` before that step's first."""
        self.patience, self.lr_patience, self.factor = patience, lr_patience, factor
        self.learning_rate = learning_rate
        self.stale = self.lr_stale = 0

    @property
    def stopped(self) -> bool:
        """Whether ``patience`` epochs in a row (at least one) have passed without a lower val_loss."""
        return self.stale >= max(1, self.patience)

    def observe(self, val_loss: float, val_accuracy: float | None, epoch: int) -> None:
        """Take the figures of ``history.csv``'s epoch ``epoch``."""
        if math.isfinite(val_loss) and val_loss < self.best:
            self.best, self.best_accuracy, self.best_epoch = val_loss, val_accuracy, epoch
            self.stale = self.lr_stale = 0
            return
        self.stale += 1
        self.lr_stale += 1
        if self.lr_stale >= self.lr_patience:
            self.learning_rate *= self.factor
            self.lr_stale = 0

    def replay(self, rows: list[dict[str, str]]) -> None:
        """Rebuild the state from earlier rows of ``history.csv`` (a resumed run)."""
        for row in rows:
            acc = row.get("val_accuracy")
            self.observe(float(row["val_loss"]), float(acc) if acc else None, int(row["epoch"]))

    def on_train_begin(self, logs=None):
        # A stage that stopped in an earlier step trains no more in this one.
        if self.stopped:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if "val_loss" not in logs:
            return
        before = self.learning_rate
        acc = logs.get("val_accuracy")
        self.observe(float(logs["val_loss"]), None if acc is None else float(acc),
                     self.epoch_offset + epoch + 1)
        if self.learning_rate != before:
            self.model.optimizer.learning_rate = self.learning_rate
        if self.stopped:
            self.model.stop_training = True

    def summary(self) -> dict[str, Any]:
        """What was restored: its val_loss, its val_accuracy, and its epoch in ``history.csv``
        (0: the weights stage 2 started from, when no epoch of stage 2 was better)."""
        return {"best_val_loss": self.best, "val_accuracy": self.best_accuracy,
                "restored_epoch": self.best_epoch, "learning_rate": self.learning_rate}


class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' ``EarlyStopping`` on val_loss, continuing from the epochs an earlier attempt trained.

    Keras' own starts counting afresh at every ``fit``: a resumed stage 1 would forget how many
    epochs in a row had not improved, and train more epochs than an uninterrupted run. Here
    the ``earlier`` val_loss values (the phase's rows of ``history.csv``) go through Keras' own
    end-of-epoch logic first, so the best value, the count and a stop carry over.
    """

    def __init__(self, earlier: list[float], patience: int):
        super().__init__("val_loss", patience=patience, mode="min")
        self.earlier = list(earlier)
        self.set_model(types.SimpleNamespace(stop_training=False))
        self._replay()
        self.stopped_before: bool = self.model.stop_training
        """Whether the earlier epochs had already stopped the phase (then train no more)."""

    def _replay(self) -> None:
        super().on_train_begin()
        for epoch, value in enumerate(self.earlier):
            super().on_epoch_end(epoch, {"val_loss": value})

    def on_train_begin(self, logs=None):
        self._replay()
        self.model.stop_training = False  # a stop of the earlier epochs is stopped_before's
