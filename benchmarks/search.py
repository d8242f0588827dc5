"""Visual search benchmarks: HNSW (USearch) against exact NumPy brute force, side by side.

Catalogue mode (a trained run, photos on disk)::

    python benchmarks/search.py RUN_DIR --catalogue DATA/training --queries DATA/test

builds an index of the catalogue with the HNSW graph forced on (``exact_threshold=0``), embeds
the query photos, and prints: index build time (embedding and graph apart), index load time,
recall@10 of HNSW against exact search at several ``ef``, precision@5 by class label (exact and
HNSW), search latency p50/p99 per single query (NumPy exact and HNSW), and the time to embed one
photo (decode, resize, CNN), which dominates a query end to end.

Scale mode (random unit vectors, no model)::

    python benchmarks/search.py --scale 1000000 --dim 256

builds the HNSW graph over N random unit vectors and prints build time, peak memory (RSS, after
the build and for the whole run, whose exact ground truth needs more),
save and load time, recall@10 against exact search at several ``ef``, and p50/p99 latency of a
single query for HNSW and for NumPy brute force over the same vectors. Random vectors on the
sphere are the hard case for HNSW (no cluster structure); real embeddings are easier.

``--json-out FILE`` writes every figure as JSON as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EFS = (16, 32, 64, 128, 256)


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": int(len(ms))}


def _time_each(fn, items, repeat: int = 1) -> list[float]:
    out = []
    for _ in range(repeat):
        for x in items:
            t = time.perf_counter()
            fn(x)
            out.append(time.perf_counter() - t)
    return out


def _recall(approx_rows: list[list[int]], exact_rows: list[list[int]], k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / max(1, min(k, len(e)))
                          for a, e in zip(approx_rows, exact_rows)]))


def _machine() -> dict[str, str]:
    return {"cpu_cores": str(os.cpu_count()), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "numpy_threads": os.environ.get("OMP_NUM_THREADS", "default")}


# --------------------------------------------------------------------------------------------


def catalogue_mode(args) -> dict:
    import tensorflow as tf

    from jewelclf.config import DataConfig
    from jewelclf.data.images import load_image
    from jewelclf.data.sources import load_source
    from jewelclf.modeling.embedding import embedding_model
    from jewelclf.runs import load_model_file
    from jewelclf.search.build import build_index, embed_records
    from jewelclf.search.index import exact_search, load_index
    from jewelclf.search.model_ref import resolve_model, same_model

    work = Path(args.work or tempfile.mkdtemp(prefix="jewelclf-search-bench-"))
    out = work / "index"
    log = (lambda m: print(f"  {m}", file=sys.stderr)) if args.verbose else (lambda m: None)

    t = time.perf_counter()
    summary = build_index(args.run_dir, args.catalogue, out, batch_size=args.batch_size,
                          exact_threshold=0, rebuild=True, log=log)
    build = {"wall_s": time.perf_counter() - t, "embed_s": summary.embed_seconds,
             "hnsw_graph_s": summary.ann_seconds, "items": summary.count, "dim": summary.dim,
             "rejected": summary.rejected}
    t = time.perf_counter()
    unchanged = build_index(args.run_dir, args.catalogue, out, exact_threshold=0, log=log)
    build["rerun_unchanged_s"] = time.perf_counter() - t
    assert unchanged.embedded == 0

    loads = []
    for _ in range(5):
        t = time.perf_counter()
        index = load_index(out)
        same_model(index.meta["model"], Path(index.meta["model"]["path"]))
        loads.append(time.perf_counter() - t)
    index = load_index(out)
    vectors = np.asarray(index.vectors)

    ref = resolve_model(args.run_dir)
    model = load_model_file(ref.model_file)
    size = int(model.input_shape[1])
    embedder = embedding_model(model, "pool")
    qsource = load_source(args.queries)
    qrecords = qsource.records
    t = time.perf_counter()
    queries = embed_records(embedder, qsource, qrecords, DataConfig(image_size=size, resize=ref.resize),
                            size, args.batch_size or ref.batch_size, log=log)
    query_embed_s = time.perf_counter() - t
    qlabels = [r.label for r in qrecords]
    labels = np.array(index.label_names)[np.asarray(index.label_codes)]
    k = 10

    exact = [[h.row for h in hits] for hits in exact_search(vectors, queries, k)]
    recall = {}
    for ef in EFS:
        approx = [[h.row for h in hits] for hits in index.search(queries, k, expansion=ef)]
        recall[ef] = _recall(approx, exact, k)
    default_ef = int(index.meta["hnsw"]["expansion_search"])
    approx = [[h.row for h in hits] for hits in index.search(queries, k)]

    def precision_at(rows_per_query, n=5):
        per_class: dict[str, list[float]] = {}
        for rows, label in zip(rows_per_query, qlabels):
            per_class.setdefault(label, []).append(float(np.mean(labels[rows[:n]] == label)))
        by_class = {c: float(np.mean(v)) for c, v in sorted(per_class.items())}
        return {"micro": float(np.mean([x for v in per_class.values() for x in v])),
                "macro": float(np.mean(list(by_class.values()))), "by_class": by_class}

    precision = {"exact": precision_at(exact), "hnsw": precision_at(approx)}

    single = [queries[i:i + 1] for i in range(len(queries))]
    lat_exact = _percentiles(_time_each(lambda q: exact_search(vectors, q, k), single, args.repeat))
    lat_hnsw = _percentiles(_time_each(lambda q: index.search(q, k), single, args.repeat))

    run_embed = tf.function(lambda b: embedder(tf.cast(load_image(b, size, ref.resize)[None], tf.float32),
                                               training=False))
    photos = [tf.constant(open(r.path, "rb").read()) for r in qrecords[:args.embed_samples]]
    run_embed(photos[0])  # trace once
    lat_embed = _percentiles(_time_each(lambda b: run_embed(b).numpy(), photos))

    return {
        "mode": "catalogue", "run_dir": str(Path(args.run_dir).resolve()),
        "backbone": ref.backbone, "image_size": size, "catalogue": args.catalogue,
        "queries": args.queries, "num_queries": len(qrecords), "k": k,
        "hnsw": index.meta["hnsw"], "library_version": index.meta["library_version"],
        "build": build, "query_embed_batch_s": query_embed_s,
        "index_load_ms": _percentiles(loads),
        "recall_at_10_vs_exact": {str(ef): r for ef, r in recall.items()},
        "recall_at_10_default_ef": _recall(approx, exact, k), "default_ef": default_ef,
        "precision_at_5": precision,
        "latency_search_exact_numpy": lat_exact, "latency_search_hnsw": lat_hnsw,
        "latency_embed_one_photo": lat_embed,
        "machine": _machine(), "index_dir": str(out), "load_average_1m_at_end": os.getloadavg()[0],
    }


def scale_mode(args) -> dict:
    from usearch.index import Index

    from jewelclf.search.ann import HNSW_CONNECTIVITY, HNSW_EXPANSION_ADD, HNSW_EXPANSION_SEARCH, new_ann
    from jewelclf.search.index import exact_search

    n, d = args.scale, args.dim
    rng = np.random.default_rng(args.seed)
    rss0 = _rss_now_mib()
    centres = None
    if args.distribution == "clustered":
        centres = rng.standard_normal((args.clusters, d), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count):
        x = rng.standard_normal((count, d), dtype=np.float32)
        if centres is not None:  # a product family: its centre plus a little noise
            x = centres[rng.integers(0, len(centres), count)] + args.spread * x
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    vectors = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        vectors[start:start + min(100_000, n - start)] = draw(min(100_000, n - start))
    queries = draw(args.num_queries)
    rss_vectors = _rss_now_mib()

    ann = new_ann(d)
    t, cpu = time.perf_counter(), time.process_time()
    ann.add(np.arange(n, dtype=np.uint64), vectors, threads=args.threads)
    build_s = time.perf_counter() - t
    build_cpu_s = time.process_time() - cpu
    rss_built = _rss_now_mib()
    peak_built = _rss_peak_mib()  # before the save and the exact ground truth below
    graph_bytes = int(ann.memory_usage)

    work = Path(args.work or tempfile.mkdtemp(prefix="jewelclf-search-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "scale.usearch"
    t = time.perf_counter()
    ann.save(str(path))
    save_s = time.perf_counter() - t
    file_bytes = path.stat().st_size
    t = time.perf_counter()
    viewed = Index.restore(str(path), view=True)
    view_s = time.perf_counter() - t
    vec_path = work / "vectors.npy"
    np.save(vec_path, vectors)
    t = time.perf_counter()
    np.load(vec_path, mmap_mode="r")
    vec_load_s = time.perf_counter() - t

    k = 10
    t = time.perf_counter()
    exact = [[h.row for h in hits] for hits in exact_search(vectors, queries, k)]
    exact_batch_s = time.perf_counter() - t
    recall, lat = {}, {}
    for ef in EFS + (512,):
        ann.expansion_search = ef
        m = ann.search(queries, k, threads=args.threads)
        keys = np.atleast_2d(m.keys)
        recall[ef] = _recall([list(r) for r in keys.astype(np.int64)], exact, k)
        lat[ef] = _percentiles(_time_each(lambda q: ann.search(q, k, threads=1),
                                          list(queries[:args.latency_queries])))
    ann.expansion_search = HNSW_EXPANSION_SEARCH
    viewed.expansion_search = HNSW_EXPANSION_SEARCH
    lat_view = _percentiles(_time_each(lambda q: viewed.search(q, k, threads=1),
                                       list(queries[:args.latency_queries])))
    lat_exact = _percentiles(_time_each(lambda q: exact_search(vectors, q[None], k),
                                        list(queries[:args.exact_latency_queries])))
    result = {
        "mode": "scale", "n": n, "dim": d, "distribution": args.distribution,
        "vectors": ("random unit vectors (Gaussian, normalised)" if centres is None else
                    f"random unit vectors around {args.clusters} random centres, noise sd "
                    f"{args.spread} per dimension, normalised"),
        "hnsw": {"connectivity": HNSW_CONNECTIVITY, "expansion_add": HNSW_EXPANSION_ADD,
                 "default_expansion_search": HNSW_EXPANSION_SEARCH, "dtype": "f32", "metric": "ip"},
        "threads": args.threads or os.cpu_count(),
        "build_s": build_s, "build_cpu_s": build_cpu_s, "build_vectors_per_s": n / build_s,
        "load_average_1m_at_end": os.getloadavg()[0],
        "memory_mib": {"process_peak_rss": _rss_peak_mib(), "peak_rss_after_build": peak_built,
                       "vectors_f32": vectors.nbytes / 2**20,
                       "rss_before": rss0, "rss_after_vectors": rss_vectors,
                       "rss_after_build": rss_built, "hnsw_index_reported": graph_bytes / 2**20,
                       "hnsw_growth_rss": rss_built - rss_vectors},
        "index_file_mib": file_bytes / 2**20, "save_s": save_s, "load_view_ms": view_s * 1000,
        "vectors_mmap_load_ms": vec_load_s * 1000,
        "exact_ground_truth_batch_s": exact_batch_s, "num_queries": len(queries),
        "recall_at_10_vs_exact": {str(ef): r for ef, r in recall.items()},
        "latency_search_hnsw_by_ef": {str(ef): v for ef, v in lat.items()},
        "latency_search_hnsw_viewed_default_ef": lat_view,
        "latency_search_exact_numpy": lat_exact,
        "machine": _machine(),
    }
    if not args.keep:
        path.unlink()
        vec_path.unlink()
    return result


def _print(result: dict) -> None:
    if result["mode"] == "catalogue":
        b = result["build"]
        print(f"model {result['backbone']} ({result['image_size']} px), catalogue "
              f"{b['items']} items x {b['dim']}-d, {result['num_queries']} queries")
        print(f"build: {b['wall_s']:.1f} s wall (embed {b['embed_s']:.1f} s, HNSW graph "
              f"{b['hnsw_graph_s']:.3f} s); re-run with nothing changed {b['rerun_unchanged_s']:.2f} s")
        print(f"index load (view + model check): p50 {result['index_load_ms']['p50_ms']:.1f} ms")
        print("recall@10 HNSW vs exact: " + ", ".join(
            f"ef={ef}: {r:.4f}" for ef, r in result["recall_at_10_vs_exact"].items()))
        for kind in ("exact", "hnsw"):
            p = result["precision_at_5"][kind]
            print(f"precision@5 ({kind}): micro {p['micro']:.4f}, macro {p['macro']:.4f}; " + ", ".join(
                f"{c} {v:.3f}" for c, v in p["by_class"].items()))
        for name in ("latency_search_exact_numpy", "latency_search_hnsw", "latency_embed_one_photo"):
            v = result[name]
            print(f"{name}: p50 {v['p50_ms']:.3f} ms, p99 {v['p99_ms']:.3f} ms (n={v['n']})")
    else:
        m = result["memory_mib"]
        print(f"{result['n']} x {result['dim']}-d {result['vectors']}, {result['threads']} threads")
        print(f"HNSW build: {result['build_s']:.1f} s wall, {result['build_cpu_s']:.1f} s CPU "
              f"({result['build_vectors_per_s']:.0f} vectors/s); load average "
              f"{result['load_average_1m_at_end']:.1f}")
        print(f"memory: peak RSS {m['peak_rss_after_build']:.0f} MiB after the build, "
              f"{m['process_peak_rss']:.0f} MiB with the exact ground truth (vectors "
              f"{m['vectors_f32']:.0f} MiB, graph growth {m['hnsw_growth_rss']:.0f} MiB, USearch "
              f"reports {m['hnsw_index_reported']:.0f} MiB)")
        print(f"index file {result['index_file_mib']:.0f} MiB, save {result['save_s']:.1f} s, "
              f"load (view) {result['load_view_ms']:.1f} ms")
        print("recall@10 vs exact: " + ", ".join(
            f"ef={ef}: {r:.4f}" for ef, r in result["recall_at_10_vs_exact"].items()))
        for ef, v in result["latency_search_hnsw_by_ef"].items():
            print(f"HNSW ef={ef}: p50 {v['p50_ms']:.3f} ms, p99 {v['p99_ms']:.3f} ms")
        v = result["latency_search_exact_numpy"]
        print(f"NumPy exact: p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms (n={v['n']})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="A finished run (catalogue mode).")
    p.add_argument("--catalogue", default="/work/shared/data/jewellery/training")
    p.add_argument("--queries", default="/work/shared/data/jewellery/test")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--repeat", type=int, default=5, help="Passes over the queries for latency.")
    p.add_argument("--embed-samples", type=int, default=100, help="Photos timed one by one.")
    p.add_argument("--scale", type=int, help="Scale mode: this many random vectors.")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--distribution", choices=["uniform", "clustered"], default="uniform",
                   help="Scale mode: uniform on the sphere (worst case), or around random centres.")
    p.add_argument("--clusters", type=int, default=10_000)
    p.add_argument("--spread", type=float, default=0.05, help="Noise sd per dimension (clustered).")
    p.add_argument("--num-queries", type=int, default=1000)
    p.add_argument("--latency-queries", type=int, default=1000)
    p.add_argument("--exact-latency-queries", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="Build threads (0: all cores).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="Folder for the index files (default: a temp folder).")
    p.add_argument("--keep", action="store_true", help="Scale mode: keep the index files.")
    p.add_argument("--json-out", help="Also write the figures to this JSON file.")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.scale:
        result = scale_mode(args)
    elif args.run_dir:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        result = catalogue_mode(args)
    else:
        p.error("give RUN_DIR (catalogue mode) or --scale N")
    result["command"] = " ".join(["python", "benchmarks/search.py", *(argv or sys.argv[1:])])
    _print(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
