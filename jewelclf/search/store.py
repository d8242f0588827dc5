"""The search index on disk: checks on load, a crash-safe swap, and recovery after a crash.

An update writes the whole new version into a hidden folder beside the index
(``.NAME.tmp-XXXX``), each file flushed to disk and ``meta.json`` last, then swaps it in with two
renames: the index to ``.NAME.old-XXXX``, the new version to the index's name. A process killed
between the two renames leaves no index but a complete hidden copy; the next open or update
(:func:`recover`) finishes the swap. A writer holds an ``flock`` on its hidden folder, and the
swap and the recovery hold one on the parent folder, so a live writer's files are never taken
for a dead one's, and the kernel frees both locks when a process dies. No lock file is left.

Everything read back is checked, so a damaged or hand-edited index is one line naming the file
and the fix, never a traceback and never silently wrong results.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import secrets
import shutil
import stat as stat_mod
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf.errors import JewelclfError
from jewelclf.fsio import fsync_dir

INDEX_FORMAT = 1
META = "meta.json"
MANIFEST = "manifest.csv"
VECTORS = "vectors.npy"
MANIFEST_FIELDS = ("id", "key", "path", "label", "sku", "size", "mtime_ns", "sha256")
KINDS = ("exact", "hnsw")
TMP, OLD = "tmp", "old"
STALE_SECONDS = 600
"""Where ``flock`` is unsupported, a hidden folder untouched this long is taken as abandoned."""
CHUNK_ROWS = 65_536


def rebuild_hint(root: Path) -> str:
    """The command that rebuilds index ``root``, for the end of an error."""
    return f"rebuild it with jewelclf index RUN_DIR CATALOGUE --output {root} --rebuild"


def damaged(root: Path, name: str, what: str) -> JewelclfError:
    """The one-line error for a damaged file ``name`` of index ``root``."""
    return JewelclfError(f"'{Path(root) / name}' is damaged ({what}); {rebuild_hint(root)}")


# --------------------------------------------------------------------------------------------
# Checks on load

_INT, _STR, _DICT, _LIST = "an integer", "a string", "an object", "a list"
_META_FIELDS = {"kind": _STR, "model": _DICT, "layer": _STR, "dim": _INT, "image_size": _INT,
                "resize": _STR, "max_pixels": _INT, "min_image_side": _INT, "labels": _LIST,
                "count": _INT, "exact_threshold": _INT, "hnsw": _DICT, "next_id": _INT}
_MODEL_FIELDS = {"path": _STR, "size": _INT, "mtime_ns": _INT, "sha256": _STR}
_HNSW_FIELDS = {"connectivity": _INT, "expansion_add": _INT, "expansion_search": _INT}
_MINIMUM = {"dim": 1, "image_size": 1, "max_pixels": 1, "min_image_side": 1, "count": 0,
            "exact_threshold": 0, "next_id": 0, "connectivity": 1, "expansion_add": 1,
            "expansion_search": 1, "size": 0}


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {_STR: str, _DICT: dict, _LIST: list}[kind])


def _check_fields(obj: dict, fields: dict[str, str], prefix: str) -> str | None:
    for key, kind in fields.items():
        if key not in obj:
            return f"no '{prefix}{key}'"
        if not _type_ok(obj[key], kind):
            return f"'{prefix}{key}' is {json_repr(obj[key])}, not {kind}"
        if kind == _INT and obj[key] < _MINIMUM.get(key, obj[key]):
            return f"'{prefix}{key}' is {obj[key]}, below {_MINIMUM[key]}"
    return None


def json_repr(value: Any) -> str:
    """``repr(value)`` cut to 40 characters, for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_meta(root: Path, meta: Any) -> None:
    """Refuse a ``meta.json`` without a field a search or an update reads, or of the wrong type."""
    if not isinstance(meta, dict):
        raise damaged(root, META, f"{type(meta).__name__}, not a JSON object")
    if meta.get("format") != INDEX_FORMAT:
        raise JewelclfError(f"index '{root}' has format {meta.get('format')}, this jewelclf reads "
                            f"format {INDEX_FORMAT}; {rebuild_hint(root)}")
    problem = (_check_fields(meta, _META_FIELDS, "")
               or _check_fields(meta["model"], _MODEL_FIELDS, "model.")
               or _check_fields(meta["hnsw"], _HNSW_FIELDS, "hnsw."))
    if problem is None and meta["kind"] not in KINDS:
        problem = f"'kind' is {json_repr(meta['kind'])}, not one of {', '.join(KINDS)}"
    if problem is None and not all(isinstance(x, str) for x in meta["labels"]):
        problem = "'labels' holds something other than strings"
    names = meta.get("class_names")
    if problem is None and names is not None and not (
            isinstance(names, list) and all(isinstance(x, str) for x in names)):
        problem = "'class_names' is not a list of strings"
    if problem is None and not _type_ok(meta.get("deleted", 0), _INT):
        problem = f"'deleted' is {json_repr(meta['deleted'])}, not {_INT}"
    if problem is not None:
        raise damaged(root, META, problem)


def first_nonfinite_row(vectors: np.ndarray) -> int | None:
    """The first row holding a NaN or an infinity, or None; streams a memory-mapped matrix."""
    for start in range(0, len(vectors), CHUNK_ROWS):
        block = np.asarray(vectors[start:start + CHUNK_ROWS])
        # A sum is finite only if every term is (unit vectors cannot overflow): one fast pass.
        if not np.isfinite(np.add.reduce(block, axis=None, dtype=np.float32)):
            return start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
    return None


def check_arrays(root: Path, meta: dict, vectors, ids, label_codes, offsets,
                 scan: bool = True) -> None:
    """Shapes and types of the ``.npy`` files against ``meta.json``; with ``scan``, also the
    ranges of labels and offsets and that every vector is finite (passes over every array).

    Without ``scan`` nothing is read but the headers, so opening a memory-mapped index stays
    a matter of milliseconds; what a search then reads is checked as it reads it."""
    count, dim = meta["count"], meta["dim"]
    if vectors.dtype != np.float32 or vectors.shape != (count, dim):
        raise damaged(root, VECTORS, f"{vectors.dtype} {vectors.shape}, but {META} says "
                                     f"float32 ({count}, {dim})")
    for name, arr in (("ids.npy", ids), ("labels.npy", label_codes),
                      ("manifest_offsets.npy", offsets)):
        if arr.ndim != 1 or len(arr) != count or arr.dtype.kind not in "iu":
            raise damaged(root, name, f"{arr.dtype} {arr.shape}, but {META} says {count} items")
    if not scan:
        return
    if count and (int(np.min(label_codes)) < 0 or int(np.max(label_codes)) >= len(meta["labels"])):
        raise damaged(root, "labels.npy", f"a label index outside the {len(meta['labels'])} "
                                          f"labels of {META}")
    if count and (int(offsets[0]) <= 0 or not bool(np.all(np.diff(offsets) > 0))):
        raise damaged(root, "manifest_offsets.npy", "offsets not increasing")
    bad = first_nonfinite_row(vectors)
    if bad is not None:
        raise damaged(root, VECTORS, f"row {bad} holds NaN or infinite values")


def parse_row(data: bytes) -> list[str]:
    """One manifest row's fields, checked: 8 of them, integer id, size and mtime."""
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    if len(rows) != 1:
        raise ValueError(f"{len(rows)} CSV rows where one belongs")
    return check_fields(rows[0])


def check_fields(fields: list[str]) -> list[str]:
    """A manifest row's fields, or a ValueError saying what is wrong with them."""
    if len(fields) != len(MANIFEST_FIELDS):
        raise ValueError(f"{len(fields)} fields where {len(MANIFEST_FIELDS)} belong")
    for i in (0, 5, 6):
        if not fields[i].isdigit():
            raise ValueError(f"'{MANIFEST_FIELDS[i]}' is {json_repr(fields[i])}, not a number")
    return fields


def header_bytes() -> bytes:
    """The manifest's header row as jewelclf writes it."""
    return (",".join(MANIFEST_FIELDS) + "\n").encode("utf-8")


def check_manifest(root: Path, ids: np.ndarray, offsets: np.ndarray) -> None:
    """The manifest's header, first and last rows against the ids and offsets: what a
    truncated or replaced file breaks, checked without parsing every row."""
    path = Path(root) / MANIFEST
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(header_bytes()))
            if head != header_bytes():
                raise ValueError("no header" if not head else "not the header jewelclf writes")
            if len(ids) == 0:
                if size != len(head):
                    raise ValueError("rows after the header of an empty index")
                return
            last = int(offsets[-1])
            if size <= last:
                raise ValueError(f"{size} bytes, but its last row starts at byte {last}")
            checks = [(0, int(offsets[0]), int(offsets[1]) if len(ids) > 1 else size)]
            checks.append((len(ids) - 1, last, size))
            for row, start, end in checks:
                f.seek(start)
                data = f.read(end - start)
                if not data.endswith(b"\n"):
                    raise ValueError(f"row {row} is cut short")
                try:
                    fields = parse_row(data)
                except ValueError as e:
                    raise ValueError(f"row {row}: {e}") from None
                if int(fields[0]) != int(ids[row]):
                    raise ValueError(f"row {row} has another id than ids.npy")
    except (OSError, ValueError) as e:
        raise damaged(root, MANIFEST, str(e)[:120]) from None


# --------------------------------------------------------------------------------------------
# Locks, the swap and recovery


def _flock(fd: int, blocking: bool) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``folder`` (waits; a no-op where flock is unsupported)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        _flock(fd, blocking=True)
        yield
    finally:
        os.close(fd)


def _abandoned(folder: Path) -> bool:
    """Whether no live process holds ``folder``'s lock (its writer died)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        got = _flock(fd, blocking=False)
        if got is None:
            return time.time() - os.fstat(fd).st_mtime > STALE_SECONDS
        return got
    finally:
        os.close(fd)


def _hidden(output: Path, *kinds: str) -> list[Path]:
    """The hidden folders of these kinds beside ``output``, newest first."""
    prefixes = tuple(f".{output.name}.{kind}-" for kind in kinds)
    found = []
    try:
        for p in output.parent.iterdir():
            if p.name.startswith(prefixes):
                with contextlib.suppress(OSError):  # removed meanwhile
                    st = p.stat()
                    if stat_mod.S_ISDIR(st.st_mode):
                        found.append((st.st_mtime_ns, p))
    except OSError:
        return []
    return [p for _, p in sorted(found, reverse=True)]


def recover(output: Path) -> list[str]:
    """Finish or clean up after an update that was killed; notes of what was done.

    With the index missing, the newest complete copy a dead writer left (its ``meta.json`` is
    written last) is renamed into place: the writer was killed between its two renames. Beside
    a present index, a dead writer's folders are removed. A live writer's folder is never
    touched, nor a previous version while the index is missing (it was deleted on purpose).
    """
    output = Path(output)
    if not _hidden(output, TMP, OLD):
        return []  # the usual case: one directory listing
    notes = []
    try:
        with _folder_lock(output.parent):
            dead = [p for p in _hidden(output, TMP) if _abandoned(p)]
            old = _hidden(output, OLD)
            complete = [p for p in dead if (p / META).is_file()]
            if not output.exists() and complete:
                os.replace(complete[0], output)
                fsync_dir(output.parent)
                notes.append(f"finished an interrupted update of index '{output}'")
            if output.exists():
                for p in dead + old:
                    if p.exists():
                        shutil.rmtree(p, ignore_errors=True)
    except OSError as e:
        if not output.exists():
            raise JewelclfError(f"index '{output}' was left half-updated by a killed process and "
                                f"cannot be recovered here ({e.strerror or e}); run jewelclf "
                                f"similar or index on it with write access to '{output.parent}'") from None
    return notes


def save_file(path: Path, write: Callable[[Any], None]) -> None:
    """Write a new file through ``write(f)`` and flush it to disk."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    """Flush a file another library wrote to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def swap_in(output: Path, write_files: Callable[[Path], None]) -> None:
    """Write a new version of the index with ``write_files(folder)`` and swap it in.

    ``write_files`` must write ``meta.json`` last, with :func:`save_file`. A failure before the
    swap ends removes the new copy and keeps the previous version; a kill is undone by
    :func:`recover`.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp = output.with_name(f".{output.name}.{TMP}-{token}")
    with _folder_lock(output.parent):  # so that recover() never sees it unlocked
        tmp.mkdir()
        fd = os.open(tmp, os.O_RDONLY)
        _flock(fd, blocking=False)
    old = None
    try:
        write_files(tmp)
        fsync_dir(tmp)
        with _folder_lock(output.parent):
            try:
                if output.exists():
                    old = output.with_name(f".{output.name}.{OLD}-{token}")
                    os.replace(output, old)
                os.replace(tmp, output)
            except OSError as e:
                if old is not None and not output.exists():
                    os.replace(old, output)
                old = None
                raise JewelclfError(f"could not move the new version of index '{output}' into "
                                    f"place ({e.strerror or e}); the previous version is kept; "
                                    f"check the permissions of '{output.parent}' and run jewelclf "
                                    f"index again") from None
            fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
