"""The backbone's pixel normalisation as a serializable Keras layer inside the model.

:class:`BackbonePreprocessing` turns 0..255 RGB pixels into what a backbone's ImageNet weights
expect. It uses ``keras.layers`` and ``keras.ops`` only, so the model runs on any Keras backend
and is saved and exported with the model; its registered name (``jewelclf>BackbonePreprocessing``)
is what saved ``.keras`` files refer to, so it must not change.
"""

from __future__ import annotations

import keras
from keras import ops

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
