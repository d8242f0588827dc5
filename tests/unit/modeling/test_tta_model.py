"""The TTA model (:mod:`jewelclf.modeling.tta`): the mean of the classifier on the pixels and on
their horizontal flip, sharing the classifier's weights."""

from __future__ import annotations

import numpy as np
import pytest

from jewelclf import config as cfg
from jewelclf.errors import JewelclfError
from jewelclf.modeling.classifier import build_classifier, with_features
from jewelclf.modeling.tta import flip_tta, scoring_model, with_tta


@pytest.fixture(scope="module")
def model():
    config = cfg.resolve(None, {"model": {"backbone": "tiny_cnn", "weights": "none", "head_units": 8},
                                "data": {"image_size": 32}, "augment": {"enabled": True}})
    m = build_classifier(config, 3)
    rng = np.random.default_rng(0)  # weights away from their init, so the two views differ clearly
    m.set_weights([rng.normal(0, 0.5, w.shape).astype(w.dtype) if w.ndim > 1 else w for w in m.get_weights()])
    return m


@pytest.fixture(scope="module")
def pixels():
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    x[:, :, :16] *= 0.2  # dark left half: nothing like its mirror image
    return x


def test_probabilities_are_the_mean_over_the_flip(model, pixels):
    plain = np.asarray(model(pixels, training=False))
    mirrored = np.asarray(model(pixels[:, :, ::-1], training=False))  # width is axis 2 (NHWC)
    got = np.asarray(flip_tta(model)(pixels, training=False))
    np.testing.assert_allclose(got, (plain + mirrored) / 2, rtol=0, atol=1e-6)
    assert np.abs(plain - mirrored).max() > 1e-3  # the test could tell a missing flip
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


def test_features_are_the_unflipped_pixels_and_weights_are_shared(model, pixels):
    both = flip_tta(model, with_features=True)
    out = both(pixels, training=False)
    np.testing.assert_allclose(np.asarray(out["features"]),
                               np.asarray(with_features(model)(pixels)["features"]), rtol=0, atol=1e-6)
    assert both.count_params() == model.count_params()  # no new weights: nothing to save or copy
    assert {id(v) for v in both.weights} <= {id(v) for v in model.weights}


def test_none_is_the_plain_model_and_unknown_modes_are_one_line(model, pixels):
    assert with_tta(model, "none") is model
    np.testing.assert_allclose(np.asarray(scoring_model(model, "none")(pixels)),
                               np.asarray(model(pixels, training=False)), rtol=0, atol=1e-6)
    with pytest.raises(JewelclfError, match=r"unknown --tta mode 'rotate'; one of none, flip"):
        with_tta(model, "rotate")
