"""Per-file fingerprints and the duplicate groups built from them.

:func:`fingerprint` hashes a file's bytes: a SHA-256 of the content for byte-identical
duplicates and, for files that decode, a perceptual hash for near-identical ones (the same
photo re-encoded, resized, or recoloured), with the EXIF orientation. :func:`duplicate_groups`
joins fingerprints into exact and near groups, and :func:`fingerprint_records` reads and
fingerprints records in threads. The data check (:mod:`jewelclf.data.audit`) and the split
leakage check (:mod:`jewelclf.data.leakage`) both build on them.

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
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from jewelclf import bars
from jewelclf.config import DataConfig
from jewelclf.data.sources import Record
from jewelclf.data.validate import read_file_bytes
from jewelclf.display import printable

NEAR_DUPLICATE_DISTANCE = 12
"""Default largest Hamming distance, in bits of the 256-bit pHash, between near duplicates.

Measured on ``../shared/data/jewellery``: up to 12 bits the pairs are one photo re-encoded or
resized, or one render with the stone recoloured (the hash is grayscale); at 13-20 bits they
are variants of one product (another charm on the same bracelet); beyond, distinct products."""

HASH_SIZE = 16
"""The pHash keeps the ``HASH_SIZE`` x ``HASH_SIZE`` lowest DCT frequencies (256 bits)."""

_THUMB = 4 * HASH_SIZE

HASH_DESCRIPTION = f"pHash, {HASH_SIZE}x{HASH_SIZE} DCT of {_THUMB}x{_THUMB} ({HASH_SIZE * HASH_SIZE} bits)"
"""How the check report names the perceptual hash in its settings."""

DEFAULT_MAX_PIXELS = DataConfig.max_pixels
"""The default of ``data.max_pixels``: the decode-bomb guard."""

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2, None: 3}
"""Report order of the splits (records without one last)."""

ORIENTATION = {
    2: "mirrored", 3: "upside down (viewers turn it 180°)", 4: "flipped vertically",
    5: "mirrored and turned 90°", 6: "lying on its side (viewers turn it 90° clockwise)",
    7: "mirrored and turned 90°", 8: "lying on its side (viewers turn it 90° anticlockwise)",
}
"""What each EXIF orientation other than 1 means, for the report."""

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
    # imagehash's pHash: LANCZOS to 64x64, the 16x16 lowest DCT frequencies, above their median
    return np.packbits(imagehash.phash(gray, hash_size=HASH_SIZE, highfreq_factor=_THUMB // HASH_SIZE).hash).tobytes()


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1
    return value if value in ORIENTATION else 1


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


def hamming_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
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

def file_entry(r: Record) -> dict[str, Any]:
    """A record as the report lists it: file key, split and label, printable."""
    return {"file": printable(r.key), "split": r.split, "label": printable(r.label)}


def _sort_key(r: Record):
    return (SPLIT_ORDER.get(r.split, 4), r.key)


def _group(kind: str, records: list[Record], pairs: list[tuple[Record, Record, int]]) -> dict[str, Any]:
    records = sorted(records, key=_sort_key)
    splits = sorted({r.split for r in records}, key=lambda s: SPLIT_ORDER.get(s, 4))
    labels = sorted({printable(r.label) for r in records})
    leaks = []
    for a, b, d in pairs:
        if a.split != b.split:
            a, b = sorted((a, b), key=_sort_key)
            leaks.append({"a": printable(a.key), "a_split": a.split, "b": printable(b.key), "b_split": b.split,
                          "kind": kind, "distance": d})
    group = {
        "kind": kind,
        "files": [file_entry(r) for r in records],
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
        edges = hamming_pairs(hashes, near_duplicate_distance)
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

