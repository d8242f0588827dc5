"""The backbone registry: each pretrained base with its constructor, preprocessing and sizes.

An entry knows how to build its Keras application without the classification top, which
pixel normalisation the ImageNet weights expect (applied inside the model by
:class:`jewelclf.modeling.preprocessing.BackbonePreprocessing`), the width of its pooled features, its default
and minimum image size, and how its layers group into blocks for progressive unfreezing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from jewelclf.errors import JewelclfError

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone."""

    name: str
    constructor: Callable[..., keras.Model] | str
    """A ``keras.applications`` name (resolved when the base is built, so that reading the
    registry imports no TensorFlow) or a callable."""
    preprocessing: str
    """Pixel normalisation mode of :class:`~jewelclf.modeling.preprocessing.BackbonePreprocessing`."""
    feature_size: int
    default_image_size: int
    min_image_size: int
    block_pattern: str
    """Regex whose first group names the block a layer belongs to (by layer name)."""
    constructor_kwargs: dict = field(default_factory=dict)

    def check_image_size(self, image_size: int) -> None:
        """A one-line error for an input side this backbone cannot take: raised when the model
        is built, and meant for callers to check before any data is read."""
        if image_size < self.min_image_size:
            raise JewelclfError(
                f"image size {image_size} is below {self.name}'s minimum of {self.min_image_size}; "
                f"pass --image-size {self.min_image_size} or more (default {self.default_image_size})"
            )

    def build(self, image_size: int, weights: str) -> keras.Model:
        """Build the base without its top, named ``backbone``, loading ``weights``.

        ``weights`` is ``imagenet`` (downloaded and cached by Keras), ``none``, or a path to a
        weights file of this backbone without its top.
        """
        self.check_image_size(image_size)
        kwargs = dict(self.constructor_kwargs)
        weights_path = None
        if weights.lower() == "none":
            kwargs["weights"] = None
        elif weights.lower() == "imagenet":
            kwargs["weights"] = "imagenet"
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise JewelclfError(
                    f"weights file '{weights}' does not exist; pass --weights PATH to a "
                    f"{self.name} no-top weights file, 'imagenet', or 'none'"
                )
            kwargs["weights"] = None
            weights_path = str(path)
        try:
            base = self.make(
                include_top=False, input_shape=(image_size, image_size, 3), name="backbone", **kwargs
            )
        except JewelclfError:
            raise
        except Exception as e:  # download failures surface as many exception types
            if kwargs.get("weights") == "imagenet":
                raise JewelclfError(_download_failure(self.name, e)) from None
            raise
        if weights_path is not None:
            try:
                base.load_weights(weights_path)
            except Exception as e:
                raise JewelclfError(
                    f"weights file '{weights}' does not fit backbone {self.name} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                    "pass the no-top weights of this backbone or choose the matching --backbone"
                ) from None
        return base

    def make(self, **kwargs) -> keras.Model:
        """Call the constructor (a ``keras.applications`` name is looked up first)."""
        constructor = self.constructor
        if isinstance(constructor, str):
            import keras

            constructor = getattr(keras.applications, constructor)
        return constructor(**kwargs)

    def block_of(self, layer_name: str) -> str | None:
        m = re.match(self.block_pattern, layer_name)
        return m.group(1) if m else None

    def blocks(self, base: keras.Model) -> list[str]:
        """Block names from input to output. Layers after the last block join the last block."""
        order: list[str] = []
        for layer in base.layers:
            b = self.block_of(layer.name)
            if b is not None and b not in order:
                order.append(b)
        return order

    def layer_blocks(self, base: keras.Model) -> dict[str, str | None]:
        """Map each layer of ``base`` to its block; stem layers map to ``None``."""
        out: dict[str, str | None] = {}
        last = None
        for layer in base.layers:
            b = self.block_of(layer.name)
            if b is not None:
                last = b
            out[layer.name] = b if b is not None else (last if last is not None else None)
        return out


def _download_failure(name: str, e: Exception) -> str:
    """One line for a failed ImageNet download: the whole URL, and how to do without it."""
    text = " ".join(str(e).split())
    url = re.search(r"https?://[^\s:]+(?::\d+)?[^\s:]*", text)
    where = f" from {url.group(0)}" if url else ""
    reason = " ".join(re.sub(r"https?://\S+", "", text).split()).strip(" :-")[:120] or type(e).__name__
    return (f"could not download the ImageNet weights of {name}{where} ({reason}); without a "
            f"network, fetch that file on a machine that has one and pass --weights PATH to it "
            f"(or --weights none to train from scratch)")


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("resnet50", "ResNet50", "caffe", 2048, 224, 32, r"^(conv\d_block\d+)_"),
        BackboneSpec("resnet101", "ResNet101", "caffe", 2048, 224, 32, r"^(conv\d_block\d+)_"),
        BackboneSpec("resnet50_v2", "ResNet50V2", "tf", 2048, 224, 32, r"^(conv\d_block\d+)_"),
        BackboneSpec("vgg16", "VGG16", "caffe", 512, 224, 32, r"^(block\d+)_"),
        BackboneSpec("vgg19", "VGG19", "caffe", 512, 224, 32, r"^(block\d+)_"),
        BackboneSpec("mobilenet", "MobileNet", "tf", 1024, 224, 32,
                     r"^conv_(?:dw|pw|pad)_(\d+)", {"alpha": 1.0}),
        BackboneSpec("mobilenet_025", "MobileNet", "tf", 256, 224, 32,
                     r"^conv_(?:dw|pw|pad)_(\d+)", {"alpha": 0.25}),
        BackboneSpec("mobilenet_v2", "MobileNetV2", "tf", 1280, 224, 32, r"^(block_\d+)_"),
        BackboneSpec("efficientnet_b0", "EfficientNetB0", "none", 1280, 224, 32,
                     r"^(block\d[a-z])_"),
        BackboneSpec("efficientnet_b3", "EfficientNetB3", "none", 1536, 300, 32,
                     r"^(block\d[a-z])_"),
        BackboneSpec("densenet121", "DenseNet121", "torch", 1024, 224, 32,
                     r"^(conv\d_block\d+)_"),
    ]
}


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by name; an unknown name is a one-line error listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise JewelclfError(
            f"unknown backbone '{name}'; choose one of: {', '.join(sorted(BACKBONES))}"
        ) from None
