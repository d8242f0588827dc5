"""A ``fit`` that fails before its first epoch is one line, found before the data is read, and
leaves the run dir usable again at once (issue 17, items 1 and 2)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

import jewelclf.data.validate as check_module
from jewelclf.cli import main
from jewelclf.modeling.backbones import BACKBONES

from conftest import TINY_FLAGS, make_class_folder, tiny_cnn

URL = "https://storage.googleapis.com/tensorflow/keras-applications/tiny/tiny_notop.h5"


def _flags(weights):
    flags = list(TINY_FLAGS)
    flags[flags.index("--weights") + 1] = weights
    return flags


@pytest.fixture
def reads(monkeypatch):
    calls = []
    real = check_module.check_records

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(check_module, "check_records", spy)
    return calls


@pytest.fixture
def offline(monkeypatch):
    """tiny_cnn whose ImageNet weights fail to download, as Keras' get_file does offline."""
    def constructor(weights=None, **kwargs):
        if weights == "imagenet":
            raise Exception(f"URL fetch failure on {URL}: None -- [Errno -3] Temporary failure "
                            f"in name resolution")
        return tiny_cnn(**kwargs)

    monkeypatch.setitem(BACKBONES, "tiny_cnn",
                        dataclasses.replace(BACKBONES["tiny_cnn"], constructor=constructor))


def _fails_then_reruns(tmp_path, weights, reads):
    data = make_class_folder(tmp_path / "data", per_class=6)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", str(data), "--run-dir", str(run_dir), *_flags(weights)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output
    assert reads == []  # the weights were checked before any image was read
    assert json.loads((run_dir / "run_info.json").read_text())["status"] == "failed"
    again = CliRunner().invoke(main, ["fit", str(data), "--run-dir", str(run_dir), *_flags("none"),
                                      "--epochs", "1", "--fine-tune-epochs", "0"])
    assert again.exit_code == 0, again.output
    assert json.loads((run_dir / "run_info.json").read_text())["status"] == "finished"
    return lines[-1]


def test_a_missing_weights_file_fails_first_and_leaves_the_run_dir_usable(tmp_path, reads):
    line = _fails_then_reruns(tmp_path, str(tmp_path / "missing.h5"), reads)
    assert "missing.h5" in line and "does not exist" in line


def test_a_weights_file_of_another_backbone_fails_first(tmp_path, reads):
    import keras

    inputs = keras.Input((32, 32, 3))
    other = keras.Model(inputs, keras.layers.Conv2D(4, 5, name="other")(inputs))
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    line = _fails_then_reruns(tmp_path, str(path), reads)
    assert "does not fit backbone tiny_cnn" in line


def test_an_offline_imagenet_download_names_the_url_and_the_fix(tmp_path, reads, offline):
    line = _fails_then_reruns(tmp_path, "imagenet", reads)
    assert URL in line and "--weights PATH" in line
