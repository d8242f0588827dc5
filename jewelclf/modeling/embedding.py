"""Embeddings for visual search: a trained classifier's features, L2-normalised.

:func:`embedding_model` takes float32 pixels ``[B, S, S, 3]`` in 0..255 (the classifier's own
input, no augmentation) and returns unit vectors ``[B, D]``, so the dot product of two
embeddings is their cosine similarity. It shares its layers with the trained model; nothing is
copied or retrained. The same Keras model serves the ``jewelclf index`` / ``similar`` commands
and the exported SavedModel's ``embed`` signature, so the two cannot disagree.

Layers:

- ``pool``: the backbone's globally averaged features (``GlobalAveragePooling2D``, named
  ``pool``). Works for every jewelclf model.
- ``hidden``: the head's hidden Dense layer (``head_hidden``, after its ReLU), for models
  trained with ``--head-units N``. Dropout is the identity at inference, so it is skipped.
"""

from __future__ import annotations

import keras
from keras import ops

from jewelclf.errors import JewelclfError
from jewelclf.modeling.classifier import HEAD, POOL, feature_extractor

LAYERS = ("pool", "hidden")
HIDDEN_DENSE = "head_hidden"
EMBEDDING_OUTPUT = "embedding"
EPSILON = 1e-12


def l2_normalize(x, epsilon: float = EPSILON):
    """``x / max(||x||, sqrt(epsilon))`` along the last axis, in float32, with ``keras.ops``.

    A zero vector (possible after a ReLU) stays zero instead of becoming NaN.
    """
    x = ops.cast(x, "float32")
    squared = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared, epsilon))


@keras.saving.register_keras_serializable(package="jewelclf")
class L2Normalize(keras.layers.Layer):
    """:func:`l2_normalize` as a layer (always float32, even under mixed precision)."""

    def __init__(self, epsilon: float = EPSILON, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, x):
        return l2_normalize(x, self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def has_hidden_layer(model: keras.Model) -> bool:
    head = model.get_layer(HEAD)
    return any(layer.name == HIDDEN_DENSE for layer in head.layers)


def embedding_features(model: keras.Model, layer: str = "pool") -> keras.Model:
    """The un-normalised features of ``layer``: float32 pixels in, ``[B, D]`` out."""
    if layer not in LAYERS:
        raise JewelclfError(f"unknown embedding layer '{layer}'; use one of {', '.join(LAYERS)}")
    features = feature_extractor(model)
    if layer == "pool":
        return features
    if not has_hidden_layer(model):
        raise JewelclfError(
            f"model '{model.name}' has no hidden head layer (it was trained with head_units 0); "
            f"embed with layer 'pool', or train with --head-units N"
        )
    dense = model.get_layer(HEAD).get_layer(HIDDEN_DENSE)
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    return keras.Model(inputs, dense(features(inputs)), name="hidden_features")


def embedding_model(model: keras.Model, layer: str = "pool") -> keras.Model:
    """A Keras model: float32 pixels ``[B, S, S, 3]`` (0..255) -> unit vectors ``[B, D]``.

    Built from ``model``'s own layers (no augmentation, BatchNorm in inference mode). This is
    what the SavedModel ``embed`` signature wraps, after decoding and resizing the bytes with
    :func:`jewelclf.data.images.load_image` and casting to float32.
    """
    features = embedding_features(model, layer)
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    out = L2Normalize(name=EMBEDDING_OUTPUT)(features(inputs))
    return keras.Model(inputs, out, name=f"embedding_{layer}")


def embedding_and_probabilities(model: keras.Model, layer: str = "pool") -> keras.Model:
    """Pixels in, ``[embedding, probabilities]`` out, sharing one backbone pass.

    ``jewelclf similar --same-class`` needs the query's predicted class as well as its vector.
    """
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    pooled = feature_extractor(model)(inputs)
    probabilities = model.get_layer(HEAD)(pooled)
    vector = pooled
    if layer != "pool":
        embedding_features(model, layer)  # a one-line error for an unknown or absent layer
        vector = model.get_layer(HEAD).get_layer(HIDDEN_DENSE)(pooled)
    out = L2Normalize(name=EMBEDDING_OUTPUT)(vector)
    return keras.Model(inputs, [out, probabilities], name=f"embedding_{layer}_and_probabilities")


def embedding_dim(model: keras.Model, layer: str = "pool") -> int:
    if layer == "pool":
        return int(model.get_layer(POOL).output.shape[-1])
    return int(embedding_features(model, layer).output.shape[-1])
