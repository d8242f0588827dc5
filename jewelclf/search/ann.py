"""The approximate-nearest-neighbour graph of a large index: USearch HNSW over unit vectors.

Its parameters (``M``, ``efConstruction``, ``ef``) are recorded in each index's ``meta.json``;
the library is imported only here and where an index is opened, so that small, exact indexes
never load it.
"""

from __future__ import annotations

import numpy as np

METRIC = "cosine"
LIBRARY = "usearch"
HNSW_CONNECTIVITY = 16
"""HNSW ``M``: links per node per layer."""
HNSW_EXPANSION_ADD = 128
"""HNSW ``efConstruction``: the candidate list while inserting."""
HNSW_EXPANSION_SEARCH = 128
"""HNSW ``ef``: the candidate list while searching (recall against speed)."""


def library_version() -> str:
    """The installed USearch version, recorded in ``meta.json``."""
    import usearch

    return usearch.__version__


def new_ann(dim: int, connectivity: int = HNSW_CONNECTIVITY, expansion_add: int = HNSW_EXPANSION_ADD,
            expansion_search: int = HNSW_EXPANSION_SEARCH):
    """An empty USearch HNSW index over float32 unit vectors with inner-product distance."""
    from usearch.index import Index

    return Index(ndim=dim, metric="ip", dtype="f32", connectivity=connectivity,
                 expansion_add=expansion_add, expansion_search=expansion_search)


def build_ann(vectors: np.ndarray, ids: np.ndarray, **params):
    """A new HNSW graph holding ``vectors`` under the keys ``ids``."""
    ann = new_ann(vectors.shape[1], **params)
    if len(ids):
        ann.add(np.asarray(ids, dtype=np.uint64), np.ascontiguousarray(vectors, dtype=np.float32))
    return ann
