"""Stable, seeded, stratified and group-aware train/val/test splits."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from jewelclf.data.sources import Record


def _rank(seed: int, unit: str) -> str:
    return hashlib.sha256(f"{seed}\x00{unit}".encode()).hexdigest()


def _carve_count(n_units: int, fraction: float) -> int:
    if fraction <= 0 or n_units < 3:
        return 0
    return max(1, round(n_units * fraction))


def assign_splits(records: list[Record], seed: int, val_fraction: float,
                  test_fraction: float = 0.0) -> list[Record]:
    """Give every record a split, carving val (and test) out of train when DATA has none.

    The unit of splitting is the record's group (e.g. a SKU) when it has one, else the file.
    Units are ranked by a seeded hash of their key, per class, so the split is stratified, the
    same for the same data and seed on any machine, and photos of one group never straddle
    splits. A group's class is the most common label among its photos.
    """
    records = [r if r.split else replace(r, split="train") for r in records]
    present = {r.split for r in records}
    carve = []
    if "test" not in present and test_fraction > 0:
        carve.append(("test", test_fraction))
    if "val" not in present and val_fraction > 0:
        carve.append(("val", val_fraction))
    if not carve:
        return records

    def unit_of(r: Record) -> str:
        return f"group:{r.group}" if r.group else f"file:{r.key}"

    unit_labels: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r.split == "train":
            unit_labels[unit_of(r)][r.label] += 1
    by_class: dict[str, list[str]] = defaultdict(list)
    for unit, labels in unit_labels.items():
        label = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        by_class[label].append(unit)

    target: dict[str, str] = {}
    for units in by_class.values():
        units.sort(key=lambda u: _rank(seed, u))
        start = 0
        for split, fraction in carve:
            n = _carve_count(len(units), fraction)
            for u in units[start:start + n]:
                target[u] = split
            start += n
    return [replace(r, split=target.get(unit_of(r), "train")) if r.split == "train" else r
            for r in records]


def write_manifest(records: list[Record], path: Path) -> None:
    """The split manifest: one row per usable example, with its split, label and group."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "group"])
        for r in sorted(records, key=lambda r: (r.split or "", r.label, r.key)):
            w.writerow([r.key, r.label, r.split, r.group or ""])
    tmp.replace(path)
