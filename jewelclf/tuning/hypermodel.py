"""The keras-tuner hypermodel of ``jewelclf tune``: ``build`` makes a trial's classifier and
``fit`` trains it with the two-stage schedule of ``fit`` (:func:`jewelclf.training.stages.train_model`),
then scores it on the validation split and records the trial's time and memory.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import keras
import keras_tuner as kt
import numpy as np

from jewelclf import fsio
from jewelclf import runs as rd
from jewelclf.config import Config
from jewelclf.tuning.space import Space, config_for, declare
from jewelclf.tuning.tuner import execution_dir

Log = Callable[[str], None]


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    try:
        with open("/proc/self/statm") as f:
            current_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        current_mb = float("nan")
    return current_mb, peak_mb


class TwoStageHyperModel(kt.HyperModel):
    """``build``: the classifier of a trial's config. ``fit``: ``train_model`` on it.

    keras-tuner's per-epoch callbacks are not passed on: a trial trains in two stages (stage 1
    on a separate head model), so it reports its result once, when both stages are done.
    """

    def __init__(self, config: Config, space: Space, class_names: list[str], datasets=None,
                 log: Log = print):
        super().__init__(name="jewelclf")
        self.config, self.space, self.class_names = config, space, class_names
        self.datasets, self.log = datasets, log

    def build(self, hp):
        from jewelclf.modeling.classifier import build_classifier

        values = declare(hp, self.space, self.config)
        return build_classifier(config_for(self.config, values), len(self.class_names))

    def fit(self, hp, model, *args, trial_dir, executions=None, checkpoint=None, epochs=None,
            initial_epoch=0, **kwargs):
        from jewelclf.evaluation.metrics import compute_metrics
        from jewelclf.modeling.classifier import HEAD
        from jewelclf.training.stages import train_model

        initial_epoch = initial_epoch or 0
        budget = (initial_epoch, epochs) if epochs is not None else None
        config = config_for(self.config, declare(hp, self.space, self.config), budget)
        ds = self.datasets
        # A Hyperband trial that continues one which fine-tuned the backbone cannot use the
        # features of the pristine backbone: stage 1 then computes them from its own backbone.
        if ds.features is not None and initial_epoch > self.config.train.stage1.epochs:
            ds = dataclasses.replace(ds, features=None)
        work = execution_dir(Path(trial_dir), next(executions) if executions is not None else None)
        t0 = time.perf_counter()
        summary = train_model(model, config, ds, work, self.log)
        stage2_ran = summary["stage2"].get("epochs", 0) > 0
        if ds.features is not None and not stage2_ran:
            probs = keras.ops.convert_to_numpy(model.get_layer(HEAD)(ds.features[1], training=False))
        else:
            probs = model.predict(ds.val.map(lambda x, y: x), verbose=0)
        seconds = time.perf_counter() - t0
        y_true = ds.labels[1].argmax(axis=1)
        metrics = compute_metrics(y_true, probs, self.class_names, config.train.top_k)
        p_true = np.clip(probs[np.arange(len(y_true)), y_true], 1e-7, 1.0)
        if checkpoint:  # Hyperband continues trials from these weights
            model.save_weights(checkpoint)
        shutil.rmtree(work / Path(rd.BEST_CHECKPOINT).parent, ignore_errors=True)
        current_mb, peak_mb = _rss_mb()
        result = {"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
                  "val_loss": float(-np.log(p_true).mean()), "seconds": round(seconds, 2),
                  "rss_mb": round(current_mb, 1), "peak_rss_mb": round(peak_mb, 1)}
        fsio.atomic_write_json(work / "trial_summary.json", {
            "tuner_id": os.environ.get("KERASTUNER_TUNER_ID", "tuner0"), **result,
            "stages": summary, "stage_epochs": [config.train.stage1.epochs, config.train.stage2.epochs]})
        return result
