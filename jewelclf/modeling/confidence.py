"""The exported answer's confidence: temperature scaling and the distance to the training images.

Two Keras layers (``keras.ops`` only, so they run on any backend) that the SavedModel's and the
TFLite model's graphs put after the classifier:

- :class:`TemperatureScaling`: ``softmax(log(p) / T)``, the run's calibration
  (:mod:`jewelclf.evaluation.calibration` computes the same in NumPy);
- :class:`NearestDistance`: the cosine distance of an image's square-rooted pooled features to
  the nearest training image (:func:`jewelclf.evaluation.unknown.knn_distance` in NumPy), the
  ``unknown_score``. The training vectors are a non-trainable weight of the layer, so they are
  saved with the model's variables rather than as a constant in the graph.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

PROBABILITY_FLOOR = float(np.finfo(np.float32).tiny)
"""A probability that underflowed to 0 counts as this; calibration's NumPy code uses the same."""


class TemperatureScaling(keras.layers.Layer):
    """Calibrated probabilities ``softmax(log(max(p, tiny)) / temperature)`` of probabilities ``p``."""

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probs):
        probs = ops.cast(probs, "float32")
        if self.temperature == 1.0:  # exactly the model's probabilities, as NumPy's scale gives
            return probs
        return ops.softmax(ops.log(ops.maximum(probs, PROBABILITY_FLOOR)) / self.temperature, axis=-1)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


class NearestDistance(keras.layers.Layer):
    """``1 - max cos`` between an image's square-rooted, unit pooled features and ``reference``
    (``[n, dim]`` unit vectors of the training images, :func:`jewelclf.evaluation.unknown.unit`)."""

    def __init__(self, reference: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        reference = np.asarray(reference, np.float32)
        self.reference = self.add_weight(shape=reference.shape, initializer="zeros", trainable=False,
                                         dtype="float32", name="training_vectors")
        self.reference.assign(reference)
        self.built = True  # its one weight exists already; ExportArchive tracks only built layers

    def call(self, features):
        v = ops.sqrt(ops.maximum(ops.cast(features, "float32"), 0.0))
        v = v / ops.maximum(ops.norm(v, axis=-1, keepdims=True), 1e-12)
        return 1.0 - ops.max(ops.matmul(v, ops.transpose(self.reference)), axis=-1)
