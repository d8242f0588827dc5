"""The leakage check of `fit` (jewelclf.data.leakage): the same image in two splits."""

import builtins
import json
import os
import shutil
import threading
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from jewelclf import config as cfg
from jewelclf.config import DataConfig
from jewelclf.data.leakage import (
    carved_splits,
    check_split_leakage,
    leakage_hasher,
    write_leakage_report,
)
from jewelclf.data.sources import Record, load_source
from jewelclf.data.validate import check_records
from jewelclf.errors import JewelclfError

from conftest import make_split_folder

CLASSES = ("ring", "watch")


def photo(seed: int, size=(160, 128)) -> Image.Image:
    """A product-like photo: smooth coloured shapes on white (a perceptual hash sees shapes;
    the noise images of conftest.make_image do not survive a resize)."""
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


def photo_folder(root, train=4, test=2):
    """``root/{train,test}/{ring,watch}/*.jpg``, every photo distinct."""
    for split, n, base in (("train", train, 0), ("test", test, 500)):
        for ci, c in enumerate(CLASSES):
            for i in range(n):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                photo(base + ci * 100 + i).save(root / split / c / f"{c}_{i}.jpg", quality=92)
    return root


def records(root):
    return load_source(str(root)).records


def one_line(text: str) -> bool:
    return "\n" not in text and "Traceback" not in text


def test_byte_identical_copy_across_splits_is_refused_with_the_fix(tmp_path):
    root = make_split_folder(tmp_path / "d", train=4, test=2, classes=CLASSES)
    shutil.copy(root / "train/ring/ring_001.jpg", root / "test/ring/copy.jpg")
    recs = records(root)
    # as fit calls it: val is carved by jewelclf, but test/ is the user's, so its copy is refused
    found = check_split_leakage(recs, DataConfig(near_duplicate_check=False), carved=carved_splits(recs))

    assert carved_splits(recs) == {"val"} and found.moved == [] and found.records == recs
    assert list(found.exact_held_out) == ["test/ring/copy.jpg"]
    assert [f["file"] for f in found.exact_groups[0]["files"]] == ["train/ring/ring_001.jpg", "test/ring/copy.jpg"]
    assert found.near_groups == [] and not found.near_checked and found.files == 13
    with pytest.raises(JewelclfError) as e:
        found.enforce(allow=False, log=lambda _: None)
    msg = str(e.value)
    assert one_line(msg) and msg == found.refusal()
    assert msg.startswith("1 held-out file(s) (test: 1) have a byte-identical twin in train")
    assert "test 'test/ring/copy.jpg' = train 'train/ring/ring_001.jpg'" in msg
    assert msg.endswith("remove the duplicates, or pass --allow-leakage")

    # allowed: no error, a warning line instead
    lines = []
    found.enforce(allow=True, log=lines.append)
    assert any(ln.startswith("warning: 1 held-out file(s)") and "data.allow_leakage is set" in ln
               for ln in lines), lines

    # the run records it
    out = tmp_path / "run" / "leakage.json"
    write_leakage_report(found, out, allowed=True)
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["exact"]["held_out_files"] == ["test/ring/copy.jpg"]
    assert saved["refusal"] == msg and saved["allow_leakage"] is True and saved["files"] == 13
    assert [p.name for p in out.parent.iterdir()] == ["leakage.json"]  # no temp file left


def test_copies_that_jewelclf_carved_into_val_go_back_to_train(tmp_path):
    # DATA without val/: assign_splits ranks files by a hash of their path, so it can put one
    # copy of a training photo into val. That split is jewelclf's, so the copy goes back to
    # train (with its manifest group) rather than being refused; given splits are refused.
    files = {}
    for name, img in (("a.jpg", photo(1)), ("b.jpg", photo(1)), ("d.jpg", photo(3)), ("e.jpg", photo(4))):
        files[name] = tmp_path / name
        img.save(files[name], quality=90)
    shutil.copy(files["a.jpg"], files["b.jpg"])                      # b: byte-identical to a
    files["c.png"] = tmp_path / "c.png"
    photo(1).resize((120, 96)).save(files["c.png"])                     # c: a resized copy of a
    split = {"a.jpg": "train", "b.jpg": "val", "c.png": "val", "d.jpg": "val", "e.jpg": "val"}
    group = {"b.jpg": "sku1", "e.jpg": "sku1"}                          # e: same product as b
    recs = [Record(str(p), f"ring/{n}", "ring", split[n], group.get(n)) for n, p in files.items()]

    refused = check_split_leakage(recs, DataConfig())                  # as if val/ were given
    assert list(refused.exact_held_out) == ["ring/b.jpg"] and list(refused.near_held_out) == ["ring/c.png"]
    assert "(val: 1) have a byte-identical twin in train" in refused.refusal()

    found = check_split_leakage(recs, DataConfig(), carved={"val"})
    assert found.clean and found.refusal() is None and found.warning() is None
    assert [(m["file"], m["from"], m["kind"], m["twin"]) for m in found.moved] == [
        ("ring/b.jpg", "val", "exact", "ring/a.jpg"), ("ring/c.png", "val", "near", "ring/a.jpg"),
        ("ring/e.jpg", "val", "exact", "ring/a.jpg")]
    assert {r.key: r.split for r in found.records} == {
        "ring/a.jpg": "train", "ring/b.jpg": "train", "ring/c.png": "train", "ring/d.jpg": "val",
        "ring/e.jpg": "train"}
    assert "3 file(s) that the val split took from train put back into train" in found.message
    assert found.to_dict()["moved_to_train"] == found.moved


def test_resized_reencoded_copy_across_splits_is_a_near_duplicate_warning(tmp_path):
    root = photo_folder(tmp_path / "d")
    # train/watch/watch_1.jpg is photo(101): put it in test, smaller and re-encoded as PNG
    photo(101).resize((120, 96), Image.Resampling.BICUBIC).save(root / "test/watch/small.png")
    found = check_split_leakage(records(root), DataConfig())

    assert found.exact_groups == [] and found.refusal() is None
    assert list(found.near_held_out) == ["test/watch/small.png"]
    assert len(found.near_groups) == 1
    assert {f["file"] for f in found.near_groups[0]["files"]} == {"train/watch/watch_1.jpg", "test/watch/small.png"}
    lines = []
    found.enforce(allow=False, log=lines.append)  # a warning, never a refusal
    warning = found.warning()
    assert warning in lines and one_line(warning)
    assert warning.startswith("warning: 1 held-out file(s) (test: 1) look near-identical to a file in train")
    assert "test 'test/watch/small.png' ≈ train 'train/watch/watch_1.jpg'" in warning
    assert "jewelclf check DATA" in warning

    # data.near_duplicate_check: false turns the search off
    off = check_split_leakage(records(root), DataConfig(near_duplicate_check=False))
    assert off.clean and not off.near_checked and off.warning() is None


def test_duplicates_within_one_split_are_not_leakage(tmp_path):
    root = photo_folder(tmp_path / "d")
    shutil.copy(root / "train/ring/ring_0.jpg", root / "train/ring/ring_0 (1).jpg")      # exact, train
    shutil.copy(root / "test/watch/watch_0.jpg", root / "test/watch/again.jpg")         # exact, test
    photo(2).resize((100, 80)).save(root / "train/watch/resized_ring_2.png")            # near, train
    found = check_split_leakage(records(root), DataConfig())
    assert found.clean, (found.exact_groups, found.near_groups)
    assert found.refusal() is None and found.warning() is None
    lines = []
    found.enforce(allow=False, log=lines.append)
    assert lines == [found.message] and "no held-out file with a byte-identical twin" in found.message


def test_distinct_images_are_not_flagged(tmp_path):
    # no false positive: distinct noise images (conftest) and distinct product-like photos
    noise = check_split_leakage(records(make_split_folder(tmp_path / "noise", train=6, test=3)), DataConfig())
    photos = check_split_leakage(records(photo_folder(tmp_path / "photos", train=6, test=3)), DataConfig())
    for found in (noise, photos):
        assert found.near_checked and found.clean, (found.exact_groups, found.near_groups)
        assert found.exact_held_out == {} and found.near_held_out == {}


def test_config_keys_load_from_yaml_and_are_type_checked(tmp_path):
    assert DataConfig().allow_leakage is False and DataConfig().near_duplicate_check is True
    f = tmp_path / "exp.yaml"
    f.write_text("data:\n  allow_leakage: true\n  near_duplicate_check: false\n")
    c = cfg.resolve(f)
    assert c.data.allow_leakage is True and c.data.near_duplicate_check is False
    assert cfg.from_dict(cfg.load_yaml(_saved(tmp_path, c))) == c  # config.yaml round trip
    f.write_text("data:\n  allow_leakage: sometimes\n")
    with pytest.raises(JewelclfError, match="'data.allow_leakage' must be bool"):
        cfg.resolve(f)


def test_fit_reads_each_file_once_for_the_check_and_the_leakage_hash(tmp_path, monkeypatch):
    # The leakage hashes are taken from the bytes the data check reads (issue 15, item 9).
    from jewelclf.data.prepare import prepare_data

    root = photo_folder(tmp_path / "d")
    photo(101).resize((120, 96), Image.Resampling.BICUBIC).save(root / "test/watch/small.png")
    (root / "train/ring/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    files = {os.path.realpath(p) for p in root.rglob("*") if p.is_file()}
    opened: Counter = Counter()
    lock = threading.Lock()  # the check reads in worker threads
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in files:
            with lock:
                opened[os.path.realpath(file)] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    lines = []
    run = tmp_path / "run"
    run.mkdir()
    prepare_data(str(root), cfg.Config(), run, log=lines.append)
    monkeypatch.undo()

    assert opened == Counter({f: 1 for f in files})
    # and the hashes taken during the check still find the leak
    saved = json.loads((run / "leakage.json").read_text(encoding="utf-8"))
    assert saved["near"]["held_out_files"] == ["test/watch/small.png"] and saved["files"] == 13
    assert any(ln.startswith("warning: 1 held-out file(s) (test: 1) look near-identical") for ln in lines), lines


@pytest.mark.parametrize("near", [True, False])
def test_hashes_from_the_check_find_what_a_second_read_finds(tmp_path, near):
    root = photo_folder(tmp_path / "d", train=6, test=2)
    shutil.copy(root / "train/ring/ring_0.jpg", root / "test/ring/copy.jpg")            # exact, refused
    photo(101).resize((120, 96)).save(root / "test/watch/small.png")                    # near, warned
    for i in range(4):  # copies within train: a carved val can take one, which goes back to train
        shutil.copy(root / f"train/watch/watch_{i}.jpg", root / f"train/watch/again_{i}.jpg")
        photo(i).resize((100, 80)).save(root / f"train/ring/small_{i}.png")
    val = ("train/watch/again_", "train/ring/small_", "train/ring/ring_5")  # as if carved from train
    recs = [replace(r, split="val") if r.key.startswith(val) else r for r in records(root)]
    config = DataConfig(near_duplicate_check=near)
    fingerprints, on_bytes = leakage_hasher(config)
    kept = [c.record for c in check_records(recs, config.max_pixels, config.min_image_side, 2,
                                            on_bytes=on_bytes) if c.ok]
    before = dict(fingerprints)

    reread = check_split_leakage(kept, config, carved={"val"})
    reused = check_split_leakage(kept, config, carved={"val"}, fingerprints=fingerprints)

    assert set(fingerprints) == set(kept) and fingerprints == before  # not re-keyed by the moves
    assert reused.moved and reused.records == reread.records
    a, b = reread.to_dict(), reused.to_dict()
    for d in (a, b):
        d.pop("seconds")
        d["message"] = d["message"].split(": ", 1)[1]  # after "... files in 0.1s"
    assert a == b and a["exact"]["held_out_files"] == ["test/ring/copy.jpg"]
    assert a["near"]["held_out_files"] == (["test/watch/small.png"] if near else [])


def _saved(tmp_path, c):
    p = tmp_path / "config.yaml"
    p.write_text(c.to_yaml())
    return p


def test_fit_reads_each_tfds_example_once(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from jewelclf.data import prepare as training

    yielded: Counter = Counter()
    real = training.tfds_bytes

    def counting_tfds_bytes(source):
        read = real(source)

        def counted(recs):
            for r, data in read(recs):
                yielded[r.key] += 1
                yield r, data

        return counted

    monkeypatch.setattr(training, "tfds_bytes", counting_tfds_bytes)
    with tfds.testing.mock_data(num_examples=12):
        training.prepare_data("tfds:cats_vs_dogs", cfg.Config(), tmp_path, log=lambda _: None)
        keys = [r.key for r in load_source("tfds:cats_vs_dogs").records]
    assert len(keys) == 12 and yielded == Counter(keys)
