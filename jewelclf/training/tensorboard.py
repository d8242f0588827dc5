"""TensorBoard logs of both training stages, written with Keras' own callback.

``fit`` writes ``RUN_DIR/tensorboard/stage1`` and ``RUN_DIR/tensorboard/stage2`` (each with
Keras' ``train/`` and ``validation/`` folders), and every tuning trial the same under its own
folder (``RUN_DIR/search/trial_<id>/tensorboard/...``), so ``tensorboard --logdir runs/`` shows
every run and trial, one line per stage. The step is ``history.csv``'s epoch, counted over the
whole run: stage 2 continues where stage 1 ended (all its unfreezing steps in one line, though
each recompiles with a new optimizer), and the restored epoch N of ``run_info.json`` is step N.

Only epoch-level scalars: loss, accuracy and the learning rate, for train and validation. No
graph, no weight histograms, no profiler. The ``tensorboard`` package is needed only to look at
the logs, not to write them: TensorFlow 2.21 without it has no ``tf.summary.scalar`` (Keras'
callback then fails with ``TBNotInstalledError``), so the scalars go through ``tf.summary.write``
with the scalar plugin's metadata, the very records ``tf.summary.scalar`` writes.

``--resume`` continues the logs: the resumed phase writes new event files beside the old ones
(their names hold a timestamp), and its steps carry on from the epoch it resumes after. Under
``train.distribute: multi_worker`` only the chief writes; ``train.tensorboard: false`` turns
the logs off. A log that cannot be written (a full disk) stops the logging with one warning,
never the training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import keras

from jewelclf import compat

TENSORBOARD_DIR = "tensorboard"


class _Summary:
    """``tf.summary`` with a ``scalar`` that needs no ``tensorboard`` package."""

    def __init__(self):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR)

    def scalar(self, name, data, step=None, description=None):
        tf = self._tf
        return tf.summary.write(name, tf.cast(data, tf.float32), step=step, metadata=self._metadata)

    def __getattr__(self, name):
        return getattr(self._tf.summary, name)


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' ``TensorBoard`` at epoch granularity, with the run's epoch numbers as steps.

    ``epoch_offset``: the epochs of ``history.csv`` before this ``fit``'s first, as for
    :class:`jewelclf.training.callbacks.HistoryRecorder`. Each epoch's events are flushed at its end, so a
    running ``tensorboard`` sees them at once and a killed run loses none.
    """

    def __init__(self, log_dir: str | Path, epoch_offset: int = 0,
                 log: Callable[[str], None] = print):
        super().__init__(log_dir=str(log_dir), histogram_freq=0, write_graph=False,
                         write_images=False, write_steps_per_second=False, update_freq="epoch",
                         profile_batch=0)
        self.epoch_offset = epoch_offset
        self._log = log
        self._failed = False
        compat.set_tensorboard_summary(self, _Summary())  # what Keras' ``self.summary`` returns

    def _safely(self, hook, *args) -> None:
        if self._failed:
            return
        try:
            hook(*args)
        except Exception as e:  # noqa: BLE001 - a log is never worth a training run
            self._give_up(e)

    def _give_up(self, e: BaseException) -> None:
        if not self._failed:
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
            self._log(f"warning: TensorBoard logs stopped ({first}); training goes on")
        self._failed = True

    def on_train_begin(self, logs=None):
        self._safely(super().on_train_begin, logs)

    def on_test_begin(self, logs=None):
        self._safely(super().on_test_begin, logs)

    def on_test_end(self, logs=None):
        # Keras also logs ``evaluation_*_vs_iterations`` against the optimizer's step count,
        # which starts again at 0 with every stage-2 step's new optimizer: a zig-zag, left out.
        self._safely(compat.pop_tensorboard_writer, self)

    def on_epoch_end(self, epoch, logs=None):
        self._safely(self._write_epoch, epoch, logs)

    def _write_epoch(self, epoch, logs) -> None:
        super().on_epoch_end(self.epoch_offset + epoch + 1, logs)
        compat.flush_tensorboard_writers(self)

    def on_train_end(self, logs=None):
        try:  # closes the writers, even after a failure
            super().on_train_end(logs)
        except Exception as e:  # noqa: BLE001
            self._give_up(e)


def tensorboard_callbacks(config: Any, model: keras.Model, work_dir: Path, stage: str,
                          epoch_offset: int = 0, log: Callable[[str], None] = print) -> list:
    """``[EpochTensorBoard]`` writing to ``work_dir/tensorboard/<stage>``, or ``[]`` when
    ``train.tensorboard`` is off or this process is not the one that writes summaries (a
    multi-worker run's non-chief workers; ``model`` is the model built under the strategy)."""
    if not getattr(config.train, "tensorboard", True):
        return []
    if not model.distribute_strategy.extended.should_save_summary:
        return []
    return [EpochTensorBoard(Path(work_dir) / TENSORBOARD_DIR / stage, epoch_offset, log)]
