"""``jewelclf predict``: class names for images, from a local model or a TF Serving server.

Local models: an exported SavedModel (a version folder, or the base folder whose highest
version is used), a ``.keras`` or ``.tflite`` file (with the ``jewelclf.json`` or run files
beside it), or a run dir. With ``--server``, the images go to TensorFlow Serving's REST API
exactly as its documentation describes::

    POST {server}/v1/models/{name}[/versions/{N}]:predict
    {"signature_name": "serving_default", "instances": [{"b64": "<base64 image bytes>"}, ...]}

and the row-format answer ``{"predictions": [{"classes": [...], "scores": [...], ...}, ...]}``
is printed as the same table (:mod:`jewelclf.inference.serving_client` checks every reply). A file that
cannot be read or decoded is reported on its own line; the other images are still predicted.
"""

from __future__ import annotations

import base64
import json
import stat
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from jewelclf.data.formats import recorded_limits
from jewelclf.display import error_text, quote_name
from jewelclf.errors import JewelclfError

DEFAULT_BATCH = 32
MAX_FILE_BYTES = 256 * 2**20


@dataclass
class Prediction:
    """The answer for one image: the top classes with scores, or why there is none."""

    image: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "class": self.top[0][0], "score": self.top[0][1],
                "top_k": [{"class": c, "score": s} for c, s in self.top]}


# --------------------------------------------------------------------------------------------
# Inputs


def collect_images(paths: Iterable[str]) -> list[Path]:
    """Files as given, and every visible file under folders (sorted), in argument order: the
    one walker of :func:`jewelclf.data.sources.collect_files`, whose loop guard ends on
    symlink loops."""
    from jewelclf.data.sources import collect_files

    return collect_files(paths)


def read_image_file(path: Path, limits: tuple[int, int] | None = None) -> tuple[bytes | None, str | None]:
    """The file's bytes, or ``None`` and a one-line reason when it is no supported image or its
    header claims a size outside ``limits`` (``(max_pixels, min_image_side)``; default: the
    default configuration's), so that it is never decoded."""
    from jewelclf.data.formats import (
        ANIMATED_WEBP_REASON,
        default_limits,
        header_problem,
        is_animated_webp,
        sniff_format,
        unsupported_reason,
    )

    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever
            return None, "not a regular file (a FIFO, socket or device)"
        if st.st_size > MAX_FILE_BYTES:
            return None, f"too large ({st.st_size / 2**20:.0f} MB); no photo is that big"
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot be read ({e.strerror or type(e).__name__})"
    if not data:
        return None, "empty file (0 bytes)"
    if sniff_format(data[:16]) is None:
        return None, unsupported_reason(data)
    if is_animated_webp(data):  # TensorFlow (and a TF Serving server) would abort on it
        return None, ANIMATED_WEBP_REASON
    problem = header_problem(data, *(limits or default_limits()))
    if problem:
        return None, problem
    return data, None


def _decode_failure(data: bytes, e: BaseException) -> str:
    from jewelclf.data.images import AnimatedWebPError, sniff_format

    if isinstance(e, AnimatedWebPError):
        return str(e)
    fmt = sniff_format(data[:16]) or "image"
    message = error_text(e)
    if "too large" in message.lower():  # TF's decoders refuse 2**29 px and more ("PNG size too large")
        return f"too large: TensorFlow cannot decode a {fmt} image this big ({message})"
    return f"corrupt or truncated {fmt} image: it could not be decoded ({message})"


# --------------------------------------------------------------------------------------------
# Predictors: bytes in, (top list or error) out


class Predictor:
    """Predicts a batch of encoded images; subclasses fill :meth:`_predict_batch`."""

    k: int = 3
    class_names: list[str] | None = None
    limits: tuple[int, int] | None = None  # (max_pixels, min_image_side) the export records
    description: str = ""

    def _predict_batch(self, encoded: list[bytes], top_k: int) -> list[tuple[list[tuple[str, float]] | None, str | None]]:
        raise NotImplementedError

    def predict(self, encoded: list[bytes], top_k: int) -> list[tuple[list[tuple[str, float]] | None, str | None]]:
        """Predict ``encoded``; when the batch fails as a whole, retry image by image so that
        one corrupt image costs only its own answer."""
        if not encoded:
            return []
        try:
            return self._predict_batch(encoded, top_k)
        except BatchError as e:
            if len(encoded) == 1:
                return [(None, str(e))]
        return [self.predict([b], top_k)[0] for b in encoded]


class BatchError(Exception):
    """A batch failed as a whole (a decode error in the graph, a 400 from the server)."""


def _top_from_probs(probs: np.ndarray, names: list[str], top_k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:top_k]
    return [(names[i], float(probs[i])) for i in order]


def _rows_from_outputs(outputs: dict[str, Any], top_k: int, names: list[str] | None):
    """Rows of (top, error) from the exported signature's outputs (NumPy or JSON lists)."""
    classes = outputs["classes"]
    scores = outputs["scores"]
    valid = outputs.get("valid")
    errors = outputs.get("error")
    probs = outputs.get("probabilities")
    rows = []
    for i in range(len(classes)):
        if valid is not None and not bool(valid[i]):
            err = errors[i] if errors is not None else "could not be decoded"
            rows.append((None, err.decode() if isinstance(err, bytes) else str(err)))
            continue
        row_classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes[i]]
        if top_k > len(row_classes) and names is not None and probs is not None:
            rows.append((_top_from_probs(np.asarray(probs[i], np.float32), names, top_k), None))
        else:
            rows.append(([(c, float(s)) for c, s in zip(row_classes, scores[i])][:top_k], None))
    return rows


class SavedModelPredictor(Predictor):
    """An exported SavedModel, run through its ``serving_default`` signature (image bytes)."""

    def __init__(self, path: Path):
        import tensorflow as tf

        self.path = path
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as e:
            raise JewelclfError(f"cannot load the SavedModel in '{path}' ({error_text(e)})") from None
        if "serving_default" not in loaded.signatures:
            raise JewelclfError(f"the SavedModel in '{path}' has no serving_default signature")
        self._loaded = loaded  # keep the object alive with its signature
        self.fn = loaded.signatures["serving_default"]
        inputs = self.fn.structured_input_signature[1]
        if list(inputs) != ["images"] or inputs["images"].dtype != tf.string:
            raise JewelclfError(f"the SavedModel in '{path}' does not take encoded images "
                                f"(inputs: {dict(inputs)}); was it exported by jewelclf?")
        self.k = int(self.fn.structured_outputs["classes"].shape[-1] or 1)
        info = path / "assets.extra" / "jewelclf.json"
        if info.is_file():
            meta = json.loads(info.read_text(encoding="utf-8"))
            self.class_names = meta.get("class_names")
            self.limits = recorded_limits(meta)
        self.description = f"SavedModel {path}"

    def _predict_batch(self, encoded, top_k):
        import tensorflow as tf

        try:
            out = self.fn(images=tf.constant(encoded))
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
            if len(encoded) == 1:
                raise BatchError(_decode_failure(encoded[0], e)) from None
            raise BatchError(error_text(e)) from None
        return _rows_from_outputs({k: v.numpy() for k, v in out.items()}, top_k, self.class_names)


class PixelModelPredictor(Predictor):
    """A model that takes resized float32 pixels (.keras or .tflite): decode and resize here,
    with training's functions."""

    def __init__(self, image_size: int, resize: str, class_names: list[str], k: int):
        self.image_size, self.resize, self.class_names, self.k = image_size, resize, class_names, k

    def _probabilities(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, encoded, top_k):
        import tensorflow as tf

        from jewelclf.data.images import load_image

        pixels, rows, where = [], [], []
        for b in encoded:
            try:
                pixels.append(load_image(tf.constant(b), self.image_size, self.resize).numpy())
                where.append(len(rows))
                rows.append(None)
            except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
                rows.append((None, _decode_failure(b, e)))
        if pixels:
            probs = self._probabilities(np.stack(pixels))
            for i, p in zip(where, probs):
                rows[i] = (_top_from_probs(p, self.class_names, top_k), None)
        return rows


class KerasPredictor(PixelModelPredictor):
    """A ``.keras`` model; its probabilities are calibrated with the run's ``temperature``."""

    def __init__(self, path: Path, image_size: int, resize: str, class_names: list[str], k: int,
                 temperature: float = 1.0):
        from jewelclf.runs import load_model_file

        super().__init__(image_size, resize, class_names, k)
        self.model = load_model_file(path, len(class_names))
        self.temperature = temperature
        self.description = f"Keras model {path}"

    def _probabilities(self, pixels):
        from jewelclf.evaluation.calibration import scale
        from jewelclf.export.savedmodel import keras_probabilities

        return scale(keras_probabilities(self.model, pixels), self.temperature)


class TFLitePredictor(PixelModelPredictor):
    def __init__(self, path: Path, image_size: int, resize: str, class_names: list[str], k: int):
        from jewelclf.export.savedmodel import tflite_interpreter

        super().__init__(image_size, resize, class_names, k)
        try:
            self.interpreter = tflite_interpreter(path)
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise JewelclfError(f"cannot load '{path}' as TFLite ({error_text(e)})") from None
        self.description = f"TFLite model {path}"

    def _probabilities(self, pixels):
        from jewelclf.export.savedmodel import tflite_probabilities

        return tflite_probabilities(self.interpreter, pixels)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JewelclfError(f"'{path}' cannot be read as JSON ({error_text(e)}); export the "
                            f"model again, or point at the run dir") from None


def _pixel_model_info(folder: Path) -> dict[str, Any]:
    """image_size, resize, class_names and top_k from ``jewelclf.json`` or a run dir."""
    from jewelclf.export.savedmodel import INFO

    info_path = folder / INFO
    if info_path.is_file():
        info = _read_json(info_path)
        if not isinstance(info, dict) or not isinstance(info.get("class_names"), list):
            raise JewelclfError(f"'{info_path}' names no class_names; export the run again with "
                                f"jewelclf export")
        return info
    if (folder / "config.yaml").is_file() and (folder / "class_names.json").is_file():
        from jewelclf import config as config_mod

        config = config_mod.from_dict(config_mod.load_yaml(folder / "config.yaml"),
                                      source=str(folder / "config.yaml"))
        names = _read_json(folder / "class_names.json")
        if not isinstance(names, list):
            raise JewelclfError(f"'{folder / 'class_names.json'}' is not a list of class names; "
                                f"the run is incomplete, train it again")
        try:
            size = config.data.image_size
        except JewelclfError:
            size = None
        from jewelclf.evaluation import calibration
        from jewelclf.runs import CALIBRATION

        fitted = calibration.read(folder / CALIBRATION)
        return {"class_names": names, "image_size": size, "resize": config.data.resize,
                "top_k": min(config.train.top_k, len(names)),
                "max_pixels": config.data.max_pixels, "min_image_side": config.data.min_image_side,
                "temperature": fitted.temperature if fitted else 1.0,
                "calibration_note": "" if fitted else calibration.MISSING_NOTE.format(run=folder)}
    raise JewelclfError(f"no {INFO} (from jewelclf export) or run files (config.yaml, "
                        f"class_names.json) beside the model in '{folder}'; export it with "
                        f"jewelclf export, or point at the run dir")


def load_predictor(model: str | Path) -> Predictor:
    """A predictor for MODEL: a SavedModel (version or base folder), a run dir, an export
    folder of ``--format keras``/``tflite``, or a ``.keras``/``.tflite`` file."""
    from jewelclf.export.savedmodel import list_versions

    path = Path(model).expanduser()
    if not path.exists():
        raise JewelclfError(f"model '{model}' does not exist; pass an exported SavedModel folder, "
                            f"a .keras or .tflite file, or a run dir")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return SavedModelPredictor(path)
        versions = [v for v in list_versions(path) if (path / str(v) / "saved_model.pb").is_file()]
        if versions:
            return SavedModelPredictor(path / str(max(versions)))
        if (path / "model.keras").is_file():
            return load_predictor(path / "model.keras")
        tflites = sorted(path.glob("*.tflite"))
        if len(tflites) == 1:
            return load_predictor(tflites[0])
        if tflites:
            raise JewelclfError(f"'{path}' holds {len(tflites)} .tflite files; pass one of them, "
                                f"e.g. {tflites[0]}")
        raise JewelclfError(f"'{path}' holds no SavedModel, model.keras or .tflite file")
    suffix = path.suffix.lower()
    if suffix not in (".keras", ".tflite"):
        raise JewelclfError(f"'{path}' is not a .keras or .tflite file nor a SavedModel folder")
    info = _pixel_model_info(path.parent)
    names = [str(c) for c in info["class_names"]]
    k = int(info.get("top_k") or min(3, len(names)))
    if suffix == ".keras":
        pred = KerasPredictor(path, info.get("image_size") or 0, info.get("resize", "squash"), names,
                              k, temperature=float(info.get("temperature") or 1.0))
        if info.get("calibration_note"):  # after the load: a broken model stays one line
            print(info["calibration_note"], file=sys.stderr)
        if not pred.image_size:
            pred.image_size = int(pred.model.input_shape[1])
        pred.limits = recorded_limits(info)
        return pred
    pred = TFLitePredictor(path, info.get("image_size") or 0, info.get("resize", "squash"), names, k)
    if not pred.image_size:
        pred.image_size = int(pred.interpreter.get_input_details()[0]["shape"][1])
    pred.limits = recorded_limits(info)
    return pred


# --------------------------------------------------------------------------------------------
# TF Serving REST client


def predict_url(server: str, model: str, version: int | None = None) -> str:
    """``{server}/v1/models/{model}[/versions/{version}]:predict`` (TF Serving's REST API)."""
    if not server.startswith(("http://", "https://")):
        server = "http://" + server
    url = f"{server.rstrip('/')}/v1/models/{urllib.parse.quote(model, safe='')}"
    if version is not None:
        url += f"/versions/{int(version)}"
    return url + ":predict"


def predict_request_body(encoded: list[bytes], signature: str = "serving_default") -> dict[str, Any]:
    """The JSON body TF Serving documents for a single string input in row format: each
    binary value as ``{"b64": <standard base64>}``."""
    return {"signature_name": signature,
            "instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in encoded]}


# --------------------------------------------------------------------------------------------
# Running and printing


def predict_files(predictor: Predictor, files: list[Path], top_k: int | None = None,
                  batch_size: int = DEFAULT_BATCH) -> list[Prediction]:
    """Predict each file; unreadable or undecodable files get an ``error`` instead."""
    from jewelclf import bars

    k = top_k or predictor.k or 3
    results: list[Prediction] = []
    pending: list[tuple[int, bytes]] = []
    progress = bars.bar(len(files), "predicting", unit="image")

    def flush():
        rows = predictor.predict([b for _, b in pending], k)
        for (i, _), (top, err) in zip(pending, rows):
            results[i].top = top or []
            results[i].error = err
        progress.update(len(pending))
        pending.clear()

    with progress:
        for path in files:
            data, reason = read_image_file(path, predictor.limits)
            results.append(Prediction(str(path), error=reason))
            if data is None:
                progress.update()
                continue
            pending.append((len(results) - 1, data))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    return results


def format_table(results: list[Prediction]) -> str:
    """One line per image: the image, the best class and its score, then the other top classes."""
    ok = [r for r in results if r.error is None]
    if not ok:
        return ""
    names = [quote_name(r.image) for r in ok]  # a newline in a file name must not forge a row
    width = min(60, max(len("image"), *map(len, names)))
    cls_width = max(len("class"), *(len(r.top[0][0]) for r in ok))
    k = max(len(r.top) for r in ok)
    lines = [f"{'image':<{width}}  {'class':<{cls_width}}  {'score':>6}" + (f"  top-{k}" if k > 1 else "")]
    for r, name in zip(ok, names):
        image = name if len(name) <= width else "..." + name[-(width - 3):]
        line = f"{image:<{width}}  {r.top[0][0]:<{cls_width}}  {r.top[0][1]:6.4f}"
        if k > 1:
            line += "  " + ", ".join(f"{c} {s:.3f}" for c, s in r.top)
        lines.append(line)
    return "\n".join(lines)


def run_predict(model: str | None, images: list[str], top_k: int | None = None,
                server: str | None = None, server_model: str | None = None,
                version: int | None = None, batch_size: int = DEFAULT_BATCH,
                timeout: float = 60.0) -> tuple[list[Prediction], str]:
    """The ``jewelclf predict`` command: returns the results and what predicted them."""
    if server:
        if not server_model:
            raise JewelclfError("--server needs --model NAME, the model name TF Serving serves")
        paths = ([model] if model else []) + list(images)
        from jewelclf.inference.serving_client import ServerPredictor

        predictor: Predictor = ServerPredictor(server, server_model, version, timeout=timeout)
    else:
        if server_model or version is not None:
            raise JewelclfError("--model and --version are for --server; pass a local MODEL path first")
        if not model or not images:
            raise JewelclfError("pass MODEL and at least one IMAGE_OR_DIR (or --server URL --model NAME IMAGE...)")
        paths = list(images)
        predictor = load_predictor(model)
    if top_k is not None and top_k < 1:
        raise JewelclfError(f"--top-k must be at least 1, got {top_k}")
    files = collect_images(paths)
    results = predict_files(predictor, files, top_k, batch_size)
    return results, predictor.description
