"""``jewelclf tune``: each tuner, the search space file, resume after a kill, best_config into fit,
keras-tuner's distributed mode (a chief and two workers), and flat memory across trials.

Trials use ``tiny_cnn`` with a saved weights file (so the backbone is the same in every trial
and fast mode shares its features) on tiny generated images; most trials are head-only.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from jewelclf.cli import main
from jewelclf.config import from_dict, resolve
from jewelclf.tuning.hypermodel import TwoStageHyperModel

from conftest import TESTS, make_split_folder, tiny_tune_files

HEAD_ONLY = {"unfreeze_blocks": {"choice": [0]}}
OBJECTIVE = {"bayesian": "val_macro_f1"}  # the others search the default, val_accuracy


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_trials(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "trials.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def completed(run_dir: Path) -> list[dict[str, str]]:
    return [r for r in read_trials(run_dir) if r["status"] == "COMPLETED"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny data, a tiny_cnn weights file, and config / space files for the searches."""
    root = tmp_path_factory.mktemp("tune")
    data = make_split_folder(root / "data", train=10, test=3)
    no_aug = {"augment": {"zoom": 0.0, "blur": 0.0}}
    config, space = tiny_tune_files(root, HEAD_ONLY, stage1=3, extra=no_aug)
    # Hyperband's budget is 2 + 1 epochs: 3 one-epoch (head-only) trials, then the best of them
    # continues to epoch 3, which takes it through stage 2.
    hyperband = tiny_tune_files(root, {"unfreeze_blocks": {"choice": [1]}, "head_units": {"choice": [0, 128]}},
                                name="hyperband", extra=no_aug)
    return {"root": root, "data": data, "config": config, "space": space, "hyperband": hyperband}


_searches: dict[str, tuple[Path, str]] = {}


def search(setup, tuner: str) -> tuple[Path, str]:
    """A finished 2-trial search of ``tuner`` (run once per module); (run dir, terminal output)."""
    if tuner not in _searches:
        run_dir = setup["root"] / f"search_{tuner}"
        config, space = setup["hyperband"] if tuner == "hyperband" else (setup["config"], setup["space"])
        result = run("tune", setup["data"], "--run-dir", run_dir, "--config", config,
                     "--space", space, "--tuner", tuner, "--max-trials", 2,
                     "--objective", OBJECTIVE.get(tuner, "val_accuracy"))
        assert result.exit_code == 0, result.output
        _searches[tuner] = (run_dir, result.output)
    return _searches[tuner]


@pytest.mark.parametrize("tuner", ["hyperband", "random", "bayesian"])
def test_two_trial_search_of_each_tuner(setup, tuner):
    run_dir, output = search(setup, tuner)
    objective = OBJECTIVE.get(tuner, "val_accuracy")
    rows = read_trials(run_dir)
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED"]
    for r in rows:
        assert 0.0 <= float(r["score"]) <= 1.0 and r["score"] == r[objective]
        assert r["head_units"] in {"0", "128", "256", "512", "1024"}
        assert 1e-4 <= float(r["stage1_learning_rate"]) <= 1e-2
    if tuner == "hyperband":  # the budget: the first epoch of the two-stage schedule
        assert [(r["epochs_from"], r["epochs_to"]) for r in rows] == [("0", "1")] * 2
        assert 1e-6 <= float(rows[0]["stage2_learning_rate"]) <= 1e-4
    else:
        assert all(r["unfreeze_blocks"] == "0" for r in rows)
        assert "stage2_learning_rate" not in rows[0]  # not tuned: unfreeze_blocks is 0
    # best_config.yaml holds the best trial's values, in a full config that fit reads.
    best = max(rows, key=lambda r: float(r["score"]))
    config = resolve(run_dir / "best_config.yaml")
    assert config.model.head_units == int(best["head_units"])
    assert config.model.dropout == pytest.approx(float(best["dropout"]))
    assert config.train.stage1.learning_rate == pytest.approx(float(best["stage1_learning_rate"]))
    assert config.train.stage1.epochs == (2 if tuner == "hyperband" else 3)  # the full schedule
    assert config.model.backbone == "tiny_cnn"
    # The top-trials table: in the terminal and in tuning_report.md; the plot.
    assert f"top trials by {objective} (2 completed, 0 failed)" in output
    report = (run_dir / "tuning_report.md").read_text()
    assert f"| rank | trial # | id | {objective} |" in report  # numbered as keras-tuner's "Trial #1"
    assert [r["number"] for r in rows] == ["1", "2"]
    assert sum(line.startswith("| 1 |") or line.startswith("| 2 |") for line in report.splitlines()) == 2
    assert (run_dir / "tuning_scores.png").stat().st_size > 1000
    # Fast mode: the backbone's features are computed once for the search, never in a trial.
    assert output.count("computing the frozen backbone's features once for all trials") == 1
    assert "stage 1: computing" not in output
    assert output.count("stage 1 (head, cached features)") == 2


def test_each_execution_of_a_trial_trains_from_scratch_and_the_score_is_their_mean(setup):
    """``--executions-per-trial 2``: each execution has its own folder, history and stage-2
    baseline (none sees the other's epochs), and trials.csv lists both scores and their mean."""
    run_dir = setup["root"] / "executions"
    result = run("tune", setup["data"], "--run-dir", run_dir, "--config", setup["config"],
                 "--space", setup["hyperband"][1], "--tuner", "random", "--max-trials", 1,
                 "--executions-per-trial", 2)
    assert result.exit_code == 0, result.output
    [row] = read_trials(run_dir)
    trial_dir = run_dir / "search" / f"trial_{row['trial']}"
    histories = []
    for n in (1, 2):
        with open(trial_dir / f"execution_{n}" / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) <= 4, epochs
        assert rows[-1]["phase"].startswith("stage2")  # each ran its own stage 2
        histories.append(rows)
    assert histories[0] != histories[1]  # two trainings, not one read twice
    assert not (trial_dir / "history.csv").exists()
    scores = [float(s) for s in row["execution_scores"].split()]
    assert len(scores) == 2
    assert float(row["score"]) == pytest.approx(sum(scores) / 2, abs=1e-6)


def test_best_config_feeds_fit_as_is(setup):
    tune_dir, _ = search(setup, "random")
    fit_dir = setup["root"] / "fit_best"
    result = run("fit", setup["data"], "--run-dir", fit_dir, "--config", tune_dir / "best_config.yaml")
    assert result.exit_code == 0, result.output
    best = resolve(tune_dir / "best_config.yaml")
    assert from_dict(yaml.safe_load((fit_dir / "config.yaml").read_text())) == best
    assert (fit_dir / "model.keras").exists() and (fit_dir / "metrics.json").exists()


def test_resume_extends_hyperband_into_a_continued_stage_2_trial(setup):
    """--resume --max-trials 4 on the finished 2-trial Hyperband search: one more one-epoch
    trial, then the best of the three goes on from epoch 1 to 3 on its own weights."""
    finished, _ = search(setup, "hyperband")
    run_dir = setup["root"] / "hyperband4"
    shutil.copytree(finished, run_dir)
    result = run("tune", setup["data"], "--run-dir", run_dir, "--resume", "--max-trials", 4)
    assert result.exit_code == 0, result.output
    rows = read_trials(run_dir)
    assert rows[:2] == read_trials(finished)  # the first two trials are not run again
    assert [r["status"] for r in rows] == ["COMPLETED"] * 4
    assert [(r["epochs_from"], r["epochs_to"]) for r in rows] == [("0", "1")] * 3 + [("1", "3")]
    first = {r["trial"]: r for r in rows[:3]}
    continued = rows[3]
    assert continued["continues_trial"] in first
    assert continued["head_units"] == first[continued["continues_trial"]]["head_units"]
    assert (run_dir / "search" / f"trial_{continued['continues_trial']}" / "checkpoint.weights.h5").exists()
    # Stage 2 ran in the continued trial only; stage 1 used the features computed once.
    assert result.output.count("stage 2 (unfreezing)") == 1
    assert "stage 1: computing" not in result.output
    assert "top trials by val_accuracy (4 completed, 0 failed)" in result.output


@pytest.mark.parametrize("text, key, message", [
    ("learning_rate: {min: 0.001, max: 0.01}\n", "'learning_rate'", "unknown hyperparameter"),
    ("head_units: {choice: []}\n", "'head_units'", "choice list is empty"),
    ("dropout: {min: 0.5, max: 0.1}\n", "'dropout'", "min 0.5 > max 0.1"),
    ("dropout: {min: 0.1, max: 1.5}\n", "'dropout'", "out of range"),
    ("stage1_learning_rate: {min: 0, max: 0.01, sampling: log}\n", "'stage1_learning_rate'", "min > 0"),
    ("unfreeze_blocks: {min: 0, max: 2.5}\n", "'unfreeze_blocks'", "not an integer"),
    ("head_units: [0, 128]\n", "'head_units'", "must be a mapping"),
])
def test_bad_space_file_is_a_one_line_error_naming_the_key(tmp_path, text, key, message):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    result = run("tune", tmp_path / "data", "--run-dir", tmp_path / "run", "--space", space)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert key in lines[0] and message in lines[0] and str(space) in lines[0]
    assert not (tmp_path / "run").exists()


def test_image_size_below_the_backbone_minimum_is_refused_up_front(setup, tmp_path):
    """A size the backbone cannot take is one line before any data is read or run dir made."""
    config = tmp_path / "small.yaml"
    config.write_text(setup["config"].read_text().replace("image_size: 32", "image_size: 8"))
    result = run("tune", setup["data"], "--run-dir", tmp_path / "run", "--config", config,
                 "--space", setup["space"])
    assert result.exit_code == 2, result.output
    assert "below tiny_cnn's minimum" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def _cli(*args) -> list[str]:
    return [sys.executable, str(TESTS / "tiny_cli.py"), *map(str, args)]


def _wait_for(predicate, proc, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the search exited with {proc.returncode} too early:\n{proc.stdout.read()}")
        time.sleep(0.3)
    proc.kill()
    pytest.fail("timed out waiting for the search")


def test_resume_after_ctrl_c_and_after_sigkill(setup, monkeypatch):
    run_dir = setup["root"] / "resume"
    args = ["tune", setup["data"], "--run-dir", run_dir, "--config", setup["config"], "--space",
            setup["space"], "--tuner", "random", "--max-trials", 4]
    # Ctrl-C during the second trial (the KeyboardInterrupt that SIGINT raises in Python):
    # exit 130, a hint to resume, the first trial kept.
    fit = TwoStageHyperModel.fit
    calls = []

    def interrupted_fit(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(self, *a, **k)

    monkeypatch.setattr(TwoStageHyperModel, "fit", interrupted_fit)
    result = run(*args)
    monkeypatch.undo()
    assert result.exit_code == 130, result.output
    assert "--resume" in result.output and "interrupted" in result.output
    assert len(completed(run_dir)) == 1
    # Resume in a process that is killed with SIGKILL as soon as one more trial is done.
    proc = subprocess.Popen(_cli(*args, "--resume"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        _wait_for(lambda: len(completed(run_dir)) >= 2, proc, 180)
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    finished = completed(run_dir)
    assert 2 <= len(finished) < 4
    histories = {r["trial"]: (run_dir / "search" / f"trial_{r['trial']}" / "history.csv").stat().st_mtime_ns
                 for r in finished}
    # Flags that would change the saved search are refused on --resume.
    line = run(*args[:-4], "--tuner", "bayesian", "--resume").output
    assert "error:" in line and "--tuner" in line
    # Resume again: it finishes the search without repeating finished trials.
    result = run("tune", setup["data"], "--run-dir", run_dir, "--resume")
    assert result.exit_code == 0, result.output
    rows = read_trials(run_dir)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 4
    assert len({r["trial"] for r in rows}) == 4
    assert rows[:len(finished)] == finished  # same values, scores and timings: not run again
    for trial, mtime in histories.items():
        assert (run_dir / "search" / f"trial_{trial}" / "history.csv").stat().st_mtime_ns == mtime
    assert (run_dir / "best_config.yaml").exists()
    assert '"status": "finished"' in (run_dir / "run_info.json").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_chief_and_two_workers(setup):
    run_dir = setup["root"] / "distributed"
    args = ["tune", setup["data"], "--run-dir", run_dir, "--config", setup["config"], "--space",
            setup["space"], "--tuner", "random", "--max-trials", 4]
    base = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERASTUNER_ORACLE_IP": "127.0.0.1",
            "KERASTUNER_ORACLE_PORT": str(_free_port())}
    procs = {}
    try:
        for tuner_id in ("chief", "tuner1", "tuner2"):
            procs[tuner_id] = subprocess.Popen(
                _cli(*args), env={**base, "KERASTUNER_TUNER_ID": tuner_id}, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if tuner_id == "chief":  # the chief sets up the run dir; workers only add trials to it
                _wait_for(lambda: (run_dir / "run_info.json").exists(), procs["chief"], 120)
        outputs = {k: p.communicate(timeout=300)[0] for k, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    for tuner_id, p in procs.items():
        assert p.returncode == 0, f"{tuner_id}:\n{outputs[tuner_id]}"
    assert "no trials left" in outputs["tuner1"] and "no trials left" in outputs["tuner2"]
    rows = read_trials(run_dir)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 4
    ran_by = {yaml.safe_load((run_dir / "search" / f"trial_{r['trial']}" / "trial_summary.json").read_text())
              ["tuner_id"] for r in rows}
    assert ran_by == {"tuner1", "tuner2"}
    assert [p.name for p in setup["root"].joinpath("distributed").rglob("best_config.yaml")] == ["best_config.yaml"]
    assert resolve(run_dir / "best_config.yaml").model.backbone == "tiny_cnn"


def test_memory_stays_flat_across_trials(setup):
    """The memory figure of benchmarks/tune_memory.py, on a short search: no growth per trial.

    Without dropping the gradient functions that TensorFlow registers for each traced training
    step, this search grows by about 4.5 MB per trial (13-14 MB from trial 3 to 6).
    """
    from tensorflow.python.framework import ops

    sys.path.insert(0, str(TESTS.parent / "benchmarks"))
    try:
        import tune_memory
    finally:
        sys.path.pop(0)
    registry = ops._gradient_registry._registry
    custom_before = sum(k.startswith("CustomGradient-") for k in registry)
    overrides = yaml.safe_load(setup["config"].read_text())
    r = tune_memory.measure(setup["data"], setup["root"] / "memory", 6, overrides, HEAD_ONLY,
                            log=lambda s: None)
    assert r["trials"] == 6
    assert sum(k.startswith("CustomGradient-") for k in registry) == custom_before
    growth = r["rss_mb_after_last"] - r["rss_mb_after_3"]
    assert growth < 7, r["rss_mb_per_trial"]
    assert r["peak_rss_mb_after_last"] - r["peak_rss_mb_after_3"] < 7, r


def test_tune_takes_fits_model_and_data_flags(setup, tmp_path):
    """`jewelclf tune DATA --backbone ... --weights ... --image-size ...` as with fit: the flags
    set the base config of every trial, and so best_config.yaml; --resume refuses them."""
    weights = setup["root"] / "tiny.weights.h5"
    run_dir = tmp_path / "flags"
    result = run("tune", setup["data"], "--run-dir", run_dir, "--backbone", "tiny_cnn",
                 "--weights", weights, "--image-size", 32, "--batch-size", 8, "--epochs", 1,
                 "--fine-tune-epochs", 0, "--seed", 7, "--class-weight", "none",
                 "--tuner", "random", "--max-trials", 1, "--space", setup["space"])
    assert result.exit_code == 0, result.output
    best = yaml.safe_load((run_dir / "best_config.yaml").read_text())
    assert best["model"]["backbone"] == "tiny_cnn" and best["model"]["weights"] == str(weights)
    assert best["data"]["image_size"] == 32 and best["data"]["batch_size"] == 8
    assert best["train"]["seed"] == 7 and best["train"]["class_weight"] == "none"
    assert best["train"]["stage1"]["epochs"] == 1 and best["train"]["stage2"]["epochs"] == 0
    refused = run("tune", setup["data"], "--run-dir", run_dir, "--resume", "--image-size", 64)
    assert refused.exit_code == 2
    assert refused.output.strip() == ("error: --resume continues the search with its saved config; "
                                      "drop --image-size, or start a new search in another --run-dir")
