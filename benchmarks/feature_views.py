"""Cheap extra views of the frozen backbone, measured on the stage-1 proxy of ``resize_modes.py``.

Same proxy and protocol as ``benchmarks/resize_modes.py`` (images decoded with
:func:`jewelclf.data.images.load_image` in ``squash`` mode, the frozen base that ``fit`` builds,
``StandardScaler`` + ``LogisticRegression``, ``C`` from {0.1, 1, 10} picked on a stratified 15%
validation split of ``training/`` with the same seed, refitted on all of ``training/``, scored
on ``test/``), for three cheap means:

1. test-time augmentation: the head's probabilities averaged over the original and the
   horizontally flipped image (and a central 87.5% crop resized back), on val and test;
2. K augmented feature views for training: K extra passes of the frozen base over
   ``training/`` through jewelclf's own augmentation block
   (:func:`jewelclf.modeling.augmentation.build_augmentation`, default ``augment`` config,
   ``training=True``, seeded); the head is trained on original + K views, labels repeated, and
   scored on un-augmented val/test, with and without flip TTA. The validation part of
   ``training/`` and its views are kept out of the fit that picks ``C``;
3. the GlobalAveragePooled outputs of ``block4_pool`` and ``block5_pool`` concatenated.

Every pass taps both pools (``block5_pool`` pooled is the usual stage-1 feature), so item 3
costs no pass of its own beyond the original images. Each view's features are cached in
``--cache-dir`` as ``view_<name>_<split>.npz``; a rerun only refits. ``--steps`` orders the
work (the table is printed after each step, so a stopped run still leaves figures).

Usage::

    python benchmarks/feature_views.py --data ../shared/data/jewellery \\
        --weights ../shared/weights/vgg16_imagenet_notop.weights.h5 --backbone vgg16 \\
        --image-size 224 --seed 0 --cache-dir /tmp/h19/views
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from resize_modes import C_GRID, list_split, proxy_arguments  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from jewelclf.config import resolve  # noqa: E402
from jewelclf.data.images import load_image  # noqa: E402
from jewelclf.modeling.augmentation import build_augmentation  # noqa: E402
from jewelclf.modeling.classifier import BACKBONE, PREPROCESSING, build_classifier  # noqa: E402

TAPS = ("block4_pool", "block5_pool")
STEPS = ("flip", "crop", "k2", "concat", "k4")


def tap_extractor(model: keras.Model) -> keras.Model:
    """Pixels to the GlobalAveragePooled outputs of ``TAPS``, built on the backbone's layers."""
    base = model.get_layer(BACKBONE)
    tap = keras.Model(base.input, [base.get_layer(name).output for name in TAPS], name="taps")
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    maps = tap(model.get_layer(PREPROCESSING)(inputs), training=False)
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"gap_{n}")(m) for n, m in zip(TAPS, maps)]
    return keras.Model(inputs, pooled, name="tap_features")


def central_crop(pixels: tf.Tensor, size: int) -> tf.Tensor:
    """The central 87.5% of each image, resized back to ``size`` (bilinear)."""
    return tf.image.resize(tf.image.central_crop(pixels, 0.875), (size, size))


def pass_features(extractor, paths, labels, size: int, transform) -> dict[str, np.ndarray]:
    """One backbone pass: both taps' features, labels and file indices of the images that decode."""
    index = np.arange(len(paths))
    ds = tf.data.Dataset.from_tensor_slices((paths, labels, index))
    ds = ds.map(lambda p, y, i: (load_image(tf.io.read_file(p), size, "squash"), y, i),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors().batch(32).prefetch(2)
    x4, x5, ys, idx = [], [], [], []
    start = time.perf_counter()
    for pixels, y, i in ds:
        f4, f5 = extractor(transform(tf.cast(pixels, tf.float32)), training=False)
        x4.append(f4.numpy())
        x5.append(f5.numpy())
        ys.append(y.numpy())
        idx.append(i.numpy())
    return {"x4": np.concatenate(x4), "x5": np.concatenate(x5), "y": np.concatenate(ys),
            "idx": np.concatenate(idx), "seconds": np.array(time.perf_counter() - start)}


class Views:
    """Cached feature views: ``get(view, split, subset)`` computes a pass only when not cached."""

    def __init__(self, args, extractor, splits, config):
        self.args, self.extractor, self.splits, self.config = args, extractor, splits, config

    def transform(self, view: str):
        size = self.args.image_size
        if view == "orig":
            return lambda x: x
        if view == "flip":
            return lambda x: tf.reverse(x, axis=[2])
        if view == "crop":
            return lambda x: central_crop(x, size)
        k = int(view.removeprefix("aug"))
        aug = build_augmentation(self.config.augment, seed=self.args.seed + 100 * k)
        return lambda x: aug(x, training=True)

    def get(self, view: str, split: str, subset: np.ndarray | None = None) -> dict[str, np.ndarray]:
        cache = Path(self.args.cache_dir) / f"view_{view}_{split}.npz"
        if cache.is_file():
            return dict(np.load(cache))
        paths, labels = self.splits[split]
        pick = np.arange(len(paths)) if subset is None else np.sort(subset)
        out = pass_features(self.extractor, [paths[i] for i in pick], labels[pick],
                            self.args.image_size, self.transform(view))
        out["idx"] = pick[out["idx"]]
        dropped = len(pick) - len(out["y"])
        if dropped:
            print(f"  {view}/{split}: {dropped} image(s) did not decode and were dropped")
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **out)
        sec = float(out["seconds"])
        print(f"  pass {view}/{split}: {len(out['y'])} images in {sec:.0f} s "
              f"({sec / len(out['y']):.3f} s/image)", flush=True)
        return out


def aligned(feat: dict[str, np.ndarray], n: int, block: str) -> np.ndarray:
    """Features of one view laid out by file index (rows of files not in the view are NaN)."""
    x = feat["x5"] if block == "5" else feat["x4"] if block == "4" else np.hstack([feat["x4"], feat["x5"]])
    out = np.full((n, x.shape[1]), np.nan, dtype=np.float32)
    out[feat["idx"]] = x
    return out


class Proxy:
    """The logistic-regression proxy, its fits memoised by (training set, C, part)."""

    def __init__(self, seed: int, y_train: np.ndarray, y_test: np.ndarray):
        self.seed, self.y_train, self.y_test = seed, y_train, y_test
        self.fit_idx, self.val_idx = train_test_split(np.arange(len(y_train)), test_size=0.15,
                                                      stratify=y_train, random_state=seed)
        self.heads: dict = {}

    def head(self, key, c: float, part: str, train_views: list[np.ndarray]):
        if (key, c, part) not in self.heads:
            rows = self.fit_idx if part == "fit" else np.arange(len(self.y_train))
            xs = np.vstack([v[rows] for v in train_views])
            ys = np.tile(self.y_train[rows], len(train_views))
            scaler = StandardScaler().fit(xs)
            clf = LogisticRegression(C=c, max_iter=2000, random_state=self.seed)
            clf.fit(scaler.transform(xs), ys)
            self.heads[(key, c, part)] = (scaler, clf)
        return self.heads[(key, c, part)]

    def row(self, key, train_views, val_views, test_views) -> dict[str, float]:
        """Pick C on val (probabilities averaged over ``val_views``), refit on all, test likewise."""
        def predict(scaler_clf, views, rows):
            scaler, clf = scaler_clf
            prob = np.mean([clf.predict_proba(scaler.transform(v[rows])) for v in views], axis=0)
            return prob.argmax(axis=1)

        y_val = self.y_train[self.val_idx]
        val = {c: accuracy_score(y_val, predict(self.head(key, c, "fit", train_views), val_views,
                                                self.val_idx)) for c in C_GRID}
        best = max(C_GRID, key=lambda c: (val[c], -c))  # ties: the stronger regularisation
        pred = predict(self.head(key, best, "all", train_views), test_views, np.arange(len(self.y_test)))
        return {"C": best, "val_acc": val[best], "n_val": len(y_val),
                "test_acc": accuracy_score(self.y_test, pred), "n_test": len(pred),
                "test_right": int((pred == self.y_test).sum()),
                "test_f1": f1_score(self.y_test, pred, average="macro")}


def base_block5(views: Views, split: str, n: int, squash_cache: str) -> np.ndarray:
    """Block-5 features of the original images: this run's cache, else ``resize_modes``' squash cache."""
    if (Path(views.args.cache_dir) / f"view_orig_{split}.npz").is_file() or not Path(squash_cache).is_file():
        return aligned(views.get("orig", split), n, "5")
    old = np.load(squash_cache)
    assert len(old[f"y_{split}"]) == n, "the squash cache dropped images; rerun without it"
    return old[f"x_{split}"]


def run_step(step: str, views: Views, proxy: Proxy, n_tr: int, n_te: int, squash_cache: str):
    """The rows of one step: (name, cost, train views, val views, test views)."""
    o_tr, o_te = (base_block5(views, s, n, squash_cache) for s, n in (("training", n_tr), ("test", n_te)))
    val_flip = lambda b: aligned(views.get("flip", "training", proxy.val_idx), n_tr, b)  # noqa: E731
    te_flip = lambda b: aligned(views.get("flip", "test"), n_te, b)  # noqa: E731
    if step == "flip":
        return [("baseline: block5, original", "1 / 1", [o_tr], [o_tr], [o_te]),
                ("TTA orig+flip", "1 / 2", [o_tr], [o_tr, val_flip("5")], [o_te, te_flip("5")])]
    if step == "crop":
        v_crop = aligned(views.get("crop", "training", proxy.val_idx), n_tr, "5")
        t_crop = aligned(views.get("crop", "test"), n_te, "5")
        return [("TTA orig+crop87.5", "1 / 2", [o_tr], [o_tr, v_crop], [o_te, t_crop]),
                ("TTA orig+flip+crop87.5", "1 / 3", [o_tr], [o_tr, val_flip("5"), v_crop],
                 [o_te, te_flip("5"), t_crop])]
    if step in ("k2", "k4"):
        k = int(step[1])
        augs = [aligned(views.get(f"aug{i}", "training"), n_tr, "5") for i in range(1, k + 1)]
        return [(f"train orig+{k} aug views", f"{1 + k} / 1", [o_tr, *augs], [o_tr], [o_te]),
                (f"train orig+{k} aug views, TTA flip", f"{1 + k} / 2", [o_tr, *augs],
                 [o_tr, val_flip("5")], [o_te, te_flip("5")])]
    tr = {b: aligned(views.get("orig", "training"), n_tr, b) for b in ("4", "45")}
    te = {b: aligned(views.get("orig", "test"), n_te, b) for b in ("4", "45")}
    return [("block4 alone", "1 / 1", [tr["4"]], [tr["4"]], [te["4"]]),
            ("concat block4+block5", "1 / 1", [tr["45"]], [tr["45"]], [te["45"]]),
            ("concat block4+block5, TTA flip", "1 / 2", [tr["45"]], [tr["45"], val_flip("45")],
             [te["45"], te_flip("45")])]


def print_table(rows: dict[str, dict], passes: list) -> None:
    print("\n| mode | best C | val acc | test acc (right/n) | test macro-F1 | backbone passes "
          "(training / per test image) |\n| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['C']:g} | {r['val_acc']:.4f} | {r['test_acc']:.4f} "
              f"({r['test_right']}/{r['n_test']}) | {r['test_f1']:.4f} | {r['cost']} |")
    if rows:
        r = next(iter(rows.values()))
        print(f"\nval {r['n_val']} images (15% of training/), test {r['n_test']} images")
    print("passes this run: " + "; ".join(f"{v}/{s} {n} img {t:.0f} s ({t / n:.3f} s/img)"
                                          for v, s, n, t in passes), flush=True)


def main() -> None:
    parser = proxy_arguments(__doc__.splitlines()[0], "/tmp/h19/views", "where view_<name>_<split>.npz are kept")
    parser.add_argument("--squash-cache", default="/tmp/h19/pad/feat_squash.npz",
                        help="resize_modes.py's squash features, reused for block 5 of the originals")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list, in order, of {STEPS}")
    args = parser.parse_args()
    if args.backbone not in ("vgg16", "vgg19"):
        parser.error(f"--backbone {args.backbone}: the taps {TAPS} exist in vgg16/vgg19 only")

    data = Path(args.data)
    classes = sorted(p.name for p in (data / "training").iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = {split: list_split(data / split, classes) for split in ("training", "test")}
    config = resolve(None, {"data": {"image_size": args.image_size},
                            "model": {"backbone": args.backbone, "weights": args.weights},
                            "augment": {"enabled": False}, "train": {"seed": args.seed}})
    views = Views(args, tap_extractor(build_classifier(config, len(classes))), splits,
                  resolve(None, {"train": {"seed": args.seed}}))
    n_tr, n_te = len(splits["training"][0]), len(splits["test"][0])
    proxy = Proxy(args.seed, splits["training"][1], splits["test"][1])
    print(f"{args.backbone} at {args.image_size} px squash, {len(classes)} classes, {n_tr} training and "
          f"{n_te} test files, seed {args.seed}; augment {views.config.augment}", flush=True)

    rows: dict[str, dict] = {}
    for step in args.steps.split(","):
        for name, cost, tr, va, te in run_step(step, views, proxy, n_tr, n_te, args.squash_cache):
            rows[name] = {**proxy.row(name, tr, va, te), "cost": cost}
        passes = [(p.name.split("_")[1], p.stem.split("_")[2], len(d["y"]), float(d["seconds"]))
                  for p in sorted(Path(args.cache_dir).glob("view_*.npz")) for d in [np.load(p)]]
        print(f"\n== after step {step}", end="")
        print_table(rows, passes)


if __name__ == "__main__":
    main()
