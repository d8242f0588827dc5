"""A pixel limit before any decode (issue 20, item 1): the exported serving graphs, `predict`
and `similar` read an image's size from its header and refuse, with the data check's own
words, what is over the run's ``data.max_pixels`` or under its ``data.min_image_side``.

The hostile files: an 875 KB all-zero RGBA PNG of 15000x15000 (900 MB decoded), a 631-byte
JPEG whose header claims 60000x60000, and a 1x1 PNG (training refuses it)."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from jewelclf.cli import main
from jewelclf.data import formats, images
from jewelclf.inference.predict import read_image_file

from conftest import make_class_folder
from export_helpers import encode, exported_tiny, noisy


# As the serving graphs run them (eagerly, the JPEG walk's loop would run op by op in Python).
# Looked up when called, so that the serving, predict and similar tests run on older code too.
def graph_dimensions(encoded):
    return tf.function(images.header_dimensions)(encoded)


def graph_refusals(encoded, max_pixels, min_side):
    return tf.function(images.size_refusals)(encoded, max_pixels, min_side)


def png_bomb(width: int = 15000, height: int = 15000, rows_per_block: int = 500) -> bytes:
    """An all-zero RGBA PNG, built without holding its pixels: the deflate stream of one block
    of zero rows repeats after a full flush, and the Adler-32 of zeros is known."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    block = bytes((1 + 4 * width) * rows_per_block)
    z = zlib.compressobj(9)
    first = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    again = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    adler = ((len(block) * (height // rows_per_block)) % 65521) << 16 | 1
    idat = first + again * (height // rows_per_block - 1) + b"\x03\x00" + struct.pack(">I", adler)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A tiny real JPEG whose frame header (SOF0) is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), "JPEG", quality=50))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


BIG_PNG_REASON = "too large: 15000x15000 px is over data.max_pixels=50000000; downscale it or raise the limit"
BIG_JPEG_REASON = "too large: 60000x60000 px is over data.max_pixels=50000000; downscale it or raise the limit"
TINY_REASON = "too small: 1x1 px, under data.min_image_side=8"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The three hostile files and two good ones, on disk."""
    root = tmp_path_factory.mktemp("hostile")
    files = {"bomb.png": png_bomb(), "bomb.jpg": jpeg_claiming(60000, 60000),
             "dot.png": encode(np.zeros((1, 1, 3), np.uint8), "PNG"),
             "good.jpg": encode(noisy((40, 48, 3), 1, (200, 40, 40)), "JPEG"),
             "good.png": encode(noisy((33, 41, 3), 2, (40, 200, 40)), "PNG")}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def test_the_hostile_files_are_what_the_issue_says(hostile, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own bomb guard, for the header read
    assert 800_000 < (hostile / "bomb.png").stat().st_size < 900_000
    assert (hostile / "bomb.jpg").stat().st_size < 700
    with Image.open(hostile / "bomb.png") as im:
        assert im.size == (15000, 15000) and im.mode == "RGBA"
    with Image.open(hostile / "bomb.jpg") as im:
        assert im.size == (60000, 60000)


# ---------------------------------------------------------------------------- the header reader


def _variants() -> dict[str, bytes]:
    rgb = noisy((37, 53, 3), 3)
    out = {
        "baseline.jpg": encode(rgb, "JPEG"), "progressive.jpg": encode(rgb, "JPEG", progressive=True),
        "gray.jpg": encode(rgb[..., 0], "JPEG"), "cmyk.jpg": _pil(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "exif.jpg": _pil(Image.fromarray(rgb), "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 5000),
        "rgb.png": encode(rgb, "PNG"), "rgba.png": encode(np.dstack([rgb, rgb[..., 0]]), "PNG"),
        "16bit.png": _pil(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
        "palette.png": _pil(Image.fromarray(rgb).convert("P"), "PNG"),
        "still.gif": encode(rgb, "GIF"), "bmp24.bmp": encode(rgb, "BMP"),
        "gray.bmp": encode(rgb[..., 0], "BMP"),
        "lossy.webp": encode(rgb, "WEBP", quality=80), "lossless.webp": encode(rgb, "WEBP", lossless=True),
        "alpha.webp": encode(np.dstack([rgb, rgb[..., 0]]), "WEBP", quality=80),
    }
    jpeg = out["baseline.jpg"]
    # libjpeg (and PIL) skip junk bytes and fill bytes before a marker; so does the reader.
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    out["junk-before-marker.jpg"] = jpeg[:app0_end] + b"junk" + b"\xff\xff" + jpeg[app0_end:]
    return out


def _pil(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_header_sizes_match_pil_and_the_graph_on_every_format():
    variants = _variants()
    names = list(variants)
    data = [variants[n] for n in names]
    for name, blob in variants.items():
        with Image.open(io.BytesIO(blob)) as im:
            assert formats.image_dimensions(blob) == im.size, name
    width, height = graph_dimensions(tf.constant(data))
    assert list(zip(width.numpy().tolist(), height.numpy().tolist())) == [formats.image_dimensions(b) for b in data]


def test_cut_short_or_foreign_headers_have_no_size_in_python_and_in_the_graph():
    jpeg = _variants()["baseline.jpg"]
    cut = [jpeg[:20], encode(noisy((9, 9, 3), 1), "PNG")[:20], b"GIF89a\x01", b"BM" + b"\x00" * 10,
           b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"\xff\xd8\xff" + b"\x00" * 50, b"hello", b"",
           b"\xff\xd8" + b"\xff\xe0\x00\x02" * 2000]  # more segments than the walk takes
    assert [formats.image_dimensions(b) for b in cut] == [None] * len(cut)
    width, height = graph_dimensions(tf.constant(cut))
    assert width.numpy().tolist() == height.numpy().tolist() == [-1] * len(cut)
    refused, reason = graph_refusals(tf.constant(cut), 50_000_000, 8)
    assert [r.decode() for r in reason.numpy()] == [formats.header_problem(b, 50_000_000, 8) or "" for b in cut]
    assert refused.numpy().tolist() == [True] * 6 + [False, False, True]  # no format: not for this rule


def test_graph_reasons_are_the_data_checks_words(hostile):
    data = [(hostile / n).read_bytes() for n in ("bomb.png", "bomb.jpg", "dot.png", "good.jpg")]
    data.append(encode(np.zeros((8, 2, 3), np.uint8), "BMP"))
    refused, reason = graph_refusals(tf.constant(data), 50_000_000, 8)
    python = [formats.header_problem(b, 50_000_000, 8) or "" for b in data]
    assert [r.decode() for r in reason.numpy()] == python
    assert python[:3] == [BIG_PNG_REASON, BIG_JPEG_REASON, TINY_REASON] and python[3] == ""
    assert refused.numpy().tolist() == [True, True, True, False, True]
    # One rule for all: the decoder's own ceiling when data.max_pixels is above it.
    assert formats.size_problem(30000, 30000, 10**12, 8).endswith("px TensorFlow can decode; downscale it")


# ---------------------------------------------------------------------------- the SavedModel


@pytest.fixture(scope="module")
def saved_model(tiny_run, tmp_path_factory):
    return exported_tiny(tiny_run, tmp_path_factory) / "1"


def test_export_records_the_limits(saved_model):
    info = json.loads((saved_model / "assets.extra" / "jewelclf.json").read_text())
    assert info["max_pixels"] == 50_000_000 and info["min_image_side"] == 8


def test_serving_signatures_refuse_hostile_headers_without_decoding(saved_model, hostile):
    """Loaded with TensorFlow alone, as TF Serving would: the bombs are answered valid=false
    with the reason, the good images in the same request as when alone."""
    loaded = tf.saved_model.load(str(saved_model))
    names = ["good.jpg", "bomb.png", "bomb.jpg", "dot.png", "good.png"]
    batch = tf.constant([(hostile / n).read_bytes() for n in names])
    out = loaded.signatures["serving_default"](images=batch)
    assert out["valid"].numpy().tolist() == [True, False, False, False, True]
    assert [e.decode() for e in out["error"].numpy()] == ["", BIG_PNG_REASON, BIG_JPEG_REASON, TINY_REASON, ""]
    probs = out["probabilities"].numpy()
    assert not probs[1:4].any()
    alone = loaded.signatures["serving_default"](images=tf.constant([(hostile / n).read_bytes()
                                                                      for n in ("good.jpg", "good.png")]))
    np.testing.assert_allclose(probs[[0, 4]], alone["probabilities"].numpy(), atol=1e-6)
    embed = loaded.signatures["embed"](images=batch)
    assert embed["valid"].numpy().tolist() == [True, False, False, False, True]
    assert [e.decode() for e in embed["error"].numpy()][1:4] == [BIG_PNG_REASON, BIG_JPEG_REASON, TINY_REASON]
    assert not embed["embedding"].numpy()[1:4].any()


# ---------------------------------------------------------------------------- predict and similar


def test_read_image_file_refuses_from_the_header(hostile):
    assert read_image_file(hostile / "bomb.png") == (None, BIG_PNG_REASON)
    assert read_image_file(hostile / "bomb.jpg", (10**12, 8))[1].endswith("TensorFlow can decode; downscale it")
    assert read_image_file(hostile / "dot.png", (50_000_000, 1))[1] is None
    assert read_image_file(hostile / "good.jpg")[1] is None


@pytest.mark.parametrize("which", ["savedmodel", "run"])
def test_predict_refuses_hostile_images(which, saved_model, tiny_run, hostile):
    model = saved_model if which == "savedmodel" else tiny_run
    files = [hostile / n for n in ("bomb.png", "bomb.jpg", "dot.png", "good.jpg")]
    r = CliRunner().invoke(main, ["predict", str(model), *map(str, files), "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["image"].rsplit("/", 1)[-1]: row for row in json.loads(r.stdout)}
    assert rows["bomb.png"]["error"] == BIG_PNG_REASON
    assert rows["bomb.jpg"]["error"] == BIG_JPEG_REASON
    assert rows["dot.png"]["error"] == TINY_REASON
    assert "error" not in rows["good.jpg"] and rows["good.jpg"]["class"]


def test_similar_refuses_hostile_images(tiny_run, hostile, tmp_path):
    catalogue = make_class_folder(tmp_path / "catalogue", per_class=2, seed=5)
    index = tmp_path / "index"
    built = CliRunner().invoke(main, ["index", str(tiny_run), str(catalogue), "--output", str(index)])
    assert built.exit_code == 0, built.output
    queries = [hostile / n for n in ("bomb.png", "bomb.jpg", "dot.png", "good.jpg")]
    r = CliRunner().invoke(main, ["similar", str(index), *map(str, queries), "--json", "--k", "2"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    errors = {e["query"].rsplit("/", 1)[-1]: e["error"] for e in report["errors"]}
    assert errors == {"bomb.png": BIG_PNG_REASON, "bomb.jpg": BIG_JPEG_REASON, "dot.png": TINY_REASON}
    assert [q["query"].rsplit("/", 1)[-1] for q in report["queries"]] == ["good.jpg"]
