"""``jewelclf tune``: a Keras Tuner search over the two-stage schedule of ``fit``.

The search is keras-tuner's own: its Hyperband, RandomSearch and BayesianOptimization tuners
and oracles, its state files (which make ``--resume`` work) and its distributed mode. jewelclf
supplies a :class:`keras_tuner.HyperModel` whose ``build`` is :func:`jewelclf.modeling.classifier.build_classifier`
and whose ``fit`` is :func:`jewelclf.training.stages.train_model`, the one training path of ``fit``.

Fast mode: when stage 1 trains the head on the frozen backbone's pooled features (no stage-1
augmentation), those features are the same for every trial. They are computed once per search
and handed to each trial through :attr:`jewelclf.data.prepare.Datasets.features`, so a head-only
trial costs seconds instead of a pass through the backbone.

Hyperband's budget is the position in the schedule: epochs ``1..S1`` are stage 1 and
``S1+1..S1+S2`` stage 2. A trial asked to go from epoch ``I`` to ``E`` trains exactly that part
of the schedule, on the weights of the trial it continues (keras-tuner loads them), so early
rounds are cheap head-only trials and only the promising ones reach fine-tuning.

This module holds the command (settings, starting or resuming a search, its steps); the space
is :mod:`~jewelclf.tuning.space`, the hypermodel :mod:`~jewelclf.tuning.hypermodel`, the tuners
:mod:`~jewelclf.tuning.tuner` and the results :mod:`~jewelclf.tuning.report`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import keras
import yaml

from jewelclf import fsio
from jewelclf import runs as rd
from jewelclf.config import Config, from_dict, validate
from jewelclf.data.prepare import make_datasets, prepare_data
from jewelclf.errors import JewelclfError
from jewelclf.modeling.backbones import get_backbone
from jewelclf.modeling.classifier import build_classifier
from jewelclf.runs import timestamp
from jewelclf.training.features import frozen_features, stage1_uses_cached_features
from jewelclf.tuning import report as tune_report
from jewelclf.tuning.hypermodel import TwoStageHyperModel
from jewelclf.tuning.layout import BEST_CONFIG, SEARCH_DIR, SPACE_FILE
from jewelclf.tuning.space import Space, effective_space, load_space, parse_space
from jewelclf.tuning.tuner import distributed_role, make_tuner

__all__ = ["Settings", "load_space", "parse_space", "tune"]

Log = Callable[[str], None]

TUNERS = ("hyperband", "random", "bayesian")
OBJECTIVES = ("val_accuracy", "val_macro_f1")
DEFAULT_MAX_TRIALS = 20
"""For random and Bayesian search; Hyperband's own schedule sets its trial count."""


@dataclasses.dataclass
class Settings:
    """How the search runs: the tuner, its objective, the trial budget and fast mode."""

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
    from jewelclf.training.runtime import describe_precision, precision_policy

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
    if config.train.stage1.epochs + config.train.stage2.epochs == 0:
        raise JewelclfError("nothing to train: train.stage1.epochs and train.stage2.epochs are both 0")
    active, notes = effective_space(space, config)
    if not active:
        raise JewelclfError("the search space is empty: each hyperparameter is null in --space or "
                            "cannot act under this config; tune at least one")
    data_dir, info = _record_start(data_spec, run_dir, config, space, settings, info, role, resume,
                                   overwrite, log)
    data = _prepare(data_spec, run_dir, data_dir, config, info, role, resume, log)
    names = data.class_names
    for note in notes:
        log(f"note: {note}")

    datasets, fast_seconds = None, None
    if role != "chief":
        datasets, fast_seconds = _trial_datasets(data, config, settings, data_dir, log)
    search, outputs = _open_tuner(run_dir, config, active, settings, names, datasets, role, log)
    _run_search(search, data_spec, run_dir, info, role, log)
    if datasets is not None and datasets.cache == "disk":
        shutil.rmtree(data_dir / "cache", ignore_errors=True)
    if role == "worker":
        log(f"worker {os.environ['KERASTUNER_TUNER_ID']}: no trials left; the chief writes the results")
        return {"status": "worker finished"}

    best = outputs.write_all(search.oracle, settings, info["search_seconds"], fast_seconds, log)
    info.update(status="finished", finished=timestamp(),
                fast_mode_seconds=fast_seconds,
                wall_seconds=round(time.time() - started, 1), best=best)
    fsio.atomic_write_json(run_dir / rd.RUN_INFO, info)
    log(f"search finished: {run_dir / BEST_CONFIG}; train it with: jewelclf fit DATA --run-dir RUN "
        f"--config {run_dir / BEST_CONFIG}")
    return info


def _record_start(data_spec: str, run_dir: Path, config: Config, space: Space, settings: Settings,
                  info: dict[str, Any], role: str | None, resume: bool, overwrite: bool,
                  log: Log) -> tuple[Path, dict[str, Any]]:
    """The folder this process prepares its data in, and the run info it wrote (the chief's or a
    lone search's: ``status: running``, the settings; a new search also saves config and space)."""
    if role == "worker":
        data_dir = run_dir / "workers" / os.environ["KERASTUNER_TUNER_ID"]
        data_dir.mkdir(parents=True, exist_ok=True)
        return data_dir, info
    if not resume:
        _start_state(run_dir, overwrite, log)
        info = {"kind": "tune", "data": data_spec, "seed": config.train.seed,
                "started": timestamp(), "search_seconds": 0.0}
        fsio.atomic_write_text(run_dir / rd.CONFIG, config.to_yaml())
        fsio.atomic_write_text(run_dir / SPACE_FILE, yaml.safe_dump(space, sort_keys=False))
    info.update(status="running", tune=dataclasses.asdict(settings), environment=rd.environment())
    fsio.atomic_write_json(run_dir / rd.RUN_INFO, info)
    return run_dir, info


def _prepare(data_spec: str, run_dir: Path, data_dir: Path, config: Config, info: dict[str, Any],
             role: str | None, resume: bool, log: Log):
    """``prepare_data`` under the run's seed; a new search that fails here is marked failed, and
    a resumed one must find the classes it was started with."""
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
    return data


def _trial_datasets(data, config: Config, settings: Settings, data_dir: Path, log: Log):
    """The datasets every trial trains on, with the frozen backbone's features in fast mode, and
    the seconds those features took (``None`` when fast mode is off)."""
    datasets = make_datasets(data, config, data_dir / "cache", log)
    fast_seconds = None
    if settings.fast and stage1_uses_cached_features(config) and config.train.stage1.epochs > 0:
        if config.model.weights.lower() == "none":
            log("note: fast mode is off: with weights none every trial's backbone starts "
                "from its own random weights, so features cannot be shared")
        else:
            t0 = time.perf_counter()
            log("fast mode: computing the frozen backbone's features once for all trials")
            reference = build_classifier(config, len(data.class_names))
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
    return datasets, fast_seconds


def _open_tuner(run_dir: Path, config: Config, active: Space, settings: Settings, names: list[str],
                datasets, role: str | None, log: Log):
    """The tuner (its saved state reloaded) and the outputs that report its trials."""
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
    return search, outputs


def _run_search(search, data_spec: str, run_dir: Path, info: dict[str, Any], role: str | None,
                log: Log) -> None:
    """keras-tuner's search; its time is added to ``search_seconds`` (saved at once if it stops)."""
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
