"""What the run records about augmentation is what ran; the contradictory setting is refused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from jewelclf import config as cfg
from jewelclf.cli import main
from jewelclf.errors import JewelclfError

from conftest import TINY_FLAGS, make_class_folder


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cached_features_with_stage1_augmentation_is_refused(tmp_path):
    with pytest.raises(JewelclfError, match="contradict each other") as e:
        cfg.resolve(None, {"train": {"stage1": {"cache_features": "on"}},
                           "augment": {"in_stage1": True}})
    assert "\n" not in str(e.value)
    conf = tmp_path / "c.yaml"
    conf.write_text("train:\n  stage1:\n    cache_features: 'on'\naugment:\n  in_stage1: true\n")
    result = run("fit", tmp_path, "--run-dir", tmp_path / "r", "--config", conf, *TINY_FLAGS)
    assert result.exit_code == 2 and "contradict each other" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--fine-tune-epochs", "0"], {"stage1": False, "stage2": False}),       # the quick start
    (["--fine-tune-epochs", "1"], {"stage1": False, "stage2": True}),
])
def test_run_info_says_which_stages_augmented(tmp_path, extra, expected):
    data = make_class_folder(tmp_path / "d", per_class=6)
    result = run("fit", data, "--run-dir", tmp_path / "r", *TINY_FLAGS, "--epochs", "1", *extra)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "r" / "run_info.json").read_text())
    assert info["summary"]["augmented"] == expected
    assert ("no augmentation ran" in result.output) == (not any(expected.values()))


def test_stage1_augmentation_is_recorded_when_it_runs(tmp_path):
    data = make_class_folder(tmp_path / "d", per_class=6)
    conf = tmp_path / "c.yaml"
    conf.write_text("augment:\n  in_stage1: true\n")
    result = run("fit", data, "--run-dir", tmp_path / "r", *TINY_FLAGS, "--epochs", "1",
                 "--fine-tune-epochs", "0", "--config", conf)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "run_info.json").read_text())["summary"]
    assert summary["stage1"]["cached_features"] is False
    assert summary["augmented"] == {"stage1": True, "stage2": False}
