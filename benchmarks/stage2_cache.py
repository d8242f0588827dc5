"""Stage 2 through the whole model against stage 2's top on cached boundary activations.

In one process, on real decoded training images: (a) today's stage-2 step 1 (the full model,
top block trainable, augmented pixels through every layer), (b) the same optimizer training only
the top (the unfrozen block(s), pooling and head) on activations cached at the frozen boundary,
and (c) the cost of computing that cache for one augmented view. Each timing follows a warm-up
step. Prints seconds per step, per-epoch estimates, the speed-up, the cache's memory per view,
and the largest change in the top's output that float16 caching causes.

Usage::

    nice -n 5 python benchmarks/stage2_cache.py --data ../shared/data/jewellery \\
        --weights ../shared/weights/vgg16_imagenet_notop.weights.h5 --backbone vgg16 \\
        --image-size 224 --steps 8 --batch-size 32
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from jewelclf.config import resolve  # noqa: E402
from jewelclf.data.images import load_image  # noqa: E402
from jewelclf.modeling.backbones import get_backbone  # noqa: E402
from jewelclf.modeling.classifier import build_classifier, unfreeze_top_blocks  # noqa: E402
from jewelclf.training.boundary import boundary_activations, split_at_boundary  # noqa: E402

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def training_images(data: Path, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``n`` images of ``data``'s training folder (its ``training`` or ``train`` subfolder, else
    itself), drawn at random over the classes, decoded and squashed to ``size``; their one-hot
    labels; the number of classes."""
    root = next((data / s for s in ("training", "train") if (data / s).is_dir()), data)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in EXTENSIONS]
    picked = np.random.default_rng(seed).permutation(len(files))[:n]
    pixels = np.stack([load_image(tf.io.read_file(str(files[i][0])), size, "squash").numpy()
                       for i in picked]).astype("float32")
    labels = np.eye(len(classes), dtype="float32")[[files[i][1] for i in picked]]
    return pixels, labels, len(classes)


def compile_like_stage2(model: keras.Model, config) -> None:
    """What ``stages.py`` compiles a stage-2 step with: Adam, the run's loss, accuracy."""
    model.compile(keras.optimizers.Adam(config.train.stage2.learning_rate),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.train.label_smoothing),
                  metrics=["accuracy"], jit_compile={"auto": "auto", "on": True, "off": False}[
                      config.train.jit_compile])


def timed_steps(train_step, batches) -> float:
    """Seconds per call of ``train_step`` over ``batches`` after a warm-up call on the first."""
    train_step(*batches[0])
    t0 = time.perf_counter()
    for batch in batches[1:]:
        train_step(*batch)
    return (time.perf_counter() - t0) / (len(batches) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/jewellery"))
    ap.add_argument("--weights", default="../shared/weights/vgg16_imagenet_notop.weights.h5")
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=1, help="unfrozen top blocks (stage-2 step)")
    ap.add_argument("--epoch-images", type=int, default=1342, help="training images per epoch")
    args = ap.parse_args()
    config = resolve(None, {"model": {"backbone": args.backbone, "weights": args.weights},
                            "data": {"image_size": args.image_size, "batch_size": args.batch_size}})
    keras.utils.set_random_seed(config.train.seed)
    bs, n = args.batch_size, args.batch_size * (args.steps + 1)
    t0 = time.perf_counter()
    pixels, labels, n_classes = training_images(args.data, n, args.image_size, config.train.seed)
    print(f"decoded {n} training images at {args.image_size} px in {time.perf_counter() - t0:.1f}s; "
          f"{os.cpu_count()} CPU cores, TF {tf.__version__}, Keras {keras.__version__}")
    spec = get_backbone(args.backbone)
    model = build_classifier(config, n_classes)
    unfrozen = unfreeze_top_blocks(model, spec, args.blocks)
    bottom, top = split_at_boundary(model, spec, args.blocks)
    batches = [(pixels[i:i + bs], labels[i:i + bs]) for i in range(0, n, bs)]

    # (c) one augmented view of these images, float16, timed after a warm-up batch
    augmentation = model.get_layer("augmentation") if config.augment.enabled else None
    boundary_activations(bottom, [batches[0][0]], augmentation=augmentation)
    t0 = time.perf_counter()
    cache = boundary_activations(bottom, [b[0] for b in batches], augmentation=augmentation)
    cache_per_image = (time.perf_counter() - t0) / n
    # float16's effect on the top's output, on the same (un-augmented) images, before training
    plain32 = boundary_activations(bottom, [b[0] for b in batches[:2]], dtype="float32")
    fp16_before = float(np.abs(keras.ops.convert_to_numpy(top(plain32.astype("float16").astype("float32")))
                               - keras.ops.convert_to_numpy(top(plain32))).max())

    compile_like_stage2(model, config)  # (a) today's step: the whole model on augmented pixels
    t_full = timed_steps(model.train_on_batch, batches)
    compile_like_stage2(top, config)  # (b) the top on the cache, float16 -> float32 per batch
    cached = [(cache[i:i + bs].astype("float32"), labels[i:i + bs]) for i in range(0, n, bs)]
    t_top = timed_steps(lambda a, y: top.train_on_batch(a, y), cached)
    fp16_after = float(np.abs(keras.ops.convert_to_numpy(top(plain32.astype("float16").astype("float32")))
                              - keras.ops.convert_to_numpy(top(plain32))).max())

    steps_per_epoch = math.ceil(args.epoch_images / bs)
    per_view = cache.nbytes / n * args.epoch_images
    print(f"{args.backbone} at {args.image_size} px, batch {bs}, unfrozen {', '.join(unfrozen)}; "
          f"boundary {tuple(cache.shape[1:])} ({cache.dtype}); timed over {args.steps} steps after 1 warm-up")
    print(f"(a) full model, augmented pixels : {t_full:8.3f} s/step -> "
          f"{t_full * steps_per_epoch / 60:7.2f} min/epoch ({steps_per_epoch} steps)")
    print(f"(b) top on cached activations    : {t_top:8.3f} s/step -> "
          f"{t_top * steps_per_epoch / 60:7.2f} min/epoch")
    print(f"(c) cache one augmented view     : {cache_per_image * 1000:8.1f} ms/image -> "
          f"{cache_per_image * args.epoch_images / 60:7.2f} min per view of {args.epoch_images} images")
    print(f"ratio (a)/(b) per step: {t_full / t_top:.1f}x; (a) against (b) plus a fresh view every epoch: "
          f"{t_full * steps_per_epoch / (t_top * steps_per_epoch + cache_per_image * args.epoch_images):.1f}x")
    print(f"cache memory per view of {args.epoch_images} images: {per_view / 2**20:.0f} MiB in "
          f"{cache.dtype} ({per_view / 2**19:.0f} MiB in float32)")
    print(f"float16 cache, max |top(fp16) - top(fp32)| over {len(plain32)} images: "
          f"{fp16_before:.2e} (untrained head), {fp16_after:.2e} (after the {args.steps + 1} top steps)")


if __name__ == "__main__":
    main()
