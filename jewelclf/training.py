"""``jewelclf fit``: data check, split, and the two-stage transfer-learning schedule.

Stage 1 trains the head with the backbone frozen. Without stage-1 augmentation the frozen
backbone's pooled features are computed once and the head trains on them, which turns each
stage-1 epoch from a pass through the backbone into a fraction of a second.

Stage 2 unfreezes the backbone's top blocks one more per step, recompiling after each unfreeze
with a low learning rate. BatchNorm stays frozen (the backbone is called with
``training=False`` and its BatchNorm layers are never made trainable). Early stopping and
learning-rate reduction watch the validation loss, and the best weights seen in the whole run
are restored at the end.
"""

from __future__ import annotations

import csv
import math
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from jewelclf import rundir as rd
from jewelclf.backbones import get_backbone
from jewelclf.config import Config
from jewelclf.data.check import check_records, write_rejected
from jewelclf.data.pipeline import batched, choose_cache, decoded_dataset, tfds_bytes
from jewelclf.data.sources import DataSource, Record, load_source
from jewelclf.data.splits import assign_splits, write_manifest
from jewelclf.errors import JewelclfError
from jewelclf.evaluation import compute_metrics, format_report, prediction_rows, write_evaluation
from jewelclf.model import (HEAD, build_classifier, feature_extractor, image_size,
                            unfreeze_top_blocks, without_augmentation)

Log = Callable[[str], None]


@dataclass
class PreparedData:
    source: DataSource
    class_names: list[str]
    train: list[Record]
    val: list[Record]
    test: list[Record]
    rejected: int


def prepare_data(data_spec: str, config: Config, run_dir: Path, log: Log = print) -> PreparedData:
    """Find, split and check the data; write the split manifest and ``rejected_files.csv``."""
    source = load_source(data_spec)
    for note in source.notes:
        log(f"note: {note}")
    records = assign_splits(source.records, config.train.seed, config.data.val_fraction,
                            config.data.test_fraction)
    t0 = time.perf_counter()
    checks = check_records(records, config.data.max_pixels, config.data.min_image_side,
                           config.data.check_workers,
                           read_bytes=tfds_bytes(source) if source.tfds else None)
    n_rejected = write_rejected(checks, run_dir / rd.REJECTED)
    kept = [c.record for c in checks if c.ok]
    log(f"checked {len(checks)} files in {time.perf_counter() - t0:.1f}s: {len(kept)} usable"
        + (f", {n_rejected} left out (see {run_dir / rd.REJECTED})" if n_rejected else ""))
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
    prepared = PreparedData(
        source, list(source.class_names),
        [r for r in kept if r.split == "train"],
        [r for r in kept if r.split == "val"],
        [r for r in kept if r.split == "test"],
        n_rejected,
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
    """Append one row per epoch to ``history.csv`` as it ends, tagged with the phase."""

    FIELDS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy",
              "learning_rate", "seconds"]

    def __init__(self, path: Path, phase: str, epoch_offset: int):
        super().__init__()
        self.path, self.phase, self.epoch_offset = Path(path), phase, epoch_offset
        self.epochs_done = 0
        self._t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.epochs_done += 1
        new = not self.path.exists()
        lr = self.model.optimizer.learning_rate
        row = {
            "epoch": self.epoch_offset + self.epochs_done,
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


def _loss(config: Config):
    return keras.losses.CategoricalCrossentropy(label_smoothing=config.train.label_smoothing)


def _metrics():
    return ["accuracy"]


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def _features(extractor: keras.Model, ds: tf.data.Dataset) -> np.ndarray:
    """Pooled features of every image of a batched, ordered dataset (with a progress bar)."""
    return extractor.predict(ds.map(lambda x, y: x), verbose=_verbose())


def frozen_features(model: keras.Model, train_in_order: tf.data.Dataset,
                    val_ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The frozen backbone's pooled features of the ordered training images and of val."""
    extractor = feature_extractor(model)
    return _features(extractor, train_in_order), _features(extractor, val_ds)


def one_hot(records: list[Record], class_names: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(class_names)}
    return np.eye(len(class_names), dtype="float32")[[index[r.label] for r in records]]


def _best_val_loss(history: keras.callbacks.History) -> float:
    values = history.history.get("val_loss", [])
    return float(min(values)) if values else math.inf


def stage1_uses_cached_features(config: Config) -> bool:
    """Whether stage 1 trains the head on the frozen backbone's features (no stage-1 augmentation)."""
    cfg = config.train.stage1
    return cfg.cache_features == "on" or (
        cfg.cache_features == "auto" and not (config.augment.enabled and config.augment.in_stage1))


def train_stage1(model: keras.Model, config: Config, train_ds, val_ds, train_in_order,
                 labels: tuple[np.ndarray, np.ndarray], weights: dict | None, run_dir: Path,
                 log: Log, features: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Train the head with the backbone frozen, on cached features when augmentation is off.

    ``features`` are the frozen backbone's features of ``train_in_order`` and ``val_ds`` when
    they were computed before (see :attr:`Datasets.features`); otherwise they are computed here.
    """
    cfg = config.train.stage1
    if cfg.epochs == 0:
        return {"epochs": 0}
    use_cache = stage1_uses_cached_features(config)
    t0 = time.perf_counter()
    recorder = HistoryRecorder(run_dir / rd.HISTORY, "stage1", 0)
    early = keras.callbacks.EarlyStopping("val_loss", patience=cfg.patience, restore_best_weights=True)
    callbacks = [recorder, early]
    if use_cache:
        if features is None:
            log("stage 1: computing the frozen backbone's features once")
            features = frozen_features(model, train_in_order, val_ds)
        x_train, x_val = features
        y_train, y_val = labels
        t_features = time.perf_counter() - t0
        head = model.get_layer(HEAD)
        head.compile(keras.optimizers.Adam(cfg.learning_rate), loss=_loss(config), metrics=_metrics())
        feats = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(
            len(x_train), seed=config.train.seed, reshuffle_each_iteration=True
        ).batch(config.data.batch_size)
        hist = head.fit(feats, validation_data=(x_val, y_val), epochs=cfg.epochs,
                        class_weight=weights, callbacks=callbacks, verbose=_verbose(), shuffle=False)
    else:
        t_features = 0.0
        trainee = model if (config.augment.enabled and config.augment.in_stage1) else without_augmentation(model)
        trainee.compile(keras.optimizers.Adam(cfg.learning_rate), loss=_loss(config), metrics=_metrics())
        hist = trainee.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, class_weight=weights,
                           callbacks=callbacks, verbose=_verbose(), shuffle=False)
    seconds = time.perf_counter() - t0
    summary = {"epochs": recorder.epochs_done, "seconds": round(seconds, 1),
               "feature_seconds": round(t_features, 1), "cached_features": use_cache,
               "best_val_loss": _best_val_loss(hist),
               "best_val_accuracy": float(max(hist.history.get("val_accuracy", [0])))}
    log(f"stage 1 (head{', cached features' if use_cache else ''}): {summary['epochs']} epochs in "
        f"{seconds:.1f}s, best val_loss {summary['best_val_loss']:.4f}, "
        f"val_accuracy {summary['best_val_accuracy']:.4f}")
    return summary


def train_stage2(model: keras.Model, config: Config, train_ds, val_ds, weights: dict | None,
                 run_dir: Path, epoch_offset: int, log: Log) -> dict[str, Any]:
    """Progressive unfreezing of the backbone's top blocks, one more per step."""
    cfg = config.train.stage2
    spec = get_backbone(config.model.backbone)
    steps = min(cfg.unfreeze_blocks, len(spec.blocks(model.get_layer("backbone"))))
    if cfg.epochs == 0 or steps == 0:
        return {"epochs": 0}
    t0 = time.perf_counter()
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=_loss(config), metrics=_metrics())
    best = float(model.evaluate(val_ds, verbose=0, return_dict=True)["loss"])
    best_path = run_dir / rd.BEST_CHECKPOINT
    rd.atomic_save(best_path, model.save_weights)
    log(f"stage 2: start from val_loss {best:.4f}; unfreezing up to {steps} block(s)")
    per_step = [cfg.epochs // steps + (1 if i < cfg.epochs % steps else 0) for i in range(steps)]
    done = 0
    unfrozen: list[str] = []
    for step, n_epochs in enumerate(per_step, start=1):
        if n_epochs == 0:
            continue
        unfrozen = unfreeze_top_blocks(model, spec, step)
        # Recompile after changing trainability, so the optimizer sees the new variables.
        model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=_loss(config),
                      metrics=_metrics())
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        log(f"stage 2 step {step}: unfrozen {', '.join(unfrozen)} ({trainable:,} trainable weights)")
        checkpoint = keras.callbacks.ModelCheckpoint(
            str(best_path), monitor="val_loss", save_best_only=True, save_weights_only=True,
            initial_value_threshold=best, verbose=0)
        recorder = HistoryRecorder(run_dir / rd.HISTORY, f"stage2.{step}", epoch_offset + done)
        hist = model.fit(
            train_ds, validation_data=val_ds, epochs=n_epochs, class_weight=weights, verbose=_verbose(),
            shuffle=False,
            callbacks=[recorder, checkpoint,
                       keras.callbacks.EarlyStopping("val_loss", patience=cfg.patience),
                       keras.callbacks.ReduceLROnPlateau("val_loss", factor=cfg.reduce_lr_factor,
                                                         patience=cfg.reduce_lr_patience, verbose=0)])
        done += recorder.epochs_done
        step_best = _best_val_loss(hist)
        if step_best >= best:
            log(f"stage 2 step {step}: no improvement on val_loss {best:.4f}; stopping stage 2")
            break
        best = step_best
    with warnings.catch_warnings():
        # The checkpoint also holds the optimizer of the step that saved it; only weights matter.
        warnings.simplefilter("ignore")
        model.load_weights(best_path)
    seconds = time.perf_counter() - t0
    log(f"stage 2 (unfreezing): {done} epochs in {seconds:.1f}s, best val_loss {best:.4f} restored")
    return {"epochs": done, "seconds": round(seconds, 1), "best_val_loss": best,
            "unfrozen_blocks": unfrozen}


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


def make_datasets(data: PreparedData, config: Config, cache_dir: Path, log: Log = print) -> Datasets:
    """Build the train/val pipelines of ``data`` for ``config`` (decoded images cached once)."""
    names = data.class_names
    size = image_size(config)
    cache = choose_cache(config.data, len(data.train) + len(data.val), size)
    train_plain = decoded_dataset(data.source, data.train, config.data, size, cache, cache_dir, "train")
    val_plain = decoded_dataset(data.source, data.val, config.data, size, cache, cache_dir, "val")
    return Datasets(
        train=batched(train_plain, len(names), config.data.batch_size, shuffle=True,
                      seed=config.train.seed, shuffle_buffer=config.data.shuffle_buffer),
        train_in_order=batched(train_plain, len(names), config.data.batch_size),
        val=batched(val_plain, len(names), config.data.batch_size),
        labels=(one_hot(data.train, names), one_hot(data.val, names)),
        class_weights=class_weights(data.train, names, config.train.class_weight, log),
        cache=cache,
    )


def train_model(model: keras.Model, config: Config, ds: Datasets, work_dir: Path,
                log: Log = print) -> dict[str, Any]:
    """Run both stages on ``model``; leave it holding the best weights; return a summary.

    This is the one training code path, used by ``fit`` and by every tuning trial. It writes
    ``history.csv`` and the best checkpoint into ``work_dir``.
    """
    s1 = train_stage1(model, config, ds.train, ds.val, ds.train_in_order, ds.labels,
                      ds.class_weights, work_dir, log, features=ds.features)
    s2 = train_stage2(model, config, ds.train, ds.val, ds.class_weights, work_dir,
                      s1.get("epochs", 0), log)
    return {"stage1": s1, "stage2": s2}


def fit(data_spec: str, run_dir: str | Path, config: Config, overwrite: bool = False,
        log: Log = print) -> dict[str, Any]:
    """Train a classifier on ``data_spec`` into ``run_dir``; return the run summary.

    Writes the resolved config, class names, split manifest, rejected files, history and
    curves, the best checkpoint, ``model.keras`` and, when the data has a test split,
    ``metrics.json`` with its confusion matrix. Only one process at a time may use a run dir.
    """
    get_backbone(config.model.backbone)  # fail fast on a bad name, before touching run_dir
    with rd.run_lock(Path(run_dir)):
        return _fit_locked(data_spec, Path(run_dir), config, overwrite, log)


def _fit_locked(data_spec: str, run_dir: Path, config: Config, overwrite: bool,
                log: Log) -> dict[str, Any]:
    run_dir = rd.prepare_run_dir(Path(run_dir), overwrite=overwrite, log=log)
    started = time.time()
    info = {"status": "running", "data": data_spec, "seed": config.train.seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": rd.environment()}
    rd.atomic_write_json(run_dir / rd.RUN_INFO, info)
    rd.atomic_write_text(run_dir / rd.CONFIG, config.to_yaml())
    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()

    try:
        data = prepare_data(data_spec, config, run_dir, log)
    except JewelclfError:
        # Nothing was trained: mark the run failed so the same --run-dir can be used again.
        rd.atomic_write_json(run_dir / rd.RUN_INFO, {**info, "status": "failed"})
        raise
    names = data.class_names
    rd.atomic_write_json(run_dir / rd.CLASS_NAMES, names)
    counts = Counter((r.split, r.label) for r in data.train + data.val + data.test)
    log("images per class (train/val/test): " + ", ".join(
        f"{c} {counts[('train', c)]}/{counts[('val', c)]}/{counts[('test', c)]}" for c in names))

    model = build_classifier(config, len(names))
    datasets = make_datasets(data, config, run_dir / "cache", log)
    stages = train_model(model, config, datasets, run_dir, log)
    # Leave the backbone frozen in the saved model, so a reload trains the head by default.
    model.get_layer("backbone").trainable = False
    rd.atomic_save(run_dir / rd.MODEL, model.save)
    if (run_dir / rd.HISTORY).exists():
        from jewelclf import plots

        plots.training_curves(run_dir / rd.HISTORY, run_dir / rd.CURVES)

    summary: dict[str, Any] = {**stages, "rejected_files": data.rejected,
                               "num_train": len(data.train), "num_val": len(data.val),
                               "num_test": len(data.test)}
    if data.test:
        from jewelclf.evaluation import predict_records

        y_true, probs = predict_records(model, data.source, data.test, names, config)
        metrics = compute_metrics(y_true, probs, names, config.train.top_k)
        metrics["data"] = f"{data_spec} (test split)"
        write_evaluation(metrics, run_dir, prediction_rows(data.test, y_true, probs, names),
                         title=f"{run_dir.name}: test split")
        log(format_report(metrics))
        summary["test"] = {k: metrics[k] for k in ("accuracy", "top_k_accuracy", "macro_f1")}
    if datasets.cache == "disk":
        import shutil

        shutil.rmtree(run_dir / "cache", ignore_errors=True)
    info.update({"status": "finished", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "wall_seconds": round(time.time() - started, 1), "summary": summary})
    rd.atomic_write_json(run_dir / rd.RUN_INFO, info)
    log(f"run finished in {info['wall_seconds']:.0f}s: {run_dir}")
    return info
