"""``jewelclf review RUN DATA --output DIR``: the images of a run most likely to be mislabelled.

Confident learning (Northcutt et al., through ``cleanlab``) needs, for every image, class
probabilities from a model that did not train on that image. Here they are out-of-fold: the
run's train and val images are cut into stratified folds (seeded by the run's seed), and a head
trained on the other folds predicts each one. The head reads the frozen backbone's pooled
features, the ones stage 1 of ``fit`` trained on: ``fit`` keeps them in
``checkpoints/stage1_features.npz`` (:data:`jewelclf.training.features.STAGE1_FEATURES`), so the folds
cost seconds. A run without them (stage 1 augmented, a multi-worker run, a run from before
they were kept) gets them computed here by the same code, with the run's configured backbone
and weights, and the review says so.

The stage-1 features are used, not the finished model's: its fine-tuned backbone has seen
every training label, the wrong ones included, and would vouch for them.

:func:`cleanlab.filter.find_label_issues` picks the suspects and ranks them by
``self_confidence``, the out-of-fold probability of the given label (the ``score`` column: low
is suspicious), which reads plainly ("the model gives this label 2%") and, on the jewellery
benchmark (``benchmarks/label_noise.py``), puts more flipped labels in the top N than
``normalized_margin`` or ``confidence_weighted_entropy`` (docs/review.md has the figures).

Near-duplicate images under different labels come from the data check's hashes
(:func:`jewelclf.data.fingerprint.duplicate_groups`), over every split of the run.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf import fsio
from jewelclf.errors import JewelclfError

Log = Callable[[str], None]

REVIEWED_SPLITS = ("train", "val")
"""The splits reviewed: the images the run learned from and chose its epochs on."""
ISSUES = "label_issues.csv"
SHEET = "label_issues.html"
CONFLICTS = "duplicate_label_conflicts.csv"
SUMMARY = "review.json"
OUTPUTS = (ISSUES, SHEET, CONFLICTS, SUMMARY)
HEADS = ("keras", "logistic")
RANKED_BY = "self_confidence"


def review_run(run_dir: Path, data_spec: str, output: Path, overwrite: bool = False,
               folds: int = 5, head: str = "keras", log: Log = print) -> dict[str, Any]:
    """Rank the train and val images of the finished run in ``run_dir`` by how likely their
    label is wrong; write :data:`OUTPUTS` into ``output``; return the summary (``review.json``).

    ``data_spec`` must be the data the run trained on. ``head`` is ``keras`` (the run's own
    head, trained with stage 1's learning rate for its epochs) or ``logistic`` (scikit-learn's
    logistic regression on standardised features): the Keras head finds more of the flipped
    labels on the benchmark.
    """
    from jewelclf import runs as rd
    from jewelclf.data.sources import load_source

    run_dir, output = Path(run_dir), Path(output)
    if head not in HEADS:
        raise JewelclfError(f"unknown head '{head}'; choose one of {', '.join(HEADS)}")
    if folds < 2:
        raise JewelclfError(f"--folds {folds}: out-of-fold predictions need at least 2 folds")
    info = rd.require_finished_run(run_dir)
    if info.get("status") != "finished":
        raise JewelclfError(f"the run in '{run_dir}' is {info.get('status', 'unknown')}, not "
                            f"finished; finish it (jewelclf fit --resume) before reviewing it")
    _require_free(output, overwrite)
    run = rd.load_run(run_dir, model=False)  # review's own status message above comes first
    config, class_names = run.config, run.class_names
    source = load_source(data_spec)
    source.refuse_conflicts()
    _refuse_output_in_data(output, source)
    rows = split_rows(run_dir)
    records = run_records(run_dir, info, source, rows, class_names)
    reviewed = [r for split in REVIEWED_SPLITS for r in records if r.split == split]
    t0 = time.perf_counter()
    features, feature_source = stage1_features(run_dir, config, source, reviewed, class_names, log)
    labels = np.array([class_names.index(r.label) for r in reviewed])
    folds = _usable_folds(labels, class_names, folds, log)
    probs = out_of_fold_probs(features, labels, len(class_names), folds, config, head)
    ranked, quality = rank_label_issues(labels, probs)
    t_rank = time.perf_counter() - t0
    conflicts = label_conflicts(records, config)
    issues = [{"path": reviewed[i].key, "given_label": reviewed[i].label,
               "suggested_label": class_names[int(np.argmax(probs[i]))],
               "score": round(float(quality[i]), 6), "split": reviewed[i].split,
               "file": reviewed[i].path} for i in ranked]
    summary = {
        "run": str(run_dir), "data": data_spec, "reviewed": len(reviewed),
        "reviewed_splits": list(REVIEWED_SPLITS), "label_issues": len(issues),
        "ranked_by": RANKED_BY, "head": head, "folds": folds, "seed": config.train.seed,
        "features": feature_source,
        "out_of_fold_accuracy": round(float((probs.argmax(1) == labels).mean()), 4),
        "duplicate_label_conflicts": len(conflicts), "seconds": round(t_rank, 1),
    }
    _write_outputs(output, issues, conflicts, summary, {r.key: r.path for r in records})
    return summary


def _require_free(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise JewelclfError(f"--output '{output}' is a file; give a folder for the review")
    taken = [n for n in OUTPUTS if (output / n).exists()]
    if taken and not overwrite:
        raise JewelclfError(f"'{output}' already holds a review ({', '.join(taken)}); pass "
                            f"--overwrite to replace it, or choose another --output")


def _refuse_output_in_data(output: Path, source) -> None:
    if source.root is None:
        return
    out, root = output.resolve(), Path(source.root).resolve()
    if out == root or root in out.parents:
        raise JewelclfError(f"--output '{output}' is inside DATA '{source.spec}': its files "
                            f"would become part of the data; choose a folder outside it")


def split_rows(run_dir: Path) -> dict[str, dict[str, str]]:
    """The rows of the run's ``splits.csv`` by path; a one-line error when it is unreadable."""
    from jewelclf.runs import SPLITS, read_splits

    rows = {row["path"]: row for row in read_splits(run_dir, ("path", "label", "split"))}
    if not rows:
        raise JewelclfError(f"'{run_dir / SPLITS}' is missing or unreadable; the run is incomplete, "
                            f"train it again")
    return rows


def run_records(run_dir: Path, info: dict[str, Any], source, rows: dict[str, dict[str, str]],
                class_names: list[str]) -> list:
    """The records of ``source`` that the run used (its ``splits.csv``), each with the run's
    split; a one-line error unless ``source`` is the run's data, with the labels it had."""
    from jewelclf.evaluation.evaluate import is_run_data

    if not is_run_data(run_dir, info, source, {k: r["split"] for k, r in rows.items()}):
        raise JewelclfError(
            f"'{source.spec}' is not the data the run in '{run_dir}' trained on (its "
            f"{run_dir / 'splits.csv'} lists {len(rows)} files); pass the DATA given to fit: "
            f"{info.get('data', 'see run_info.json')}")
    by_key = {r.key: r for r in source.records}
    moved = [k for k, r in rows.items() if k in by_key and by_key[k].label != r["label"]]
    if moved:
        k = moved[0]
        raise JewelclfError(
            f"{len(moved)} file(s) of '{source.spec}' carry another label than when the run "
            f"trained (e.g. {k}: {rows[k]['label']} then, {by_key[k].label} now); review the "
            f"data as it was, or fit a new run on the relabelled data")
    unknown = sorted({r["label"] for r in rows.values()} - set(class_names))
    if unknown:
        raise JewelclfError(f"'{run_dir / 'splits.csv'}' has labels {', '.join(unknown)} that "
                            f"class_names.json lacks; the run is incomplete, train it again")
    source.class_names = class_names
    return [replace(by_key[k], split=r["split"]) for k, r in rows.items() if k in by_key]


def stage1_features(run_dir: Path, config, source, records: list, class_names: list[str],
                    log: Log = print) -> tuple[np.ndarray, str]:
    """The frozen backbone's pooled features of ``records`` (in their order), and where they
    came from: the run's kept stage-1 features, or computed now with the run's backbone."""
    from jewelclf.training.features import STAGE1_FEATURES

    path = run_dir / STAGE1_FEATURES
    kept = _kept_features(path)
    if kept is not None and all(r.key in kept for r in records):
        return np.stack([kept[r.key] for r in records]), f"kept by fit ({path})"
    why = "has no kept stage-1 features" if kept is None else "kept features for other files"
    log(f"note: the run {why} ({path}); computing them with its backbone "
        f"({config.model.backbone}, weights {config.model.weights}) for {len(records)} images")
    return _computed_features(config, source, records, class_names), (
        f"computed by review with {config.model.backbone}, weights {config.model.weights}")


def _kept_features(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as f:
            keys = [*f["train_keys"].tolist(), *f["val_keys"].tolist()]
            vectors = np.concatenate([f["train"], f["val"]])
    except (OSError, ValueError, KeyError):
        return None
    if len(keys) != len(vectors) or not np.isfinite(vectors).all():
        return None
    return dict(zip(keys, vectors))


def _computed_features(config, source, records: list, class_names: list[str]) -> np.ndarray:
    import keras

    from jewelclf.data.pipeline import evaluation_batches
    from jewelclf.modeling.classifier import build_classifier, check_weights
    from jewelclf.training.features import frozen_features

    check_weights(config)
    keras.utils.set_random_seed(config.train.seed)  # the init of a weights: none backbone
    model = build_classifier(config, len(class_names))

    def ds(recs):
        return evaluation_batches(source, recs, config.data, len(class_names))

    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split != "train"]
    computed = frozen_features(model, ds(train), ds(val), sizes=(len(train), len(val)))
    by_key = dict(zip([r.key for r in train + val], np.concatenate(computed)))
    features = np.stack([by_key[r.key] for r in records])
    if not np.isfinite(features).all():
        raise JewelclfError(f"the backbone of '{config.model.backbone}' gave non-finite features; "
                            f"check its weights ({config.model.weights})")
    return features


def _usable_folds(labels: np.ndarray, class_names: list[str], folds: int, log: Log) -> int:
    counts = np.bincount(labels, minlength=len(class_names))
    fewest = int(counts.min())
    if fewest < 2:
        c = class_names[int(counts.argmin())]
        raise JewelclfError(f"class {c} has {fewest} reviewed image(s); out-of-fold predictions "
                            f"need at least 2 per class: add images of {c}")
    if fewest < folds:
        log(f"note: {folds} folds asked, but class {class_names[int(counts.argmin())]} has "
            f"{fewest} images; using {fewest} folds")
    return min(folds, fewest)


def out_of_fold_probs(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int,
                      config, head: str = "keras") -> np.ndarray:
    """``[n, num_classes]`` probabilities, each row from a head that never saw that image
    (stratified ``folds``-fold, shuffled with the run's seed)."""
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros((len(labels), num_classes), dtype=np.float64)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.train.seed)
    for fold, (fit_idx, held_idx) in enumerate(cv.split(features, labels)):
        fit = _keras_head if head == "keras" else _logistic_head
        probs[held_idx] = fit(features[fit_idx], labels[fit_idx], features[held_idx],
                              num_classes, config, fold)
    return probs


def _logistic_head(x, y, x_held, num_classes: int, config, fold: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x, y)
    out = np.zeros((len(x_held), num_classes))
    out[:, clf.classes_] = clf.predict_proba(x_held)  # a class absent from a fold gets 0
    return out


def _keras_head(x, y, x_held, num_classes: int, config, fold: int) -> np.ndarray:
    import keras

    from jewelclf.modeling.classifier import build_head

    keras.utils.set_random_seed(config.train.seed + fold)
    model = build_head(x.shape[1], num_classes, config.model.head_units, config.model.dropout)
    model.compile(keras.optimizers.Adam(config.train.stage1.learning_rate),
                  "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=config.train.stage1.epochs, batch_size=config.data.batch_size,
              verbose=0)
    return np.asarray(model.predict(x_held, verbose=0), dtype=np.float64)


def rank_label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's label issues, most suspicious first, and every image's label quality score
    (:data:`RANKED_BY`: the probability of its given label)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(labels, probs, return_indices_ranked_by=RANKED_BY, n_jobs=1)
    return np.asarray(ranked, dtype=int), get_label_quality_scores(labels, probs, method=RANKED_BY)


def label_conflicts(records: list, config) -> list[dict[str, Any]]:
    """Groups of byte- or near-identical images of the run that carry different labels (the
    groups of :func:`jewelclf.data.fingerprint.duplicate_groups`, any split)."""
    from jewelclf.data.fingerprint import duplicate_groups, fingerprint_records

    facts = fingerprint_records(records, True, config.data.check_workers, config.data.max_pixels)
    exact, near = duplicate_groups((r, facts[r]) for r in records if r in facts)
    return [g for g in exact + near if g["conflicting_labels"]]


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write_outputs(output: Path, issues: list[dict], conflicts: list[dict],
                   summary: dict[str, Any], files: dict[str, str]) -> None:
    from jewelclf.review.sheet import render_sheet

    columns = ["path", "given_label", "suggested_label", "score"]
    fsio.atomic_write_text(output / ISSUES, _csv_text(columns, [[i[c] for c in columns]
                                                              for i in issues]))
    fsio.atomic_write_text(output / CONFLICTS, _csv_text(
        ["group", "kind", "path", "split", "label"],
        [[n, g["kind"], f["file"], f["split"], f["label"]]
         for n, g in enumerate(conflicts, 1) for f in g["files"]]))
    fsio.atomic_write_text(output / SHEET, render_sheet(issues, conflicts, summary, files))
    fsio.atomic_write_json(output / SUMMARY, summary)


def format_summary(summary: dict[str, Any], output: Path) -> str:
    """What ``jewelclf review`` prints when it is done."""
    return (f"reviewed {summary['reviewed']} images ({'+'.join(summary['reviewed_splits'])}, "
            f"{summary['folds']}-fold {summary['head']} head, out-of-fold accuracy "
            f"{summary['out_of_fold_accuracy']:.3f}): {summary['label_issues']} likely label "
            f"issue(s), {summary['duplicate_label_conflicts']} near-duplicate group(s) under "
            f"different labels\n"
            f"wrote {output / ISSUES}, {output / SHEET}, {output / CONFLICTS}")


def read_issues(path: Path) -> list[dict[str, str]]:
    """The rows of a ``label_issues.csv`` (for scripts and the benchmark)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))

