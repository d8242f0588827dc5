"""Visual search: a catalogue's embeddings in a vector index, and its nearest items to a photo.

An index folder holds:

``meta.json``
    Format version, the model's identity (path, size, mtime, SHA-256 of its file), the embedding
    layer, dimension, image size and resize mode, the metric (cosine on unit vectors), the
    search library and its version, the kind (``exact`` or ``hnsw``), the size threshold between
    them and the HNSW parameters.
``manifest.csv``
    One row per catalogue item, in the rows' order of ``vectors.npy``: ``id`` (the stable key in
    the ANN index), ``key`` (path relative to the catalogue), ``path`` (absolute), ``label``,
    ``sku``, ``size``, ``mtime_ns`` and ``sha256`` of the file (what incremental updates compare).
``ids.npy``, ``labels.npy``, ``manifest_offsets.npy``
    Per row: the ANN key, the label's index in ``meta.json``'s ``labels``, and the row's byte
    offset in ``manifest.csv``: what a search needs, memory-mapped, without parsing the CSV.
``vectors.npy``
    float32 ``[N, D]`` unit vectors. Exact search is a NumPy matrix product over them; they are
    also what an update keeps for unchanged files, and what an HNSW rebuild starts from.
``index.usearch``
    The USearch HNSW graph, present only when the catalogue has more than ``exact_threshold``
    items. Loaded as a memory-mapped view, so opening an index takes milliseconds.
``rejected_files.csv``
    Catalogue files that could not be read in the latest update, with the reason.

An index is never written in place: a new version is written into a hidden folder beside it,
then swapped in; a process killed during the swap is finished by the next open or update, and
everything read back is checked (:mod:`jewelclf.search.store`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat as stat_mod
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf import bars
from jewelclf import runs as rd
from jewelclf.errors import JewelclfError
from jewelclf.search import store
from jewelclf.search.store import INDEX_FORMAT, MANIFEST, MANIFEST_FIELDS, META, VECTORS

Log = Callable[[str], None]

ANN_FILE = "index.usearch"
IDS = "ids.npy"
LABELS = "labels.npy"
OFFSETS = "manifest_offsets.npy"
REJECTED = "rejected_files.csv"

METRIC = "cosine"
LIBRARY = "usearch"
DEFAULT_EXACT_THRESHOLD = 50_000
"""Catalogues up to this many items are searched exactly (NumPy); larger ones through HNSW."""
HNSW_CONNECTIVITY = 16
"""HNSW ``M``: links per node per layer."""
HNSW_EXPANSION_ADD = 128
"""HNSW ``efConstruction``: the candidate list while inserting."""
HNSW_EXPANSION_SEARCH = 128
"""HNSW ``ef``: the candidate list while searching (recall against speed)."""
MAX_DELETED_FRACTION = 0.25
"""An HNSW graph with more removed than this share of live items is rebuilt from the vectors."""
HASH_WORKERS = 4


# --------------------------------------------------------------------------------------------
# The model behind an index


@dataclass
class ModelRef:
    """Where a model is and how to feed it."""

    model_file: Path
    run_dir: Path | None
    image_size: int | None
    resize: str
    batch_size: int
    max_pixels: int
    min_image_side: int
    class_names: list[str] | None
    backbone: str | None


def resolve_model(spec: str | Path) -> ModelRef:
    """A finished run dir, or a ``.keras`` model file (with its preprocessing defaults)."""
    from jewelclf import config as config_mod

    path = Path(spec).expanduser()
    if path.is_dir():
        info = rd.require_finished_run(path)
        if info.get("status") != "finished":
            raise JewelclfError(
                f"the run in '{path}' is not finished (status: {info.get('status', 'unknown')}); "
                f"wait for jewelclf fit to end, or index with another run"
            )
        cfg = config_mod.from_dict(config_mod.load_yaml(path / rd.CONFIG), source=str(path / rd.CONFIG))
        try:
            class_names = json.loads((path / rd.CLASS_NAMES).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            class_names = None
        return ModelRef(path / rd.MODEL, path, cfg.data.image_size, cfg.data.resize,
                        cfg.data.batch_size, cfg.data.max_pixels, cfg.data.min_image_side,
                        class_names, cfg.model.backbone)
    if path.is_file() and path.suffix == ".keras":
        cfg = config_mod.Config()
        class_names = None
        resize = cfg.data.resize
        for side in (path.with_name("jewelclf.json"), path.with_name(rd.CLASS_NAMES)):
            try:
                found = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(found, list):
                class_names = class_names or found
            elif isinstance(found, dict):
                class_names = class_names or found.get("class_names")
                resize = found.get("resize", resize)
        return ModelRef(path, None, None, resize, cfg.data.batch_size, cfg.data.max_pixels,
                        cfg.data.min_image_side, class_names, None)
    raise JewelclfError(
        f"'{spec}' is neither a finished run dir nor a .keras model file; pass the --run-dir of "
        f"a finished jewelclf fit"
    )


def _sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model_file: Path) -> dict[str, Any]:
    """What identifies a model file: its SHA-256 (plus size and mtime, to skip re-hashing)."""
    st = os.stat(model_file)
    return {"path": str(Path(model_file).resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "sha256": _sha256(model_file)}


def same_model(recorded: dict[str, Any], model_file: Path) -> bool:
    """Whether ``model_file`` is the model of ``recorded`` (hashing only when its stat differs)."""
    try:
        st = os.stat(model_file)
    except OSError:
        return False
    if st.st_size != recorded.get("size"):
        return False
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return True
    return _sha256(model_file) == recorded.get("sha256")


# --------------------------------------------------------------------------------------------
# The index on disk


@dataclass
class Item:
    """One catalogue item of an index."""

    id: int
    key: str
    path: str
    label: str
    sku: str = ""
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""

    @property
    def name(self) -> str:
        """What a person recognises the item by: its SKU when the catalogue has one, else path."""
        return self.sku or self.key


@dataclass
class Hit:
    rank: int
    row: int
    similarity: float


@dataclass
class SearchIndex:
    """A loaded index: metadata, unit vectors, item ids and labels and, above the threshold, the
    HNSW graph. Items are read from the manifest lazily: :meth:`item` reads one row at its byte
    offset, so opening a 100,000-item index does not parse 100,000 CSV rows."""

    root: Path
    meta: dict[str, Any]
    vectors: np.ndarray
    ids: np.ndarray
    label_codes: np.ndarray
    label_names: list[str]
    offsets: np.ndarray | None = None
    ann: Any = None  # usearch.index.Index or None
    _items: list[Item] | None = field(default=None, repr=False)
    _rows_by_sorted_id: np.ndarray | None = field(default=None, repr=False)
    _sorted_ids: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def items(self) -> list[Item]:
        """Every item (parses the whole manifest once)."""
        if self._items is None:
            items = _read_manifest(self.root)
            if [it.id for it in items] != [int(i) for i in self.ids]:
                raise store.damaged(self.root, MANIFEST, f"{len(items)} rows whose ids are not "
                                                         f"those of the {len(self.ids)} in ids.npy")
            self._items = items
        return self._items

    def item(self, row: int) -> Item:
        """One item, read from its manifest row."""
        if self._items is not None or self.offsets is None:
            return self.items[row]
        start = int(self.offsets[row])
        with open(self.root / MANIFEST, "rb") as f:
            f.seek(start)
            if row + 1 < len(self.offsets):  # up to the next row: a quoted newline stays inside
                data = f.read(int(self.offsets[row + 1]) - start)
            else:
                data = f.read()
        try:
            return _item_from_row(data)
        except ValueError as e:
            raise store.damaged(self.root, MANIFEST, f"row {row}: {e}") from None

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Manifest rows of ANN keys (ids are ascending in manifest order, checked)."""
        ids = np.asarray(self.ids)
        if self._rows_by_sorted_id is None:
            if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
                self._rows_by_sorted_id = np.arange(len(ids))
                self._sorted_ids = ids
            else:
                self._rows_by_sorted_id = np.argsort(ids, kind="stable")
                self._sorted_ids = ids[self._rows_by_sorted_id]
        pos = np.searchsorted(self._sorted_ids, keys)
        return self._rows_by_sorted_id[np.clip(pos, 0, len(ids) - 1)]

    def search(self, queries: np.ndarray, k: int = 10, labels: Sequence[str | None] | None = None,
               exact: bool | None = None, expansion: int | None = None) -> list[list[Hit]]:
        """The ``k`` nearest items to each unit vector of ``queries`` ``[Q, D]``, best first.

        ``labels``: per query, a label to restrict the results to (``None``: any label); such a
        search is exact over that label's items. ``exact``: force exact (True) or approximate
        (False) search; by default the index's kind decides. ``expansion`` overrides HNSW ``ef``.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise JewelclfError(f"query vectors have {queries.shape[1]} dimensions but the index "
                                f"'{self.root}' holds {self.dim}; embed them with the index's model")
        if not np.isfinite(queries).all():
            raise JewelclfError("query vectors hold NaN or infinite values; the model that made "
                                "them is broken")
        k = max(0, int(k))
        out: list[list[Hit] | None] = [None] * len(queries)
        plain = [i for i in range(len(queries)) if labels is None or labels[i] is None]
        if plain:
            use_ann = self.ann is not None if exact is None else not exact
            if use_ann and self.ann is None:
                raise JewelclfError(f"index '{self.root}' has no HNSW graph (it is exact below "
                                    f"{self.meta['exact_threshold']} items)")
            found = (self._search_ann(queries[plain], k, expansion) if use_ann
                     else self._exact(np.arange(len(self)), queries[plain], k))
            for i, hits in zip(plain, found):
                out[i] = hits
        if labels is not None:
            codes = {name: code for code, name in enumerate(self.label_names)}
            for i, label in enumerate(labels):
                if label is None:
                    continue
                rows = (np.flatnonzero(np.asarray(self.label_codes) == codes[label])
                        if label in codes else np.zeros(0, np.int64))
                hits = self._exact(rows, queries[i:i + 1], k)[0] if len(rows) else []
                out[i] = [Hit(h.rank, int(rows[h.row]), h.similarity) for h in hits]
        return [o or [] for o in out]

    def _exact(self, rows: np.ndarray, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Exact search over ``rows`` of the vectors (all of them: memory-mapped, not copied).

        A damaged vector is found here rather than on open: a NaN or an infinity makes its
        similarity non-finite, which costs nothing to see, while scanning a memory-mapped
        matrix on every open would cost as much as a search."""
        whole = len(rows) == len(self)
        try:
            return exact_search(self.vectors if whole else np.asarray(self.vectors)[rows], queries, k)
        except NonFiniteRow as e:
            raise store.damaged(self.root, VECTORS, f"row {int(rows[e.row])} holds NaN or "
                                                   f"infinite values") from None

    def _search_ann(self, queries: np.ndarray, k: int, expansion: int | None) -> list[list[Hit]]:
        if k == 0 or len(self) == 0:
            return [[] for _ in queries]
        previous = self.ann.expansion_search
        self.ann.expansion_search = int(expansion or self.meta["hnsw"]["expansion_search"])
        try:
            matches = self.ann.search(queries, min(k, len(self)))
        finally:
            self.ann.expansion_search = previous
        if hasattr(matches, "counts"):  # BatchMatches: padded [Q, k] arrays
            keys, distances, counts = matches.keys, matches.distances, matches.counts
        else:  # one query row gives a plain Matches of length <= k
            keys, distances = matches.keys[None], matches.distances[None]
            counts = np.array([len(matches.keys)])
        result = []
        for q in range(len(queries)):
            n = int(counts[q])
            rows = self.rows_of(keys[q, :n].astype(np.uint64))
            # usearch's inner-product distance is 1 - dot; on unit vectors, dot is the cosine.
            sims = 1.0 - distances[q, :n].astype(np.float64)
            if not np.isfinite(sims).all():
                raise store.damaged(self.root, ANN_FILE, "its graph gives NaN or infinite "
                                                         "distances")
            result.append([Hit(r + 1, int(row), float(s)) for r, (row, s) in enumerate(zip(rows, sims))])
        return result


def _dot(block: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``queries @ block.T``. A few queries go through einsum's single-threaded loop: a
    multi-threaded BLAS matrix-vector product is several times slower on a busy machine."""
    if len(queries) <= 4:
        return np.stack([np.einsum("ij,j->i", block, q) for q in queries])
    return queries @ block.T


class NonFiniteRow(ValueError):
    """A row of the searched vectors holds a NaN or an infinity."""

    def __init__(self, row: int):
        super().__init__(f"row {row} holds NaN or infinite values")
        self.row = row


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int,
                 chunk: int = 65_536) -> list[list[Hit]]:
    """Brute-force top-``k`` by dot product (cosine on unit vectors); ties go to the lower row.

    Streams ``vectors`` in chunks, so a memory-mapped matrix is never copied whole. With finite
    queries, a row holding a NaN or an infinity raises :class:`NonFiniteRow`.
    """
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    n = len(vectors)
    k = min(max(0, int(k)), n)
    if k == 0:
        return [[] for _ in queries]
    best_sims = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, n, chunk):
        block = np.asarray(vectors[start:start + chunk], dtype=np.float32)
        sims = _dot(block, queries)
        if not np.isfinite(sims).all() and np.isfinite(queries).all():
            raise NonFiniteRow(start + int(np.flatnonzero(~np.isfinite(sims).all(axis=0))[0]))
        rows = np.broadcast_to(np.arange(start, start + len(block)), sims.shape)
        sims = np.concatenate([best_sims, sims], axis=1)
        rows = np.concatenate([best_rows, rows], axis=1)
        if sims.shape[1] > k:
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            sims = np.take_along_axis(sims, part, axis=1)
            rows = np.take_along_axis(rows, part, axis=1)
        best_sims, best_rows = sims, rows
    result = []
    for q in range(len(queries)):
        order = np.lexsort((best_rows[q], -best_sims[q]))
        result.append([Hit(r + 1, int(best_rows[q, i]), float(best_sims[q, i]))
                       for r, i in enumerate(order)])
    return result


def _item_from_row(data: bytes) -> Item:
    return _item(store.parse_row(data))


def _item(r: list[str]) -> Item:
    return Item(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), int(r[6]), r[7])


def _read_manifest(root: Path) -> list[Item]:
    """Every row of ``root``'s manifest; a damaged one is a one-line error naming it."""
    try:
        data = (root / MANIFEST).read_bytes()
        if not data.startswith(store.header_bytes()):
            raise ValueError("not the header jewelclf writes")
        if not data.endswith(b"\n"):
            raise ValueError("its last row is cut short")
        rows = csv.reader(io.StringIO(data[len(store.header_bytes()):].decode("utf-8"), newline=""))
        items = []
        for row, fields in enumerate(rows):
            try:
                items.append(_item(store.check_fields(fields)))
            except ValueError as e:
                raise ValueError(f"row {row}: {e}") from None
        return items
    except (OSError, ValueError) as e:
        raise store.damaged(root, MANIFEST, str(e)[:120]) from None


def _manifest_bytes(items: Iterable[Item]) -> tuple[bytes, np.ndarray]:
    """The manifest CSV as UTF-8, and the byte offset of each item's row in it.

    Paths are written with ``\\n`` line ends and no embedded newlines (csv quotes them), one
    row per line, so a row can be read back alone from its offset.
    """
    chunks, offsets, pos = [], [], 0
    for fields in [MANIFEST_FIELDS] + [
            (it.id, it.key, it.path, it.label, it.sku, it.size, it.mtime_ns, it.sha256) for it in items]:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(fields)
        data = buf.getvalue().encode("utf-8")
        offsets.append(pos)
        chunks.append(data)
        pos += len(data)
    return b"".join(chunks), np.array(offsets[1:], dtype=np.int64)


def _read_rejected(path: Path) -> list[list[str]] | None:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.reader(f))[1:]
    except OSError:
        return None


def is_index(path: Path) -> bool:
    return (Path(path) / META).is_file()


def require_index(root: Path) -> list[str]:
    """A one-line error unless ``root`` is an index folder (cheap: no TensorFlow needed).

    An update killed half-way is finished first; the notes say so.
    """
    root = Path(root)
    notes = store.recover(root)
    if not root.is_dir():
        raise JewelclfError(f"index '{root}' does not exist; build it with jewelclf index RUN_DIR "
                            f"CATALOGUE --output {root}")
    if not is_index(root):
        raise JewelclfError(f"'{root}' holds no jewelclf index (no {META}); build one with "
                            f"jewelclf index RUN_DIR CATALOGUE --output {root}")
    return notes


def load_index(root: Path, view: bool = True) -> SearchIndex:
    """Open an index folder. ``view`` memory-maps the vectors and the graph (read-only, fast)."""
    root = Path(root)
    require_index(root)
    try:
        meta = json.loads((root / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise store.damaged(root, META, f"{type(e).__name__}: {str(e)[:100]}") from None
    store.validate_meta(root, meta)
    try:
        mode = "r" if view else None
        vectors = np.load(root / VECTORS, mmap_mode=mode)
        ids = np.load(root / IDS, mmap_mode=mode)
        label_codes = np.load(root / LABELS, mmap_mode=mode)
        offsets = np.load(root / OFFSETS, mmap_mode=mode)
        label_names = list(meta["labels"])
        count = meta["count"]
    except (OSError, ValueError) as e:
        raise JewelclfError(f"index '{root}' is damaged ({type(e).__name__}: {str(e)[:120]}); "
                            f"{store.rebuild_hint(root)}") from None
    # A view's arrays are checked as a search reads them (SearchIndex._exact, item): scanning
    # them here would cost as much as a search on every open. An update reads them all anyway.
    store.check_arrays(root, meta, vectors, ids, label_codes, offsets, scan=not view)
    store.check_manifest(root, ids, offsets)
    ann = None
    if meta["kind"] == "hnsw":
        from usearch.index import Index

        try:
            ann = Index.restore(str(root / ANN_FILE), view=view)
        except Exception as e:  # noqa: BLE001  whatever the library raises: one line
            raise store.damaged(root, ANN_FILE, str(e)[:120]) from None
        if ann is None or len(ann) != count or ann.ndim != meta["dim"]:
            raise store.damaged(root, ANN_FILE, f"its graph does not hold the {count} "
                                                f"{meta['dim']}-d vectors of {META}")
        ann.expansion_search = int(meta["hnsw"]["expansion_search"])
    return SearchIndex(root, meta, vectors, ids, label_codes, label_names, offsets, ann)


def _library_version() -> str:
    import usearch

    return usearch.__version__


def new_ann(dim: int, connectivity: int = HNSW_CONNECTIVITY, expansion_add: int = HNSW_EXPANSION_ADD,
            expansion_search: int = HNSW_EXPANSION_SEARCH):
    """An empty USearch HNSW index over float32 unit vectors with inner-product distance."""
    from usearch.index import Index

    return Index(ndim=dim, metric="ip", dtype="f32", connectivity=connectivity,
                 expansion_add=expansion_add, expansion_search=expansion_search)


def build_ann(vectors: np.ndarray, ids: np.ndarray, **params):
    ann = new_ann(vectors.shape[1], **params)
    if len(ids):
        ann.add(np.asarray(ids, dtype=np.uint64), np.ascontiguousarray(vectors, dtype=np.float32))
    return ann


def _write_index(output: Path, meta: dict[str, Any], items: list[Item], vectors: np.ndarray,
                 ann, rejected_rows: list[list[str]]) -> None:
    """Write the whole index into a hidden folder beside ``output``, then swap it into place."""

    def write_files(tmp: Path) -> None:
        store.save_file(tmp / VECTORS, lambda f: np.save(
            f, np.ascontiguousarray(vectors, dtype=np.float32)))
        manifest, offsets = _manifest_bytes(items)
        store.save_file(tmp / MANIFEST, lambda f: f.write(manifest))
        store.save_file(tmp / OFFSETS, lambda f: np.save(f, offsets))
        store.save_file(tmp / IDS, lambda f: np.save(
            f, np.array([it.id for it in items], dtype=np.uint64)))
        code = {name: i for i, name in enumerate(meta["labels"])}
        store.save_file(tmp / LABELS, lambda f: np.save(
            f, np.array([code[it.label] for it in items], dtype=np.int32)))
        if ann is not None:
            ann.save(str(tmp / ANN_FILE))
            store.fsync_file(tmp / ANN_FILE)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "reason"])
        w.writerows(rejected_rows)
        store.save_file(tmp / REJECTED, lambda f: f.write(buf.getvalue().encode("utf-8")))
        # Last: a hidden copy with a meta.json is complete, and recover() may swap it in.
        store.save_file(tmp / META, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))

    store.swap_in(output, write_files)


# --------------------------------------------------------------------------------------------
# Building and updating


@dataclass
class BuildSummary:
    output: Path
    kind: str
    count: int
    dim: int
    embedded: int
    kept: int
    removed: int
    changed: int
    rejected: int
    ann_rebuilt: bool
    embed_seconds: float
    ann_seconds: float
    total_seconds: float
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        verb = "built" if self.kept == 0 and self.removed == 0 and self.changed == 0 else "updated"
        graph = ("exact (NumPy)" if self.kind == "exact"
                 else f"HNSW ({'rebuilt' if self.ann_rebuilt else 'updated in place'})")
        return (f"{verb} index '{self.output}': {self.count} items, {self.dim}-d, {graph}; "
                f"embedded {self.embedded} ({self.changed} of them changed files), kept "
                f"{self.kept}, removed {self.removed}, rejected {self.rejected} unreadable; embed "
                f"{self.embed_seconds:.1f} s, index {self.ann_seconds:.1f} s, total "
                f"{self.total_seconds:.1f} s")


def _csv_skus(spec: str) -> dict[str, str]:
    """``path -> sku`` from a ``sku`` column of a CSV catalogue (``group`` is used otherwise)."""
    from jewelclf.data.sources import manifest_path

    path = Path(spec)
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        return {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "sku" not in fields:
            return {}
        rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    # keyed as load_source keys the records (./img//a.jpg is img/a.jpg); bad rows failed there
    return {manifest_path(path.parent, (row.get("path") or "").strip())[1]: (row.get("sku") or "").strip()
            for row in rows if (row.get("path") or "").strip()}


def _stat(path: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a regular file; None for anything else (the data check says why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat_mod.S_ISREG(st.st_mode):  # a FIFO would block the hash forever
        return None
    return st.st_size, st.st_mtime_ns


def _hash_files(paths: list[str | None]) -> list[str]:
    def one(p: str | None) -> str:
        if p is None:
            return ""
        try:
            return _sha256(p)
        except OSError:
            return ""

    with bars.bar(len(paths), "hashing files") as progress, \
            ThreadPoolExecutor(max_workers=HASH_WORKERS) as pool:
        out = []
        for digest in pool.map(one, paths):
            out.append(digest)
            progress.update()
        return out


def embed_records(embedder, source, records, data_cfg, size: int, batch_size: int,
                  log: Log = print) -> np.ndarray:
    """Unit vectors ``[N, D]`` of ``records``, streamed through tf.data in batches.

    Images are decoded and resized exactly as for training (:func:`decoded_dataset`); only the
    vectors are kept, never the images.
    """
    import tensorflow as tf

    from jewelclf.data.pipeline import AUTOTUNE, decoded_dataset

    dim = int(embedder.output.shape[-1])
    out = np.empty((len(records), dim), dtype=np.float32)
    if not records:
        return out
    ds = decoded_dataset(source, records, data_cfg, size).map(lambda x, y: x)
    ds = ds.batch(batch_size).map(lambda x: tf.cast(x, tf.float32), num_parallel_calls=AUTOTUNE)
    ds = ds.prefetch(AUTOTUNE)
    run = tf.function(lambda x: embedder(x, training=False), reduce_retracing=True)
    done, next_report, step = 0, 0, max(batch_size, len(records) // 10)
    try:
        with bars.bar(len(records), "embedding", unit="image") as progress:
            for batch in ds:
                vec = run(batch).numpy()
                out[done:done + len(vec)] = vec
                done += len(vec)
                progress.update(len(vec))
                # Lines for logs; on a terminal the bar says it (a line would break the bar).
                if progress.disable and done >= next_report and len(records) > batch_size:
                    log(f"embedded {done}/{len(records)}")
                    next_report = done + step
    except tf.errors.OpError as e:
        first = (e.message or str(e)).strip().splitlines()[-1][:160]
        raise JewelclfError(f"a catalogue file changed or vanished while embedding ({first}); "
                            f"run jewelclf index again") from None
    return out


def build_index(model_spec: str | Path, catalogue: str, output: Path, batch_size: int | None = None,
                layer: str = "pool", exact_threshold: int | None = None,
                rebuild: bool = False, log: Log = print) -> BuildSummary:
    """Build ``output`` from ``catalogue``, or update the index already there.

    An update embeds only files that are new or whose content changed (size and mtime first,
    then SHA-256), and drops items whose files are gone. It refuses an index made with another
    model or layer unless ``rebuild``.
    """
    from jewelclf.data.sources import load_source
    from jewelclf.data.validate import check_records
    from jewelclf.modeling.embedding import embedding_model

    t0 = time.perf_counter()
    output = Path(output)
    ref = resolve_model(model_spec)
    exact_threshold = DEFAULT_EXACT_THRESHOLD if exact_threshold is None else int(exact_threshold)
    if exact_threshold < 0:
        raise JewelclfError(f"--exact-threshold must be 0 or more, got {exact_threshold}")
    if batch_size is not None and batch_size < 1:
        raise JewelclfError(f"--batch-size must be at least 1, got {batch_size}")

    for note in store.recover(output):
        log(note)
    previous: SearchIndex | None = None
    if output.exists():
        if not output.is_dir():
            raise JewelclfError(f"--output '{output}' is a file; choose a folder path for the index")
        if is_index(output) and rebuild:
            log(f"rebuilding '{output}' from scratch")  # not even read: it may be damaged
        elif is_index(output):
            previous = load_index(output, view=False)
            recorded = previous.meta["model"]
            if not same_model(recorded, ref.model_file):
                raise JewelclfError(
                    f"index '{output}' was built with another model ({recorded['path']}); choose a "
                    f"new --output, or pass --rebuild to re-embed the whole catalogue")
            if previous.meta["layer"] != layer:
                raise JewelclfError(
                    f"index '{output}' holds '{previous.meta['layer']}' embeddings, not '{layer}'; "
                    f"choose a new --output, or pass --rebuild")
        elif any(output.iterdir()):
            raise JewelclfError(f"--output '{output}' is not empty and holds no jewelclf index; "
                                f"choose a new folder")

    source = load_source(str(catalogue))
    source.refuse_conflicts()
    if source.tfds is not None:
        raise JewelclfError(f"'{catalogue}' is a TFDS dataset; jewelclf index needs image files "
                            f"(a folder of class subfolders or a CSV manifest)")
    skus = _csv_skus(str(catalogue))
    catalogue_id = str(Path(catalogue).expanduser().resolve())
    records = source.records
    fingerprint = model_fingerprint(ref.model_file)

    prev_rows = {it.key: (row, it) for row, it in enumerate(previous.items)} if previous else {}
    kept: list[tuple[int, Item]] = []  # (row in the previous vectors, updated item)
    candidates = []  # (record, stat) needing a hash
    for r in records:
        st = _stat(r.path)
        sku = skus.get(r.key, "") or (r.group or "")
        p = prev_rows.get(r.key)
        if st is not None and p is not None and (p[1].size, p[1].mtime_ns) == st:
            row, it = p
            kept.append((row, Item(it.id, r.key, r.path, r.label, sku, *st, it.sha256)))
        else:
            candidates.append((r, st, sku))
    model = None
    if candidates:  # some file may need embedding: a bad model file fails before any is read
        model = rd.load_model_file(ref.model_file, len(ref.class_names)
                                 if ref.run_dir is not None and ref.class_names else None)
    hashes = _hash_files([r.path if st is not None else None for r, st, _ in candidates])
    to_embed = []
    for (r, st, sku), digest in zip(candidates, hashes):
        p = prev_rows.get(r.key)
        if p is not None and st is not None and digest and digest == p[1].sha256:
            kept.append((p[0], Item(p[1].id, r.key, r.path, r.label, sku, *st, digest)))
        else:
            to_embed.append((r, st or (0, 0), sku, digest))
    kept.sort(key=lambda pair: pair[0])  # keep the previous order (ids stay ascending)
    kept_keys = {it.key for _, it in kept}
    removed_items = [it for it in (previous.items if previous else []) if it.key not in kept_keys]

    rejected_rows: list[list[str]] = []
    new_records = []
    if to_embed:
        checks = check_records([r for r, *_ in to_embed], ref.max_pixels, ref.min_image_side)
        for c, entry in zip(checks, to_embed):
            if c.ok:  # the checked record carries its format, which routes its decode
                new_records.append((c.record, *entry[1:]))
            else:
                rejected_rows.append([c.record.path, c.record.label, c.reason])
    if rejected_rows:
        log(f"{len(rejected_rows)} unreadable file(s) left out: {output / REJECTED}")
    if not kept and not new_records:
        raise JewelclfError(f"no readable images in '{catalogue}'; see the reasons above, or "
                            f"pass a folder of class subfolders or a CSV manifest")

    t_embed = time.perf_counter()
    if new_records:
        size = int(model.input_shape[1])
        if ref.image_size and ref.image_size != size:
            raise JewelclfError(f"'{ref.model_file}' takes {size} px but its config says "
                                f"{ref.image_size}; the run is inconsistent")
        embedder = embedding_model(model, layer)
        dim = int(embedder.output.shape[-1])
        if previous is not None and previous.dim != dim:
            raise JewelclfError(f"index '{output}' holds {previous.dim}-d vectors but the model "
                                f"gives {dim}-d; pass --rebuild")
        from jewelclf.config import DataConfig

        data_cfg = DataConfig(image_size=size, resize=ref.resize)
        log(f"embedding {len(new_records)} image(s) with '{ref.model_file}' ({layer}, {dim}-d)")
        new_vectors = embed_records(embedder, source, [r for r, *_ in new_records], data_cfg, size,
                                    batch_size or ref.batch_size, log)
        bad = store.first_nonfinite_row(new_vectors)
        if bad is not None:
            count = int((~np.isfinite(new_vectors).all(axis=1)).sum())
            raise JewelclfError(f"the model '{ref.model_file}' gives a NaN or infinite embedding "
                                f"for '{new_records[bad][0].path}' ({count} of {len(new_records)} "
                                f"images); its weights are broken: train it again, or index with "
                                f"another run")
    else:  # nothing new: the model need not even be loaded
        size, dim = int(previous.meta["image_size"]), previous.dim
        new_vectors = np.zeros((0, dim), np.float32)
    embed_seconds = time.perf_counter() - t_embed

    next_id = int(previous.meta["next_id"]) if previous else 0
    new_items = []
    for r, st, sku, digest in new_records:
        new_items.append(Item(next_id, r.key, r.path, r.label, sku, st[0], st[1], digest))
        next_id += 1
    items = [it for _, it in kept] + new_items
    kept_rows = np.array([row for row, _ in kept], dtype=np.int64)
    old_vectors = (np.asarray(previous.vectors)[kept_rows] if previous is not None and len(kept_rows)
                   else np.zeros((0, dim), np.float32))
    vectors = np.concatenate([old_vectors, new_vectors]) if len(old_vectors) else new_vectors
    ids = np.array([it.id for it in items], dtype=np.uint64)

    t_ann = time.perf_counter()
    kind = "hnsw" if len(items) > exact_threshold else "exact"
    hnsw = dict(previous.meta["hnsw"]) if previous else {
        "connectivity": HNSW_CONNECTIVITY, "expansion_add": HNSW_EXPANSION_ADD,
        "expansion_search": HNSW_EXPANSION_SEARCH}
    ann, ann_rebuilt = None, False
    if kind == "hnsw":
        stale = [it.id for it in removed_items]
        reuse = previous is not None and previous.ann is not None
        if reuse:
            deleted = int(previous.meta.get("deleted", 0)) + len(stale)
            reuse = deleted <= MAX_DELETED_FRACTION * max(1, len(items))
        if reuse:
            ann = previous.ann
            if stale:
                ann.remove(np.array(stale, dtype=np.uint64))
            if new_items:
                ann.add(ids[len(kept):], np.ascontiguousarray(new_vectors))
            deleted_count = deleted
        else:
            log(f"building the HNSW graph over {len(items)} vectors")
            ann = build_ann(vectors, ids, **hnsw)
            ann_rebuilt, deleted_count = True, 0
    else:
        deleted_count = 0
    ann_seconds = time.perf_counter() - t_ann

    import jewelclf

    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta = {
        "format": INDEX_FORMAT,
        "jewelclf": jewelclf.__version__,
        "model": {**fingerprint, "run_dir": str(ref.run_dir.resolve()) if ref.run_dir else None,
                  "backbone": ref.backbone},
        "class_names": ref.class_names,
        "layer": layer,
        "dim": dim,
        "image_size": size,
        "resize": ref.resize,
        "max_pixels": ref.max_pixels,
        "min_image_side": ref.min_image_side,
        "metric": METRIC,
        "library": LIBRARY,
        "library_version": _library_version(),
        "kind": kind,
        "exact_threshold": exact_threshold,
        "hnsw": hnsw,
        "deleted": deleted_count,
        "count": len(items),
        "labels": sorted({it.label for it in items}),
        "next_id": next_id,
        "catalogue": catalogue_id,
        "created": previous.meta.get("created", now) if previous else now,
        "updated": now,
    }
    unchanged = (previous is not None and not new_items and not removed_items
                 and items == previous.items and kind == previous.kind
                 and exact_threshold == previous.meta["exact_threshold"]
                 and rejected_rows == _read_rejected(output / REJECTED))
    if not unchanged:  # a re-run with nothing to do leaves the index untouched
        _write_index(output, meta, items, vectors, ann, rejected_rows)
    notes = list(source.notes)
    if previous is not None and previous.meta.get("catalogue") != catalogue_id:
        notes.append(f"the catalogue was '{previous.meta.get('catalogue')}' before; items are "
                     f"matched by their path relative to it")
    current_keys = {r.key for r in records}
    gone = sum(1 for it in removed_items if it.key not in current_keys)
    changed = sum(1 for it in new_items if it.key in prev_rows)
    return BuildSummary(output, kind, len(items), dim, len(new_items), len(kept),
                        gone, changed, len(rejected_rows), ann_rebuilt, embed_seconds,
                        ann_seconds, time.perf_counter() - t0, notes)


# --------------------------------------------------------------------------------------------
# Querying with photos


@dataclass
class QueryResult:
    query: str
    predicted_label: str | None
    predicted_score: float | None
    restricted_to: str | None
    results: list[dict[str, Any]]


@dataclass
class SimilarReport:
    index: str
    kind: str
    k: int
    queries: list[QueryResult]
    errors: list[dict[str, str]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_for_search(index_dir: Path) -> tuple[SearchIndex, Any]:
    """The index and its model's Keras model, refusing an index whose model has changed."""
    index = load_index(index_dir)
    recorded = index.meta["model"]
    model_file = Path(recorded["path"])
    if not model_file.is_file():
        raise JewelclfError(f"the model '{model_file}' that index '{index_dir}' was built with is "
                            f"gone; rebuild the index with jewelclf index RUN_DIR CATALOGUE "
                            f"--output {index_dir} --rebuild")
    if not same_model(recorded, model_file):
        raise JewelclfError(f"index '{index_dir}' was built with a different model than the one "
                            f"now at '{model_file}'; rebuild it with jewelclf index RUN_DIR "
                            f"CATALOGUE --output {index_dir} --rebuild")
    return index, rd.load_model_file(model_file)


def embed_query_images(model, paths: Sequence[str], layer: str, size: int, resize: str,
                       max_pixels: int, min_side: int, batch_size: int = 32):
    """(vectors ``[n, D]``, probabilities ``[n, C]``, readable paths, errors) for query files."""
    import tensorflow as tf

    from jewelclf.data.images import load_image
    from jewelclf.data.sources import Record
    from jewelclf.data.validate import check_file
    from jewelclf.modeling.embedding import embedding_and_probabilities

    both = embedding_and_probabilities(model, layer)
    ok_paths, pixels, errors = [], [], []
    read: dict[str, bytes] = {}

    def keep(record, data, _check):
        read[record.path] = data

    for p in paths:
        # The training data check first: it refuses folders, FIFOs, decode bombs and junk.
        # The bytes it checked are the bytes decoded: a file swapped after the check is not read.
        check = check_file(Record(str(p), str(p), ""), max_pixels, min_side, on_bytes=keep)
        if not check.ok:
            errors.append({"query": str(p), "error": check.reason})
            continue
        data = read.pop(str(p))
        ok_paths.append(str(p))
        pixels.append(load_image(tf.constant(data), size, resize).numpy())
    vectors, probs = [], []
    for start in range(0, len(pixels), batch_size):
        batch = np.stack(pixels[start:start + batch_size]).astype(np.float32)
        v, pr = both.predict_on_batch(batch)
        vectors.append(np.asarray(v))
        probs.append(np.asarray(pr))
    if not vectors:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), ok_paths, errors
    return np.concatenate(vectors), np.concatenate(probs), ok_paths, errors


def similar(index_dir: Path, images: Sequence[str], k: int = 10, same_class: bool = False) -> SimilarReport:
    """The ``k`` catalogue items most similar to each query photo.

    With ``same_class``, only items whose label is the query's predicted class are returned.
    Unreadable query files are reported in ``errors``; all of them unreadable is an error.
    """
    if k < 1:
        raise JewelclfError(f"--k must be at least 1, got {k}")
    index, model = open_for_search(index_dir)
    meta = index.meta
    class_names = meta.get("class_names")
    if same_class and not class_names:
        raise JewelclfError(f"the model of index '{index_dir}' has no class names beside it, so "
                            f"--same-class cannot tell the query's class; drop --same-class")
    vectors, probs, ok_paths, errors = embed_query_images(
        model, images, meta["layer"], int(meta["image_size"]), meta["resize"],
        int(meta["max_pixels"]), int(meta["min_image_side"]))
    finite = np.isfinite(vectors).all(axis=1) if len(ok_paths) else np.zeros(0, bool)
    errors += [{"query": path, "error": "the model gives a NaN or infinite embedding for it"}
               for path, ok in zip(ok_paths, finite) if not ok]
    if not finite.all():  # a search would rank NaN similarities at random
        vectors, probs = vectors[finite], probs[finite]
        ok_paths = [p for p, ok in zip(ok_paths, finite) if ok]
    if not ok_paths:
        first = errors[0] if errors else {"query": "", "error": "no images given"}
        raise JewelclfError(f"no readable query image: '{first['query']}': {first['error']}")
    predicted: list[tuple[str | None, float | None]] = []
    for row in probs:
        if class_names and len(class_names) == len(row):
            i = int(np.argmax(row))
            predicted.append((str(class_names[i]), float(row[i])))
        else:
            predicted.append((None, None))
    labels = [p[0] for p in predicted] if same_class else None
    hits = index.search(vectors, k, labels=labels)
    queries = []
    for path, (label, score), found in zip(ok_paths, predicted, hits):
        rows = []
        for h in found:
            it = index.item(h.row)
            rows.append({"rank": h.rank, "item": it.name, "path": it.key, "file": it.path,
                         "sku": it.sku or None, "label": it.label,
                         "similarity": round(float(h.similarity), 6)})
        queries.append(QueryResult(path, label, None if score is None else round(score, 6),
                                   label if same_class else None, rows))
    return SimilarReport(str(index_dir), index.kind, k, queries, errors)


def format_similar(report: SimilarReport) -> str:
    """Per query: a header line and a table of rank, item (SKU or path), label, similarity."""
    blocks = []
    for q in report.queries:
        head = f"{q.query}"
        if q.predicted_label is not None:
            head += f"  (predicted {q.predicted_label} {q.predicted_score:.3f}"
            head += f"; {q.restricted_to} items only)" if q.restricted_to else ")"
        lines = [head]
        if not q.results:
            lines.append("  no items" + (f" labelled {q.restricted_to}" if q.restricted_to else ""))
        else:
            iw = max(len("item"), *(len(r["item"]) for r in q.results))
            lw = max(len("label"), *(len(r["label"]) for r in q.results))
            lines.append(f"  {'rank':>4}  {'item':<{iw}}  {'label':<{lw}}  similarity")
            for r in q.results:
                lines.append(f"  {r['rank']:>4}  {r['item']:<{iw}}  {r['label']:<{lw}}  "
                             f"{r['similarity']:10.4f}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
