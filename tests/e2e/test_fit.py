"""End to end through the CLI: fit, evaluate, run-dir rules and the error messages users see."""

import csv
import json

import pytest
from click.testing import CliRunner

from jewelclf.cli import main

from conftest import TESTS, TINY_FLAGS, make_class_folder, make_image, make_split_folder

METRIC_KEYS = {"accuracy", "top_k_accuracy", "macro_precision", "macro_recall", "macro_f1",
               "per_class", "confusion_matrix"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fit_writes_a_complete_run(tiny_run):
    names = {p.relative_to(tiny_run).as_posix() for p in tiny_run.rglob("*") if p.is_file()}
    for expected in ["config.yaml", "class_names.json", "splits.csv", "rejected_files.csv",
                     "history.csv", "training_curves.png", "checkpoints/best.weights.h5",
                     "model.keras", "metrics.json", "confusion_matrix.png", "run_info.json"]:
        assert expected in names
    info = json.loads((tiny_run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["seed"] == 1337
    assert {"tensorflow", "keras", "python"} <= set(info["environment"])
    assert json.loads((tiny_run / "class_names.json").read_text()) == ["necklace", "ring", "watch"]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["accuracy"] >= 0.8          # colour classes: trivially learnable
    with open(tiny_run / "history.csv") as f:
        phases = [r["phase"] for r in csv.DictReader(f)]
    assert phases[0] == "stage1" and any(p.startswith("stage2") for p in phases)
    with open(tiny_run / "splits.csv") as f:
        splits = {r["split"] for r in csv.DictReader(f)}
    assert splits == {"train", "val", "test"}


def test_evaluate_writes_metrics(tiny_run, tmp_path):
    data = make_class_folder(tmp_path / "holdout", per_class=3)
    (data / "ring" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = run("evaluate", tiny_run, data, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["num_examples"] == 9 and metrics["rejected_files"] == 1
    assert metrics["confusion_matrix"]["class_names"] == ["necklace", "ring", "watch"]
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 9
    assert (tmp_path / "out" / "confusion_matrix.png").stat().st_size > 1000
    assert "macro avg" in result.output and "precision" in result.output


def test_evaluate_refuses_unknown_classes(tiny_run, tmp_path):
    data = make_class_folder(tmp_path / "other", per_class=2, classes=("ring", "tiara"))
    result = run("evaluate", tiny_run, data)
    assert result.exit_code == 2
    assert "'tiara'" not in result.output or "tiara" in result.output
    assert "not trained on" in result.output


def test_fit_refuses_finished_run_unless_overwrite(tiny_run, tmp_path):
    result = run("fit", tmp_path, "--run-dir", tiny_run, *TINY_FLAGS)
    assert result.exit_code == 2
    assert "already holds a finished run" in result.output and "--overwrite" in result.output
    assert (tiny_run / "model.keras").exists()


def test_overwrite_and_corrupt_files_are_quarantined(tmp_path):
    data = make_split_folder(tmp_path / "data", train=8, test=2)
    (data / "train" / "ring" / "zero.jpg").write_bytes(b"")
    (data / "train" / "watch" / "notes.jpg").write_text("not an image")
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "run_info.json").write_text('{"status": "finished"}')
    (run_dir / "model.keras").write_text("old")
    flags = [*TINY_FLAGS, "--epochs", "2", "--fine-tune-epochs", "0"]
    result = run("fit", data, "--run-dir", run_dir, "--overwrite", *flags)
    assert result.exit_code == 0, result.output
    assert "2 left out" in result.output
    with open(run_dir / "rejected_files.csv") as f:
        rejected = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in csv.DictReader(f)}
    assert set(rejected) == {"zero.jpg", "notes.jpg"}
    with open(run_dir / "splits.csv") as f:
        used = {r["path"] for r in csv.DictReader(f)}
    assert not any("zero.jpg" in p or "notes.jpg" in p for p in used)
    assert (run_dir / "model.keras").stat().st_size > 1000


def test_fit_is_reproducible_with_a_seed(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=8)
    flags = [*TINY_FLAGS, "--epochs", "2", "--fine-tune-epochs", "0", "--seed", "7"]
    for name in ("a", "b"):
        assert run("fit", data, "--run-dir", tmp_path / name, *flags).exit_code == 0
    assert (tmp_path / "a" / "splits.csv").read_text() == (tmp_path / "b" / "splits.csv").read_text()
    ha = [r["val_loss"] for r in csv.DictReader(open(tmp_path / "a" / "history.csv"))]
    hb = [r["val_loss"] for r in csv.DictReader(open(tmp_path / "b" / "history.csv"))]
    assert [float(v) for v in ha] == pytest.approx([float(v) for v in hb], rel=1e-4)


def test_deterministic_runs_in_two_processes_are_identical(tmp_path):
    """``--deterministic``: two separate processes, same seed and data, through stage 2 with
    augmentation on, give the same history, metrics and weights, bit for bit."""
    import hashlib
    import subprocess
    import sys

    import keras
    import numpy as np

    import jewelclf.modeling.registry  # noqa: F401  registers the model's own layers for load_model

    data = make_split_folder(tmp_path / "data", train=8, test=3)
    tiny_cli = TESTS / "tiny_cli.py"
    flags = [*TINY_FLAGS, "--epochs", "2", "--fine-tune-epochs", "2", "--seed", "11", "--deterministic"]
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, str(tiny_cli), "fit", str(data), "--run-dir",
                               str(tmp_path / name), *flags], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    assert "deterministic: true" in (a / "config.yaml").read_text()
    history = [[{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(d / "history.csv"))]
               for d in (a, b)]
    assert any(r["phase"].startswith("stage2") for r in history[0])  # stage 2 (augmented) ran
    assert history[0] == history[1]
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (a, b)]
    assert metrics[0]["confusion_matrix"] == metrics[1]["confusion_matrix"]
    assert metrics[0]["macro_f1"] == metrics[1]["macro_f1"]
    digest = [hashlib.sha256(np.concatenate([np.ravel(w) for w in keras.saving.load_model(
        d / "model.keras", compile=False).get_weights()]).tobytes()).hexdigest() for d in (a, b)]
    assert digest[0] == digest[1]


def _one_line_error(result):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_cli_error_missing_folder(tmp_path):
    line = _one_line_error(run("fit", tmp_path / "nope", "--run-dir", tmp_path / "r", *TINY_FLAGS))
    assert "does not exist" in line and str(tmp_path / "nope") in line


def test_cli_error_one_class(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=5, classes=("ring",))
    line = _one_line_error(run("fit", data, "--run-dir", tmp_path / "r", *TINY_FLAGS))
    assert "only one class" in line


def test_cli_error_empty_class(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=5, classes=("ring", "watch"))
    (data / "tiara").mkdir()
    line = _one_line_error(run("fit", data, "--run-dir", tmp_path / "r", *TINY_FLAGS))
    assert "'" + str(data / "tiara") + "'" in line and "is empty" in line


def test_cli_error_class_with_only_corrupt_files(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=5, classes=("ring", "watch"))
    (data / "tiara").mkdir()
    (data / "tiara" / "a.jpg").write_text("text")
    run_dir = tmp_path / "r"
    line = _one_line_error(run("fit", data, "--run-dir", run_dir, *TINY_FLAGS))
    assert "tiara have no usable training images" in line and "rejected_files.csv" in line
    # The failed run holds no model, so the same --run-dir can be used again at once.
    (data / "tiara" / "a.jpg").unlink()
    for i in range(5):
        make_image("ring", 100 + i, path=data / "tiara" / f"{i}.jpg")
    ok = run("fit", data, "--run-dir", run_dir, *TINY_FLAGS, "--epochs", "1", "--fine-tune-epochs", "0")
    assert ok.exit_code == 0, ok.output


def test_cli_error_bad_backbone_and_config(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=3)
    line = _one_line_error(run("fit", data, "--run-dir", tmp_path / "r", "--backbone", "resnet5"))
    assert "unknown backbone 'resnet5'" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stage1:\n    epochs: -1\n")
    line = _one_line_error(run("fit", data, "--run-dir", tmp_path / "r", "--config", bad))
    assert "'train.stage1.epochs'" in line
    line = _one_line_error(run("fit", data, "--run-dir", tmp_path / "r2", *TINY_FLAGS, "--image-size", "8"))
    assert "below tiny_cnn's minimum" in line


def test_evaluate_needs_a_finished_run(tmp_path):
    line = _one_line_error(run("evaluate", tmp_path, tmp_path))
    assert "no finished jewelclf run" in line


def test_second_process_is_refused_and_a_dead_one_leaves_no_lock(tmp_path):
    import subprocess
    import sys

    data = make_class_folder(tmp_path / "data", per_class=5)
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from jewelclf.runs import run_lock\n"
        f"with run_lock(__import__('pathlib').Path({str(run_dir)!r})):\n"
        "    print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_line_error(run("fit", data, "--run-dir", run_dir, *TINY_FLAGS))
        assert "is in use by pid" in line and str(holder.pid) in line
    finally:
        holder.kill()                                   # SIGKILL: no chance to clean up
        holder.wait()
    ok = run("fit", data, "--run-dir", run_dir, *TINY_FLAGS, "--epochs", "1", "--fine-tune-epochs", "0")
    assert ok.exit_code == 0, ok.output


# --- --image-size below the backbone's minimum (issue #6) ------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--backbone", "tiny_cnn", "--image-size", "8"],
     "image size 8 is below tiny_cnn's minimum of 16; pass --image-size 16 or more (default 32)"),
    (["--backbone", "vgg16", "--image-size", "31"],
     "image size 31 is below vgg16's minimum of 32; pass --image-size 32 or more (default 224)"),
    (["--backbone", "efficientnet_b3", "--image-size", "1"],
     "image size 1 is below efficientnet_b3's minimum of 32; pass --image-size 32 or more (default 300)"),
], ids=["tiny_cnn-8", "vgg16-31", "efficientnet_b3-1"])
def test_image_size_below_the_backbones_minimum_is_one_line(tmp_path, flags, message):
    data = make_class_folder(tmp_path / "data", per_class=5)
    result = run("fit", data, "--run-dir", tmp_path / "r", "--weights", "none", *flags)
    assert _one_line_error(result) == f"error: {message}"
    assert result.stderr.strip() == f"error: {message}"  # nothing else on stderr
    yaml_file = tmp_path / "small.yaml"  # the same from a config file
    yaml_file.write_text(f"model:\n  backbone: {flags[1]}\n  weights: none\ndata:\n  image_size: {flags[3]}\n")
    assert _one_line_error(run("fit", data, "--run-dir", tmp_path / "r2", "--config", yaml_file)) == f"error: {message}"


def test_image_size_below_the_minimum_is_refused_before_the_run_dir_is_used(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=5)
    run_dir = tmp_path / "r"
    result = run("fit", data, "--run-dir", run_dir, *TINY_FLAGS, "--image-size", "8")
    assert "below tiny_cnn's minimum" in _one_line_error(result)
    assert "checked" not in result.output  # refused before reading a single image
    assert not (run_dir / "run_info.json").exists()
    ok = run("fit", data, "--run-dir", run_dir, *TINY_FLAGS, "--epochs", "1", "--fine-tune-epochs", "0")
    assert ok.exit_code == 0, ok.output
