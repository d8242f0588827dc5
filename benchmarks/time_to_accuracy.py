"""Time to accuracy: the default ``jewelclf fit`` against the Keras transfer-learning guide's recipe.

Both run one after the other in this process, on the same data, backbone weights, image size
and machine, and are scored on the same ``test/`` split. The reference recipe is the one of
https://keras.io/guides/transfer_learning/ ("the typical transfer-learning workflow"):

- ``keras.utils.image_dataset_from_directory`` on ``DATA/training`` with a seeded 15 % validation
  subset, batches of 32;
- the frozen base called with ``training=False``, RandomFlip("horizontal") + RandomRotation(0.1)
  augmentation, the backbone's own preprocessing, GlobalAveragePooling2D, Dropout(0.2), Dense;
- the head trained ``--recipe-head-epochs`` (10) epochs with Adam 1e-3 through the frozen base,
  then the whole base unfrozen and fine-tuned ``--recipe-fine-tune-epochs`` (5) epochs at 1e-5.

jewelclf runs its defaults (cached-feature stage 1 with early stopping, progressive unfreezing of
the top blocks with BatchNorm frozen), with only ``--backbone/--weights/--image-size`` set.

Usage (minutes with MobileNet 0.25 at 128 px on 2 CPU cores; VGG16 at 224 px takes hours)::

    python benchmarks/time_to_accuracy.py ../shared/data/jewellery --backbone mobilenet_025 \\
        --weights ../shared/weights/mobilenet_0.25_224_imagenet_notop.h5 --image-size 128
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from jewelclf.config import resolve  # noqa: E402
from jewelclf.modeling.backbones import get_backbone  # noqa: E402
from jewelclf.modeling.preprocessing import BackbonePreprocessing  # noqa: E402
from jewelclf.training.fit import fit  # noqa: E402


def _split_dirs(data: Path) -> tuple[Path, Path]:
    train = next((data / n for n in ("train", "training") if (data / n).is_dir()), None)
    if train is None or not (data / "test").is_dir():
        raise SystemExit(f"{data} needs train/ (or training/) and test/ class folders")
    return train, data / "test"


def keras_guide_recipe(args, seed: int) -> dict:
    """The Keras guide's workflow, as written there, on this data; returns its test figures."""
    t0 = time.perf_counter()
    train_dir, test_dir = _split_dirs(Path(args.data))
    size = (args.image_size, args.image_size)
    train_ds, val_ds = keras.utils.image_dataset_from_directory(
        train_dir, validation_split=0.15, subset="both", seed=seed, image_size=size,
        batch_size=32, label_mode="categorical")
    test_ds = keras.utils.image_dataset_from_directory(
        test_dir, image_size=size, batch_size=32, label_mode="categorical", shuffle=False)
    n_classes = len(train_ds.class_names)
    train_ds, val_ds, test_ds = (d.prefetch(tf.data.AUTOTUNE) for d in (train_ds, val_ds, test_ds))

    spec = get_backbone(args.backbone)
    base = spec.build(args.image_size, args.weights)
    base.trainable = False
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                     keras.layers.RandomRotation(0.1)])
    inputs = keras.Input(size + (3,))
    x = augmentation(inputs)
    x = BackbonePreprocessing(spec.preprocessing)(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)

    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_ds, epochs=args.recipe_head_epochs, validation_data=val_ds, verbose=2)
    base.trainable = True
    model.compile(keras.optimizers.Adam(1e-5), "categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_ds, epochs=args.recipe_fine_tune_epochs, validation_data=val_ds, verbose=2)
    accuracy = float(model.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"])
    return {"seconds": time.perf_counter() - t0, "test_accuracy": accuracy}


def jewelclf_default(args, seed: int, work: Path) -> dict:
    t0 = time.perf_counter()
    config = resolve(None, {"model": {"backbone": args.backbone, "weights": args.weights},
                            "data": {"image_size": args.image_size}, "train": {"seed": seed}})
    info = fit(args.data, work / "jewelclf", config, log=lambda m: print(m, flush=True))
    return {"seconds": time.perf_counter() - t0, "test_accuracy": info["summary"]["test"]["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a folder with train/ (or training/) and test/ class folders")
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--recipe-head-epochs", type=int, default=10)
    ap.add_argument("--recipe-fine-tune-epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    keras.utils.set_random_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ours = jewelclf_default(args, args.seed, Path(tmp))
    keras.backend.clear_session()
    keras.utils.set_random_seed(args.seed)
    recipe = keras_guide_recipe(args, args.seed)
    print(f"\n{args.backbone} at {args.image_size} px, {os.cpu_count()} CPU cores, test split of {args.data}")
    print(f"{'variant':<44} {'wall s':>8} {'test acc':>9}")
    print(f"{'Keras guide recipe (10 head + 5 full fine-tune)':<44} {recipe['seconds']:8.1f} "
          f"{recipe['test_accuracy']:9.4f}")
    print(f"{'jewelclf fit, defaults':<44} {ours['seconds']:8.1f} {ours['test_accuracy']:9.4f}")
    print(f"jewelclf wall time / recipe's: {ours['seconds'] / recipe['seconds']:.2f} "
          f"(target <= 0.5); accuracy difference: {ours['test_accuracy'] - recipe['test_accuracy']:+.4f} "
          f"(target >= 0)")


if __name__ == "__main__":
    main()
