"""``jewelclf export --format tflite``: one ``model_<mode>.tflite`` per quantization mode.

Each model goes through Keras' LiteRT exporter (TF's converter), then is run on the run's
images and compared with the Keras model (top-1 agreement, largest difference, and accuracy on
``--test-data``); the report records size and agreement per mode.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from jewelclf import fsio
from jewelclf.errors import JewelclfError
from jewelclf.evaluation.calibration import scale
from jewelclf.export.files import prepare_folder, write_json
from jewelclf.export.layout import (
    CLASS_NAMES,
    INFO,
    PARITY_IMAGES,
    QUANTIZE_MODES,
    REPORT,
    REPRESENTATIVE_IMAGES,
    Log,
    default_output,
    require_tensorflow_backend,
)
from jewelclf.export.parity import accuracy, keras_test_probabilities
from jewelclf.export.samples import labelled_test_images, run_images
from jewelclf.inference.policy import ReviewPolicy, for_run
from jewelclf.inference.runtime import keras_pixels, keras_probabilities, tflite_interpreter, tflite_probabilities
from jewelclf.modeling.tta import NONE as TTA_NONE
from jewelclf.modeling.tta import check_mode, with_tta
from jewelclf.runs import RunModel, load_run, timestamp


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


def _check_modes(modes: Iterable[str]) -> list[str]:
    """The ``--quantize`` modes in order, ``all`` expanded, each known."""
    modes = list(dict.fromkeys(QUANTIZE_MODES if "all" in modes else (modes or ["none"])))
    for m in modes:
        if m not in QUANTIZE_MODES:
            raise JewelclfError(f"unknown --quantize mode '{m}'; one of {', '.join(QUANTIZE_MODES)} or all")
    return modes


def _representative_dataset(run: RunModel, parity_data: str | None) -> Callable:
    """int8's representative dataset: real training images of the run, one at a time."""
    rep_images = run_images(run, ("train", "val"), REPRESENTATIVE_IMAGES, parity_data)
    rep_pixels = keras_pixels([im.data for im in rep_images], run.image_size, run.resize)

    def _representative():
        for p in rep_pixels:
            yield [p[None].astype(np.float32)]

    return _representative


def calibrated_model(run: RunModel, tta: str = TTA_NONE):
    """The run's model with its temperature scaling appended: pixels in, calibrated probabilities
    out; ``tta="flip"`` calibrates the mean over a horizontal flip (:mod:`jewelclf.modeling.tta`)."""
    import keras

    from jewelclf.modeling.confidence import TemperatureScaling

    model = with_tta(run.model, tta)
    if run.temperature == 1.0:
        return model
    inputs = keras.Input(run.model.input_shape[1:], name="pixels")
    outputs = TemperatureScaling(run.temperature, name="calibration")(model(inputs, training=False))
    return keras.Model(inputs, outputs, name=f"{run.model.name}_calibrated")


def _convert(run: RunModel, path: Path, mode: str, spec: list, representative: Callable | None,
             tta: str = TTA_NONE) -> None:
    """Write ``path``: the run's calibrated model (with ``tta``) through LiteRT's converter in ``mode``."""
    options = _converter_options(mode, representative)
    model = calibrated_model(run, tta)

    def save(tmp, options=options):
        model.export(str(tmp), format="litert", verbose=False, input_signature=spec, **options)

    try:
        fsio.atomic_save(path, save)
    except JewelclfError:
        raise
    except Exception as e:
        raise JewelclfError(f"TFLite conversion ({mode}) failed: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[-1][:200] if str(e) else ''}") from None


def _tflite_report(run: RunModel, policy: ReviewPolicy, out_dir: Path, images: list, test_data: str | None,
                   test, keras_test, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``jewelclf.json``, the class names and the report beside the models; return the report."""
    from jewelclf import runs as rd

    info = {"format": "tflite", **run.describe(), **policy.describe(),
            "input": f"float32 [batch, {run.image_size}, {run.image_size}, 3] RGB pixels 0..255, "
                     f"resized with '{run.resize}' (decode and resize before the model)",
            "output": "float32 [batch, classes] calibrated probabilities (the temperature is in "
                      "the model) in class_names order; an image needs review when its top "
                      "probability is below review_threshold"}
    write_json(out_dir / INFO, info)
    write_json(out_dir / CLASS_NAMES, run.class_names)
    report = {"format": "tflite", "path": str(out_dir.resolve()),
              "created": timestamp(), **run.describe(), **policy.describe(),
              "keras_size_bytes": (Path(run.run_dir) / rd.MODEL).stat().st_size,
              "parity_images": [{"key": im.key, "label": im.label} for im in images],
              "test_data": test_data, "modes": results, "environment": rd.environment()}
    if test:
        report["keras_test_accuracy"] = accuracy(test[2], keras_test)
        report["test_examples"] = len(test[2])
    write_json(out_dir / REPORT, report)
    return report


def export_tflite(run_dir: Path, output: Path | None = None, modes: Iterable[str] = ("none",),
                  test_data: str | None = None, parity_data: str | None = None,
                  overwrite: bool = False, log: Log = print,
                  review_threshold: float | None = None, tta: str = TTA_NONE) -> dict[str, Any]:
    """One ``model_<mode>.tflite`` per mode, with a report on size, agreement and accuracy.

    The models answer calibrated probabilities (``tta="flip"``: of the mean over a horizontal
    flip, compared with the Keras model averaged the same way); ``jewelclf.json`` records the
    review threshold (the run's, or ``review_threshold``) and ``tta``. The unknown score needs
    the pooled features and the training vectors, which the TFLite models leave out: it is the
    SavedModel's."""
    import keras

    require_tensorflow_backend()
    check_mode(tta)
    modes = _check_modes(modes)
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    policy = for_run(run, review_threshold, log, reference=False, tta=tta)
    out_dir = Path(output) if output is not None else default_output(run_dir, "tflite")
    prepare_folder(out_dir, [f"model_{m}.tflite" for m in modes], overwrite)
    images = run_images(run, ("test", "val", "train"), PARITY_IMAGES, parity_data)
    pixels = keras_pixels([im.data for im in images], run.image_size, run.resize)
    keras_probs = np.asarray(scale(keras_probabilities(with_tta(run.model, tta), pixels), run.temperature),
                             np.float32)
    representative = _representative_dataset(run, parity_data) if "int8" in modes else None

    test = labelled_test_images(test_data, run.class_names, run.config.data) if test_data else None
    keras_test = keras_test_probabilities(run, test[1], tta=tta) if test else None
    test_pixels = None
    if test:
        test_pixels = keras_pixels(test[1], run.image_size, run.resize)
    spec = [keras.InputSpec(shape=(None, run.image_size, run.image_size, 3), dtype="float32")]
    results: dict[str, Any] = {}
    for mode in modes:
        path = out_dir / f"model_{mode}.tflite"
        log(f"converting to TFLite ({mode})...")
        t0 = time.perf_counter()
        _convert(run, path, mode, spec, representative, tta)
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
            entry["test_accuracy"] = accuracy(test[2], tp)
            entry["test_top1_agreement"] = float((tp.argmax(1) == keras_test.argmax(1)).mean())
        results[mode] = entry
        log(f"  {path}: {entry['size_mb']:.3f} MB, top-1 agreement {entry['top1_agreement']:.3f}, "
            f"max |diff| {entry['max_abs_diff']:.2e}"
            + (f", test accuracy {entry['test_accuracy']:.4f}" if test else ""))
    return _tflite_report(run, policy, out_dir, images, test_data, test, keras_test, results)
