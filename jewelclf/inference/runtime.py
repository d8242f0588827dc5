"""Running a jewelclf model outside its serving graph: training's pixels, Keras and TFLite.

The helpers that turn encoded images into the pixels training feeds the model and run a Keras
model, its embedding or a TFLite interpreter on them. ``jewelclf predict`` runs its ``.keras``
and ``.tflite`` models with them, and ``jewelclf export`` checks its exports against them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


def keras_probabilities_and_features(model, pixels: np.ndarray, batch_size: int = 32,
                                     tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """The Keras model's probabilities and pooled backbone features on uint8 pixels, in one pass
    (``tta="flip"``: the probabilities averaged over a horizontal flip, :mod:`jewelclf.modeling.tta`)."""
    from jewelclf.modeling.tta import scoring_model

    both = scoring_model(model, tta, with_features=True)
    dim = int(both.output["features"].shape[-1])
    if len(pixels) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32), np.zeros((0, dim), np.float32)
    outs = [both(pixels[i:i + batch_size].astype(np.float32), training=False)
            for i in range(0, len(pixels), batch_size)]
    return (np.concatenate([np.asarray(o["probabilities"], np.float32) for o in outs]),
            np.concatenate([np.asarray(o["features"], np.float32) for o in outs]))


def keras_embeddings(embedder, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The Keras embedding's unit vectors on uint8 pixels (cast to float32, as ``index`` does)."""
    dim = int(embedder.output.shape[-1])
    if len(pixels) == 0:
        return np.zeros((0, dim), np.float32)
    return np.concatenate([
        np.asarray(embedder(pixels[i:i + batch_size].astype(np.float32), training=False), np.float32)
        for i in range(0, len(pixels), batch_size)])


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
