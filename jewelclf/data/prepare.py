"""The data a fit trains on: the checked, split records and their tf.data pipelines.

:func:`prepare_data` finds, splits and checks the data of a run (leakage refused or reported);
:func:`make_datasets` builds the shuffled training, ordered training and validation pipelines
of it, with one-hot labels and class weights. ``fit`` and every tuning search use both.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from jewelclf import runs as rd
from jewelclf.config import Config
from jewelclf.data.leakage import carved_splits, check_split_leakage, leakage_hasher, write_leakage_report
from jewelclf.data.pipeline import (
    batched,
    choose_cache,
    decoded_dataset,
    global_batch_size,
    shard_by_data,
    shuffled_dataset,
    tfds_bytes,
)
from jewelclf.data.sources import DataSource, Record, load_source
from jewelclf.data.splits import assign_splits, write_manifest
from jewelclf.data.validate import check_records, write_rejected
from jewelclf.errors import JewelclfError

Log = Callable[[str], None]


@dataclass
class PreparedData:
    """A run's checked data: its source, class names, and usable records of each split."""

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


def one_hot(records: list[Record], class_names: list[str]) -> np.ndarray:
    """The one-hot label rows of ``records``, columns in ``class_names`` order (float32)."""
    index = {c: i for i, c in enumerate(class_names)}
    return np.eye(len(class_names), dtype="float32")[[index[r.label] for r in records]]



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
        train=shard_by_data(batched(shuffled_dataset(
            data.source, data.train, config.data, size, config.train.seed,
            cached=train_plain if cache == "memory" else None, epoch=epoch), len(names), batch), replicas),
        train_in_order=shard_by_data(batched(train_plain, len(names), batch), replicas),
        val=shard_by_data(batched(val_plain, len(names), batch), replicas),
        labels=(one_hot(data.train, names), one_hot(data.val, names)),
        class_weights=class_weights(data.train, names, config.train.class_weight, log),
        cache=cache, epoch=epoch,
    )

