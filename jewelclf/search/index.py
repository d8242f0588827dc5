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
everything read back is checked (:mod:`jewelclf.search.store`). Building lives in :mod:`jewelclf.search.build`, querying
with photos in :mod:`jewelclf.search.query`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf.errors import JewelclfError
from jewelclf.search import store
from jewelclf.search.store import MANIFEST, MANIFEST_FIELDS, META, VECTORS

ANN_FILE = "index.usearch"
IDS = "ids.npy"
LABELS = "labels.npy"
OFFSETS = "manifest_offsets.npy"
REJECTED = "rejected_files.csv"


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
    """One search result: its 1-based rank, its row in the index, its cosine similarity."""

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
        """``exact`` or ``hnsw``."""
        return self.meta["kind"]

    @property
    def dim(self) -> int:
        """The vectors' dimension."""
        return int(self.meta["dim"])

    @property
    def items(self) -> list[Item]:
        """Every item (parses the whole manifest once)."""
        if self._items is None:
            items = read_manifest(self.root)
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


def read_manifest(root: Path) -> list[Item]:
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


def manifest_bytes(items: Iterable[Item]) -> tuple[bytes, np.ndarray]:
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


def is_index(path: Path) -> bool:
    """Whether ``path`` holds an index (its ``meta.json``)."""
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

