"""``evaluate`` on the data a run trained on scores the run's held-out split, never its training
images unless asked, and ``metrics.json`` says what was scored."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner

from jewelclf.cli import main

from conftest import TINY_FLAGS, make_class_folder


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    """A run trained on a flat folder with val and test carved by --test-fraction."""
    root = tmp_path_factory.mktemp("flat")
    data = make_class_folder(root / "data", per_class=12)
    run_dir = root / "run"
    result = run("fit", data, "--run-dir", run_dir, *TINY_FLAGS, "--fine-tune-epochs", "0",
                 "--epochs", "2", "--test-fraction", "0.25")
    assert result.exit_code == 0, result.output
    return run_dir, data


def _split_keys(run_dir, split):
    with open(run_dir / "splits.csv", newline="") as f:
        return sorted(r["path"] for r in csv.DictReader(f) if r["split"] == split)


def _fingerprint(keys):
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def test_evaluate_on_the_training_folder_scores_the_runs_test_split(flat_run, tmp_path):
    run_dir, data = flat_run
    result = run("evaluate", run_dir, data, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    test_keys = _split_keys(run_dir, "test")
    assert 0 < len(test_keys) < 36
    assert metrics["split"] == "test" and metrics["split_source"] == "run"
    assert metrics["num_examples"] == len(test_keys)
    assert metrics["files_sha256"] == _fingerprint(test_keys)
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == test_keys
    assert "the run's test split" in result.output and "warning" not in result.output


def test_a_copy_of_the_training_folder_is_recognised_by_its_files(flat_run, tmp_path):
    run_dir, data = flat_run
    copy = shutil.copytree(data, tmp_path / "copy")
    result = run("evaluate", run_dir, copy, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["split_source"] == "run"
    assert metrics["num_examples"] == len(_split_keys(run_dir, "test"))


def test_training_images_need_an_explicit_split_and_are_called_so(flat_run, tmp_path):
    run_dir, data = flat_run
    result = run("evaluate", run_dir, data, "--split", "train", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["split"] == "train" and metrics["num_examples"] == len(_split_keys(run_dir, "train"))
    assert metrics["trained_on"] == metrics["num_examples"] and "images trained the run" in metrics["warning"]
    assert "images trained the run" in result.output


def test_a_run_without_a_test_split_is_scored_on_its_val_split(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=8)
    run_dir = tmp_path / "run"
    result = run("fit", data, "--run-dir", run_dir, *TINY_FLAGS, "--fine-tune-epochs", "0",
                 "--epochs", "1")
    assert result.exit_code == 0, result.output
    result = run("evaluate", run_dir, data, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["num_examples"] == len(_split_keys(run_dir, "val"))
    assert run("evaluate", run_dir, data, "--split", "test").exit_code == 2


def test_part_of_the_training_folder_is_scored_with_a_warning(tiny_run, tmp_path):
    # tiny_run trained on DATA/train and DATA/test; DATA/train alone is other data to
    # evaluate, but its images trained the run, and the report must say so.
    data = json.loads((tiny_run / "run_info.json").read_text())["data_path"]
    result = run("evaluate", tiny_run, f"{data}/train", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    n_train = len(_split_keys(tiny_run, "train"))
    assert metrics["split"] == "all" and metrics["split_source"] == "data"
    assert metrics["trained_on"] == n_train
    assert f"{n_train} of these {metrics['num_examples']} images trained the run" in metrics["warning"]
    assert "warning:" in result.output


def test_the_default_output_folder_is_named_by_split_and_data_folder(flat_run, tmp_path):
    """`ls RUN_DIR/evaluations` shows test_<data folder>; another folder of the same name gets
    its own `_2` folder instead of replacing the first, and the same data replaces its own."""
    run_dir, data = flat_run
    shutil.rmtree(run_dir / "evaluations", ignore_errors=True)
    assert run("evaluate", run_dir, data).exit_code == 0
    assert run("evaluate", run_dir, data, "--split", "val").exit_code == 0
    twin = shutil.copytree(data, tmp_path / "elsewhere" / data.name)
    result = run("evaluate", run_dir, twin, "--split", "val")
    assert result.exit_code == 0, result.output
    assert run("evaluate", run_dir, data).exit_code == 0
    name = data.name
    assert sorted(p.name for p in (run_dir / "evaluations").iterdir()) == [
        f"test_{name}", f"val_{name}", f"val_{name}_2"]
    held = json.loads((run_dir / "evaluations" / f"val_{name}_2" / "metrics.json").read_text())
    assert held["data_key"] == str(twin.resolve())
    assert f"evaluations/val_{name}_2/metrics.json" in result.output
