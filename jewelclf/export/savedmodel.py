"""Export a finished run: what the user ships.

``savedmodel``
    TensorFlow Serving's layout, ``<output>/<VERSION>/saved_model.pb`` + ``variables/``, built
    with Keras' :class:`keras.export.ExportArchive`. Two classifying signatures:

    - ``serving_default``: ``images``, a ``[batch]`` string tensor of encoded JPEG/PNG/GIF/BMP/
      WebP bytes. Decoding, resizing and the backbone's preprocessing run inside the graph, with
      the very functions training used (:func:`jewelclf.data.images.load_image`). An animated
      WebP, on which TensorFlow's decoder aborts the process, is recognised from its header
      bytes and answered ``valid`` false without being decoded. So is an image whose header
      claims more pixels than the run's ``data.max_pixels`` or a side under its
      ``data.min_image_side`` (both recorded in ``assets.extra/jewelclf.json``), with the data
      check's reason: a PNG of a few hundred KB can claim 15000x15000, 900 MB decoded.
    - ``serving_pixels``: ``pixels``, uint8 ``[batch, H, W, 3]`` of any size, resized in the graph.

    Both return ``probabilities`` (float32 ``[batch, classes]``), ``classes`` (string
    ``[batch, k]``, class names best first), ``scores`` (float32 ``[batch, k]``), ``valid`` (bool
    ``[batch]``) and ``error`` (string ``[batch]``, empty when valid). The class names are a
    constant of the graph, and also sit in ``assets.extra/jewelclf.json`` for local tools.

    A third signature, ``embed``, serves visual search: the same ``images`` input, decoded like
    ``serving_default``, and ``embedding`` (float32 ``[batch, D]``, L2-normalised), ``valid`` and
    ``error``. The vector is :func:`jewelclf.modeling.embedding.embedding_model` of the run's model, the
    very function ``jewelclf index`` embeds a catalogue with (layer ``pool`` by default), so a
    served query vector can be searched against an index of the same model. Invalid items get a
    zero vector.

    A version is written into a hidden temp folder beside the versions, checked in a fresh
    Python process that does not import jewelclf (parity with the Keras model), and only then
    renamed into place, so TF Serving never sees half a model and a failed check leaves nothing.
    The temp folder is locked while its export lives, so exports from other hosts sharing the
    folder leave it alone, and it holds the parity check's files too; the parity process dies
    with the export (:mod:`jewelclf.export.staging`).

``tflite``
    One ``model_<mode>.tflite`` per quantization mode, through Keras' LiteRT exporter (TF's
    converter). Input: float32 pixels 0..255 ``[batch, S, S, 3]`` (decode and resize on the
    device); output: probabilities.

``keras``
    A copy of ``model.keras`` with the class names and input description beside it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from jewelclf import fsio
from jewelclf.errors import JewelclfError
from jewelclf.export.staging import (  # noqa: F401  (TMP_PREFIX: re-exported)
    PARENT_ENV,
    TMP_PREFIX,
    WATCH_PARENT,
    Staging,
    cleanup_stale,
    rename_noreplace,
)
from jewelclf.runs import DEFAULT_EMBED_LAYER, RunModel, load_run

Log = Callable[[str], None]

FORMATS = ("savedmodel", "tflite", "keras")
QUANTIZE_MODES = ("none", "float16", "dynamic", "int8")
SERVING_DEFAULT = "serving_default"
SERVING_PIXELS = "serving_pixels"
SERVING_EMBED = "embed"
INPUT_IMAGES = "images"
INPUT_PIXELS = "pixels"
OUTPUT_KEYS = ("probabilities", "classes", "scores", "valid", "error")
EMBED_OUTPUT = "embedding"
EMBED_OUTPUT_KEYS = (EMBED_OUTPUT, "valid", "error")
"""The embedding of the ``embed`` signature: ``jewelclf index``'s default ``--layer``."""
REPORT = "export_report.json"
FAILED_REPORT = "export_report.failed.json"
MODELS_CONFIG = "models.config"
BATCHING_PARAMETERS = "batching_parameters.txt"
INFO = "jewelclf.json"
"""Input description and class names: ``assets.extra/jewelclf.json`` in a SavedModel, and
beside the model file in ``tflite``/``keras`` exports."""
CLASS_NAMES = "class_names.json"
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 8
REPRESENTATIVE_IMAGES = 64
DECODE_PARALLELISM = 4


# --------------------------------------------------------------------------------------------
# The finished run


def require_tensorflow_backend() -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise JewelclfError(
            f"export needs the TensorFlow Keras backend, but KERAS_BACKEND is "
            f"'{keras.backend.backend()}'; run it with KERAS_BACKEND=tensorflow"
        )


def default_output(run_dir: Path, fmt: str) -> Path:
    """``exported_models/<run dir name>`` (SavedModel), or ``..._tflite`` / ``..._keras``."""
    name = Path(run_dir).resolve().name or "model"
    suffix = {"savedmodel": "", "tflite": "_tflite", "keras": "_keras"}[fmt]
    return Path("exported_models") / f"{name}{suffix}"


# --------------------------------------------------------------------------------------------
# Real images of the run, for the parity check and the int8 representative dataset


@dataclass
class LabelledImage:
    key: str
    label: str
    data: bytes


def _read_splits(run_dir: Path) -> list[dict[str, str]]:
    from jewelclf.runs import SPLITS

    path = Path(run_dir) / SPLITS
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _round_robin(rows: list, label_of: Callable[[Any], str], n: int) -> list:
    """Up to ``n`` items, taking one of each label in turn (stable, deterministic)."""
    by_label: dict[str, list] = {}
    for r in rows:
        by_label.setdefault(label_of(r), []).append(r)
    out: list = []
    queues = [by_label[k] for k in sorted(by_label)]
    i = 0
    while len(out) < n and any(i < len(q) for q in queues):
        for q in queues:
            if i < len(q) and len(out) < n:
                out.append(q[i])
        i += 1
    return out


def _read_records(source, records, cfg) -> list[tuple[Any, bytes | None, str]]:
    """(record, bytes or None, reason) for each record, checked with the training data check
    under ``cfg`` (the run's :class:`jewelclf.config.DataConfig`: its pixel and side limits)."""
    from jewelclf.data.pipeline import tfds_bytes
    from jewelclf.data.validate import check_records

    if source.tfds is not None:
        pairs = list(tfds_bytes(source)(records))
        from jewelclf.data.validate import check_bytes

        return [(r, b, "") if check_bytes(r, b, cfg.max_pixels, cfg.min_image_side).ok
                else (r, None, "unreadable") for r, b in pairs]
    checks = check_records(records, cfg.max_pixels, cfg.min_image_side, cfg.check_workers)
    out = []
    for c in checks:
        if not c.ok:
            out.append((c.record, None, c.reason))
            continue
        with open(c.record.path, "rb") as f:
            out.append((c.record, f.read(), ""))
    return out


def run_images(run: RunModel, splits: Iterable[str], n: int, data_spec: str | None = None) -> list[LabelledImage]:
    """Up to ``n`` readable images of the run's data, from the first of ``splits`` that has any,
    spread over the classes. ``data_spec`` overrides the run's data (all of it is used)."""
    from jewelclf.data.sources import load_source

    if data_spec is not None:
        source = load_source(data_spec)
        candidates = [r for r in source.records if r.label in run.class_names]
    else:
        # data_path is absolute (fit's "data" may be relative to the folder fit ran in)
        spec = run.info.get("data_path") or run.info.get("data")
        if not spec:
            raise JewelclfError(f"'{run.run_dir}/run_info.json' does not name the training data; "
                                f"pass --parity-data DATA")
        try:
            source = load_source(spec)
        except JewelclfError as e:
            raise JewelclfError(f"the run's data '{spec}' cannot be read ({e}); pass "
                                f"--parity-data DATA with a few labelled images") from None
        by_key = {r.key: r for r in source.records}
        rows = _read_splits(run.run_dir)
        candidates = []
        for split in splits:
            chosen = [by_key[r["path"]] for r in rows if r.get("split") == split and r.get("path") in by_key]
            if chosen:
                candidates = chosen
                break
        if not candidates:  # no split manifest: any record of the data
            candidates = [r for r in source.records if r.label in run.class_names]
    picked = _round_robin(candidates, lambda r: r.label, max(n * 2, n + 4))
    out = []
    for rec, data, _ in _read_records(source, picked, run.config.data):
        if data is not None and len(out) < n:
            out.append(LabelledImage(rec.key, rec.label, data))
    if not out:
        raise JewelclfError(f"no readable images found in the data of '{run.run_dir}' for the "
                            f"export checks; pass --parity-data DATA with a few labelled images")
    return out


def keras_pixels(encoded: list[bytes], size: int, resize: str) -> np.ndarray:
    """uint8 ``[n, size, size, 3]``: exactly what training feeds the model (before float32)."""
    import tensorflow as tf

    from jewelclf.data.images import load_image

    if not encoded:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([load_image(tf.constant(b), size, resize).numpy() for b in encoded])


def keras_probabilities(model, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The Keras model's probabilities on uint8 pixels (cast to float32, as training does)."""
    if len(pixels) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.concatenate([
        np.asarray(model(pixels[i:i + batch_size].astype(np.float32), training=False), np.float32)
        for i in range(0, len(pixels), batch_size)])


def keras_embeddings(embedder, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The Keras embedding's unit vectors on uint8 pixels (cast to float32, as ``index`` does)."""
    dim = int(embedder.output.shape[-1])
    if len(pixels) == 0:
        return np.zeros((0, dim), np.float32)
    return np.concatenate([
        np.asarray(embedder(pixels[i:i + batch_size].astype(np.float32), training=False), np.float32)
        for i in range(0, len(pixels), batch_size)])


# --------------------------------------------------------------------------------------------
# The serving graph


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


def build_archive(run: RunModel):
    """The ExportArchive with the three signatures (not yet written)."""
    import keras
    import tensorflow as tf

    from jewelclf.data.images import animated_webp_mask, size_refusals

    model, size, resize, k = run.model, run.image_size, run.resize, run.k
    names = list(run.class_names)
    embedder = run.embedder()  # shares model's layers and variables: nothing more to track
    embed_dim = int(embedder.output.shape[-1])

    def decode(images):
        # The header's size first: a 875 KB PNG can claim 15000x15000 (900 MB decoded).
        refused, size_reason = size_refusals(images, run.limits["max_pixels"], run.limits["min_image_side"])
        pixels, valid = decode_batch(images, size, resize, refused)
        by_size = tf.logical_and(refused, tf.logical_not(animated_webp_mask(images)))  # that reason first
        return pixels, valid, tf.where(valid, tf.constant(""),
                                       tf.where(by_size, size_reason, _diagnose(images)))

    def network(fn):
        return lambda pixels: fn(tf.cast(pixels, tf.float32), training=False)

    def classify(pixels, valid):
        probs = run_on_valid_rows(network(model), pixels, valid, len(names))
        scores, top = tf.math.top_k(probs, k=k)
        classes = tf.gather(tf.constant(names, tf.string), top)
        classes = tf.where(valid[:, None], classes, tf.constant(""))
        return {"probabilities": probs, "classes": classes, "scores": scores, "valid": valid}

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
        from jewelclf.search.index import model_fingerprint

        info["model_sha256"] = model_fingerprint(model_file)["sha256"]
    return info


def write_savedmodel(run: RunModel, path: Path) -> None:
    """Write the SavedModel of ``run`` into ``path`` (a new folder)."""
    build_archive(run).write_out(str(path), verbose=False)
    extra = Path(path) / "assets.extra"
    extra.mkdir(exist_ok=True)
    (extra / INFO).write_text(json.dumps({
        "format": "savedmodel", **run.describe(),
        "signatures": {
            SERVING_DEFAULT: f"{INPUT_IMAGES}: string [batch] of encoded JPEG/PNG/GIF/BMP/WebP bytes",
            SERVING_PIXELS: f"{INPUT_PIXELS}: uint8 [batch, height, width, 3] RGB, any size",
            SERVING_EMBED: f"{INPUT_IMAGES}: string [batch] of encoded JPEG/PNG/GIF/BMP/WebP bytes"},
        "outputs": list(OUTPUT_KEYS),
        "embed_outputs": list(EMBED_OUTPUT_KEYS),
        "embedding": embedding_info(run)}, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Parity, checked in a fresh process that knows nothing of jewelclf

PARITY_SCRIPT = WATCH_PARENT + textwrap.dedent(r'''
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    req = json.load(sys.stdin)
    loaded = tf.saved_model.load(req["saved_model"])

    def spec(t):
        return {"dtype": t.dtype.name, "shape": t.shape.as_list() if t.shape.rank is not None else None}

    def plain(outputs):
        out = {}
        for key, value in outputs.items():
            v = value.numpy()
            if v.dtype == object:
                v = np.vectorize(lambda s: s.decode("utf-8"), otypes=[object])(v) if v.size else v
            out[key] = v.tolist()
        return out

    signatures = {}
    for name, fn in loaded.signatures.items():
        signatures[name] = {
            "inputs": {k: spec(v) for k, v in fn.structured_input_signature[1].items()},
            "outputs": {k: spec(v) for k, v in fn.structured_outputs.items()},
        }
    arrays = np.load(req["arrays"])
    n = int(arrays["n"])
    encoded = [arrays[f"encoded_{i}"].tobytes() for i in range(n)]
    result = {"signatures": signatures}
    result["serving_default"] = plain(loaded.signatures["serving_default"](images=tf.constant(encoded)))
    pixels = loaded.signatures["serving_pixels"]
    result["serving_pixels"] = [plain(pixels(pixels=tf.constant(arrays[f"pixels_{i}"][None])))
                                for i in range(n)]
    if "embed" in loaded.signatures:
        result["embed"] = plain(loaded.signatures["embed"](images=tf.constant(encoded)))
    result["jewelclf_imported"] = any(m == "jewelclf" or m.startswith("jewelclf.") for m in sys.modules)
    print("PARITY-JSON " + json.dumps(result))
''')


def keras_pixels_from_decoded(encoded: list[bytes], size: int, resize: str) -> np.ndarray:
    """uint8 ``[n, size, size, 3]``: what ``serving_pixels`` feeds the model when a client sends
    the images fully decoded. It equals :func:`keras_pixels` except for a JPEG with a short side
    of at least ``2 * size``, which training (and ``serving_default``) decodes at a reduced DCT
    scale: pixels that are already decoded can only be resized."""
    import tensorflow as tf

    from jewelclf.data.images import decode_rgb, resize_rgb

    if not encoded:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([resize_rgb(decode_rgb(tf.constant(b)), size, resize).numpy() for b in encoded])


def run_in_fresh_process(saved_model: Path, images: list[LabelledImage], work: Path,
                         timeout: float = 600) -> dict[str, Any]:
    """Run the signatures of ``saved_model`` on ``images`` in a new Python process.

    The child imports only TensorFlow and NumPy; the decoded full-size pixels for
    ``serving_pixels`` are prepared here with jewelclf's decoder and handed over in an ``.npz``.
    """
    import tensorflow as tf

    from jewelclf.data.images import decode_rgb

    work = Path(work).resolve()  # the child runs in it: a relative path would not be found
    arrays = {"n": np.array(len(images))}
    for i, im in enumerate(images):
        arrays[f"encoded_{i}"] = np.frombuffer(im.data, np.uint8)
        arrays[f"pixels_{i}"] = decode_rgb(tf.constant(im.data)).numpy()
    npz = work / "parity_inputs.npz"
    np.savez(npz, **arrays)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env[PARENT_ENV] = str(os.getpid())  # the child kills itself when this process dies
    request = json.dumps({"saved_model": str(saved_model), "arrays": str(npz)})
    try:
        proc = subprocess.run([sys.executable, "-c", PARITY_SCRIPT], input=request, text=True, check=False,
                              capture_output=True, timeout=timeout, env=env, cwd=str(work))
    finally:
        npz.unlink(missing_ok=True)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("PARITY-JSON ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise JewelclfError(f"the exported SavedModel failed to load or run in a fresh Python "
                            f"process (exit {proc.returncode}: {tail[0][:200]}); nothing was "
                            f"exported")
    return json.loads(line[len("PARITY-JSON "):])


def compare_parity(run: RunModel, images: list[LabelledImage], child: dict[str, Any],
                   tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Compare the fresh process's signature outputs with the Keras model on the same images.

    ``serving_default`` gets the image bytes and is held to the Keras model on training's own
    pixels; ``serving_pixels`` gets the fully decoded images and is held to the Keras model on
    those pixels resized as training resizes (:func:`keras_pixels_from_decoded`).
    """
    encoded = [im.data for im in images]
    keras_probs = keras_probabilities(run.model, keras_pixels(encoded, run.image_size, run.resize))
    keras_top1 = keras_probs.argmax(axis=1)
    pixels_probs = keras_probabilities(
        run.model, keras_pixels_from_decoded(encoded, run.image_size, run.resize))
    default = child["serving_default"]
    results: dict[str, Any] = {}
    problems: list[str] = []
    candidates = {
        SERVING_DEFAULT: (default, keras_probs),
        SERVING_PIXELS: ({key: [row[key][0] for row in child["serving_pixels"]] for key in OUTPUT_KEYS},
                         pixels_probs),
    }
    for name, (out, ref) in candidates.items():
        ref_top1 = ref.argmax(axis=1)
        probs = np.asarray(out["probabilities"], np.float32).reshape(ref.shape)
        top1 = probs.argmax(axis=1)
        diff = float(np.abs(probs - ref).max()) if probs.size else 0.0
        agree = int((top1 == ref_top1).sum())
        names_ok = all(row[0] == run.class_names[t] for row, t in zip(out["classes"], ref_top1))
        scores_ok = bool(np.allclose(np.asarray(out["scores"], np.float32)[:, 0],
                                     ref.max(axis=1), atol=tolerance, rtol=0))
        valid_ok = all(bool(v) for v in out["valid"])
        results[name] = {"max_abs_diff": diff, "top1_agree": agree, "images": len(images),
                         "class_names_match": names_ok, "scores_match": scores_ok,
                         "all_valid": valid_ok}
        if agree != len(images):
            problems.append(f"{name}: top-1 differs from the Keras model on "
                            f"{len(images) - agree} of {len(images)} images")
        if not diff <= tolerance:
            problems.append(f"{name}: probabilities differ by up to {diff:.2e} (> {tolerance:g})")
        if not (names_ok and scores_ok and valid_ok):
            problems.append(f"{name}: classes/scores/valid outputs disagree with the probabilities")
    embed = compare_embed_parity(run, images, child.get(SERVING_EMBED), tolerance)
    results[SERVING_EMBED] = embed
    problems += embed.pop("problems")
    if child.get("jewelclf_imported"):
        problems.append("the fresh process imported jewelclf, so it did not test a standalone load")
    return {"passed": not problems, "problems": problems, "tolerance": tolerance,
            "fresh_process": True, "jewelclf_imported_in_fresh_process": bool(child.get("jewelclf_imported")),
            "images": [{"key": im.key, "label": im.label,
                        "keras_top1": run.class_names[int(t)]} for im, t in zip(images, keras_top1)],
            "signatures": results}


def compare_embed_parity(run: RunModel, images: list[LabelledImage], out: dict[str, Any] | None,
                         tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """The ``embed`` signature's vectors against the Keras embedding ``jewelclf index`` uses:
    largest absolute difference, smallest cosine, unit norms, all rows valid. The entry's
    ``problems`` list is for the caller to take out."""
    embedder = run.embedder()
    dim = int(embedder.output.shape[-1])
    entry: dict[str, Any] = {"layer": run.embed_layer, "dim": dim, "images": len(images)}
    if out is None:
        entry["problems"] = [f"{SERVING_EMBED}: the fresh process got no output from it (signature missing?)"]
        return entry
    ref = keras_embeddings(embedder, keras_pixels([im.data for im in images], run.image_size, run.resize))
    got = np.asarray(out[EMBED_OUTPUT], np.float32)
    problems: list[str] = []
    if got.shape != ref.shape:
        entry["problems"] = [f"{SERVING_EMBED}: embedding has shape {list(got.shape)}, expected "
                             f"{list(ref.shape)}"]
        return entry
    diff = float(np.abs(got - ref).max()) if got.size else 0.0
    cosine = (got * ref).sum(axis=1) / np.maximum(
        np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    min_cos = float(cosine.min()) if len(cosine) else 1.0
    norm_err = float(np.abs(np.linalg.norm(got, axis=1) - 1.0).max()) if len(got) else 0.0
    valid_ok = all(bool(v) for v in out["valid"])
    entry.update({"max_abs_diff": diff, "min_cosine": min_cos, "max_norm_error": norm_err,
                  "all_valid": valid_ok})
    if not diff <= tolerance:
        problems.append(f"{SERVING_EMBED}: embeddings differ from the Keras embedding by up to "
                        f"{diff:.2e} (> {tolerance:g})")
    if not 1.0 - min_cos <= tolerance:
        problems.append(f"{SERVING_EMBED}: cosine with the Keras embedding down to {min_cos:.6f} "
                        f"(< 1 - {tolerance:g})")
    if not (norm_err <= tolerance and valid_ok):
        problems.append(f"{SERVING_EMBED}: vectors are not all valid unit vectors")
    entry["problems"] = problems
    return entry


def check_signature_contract(signatures: dict[str, Any], n_classes: int, k: int,
                             embed_dim: int | None = None) -> list[str]:
    """Problems with the listed signatures, as a client of the documented contract sees them."""
    want_outputs = {"probabilities": ("float32", [None, n_classes]), "classes": ("string", [None, k]),
                    "scores": ("float32", [None, k]), "valid": ("bool", [None]), "error": ("string", [None])}
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


# --------------------------------------------------------------------------------------------
# Accuracy on a labelled folder (Keras vs. the export)


def labelled_test_images(spec: str, class_names: list[str],
                         data_cfg) -> tuple[list[Any], list[bytes], np.ndarray, int]:
    """Readable records of ``spec`` (its test split if it has one), their bytes and labels,
    checked under ``data_cfg`` (the run's data limits)."""
    from jewelclf.data.sources import load_source

    source = load_source(spec)
    source.refuse_conflicts()
    records = source.records
    if "test" in {r.split for r in records}:
        records = [r for r in records if r.split == "test"]
    unknown = sorted({r.label for r in records} - set(class_names))
    if unknown:
        raise JewelclfError(f"'{spec}' has class(es) {', '.join(unknown)} that the model was not "
                            f"trained on (it knows {', '.join(class_names)}); remove or rename them")
    read = _read_records(source, records, data_cfg)
    kept = [(r, b) for r, b, _ in read if b is not None]
    if not kept:
        raise JewelclfError(f"no readable images in '{spec}'")
    index = {c: i for i, c in enumerate(class_names)}
    y = np.array([index[r.label] for r, _ in kept], dtype=int)
    return [r for r, _ in kept], [b for _, b in kept], y, len(read) - len(kept)


def _accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == y).mean()) if len(y) else 0.0


def keras_test_probabilities(run: RunModel, encoded: list[bytes], batch_size: int = 32) -> np.ndarray:
    chunks = [keras_probabilities(run.model, keras_pixels(encoded[i:i + batch_size], run.image_size, run.resize))
              for i in range(0, len(encoded), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, len(run.class_names)), np.float32)


def savedmodel_probabilities(saved_model: Path, encoded: list[bytes], batch_size: int = 32) -> np.ndarray:
    import tensorflow as tf

    fn = tf.saved_model.load(str(saved_model)).signatures[SERVING_DEFAULT]
    out = [fn(images=tf.constant(encoded[i:i + batch_size]))["probabilities"].numpy()
           for i in range(0, len(encoded), batch_size)]
    return np.concatenate(out)


def compare_accuracy(run: RunModel, spec: str, export_probs: Callable[[list[bytes]], np.ndarray],
                     name: str, log: Log) -> dict[str, Any]:
    _, encoded, y, rejected = labelled_test_images(spec, run.class_names, run.config.data)
    log(f"accuracy check on {len(encoded)} images of '{spec}'...")
    kp = keras_test_probabilities(run, encoded)
    ep = export_probs(encoded)
    return {"data": spec, "num_examples": len(y), "rejected_files": rejected,
            "keras_accuracy": _accuracy(y, kp), f"{name}_accuracy": _accuracy(y, ep),
            "top1_agreement": float((kp.argmax(1) == ep.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(kp - ep).max())}


# --------------------------------------------------------------------------------------------
# TF Serving layout


def list_versions(base: Path) -> list[int]:
    """The version folders TF Serving would consider: children whose names are integers."""
    base = Path(base)
    if not base.is_dir():
        return []
    out = []
    for p in base.iterdir():
        if p.is_dir() and p.name.isdigit():
            out.append(int(p.name))
    return sorted(out)


def cleanup_stale_temp(base: Path, log: Log = print, now: float | None = None,
                       keep: Path | None = None) -> list[str]:
    """Delete temp folders left by exports that are gone (killed, crashed, on any host): their
    lock is free and their heartbeat old (:func:`jewelclf.export.staging.cleanup_stale`)."""
    return cleanup_stale(base, log, now, keep)


def models_config_text(name: str) -> str:
    return textwrap.dedent(f"""\
        # TensorFlow Serving ModelServerConfig (text proto), written by jewelclf export.
        # Use with: --model_config_file=/models/{name}/{MODELS_CONFIG}
        # base_path is where the docker command mounts this folder inside the container.
        # The server serves the highest numbered version folder by default.
        model_config_list {{
          config {{
            name: '{name}'
            base_path: '/models/{name}'
            model_platform: 'tensorflow'
          }}
        }}
        """)


def batching_parameters_text(cpus: int | None = None) -> str:
    cpus = cpus or os.cpu_count() or 1
    return textwrap.dedent(f"""\
        # TensorFlow Serving BatchingParameters (text proto), written by jewelclf export.
        # Use with: --enable_batching --batching_parameters_file=/models/<name>/{BATCHING_PARAMETERS}
        # CPU defaults after TF Serving's batching guide ("CPU-only: one approach"): one batch
        # thread per core ({cpus} on the exporting machine; set the serving machine's count), no
        # batching delay (0; then try 1000-10000 us). Requests of up to 256 images are accepted
        # and run as batches of at most 32, so one batch of decoded images stays small in memory.
        max_batch_size {{ value: 256 }}
        enable_large_batch_splitting {{ value: true }}
        max_execution_batch_size {{ value: 32 }}
        batch_timeout_micros {{ value: 0 }}
        max_enqueued_batches {{ value: 100 }}
        num_batch_threads {{ value: {cpus} }}
        """)


def _write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write, readable by others (a server may run as another user)."""
    from jewelclf.fsio import atomic_write_json

    atomic_write_json(path, obj)
    os.chmod(path, 0o644)


def _write_if_absent(path: Path, text: str, log: Log) -> None:
    from jewelclf.fsio import atomic_write_text

    if path.exists():
        log(f"kept the existing {path}")
        return
    atomic_write_text(path, text)
    os.chmod(path, 0o644)  # the server may run as another user
    log(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# The three formats


def export_savedmodel(run_dir: Path, output: Path | None = None, version: int | None = None,
                      test_data: str | None = None, parity_data: str | None = None,
                      log: Log = print, embed_layer: str = DEFAULT_EMBED_LAYER) -> dict[str, Any]:
    """Export ``run_dir`` as version ``version`` (default: the next) under ``output``.

    ``embed_layer`` is the embedding of the ``embed`` signature (``pool`` or ``hidden``, as
    ``jewelclf index --layer``). Returns the export report, also written as
    ``<output>/<version>/export_report.json``.
    """
    from jewelclf import runs as rd
    from jewelclf.modeling.embedding import embedding_dim

    require_tensorflow_backend()
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    run.embed_layer = embed_layer
    embed_dim = embedding_dim(run.model, embed_layer)  # a one-line error for an absent layer
    base = Path(output) if output is not None else default_output(run_dir, "savedmodel")
    if base.exists() and not base.is_dir():
        raise JewelclfError(f"--output '{base}' is a file; pass a folder (the model's base path)")
    if (base / "saved_model.pb").exists():
        raise JewelclfError(f"'{base}' is itself a SavedModel; --output names the folder that holds "
                            f"the numbered versions, e.g. exported_models/{base.name}")
    existing = list_versions(base)
    if version is None:
        version = (max(existing) + 1) if existing else 1
    elif version < 1:
        raise JewelclfError(f"--version must be a positive integer, got {version}")
    final = base / str(version)
    if final.exists():
        raise JewelclfError(f"'{final}' already exists and versions are never overwritten; pass "
                            f"--version {max(existing + [version]) + 1} or omit --version for the next one")
    images = run_images(run, ("test", "val", "train"), PARITY_IMAGES, parity_data)
    base.mkdir(parents=True, exist_ok=True)
    staging = Staging(base)  # locked and kept fresh: no cleanup on any host removes it
    tmp = staging.model
    cleanup_stale_temp(base, log, now=staging.now(), keep=staging.path)
    t0 = time.perf_counter()
    try:
        log(f"writing SavedModel version {version} of '{run_dir}' (in {staging.path.name}, "
            f"renamed when checked)")
        write_savedmodel(run, tmp)
        log(f"parity check in a fresh Python process on {len(images)} images...")
        child = run_in_fresh_process(tmp.resolve(), images, staging.parity)
        parity = compare_parity(run, images, child)
        contract = check_signature_contract(child["signatures"], len(run.class_names), run.k, embed_dim)
        if contract:
            parity["passed"] = False
            parity["problems"] += contract
        report: dict[str, Any] = {
            "format": "savedmodel", "model_name": base.resolve().name, "version": version,
            "path": str(final.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **run.describe(), "signatures": child["signatures"], "parity": parity,
            "embedding": embedding_info(run),
            "environment": rd.environment()}
        if parity["passed"] and test_data:
            report["test_accuracy"] = compare_accuracy(
                run, test_data, lambda enc: savedmodel_probabilities(tmp, enc), "savedmodel", log)
            acc = report["test_accuracy"]
            if acc["keras_accuracy"] != acc["savedmodel_accuracy"]:
                parity["passed"] = False
                parity["problems"].append(
                    f"accuracy on '{test_data}': SavedModel {acc['savedmodel_accuracy']:.4f} != "
                    f"Keras {acc['keras_accuracy']:.4f}")
        report["seconds"] = round(time.perf_counter() - t0, 1)
        if not parity["passed"]:
            _write_json(base / FAILED_REPORT, report)
            raise JewelclfError(
                f"export parity check failed ({'; '.join(parity['problems'])}); no version was "
                f"written; see {base / FAILED_REPORT}")
        _write_json(tmp / REPORT, report)
        rename_noreplace(tmp, final)
    except BaseException as e:
        if not fsio.is_disk_full(e):
            raise
        # TensorFlow says ResourceExhaustedError "...; No space left on device [Op:SaveV2]", in
        # several lines: one line instead, naming the folder TF Serving polls and the fix.
        kept = ("nothing was written" if not existing else f"version {existing[0]} is unchanged"
                if len(existing) == 1 else f"versions {', '.join(map(str, existing))} are unchanged")
        raise fsio.DiskFullError(
            f"no space left on device while writing SavedModel version {version} into '{base}' "
            f"({fsio.free_space(base)} free on that disk); the half-written copy was removed and "
            f"{kept}; free disk space, then run the command again") from None
    finally:
        staging.close()  # what is left: the lock, the parity scratch, a failed copy
    (base / FAILED_REPORT).unlink(missing_ok=True)
    log(f"wrote {final} (SavedModel, signatures {SERVING_DEFAULT}, {SERVING_PIXELS} and {SERVING_EMBED})")
    _write_if_absent(base / MODELS_CONFIG, models_config_text(base.resolve().name), log)
    _write_if_absent(base / BATCHING_PARAMETERS, batching_parameters_text(), log)
    return report


def _converter_options(mode: str, representative: Callable | None) -> dict[str, Any]:
    import tensorflow as tf

    if mode == "none":
        return {}
    if mode == "float16":
        return {"optimizations": [tf.lite.Optimize.DEFAULT],
                "target_spec": {"supported_types": [tf.float16]}}
    if mode == "dynamic":
        return {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if mode == "int8":
        return {"optimizations": [tf.lite.Optimize.DEFAULT], "representative_dataset": representative,
                "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}}
    raise JewelclfError(f"unknown --quantize mode '{mode}'; one of {', '.join(QUANTIZE_MODES)}")


def tflite_interpreter(path: Path):
    """A TFLite interpreter: LiteRT's when installed, else TensorFlow's (deprecated) one."""
    import warnings

    try:  # pragma: no cover - not installed here
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=str(path))
    return Interpreter(model_path=str(path))


def tflite_probabilities(interpreter, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run a jewelclf TFLite model on uint8 pixels ``[n, S, S, 3]``."""
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    results = []
    for i in range(0, len(pixels), batch_size):
        x = pixels[i:i + batch_size].astype(np.float32)
        if tuple(inp["shape"]) != x.shape:
            interpreter.resize_tensor_input(inp["index"], list(x.shape))
            interpreter.allocate_tensors()
            inp = interpreter.get_input_details()[0]
            out = interpreter.get_output_details()[0]
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        results.append(np.array(interpreter.get_tensor(out["index"]), np.float32))
    return np.concatenate(results) if results else np.zeros((0, 0), np.float32)


def _prepare_folder(out_dir: Path, files: list[str], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise JewelclfError(f"--output '{out_dir}' is a file; pass a folder")
    clash = [f for f in files if (out_dir / f).exists()]
    if clash and not overwrite:
        raise JewelclfError(f"'{out_dir / clash[0]}' already exists; pass --overwrite to replace "
                            f"it, or another --output")
    out_dir.mkdir(parents=True, exist_ok=True)


def export_tflite(run_dir: Path, output: Path | None = None, modes: Iterable[str] = ("none",),
                  test_data: str | None = None, parity_data: str | None = None,
                  overwrite: bool = False, log: Log = print) -> dict[str, Any]:
    """One ``model_<mode>.tflite`` per mode, with a report on size, agreement and accuracy."""
    import keras

    from jewelclf import runs as rd

    require_tensorflow_backend()
    modes = list(dict.fromkeys(QUANTIZE_MODES if "all" in modes else (modes or ["none"])))
    for m in modes:
        if m not in QUANTIZE_MODES:
            raise JewelclfError(f"unknown --quantize mode '{m}'; one of {', '.join(QUANTIZE_MODES)} or all")
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out_dir = Path(output) if output is not None else default_output(run_dir, "tflite")
    _prepare_folder(out_dir, [f"model_{m}.tflite" for m in modes], overwrite)
    images = run_images(run, ("test", "val", "train"), PARITY_IMAGES, parity_data)
    pixels = keras_pixels([im.data for im in images], run.image_size, run.resize)
    keras_probs = keras_probabilities(run.model, pixels)
    representative = None
    if "int8" in modes:
        rep_images = run_images(run, ("train", "val"), REPRESENTATIVE_IMAGES, parity_data)
        rep_pixels = keras_pixels([im.data for im in rep_images], run.image_size, run.resize)

        def _representative():
            for p in rep_pixels:
                yield [p[None].astype(np.float32)]

        representative = _representative

    test = labelled_test_images(test_data, run.class_names, run.config.data) if test_data else None
    keras_test = keras_test_probabilities(run, test[1]) if test else None
    test_pixels = None
    if test:
        test_pixels = keras_pixels(test[1], run.image_size, run.resize)
    spec = [keras.InputSpec(shape=(None, run.image_size, run.image_size, 3), dtype="float32")]
    results: dict[str, Any] = {}
    for mode in modes:
        path = out_dir / f"model_{mode}.tflite"
        log(f"converting to TFLite ({mode})...")
        t0 = time.perf_counter()
        options = _converter_options(mode, representative)

        def save(tmp, options=options):
            run.model.export(str(tmp), format="litert", verbose=False, input_signature=spec, **options)

        try:
            fsio.atomic_save(path, save)
        except JewelclfError:
            raise
        except Exception as e:
            raise JewelclfError(f"TFLite conversion ({mode}) failed: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[-1][:200] if str(e) else ''}") from None
        interp = tflite_interpreter(path)
        probs = tflite_probabilities(interp, pixels)
        entry = {"file": path.name, "size_bytes": path.stat().st_size,
                 "size_mb": round(path.stat().st_size / 2**20, 3),
                 "seconds": round(time.perf_counter() - t0, 1),
                 "top1_agreement": float((probs.argmax(1) == keras_probs.argmax(1)).mean()),
                 "max_abs_diff": float(np.abs(probs - keras_probs).max()),
                 "images": len(images)}
        if test:
            tp = tflite_probabilities(interp, test_pixels)
            entry["test_accuracy"] = _accuracy(test[2], tp)
            entry["test_top1_agreement"] = float((tp.argmax(1) == keras_test.argmax(1)).mean())
        results[mode] = entry
        log(f"  {path}: {entry['size_mb']:.3f} MB, top-1 agreement {entry['top1_agreement']:.3f}, "
            f"max |diff| {entry['max_abs_diff']:.2e}"
            + (f", test accuracy {entry['test_accuracy']:.4f}" if test else ""))
    info = {"format": "tflite", **run.describe(),
            "input": f"float32 [batch, {run.image_size}, {run.image_size}, 3] RGB pixels 0..255, "
                     f"resized with '{run.resize}' (decode and resize before the model)",
            "output": "float32 [batch, classes] probabilities in class_names order"}
    _write_json(out_dir / INFO, info)
    _write_json(out_dir / CLASS_NAMES, run.class_names)
    report = {"format": "tflite", "path": str(out_dir.resolve()),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run.describe(),
              "keras_size_bytes": (run_dir / rd.MODEL).stat().st_size,
              "parity_images": [{"key": im.key, "label": im.label} for im in images],
              "test_data": test_data, "modes": results, "environment": rd.environment()}
    if test:
        report["keras_test_accuracy"] = _accuracy(test[2], keras_test)
        report["test_examples"] = len(test[2])
    _write_json(out_dir / REPORT, report)
    return report


def export_keras(run_dir: Path, output: Path | None = None, parity_data: str | None = None,
                 overwrite: bool = False, log: Log = print) -> dict[str, Any]:
    """Copy ``model.keras`` with its class names and input description; check the copy loads."""
    from jewelclf import runs as rd

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out_dir = Path(output) if output is not None else default_output(run_dir, "keras")
    _prepare_folder(out_dir, [rd.MODEL], overwrite)
    fsio.atomic_save(out_dir / rd.MODEL, lambda tmp: shutil.copyfile(run_dir / rd.MODEL, tmp))
    images = run_images(run, ("test", "val", "train"), PARITY_IMAGES, parity_data)
    pixels = keras_pixels([im.data for im in images], run.image_size, run.resize)
    copy = rd.load_model_file(out_dir / rd.MODEL, len(run.class_names))
    diff = float(np.abs(keras_probabilities(copy, pixels) - keras_probabilities(run.model, pixels)).max())
    info = {"format": "keras", **run.describe(),
            "input": f"float32 [batch, {run.image_size}, {run.image_size}, 3] RGB pixels 0..255, "
                     f"resized with '{run.resize}'; import jewelclf.modeling.layers before loading",
            "output": "float32 [batch, classes] probabilities in class_names order"}
    _write_json(out_dir / INFO, info)
    _write_json(out_dir / CLASS_NAMES, run.class_names)
    report = {"format": "keras", "path": str((out_dir / rd.MODEL).resolve()),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run.describe(),
              "size_bytes": (out_dir / rd.MODEL).stat().st_size,
              "reload_max_abs_diff": diff, "environment": rd.environment()}
    _write_json(out_dir / REPORT, report)
    log(f"wrote {out_dir / rd.MODEL}")
    return report


def export_run(run_dir: Path, fmt: str = "savedmodel", output: Path | None = None,
               version: int | None = None, quantize: Iterable[str] = (), test_data: str | None = None,
               parity_data: str | None = None, overwrite: bool = False, log: Log = print,
               embed_layer: str = DEFAULT_EMBED_LAYER) -> dict[str, Any]:
    """Export ``run_dir`` in ``fmt``; the one entry point of ``jewelclf export``.

    ``embed_layer`` (SavedModel only) picks the embedding of the ``embed`` signature."""
    quantize = list(quantize)
    if fmt not in FORMATS:
        raise JewelclfError(f"unknown --format '{fmt}'; one of {', '.join(FORMATS)}")
    if fmt != "savedmodel" and version is not None:
        raise JewelclfError("--version applies to --format savedmodel only")
    if fmt != "tflite" and quantize:
        raise JewelclfError("--quantize applies to --format tflite only")
    if fmt != "savedmodel" and embed_layer != DEFAULT_EMBED_LAYER:
        raise JewelclfError("--embed-layer applies to --format savedmodel only")
    if fmt == "savedmodel":
        if overwrite:
            raise JewelclfError("SavedModel versions are never overwritten; omit --overwrite "
                                "(the next version number is used)")
        return export_savedmodel(run_dir, output, version, test_data, parity_data, log, embed_layer)
    if fmt == "tflite":
        return export_tflite(run_dir, output, quantize or ["none"], test_data, parity_data, overwrite, log)
    if test_data:
        raise JewelclfError("--test-data applies to --format savedmodel and tflite")
    return export_keras(run_dir, output, parity_data, overwrite, log)


def format_export_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = []
    if report["format"] == "savedmodel":
        p = report["parity"]
        lines.append(f"exported {report['path']} (model '{report['model_name']}', version {report['version']})")
        for name, s in p["signatures"].items():
            if name == SERVING_EMBED:
                if "max_abs_diff" in s:
                    lines.append(f"  {name}: {s['dim']}-d '{s['layer']}' vectors, max |diff| with the "
                                 f"Keras embedding {s['max_abs_diff']:.2e}, min cosine "
                                 f"{s['min_cosine']:.6f} on {s['images']} images (fresh process)")
                continue
            lines.append(f"  {name}: top-1 agrees with Keras on {s['top1_agree']}/{s['images']} images, "
                         f"max |diff| {s['max_abs_diff']:.2e} (fresh process, tolerance {p['tolerance']:g})")
        acc = report.get("test_accuracy")
        if acc:
            lines.append(f"  accuracy on {acc['data']} ({acc['num_examples']} images): SavedModel "
                         f"{acc['savedmodel_accuracy']:.4f}, Keras {acc['keras_accuracy']:.4f}")
        lines.append(f"  report: {Path(report['path']) / REPORT}")
    elif report["format"] == "tflite":
        lines.append(f"exported TFLite to {report['path']}")
        for mode, e in report["modes"].items():
            acc = f", test accuracy {e['test_accuracy']:.4f}" if "test_accuracy" in e else ""
            lines.append(f"  {mode:8s} {e['size_mb']:9.3f} MB  top-1 agreement {e['top1_agreement']:.3f}{acc}")
        if "keras_test_accuracy" in report:
            lines.append(f"  keras    {report['keras_size_bytes'] / 2**20:9.3f} MB  test accuracy "
                         f"{report['keras_test_accuracy']:.4f}")
        lines.append(f"  report: {Path(report['path']) / REPORT}")
    else:
        lines.append(f"exported {report['path']} (reload max |diff| {report['reload_max_abs_diff']:.2e})")
    return "\n".join(lines)
