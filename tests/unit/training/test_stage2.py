"""Stage 2's schedule: each step starts from the best weights, patience and the plateau's
learning rate count over the whole stage, the best weights are restored and their figures
reported; and BatchNorm's statistics never move.

The schedule tests script the val_loss of every epoch: ``model.fit`` is replaced by a loop that
runs the real callbacks and stamps each epoch's weights with a marker, so which weights each
step starts from, and which are restored, can be read back exactly.
"""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest

from jewelclf import config as cfg
from jewelclf.data.prepare import PreparedData, make_datasets
from jewelclf.data.sources import load_source
from jewelclf.modeling.classifier import build_classifier
from jewelclf.training.stages import train_model, train_stage2

from conftest import make_class_folder

LR = 1e-3


def _config(**stage2):
    return cfg.resolve(None, {
        "model": {"backbone": "tiny_cnn", "weights": "none"},
        "data": {"image_size": 16, "batch_size": 4},
        "train": {"stage2": {"epochs": 6, "unfreeze_blocks": 2, "learning_rate": LR,
                             "reduce_lr_patience": 1, "reduce_lr_factor": 0.5, **stage2}},
    })


def _bias(model):
    return model.get_layer("head").get_layer("probabilities").bias


class Script:
    """A stand-in for ``model.fit`` that plays scripted (val_loss, val_accuracy) epochs."""

    def __init__(self, model, steps):
        self.model, self.steps = model, list(steps)
        self.starts, self.learning_rates, self.epochs = [], [], []

    def fit(self, *args, epochs=1, callbacks=(), **kwargs):
        model = self.model
        figures = self.steps.pop(0)
        step = len(self.starts) + 1
        self.starts.append(float(_bias(model).numpy()[0]))
        self.learning_rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
        cbs = keras.callbacks.CallbackList(list(callbacks), model=model)
        model.stop_training = False
        cbs.on_train_begin()
        ran = 0
        for epoch in range(epochs):
            if model.stop_training:
                break
            cbs.on_epoch_begin(epoch)
            b = _bias(model).numpy()
            b[0] = step * 10 + epoch + 1          # the marker of this epoch's weights
            _bias(model).assign(b)
            loss, acc = figures[epoch]
            cbs.on_epoch_end(epoch, {"loss": loss, "accuracy": acc, "val_loss": loss,
                                     "val_accuracy": acc})
            ran += 1
        cbs.on_train_end()
        self.epochs.append(ran)


def _run(tmp_path, monkeypatch, steps, start=(1.0, 0.5), **stage2):
    config = _config(**stage2)
    model = build_classifier(config, 3)
    b = _bias(model).numpy()
    b[0] = 0.0                                     # marker 0: the weights stage 2 starts from
    _bias(model).assign(b)
    script = Script(model, steps)
    monkeypatch.setattr(model, "fit", script.fit)
    monkeypatch.setattr(model, "evaluate", lambda *a, **k: {"loss": start[0], "accuracy": start[1]})
    summary = train_stage2(model, config, None, None, None, tmp_path, 10, log=lambda m: None)
    return model, script, summary


def test_each_step_starts_from_the_best_weights_and_patience_spans_the_steps(tmp_path, monkeypatch):
    # Step 1 improves at its first epoch (marker 11), then not; patience 3 runs out at the
    # first epoch of step 2, which must start from marker 11, at the lowered learning rate.
    model, script, summary = _run(tmp_path, monkeypatch, [
        [(0.8, 0.70), (0.9, 0.95), (0.95, 0.96)],
        [(0.85, 0.99), (0.5, 0.99), (0.4, 0.99)],
    ], patience=3)
    assert script.starts == [0.0, 11.0]
    assert script.learning_rates == pytest.approx([LR, LR * 0.25])
    assert script.epochs == [3, 1]
    assert float(_bias(model).numpy()[0]) == 11.0           # the best weights are restored
    assert summary["best_val_loss"] == pytest.approx(0.8)
    assert summary["val_accuracy"] == pytest.approx(0.70)   # that epoch's, not the maximum
    assert summary["restored_epoch"] == 11 and summary["epochs"] == 4
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["stage2.1"] * 3 + ["stage2.2"]
    assert [int(r["epoch"]) for r in rows] == [11, 12, 13, 14]


def test_a_better_epoch_in_a_later_step_is_the_one_restored(tmp_path, monkeypatch):
    model, script, summary = _run(tmp_path, monkeypatch, [
        [(0.8, 0.9), (0.9, 0.95), (0.95, 0.96)],
        [(0.85, 0.99), (0.7, 0.6), (0.75, 0.98)],
    ], patience=5)
    assert script.starts == [0.0, 11.0] and script.epochs == [3, 3]
    assert float(_bias(model).numpy()[0]) == 22.0
    assert summary["val_accuracy"] == pytest.approx(0.6) and summary["restored_epoch"] == 15


def test_no_better_epoch_restores_the_starting_weights(tmp_path, monkeypatch):
    model, script, summary = _run(tmp_path, monkeypatch, [[(1.2, 0.9), (1.3, 0.9), (1.1, 0.9)]],
                                  start=(1.0, 0.55), patience=5)
    assert script.epochs == [3]                              # the step did not improve: stop
    assert float(_bias(model).numpy()[0]) == 0.0
    assert summary["restored_epoch"] == 0 and summary["val_accuracy"] == pytest.approx(0.55)


def test_batchnorm_statistics_are_the_pretrained_ones_bit_for_bit_after_stage2(tmp_path, monkeypatch):
    from jewelclf.training import callbacks as training

    src = load_source(str(make_class_folder(tmp_path / "d", per_class=8)))
    config = cfg.resolve(None, {
        "model": {"backbone": "tiny_cnn", "weights": "none"},
        "data": {"image_size": 16, "batch_size": 4, "cache": "memory"},
        "augment": {"enabled": True},
        "train": {"stage1": {"epochs": 1}, "stage2": {"epochs": 2, "unfreeze_blocks": 2,
                                                       "learning_rate": 0.05, "patience": 5}}})
    model = build_classifier(config, 3)
    rng = np.random.default_rng(0)
    base = model.get_layer("backbone")
    bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:   # statistics unlike the initial 0 and 1, as pretrained ones are
        bn.moving_mean.assign(rng.normal(size=bn.moving_mean.shape).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=bn.moving_variance.shape).astype("float32"))

    def state():
        return [v.numpy().copy() for bn in bns for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta)]

    pretrained, kernel = state(), base.get_layer("block2_conv").kernel.numpy().copy()
    seen = []   # the backbone at the end of every stage-2 epoch, before any restore
    original = training.HistoryRecorder.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        if self.phase.startswith("stage2"):
            seen.append((state(), base.get_layer("block2_conv").kernel.numpy().copy()))

    monkeypatch.setattr(training.HistoryRecorder, "on_epoch_end", on_epoch_end)
    records = list(src.records)
    data = PreparedData(src, src.class_names, records, records[::4], [], 0)
    train_model(model, config, make_datasets(data, config, tmp_path / "c", log=lambda m: None),
                tmp_path, log=lambda m: None)
    assert len(seen) == 2
    for stats, conv in seen:
        assert all(np.array_equal(a, b) for a, b in zip(stats, pretrained))  # bit for bit
        assert not np.array_equal(conv, kernel)           # while the unfrozen block trained
    assert all(np.array_equal(a, b) for a, b in zip(state(), pretrained))
