"""Training images are a whole seeded permutation every epoch, whatever the data set's size."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from jewelclf import config as cfg
from jewelclf.data.images import load_image
from jewelclf.data.pipeline import decoded_dataset, shuffled_dataset
from jewelclf.data.prepare import PreparedData, make_datasets
from jewelclf.data.sources import load_source

from conftest import make_class_folder


def _epoch(ds) -> list[int]:
    return [int(y) for _, y in ds.as_numpy_iterator()]


def test_a_cached_set_larger_than_any_buffer_is_permuted_whole():
    # 5,000 images sorted by class, as the records come: a 2,048-image shuffle buffer can
    # never put an image of the last class among the first ones out.
    n, k = 5000, 5
    labels = np.repeat(np.arange(k), n // k).astype(np.int32)
    cached = tf.data.Dataset.from_tensor_slices((np.zeros((n, 1), np.uint8), labels)).cache()
    ds = shuffled_dataset(None, [None] * n, None, 1, seed=3, cached=cached)
    first, second = _epoch(ds), _epoch(ds)
    assert sorted(first) == sorted(labels.tolist())
    assert first != second                           # a new permutation every epoch
    head = first[:200]
    assert set(head) == set(range(k))                # every class in the first batches
    assert abs(np.mean(head) - 2.0) < 0.4            # ... in about their share
    assert _epoch(shuffled_dataset(None, [None] * n, None, 1, seed=3, cached=cached)) == first


def test_files_are_permuted_before_decoding_with_their_labels(tmp_path):
    src = load_source(str(make_class_folder(tmp_path / "d", per_class=10)))
    ds = shuffled_dataset(src, src.records, cfg.DataConfig(), 16, seed=5)
    pixels_of = {}
    for r in src.records:
        px = load_image(tf.io.read_file(r.path), 16).numpy()
        pixels_of[px.tobytes()] = src.class_names.index(r.label)
    orders = []
    for _ in range(2):
        order = []
        for x, y in ds.as_numpy_iterator():
            assert pixels_of[x.tobytes()] == int(y)      # each image keeps its own label
            order.append(x.tobytes())
        assert sorted(order) == sorted(pixels_of)        # every image once
        orders.append(order)
    in_record_order = [x.tobytes() for x, _ in decoded_dataset(
        src, src.records, cfg.DataConfig(), 16).as_numpy_iterator()]
    assert orders[0] != in_record_order and orders[0] != orders[1]


def test_fits_training_batches_mix_the_classes(tmp_path):
    src = load_source(str(make_class_folder(tmp_path / "d", per_class=12)))
    config = cfg.resolve(None, {"model": {"backbone": "tiny_cnn", "weights": "none"},
                                "data": {"image_size": 16, "batch_size": 6}})
    records = [r for r in src.records]
    for cache in ("memory", "none"):
        config.data.cache = cache
        data = PreparedData(src, src.class_names, records, records[:3], [], 0)
        ds = make_datasets(data, config, tmp_path / "cache", log=lambda m: None)
        batches = [y.argmax(axis=1) for _, y in ds.train.as_numpy_iterator()]
        # Sorted records would give batches of one class each; a permutation mixes them.
        assert sum(len(set(b)) > 1 for b in batches) >= len(batches) // 2, (cache, batches)
