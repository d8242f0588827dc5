"""A corrupt or foreign ``model.keras`` is one line, before any image is read (issue 15, defect 10).

``evaluate``, ``export``, ``predict`` and ``index`` load the run's model first: a broken file costs
no decoding and gives one ``error:`` line that names it, never a traceback after the data.
"""

from __future__ import annotations

import shutil

import keras
import pytest
from click.testing import CliRunner

import jewelclf.data.validate as check_module
import jewelclf.inference.predict as predict_module
from jewelclf.cli import main


def _garbage(path):
    path.write_bytes(b"PK\x03\x04 not really a zip archive" * 10)


def _foreign(path):
    inputs = keras.Input((10,))
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs)).save(path)


def _wrong_outputs(path):
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(pooled)).save(path)


@pytest.fixture(params=[_garbage, _foreign, _wrong_outputs], ids=["corrupt", "foreign", "outputs"])
def broken_run(request, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model.keras").unlink()
    request.param(run / "model.keras")
    return run


@pytest.fixture
def reads(monkeypatch):
    """Every image read the commands could make, recorded instead of done."""
    calls = []

    def refuse(name):
        def fn(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran before the model was loaded")
        return fn

    monkeypatch.setattr(check_module, "check_records", refuse("check_records"))
    monkeypatch.setattr(check_module, "check_file", refuse("check_file"))
    monkeypatch.setattr(predict_module, "read_image_file", refuse("read_image_file"))
    return calls


@pytest.mark.parametrize("command", ["evaluate", "export", "predict", "index"])
def test_a_broken_model_is_one_line_before_any_image_is_read(command, broken_run, tiny_run, reads,
                                                             tmp_path):
    data = tiny_run.parent / "data"
    image = next((data / "test" / "ring").iterdir())
    args = {
        "evaluate": ["evaluate", str(broken_run), str(data), "--output", str(tmp_path / "ev")],
        "export": ["export", str(broken_run), "--output", str(tmp_path / "exported")],
        "predict": ["predict", str(broken_run), str(image)],
        "index": ["index", str(broken_run), str(data / "test"), "--output", str(tmp_path / "idx")],
    }[command]
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.keras" in lines[0], lines
    assert reads == []
