"""Building and updating an index: ``jewelclf index``.

A build reads the catalogue, keeps the vectors of files unchanged since the previous version
(size and mtime first, then SHA-256), embeds the new and changed ones through the training
decode, updates or rebuilds the HNSW graph above the exact threshold, and writes the whole new
version with the crash-safe swap of :mod:`jewelclf.search.store`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat as stat_mod
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf import bars
from jewelclf import runs as rd
from jewelclf.errors import JewelclfError
from jewelclf.runs import timestamp
from jewelclf.search import store
from jewelclf.search.ann import (
    HNSW_CONNECTIVITY,
    HNSW_EXPANSION_ADD,
    HNSW_EXPANSION_SEARCH,
    LIBRARY,
    METRIC,
    build_ann,
    library_version,
)
from jewelclf.search.index import (
    ANN_FILE,
    IDS,
    LABELS,
    OFFSETS,
    REJECTED,
    Item,
    SearchIndex,
    is_index,
    load_index,
    manifest_bytes,
)
from jewelclf.search.model_ref import ModelRef, model_fingerprint, resolve_model, same_model, sha256_file
from jewelclf.search.store import INDEX_FORMAT, MANIFEST, META, VECTORS

Log = Callable[[str], None]

DEFAULT_EXACT_THRESHOLD = 50_000
"""Catalogues up to this many items are searched exactly (NumPy); larger ones through HNSW."""
MAX_DELETED_FRACTION = 0.25
"""An HNSW graph with more removed than this share of live items is rebuilt from the vectors."""
HASH_WORKERS = 4


def read_rejected(path: Path) -> list[list[str]] | None:
    """The rows of an index's ``rejected_files.csv`` (no header), or None when unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.reader(f))[1:]
    except OSError:
        return None


def write_index(output: Path, meta: dict[str, Any], items: list[Item], vectors: np.ndarray,
                 ann, rejected_rows: list[list[str]]) -> None:
    """Write the whole index into a hidden folder beside ``output``, then swap it into place."""

    def write_files(tmp: Path) -> None:
        store.save_file(tmp / VECTORS, lambda f: np.save(
            f, np.ascontiguousarray(vectors, dtype=np.float32)))
        manifest, offsets = manifest_bytes(items)
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



@dataclass
class BuildSummary:
    """What a build or an update did, and how long it took."""

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
        """One line for people: counts, the kind of graph and the timings."""
        verb = "built" if self.kept == 0 and self.removed == 0 and self.changed == 0 else "updated"
        graph = ("exact (NumPy)" if self.kind == "exact"
                 else f"HNSW ({'rebuilt' if self.ann_rebuilt else 'updated in place'})")
        return (f"{verb} index '{self.output}': {self.count} items, {self.dim}-d, {graph}; "
                f"embedded {self.embedded} ({self.changed} of them changed files), kept "
                f"{self.kept}, removed {self.removed}, rejected {self.rejected} unreadable; embed "
                f"{self.embed_seconds:.1f} s, index {self.ann_seconds:.1f} s, total "
                f"{self.total_seconds:.1f} s")


def csv_skus(spec: str) -> dict[str, str]:
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
            return sha256_file(p)
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



# --------------------------------------------------------------------------------------------
# build_index, step by step


def _open_previous(output: Path, ref: ModelRef, layer: str, rebuild: bool, log: Log) -> SearchIndex | None:
    """The index already at ``output`` to update, or None; refuses another model or layer."""
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
    return previous


def _read_catalogue(catalogue: str):
    """The catalogue's source (image files only), its SKUs by key, and its resolved path."""
    from jewelclf.data.sources import load_source

    source = load_source(str(catalogue))
    source.refuse_conflicts()
    if source.tfds is not None:
        raise JewelclfError(f"'{catalogue}' is a TFDS dataset; jewelclf index needs image files "
                            f"(a folder of class subfolders or a CSV manifest)")
    skus = csv_skus(str(catalogue))
    catalogue_id = str(Path(catalogue).expanduser().resolve())
    return source, skus, catalogue_id


@dataclass
class _Reuse:
    """What an update keeps of the previous version, and what it must embed."""

    prev_rows: dict[str, tuple[int, Item]]
    kept: list[tuple[int, Item]]  # (row in the previous vectors, updated item)
    to_embed: list[tuple[Any, tuple[int, int], str, str]]  # (record, stat, sku, sha256)
    removed_items: list[Item]
    model: Any  # the Keras model, loaded only when some file may need embedding


def _reuse_previous(records, skus: dict[str, str], previous: SearchIndex | None, ref: ModelRef) -> _Reuse:
    """Match ``records`` to the previous items: same stat, or else same SHA-256, is kept."""
    prev_rows = {it.key: (row, it) for row, it in enumerate(previous.items)} if previous else {}
    kept: list[tuple[int, Item]] = []
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
    return _Reuse(prev_rows, kept, to_embed, removed_items, model)


def _check_new(reuse: _Reuse, ref: ModelRef, output: Path, catalogue: str, log: Log):
    """The files to embed that pass the data check, and the rows of those that do not."""
    from jewelclf.data.validate import check_records

    rejected_rows: list[list[str]] = []
    new_records = []
    if reuse.to_embed:
        checks = check_records([r for r, *_ in reuse.to_embed], ref.max_pixels, ref.min_image_side)
        for c, entry in zip(checks, reuse.to_embed):
            if c.ok:  # the checked record carries its format, which routes its decode
                new_records.append((c.record, *entry[1:]))
            else:
                rejected_rows.append([c.record.path, c.record.label, c.reason])
    if rejected_rows:
        log(f"{len(rejected_rows)} unreadable file(s) left out: {output / REJECTED}")
    if not reuse.kept and not new_records:
        raise JewelclfError(f"no readable images in '{catalogue}'; see the reasons above, or "
                            f"pass a folder of class subfolders or a CSV manifest")
    return new_records, rejected_rows


def _embed_new(model, new_records, ref: ModelRef, layer: str, previous: SearchIndex | None,
               output: Path, source, batch_size: int | None, log: Log):
    """``(image size, dim, vectors)`` of the new records; refuses an inconsistent model."""
    from jewelclf.modeling.embedding import embedding_model

    if not new_records:  # nothing new: the model need not even be loaded
        dim = previous.dim
        return int(previous.meta["image_size"]), dim, np.zeros((0, dim), np.float32)
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
    return size, dim, new_vectors


def _assemble(previous: SearchIndex | None, kept, new_records, new_vectors: np.ndarray, dim: int):
    """``(items, new items, vectors, ids, next id)`` of the new version, kept items first."""
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
    return items, new_items, vectors, ids, next_id


def _update_ann(previous: SearchIndex | None, items, new_items, removed_items, vectors, ids,
                new_vectors, n_kept: int, exact_threshold: int, log: Log):
    """``(kind, hnsw params, graph or None, rebuilt, deleted count)``: the previous graph
    updated in place, or a new one when too much of it was removed."""
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
                ann.add(ids[n_kept:], np.ascontiguousarray(new_vectors))
            deleted_count = deleted
        else:
            log(f"building the HNSW graph over {len(items)} vectors")
            ann = build_ann(vectors, ids, **hnsw)
            ann_rebuilt, deleted_count = True, 0
    else:
        deleted_count = 0
    return kind, hnsw, ann, ann_rebuilt, deleted_count


def _index_meta(ref: ModelRef, fingerprint: dict[str, Any], previous: SearchIndex | None, *,
                layer: str, dim: int, size: int, kind: str, exact_threshold: int,
                hnsw: dict[str, Any], deleted: int, items: list[Item], next_id: int,
                catalogue_id: str) -> dict[str, Any]:
    """The new version's ``meta.json``."""
    import jewelclf

    now = timestamp()
    return {
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
        "library_version": library_version(),
        "kind": kind,
        "exact_threshold": exact_threshold,
        "hnsw": hnsw,
        "deleted": deleted,
        "count": len(items),
        "labels": sorted({it.label for it in items}),
        "next_id": next_id,
        "catalogue": catalogue_id,
        "created": previous.meta.get("created", now) if previous else now,
        "updated": now,
    }


def build_index(model_spec: str | Path, catalogue: str, output: Path, batch_size: int | None = None,
                layer: str = "pool", exact_threshold: int | None = None,
                rebuild: bool = False, log: Log = print) -> BuildSummary:
    """Build ``output`` from ``catalogue``, or update the index already there.

    An update embeds only files that are new or whose content changed (size and mtime first,
    then SHA-256), and drops items whose files are gone. It refuses an index made with another
    model or layer unless ``rebuild``.
    """
    t0 = time.perf_counter()
    output = Path(output)
    ref = resolve_model(model_spec)
    exact_threshold = DEFAULT_EXACT_THRESHOLD if exact_threshold is None else int(exact_threshold)
    if exact_threshold < 0:
        raise JewelclfError(f"--exact-threshold must be 0 or more, got {exact_threshold}")
    if batch_size is not None and batch_size < 1:
        raise JewelclfError(f"--batch-size must be at least 1, got {batch_size}")
    previous = _open_previous(output, ref, layer, rebuild, log)
    source, skus, catalogue_id = _read_catalogue(catalogue)
    records = source.records
    fingerprint = model_fingerprint(ref.model_file)
    reuse = _reuse_previous(records, skus, previous, ref)
    new_records, rejected_rows = _check_new(reuse, ref, output, catalogue, log)

    t_embed = time.perf_counter()
    size, dim, new_vectors = _embed_new(reuse.model, new_records, ref, layer, previous, output,
                                        source, batch_size, log)
    embed_seconds = time.perf_counter() - t_embed
    items, new_items, vectors, ids, next_id = _assemble(previous, reuse.kept, new_records, new_vectors, dim)
    t_ann = time.perf_counter()
    kind, hnsw, ann, ann_rebuilt, deleted = _update_ann(
        previous, items, new_items, reuse.removed_items, vectors, ids, new_vectors, len(reuse.kept),
        exact_threshold, log)
    ann_seconds = time.perf_counter() - t_ann

    meta = _index_meta(ref, fingerprint, previous, layer=layer, dim=dim, size=size, kind=kind,
                       exact_threshold=exact_threshold, hnsw=hnsw, deleted=deleted, items=items,
                       next_id=next_id, catalogue_id=catalogue_id)
    unchanged = (previous is not None and not new_items and not reuse.removed_items
                 and items == previous.items and kind == previous.kind
                 and exact_threshold == previous.meta["exact_threshold"]
                 and rejected_rows == read_rejected(output / REJECTED))
    if not unchanged:  # a re-run with nothing to do leaves the index untouched
        write_index(output, meta, items, vectors, ann, rejected_rows)
    notes = list(source.notes)
    if previous is not None and previous.meta.get("catalogue") != catalogue_id:
        notes.append(f"the catalogue was '{previous.meta.get('catalogue')}' before; items are "
                     f"matched by their path relative to it")
    current_keys = {r.key for r in records}
    gone = sum(1 for it in reuse.removed_items if it.key not in current_keys)
    changed = sum(1 for it in new_items if it.key in reuse.prev_rows)
    return BuildSummary(output, kind, len(items), dim, len(new_items), len(reuse.kept),
                        gone, changed, len(rejected_rows), ann_rebuilt, embed_seconds,
                        ann_seconds, time.perf_counter() - t0, notes)
