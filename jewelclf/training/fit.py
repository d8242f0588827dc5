"""``jewelclf fit``: the command's flow around the training engine.

Locks the run dir, records the run's state (running, interrupted, failed, finished), checks and
splits the data, trains both stages (:mod:`jewelclf.training.stages`), calibrates, saves the
model and evaluates the test split; :func:`resume_fit` continues an interrupted run.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import keras
import tensorflow as tf

from jewelclf import fsio
from jewelclf import runs as rd
from jewelclf.config import Config
from jewelclf.data.pipeline import global_batch_size
from jewelclf.data.prepare import PreparedData, make_datasets, prepare_data
from jewelclf.data.sources import data_key
from jewelclf.errors import JewelclfError
from jewelclf.evaluation.evaluate import calibrate_run, prediction_rows, write_evaluation
from jewelclf.evaluation.metrics import format_report, score
from jewelclf.modeling.backbones import get_backbone
from jewelclf.modeling.classifier import build_classifier, check_weights
from jewelclf.runs import timestamp
from jewelclf.training.checkpoints import Progress, changed_content, save_content, trim_history
from jewelclf.training.features import keep_stage1_features
from jewelclf.training.runtime import (
    Distribution,
    describe_precision,
    make_distribution,
    precision_policy,
    resolve_precision,
)
from jewelclf.training.stages import restored_epoch, train_model

Log = Callable[[str], None]


def fit(data_spec: str, run_dir: str | Path, config: Config, overwrite: bool = False,
        log: Log = print) -> dict[str, Any]:
    """Train a classifier on ``data_spec`` into ``run_dir``; return the run summary.

    Writes the resolved config, class names, split manifest, rejected files, history and
    curves, the best checkpoint, ``model.keras`` and, when the data has a test split,
    ``metrics.json`` with its confusion matrix. Only one process at a time may use a run dir.
    Ctrl-C or SIGTERM stops the run with :class:`RunInterrupted`; :func:`resume_fit` continues it.

    With ``train.distribute: multi_worker`` every worker runs this same call; only the chief
    writes ``run_dir``, the others train in step with it and write to a temporary folder.
    """
    # Fail fast on a bad backbone name or image size, before touching run_dir.
    get_backbone(config.model.backbone).check_image_size(config.data.image_size)
    dist = make_distribution(config.train.distribute, log)  # before TensorFlow runs anything
    try:
        if not dist.chief:
            return _fit_non_chief(data_spec, config, dist, log)
        return _locked(Path(run_dir), lambda: _fit_locked(data_spec, Path(run_dir), config,
                                                          overwrite, False, log, dist),
                       resumable=dist.mode != "multi_worker")
    except (tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.DeadlineExceededError) as e:
        if dist.mode != "multi_worker":
            raise
        # TensorFlow's health check aborts the collectives when a peer is gone.
        reason = re.sub(r"\{\{[^}]*\}\}\s*", "", str(e)).strip().splitlines()
        raise JewelclfError(
            f"worker {dist.task_index} lost contact with the other workers "
            f"({(reason[0] if reason else type(e).__name__)[:160]}): one of them stopped, see "
            f"its output; start the run again on every worker (with --overwrite)") from None


def _fit_non_chief(data_spec: str, config: Config, dist: Distribution, log: Log) -> dict[str, Any]:
    """A non-chief worker: the same training, in step with the chief, into a temp folder.

    Keras' multi-worker pattern: every worker runs every save (a checkpoint may need all of
    them), and the non-chief ones write to a temporary folder that is removed afterwards.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"jewelclf-worker{dist.task_index}-"))
    log(f"worker {dist.task_index}: not the chief, so it writes only to {tmp} (removed at the "
        f"end); the chief writes the run dir")
    try:
        with _signals_as_interrupt():
            info = _fit_locked(data_spec, tmp / "run", config, False, False, log, dist)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "status": "worker finished"}


def resume_fit(run_dir: str | Path, data_spec: str | None = None, log: Log = print) -> dict[str, Any]:
    """Continue the interrupted run in ``run_dir`` (Ctrl-C, SIGTERM or SIGKILL) where it stopped.

    The run's saved config and data are used; finished phases are skipped and the unfinished
    one continues from its last epoch, with its optimizer state and unfreeze depth.
    """
    from jewelclf.config import resolve

    run_dir = Path(run_dir)
    info = rd.read_run_info(run_dir)
    if info is None or not (run_dir / rd.CONFIG).is_file():
        raise JewelclfError(f"'{run_dir}' holds no jewelclf run to resume; start one with "
                            f"jewelclf fit DATA --run-dir {run_dir}")
    status = info.get("status")
    if status == "finished":
        raise JewelclfError(f"the run in '{run_dir}' already finished, so there is nothing to "
                            f"resume; evaluate or export it, or pass --overwrite to train it again")
    if status == "failed":
        raise JewelclfError(f"the run in '{run_dir}' failed before training; start it again "
                            f"without --resume")
    saved = info.get("data_path") or info["data"]
    if data_spec is not None and data_key(data_spec) != data_key(saved):
        raise JewelclfError(f"the run in '{run_dir}' trained on '{saved}', not '{data_spec}'; "
                            f"resume without DATA, or start a new run")
    config = resolve(run_dir / rd.CONFIG)
    if config.train.distribute == "multi_worker":
        raise JewelclfError(f"the run in '{run_dir}' trained with train.distribute: multi_worker, "
                            f"which --resume cannot continue (the other workers' state is not in "
                            f"the run dir); start it again with --overwrite")
    dist = make_distribution(config.train.distribute, log)
    return _locked(run_dir, lambda: _fit_locked(saved, run_dir, config, False, True, log, dist))


class RunInterrupted(JewelclfError):
    """Ctrl-C or SIGTERM stopped a run; everything finished so far is kept for ``--resume``."""

    exit_code = 130


def _locked(run_dir: Path, work: Callable[[], dict[str, Any]], resumable: bool = True) -> dict[str, Any]:
    with rd.run_lock(run_dir), _signals_as_interrupt() as signalled:
        try:
            return work()
        except JewelclfError:
            raise
        except Exception as e:
            if signalled.is_set():
                # The KeyboardInterrupt landed inside TensorFlow or Keras code whose cleanup then
                # failed (seen: a TypeError from a half-built tf.data iterator); still Ctrl-C.
                _interrupted(run_dir, resumable)
            # A full disk met outside jewelclf.runs's writes (an appended history row, a
            # TensorFlow cache file): one line, and the run stays resumable.
            if not fsio.is_disk_full(e):
                raise
            raise fsio.DiskFullError(fsio.disk_full_message(e, run_dir)) from None
        except KeyboardInterrupt:
            _interrupted(run_dir, resumable)


def _interrupted(run_dir: Path, resumable: bool) -> None:
    """Mark the run ``interrupted`` and raise :class:`RunInterrupted` with the way on; a run
    that was not yet ``running`` re-raises the KeyboardInterrupt."""
    info = rd.read_run_info(run_dir)
    if info is None or info.get("status") != "running":
        raise KeyboardInterrupt
    fsio.atomic_write_json(run_dir / rd.RUN_INFO, {**info, "status": "interrupted"})
    if not resumable:
        raise RunInterrupted(
            f"interrupted; a multi-worker run cannot be resumed: start it again on every "
            f"worker with --overwrite (run dir {run_dir})") from None
    raise RunInterrupted(
        f"interrupted; the epochs finished so far are saved. Resume with: "
        f"jewelclf fit --resume --run-dir {run_dir}") from None


@contextlib.contextmanager
def _signals_as_interrupt():
    """Ctrl-C and SIGTERM (a scheduler's or ``kill``'s stop) both raise KeyboardInterrupt, so
    they save the same way; the event yielded says that one came."""
    signalled = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield signalled
        return

    def interrupt(signum, frame):
        signalled.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signalled
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _failed_before_training(run_dir: Path, info: dict[str, Any], resume: bool):
    """Any error before the first epoch marks a new run ``failed``, so the same ``--run-dir``
    can be used again right away (with other flags), rather than leaving it ``running``."""
    try:
        yield
    except Exception:
        if not resume:
            fsio.atomic_write_json(run_dir / rd.RUN_INFO, {**info, "status": "failed"})
        raise


def _check_content(data: PreparedData, data_spec: str, run_dir: Path, resume: bool, log: Log) -> None:
    """Record a new run's image hashes; on a resume, refuse images whose contents changed.

    Refused rather than recomputed: the epochs already trained (and stage 1's cached features)
    are of the old contents, so no uninterrupted run would train the model it would give.
    """
    if not resume:
        save_content(run_dir, data.hashes)
        return
    changed, record = changed_content(run_dir, data.hashes)
    if changed is None:
        log(f"note: {record} is missing or unreadable (an older jewelclf started the run?), so "
            f"--resume cannot tell whether the images changed")
    elif changed:
        more = f" and {len(changed) - 1} other file(s)" if len(changed) > 1 else ""
        raise JewelclfError(
            f"the contents of {changed[0]}{more} in '{data_spec}' changed since the run started "
            f"(their SHA-256 differs from {record}); the epochs trained so far are of the old "
            f"images: restore them, or start a new run (jewelclf fit DATA --run-dir NEW_DIR)")


def _fit_locked(data_spec: str, run_dir: Path, config: Config, overwrite: bool, resume: bool,
                log: Log, dist: Distribution | None = None) -> dict[str, Any]:
    started = time.time()
    dist = dist or Distribution()
    precision = resolve_precision(config.train.precision)
    run_dir, info, split_before = _start_attempt(data_spec, run_dir, config, overwrite, resume, log)
    # The resolved choices of this attempt (``auto`` may differ between machines).
    info.update({"precision": precision, "jit_compile": config.train.jit_compile,
                 "distribute": dist.describe()})
    fsio.atomic_write_json(run_dir / rd.RUN_INFO, info)
    log(describe_precision(config, precision))
    data = _checked_data(data_spec, run_dir, config, resume, log, dist, info, split_before)
    names = data.class_names

    with precision_policy(precision):
        with _failed_before_training(run_dir, info, resume):
            with dist.scope():
                model = build_classifier(config, len(names))
            datasets = make_datasets(data, config, run_dir / "cache", log, replicas=dist.replicas)
        if dist.strategy is not None:
            log(f"global batch {global_batch_size(config, dist.replicas)} = data.batch_size "
                f"{config.data.batch_size} per replica x {dist.replicas} replica(s)")
        # A multi-worker run keeps no resume state: its workers' state is not all in run_dir.
        progress = Progress(run_dir) if dist.mode != "multi_worker" else None
        if resume and progress is not None:
            trim_history(run_dir / rd.HISTORY, progress)
        stages = train_model(model, config, datasets, run_dir, log, progress=progress)
        stage1 = progress.load_features(len(data.train), len(data.val)) if progress is not None else None
        summary, calibration = _save_trained(model, data, config, run_dir, stages, log, stage1)
        if data.test:
            summary["test"] = _evaluate_test(model, data, data_spec, config, run_dir, calibration, dist, log)
    if datasets.cache == "disk":
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
    info.update({"status": "finished", "finished": timestamp(),
                 # with --resume: this attempt's time only
                 "wall_seconds": round(time.time() - started, 1), "summary": summary})
    if progress is not None:
        keep_stage1_features(progress, run_dir, data)
    fsio.atomic_write_json(run_dir / rd.RUN_INFO, info)
    if progress is not None:
        progress.clear()
    if dist.chief:
        log(f"run finished in {info['wall_seconds']:.0f}s: {run_dir}")
    else:
        log(f"worker {dist.task_index} finished in {info['wall_seconds']:.0f}s; the chief wrote the run")
    return info


def _start_attempt(data_spec: str, run_dir: Path, config: Config, overwrite: bool, resume: bool,
                   log: Log) -> tuple[Path, dict[str, Any], bytes | None]:
    """The run dir, its run info marked running, and (on a resume) the split manifest before.

    A new run gets a fresh run dir and its resolved config; a resume keeps the run's record and
    adds this attempt's start time.
    """
    split_before = None
    if resume:
        info = rd.read_run_info(run_dir) or {}
        info.update({"status": "running",
                     "resumed": [*info.get("resumed", []), timestamp()]})
        # A killed run may leave a half-written tf.data cache (and its lock file) behind.
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
        split_before = (run_dir / rd.SPLITS).read_bytes() if (run_dir / rd.SPLITS).is_file() else None
    else:
        run_dir = rd.prepare_run_dir(Path(run_dir), overwrite=overwrite, log=log)
        info = {"status": "running", "data": data_spec,
                "data_path": data_key(data_spec), "seed": config.train.seed,
                "started": timestamp(), "environment": rd.environment()}
        fsio.atomic_write_text(run_dir / rd.CONFIG, config.to_yaml())
    return run_dir, info, split_before


def _checked_data(data_spec: str, run_dir: Path, config: Config, resume: bool, log: Log,
                  dist: Distribution, info: dict[str, Any], split_before: bytes | None) -> PreparedData:
    """Check the weights, seed the run, and prepare the data (on a resume: the same data)."""
    with _failed_before_training(run_dir, info, resume):
        # Seconds, before minutes of data checking; and before the seed is set, so that the
        # run draws the same random numbers as it would without this check.
        check_weights(config)
    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()

    with _failed_before_training(run_dir, info, resume):
        data = prepare_data(data_spec, config, run_dir, log)
    if resume and split_before is not None and (run_dir / rd.SPLITS).read_bytes() != split_before:
        fsio.atomic_write_text(run_dir / rd.SPLITS, split_before.decode("utf-8"))
        raise JewelclfError(
            f"the data in '{data_spec}' changed since the run started (its split differs from "
            f"{run_dir / rd.SPLITS}); resume needs the same data: restore it, or start a new run")
    if dist.mode != "multi_worker":  # which keeps no resume state
        with _failed_before_training(run_dir, info, resume):
            _check_content(data, data_spec, run_dir, resume, log)
    names = data.class_names
    fsio.atomic_write_json(run_dir / rd.CLASS_NAMES, names)
    counts = Counter((r.split, r.label) for r in data.train + data.val + data.test)
    log("images per class (train/val/test): " + ", ".join(
        f"{c} {counts[('train', c)]}/{counts[('val', c)]}/{counts[('test', c)]}" for c in names))
    return data


def _save_trained(model: keras.Model, data: PreparedData, config: Config, run_dir: Path,
                  stages: dict[str, Any], log: Log, stage1_features=None) -> tuple[dict[str, Any], Any]:
    """Calibrate, save ``model.keras`` and the training curves; the run summary so far, and the calibration."""
    # On the restored best weights, before model.keras: a saved model has its calibration.
    calibration = calibrate_run(model, data, config, run_dir, log, stage1_features)
    # Leave the backbone frozen in the saved model, so a reload trains the head by default.
    model.get_layer("backbone").trainable = False
    fsio.atomic_save(run_dir / rd.MODEL, model.save)
    if (run_dir / rd.HISTORY).exists():
        from jewelclf.evaluation import plots

        plots.training_curves(run_dir / rd.HISTORY, run_dir / rd.CURVES, run=run_dir.name,
                              restored_epoch=restored_epoch(stages))

    summary: dict[str, Any] = {**stages, "rejected_files": data.rejected,
                               "num_train": len(data.train), "num_val": len(data.val),
                               "num_test": len(data.test), "calibration": calibration.to_dict()}
    return summary, calibration


def _evaluate_test(model: keras.Model, data: PreparedData, data_spec: str, config: Config, run_dir: Path,
                   calibration: Any, dist: Distribution, log: Log) -> dict[str, Any]:
    """Score the test split and write its evaluation; the summary's ``test`` figures."""
    from jewelclf.evaluation.evaluate import predict_records

    names = data.class_names
    # Every worker predicts (the prediction's collectives need all of them).
    y_true, probs = predict_records(model, data.source, data.test, names, config)
    metrics, probs = score(y_true, probs, names, config.train.top_k, calibration)
    metrics["data"] = f"{data_spec} (test split)"
    from jewelclf.evaluation.plots import confusion_title

    write_evaluation(metrics, run_dir, prediction_rows(data.test, y_true, probs, names),
                     title=confusion_title(run_dir.name, "test", len(data.test)))
    if dist.chief:
        log(format_report(metrics))
    return {k: metrics[k] for k in ("accuracy", "top_k_accuracy", "macro_f1")}
