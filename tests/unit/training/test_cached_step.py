"""Stage 2 on cached boundary activations (``train.stage2.cache_activations``).

The cached step must train the same model as today's stage 2: without augmentation (so one
view is the images themselves) and without dropout, the two paths see the same batches in
the same order and must end on the same weights and val_loss, to float16 rounding. The views
rotate by epoch with their labels aligned, the checkpoint holds the whole classifier, and
``auto`` steps back (``on`` refuses) where caching cannot run.
"""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

from jewelclf import config as cfg
from jewelclf.data.prepare import PreparedData, make_datasets
from jewelclf.data.sources import load_source
from jewelclf.errors import JewelclfError
from jewelclf.modeling.backbones import get_backbone
from jewelclf.modeling.classifier import build_classifier
from jewelclf.training import cached_step as cs
from jewelclf.training.stages import train_model

from conftest import make_class_folder


def _config(cache: str, augment: bool = False, views: int = 1, **data):
    return cfg.resolve(None, {
        "model": {"backbone": "tiny_cnn", "weights": "none", "dropout": 0.0},
        "data": {"image_size": 16, "batch_size": 4, "cache": "memory", **data},
        "augment": {"enabled": augment},
        "train": {"seed": 3, "tensorboard": False, "stage1": {"epochs": 2},
                  "stage2": {"epochs": 3, "unfreeze_blocks": 1, "learning_rate": 0.02, "patience": 5,
                             "cache_activations": cache, "views": views}}})


def _train(tmp_path, folder, config, name):
    src = load_source(str(folder))
    records = list(src.records)
    data = PreparedData(src, src.class_names, [r for i, r in enumerate(records) if i % 4],
                        records[::4], [], 0)
    keras.utils.set_random_seed(0)
    model = build_classifier(config, 3)
    run = tmp_path / name
    run.mkdir()
    logs: list[str] = []
    summary = train_model(model, config, make_datasets(data, config, run / "c", log=logs.append), run,
                          log=logs.append)
    with open(run / "history.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["phase"].startswith("stage2")]
    return model, summary, rows, logs, run


def test_the_cached_step_trains_what_the_whole_model_trains(tmp_path):
    folder = make_class_folder(tmp_path / "d", per_class=8)
    plain, s_plain, rows_plain, _, _ = _train(tmp_path, folder, _config("off"), "off")
    cached, s_cached, rows_cached, logs, run = _train(tmp_path, folder, _config("on"), "on")
    assert s_plain["stage2"]["cached_steps"] == 0 and s_cached["stage2"]["cached_steps"] == 1
    assert any("caching 1 view(s)" in m for m in logs)
    assert len(rows_plain) == len(rows_cached) == 3
    for a, b in zip(rows_plain, rows_cached):   # the same epochs, to float16 rounding
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=2e-2, abs=2e-3)
        assert float(b["val_loss"]) == pytest.approx(float(a["val_loss"]), rel=2e-2, abs=2e-3)
    trained = [w for w in plain.weights if "block2_conv" in w.path or "probabilities" in w.path]
    start = keras.utils.set_random_seed(0) or build_classifier(_config("off"), 3)
    for w_plain in trained:
        w_cached = next(w for w in cached.weights if w.path == w_plain.path)
        w_start = next(w for w in start.weights if w.path == w_plain.path)
        moved = np.abs(w_plain.numpy() - w_start.numpy()).max()
        assert moved > 1e-3                            # the step did train this weight
        assert np.abs(w_cached.numpy() - w_plain.numpy()).max() < 0.05 * moved
    # The best checkpoint is the whole classifier's, loadable into the full model.
    probe = build_classifier(_config("on"), 3)
    probe.load_weights(run / "checkpoints" / "best.weights.h5")
    x = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(probe.predict_on_batch(x), cached.predict_on_batch(x), atol=1e-6)


def test_views_rotate_by_epoch_with_their_labels():
    n, views = 6, 3
    acts = np.stack([np.arange(n, dtype="float16")[:, None] + 100 * v for v in range(views)])
    labels = np.arange(n, dtype="float32")[:, None]
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = cs._views_dataset(acts, labels, batch=4, seed=5, epoch=epoch)
    orders = []
    for e in range(4):
        epoch.assign(e)
        x, y = (np.concatenate(part) for part in zip(*[(a.numpy(), b.numpy()) for a, b in ds]))
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x[:, 0] - 100 * (e % views), y[:, 0])  # view e mod 3, aligned
        assert sorted(y[:, 0]) == list(range(n))                           # every image once
        orders.append(tuple(y[:, 0]))
    assert len(set(orders)) > 1                                            # a new order per epoch


def test_auto_steps_back_and_on_refuses_over_the_memory_budget(tmp_path):
    spec = get_backbone("tiny_cnn")
    config = _config("auto", views=2, image_size=64, cache_memory_limit_mb=1)
    model = build_classifier(config, 3)
    logs: list[str] = []
    # block2's input at 64 px: 32x32x8 float16 = 16 KiB per image and view.
    assert cs.step_uses_cache(model, config, spec, 1, 20, 5, logs.append)        # 0.7 MiB
    assert not cs.step_uses_cache(model, config, spec, 1, 40, 5, logs.append)    # 1.3 MiB
    assert "over data.cache_memory_limit_mb (1)" in logs[-1]
    with pytest.raises(JewelclfError, match="lower train.stage2.views"):
        cs.step_uses_cache(model, _config("on", views=2, image_size=64, cache_memory_limit_mb=1),
                           spec, 1, 40, 5, logs.append)
    assert not cs.step_uses_cache(model, _config("off"), spec, 1, 1, 1, logs.append)


def test_auto_steps_back_and_on_refuses_without_a_single_tensor_boundary(monkeypatch):
    spec = get_backbone("tiny_cnn")
    model = build_classifier(_config("auto"), 3)

    def no_boundary(*args):
        raise JewelclfError("no single-tensor boundary")

    monkeypatch.setattr(cs, "boundary_tensor", no_boundary)
    assert not cs.step_uses_cache(model, _config("auto"), spec, 1, 10, 2, print)
    with pytest.raises(JewelclfError, match="single-tensor"):
        cs.step_uses_cache(model, _config("on"), spec, 1, 10, 2, print)


def test_augmented_views_differ_and_each_is_one_pass(tmp_path, monkeypatch):
    calls = []
    original = cs.boundary_activations

    def counting(bottom, ds, dtype="float16", augmentation=None):
        out = original(bottom, ds, dtype, augmentation)
        calls.append((augmentation is not None, out))
        return out

    monkeypatch.setattr(cs, "boundary_activations", counting)
    folder = make_class_folder(tmp_path / "d", per_class=8)
    _, summary, rows, _, _ = _train(tmp_path, folder, _config("on", augment=True, views=2), "aug")
    assert summary["stage2"]["cached_steps"] == 1 and len(rows) == 3
    train_views = [out for augmented, out in calls if augmented]
    assert len(train_views) == 2 and len(calls) == 3   # two augmented views, then val once
    assert not np.array_equal(train_views[0], train_views[1])


def test_a_step_that_unfreezes_every_block_trains_the_whole_model():
    spec = get_backbone("tiny_cnn")   # two blocks: nothing frozen stays below step 2
    model = build_classifier(_config("on"), 3)
    assert cs.step_uses_cache(model, _config("on"), spec, 1, 10, 2, print)
    assert not cs.step_uses_cache(model, _config("on"), spec, 2, 10, 2, print)
