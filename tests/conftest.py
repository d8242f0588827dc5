"""Shared fixtures: tiny generated images and a tiny test-only backbone.

Images are 24-48 px, coloured by class so that a small network can learn them in seconds: they
prove plumbing, not learning. ``make_texture_folder`` is the learning task (textures under random
colours, see tests/test_learning.py).
``tiny_cnn`` is registered in the backbone registry for tests only: two conv blocks with
BatchNorm (so the BatchNorm freeze is exercised), ``weights=None``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import csv  # noqa: E402
from pathlib import Path  # noqa: E402

TESTS = Path(__file__).resolve().parent
"""The tests folder: its helper scripts (tiny_cli.py) live here."""
REPO = TESTS.parent

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from jewelclf.modeling.backbones import BACKBONES, BackboneSpec  # noqa: E402

CLASSES = ("necklace", "ring", "watch")
_COLOURS = {"necklace": (200, 40, 40), "ring": (40, 200, 40), "watch": (40, 40, 200)}


def tiny_cnn(include_top=False, input_shape=None, name="backbone", weights=None):
    inputs = keras.Input(input_shape)
    x = inputs
    for i, filters in enumerate((8, 16), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", name=f"block{i}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = keras.layers.ReLU(name=f"block{i}_relu")(x)
        x = keras.layers.MaxPooling2D(name=f"block{i}_pool")(x)
    return keras.Model(inputs, x, name=name)


BACKBONES["tiny_cnn"] = BackboneSpec("tiny_cnn", tiny_cnn, "tf", 16, 32, 16, r"^(block\d+)_")

TINY_FLAGS = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32",
              "--batch-size", "8", "--epochs", "8", "--fine-tune-epochs", "2", "--learning-rate", "0.01"]


def make_image(label: str, seed: int, size=(40, 48), fmt="JPEG", path: Path | None = None):
    """A noisy image dominated by its class colour; saved to ``path`` if given."""
    rng = np.random.default_rng(seed)
    base = np.array(_COLOURS.get(label, (128, 128, 128)), dtype=np.int16)
    arr = np.clip(base + rng.integers(-40, 40, (size[0], size[1], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, fmt)
    return img


def make_class_folder(root: Path, per_class: int = 10, classes=CLASSES, seed: int = 0) -> Path:
    """``root/<class>/<i>.jpg`` for each class."""
    for ci, c in enumerate(classes):
        for i in range(per_class):
            make_image(c, seed * 10_000 + ci * 1000 + i, path=root / c / f"{c}_{i:03d}.jpg")
    return root


TEXTURES = {"necklace": "horizontal stripes", "ring": "vertical stripes", "watch": "checks"}


def make_texture(label: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the class is the texture of ``TEXTURES[label]``, drawn in two
    random colours with a random period and phase under noise, so mean colour says nothing."""
    bg = rng.integers(0, 256, 3)
    fg = rng.integers(0, 256, 3)
    while np.abs(fg - bg).sum() < 150:  # keep the texture visible
        fg = rng.integers(0, 256, 3)
    period = int(rng.integers(6, 11))
    phase = int(rng.integers(0, period))
    yy, xx = np.mgrid[0:size, 0:size]
    kind = TEXTURES[label]
    if kind == "horizontal stripes":
        on = (yy + phase) % period < period // 2
    elif kind == "vertical stripes":
        on = (xx + phase) % period < period // 2
    else:
        on = ((xx + phase) // (period // 2) + (yy + phase) // (period // 2)) % 2 == 0
    img = np.where(on[..., None], fg, bg) + rng.normal(0, 20, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_texture_folder(root: Path, train: int = 40, test: int = 20) -> Path:
    """``root/{train,test}/<class>/<i>.png`` of :func:`make_texture` images."""
    for split, n, seed in (("train", train, 1), ("test", test, 2)):
        rng = np.random.default_rng(seed)
        for c in TEXTURES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(make_texture(c, rng)).save(root / split / c / f"{c}_{i:03d}.png")
    return root


def make_split_folder(root: Path, train: int = 10, test: int = 4, val: int = 0, classes=CLASSES,
                      train_name: str = "train") -> Path:
    make_class_folder(root / train_name, train, classes, seed=1)
    if val:
        make_class_folder(root / "val", val, classes, seed=2)
    if test:
        make_class_folder(root / "test", test, classes, seed=3)
    return root


def tiny_tune_files(root: Path, space: dict, stage1: int = 2, stage2: int = 1,
                    name: str = "tiny", extra: dict | None = None) -> tuple[Path, Path]:
    """A fit config on a saved ``tiny_cnn`` backbone at 32 px, and a search-space file, for tune.

    The saved weights make the backbone the same in every trial, so fast mode shares its features.
    """
    import yaml

    weights = root / "tiny.weights.h5"
    if not weights.exists():
        tiny_cnn(input_shape=(32, 32, 3)).save_weights(weights)
    config = {"model": {"backbone": "tiny_cnn", "weights": str(weights)},
              "data": {"image_size": 32, "batch_size": 8},
              "train": {"stage1": {"epochs": stage1, "learning_rate": 0.01}, "stage2": {"epochs": stage2}}}
    config.update(extra or {})
    config_path = root / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    space_path = root / f"{name}_space.yaml"
    space_path.write_text(yaml.safe_dump(space))
    return config_path, space_path


def make_csv(root: Path, per_class: int = 10, groups: int | None = None) -> Path:
    """A CSV manifest ``root/manifest.csv`` over images in ``root/img``."""
    rows = []
    for ci, c in enumerate(CLASSES):
        for i in range(per_class):
            rel = f"img/{c}_{i:03d}.png"
            make_image(c, ci * 1000 + i, fmt="PNG", path=root / rel)
            row = {"path": rel, "label": c}
            if groups:
                row["group"] = f"{c}-sku{i % groups}"
            rows.append(row)
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def class_folder(tmp_path) -> Path:
    return make_class_folder(tmp_path / "data")


@pytest.fixture
def split_folder(tmp_path) -> Path:
    return make_split_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished run of ``tiny_cnn`` on generated data with a test split (trained once)."""
    from click.testing import CliRunner

    from jewelclf.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    data = make_split_folder(root / "data", train=12, test=4)
    run_dir = root / "run"
    result = CliRunner().invoke(main, ["fit", str(data), "--run-dir", str(run_dir), *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory) -> Path:
    """The SavedModel export of ``tiny_run`` (``<tmp>/exported/tiny``, version 1), made once."""
    from export_helpers import exported_tiny

    return exported_tiny(tiny_run, tmp_path_factory)
