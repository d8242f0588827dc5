"""Hostile input to the data layer: each gives a one-line reason naming the file, no traceback,
no hang and no huge allocation (issue #6, "Hostile input")."""

import builtins
import io
import os
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

import jewelclf.data.fingerprint as report_mod
import jewelclf.data.validate as check_mod
from jewelclf.cli import main
from jewelclf.config import DataConfig
from jewelclf.data.audit import check_data
from jewelclf.data.leakage import check_split_leakage
from jewelclf.data.pipeline import decoded_dataset
from jewelclf.data.sources import Record, load_source
from jewelclf.data.validate import MAX_FILE_BYTES, check_file, check_records
from jewelclf.errors import JewelclfError

from conftest import make_class_folder, make_image

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def within(seconds: float, fn, *args, **kwargs):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it takes over ``seconds``."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} hung for over {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def checks_by_name(records, min_side=8):
    return {os.path.basename(c.record.path): c
            for c in check_records(records, DataConfig().max_pixels, min_side, workers=2)}


def png_bytes(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG of zeros, built chunk by chunk: 20,000 x 20,000 px is ~50 KB and is
    never held uncompressed (PIL would need 400 MB to make it with Image.new)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row * min(1000, height - i)) for i in range(0, height, 1000))
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header (SOF0) claims another size."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_with_huge_second_frame(width: int, height: int) -> bytes:
    """A 16x16 GIF (all PIL's header read sees) followed by a frame descriptor of width x height
    with a token of data: TensorFlow would slurp every frame into a canvas of the largest."""
    buf = io.BytesIO()
    Image.new("L", (16, 16), 0).save(buf, "GIF")
    first = buf.getvalue()[:-1]  # without the trailer
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08\x02\x00\x01\x00"
    return first + frame + b"\x3b"


# ---------------------------------------------------------------- paths


def test_paths_with_spaces_and_unicode_load_check_and_decode(tmp_path):
    root = tmp_path / "dâta sét ✓"
    for ci, cls in enumerate(("bague 💍", "montre à gousset")):
        for i in range(3):
            make_image("ring", ci * 10 + i, path=root / cls / f"photo n°{i} – été.jpg")
    src = load_source(str(root))
    assert src.class_names == ["bague 💍", "montre à gousset"] and len(src.records) == 6
    assert all(c.ok for c in checks_by_name(src.records).values())
    images = list(decoded_dataset(src, src.records, DataConfig(), 16))
    assert len(images) == 6 and images[0][0].shape == (16, 16, 3)
    rep = check_data(str(root))
    assert rep["usable"] == 6 and rep["rejected"] == []
    result = CliRunner().invoke(main, ["check", str(root)])
    assert result.exit_code == 0 and "bague 💍" in result.output


def test_file_name_that_is_not_utf8_is_refused_by_name(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    bad = os.fsencode(str(root / "ring")) + b"/caf\xe9.jpg"  # Latin-1 bytes from an old zip
    shutil.copy(root / "ring" / "ring_000.jpg", bad)
    src = load_source(str(root))
    name = os.fsdecode(b"caf\xe9.jpg")
    check = checks_by_name(src.records)[name]
    assert not check.ok and "not valid UTF-8" in check.reason
    rep = check_data(str(root))
    assert [r["file"] for r in rep["rejected"]] == ["ring/caf\\xe9.jpg"]
    result = CliRunner().invoke(main, ["check", str(root), "--strict"])  # a reject warns
    assert result.exit_code == 1 and "ring/caf\\xe9.jpg: the file name is not valid UTF-8" in result.output


def test_symlinked_files_and_class_folders_are_followed(tmp_path):
    elsewhere = make_class_folder(tmp_path / "elsewhere", per_class=2, classes=("watch",))
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring",))
    os.symlink(elsewhere / "watch", root / "watch")                        # a class folder
    os.symlink(elsewhere / "watch" / "watch_000.jpg", root / "ring" / "linked.jpg")  # a file
    src = load_source(str(root))
    assert sorted(r.key for r in src.records) == [
        "ring/linked.jpg", "ring/ring_000.jpg", "ring/ring_001.jpg", "watch/watch_000.jpg", "watch/watch_001.jpg"]
    assert all(c.ok for c in checks_by_name(src.records).values())
    assert len(list(decoded_dataset(src, src.records, DataConfig(), 16))) == 5
    # a symlinked copy is the same bytes: the data check says so
    [group] = check_data(str(root))["duplicates"]["exact"]
    assert {f["file"] for f in group["files"]} == {"ring/linked.jpg", "watch/watch_000.jpg"}


def test_symlink_loops_end_with_a_reason(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    os.symlink(root / "ring", root / "ring" / "again")   # a folder loop
    os.symlink("..", root / "watch" / "up")              # a loop through the parent
    os.symlink("b.jpg", root / "ring" / "a.jpg")          # a file loop a -> b -> a
    os.symlink("a.jpg", root / "ring" / "b.jpg")
    src = within(20, load_source, str(root))
    keys = sorted(r.key for r in src.records)
    assert keys == ["ring/a.jpg", "ring/b.jpg", "ring/ring_000.jpg", "ring/ring_001.jpg",
                    "watch/watch_000.jpg", "watch/watch_001.jpg"]
    checks = within(20, checks_by_name, src.records)
    assert "symlink loop" in checks["a.jpg"].reason and "symlink loop" in checks["b.jpg"].reason
    os.symlink(tmp_path / "self", tmp_path / "self")
    with pytest.raises(JewelclfError, match="'.*self' is a broken symlink or a symlink loop"):
        load_source(str(tmp_path / "self"))
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(JewelclfError, match="broken symlink"):
        load_source(str(tmp_path / "dangling"))


def test_broken_symlink_fifo_and_huge_file_are_refused_without_reading(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring",))
    os.symlink(tmp_path / "missing.jpg", root / "ring" / "dangling.jpg")
    os.mkfifo(root / "ring" / "pipe.jpg")                 # open() would block forever
    with open(root / "ring" / "huge.jpg", "wb") as f:     # sparse: no disk, no memory
        f.truncate(MAX_FILE_BYTES + 1)
    checks = within(20, checks_by_name, load_source(str(root)).records)
    assert "file not found" in checks["dangling.jpg"].reason
    assert "not a regular file" in checks["pipe.jpg"].reason
    assert checks["huge.jpg"].reason.startswith("file too large: 256 MiB")


# ---------------------------------------------------------------- permissions


def _deny(monkeypatch, target):
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(target):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(check_mod, "open", fake_open, raising=False)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    # Tests run as root in CI, where chmod 000 does not stop a read: deny the open itself.
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    _deny(monkeypatch, root / "ring" / "ring_000.jpg")
    check = checks_by_name(load_source(str(root)).records)["ring_000.jpg"]
    assert not check.ok and check.reason == "cannot be read (permission denied); fix its permissions"
    rep = check_data(str(root))
    assert [(r["file"], r["reason"]) for r in rep["rejected"]] == [
        ("ring/ring_000.jpg", "cannot be read (permission denied); fix its permissions")]


@pytest.mark.skipif(IS_ROOT, reason="running as root: file permissions do not stop root from reading")
def test_unreadable_file_and_folder_for_real(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    (root / "ring" / "ring_000.jpg").chmod(0)
    try:
        check = checks_by_name(load_source(str(root)).records)["ring_000.jpg"]
        assert "permission denied" in check.reason
        (root / "watch").chmod(0)
        with pytest.raises(JewelclfError, match="cannot list folder .*watch.* permission denied"):
            load_source(str(root))
    finally:
        (root / "ring" / "ring_000.jpg").chmod(0o644)
        (root / "watch").chmod(0o755)


def test_unreadable_class_folder_simulated(tmp_path, monkeypatch):
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    real_scandir = os.scandir

    def fake_scandir(path="."):
        if os.fspath(path) == str(root / "watch"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    # Without the check the folder would look empty ("class folder is empty"), which misleads.
    with pytest.raises(JewelclfError, match=r"cannot list folder '.*watch' \(permission denied\)"):
        load_source(str(root))


# ---------------------------------------------------------------- odd files


def test_folder_named_like_an_image(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    (root / "ring" / "empty.jpg").mkdir()                                  # ignored: no files
    make_image("ring", 9, path=root / "ring" / "album.jpg" / "inner.jpg")  # walked like any folder
    src = load_source(str(root))
    assert "ring/album.jpg/inner.jpg" in {r.key for r in src.records}
    assert not any(r.key.endswith("empty.jpg") for r in src.records)
    # a manifest row can name a folder: the check refuses it by name
    (root / "m.csv").write_text("path,label\nring/ring_000.jpg,ring\nring/empty.jpg,ring\nwatch/watch_000.jpg,watch\n")
    checks = checks_by_name(load_source(str(root / "m.csv")).records)
    assert checks["empty.jpg"].reason == "a folder, not an image file"


@pytest.mark.parametrize("name, data, min_side, expect", [
    ("zero.png", png_bytes(0, 0), 8, "corrupt PNG: unreadable header (cannot identify image file)"),
    ("zero.jpg", jpeg_claiming(0, 0), 8, "corrupt JPEG: unreadable header (cannot identify image file)"),
    ("one.png", png_bytes(1, 1), 8, "too small: 1x1 px, under data.min_image_side=8"),
    ("one.jpg", jpeg_claiming(1, 1), 8, "too small: 1x1 px, under data.min_image_side=8"),
    ("one_allowed.png", png_bytes(1, 1), 1, ""),
])
def test_zero_and_one_pixel_images(tmp_path, name, data, min_side, expect):
    p = tmp_path / name
    p.write_bytes(data)
    check = check_file(Record(str(p), name, "ring"), DataConfig().max_pixels, min_side)
    assert check.reason == expect and check.ok == (expect == "")
    if check.ok:  # what the check lets through, the loader reads
        src = load_source(str(_folder_with(tmp_path / "d", p)))
        x = [x for x, _ in decoded_dataset(src, src.records, DataConfig(), 8)]
        assert all(i.shape == (8, 8, 3) for i in x) and len(x) == 3


def _folder_with(root, extra):
    make_class_folder(root, per_class=1, classes=("ring", "watch"))
    shutil.copy(extra, root / "ring" / extra.name)
    return root


BOMB_REASON = "too large: 20000x20000 px is over data.max_pixels=50000000; downscale it or raise the limit"


@pytest.mark.parametrize("name, data, reason", [
    ("bomb.png", png_bytes(20_000, 20_000), BOMB_REASON),
    ("bomb.jpg", jpeg_claiming(20_000, 20_000), BOMB_REASON),
    ("bomb.gif", gif_with_huge_second_frame(20_000, 20_000),
     "too large: an animated GIF of 2 frames, 400000256 px in all, is over data.max_pixels=50000000; "
     "save its first frame as a still image"),
])
def test_decode_bomb_20000_px_is_refused_from_its_header(tmp_path, monkeypatch, name, data, reason):
    assert len(data) < 100_000
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    (root / "ring" / name).write_bytes(data)
    decoded, hashed = [], []
    real_decode, real_hash = check_mod.decode_rgb, report_mod.perceptual_hash

    def spy_decode(encoded):
        decoded.append(len(encoded.numpy()))
        return real_decode(encoded)

    def spy_hash(im):
        hashed.append(im.size)
        return real_hash(im)

    monkeypatch.setattr(check_mod, "decode_rgb", spy_decode)
    monkeypatch.setattr(report_mod, "perceptual_hash", spy_hash)
    t0 = time.perf_counter()
    rep = within(60, check_data, str(root), workers=2)
    found = within(60, check_split_leakage, load_source(str(root)).records)
    leaks = found.exact_groups + found.near_groups
    assert time.perf_counter() - t0 < 30
    assert [(r["file"], r["reason"]) for r in rep["rejected"]] == [(f"ring/{name}", reason)]
    assert len(decoded) == 4 and len(data) not in decoded      # the 4 good files only
    assert (20_000, 20_000) not in hashed and leaks == []


# ---------------------------------------------------------------- CSV manifests


@pytest.fixture
def csv_root(tmp_path):
    root = tmp_path / "m"
    for cls in ("ring", "watch"):
        for i in range(2):
            make_image(cls, i, path=root / "img" / f"{cls}_{i}.jpg")
    return root


def _csv(root, text, name="manifest.csv"):
    p = root / name
    p.write_text(text, encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("row", ["../outside.jpg", "img/../../outside.jpg", "/etc/passwd"])
def test_csv_paths_outside_its_folder_are_refused(csv_root, row):
    spec = _csv(csv_root, f"path,label\nimg/ring_0.jpg,ring\n{row},watch\n")
    with pytest.raises(JewelclfError, match=rf"line 3: path '{row}' is outside the manifest's folder"):
        load_source(spec)


def test_csv_paths_inside_its_folder_are_kept(csv_root):
    inside_abs = csv_root / "img" / "watch_0.jpg"
    spec = _csv(csv_root, f"path,label\nimg/ring_0.jpg,ring\n./img/../img/ring_1.jpg,ring\n{inside_abs},watch\n")
    src = load_source(spec)
    assert [r.path for r in src.records] == [
        str(csv_root / "img/ring_0.jpg"), str(csv_root / "img/ring_1.jpg"), str(inside_abs)]
    assert all(c.ok for c in checks_by_name(src.records).values())


def test_csv_label_missing_from_train(csv_root):
    spec = _csv(csv_root, "path,label,split\nimg/ring_0.jpg,ring,train\nimg/watch_0.jpg,watch,train\n"
                          "img/ring_1.jpg,tiara,test\n")
    with pytest.raises(JewelclfError, match="label 'tiara' appears only outside the train split"):
        load_source(spec)


def test_csv_extra_fields_malformed_text_and_nul_bytes(csv_root):
    # more fields than the header names: ignored, not a crash
    src = load_source(_csv(csv_root, "path,label\nimg/ring_0.jpg,ring,extra,more\nimg/watch_0.jpg,watch\n"))
    assert [r.label for r in src.records] == ["ring", "watch"]
    with pytest.raises(JewelclfError, match="line 2: a field holds a line break, tab or other control"):
        load_source(_csv(csv_root, "path,label\nimg/ring\x000.jpg,ring\n"))
    huge = "x" * 200_000  # over the csv module's field limit
    with pytest.raises(JewelclfError, match="is not valid CSV"):
        load_source(_csv(csv_root, f'path,label\n"{huge}",ring\n'))
    (csv_root / "latin1.csv").write_bytes("path,label\nimg/bagu\xe9.jpg,ring\n".encode("latin-1"))
    with pytest.raises(JewelclfError, match="not UTF-8"):
        load_source(str(csv_root / "latin1.csv"))


def test_hostile_folder_through_the_command(tmp_path):
    """All of it at once through `jewelclf check --strict`: exit 1 (unreadable files are
    warnings: fit leaves them out), one line per reject naming the file."""
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    (root / "ring" / "bomb.png").write_bytes(png_bytes(20_000, 20_000))
    (root / "ring" / "zero.png").write_bytes(png_bytes(0, 0))
    (root / "ring" / "folder.jpg").mkdir()
    make_image("ring", 5, path=root / "ring" / "folder.jpg" / "inside.jpg")
    os.mkfifo(root / "ring" / "pipe.jpg")
    os.symlink("loop.jpg", root / "watch" / "loop.jpg")
    (root / "watch" / "notes.jpg").write_text("not an image")
    result = within(60, CliRunner().invoke, main, ["check", str(root), "--strict"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for line in ("ring/bomb.png: too large: 20000x20000 px", "ring/zero.png: corrupt PNG",
                 "ring/pipe.jpg: not a regular file", "watch/loop.jpg: a symlink loop",
                 "watch/notes.jpg: not a supported image (text)"):
        assert any(out.strip().startswith(line) for out in result.output.splitlines()), line
    assert "unreadable or unsupported (5):" in result.output


def test_animated_webp_is_refused_before_tensorflow_decodes_it(tmp_path):
    # tf.io.decode_image on an animated WebP corrupts the heap and aborts the process (TF 2.21),
    # so the check must refuse it from its header; if it did not, this test would kill pytest.
    frames = [Image.new("RGB", (64, 64), (i * 60, 0, 0)) for i in range(3)]
    root = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    frames[0].save(root / "ring" / "spin.webp", "WEBP", save_all=True, append_images=frames[1:])
    rep = check_data(str(root))
    assert [(r["file"], r["reason"]) for r in rep["rejected"]] == [
        ("ring/spin.webp", "animated WebP, which TensorFlow cannot decode safely; save its first "
                           "frame as a still image")]
    frames[0].save(root / "ring" / "still.webp", "WEBP")  # a still WebP is fine
    assert check_data(str(root))["usable"] == 5


def test_checked_files_always_load(tmp_path):
    """What the check lets through, the training loader decodes: 16-bit, palette, CMYK, gray+alpha."""
    root = make_class_folder(tmp_path / "d", per_class=1, classes=("ring", "watch"))
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P").save(root / "ring" / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "ring" / "cmyk.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(root / "ring" / "deep.png")
    Image.fromarray(rgb[..., :2]).convert("LA").save(root / "ring" / "gray_alpha.png")
    # an animated GIF whose frames differ in size: decoded at the largest frame's size
    frames = [Image.fromarray(rgb), Image.fromarray(rgb[:, :20])]
    frames[0].save(root / "ring" / "anim.gif", save_all=True, append_images=frames[1:])
    src = load_source(str(root))
    checks = checks_by_name(src.records)
    assert all(c.ok for c in checks.values()), {k: c.reason for k, c in checks.items()}
    images = [x for x, _ in decoded_dataset(src, src.records, DataConfig(), 12)]
    assert len(images) == 7 and all(x.shape == (12, 12, 3) and x.dtype == tf.uint8 for x in images)
