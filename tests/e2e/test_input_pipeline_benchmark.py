"""The input-pipeline benchmark runs with the project's own install and prints every row."""

import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import REPO, make_class_folder

ROOT = REPO


def test_input_pipeline_benchmark_prints_its_rows(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=6)
    rgba = np.zeros((80, 60, 4), np.uint8)
    rgba[20:60, 10:50] = (200, 40, 40, 255)  # an opaque square on a transparent field
    Image.fromarray(rgba).save(data / "ring" / "cutout.png")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "input_pipeline.py"), str(data), "--size", "32",
         "--batch-size", "4", "--repeats", "1", "--by-format"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith("19 images, 32 px, batch 4")
    for row in ("bare decode+resize", "image_dataset_from_directory", "jewelclf (decoding)",
                "jewelclf of 2026-11-23", "jewelclf (from cache)", "against 2026-11-23's",
                "JPEG (18)", "other (1)", "first decoding pass in this process (graphs traced)"):
        assert row in out, (row, out)


def test_input_routing_benchmark_prints_its_rows(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=3)
    Image.fromarray(np.zeros((40, 30, 4), np.uint8)).save(data / "ring" / "cutout.png")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "input_routing.py"), str(data), "--size", "32",
         "--batch-size", "4", "--repeats", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith("10 images (9 JPEG), 32 px, batch 4")
    for row in ("all files, routed", "all files, format tf.cond", "JPEGs, routed",
                "JPEGs, format tf.cond", "JPEGs: routed x"):
        assert row in out, (row, out)


def test_input_revisions_benchmark_compares_with_a_git_revision(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        import pytest
        pytest.skip("not a git checkout")
    data = make_class_folder(tmp_path / "data", per_class=3)
    rgba = np.zeros((50, 40, 4), np.uint8)
    rgba[10:40, 10:30] = (30, 200, 60, 255)
    Image.fromarray(rgba).save(data / "ring" / "cutout.png")
    Image.fromarray(np.full((40, 40), 90, np.uint8), "L").save(data / "watch" / "gray.gif")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "input_revisions.py"), str(data), "--rev", "HEAD",
         "--size", "32", "--batch-size", "4", "--repeats", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith("11 images, 32 px, batch 4"), out
    edited = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "jewelclf/data/images.py"], cwd=ROOT)
    if edited.returncode == 0:  # against its own code (a clean checkout, as in CI), no pixel differs
        assert "pixels differ between this checkout and HEAD: 0" in out, out
    for row in ("bare decode+resize", "this checkout", "at HEAD", "this checkout against HEAD: x"):
        assert row in out, (row, out)
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "input_revisions.py"), str(data), "--rev", "no-such-rev"],
        capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "cannot read jewelclf/data/images.py at 'no-such-rev'" in bad.stderr
