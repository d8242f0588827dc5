"""``jewelclf export --format tflite`` in each quantization mode, and ``--format keras``."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from jewelclf.cli import main
from jewelclf.export import layout
from jewelclf.inference import runtime


@pytest.fixture(scope="module")
def tflite_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite") / "tiny_tflite"
    data = json.loads((tiny_run / "run_info.json").read_text())["data"]
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--format", "tflite", "--quantize", "all",
                                  "--output", str(out), "--test-data", data])
    assert r.exit_code == 0, r.output
    return out, r.output


def _dtypes(path) -> Counter:
    interp = runtime.tflite_interpreter(path)
    return Counter(np.dtype(t["dtype"]).name for t in interp.get_tensor_details())


def test_each_quantization_mode_is_written_and_reported(tflite_export, tiny_run):
    out, output = tflite_export
    report = json.loads((out / layout.REPORT).read_text())
    assert list(report["modes"]) == list(layout.QUANTIZE_MODES)
    assert report["test_examples"] == 12 and report["keras_test_accuracy"] == 1.0
    for mode, entry in report["modes"].items():
        path = out / f"model_{mode}.tflite"
        assert entry["file"] == path.name and entry["size_bytes"] == path.stat().st_size > 0
        assert 0.0 <= entry["top1_agreement"] <= 1.0 and 0.0 <= entry["test_accuracy"] <= 1.0
        assert entry["images"] == layout.PARITY_IMAGES
        assert f"{mode:8s}" in output
    modes = report["modes"]
    # Unquantized and float16 models are the Keras model up to float rounding.
    assert modes["none"]["top1_agreement"] == 1.0 and modes["none"]["max_abs_diff"] < 1e-5
    assert modes["float16"]["top1_agreement"] == 1.0 and modes["float16"]["max_abs_diff"] < 1e-2
    assert modes["none"]["test_accuracy"] == report["keras_test_accuracy"]
    # Quantized weights are smaller than float32 ones.
    assert modes["dynamic"]["size_bytes"] < modes["none"]["size_bytes"]
    assert modes["int8"]["size_bytes"] < modes["none"]["size_bytes"]
    assert json.loads((out / layout.CLASS_NAMES).read_text()) == ["necklace", "ring", "watch"]
    info = json.loads((out / layout.INFO).read_text())
    assert info["image_size"] == 32 and info["resize"] == "squash"


def test_quantization_modes_change_tensor_types(tflite_export):
    out, _ = tflite_export
    none, f16, dyn, int8 = (_dtypes(out / f"model_{m}.tflite") for m in layout.QUANTIZE_MODES)
    assert none["int8"] == 0 and none["float16"] == 0
    assert f16["float16"] > 0
    assert dyn["int8"] > 0 and dyn["float16"] == 0
    assert int8["int8"] > dyn["int8"]  # activations are int8 too, not only weights
    for mode in layout.QUANTIZE_MODES:  # the interface stays float32 pixels -> probabilities
        interp = runtime.tflite_interpreter(out / f"model_{mode}.tflite")
        assert interp.get_input_details()[0]["dtype"] == np.float32
        assert list(interp.get_input_details()[0]["shape_signature"]) == [-1, 32, 32, 3]
        assert interp.get_output_details()[0]["dtype"] == np.float32


def test_tflite_refuses_to_overwrite_without_flag(tflite_export, tiny_run):
    out, _ = tflite_export
    before = (out / "model_none.tflite").read_bytes()
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--format", "tflite", "--output", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output
    assert (out / "model_none.tflite").read_bytes() == before


def test_keras_format(tiny_run, tmp_path):
    import keras

    out = tmp_path / "tiny_keras"
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--format", "keras", "--output", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / layout.REPORT).read_text())
    assert report["reload_max_abs_diff"] == 0.0
    assert (out / "model.keras").read_bytes() == (tiny_run / "model.keras").read_bytes()
    model = keras.saving.load_model(out / "model.keras", compile=False)
    assert model.output_shape == (None, 3)
    assert json.loads((out / layout.CLASS_NAMES).read_text()) == ["necklace", "ring", "watch"]
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--format", "keras", "--output", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--format", "keras", "--output", str(out),
                                  "--overwrite"])
    assert r.exit_code == 0, r.output
