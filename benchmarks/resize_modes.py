"""Resize modes compared on a stage-1 proxy: frozen-backbone features and a logistic regression.

For each ``data.resize`` mode (``squash``, ``crop``, ``pad``), every image of ``DATA/training``
and ``DATA/test`` is decoded and resized with :func:`jewelclf.data.images.load_image` in that
mode, and its GlobalAveragePooled features are computed by the frozen backbone that ``fit``
builds (:func:`jewelclf.modeling.classifier.build_classifier` with augmentation off, then
:func:`~jewelclf.modeling.classifier.feature_extractor`: the backbone's own preprocessing layer,
the base with the given weights file, the pooling). A scikit-learn ``LogisticRegression``
(``max_iter=2000``) is fitted on the features of ``training/``, with ``C`` chosen from
{0.1, 1, 10} on a stratified 15% validation split of ``training/``, then refitted on all of
``training/`` and scored on ``test/``. Prints one row a mode: validation accuracy (best C), test
accuracy, test macro-F1, and the seconds the features took. Features are cached per mode in
``--cache-dir`` (``feat_<mode>.npz``), so a rerun only refits.

Usage::

    python benchmarks/resize_modes.py --data ../shared/data/jewellery \\
        --weights ../shared/weights/vgg16_imagenet_notop.weights.h5 --backbone vgg16 \\
        --image-size 224 --modes squash,crop,pad --seed 0
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from jewelclf.config import resolve  # noqa: E402
from jewelclf.data.images import load_image  # noqa: E402
from jewelclf.modeling.classifier import build_classifier, feature_extractor  # noqa: E402

C_GRID = (0.1, 1.0, 10.0)


def list_split(folder: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Paths and integer labels of ``folder/<class>/*`` (hidden files skipped), sorted."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                paths.append(str(path))
                labels.append(label)
    return paths, np.array(labels)


def features(extractor, paths: list[str], labels: np.ndarray, size: int, mode: str):
    """Pooled features and labels of the images that decode (the others are dropped, counted)."""
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(lambda p, y: (load_image(tf.io.read_file(p), size, mode), y),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors().batch(32).prefetch(2)
    feats, kept = [], []
    for pixels, y in ds:
        feats.append(extractor(tf.cast(pixels, tf.float32), training=False).numpy())
        kept.append(y.numpy())
    return np.concatenate(feats), np.concatenate(kept)


def cached_features(args, extractor, splits, mode: str) -> dict[str, np.ndarray]:
    """Features of both splits for ``mode``, from the cache when it is there."""
    cache = Path(args.cache_dir) / f"feat_{mode}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    start = time.perf_counter()
    out = {}
    for split, (paths, labels) in splits.items():
        out[f"x_{split}"], out[f"y_{split}"] = features(extractor, paths, labels, args.image_size, mode)
        dropped = len(paths) - len(out[f"y_{split}"])
        if dropped:
            print(f"  {mode}: {dropped} image(s) of {split}/ did not decode and were dropped")
    out["seconds"] = np.array(time.perf_counter() - start)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def score(feat: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    """Pick C on a stratified 15% validation split of training/, refit on all of it, test."""
    x, y = feat["x_training"], feat["y_training"]
    x_fit, x_val, y_fit, y_val = train_test_split(x, y, test_size=0.15, stratify=y, random_state=seed)

    def fitted(c, xs, ys):
        scaler = StandardScaler().fit(xs)
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(scaler.transform(xs), ys)
        return lambda q: clf.predict(scaler.transform(q))

    val = {c: accuracy_score(y_val, fitted(c, x_fit, y_fit)(x_val)) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (val[c], -c))  # ties: the stronger regularisation
    pred = fitted(best, x, y)(feat["x_test"])
    return {"C": best, "val_acc": val[best], "test_acc": accuracy_score(feat["y_test"], pred),
            "test_f1": f1_score(feat["y_test"], pred, average="macro"),
            "seconds": float(feat["seconds"]), "n_train": len(y), "n_test": len(pred)}


def proxy_arguments(description: str, cache_dir: str, cache_help: str) -> argparse.ArgumentParser:
    """The flags both stage-1 proxy benchmarks take (this one and ``feature_views.py``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, help="folder with training/ and test/ class folders")
    parser.add_argument("--weights", required=True, help="the backbone's no-top weights file")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=cache_dir, help=cache_help)
    return parser


def main() -> None:
    parser = proxy_arguments(__doc__.splitlines()[0], "/tmp/h19/pad", "where feat_<mode>.npz are kept")
    parser.add_argument("--modes", default="squash,crop,pad")
    args = parser.parse_args()

    data = Path(args.data)
    classes = sorted(p.name for p in (data / "training").iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = {split: list_split(data / split, classes) for split in ("training", "test")}
    config = resolve(None, {"data": {"image_size": args.image_size},
                            "model": {"backbone": args.backbone, "weights": args.weights},
                            "augment": {"enabled": False}})
    extractor = feature_extractor(build_classifier(config, len(classes)))
    print(f"{args.backbone} at {args.image_size} px, {len(classes)} classes, "
          f"{len(splits['training'][0])} training and {len(splits['test'][0])} test files, seed {args.seed}")

    rows = {}
    for mode in args.modes.split(","):
        rows[mode] = score(cached_features(args, extractor, splits, mode), args.seed)
        print(f"  {mode}: done ({rows[mode]['seconds']:.0f} s of features)", flush=True)

    print("\n| mode | best C | val acc | test acc | test macro-F1 | features (s) |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        print(f"| {mode} | {r['C']:g} | {r['val_acc']:.4f} | {r['test_acc']:.4f} | {r['test_f1']:.4f} "
              f"| {r['seconds']:.0f} |")
    n = next(iter(rows.values()))
    print(f"\ntraining {n['n_train']} images (val split 15% of them), test {n['n_test']} images")


if __name__ == "__main__":
    main()
