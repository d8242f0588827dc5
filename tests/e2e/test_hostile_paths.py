"""Issue 20, items 4, 5 and part of 9: symlink loops under every walking command, one file
under several spellings (or through a link out) in a CSV manifest, the seed's range and the
YAML config's duplicate keys and tags.

A walker that loops would hang the suite, so the walking commands run in a subprocess with a
timeout: a regression fails instead of hanging.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from jewelclf import config as cfg
from jewelclf.data.audit import check_data, format_check_report
from jewelclf.data.sources import load_source
from jewelclf.errors import JewelclfError

from conftest import REPO, TINY_FLAGS, make_image

WALK_TIMEOUT = 120  # s: a TensorFlow import and two tiny images, on a loaded 2-core CPU


def _looped_folder(root: Path) -> Path:
    """``root`` with two images, a subfolder with one, and three links back up: ``a -> .``,
    ``b -> .`` (the issue's ``ln -s . d/a; ln -s . d/b``) and ``sub/up -> ..``."""
    make_image("ring", 1, path=root / "ring.jpg")
    make_image("watch", 2, path=root / "watch.jpg")
    make_image("ring", 3, path=root / "sub" / "deep.jpg")
    os.symlink(".", root / "a")
    os.symlink(".", root / "b")
    os.symlink("..", root / "sub" / "up")
    return root


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=WALK_TIMEOUT)


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory) -> Path:
    """An untrained ``tiny_cnn`` classifier of two classes saved as ``.keras``, with the
    ``jewelclf.json`` that ``predict`` and ``index`` read beside it (no fit needed)."""
    from jewelclf.modeling.classifier import build_classifier

    c = cfg.merge(cfg.Config(), {"model": {"backbone": "tiny_cnn", "weights": "none"},
                                 "data": {"image_size": 32}, "augment": {"enabled": False}})
    folder = tmp_path_factory.mktemp("model")
    build_classifier(c, 2).save(folder / "model.keras")
    (folder / "jewelclf.json").write_text(json.dumps(
        {"class_names": ["ring", "watch"], "image_size": 32, "resize": "squash", "top_k": 2}))
    return folder / "model.keras"


# ---------------------------------------------------------------- item 4: one walker


def test_the_image_walker_ends_on_a_symlink_loop(tmp_path):
    d = _looped_folder(tmp_path / "d")
    code = ("import sys; from jewelclf.inference.predict import collect_images; "
            "print('\\n'.join(str(p.relative_to(sys.argv[1])) for p in collect_images([sys.argv[1]])))")
    out = _run(["-c", code, str(d)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == ["ring.jpg", "sub/deep.jpg", "watch.jpg"]


def test_predict_on_a_folder_with_a_symlink_loop_predicts_each_image_once(tmp_path, keras_model):
    d = _looped_folder(tmp_path / "d")
    out = _run(["-m", "jewelclf", "predict", str(keras_model), str(d), "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    images = sorted(Path(r["image"]).relative_to(d).as_posix() for r in json.loads(out.stdout))
    assert images == ["ring.jpg", "sub/deep.jpg", "watch.jpg"]


def test_a_class_folder_linking_back_to_data_is_no_class(tmp_path):
    data = tmp_path / "data"
    for label in ("ring", "watch"):
        for i in range(2):
            make_image(label, i, path=data / label / f"{label}_{i}.jpg")
    os.symlink(".", data / "a")                 # would be a class holding every image
    os.symlink("..", data / "ring" / "up")      # would pull watch's images into ring
    source = load_source(str(data))
    assert source.class_names == ["ring", "watch"]
    assert sorted(r.key for r in source.records) == [
        "ring/ring_0.jpg", "ring/ring_1.jpg", "watch/watch_0.jpg", "watch/watch_1.jpg"]
    assert any("ignored" in n and "a link back" in n for n in source.notes)


def test_index_on_a_catalogue_with_symlink_loops_embeds_each_image_once(tmp_path, keras_model):
    from jewelclf.cli import main

    cat = tmp_path / "cat"
    for label in ("ring", "watch"):
        make_image(label, 7, path=cat / label / f"{label}.jpg")
    os.symlink(".", cat / "a")
    os.symlink(".", cat / "b")
    os.symlink(".", cat / "ring" / "again")
    result = CliRunner().invoke(main, ["index", str(keras_model), str(cat), "--output", str(tmp_path / "idx")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "idx" / "manifest.csv", newline="") as f:
        items = sorted((r["key"], r["label"]) for r in csv.DictReader(f))
    assert items == [("ring/ring.jpg", "ring"), ("watch/watch.jpg", "watch")]


# ---------------------------------------------------------------- item 5: one file, one record


@pytest.fixture
def csv_root(tmp_path) -> Path:
    root = tmp_path / "m"
    for label in ("ring", "watch"):
        for i in range(4):
            make_image(label, i, path=root / "img" / f"{label}_{i}.jpg")
    return root


def _manifest(root: Path, rows: list[str]) -> str:
    body = [f"img/{label}_{i}.jpg,{label}" for label in ("ring", "watch") for i in range(1, 4)]
    path = root / "manifest.csv"
    path.write_text("path,label\n" + "\n".join(rows + body) + "\n", encoding="utf-8")
    return str(path)


SPELLINGS = ["img/ring_0.jpg", "./img/../img/ring_0.jpg", "img//ring_0.jpg"]


def test_one_file_under_three_spellings_and_one_label_is_one_record(csv_root):
    spec = _manifest(csv_root, [f"{s},ring" for s in SPELLINGS])
    source = load_source(spec)
    ring_0 = [r for r in source.records if r.key.endswith("ring_0.jpg")]
    assert [r.key for r in ring_0] == ["img/ring_0.jpg"]
    assert len(source.repeated) == 2
    assert "line 3 ('./img/../img/ring_0.jpg') repeats line 2 ('img/ring_0.jpg')" in source.repeated
    assert "2 row(s)" in source.repeat_warning()
    report = check_data(spec, near_duplicate_distance=None)
    assert report["warnings"]["repeated_rows"] == 2 and not report["errors"]
    assert "rows naming a file listed before with the same label (2" in format_check_report(report)


def test_one_file_under_two_labels_is_checks_conflict_and_fits_refusal(csv_root, tmp_path):
    from jewelclf.cli import main

    spec = _manifest(csv_root, ["img/ring_0.jpg,ring", "./img/../img/ring_0.jpg,watch",
                                "img//ring_0.jpg,ring"])
    report = check_data(spec, near_duplicate_distance=None)
    assert report["errors"] == {"groups_with_conflicting_labels": 1}
    assert "LABELS DIFFER: ring, watch" in format_check_report(report)

    result = CliRunner().invoke(main, ["fit", spec, "--run-dir", str(tmp_path / "run"), *TINY_FLAGS])
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert ("error: CSV manifest" in errors[0] and "lists 'img/ring_0.jpg' under two labels: 'ring' on "
            "line 2 and 'watch' on line 3 as './img/../img/ring_0.jpg'" in errors[0])
    assert not (tmp_path / "run" / "model.keras").exists()


def test_evaluate_and_index_refuse_one_file_under_two_labels(csv_root, tmp_path, tiny_run, keras_model):
    """Scoring (or indexing) an image under two labels would count it twice, once wrong."""
    from jewelclf.cli import main

    spec = _manifest(csv_root, ["img/ring_0.jpg,ring", "img//ring_0.jpg,watch"])
    for args in (["evaluate", str(tiny_run), spec, "--output", str(tmp_path / "ev")],
                 ["index", str(keras_model), spec, "--output", str(tmp_path / "idx")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args[0], result.output)
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "under two labels" in errors[0], (args[0], result.output)
    assert not (tmp_path / "ev").exists() and not (tmp_path / "idx").exists()


def test_a_link_out_of_the_manifests_folder_is_refused(csv_root):
    os.symlink("/etc", csv_root / "etclink")
    spec = _manifest(csv_root, ["img/ring_0.jpg,ring", "etclink/passwd,watch"])
    with pytest.raises(JewelclfError, match=r"line 3: path 'etclink/passwd' leads through a symlink "
                                            r"to '/etc/passwd', outside the manifest's folder"):
        load_source(spec)
    (csv_root / "img" / "linked.jpg").symlink_to(csv_root / "img" / "ring_0.jpg")  # a link inside is kept
    source = load_source(_manifest(csv_root, ["img/linked.jpg,ring", "img/ring_0.jpg,ring"]))
    assert len(source.repeated) == 1  # and it is the same file as its target


def test_index_skus_follow_the_normalised_paths(tmp_path):
    from jewelclf.search.build import csv_skus as _csv_skus

    p = tmp_path / "cat.csv"
    p.write_text("path,label,sku\n./img//a.jpg,ring,SKU-1\n", encoding="utf-8")
    assert _csv_skus(str(p)) == {"img/a.jpg": "SKU-1"}


# ---------------------------------------------------------------- item 9: seed and YAML


@pytest.mark.parametrize("seed", [-1, 99999999999, 2**32])
def test_a_seed_out_of_range_is_a_one_line_error(seed, tmp_path, class_folder):
    with pytest.raises(JewelclfError, match=rf"'train.seed' must be in 0..4294967295 .*got {seed}"):
        cfg.resolve(overrides={"train": {"seed": seed}})
    from jewelclf.cli import main

    result = CliRunner().invoke(main, ["fit", str(class_folder), "--run-dir", str(tmp_path / "r"),
                                       "--seed", str(seed), *TINY_FLAGS])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [ln for ln in result.output.splitlines() if ln.startswith("error:")] == [
        f"error: config key 'train.seed' must be in 0..4294967295 (what NumPy and Keras accept), got {seed}"]


def test_the_largest_seeds_are_kept():
    for seed in (0, 2**32 - 1):
        assert cfg.resolve(overrides={"train": {"seed": seed}}).train.seed == seed


@pytest.mark.parametrize("text, message", [
    ("train:\n  seed: 1\n  epochs: 2\n  seed: 3\n", "line 4: key 'seed' is given twice (first on line 2); keep one"),
    ("data: {batch_size: 8, batch_size: 16}\n", "line 1: key 'batch_size' is given twice (first on line 1)"),
    ("model:\n  backbone: resnet50\nmodel:\n  dropout: 0.1\n", "line 3: key 'model' is given twice"),
])
def test_a_yaml_key_given_twice_is_refused(tmp_path, text, message):
    p = tmp_path / "x.yaml"
    p.write_text(text)
    with pytest.raises(JewelclfError, match=rf"^config file '.*x.yaml' {re.escape(message)}"):
        cfg.load_yaml(p)


def test_a_space_file_key_given_twice_is_refused(tmp_path):
    """tune's --space file is read by the same strict loader as configs."""
    from jewelclf.tuning.tune import load_space

    p = tmp_path / "space.yaml"
    p.write_text("dropout:\n  choice: [0.1, 0.3]\ndropout:\n  choice: [0.5]\n")
    with pytest.raises(JewelclfError, match=r"^space file '.*space.yaml' line 3: key 'dropout' is given twice"):
        load_space(p)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("base: &b {seed: 1, deterministic: true}\ntrain:\n  <<: *b\n  seed: 2\n")
    assert cfg.load_yaml(p)["train"] == {"seed": 2, "deterministic": True}


@pytest.mark.parametrize("tag", ["!!python/object:os.system", "!!python/object/apply:os.system",
                                 "!!python/name:os.system"])
def test_an_unsafe_yaml_tag_is_named(tmp_path, tag):
    p = tmp_path / "x.yaml"
    p.write_text(f"train:\n  seed: {tag} ['true']\n")
    with pytest.raises(JewelclfError) as e:
        cfg.load_yaml(p)
    assert str(e.value) == (f"config file '{p}' line 2: the tag '{tag}' is not allowed (jewelclf "
                            f"reads plain YAML values only); remove it")
