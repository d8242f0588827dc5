"""Predictors: encoded image bytes in, the top classes (or why there are none) out.

:class:`Predictor` and its local kinds (an exported SavedModel, a ``.keras`` or ``.tflite``
model), :class:`Prediction`, the answer for one image, and the shared reading of the exported
signature's outputs (:func:`rows_from_outputs`) with the request TF Serving's REST API documents
(:func:`predict_url`, :func:`predict_request_body`), which the server client
(:mod:`jewelclf.inference.serving_client`) sends.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf.data.formats import recorded_limits
from jewelclf.display import error_text
from jewelclf.errors import JewelclfError
from jewelclf.inference.policy import ReviewPolicy
from jewelclf.inference.runtime import keras_probabilities_and_features, tflite_interpreter, tflite_probabilities

Row = tuple[list[tuple[str, float]] | None, str | None, dict[str, Any] | None]
"""One image's answer from a predictor: the top (class, score) list, or ``None`` and why; and
its review fields (``confidence``, ``needs_review``, ``unknown_score`` where known), or ``None``."""

REVIEW_KEYS = ("confidence", "needs_review", "unknown_score")


@dataclass
class Prediction:
    """The answer for one image: the top classes with scores and the review fields, or why
    there is none."""

    image: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    review: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "class": self.top[0][0], "score": self.top[0][1],
                "top_k": [{"class": c, "score": s} for c, s in self.top], **(self.review or {})}


def _decode_failure(data: bytes, e: BaseException) -> str:
    from jewelclf.data.images import AnimatedWebPError, sniff_format

    if isinstance(e, AnimatedWebPError):
        return str(e)
    fmt = sniff_format(data[:16]) or "image"
    message = error_text(e)
    if "too large" in message.lower():  # TF's decoders refuse 2**29 px and more ("PNG size too large")
        return f"too large: TensorFlow cannot decode a {fmt} image this big ({message})"
    return f"corrupt or truncated {fmt} image: it could not be decoded ({message})"


class Predictor:
    """Predicts a batch of encoded images; subclasses fill :meth:`_predict_batch`."""

    k: int = 3
    class_names: list[str] | None = None
    limits: tuple[int, int] | None = None  # (max_pixels, min_image_side) the export records
    description: str = ""

    def _predict_batch(self, encoded: list[bytes], top_k: int) -> list[Row]:
        raise NotImplementedError

    def predict(self, encoded: list[bytes], top_k: int) -> list[Row]:
        """Predict ``encoded``; when the batch fails as a whole, retry image by image so that
        one corrupt image costs only its own answer."""
        if not encoded:
            return []
        try:
            return self._predict_batch(encoded, top_k)
        except BatchError as e:
            if len(encoded) == 1:
                return [(None, str(e), None)]
        return [self.predict([b], top_k)[0] for b in encoded]


class BatchError(Exception):
    """A batch failed as a whole (a decode error in the graph, a 400 from the server)."""


def _top_from_probs(probs: np.ndarray, names: list[str], top_k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:top_k]
    return [(names[i], float(probs[i])) for i in order]


def _review_of(outputs: dict[str, Any], i: int) -> dict[str, Any] | None:
    """Row ``i``'s review fields that the outputs carry (an export from before them has none)."""
    review = {}
    for key in REVIEW_KEYS:
        if key in outputs:
            value = outputs[key][i]
            review[key] = bool(value) if key == "needs_review" else float(value)
    return review or None


def rows_from_outputs(outputs: dict[str, Any], top_k: int, names: list[str] | None) -> list[Row]:
    """Rows of (top, error, review) from the exported signature's outputs (NumPy or JSON lists)."""
    classes = outputs["classes"]
    scores = outputs["scores"]
    valid = outputs.get("valid")
    errors = outputs.get("error")
    probs = outputs.get("probabilities")
    rows: list[Row] = []
    for i in range(len(classes)):
        if valid is not None and not bool(valid[i]):
            err = errors[i] if errors is not None else "could not be decoded"
            rows.append((None, err.decode() if isinstance(err, bytes) else str(err), None))
            continue
        row_classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes[i]]
        if top_k > len(row_classes) and names is not None and probs is not None:
            top = _top_from_probs(np.asarray(probs[i], np.float32), names, top_k)
        else:
            top = [(c, float(s)) for c, s in zip(row_classes, scores[i])][:top_k]
        rows.append((top, None, _review_of(outputs, i)))
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
            self.tta = str(meta.get("tta") or "none")  # baked into the graph by export --tta
        self.description = f"SavedModel {path}"

    def _predict_batch(self, encoded, top_k):
        import tensorflow as tf

        try:
            out = self.fn(images=tf.constant(encoded))
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
            if len(encoded) == 1:
                raise BatchError(_decode_failure(encoded[0], e)) from None
            raise BatchError(error_text(e)) from None
        return rows_from_outputs({k: v.numpy() for k, v in out.items()}, top_k, self.class_names)


class PixelModelPredictor(Predictor):
    """A model that takes resized float32 pixels (.keras or .tflite): decode and resize here,
    with training's functions; the review fields by the export's ``policy``."""

    def __init__(self, image_size: int, resize: str, class_names: list[str], k: int,
                 policy: ReviewPolicy | None = None):
        self.image_size, self.resize, self.class_names, self.k = image_size, resize, class_names, k
        self.policy = policy or ReviewPolicy()

    def _answer(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
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
                rows.append((None, _decode_failure(b, e), None))
        if pixels:
            answer = self._answer(np.stack(pixels))
            for j, i in enumerate(where):
                rows[i] = (_top_from_probs(answer["probabilities"][j], self.class_names, top_k), None,
                           _review_of(answer, j))
        return rows


class KerasPredictor(PixelModelPredictor):
    """A ``.keras`` model, answered by its run's review policy: calibrated with the run's
    temperature, and with the unknown score where the run's reference is known."""

    def __init__(self, path: Path, image_size: int, resize: str, class_names: list[str], k: int,
                 policy: ReviewPolicy | None = None):
        from jewelclf.runs import load_model_file

        super().__init__(image_size, resize, class_names, k, policy)
        self.model = load_model_file(path, len(class_names))
        self.description = f"Keras model {path}"

    def _answer(self, pixels):
        raw, features = keras_probabilities_and_features(self.model, pixels, tta=self.policy.tta)
        answer = self.policy.answer(raw, features if self.policy.reference is not None else None)
        if self.policy.reference is None:
            answer.pop("unknown_score")
        return answer


class TFLitePredictor(PixelModelPredictor):
    """A ``.tflite`` model: its probabilities are already calibrated (the temperature is in the
    model); ``needs_review`` by the recorded review threshold alone."""

    def __init__(self, path: Path, image_size: int, resize: str, class_names: list[str], k: int,
                 policy: ReviewPolicy | None = None):
        super().__init__(image_size, resize, class_names, k, policy)
        try:
            self.interpreter = tflite_interpreter(path)
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise JewelclfError(f"cannot load '{path}' as TFLite ({error_text(e)})") from None
        self.description = f"TFLite model {path}"

    def _answer(self, pixels):
        answer = replace(self.policy, temperature=1.0, reference=None).answer(
            tflite_probabilities(self.interpreter, pixels))
        answer.pop("unknown_score")
        return answer


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
