"""Decoding and resizing of encoded images: the one definition used by training, evaluation,
the data check and the exported serving signature, so they can never disagree.
"""

from __future__ import annotations

import tensorflow as tf

from jewelclf.data.formats import (  # noqa: F401  (re-exported: the decoders' vocabulary)
    ANIMATED_WEBP_REASON,
    DECODER_MAX_PIXELS,
    JPEG_BARE_MARKERS,
    JPEG_MAX_STEPS,
    JPEG_SOF_MARKERS,
    NO_SIZE_REASON,
    SUPPORTED_FORMATS,
    describe_unsupported,
    is_animated_webp,
    sniff_format,
    unsupported_reason,
)
from jewelclf.data.letterbox import background_colour, border_pixels, pad_square
from jewelclf.errors import JewelclfError


def _graph_ready(fn):
    """Mark ``fn`` as already graph code (explicit ``tf.cond``, no Python branching on tensors),
    so AutoGraph does not convert it and everything it calls, which ``tf.data`` would otherwise
    do each time a pipeline is traced (about 0.1 s of Python for :func:`load_image`)."""
    return tf.autograph.experimental.do_not_convert(fn)


def animated_webp_mask(encoded: tf.Tensor) -> tf.Tensor:
    """In-graph :func:`is_animated_webp` for a string tensor of any shape: ``True`` where the
    bytes are a RIFF WebP whose first chunk is a VP8X with the animation flag set (what sends
    libwebp, and so TensorFlow, to its animation decoder) or an ANIM/ANMF chunk.

    Only ``tf.strings`` ops on the first 21 bytes: safe on any input, and it needs nothing of
    jewelclf at run time, so exported graphs can call it.
    """
    # The first 24 bytes (fewer when shorter; pos 0 is always in range), padded so that every
    # substr below stays in range: no copy of the whole image.
    padded = tf.strings.join([tf.strings.substr(encoded, 0, 24), tf.constant(b"\x00" * 24)])

    def head(pos: int, n: int) -> tf.Tensor:
        return tf.strings.substr(padded, pos, n)

    webp = tf.logical_and(tf.equal(head(0, 4), b"RIFF"), tf.equal(head(8, 4), b"WEBP"))
    first = head(12, 4)
    flags = tf.reshape(tf.io.decode_raw(head(20, 1), tf.uint8), tf.shape(encoded))  # one byte each
    animated_flag = tf.logical_and(tf.equal(first, b"VP8X"),
                                   tf.not_equal(tf.bitwise.bitwise_and(flags, 2), 0))
    animation_chunk = tf.logical_or(tf.equal(first, b"ANIM"), tf.equal(first, b"ANMF"))
    return tf.logical_and(webp, tf.logical_or(animated_flag, animation_chunk))


class AnimatedWebPError(JewelclfError, tf.errors.InvalidArgumentError):
    """An animated WebP was about to be decoded. A :class:`JewelclfError` (one line, naming the
    file when known, and the fix) and a ``tf.errors.InvalidArgumentError``, so the callers
    that treat undecodable images one by one (``predict``) treat it the same way."""

    def __init__(self, source: str | None = None):
        self.source = source
        message = f"'{source}' is an {ANIMATED_WEBP_REASON}" if source else ANIMATED_WEBP_REASON
        tf.errors.InvalidArgumentError.__init__(self, None, None, message)

    def __reduce__(self):
        return (type(self), (self.source,))


def _composite_on_white(rgb: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    # Transparent catalogue cut-outs are shown on white; the hidden RGB under alpha=0 is junk.
    # rgb * a + 255 * (1 - a) in the fewest full-size passes; it stays within 0..255.
    a = tf.cast(alpha, tf.float32) * (1.0 / 255.0)
    return tf.cast(tf.round((tf.cast(rgb, tf.float32) - 255.0) * a + 255.0), tf.uint8)


def _gray_to_rgb(image: tf.Tensor) -> tf.Tensor:
    """``[..., 1]`` gray repeated into ``[..., 3]``; RGB unchanged (the channel count is static).
    A plain concat: ``tf.image.grayscale_to_rgb``'s shape assertions would add a few dozen nodes
    to every graph that decodes an image."""
    return tf.concat([image] * 3, axis=-1) if image.shape[-1] == 1 else image


def _composite_full_size(image: tf.Tensor) -> tf.Tensor:
    """Gray+alpha or RGB+alpha uint8 composited onto white, at full size."""
    return _composite_on_white(_gray_to_rgb(image[..., :-1]), image[..., -1:])


def _is_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(encoded, 0, 3), b"\xff\xd8\xff")


def _decode_jpeg(encoded: tf.Tensor, min_side: int | None) -> tf.Tensor:
    if min_side is None:
        return tf.io.decode_jpeg(encoded, channels=3)
    # libjpeg can decode straight to 1/2, 1/4 or 1/8 scale by keeping only the low DCT
    # frequencies of each block (in effect a low-pass filter, so the downscale does not alias),
    # which skips most of the work for a big photo. Take the smallest scale that still leaves
    # the short side at least `min_side`.
    shape = tf.image.extract_jpeg_shape(encoded)
    short = tf.minimum(shape[0], shape[1])
    level = tf.add_n([tf.cast(short >= min_side * r, tf.int32) for r in (2, 4, 8)])
    return tf.switch_case(level, [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r)
                                  for r in (1, 2, 4, 8)])


def _decode(encoded: tf.Tensor, min_side: int | None, guard: bool, opaque, transparent) -> tf.Tensor:
    """Decode, then finish the image with ``opaque(image)`` (uint8 gray or RGB, the channel
    count static in each call) or, where it has an alpha channel, ``transparent(image)`` (uint8
    gray+alpha or RGB+alpha)."""
    # JPEGs (nearly every catalogue photo) take libjpeg's own conversion to RGB, which covers
    # grayscale and CMYK and gives the same pixels as the general path below at a fraction of
    # its graph cost; a JPEG never has alpha, and is never an animated WebP.
    return tf.cond(_is_jpeg(encoded), lambda: opaque(_decode_jpeg(encoded, min_side)),
                   lambda: _decode_other(encoded, guard, opaque, transparent))


def _decode_other(encoded: tf.Tensor, guard: bool, opaque, transparent) -> tf.Tensor:
    if guard:
        check = tf.debugging.Assert(tf.logical_not(animated_webp_mask(encoded)), [ANIMATED_WEBP_REASON])
        with tf.control_dependencies([check]):
            encoded = tf.identity(encoded)
    image = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
    channels = tf.shape(image)[-1]

    def channels_of(n: int) -> tf.Tensor:
        out = image[..., :n]
        out.set_shape([None, None, n])
        return out

    branches = [lambda n=n, finish=finish: finish(channels_of(n))
                for n, finish in ((1, opaque), (2, transparent), (3, opaque), (4, transparent))]
    return tf.switch_case(tf.clip_by_value(channels - 1, 0, 3), branches)


def _refuse_animated_webp_eagerly(encoded, source: str | None) -> tf.Tensor:
    """Eagerly, raise :class:`AnimatedWebPError` before TensorFlow's decoder sees one; return
    the bytes as a string tensor."""
    data = encoded if isinstance(encoded, (bytes, bytearray)) else None
    if data is None and isinstance(encoded, tf.Tensor) and encoded.dtype == tf.string \
            and encoded.shape.rank == 0:
        data = encoded.numpy()
    if data is not None and is_animated_webp(bytes(data)):
        raise AnimatedWebPError(source)
    return tf.convert_to_tensor(encoded, tf.string)


def _animated_webp_guard(encoded, source: str | None) -> tuple[tf.Tensor, bool]:
    """``(bytes, guard)``: eagerly, an animated WebP is refused here (:class:`AnimatedWebPError`)
    and no guard is needed; in a graph, ``guard`` is True and the decode asserts first."""
    if tf.executing_eagerly():
        return _refuse_animated_webp_eagerly(encoded, source), False
    return encoded, True


def _resized_at(size: int, mode: str):
    """The ``(opaque, transparent)`` finishers of :func:`_decode` that give the model's input."""
    return lambda image: resize_rgb(image, size, mode), lambda image: _resize_composited(image, size, mode)


@_graph_ready
def decode_rgb(encoded: tf.Tensor, source: str | None = None, min_side: int | None = None) -> tf.Tensor:
    """Decode JPEG/PNG/GIF (first frame)/BMP/WebP bytes into uint8 RGB ``[H, W, 3]``.

    Grayscale and CMYK are turned into RGB, and an alpha channel is composited onto white.
    16-bit PNGs are scaled to 8 bits. Works eagerly and inside ``tf.function`` / SavedModel
    graphs. With ``min_side``, a JPEG whose short side is at least twice ``min_side`` is decoded
    at 1/2, 1/4 or 1/8 scale, the smallest that keeps its short side at least ``min_side``;
    other images come back at full size.

    An animated WebP is never handed to TensorFlow's decoder (it would abort the process):
    eagerly, :class:`AnimatedWebPError` is raised, naming ``source`` (the file) when given; in a
    graph, an assertion that runs before the (non-JPEG) decode fails with
    :data:`ANIMATED_WEBP_REASON` (an ``InvalidArgumentError``, which ``tf.data``'s
    ``ignore_errors`` drops like any undecodable image).
    """
    encoded, guard = _animated_webp_guard(encoded, source)
    out = _decode(encoded, min_side, guard, _gray_to_rgb, _composite_full_size)
    out.set_shape([None, None, 3])
    return out


def _center_square(image: tf.Tensor) -> tf.Tensor:
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top = (shape[0] - side) // 2
    left = (shape[1] - side) // 2
    return image[top:top + side, left:left + side, :]


def _resize_planes(planes: list[tf.Tensor], size: int) -> list[tf.Tensor]:
    """Any-dtype ``[H, W, C]`` images of one height and width to float32 ``[size, size, C]``:
    box filter where a side shrinks 2x or more, bilinear otherwise."""
    shape = tf.shape(planes[0])
    shrunk = [tf.minimum(shape[0], size), tf.minimum(shape[1], size)]

    # Area averaging to at most `size` a side, then bilinear growth of a side that was shorter
    # (a bilinear resize to the same size returns its input exactly, so it needs no branch of
    # its own: every branch is a graph function that each tf.data iterator instantiates).
    def area_first():
        return [tf.image.resize(tf.image.resize(plane, shrunk, method="area"), [size, size], method="bilinear")
                for plane in planes]

    # Below a 2x shrink, bilinear interpolation reads every input pixel anyway and stays
    # closer to a Lanczos reference than the box filter (BENCHMARKS.md, "Input pipeline").
    return tf.cond(tf.reduce_any(shape[:2] >= 2 * size), area_first,
                   lambda: [tf.image.resize(plane, [size, size], method="bilinear") for plane in planes])


def _to_uint8(pixels: tf.Tensor) -> tf.Tensor:
    # Both filters average 0..255 values, so the result needs rounding but no clipping.
    return tf.cast(tf.round(pixels), tf.uint8)


def resize_rgb(image: tf.Tensor, size: int, mode: str = "squash") -> tf.Tensor:
    """Resize uint8 RGB (or gray, ``[H, W, 1]``, which comes back as RGB) to ``[size, size, 3]``
    uint8, rounded.

    ``squash`` resizes the whole frame; ``crop`` takes the central square first; ``pad`` first
    centres the photo on a square canvas of its background colour (the median of its outermost
    two-pixel frame, or white when that frame is not one colour: :mod:`jewelclf.data.letterbox`),
    so that a long necklace keeps its aspect ratio. A side that
    shrinks by 2x or more is shrunk by area averaging (an exact box filter, so a 17x downscale
    of a fine chain does not alias), then grown bilinearly if the other side is smaller than
    ``size``; otherwise the resize is bilinear. Together they are closer to a Lanczos reference
    than antialiased bilinear, at a fraction of its cost (BENCHMARKS.md, "Input pipeline").
    """
    if mode == "crop":
        image = _center_square(image)
    elif mode == "pad":
        image = pad_square(image, background_colour(border_pixels(image)))
    return _to_uint8(_gray_to_rgb(_resize_planes([image], size)[0]))


def _premultiplied_planes(image: tf.Tensor) -> list[tf.Tensor]:
    """Gray+alpha or RGB+alpha uint8 ``[H, W, C]`` to ``(255 - color) * alpha`` of each color
    channel, exact in uint16: ``[[H, W, 1]]`` for gray, ``[[H, W, 2] (red, blue),
    [H, W, 2] (green, alpha's own product)]`` for RGB.

    Widening uint8 to uint16 with a cast is not vectorized by TensorFlow's CPU kernels and cost
    most of an RGBA image's time (20 ms for a 2000x2000 cast alone on this 2-core CPU). Instead
    each pixel's bytes are read as one 16- or 32-bit word, inverted (255 - color), and split with
    a shift and a mask into words whose 16-bit lanes hold one channel each; multiplying such a
    word by alpha multiplies every lane (a product of two bytes fits its lane), and a bitcast
    then yields uint16 channels: whole-word integer ops only, which TensorFlow vectorizes. The
    shifts depend on the machine's byte order, which the graph reads for itself, so an export
    stays right on any machine.
    """
    channels = image.shape[-1]
    word = {2: tf.uint16, 4: tf.uint32}[channels]
    little_endian = tf.equal(tf.bitcast(tf.constant([1] + [0] * (channels - 1), tf.uint8), word), 1)

    def shift(little: int, big: int) -> tf.Tensor:
        return tf.where(little_endian, tf.constant(little, word), tf.constant(big, word))

    words = tf.bitcast(image, word)
    alpha = tf.bitwise.bitwise_and(tf.bitwise.right_shift(words, shift(8 * (channels - 1), 0)),
                                   tf.constant(0xFF, word))
    inverted = tf.bitwise.invert(words)
    if channels == 2:
        gray = tf.bitwise.bitwise_and(tf.bitwise.right_shift(inverted, shift(0, 8)), tf.constant(0xFF, word))
        return [tf.expand_dims(gray * alpha, -1)]
    lanes = tf.constant(0x00FF00FF, word)
    # Bytes 0 and 2 of each pixel (red, blue), then bytes 1 and 3 (green, alpha), in memory order.
    return [tf.bitcast(tf.bitwise.bitwise_and(tf.bitwise.right_shift(inverted, shift(s, 8 - s)), lanes) * alpha,
                       tf.uint16) for s in (0, 8)]


def _letterbox_premultiplied(image: tf.Tensor, planes: list[tf.Tensor]) -> list[tf.Tensor]:
    """:func:`_premultiplied_planes` ``planes`` of gray+alpha or RGB+alpha ``image`` on the
    canvas that ``pad`` gives the image composited onto white: the background colour is read
    from the composited border alone, and the margins hold its opaque premultiplied value."""
    frame = border_pixels(image)
    colour = background_colour(_composite_on_white(frame[:, :-1], frame[:, -1:]))
    inverse = (255 - tf.cast(colour, tf.uint16)) * 255
    if len(planes) == 1:
        fills = [inverse]
    else:  # the planes' lanes: (red, blue) and (green, alpha's product, dropped after the resize)
        fills = [tf.stack([inverse[0], inverse[2]]), tf.stack([inverse[1], tf.constant(0, tf.uint16)])]
    return [pad_square(plane, fill) for plane, fill in zip(planes, fills)]


def _resize_composited(image: tf.Tensor, size: int, mode: str) -> tf.Tensor:
    """Gray+alpha or RGB+alpha uint8 to the RGB that :func:`resize_rgb` would make of it
    composited onto white, without a full-size float pass.

    Compositing is 255 - (255 - color) * alpha / 255, and both resize filters are weighted
    averages, so the resize can run on the premultiplied (255 - color) * alpha (exact in
    uint16, :func:`_premultiplied_planes`) and the rest on the small result. It skips the
    rounding to uint8 at full size, so a pixel can differ from compositing first by one grey
    level.
    """
    if mode == "crop":
        image = _center_square(image)
    planes = _premultiplied_planes(image)
    if mode == "pad":
        planes = _letterbox_premultiplied(image, planes)
    planes = _resize_planes(planes, size)
    if len(planes) == 1:
        premultiplied = _gray_to_rgb(planes[0])
    else:
        red_blue, green_alpha = planes
        premultiplied = tf.stack([red_blue[..., 0], green_alpha[..., 0], red_blue[..., 1]], axis=-1)
    return _to_uint8(255.0 - premultiplied * (1.0 / 255.0))


@_graph_ready
def load_image(encoded: tf.Tensor, size: int, mode: str = "squash", source: str | None = None) -> tf.Tensor:
    """Encoded bytes to the model's input: uint8 ``[size, size, 3]``. ``source`` names the file
    in the error for an animated WebP (see :func:`decode_rgb`).

    The pixels are :func:`resize_rgb` of :func:`decode_rgb`'s, with two shortcuts: a JPEG whose
    short side is at least twice ``size`` is decoded straight to a smaller scale (1/2, 1/4 or
    1/8, never below ``size``), and an image with alpha is composited after the resize
    (:func:`_resize_composited`).
    """
    encoded, guard = _animated_webp_guard(encoded, source)
    out = _decode(encoded, size, guard, *_resized_at(size, mode))
    out.set_shape([size, size, 3])
    return out


@_graph_ready
def load_jpeg(encoded: tf.Tensor, size: int, mode: str = "squash") -> tf.Tensor:
    """:func:`load_image` for bytes already known to be a JPEG (the data check read their
    format): the same pixels, without the format dispatch.

    That dispatch is a ``tf.cond`` whose untaken branch (the decoders of every other format)
    still costs a ``tf.data`` map about 0.4 ms an image on a 2-core CPU, a third of decoding a
    typical catalogue photo (BENCHMARKS.md, "Input pipeline"). Bytes that are not a JPEG fail
    to decode (``InvalidArgumentError``).
    """
    out = resize_rgb(_decode_jpeg(encoded, size), size, mode)
    out.set_shape([size, size, 3])
    return out


@_graph_ready
def load_other(encoded: tf.Tensor, size: int, mode: str = "squash", source: str | None = None) -> tf.Tensor:
    """:func:`load_image` for bytes the data check found to be a PNG, GIF, BMP or WebP: the same
    pixels, without the JPEG branch of the format dispatch (a smaller graph for ``tf.data`` to
    build and instantiate). An animated WebP is refused as :func:`load_image` refuses it.
    """
    encoded, guard = _animated_webp_guard(encoded, source)
    out = _decode_other(encoded, guard, *_resized_at(size, mode))
    out.set_shape([size, size, 3])
    return out


# --------------------------------------------------------------------------------------------
# Image sizes from the header, in the graph: jewelclf.data.formats.image_dimensions, op for op


def _bytes_at(encoded: tf.Tensor, pos: tf.Tensor, n: int) -> tf.Tensor:
    """int32 ``[m, n]``: ``n`` bytes of each of the ``[m]`` strings from its own ``pos``, zeros
    past the end; only ``n`` bytes of each string are copied."""
    start = tf.minimum(pos, tf.strings.length(encoded))
    chunk = tf.strings.substr(encoded, start, tf.fill(tf.shape(encoded), n))
    padded = tf.strings.substr(tf.strings.join([chunk, tf.constant(b"\x00" * n)]), 0, n)
    out = tf.cast(tf.reshape(tf.io.decode_raw(padded, tf.uint8), [-1, n]), tf.int32)
    out.set_shape([encoded.shape[0], n])
    return out


def _int(b: tf.Tensor, start: int, n: int, big: bool = False) -> tf.Tensor:
    """Unsigned int64 of bytes ``start..start+n`` of each row of ``b``."""
    order = range(start, start + n) if big else range(start + n - 1, start - 1, -1)
    out = tf.zeros_like(b[:, 0], tf.int64)
    for i in order:
        out = out * 256 + tf.cast(b[:, i], tf.int64)
    return out


def _isin(x: tf.Tensor, values) -> tf.Tensor:
    return tf.reduce_any(tf.equal(x[:, None], tf.constant(list(values), x.dtype)[None, :]), axis=1)


def _jpeg_dimensions(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``formats._jpeg_size`` on every string at once, one step of the walk per loop turn."""
    length = tf.strings.length(encoded)
    unknown = tf.fill(tf.shape(encoded), tf.constant(-1, tf.int64))

    def step(i, pos, done, width, height):
        b = _bytes_at(encoded, pos, 9)
        ff, marker = tf.equal(b[:, 0], 0xFF), b[:, 1]
        short = pos + 2 > length
        sof = ff & _isin(marker, JPEG_SOF_MARKERS)
        found = ~done & ~short & sof & (pos + 9 <= length)
        width = tf.where(found, _int(b, 7, 2, big=True), width)
        height = tf.where(found, _int(b, 5, 2, big=True), height)
        stop = short | sof | (ff & _isin(marker, (0xD9, 0xDA)))
        advance = tf.where(~ff | tf.equal(marker, 0xFF), 1,
                           tf.where(_isin(marker, (0x00, *JPEG_BARE_MARKERS)), 2,
                                    2 + tf.cast(_int(b, 2, 2, big=True), tf.int32)))
        done_now = done | stop
        return i + 1, tf.where(done_now, pos, pos + advance), done_now, width, height

    _, _, _, width, height = tf.while_loop(
        lambda i, pos, done, *_: (i < JPEG_MAX_STEPS) & tf.reduce_any(~done), step,
        (tf.constant(0), tf.fill(tf.shape(encoded), 2), ~_is_jpeg(encoded), unknown, unknown))
    return width, height


@_graph_ready
def header_dimensions(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """In-graph :func:`jewelclf.data.formats.image_dimensions` for a ``[m]`` string tensor:
    int64 ``width`` and ``height`` ``[m]`` that the headers claim, -1 where unknown (no
    supported format, or a header cut short). Nothing is decoded and no op can fail, so it
    runs before the decoders, outside ``tf.data``'s ``ignore_errors``."""
    length = tf.cast(tf.strings.length(encoded), tf.int64)
    b = _bytes_at(encoded, tf.zeros(tf.shape(encoded), tf.int32), 30)
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 0, 30), tf.constant(b"\x00" * 30)]), 0, 30)

    def tag(pos: int, value: bytes) -> tf.Tensor:
        return tf.equal(tf.strings.substr(head, pos, len(value)), value)

    def signed32(start: int) -> tf.Tensor:
        v = _int(b, start, 4)
        return tf.abs(tf.where(v >= 2**31, v - 2**32, v))

    core_bmp = tf.equal(_int(b, 14, 4), 12)  # OS/2 BITMAPCOREHEADER: 16-bit sides
    vp8l = _int(b, 21, 4)
    webp = tag(0, b"RIFF") & tag(8, b"WEBP")
    cases = [  # (applies, width, height), in image_dimensions' order
        (tag(0, b"\x89PNG\r\n\x1a\n") & tag(12, b"IHDR") & (length >= 24), _int(b, 16, 4, True), _int(b, 20, 4, True)),
        ((tag(0, b"GIF87a") | tag(0, b"GIF89a")) & (length >= 10), _int(b, 6, 2), _int(b, 8, 2)),
        (tag(0, b"BM") & (length >= 26), tf.where(core_bmp, _int(b, 18, 2), signed32(18)),
         tf.where(core_bmp, _int(b, 20, 2), signed32(22))),
        (webp & tag(12, b"VP8 ") & tag(23, b"\x9d\x01\x2a") & (length >= 30),
         tf.bitwise.bitwise_and(_int(b, 26, 2), 0x3FFF), tf.bitwise.bitwise_and(_int(b, 28, 2), 0x3FFF)),
        (webp & tag(12, b"VP8L") & tf.equal(b[:, 20], 0x2F) & (length >= 25),
         1 + tf.bitwise.bitwise_and(vp8l, 0x3FFF),
         1 + tf.bitwise.bitwise_and(tf.bitwise.right_shift(vp8l, 14), 0x3FFF)),
        (webp & tag(12, b"VP8X") & (length >= 30), 1 + _int(b, 24, 3), 1 + _int(b, 27, 3)),
    ]
    width, height = _jpeg_dimensions(encoded)
    for hit, w, h in cases:
        width, height = tf.where(hit, w, width), tf.where(hit, h, height)
    return width, height


def _format_names(encoded: tf.Tensor) -> tf.Tensor:
    """:func:`sniff_format` of each string ("" when none)."""
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 0, 16), tf.constant(b"\x00" * 16)]), 0, 16)

    def tag(pos: int, value: bytes) -> tf.Tensor:
        return tf.equal(tf.strings.substr(head, pos, len(value)), value)

    names = tf.fill(tf.shape(encoded), "")
    for name, hit in reversed([("JPEG", tag(0, b"\xff\xd8\xff")), ("PNG", tag(0, b"\x89PNG\r\n\x1a\n")),
                               ("GIF", tag(0, b"GIF87a") | tag(0, b"GIF89a")), ("BMP", tag(0, b"BM")),
                               ("WEBP", tag(0, b"RIFF") & tag(8, b"WEBP"))]):
        names = tf.where(hit, tf.constant(name), names)
    return names


@_graph_ready
def size_refusals(encoded: tf.Tensor, max_pixels: int, min_side: int) -> tuple[tf.Tensor, tf.Tensor]:
    """In-graph :func:`jewelclf.data.formats.header_problem` for a ``[m]`` string tensor:
    ``refused`` (bool ``[m]``) and its ``reason`` (string ``[m]``, the very wording of the data
    check; "" where not refused). Bytes of no supported format are not refused here."""
    width, height = header_dimensions(encoded)
    fmt = _format_names(encoded)
    pixels = width * height
    size = tf.strings.join([tf.strings.as_string(width), "x", tf.strings.as_string(height), " px"])
    rules = [  # the first that applies gives the reason: size_problem's order
        (tf.not_equal(fmt, "") & (width < 0),
         tf.strings.join(["corrupt or truncated ", fmt, f" image: {NO_SIZE_REASON}"])),
        (pixels > max_pixels,
         tf.strings.join(["too large: ", size, (f" is over data.max_pixels={max_pixels}; "
                                                f"downscale it or raise the limit")])),
        (pixels > DECODER_MAX_PIXELS,
         tf.strings.join(["too large: ", size, (f" is over the {DECODER_MAX_PIXELS} px TensorFlow "
                                                f"can decode; downscale it")])),
        ((width >= 0) & (tf.minimum(width, height) < min_side),
         tf.strings.join(["too small: ", size, f", under data.min_image_side={min_side}"])),
    ]
    reason = tf.fill(tf.shape(encoded), "")
    for hit, text in reversed(rules):
        reason = tf.where(hit, text, reason)
    return tf.not_equal(reason, ""), reason
