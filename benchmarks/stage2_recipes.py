"""Stage-2 recipes on cached boundary activations, judged on validation and on the shifted test/.

Two phases, so that the costly backbone passes run once and each recipe costs minutes:

``cache``: ``fit``'s own data preparation (the same validation split ``fit`` carves, the same
decoding), then the classifier's bottom (pixels -> the input of the backbone's top block, see
:mod:`jewelclf.training.boundary`) over the training images in order, ``--views`` augmented
views of them (jewelclf's augmentation block in training mode, seeded), the validation images
and the ``test/`` images. Saved as float16 ``.npy`` files with the labels and class weights.

``run``: for each recipe, a fresh classifier; stage 1 exactly as ``fit`` trains it on cached
features (:func:`jewelclf.training.stages.train_stage1`, features = the pooled output of the
frozen top block); then the recipe's stage 2 on the cached views: the top block unfrozen, Adam,
restoring the epoch of lowest val_loss. Prints val and test accuracy and macro-F1 per epoch and
for the restored weights. Test figures are reported, never used to choose.

Usage::

    python benchmarks/stage2_recipes.py cache --data ../shared/data/jewellery \\
        --weights ../shared/weights/vgg16_imagenet_notop.weights.h5 --cache-dir /tmp/s2r --views 3
    python benchmarks/stage2_recipes.py run --cache-dir /tmp/s2r --recipes base,lr3e-6,l2sp
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402

from jewelclf.config import resolve  # noqa: E402
from jewelclf.data.pipeline import evaluation_batches  # noqa: E402
from jewelclf.data.prepare import make_datasets, prepare_data  # noqa: E402
from jewelclf.modeling.augmentation import Augmentation  # noqa: E402
from jewelclf.modeling.backbones import get_backbone  # noqa: E402
from jewelclf.modeling.classifier import (  # noqa: E402
    BACKBONE,
    POOL,
    build_classifier,
    build_head,
    unfreeze_top_blocks,
)
from jewelclf.training.boundary import boundary_activations, split_at_boundary  # noqa: E402
from jewelclf.training.stages import train_stage1  # noqa: E402


def config_of(args) -> object:
    return resolve(None, {"model": {"backbone": args.backbone, "weights": args.weights},
                          "train": {"seed": args.seed}})


def cache(args) -> None:
    out = Path(args.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config_of(args)
    with tempfile.TemporaryDirectory() as run_dir:
        prepared = prepare_data(args.data, config, Path(run_dir))
        ds = make_datasets(prepared, config, Path(run_dir))
    n = len(prepared.class_names)
    model = build_classifier(config, n)
    spec = get_backbone(config.model.backbone)
    unfreeze_top_blocks(model, spec, 1)
    bottom, _ = split_at_boundary(model, spec, 1)
    test = evaluation_batches(prepared.source, prepared.test, config.data, n)
    meta = {"classes": prepared.class_names, "config": config.to_dict(),
            "class_weights": {str(k): v for k, v in (ds.class_weights or {}).items()}, "seconds": {}}
    np.save(out / "y_train.npy", ds.labels[0])
    np.save(out / "y_val.npy", ds.labels[1])
    np.save(out / "y_test.npy", np.concatenate([y for _, y in test.as_numpy_iterator()]))
    jobs = [("val", ds.val, None), ("test", test, None), ("train", ds.train_in_order, None)]
    jobs += [(f"train_view{k}", ds.train_in_order, "aug") for k in range(1, args.views + 1)]
    augmentation = next(layer for layer in model.layers if isinstance(layer, Augmentation))
    keras.utils.set_random_seed(args.seed)
    for name, data, aug in jobs:
        if (out / f"{name}.npy").exists():
            continue
        t0 = time.perf_counter()
        acts = boundary_activations(bottom, data, augmentation=augmentation if aug else None)
        meta["seconds"][name] = round(time.perf_counter() - t0, 1)
        np.save(out / f"{name}.npy", acts)
        print(f"{name}: {acts.shape} in {meta['seconds'][name]:.0f}s", flush=True)
        (out / "meta.json").write_text(json.dumps(meta, indent=1))


RECIPES = {
    # name: stage-2 settings on top of BASE
    "s1": {"epochs": 0},
    "base": {},
    "orig": {"views": [0]},
    "v2": {"views": [1, 2]},
    "lr3e-6": {"lr": 3e-6},
    "lr3e-5": {"lr": 3e-5},
    "l2sp": {"l2sp": 1e-3},
    "l2sp-strong": {"l2sp": 1e-2},
    "ls": {"label_smoothing": 0.1},
    "ema": {"ema": 0.9},
    "e6": {"epochs": 6},
}
BASE = {"epochs": 3, "lr": 1e-5, "views": [1], "l2sp": 0.0, "label_smoothing": 0.0, "ema": 0.0}


class Cache:
    """The arrays of one ``cache`` phase."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.y = {s: np.load(folder / f"y_{s}.npy") for s in ("train", "val", "test")}
        self.acts = {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in ("train", "val", "test")}

    def view(self, k: int) -> np.ndarray:
        return np.load(self.dir / ("train.npy" if k == 0 else f"train_view{k}.npy"), mmap_mode="r")


def scores(model: keras.Model, x, y: np.ndarray) -> dict[str, float]:
    p = model.predict(x, batch_size=64, verbose=0)
    t, q = y.argmax(1), p.argmax(1)
    loss = float(np.mean(-np.log(np.clip(p[np.arange(len(t)), t], 1e-7, 1))))
    return {"loss": loss, "acc": accuracy_score(t, q), "f1": f1_score(t, q, average="macro")}


class Watch(keras.callbacks.Callback):
    """Each epoch's val and test figures, and the epoch of the lowest val_loss (0: the start)."""

    def __init__(self, top: keras.Model, cache: Cache, anchor=None, decay=0.0):
        super().__init__()
        self.top, self.cache, self.anchor, self.decay = top, cache, anchor, decay
        self.rows: list[dict] = []
        self.best = None
        self.record(0)

    def record(self, epoch: int) -> None:
        val = scores(self.top, self.cache.acts["val"], self.cache.y["val"])
        test = scores(self.top, self.cache.acts["test"], self.cache.y["test"])
        self.rows.append({"epoch": epoch, **{f"val_{k}": v for k, v in val.items()},
                          **{f"test_{k}": v for k, v in test.items()}})
        print("   ", " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in self.rows[-1].items()), flush=True)
        if self.best is None or val["loss"] < self.best[0]:
            self.best = (val["loss"], epoch)

    def on_train_batch_end(self, batch, logs=None):
        if self.decay:  # L2-SP as a decoupled pull, this fraction per step, to the pretrained weights
            for v, v0 in self.anchor:
                v.assign(v - self.decay * (v - v0))

    def on_epoch_end(self, epoch, logs=None):
        self.record(epoch + 1)


def pooled(top: keras.Model, acts) -> np.ndarray:
    """The frozen top block's pooled output of ``acts``: stage 1's features."""
    inputs = keras.Input(top.input_shape[1:])
    x = top.get_layer(f"{BACKBONE}_top")(inputs)
    features = keras.Model(inputs, top.get_layer(POOL)(x))
    return features.predict(acts, batch_size=64, verbose=0)


def fresh_classifier(cache: Cache):
    """The run's config, backbone spec, a new seeded classifier with its top block unfrozen,
    and that classifier's top (the block5 input -> probabilities)."""
    config = resolve(None, cache.meta["config"])
    spec = get_backbone(config.model.backbone)
    keras.utils.set_random_seed(config.train.seed)
    model = build_classifier(config, len(cache.meta["classes"]))
    unfreeze_top_blocks(model, spec, 1)
    return config, spec, model, split_at_boundary(model, spec, 1)[1]


def recipe(name: str, cache: Cache, stage1_weights: list | None) -> tuple[dict, list]:
    settings = {**BASE, **RECIPES[name]}
    config, spec, model, top = fresh_classifier(cache)
    weights = {int(k): v for k, v in cache.meta["class_weights"].items()} or None
    t0 = time.perf_counter()
    if stage1_weights is None:
        for layer in model.get_layer(BACKBONE).layers:
            layer.trainable = False
        features = (pooled(top, cache.acts["train"]), pooled(top, cache.acts["val"]))
        with tempfile.TemporaryDirectory() as run_dir:
            train_stage1(model, config, None, None, None, (cache.y["train"], cache.y["val"]), weights,
                         Path(run_dir), print, features=features)
        stage1_weights = model.get_weights()
        unfreeze_top_blocks(model, spec, 1)
    model.set_weights(stage1_weights)
    block5 = [w for w in model.trainable_weights if w.path.startswith(f"{BACKBONE}/")]
    anchor = [(v, keras.ops.convert_to_tensor(v.numpy())) for v in block5]
    optimizer = keras.optimizers.Adam(settings["lr"], use_ema=bool(settings["ema"]),
                                      ema_momentum=settings["ema"] or 0.99)
    top.compile(optimizer, keras.losses.CategoricalCrossentropy(label_smoothing=settings["label_smoothing"]),
                metrics=["accuracy"])
    watch = Watch(top, cache, anchor, settings["l2sp"])
    plateau = keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.3, patience=1)
    for epoch in range(settings["epochs"]):
        view = cache.view(settings["views"][epoch % len(settings["views"])])
        # With EMA, the averaged weights are swapped in at each epoch's end, before the watch.
        callbacks = ([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if settings["ema"] else [])
        top.fit(view, cache.y["train"], batch_size=32, epochs=epoch + 1, initial_epoch=epoch,
                validation_data=(cache.acts["val"], cache.y["val"]), class_weight=weights,
                callbacks=callbacks + [plateau, watch], verbose=0)
    best_epoch = watch.best[1]
    row = {**watch.rows[best_epoch], "recipe": name, "restored": best_epoch,
           "seconds": round(time.perf_counter() - t0, 1)}
    return row, stage1_weights


def concat_head(cache: Cache) -> dict:
    """Stage 1's head on block4's and block5's pooled outputs side by side (1,024 features),
    trained as stage 1 trains (Adam 1e-3, 30 epochs, patience 5, best val_loss restored)."""
    config, _, _, top = fresh_classifier(cache)
    t0 = time.perf_counter()
    x = {s: np.concatenate([pooled(top, cache.acts[s]), np.asarray(cache.acts[s], "float32").mean((1, 2))], 1)
         for s in ("train", "val", "test")}
    head = build_head(x["train"].shape[1], len(cache.meta["classes"]), config.model.head_units,
                      config.model.dropout)
    head.compile(keras.optimizers.Adam(config.train.stage1.learning_rate), "categorical_crossentropy")
    weights = {int(k): v for k, v in cache.meta["class_weights"].items()} or None
    head.fit(x["train"], cache.y["train"], batch_size=32, epochs=config.train.stage1.epochs, verbose=0,
             validation_data=(x["val"], cache.y["val"]), class_weight=weights,
             callbacks=[keras.callbacks.EarlyStopping("val_loss", patience=config.train.stage1.patience,
                                                      restore_best_weights=True)])
    row = {"recipe": "s1-concat", "restored": 0, "seconds": round(time.perf_counter() - t0, 1)}
    for split in ("val", "test"):
        row.update({f"{split}_{k}": v for k, v in scores(head, x[split], cache.y[split]).items()})
    return row


def run(args) -> None:
    cache = Cache(Path(args.cache_dir))
    stage1 = None
    table = []
    for name in args.recipes.split(","):
        if name == "s1-concat":
            table.append(concat_head(cache))
            print(f"== {name}: {table[-1]}", flush=True)
            continue
        print(f"== {name}: {({**BASE, **RECIPES[name]})}", flush=True)
        row, stage1 = recipe(name, cache, stage1)
        table.append(row)
        print(f"== {name}: restored epoch {row['restored']}: val acc {row['val_acc']:.4f} f1 "
              f"{row['val_f1']:.4f} loss {row['val_loss']:.4f} | test acc {row['test_acc']:.4f} f1 "
              f"{row['test_f1']:.4f} | {row['seconds']:.0f}s", flush=True)
    print("\n| recipe | restored epoch | val acc | val macro-F1 | test acc | test macro-F1 | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['recipe']} | {r['restored']} | {r['val_acc']:.4f} | {r['val_f1']:.4f} | "
              f"{r['test_acc']:.4f} | {r['test_f1']:.4f} | {r['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--data", required=True)
    c.add_argument("--weights", required=True)
    c.add_argument("--backbone", default="vgg16")
    c.add_argument("--seed", type=int, default=1337)
    c.add_argument("--views", type=int, default=3)
    c.add_argument("--cache-dir", required=True)
    r = sub.add_parser("run")
    r.add_argument("--cache-dir", required=True)
    r.add_argument("--recipes", default="base")
    r.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    if args.phase == "cache":
        cache(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
