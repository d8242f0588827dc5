"""The SavedModel's serving graph: in-graph decoding, the three signatures and their contract.

``serving_default`` and ``embed`` decode encoded images inside the graph with training's own
functions (bad items answered ``valid`` false, never failing the batch); ``serving_pixels``
resizes decoded pixels. :func:`build_archive` assembles them into a Keras ``ExportArchive``;
:func:`check_signature_contract` checks what a client of the documented contract sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from jewelclf.export.layout import (
    EMBED_OUTPUT,
    INPUT_IMAGES,
    INPUT_PIXELS,
    SERVING_DEFAULT,
    SERVING_EMBED,
    SERVING_PIXELS,
)
from jewelclf.runs import RunModel

DECODE_PARALLELISM = 4


def _sniff_batch(images):
    """In-graph magic-number check: the format name of each item ("" when unknown)."""
    import tensorflow as tf

    padded = tf.strings.join([images, tf.constant(b"\x00" * 16)])  # substr must stay in range

    def head(pos, n):
        return tf.strings.substr(padded, pos, n)

    checks = [
        ("JPEG", tf.equal(head(0, 3), b"\xff\xd8\xff")),
        ("PNG", tf.equal(head(0, 8), b"\x89PNG\r\n\x1a\n")),
        ("GIF", tf.logical_or(tf.equal(head(0, 6), b"GIF87a"), tf.equal(head(0, 6), b"GIF89a"))),
        ("BMP", tf.equal(head(0, 2), b"BM")),
        ("WebP", tf.logical_and(tf.equal(head(0, 4), b"RIFF"), tf.equal(head(8, 4), b"WEBP"))),
    ]
    fmt = tf.fill(tf.shape(images), "")
    for name, hit in reversed(checks):
        fmt = tf.where(hit, tf.constant(name), fmt)
    return fmt


def _diagnose(images):
    """A one-line reason for each item that could not be decoded."""
    import tensorflow as tf

    from jewelclf.data.images import ANIMATED_WEBP_REASON, animated_webp_mask

    fmt = _sniff_batch(images)
    empty = tf.equal(tf.strings.length(images), 0)
    unknown = tf.equal(fmt, "")
    reason = tf.strings.join(["corrupt or truncated ", fmt, " image: it could not be decoded"])
    reason = tf.where(animated_webp_mask(images), tf.constant(ANIMATED_WEBP_REASON), reason)
    reason = tf.where(unknown, tf.constant("not a supported image: send JPEG, PNG, GIF, BMP or "
                                           "WebP bytes (base64 in JSON: {\"b64\": ...})"), reason)
    return tf.where(empty, tf.constant("empty input: no image bytes"), reason)


def decode_batch(images, size: int, resize: str, refused=None):
    """Encoded images ``[n]`` -> uint8 ``[n, size, size, 3]`` and ``valid`` ``[n]``.

    Each item goes through :func:`jewelclf.data.images.load_image` (training's function) in a
    ``tf.data`` pipeline whose ``ignore_errors`` drops the items the decoder rejects, so one bad
    image cannot fail the others: an error raised by an op cannot be caught inside a graph any
    other way. Dropped items come back as zero pixels with ``valid`` false.

    Animated WebPs are filtered out from their header bytes before the decoder sees them:
    TensorFlow's decoder aborts the whole process (TF Serving included) on one, which no
    ``ignore_errors`` can catch. (``load_image`` asserts the same before decoding.) So are the
    items where ``refused`` (bool ``[n]``) is true: those whose header claims a size outside the
    run's limits (:func:`jewelclf.data.images.size_refusals`), which are never decoded.
    """
    import tensorflow as tf

    from jewelclf.data.images import animated_webp_mask, load_image

    n = tf.shape(images)[0]
    index = tf.range(n, dtype=tf.int32)
    blocked = animated_webp_mask(images)
    if refused is not None:
        blocked = tf.logical_or(blocked, refused)
    ds = tf.data.Dataset.from_tensor_slices((index, images, blocked))
    ds = ds.filter(lambda i, b, skip: tf.logical_not(skip))
    ds = ds.map(lambda i, b, skip: (i, load_image(b, size, resize)),
                num_parallel_calls=DECODE_PARALLELISM, deterministic=True)
    ds = ds.ignore_errors()
    # One sentinel element keeps the batch non-empty when every item fails.
    sentinel = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int32), tf.zeros([size, size, 3], tf.uint8)))
    got_index, got_pixels = ds.concatenate(sentinel).batch(2**31 - 1).get_single_element()
    keep = got_index >= 0
    got_index = tf.boolean_mask(got_index, keep)
    got_pixels = tf.boolean_mask(got_pixels, keep)
    pixels = tf.scatter_nd(got_index[:, None], got_pixels, tf.stack([n, size, size, 3]))
    valid = tf.scatter_nd(got_index[:, None], tf.ones_like(got_index, tf.bool), n[None])
    return pixels, valid


def resize_batch(pixels, size: int, resize: str):
    """uint8 ``[n, H, W, 3]`` of any size -> uint8 ``[n, size, size, 3]`` (training's resize)."""
    import tensorflow as tf

    from jewelclf.data.images import resize_rgb

    return tf.map_fn(lambda im: resize_rgb(im, size, resize), pixels,
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))


def run_on_valid_rows(fn: Callable, x, valid, dim: int):
    """``fn`` (a batch ``[m, ...]`` -> ``[m, dim]``) on the rows of ``x`` where ``valid`` is true,
    scattered back into a float32 ``[n, dim]`` tensor that is zero on the other rows.

    ``fn`` never sees an invalid row, and never runs at all when no row is valid (an empty
    request included): oneDNN's Conv2D on a zero-row batch inside a graph returns a tensor of
    the wrong shape on some CPUs (AVX512-FP16 Xeons), which fails the request.
    """
    import tensorflow as tf

    shape = tf.stack([tf.shape(x)[0], dim])
    rows = tf.cast(tf.where(valid)[:, 0], tf.int32)

    def run():
        out = tf.cast(fn(tf.gather(x, rows)), tf.float32)
        return tf.scatter_nd(rows[:, None], out, shape)

    out = tf.cond(tf.size(rows) > 0, run, lambda: tf.zeros(shape, tf.float32))
    out.set_shape([None, dim])
    return out


def classifier(run: RunModel, reference, review_threshold: float | None, tta: str = "none") -> Callable:
    """``classify(pixels, valid)``: the classifying signatures' outputs for uint8 ``pixels``
    ``[n, S, S, 3]`` (rows where ``valid`` is false are never run, and answer zeros).

    ``tta="flip"`` answers the probabilities averaged over a horizontal flip, then calibrated
    (:func:`jewelclf.modeling.tta.flip_tta`: two passes of the network per image); the unknown
    score stays on the unflipped pixels' features.

    ``reference`` (:class:`jewelclf.evaluation.reference.UnknownReference`) gives
    ``unknown_score`` and its threshold; ``review_threshold`` is the calibrated confidence
    below which an image needs review (``None``: confidence alone never sends one there). The
    returned function's ``tracked`` attribute is the layer holding the reference's vectors.
    """
    import tensorflow as tf

    from jewelclf.modeling.confidence import NearestDistance, TemperatureScaling
    from jewelclf.modeling.tta import scoring_model

    names, k = list(run.class_names), run.k
    both = scoring_model(run.model, tta, with_features=True)  # probabilities and pooled features
    n, dim = len(names), int(both.output["features"].shape[-1])
    scaling = TemperatureScaling(run.temperature, name="calibration")
    nearest = NearestDistance(reference.train, name="unknown_reference")
    unknown_threshold = reference.threshold

    def probabilities_and_features(pixels):
        out = both(tf.cast(pixels, tf.float32), training=False)
        return tf.concat([tf.cast(out["probabilities"], tf.float32),
                          tf.cast(out["features"], tf.float32)], axis=1)

    def classify(pixels, valid):
        raw = run_on_valid_rows(probabilities_and_features, pixels, valid, n + dim)
        # Invalid rows stay zero in every numeric output; they always need review.
        probs = tf.where(valid[:, None], scaling(raw[:, :n]), 0.0)
        unknown = tf.where(valid, nearest(raw[:, n:]), 0.0)
        scores, top = tf.math.top_k(probs, k=k)
        classes = tf.gather(tf.constant(names, tf.string), top)
        classes = tf.where(valid[:, None], classes, tf.constant(""))
        confidence = scores[:, 0]
        review = tf.logical_not(valid)
        if review_threshold is not None:
            review = tf.logical_or(review, confidence < review_threshold)
        if unknown_threshold is not None:
            review = tf.logical_or(review, unknown > unknown_threshold)
        return {"probabilities": probs, "classes": classes, "scores": scores, "valid": valid,
                "confidence": confidence, "needs_review": review, "unknown_score": unknown}

    classify.tracked = nearest
    return classify


def build_archive(run: RunModel, reference, review_threshold: float | None, tta: str = "none"):
    """The ExportArchive with the three signatures (not yet written); ``reference`` and
    ``review_threshold`` decide ``unknown_score`` and ``needs_review``, ``tta`` the classifying
    signatures' test-time augmentation (:func:`classifier`). ``embed`` never has any: its
    vectors must match an index built with ``jewelclf index``."""
    import keras
    import tensorflow as tf

    from jewelclf.data.images import animated_webp_mask, size_refusals

    model, size, resize = run.model, run.image_size, run.resize
    embedder = run.embedder()  # shares model's layers and variables: nothing more to track
    embed_dim = int(embedder.output.shape[-1])
    classify = classifier(run, reference, review_threshold, tta)

    def decode(images):
        # The header's size first: a 875 KB PNG can claim 15000x15000 (900 MB decoded).
        refused, size_reason = size_refusals(images, run.limits["max_pixels"], run.limits["min_image_side"])
        pixels, valid = decode_batch(images, size, resize, refused)
        by_size = tf.logical_and(refused, tf.logical_not(animated_webp_mask(images)))  # that reason first
        return pixels, valid, tf.where(valid, tf.constant(""),
                                       tf.where(by_size, size_reason, _diagnose(images)))

    def network(fn):
        return lambda pixels: fn(tf.cast(pixels, tf.float32), training=False)

    def serve_images(images):
        pixels, valid, error = decode(images)
        out = classify(pixels, valid)
        out["error"] = error
        return out

    def serve_embed(images):
        pixels, valid, error = decode(images)
        vectors = run_on_valid_rows(network(embedder), pixels, valid, embed_dim)
        return {EMBED_OUTPUT: vectors, "valid": valid, "error": error}

    def serve_pixels(pixels):
        resized = resize_batch(pixels, size, resize)
        valid = tf.ones(tf.shape(pixels)[:1], tf.bool)
        out = classify(resized, valid)
        out["error"] = tf.fill(tf.shape(valid), "")
        return out

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(classify.tracked)
    archive.add_endpoint(SERVING_DEFAULT, serve_images,
                         input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_IMAGES)])
    archive.add_endpoint(SERVING_PIXELS, serve_pixels,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_PIXELS)])
    archive.add_endpoint(SERVING_EMBED, serve_embed,
                         input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_IMAGES)])
    return archive


def embedding_info(run: RunModel) -> dict[str, Any]:
    """What identifies the ``embed`` vectors: compare with an index's ``meta.json``."""
    from jewelclf import runs as rd
    from jewelclf.modeling.embedding import embedding_dim

    info = {"layer": run.embed_layer, "dim": embedding_dim(run.model, run.embed_layer),
            "metric": "cosine (dot product of unit vectors)"}
    model_file = Path(run.run_dir) / rd.MODEL
    if model_file.is_file():  # the index records the same (meta.json "model" "sha256")
        from jewelclf.search.model_ref import model_fingerprint

        info["model_sha256"] = model_fingerprint(model_file)["sha256"]
    return info


def check_signature_contract(signatures: dict[str, Any], n_classes: int, k: int,
                             embed_dim: int | None = None) -> list[str]:
    """Problems with the listed signatures, as a client of the documented contract sees them."""
    want_outputs = {"probabilities": ("float32", [None, n_classes]), "classes": ("string", [None, k]),
                    "scores": ("float32", [None, k]), "valid": ("bool", [None]), "error": ("string", [None]),
                    "confidence": ("float32", [None]), "needs_review": ("bool", [None]),
                    "unknown_score": ("float32", [None])}
    want = {SERVING_DEFAULT: ({INPUT_IMAGES: ("string", [None])}, want_outputs),
            SERVING_PIXELS: ({INPUT_PIXELS: ("uint8", [None, None, None, 3])}, want_outputs)}
    if embed_dim is not None:
        want[SERVING_EMBED] = ({INPUT_IMAGES: ("string", [None])},
                               {EMBED_OUTPUT: ("float32", [None, embed_dim]), "valid": ("bool", [None]),
                                "error": ("string", [None])})
    problems = []
    for name, (inputs, outputs) in want.items():
        sig = signatures.get(name)
        if sig is None:
            problems.append(f"signature {name} is missing")
            continue
        got_in = {k_: (v["dtype"], v["shape"]) for k_, v in sig["inputs"].items()}
        if got_in != {k_: (d, s) for k_, (d, s) in inputs.items()}:
            problems.append(f"{name} inputs are {got_in}, expected {inputs}")
        got_out = {k_: (v["dtype"], v["shape"]) for k_, v in sig["outputs"].items()}
        if got_out != outputs:
            problems.append(f"{name} outputs are {got_out}, expected {outputs}")
    return problems
