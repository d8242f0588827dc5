"""No graph runs the network on zero rows (defect 0 of issue 15).

oneDNN's Conv2D on an empty batch inside a ``tf.function`` returns a tensor of the wrong shape
on some CPUs (AVX512-FP16 Xeons), which fails a TF Serving request in which no image is valid.
Whatever the CPU does, these tests fail if the network is ever called with zero rows: the
function under test is wrapped in an in-graph assertion that its batch is not empty.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from jewelclf import runs
from jewelclf.export import serving
from jewelclf.inference.policy import for_run


def _refusing_empty(fn):
    def guarded(x):
        with tf.control_dependencies([tf.debugging.assert_positive(
                tf.shape(x)[0], message="the network ran on zero rows")]):
            return fn(tf.identity(x))
    return guarded


@pytest.mark.parametrize("valid", [[], [False], [False, False, False], [True, False, True], [True]])
def test_run_on_valid_rows_never_calls_the_network_on_zero_rows(valid):
    x = tf.constant(np.arange(len(valid) * 2, dtype=np.float32).reshape(len(valid), 2))
    calls = []

    def network(batch):
        calls.append(1)
        return batch * 10.0

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32), tf.TensorSpec([None], tf.bool)])
    def graph(x, valid):
        return serving.run_on_valid_rows(_refusing_empty(network), x, valid, 2)

    out = graph(x, tf.constant(valid, tf.bool)).numpy()
    assert out.shape == (len(valid), 2) and out.dtype == np.float32
    mask = np.array(valid, bool)
    np.testing.assert_array_equal(out[mask], x.numpy()[mask] * 10.0)
    assert not out[~mask].any()


def test_every_serving_graph_guards_the_network(run, tmp_path, monkeypatch):
    """``serving_default``, ``serving_pixels`` and ``embed`` of a written SavedModel answer an
    empty request and an all-invalid one without running the network on zero rows."""
    real = serving.run_on_valid_rows
    wrapped = []

    def spy(fn, x, valid, dim):
        wrapped.append(dim)
        return real(_refusing_empty(fn), x, valid, dim)

    monkeypatch.setattr(serving, "run_on_valid_rows", spy)
    answers = for_run(run)
    archive = serving.build_archive(run, answers.reference, answers.review_threshold)
    archive.write_out(str(tmp_path / "sm"), verbose=False)
    assert len(wrapped) >= 3  # each signature's network goes through the guard
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    n = len(run.class_names)
    for images in ([], [b"", b"not an image"]):
        out = loaded.signatures["serving_default"](images=tf.constant(images, tf.string))
        assert out["probabilities"].shape == (len(images), n) and not out["valid"].numpy().any()
        out = loaded.signatures["embed"](images=tf.constant(images, tf.string))
        assert out["embedding"].shape[0] == len(images) and not out["embedding"].numpy().any()
    out = loaded.signatures["serving_pixels"](pixels=tf.zeros((0, 7, 9, 3), tf.uint8))
    assert out["probabilities"].shape == (0, n)
    good = loaded.signatures["serving_pixels"](pixels=tf.zeros((2, 7, 9, 3), tf.uint8))
    assert good["valid"].numpy().all() and np.allclose(good["probabilities"].numpy().sum(1), 1, atol=1e-5)


@pytest.fixture(scope="module")
def run(tiny_run):
    return runs.load_run(tiny_run)
