"""Calibration (temperature scaling, ECE) and selective prediction (coverage, review threshold).

The ECE is checked against a reference written here from the definition; temperature scaling
is checked as an ML behaviour that can fail: an over-confident logit set must get T > 1 and at
most half its ECE, a well-calibrated one must keep T near 1, and the predicted class (so the
accuracy and F1) must never change.
"""

from __future__ import annotations

import csv
import itertools
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.special import softmax

from jewelclf.errors import JewelclfError
from jewelclf.evaluation import calibration as cal
from jewelclf.evaluation.metrics import compute_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _sampled(n: int = 4000, k: int = 5, seed: int = 0, sharpen: float = 1.0):
    """Labels drawn from softmax(z): probabilities softmax(z) are calibrated by construction;
    softmax(sharpen * z) with sharpen > 1 is over-confident (its true temperature is ``sharpen``)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, k))
    y = np.array([rng.choice(k, p=row) for row in softmax(z, axis=1)])
    return softmax(sharpen * z, axis=1), y


def _reference_ece(probs, y, bins=15):
    """ECE from its definition: bins (i/B, (i+1)/B], a confidence of exactly 0 in the first."""
    total, n = 0.0, len(y)
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        members = [j for j in range(n)
                   if (lo < max(probs[j]) <= hi) or (i == 0 and max(probs[j]) == 0)]
        if members:
            acc = sum(int(np.argmax(probs[j]) == y[j]) for j in members) / len(members)
            conf = sum(max(probs[j]) for j in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


@pytest.mark.parametrize("seed", range(5))
def test_ece_equals_a_computation_from_the_definition(seed):
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(0, 1 + seed, (300, 4)), axis=1)
    y = rng.integers(0, 4, 300)
    assert cal.expected_calibration_error(probs, y) == pytest.approx(_reference_ece(probs, y), abs=1e-12)
    bins = cal.reliability(probs, y)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 300


def test_ece_puts_a_confidence_on_an_edge_in_the_bin_below():
    # Confidence 2/3 is the upper edge of bin 10 of 15; 1.0 is the top of the last bin.
    probs = np.array([[2 / 3, 1 / 3], [1.0, 0.0]])
    y = np.array([0, 1])
    bins = cal.reliability(probs, y)
    assert bins[9]["count"] == 1 and bins[14]["count"] == 1
    assert cal.expected_calibration_error(probs, y) == pytest.approx(_reference_ece(probs, y))
    assert cal.expected_calibration_error(np.zeros((0, 3)), np.zeros(0)) == 0.0


def test_an_over_confident_model_gets_t_above_1_and_ece_drops_under_half():
    probs, y = _sampled(sharpen=3.0)
    t = cal.fit_temperature(probs, y)
    assert 2.5 < t < 3.5  # the true temperature is 3
    before = cal.expected_calibration_error(probs, y)
    after = cal.expected_calibration_error(cal.scale(probs, t), y)
    assert before > 0.1 and after < before / 2
    assert cal.nll(probs, y, t) < cal.nll(probs, y)


def test_a_calibrated_model_keeps_t_near_1_and_an_under_confident_one_gets_t_below_1():
    probs, y = _sampled(seed=1)
    assert cal.fit_temperature(probs, y) == pytest.approx(1.0, abs=0.08)
    soft, y = _sampled(seed=2, sharpen=0.5)
    assert 0.4 < cal.fit_temperature(soft, y) < 0.6


def test_calibration_never_changes_the_predicted_class_accuracy_or_f1():
    probs, y = _sampled(n=1500, sharpen=3.0)
    names = [f"c{i}" for i in range(5)]
    raw = compute_metrics(y, probs, names)
    for t in (0.05, 0.3, 1.7, 20.0):
        scaled = cal.scale(probs.astype(np.float32), t)
        assert (scaled.argmax(axis=1) == probs.argmax(axis=1)).all()
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0, rtol=1e-9)
        m = compute_metrics(y, scaled, names)
        for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "confusion_matrix"):
            assert m[key] == raw[key], (t, key)


def test_the_temperature_search_stays_in_its_bounds_and_handles_zero_probabilities():
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    y = np.array([0, 1, 2])  # the third is certain and wrong: the likelihood wants a huge T
    t = cal.fit_temperature(probs, y)
    assert np.isfinite(t) and cal.TEMPERATURE_BOUNDS[0] <= t <= cal.TEMPERATURE_BOUNDS[1]
    assert t > 10
    assert cal.fit_temperature(np.zeros((0, 3)), np.zeros(0)) == 1.0


def _conf_probs(confidences):
    """Two-class probability rows whose top-class confidence is each of ``confidences``."""
    c = np.asarray(confidences, dtype=float)
    return np.stack([c, 1 - c], axis=1)


def test_the_threshold_is_the_lowest_that_reaches_the_target_on_val():
    # Most confident first: right, right, wrong, right, right, wrong, right, right, right, wrong.
    conf = [0.99, 0.97, 0.95, 0.93, 0.91, 0.89, 0.87, 0.85, 0.83, 0.81]
    right = [1, 1, 0, 1, 1, 0, 1, 1, 1, 0]
    probs, y = _conf_probs(conf), np.array([0 if r else 1 for r in right])
    # Kept accuracy at each cut: 1, 1, .667, .75, .8, .667, .714, .75, .778, .7
    got = cal.choose_threshold(probs, y, 0.75)
    assert got == {"threshold": 0.83, "coverage": 0.9, "accuracy": pytest.approx(7 / 9), "target_met": True}
    assert cal.choose_threshold(probs, y, 1.0)["threshold"] == 0.97
    assert cal.choose_threshold(probs, y, 0.5)["coverage"] == 1.0
    kept = cal.at_threshold(probs, y, 0.83)
    assert kept["kept"] == 9 and kept["needs_review"] == 1 and kept["accuracy"] == pytest.approx(7 / 9)


def test_equal_confidences_are_kept_or_reviewed_together():
    probs = _conf_probs([0.9, 0.8, 0.8, 0.8, 0.7])
    y = np.array([0, 0, 1, 0, 0])  # the 0.8 group holds one error
    curve = cal.coverage_curve(probs, y)
    assert list(curve["coverage"]) == [0.2, 0.8, 1.0]
    assert cal.choose_threshold(probs, y, 0.9)["threshold"] == 0.9
    brute = [np.mean((probs.argmax(1) == y)[probs.max(1) >= t]) for t in curve["threshold"]]
    np.testing.assert_allclose(curve["accuracy"], brute)


def test_an_unreachable_target_sends_every_image_to_review():
    probs = _conf_probs([0.99, 0.9])
    y = np.array([1, 0])  # the most confident is wrong
    got = cal.choose_threshold(probs, y, 0.98)
    assert got["target_met"] is False and got["coverage"] == 0.0 and got["threshold"] > 1.0
    assert cal.at_threshold(probs, y, got["threshold"])["kept"] == 0


def test_the_coverage_table_reaches_each_level_once_and_ends_at_full_coverage():
    probs, y = _sampled(n=400, seed=3)
    rows = cal.coverage_table(probs, y)
    assert [r["coverage"] for r in rows] == pytest.approx(list(cal.COVERAGE_LEVELS))
    assert rows[-1]["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == y)))
    assert all(a["threshold"] >= b["threshold"] for a, b in itertools.pairwise(rows))


def test_calibrate_chooses_on_the_scaled_probabilities_and_keeps_t_1_without_errors():
    probs, y = _sampled(n=2000, sharpen=3.0, seed=4)
    c = cal.calibrate(probs, y, 0.95)
    assert c.temperature > 2 and c.val_ece < c.val_ece_uncalibrated / 2
    scaled = cal.scale(probs, c.temperature)
    assert cal.at_threshold(scaled, y, c.threshold)["accuracy"] >= 0.95
    assert c.val_coverage == pytest.approx(cal.at_threshold(scaled, y, c.threshold)["coverage"])
    perfect = cal.calibrate(_conf_probs([0.9, 0.8, 0.7]), np.zeros(3, int), 0.98)
    assert perfect.temperature == 1.0 and "misclassified" in perfect.note
    assert perfect.threshold == 0.7 and perfect.val_coverage == 1.0


def test_the_calibration_file_round_trips_and_a_damaged_one_is_a_one_line_error(tmp_path):
    path = tmp_path / "calibration.json"
    assert cal.read(path) is None  # an older run
    c = cal.calibrate(*_sampled(n=500, sharpen=2.0), 0.9)
    cal.write(path, c)
    assert cal.read(path) == c
    for text in ("{not json", "[1, 2]", '{"temperature": 0}', '{"temperature": "hot"}',
                 '{"temperature": 1.5, "threshold": "high"}', '{"temperature": NaN}'):
        path.write_text(text)
        with pytest.raises(JewelclfError) as e:
            cal.read(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


# --- through fit, evaluate and predict ------------------------------------------------------


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def _rows(folder):
    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_fit_stores_the_temperature_and_threshold_and_reports_calibrated_test(tiny_run):
    stored = json.loads((tiny_run / "calibration.json").read_text())
    for key in ("temperature", "threshold", "target_accuracy", "val_coverage",
                "val_accuracy_at_threshold"):
        assert key in stored
    assert stored["target_accuracy"] == 0.98 and stored["num_val"] > 0
    info = json.loads((tiny_run / "run_info.json").read_text())
    assert info["summary"]["calibration"]["temperature"] == stored["temperature"]
    m = _metrics(tiny_run)
    assert {"ece", "ece_uncalibrated", "coverage", "reliability"} <= set(m)
    assert m["calibration"]["source"] == "run" and m["coverage"]["threshold"] == stored["threshold"]
    for png in ("reliability_diagram.png", "coverage_accuracy.png"):
        assert (tiny_run / png).read_bytes().startswith(PNG)


def _copy_run(tiny_run, dest, temperature=None, threshold=None):
    """A copy of the tiny run; with ``temperature`` its calibration file says so (its own val
    set is too easy to need one), without it the copy has no calibration file (an older run)."""
    shutil.copytree(tiny_run, dest)
    path = dest / "calibration.json"
    if temperature is None:
        path.unlink()
    else:
        stored = json.loads(path.read_text())
        path.write_text(json.dumps({**stored, "temperature": temperature, "threshold": threshold}))
    return dest


def _evaluate(run, data, out):
    from jewelclf.cli import main

    result = CliRunner().invoke(main, ["evaluate", str(run), str(data), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return result.output


def test_evaluate_scores_calibrated_probabilities_and_writes_the_plots(tiny_run, tmp_path):
    data = tiny_run.parent / "data"
    old = _copy_run(tiny_run, tmp_path / "old")
    scaled = _copy_run(tiny_run, tmp_path / "scaled", temperature=2.5, threshold=0.6)
    old_out = _evaluate(old, data, tmp_path / "a")
    out = _evaluate(scaled, data, tmp_path / "b")
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    for key in ("accuracy", "macro_f1", "top_k_accuracy", "confusion_matrix", "per_class"):
        assert a[key] == b[key]
    assert b["calibration"]["temperature"] == 2.5 and b["ece"] != b["ece_uncalibrated"]
    assert b["ece_uncalibrated"] == pytest.approx(a["ece"]) and a["ece"] == a["ece_uncalibrated"]
    kept = b["coverage"]["at_threshold"]
    conf = np.array([float(r["confidence"]) for r in _rows(tmp_path / "b")])
    raw_conf = np.array([float(r["confidence"]) for r in _rows(tmp_path / "a")])
    assert kept["threshold"] == 0.6 and kept["kept"] == int((conf >= 0.6).sum())
    assert b["coverage"]["curve"][-1]["coverage"] == 1.0
    # T > 1 softens: every top probability falls, unless it was 1 to 4 decimals.
    assert (conf <= raw_conf + 1e-4).all() and (conf < raw_conf - 1e-3).any()
    assert "temperature 2.500" in out and "review threshold 0.6000" in out
    assert old_out.count("has no calibration.json") == 1 and "review threshold 0." not in old_out
    assert a["calibration"]["source"] == "none" and a["coverage"]["at_threshold"] is None
    for png in ("reliability_diagram.png", "coverage_accuracy.png"):
        assert (tmp_path / "b" / png).read_bytes().startswith(PNG)


def test_evaluate_refuses_a_damaged_calibration_file_in_one_line(tiny_run, tmp_path):
    from jewelclf.cli import main

    run = _copy_run(tiny_run, tmp_path / "bad", temperature=-1)
    result = CliRunner().invoke(main, ["evaluate", str(run), str(tiny_run.parent / "data")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "calibration.json" in result.output and "temperature -1" in result.output


def test_predict_with_a_run_applies_its_temperature(tiny_run, tmp_path):
    import tensorflow as tf

    from jewelclf.data.images import load_image
    from jewelclf.inference.predict import load_predictor
    from jewelclf.inference.runtime import keras_probabilities

    predictor = load_predictor(_copy_run(tiny_run, tmp_path / "scaled", temperature=2.5))
    assert predictor.policy.temperature == 2.5
    image = next((tiny_run.parent / "data" / "test").rglob("*.jpg"))
    pixels = load_image(tf.constant(image.read_bytes()), predictor.image_size,
                        predictor.resize).numpy()[None]
    raw = keras_probabilities(predictor.model, pixels)
    np.testing.assert_allclose(predictor._answer(pixels)["probabilities"], cal.scale(raw, 2.5), rtol=1e-5)
    assert load_predictor(_copy_run(tiny_run, tmp_path / "old")).policy.temperature == 1.0


def test_target_accuracy_flag_and_its_range(class_folder, tmp_path):
    from jewelclf.cli import main
    from jewelclf.cli_options import overrides as _overrides
    from jewelclf.config import resolve

    assert resolve(None, _overrides(target_accuracy=0.9)).train.target_accuracy == 0.9
    assert resolve().train.target_accuracy == 0.98
    for bad in ("0", "1.5", "-0.2"):
        result = CliRunner().invoke(main, ["fit", str(class_folder), "--run-dir", str(tmp_path / "r"),
                                           "--target-accuracy", bad])
        assert result.exit_code == 2 and "train.target_accuracy" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "r").exists()
