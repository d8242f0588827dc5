"""Embeddings for visual search: unit vectors from the trained model's own layers, and a
bytes-in SavedModel signature that gives the same vectors as the Keras embedding."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from jewelclf.config import Config
from jewelclf.errors import JewelclfError
from jewelclf.modeling.classifier import build_classifier, feature_extractor
from jewelclf.modeling.embedding import (
    L2Normalize,
    embedding_and_probabilities,
    embedding_dim,
    embedding_model,
    l2_normalize,
)

from conftest import make_image


@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    import jewelclf.modeling.registry  # noqa: F401

    return keras.saving.load_model(tiny_run / "model.keras", compile=False)


def _pixels(n=4, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows_finite():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], dtype=np.float32)
    out = keras.ops.convert_to_numpy(l2_normalize(x))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], atol=1e-6)
    layer_out = keras.ops.convert_to_numpy(L2Normalize()(x))
    np.testing.assert_array_equal(layer_out, out)


def test_pool_embedding_is_the_normalised_pooled_features(tiny_model):
    x = _pixels()
    emb = embedding_model(tiny_model, "pool")
    assert emb.input_shape == (None, 32, 32, 3)
    out = np.asarray(emb.predict_on_batch(x))
    ref = _unit(np.asarray(feature_extractor(tiny_model).predict_on_batch(x)))
    assert out.shape == (4, embedding_dim(tiny_model, "pool")) == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # Shares the trained layers: no copy of the weights.
    assert emb.get_layer("features").get_layer("backbone") is tiny_model.get_layer("backbone")


def test_embedding_and_probabilities_match_the_two_models(tiny_model):
    x = _pixels(seed=1)
    vec, probs = embedding_and_probabilities(tiny_model, "pool").predict_on_batch(x)
    np.testing.assert_allclose(vec, embedding_model(tiny_model).predict_on_batch(x), atol=1e-5)
    np.testing.assert_allclose(probs, tiny_model.predict_on_batch(x), atol=1e-5)


def test_hidden_layer_embedding_and_its_absence(tiny_model):
    with pytest.raises(JewelclfError, match="no hidden head layer"):
        embedding_model(tiny_model, "hidden")
    with pytest.raises(JewelclfError, match="unknown embedding layer"):
        embedding_model(tiny_model, "logits")
    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.head_units = "tiny_cnn", "none", 8
    cfg.data.image_size = 32
    model = build_classifier(cfg, 3)
    x = _pixels(seed=2)
    out = np.asarray(embedding_model(model, "hidden").predict_on_batch(x))
    pooled = np.asarray(feature_extractor(model).predict_on_batch(x))
    dense = model.get_layer("head").get_layer("head_hidden")
    w, b = (np.asarray(v) for v in dense.weights)
    ref = np.maximum(pooled @ w + b, 0.0)
    norms = np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-6)
    assert out.shape == (4, 8) and embedding_dim(model, "hidden") == 8
    np.testing.assert_allclose(out, ref / norms, atol=1e-5)


def test_embed_signature_bytes_in_matches_the_keras_embedding(tiny_run, tiny_model, tmp_path,
                                                             tmp_path_factory):
    """The exported SavedModel's ``embed`` signature (the session's one export of ``tiny_run``):
    bytes in, the same unit vectors as ``embed_records``, which ``jewelclf index`` stores."""
    from jewelclf.data.images import load_image
    from jewelclf.data.sources import load_source
    from jewelclf.search.build import embed_records

    from export_helpers import exported_tiny

    emb = embedding_model(tiny_model)
    exported = exported_tiny(tiny_run, tmp_path_factory)

    catalogue = tmp_path / "cat"
    for i, (label, fmt) in enumerate([("ring", "JPEG"), ("watch", "PNG"), ("necklace", "JPEG")]):
        make_image(label, 50 + i, size=(37, 53), fmt=fmt, path=catalogue / label / f"{i}.img")
    source = load_source(str(catalogue))
    keras_vectors = embed_records(emb, source, source.records, Config().data, 32, 2, log=lambda _: None)

    loaded = tf.saved_model.load(str(exported / "1"))
    encoded = tf.constant([open(r.path, "rb").read() for r in source.records])
    served = loaded.signatures["embed"](images=encoded)["embedding"].numpy()
    assert served.shape == keras_vectors.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, keras_vectors, atol=1e-5)
    # And against the pixels path (the same bytes decoded eagerly).
    pixels = np.stack([load_image(tf.constant(b), 32).numpy() for b in encoded.numpy()])
    np.testing.assert_allclose(served, emb.predict_on_batch(pixels.astype(np.float32)), atol=1e-5)
