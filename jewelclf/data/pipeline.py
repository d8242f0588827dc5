"""tf.data input pipelines: parallel read, decode and resize, cache, permute, batch, prefetch.

Images stream from disk; decoded, resized uint8 images are cached in memory or in a cache file
(``data.cache``), never gathered into NumPy arrays.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import tensorflow as tf

from jewelclf.config import Config, DataConfig
from jewelclf.data.images import SUPPORTED_FORMATS, load_image, load_jpeg, load_other
from jewelclf.data.sources import DataSource, Record

AUTOTUNE = tf.data.AUTOTUNE


def _tfds_key_parts(key: str) -> tuple[str, int]:
    # tfds:NAME/SPLIT#INDEX
    body = key.split(":", 1)[1]
    split_part, index = body.rsplit("#", 1)
    return split_part.split("/", 1)[1], int(index)


def _tfds_encoded(source: DataSource, records: list[Record]) -> tf.data.Dataset:
    """(encoded bytes, label index) of ``records`` read back from TFDS, in the records' order
    within each TFDS split."""
    import tensorflow_datasets as tfds

    info = source.tfds
    builder = tfds.builder(info.name)
    class_index = {c: i for i, c in enumerate(source.class_names)}
    by_split: dict[str, dict[int, int]] = defaultdict(dict)
    for r in records:
        split, index = _tfds_key_parts(r.key)
        by_split[split][index] = class_index[r.label]
    parts = []
    for split, wanted in by_split.items():
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                decoders={info.image_key: tfds.decode.SkipDecoding()})
        keep = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(list(wanted), tf.int64), tf.constant(list(wanted.values()), tf.int64)),
            default_value=-1)
        ds = ds.enumerate().map(lambda i, ex, keep=keep: (ex[info.image_key], keep.lookup(i)))
        parts.append(ds.filter(lambda _, label: label >= 0))
    out = parts[0]
    for p in parts[1:]:
        out = out.concatenate(p)
    return out.map(lambda b, label: (b, tf.cast(label, tf.int32)))


def tfds_bytes(source: DataSource):
    """A ``read_bytes`` function for :func:`jewelclf.data.validate.check_records` over TFDS."""

    def read(records: list[Record]) -> Iterator[tuple[Record, bytes]]:
        by_key = {r.key: r for r in records}
        import tensorflow_datasets as tfds

        builder = tfds.builder(source.tfds.name)
        for split in sorted({_tfds_key_parts(k)[0] for k in by_key}):
            ds = builder.as_dataset(split=split, shuffle_files=False,
                                    decoders={source.tfds.image_key: tfds.decode.SkipDecoding()})
            for i, ex in enumerate(ds.as_numpy_iterator()):
                r = by_key.get(f"tfds:{source.tfds.name}/{split}#{i}")
                if r is not None:
                    yield r, ex[source.tfds.image_key]

    return read


def _path_dataset(source: DataSource, records: list[Record]) -> tf.data.Dataset:
    """(file path, label index) for ``records`` of a file source, in their order."""
    class_index = {c: i for i, c in enumerate(source.class_names)}
    paths = [r.path for r in records]
    labels = [class_index[r.label] for r in records]
    return tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))


def decoded_dataset(source: DataSource, records: list[Record], cfg: DataConfig, size: int,
                    cache: str = "none", cache_dir: Path | None = None, name: str = "data") -> tf.data.Dataset:
    """Unbatched (uint8 [size, size, 3], label) in a fixed order, cached as asked."""
    if source.tfds is None:
        ds = _decoded_files(source, records, size, cfg.resize)
    else:
        ds = _tfds_encoded(source, records).map(lambda x, y: (load_image(x, size, cfg.resize), y),
                                                num_parallel_calls=AUTOTUNE, deterministic=True)
    if cache == "memory":
        ds = ds.cache()
    elif cache == "disk":
        assert cache_dir is not None
        cache_dir.mkdir(parents=True, exist_ok=True)
        ds = ds.cache(str(cache_dir / name))
    return ds


def _loader(record: Record):
    # The data check records each file's format: JPEGs (nearly every catalogue photo) skip
    # load_image's format dispatch, and other known formats skip its JPEG branch; a record
    # nobody checked takes the full dispatch.
    if record.format == "JPEG":
        return load_jpeg
    return load_other if record.format in SUPPORTED_FORMATS else load_image


@functools.lru_cache(maxsize=None)
def _read_and_load(load, size: int, mode: str):
    """``(path, label) -> (load(bytes of path), label)`` as a graph function traced once per
    process: building the decode graph costs a fifth of a second of Python for ``load_image``,
    and ``fit`` (train, validation, test), ``tune`` (every trial) and ``index`` build pipelines
    again and again with the same loader, size and resize mode."""
    @tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32)], autograph=False)
    def read(path, label):
        return load(tf.io.read_file(path), size, mode), label

    return read


def _decoded_files(source: DataSource, records: list[Record], size: int, mode: str) -> tf.data.Dataset:
    # One parallel map per loader, each file read and decoded in one step, merged back into
    # the records' order.
    loaders = [_loader(r) for r in records]
    used = [load for load in (load_jpeg, load_other, load_image) if load in loaders]
    if len(used) <= 1:
        return _path_dataset(source, records).map(_read_and_load(used[0] if used else load_image, size, mode),
                                                  num_parallel_calls=AUTOTUNE, deterministic=True)
    streams = [_path_dataset(source, [r for r, lr in zip(records, loaders) if lr is load])
               .map(_read_and_load(load, size, mode), num_parallel_calls=AUTOTUNE, deterministic=True)
               for load in used]
    choice = tf.data.Dataset.from_tensor_slices(tf.constant([used.index(lr) for lr in loaders], tf.int64))
    return tf.data.Dataset.choose_from_datasets(streams, choice)


def choose_cache(cfg: DataConfig, n_images: int, size: int) -> str:
    """Resolve ``data.cache: auto``: memory when the decoded set fits the budget, else disk."""
    if cfg.cache != "auto":
        return cfg.cache
    megabytes = n_images * size * size * 3 / 2**20
    return "memory" if megabytes <= cfg.cache_memory_limit_mb else "disk"


def permuted(ds: tf.data.Dataset, n: int, seed: int, epoch: tf.Variable | None = None) -> tf.data.Dataset:
    """``ds`` (``n`` elements) in a new seeded permutation every epoch.

    Without ``epoch``, the permutation follows from how many times ``ds`` was read before.
    With it (an int64 variable that holds the epoch's number when its first batch is read), it
    follows from ``seed`` and that number alone, so a resumed run, whose data has been read
    fewer times, sees each epoch in the order an uninterrupted run would.
    """
    if epoch is None:
        return ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)

    def epoch_order(_):
        # The op seed is a tensor here. TF's get_seed compares (global seed, op seed) with
        # (0, 0) in Python, which fails on a tensor when the global seed is 0 (mod 2**31-1,
        # e.g. --seed 0); a graph seed of this function's own graph avoids that, and makes the
        # order follow from the run's seed and the epoch alone (TF 2.16-2.21).
        tf.random.set_seed(1)
        return ds.shuffle(n, seed=seed * 1_000_003 + epoch.read_value(), reshuffle_each_iteration=False)

    return tf.data.Dataset.range(1).flat_map(epoch_order)


def shuffled_dataset(source: DataSource, records: list[Record], cfg: DataConfig, size: int, seed: int,
                     cached: tf.data.Dataset | None = None,
                     epoch: tf.Variable | None = None) -> tf.data.Dataset:
    """Unbatched (uint8 pixels, label) of ``records`` in a new seeded permutation every epoch.

    A whole permutation, not a shuffle buffer: records come sorted by class, and a buffer
    smaller than the data set fills batches with one or two classes. With ``cached`` (these
    records decoded and cached in memory, in order) the permutation runs over the cached
    images, and holding all of them in the buffer costs references, not copies. Otherwise it
    runs over the file paths (or TFDS's encoded bytes) before decoding, so no decoded pixels
    are held and each epoch decodes again. ``epoch``: see :func:`permuted`.
    """
    n = max(1, len(records))
    if cached is not None:
        return permuted(cached, n, seed, epoch)
    if source.tfds is None:
        return (permuted(_path_dataset(source, records), n, seed, epoch)
                .map(_read_and_load(load_image, size, cfg.resize), num_parallel_calls=AUTOTUNE,
                     deterministic=True))
    return (permuted(_tfds_encoded(source, records), n, seed, epoch)
            .map(lambda x, y: (load_image(x, size, cfg.resize), y), num_parallel_calls=AUTOTUNE,
                 deterministic=True))


def batched(ds: tf.data.Dataset, num_classes: int, batch_size: int) -> tf.data.Dataset:
    """Batch, turn labels to one-hot, prefetch (in the order of ``ds``).

    Pixels stay uint8: the model's float32 input casts them on its own device, so the CPU
    skips a float pass over every image and a GPU receives a quarter of the bytes.
    """
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def evaluation_batches(source: DataSource, records: list[Record], cfg: DataConfig,
                       num_classes: int) -> tf.data.Dataset:
    """``records`` decoded without augmentation at ``data.image_size``, in their order, in
    batches of ``data.batch_size``: what the model is scored, calibrated and embedded on."""
    return batched(decoded_dataset(source, records, cfg, cfg.image_size), num_classes, cfg.batch_size)


def global_batch_size(config: Config, replicas: int) -> int:
    """The batch the input pipelines make: ``data.batch_size`` is per replica, and a
    tf.distribute strategy splits each global batch among its ``replicas``."""
    return config.data.batch_size * replicas


def shard_by_data(ds: tf.data.Dataset, replicas: int) -> tf.data.Dataset:
    """Shard by element across workers (the images are decoded in a map, not read from files)."""
    if replicas <= 1:
        return ds
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)
