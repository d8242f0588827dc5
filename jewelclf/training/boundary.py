"""Stage 2 on cached activations: the classifier cut at its frozen boundary.

In a stage-2 step only the backbone's top block(s) train; every layer below them is frozen, so
its output for a given (augmented) image never changes during the step. :func:`split_at_boundary`
cuts the classifier there into ``bottom`` (pixels -> activations at the input of the lowest
unfrozen block) and ``top`` (those activations -> probabilities), two Keras models sharing their
layers, and so their weights, with the classifier; :func:`boundary_activations` computes the
bottom's output for a dataset once, so that the top can train on it for many epochs.

The cut must be a single tensor: the only value that crosses from the frozen layers into the
unfrozen ones. That holds for a plain stack (VGG, MobileNet v1) and at the block boundaries of
residual networks; a graph where a frozen tensor skips into the top besides the boundary (a
shortcut around the cut) is refused with a one-line error, so the caller keeps today's stage 2.
"""

from __future__ import annotations

from typing import Iterable

import keras
import numpy as np

from jewelclf.errors import JewelclfError
from jewelclf.modeling.backbones import BackboneSpec
from jewelclf.modeling.classifier import BACKBONE, HEAD, POOL, PREPROCESSING


def _as_list(tensors) -> list:
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


def _top_layers(base: keras.Model, spec: BackboneSpec, n_blocks: int) -> list[keras.layers.Layer]:
    """The layers of ``base`` that :func:`unfreeze_top_blocks` puts in its top ``n_blocks``."""
    blocks = spec.blocks(base)
    if not 1 <= n_blocks <= len(blocks):
        raise JewelclfError(
            f"cannot cut {spec.name} above {n_blocks} unfrozen block(s): it has {len(blocks)} "
            f"block(s); pass a number from 1 to {len(blocks)}"
        )
    chosen = set(blocks[len(blocks) - n_blocks:])
    layer_blocks = spec.layer_blocks(base)
    return [layer for layer in base.layers if layer_blocks[layer.name] in chosen]


def boundary_tensor(base: keras.Model, spec: BackboneSpec, n_blocks: int):
    """The one tensor of ``base``'s graph that feeds its top ``n_blocks`` blocks.

    Every input of a top layer is either the output of another top layer or the boundary. More
    than one such outside tensor (a shortcut around the cut), a frozen layer that reads a top
    layer's output, or a top that does not end at the backbone's output: a one-line error.
    """
    top = _top_layers(base, spec, n_blocks)
    top_outputs = {id(t) for layer in top for t in _as_list(layer.output)}
    crossing: dict[int, object] = {}
    for layer in top:
        for t in _as_list(layer.input):
            if id(t) not in top_outputs:
                crossing[id(t)] = t
    top_ids = {id(layer) for layer in top}
    leaks = [layer.name for layer in base.layers
             if id(layer) not in top_ids and not isinstance(layer, keras.layers.InputLayer)
             and any(id(t) in top_outputs for t in _as_list(layer.input))]
    ends_on_top = all(id(t) in top_outputs for t in _as_list(base.output))
    if len(crossing) != 1 or leaks or not ends_on_top:
        why = (f"{len(crossing)} tensors cross into it" if len(crossing) != 1
               else f"frozen layer {leaks[0]} reads it" if leaks else "it does not end the backbone")
        raise JewelclfError(
            f"{spec.name} has no single-tensor boundary below its top {n_blocks} block(s) ({why}); "
            f"train stage 2 through the whole model instead of on cached activations"
        )
    return next(iter(crossing.values()))


def split_at_boundary(model: keras.Model, spec: BackboneSpec,
                      n_blocks: int) -> tuple[keras.Model, keras.Model]:
    """Cut the classifier ``model`` below the top ``n_blocks`` blocks of its backbone.

    Returns ``(bottom, top)``. ``bottom``: float32 pixels (0..255) -> the activations at the
    input of the lowest unfrozen block, through the preprocessing and the frozen backbone
    layers, without augmentation. ``top``: those activations -> probabilities, through the
    unfrozen blocks, the pooling and the head. Both share their layers with ``model``, so a
    training step on ``top`` changes ``model``'s weights, and ``top(bottom(x))`` is
    ``model(x, training=False)``. Trainability is whatever the layers hold: call
    :func:`jewelclf.modeling.classifier.unfreeze_top_blocks` with the same ``n_blocks`` first.
    """
    base = model.get_layer(BACKBONE)
    cut = boundary_tensor(base, spec, n_blocks)
    base_inputs = _as_list(base.input)
    if any(cut is t for t in base_inputs):  # every block unfrozen: the bottom is preprocessing
        base_bottom, base_top = None, base
    else:
        base_bottom = keras.Model(base.input, cut, name=f"{BACKBONE}_bottom")
        base_top = keras.Model(cut, base.output, name=f"{BACKBONE}_top")

    pixels = keras.Input(model.input_shape[1:], name="pixels")
    x = model.get_layer(PREPROCESSING)(pixels)
    if base_bottom is not None:
        x = base_bottom(x, training=False)
    bottom = keras.Model(pixels, x, name=f"{model.name}_bottom")

    activations = keras.Input(tuple(cut.shape[1:]), dtype=cut.dtype, name="activations")
    y = base_top(activations)  # no training flag: the outer call's reaches the layers, as in model
    y = model.get_layer(POOL)(y)
    top = keras.Model(activations, model.get_layer(HEAD)(y), name=f"{model.name}_top")
    return bottom, top


def boundary_activations(bottom: keras.Model, pixels_ds: Iterable, dtype: str = "float16",
                         augmentation: keras.layers.Layer | None = None) -> np.ndarray:
    """``bottom``'s activations for every image of ``pixels_ds``, stacked in dataset order.

    ``pixels_ds`` yields batches of pixels, or tuples whose first element is the pixels (the
    labels are left to the caller). ``dtype``: float16 by default, half the memory of float32;
    the activations are rounded to it once, and the top computes from them in its own dtype.
    ``augmentation``: the classifier's augmentation block, run in training mode on each batch
    before the bottom, so that one call caches one random view of the images.
    """
    out: list[np.ndarray] = []
    for batch in pixels_ds:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if augmentation is not None:
            x = augmentation(x, training=True)
        # predict_on_batch: one compiled inference call per batch, not op-by-op eager.
        out.append(np.asarray(bottom.predict_on_batch(x)).astype(dtype))
    if not out:
        raise JewelclfError("no images to cache boundary activations for: the dataset is empty")
    return np.concatenate(out)
