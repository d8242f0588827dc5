"""The export's names: formats, signatures, output keys and files, and where versions live.

Everything a reader of an export (``jewelclf predict``, a TF Serving client, the tests) needs to
know of its layout, with no TensorFlow: the ``FORMATS``, the signature and output keys of the
SavedModel, the files beside it (``jewelclf.json``, the report, ``models.config``), the default
output folder and the version folders TF Serving considers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from jewelclf.errors import JewelclfError

Log = Callable[[str], None]

FORMATS = ("savedmodel", "tflite", "keras")
QUANTIZE_MODES = ("none", "float16", "dynamic", "int8")
SERVING_DEFAULT = "serving_default"
SERVING_PIXELS = "serving_pixels"
SERVING_EMBED = "embed"
INPUT_IMAGES = "images"
INPUT_PIXELS = "pixels"
OUTPUT_KEYS = ("probabilities", "classes", "scores", "valid", "error", "confidence",
               "needs_review", "unknown_score")
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
