import keras
import numpy as np
import pytest

from jewelclf import config as cfg
from jewelclf.errors import JewelclfError
from jewelclf.modeling.backbones import BACKBONES, get_backbone
from jewelclf.modeling.classifier import build_classifier, feature_extractor, unfreeze_top_blocks
from jewelclf.modeling.preprocessing import BackbonePreprocessing


def _config(**model):
    return cfg.resolve(None, {"model": {"backbone": "tiny_cnn", "weights": "none", **model},
                              "data": {"image_size": 32}})


REAL = sorted(n for n in BACKBONES if n != "tiny_cnn")


@pytest.mark.parametrize("name", REAL)
def test_registry_entry_builds_with_its_feature_size(name):
    spec = get_backbone(name)
    base = spec.build(spec.min_image_size, "none")
    assert base.name == "backbone"
    assert base.output_shape[-1] == spec.feature_size
    blocks = spec.blocks(base)
    assert len(blocks) >= 3, blocks          # progressive unfreezing needs blocks to walk


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_preprocessing_matches_keras_applications(mode):
    from keras.applications import imagenet_utils

    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = imagenet_utils.preprocess_input(x.copy(), mode=mode)
    got = np.asarray(BackbonePreprocessing(mode)(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_unknown_backbone_and_small_image_size():
    with pytest.raises(JewelclfError, match="unknown backbone 'resnet5'"):
        get_backbone("resnet5")
    with pytest.raises(JewelclfError, match="below vgg16's minimum of 32"):
        get_backbone("vgg16").build(16, "none")


def test_weights_file_paths(tmp_path):
    spec = get_backbone("tiny_cnn")
    with pytest.raises(JewelclfError, match="does not exist"):
        spec.build(32, str(tmp_path / "missing.weights.h5"))
    saved = spec.build(32, "none")
    path = tmp_path / "tiny.weights.h5"
    saved.save_weights(path)
    loaded = spec.build(32, str(path))
    for a, b in zip(saved.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = get_backbone("mobilenet_025").build(32, "none")
    other.save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(JewelclfError, match="does not fit backbone tiny_cnn"):
        spec.build(32, str(tmp_path / "other.weights.h5"))


def test_model_shape_and_head_size():
    model = build_classifier(_config(head_units=12), 4)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 4)
    head = model.get_layer("head")
    assert head.get_layer("head_hidden").units == 12
    probs = np.asarray(model(np.zeros((2, 32, 32, 3), "float32")))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert feature_extractor(model).output_shape == (None, 16)


def test_softmax_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_classifier(_config(), 3)
        assert model.get_layer("backbone").compute_dtype == "float16"
        out = model(np.zeros((1, 32, 32, 3), "float32"))
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_unfreeze_top_blocks_vgg16():
    conf = cfg.resolve(None, {"model": {"backbone": "vgg16", "weights": "none"}, "data": {"image_size": 32}})
    model = build_classifier(conf, 3)
    assert unfreeze_top_blocks(model, get_backbone("vgg16"), 1) == ["block5"]
    trainable = {layer.name for layer in model.get_layer("backbone").layers if layer.trainable and layer.weights}
    assert trainable == {"block5_conv1", "block5_conv2", "block5_conv3"}
    assert unfreeze_top_blocks(model, get_backbone("vgg16"), 2) == ["block5", "block4"]


def test_batchnorm_stays_frozen_while_fine_tuning():
    model = build_classifier(_config(), 3)
    spec = get_backbone("tiny_cnn")
    unfreeze_top_blocks(model, spec, 2)
    base = model.get_layer("backbone")
    bn = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)
    before_bn = [np.asarray(w).copy() for layer in bn for w in layer.weights]
    before_conv = np.asarray(base.get_layer("block2_conv").kernel).copy()
    model.compile(keras.optimizers.Adam(0.05), "categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32") * 3  # far from BN's stats
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    after_bn = [np.asarray(w) for layer in bn for w in layer.weights]
    for a, b in zip(before_bn, after_bn):             # gamma, beta, moving mean and variance
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(before_conv, np.asarray(base.get_layer("block2_conv").kernel))


def test_saved_model_reloads_identically(tmp_path):
    import jewelclf.modeling.registry  # noqa: F401

    model = build_classifier(_config(), 3)
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(again(x)), atol=1e-6)


def test_the_model_applies_the_backbones_preprocessing_before_the_backbone():
    # tiny_cnn takes "tf" preprocessing (-1..1): the model must be head(pool(base(x / 127.5 - 1))).
    from keras.applications import imagenet_utils

    model = build_classifier(_config(), 3)
    x = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    base = model.get_layer("backbone")
    pooled = np.asarray(base(imagenet_utils.preprocess_input(x.copy(), mode="tf"))).mean(axis=(1, 2))
    expected = np.asarray(model.get_layer("head")(pooled))
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-6)


def test_augmentation_never_runs_at_inference():
    from jewelclf.modeling.classifier import without_augmentation

    conf = cfg.resolve(None, {"model": {"backbone": "tiny_cnn", "weights": "none"},
                              "data": {"image_size": 32},
                              "augment": {"enabled": True, "zoom": 0.5, "brightness": 0.5,
                                          "contrast": 0.5, "blur": 0.9}})
    model = build_classifier(conf, 3)
    assert model.get_layer("augmentation").layers       # augmentation is in the model
    x = np.random.default_rng(3).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    plain = np.asarray(without_augmentation(model)(x))
    for out in (model(x), model(x, training=False), model.predict(x, verbose=0)):
        np.testing.assert_allclose(np.asarray(out), plain, atol=1e-6)  # float rounding only
    assert not np.allclose(np.asarray(model(x, training=True)), plain)  # ... and runs in training
