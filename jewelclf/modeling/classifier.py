"""The classifier: raw pixels in, class probabilities out.

``pixels (0..255) -> augmentation (training only) -> backbone preprocessing -> backbone ->
GlobalAveragePooling2D ("pool") -> head: Dropout -> [Dense hidden] -> Dense softmax (float32)``.

BatchNorm inside the backbone is frozen by ``trainable=False`` alone: Keras runs a
non-trainable ``BatchNormalization`` in inference mode, so its moving statistics never change,
in stage 2 too (:func:`unfreeze_top_blocks` never makes one trainable). The backbone's call
carries ``training=False``, but that does not do it: in Keras 3 the ``training`` flag of the
outer model's call reaches the layers inside the backbone. So the backbone's own dropout
(EfficientNet's drop-connect) runs in training steps, as when the backbone was trained, and
never at inference.

The head is its own small Keras model so that stage 1 can train it on cached features; the
same layer objects sit inside the full model, so nothing is copied between the two.

Under a mixed-precision policy (``train.precision``) the backbone and the head's hidden layer
compute in float16/bfloat16, while augmentation and preprocessing work on the 0..255 pixels in
float32 (Keras' ``RandomGaussianBlur`` cannot run in float16) and the softmax stays float32.
"""

from __future__ import annotations

import contextlib

import keras

from jewelclf.config import Config
from jewelclf.modeling.augmentation import build_augmentation
from jewelclf.modeling.backbones import BackboneSpec, get_backbone
from jewelclf.modeling.preprocessing import BackbonePreprocessing

BACKBONE = "backbone"
HEAD = "head"
POOL = "pool"
PREPROCESSING = "preprocessing"


def build_head(feature_size: int, num_classes: int, head_units: int, dropout: float) -> keras.Model:
    """Dropout, an optional hidden Dense layer, and a float32 softmax."""
    features = keras.Input((feature_size,), name="features")
    x = keras.layers.Dropout(dropout, name="head_dropout")(features)
    if head_units:
        x = keras.layers.Dense(head_units, activation="relu", name="head_hidden")(x)
        x = keras.layers.Dropout(dropout, name="head_hidden_dropout")(x)
    # float32 even under mixed precision: a float16 softmax loses small probabilities.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="probabilities")(x)
    return keras.Model(features, outputs, name=HEAD)


@contextlib.contextmanager
def _float32_layers():
    """Layers built in this block compute in float32 whatever the global dtype policy is."""
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def check_weights(config: Config) -> None:
    """Build the backbone with its weights once, before any data is read, so a missing file, a
    file of another backbone or a failed ImageNet download is a one-line error in seconds, not
    after the data check. ``weights: none`` has nothing to check."""
    if config.model.weights.lower() == "none":
        return
    spec = get_backbone(config.model.backbone)
    spec.build(config.data.image_size, config.model.weights)  # built to be checked, then dropped


def build_classifier(config: Config, num_classes: int) -> keras.Model:
    """Build the full functional model of ``config`` for ``num_classes`` classes."""
    spec = get_backbone(config.model.backbone)
    size = config.data.image_size
    base = spec.build(size, config.model.weights)
    base.trainable = False

    inputs = keras.Input((size, size, 3), name="pixels")
    x = inputs
    with _float32_layers():  # pixels stay float32 until the backbone casts them
        if config.augment.enabled:
            x = build_augmentation(config.augment, seed=config.train.seed)(x)
        x = BackbonePreprocessing(spec.preprocessing, name=PREPROCESSING)(x)
    x = base(x, training=False)  # overridden by the outer call's flag; see the module docstring
    features = keras.layers.GlobalAveragePooling2D(name=POOL)(x)
    head = build_head(spec.feature_size, num_classes, config.model.head_units,
                      config.model.dropout)
    outputs = head(features)
    return keras.Model(inputs, outputs, name=f"jewelclf_{spec.name}")


def feature_extractor(model: keras.Model) -> keras.Model:
    """The model without augmentation and head: pixels in, pooled backbone features out.

    Shares its layers with ``model``; used to compute stage-1 features once, and to embed.
    """
    size = model.input_shape[1:]
    inputs = keras.Input(size, name="pixels")
    x = model.get_layer(PREPROCESSING)(inputs)
    x = model.get_layer(BACKBONE)(x, training=False)
    features = model.get_layer(POOL)(x)
    return keras.Model(inputs, features, name="features")


def without_augmentation(model: keras.Model) -> keras.Model:
    """The model with its augmentation block left out, sharing every other layer."""
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    features = feature_extractor(model)(inputs)
    return keras.Model(inputs, model.get_layer(HEAD)(features), name=f"{model.name}_noaug")


def with_features(model: keras.Model) -> keras.Model:
    """The model without augmentation, answering ``{"probabilities", "features"}`` (the pooled
    backbone features) in one pass; shares every layer with ``model``."""
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    features = feature_extractor(model)(inputs)
    return keras.Model(inputs, {"probabilities": model.get_layer(HEAD)(features), "features": features},
                       name=f"{model.name}_features")


def unfreeze_top_blocks(model: keras.Model, spec: BackboneSpec, n_blocks: int) -> list[str]:
    """Make the top ``n_blocks`` blocks of the backbone trainable; keep BatchNorm frozen.

    Returns the unfrozen block names, top first. Recompile the model afterwards.
    """
    base = model.get_layer(BACKBONE)
    blocks = spec.blocks(base)
    chosen = blocks[len(blocks) - n_blocks:] if n_blocks > 0 else []
    chosen_set = set(chosen)
    layer_blocks = spec.layer_blocks(base)
    base.trainable = True
    for layer in base.layers:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = (layer_blocks[layer.name] in chosen_set) and not is_bn
    return list(reversed(chosen))

