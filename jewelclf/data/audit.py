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

:func:`find_split_leakage` is the fast part that ``fit`` runs: duplicates across splits only,
without the full decode.

The perceptual hash is a 256-bit pHash (the algorithm of the ``imagehash`` package's
``phash(hash_size=16)``, written here with NumPy): the 16x16 lowest frequencies of the 2-D DCT
of a 64x64 grayscale thumbnail, each bit set where the coefficient is above their median. Two
photos count as near-identical at a Hamming distance of at most :data:`NEAR_DUPLICATE_DISTANCE`
bits. Why this hash, measured on 300 photos of ``../shared/data/jewellery`` and 1,200 resized
and re-encoded copies of them (44,850 pairs of distinct photos, 11 of them real near-duplicates):
a 64-bit dHash at 4 bits finds 99.8% of the copies but pairs 55 photos, as product photos on
white look alike to it; a 256-bit dHash at 12 bits finds 99.2% and pairs 14; this pHash at 12
bits finds 97.7% and pairs exactly the 11. Precision wins because ``fit`` refuses leakage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from jewelclf import bars
from jewelclf.config import DataConfig
from jewelclf.data.sources import Record, load_source
from jewelclf.data.validate import FileCheck, check_records, read_file_bytes
from jewelclf.display import quote_name as _q
from jewelclf.errors import JewelclfError

NEAR_DUPLICATE_DISTANCE = 12
"""Default largest Hamming distance, in bits of the 256-bit pHash, between near duplicates.

Measured on ``../shared/data/jewellery``: up to 12 bits the pairs are one photo re-encoded or
resized, or one render with the stone recoloured (the hash is grayscale); at 13-20 bits they
are variants of one product (another charm on the same bracelet); beyond, distinct products."""

HASH_SIZE = 16
"""The pHash keeps the ``HASH_SIZE`` x ``HASH_SIZE`` lowest DCT frequencies (256 bits)."""

_THUMB = 4 * HASH_SIZE
_DCT = np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (2 * np.arange(_THUMB)[None, :] + 1) / (2 * _THUMB))

DEFAULT_MAX_PIXELS = DataConfig.max_pixels
"""The default of ``data.max_pixels``: the decode-bomb guard."""

_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2, None: 3}

_EXTENSION_FORMAT = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".pjpeg": "JPEG",
    ".png": "PNG", ".apng": "PNG", ".gif": "GIF", ".bmp": "BMP", ".dib": "BMP", ".webp": "WEBP",
    ".tif": "TIFF", ".tiff": "TIFF", ".heic": "HEIC", ".heif": "HEIC", ".avif": "AVIF",
    ".svg": "SVG", ".pdf": "PDF",
}

_ORIENTATION = {
    2: "mirrored", 3: "upside down (viewers turn it 180°)", 4: "flipped vertically",
    5: "mirrored and turned 90°", 6: "lying on its side (viewers turn it 90° clockwise)",
    7: "mirrored and turned 90°", 8: "lying on its side (viewers turn it 90° anticlockwise)",
}

_POPCOUNT = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


# ---------------------------------------------------------------- per-file facts


@dataclass(frozen=True)
class Fingerprint:
    """What the data check learns from a file's bytes beyond :class:`FileCheck`."""

    sha256: str
    phash: bytes | None = None
    """The 256-bit pHash (32 bytes), or ``None`` when not computed or not decodable."""
    orientation: int = 1
    """EXIF orientation tag (1: as stored)."""


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def perceptual_hash(im: Image.Image) -> bytes:
    """The 256-bit pHash of an opened image, as 32 bytes.

    Alpha is composited onto white, as :func:`jewelclf.data.images.decode_rgb` does, so a
    transparent cut-out hashes like its copy on white; 16-bit images are scaled to 8 bits. JPEGs
    are decoded straight at 1/2-1/8 scale in the DCT domain (PIL draft mode), so a large photo
    costs about as much as a small one.
    """
    work = 2 * _THUMB  # decode and box-reduce to at least this, then LANCZOS to the thumbnail
    if im.format == "JPEG":
        try:
            im.draft("L", (work, work))
        except Exception:
            pass
    im.load()
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grayscale
        a = np.asarray(im, dtype=np.float64)
        scale = 257.0 if a.max(initial=0) > 255 else 1.0
        gray = Image.fromarray(np.clip(np.round(a / scale), 0, 255).astype(np.uint8))
    elif _has_alpha(im):
        rgba = im.convert("RGBA")
        factor = min(rgba.size) // work
        if factor > 1:
            rgba = rgba.reduce(factor)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        gray = white.convert("L")
    else:
        gray = im.convert("L")
    factor = min(gray.size) // work
    if factor > 1:
        gray = gray.reduce(factor)
    px = np.asarray(gray.resize((_THUMB, _THUMB), Image.Resampling.LANCZOS), dtype=np.float64)
    coeffs = _DCT @ px @ _DCT.T
    return np.packbits(coeffs > np.median(coeffs)).tobytes()


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1
    return value if value in _ORIENTATION else 1


def fingerprint(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, perceptual: bool = True,
                orientation: bool = True) -> Fingerprint:
    """Hash ``data``: SHA-256 always; the pHash and EXIF orientation when asked for and the
    header says the image is within ``max_pixels`` (so a decode bomb is never decoded).

    Never raises for bad bytes: what cannot be read is left ``None`` / 1.
    """
    sha = hashlib.sha256(data).hexdigest()
    if not (perceptual or orientation):
        return Fingerprint(sha)
    ph, orient = None, 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if not 0 < width * height <= max_pixels:
                    return Fingerprint(sha)
                if perceptual:
                    try:
                        ph = perceptual_hash(im)
                    except Exception:
                        ph = None
                if orientation:  # after the hash: for PNG, getexif() loads the whole image
                    orient = _orientation(im)
    except Exception:
        pass
    return Fingerprint(sha, ph, orient)


# ---------------------------------------------------------------- duplicates


def _hamming_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """All ``(i, j, distance)`` with ``i < j`` and Hamming distance <= ``max_distance``.

    ``hashes`` is ``(n, 32)`` uint8. Brute force in blocks of about a million pairs: n^2/2
    comparisons of four 64-bit words; measured 0.2 CPU-s for 2,000 hashes, 2 for 10,000, 8 for
    20,000 (so about 3 minutes for 100,000).
    """
    n = len(hashes)
    if n < 2:
        return []
    words = np.ascontiguousarray(hashes).view(">u8").astype(np.uint64)  # (n, 4)
    popcount = getattr(np, "bitwise_count", None)
    step = max(1, 2**20 // n)
    out: list[tuple[int, int, int]] = []
    # Counted in pairs, not rows: a block's work shrinks as it moves down the triangle.
    with bars.bar(n * (n - 1) // 2, "near-duplicate search", unit="pair",
                  unit_scale=True) as progress:
        for start in range(0, n - 1, step):
            stop = min(n, start + step)
            if popcount is not None:
                block = words[start:stop, None, :] ^ words[None, start:, :]
                dist = popcount(block).sum(axis=-1, dtype=np.int32)
            else:  # numpy < 2.0
                block = hashes[start:stop, None, :] ^ hashes[None, start:, :]
                dist = _POPCOUNT[block].sum(axis=-1, dtype=np.int32)
            ii, jj = np.nonzero(dist <= max_distance)
            jj = jj + start
            ii = ii + start
            keep = jj > ii
            for i, j in zip(ii[keep].tolist(), jj[keep].tolist()):
                out.append((i, j, int(dist[i - start, j - start])))
            rows = stop - start
            progress.update(rows * (n - 1) - rows * (start + stop - 1) // 2)  # pairs (i, j > i) done
    return out


def _show(text: str) -> str:
    """A name that can be printed and saved as UTF-8: bytes of a file name that are not UTF-8
    (kept by Python as lone surrogates) are written as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _file_entry(r: Record) -> dict[str, Any]:
    return {"file": _show(r.key), "split": r.split, "label": _show(r.label)}


def _sort_key(r: Record):
    return (_SPLIT_ORDER.get(r.split, 4), r.key)


def _group(kind: str, records: list[Record], pairs: list[tuple[Record, Record, int]]) -> dict[str, Any]:
    records = sorted(records, key=_sort_key)
    splits = sorted({r.split for r in records}, key=lambda s: _SPLIT_ORDER.get(s, 4))
    labels = sorted({_show(r.label) for r in records})
    leaks = []
    for a, b, d in pairs:
        if a.split != b.split:
            a, b = sorted((a, b), key=_sort_key)
            leaks.append({"a": _show(a.key), "a_split": a.split, "b": _show(b.key), "b_split": b.split,
                          "kind": kind, "distance": d})
    group = {
        "kind": kind,
        "files": [_file_entry(r) for r in records],
        "splits": splits,
        "across_splits": len(splits) > 1,
        "labels": labels,
        "conflicting_labels": len(labels) > 1,
        "leaks": sorted(leaks, key=lambda x: (x["a"], x["b"])),
    }
    if kind == "near":
        group["max_distance"] = max(d for _, _, d in pairs)
    return group


def duplicate_groups(items: Iterable[tuple[Record, Fingerprint]],
                     near_duplicate_distance: int | None = NEAR_DUPLICATE_DISTANCE
                     ) -> tuple[list[dict], list[dict]]:
    """``(exact, near)`` groups of duplicate files.

    Exact groups share a SHA-256. Near groups join distinct contents whose pHashes differ by at
    most ``near_duplicate_distance`` bits (single linkage, so a group can chain); each file of a
    content is in its near group, and a near group has at least two distinct contents.
    The distance is that of the pHashes.
    """
    by_sha: dict[str, list[Record]] = defaultdict(list)
    ph_of: dict[str, bytes] = {}
    for r, fp in items:
        by_sha[fp.sha256].append(r)
        if fp.phash is not None:
            ph_of[fp.sha256] = fp.phash
    exact = []
    for recs in by_sha.values():
        if len(recs) > 1:
            recs = sorted(recs, key=_sort_key)
            pairs = [(a, b, 0) for i, a in enumerate(recs) for b in recs[i + 1:]]
            exact.append(_group("exact", recs, pairs))
    near: list[dict] = []
    if near_duplicate_distance is not None and len(ph_of) > 1:
        shas = sorted(ph_of)
        hashes = np.frombuffer(b"".join(ph_of[s] for s in shas), dtype=np.uint8).reshape(len(shas), -1)
        edges = _hamming_pairs(hashes, near_duplicate_distance)
        parent = list(range(len(shas)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j, _ in edges:
            parent[find(i)] = find(j)
        members: dict[int, list[int]] = defaultdict(list)
        for i in range(len(shas)):
            members[find(i)].append(i)
        edges_of: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for e in edges:
            edges_of[find(e[0])].append(e)
        for root, idx in members.items():
            if len(idx) < 2:
                continue
            recs = [r for i in idx for r in by_sha[shas[i]]]
            pairs = [(a, b, d) for i, j, d in edges_of[root]
                     for a in by_sha[shas[i]] for b in by_sha[shas[j]]]
            near.append(_group("near", recs, pairs))
    def order(g: dict) -> tuple:
        return (not g["across_splits"], g["files"][0]["file"])

    return sorted(exact, key=order), sorted(near, key=order)


def find_split_leakage(records: list[Record],
                       near_duplicate_distance: int | None = NEAR_DUPLICATE_DISTANCE,
                       workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS,
                       read_bytes: Callable | None = None) -> list[dict]:
    """Groups of duplicate images that straddle splits: the fast leakage check of ``fit``.

    Call it on records that already have their splits (after
    :func:`jewelclf.data.splits.assign_splits`). Each file is read once and hashed: SHA-256 for
    byte-identical copies, and, unless ``near_duplicate_distance`` is ``None``, the 256-bit pHash
    for near-identical ones (re-encoded, resized). Files that cannot be read or decoded, or whose
    header is over ``max_pixels``, are skipped here (the data check reports them). ``read_bytes``
    is the TFDS reader of :func:`jewelclf.data.pipeline.tfds_bytes`, as for ``check_records``.

    Returns the groups (dicts, as in :func:`check_data`'s ``duplicates``) whose files lie in more
    than one split, each with ``leaks``: the pairs across splits, ``{"a", "a_split", "b",
    "b_split", "kind", "distance"}``; empty when nothing leaks. :func:`describe_leakage` makes
    the one-line message.

    Cost on ``../shared/data/jewellery`` (1,816 files, 55 MB; 2-core CPU shared with other
    work, load 7-8): exact duplicates only 0.5 s; with near duplicates 4.6 s wall, 3.6 CPU-s (a
    reduced-size decode per file, in ``workers`` threads) -- against 10 CPU-s for the
    ``check_records`` pass that ``fit`` already makes. Memory: one file's bytes per worker.
    """
    facts = fingerprint_records(records, near_duplicate_distance is not None, workers, max_pixels,
                                read_bytes)
    exact, near = duplicate_groups(((r, facts[r]) for r in records if r in facts),
                                   near_duplicate_distance)
    return [g for g in exact + near if g["across_splits"]]


def fingerprint_records(records: list[Record], perceptual: bool = True, workers: int = 4,
                        max_pixels: int = DEFAULT_MAX_PIXELS,
                        read_bytes: Callable | None = None) -> dict[Record, Fingerprint]:
    """Read each record once (in ``workers`` threads) and :func:`fingerprint` it, without the
    EXIF orientation. Records whose bytes cannot be read are left out."""
    facts: dict[Record, Fingerprint] = {}

    def one(r: Record, data: bytes | None) -> None:
        if data is not None:
            facts[r] = fingerprint(data, max_pixels, perceptual=perceptual, orientation=False)

    with bars.bar(len(records), "hashing files") as progress:
        if read_bytes is not None:
            for r, data in read_bytes(records):
                one(r, data)
                progress.update()
        else:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for _ in pool.map(lambda r: one(r, read_file_bytes(r)[0]), records):
                    progress.update()
    return facts


def describe_leakage(groups: list[dict], examples: int = 2) -> str:
    """One line for ``fit``'s refusal: how many groups leak, with the first pairs named."""
    pairs = [leak for g in groups for leak in g["leaks"]]
    shown = []
    for leak in pairs[:examples]:
        sign = "=" if leak["kind"] == "exact" else "≈"
        shown.append(f"{leak['a_split']} '{leak['a']}' {sign} {leak['b_split']} '{leak['b']}'")
    more = f" and {len(pairs) - len(shown)} more pair(s)" if len(pairs) > len(shown) else ""
    return (f"{len(groups)} group(s) of identical or near-identical images straddle splits "
            f"({'; '.join(shown)}{more})")


# ---------------------------------------------------------------- the whole check


def _extension_mismatch(c: FileCheck) -> dict | None:
    if not c.format or c.record.path.startswith("tfds:"):
        return None
    ext = os.path.splitext(c.record.path)[1].lower()
    named = _EXTENSION_FORMAT.get(ext)
    if named == c.format:
        return None
    return {"file": _show(c.record.key), "extension": _show(ext) or "(none)", "content": c.format}


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

    ``backbone`` / ``image_size`` set the input side below which images are listed as too small
    (``image_size`` wins; a backbone alone means its default size); with neither, that check is
    skipped. ``max_pixels``, ``min_side`` and ``workers`` default to the ``data`` config.
    ``near_duplicate_distance=None`` skips near duplicates. ``report["clean"]`` is true when
    nothing was found; ``report["problems"]`` counts the findings by kind.
    """
    cfg = DataConfig()
    max_pixels = max_pixels or cfg.max_pixels
    min_side = min_side or cfg.min_image_side
    workers = workers or cfg.check_workers
    input_size = image_size
    if input_size is None and backbone is not None:
        from jewelclf.modeling.backbones import get_backbone

        input_size = get_backbone(backbone).default_image_size

    t0 = time.perf_counter()
    source = load_source(spec)
    facts: dict[Record, Fingerprint] = {}
    perceptual = near_duplicate_distance is not None

    def on_bytes(r: Record, data: bytes, c: FileCheck) -> None:
        facts[r] = fingerprint(data, max_pixels, perceptual=perceptual and c.ok, orientation=c.ok)

    read_bytes = None
    if source.tfds is not None:
        from jewelclf.data.pipeline import tfds_bytes

        read_bytes = tfds_bytes(source)
    checks = check_records(source.records, max_pixels, min_side, workers, read_bytes=read_bytes,
                           on_bytes=on_bytes)
    exact, near = duplicate_groups(((c.record, facts[c.record]) for c in checks if c.record in facts),
                                   near_duplicate_distance)
    elapsed = time.perf_counter() - t0

    ok = [c for c in checks if c.ok]
    splits_present = sorted({c.record.split for c in checks}, key=lambda s: _SPLIT_ORDER.get(s, 4))
    classes: dict[str, dict[str, int]] = {}
    for name in source.class_names:
        classes[_show(name)] = {s or "all": 0 for s in splits_present}
    for c in ok:
        classes.setdefault(_show(c.record.label), {s or "all": 0 for s in splits_present})
        classes[_show(c.record.label)][c.record.split or "all"] += 1
    imbalance = _imbalance(classes, [_show(c) for c in source.class_names],
                           "train" if "train" in splits_present else None)
    rejected = [{**_file_entry(c.record), "reason": _show(c.reason)} for c in checks if not c.ok]
    mismatches = [m for m in (_extension_mismatch(c) for c in checks) if m]
    too_small = []
    if input_size:
        too_small = [{"file": _show(c.record.key), "width": c.width, "height": c.height}
                     for c in ok if min(c.width, c.height) < input_size]
    rotated = []
    for c in ok:
        o = facts[c.record].orientation if c.record in facts else 1
        if o != 1:
            rotated.append({"file": _show(c.record.key), "orientation": o, "meaning": _ORIENTATION[o]})
    leakage = [leak for g in exact + near for leak in g["leaks"]]
    sides = sorted(min(c.width, c.height) for c in ok)
    problems = {
        "rejected": len(rejected),
        "extension_mismatches": len(mismatches),
        "exact_duplicate_groups": len(exact),
        "near_duplicate_groups": len(near),
        "groups_across_splits": sum(g["across_splits"] for g in exact + near),
        "groups_with_conflicting_labels": sum(g["conflicting_labels"] for g in exact + near),
        "too_small": len(too_small),
        "exif_rotated": len(rotated),
        "exact_groups_across_splits": sum(g["across_splits"] for g in exact),
        "empty_classes": len(imbalance["empty_classes"]) if imbalance else 0,
        "repeated_rows": len(source.repeated),
    }
    return {
        "data": _show(spec),
        "files": len(checks),
        "usable": len(ok),
        "seconds": round(elapsed, 2),
        "files_per_second": round(len(checks) / elapsed, 1) if elapsed > 0 else None,
        "settings": {
            "max_pixels": max_pixels, "min_side": min_side, "workers": workers,
            "backbone": backbone, "input_size": input_size,
            "near_duplicate_distance": near_duplicate_distance,
            "perceptual_hash": f"pHash, {HASH_SIZE}x{HASH_SIZE} DCT of {_THUMB}x{_THUMB} ({HASH_SIZE * HASH_SIZE} bits)",
        },
        "notes": [_show(n) for n in source.notes],
        "splits": {s or "all": sum(1 for c in ok if c.record.split == s) for s in splits_present},
        "classes": classes,
        "imbalance": imbalance,
        "image_sides": ({"min": sides[0], "median": statistics.median(sides), "max": sides[-1]}
                        if sides else None),
        "rejected": rejected,
        "extension_mismatches": mismatches,
        "duplicates": {"exact": exact, "near": near},
        "leakage": leakage,
        "too_small": too_small,
        "exif_rotated": rotated,
        "repeated_rows": [_show(r) for r in source.repeated],
        "problems": problems,
        "errors": {k: problems[k] for k in ERROR_KINDS if problems[k]},
        "warnings": {k: n for k, n in problems.items() if n and k not in ERROR_KINDS
                     and k != "groups_across_splits"},
        "clean": not any(problems.values()),
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
        lines.append(f"imbalance ({imb['split']}): {ratio}, {_q(imb['largest']['class'])} "
                     f"{imb['largest']['count']} / {_q(imb['smallest']['class'])} {imb['smallest']['count']}"
                     + (f"; no usable images: {', '.join(map(_q, imb['empty_classes']))}" if imb["empty_classes"] else ""))
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
