"""Training-time augmentation as a serializable Keras block inside the model.

:class:`Augmentation` runs Keras' random layers only when called with ``training=True``, and
:func:`build_augmentation` builds it from the ``augment`` config. Everything here uses
``keras.layers`` only, so the model runs on any Keras backend and is saved with the model; the
registered name (``jewelclf>Augmentation``) is what saved ``.keras`` files refer to.
"""

from __future__ import annotations

import keras

from jewelclf.config import AugmentConfig


@keras.saving.register_keras_serializable(package="jewelclf")
class Augmentation(keras.Sequential):
    """Keras' random layers in sequence, active only when called with ``training=True``.

    Keras' own random layers default to ``training=True``, so a plain ``model(x)``, with no
    flag, would augment; this block passes pixels through unless training is asked for.
    """

    def call(self, inputs, training=None, mask=None):
        if not training:
            return inputs
        return super().call(inputs, training=True, mask=mask)


def build_augmentation(cfg: AugmentConfig, seed: int | None = None) -> Augmentation:
    """Random crop/zoom, flip, colour jitter and blur as one Keras block.

    The layers are active only when the model is called with ``training=True``; at inference,
    and when no flag is given, they pass pixels through untouched, so the trained model and its
    export agree exactly.
    """
    layers: list[keras.layers.Layer] = []

    def s(offset: int) -> int | None:
        return None if seed is None else seed + offset

    if cfg.zoom > 0:
        layers.append(keras.layers.RandomZoom((-cfg.zoom, 0.0), fill_mode="reflect", seed=s(1),
                                              name="random_zoom"))
    if cfg.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=s(2), name="random_flip"))
    if cfg.brightness > 0:
        layers.append(keras.layers.RandomBrightness(cfg.brightness, value_range=(0, 255),
                                                    seed=s(3), name="random_brightness"))
    if cfg.contrast > 0:
        layers.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=s(4),
                                                  name="random_contrast"))
    if cfg.saturation > 0:
        # RandomSaturation's no-op point is 0.5; a symmetric band around it jitters both ways.
        band = cfg.saturation / 2.0
        layers.append(keras.layers.RandomSaturation((0.5 - band, 0.5 + band), value_range=(0, 255),
                                                    seed=s(5), name="random_saturation"))
    if cfg.hue > 0:
        layers.append(keras.layers.RandomHue(cfg.hue, value_range=(0, 255), seed=s(6),
                                             name="random_hue"))
    if cfg.blur > 0:
        layers.append(keras.layers.RandomGaussianBlur(cfg.blur, kernel_size=3, sigma=1.0,
                                                      value_range=(0, 255), seed=s(7),
                                                      name="random_blur"))
    return Augmentation(layers, name="augmentation")
