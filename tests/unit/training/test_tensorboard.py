"""TensorBoard logs of both stages: written with TensorFlow alone, steps continuing over the run
and across ``--resume``, only where they should be written."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from jewelclf.cli import main
from jewelclf.training import callbacks as training
from jewelclf.training.tensorboard import EpochTensorBoard, tensorboard_callbacks

from conftest import TINY_FLAGS, make_split_folder

FLAGS = [*TINY_FLAGS, "--epochs", "3", "--fine-tune-epochs", "4", "--unfreeze-blocks", "2"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every event file under ``folder``; a repeated step fails."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                assert event.step not in out[v.tag], f"step {event.step} of {v.tag} written twice"
                out[v.tag][event.step] = float(tf.make_ndarray(v.tensor))
    return dict(out)


def history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_logs_match_history(run_dir: Path) -> None:
    rows = history(run_dir)
    board = run_dir / "tensorboard"
    for stage, prefix in (("stage1", "stage1"), ("stage2", "stage2.")):
        mine = [r for r in rows if r["phase"].startswith(prefix)]
        assert mine, stage
        train, val = scalars(board / stage / "train"), scalars(board / stage / "validation")
        # The step is history.csv's epoch: stage 2 continues where stage 1 ended.
        assert sorted(train["epoch_loss"]) == [int(r["epoch"]) for r in mine]
        assert sorted(val["epoch_loss"]) == [int(r["epoch"]) for r in mine]
        for r in mine:
            e = int(r["epoch"])
            assert train["epoch_loss"][e] == pytest.approx(float(r["loss"]), abs=1e-5)
            assert val["epoch_loss"][e] == pytest.approx(float(r["val_loss"]), abs=1e-5)
            assert val["epoch_accuracy"][e] == pytest.approx(float(r["val_accuracy"]), abs=1e-5)
            assert train["epoch_learning_rate"][e] == pytest.approx(float(r["learning_rate"]), rel=1e-2)
        # Epoch-level scalars only: no per-batch, per-iteration, graph or histogram events.
        assert set(train) == {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"}
        assert set(val) == {"epoch_loss", "epoch_accuracy"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_folder(tmp_path_factory.mktemp("tb") / "data", train=10, val=3, test=0)


def test_fit_writes_event_files_of_both_stages_without_the_tensorboard_package(data, tmp_path):
    with pytest.raises(ImportError):
        import tensorboard  # noqa: F401 - TensorFlow's tf.summary writes the files on its own
    run_dir = tmp_path / "run"
    result = run("fit", data, "--run-dir", run_dir, *FLAGS)
    assert result.exit_code == 0, result.output
    assert {r["phase"] for r in history(run_dir)} >= {"stage1", "stage2.1", "stage2.2"}
    assert_logs_match_history(run_dir)


def test_resume_continues_the_logs(data, tmp_path, monkeypatch):
    """Ctrl-C after the second epoch of stage 2 (before it is backed up), then --resume."""
    run_dir = tmp_path / "run"
    original = training.HistoryRecorder.on_epoch_end

    def interrupting(self, epoch, logs=None):
        original(self, epoch, logs)
        if sum(r["phase"].startswith("stage2") for r in history(run_dir)) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.HistoryRecorder, "on_epoch_end", interrupting)
    assert run("fit", data, "--run-dir", run_dir, *FLAGS).exit_code == 130
    before = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert before
    monkeypatch.undo()
    result = run("fit", "--resume", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    after = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert set(before) < set(after)  # kept, and added to
    assert_logs_match_history(run_dir)  # every epoch once: the interrupted one not twice


def test_no_logs_when_switched_off_or_not_the_chief(tmp_path):
    def model(chief: bool):
        return SimpleNamespace(distribute_strategy=SimpleNamespace(
            extended=SimpleNamespace(should_save_summary=chief)))

    def config(**train):
        return SimpleNamespace(train=SimpleNamespace(**train))

    [cb] = tensorboard_callbacks(config(), model(True), tmp_path, "stage2", 7)  # on by default
    assert cb.log_dir == str(tmp_path / "tensorboard" / "stage2") and cb.epoch_offset == 7
    assert tensorboard_callbacks(config(tensorboard=False), model(True), tmp_path, "stage1") == []
    assert tensorboard_callbacks(config(), model(False), tmp_path, "stage1") == []


def test_a_log_that_cannot_be_written_stops_with_a_warning_not_the_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "categorical_crossentropy")
    x, y = np.zeros((8, 3), "float32"), np.eye(2, dtype="float32")[[0, 1] * 4]
    said = []
    history = model.fit(x, y, validation_data=(x, y), epochs=3, verbose=0,
                        callbacks=[EpochTensorBoard(blocker / "tb", log=said.append)])
    assert len(history.history["loss"]) == 3
    assert len(said) == 1 and said[0].startswith("warning: TensorBoard logs stopped")


def test_each_tune_trial_logs_both_stages_in_its_folder(data, tmp_path):
    from conftest import tiny_tune_files

    config, space = tiny_tune_files(tmp_path, {"dropout": {"choice": [0.1, 0.3]}})
    run_dir = tmp_path / "search"
    result = run("tune", data, "--run-dir", run_dir, "--config", config, "--space", space,
                 "--tuner", "random", "--max-trials", 2)
    assert result.exit_code == 0, result.output
    trials = sorted((run_dir / "search").glob("trial_*"))
    assert len(trials) == 2
    for trial in trials:
        assert sorted(scalars(trial / "tensorboard" / "stage1" / "validation")["epoch_loss"]) == [1, 2]
        assert sorted(scalars(trial / "tensorboard" / "stage2" / "validation")["epoch_loss"]) == [3]
