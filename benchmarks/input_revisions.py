"""The decoding pass of this checkout's input pipeline against the same pipeline with the image
decoding of another git revision, and against the bare decode-and-resize loop, interleaved in
one process.

This checkout's row is ``decoded_dataset`` + ``batched``, as ``fit`` reads. For the other
revision, its ``jewelclf/data/images.py`` is read with ``git show REV:...`` and loaded as a module
of its own, and each checked file is routed to that module's loaders as its ``decoded_dataset``
did (``load_jpeg`` for JPEGs and ``load_other`` for the rest where the revision has them,
``load_image`` otherwise), then batched and prefetched the same way.

Usage::

    python benchmarks/input_revisions.py ../shared/data/jewellery/training --rev cf27dd2 --repeats 7
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

import jewelclf.data.images as current_images  # noqa: E402
from jewelclf.config import DataConfig  # noqa: E402
from jewelclf.data.pipeline import batched, decoded_dataset  # noqa: E402
from jewelclf.data.sources import load_source  # noqa: E402
from jewelclf.data.validate import check_records  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_pipeline import bare_pass, consume, timed_both  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def images_module_at(rev: str):
    """``jewelclf/data/images.py`` as it was at ``rev``, imported under its own name."""
    try:
        text = subprocess.run(["git", "show", f"{rev}:jewelclf/data/images.py"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"error: cannot read jewelclf/data/images.py at {rev!r} with git ({e}); "
                 f"run this from a git checkout and pass a revision that exists")
    path = Path(tempfile.mkdtemp()) / f"images_at_{rev.replace('/', '_')}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def routed_pass(images, records, class_names, size: int, batch_size: int) -> int:
    """One decoding pass over ``records`` with ``images``' loaders, routed by checked format."""
    def loader(record):
        if record.format == "JPEG" and hasattr(images, "load_jpeg"):
            return images.load_jpeg
        if record.format not in (None, "JPEG") and hasattr(images, "load_other"):
            return images.load_other
        return images.load_image

    index = {c: i for i, c in enumerate(class_names)}
    loaders = [loader(r) for r in records]
    used = list(dict.fromkeys(loaders))
    streams = []
    for load in used:
        mine = [r for r, lr in zip(records, loaders) if lr is load]
        ds = tf.data.Dataset.from_tensor_slices(([r.path for r in mine], [index[r.label] for r in mine]))
        streams.append(ds.map(lambda p, y, load=load: (load(tf.io.read_file(p), size, "squash"), y),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
    ds = streams[0] if len(streams) == 1 else tf.data.Dataset.choose_from_datasets(
        streams, tf.data.Dataset.from_tensor_slices(tf.constant([used.index(lr) for lr in loaders], tf.int64)))
    return consume(batched(ds, len(class_names), batch_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a folder of class subfolders")
    ap.add_argument("--rev", required=True, help="the git revision to compare with, e.g. cf27dd2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    old_images = images_module_at(args.rev)
    source = load_source(args.folder)
    records = [c.record for c in check_records(source.records, 50_000_000, 8) if c.ok]
    paths = [r.path for r in records]
    size, bs = args.size, args.batch_size

    # The revision's pixels first: a speed-up that changed the pixels would not be a speed-up.
    differ = sum(not tf.reduce_all(tf.equal(current_images.load_image(tf.io.read_file(p), size),
                                            old_images.load_image(tf.io.read_file(p), size))).numpy()
                 for p in paths)
    print(f"{len(records)} images, {size} px, batch {bs}, {os.cpu_count()} CPU cores; files whose "
          f"pixels differ between this checkout and {args.rev}: {differ}")


    rows = {"bare decode+resize": lambda: bare_pass(paths, size, bs),
            "this checkout": lambda: consume(batched(decoded_dataset(source, records, DataConfig(), size),
                                                     len(source.class_names), bs)),
            f"at {args.rev}": lambda: routed_pass(old_images, records, source.class_names, size, bs)}
    wall: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            seconds, cpu_seconds, n = timed_both(fn)
            wall[name].append(n / seconds)
            cpu[name].append(n / cpu_seconds)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    base = "bare decode+resize"
    print(f"{'decoding pass':<22} {'img/s':>8} {'vs bare':>8} {'img/CPU-s':>10} {'vs bare':>8}")
    for name in rows:
        print(f"{name:<22} {med[name]:8.1f} {med[name] / med[base]:8.2f} "
              f"{med_cpu[name]:10.1f} {med_cpu[name] / med_cpu[base]:8.2f}")
    new, old = "this checkout", f"at {args.rev}"
    print(f"this checkout against {args.rev}: x{med[new] / med[old]:.2f} wall, "
          f"x{med_cpu[new] / med_cpu[old]:.2f} per CPU-second (median of {args.repeats} interleaved passes)")


if __name__ == "__main__":
    main()
