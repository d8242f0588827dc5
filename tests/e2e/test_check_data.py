"""`jewelclf check DATA`: the data check report, the leakage check of fit, and the command."""

import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from jewelclf.cli import main
from jewelclf.config import DataConfig
from jewelclf.data import fingerprint as report_mod
from jewelclf.data.audit import check_data, format_check_report
from jewelclf.data.fingerprint import NEAR_DUPLICATE_DISTANCE, fingerprint
from jewelclf.data.leakage import check_split_leakage
from jewelclf.data.sources import Record, load_source

from conftest import make_image, make_split_folder


def photo(seed: int, size=(160, 128)) -> Image.Image:
    """A product-like photo: a few smooth coloured shapes on white."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = x0 + int(rng.integers(w // 6, w // 2)), y0 + int(rng.integers(h // 6, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def encode(img: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def hamming(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


@pytest.fixture
def messy(tmp_path):
    """A split folder with one of each problem planted in it."""
    root = tmp_path / "messy"
    for split, n, base in (("train", 5, 0), ("test", 2, 100)):
        for ci, cls in enumerate(("ring", "watch")):
            for i in range(n):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                photo(base + ci * 10 + i).save(root / split / cls / f"{cls}_{i}.jpg", quality=92)
    # byte-identical: across splits (leak) and within train
    shutil.copy(root / "train/ring/ring_0.jpg", root / "test/ring/copy_of_ring_0.jpg")
    shutil.copy(root / "train/watch/watch_0.jpg", root / "train/watch/watch_0 (1).jpg")
    # near-identical across splits: the same photo resized and re-encoded
    (root / "test/watch/resized_watch_1.jpg").write_bytes(
        encode(photo(11).resize((120, 96), Image.Resampling.BICUBIC), quality=70))
    # a PNG named .jpg, a truncated JPEG, a thumbnail, a photo lying on its side
    (root / "train/ring/really_png.jpg").write_bytes(encode(photo(50), "PNG"))
    good = encode(photo(51))
    (root / "train/ring/broken.jpg").write_bytes(good[: len(good) // 2])
    make_image("ring", 52, size=(20, 24), path=root / "train/ring/small.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "train/watch/sideways.jpg").write_bytes(encode(photo(53), exif=exif.tobytes()))
    return root


def test_check_data_finds_each_kind_of_problem(messy):
    rep = check_data(str(messy), image_size=32, workers=2)
    json.dumps(rep)  # serialisable as it is

    assert rep["files"] == 21 and rep["usable"] == 20
    assert rep["classes"] == {"ring": {"train": 7, "test": 3}, "watch": {"train": 7, "test": 3}}
    assert rep["imbalance"]["ratio"] == 1.0
    assert [(r["file"], r["reason"].split(":")[0]) for r in rep["rejected"]] == [
        ("train/ring/broken.jpg", "corrupt JPEG")]
    assert rep["extension_mismatches"] == [
        {"file": "train/ring/really_png.jpg", "extension": ".jpg", "content": "PNG"}]

    exact = {tuple(f["file"] for f in g["files"]): g for g in rep["duplicates"]["exact"]}
    assert set(exact) == {("train/ring/ring_0.jpg", "test/ring/copy_of_ring_0.jpg"),
                          ("train/watch/watch_0 (1).jpg", "train/watch/watch_0.jpg")}
    across = exact[("train/ring/ring_0.jpg", "test/ring/copy_of_ring_0.jpg")]
    assert across["across_splits"] and across["splits"] == ["train", "test"]
    assert not exact[("train/watch/watch_0 (1).jpg", "train/watch/watch_0.jpg")]["across_splits"]

    [near] = rep["duplicates"]["near"]
    assert [f["file"] for f in near["files"]] == ["train/watch/watch_1.jpg", "test/watch/resized_watch_1.jpg"]
    assert near["across_splits"] and 0 < near["max_distance"] <= NEAR_DUPLICATE_DISTANCE

    leaks = {(lk["a"], lk["b"], lk["kind"]) for lk in rep["leakage"]}
    assert leaks == {("train/ring/ring_0.jpg", "test/ring/copy_of_ring_0.jpg", "exact"),
                     ("train/watch/watch_1.jpg", "test/watch/resized_watch_1.jpg", "near")}
    assert rep["too_small"] == [{"file": "train/ring/small.jpg", "width": 24, "height": 20}]
    assert [(r["file"], r["orientation"]) for r in rep["exif_rotated"]] == [("train/watch/sideways.jpg", 6)]
    assert rep["problems"] == {
        "rejected": 1, "extension_mismatches": 1, "exact_duplicate_groups": 2,
        "near_duplicate_groups": 1, "groups_across_splits": 2, "groups_with_conflicting_labels": 0,
        "too_small": 1, "exif_rotated": 1, "exact_groups_across_splits": 1, "empty_classes": 0,
        "repeated_rows": 0}
    assert rep["errors"] == {"exact_groups_across_splits": 1}
    assert set(rep["warnings"]) == {"rejected", "extension_mismatches", "exact_duplicate_groups",
                                    "near_duplicate_groups", "too_small", "exif_rotated"}
    assert rep["clean"] is False

    table = format_check_report(rep)
    for needle in ("train/ring/broken.jpg: corrupt JPEG", "named .jpg, content is PNG",
                   "test/ring/copy_of_ring_0.jpg [test] = train/ring/ring_0.jpg [train]",
                   "test/watch/resized_watch_1.jpg [test] ≈ train/watch/watch_1.jpg [train]",
                   "train/ring/small.jpg: 24x20", "train/watch/sideways.jpg: orientation 6"):
        assert needle in table, needle


def test_duplicate_labels_that_disagree_are_flagged(tmp_path):
    root = make_split_folder(tmp_path / "d", train=3, test=0, classes=("ring", "watch"))
    shutil.copy(root / "train/ring/ring_000.jpg", root / "train/watch/looks_like_a_ring.jpg")
    rep = check_data(str(root))
    [group] = rep["duplicates"]["exact"]
    assert group["conflicting_labels"] and group["labels"] == ["ring", "watch"]
    assert "LABELS DIFFER: ring, watch" in format_check_report(rep)


def test_clean_data_is_clean_and_the_size_check_needs_a_size(tmp_path):
    root = make_split_folder(tmp_path / "d", train=4, test=2)
    rep = check_data(str(root))
    assert rep["clean"] and rep["too_small"] == [] and rep["settings"]["input_size"] is None
    assert rep["splits"] == {"train": 12, "test": 6}
    assert "clean: nothing found" in format_check_report(rep)
    # the 40x48 test images are under resnet50's 224 px input
    rep = check_data(str(root), backbone="resnet50", image_size=224)
    assert rep["settings"]["input_size"] == 224 and len(rep["too_small"]) == 18


def test_perceptual_hash_matches_copies_and_separates_photos():
    base = photo(7)
    h = fingerprint(encode(base)).phash
    copies = [encode(base.resize((96, 77)), quality=60), encode(base, "PNG"), encode(base.resize((320, 256)), "WEBP")]
    for data in copies:
        assert hamming(h, fingerprint(data).phash) <= NEAR_DUPLICATE_DISTANCE
    others = [hamming(h, fingerprint(encode(photo(s))).phash) for s in range(20, 40)]
    assert min(others) > 3 * NEAR_DUPLICATE_DISTANCE
    # a transparent cut-out hashes like the same picture on white (as the decoder composites it)
    rgba = base.convert("RGBA")
    alpha = np.where(np.asarray(base.convert("L")) > 250, 0, 255).astype(np.uint8)
    rgba.putalpha(Image.fromarray(alpha))
    arr = np.asarray(rgba).copy()
    arr[alpha == 0, :3] = 0  # junk under transparent pixels
    cutout = encode(Image.fromarray(arr), "PNG")
    assert hamming(h, fingerprint(cutout).phash) <= NEAR_DUPLICATE_DISTANCE


@pytest.mark.parametrize("popcount", [True, False])
def test_hamming_pairs_match_brute_force(monkeypatch, popcount):
    if not popcount:
        monkeypatch.delattr(np, "bitwise_count", raising=False)
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 256, (300, 32), dtype=np.uint8)
    hashes[50] = hashes[10]
    hashes[60] = hashes[10] ^ np.eye(32, dtype=np.uint8)[3]          # 1 bit away
    hashes[70, :4] = hashes[20, :4] ^ 0xFF                             # 32 bits away
    hashes[70, 4:] = hashes[20, 4:]
    bits = np.unpackbits(hashes, axis=1).astype(np.int32)
    dist = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    for t in (1, 32):
        expect = {(i, j, int(dist[i, j])) for i in range(300) for j in range(i + 1, 300) if dist[i, j] <= t}
        assert set(report_mod.hamming_pairs(hashes, t)) == expect


def _split_records(root):
    return load_source(str(root)).records


def _leaking_groups(records, **data):
    found = check_split_leakage(records, DataConfig(**data), log=lambda _: None)
    return found.exact_groups + found.near_groups


def test_find_split_leakage(messy):
    records = _split_records(messy)
    groups = _leaking_groups(records, check_workers=2)
    pairs = {(lk["a"], lk["b"], lk["kind"]) for g in groups for lk in g["leaks"]}
    assert pairs == {("train/ring/ring_0.jpg", "test/ring/copy_of_ring_0.jpg", "exact"),
                     ("train/watch/watch_1.jpg", "test/watch/resized_watch_1.jpg", "near")}
    exact_only = _leaking_groups(records, near_duplicate_check=False)
    assert [g["kind"] for g in exact_only] == ["exact"]
    # the within-train duplicate is no leak, and without the planted copies nothing leaks
    (messy / "test/ring/copy_of_ring_0.jpg").unlink()
    (messy / "test/watch/resized_watch_1.jpg").unlink()
    assert _leaking_groups(_split_records(messy)) == []


def test_find_split_leakage_after_assigned_splits():
    # records of an unsplit folder get their splits from assign_splits; a copy carved into val leaks
    a, b, c = (Record(f"/nonexistent/{n}.jpg", f"ring/{n}.jpg", "ring", s) for n, s in
               (("a", "train"), ("b", "val"), ("c", "train")))
    facts = {a: report_mod.Fingerprint("x"), b: report_mod.Fingerprint("x"), c: report_mod.Fingerprint("y")}
    exact, near = report_mod.duplicate_groups(facts.items())
    assert len(exact) == 1 and exact[0]["across_splits"] and near == []
    assert exact[0]["leaks"][0]["a"] == "ring/a.jpg" and exact[0]["leaks"][0]["b_split"] == "val"


# ---------------------------------------------------------------- the command


def test_check_command_table_json_and_exit_codes(messy, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["check", str(messy), "--image-size", "32"])
    assert result.exit_code == 1, result.output
    assert "LEAKAGE: 2 file(s) have a copy in another split" in result.output
    assert result.output.rstrip().splitlines()[-2].startswith("found: 1 rejected, 1 extension mismatches")
    assert result.output.rstrip().splitlines()[-1].startswith("errors: 1 exact groups across splits")

    out = tmp_path / "report.json"
    result = runner.invoke(main, ["check", str(messy), "--json", "--output", str(out), "--near-distance", "0"])
    assert result.exit_code == 1
    printed = json.loads(result.output)
    assert printed == json.loads(out.read_text())
    assert printed["settings"]["near_duplicate_distance"] == 0 and printed["duplicates"]["near"] == []

    clean = make_split_folder(tmp_path / "clean", train=3, test=1)
    result = runner.invoke(main, ["check", str(clean), "--image-size", "32"])
    assert result.exit_code == 0 and "clean: nothing found" in result.output

    result = runner.invoke(main, ["check", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: data path '{tmp_path / 'nope'}' does not exist; pass a folder of class "
        f"subfolders or a CSV manifest"]
    result = runner.invoke(main, ["check", str(clean), "--output", str(tmp_path / "no" / "dir" / "r.json")])
    assert result.exit_code == 2 and result.output.startswith("error: cannot write the report to")


def test_check_data_reads_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        rep = check_data("tfds:cats_vs_dogs", near_duplicate_distance=None)
    assert rep["files"] == 6 and rep["extension_mismatches"] == []
    assert set(rep["classes"]) == {"cat", "dog"}


def test_check_exits_0_on_warnings_1_with_strict_and_uses_the_configured_size(tmp_path):
    """Warnings (a .jpg that is a PNG, images under the input side) leave the exit status 0,
    so a `check && fit` chain goes on; --strict fails on them. The size is the config's."""
    root = make_split_folder(tmp_path / "d", train=3, test=1)  # 40x48 px images
    from PIL import Image

    Image.new("RGB", (40, 48), (200, 10, 10)).save(root / "train" / "ring" / "really_a_png.jpg", "PNG")
    runner = CliRunner()
    result = runner.invoke(main, ["check", str(root), "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)
    assert rep["errors"] == {} and rep["warnings"]["extension_mismatches"] == 1
    assert rep["settings"]["input_size"] == 224  # the default config's backbone, resnet50
    assert runner.invoke(main, ["check", str(root), "--strict"]).exit_code == 1

    config = tmp_path / "small.yaml"
    config.write_text("model: {backbone: mobilenet_025}\ndata: {image_size: 32}\n")
    rep = json.loads(runner.invoke(main, ["check", str(root), "--json", "--config", str(config)]).output)
    assert rep["settings"]["input_size"] == 32 and rep["too_small"] == []
    assert rep["settings"]["backbone"] == "mobilenet_025"
    table = runner.invoke(main, ["check", str(root), "--config", str(config)]).output
    assert table.rstrip().splitlines()[-1].startswith("no errors, warnings only (exit status 0")
