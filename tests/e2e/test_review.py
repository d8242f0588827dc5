"""``jewelclf review``: label errors found by confident learning on out-of-fold predictions.

The learning test flips labels of generated texture images (tests/conftest.py
``make_texture_folder``: colour says nothing, only the texture does) and requires the flipped
files at the top of ``label_issues.csv``. The backbone is ``tiny_cnn`` pretrained here on other
texture images, as a real run starts from ImageNet weights: stage-1 features of a random
backbone would not tell the textures apart. Broken variants it kills: predictions made in-fold
(the head has memorised the wrong labels), features of the wrong images, a ranking that is
not by the given label's probability.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from jewelclf.cli import main
from jewelclf.review.sheet import render_sheet

from conftest import TEXTURES, make_texture, make_texture_folder, tiny_cnn

CLASSES = list(TEXTURES)


def pretrained_tiny(path: Path) -> Path:
    """``tiny_cnn`` weights trained on 300 texture images of their own (not the test's)."""
    rng = np.random.default_rng(7)
    x = np.stack([np.asarray(Image.fromarray(make_texture(c, rng)).resize((32, 32)))
                  for _ in range(100) for c in CLASSES]).astype("float32")
    y = np.tile(np.arange(len(CLASSES)), 100)
    keras.utils.set_random_seed(0)
    backbone = tiny_cnn(input_shape=(32, 32, 3))
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1),
                              backbone, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(len(CLASSES), activation="softmax")])
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    backbone.save_weights(path)
    return path


def flip_labels(data: Path, per_class: int = 2, seed: int = 0) -> set[str]:
    """Move ``per_class`` training files of each class to the next class's folder, and put a
    JPEG copy of one more file under another class (a flipped near-duplicate of a file that
    keeps its label); return the run paths of every wrongly labelled file."""
    rng = random.Random(seed)
    flipped = set()
    for i, c in enumerate(CLASSES):
        other = CLASSES[(i + 1) % len(CLASSES)]
        for f in rng.sample(sorted((data / "train" / c).iterdir()), per_class):
            f.rename(data / "train" / other / f.name)
            flipped.add(f"train/{other}/{f.name}")
    original = max((data / "train" / CLASSES[0]).glob(f"{CLASSES[0]}_*.png"))
    Image.open(original).convert("RGB").save(data / "train" / CLASSES[1] / "copy.jpg", quality=92)
    flipped.add(f"train/{CLASSES[1]}/copy.jpg")
    return flipped


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """``(run, data, flipped)``: a finished head-only run on texture data with 7 wrong labels."""
    root = tmp_path_factory.mktemp("review")
    weights = pretrained_tiny(root / "tiny.weights.h5")
    data = make_texture_folder(root / "data", train=40, test=4)
    flipped = flip_labels(data)
    run = root / "run"
    result = CliRunner().invoke(main, [
        "fit", str(data), "--run-dir", str(run), "--backbone", "tiny_cnn", "--weights",
        str(weights), "--image-size", "32", "--batch-size", "8", "--epochs", "3",
        "--fine-tune-epochs", "0", "--learning-rate", "0.01", "--seed", "0"])
    assert result.exit_code == 0, result.output
    return run, data, flipped


@pytest.fixture(scope="module")
def reviewed(noisy, tmp_path_factory):
    run, data, _ = noisy
    out = tmp_path_factory.mktemp("review_out") / "review"
    result = CliRunner().invoke(main, ["review", str(run), str(data), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def logistic_review(noisy, tmp_path_factory):
    """The same review with the logistic head: deterministic, so its reruns can be compared."""
    run, data, _ = noisy
    out = tmp_path_factory.mktemp("review_out") / "logistic"
    result = CliRunner().invoke(main, ["review", str(run), str(data), "--output", str(out),
                                       "--head", "logistic"])
    assert result.exit_code == 0, result.output
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_flipped_labels_rank_first(noisy, reviewed):
    run, _, flipped = noisy
    out, _ = reviewed
    with open(out / "label_issues.csv", encoding="utf-8") as f:
        assert f.readline().strip() == "path,given_label,suggested_label,score"
    rows = _rows(out / "label_issues.csv")
    top = [r["path"] for r in rows[:len(flipped)]]
    assert len(set(top) & flipped) >= len(flipped) - 1, (top, sorted(flipped))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)  # most suspicious (lowest given-label probability) first
    splits = {r["path"]: r for r in _rows(run / "splits.csv")}
    for r in rows:
        assert r["path"] in splits and splits[r["path"]]["split"] in ("train", "val")
        assert r["given_label"] == splits[r["path"]]["label"] == r["path"].split("/")[1]
    right = [r for r in rows if r["path"] in flipped]
    # a file moved from class i to i+1 (and the copy) is suggested back to class i
    assert all(r["suggested_label"] == CLASSES[CLASSES.index(r["given_label"]) - 1] for r in right)


def test_near_duplicates_under_different_labels_are_listed(reviewed):
    out, _ = reviewed
    rows = _rows(out / "duplicate_label_conflicts.csv")
    original = sorted(p for p in {r["path"] for r in rows} if p.startswith("train/necklace/"))
    assert "train/ring/copy.jpg" in {r["path"] for r in rows}, rows
    assert original and {r["group"] for r in rows} == {"1"}
    assert {r["label"] for r in rows} == {"necklace", "ring"}


def test_fit_keeps_the_stage1_features_and_review_uses_them(noisy, reviewed):
    run, _, _ = noisy
    out, output = reviewed
    with np.load(run / "checkpoints" / "stage1_features.npz") as f:
        keys = [*f["train_keys"].tolist(), *f["val_keys"].tolist()]
        assert len(f["train"]) + len(f["val"]) == len(keys)
    run_keys = {r["path"] for r in _rows(run / "splits.csv") if r["split"] != "test"}
    assert set(keys) == run_keys
    summary = json.loads((out / "review.json").read_text())
    assert summary["features"].startswith("kept by fit")
    assert summary["reviewed"] == len(run_keys) and "computing" not in output


def test_a_run_without_kept_features_gets_them_computed(noisy, logistic_review, tmp_path):
    run, data, _ = noisy
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    (old / "checkpoints" / "stage1_features.npz").unlink()
    out = tmp_path / "review"
    result = CliRunner().invoke(main, ["review", str(old), str(data), "--output", str(out),
                                       "--head", "logistic"])
    assert result.exit_code == 0, result.output
    assert "note: the run has no kept stage-1 features" in result.output
    assert json.loads((out / "review.json").read_text())["features"].startswith("computed")
    # the same backbone weights: the same features, so the same ranking
    assert ([r["path"] for r in _rows(out / "label_issues.csv")]
            == [r["path"] for r in _rows(logistic_review / "label_issues.csv")])


def test_review_refuses_to_overwrite(noisy, logistic_review):
    run, data, _ = noisy
    out = logistic_review
    before = (out / "label_issues.csv").read_bytes()
    result = CliRunner().invoke(main, ["review", str(run), str(data), "--output", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and "--overwrite" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert (out / "label_issues.csv").read_bytes() == before
    result = CliRunner().invoke(main, ["review", str(run), str(data), "--output", str(out),
                                       "--head", "logistic", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "label_issues.csv").read_bytes() == before  # seeded: the same review again


def _bad_cases(noisy, tmp: Path) -> dict[str, tuple[list[str], str]]:
    run, data, _ = noisy
    empty = tmp / "empty"
    empty.mkdir()
    unfinished = tmp / "unfinished"
    unfinished.mkdir()
    (unfinished / "run_info.json").write_text(json.dumps({"status": "running"}))
    (unfinished / "model.keras").write_bytes(b"")
    other = make_texture_folder(tmp / "other", train=3, test=1)
    afile = tmp / "a_file"
    afile.write_text("x")
    return {
        "no run": ([str(empty), str(data), "--output", str(tmp / "o1")], "holds no finished"),
        "missing run": ([str(tmp / "nope"), str(data), "--output", str(tmp / "o2")], "does not exist"),
        "unfinished": ([str(unfinished), str(data), "--output", str(tmp / "o3")], "not finished"),
        "other data": ([str(run), str(other), "--output", str(tmp / "o4")], "is not the data"),
        "missing data": ([str(run), str(tmp / "gone"), "--output", str(tmp / "o5")], "gone"),
        "inside data": ([str(run), str(data), "--output", str(data / "review")], "inside DATA"),
        "output is a file": ([str(run), str(data), "--output", str(afile)], "is a file"),
    }


def test_bad_input_is_one_line(noisy, tmp_path):
    for name, (args, expected) in _bad_cases(noisy, tmp_path).items():
        result = CliRunner().invoke(main, ["review", *args])
        assert result.exit_code == 2, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (name, result.output)
        assert "Traceback" not in result.output
    assert not (noisy[1] / "review").exists()


def test_contact_sheet_escapes_every_string(noisy, reviewed):
    out, _ = reviewed
    page = (out / "label_issues.html").read_text(encoding="utf-8")
    assert page.count("<figure") >= 7 and "data:image/jpeg;base64," in page
    hostile = '<img src=x onerror="alert(1)">'
    issue = {"path": f"train/{hostile}.png", "given_label": "<b>ring</b>", "split": "train",
             "suggested_label": "</figcaption><script>x</script>", "score": 0.01,
             "file": "/nonexistent.png"}
    group = {"kind": "near", "labels": ["<i>a</i>", "b"],
             "files": [{"file": f"{hostile}.jpg", "split": "train", "label": "<i>a</i>"}]}
    summary = {"run": "<script>run</script>", "reviewed": 1, "reviewed_splits": ["train"],
               "label_issues": 1, "ranked_by": "self_confidence", "folds": 5, "head": "<u>h</u>",
               "features": "kept by fit (<x>)"}
    page = render_sheet([issue], [group], summary, {})
    for raw in (hostile, "<b>", "<script>", "<i>", "<u>", "<x>", "</figcaption><script>"):
        assert raw not in page
    assert "&lt;script&gt;run&lt;/script&gt;" in page and "&lt;b&gt;ring&lt;/b&gt;" in page


def test_small_classes_lower_the_folds_and_a_single_image_is_an_error():
    from jewelclf.errors import JewelclfError
    from jewelclf.review.label_issues import _usable_folds

    notes: list[str] = []
    assert _usable_folds(np.array([0, 0, 0, 1, 1, 1, 1, 1]), ["a", "b"], 5, notes.append) == 3
    assert notes and "class a has 3 images; using 3 folds" in notes[0]
    with pytest.raises(JewelclfError, match="class b has 1 reviewed image"):
        _usable_folds(np.array([0, 0, 0, 1]), ["a", "b"], 5, notes.append)
