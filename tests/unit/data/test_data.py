import io
import shutil
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from jewelclf.config import DataConfig
from jewelclf.data.images import _premultiplied_planes, decode_rgb, load_image, load_jpeg, load_other, resize_rgb
from jewelclf.data.pipeline import batched, decoded_dataset
from jewelclf.data.sources import Record, load_source
from jewelclf.data.splits import assign_splits
from jewelclf.data.validate import check_file, check_records
from jewelclf.errors import JewelclfError

from conftest import CLASSES, make_class_folder, make_csv, make_image, make_split_folder

# ---------------------------------------------------------------- layouts


def test_class_folder_layout(tmp_path):
    src = load_source(str(make_class_folder(tmp_path / "d", per_class=4)))
    assert src.class_names == sorted(CLASSES)
    assert len(src.records) == 12
    assert all(r.split is None for r in src.records)
    assert {r.key.split("/")[0] for r in src.records} == set(CLASSES)


@pytest.mark.parametrize("train_name", ["train", "training"])
def test_split_layout(tmp_path, train_name):
    root = make_split_folder(tmp_path / "d", train=5, val=2, test=3, train_name=train_name)
    src = load_source(str(root))
    counts = Counter(r.split for r in src.records)
    assert counts == {"train": 15, "val": 6, "test": 9}


def test_csv_layout_with_groups_and_splits(tmp_path):
    path = make_csv(tmp_path / "d", per_class=6, groups=3)
    src = load_source(str(path))
    assert src.class_names == sorted(CLASSES)
    assert all(r.group for r in src.records)
    assert all(r.path.startswith(str(tmp_path)) for r in src.records)


def test_tfds_layout_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        src = load_source("tfds:cats_vs_dogs")
        assert src.class_names == ["cat", "dog"]
        assert {r.split for r in src.records} == {"train"}
        records = assign_splits(src.records, seed=0, val_fraction=0.25)
        ds = decoded_dataset(src, [r for r in records if r.split == "val"], DataConfig(), 24)
        images = [x for x, _ in ds]
        assert len(images) == sum(r.split == "val" for r in records) > 0
        assert images[0].shape == (24, 24, 3) and images[0].dtype == tf.uint8


@pytest.mark.parametrize("make, needle", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no class subfolders"),
    (lambda p: (p / "ring").mkdir(parents=True), "is empty"),
    (lambda p: p.write_text("x"), "not a .csv manifest"),
])
def test_bad_data_paths(tmp_path, make, needle):
    p = tmp_path / "data"
    make(p)
    with pytest.raises(JewelclfError, match=needle):
        load_source(str(p))


def test_split_layout_class_missing_from_train(tmp_path):
    root = make_split_folder(tmp_path / "d", train=3, test=0)
    make_image("ring", 1, path=root / "test" / "bangle" / "a.jpg")
    with pytest.raises(JewelclfError, match="'bangle' appears in the test split"):
        load_source(str(root))


@pytest.mark.parametrize("header, needle", [("file,label", "lacks column"), ("path,class", "lacks column")])
def test_csv_missing_columns(tmp_path, header, needle):
    p = tmp_path / "m.csv"
    p.write_text(header + "\na.jpg,ring\n")
    with pytest.raises(JewelclfError, match=needle):
        load_source(str(p))


def test_csv_duplicate_rows(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,label\na.jpg,ring\nb.jpg,watch\na.jpg,ring\nb.jpg,watch,test\n")
    src = load_source(str(p))  # a row repeated with its label is counted once, with a warning
    assert [r.key for r in src.records] == ["a.jpg", "b.jpg"]
    assert src.repeated == ["line 4 ('a.jpg') repeats line 2 ('a.jpg')",
                            "line 5 ('b.jpg') repeats line 3 ('b.jpg')"]


# ---------------------------------------------------------------- splits


def _records(n_per_class=20, groups=None):
    out = []
    for c in CLASSES:
        for i in range(n_per_class):
            g = f"{c}-{i // groups}" if groups else None
            out.append(Record(f"/x/{c}/{i}.jpg", f"{c}/{i}.jpg", c, None, g))
    return out


def test_split_is_stable_seeded_and_stratified():
    recs = _records()
    a = assign_splits(recs, seed=1, val_fraction=0.2)
    b = assign_splits(list(reversed(recs)), seed=1, val_fraction=0.2)
    c = assign_splits(recs, seed=2, val_fraction=0.2)
    split_a = {r.key: r.split for r in a}
    assert split_a == {r.key: r.split for r in b}           # order does not matter
    assert split_a != {r.key: r.split for r in c}           # the seed does
    per_class = Counter((r.label, r.split) for r in a)
    for cls in CLASSES:
        assert per_class[(cls, "val")] == 4 and per_class[(cls, "train")] == 16


def test_split_keeps_groups_together():
    recs = _records(n_per_class=30, groups=3)  # 10 groups of 3 photos per class
    out = assign_splits(recs, seed=0, val_fraction=0.2, test_fraction=0.2)
    by_group = {}
    for r in out:
        by_group.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in by_group.values())
    assert Counter(r.split for r in out) == {"train": 54, "val": 18, "test": 18}


def test_existing_val_split_is_kept():
    recs = [r if i % 5 else Record(r.path, r.key, r.label, "val") for i, r in enumerate(_records(10))]
    recs = [r if r.split else Record(r.path, r.key, r.label, "train") for r in recs]
    out = assign_splits(recs, seed=0, val_fraction=0.5)
    assert [r.split for r in out] == [r.split for r in recs]


# ---------------------------------------------------------------- odd and corrupt files


def _bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def odd_files(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    good_jpeg = _bytes(Image.fromarray(rgb), "JPEG")
    files = {
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 3],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image, just text\n",
        "cmyk.jpg": _bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "deep.png": _bytes(Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)), "PNG"),
        "rgba.png": _bytes(Image.fromarray(np.dstack([rgb, np.zeros((30, 40), np.uint8)])), "PNG"),
        "anim.gif": _bytes(Image.fromarray(rgb).convert("P"), "GIF", save_all=True,
                           append_images=[Image.fromarray(255 - rgb).convert("P")]),
        "pic.bmp": _bytes(Image.fromarray(rgb), "BMP"),
        "pic.webp": _bytes(Image.fromarray(rgb), "WEBP"),
        "really_jpeg.png": good_jpeg,
        "tiny.png": _bytes(Image.fromarray(rgb[:1, :1]), "PNG"),
        "scan.tif": _bytes(Image.fromarray(rgb), "TIFF"),
    }
    paths = {}
    for name, data in files.items():
        p = tmp_path / name
        p.write_bytes(data)
        paths[name] = p
    return paths


EXPECT_OK = {"cmyk.jpg", "deep.png", "rgba.png", "anim.gif", "pic.bmp", "pic.webp", "really_jpeg.png"}
EXPECT_REASON = {
    "truncated.jpg": "corrupt JPEG",
    "zero.jpg": "empty file",
    "text.jpg": "not a supported image (text)",
    "tiny.png": "too small",
    "scan.tif": "not a supported image (TIFF)",
}


def test_check_accepts_odd_but_valid_and_rejects_corrupt(odd_files):
    recs = [Record(str(p), name, "ring") for name, p in odd_files.items()]
    results = {c.record.key: c for c in check_records(recs, max_pixels=10**8, min_side=8, workers=2)}
    assert {k for k, c in results.items() if c.ok} == EXPECT_OK
    for name, needle in EXPECT_REASON.items():
        assert needle in results[name].reason, (name, results[name].reason)


def test_decode_rules(odd_files):
    def dec(name):
        return decode_rgb(tf.constant(odd_files[name].read_bytes())).numpy()

    rgba = dec("rgba.png")                     # fully transparent -> composited onto white
    assert rgba.shape == (30, 40, 3) and (rgba == 255).all()
    gif = dec("anim.gif")                      # first frame only
    assert gif.shape == (30, 40, 3)
    assert dec("deep.png").dtype == np.uint8   # 16-bit scaled to 8-bit
    gray = dec("deep.png")
    assert (gray[..., 0] == gray[..., 1]).all()


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_fast_path_gives_the_general_decoders_pixels(mode):
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:12] = (200, 40, 40)
    rgb[12:] = (40, 40, 200)
    data = _jpeg(Image.fromarray(rgb).convert(mode))
    got = decode_rgb(tf.constant(data)).numpy()
    general = tf.io.decode_image(data, channels=0, expand_animations=False)
    if general.shape[-1] == 1:
        general = tf.image.grayscale_to_rgb(general)
    assert got.shape == (24, 32, 3)
    np.testing.assert_array_equal(got, general.numpy())
    in_graph = tf.function(decode_rgb, input_signature=[tf.TensorSpec([], tf.string)])
    np.testing.assert_array_equal(in_graph(tf.constant(data)).numpy(), got)
    if mode != "L":  # CMYK comes back in its RGB colours (away from the edge JPEG blurs)
        assert np.abs(got[:8].astype(int) - (200, 40, 40)).max() <= 3
        assert np.abs(got[16:].astype(int) - (40, 40, 200)).max() <= 3


def test_resize_averages_fine_detail_instead_of_aliasing():
    # One-pixel black and white stripes shrunk 17x: an area average is an even grey, where a
    # plain bilinear sample would land on whole stripes and keep them (aliasing).
    stripes = np.zeros((17 * 16, 17 * 16, 3), np.uint8)
    stripes[:, ::2] = 255
    out = resize_rgb(tf.constant(stripes), 16).numpy()
    # Each output column averages 17 input columns, 8 or 9 of them white.
    assert set(np.unique(out)) == {round(255 * 8 / 17), round(255 * 9 / 17)}
    plain = tf.image.resize(stripes, [16, 16], method="bilinear").numpy()
    assert np.ptp(plain) > 200  # what the box filter prevents


def test_resize_keeps_a_right_sized_image_and_grows_small_ones_smoothly():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_rgb(tf.constant(image), 32).numpy(), image)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    grown = resize_rgb(tf.constant(small), 32).numpy()
    bilinear = tf.image.resize(small, [32, 32], method="bilinear").numpy()
    np.testing.assert_array_equal(grown, np.clip(np.round(bilinear), 0, 255).astype(np.uint8))
    # Mixed: a tall strip is shrunk in height and grown in width, both to the asked side.
    strip = rng.integers(0, 256, (300, 5, 3), dtype=np.uint8)
    assert resize_rgb(tf.constant(strip), 32).shape == (32, 32, 3)
    assert resize_rgb(tf.constant(strip), 32, "crop").shape == (32, 32, 3)


def test_resize_below_a_2x_shrink_is_bilinear():
    # A side under twice the target reads every input pixel with bilinear interpolation (closer
    # to a Lanczos reference there than the box filter); from 2x on, the box filter takes over.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (50, 63, 3), dtype=np.uint8)
    bilinear = tf.image.resize(image, [32, 32], method="bilinear").numpy()
    np.testing.assert_array_equal(resize_rgb(tf.constant(image), 32).numpy(),
                                  np.round(bilinear).astype(np.uint8))
    tall = rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)
    area_then_grow = tf.image.resize(tf.image.resize(tall, [32, 32], method="area"), [32, 32]).numpy()
    np.testing.assert_array_equal(resize_rgb(tf.constant(tall), 32).numpy(),
                                  np.round(area_then_grow).astype(np.uint8))


@pytest.mark.parametrize("mode", ["squash", "crop"])
@pytest.mark.parametrize("shape", [(90, 70), (40, 52), (20, 150)])  # area, bilinear, both
@pytest.mark.parametrize("color", ["RGBA", "LA"])
def test_load_image_composites_after_the_resize_as_if_before(shape, color, mode):
    # load_image resizes the premultiplied image and composites the small result; that must be
    # what compositing the full image onto white and then resizing gives, within the one grey
    # level that the skipped full-size rounding can move.
    rng = np.random.default_rng(2)
    h, w = shape
    channels = 4 if color == "RGBA" else 2
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    pixels[..., -1] = np.where(rng.random((h, w)) < 0.4, 0, pixels[..., -1])  # holes, as cut-outs have
    pixels[: h // 3, :, -1] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels, color).save(buf, "PNG")
    data = tf.constant(buf.getvalue())
    expected = resize_rgb(decode_rgb(data), 32, mode).numpy().astype(int)
    got = load_image(data, 32, mode).numpy()
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= 1
    if color == "LA":
        assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    in_graph = tf.function(lambda b: load_image(b, 32, mode), input_signature=[tf.TensorSpec([], tf.string)])
    np.testing.assert_array_equal(in_graph(data).numpy(), got)


@pytest.mark.parametrize("mode", ["squash", "crop"])
@pytest.mark.parametrize("shape", [(40, 48), (130, 70), (300, 260)])  # full, 1/2 and 1/4 DCT scale
def test_load_jpeg_gives_load_images_pixels(shape, mode):
    data = tf.constant(_jpeg(make_image("ring", 3, size=shape)))
    np.testing.assert_array_equal(load_jpeg(data, 32, mode).numpy(), load_image(data, 32, mode).numpy())


@pytest.mark.parametrize("channels", [2, 4])
def test_premultiplied_planes_are_exact_products(channels):
    # The word arithmetic (invert, shift, mask, one multiply per lane) must give exactly
    # (255 - color) * alpha for every channel, at the extremes too: 255 * 255 fills a 16-bit lane.
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (7, 9, channels), dtype=np.uint8)
    pixels[0, 0] = 0      # color 0 (255 after inverting) under alpha 0
    pixels[0, 1] = 255    # alpha 255 over color 255
    pixels[0, 2, :-1], pixels[0, 2, -1] = 0, 255  # the largest product, 255 * 255
    planes = [p.numpy() for p in _premultiplied_planes(tf.constant(pixels))]
    wide = pixels.astype(np.int64)
    expected = (255 - wide) * wide[..., -1:]
    assert all(p.dtype == np.uint16 for p in planes)
    if channels == 2:
        np.testing.assert_array_equal(planes[0][..., 0], expected[..., 0])
    else:
        np.testing.assert_array_equal(planes[0], expected[..., [0, 2]])   # red, blue
        np.testing.assert_array_equal(planes[1], expected[..., [1, 3]])   # green, alpha's own


def _png_like(mode: str, fmt: str) -> bytes:
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, (70, 90, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((70, 90)) < 0.3, 0, rgba[..., 3])
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":  # a palette with one transparent entry, as many catalogue cut-outs are saved
        image = image.convert("RGB").quantize(16)
        image.info["transparency"] = 0
    elif mode != "RGBA":
        image = image.convert(mode)
    return _bytes(image, fmt, **({"transparency": 0} if mode == "P" else {}))


@pytest.mark.parametrize("mode, fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("L", "PNG"), ("RGB", "PNG"),
                                       ("P", "PNG"), ("P", "GIF"), ("RGB", "BMP"), ("RGBA", "WEBP")])
@pytest.mark.parametrize("resize", ["squash", "crop"])
def test_load_other_gives_load_images_pixels(mode, fmt, resize):
    data = tf.constant(_png_like(mode, fmt))
    expected = load_image(data, 32, resize).numpy()
    np.testing.assert_array_equal(load_other(data, 32, resize).numpy(), expected)
    in_graph = tf.data.Dataset.from_tensors(data).map(lambda b: load_other(b, 32, resize))
    np.testing.assert_array_equal(next(iter(in_graph)).numpy(), expected)
    if mode in ("L", "LA"):
        assert (expected[..., 0] == expected[..., 2]).all()


def test_decode_bomb_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("L", (6000, 6000)).save(p)       # 36 MP of zeros: a small file
    c = check_file(Record(str(p), "bomb.png", "ring"), max_pixels=20_000_000, min_side=8)
    assert not c.ok and "too large: 6000x6000" in c.reason


def test_unreadable_and_folder_named_like_image(tmp_path):
    d = tmp_path / "folder.jpg"
    d.mkdir()
    c = check_file(Record(str(d), "folder.jpg", "ring"), 10**8, 8)
    assert not c.ok and "folder" in c.reason


# ---------------------------------------------------------------- pipeline


def test_checked_records_are_routed_by_format_and_keep_the_records_order(tmp_path, monkeypatch):
    # After the data check, records carry their format; the pipeline decodes the JPEGs with
    # load_jpeg, other checked files with load_other, anything unchecked with load_image's full
    # dispatch, and merges the streams back in the records' order.
    from dataclasses import replace
    root = make_class_folder(tmp_path / "d", per_class=3)
    transparent = np.zeros((40, 48, 4), np.uint8)
    transparent[..., 0] = 200
    transparent[10:30, 10:30, 3] = 255
    Image.fromarray(transparent, "RGBA").save(root / "ring" / "cutout.png")
    Image.fromarray(np.full((30, 30), 90, np.uint8), "L").save(root / "watch" / "gray.gif")
    (root / "ring" / "really_a_jpeg.png").write_bytes(_jpeg(make_image("ring", 7)))
    src = load_source(str(root))
    checks = check_records(src.records, 10**8, 8)
    records = [c.record for c in checks if c.ok]
    assert {r.key: r.format for r in records if not r.key.endswith(".jpg")} == {
        "ring/cutout.png": "PNG", "watch/gray.gif": "GIF", "ring/really_a_jpeg.png": "JPEG"}
    assert records == src.records  # the format is not part of a record's identity
    unchecked = next(i for i, r in enumerate(records) if r.key.endswith(".jpg"))
    records[unchecked] = replace(records[unchecked], format=None)

    import jewelclf.data.pipeline as pipeline_mod
    seen = {name: [] for name in ("load_jpeg", "load_other", "load_image")}
    for name, real in (("load_jpeg", load_jpeg), ("load_other", load_other), ("load_image", load_image)):
        monkeypatch.setattr(pipeline_mod, name,
                            lambda b, *a, name=name, real=real: seen[name].append(1) or real(b, *a))
    got = list(decoded_dataset(src, records, DataConfig(), 24))
    assert {k: len(v) for k, v in seen.items()} == {"load_jpeg": 1, "load_other": 1, "load_image": 1}
    # Traced once per process: fit, tune and index build more pipelines with the same loaders.
    assert len(list(decoded_dataset(src, records, DataConfig(), 24))) == len(records)
    assert {k: len(v) for k, v in seen.items()} == {"load_jpeg": 1, "load_other": 1, "load_image": 1}
    list(decoded_dataset(src, records, DataConfig(), 20))  # another size is another graph
    assert {k: len(v) for k, v in seen.items()} == {"load_jpeg": 2, "load_other": 2, "load_image": 2}
    assert len(got) == len(records)
    for (x, y), r in zip(got, records):
        assert int(y) == src.class_names.index(r.label), r.key
        np.testing.assert_array_equal(x.numpy(), load_image(tf.io.read_file(r.path), 24).numpy(), r.key)


def test_pipeline_matches_load_image_and_batches(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=3)
    src = load_source(str(root))
    ds = decoded_dataset(src, src.records, DataConfig(), 24, cache="memory")
    first_x, first_y = next(iter(ds))
    expected = load_image(tf.io.read_file(src.records[0].path), 24)
    assert (first_x.numpy() == expected.numpy()).all()
    assert int(first_y) == src.class_names.index(src.records[0].label)
    x, y = next(iter(batched(ds, 3, batch_size=4)))
    assert x.shape == (4, 24, 24, 3) and x.dtype == tf.uint8  # the model casts on its device
    assert y.shape == (4, 3) and float(tf.reduce_sum(y)) == 4.0


def test_disk_cache(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=2)
    src = load_source(str(root))
    ds = decoded_dataset(src, src.records, DataConfig(), 16, cache="disk",
                         cache_dir=tmp_path / "cache", name="train")
    n = sum(1 for _ in ds)
    assert n == 6 and any((tmp_path / "cache").iterdir())
    shutil.rmtree(root)                       # the second pass reads the cache, not the files
    assert sum(1 for _ in ds) == 6
