"""The two-stage transfer-learning schedule: the one training path of ``fit`` and of tuning.

Stage 1 trains the head with the backbone frozen (on cached features when it does not augment).
Stage 2 unfreezes the backbone's top blocks one more per step, recompiling after each unfreeze
with a low learning rate, each step starting from the best weights so far. BatchNorm stays
frozen: its layers are never made trainable, and a non-trainable ``BatchNormalization`` runs in
inference mode in Keras. Early stopping and learning-rate reduction watch the validation loss
over the whole stage, and the best weights seen are restored at the end.
"""

from __future__ import annotations

import csv
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from jewelclf import fsio
from jewelclf import runs as rd
from jewelclf.config import Config
from jewelclf.data.pipeline import global_batch_size, permuted, shard_by_data
from jewelclf.data.prepare import Datasets
from jewelclf.modeling.backbones import get_backbone
from jewelclf.modeling.classifier import HEAD, unfreeze_top_blocks, without_augmentation
from jewelclf.training.cached_step import cached_step, step_uses_cache
from jewelclf.training.callbacks import EpochNumber, HistoryRecorder
from jewelclf.training.checkpoints import AtomicModelCheckpoint, Progress
from jewelclf.training.features import frozen_features, stage1_uses_cached_features
from jewelclf.training.plateau import ResumedEarlyStopping, StagePlateau
from jewelclf.training.runtime import model_scope
from jewelclf.training.tensorboard import tensorboard_callbacks

Log = Callable[[str], None]

STAGE1_BEST = "checkpoints/stage1_best.weights.h5"


def _loss(config: Config):
    return keras.losses.CategoricalCrossentropy(label_smoothing=config.train.label_smoothing)


def _metrics():
    return ["accuracy"]


_JIT = {"auto": "auto", "on": True, "off": False}


def _compile(model: keras.Model, learning_rate: float, config: Config) -> None:
    """Compile with a fresh Adam, the run's loss and metrics, and ``train.jit_compile``.

    ``auto`` is Keras' own default: XLA on a GPU when every layer supports it and no
    tf.distribute strategy is in use. ``on`` asks for XLA; Keras still turns it off (with a
    warning) for a model holding a layer that cannot be compiled, such as ``RandomZoom``.
    """
    model.compile(keras.optimizers.Adam(learning_rate), loss=_loss(config), metrics=_metrics(),
                  jit_compile=_JIT[config.train.jit_compile])




def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def _quietly_load(model: keras.Model, path: Path) -> None:
    with warnings.catch_warnings():
        # A checkpoint also holds the optimizer of the step that saved it; only weights matter.
        warnings.simplefilter("ignore")
        model.load_weights(path)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def train_stage1(model: keras.Model, config: Config, train_ds, val_ds, train_in_order,
                 labels: tuple[np.ndarray, np.ndarray], weights: dict | None, run_dir: Path,
                 log: Log, features: tuple[np.ndarray, np.ndarray] | None = None,
                 progress: Progress | None = None, epoch: tf.Variable | None = None) -> dict[str, Any]:
    """Train the head with the backbone frozen, on cached features when augmentation is off.

    ``features`` are the frozen backbone's features of ``train_in_order`` and ``val_ds`` when
    they were computed before (see :attr:`Datasets.features`); otherwise they are computed here.
    With ``progress``, every epoch is backed up and an interrupted stage 1 resumes where it
    stopped; the best weights (by val_loss) are restored at the end either way. ``epoch``: the
    variable the training data is permuted by (:class:`EpochNumber`).
    """
    cfg = config.train.stage1
    if cfg.epochs == 0:
        return {"epochs": 0}
    if progress is not None and progress.done("stage1") is not None:
        return {k: v for k, v in progress.done("stage1").items() if k != "weights"}
    use_cache = stage1_uses_cached_features(config)
    t0 = time.perf_counter()
    recorder = HistoryRecorder(run_dir / rd.HISTORY, "stage1", 0)
    best_so_far = recorder.best_val_loss
    best_path = run_dir / STAGE1_BEST
    best_path.parent.mkdir(parents=True, exist_ok=True)
    early = ResumedEarlyStopping([float(r["val_loss"]) for r in recorder.rows if r.get("val_loss")],
                                 cfg.patience)
    callbacks = _stage1_callbacks(config, model, run_dir, recorder, early, best_path, log, progress, epoch)
    if recorder.epochs_done:
        log(f"stage 1: resuming after epoch {recorder.epochs_done} (best val_loss so far "
            f"{best_so_far:.4f})")
    if use_cache:
        features = _stage1_features(model, train_in_order, val_ds, labels, log, features, progress)
        t_features = time.perf_counter() - t0
        trainee = model.get_layer(HEAD)
        _compile(trainee, cfg.learning_rate, config)
        feats, val_feats = _feature_datasets(model, config, features, labels, epoch)
        if not early.stopped_before:
            trainee.fit(feats, validation_data=val_feats, epochs=cfg.epochs, class_weight=weights,
                        callbacks=callbacks, verbose=_verbose(), shuffle=False)
    else:
        t_features = 0.0
        trainee = model if (config.augment.enabled and config.augment.in_stage1) else without_augmentation(model)
        _compile(trainee, cfg.learning_rate, config)
        if not early.stopped_before:
            trainee.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, class_weight=weights,
                        callbacks=callbacks, verbose=_verbose(), shuffle=False)
    if best_path.exists():
        _quietly_load(trainee, best_path)
    seconds = time.perf_counter() - t0
    summary = {"epochs": recorder.epochs_done, "seconds": round(seconds, 1),
               "feature_seconds": round(t_features, 1), "cached_features": use_cache,
               "jit_compile": bool(trainee.jit_compile),
               **_restored(recorder.best_row)}
    log(f"stage 1 (head{', cached features' if use_cache else ''}): {summary['epochs']} epochs in "
        f"{seconds:.1f}s; restored epoch {summary['restored_epoch']}: val_loss "
        f"{summary['best_val_loss']:.4f}, val_accuracy {summary['val_accuracy']:.4f}")
    if progress is not None:
        progress.complete("stage1", model, summary)
    return summary


def _stage1_callbacks(config: Config, model: keras.Model, run_dir: Path, recorder: HistoryRecorder,
                      early: ResumedEarlyStopping, best_path: Path, log: Log, progress: Progress | None,
                      epoch: tf.Variable | None) -> list[keras.callbacks.Callback]:
    """Stage 1's callbacks, in the order they must run at each epoch's end."""
    callbacks = [
        EpochNumber(epoch, 0),
        recorder,
        AtomicModelCheckpoint(str(best_path), monitor="val_loss", save_best_only=True,
                              save_weights_only=True, initial_value_threshold=_finite(recorder.best_val_loss)),
        early,
        *tensorboard_callbacks(config, model, run_dir, "stage1", 0, log),
    ]
    if progress is not None:
        callbacks.append(progress.backup("stage1"))  # last: after the epoch's row is written
    return callbacks


def _stage1_features(model: keras.Model, train_in_order, val_ds, labels: tuple[np.ndarray, np.ndarray],
                     log: Log, features: tuple[np.ndarray, np.ndarray] | None,
                     progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    """The given features, else those an interrupted attempt kept, else computed (and kept) now."""
    if features is None and progress is not None:
        features = progress.load_features(len(labels[0]), len(labels[1]))
    if features is None:
        log("stage 1: computing the frozen backbone's features once")
        features = frozen_features(model, train_in_order, val_ds,
                                   sizes=(len(labels[0]), len(labels[1])))
        if progress is not None:
            progress.save_features(features)
    return features


def _feature_datasets(model: keras.Model, config: Config, features: tuple[np.ndarray, np.ndarray],
                      labels: tuple[np.ndarray, np.ndarray], epoch: tf.Variable | None):
    """The head's training (permuted by ``epoch``) and validation batches of cached features."""
    x_train, x_val = features
    y_train, y_val = labels
    replicas = model.distribute_strategy.num_replicas_in_sync
    batch = global_batch_size(config, replicas)
    feats = shard_by_data(permuted(tf.data.Dataset.from_tensor_slices((x_train, y_train)),
                                   len(x_train), config.train.seed, epoch).batch(batch), replicas)
    val_feats = shard_by_data(tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(batch),
                              replicas)
    return feats, val_feats


def restored_epoch(stages: dict[str, Any]) -> int:
    """The ``history.csv`` epoch whose weights the trained model holds (0: none recorded).

    Stage 2's restored epoch when it found a better one; else stage 1's, whose weights stage 2
    started from (and restored when none of its epochs was better).
    """
    s2, s1 = stages.get("stage2", {}), stages.get("stage1", {})
    return int(s2.get("restored_epoch") or s1.get("restored_epoch") or 0)


def _restored(row: dict[str, str] | None) -> dict[str, Any]:
    """The figures of the epoch whose weights were restored (a ``history.csv`` row)."""
    if row is None:
        return {"best_val_loss": math.inf, "val_accuracy": 0.0, "restored_epoch": 0}
    return {"best_val_loss": float(row["val_loss"]), "val_accuracy": float(row.get("val_accuracy") or 0.0),
            "restored_epoch": int(row["epoch"])}


def train_stage2(model: keras.Model, config: Config, train_ds, val_ds, weights: dict | None,
                 run_dir: Path, epoch_offset: int, log: Log,
                 progress: Progress | None = None, epoch: tf.Variable | None = None,
                 train_in_order=None, labels: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Progressive unfreezing of the backbone's top blocks, one more per step.

    Each step starts from the best weights so far (by val_loss), recompiles (a new optimizer
    for the new trainable set) and trains its share of the epochs. Patience and the plateau's
    learning-rate cuts count over the whole stage (:class:`jewelclf.training.plateau.StagePlateau`):
    ``train.stage2.patience`` epochs in a row without a lower val_loss end stage 2, and so does
    a step that does not improve on the best. The best weights are restored at the end, and the
    summary gives the figures of that epoch. With ``progress``, finished steps are skipped and an
    interrupted step resumes from its last epoch, optimizer state included. ``epoch``: the
    variable ``train_ds`` is permuted by (:class:`EpochNumber`). With ``train_in_order`` and
    ``labels`` (as in :class:`Datasets`), a step may train on activations cached at its frozen
    boundary (``train.stage2.cache_activations``, :mod:`jewelclf.training.cached_step`).
    """
    cfg = config.train.stage2
    spec = get_backbone(config.model.backbone)
    steps = min(cfg.unfreeze_blocks, len(spec.blocks(model.get_layer("backbone"))))
    if cfg.epochs == 0 or steps == 0:
        return {"epochs": 0}
    t0 = time.perf_counter()
    best_path = run_dir / rd.BEST_CHECKPOINT
    start = _stage2_start(model, config, val_ds, best_path, steps, log, progress)
    plateau = StagePlateau(start["val_loss"], start["val_accuracy"], cfg.patience,
                           cfg.reduce_lr_patience, cfg.reduce_lr_factor, cfg.learning_rate)
    plateau.replay(_phase_rows(run_dir / rd.HISTORY, "stage2."))  # a resumed run's earlier epochs
    per_step = [cfg.epochs // steps + (1 if i < cfg.epochs % steps else 0) for i in range(steps)]
    done = cached_steps = 0
    unfrozen: list[str] = []
    for step, n_epochs in enumerate(per_step, start=1):
        if n_epochs == 0:
            continue
        phase = f"stage2.{step}"
        record = progress.done(phase) if progress is not None else None
        if record is not None:  # finished before the run was interrupted
            done += record["epochs"]
            unfrozen = record["unfrozen_blocks"]
            if record["stopped"]:
                break
            continue
        # The best before this step (a resumed step's own earlier epochs not counted).
        best_before = min([start["val_loss"]] + [float(r["val_loss"]) for r in _phase_rows(
            run_dir / rd.HISTORY, "stage2.") if r["phase"] != phase])
        _quietly_load(model, best_path)  # the step starts from the best weights so far
        unfrozen = unfreeze_top_blocks(model, spec, step)
        recorder = HistoryRecorder(run_dir / rd.HISTORY, phase, epoch_offset + done)
        plateau.epoch_offset = epoch_offset + done
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        log(f"stage 2 step {step}: unfrozen {', '.join(unfrozen)} ({trainable:,} trainable weights)"
            + (f"; resuming after epoch {recorder.epochs_done}" if recorder.epochs_done else ""))
        if not plateau.stopped:  # else this step's epochs before a resume had stopped the stage
            trainee, train_data, val_data = _step_data(model, config, spec, step, train_ds, val_ds,
                                                       train_in_order, labels, epoch, log)
            # Recompile after changing trainability, so the optimizer sees the new variables.
            _compile(trainee, plateau.learning_rate, config)
            callbacks = _stage2_callbacks(config, model, run_dir, recorder, plateau, best_path, phase,
                                          epoch_offset + done, log, progress, epoch)
            trainee.fit(train_data, validation_data=val_data, epochs=n_epochs, class_weight=weights,
                        verbose=_verbose(), shuffle=False, callbacks=callbacks)
            cached_steps += int(trainee is not model)  # the top on cached activations
        done += recorder.epochs_done
        stopped = plateau.stopped or recorder.best_val_loss >= best_before
        if progress is not None:
            progress.complete(phase, model, {"epochs": recorder.epochs_done,
                                             "best_val_loss": recorder.best_val_loss,
                                             "unfrozen_blocks": unfrozen, "stopped": stopped})
        if stopped:
            _log_stop(step, plateau, cfg.patience, best_before, log)
            break
    _quietly_load(model, best_path)
    seconds = time.perf_counter() - t0
    restored = plateau.summary()
    where = f"epoch {restored['restored_epoch']}" if restored["restored_epoch"] else "its start"
    log(f"stage 2 (unfreezing): {done} epochs in {seconds:.1f}s; restored the weights of {where}: "
        f"val_loss {restored['best_val_loss']:.4f}, val_accuracy {restored['val_accuracy']:.4f}")
    return {"epochs": done, "seconds": round(seconds, 1), **restored,
            "unfrozen_blocks": unfrozen, "cached_steps": cached_steps,
            "jit_compile": bool(model.jit_compile)}


def _step_data(model: keras.Model, config: Config, spec, n_blocks: int, train_ds, val_ds, train_in_order,
               labels: tuple[np.ndarray, np.ndarray] | None, epoch: tf.Variable | None, log: Log):
    """What a step fits and on what: the top on cached activations where the step may cache
    them (:func:`step_uses_cache`), else the whole model on ``train_ds``."""
    if train_in_order is None or labels is None or not step_uses_cache(
            model, config, spec, n_blocks, len(labels[0]), len(labels[1]), log):
        return model, train_ds, val_ds
    step = cached_step(model, config, spec, n_blocks, train_in_order, val_ds, labels, epoch, log)
    return step.top, step.train, step.val


def _stage2_start(model: keras.Model, config: Config, val_ds, best_path: Path, steps: int, log: Log,
                  progress: Progress | None) -> dict[str, float]:
    """Stage 2's starting val_loss and val_accuracy, as recorded; else evaluated (and saved) now."""
    start = progress.value("stage2_start") if progress is not None else None
    if start is None or not best_path.exists():
        _compile(model, config.train.stage2.learning_rate, config)
        figures = model.evaluate(val_ds, verbose=0, return_dict=True)
        start = {"val_loss": float(figures["loss"]), "val_accuracy": float(figures["accuracy"])}
        fsio.atomic_save(best_path, model.save_weights)
        if progress is not None:
            progress.set_value("stage2_start", start)
        log(f"stage 2: start from val_loss {start['val_loss']:.4f}; unfreezing up to {steps} block(s)")
    return start


def _stage2_callbacks(config: Config, model: keras.Model, run_dir: Path, recorder: HistoryRecorder,
                      plateau: StagePlateau, best_path: Path, phase: str, epoch_offset: int, log: Log,
                      progress: Progress | None, epoch: tf.Variable | None) -> list[keras.callbacks.Callback]:
    """One stage-2 step's callbacks, in the order they must run at each epoch's end."""
    callbacks = [
        EpochNumber(epoch, epoch_offset),
        recorder,
        AtomicModelCheckpoint(  # the whole classifier's weights, whichever model is fitted
            str(best_path), monitor="val_loss", save_best_only=True, save_weights_only=True,
            initial_value_threshold=plateau.best, verbose=0, saves=model),
        # before the plateau: the learning rate logged is the one the epoch trained with
        *tensorboard_callbacks(config, model, run_dir, "stage2", epoch_offset, log),
        plateau,
    ]
    if progress is not None:
        callbacks.append(progress.backup(phase))
    return callbacks


def _log_stop(step: int, plateau: StagePlateau, patience: int, best_before: float, log: Log) -> None:
    """Say why stage 2 stops after ``step``."""
    why = (f"{patience} epoch(s) in a row without a lower val_loss" if plateau.stopped
           else f"no improvement on val_loss {best_before:.4f}")
    log(f"stage 2 step {step}: {why}; stopping stage 2")


def _phase_rows(history: Path, prefix: str) -> list[dict[str, str]]:
    """The rows of ``history.csv`` whose phase starts with ``prefix``, in order."""
    if not history.is_file():
        return []
    with open(history, newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["phase"].startswith(prefix)]


def train_model(model: keras.Model, config: Config, ds: Datasets, work_dir: Path,
                log: Log = print, progress: Progress | None = None) -> dict[str, Any]:
    """Run both stages on ``model``; leave it holding the best weights; return a summary.

    This is the one training code path, used by ``fit`` and by every tuning trial. It writes
    ``history.csv`` and the best checkpoint into ``work_dir``. With ``progress`` (``fit``), the
    work is backed up as it goes and a rerun continues from where an interrupted one stopped.
    """
    # Under a tf.distribute strategy, every model, compile and fit of both stages happens in
    # the scope of the strategy ``model`` was built under (the default strategy otherwise).
    with model_scope(model):
        if progress is not None:
            phase = progress.restore(model)
            if phase is not None:
                log(f"resuming: {phase} had finished; continuing from its weights")
        s1 = train_stage1(model, config, ds.train, ds.val, ds.train_in_order, ds.labels,
                          ds.class_weights, work_dir, log, features=ds.features, progress=progress,
                          epoch=ds.epoch)
        s2 = train_stage2(model, config, ds.train, ds.val, ds.class_weights, work_dir,
                          s1.get("epochs", 0), log, progress=progress, epoch=ds.epoch,
                          train_in_order=ds.train_in_order, labels=ds.labels)
    augmented = stages_augmented(config, s1, s2)
    if config.augment.enabled and not any(augmented.values()):
        log("note: no augmentation ran: stage 1 trained on cached features and stage 2 trained "
            "no epoch (augment.in_stage1 with train.stage1.cache_features: auto augments stage 1)")
    return {"stage1": s1, "stage2": s2, "augmented": augmented}


def stages_augmented(config: Config, stage1: dict[str, Any], stage2: dict[str, Any]) -> dict[str, bool]:
    """Which stages trained on augmented images (what ran, whatever ``augment.enabled`` says)."""
    on = config.augment.enabled
    return {"stage1": bool(on and config.augment.in_stage1 and stage1.get("epochs", 0)
                           and not stage1.get("cached_features", False)),
            "stage2": bool(on and stage2.get("epochs", 0))}


# ---------------------------------------------------------------------------------------------
# Precision and distribution (train.precision, train.distribute)

