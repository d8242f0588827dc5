"""``jewelclf evaluate``: which of a run's images are scored, the model's predictions on them,
and the evaluation folder (``metrics.json``, predictions, plots); also the calibration ``fit``
fits on the validation split. What the predictions score is :mod:`jewelclf.evaluation.metrics`.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf.data.sources import data_key
from jewelclf.errors import JewelclfError
from jewelclf.evaluation import calibration as calibration_mod
from jewelclf.evaluation import reference as reference_mod
from jewelclf.evaluation import unknown_eval
from jewelclf.evaluation.calibration import Calibration
from jewelclf.evaluation.metrics import score
from jewelclf.layout import METRICS

RELIABILITY_PNG = "reliability_diagram.png"
COVERAGE_PNG = "coverage_accuracy.png"


def calibrate_run(model, data, config, run_dir: Path, log=print,
                  stage1_features: tuple[np.ndarray, np.ndarray] | None = None) -> Calibration:
    """Fit the temperature and the review threshold (for ``train.target_accuracy``) on the
    validation split of ``data`` (a ``PreparedData``), and the unknown reference on its train
    and val images; write both into the run.

    ``stage1_features`` (stage 1's frozen-backbone features of train and val) stand in for a
    pass over the training images when the model's val features still equal them, i.e. when
    no stage-2 step changed the backbone."""
    from jewelclf.runs import CALIBRATION, UNKNOWN_REFERENCE

    y_val = labels_of(data.val, data.class_names)
    probs, val_features = reference_mod.model_features(model, data.source, data.val, config)
    calibration = calibration_mod.calibrate(probs, y_val, config.train.target_accuracy)
    calibration_mod.write(Path(run_dir) / CALIBRATION, calibration)
    log(calibration.describe())
    if stage1_features is not None and stage1_features[1].shape == val_features.shape and np.allclose(
            stage1_features[1], val_features, rtol=1e-4, atol=1e-5):
        train_features = stage1_features[0]
    else:
        _, train_features = reference_mod.model_features(model, data.source, data.train, config)
    reference = reference_mod.from_features(train_features, val_features)
    reference_mod.write(Path(run_dir) / UNKNOWN_REFERENCE, reference)
    log(reference.describe_line())
    return calibration


def write_evaluation(metrics: dict[str, Any], out_dir: Path, predictions: list[dict[str, Any]],
                     title: str = "") -> None:
    """Write ``metrics.json``, ``confusion_matrix.png`` and ``predictions.csv`` into ``out_dir``;
    with :func:`score`'s fields also ``reliability_diagram.png`` and ``coverage_accuracy.png``."""
    from jewelclf.evaluation import plots
    from jewelclf.fsio import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / METRICS, metrics)
    cm = np.array(metrics["confusion_matrix"]["matrix"])
    plots.confusion_matrix(cm, metrics["confusion_matrix"]["class_names"],
                           out_dir / "confusion_matrix.png", title=title)
    if "ece" in metrics:
        plots.reliability_diagram(metrics, out_dir / RELIABILITY_PNG, title=title)
        plots.coverage_accuracy(metrics["coverage"], out_dir / COVERAGE_PNG, title=title)
    if predictions:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(predictions[0]))
        w.writeheader()
        w.writerows(predictions)
        atomic_write_text(out_dir / "predictions.csv", buf.getvalue())


def labels_of(records, class_names: list[str]) -> np.ndarray:
    """The class indices of ``records``' labels."""
    index = {c: i for i, c in enumerate(class_names)}
    return np.array([index[r.label] for r in records], dtype=int)


def predict_records(model, source, records, class_names: list[str], config) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` over ``records`` (no augmentation); return true indices and probabilities."""
    from jewelclf.data.pipeline import evaluation_batches

    y_true = labels_of(records, class_names)
    if not records:  # never run the model on zero rows
        return y_true, np.zeros((0, len(class_names)), np.float32)
    probs = model.predict(evaluation_batches(source, records, config.data, len(class_names)), verbose=0)
    return y_true, probs


def tta_predictions(model, source, records, class_names: list[str], config, tta: str,
                    features: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """True indices, raw probabilities and (with ``features``) pooled features of ``records``,
    in one pass; ``tta="flip"`` averages the probabilities over a horizontal flip
    (:func:`jewelclf.modeling.tta.flip_tta`; its features are the unflipped pixels', which the
    run's unknown reference was built from). ``tta="none"`` is the plain pass of before."""
    from jewelclf.data.pipeline import evaluation_batches
    from jewelclf.modeling.tta import NONE, scoring_model

    if tta == NONE and features:
        return labels_of(records, class_names), *reference_mod.model_features(model, source, records, config)
    if tta == NONE:
        return *predict_records(model, source, records, class_names, config), None
    y_true = labels_of(records, class_names)
    if not records:  # never run the model on zero rows
        return y_true, np.zeros((0, len(class_names)), np.float32), None
    out = scoring_model(model, tta, with_features=features).predict(
        evaluation_batches(source, records, config.data, len(class_names)), verbose=0)
    if not features:
        return y_true, np.asarray(out), None
    return y_true, np.asarray(out["probabilities"]), np.asarray(out["features"], np.float32)


def format_summary(metrics: dict[str, Any]) -> str:
    """``evaluate``'s printed report (:func:`jewelclf.evaluation.metrics.format_report`), with
    the test-time augmentation the probabilities were scored with, when there was one."""
    from jewelclf.evaluation.metrics import format_report
    from jewelclf.modeling.tta import NONE, VIEWS

    text = format_report(metrics)
    tta = metrics.get("tta", NONE)
    if tta == NONE:
        return text
    return (f"{text}\ntest-time augmentation: {tta} (probabilities averaged over {VIEWS[tta]} passes "
            f"per image, then calibrated with the run's temperature)")


def prediction_rows(records, y_true, probs, class_names) -> list[dict[str, Any]]:
    pred = probs.argmax(axis=1)
    return [{"path": r.key, "label": r.label, "predicted": class_names[p],
             "confidence": f"{probs[i, p]:.4f}", "correct": int(p == y_true[i])}
            for i, (r, p) in enumerate(zip(records, pred))]


@dataclass
class Selection:
    """The images an evaluation scores, and where their split came from."""

    records: list
    split: str
    """``train``, ``val``, ``test``, or ``all`` (DATA has no splits and is not the run's data)."""
    from_run: bool
    """Whether the split is the run's own (``splits.csv``): DATA is the data the run trained on."""
    training_paths: frozenset[str] = frozenset()
    """The files of the run's training split (absolute paths), to count among those scored."""

    def describe(self, scored: list) -> dict[str, Any]:
        """The ``metrics.json`` fields that say what was scored (``scored``: the readable records)."""
        keys = "\n".join(sorted(r.key for r in scored))
        trained_on = sum(r.path in self.training_paths for r in scored)
        out: dict[str, Any] = {
            "split": self.split,
            "split_source": "run" if self.from_run else "data",
            "files_sha256": hashlib.sha256(keys.encode("utf-8")).hexdigest(),
            "trained_on": trained_on,
        }
        if trained_on:
            out["warning"] = (f"{trained_on} of these {len(scored)} images trained the run: the "
                              f"figures measure how well it fits them, not how it does on new photos")
        return out


def _run_split_rows(run_dir: Path) -> dict[str, str]:
    from jewelclf.runs import read_splits

    return {row["path"]: row["split"] for row in read_splits(run_dir)}


def _rejected_paths(run_dir: Path) -> set[str]:
    from jewelclf.runs import REJECTED

    path = run_dir / REJECTED
    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8") as f:
        return {row["path"] for row in csv.DictReader(f)}


def is_run_data(run_dir: Path, info: dict[str, Any], source, run_splits: dict[str, str]) -> bool:
    """Whether ``source`` is the data the run trained on: the same path, or the same files
    (every file of the run's ``splits.csv``, and nothing else but files ``fit`` rejected)."""
    if info.get("data_path") and data_key(source.spec) == info["data_path"]:
        return True
    if not run_splits:
        return False
    keys = {r.key for r in source.records}
    rejected = _rejected_paths(run_dir)
    extra = {r.key for r in source.records if r.key not in run_splits and r.path not in rejected}
    return set(run_splits) <= keys and not extra


def choose_records(run_dir: Path, info: dict[str, Any], source, split: str | None) -> Selection:
    """The records of ``source`` to score.

    On the run's own data (see :func:`is_run_data`) the split is the run's, from ``splits.csv``:
    ``test`` by default, ``val`` when the run has no test split, and ``train`` only when asked
    (the report then says that these images trained the model). On other data, DATA's own
    ``split`` is used (default ``test`` when it has one, else every image).
    """
    run_splits = _run_split_rows(run_dir)
    root = info.get("data_path")
    trained = frozenset(str(Path(root) / k) for k, s in run_splits.items()
                        if s == "train") if root and source.tfds is None else frozenset()
    if is_run_data(run_dir, info, source, run_splits):
        present = set(run_splits.values())
        name = split or ("test" if "test" in present else "val")
        records = [replace(r, split=run_splits[r.key]) for r in source.records
                   if run_splits.get(r.key) == name]
        if not records:
            raise JewelclfError(f"the run in '{run_dir}' has no {name} split in its "
                                f"{run_dir / 'splits.csv'}; present: {', '.join(sorted(present))}")
        return Selection(records, name, True, frozenset(r.path for r in records if r.split == "train"))
    records = source.records
    present = {r.split for r in records} - {None}
    if split:
        records = [r for r in records if r.split == split]
        if not records:
            raise JewelclfError(f"'{source.spec}' has no {split} split; present: "
                                f"{', '.join(sorted(present)) or 'none'}")
        return Selection(records, split, False, trained)
    if "test" in present:
        return Selection([r for r in records if r.split == "test"], "test", False, trained)
    return Selection(records, "all", False, trained)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_")[-80:] or "data"


def default_output(run_dir: Path, data_spec: str, split: str) -> Path:
    """``RUN_DIR/evaluations/<split>_<data folder name>``, e.g. ``test_jewellery``: a name
    ``ls`` shows. Another DATA of the same name gets ``_2``, ``_3``, ... rather than
    replacing that evaluation; the same DATA again replaces its own."""
    if data_spec.startswith("tfds:"):
        name = data_spec[len("tfds:"):].split(":")[0]
    else:
        path = Path(data_spec).expanduser().resolve()
        name = path.stem if path.suffix.lower() == ".csv" else path.name
    base = run_dir / "evaluations" / slug(f"{split}_{name}")
    key = data_key(data_spec)
    for n in itertools.count(1):
        out = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            held = json.loads((out / METRICS).read_text(encoding="utf-8")).get("data_key")
        except (OSError, ValueError, AttributeError):
            held = None
        if not out.exists() or held == key or (held is None and not any(out.iterdir())):
            return out
    raise AssertionError("unreachable")


def evaluate_run(run_dir: Path, data_spec: str, output: Path | None = None,
                 split: str | None = None, unknown: Path | None = None,
                 tta: str = "none") -> tuple[dict[str, Any], Path]:
    """Evaluate a finished run's model on ``data_spec``; write the report; return it and its folder.

    The data's classes must be among the run's classes. Which images are scored is
    :func:`choose_records`'s choice: on the run's own data, its recorded ``test`` (or ``val``)
    split, never its training images unless ``split="train"`` asks; ``metrics.json`` records
    the split, its source, the number of images and a fingerprint of their list. Unreadable
    files are reported in ``rejected_files.csv`` and left out. The probabilities scored and
    written are calibrated with the run's temperature (:func:`score`); a run without a
    calibration file is scored as it is, and the report says so. ``unknown``: a folder of photos
    of untrained classes, scored against the known images under ``metrics["unknown"]``
    (:mod:`jewelclf.evaluation.unknown_eval`). ``tta="flip"`` scores the probabilities averaged
    over a horizontal flip (:func:`tta_predictions`), calibrated, scored and written like the
    plain ones; ``metrics.json`` records ``tta``.
    """
    from jewelclf.data.pipeline import tfds_bytes
    from jewelclf.data.sources import load_source
    from jewelclf.data.validate import check_records, write_rejected
    from jewelclf.evaluation.plots import confusion_title
    from jewelclf.modeling.tta import check_mode
    from jewelclf.runs import load_run

    check_mode(tta)
    run_dir = Path(run_dir)
    # The model is loaded before DATA is read: a corrupt model must not cost a pass over every image.
    run = load_run(run_dir, instead="evaluate another run")
    info, config, class_names, model, calibration = run.info, run.config, run.class_names, run.model, run.calibration
    source = load_source(data_spec)
    source.refuse_conflicts()  # one image under two labels cannot be scored
    plan = unknown_eval.prepare(unknown, run, source) if unknown is not None else None
    chosen = choose_records(run_dir, info, source, split)
    records = chosen.records
    untrained = sorted({r.label for r in records} - set(class_names))
    if untrained:
        raise JewelclfError(
            f"'{data_spec}' has class(es) {', '.join(untrained)} that the model in '{run_dir}' was "
            f"not trained on (it knows {', '.join(class_names)}); remove or rename them"
        )
    source.class_names = class_names
    if plan is not None:
        plan.load_training(source if chosen.from_run else None)
    out_dir = Path(output) if output else default_output(run_dir, data_spec, chosen.split)
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = check_records(records, config.data.max_pixels, config.data.min_image_side,
                           config.data.check_workers,
                           read_bytes=tfds_bytes(source) if source.tfds else None)
    n_rejected = write_rejected(checks, out_dir / "rejected_files.csv")
    records = [c.record for c in checks if c.ok]
    if not records:
        raise JewelclfError(f"no readable images in '{data_spec}'; see {out_dir / 'rejected_files.csv'}")
    if plan is not None:
        plan.check_photos(config.data, out_dir)
    # with --unknown, the pooled features too, in the same pass
    y_true, raw, features = tta_predictions(model, source, records, class_names, config, tta, plan is not None)
    metrics, probs = score(y_true, raw, class_names, config.train.top_k, calibration)
    metrics["tta"] = tta
    if calibration is None:
        metrics["calibration_note"] = calibration_mod.MISSING_NOTE.format(run=run_dir)
    metrics["data"] = data_spec
    metrics["data_key"] = data_key(data_spec)
    metrics.update(chosen.describe(records))
    metrics["rejected_files"] = n_rejected
    if plan is not None:
        metrics["unknown"] = plan.evaluate(records, features, y_true, probs, out_dir)
    write_evaluation(metrics, out_dir, prediction_rows(records, y_true, probs, class_names),
                     title=confusion_title(run_dir.name, chosen.split, len(records),
                                           data=None if chosen.from_run else data_spec))
    return metrics, out_dir
