"""One stage-2 step trained on activations cached at its frozen boundary.

A stage-2 step trains only the backbone's top block(s); the layers below stay frozen for the
whole step, so their output for a given augmented image never changes. Instead of running the
whole backbone on every batch of every epoch, the step computes ``train.stage2.views``
augmented views of the training images through the frozen bottom once
(:func:`jewelclf.training.boundary.boundary_activations`) and trains the classifier's top
(:func:`jewelclf.training.boundary.split_at_boundary`, which shares the classifier's layers and
so its weights) on them: epoch ``e`` trains on view ``e mod views``, in the epoch's seeded
order. The validation images go through the bottom once, unaugmented.

The views are drawn from the augmentation's seed generators as they stand when the step
starts, which a resumed run restores (:class:`jewelclf.training.checkpoints.Progress`), so an
interrupted step recomputes the same views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from jewelclf.config import Config
from jewelclf.data.pipeline import global_batch_size, permuted
from jewelclf.errors import JewelclfError
from jewelclf.modeling.augmentation import Augmentation
from jewelclf.modeling.backbones import BackboneSpec
from jewelclf.modeling.classifier import BACKBONE
from jewelclf.training.boundary import boundary_activations, boundary_tensor, split_at_boundary

Log = Callable[[str], None]

CACHE_DTYPE = "float16"


@dataclass
class CachedStep:
    """What a cached step trains: ``top`` (sharing the classifier's layers), on ``train`` (the
    cached views, permuted by the epoch) and ``val`` (the cached validation activations)."""

    top: keras.Model
    train: tf.data.Dataset
    val: tf.data.Dataset


def cache_bytes(model: keras.Model, spec: BackboneSpec, n_blocks: int, n_rows: int) -> int | None:
    """The memory ``n_rows`` cached activations (one image in one view each) take at the input
    of the top ``n_blocks`` blocks; ``None`` when every block is unfrozen (no frozen layer to
    skip); a one-line error where the input is not one tensor."""
    base = model.get_layer(BACKBONE)
    cut = boundary_tensor(base, spec, n_blocks)
    if any(cut is t for t in (base.inputs or [])):
        return None
    return int(np.prod(cut.shape[1:])) * np.dtype(CACHE_DTYPE).itemsize * n_rows


def step_uses_cache(model: keras.Model, config: Config, spec: BackboneSpec, n_blocks: int,
                    n_train: int, n_val: int, log: Log) -> bool:
    """Resolve ``train.stage2.cache_activations`` for the step that unfreezes ``n_blocks``.

    ``auto``: cached when some layers stay frozen below the step's blocks, the boundary is one
    tensor, the views fit
    ``data.cache_memory_limit_mb`` and one replica trains (no multi-device strategy); ``on``:
    the same conditions, refused in a one-line error when one fails; ``off``: never.
    """
    mode = config.train.stage2.cache_activations
    if mode == "off":
        return False
    replicas = model.distribute_strategy.num_replicas_in_sync
    if replicas > 1:  # each worker would cache its own shard of the images, out of label order
        if mode == "on":
            raise JewelclfError(f"train.stage2.cache_activations is on, but training runs on {replicas} "
                                f"replicas (train.distribute); set cache_activations to auto or off")
        return False
    views = config.train.stage2.views
    try:
        needed = cache_bytes(model, spec, n_blocks, n_train * views + n_val)
    except JewelclfError:
        if mode == "on":
            raise
        return False
    if needed is None:  # the whole backbone trains: a cache would only freeze the augmentation
        return False
    limit = config.data.cache_memory_limit_mb * 2**20
    if needed <= limit:
        return True
    why = (f"step {n_blocks}'s cached activations would take {needed / 2**20:,.0f} MiB, over "
           f"data.cache_memory_limit_mb ({config.data.cache_memory_limit_mb:,})")
    if mode == "on":
        raise JewelclfError(f"train.stage2.cache_activations is on, but {why}; raise the limit, lower "
                            f"train.stage2.views, or set cache_activations to auto")
    log(f"stage 2: {why}; training this step through the whole model")
    return False


def cached_step(model: keras.Model, config: Config, spec: BackboneSpec, n_blocks: int, train_in_order,
                val_ds, labels: tuple[np.ndarray, np.ndarray], epoch: tf.Variable | None,
                log: Log) -> CachedStep:
    """Cut ``model`` below its top ``n_blocks`` blocks and cache what the step trains on.

    ``train_in_order``: the training images in a fixed order, unaugmented, in the order of
    ``labels[0]``; ``val_ds``: the validation images, in the order of ``labels[1]``. Call
    :func:`jewelclf.modeling.classifier.unfreeze_top_blocks` with ``n_blocks`` first.
    """
    bottom, top = split_at_boundary(model, spec, n_blocks)
    augmentation = next((layer for layer in model.layers if isinstance(layer, Augmentation)), None)
    views = config.train.stage2.views if augmentation is not None else 1
    log(f"stage 2: caching {views} {'augmented ' if augmentation is not None else ''}view(s) of the "
        f"training images at the input of the top {n_blocks} block(s)")
    cached = np.stack([boundary_activations(bottom, train_in_order, CACHE_DTYPE, augmentation)
                       for _ in range(views)])
    val = boundary_activations(bottom, val_ds, CACHE_DTYPE)
    batch = global_batch_size(config, 1)
    return CachedStep(top, _views_dataset(cached, labels[0], batch, config.train.seed, epoch),
                      _arrays(val, labels[1]).batch(batch))


def _arrays(x: np.ndarray, y: np.ndarray) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).map(lambda a, b: (tf.cast(a, tf.float32), b))


def _views_dataset(views: np.ndarray, labels: np.ndarray, batch: int, seed: int,
                   epoch: tf.Variable | None) -> tf.data.Dataset:
    """Batches of view ``epoch mod len(views)``, in the epoch's permutation (:func:`permuted`)."""
    n_views, n = views.shape[:2]
    flat = tf.constant(views.reshape((n_views * n, *views.shape[2:])))
    y = tf.constant(labels)
    order = permuted(tf.data.Dataset.range(n), n, seed, epoch).batch(batch)

    def gather(index):
        view = (epoch.read_value() if epoch is not None else tf.constant(0, tf.int64)) % n_views
        return tf.cast(tf.gather(flat, index + view * n), tf.float32), tf.gather(y, index)

    return order.map(gather).prefetch(tf.data.AUTOTUNE)
