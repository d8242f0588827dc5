"""Test-time augmentation (TTA): the classifier's answer averaged over a horizontal flip.

:func:`flip_tta` is the one definition that ``jewelclf evaluate --tta`` scores with and that
``jewelclf export --tta`` bakes into the SavedModel and TFLite graphs (and that the export's
parity check holds them to). It runs the classifier without augmentation on the pixels and on
their mirror image (NHWC, width flipped) and averages the two softmax outputs; calibration (the
run's temperature) is applied to that mean, as it is to a single pass without TTA. It is built
from ``keras.layers`` and ``keras.ops`` only, so it runs on every Keras backend, and it shares
every layer and weight with the classifier: nothing is copied, and there is nothing to save.

The pooled features it answers (``with_features=True``) are those of the original pixels, not
the mean over the flip: the unknown score measures them against the run's training vectors and
its threshold (95% of the val images' distances), which ``fit`` computed from single, unflipped
passes. A flip-averaged vector would be measured on a scale its threshold was not chosen for.
So ``unknown_score`` and the ``embed`` vectors are the same with and without TTA.
"""

from __future__ import annotations

import keras

from jewelclf.errors import JewelclfError
from jewelclf.modeling.classifier import with_features as classifier_with_features
from jewelclf.modeling.classifier import without_augmentation

NONE = "none"
FLIP = "flip"
MODES = (NONE, FLIP)
VIEWS = {NONE: 1, FLIP: 2}
"""Forward passes of the classifier per image, by mode."""


def flip_horizontal(pixels):
    """``pixels`` ``[batch, height, width, channels]`` mirrored left to right."""
    return keras.ops.flip(pixels, axis=2)


class HorizontalFlip(keras.layers.Layer):
    """:func:`flip_horizontal` as a layer: deterministic, at training and inference alike."""

    def call(self, x):
        return flip_horizontal(x)

    def compute_output_shape(self, input_shape):
        return input_shape


def check_mode(tta: str) -> str:
    """``tta`` when it is a known mode; a one-line error naming the flag otherwise."""
    if tta not in MODES:
        raise JewelclfError(f"unknown --tta mode '{tta}'; one of {', '.join(MODES)}")
    return tta


def flip_tta(model: keras.Model, with_features: bool = False) -> keras.Model:
    """``model`` (a jewelclf classifier) averaged over the pixels and their horizontal flip.

    Pixels in (float32 0..255, NHWC), the mean of the two passes' probabilities out; with
    ``with_features``, ``{"probabilities", "features"}`` where ``features`` are the pooled
    backbone features of the unflipped pixels (see the module docstring). No augmentation.
    """
    both = classifier_with_features(model)
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    plain = both(inputs)
    mirrored = both(HorizontalFlip(name="tta_flip")(inputs))
    probabilities = keras.layers.Average(dtype="float32", name="tta_mean")(
        [plain["probabilities"], mirrored["probabilities"]])
    if with_features:
        return keras.Model(inputs, {"probabilities": probabilities, "features": plain["features"]},
                           name=f"{model.name}_tta_features")
    return keras.Model(inputs, probabilities, name=f"{model.name}_tta")


def scoring_model(model: keras.Model, tta: str = NONE, with_features: bool = False) -> keras.Model:
    """The model that scores images for ``tta`` (``none`` or ``flip``), without augmentation:
    probabilities, or ``{"probabilities", "features"}`` with ``with_features``."""
    if check_mode(tta) == FLIP:
        return flip_tta(model, with_features)
    return classifier_with_features(model) if with_features else without_augmentation(model)


def with_tta(model: keras.Model, tta: str = NONE) -> keras.Model:
    """Pixels in, probabilities out, for ``tta``: ``model`` itself for ``none`` (so an answer
    without TTA is computed exactly as before TTA existed), :func:`flip_tta` for ``flip``."""
    return flip_tta(model) if check_mode(tta) == FLIP else model
