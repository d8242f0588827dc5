"""Input pipeline throughput: jewelclf's tf.data pipeline against two baselines, in one process.

- ``bare``: read, ``tf.io.decode_image`` and ``tf.image.resize`` mapped in parallel, nothing
  else (the practical limit of decoding these files on this machine);
- ``keras``: ``keras.utils.image_dataset_from_directory`` at the same size and batch;
- ``jewelclf``: ``decoded_dataset`` + ``batched`` as ``fit`` uses them (JPEGs routed past the
  format dispatch and other checked files past its JPEG branch, alpha composited after the
  resize, grayscale and CMYK handling, box or
  bilinear resize, uint8 rounding, batching, prefetch), first pass (decoding) and a
  second pass from the cache (what every later epoch costs);
- ``previous``: the same pipeline with the decode and resize of 2026-11-23 (a ``tf.cond`` on
  the format for every image, area-averaged resize at every scale, alpha composited at full
  size in float32), for the speed-up.

Two figures per pipeline: wall-clock img/s (what a run sees) and images per CPU-second (the
process's CPU time over the same pass, which steal and scheduling noise on a shared VM move much
less than the wall clock).

Usage::

    python benchmarks/input_pipeline.py ../shared/data/jewellery/training --size 224 --repeats 7 --by-format
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from jewelclf.config import DataConfig  # noqa: E402
from jewelclf.data.pipeline import batched, decoded_dataset  # noqa: E402
from jewelclf.data.sources import load_source  # noqa: E402
from jewelclf.data.validate import check_records  # noqa: E402


def consume(ds) -> int:
    n = 0
    for element in ds:
        # A bare pipeline yields the image batch itself; the others (images, labels, ...).
        x = element[0] if isinstance(element, (tuple, list)) else element
        n += int(x.shape[0]) if x.shape.rank == 4 else 1
    return n


def bare_image(encoded, size: int):
    """The baseline's work on one image: decode (alpha dropped) and a plain bilinear resize."""
    return tf.image.resize(tf.io.decode_image(encoded, channels=3, expand_animations=False), [size, size])


def bare_pass(paths: list[str], size: int, batch_size: int) -> int:
    """One pass of the baseline: read, decode and resize mapped in parallel, batch, prefetch."""
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: bare_image(tf.io.read_file(p), size),
        num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return consume(ds)


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def timed_both(fn) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, items) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, time.process_time() - c0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a folder of class subfolders")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--by-format", action="store_true",
                    help="also time JPEGs and other files apart, one thread, from memory")
    args = ap.parse_args()

    source = load_source(args.folder)
    records = [c.record for c in check_records(source.records, 50_000_000, 8) if c.ok]
    paths = [r.path for r in records]
    size, bs = args.size, args.batch_size
    print(f"{len(records)} images, {size} px, batch {bs}, {os.cpu_count()} CPU cores, "
          f"TensorFlow {tf.__version__}")

    def bare():
        return bare_pass(paths, size, bs)

    def keras_dir():
        ds = keras.utils.image_dataset_from_directory(
            args.folder, image_size=(size, size), batch_size=bs, shuffle=False, verbose=False)
        return consume(ds.prefetch(tf.data.AUTOTUNE))

    def ours_uncached():
        ds = batched(decoded_dataset(source, records, DataConfig(), size), len(source.class_names), bs)
        return consume(ds)

    def previous():
        from jewelclf.data.images import _composite_full_size, _decode, _gray_to_rgb

        def area_resize(image):
            shape = tf.shape(image)
            shrunk = tf.image.resize(image, [tf.minimum(shape[0], size), tf.minimum(shape[1], size)],
                                     method="area")
            resized = tf.cond(tf.reduce_all(shape[:2] >= size), lambda: shrunk,
                              lambda: tf.image.resize(shrunk, [size, size], method="bilinear"))
            return tf.cast(tf.round(resized), tf.uint8)

        def load(p):
            out = _decode(tf.io.read_file(p), size, True, lambda image: area_resize(_gray_to_rgb(image)),
                          lambda image: area_resize(_composite_full_size(image)))
            out.set_shape([size, size, 3])
            return out

        labels = tf.zeros([len(paths)], tf.int32)
        ds = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
            lambda p, y: (load(p), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return consume(batched(ds, len(source.class_names), bs))

    names = ("bare", "keras", "jewelclf", "previous")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(args.repeats):
        for name, fn in zip(names, (bare, keras_dir, ours_uncached, previous)):
            seconds, cpu_seconds, n = timed_both(fn)
            wall[name].append(n / seconds)
            cpu[name].append(n / cpu_seconds)
    cached = batched(decoded_dataset(source, records, DataConfig(), size, cache="memory"),
                     len(source.class_names), bs)
    fill, n = timed(lambda: consume(cached))
    cache_pass, cache_cpu, _ = timed_both(lambda: consume(cached))
    # Medians: a shared VM's passes vary by up to 2x, and one lucky pass should not set a ratio.
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"{'pipeline':<28} {'img/s':>8} {'vs bare':>8} {'img/CPU-s':>10} {'vs bare':>8}")
    for name, label in zip(names, ("bare decode+resize", "image_dataset_from_directory",
                                   "jewelclf (decoding)", "jewelclf of 2026-11-23")):
        print(f"{label:<28} {med[name]:8.1f} {med[name] / med['bare']:8.2f} "
              f"{med_cpu[name]:10.1f} {med_cpu[name] / med_cpu['bare']:8.2f}")
    print(f"{'jewelclf (from cache)':<28} {n / cache_pass:8.1f} {n / cache_pass / med['bare']:8.2f} "
          f"{n / cache_cpu:10.1f} {n / cache_cpu / med_cpu['bare']:8.2f}")
    print(f"jewelclf's decoding pass against 2026-11-23's: x{med['jewelclf'] / med['previous']:.2f} "
          f"wall, x{med_cpu['jewelclf'] / med_cpu['previous']:.2f} per CPU-second")
    print(f"(median of {args.repeats} passes each, interleaved; cache fill pass {n / fill:.1f} img/s)")
    # jewelclf traces its decode graphs once per process (fit, tune and index build pipelines
    # many times); the first pass pays that, the median of the later ones does not.
    print(f"jewelclf's first decoding pass in this process (graphs traced): {wall['jewelclf'][0]:.1f} img/s "
          f"({wall['jewelclf'][0] / med['bare']:.2f} of bare), {cpu['jewelclf'][0]:.1f} img/CPU-s "
          f"({cpu['jewelclf'][0] / med_cpu['bare']:.2f})")
    if args.by_format:
        by_format(paths, size, args.repeats)


def by_format(paths: list[str], size: int, repeats: int) -> None:
    """CPU milliseconds per image of the bare decode+resize and of jewelclf's decode+resize
    (``load_jpeg`` for JPEGs, ``load_other`` for the rest), for the JPEGs and for the other
    files apart: one thread, the bytes already in memory, per image (a group of fewer than 200
    files is repeated to 200 a pass)."""
    from jewelclf.data.images import load_jpeg, load_other, sniff_format

    encoded = [open(p, "rb").read() for p in paths]
    groups = {"JPEG": [b for b in encoded if sniff_format(b[:16]) == "JPEG"]}
    groups["other"] = [b for b in encoded if sniff_format(b[:16]) != "JPEG"]
    # As decoded_dataset routes the files by the format the data check found.
    ours = {"JPEG": load_jpeg, "other": load_other}
    options = tf.data.Options()
    options.autotune.enabled = False
    print(f"{'files':<16} {'bare ms':>8} {'jewelclf ms':>12} {'ratio':>6}   (CPU ms per image, one thread)")
    for group, items in groups.items():
        if not items:
            continue
        ms = {}
        fns = {"bare": lambda b: bare_image(b, size), "jewelclf": lambda b, load=ours[group]: load(b, size)}
        for name, fn in fns.items():
            runs = []
            for _ in range(repeats):
                # A few files are repeated to 200 or more images a pass, so that the iterator's
                # one-off start (instantiating the decode graph) does not count as per-image cost.
                ds = tf.data.Dataset.from_tensor_slices(items).repeat(-(-200 // len(items))).map(
                    fn, num_parallel_calls=1)
                _, cpu_seconds, n = timed_both(lambda ds=ds: consume(ds.with_options(options).batch(1)))
                runs.append(cpu_seconds / n * 1e3)
            ms[name] = statistics.median(runs)
        print(f"{group + f' ({len(items)})':<16} {ms['bare']:8.2f} {ms['jewelclf']:12.2f} "
              f"{ms['bare'] / ms['jewelclf']:6.2f}")


if __name__ == "__main__":
    main()
