"""The search index under crashes and tampering (issue 20, item 7).

A kill between the two renames of an update, a kill while a new version is written, a rename
that fails; a damaged ``meta.json`` or ``manifest.csv``; NaN or infinite vectors in the index or
from the model; and ``similar --html`` pointed at an existing file or into the index folder.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from jewelclf.cli import main
from jewelclf.errors import JewelclfError
from jewelclf.search import build
from jewelclf.search import query as search
from jewelclf.search.build import build_index
from jewelclf.search.index import MANIFEST, META, VECTORS, load_index

from conftest import REPO, make_class_folder

QUIET = {"log": lambda _: None}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def hidden_siblings(index_dir: Path) -> list[str]:
    return sorted(p.name for p in index_dir.parent.iterdir() if p.name.startswith(f".{index_dir.name}."))


def one_line_error(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return make_class_folder(tmp_path_factory.mktemp("durable") / "catalogue", per_class=4, seed=3)


@pytest.fixture(scope="module")
def pristine(tiny_run, catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "index"
    build_index(tiny_run, str(catalogue), out, **QUIET)
    return out


@pytest.fixture
def index(pristine, tmp_path):
    """A fresh copy of the built index to damage."""
    out = tmp_path / "idx"
    shutil.copytree(pristine, out)
    return out


@pytest.fixture
def query(catalogue):
    return catalogue / "ring" / "ring_000.jpg"


# --------------------------------------------------------------------------------------------
# Crashes during an update

CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from jewelclf.search import build, index as search

    out = Path(sys.argv[1])
    index = search.load_index(out, view=False)
    meta = dict(index.meta, updated="the new version")
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        # The rename of the complete new copy onto the index: die as a kill -9 would, before it.
        if ".tmp-" in Path(src).name and Path(dst) == out:
            os._exit(137)
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
    build.write_index(out, meta, index.items, index.vectors, None, [])
    sys.exit(3)  # the crash did not happen
""")


def test_a_kill_between_the_renames_is_finished_by_the_next_similar(index, query):
    crashed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(index)], cwd=REPO,
                             capture_output=True, text=True, timeout=120, check=False)
    assert crashed.returncode == 137, crashed.stderr
    assert not index.exists()  # the state a kill leaves: the index renamed away, not yet back
    assert any(".tmp-" in n for n in hidden_siblings(index))

    result = run("similar", index, query, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["queries"][0]["results"][0]["path"] == "ring/ring_000.jpg"
    assert "finished an interrupted update" in result.stderr
    assert json.loads((index / META).read_text())["updated"] == "the new version"
    assert hidden_siblings(index) == []  # the old copy is gone too


def test_a_kill_between_the_renames_is_finished_by_the_next_index(index, tiny_run, catalogue):
    crashed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(index)], cwd=REPO,
                             capture_output=True, text=True, timeout=120, check=False)
    assert crashed.returncode == 137, crashed.stderr
    result = run("index", tiny_run, catalogue, "--output", index)
    assert result.exit_code == 0, result.output
    assert "finished an interrupted update" in result.output
    assert "kept 12" in result.output and "embedded 0" in result.output  # nothing re-embedded
    assert hidden_siblings(index) == []


def test_the_leftovers_of_a_killed_writer_are_cleaned_and_a_live_one_is_left_alone(index, query):
    dead = index.parent / f".{index.name}.tmp-dead0000"  # killed while writing its files
    dead.mkdir()
    (dead / VECTORS).write_bytes(b"\x93NUMPY half written")
    old = index.parent / f".{index.name}.old-dead0000"  # killed after the swap, before the cleanup
    shutil.copytree(index, old)
    live = index.parent / f".{index.name}.tmp-live0000"  # another process writing right now
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        result = run("similar", index, query)
        assert result.exit_code == 0, result.output
        assert hidden_siblings(index) == [live.name]
    finally:
        os.close(fd)


def test_a_failed_rename_keeps_the_previous_version(index, monkeypatch):
    before = (index / META).read_text()
    loaded = load_index(index, view=False)
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if ".tmp-" in Path(src).name and Path(dst) == index:
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(JewelclfError, match="could not move the new version of index"):
        build.write_index(index, dict(loaded.meta, updated="never"), loaded.items,
                            loaded.vectors, None, [])
    monkeypatch.undo()
    assert (index / META).read_text() == before
    assert hidden_siblings(index) == []
    assert len(load_index(index)) == 12


# --------------------------------------------------------------------------------------------
# A damaged meta.json or manifest.csv


def _edit_meta(index_dir, edit):
    meta = json.loads((index_dir / META).read_text())
    meta = edit(meta)
    (index_dir / META).write_text(json.dumps(meta))


META_DAMAGE = {
    "no kind": lambda m: {k: v for k, v in m.items() if k != "kind"},
    "no model": lambda m: {k: v for k, v in m.items() if k != "model"},
    "model is a string": lambda m: dict(m, model="model.keras"),
    "model without path": lambda m: dict(m, model={k: v for k, v in m["model"].items() if k != "path"}),
    "kind is a number": lambda m: dict(m, kind=3),
    "kind is unknown": lambda m: dict(m, kind="faiss"),
    "dim is text": lambda m: dict(m, dim="16"),
    "labels is a string": lambda m: dict(m, labels="ring"),
    "count is negative": lambda m: dict(m, count=-1),
    "hnsw is null": lambda m: dict(m, hnsw=None),
    "a list": lambda m: [m],
}


@pytest.mark.parametrize("damage", sorted(META_DAMAGE))
def test_a_damaged_meta_is_one_line_in_similar_and_index(index, query, tiny_run, catalogue, damage):
    _edit_meta(index, META_DAMAGE[damage])
    one_line_error(run("similar", index, query), str(index / META), "--rebuild")
    one_line_error(run("index", tiny_run, catalogue, "--output", index), str(index / META), "--rebuild")


MANIFEST_DAMAGE = {
    "cut in half": lambda b: b[:len(b) // 2],
    "last newline cut": lambda b: b[:-1],
    "header only": lambda b: b[:b.index(b"\n") + 1],
    "empty": lambda b: b"",
    "a row's id edited": lambda b: b.replace(b"\n0,", b"\nx,", 1),
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_one_line_in_similar_and_index(index, query, tiny_run, catalogue, damage):
    path = index / MANIFEST
    path.write_bytes(MANIFEST_DAMAGE[damage](path.read_bytes()))
    one_line_error(run("similar", index, query), str(path), "--rebuild")
    one_line_error(run("index", tiny_run, catalogue, "--output", index), str(path), "--rebuild")


def test_a_manifest_row_damaged_in_the_middle_is_one_line_when_read(index):
    path = index / MANIFEST
    lines = path.read_bytes().split(b"\n")
    assert lines[6].startswith(b"5,")
    lines[6] = b"x" + lines[6][1:]  # row 5's id, same length: the first and last rows are intact
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JewelclfError, match=r"manifest\.csv.*--rebuild"):
        loaded = load_index(index)
        [loaded.item(row) for row in range(len(loaded))]
    with pytest.raises(JewelclfError, match=r"manifest\.csv.*--rebuild"):
        _ = load_index(index).items


# --------------------------------------------------------------------------------------------
# NaN and infinite vectors


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_vectors_in_an_index_are_refused(index, query, tiny_run, catalogue, bad):
    vectors = np.load(index / VECTORS)
    vectors[7, 3] = bad
    np.save(index / VECTORS, vectors)
    one_line_error(run("similar", index, query), str(index / VECTORS), "row 7", "--rebuild")
    one_line_error(run("index", tiny_run, catalogue, "--output", index), str(index / VECTORS), "--rebuild")


def test_a_model_giving_nan_embeddings_is_refused_naming_the_image(tiny_run, catalogue, tmp_path):
    import keras

    import jewelclf.modeling.registry  # noqa: F401

    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy)
    model = keras.saving.load_model(run_copy / "model.keras", compile=False)
    # A scale that overflows float32: inf features, whose L2 normalisation is NaN. (A NaN weight
    # would not do: ReLU and max pooling turn NaN into 0 or a finite value here.)
    bn = model.get_layer("backbone").get_layer("block2_bn")
    bn.gamma.assign(np.full(bn.gamma.shape, 3e38, np.float32))
    model.save(run_copy / "model.keras")

    out = tmp_path / "index"
    with pytest.raises(JewelclfError, match=r"NaN or infinite embedding.*'.*necklace_000\.jpg'"):
        build_index(run_copy, str(catalogue), out, **QUIET)
    assert not out.exists() and hidden_siblings(out) == []


def test_a_nan_query_embedding_is_skipped_with_its_reason(pristine, query, tmp_path, monkeypatch):
    real = search.embed_query_images

    def nan_for_the_second(*args, **kwargs):
        vectors, probs, paths, errors = real(*args, **kwargs)
        vectors[1] = np.nan
        return vectors, probs, paths, errors

    monkeypatch.setattr(search, "embed_query_images", nan_for_the_second)
    other = query.with_name("ring_001.jpg")
    report = search.similar(pristine, [str(query), str(other)], k=3)
    assert [q.query for q in report.queries] == [str(query)]
    assert report.errors == [{"query": str(other), "error": "the model gives a NaN or infinite "
                                                            "embedding for it"}]


# --------------------------------------------------------------------------------------------
# similar --html


def test_similar_html_refuses_an_existing_file_without_overwrite(index, query, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("my notes")
    refused = run("similar", index, query, "--html", page)
    one_line_error(refused, str(page), "--overwrite")
    assert page.read_text() == "my notes"
    replaced = run("similar", index, query, "--html", page, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert page.read_text().startswith("<!doctype html>")


@pytest.mark.parametrize("target", ["meta.json", "page.html", "link-to-meta", "."])
def test_similar_html_never_writes_inside_the_index(index, query, tmp_path, target):
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    if target == "link-to-meta":
        path = tmp_path / "page.html"
        path.symlink_to(index / META)
    else:
        path = index / target
    for extra in ([], ["--overwrite"]):
        one_line_error(run("similar", index, query, "--html", path, *extra), "inside the index")
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
