"""Real images of a run, for the export checks: parity images, int8 samples, a labelled test set.

The images are read from the run's data (its split manifest first) or from ``--parity-data`` /
``--test-data``, and checked with the training data check under the run's limits, so an export
is checked only on images training would have accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from jewelclf.errors import JewelclfError
from jewelclf.runs import RunModel, read_splits


@dataclass
class LabelledImage:
    """One image of the run's data: its key, class name and encoded bytes."""

    key: str
    label: str
    data: bytes


def _round_robin(rows: list, label_of: Callable[[Any], str], n: int) -> list:
    """Up to ``n`` items, taking one of each label in turn (stable, deterministic)."""
    by_label: dict[str, list] = {}
    for r in rows:
        by_label.setdefault(label_of(r), []).append(r)
    out: list = []
    queues = [by_label[k] for k in sorted(by_label)]
    i = 0
    while len(out) < n and any(i < len(q) for q in queues):
        for q in queues:
            if i < len(q) and len(out) < n:
                out.append(q[i])
        i += 1
    return out


def _read_records(source, records, cfg) -> list[tuple[Any, bytes | None, str]]:
    """(record, bytes or None, reason) for each record, checked with the training data check
    under ``cfg`` (the run's :class:`jewelclf.config.DataConfig`: its pixel and side limits)."""
    from jewelclf.data.pipeline import tfds_bytes
    from jewelclf.data.validate import check_records

    if source.tfds is not None:
        pairs = list(tfds_bytes(source)(records))
        from jewelclf.data.validate import check_bytes

        return [(r, b, "") if check_bytes(r, b, cfg.max_pixels, cfg.min_image_side).ok
                else (r, None, "unreadable") for r, b in pairs]
    checks = check_records(records, cfg.max_pixels, cfg.min_image_side, cfg.check_workers)
    out = []
    for c in checks:
        if not c.ok:
            out.append((c.record, None, c.reason))
            continue
        with open(c.record.path, "rb") as f:
            out.append((c.record, f.read(), ""))
    return out


def run_images(run: RunModel, splits: Iterable[str], n: int, data_spec: str | None = None) -> list[LabelledImage]:
    """Up to ``n`` readable images of the run's data, from the first of ``splits`` that has any,
    spread over the classes. ``data_spec`` overrides the run's data (all of it is used)."""
    from jewelclf.data.sources import load_source

    if data_spec is not None:
        source = load_source(data_spec)
        candidates = [r for r in source.records if r.label in run.class_names]
    else:
        source = run.training_source("pass --parity-data DATA with a few labelled images")
        by_key = {r.key: r for r in source.records}
        rows = read_splits(run.run_dir)
        candidates = []
        for split in splits:
            chosen = [by_key[r["path"]] for r in rows if r.get("split") == split and r.get("path") in by_key]
            if chosen:
                candidates = chosen
                break
        if not candidates:  # no split manifest: any record of the data
            candidates = [r for r in source.records if r.label in run.class_names]
    picked = _round_robin(candidates, lambda r: r.label, max(n * 2, n + 4))
    out = []
    for rec, data, _ in _read_records(source, picked, run.config.data):
        if data is not None and len(out) < n:
            out.append(LabelledImage(rec.key, rec.label, data))
    if not out:
        raise JewelclfError(f"no readable images found in the data of '{run.run_dir}' for the "
                            f"export checks; pass --parity-data DATA with a few labelled images")
    return out


def labelled_test_images(spec: str, class_names: list[str],
                         data_cfg) -> tuple[list[Any], list[bytes], np.ndarray, int]:
    """Readable records of ``spec`` (its test split if it has one), their bytes and labels,
    checked under ``data_cfg`` (the run's data limits)."""
    from jewelclf.data.sources import load_source

    source = load_source(spec)
    source.refuse_conflicts()
    records = source.records
    if "test" in {r.split for r in records}:
        records = [r for r in records if r.split == "test"]
    unknown = sorted({r.label for r in records} - set(class_names))
    if unknown:
        raise JewelclfError(f"'{spec}' has class(es) {', '.join(unknown)} that the model was not "
                            f"trained on (it knows {', '.join(class_names)}); remove or rename them")
    read = _read_records(source, records, data_cfg)
    kept = [(r, b) for r, b, _ in read if b is not None]
    if not kept:
        raise JewelclfError(f"no readable images in '{spec}'")
    index = {c: i for i, c in enumerate(class_names)}
    y = np.array([index[r.label] for r, _ in kept], dtype=int)
    return [r for r, _ in kept], [b for _, b in kept], y, len(read) - len(kept)
