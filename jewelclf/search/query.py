"""Querying an index with photos: ``jewelclf similar``.

Each query photo passes the training data check, is decoded and resized as the index's images
were, and is embedded by the index's model (refused if the model file changed since); its
nearest catalogue items come back as a :class:`SimilarReport`, optionally restricted to the
query's predicted class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf import runs as rd
from jewelclf.errors import JewelclfError
from jewelclf.search.index import SearchIndex, load_index
from jewelclf.search.model_ref import same_model


@dataclass
class QueryResult:
    """One query photo: its predicted class and score, and its nearest items, best first."""

    query: str
    predicted_label: str | None
    predicted_score: float | None
    restricted_to: str | None
    results: list[dict[str, Any]]


@dataclass
class SimilarReport:
    """What ``jewelclf similar`` reports: the index, ``k``, each query's results, the errors."""

    index: str
    kind: str
    k: int
    queries: list[QueryResult]
    errors: list[dict[str, str]]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
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
