"""The SavedModel's review outputs, ``confidence``, ``unknown_score`` and ``needs_review``: read in
a fresh process that never imports jewelclf, held to the run's calibration and reference, and
answered by ``jewelclf predict`` from every kind of model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from jewelclf import runs
from jewelclf.cli import main
from jewelclf.data.images import load_image
from jewelclf.evaluation import reference
from jewelclf.export import layout
from jewelclf.inference.policy import for_run
from jewelclf.inference.runtime import keras_probabilities_and_features

from conftest import TEXTURES, make_texture
from export_helpers import encode

# Run as `python -c` with the SavedModel and an .npz of encoded images; prints the outputs.
FRESH = r"""
import json, sys
import numpy as np
import tensorflow as tf
fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
z = np.load(sys.argv[2])
images = [z[f"i{j}"].tobytes() for j in range(int(z["n"]))]
out = {k: v.numpy().tolist() for k, v in fn(images=tf.constant(images)).items() if k not in ("classes", "error")}
out["jewelclf_imported"] = any(m.split(".")[0] == "jewelclf" for m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def run(tiny_run):
    return runs.load_run(tiny_run)


@pytest.fixture(scope="module")
def probes(tiny_run) -> dict[str, bytes]:
    """Two of the run's own training images, two photos of no trained class (striped textures:
    the tiny classes are plain colours), and a corrupt file."""
    with open(tiny_run / "splits.csv", newline="") as f:
        train = [r["path"] for r in csv.DictReader(f) if r["split"] == "train"]
    data = Path(json.loads((tiny_run / "run_info.json").read_text())["data"])
    rng = np.random.default_rng(5)
    out = {f"train{i}": (data / train[j]).read_bytes() for i, j in enumerate((0, len(train) - 1))}
    for i, label in enumerate(list(TEXTURES)[:2]):
        out[f"unknown{i}"] = encode(make_texture(label, rng), "PNG")
    out["corrupt"] = b"\xff\xd8\xff" + b"\x00" * 64
    return out


def serve_fresh(version: Path, images: list[bytes], tmp_path: Path) -> dict:
    npz = tmp_path / "images.npz"
    np.savez(npz, n=len(images), **{f"i{j}": np.frombuffer(b, np.uint8) for j, b in enumerate(images)})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(version), str(npz)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def keras_answer(run, images: list[bytes], review_threshold=None) -> dict[str, np.ndarray]:
    pixels = np.stack([load_image(tf.constant(b), run.image_size, run.resize).numpy() for b in images])
    return for_run(run, review_threshold).answer(*keras_probabilities_and_features(run.model, pixels))


def test_review_outputs_in_a_fresh_process_follow_the_run(exported, run, probes, tmp_path):
    names = list(probes)
    out = serve_fresh(exported / "1", list(probes.values()), tmp_path)
    assert out["jewelclf_imported"] is False
    valid = np.array(out["valid"])
    assert valid.tolist() == [n != "corrupt" for n in names]
    ok = [probes[n] for n in names if n != "corrupt"]
    want = keras_answer(run, ok)
    probs, confidence = np.array(out["probabilities"])[valid], np.array(out["confidence"])
    # Calibrated probabilities, their top value as confidence and the first score.
    np.testing.assert_allclose(probs, want["probabilities"], atol=1e-5)
    np.testing.assert_allclose(confidence[valid], probs.max(axis=1), atol=1e-7)
    np.testing.assert_allclose(confidence, np.array(out["scores"])[:, 0], atol=0)
    unknown = np.array(out["unknown_score"])
    np.testing.assert_allclose(unknown[valid], want["unknown_score"], atol=1e-5)
    assert np.array(out["needs_review"])[valid].tolist() == want["needs_review"].tolist()

    info = json.loads((exported / "1" / "assets.extra" / layout.INFO).read_text())
    ref = reference.read(run.run_dir / "unknown_reference.npz")
    assert info["temperature"] == pytest.approx(run.calibration.temperature)
    assert info["review_threshold"] == pytest.approx(run.calibration.threshold)
    assert info["review_threshold_source"] == "run"
    assert info["unknown"]["threshold"] == pytest.approx(ref.threshold)
    assert info["unknown"]["train_images"] == len(ref.train) > 0
    assert set(layout.OUTPUT_KEYS) <= set(info["outputs"])

    by_name = dict(zip(names, unknown))
    # A training image is its own nearest neighbour; photos of no trained class lie beyond the
    # threshold, so they need review whatever their confidence.
    assert by_name["train0"] <= 1e-5 and by_name["train1"] <= 1e-5
    review = dict(zip(names, out["needs_review"]))
    for n in ("unknown0", "unknown1"):
        assert by_name[n] > ref.threshold, (n, by_name[n], ref.threshold)
        assert review[n] is True
    assert review["corrupt"] is True and by_name["corrupt"] == 0.0 and out["confidence"][-1] == 0.0


def test_review_threshold_flag_sets_the_confidence_rule(tiny_run, run, probes, tmp_path):
    base = tmp_path / "strict"
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--output", str(base), "--review-threshold", "1"])
    assert r.exit_code == 0, r.output
    assert "review below confidence 1.0000 (--review-threshold)" in r.output
    info = json.loads((base / "1" / "assets.extra" / layout.INFO).read_text())
    assert info["review_threshold"] == 1.0 and info["review_threshold_source"] == "--review-threshold"
    known = [probes["train0"], probes["train1"]]
    out = serve_fresh(base / "1", known, tmp_path)
    want = keras_answer(run, known, review_threshold=1.0)
    assert out["needs_review"] == want["needs_review"].tolist()
    assert out["needs_review"] == [c < 1.0 for c in out["confidence"]]

    r = CliRunner().invoke(main, ["export", str(tiny_run), "--output", str(tmp_path / "x"),
                                  "--review-threshold", "1.5"])
    assert r.exit_code == 2 and "--review-threshold 1.5 is not a probability" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["savedmodel", "run", "keras"])
def test_predict_answers_the_review_fields(kind, exported, tiny_run, probes, tmp_path):
    files = []
    for n in ("train0", "unknown0"):
        files.append(tmp_path / f"{n}.png")
        files[-1].write_bytes(probes[n])
    model = {"savedmodel": exported, "run": tiny_run}.get(kind)
    if kind == "keras":
        model = tmp_path / "k"
        r = CliRunner().invoke(main, ["export", str(tiny_run), "--format", "keras", "--output", str(model)])
        assert r.exit_code == 0, r.output
        assert (model / "unknown_reference.npz").is_file()
    r = CliRunner().invoke(main, ["predict", str(model), *map(str, files), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output[r.output.index("["):])
    threshold = runs.load_run(tiny_run).calibration.threshold
    assert rows[0]["needs_review"] is bool(rows[0]["confidence"] < threshold)  # not unknown: confidence decides
    assert rows[1]["needs_review"] is True and rows[1]["unknown_score"] > rows[0]["unknown_score"]
    for row in rows:
        assert row["confidence"] == pytest.approx(row["score"], abs=1e-6)
