"""``jewelclf tune``: a Keras Tuner search over the two-stage schedule of ``fit``.

The search is keras-tuner's own: its Hyperband, RandomSearch and BayesianOptimization tuners
and oracles, its state files (which make ``--resume`` work) and its distributed mode. jewelclf
supplies a :class:`keras_tuner.HyperModel` whose ``build`` is :func:`jewelclf.modeling.classifier.build_classifier`
and whose ``fit`` is :func:`jewelclf.training.trainer.train_model`, the one training path of ``fit``.

Fast mode: when stage 1 trains the head on the frozen backbone's pooled features (no stage-1
augmentation), those features are the same for every trial. They are computed once per search
and handed to each trial through :attr:`jewelclf.training.trainer.Datasets.features`, so a head-only
trial costs seconds instead of a pass through the backbone.

Hyperband's budget is the position in the schedule: epochs ``1..S1`` are stage 1 and
``S1+1..S1+S2`` stage 2. A trial asked to go from epoch ``I`` to ``E`` trains exactly that part
of the schedule, on the weights of the trial it continues (keras-tuner loads them), so early
rounds are cheap head-only trials and only the promising ones reach fine-tuning.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import keras
import keras_tuner as kt
import numpy as np
import yaml

from jewelclf import fsio
from jewelclf import runs as rd
from jewelclf.config import Config, from_dict, merge, parse_yaml, set_dotted, validate
from jewelclf.errors import JewelclfError
from jewelclf.modeling.backbones import get_backbone
from jewelclf.training.tensorboard import TENSORBOARD_DIR

Log = Callable[[str], None]

TUNERS = ("hyperband", "random", "bayesian")
OBJECTIVES = ("val_accuracy", "val_macro_f1")
DEFAULT_MAX_TRIALS = 20
"""For random and Bayesian search; Hyperband's own schedule sets its trial count."""
SEARCH_DIR = "search"
SPACE_FILE = "space.yaml"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
REPORT = "tuning_report.md"
PLOT = "tuning_scores.png"

AUGMENT_SCALED = ("zoom", "brightness", "contrast", "saturation", "blur")
"""The augmentation settings that ``augment_strength`` multiplies together."""


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One tunable knob: its value type and the config keys it sets."""

    kind: type
    keys: tuple[str, ...]


HYPERPARAMETERS: dict[str, Hyperparameter] = {
    "head_units": Hyperparameter(int, ("model.head_units",)),
    "dropout": Hyperparameter(float, ("model.dropout",)),
    "stage1_learning_rate": Hyperparameter(float, ("train.stage1.learning_rate",)),
    "stage2_learning_rate": Hyperparameter(float, ("train.stage2.learning_rate",)),
    "unfreeze_blocks": Hyperparameter(int, ("train.stage2.unfreeze_blocks",)),
    "augment_strength": Hyperparameter(float, tuple(f"augment.{k}" for k in AUGMENT_SCALED)),
}

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "head_units": {"choice": [0, 128, 256, 512, 1024]},
    "dropout": {"min": 0.0, "max": 0.5, "step": 0.1},
    "stage1_learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"},
    "stage2_learning_rate": {"min": 1e-6, "max": 1e-4, "sampling": "log"},
    "unfreeze_blocks": {"min": 0, "max": 3},
    "augment_strength": {"min": 0.0, "max": 2.0, "step": 0.5},
}

Space = dict[str, Any]
"""Hyperparameter name -> ``{choice: [...]}``, ``{min, max[, step][, sampling]}``,
``{fixed: value}``, or ``None`` (not tuned: the config's value is used)."""

_FIELDS = ("choice", "min", "max", "step", "sampling", "fixed")
_SAMPLINGS = ("linear", "log", "reverse_log")


# ---------------------------------------------------------------------------------------------
# The search space


def _value(name: str, v: Any, where: str) -> int | float:
    kind = HYPERPARAMETERS[name].kind
    if name == "head_units" and (v is None or (isinstance(v, str) and v.lower() == "none")):
        return 0
    if kind is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise JewelclfError(f"{where}: {v!r} is not {'an integer' if kind is int else 'a number'}")


def _check_spec(name: str, spec: Any, source: str) -> dict[str, Any]:
    where = f"{source}: space key '{name}'"
    if not isinstance(spec, dict):
        raise JewelclfError(f"{where} must be a mapping such as {{choice: [...]}}, {{min: A, max: B}} "
                            f"or {{fixed: V}}, got {spec!r}")
    unknown = sorted(set(spec) - set(_FIELDS))
    if unknown:
        raise JewelclfError(f"{where} has unknown field '{unknown[0]}'; use choice, min/max "
                            f"(with optional step and sampling) or fixed")
    forms = [f for f in ("choice", "fixed") if f in spec] + (
        ["min/max"] if "min" in spec or "max" in spec else [])
    if len(forms) != 1:
        raise JewelclfError(f"{where} needs exactly one of choice, min/max or fixed"
                            + (f", got {' and '.join(forms)}" if forms else ""))
    if forms[0] != "min/max" and ("step" in spec or "sampling" in spec):
        raise JewelclfError(f"{where}: step and sampling go with min/max only")
    if "choice" in spec:
        values = spec["choice"]
        if not isinstance(values, list):
            raise JewelclfError(f"{where}: choice must be a list of values, got {values!r}")
        if not values:
            raise JewelclfError(f"{where}: choice list is empty; list at least one value")
        out: dict[str, Any] = {"choice": [_value(name, v, where) for v in values]}
        if len(set(out["choice"])) != len(out["choice"]):
            raise JewelclfError(f"{where}: choice list repeats a value")
        candidates = out["choice"]
    elif "fixed" in spec:
        out = {"fixed": _value(name, spec["fixed"], where)}
        candidates = [out["fixed"]]
    else:
        if "min" not in spec or "max" not in spec:
            raise JewelclfError(f"{where} needs both min and max")
        lo, hi = _value(name, spec["min"], where), _value(name, spec["max"], where)
        if lo > hi:
            raise JewelclfError(f"{where}: min {lo} > max {hi}; swap them")
        out = {"min": lo, "max": hi}
        if spec.get("step") is not None:
            step = _value(name, spec["step"], f"{where} step")
            if step <= 0:
                raise JewelclfError(f"{where}: step must be positive, got {step}")
            out["step"] = step
        sampling = spec.get("sampling", "linear")
        if sampling not in _SAMPLINGS:
            raise JewelclfError(f"{where}: sampling must be one of {', '.join(_SAMPLINGS)}, "
                                f"got {sampling!r}")
        if sampling != "linear":
            if lo <= 0:
                raise JewelclfError(f"{where}: {sampling} sampling needs min > 0, got {lo}")
            out["sampling"] = sampling
        candidates = [lo, hi]
    for v in candidates:  # every value must make a valid config (ranges live in config.validate)
        try:
            config_for(Config(), {name: v})
        except JewelclfError as e:
            raise JewelclfError(f"{where}: value {v} is out of range ({e})") from None
    return out


def parse_space(raw: Any, source: str = "search space") -> Space:
    """The default space with the entries of ``raw`` (a mapping from YAML) put in their place."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise JewelclfError(f"{source}: a search space is a mapping of hyperparameter names to "
                            f"ranges; known names: {', '.join(HYPERPARAMETERS)}")
    space: Space = {k: dict(v) for k, v in DEFAULT_SPACE.items()}
    for name, spec in raw.items():
        if name not in HYPERPARAMETERS:
            raise JewelclfError(f"{source}: unknown hyperparameter '{name}'; known: "
                                f"{', '.join(HYPERPARAMETERS)}")
        space[name] = None if spec is None else _check_spec(name, spec, source)
    return space


def load_space(path: str | Path) -> Space:
    """Read a ``--space`` YAML file; any problem is a one-line error naming the key."""
    path = Path(path)
    if not path.is_file():
        raise JewelclfError(f"space file '{path}' does not exist; check the --space path")
    source = f"space file '{path}'"
    return parse_space(parse_yaml(path.read_text(encoding="utf-8"), source), source=source)


def _possible_values(spec: dict[str, Any] | None, config_value: int) -> list[int]:
    """Every value an integer hyperparameter can take (a superset for stepped ranges)."""
    if spec is None:
        return [config_value]
    if "fixed" in spec:
        return [spec["fixed"]]
    if "choice" in spec:
        return list(spec["choice"])
    return list(range(spec["min"], spec["max"] + 1))


def _stage2_only(config: Config) -> list[str]:
    """What acts in stage 2 alone: its learning rate, and augmentation unless on in stage 1."""
    return ["stage2_learning_rate"] + ([] if config.augment.in_stage1 else ["augment_strength"])


def effective_space(space: Space, config: Config) -> tuple[Space, list[str]]:
    """Leave out what cannot matter under ``config``; return the space and why, as notes."""
    out = {k: v for k, v in space.items() if v is not None}
    notes = []
    stage2_only = ["unfreeze_blocks", *_stage2_only(config)]
    if not config.augment.enabled and out.pop("augment_strength", None) is not None:
        notes.append("augmentation is off (augment.enabled: false): augment_strength is not tuned")
    if config.train.stage2.epochs == 0:
        dropped = [k for k in stage2_only if out.pop(k, None) is not None]
        if dropped:
            notes.append(f"stage 2 is off (train.stage2.epochs: 0): {', '.join(dropped)} not tuned")
    elif max(_possible_values(out.get("unfreeze_blocks"), config.train.stage2.unfreeze_blocks)) == 0:
        dropped = [k for k in stage2_only if k != "unfreeze_blocks" and out.pop(k, None) is not None]
        if dropped:
            notes.append(f"unfreeze_blocks is 0 (no stage 2): {', '.join(dropped)} not tuned")
    return out, notes


def _declare_one(hp: kt.HyperParameters, name: str, spec: dict[str, Any]):
    if "fixed" in spec:
        return hp.Fixed(name, spec["fixed"])
    if "choice" in spec:
        return hp.Choice(name, spec["choice"])
    make = hp.Int if HYPERPARAMETERS[name].kind is int else hp.Float
    return make(name, spec["min"], spec["max"], step=spec.get("step"),
                sampling=spec.get("sampling", "linear"))


def declare(hp: kt.HyperParameters, space: Space, config: Config) -> dict[str, Any]:
    """Register ``space`` (an effective space) in ``hp``; return this trial's values.

    What acts in stage 2 alone is conditional on ``unfreeze_blocks > 0``; an inactive value is
    ``None``.
    """
    values: dict[str, Any] = {}
    stage2_only = _stage2_only(config)
    if "unfreeze_blocks" in space:
        values["unfreeze_blocks"] = _declare_one(hp, "unfreeze_blocks", space["unfreeze_blocks"])
    possible = _possible_values(space.get("unfreeze_blocks"), config.train.stage2.unfreeze_blocks)
    positive = [v for v in possible if v > 0]
    conditional = "unfreeze_blocks" in space and len(positive) < len(possible)
    for name in HYPERPARAMETERS:
        if name not in space or name == "unfreeze_blocks":
            continue
        if name in stage2_only and conditional:
            with hp.conditional_scope("unfreeze_blocks", positive):
                values[name] = _declare_one(hp, name, space[name])
        else:
            values[name] = _declare_one(hp, name, space[name])
    return values


def schedule_epochs(config: Config, start: int, end: int) -> tuple[int, int]:
    """Stage-1 and stage-2 epochs of the part ``start..end`` of the schedule (Hyperband budget)."""
    s1, s2 = config.train.stage1.epochs, config.train.stage2.epochs

    def clip(x, lo, n):
        return min(max(x - lo, 0), n)

    return clip(end, 0, s1) - clip(start, 0, s1), clip(end, s1, s2) - clip(start, s1, s2)


def config_for(base: Config, values: dict[str, Any], budget: tuple[int, int] | None = None) -> Config:
    """``base`` with a trial's hyperparameter values (``None``: inactive, keep the base value)
    and, for a Hyperband trial, the stage epochs of its ``budget`` (start, end)."""
    overrides: dict[str, Any] = {}
    for name, v in values.items():
        if v is None or name not in HYPERPARAMETERS:
            continue
        if name == "augment_strength":
            for key in AUGMENT_SCALED:
                cap = 1.0 if key == "blur" else 0.9
                set_dotted(overrides, f"augment.{key}", min(getattr(base.augment, key) * v, cap))
        else:
            set_dotted(overrides, HYPERPARAMETERS[name].keys[0], v)
    if budget is not None:
        e1, e2 = schedule_epochs(base, *budget)
        set_dotted(overrides, "train.stage1.epochs", e1)
        set_dotted(overrides, "train.stage2.epochs", e2)
    return validate(merge(base, overrides, source="search space"))


# ---------------------------------------------------------------------------------------------
# The hypermodel and the tuners


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
        from jewelclf.evaluation.evaluate import compute_metrics
        from jewelclf.modeling.classifier import HEAD
        from jewelclf.training.trainer import train_model

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


def execution_dir(trial_dir: Path, execution: int | None) -> Path:
    """The work folder of one execution of a trial: the trial's folder when the trial has one
    execution, else ``execution_<n>/`` inside it, so that no execution sees another's history,
    resume state or early-stopping baseline."""
    return trial_dir if execution is None else trial_dir / f"execution_{execution + 1}"


def _gradient_registry() -> dict | None:
    """TensorFlow's global registry of gradient functions (private API; ``None`` if it moved)."""
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry
    except (ImportError, AttributeError):
        return None
    return registry if isinstance(registry, dict) else None


class _TrialHooks:
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
        registry = _gradient_registry()
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
        kwargs["checkpoint"] = (self._get_checkpoint_fname(trial.trial_id)
                                if isinstance(self, kt.Hyperband) else None)
        return super().run_trial(trial, *args, **kwargs)

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        # keras-tuner imports tensorboard here even when no TensorBoard callback is used, and
        # TensorFlow 2.21 no longer installs tensorboard. jewelclf passes keras-tuner no such
        # callback: train_model writes each trial's logs itself, into its work folder
        # (search/trial_<id>/tensorboard/stage1 and stage2, see jewelclf.training.tensorboard).
        if any(type(cb).__name__ == "TensorBoard" for cb in callbacks):
            super()._configure_tensorboard_dir(callbacks, trial, execution)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        registry = _gradient_registry()
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


def make_tuner(kind: str, hypermodel: TwoStageHyperModel, objective: str, max_trials: int | None,
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


# ---------------------------------------------------------------------------------------------
# The command


def distributed_role() -> str | None:
    """``chief``, ``worker`` or ``None``, by keras-tuner's own rule for its environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    for var in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(var):
            raise JewelclfError(f"KERASTUNER_ORACLE_IP is set but {var} is not; set both on the chief "
                                f"and on every worker (see the distributed tuning docs)")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


@dataclasses.dataclass
class Settings:
    tuner: str = "hyperband"
    objective: str = "val_accuracy"
    max_trials: int | None = None
    executions_per_trial: int = 1
    fast: bool = True


def _check_settings(s: Settings) -> Settings:
    if s.tuner not in TUNERS:
        raise JewelclfError(f"--tuner must be one of {', '.join(TUNERS)}, got {s.tuner!r}")
    if s.objective not in OBJECTIVES:
        raise JewelclfError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {s.objective!r}")
    if s.max_trials is not None and s.max_trials < 1:
        raise JewelclfError(f"--max-trials must be at least 1, got {s.max_trials}")
    if s.executions_per_trial < 1:
        raise JewelclfError(f"--executions-per-trial must be at least 1, got {s.executions_per_trial}")
    if s.max_trials is None and s.tuner != "hyperband":
        s.max_trials = DEFAULT_MAX_TRIALS
    return s


def _resume_state(run_dir: Path, config: Config | None, space: Space | None, given: dict[str, Any],
                  max_trials: int | None, fast: bool):
    """The saved config, space and settings of the search in ``run_dir``; given ones must match."""
    info = rd.read_run_info(run_dir)
    if not info or info.get("kind") != "tune" or not (run_dir / rd.CONFIG).is_file():
        raise JewelclfError(f"'{run_dir}' holds no tuning search to resume; start one without --resume")
    saved_config = from_dict(yaml.safe_load((run_dir / rd.CONFIG).read_text(encoding="utf-8")),
                             source=str(run_dir / rd.CONFIG))
    saved_space = parse_space(yaml.safe_load((run_dir / SPACE_FILE).read_text(encoding="utf-8")),
                              source=str(run_dir / SPACE_FILE))
    saved = Settings(**info["tune"])
    mismatch = [("--config", config is not None and config != saved_config),
                ("--space", space is not None and space != saved_space)]
    mismatch += [(f"--{k.replace('_', '-')}", v is not None and v != getattr(saved, k))
                 for k, v in given.items()]
    for flag, differs in mismatch:
        if differs:
            raise JewelclfError(f"--resume continues the search saved in '{run_dir}', which was started "
                                f"with a different {flag}; leave {flag} out, or start a new --run-dir")
    if max_trials is not None:
        saved.max_trials = max_trials  # a resumed search may be given more trials
    saved.fast = fast
    return saved_config, saved_space, _check_settings(saved), info


def _start_state(run_dir: Path, overwrite: bool, log: Log) -> None:
    info = rd.read_run_info(run_dir)
    if info and info.get("kind") == "tune" and info.get("status") == "running" and not overwrite:
        raise JewelclfError(f"run dir '{run_dir}' holds an unfinished tuning search; pass --resume to "
                            f"continue it, --overwrite to start over, or choose a new --run-dir")
    rd.prepare_run_dir(run_dir, overwrite=overwrite, log=log)


def tune(data_spec: str, run_dir: str | Path, config: Config | None = None, space: Space | None = None,
         tuner: str | None = None, objective: str | None = None, max_trials: int | None = None,
         executions_per_trial: int | None = None, resume: bool = False, overwrite: bool = False,
         fast: bool = True, log: Log = print) -> dict[str, Any]:
    """Search hyperparameters of the two-stage schedule on ``data_spec`` into ``run_dir``.

    ``None`` arguments take their defaults, or on ``resume`` the saved search's values (given
    ones must match them, except ``max_trials``, which may grow). Writes ``trials.csv`` after
    every trial, and ``best_config.yaml``, ``tuning_report.md`` and the score plot at the end.
    In keras-tuner's distributed mode a worker only runs trials; the chief writes the results.
    Trials run under ``train.precision``'s dtype policy (restored afterwards); a config with
    ``train.distribute`` other than ``none`` is refused, before ``run_dir`` is touched.
    """
    from jewelclf.training.trainer import describe_precision, precision_policy

    role = distributed_role()
    run_dir = Path(run_dir)
    given = {"tuner": tuner, "objective": objective, "executions_per_trial": executions_per_trial}
    started = time.time()
    if resume and role != "worker":
        config, space, settings, info = _resume_state(run_dir, config, space, given, max_trials, fast)
        log(f"resuming the search in {run_dir}")
    else:
        config = config if config is not None else validate(Config())
        space = space if space is not None else parse_space({})
        settings = _check_settings(Settings(**{k: v for k, v in given.items() if v is not None},
                                            max_trials=max_trials, fast=fast))
        # Fail fast on a bad backbone name or image size, before touching run_dir.
        get_backbone(config.model.backbone).check_image_size(config.data.image_size)
        info = {}
    if config.train.distribute != "none":
        raise JewelclfError(f"jewelclf tune trains each trial in one process, so "
                            f"train.distribute must be none (got {config.train.distribute}); to "
                            f"run trials on several machines use keras-tuner's distributed mode "
                            f"(KERASTUNER_* variables)")
    with precision_policy(config.train.precision) as resolved:
        log(describe_precision(config, resolved))
        return _search(data_spec, run_dir, config, space, settings, info, role, resume, overwrite,
                       started, log)


def _search(data_spec: str, run_dir: Path, config: Config, space: Space, settings: Settings,
            info: dict[str, Any], role: str | None, resume: bool, overwrite: bool, started: float,
            log: Log) -> dict[str, Any]:
    """The body of :func:`tune` once its config, space and settings are settled, under the
    run's precision policy."""
    from jewelclf.modeling.classifier import build_classifier
    from jewelclf.training.trainer import frozen_features, make_datasets, prepare_data, stage1_uses_cached_features
    from jewelclf.tuning import report as tune_report

    if config.train.stage1.epochs + config.train.stage2.epochs == 0:
        raise JewelclfError("nothing to train: train.stage1.epochs and train.stage2.epochs are both 0")
    active, notes = effective_space(space, config)
    if not active:
        raise JewelclfError("the search space is empty: each hyperparameter is null in --space or "
                            "cannot act under this config; tune at least one")
    if role == "worker":
        data_dir = run_dir / "workers" / os.environ["KERASTUNER_TUNER_ID"]
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        data_dir = run_dir
        if not resume:
            _start_state(run_dir, overwrite, log)
            info = {"kind": "tune", "data": data_spec, "seed": config.train.seed,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "search_seconds": 0.0}
            fsio.atomic_write_text(run_dir / rd.CONFIG, config.to_yaml())
            fsio.atomic_write_text(run_dir / SPACE_FILE, yaml.safe_dump(space, sort_keys=False))
        info.update(status="running", tune=dataclasses.asdict(settings), environment=rd.environment())
        fsio.atomic_write_json(run_dir / rd.RUN_INFO, info)

    keras.utils.set_random_seed(config.train.seed)
    try:
        data = prepare_data(data_spec, config, data_dir, log)
    except JewelclfError:
        if role != "worker" and not resume:
            fsio.atomic_write_json(run_dir / rd.RUN_INFO, {**info, "status": "failed"})
        raise
    names = data.class_names
    if role != "worker":
        saved_names = run_dir / rd.CLASS_NAMES
        if resume and saved_names.is_file() and json.loads(saved_names.read_text()) != names:
            raise JewelclfError(f"DATA's classes differ from those of the search in '{run_dir}'; resume "
                                f"with the same DATA, or start a new --run-dir")
        fsio.atomic_write_json(saved_names, names)
    for note in notes:
        log(f"note: {note}")

    datasets = None
    fast_seconds = None
    if role != "chief":
        datasets = make_datasets(data, config, data_dir / "cache", log)
        if settings.fast and stage1_uses_cached_features(config) and config.train.stage1.epochs > 0:
            if config.model.weights.lower() == "none":
                log("note: fast mode is off: with weights none every trial's backbone starts "
                    "from its own random weights, so features cannot be shared")
            else:
                t0 = time.perf_counter()
                log("fast mode: computing the frozen backbone's features once for all trials")
                reference = build_classifier(config, len(names))
                datasets = dataclasses.replace(
                    datasets, features=frozen_features(reference, datasets.train_in_order, datasets.val))
                del reference
                keras.backend.clear_session()
                gc.collect()
                fast_seconds = round(time.perf_counter() - t0, 1)
                log(f"fast mode: features ready in {fast_seconds:.1f}s")
        elif settings.fast:
            log("note: fast mode is off: stage 1 trains through the backbone "
                "(augment.in_stage1 or train.stage1.cache_features: off)")

    hypermodel = TwoStageHyperModel(config, active, names, datasets, log)
    try:
        search = make_tuner(settings.tuner, hypermodel, settings.objective, settings.max_trials,
                            settings.executions_per_trial, run_dir, config.train.seed)
    except (RuntimeError, ValueError, KeyError) as e:
        raise JewelclfError(f"could not load the search state in '{run_dir / SEARCH_DIR}' "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); start over with "
                            f"--overwrite") from None
    outputs = tune_report.Outputs(run_dir, config, active, settings.objective, names)
    if role is None:
        search.after_trial = lambda t: outputs.write_trials(t.oracle)
    if role == "chief":
        log(f"chief: serving the search on {os.environ['KERASTUNER_ORACLE_IP']}:"
            f"{os.environ['KERASTUNER_ORACLE_PORT']}; start the workers with the same command")

    t0 = time.time()
    finished = False
    try:
        search.search()
        finished = True
    except KeyboardInterrupt:
        if role != "worker":
            log(f"\nsearch stopped; finished trials are kept. Continue it with: jewelclf tune "
                f"{data_spec} --run-dir {run_dir} --resume")
        raise
    except RuntimeError as e:
        if "consecutive failures" not in str(e):
            raise
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        raise JewelclfError(f"the search stopped after {search.oracle.max_consecutive_failed_trials} "
                            f"failed trials in a row; the last one failed with: {last[:200]}") from None
    finally:
        if role != "worker":
            info["search_seconds"] = round(info.get("search_seconds", 0.0) + time.time() - t0, 1)
            if not finished:
                fsio.atomic_write_json(run_dir / rd.RUN_INFO, info)
    if datasets is not None and datasets.cache == "disk":
        shutil.rmtree(data_dir / "cache", ignore_errors=True)
    if role == "worker":
        log(f"worker {os.environ['KERASTUNER_TUNER_ID']}: no trials left; the chief writes the results")
        return {"status": "worker finished"}

    best = outputs.write_all(search.oracle, settings, info["search_seconds"], fast_seconds, log)
    info.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                fast_mode_seconds=fast_seconds,
                wall_seconds=round(time.time() - started, 1), best=best)
    fsio.atomic_write_json(run_dir / rd.RUN_INFO, info)
    log(f"search finished: {run_dir / BEST_CONFIG}; train it with: jewelclf fit DATA --run-dir RUN "
        f"--config {run_dir / BEST_CONFIG}")
    return info
