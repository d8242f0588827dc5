"""Serializable Keras layers that live inside the model: preprocessing and augmentation.

Everything here uses ``keras.layers`` and ``keras.ops`` only, so the model runs on any Keras
backend (TensorFlow here, JAX on the GPU machine) and is saved and exported with the model.
"""

from __future__ import annotations

import keras
from keras import ops

from jewelclf.config import AugmentConfig

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
PREPROCESSING_MODES = ("caffe", "tf", "torch", "none")


@keras.saving.register_keras_serializable(package="jewelclf")
class BackbonePreprocessing(keras.layers.Layer):
    """Turn RGB pixels in 0..255 into what a backbone's ImageNet weights expect.

    Modes follow ``keras.applications.imagenet_utils.preprocess_input``:

    - ``caffe``: RGB to BGR, then subtract the ImageNet mean per channel (VGG, ResNet).
    - ``tf``: scale to -1..1 (MobileNet, ResNetV2).
    - ``torch``: scale to 0..1, then normalise by the ImageNet mean and std (DenseNet).
    - ``none``: pass through; the backbone normalises itself (EfficientNet).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; one of {PREPROCESSING_MODES}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)
            return x - ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


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
