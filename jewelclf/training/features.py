"""Stage 1's frozen-backbone features: computed once, trained on, and kept for review.

Without stage-1 augmentation the frozen backbone's pooled features are computed once and the
head trains on them, which turns each stage-1 epoch from a pass through the backbone into a
fraction of a second. A finished run keeps them in :data:`STAGE1_FEATURES` for ``jewelclf review``.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from jewelclf import fsio
from jewelclf.config import Config
from jewelclf.data.prepare import PreparedData
from jewelclf.modeling.classifier import feature_extractor
from jewelclf.training.checkpoints import Progress
from jewelclf.training.runtime import model_scope


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
    with model_scope(model):
        extractor = feature_extractor(model)
        return (_features(extractor, train_in_order, "stage 1 features (train)", n_train),
                _features(extractor, val_ds, "stage 1 features (val)", n_val))


def stage1_uses_cached_features(config: Config) -> bool:
    """Whether stage 1 trains the head on the frozen backbone's features (no stage-1 augmentation)."""
    cfg = config.train.stage1
    return cfg.cache_features == "on" or (
        cfg.cache_features == "auto" and not (config.augment.enabled and config.augment.in_stage1))


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

