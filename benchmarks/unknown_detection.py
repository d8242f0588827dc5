"""Leave-one-class-out unknown detection on a folder dataset (issue 18).

For each class in turn: a softmax head is trained on the frozen backbone's pooled features of
the other classes' training photos; the test photos of the other classes are the known
images and the held-out class's test photos the unknown ones. Prints, per score (max-softmax,
energy, k-NN cosine distance, Mahalanobis), the AUROC and FPR at 95% TPR for each held-out
class, their mean and worst, and the known images' accuracy.

    python benchmarks/unknown_detection.py ../shared/data/jewellery --backbone vgg16 \
        --weights ../shared/weights/vgg16_imagenet_notop.weights.h5 --cache /tmp/vgg16_features.npz

The features are computed once (the slow part: one pass of the backbone over every photo) and
cached in ``--cache``; the head is scikit-learn's multinomial logistic regression on
standardised features (stage 1's linear softmax head, fitted exactly rather than by Adam).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def features(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    cache = Path(args.cache) if args.cache else None
    if cache and cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return z["x"], z["label"], z["split"], [str(c) for c in z["classes"]]
    import tensorflow as tf

    from jewelclf import config as config_mod
    from jewelclf.data.pipeline import decoded_dataset
    from jewelclf.data.sources import load_source
    from jewelclf.modeling.classifier import build_classifier, feature_extractor

    config = config_mod.resolve(overrides={"model": {"backbone": args.backbone, "weights": args.weights},
                                           "data": {"image_size": args.image_size}})
    source = load_source(args.data)
    records = [r for r in source.records if r.split in ("train", "test")]
    extractor = feature_extractor(build_classifier(config, len(source.class_names)))
    ds = decoded_dataset(source, records, config.data, config.data.image_size).map(lambda x, _: x)
    start = time.perf_counter()
    x = extractor.predict(ds.batch(32).prefetch(tf.data.AUTOTUNE), verbose=0)
    print(f"features of {len(records)} photos in {time.perf_counter() - start:.0f} s")
    classes = sorted(source.class_names)
    label = np.array([classes.index(r.label) for r in records])
    split = np.array([r.split for r in records])
    if cache:
        np.savez(cache, x=x, label=label, split=split, classes=np.array(classes))
    return x, label, split, classes


def held_out_scores(x, label, split, held: int) -> tuple[dict[str, dict[str, float]], float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from jewelclf.evaluation import unknown

    train = (split == "train") & (label != held)
    known, novel = (split == "test") & (label != held), (split == "test") & (label == held)
    scaler = StandardScaler().fit(x[train])
    head = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(x[train]), label[train])
    probs = {name: head.predict_proba(scaler.transform(x[mask])) for name, mask in
             (("known", known), ("novel", novel))}
    logits = {name: head.decision_function(scaler.transform(x[mask])) for name, mask in
              (("known", known), ("novel", novel))}
    accuracy = float((head.classes_[probs["known"].argmax(1)] == label[known]).mean())
    gauss = unknown.Gaussians.fit(x[train], label[train])
    scores = {
        "max_softmax": (unknown.max_softmax(probs["known"]), unknown.max_softmax(probs["novel"])),
        "energy": (unknown.energy(logits["known"]), unknown.energy(logits["novel"])),
        "knn": (unknown.knn_distance(x[train], x[known]), unknown.knn_distance(x[train], x[novel])),
        "mahalanobis": (gauss.distance(x[known]), gauss.distance(x[novel])),
    }
    return {name: unknown.detection_metrics(k, n) for name, (k, n) in scores.items()}, accuracy


def combination(x, label, split, seed: int = 0) -> None:
    """The larger of the k-NN and energy scores, each standardised on 15% of the training photos
    held out as validation (the single scores on the remaining 85% beside it)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from jewelclf.evaluation import unknown

    held_val = np.random.default_rng(seed).random(len(x)) < 0.15
    aurocs: dict[str, list[float]] = {}
    for held in np.unique(label):
        train = (split == "train") & (label != held) & ~held_val
        val = (split == "train") & (label != held) & held_val
        known, novel = (split == "test") & (label != held), (split == "test") & (label == held)
        scaler = StandardScaler().fit(x[train])
        head = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(x[train]), label[train])

        v, k, n = ({"energy": unknown.energy(head.decision_function(scaler.transform(x[mask]))),
                    "knn": unknown.knn_distance(x[train], x[mask])} for mask in (val, known, novel))
        y = np.r_[np.zeros(known.sum()), np.ones(novel.sum())]
        combined = {m: np.max([(s[c] - v[c].mean()) / v[c].std() for c in v], axis=0) for m, s in
                    (("k", k), ("n", n))}
        for name, (a, b) in {"knn": (k["knn"], n["knn"]), "energy": (k["energy"], n["energy"]),
                             "max(knn, energy)": (combined["k"], combined["n"])}.items():
            aurocs.setdefault(name, []).append(float(roc_auc_score(y, np.r_[a, b])))
    for name, values in aurocs.items():
        print(f"{name} (85% of training): mean AUROC {np.mean(values):.3f}, worst {np.min(values):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cache", default="")
    parser.add_argument("--combination", action="store_true",
                        help="also score max(k-NN, energy), standardised on a validation hold-out")
    args = parser.parse_args()
    x, label, split, classes = features(args)
    if args.combination:
        combination(x, label, split)
    table: dict[str, list[dict[str, float]]] = {}
    print("| held-out class | known accuracy | " + " | ".join(f"{s} AUROC / FPR95" for s in
                                                            ("max_softmax", "energy", "knn", "mahalanobis")) + " |")
    print("| --- " * 6 + "|")
    for held, name in enumerate(classes):
        scores, accuracy = held_out_scores(x, label, split, held)
        for s, m in scores.items():
            table.setdefault(s, []).append(m)
        print(f"| {name} | {accuracy:.3f} | " + " | ".join(
            f"{scores[s]['auroc']:.3f} / {scores[s]['fpr_at_95_tpr']:.3f}" for s in table) + " |")
    for s, rows in table.items():
        au = [r["auroc"] for r in rows]
        print(f"{s}: mean AUROC {np.mean(au):.3f}, worst {np.min(au):.3f}; mean FPR95 "
              f"{np.mean([r['fpr_at_95_tpr'] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
