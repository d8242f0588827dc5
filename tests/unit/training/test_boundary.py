"""The classifier cut at its frozen boundary: ``top(bottom(x))`` is the model, the top trains
exactly the unfrozen blocks and the head, on the model's own variables, and a backbone whose
cut is not one tensor is refused in one line."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from jewelclf import config as cfg
from jewelclf.errors import JewelclfError
from jewelclf.modeling.backbones import BACKBONES, BackboneSpec, get_backbone
from jewelclf.modeling.classifier import build_classifier, unfreeze_top_blocks
from jewelclf.training.boundary import boundary_activations, split_at_boundary


def skip_cnn(include_top=False, input_shape=None, name="backbone", weights=None):
    """Three blocks; block 3 adds block 1's output to block 2's: a shortcut around block 2."""
    inputs = keras.Input(input_shape)
    x1 = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="block1_conv")(inputs)
    x2 = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="block2_conv")(x1)
    x3 = keras.layers.Add(name="block3_add")([x1, x2])
    x3 = keras.layers.Conv2D(8, 3, padding="same", name="block3_conv")(x3)
    return keras.Model(inputs, x3, name=name)


@pytest.fixture(autouse=True)
def _skip_cnn(monkeypatch):
    monkeypatch.setitem(BACKBONES, "skip_cnn",
                        BackboneSpec("skip_cnn", skip_cnn, "tf", 8, 16, 16, r"^(block\d+)_"))


def _model(backbone: str, size: int):
    config = cfg.resolve(None, {"model": {"backbone": backbone, "weights": "none", "head_units": 8},
                                "data": {"image_size": size}})
    keras.utils.set_random_seed(0)
    model = build_classifier(config, 3)
    _liven(model.get_layer("backbone"))
    return model, get_backbone(backbone)


def _liven(base: keras.Model) -> None:
    """He-scaled kernels: MobileNet's untrained stack otherwise shrinks its signal to about
    1e-17 by the top, so every image would get the same answer and any cut would agree."""
    rng = np.random.default_rng(2)
    for layer in base.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        shape = tuple(kernel.shape)
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        fan_in = shape[0] * shape[1] * (1 if depthwise else shape[2])
        kernel.assign(rng.normal(0, np.sqrt(2 / fan_in), shape).astype("float32"))


def _pixels(size: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, (n, size, size, 3)).astype("float32")


CASES = [("tiny_cnn", 16, 1), ("tiny_cnn", 16, 2), ("mobilenet_025", 32, 1),
         ("mobilenet_025", 32, 2), ("vgg16", 32, 1), ("vgg16", 32, 2)]


@pytest.mark.parametrize("backbone,size,n_blocks", CASES)
def test_top_of_bottom_is_the_model(backbone, size, n_blocks):
    model, spec = _model(backbone, size)
    unfreeze_top_blocks(model, spec, n_blocks)
    bottom, top = split_at_boundary(model, spec, n_blocks)
    x = _pixels(size)
    want = keras.ops.convert_to_numpy(model(x, training=False))
    got = keras.ops.convert_to_numpy(top(bottom(x, training=False), training=False))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The backbone's own output too: an untrained head's softmax hides small differences.
    base = model.get_layer("backbone")
    want_maps = keras.ops.convert_to_numpy(base(model.get_layer("preprocessing")(x), training=False))
    got_maps = keras.ops.convert_to_numpy(top.layers[1](bottom(x, training=False), training=False))
    assert np.ptp(want_maps, axis=0).max() > 0.1 * np.abs(want_maps).max() > 0  # images differ
    np.testing.assert_allclose(got_maps, want_maps, rtol=1e-5, atol=1e-6 * np.abs(want_maps).max())


@pytest.mark.parametrize("backbone,size,n_blocks", CASES)
def test_top_trains_the_unfrozen_blocks_and_the_head(backbone, size, n_blocks):
    model, spec = _model(backbone, size)
    unfreeze_top_blocks(model, spec, n_blocks)
    bottom, top = split_at_boundary(model, spec, n_blocks)
    base = model.get_layer("backbone")
    chosen = set(spec.blocks(base)[-n_blocks:])
    blocks = spec.layer_blocks(base)
    want = {id(w) for layer in base.layers if blocks[layer.name] in chosen
            for w in layer.trainable_weights}
    want |= {id(w) for w in model.get_layer("head").trainable_weights}
    assert {id(w) for w in top.trainable_weights} == want
    assert {id(w) for w in model.trainable_weights} == want
    assert not bottom.trainable_weights


def test_a_step_on_the_top_moves_the_models_weights():
    model, spec = _model("tiny_cnn", 16)
    unfreeze_top_blocks(model, spec, 1)
    bottom, top = split_at_boundary(model, spec, 1)
    base = model.get_layer("backbone")
    top_kernel, bottom_kernel = base.get_layer("block2_conv").kernel, base.get_layer("block1_conv").kernel
    before_top, before_bottom = top_kernel.numpy().copy(), bottom_kernel.numpy().copy()
    x = _pixels(16)
    before_out = keras.ops.convert_to_numpy(model(x, training=False))
    top.compile(keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
    top.train_on_batch(bottom(x, training=False), np.eye(3)[[0, 1, 2, 0]])
    assert np.abs(top_kernel.numpy() - before_top).max() > 1e-4
    np.testing.assert_array_equal(bottom_kernel.numpy(), before_bottom)
    after = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.abs(after - before_out).max() > 1e-6
    np.testing.assert_allclose(keras.ops.convert_to_numpy(top(bottom(x))), after, atol=1e-5, rtol=0)


def test_a_shortcut_around_the_cut_is_one_line_error():
    model, spec = _model("skip_cnn", 16)
    with pytest.raises(JewelclfError, match="no single-tensor boundary") as e:
        split_at_boundary(model, spec, 1)  # block 3 reads block 1's and block 2's outputs
    assert "\n" not in str(e.value)
    split_at_boundary(model, spec, 2)  # above block 1, its output is the only way in


@pytest.mark.parametrize("n_blocks", [0, 3])
def test_a_block_count_out_of_range_is_refused(n_blocks):
    model, spec = _model("tiny_cnn", 16)
    with pytest.raises(JewelclfError, match="from 1 to 2"):
        split_at_boundary(model, spec, n_blocks)


def test_boundary_activations_in_dataset_order_and_float16():
    model, spec = _model("tiny_cnn", 16)
    bottom, top = split_at_boundary(model, spec, 1)
    x = _pixels(16, 10)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(10))).batch(4)
    full = boundary_activations(bottom, ds, dtype="float32")
    half = boundary_activations(bottom, ds)
    assert full.dtype == np.float32 and half.dtype == np.float16 and full.shape[0] == 10
    np.testing.assert_allclose(full, keras.ops.convert_to_numpy(bottom(x)), atol=1e-5, rtol=0)
    diff = np.abs(keras.ops.convert_to_numpy(top(half.astype("float32")))
                  - keras.ops.convert_to_numpy(top(full))).max()
    assert diff < 1e-2
    augmented = boundary_activations(bottom, ds, dtype="float32",
                                     augmentation=model.get_layer("augmentation"))
    assert augmented.shape == full.shape and np.abs(augmented - full).max() > 0
