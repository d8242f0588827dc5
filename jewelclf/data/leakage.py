"""The leakage check of ``fit``: the same image in two splits inflates the test scores.

``fit`` runs the fast part of the data check (the hashes of :mod:`jewelclf.data.fingerprint`,
without its full decode) on the files it kept, after their splits are assigned:

- **byte-identical** files (same SHA-256) in more than one split are certain leakage: ``fit``
  refuses them, unless ``data.allow_leakage`` is set (``--allow-leakage``);
- **near-identical** files (the 256-bit perceptual hash within
  :data:`~jewelclf.data.fingerprint.NEAR_DUPLICATE_DISTANCE` bits: the same photo resized or
  re-encoded) in more than one split are a warning only, as a perceptual hash can also match
  two distinct product shots on a plain background; ``jewelclf check DATA`` shows the pairs.
  ``data.near_duplicate_check: false`` skips them.

A split that jewelclf carves out of train itself (val, when DATA has no val split) can part two
copies of one photo in ``train/``, as it ranks files by a hash of their path: that is jewelclf's
doing, not the data's, so such a copy goes back to train instead of being refused or warned
about (on the jewellery photos: 3 byte-identical and 7 near-identical files of the carved val).

Usage, in ``prepare_data``: the hashes are taken during the file check, from the bytes it
reads (one read per file), then checked on the records that passed it::

    fingerprints, hash_bytes = leakage_hasher(config.data)
    checks = check_records(records, ..., on_bytes=hash_bytes)
    leakage = check_split_leakage(kept, config.data, read_bytes=..., log=log,
                                  carved=carved_splits(source.records), fingerprints=fingerprints)
    kept = leakage.records
    write_leakage_report(leakage, run_dir / rd.LEAKAGE, allowed=config.data.allow_leakage)
    leakage.enforce(config.data.allow_leakage, log)

Cost on ``../shared/data/jewellery`` (1,816 files, 55 MB, 2-core CPU): see
:func:`check_split_leakage`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jewelclf.config import DataConfig
from jewelclf.data.fingerprint import (
    NEAR_DUPLICATE_DISTANCE,
    Fingerprint,
    duplicate_groups,
    fingerprint,
    fingerprint_records,
)
from jewelclf.data.sources import Record
from jewelclf.data.validate import FileCheck
from jewelclf.display import printable
from jewelclf.errors import JewelclfError

NEAR_CHECK_MAX_FILES = 50_000
"""Above this many files ``fit`` skips the near-duplicate search (it is quadratic: about 2 CPU-s
at 10,000 files, 50 at 50,000, 3 minutes at 100,000) and says so; ``jewelclf check`` still
runs it."""

_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_HELD_OUT_ORDER = {"test": 0, "val": 1}  # test first: its leaks inflate the reported scores


def _held_out(groups: list[dict]) -> dict[str, list[dict]]:
    """Each held-out file with a twin in an earlier split -> its leak pairs (file order)."""
    twins: dict[str, list[dict]] = {}
    for g in groups:
        for leak in g["leaks"]:  # "a" is in the earlier split, "b" is the held-out file
            twins.setdefault(leak["b"], []).append(leak)
    return dict(sorted(twins.items(), key=lambda kv: (_HELD_OUT_ORDER.get(kv[1][0]["b_split"], 2), kv[0])))


def _example(leak: dict) -> str:
    sign = "=" if leak["kind"] == "exact" else "≈"
    return f"{leak['b_split']} '{leak['b']}' {sign} {leak['a_split']} '{leak['a']}'"


def _count_by_split(files: dict[str, list[dict]]) -> str:
    counts: dict[str, int] = {}
    for leaks in files.values():
        counts[leaks[0]["b_split"]] = counts.get(leaks[0]["b_split"], 0) + 1
    return ", ".join(f"{s}: {n}" for s, n in sorted(counts.items(), key=lambda kv: _SPLIT_ORDER.get(kv[0], 3)))


def _twin_splits(files: dict[str, list[dict]]) -> str:
    splits = sorted({lk["a_split"] for leaks in files.values() for lk in leaks},
                    key=lambda s: _SPLIT_ORDER.get(s, 3))
    return " or ".join(splits)


@dataclass(frozen=True)
class SplitLeakage:
    """What :func:`check_split_leakage` found: duplicate images that straddle splits."""

    files: int
    """How many files were hashed."""
    seconds: float
    exact_groups: list[dict] = field(default_factory=list)
    """Groups of byte-identical files in more than one split (the dicts of
    :func:`jewelclf.data.fingerprint.duplicate_groups`: ``files``, ``splits``, ``leaks``, ...)."""
    near_groups: list[dict] = field(default_factory=list)
    """Groups of near-identical files in more than one split."""
    near_checked: bool = True
    """Whether near duplicates were searched (``data.near_duplicate_check``, and the size cap)."""
    near_duplicate_distance: int | None = NEAR_DUPLICATE_DISTANCE
    records: list[Record] = field(default_factory=list, repr=False)
    """The records checked, with the splits to train with: a copy of a training photo that
    jewelclf carved into a held-out split is back in train (see ``moved``)."""
    moved: list[dict] = field(default_factory=list)
    """``{"file", "from", "to", "kind", "twin"}`` for each file moved back to train from a
    ``carved`` split: ``kind`` is ``exact`` or ``near``, ``twin`` a file of its group that stays."""

    @property
    def exact_held_out(self) -> dict[str, list[dict]]:
        """Held-out (val/test) files with a byte-identical twin in an earlier split -> the pairs."""
        return _held_out(self.exact_groups)

    @property
    def near_held_out(self) -> dict[str, list[dict]]:
        """Held-out files with a near-identical twin in an earlier split (and no byte-identical
        one) -> the pairs."""
        exact = self.exact_held_out
        return {f: leaks for f, leaks in _held_out(self.near_groups).items() if f not in exact}

    @property
    def clean(self) -> bool:
        return not self.exact_groups and not self.near_groups

    def _exact_finding(self) -> str | None:
        files = self.exact_held_out
        if not files:
            return None
        first = next(iter(files.values()))[0]
        return (f"{len(files)} held-out file(s) ({_count_by_split(files)}) have a byte-identical twin "
                f"in {_twin_splits(files)} (e.g. {_example(first)}), which inflates the held-out scores")

    def refusal(self) -> str | None:
        """The one-line error for byte-identical leakage, or ``None`` when there is none."""
        finding = self._exact_finding()
        return None if finding is None else f"{finding}; remove the duplicates, or pass --allow-leakage"

    def warning(self) -> str | None:
        """The one-line warning for near-identical leakage, or ``None``."""
        files = self.near_held_out
        if not files:
            return None
        first = next(iter(files.values()))[0]
        return (f"warning: {len(files)} held-out file(s) ({_count_by_split(files)}) look "
                f"near-identical to a file in {_twin_splits(files)} (e.g. {_example(first)}; "
                f"{len(self.near_groups)} group(s)); perceptual hashes can also match distinct "
                f"product shots on plain backgrounds, so check the pairs with: jewelclf check DATA")

    @property
    def message(self) -> str:
        """One line on what was found (for logs and the JSON report)."""
        parts = []
        exact, near = self.exact_held_out, self.near_held_out
        parts.append(f"{len(exact)} held-out file(s) with a byte-identical twin in another split" if exact
                     else "no held-out file with a byte-identical twin in another split")
        if not self.near_checked:
            parts.append("near-identical ones not searched")
        else:
            parts.append(f"{len(near) or 'none'} with a near-identical one")
        if self.moved:
            froms = sorted({m["from"] for m in self.moved}, key=lambda x: _SPLIT_ORDER.get(x, 3))
            n_exact = sum(m["kind"] == "exact" for m in self.moved)
            parts.append(f"{len(self.moved)} file(s) that the {' and '.join(froms)} split"
                         f"{'s' if len(froms) > 1 else ''} took from train put back into train, as "
                         f"copies of training files ({n_exact} byte-identical, "
                         f"{len(self.moved) - n_exact} near-identical)")
        return f"leakage check of {self.files} files in {self.seconds:.1f}s: {', '.join(parts)}"

    def enforce(self, allow: bool = False, log: Callable[[str], None] = print) -> None:
        """``fit``'s policy: raise the one-line :class:`JewelclfError` for byte-identical leakage
        unless ``allow``; log the summary, and a warning for near-identical leakage."""
        log(self.message)
        refusal = self.refusal()
        if refusal is not None:
            if not allow:
                raise JewelclfError(refusal)
            log(f"warning: {self._exact_finding()}; kept because data.allow_leakage is set")
        warning = self.warning()
        if warning is not None:
            log(warning)

    def to_dict(self, allowed: bool | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "files": self.files,
            "seconds": round(self.seconds, 2),
            "message": self.message,
            "near_duplicate_check": self.near_checked,
            "near_duplicate_distance": self.near_duplicate_distance if self.near_checked else None,
            "moved_to_train": self.moved,
            "exact": {"held_out_files": list(self.exact_held_out), "groups": self.exact_groups},
            "near": {"held_out_files": list(self.near_held_out), "groups": self.near_groups},
            "refusal": self.refusal(),
            "warning": self.warning(),
        }
        if allowed is not None:
            out["allow_leakage"] = allowed
        return out


def carved_splits(source_records: list[Record]) -> frozenset[str]:
    """The held-out splits that DATA does not define (so ``assign_splits`` carves them out of
    train): pass them to :func:`check_split_leakage` as ``carved``."""
    present = {r.split for r in source_records if r.split}
    return frozenset(s for s in ("val", "test") if s not in present)


def leakage_hasher(data_config: DataConfig | None = None
                   ) -> tuple[dict[Record, Fingerprint], Callable[[Record, bytes, FileCheck], None]]:
    """``(fingerprints, on_bytes)``: pass ``on_bytes`` to
    :func:`jewelclf.data.validate.check_records` and it fills ``fingerprints`` with the hashes of
    :func:`check_split_leakage` for each file that passes the check, from the bytes the check
    read (in its worker threads); then pass ``fingerprints`` to :func:`check_split_leakage`.
    """
    cfg = data_config or DataConfig()
    perceptual = bool(cfg.near_duplicate_check)
    facts: dict[Record, Fingerprint] = {}

    def on_bytes(record: Record, data: bytes, check: FileCheck) -> None:
        if check.ok:  # only files that pass reach the leakage check
            facts[check.record] = fingerprint(data, cfg.max_pixels, perceptual=perceptual,
                                              orientation=False)

    return facts, on_bytes


def _unit(r: Record) -> tuple[str, str]:
    return ("group", r.group) if r.group else ("file", r.key)


def check_split_leakage(records: list[Record], data_config: DataConfig | None = None,
                        read_bytes: Callable | None = None, log: Callable[[str], None] = print,
                        carved: Iterable[str] = (),
                        fingerprints: dict[Record, Fingerprint] | None = None) -> SplitLeakage:
    """Find the images that appear in more than one split of ``records``.

    Call it on records that have their splits and passed the file check (so every one can be
    read and is under ``data.max_pixels``). Each file is hashed: SHA-256 for byte-identical
    copies, and with ``data.near_duplicate_check`` (and at most :data:`NEAR_CHECK_MAX_FILES`
    files) the 256-bit perceptual hash for near-identical ones. ``fingerprints`` holds hashes
    already taken (by :func:`leakage_hasher`, during the file check); each record without one
    is read again and hashed here, in ``data.check_workers`` threads. ``read_bytes`` is the
    TFDS reader (:func:`jewelclf.data.pipeline.tfds_bytes`), as for ``check_records``.

    ``carved`` names the splits that jewelclf carved out of train itself (see
    :func:`carved_splits`): its hash of the file path can put one of two copies of a photo of
    ``train/`` into val. Each file of a carved split whose duplicate group (byte-identical, or
    near-identical when searched) straddles splits goes back to train, with the rest of its
    manifest group if it has one, instead of being reported; ``SplitLeakage.records`` holds
    the records with their corrected splits and ``SplitLeakage.moved`` lists the moves.
    Leakage between the splits that DATA itself defines is reported. Logs only when the near
    search is skipped for size; :meth:`SplitLeakage.enforce` applies the policy.

    Measured on ``../shared/data/jewellery`` (1,816 files, 55 MB; 2-core CPU at ``nice 19``
    beside a training run, load 4): byte-identical only 0.3-0.6 s; with near duplicates 3.1-3.9 s
    wall, 3.0-3.7 CPU-s (a reduced-size decode per file for the hash; the search 0.1 s), against
    about 10 CPU-s for the ``check_records`` pass that ``fit`` makes before it. With
    ``fingerprints`` from that pass (as ``fit`` does), the hashing happens in it, on the bytes it
    read, and this call takes 0.3-0.6 s: the search and the report.
    """
    cfg = data_config or DataConfig()
    carved = frozenset(carved)
    near = bool(cfg.near_duplicate_check)
    if near and len(records) > NEAR_CHECK_MAX_FILES:
        log(f"note: {len(records)} files: the near-duplicate search across splits is skipped above "
            f"{NEAR_CHECK_MAX_FILES} (run jewelclf check DATA for it); byte-identical copies are still refused")
        near = False
    distance = NEAR_DUPLICATE_DISTANCE if near else None
    t0 = time.perf_counter()
    fingerprints = fingerprints or {}
    facts = {r: fingerprints[r] for r in records if r in fingerprints}  # a copy: moves re-key it
    missing = [r for r in records if r not in facts]
    if missing:
        facts.update(fingerprint_records(missing, near, cfg.check_workers, cfg.max_pixels, read_bytes))

    def across(recs: list[Record]) -> tuple[list[dict], list[dict]]:
        exact, near_groups = duplicate_groups(((r, facts[r]) for r in recs if r in facts), distance)
        return ([g for g in exact if g["across_splits"]], [g for g in near_groups if g["across_splits"]])

    exact, near_groups = across(records)
    moved: list[dict] = []
    if carved and (exact or near_groups):
        by_name = {printable(r.key): r for r in records}
        back: dict[tuple[str, str], dict] = {}  # unit -> why (its group, at its first member)
        for g in exact + near_groups:
            twin = next((f["file"] for f in g["files"] if f["split"] not in carved), None)
            for f in g["files"]:
                if f["split"] in carved:
                    back.setdefault(_unit(by_name[f["file"]]), {"kind": g["kind"], "twin": twin})
        new_records = []
        for r in records:
            if r.split in carved and _unit(r) in back:
                moved.append({"file": printable(r.key), "from": r.split, "to": "train", **back[_unit(r)]})
                new = replace(r, split="train")
                if r in facts:
                    facts[new] = facts.pop(r)
                r = new
            new_records.append(r)
        records = new_records
        moved.sort(key=lambda m: (_SPLIT_ORDER.get(m["from"], 3), m["file"]))
        exact, near_groups = across(records)
    seconds = time.perf_counter() - t0
    return SplitLeakage(
        files=len(records), seconds=seconds,
        exact_groups=exact, near_groups=near_groups,
        near_checked=near, near_duplicate_distance=distance,
        records=list(records), moved=moved)


def write_leakage_report(finding: SplitLeakage, path: str | Path, allowed: bool | None = None) -> None:
    """Write the findings as JSON (atomically: a temp file and a rename), e.g. the run's
    ``leakage.json``."""
    from jewelclf.fsio import atomic_write_json

    atomic_write_json(Path(path), finding.to_dict(allowed))
