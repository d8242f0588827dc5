"""``evaluate --unknown DIR`` (issue 18): k-NN distance to the run's training images flags photos
of classes the run never saw; the figures are sklearn's on the module's own scores, the score
fails where it must (copies of training photos are not unknown), and bad folders are one line."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from jewelclf.cli import main

from conftest import TINY_FLAGS, make_class_folder, make_image


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def unknown_run(tmp_path_factory):
    """A run trained on a flat folder (train, val and test carved), and a folder of grey photos
    of no trained class in a mixed layout (files at the top and in subfolders, PNG and JPEG)."""
    root = tmp_path_factory.mktemp("unknown")
    data = make_class_folder(root / "data", per_class=12)
    run_dir = root / "run"
    result = run("fit", data, "--run-dir", run_dir, *TINY_FLAGS, "--fine-tune-epochs", "0",
                 "--epochs", "2", "--test-fraction", "0.25")
    assert result.exit_code == 0, result.output
    other = root / "other"
    for i in range(8):
        make_image("other", 500 + i, path=other / f"grey_{i}.jpg")
        make_image("other", 600 + i, fmt="PNG", path=other / "more" / "deeper" / f"grey_{i}.png")
    return run_dir, data, other


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _evaluate(run_dir, data, unknown, out):
    result = run("evaluate", run_dir, data, "--unknown", unknown, "--output", out)
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())["unknown"], result


def test_unknown_metrics_are_sklearns_on_the_modules_own_scores(unknown_run, tmp_path):
    from jewelclf.data.sources import load_source
    from jewelclf.evaluation import reference, unknown_eval
    from jewelclf.evaluation.evaluate import choose_records
    from jewelclf.evaluation.unknown import knn_distance
    from jewelclf.runs import load_run

    run_dir, data, other = unknown_run
    u, result = _evaluate(run_dir, data, other, tmp_path / "out")
    assert u["score"] == "knn" and u["n_unknown"] == 16
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert u["n_known"] == metrics["num_examples"] and metrics["split"] == "test"
    for key in ("auroc", "fpr_at_95_tpr", "unknown_flagged", "known_coverage", "known_accuracy"):
        assert 0.0 <= u[key] <= 1.0, key
    assert u["threshold"] >= 0 and u["confidence_threshold"] == metrics["calibration"]["threshold"]
    assert "unknown: AUROC" in result.output and "known images: coverage" in result.output

    # The same scores through the module's public functions, scored by sklearn.
    run_model = load_run(run_dir)
    source = load_source(str(data))
    chosen = choose_records(run_dir, run_model.info, source, None)
    source.class_names = run_model.class_names
    plan = unknown_eval.prepare(other, run_model, source)
    plan.load_training(source if chosen.from_run else None)
    _, known_features = reference.model_features(run_model.model, source, chosen.records, run_model.config)
    scores = unknown_eval.knn_scores(plan, known_features)
    # The run's stored reference is what a fresh pass over its train and val images gives.
    src, train, val = reference.train_and_val(run_model, "the test", source if chosen.from_run else None)
    train_features = reference.model_features(run_model.model, src, train, run_model.config)[1]
    val_features = reference.model_features(run_model.model, src, val, run_model.config)[1]
    np.testing.assert_allclose(scores.val, knn_distance(train_features, val_features), atol=1e-5)
    np.testing.assert_allclose(scores.known, knn_distance(train_features, known_features), atol=1e-5)
    rows = _rows(tmp_path / "out" / "unknown_scores.csv")
    written = {r["kind"]: [float(x["distance"]) for x in rows if x["kind"] == r["kind"]] for r in rows}
    np.testing.assert_allclose(scores.known, written["known"], atol=1e-5)
    np.testing.assert_allclose(scores.unknown, written["unknown"], atol=1e-5)
    y = np.r_[np.zeros(len(scores.known)), np.ones(len(scores.unknown))]
    assert u["auroc"] == pytest.approx(roc_auc_score(y, np.r_[scores.known, scores.unknown]), abs=1e-6)
    assert u["threshold"] == pytest.approx(np.percentile(scores.val, 95, method="higher"), abs=1e-6)
    assert len(scores.val) == len(val) > 0
    assert np.mean(scores.val <= u["threshold"]) >= 0.95 - 1e-9  # 95% of known val images pass
    assert u["unknown_flagged"] == pytest.approx(np.mean(scores.unknown > u["threshold"]))
    # Accepted known images pass both thresholds: no more than pass the distance alone.
    assert u["known_coverage"] <= np.mean(scores.known <= u["threshold"]) + 1e-9


def test_without_calibration_coverage_is_the_distance_alone_and_a_note_says_so(unknown_run, tmp_path):
    run_dir, data, other = unknown_run
    bare = shutil.copytree(run_dir, tmp_path / "bare_run")
    (bare / "calibration.json").unlink()
    u, _ = _evaluate(bare, data, other, tmp_path / "out")
    assert u["confidence_threshold"] == 0.0 and "calibration.json" in u["note"]
    known = [r for r in _rows(tmp_path / "out" / "unknown_scores.csv") if r["kind"] == "known"]
    predictions = _rows(tmp_path / "out" / "predictions.csv")
    assert [r["path"] for r in known] == [p["path"] for p in predictions]
    accepted = [p for r, p in zip(known, predictions) if r["flagged"] == "0"]
    assert u["known_coverage"] == pytest.approx(len(accepted) / len(known))
    expected = np.mean([int(p["correct"]) for p in accepted]) if accepted else None
    assert u["known_accuracy"] == pytest.approx(expected)


def test_copies_of_training_photos_are_not_detected_but_new_photos_are(unknown_run, tmp_path):
    """The score must be able to fail: a copy of a training photo lies at distance 0 from it,
    so a DIR of such copies scores far below a DIR of photos unlike any trained class."""
    run_dir, data, other = unknown_run
    copies = tmp_path / "copies"
    copies.mkdir()
    train = [r["path"] for r in _rows(run_dir / "splits.csv") if r["split"] == "train"]
    for i, key in enumerate(train[:16]):
        shutil.copy(data / key, copies / f"copy_{i}.jpg")
    fake, _ = _evaluate(run_dir, data, copies, tmp_path / "out_copies")
    new, _ = _evaluate(run_dir, data, other, tmp_path / "out_new")
    distances = [float(r["distance"]) for r in _rows(tmp_path / "out_copies" / "unknown_scores.csv")
                 if r["kind"] == "unknown"]
    assert max(distances) < 1e-5 and fake["unknown_flagged"] == 0.0
    assert fake["auroc"] < 0.2, fake
    assert new["auroc"] > 0.8 and new["unknown_flagged"] > 0.5, new
    assert new["auroc"] - fake["auroc"] > 0.6


def _bad_folders(tmp_path, data):
    (tmp_path / "a_file.jpg").write_bytes(b"x")
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "notes.txt").write_text("not an image")
    make_image("other", 1, path=tmp_path / "classy" / "misc" / "Ring" / "r.jpg")
    make_image("other", 2, path=data / "misc_unknown" / "x.jpg")
    make_image("other", 3, path=tmp_path / "RING" / "r.jpg")
    return {
        "missing": (tmp_path / "nope", "does not exist"),
        "a file": (tmp_path / "a_file.jpg", "is not a folder"),
        "no readable image": (tmp_path / "unreadable", "holds no readable image"),
        "a class subfolder": (tmp_path / "classy", "that class was trained"),
        "named like a class": (tmp_path / "RING", "that class was trained"),
        "inside DATA": (data / "misc_unknown", "is inside DATA"),
        "holds DATA": (data.parent, "is inside the --unknown folder"),
    }


def test_bad_unknown_folders_are_one_line_errors_before_any_model_pass(unknown_run, tmp_path):
    run_dir, data, _ = unknown_run
    cases = _bad_folders(tmp_path, data)
    try:
        for name, (folder, says) in cases.items():
            out = tmp_path / f"out_{name.replace(' ', '_')}"
            result = run("evaluate", run_dir, data, "--unknown", folder, "--output", out)
            assert result.exit_code == 2, (name, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
            assert str(folder) in lines[0] and says in lines[0], (name, lines[0])
            assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), name
            assert not (out / "metrics.json").exists(), name
    finally:
        shutil.rmtree(data / "misc_unknown")


def test_evaluate_without_unknown_reports_no_unknown_fields(unknown_run, tmp_path):
    run_dir, data, _ = unknown_run
    result = run("evaluate", run_dir, data, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "unknown" not in json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "unknown:" not in result.output and not (tmp_path / "out" / "unknown_scores.csv").exists()
