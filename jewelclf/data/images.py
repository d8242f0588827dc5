"""Decoding and resizing of encoded images: the one definition used by training, evaluation,
the data check and the exported serving signature, so they can never disagree.
"""

from __future__ import annotations

import tensorflow as tf

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes (its magic number), or ``None``."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def describe_unsupported(head: bytes) -> str:
    """A short name for a format jewelclf does not read, for error messages."""
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftyphevc"):
        return "HEIC/AVIF"
    if head.lstrip()[:5] in (b"<?xml", b"<svg ") or head.lstrip()[:4] == b"<svg":
        return "SVG"
    if head[:4] == b"%PDF":
        return "PDF"
    stripped = head.strip()
    if stripped and all(32 <= b < 127 or b in (9, 10, 13) for b in stripped[:64]):
        return "text"
    return "unknown binary"


def _composite_on_white(rgb: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    # Transparent catalogue cut-outs are shown on white; the hidden RGB under alpha=0 is junk.
    rgb = tf.cast(rgb, tf.float32)
    a = tf.cast(alpha, tf.float32) / 255.0
    out = rgb * a + 255.0 * (1.0 - a)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """Decode JPEG/PNG/GIF (first frame)/BMP/WebP bytes into uint8 RGB ``[H, W, 3]``.

    Grayscale is expanded to RGB, and an alpha channel is composited onto white. 16-bit PNGs
    are scaled to 8 bits. Works eagerly and inside ``tf.function`` / SavedModel graphs.
    """
    image = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
    channels = tf.shape(image)[-1]

    def gray():
        return tf.image.grayscale_to_rgb(image[..., :1])

    def gray_alpha():
        return _composite_on_white(tf.image.grayscale_to_rgb(image[..., :1]), image[..., 1:2])

    def rgb():
        return image[..., :3]

    def rgba():
        return _composite_on_white(image[..., :3], image[..., 3:4])

    out = tf.switch_case(tf.clip_by_value(channels - 1, 0, 3), [gray, gray_alpha, rgb, rgba])
    out.set_shape([None, None, 3])
    return out


def resize_rgb(image: tf.Tensor, size: int, mode: str = "squash") -> tf.Tensor:
    """Resize uint8 RGB to ``[size, size, 3]`` uint8 (antialiased bilinear, rounded).

    ``squash`` resizes the whole frame; ``crop`` takes the central square first.
    """
    if mode == "crop":
        shape = tf.shape(image)
        side = tf.minimum(shape[0], shape[1])
        top = (shape[0] - side) // 2
        left = (shape[1] - side) // 2
        image = image[top:top + side, left:left + side, :]
    resized = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def load_image(encoded: tf.Tensor, size: int, mode: str = "squash") -> tf.Tensor:
    """Encoded bytes to the model's input: uint8 ``[size, size, 3]``."""
    return resize_rgb(decode_rgb(encoded), size, mode)
