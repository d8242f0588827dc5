"""Visual search: building an index, incremental updates, exactness against NumPy brute force,
the HNSW path, `jewelclf similar` output (table, JSON, HTML) and the refusals users see."""

import csv
import json
import os
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from jewelclf.cli import main
from jewelclf.errors import JewelclfError
from jewelclf.search.build import build_index
from jewelclf.search.index import ANN_FILE, MANIFEST, META, VECTORS, exact_search, load_index

from conftest import make_class_folder, make_image

QUIET = {"log": lambda _: None}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _unit_rows(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(vectors, queries, k):
    sims = np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k], sims


def _manifest(index_dir):
    with open(index_dir / MANIFEST, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = make_class_folder(tmp_path_factory.mktemp("search") / "catalogue", per_class=6, seed=7)
    (root / "ring" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def built(tiny_run, catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "index"
    result = run("index", tiny_run, catalogue, "--output", out, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_index_writes_vectors_manifest_and_meta(built, tiny_run):
    out, output = built
    assert "18 items" in output and "rejected 1 unreadable" in output and "exact" in output
    meta = json.loads((out / META).read_text())
    assert meta["kind"] == "exact" and meta["dim"] == 16 and meta["layer"] == "pool"
    assert meta["metric"] == "cosine" and meta["library"] == "usearch" and meta["library_version"]
    assert meta["image_size"] == 32 and meta["count"] == 18 and meta["class_names"] == [
        "necklace", "ring", "watch"]
    assert meta["model"]["path"] == str((tiny_run / "model.keras").resolve())
    assert len(meta["model"]["sha256"]) == 64
    rows = _manifest(out)
    assert len(rows) == 18 and {r["label"] for r in rows} == {"necklace", "ring", "watch"}
    assert all(len(r["sha256"]) == 64 and int(r["size"]) > 0 for r in rows)
    assert "ring/broken.jpg" not in {r["key"] for r in rows}
    with open(out / "rejected_files.csv") as f:
        rejected = list(csv.DictReader(f))
    assert [r["path"].endswith("broken.jpg") for r in rejected] == [True]
    vectors = np.load(out / VECTORS)
    assert vectors.shape == (18, 16) and vectors.dtype == np.float32
    # What a search reads without parsing the CSV: ids, label codes, each row's byte offset.
    index = load_index(out)
    assert list(index.ids) == [int(r["id"]) for r in rows]
    assert [index.label_names[c] for c in index.label_codes] == [r["label"] for r in rows]
    assert [index.item(i).key for i in range(18)] == [r["key"] for r in rows]
    assert index.item(17) == index.items[17]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not (out / ANN_FILE).exists()
    # No temp folders are left beside the index.
    assert [p.name for p in out.parent.iterdir()] == ["index"]


def test_index_vectors_are_the_keras_embeddings(built, tiny_run, catalogue):
    import tensorflow as tf

    import jewelclf.modeling.registry  # noqa: F401
    from jewelclf.data.images import load_image
    from jewelclf.modeling.embedding import embedding_model

    out, _ = built
    index = load_index(out)
    model = keras.saving.load_model(tiny_run / "model.keras", compile=False)
    pixels = np.stack([load_image(tf.constant(open(it.path, "rb").read()), 32).numpy()
                       for it in index.items[:5]]).astype(np.float32)
    expected = embedding_model(model).predict_on_batch(pixels)
    np.testing.assert_allclose(np.asarray(index.vectors[:5]), expected, atol=1e-5)


def test_exact_search_equals_numpy_brute_force(built):
    index = load_index(built[0])
    queries = _unit_rows(7, 16, seed=3)
    order, sims = _brute_force(index.vectors, queries, 5)
    hits = index.search(queries, k=5)
    for q in range(7):
        assert [h.row for h in hits[q]] == list(order[q])
        assert [h.rank for h in hits[q]] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([h.similarity for h in hits[q]], sims[q, order[q]], atol=1e-6)
    # k beyond the catalogue gives every item once.
    assert sorted(h.row for h in index.search(queries[:1], k=100)[0]) == list(range(18))


def test_chunked_exact_search_equals_one_matrix_product():
    vectors, queries = _unit_rows(1000, 32, seed=4), _unit_rows(9, 32, seed=5)
    order, sims = _brute_force(vectors, queries, 10)
    for chunk in (7, 128, 65_536):
        hits = exact_search(vectors, queries, 10, chunk=chunk)
        assert [[h.row for h in q] for q in hits] == order.tolist()


def test_hnsw_index_agrees_with_brute_force(tiny_run, catalogue, tmp_path):
    out = tmp_path / "hnsw"
    summary = build_index(tiny_run, str(catalogue), out, exact_threshold=0, **QUIET)
    assert summary.kind == "hnsw" and summary.ann_rebuilt and (out / ANN_FILE).is_file()
    index = load_index(out)
    assert index.ann is not None and len(index.ann) == len(index) == 18
    queries = np.concatenate([np.asarray(index.vectors), _unit_rows(5, 16, seed=6)])
    order, sims = _brute_force(index.vectors, queries, 10)
    approx = index.search(queries, k=10)
    exact = index.search(queries, k=10, exact=True)
    recall = np.mean([len({h.row for h in a} & set(o)) / 10 for a, o in zip(approx, order)])
    assert recall == 1.0  # 18 items: the graph reaches every one
    for q, (a, e) in enumerate(zip(approx, exact)):
        np.testing.assert_allclose([h.similarity for h in a], [h.similarity for h in e], atol=1e-5)
        assert [h.row for h in e] == list(order[q])
    # Each catalogue vector finds itself first.
    assert [hits[0].row for hits in approx[:18]] == list(range(18))
    # One query at a time (the usual case of `similar`) gives the same answer as a batch.
    for q in (0, 5, 20):
        single = index.search(queries[q:q + 1], k=10)[0]
        assert [h.row for h in single] == [h.row for h in approx[q]]
    result = run("similar", out, catalogue / "ring" / "ring_003.jpg", "--k", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "hnsw"
    assert report["queries"][0]["results"][0]["path"] == "ring/ring_003.jpg"


@pytest.mark.parametrize("threshold", [0, 1000], ids=["hnsw", "exact"])
def test_incremental_update_embeds_only_new_and_changed_files(tiny_run, tmp_path, threshold):
    cat = make_class_folder(tmp_path / "cat", per_class=5, seed=11)
    out = tmp_path / "index"
    first = build_index(tiny_run, str(cat), out, exact_threshold=threshold, **QUIET)
    assert (first.count, first.embedded, first.kept, first.removed) == (15, 15, 0, 0)
    before = load_index(out)
    vec_before = {it.key: np.array(before.vectors[i]) for i, it in enumerate(before.items)}
    id_before = {it.key: it.id for it in before.items}

    # Nothing changed: nothing is embedded, nothing is rewritten.
    stamp = (out / VECTORS).stat().st_mtime_ns, (out / META).stat().st_mtime_ns
    noop = build_index(tiny_run, str(cat), out, exact_threshold=threshold, **QUIET)
    assert (noop.embedded, noop.kept, noop.removed) == (0, 15, 0)
    assert ((out / VECTORS).stat().st_mtime_ns, (out / META).stat().st_mtime_ns) == stamp
    # A touched but identical file is not embedded either (its SHA-256 is unchanged).
    os.utime(cat / "ring" / "ring_000.jpg", ns=(1, 1))
    again = build_index(tiny_run, str(cat), out, exact_threshold=threshold, **QUIET)
    assert (again.embedded, again.kept, again.removed) == (0, 15, 0)

    make_image("watch", 901, path=cat / "watch" / "new_a.jpg")
    make_image("necklace", 902, path=cat / "necklace" / "new_b.jpg")
    (cat / "ring" / "ring_001.jpg").unlink()
    make_image("watch", 903, path=cat / "ring" / "ring_002.jpg")  # same key, new content
    update = build_index(tiny_run, str(cat), out, exact_threshold=threshold, **QUIET)
    assert (update.embedded, update.changed, update.kept, update.removed) == (3, 1, 13, 1)
    assert update.count == 16

    after = load_index(out)
    keys = [it.key for it in after.items]
    on_disk = sorted(p.relative_to(cat).as_posix() for p in cat.rglob("*.jpg"))
    assert sorted(keys) == on_disk and "ring/ring_001.jpg" not in keys
    ids = [it.id for it in after.items]
    assert ids == sorted(ids) and len(set(ids)) == 16
    for i, it in enumerate(after.items):
        if it.key in ("ring/ring_002.jpg", "watch/new_a.jpg", "necklace/new_b.jpg"):
            assert it.id >= 15  # new ids, never reused
        else:
            assert it.id == id_before[it.key]
            np.testing.assert_array_equal(after.vectors[i], vec_before[it.key])
    changed = keys.index("ring/ring_002.jpg")
    assert not np.allclose(after.vectors[changed], vec_before["ring/ring_002.jpg"])
    # The updated index still answers exactly: every item is its own nearest neighbour.
    hits = after.search(np.asarray(after.vectors), k=3)
    assert [h[0].row for h in hits] == list(range(16))
    order, _ = _brute_force(after.vectors, after.vectors, 3)
    assert [[h.row for h in q] for q in hits] == order.tolist()
    if threshold == 0:
        assert not update.ann_rebuilt and len(after.ann) == 16  # updated in place
        assert json.loads((out / META).read_text())["deleted"] == 2


def test_similar_prints_table_json_and_html(built, catalogue, tmp_path):
    out, _ = built
    index = load_index(out)
    query = catalogue / "watch" / "watch_002.jpg"
    make_image("ring", 777, size=(50, 30), path=tmp_path / "query.png", fmt="PNG")

    result = run("similar", out, query, tmp_path / "query.png", "--k", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["k"] == 4 and report["kind"] == "exact" and report["errors"] == []
    assert [q["query"] for q in report["queries"]] == [str(query), str(tmp_path / "query.png")]
    for q in report["queries"]:
        assert [r["rank"] for r in q["results"]] == [1, 2, 3, 4]
        sims = [r["similarity"] for r in q["results"]]
        assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0001 for s in sims)
        assert set(q["results"][0]) == {"rank", "item", "path", "file", "sku", "label", "similarity"}
        assert q["predicted_label"] in ("necklace", "ring", "watch")
    top = report["queries"][0]["results"][0]
    assert top["path"] == "watch/watch_002.jpg" and top["label"] == "watch"
    assert top["similarity"] == pytest.approx(1.0, abs=1e-4)
    # The same ranking as brute force over the stored vectors.
    row = [it.key for it in index.items].index("watch/watch_002.jpg")
    order, _ = _brute_force(index.vectors, np.asarray(index.vectors[row:row + 1]), 4)
    assert [r["path"] for r in report["queries"][0]["results"]] == [index.items[i].key for i in order[0]]

    html = tmp_path / "page.html"
    table = run("similar", out, query, "--k", "3", "--html", html)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].startswith(str(query)) and "predicted" in lines[0]
    assert lines[1].split() == ["rank", "item", "label", "similarity"]
    assert lines[2].split()[:3] == ["1", "watch/watch_002.jpg", "watch"]
    assert len([ln for ln in lines if ln.strip()[:1].isdigit()]) == 3
    page = html.read_text()
    assert page.count("<img") == 4 and "data:image/jpeg;base64," in page and "watch_002.jpg" in page


def test_similar_same_class_keeps_the_predicted_label(built, catalogue):
    result = run("similar", built[0], catalogue / "necklace" / "necklace_001.jpg",
                 catalogue / "watch" / "watch_003.jpg", "--k", "10", "--json", "--same-class")
    assert result.exit_code == 0, result.output
    for q in json.loads(result.stdout)["queries"]:
        assert q["restricted_to"] == q["predicted_label"]
        assert len(q["results"]) == 6  # 6 items of each class in the catalogue
        assert {r["label"] for r in q["results"]} == {q["predicted_label"]}


def test_similar_skips_unreadable_queries_and_fails_when_none_is_readable(built, catalogue, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    ok = run("similar", built[0], catalogue / "ring" / "ring_000.jpg", bad, "--k", "2")
    assert ok.exit_code == 0
    assert f"skipped {bad}: not a supported image (text)" in ok.output
    none = run("similar", built[0], bad, tmp_path / "missing.jpg")
    assert none.exit_code == 2 and "no readable query image" in none.output
    assert "Traceback" not in none.output


def test_similar_refuses_an_index_whose_model_changed(tiny_run, catalogue, tmp_path):
    import jewelclf.modeling.registry  # noqa: F401

    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy)
    out = tmp_path / "index"
    build_index(run_copy, str(catalogue), out, **QUIET)
    assert run("similar", out, catalogue / "ring" / "ring_000.jpg").exit_code == 0

    model = keras.saving.load_model(run_copy / "model.keras", compile=False)
    kernel = model.get_layer("head").get_layer("probabilities").kernel
    kernel.assign(kernel.numpy() + 0.5)
    model.save(run_copy / "model.keras")  # the run was trained again: same path, new model

    refused = run("similar", out, catalogue / "ring" / "ring_000.jpg")
    assert refused.exit_code == 2 and "different model" in refused.output
    assert "--rebuild" in refused.output and "Traceback" not in refused.output
    again = run("index", run_copy, catalogue, "--output", out)
    assert again.exit_code == 2 and "another model" in again.output
    (out / VECTORS).write_bytes(b"damaged")  # --rebuild does not even read the old index
    damaged = run("similar", out, catalogue / "ring" / "ring_000.jpg")
    assert damaged.exit_code == 2 and "damaged" in damaged.output and "--rebuild" in damaged.output
    rebuilt = run("index", run_copy, catalogue, "--output", out, "--rebuild")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "embedded 18" in rebuilt.output
    assert run("similar", out, catalogue / "ring" / "ring_000.jpg").exit_code == 0


def test_index_refuses_a_folder_that_is_not_an_index(tiny_run, catalogue, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = run("index", tiny_run, catalogue, "--output", busy)
    assert result.exit_code == 2 and "holds no jewelclf index" in result.output
    assert (busy / "keep.txt").read_text() == "mine"
    missing = run("similar", tmp_path / "nowhere", catalogue / "ring" / "ring_000.jpg")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    with pytest.raises(JewelclfError, match="no hidden head layer"):
        build_index(tiny_run, str(catalogue), tmp_path / "hidden", layer="hidden", **QUIET)
    assert not (tmp_path / "hidden").exists()


def test_csv_catalogue_keeps_skus(tiny_run, tmp_path):
    root = tmp_path / "shop"
    rows = []
    for i, label in enumerate(["ring", "ring", "watch", "necklace"]):
        rel = f"photos/{label}_{i}.jpg"
        make_image(label, 300 + i, path=root / rel)
        rows.append({"path": rel, "label": label, "sku": f"SKU-{i:04d}"})
    with open(root / "catalogue.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "sku"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "index"
    build_index(tiny_run, str(root / "catalogue.csv"), out, **QUIET)
    assert [r["sku"] for r in _manifest(out)] == ["SKU-0000", "SKU-0001", "SKU-0002", "SKU-0003"]
    result = run("similar", out, root / "photos" / "watch_2.jpg", "--k", "2", "--json")
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)["queries"][0]["results"][0]
    assert (top["item"], top["sku"], top["path"]) == ("SKU-0002", "SKU-0002", "photos/watch_2.jpg")


def test_group_column_is_the_sku(tiny_run, tmp_path):
    from conftest import make_csv

    manifest = make_csv(tmp_path / "shop", per_class=2, groups=2)
    out = tmp_path / "index"
    build_index(tiny_run, str(manifest), out, **QUIET)
    assert {r["sku"] for r in _manifest(out)} == {f"{c}-sku{i}" for c in ("necklace", "ring", "watch")
                                                  for i in range(2)}


def test_manifest_rows_read_back_alone_whatever_the_path(tmp_path):
    from jewelclf.search.index import Item, SearchIndex, manifest_bytes

    items = [Item(0, "rings/plain.jpg", "/c/rings/plain.jpg", "ring"),
             Item(3, 'rings/comma, "quote".jpg', '/c/rings/comma, "quote".jpg', "ring", "SKU,1"),
             Item(7, "rings/new\nline.jpg", "/c/rings/new\nline.jpg", "ring", size=5, mtime_ns=9),
             Item(8, "bagues/émeraude–₂.jpg", "/c/bagues/émeraude–₂.jpg", "bague", sha256="ab" * 32)]
    data, offsets = manifest_bytes(items)
    (tmp_path / MANIFEST).write_bytes(data)
    index = SearchIndex(tmp_path, {}, np.zeros((4, 2), np.float32), np.array([0, 3, 7, 8], np.uint64),
                        np.array([1, 1, 1, 0]), ["bague", "ring"], offsets)
    assert [index.item(i) for i in range(4)] == items
    assert index.items == items
    assert list(index.rows_of(np.array([8, 0, 7], np.uint64))) == [3, 0, 2]
