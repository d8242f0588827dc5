"""The keras-tuner tuners of ``jewelclf tune``: keras-tuner's own Hyperband, RandomSearch and
BayesianOptimization with jewelclf's trial hooks (each trial's folder, Hyperband's checkpoint,
freeing a finished trial's graphs), and keras-tuner's distributed mode read from its variables.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import keras
import keras_tuner as kt

from jewelclf import compat
from jewelclf import runs as rd
from jewelclf.errors import JewelclfError
from jewelclf.training.tensorboard import TENSORBOARD_DIR
from jewelclf.tuning.layout import SEARCH_DIR


def execution_dir(trial_dir: Path, execution: int | None) -> Path:
    """The work folder of one execution of a trial: the trial's folder when the trial has one
    execution, else ``execution_<n>/`` inside it, so that no execution sees another's history,
    resume state or early-stopping baseline."""
    return trial_dir if execution is None else trial_dir / f"execution_{execution + 1}"


class _TrialHooks(compat.TensorBoardImportGuard):
    """What jewelclf adds to keras-tuner's tuners; the search itself stays theirs.

    ``run_trial`` hands the trial's folder (and, for Hyperband, the checkpoint path its
    continuation trials load) to ``HyperModel.fit``; ``on_trial_end`` frees the finished
    trial's graphs and calls ``after_trial`` (which rewrites ``trials.csv``).

    The leak this plugs: every time Keras traces a training step, the optimizer's all-reduce
    (even on one device) registers a ``tf.custom_gradient`` in TensorFlow's global gradient
    registry, whose closure holds the traced graph of the whole model; nothing ever removes it
    (tensorflow/tensorflow#97697), so ``clear_session`` cannot free a finished trial's graphs
    and memory grows by tens of MB per trial. The entries registered during a trial belong to
    that trial's (now dead) functions and are dropped when it ends.
    """

    after_trial: Callable[[Any], None] | None = None
    _gradients_before: frozenset[str] | None = None

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        registry = compat.gradient_registry()
        self._gradients_before = frozenset(registry) if registry is not None else None

    def run_trial(self, trial, *args, **kwargs):
        trial_dir = kwargs["trial_dir"] = Path(self.get_trial_dir(trial.trial_id))
        # A trial run again after an interruption starts its history (and its TensorBoard
        # logs) afresh, in every execution.
        (trial_dir / rd.HISTORY).unlink(missing_ok=True)
        shutil.rmtree(trial_dir / TENSORBOARD_DIR, ignore_errors=True)
        for old in trial_dir.glob("execution_*"):
            shutil.rmtree(old, ignore_errors=True)
        # keras-tuner runs the executions with shallow copies of kwargs: they share this
        # iterator, so each HyperModel.fit takes the next execution's number.
        kwargs["executions"] = iter(range(self.executions_per_trial)) if self.executions_per_trial > 1 else None
        kwargs["checkpoint"] = (compat.hyperband_checkpoint(self, trial.trial_id)
                                if isinstance(self, kt.Hyperband) else None)
        return super().run_trial(trial, *args, **kwargs)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        registry = compat.gradient_registry()
        if registry is not None and self._gradients_before is not None:
            for name in [k for k in registry if k not in self._gradients_before]:
                if name.startswith("CustomGradient-"):
                    del registry[name]
        # keras-tuner also clears the session before each build; clearing here as well frees
        # the finished trial's graphs before anything else runs (trials.csv, the next trial).
        keras.backend.clear_session()
        gc.collect()
        if self.after_trial is not None:
            self.after_trial(self)


_TUNER_CLASSES = {"hyperband": kt.Hyperband, "random": kt.RandomSearch,
                  "bayesian": kt.BayesianOptimization}


def make_tuner(kind: str, hypermodel: kt.HyperModel, objective: str, max_trials: int | None,
               executions_per_trial: int, directory: Path, seed: int):
    """A keras-tuner tuner of ``kind`` over ``hypermodel``, reloading its state if any."""
    base = _TUNER_CLASSES[kind]
    cls = type(f"Jewelclf{base.__name__}", (_TrialHooks, base), {})
    common = dict(hypermodel=hypermodel, objective=kt.Objective(objective, direction="max"),
                  seed=seed, directory=str(directory), project_name=SEARCH_DIR, overwrite=False,
                  executions_per_trial=executions_per_trial)
    config = hypermodel.config
    if kind == "hyperband":
        max_epochs = config.train.stage1.epochs + config.train.stage2.epochs
        tuner = cls(max_epochs=max_epochs, factor=3, **common)
        if max_trials and isinstance(tuner.oracle, kt.Oracle):  # not a worker's oracle client
            tuner.oracle.max_trials = max_trials  # Hyperband's oracle honours the base cap
    elif kind == "bayesian":
        try:
            tuner = cls(max_trials=max_trials, num_initial_points=max(2, max_trials // 4), **common)
        except ImportError:
            raise JewelclfError("--tuner bayesian needs scikit-learn and scipy; install them with "
                                "pip install 'keras-tuner[bayesian]'") from None
    else:
        tuner = cls(max_trials=max_trials, **common)
    return tuner


def distributed_role() -> str | None:
    """``chief``, ``worker`` or ``None``, by keras-tuner's own rule for its environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    for var in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(var):
            raise JewelclfError(f"KERASTUNER_ORACLE_IP is set but {var} is not; set both on the chief "
                                f"and on every worker (see the distributed tuning docs)")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"
