"""``jewelclf fit``: data check, split, and the two-stage transfer-learning schedule.

Stage 1 trains the head with the backbone frozen. Without stage-1 augmentation the frozen
backbone's pooled features are computed once and the head trains on them, which turns each
stage-1 epoch from a pass through the backbone into a fraction of a second.

Stage 2 unfreezes the backbone's top blocks one more per step, recompiling after each unfreeze
with a low learning rate, each step starting from the best weights so far. BatchNorm stays
frozen: its layers are never made trainable, and a non-trainable ``BatchNormalization`` runs in
inference mode in Keras. Early stopping and learning-rate reduction watch the validation loss
over the whole stage, and the best weights seen are restored at the end.

``train.precision`` sets Keras' dtype policy while the model is built and trained (the softmax
stays float32), ``train.jit_compile`` goes to every ``compile()``, and ``train.distribute`` builds
and compiles the model inside a ``tf.distribute`` strategy's scope, with ``data.batch_size`` per
replica (see :class:`Distribution`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from jewelclf import fsio
from jewelclf import runs as rd
from jewelclf.config import Config
from jewelclf.data.leakage import carved_splits, check_split_leakage, leakage_hasher, write_leakage_report
from jewelclf.data.pipeline import batched, choose_cache, decoded_dataset, permuted, shuffled_dataset, tfds_bytes
from jewelclf.data.sources import DataSource, Record, data_key, load_source
from jewelclf.data.splits import assign_splits, write_manifest
from jewelclf.data.validate import check_records, write_rejected
from jewelclf.errors import JewelclfError
from jewelclf.evaluation.evaluate import calibrate_run, format_report, prediction_rows, score, write_evaluation
from jewelclf.modeling.backbones import get_backbone
from jewelclf.modeling.classifier import (
    HEAD,
    build_classifier,
    check_weights,
    feature_extractor,
    unfreeze_top_blocks,
    without_augmentation,
)
from jewelclf.training.checkpoints import AtomicModelCheckpoint, Progress, changed_content, save_content, trim_history
from jewelclf.training.plateau import ResumedEarlyStopping, StagePlateau
from jewelclf.training.tensorboard import tensorboard_callbacks

Log = Callable[[str], None]


@dataclass
class PreparedData:
    source: DataSource
    class_names: list[str]
    train: list[Record]
    val: list[Record]
    test: list[Record]
    rejected: int
    hashes: dict[str, str] = field(default_factory=dict)
    """The SHA-256 of each usable file's contents, by record key (from the data check's read)."""


def prepare_data(data_spec: str, config: Config, run_dir: Path, log: Log = print) -> PreparedData:
    """Find, split and check the data; write the split manifest and ``rejected_files.csv``.

    Files that cannot be used are left out and listed; the same image in two splits is refused
    (byte-identical) or warned about (near-identical), see :mod:`jewelclf.data.leakage`.
    """
    source = load_source(data_spec)
    for note in source.notes:
        log(f"note: {note}")
    source.refuse_conflicts()  # one image under two labels: check's conflicting labels
    if source.repeat_warning():
        log(f"warning: {source.repeat_warning()}")
    records = assign_splits(source.records, config.train.seed, config.data.val_fraction,
                            config.data.test_fraction)
    t0 = time.perf_counter()
    # The leakage hashes come from the bytes the check reads: one read of each file.
    fingerprints, hash_bytes = leakage_hasher(config.data)
    checks = check_records(records, config.data.max_pixels, config.data.min_image_side,
                           config.data.check_workers,
                           read_bytes=tfds_bytes(source) if source.tfds else None,
                           on_bytes=hash_bytes)
    n_rejected = write_rejected(checks, run_dir / rd.REJECTED)
    kept = [c.record for c in checks if c.ok]
    log(f"checked {len(checks)} files in {time.perf_counter() - t0:.1f}s: {len(kept)} usable"
        + (f", {n_rejected} left out (see {run_dir / rd.REJECTED})" if n_rejected else ""))
    leakage = check_split_leakage(kept, config.data, log=log, carved=carved_splits(source.records),
                                  read_bytes=tfds_bytes(source) if source.tfds else None,
                                  fingerprints=fingerprints)
    kept = leakage.records
    write_leakage_report(leakage, run_dir / rd.LEAKAGE, allowed=config.data.allow_leakage)
    leakage.enforce(config.data.allow_leakage, log)
    train_counts = Counter(r.label for r in kept if r.split == "train")
    empty = [c for c in source.class_names if train_counts[c] == 0]
    if empty:
        raise JewelclfError(
            f"class(es) {', '.join(empty)} have no usable training images"
            + (f" after {n_rejected} files were left out (see {run_dir / rd.REJECTED})" if n_rejected else "")
            + "; add readable images or remove the class"
        )
    if len(source.class_names) < 2:
        raise JewelclfError(
            f"'{data_spec}' has only one class ({source.class_names[0]}); a classifier needs at "
            f"least two class subfolders"
        )
    write_manifest(kept, run_dir / rd.SPLITS)
    kept_keys = {r.key for r in kept}
    hashes = {r.key: fp.sha256 for r, fp in fingerprints.items() if r.key in kept_keys}
    prepared = PreparedData(
        source, list(source.class_names),
        [r for r in kept if r.split == "train"],
        [r for r in kept if r.split == "val"],
        [r for r in kept if r.split == "test"],
        n_rejected, hashes,
    )
    if not prepared.val:
        raise JewelclfError(
            "no validation images: the data has too few images per class to hold some out; add "
            "images, a val/ folder, or raise data.val_fraction"
        )
    return prepared


def class_weights(train: list[Record], class_names: list[str], mode: str,
                  log: Log = print) -> dict[int, float] | None:
    """Balanced weights ``n / (k * count)``; ``auto`` uses them when classes differ by > 1.5:1."""
    counts = Counter(r.label for r in train)
    values = [counts[c] for c in class_names]
    ratio = max(values) / max(1, min(values))
    if mode == "none" or (mode == "auto" and ratio <= 1.5):
        return None
    total, k = sum(values), len(values)
    weights = {i: total / (k * counts[c]) for i, c in enumerate(class_names)}
    log(f"class imbalance {ratio:.1f}:1, using balanced class weights")
    return weights


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


def _scope(model: keras.Model):
    """The scope of the tf.distribute strategy ``model`` was built under (the default one if none)."""
    return model.distribute_strategy.scope()


def global_batch_size(config: Config, replicas: int) -> int:
    """The batch the input pipelines make: ``data.batch_size`` is per replica, and a
    tf.distribute strategy splits each global batch among its ``replicas``."""
    return config.data.batch_size * replicas


def _shard_by_data(ds: tf.data.Dataset, replicas: int) -> tf.data.Dataset:
    """Shard by element across workers (the images are decoded in a map, not read from files)."""
    if replicas <= 1:
        return ds
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def _features(extractor: keras.Model, ds: tf.data.Dataset, desc: str,
              images: int | None = None) -> np.ndarray:
    """Pooled features of every image of a batched, ordered dataset.

    A progress bar (:mod:`jewelclf.bars`, on a terminal) counts ``images`` when given, else
    the dataset's batches. Always float32: under mixed precision the backbone's output is
    float16, and the head trains (and the features are kept) in float32.
    """
    from jewelclf import bars

    unit, total = "image", images
    if images is None:
        batches = int(ds.cardinality())
        unit, total = "batch", (batches if batches >= 0 else None)
    with bars.bar(total, desc, unit=unit) as progress:
        callback = bars.keras_callback(progress, "row" if unit == "image" else "batch")
        out = extractor.predict(ds.map(lambda x, y: x), verbose=0, callbacks=[callback])
    return np.asarray(out, dtype=np.float32)


def frozen_features(model: keras.Model, train_in_order: tf.data.Dataset, val_ds: tf.data.Dataset,
                    sizes: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The frozen backbone's pooled features of the ordered training images and of val
    (``sizes``: their image counts, for the progress bars)."""
    n_train, n_val = sizes if sizes is not None else (None, None)
    with _scope(model):
        extractor = feature_extractor(model)
        return (_features(extractor, train_in_order, "stage 1 features (train)", n_train),
                _features(extractor, val_ds, "stage 1 features (val)", n_val))


def one_hot(records: list[Record], class_names: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(class_names)}
    return np.eye(len(class_names), dtype="float32")[[index[r.label] for r in records]]


def stage1_uses_cached_features(config: Config) -> bool:
    """Whether stage 1 trains the head on the frozen backbone's features (no stage-1 augmentation)."""
    cfg = config.train.stage1
    return cfg.cache_features == "on" or (
        cfg.cache_features == "auto" and not (config.augment.enabled and config.augment.in_stage1))


STAGE1_BEST = "checkpoints/stage1_best.weights.h5"
STAGE1_FEATURES = "checkpoints/stage1_features.npz"
"""Stage 1's frozen-backbone features, kept by a finished run for ``jewelclf review``."""


def keep_stage1_features(progress: Progress, run_dir: Path, data: PreparedData) -> None:
    """Copy the stage-1 features out of ``resume/`` (removed when the run ends) into
    :data:`STAGE1_FEATURES`, with the keys of their images; nothing when stage 1 had none."""
    features = progress.load_features(len(data.train), len(data.val))
    if features is None:
        return
    fsio.atomic_save(run_dir / STAGE1_FEATURES, lambda tmp: np.savez(
        tmp, train=features[0], val=features[1], train_keys=np.array([r.key for r in data.train]),
        val_keys=np.array([r.key for r in data.val])))


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
    callbacks = [
        EpochNumber(epoch, 0),
        recorder,
        AtomicModelCheckpoint(str(best_path), monitor="val_loss", save_best_only=True,
                              save_weights_only=True, initial_value_threshold=_finite(best_so_far)),
        early,
        *tensorboard_callbacks(config, model, run_dir, "stage1", 0, log),
    ]
    if progress is not None:
        callbacks.append(progress.backup("stage1"))  # last: after the epoch's row is written
    if recorder.epochs_done:
        log(f"stage 1: resuming after epoch {recorder.epochs_done} (best val_loss so far "
            f"{best_so_far:.4f})")
    if use_cache:
        if features is None and progress is not None:
            features = progress.load_features(len(labels[0]), len(labels[1]))
        if features is None:
            log("stage 1: computing the frozen backbone's features once")
            features = frozen_features(model, train_in_order, val_ds,
                                       sizes=(len(labels[0]), len(labels[1])))
            if progress is not None:
                progress.save_features(features)
        x_train, x_val = features
        y_train, y_val = labels
        t_features = time.perf_counter() - t0
        trainee = model.get_layer(HEAD)
        _compile(trainee, cfg.learning_rate, config)
        replicas = model.distribute_strategy.num_replicas_in_sync
        batch = global_batch_size(config, replicas)
        feats = _shard_by_data(permuted(tf.data.Dataset.from_tensor_slices((x_train, y_train)),
                                        len(x_train), config.train.seed, epoch).batch(batch), replicas)
        val_feats = _shard_by_data(tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(batch),
                                   replicas)
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
                 progress: Progress | None = None, epoch: tf.Variable | None = None) -> dict[str, Any]:
    """Progressive unfreezing of the backbone's top blocks, one more per step.

    Each step starts from the best weights so far (by val_loss), recompiles (a new optimizer
    for the new trainable set) and trains its share of the epochs. Patience and the plateau's
    learning-rate cuts count over the whole stage (:class:`jewelclf.training.plateau.StagePlateau`):
    ``train.stage2.patience`` epochs in a row without a lower val_loss end stage 2, and so does
    a step that does not improve on the best. The best weights are restored at the end, and the
    summary gives the figures of that epoch. With ``progress``, finished steps are skipped and an
    interrupted step resumes from its last epoch, optimizer state included. ``epoch``: the
    variable ``train_ds`` is permuted by (:class:`EpochNumber`).
    """
    cfg = config.train.stage2
    spec = get_backbone(config.model.backbone)
    steps = min(cfg.unfreeze_blocks, len(spec.blocks(model.get_layer("backbone"))))
    if cfg.epochs == 0 or steps == 0:
        return {"epochs": 0}
    t0 = time.perf_counter()
    best_path = run_dir / rd.BEST_CHECKPOINT
    start = progress.value("stage2_start") if progress is not None else None
    if start is None or not best_path.exists():
        _compile(model, cfg.learning_rate, config)
        figures = model.evaluate(val_ds, verbose=0, return_dict=True)
        start = {"val_loss": float(figures["loss"]), "val_accuracy": float(figures["accuracy"])}
        fsio.atomic_save(best_path, model.save_weights)
        if progress is not None:
            progress.set_value("stage2_start", start)
        log(f"stage 2: start from val_loss {start['val_loss']:.4f}; unfreezing up to {steps} block(s)")
    plateau = StagePlateau(start["val_loss"], start["val_accuracy"], cfg.patience,
                           cfg.reduce_lr_patience, cfg.reduce_lr_factor, cfg.learning_rate)
    plateau.replay(_phase_rows(run_dir / rd.HISTORY, "stage2."))  # a resumed run's earlier epochs
    per_step = [cfg.epochs // steps + (1 if i < cfg.epochs % steps else 0) for i in range(steps)]
    done = 0
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
        # Recompile after changing trainability, so the optimizer sees the new variables.
        _compile(model, plateau.learning_rate, config)
        recorder = HistoryRecorder(run_dir / rd.HISTORY, phase, epoch_offset + done)
        plateau.epoch_offset = epoch_offset + done
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        log(f"stage 2 step {step}: unfrozen {', '.join(unfrozen)} ({trainable:,} trainable weights)"
            + (f"; resuming after epoch {recorder.epochs_done}" if recorder.epochs_done else ""))
        callbacks = [
            EpochNumber(epoch, epoch_offset + done),
            recorder,
            AtomicModelCheckpoint(
                str(best_path), monitor="val_loss", save_best_only=True, save_weights_only=True,
                initial_value_threshold=plateau.best, verbose=0),
            # before the plateau: the learning rate logged is the one the epoch trained with
            *tensorboard_callbacks(config, model, run_dir, "stage2", epoch_offset + done, log),
            plateau,
        ]
        if progress is not None:
            callbacks.append(progress.backup(phase))
        if not plateau.stopped:  # else this step's epochs before a resume had stopped the stage
            model.fit(train_ds, validation_data=val_ds, epochs=n_epochs, class_weight=weights,
                      verbose=_verbose(), shuffle=False, callbacks=callbacks)
        done += recorder.epochs_done
        stopped = plateau.stopped or recorder.best_val_loss >= best_before
        if progress is not None:
            progress.complete(phase, model, {"epochs": recorder.epochs_done,
                                             "best_val_loss": recorder.best_val_loss,
                                             "unfrozen_blocks": unfrozen, "stopped": stopped})
        if stopped:
            why = (f"{cfg.patience} epoch(s) in a row without a lower val_loss" if plateau.stopped
                   else f"no improvement on val_loss {best_before:.4f}")
            log(f"stage 2 step {step}: {why}; stopping stage 2")
            break
    _quietly_load(model, best_path)
    seconds = time.perf_counter() - t0
    restored = plateau.summary()
    where = f"epoch {restored['restored_epoch']}" if restored["restored_epoch"] else "its start"
    log(f"stage 2 (unfreezing): {done} epochs in {seconds:.1f}s; restored the weights of {where}: "
        f"val_loss {restored['best_val_loss']:.4f}, val_accuracy {restored['val_accuracy']:.4f}")
    return {"epochs": done, "seconds": round(seconds, 1), **restored,
            "unfrozen_blocks": unfrozen, "jit_compile": bool(model.jit_compile)}


def _phase_rows(history: Path, prefix: str) -> list[dict[str, str]]:
    """The rows of ``history.csv`` whose phase starts with ``prefix``, in order."""
    if not history.is_file():
        return []
    with open(history, newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["phase"].startswith(prefix)]


@dataclass
class Datasets:
    """The tf.data pipelines of one prepared data set, shared by both stages (and by trials)."""

    train: tf.data.Dataset
    """Shuffled, batched training images."""
    train_in_order: tf.data.Dataset
    """The same images in a fixed order (for computing stage-1 features once)."""
    val: tf.data.Dataset
    labels: tuple[np.ndarray, np.ndarray]
    """One-hot labels of ``train_in_order`` and ``val``."""
    class_weights: dict[int, float] | None
    cache: str
    features: tuple[np.ndarray, np.ndarray] | None = None
    """The pristine frozen backbone's pooled features of ``train_in_order`` and ``val``, when
    computed once beforehand and shared (tuning trials); ``None``: stage 1 computes its own."""
    epoch: tf.Variable | None = None
    """The number of the epoch being trained, which ``train`` (and stage 1's cached features)
    are permuted by; :class:`EpochNumber` sets it."""


def make_datasets(data: PreparedData, config: Config, cache_dir: Path, log: Log = print,
                  replicas: int = 1) -> Datasets:
    """Build the train/val pipelines of ``data`` for ``config`` (decoded images cached once).

    ``data.batch_size`` is per replica: with ``replicas`` > 1 (a tf.distribute strategy) the
    pipelines batch at the global batch, ``batch_size * replicas``, which the strategy splits.
    """
    names = data.class_names
    size = config.data.image_size
    batch = global_batch_size(config, replicas)
    cache = choose_cache(config.data, len(data.train) + len(data.val), size)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    train_plain = decoded_dataset(data.source, data.train, config.data, size, cache, cache_dir, "train")
    val_plain = decoded_dataset(data.source, data.val, config.data, size, cache, cache_dir, "val")
    return Datasets(
        train=_shard_by_data(batched(shuffled_dataset(
            data.source, data.train, config.data, size, config.train.seed,
            cached=train_plain if cache == "memory" else None, epoch=epoch), len(names), batch), replicas),
        train_in_order=_shard_by_data(batched(train_plain, len(names), batch), replicas),
        val=_shard_by_data(batched(val_plain, len(names), batch), replicas),
        labels=(one_hot(data.train, names), one_hot(data.val, names)),
        class_weights=class_weights(data.train, names, config.train.class_weight, log),
        cache=cache, epoch=epoch,
    )


def train_model(model: keras.Model, config: Config, ds: Datasets, work_dir: Path,
                log: Log = print, progress: Progress | None = None) -> dict[str, Any]:
    """Run both stages on ``model``; leave it holding the best weights; return a summary.

    This is the one training code path, used by ``fit`` and by every tuning trial. It writes
    ``history.csv`` and the best checkpoint into ``work_dir``. With ``progress`` (``fit``), the
    work is backed up as it goes and a rerun continues from where an interrupted one stopped.
    """
    # Under a tf.distribute strategy, every model, compile and fit of both stages happens in
    # the scope of the strategy ``model`` was built under (the default strategy otherwise).
    with _scope(model):
        if progress is not None:
            phase = progress.restore(model)
            if phase is not None:
                log(f"resuming: {phase} had finished; continuing from its weights")
        s1 = train_stage1(model, config, ds.train, ds.val, ds.train_in_order, ds.labels,
                          ds.class_weights, work_dir, log, features=ds.features, progress=progress,
                          epoch=ds.epoch)
        s2 = train_stage2(model, config, ds.train, ds.val, ds.class_weights, work_dir,
                          s1.get("epochs", 0), log, progress=progress, epoch=ds.epoch)
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


def resolve_precision(precision: str) -> str:
    """``auto``: mixed_float16 when TensorFlow sees a GPU, float32 on a CPU (where float16
    math is emulated and slower); any other value is returned as is."""
    if precision != "auto":
        return precision
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


def describe_precision(config: Config, resolved: str) -> str:
    """The log line of a run's or search's numerics: the resolved precision and jit_compile."""
    auto = " (auto)" if config.train.precision == "auto" else ""
    return f"precision {resolved}{auto}, jit_compile {config.train.jit_compile}"


@contextlib.contextmanager
def precision_policy(precision: str):
    """Set Keras' global dtype policy to ``precision`` (resolved) for the block; restore it after.

    Models built inside the block take the policy: under ``mixed_*`` layers compute in
    float16/bfloat16 with float32 weights, and the softmax stays float32
    (:func:`jewelclf.modeling.classifier.build_head`). ``compile`` wraps the optimizer in a
    ``LossScaleOptimizer`` under ``mixed_float16``.
    """
    resolved = resolve_precision(precision)
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(resolved)
    try:
        yield resolved
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


class _MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` takes what Keras 3's TF trainer passes.

    Keras 3.15's TensorFlow trainer calls ``strategy.reduce`` in two ways that TensorFlow's
    multi-worker strategy rejects, so a plain ``fit`` fails before its first step
    (keras-team/keras#20585, tensorflow/tensorflow#72388):

    - ``_maybe_symbolic_build`` reduces the first ``(x, y)`` batch, a tuple of ``PerReplica``
      values, only to learn its shapes: the collective all-reduce takes one value at a time
      ("Attempt to convert a value (PerReplica...) with an unsupported type to a Tensor"), and
      the shards of an uneven batch differ in size between workers ("Shape mismatch in the
      collective instance");
    - ``reduce_per_replica`` averages the replicas' metric values, scalars, over ``axis=0``
      ("Invalid reduction dimension 0 for input with 0 dimensions").

    Here a scalar is averaged over the replicas (``axis=None``), and a batch reduced with
    ``axis=None`` is this worker's own shard (the shapes are all Keras needs from it). Those
    are the only two calls Keras makes; everything else is TensorFlow's strategy, unchanged.
    """

    def reduce(self, reduce_op, value, axis=None):
        parent = super()

        def one(v):
            local = self.experimental_local_results(v)
            if all(getattr(c, "shape", None) is not None and c.shape.rank == 0 for c in local):
                return parent.reduce(reduce_op, v, None)
            if axis is None:
                return local[0]
            return parent.reduce(reduce_op, v, axis)

        return tf.nest.map_structure(one, value)


@dataclass
class Distribution:
    """The tf.distribute strategy of a run (``None`` for ``train.distribute: none``)."""

    mode: str = "none"
    strategy: tf.distribute.Strategy | None = None
    workers: int = 1
    task_index: int = 0
    chief: bool = True
    """Whether this process writes the run dir (the only process, or the chief worker)."""

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync if self.strategy is not None else 1

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "replicas": self.replicas, "workers": self.workers}


_TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}\' (index 1 on host2)')


def _tf_config() -> tuple[int, int, bool]:
    """(workers, this task's index among them, chief?) from ``TF_CONFIG``; one-line errors."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    fix = f"set it on every machine, e.g. {_TF_CONFIG_EXAMPLE}"
    if not raw:
        raise JewelclfError(f"--distribute multi_worker needs the TF_CONFIG environment variable "
                            f"naming the cluster and this worker; {fix}")
    try:
        conf = json.loads(raw)
    except ValueError as e:
        raise JewelclfError(f"TF_CONFIG is not valid JSON ({e}); {fix}") from None
    cluster = conf.get("cluster") if isinstance(conf, dict) else None
    task = conf.get("task") if isinstance(conf, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise JewelclfError(f"TF_CONFIG needs a 'cluster' and a 'task' mapping; {fix}")
    kinds = {k: v for k, v in cluster.items() if k in ("chief", "worker")}
    bad = [k for k, v in kinds.items()
           if not isinstance(v, list) or not v or not all(isinstance(a, str) and ":" in a for a in v)]
    if not kinds or bad:
        raise JewelclfError(f"TF_CONFIG's cluster must list 'worker' addresses as \"host:port\" "
                            f"strings (and at most one 'chief'); {fix}")
    if len(kinds.get("chief", [])) > 1:
        raise JewelclfError(f"TF_CONFIG's cluster lists {len(kinds['chief'])} chiefs; list one "
                            f"'chief' at most (or none: worker 0 is then the chief)")
    kind, index = task.get("type"), task.get("index")
    if kind not in kinds or not isinstance(index, int) or isinstance(index, bool) \
            or not 0 <= index < len(kinds[kind]):
        raise JewelclfError(f"TF_CONFIG's task {task!r} is not one of its cluster's "
                            f"{'/'.join(kinds)} entries; give each machine its own "
                            f"{{\"type\": \"worker\", \"index\": i}} with i from 0 to "
                            f"{len(kinds.get('worker', [])) - 1}")
    order = ["chief"] * len(kinds.get("chief", [])) + ["worker"] * len(kinds.get("worker", []))
    position = index + (len(kinds.get("chief", [])) if kind == "worker" else 0)
    chief = kind == "chief" or ("chief" not in kinds and index == 0)
    return len(order), position, chief


HEARTBEAT_TIMEOUT_SECONDS = 60


def _lenient_heartbeats(seconds: int = HEARTBEAT_TIMEOUT_SECONDS) -> None:
    """Let a worker miss TensorFlow's heartbeats for ``seconds`` before the cluster gives up.

    The strategy sets up TensorFlow's coordination service with a 10 s heartbeat timeout,
    after which the whole run fails ("tasks are unhealthy (stopped sending heartbeats)"); a
    worker on a busy machine (other jobs, a data check using every core) can be starved that
    long. A worker that exits is still noticed at once (its connection closes). Set up here,
    before the strategy, in its place; on a TensorFlow without these internals, TF's default
    stays.
    """
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.distribute import multi_worker_util
        from tensorflow.python.eager import context

        if context.context().coordination_service is not None:
            return
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        spec = multi_worker_util.normalize_cluster_spec(resolver.cluster_spec())
        jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
                for job in ("chief", "worker") if job in spec.jobs]
        context.context().configure_coordination_service(
            service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
            coordinated_jobs=jobs, heartbeat_timeout_in_ms=seconds * 1000)
    except Exception:  # noqa: BLE001 - best effort: TensorFlow's own defaults otherwise
        return


def make_distribution(mode: str, log: Log = print) -> Distribution:
    """The strategy of ``train.distribute``; create it before TensorFlow runs anything else.

    ``mirrored``: ``tf.distribute.MirroredStrategy`` over all local GPUs (one replica on the
    CPU when there is none). ``multi_worker``: ``MultiWorkerMirroredStrategy`` over the machines
    of ``TF_CONFIG``; the chief (``task`` ``chief``, or worker 0 when the cluster has no chief)
    writes the run dir, the other workers write only to a temporary folder.
    """
    if mode == "none":
        return Distribution()
    if mode == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        devices = list(strategy.extended.worker_devices)
        note = "" if tf.config.list_physical_devices("GPU") else " (no GPU visible: one replica on the CPU)"
        log(f"distribute mirrored: {strategy.num_replicas_in_sync} replica(s) on "
            f"{', '.join(devices)}{note}")
        return Distribution("mirrored", strategy)
    workers, index, chief = _tf_config()
    _lenient_heartbeats()
    try:
        strategy = _MultiWorkerStrategy()
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise JewelclfError(f"could not start the multi-worker strategy ({first}); it must be "
                            f"created before TensorFlow runs anything else in the process: run "
                            f"jewelclf fit in a fresh process on every worker") from None
    log(f"distribute multi_worker: worker {index} of {workers}"
        f"{' (chief: writes the run dir)' if chief else ''}, "
        f"{strategy.num_replicas_in_sync} replica(s) in all")
    return Distribution("multi_worker", strategy, workers, index, chief)


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
        with _sigterm_as_interrupt():
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
    with rd.run_lock(run_dir), _sigterm_as_interrupt():
        try:
            return work()
        except JewelclfError:
            raise
        except Exception as e:
            # A full disk met outside jewelclf.runs's writes (an appended history row, a
            # TensorFlow cache file): one line, and the run stays resumable.
            if not fsio.is_disk_full(e):
                raise
            raise fsio.DiskFullError(fsio.disk_full_message(e, run_dir)) from None
        except KeyboardInterrupt:
            info = rd.read_run_info(run_dir)
            if info is None or info.get("status") != "running":
                raise
            fsio.atomic_write_json(run_dir / rd.RUN_INFO, {**info, "status": "interrupted"})
            if not resumable:
                raise RunInterrupted(
                    f"interrupted; a multi-worker run cannot be resumed: start it again on every "
                    f"worker with --overwrite (run dir {run_dir})") from None
            raise RunInterrupted(
                f"interrupted; the epochs finished so far are saved. Resume with: "
                f"jewelclf fit --resume --run-dir {run_dir}") from None


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Treat SIGTERM (a scheduler's or ``kill``'s stop) like Ctrl-C, so it saves the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    if resume:
        info = rd.read_run_info(run_dir) or {}
        info.update({"status": "running",
                     "resumed": [*info.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S%z")]})
        # A killed run may leave a half-written tf.data cache (and its lock file) behind.
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
        split_before = (run_dir / rd.SPLITS).read_bytes() if (run_dir / rd.SPLITS).is_file() else None
    else:
        run_dir = rd.prepare_run_dir(Path(run_dir), overwrite=overwrite, log=log)
        info = {"status": "running", "data": data_spec,
                "data_path": data_key(data_spec), "seed": config.train.seed,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": rd.environment()}
        fsio.atomic_write_text(run_dir / rd.CONFIG, config.to_yaml())
    # The resolved choices of this attempt (``auto`` may differ between machines).
    info.update({"precision": precision, "jit_compile": config.train.jit_compile,
                 "distribute": dist.describe()})
    fsio.atomic_write_json(run_dir / rd.RUN_INFO, info)
    log(describe_precision(config, precision))
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
        # On the restored best weights, before model.keras: a saved model has its calibration.
        calibration = calibrate_run(model, data, config, run_dir, log)
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
        if data.test:
            from jewelclf.evaluation.evaluate import predict_records

            # Every worker predicts (the prediction's collectives need all of them).
            y_true, probs = predict_records(model, data.source, data.test, names, config)
            metrics, probs = score(y_true, probs, names, config.train.top_k, calibration)
            metrics["data"] = f"{data_spec} (test split)"
            from jewelclf.evaluation.plots import confusion_title

            write_evaluation(metrics, run_dir, prediction_rows(data.test, y_true, probs, names),
                             title=confusion_title(run_dir.name, "test", len(data.test)))
            if dist.chief:
                log(format_report(metrics))
            summary["test"] = {k: metrics[k] for k in ("accuracy", "top_k_accuracy", "macro_f1")}
    if datasets.cache == "disk":
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
    info.update({"status": "finished", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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
