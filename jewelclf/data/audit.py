"""The data check behind ``jewelclf check DATA``: what is wrong with a dataset, found in one pass.

:func:`check_data` reads every file once. The bytes go through the training data check
(:func:`jewelclf.data.validate.check_records`: header read with the decode-bomb guard, then a
full decode with the training decoder), and the same bytes are hashed on the way: a SHA-256 of
the content for byte-identical duplicates and, for files that decode, a perceptual hash for
near-identical ones (the same photo re-encoded, resized, or recoloured). The report holds:

- class counts per split and the imbalance of the training split;
- unreadable or unsupported files, each with the reason;
- files whose extension names another format than their content;
- byte-identical and near-identical duplicates, each group within one split or across
  splits, with the pairs that leak across splits named;
- images smaller than the backbone's input side (when a backbone or image size is given);
- photos with an EXIF orientation: jewelclf, like TensorFlow's decoders, uses the stored
  pixels as they are, while photo viewers turn them, so such a photo trains in another
  orientation than the one its owner saw.

The fingerprints and duplicate groups are those of :mod:`jewelclf.data.fingerprint`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from typing import Any

from jewelclf.config import DataConfig
from jewelclf.data.fingerprint import (
    HASH_DESCRIPTION,
    NEAR_DUPLICATE_DISTANCE,
    ORIENTATION,
    SPLIT_ORDER,
    Fingerprint,
    duplicate_groups,
    file_entry,
    fingerprint,
)
from jewelclf.data.sources import Record, load_source
from jewelclf.data.validate import FileCheck, check_records
from jewelclf.display import printable
from jewelclf.display import quote_name as _q
from jewelclf.errors import JewelclfError

_EXTENSION_FORMAT = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".pjpeg": "JPEG",
    ".png": "PNG", ".apng": "PNG", ".gif": "GIF", ".bmp": "BMP", ".dib": "BMP", ".webp": "WEBP",
    ".tif": "TIFF", ".tiff": "TIFF", ".heic": "HEIC", ".heif": "HEIC", ".avif": "AVIF",
    ".svg": "SVG", ".pdf": "PDF",
}

# ---------------------------------------------------------------- the whole check


def _extension_mismatch(c: FileCheck) -> dict | None:
    if not c.format or c.record.path.startswith("tfds:"):
        return None
    ext = os.path.splitext(c.record.path)[1].lower()
    named = _EXTENSION_FORMAT.get(ext)
    if named == c.format:
        return None
    return {"file": printable(c.record.key), "extension": printable(ext) or "(none)", "content": c.format}


def _imbalance(classes: dict[str, dict], class_names: list[str], split: str | None) -> dict | None:
    counts = {c: classes.get(c, {}).get(split or "all", 0) for c in class_names}
    if not counts:
        return None
    largest = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    smallest = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    return {
        "split": split or "all",
        "ratio": round(largest[1] / smallest[1], 2) if smallest[1] else None,
        "largest": {"class": largest[0], "count": largest[1]},
        "smallest": {"class": smallest[0], "count": smallest[1]},
        "empty_classes": sorted(c for c, n in counts.items() if n == 0),
    }


ERROR_KINDS = ("exact_groups_across_splits", "groups_with_conflicting_labels", "empty_classes")
"""Findings that are errors: what makes ``fit`` refuse the data (a byte-identical copy in two
splits, a class with no usable image) or is certainly wrong (one image under two labels). The
other findings are warnings: ``fit`` leaves unreadable files out, and trains on the rest as is."""


def check_data(spec: str, backbone: str | None = None, image_size: int | None = None,
               near_duplicate_distance: int | None = NEAR_DUPLICATE_DISTANCE,
               workers: int | None = None, max_pixels: int | None = None,
               min_side: int | None = None) -> dict[str, Any]:
    """Check every file of ``DATA`` and return the findings as JSON-serialisable data.

    ``image_size`` sets the input side below which images are listed as too small; without it,
    that check is skipped (``jewelclf check`` passes the resolved ``data.image_size``, which
    follows from the backbone). ``backbone`` is only named in the report's settings.
    ``max_pixels``, ``min_side`` and ``workers`` default to the ``data`` config.
    ``near_duplicate_distance=None`` skips near duplicates. ``report["clean"]`` is true when
    nothing was found; ``report["problems"]`` counts the findings by kind.
    """
    cfg = DataConfig()
    max_pixels = max_pixels or cfg.max_pixels
    min_side = min_side or cfg.min_image_side
    workers = workers or cfg.check_workers
    t0 = time.perf_counter()
    source = load_source(spec)
    checks, facts = _read_and_fingerprint(source, max_pixels, min_side, workers,
                                          near_duplicate_distance is not None)
    exact, near = duplicate_groups(((c.record, facts[c.record]) for c in checks if c.record in facts),
                                   near_duplicate_distance)
    elapsed = time.perf_counter() - t0
    ok = [c for c in checks if c.ok]
    findings = _findings(source, checks, ok, facts, image_size)
    findings["duplicates"] = {"exact": exact, "near": near}
    findings["leakage"] = [leak for g in exact + near for leak in g["leaks"]]
    problems = _problems(findings, source)
    settings = {
        "max_pixels": max_pixels, "min_side": min_side, "workers": workers,
        "backbone": backbone, "input_size": image_size,
        "near_duplicate_distance": near_duplicate_distance,
        "perceptual_hash": HASH_DESCRIPTION,
    }
    sides = sorted(min(c.width, c.height) for c in ok)
    return {
        "data": printable(spec),
        "files": len(checks),
        "usable": len(ok),
        "seconds": round(elapsed, 2),
        "files_per_second": round(len(checks) / elapsed, 1) if elapsed > 0 else None,
        "settings": settings,
        "notes": [printable(n) for n in source.notes],
        "splits": findings["splits"],
        "classes": findings["classes"],
        "imbalance": findings["imbalance"],
        "image_sides": ({"min": sides[0], "median": statistics.median(sides), "max": sides[-1]}
                        if sides else None),
        **{k: findings[k] for k in ("rejected", "extension_mismatches", "duplicates", "leakage",
                                    "too_small", "exif_rotated")},
        "repeated_rows": [printable(r) for r in source.repeated],
        "problems": problems,
        "errors": {k: problems[k] for k in ERROR_KINDS if problems[k]},
        "warnings": {k: n for k, n in problems.items() if n and k not in ERROR_KINDS
                     and k != "groups_across_splits"},
        "clean": not any(problems.values()),
    }


def _read_and_fingerprint(source, max_pixels: int, min_side: int, workers: int,
                          perceptual: bool) -> tuple[list[FileCheck], dict[Record, Fingerprint]]:
    """The one pass over the files: the training data check, with each file's bytes hashed."""
    facts: dict[Record, Fingerprint] = {}

    def on_bytes(r: Record, data: bytes, c: FileCheck) -> None:
        facts[r] = fingerprint(data, max_pixels, perceptual=perceptual and c.ok, orientation=c.ok)

    read_bytes = None
    if source.tfds is not None:
        from jewelclf.data.pipeline import tfds_bytes

        read_bytes = tfds_bytes(source)
    checks = check_records(source.records, max_pixels, min_side, workers, read_bytes=read_bytes,
                           on_bytes=on_bytes)
    return checks, facts


def _class_counts(source, checks: list[FileCheck], ok: list[FileCheck]) -> tuple[list, dict]:
    """``(splits present, {class: {split: usable files}})``."""
    splits_present = sorted({c.record.split for c in checks}, key=lambda s: SPLIT_ORDER.get(s, 4))
    classes: dict[str, dict[str, int]] = {}
    for name in source.class_names:
        classes[printable(name)] = {s or "all": 0 for s in splits_present}
    for c in ok:
        classes.setdefault(printable(c.record.label), {s or "all": 0 for s in splits_present})
        classes[printable(c.record.label)][c.record.split or "all"] += 1
    return splits_present, classes


def _findings(source, checks: list[FileCheck], ok: list[FileCheck], facts: dict[Record, Fingerprint],
              input_size: int | None) -> dict[str, Any]:
    """The per-file findings of the report, in report order (duplicates and leakage apart)."""
    splits_present, classes = _class_counts(source, checks, ok)
    imbalance = _imbalance(classes, [printable(c) for c in source.class_names],
                           "train" if "train" in splits_present else None)
    rejected = [{**file_entry(c.record), "reason": printable(c.reason)} for c in checks if not c.ok]
    mismatches = [m for m in (_extension_mismatch(c) for c in checks) if m]
    too_small = []
    if input_size:
        too_small = [{"file": printable(c.record.key), "width": c.width, "height": c.height}
                     for c in ok if min(c.width, c.height) < input_size]
    rotated = []
    for c in ok:
        o = facts[c.record].orientation if c.record in facts else 1
        if o != 1:
            rotated.append({"file": printable(c.record.key), "orientation": o, "meaning": ORIENTATION[o]})
    return {
        "splits": {s or "all": sum(1 for c in ok if c.record.split == s) for s in splits_present},
        "classes": classes,
        "imbalance": imbalance,
        "rejected": rejected,
        "extension_mismatches": mismatches,
        "too_small": too_small,
        "exif_rotated": rotated,
    }


def _problems(f: dict[str, Any], source) -> dict[str, int]:
    """The findings counted by kind."""
    exact, near = f["duplicates"]["exact"], f["duplicates"]["near"]
    return {
        "rejected": len(f["rejected"]),
        "extension_mismatches": len(f["extension_mismatches"]),
        "exact_duplicate_groups": len(exact),
        "near_duplicate_groups": len(near),
        "groups_across_splits": sum(g["across_splits"] for g in exact + near),
        "groups_with_conflicting_labels": sum(g["conflicting_labels"] for g in exact + near),
        "too_small": len(f["too_small"]),
        "exif_rotated": len(f["exif_rotated"]),
        "exact_groups_across_splits": sum(g["across_splits"] for g in exact),
        "empty_classes": len(f["imbalance"]["empty_classes"]) if f["imbalance"] else 0,
        "repeated_rows": len(source.repeated),
    }


def save_check_report(report: dict, path: str | os.PathLike) -> None:
    """Write the report as indented JSON (UTF-8); an unwritable path is a one-line error."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
    except OSError as e:
        raise JewelclfError(f"cannot write the report to '{path}' ({e.strerror or e}); pick another --output") from None


# ---------------------------------------------------------------- the terminal table


def _section(lines: list[str], title: str, rows: list[str], limit: int) -> None:
    lines.append("")
    lines.append(title)
    for row in rows[:limit]:
        lines.append(f"  {row}")
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more (see --json)")


def _group_line(g: dict) -> str:
    where = " / ".join(s or "all" for s in g["splits"])
    files = [_q(f["file"]) for f in g["files"]]
    sign = " = " if g["kind"] == "exact" else " ≈ "
    shown = sign.join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
    extra = f", distance <= {g['max_distance']}" if g["kind"] == "near" else ""
    labels = f", LABELS DIFFER: {', '.join(map(_q, g['labels']))}" if g["conflicting_labels"] else ""
    scope = "ACROSS " + where if g["across_splits"] else "within " + where
    return f"[{scope}{extra}{labels}] {shown}"


def format_check_report(report: dict, limit: int = 10) -> str:
    """The report as a terminal table: counts first, then each kind of finding (at most
    ``limit`` rows each), then a verdict line."""
    lines = [f"data check of {report['data']}: {report['files']} files in {report['seconds']:.1f}s "
             f"({report['files_per_second'] or 0:.0f} files/s), {report['usable']} usable, "
             f"{len(report['rejected'])} rejected"]
    for note in report["notes"]:
        lines.append(f"note: {note}")
    splits = list(report["splits"])
    width = max([5] + [len(_q(c)) for c in report["classes"]])
    lines.append("")
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in splits))
    for name, counts in report["classes"].items():
        lines.append(f"{_q(name):<{width}}  " + "  ".join(f"{counts.get(s, 0):>6}" for s in splits))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{report['splits'][s]:>6}" for s in splits))
    imb = report["imbalance"]
    if imb:
        ratio = f"{imb['ratio']:.1f}:1" if imb["ratio"] is not None else "infinite"
        empty = f"; no usable images: {', '.join(map(_q, imb['empty_classes']))}" if imb["empty_classes"] else ""
        lines.append(f"imbalance ({imb['split']}): {ratio}, {_q(imb['largest']['class'])} "
                     f"{imb['largest']['count']} / {_q(imb['smallest']['class'])} {imb['smallest']['count']}"
                     + empty)
    sides = report["image_sides"]
    if sides:
        lines.append(f"shorter side: min {sides['min']}, median {sides['median']:g}, max {sides['max']} px")

    if report["rejected"]:
        _section(lines, f"unreadable or unsupported ({len(report['rejected'])}):",
                 [f"{_q(r['file'])}: {r['reason']}" for r in report["rejected"]], limit)
    if report.get("repeated_rows"):
        _section(lines, f"rows naming a file listed before with the same label ({len(report['repeated_rows'])}; "
                        "each file counted once):", report["repeated_rows"], limit)
    if report["extension_mismatches"]:
        _section(lines, f"extension does not match content ({len(report['extension_mismatches'])}):",
                 [f"{_q(m['file'])}: named {_q(m['extension'])}, content is {m['content']}"
                  for m in report["extension_mismatches"]], limit)
    for kind, title in (("exact", "byte-identical duplicates"), ("near", "near-identical duplicates")):
        groups = report["duplicates"][kind]
        if groups:
            n_files = sum(len(g["files"]) for g in groups)
            across = sum(g["across_splits"] for g in groups)
            _section(lines, f"{title}: {len(groups)} group(s), {n_files} files, {across} across splits",
                     [_group_line(g) for g in groups], limit)
    if report["leakage"]:
        twins: dict[str, list[dict]] = defaultdict(list)  # held-out file -> its twins in earlier splits
        for lk in report["leakage"]:
            twins[lk["b"]].append(lk)
        rows = []
        for b, leaks in twins.items():
            first = leaks[0]
            sign = "=" if first["kind"] == "exact" else "≈"
            more = f" (+{len(leaks) - 1} more)" if len(leaks) > 1 else ""
            rows.append(f"{_q(b)} [{first['b_split']}] {sign} {_q(first['a'])} [{first['a_split']}]{more}")
        _section(lines, f"LEAKAGE: {len(twins)} file(s) have a copy in another split "
                        f"({len(report['leakage'])} pair(s)):", rows, limit)
    if report["too_small"]:
        size = report["settings"]["input_size"]
        _section(lines, f"smaller than the {size} px input side ({len(report['too_small'])}; they get upscaled):",
                 [f"{_q(t['file'])}: {t['width']}x{t['height']}" for t in report["too_small"]], limit)
    if report["exif_rotated"]:
        _section(lines, f"EXIF-rotated ({len(report['exif_rotated'])}; jewelclf uses the stored pixels, "
                        "viewers turn them):",
                 [f"{_q(t['file'])}: orientation {t['orientation']}, {t['meaning']}"
                  for t in report["exif_rotated"]], limit)
    lines.append("")
    if report["clean"]:
        lines.append("clean: nothing found")
        return "\n".join(lines)
    found = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in report["problems"].items() if n)
    lines.append(f"found: {found}")
    if report["errors"]:
        errors = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in report["errors"].items())
        lines.append(f"errors: {errors} (fit refuses or mislearns such data; exit status 1)")
    else:
        lines.append("no errors, warnings only (exit status 0; --strict makes warnings fail)")
    return "\n".join(lines)
