"""``jewelclf export --format savedmodel``: TF Serving's layout, the three signatures (two that
classify, ``embed`` for visual search), robustness to bad images, the fresh-process parity check,
and what ``saved_model_cli`` lists."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from jewelclf import runs
from jewelclf.cli import main
from jewelclf.data.images import decode_rgb, load_image, resize_rgb
from jewelclf.export import layout, samples, staging
from jewelclf.export import parity as parity_check
from jewelclf.export import savedmodel as ex
from jewelclf.export.staging import Staging
from jewelclf.inference import policy
from jewelclf.inference.runtime import keras_probabilities_and_features

from export_helpers import encode, noisy


@pytest.fixture(scope="module")
def run(tiny_run):
    return runs.load_run(tiny_run)


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported / "1"))


def keras_reference(run, encoded: list[bytes]) -> np.ndarray:
    """The Keras model's calibrated probabilities (the run's temperature), as the export answers."""
    return keras_answer(run, encoded)["probabilities"]


def keras_answer(run, encoded: list[bytes], review_threshold=None) -> dict[str, np.ndarray]:
    """What serving_default should answer, from the Keras model and the run's review policy."""
    pixels = np.stack([load_image(tf.constant(b), run.image_size, run.resize).numpy() for b in encoded])
    return policy.for_run(run, review_threshold).answer(*keras_probabilities_and_features(run.model, pixels))


def full_outputs(run, answer: dict[str, np.ndarray], names_ok: bool = True) -> dict[str, list]:
    """A classifying signature's outputs (as JSON lists) for a Keras ``answer``."""
    p = answer["probabilities"]
    order = np.argsort(-p, axis=1)[:, :run.k]
    classes = [[run.class_names[j] for j in row] for row in order]
    if not names_ok:
        classes[0] = classes[0][::-1]
    return {"probabilities": p.tolist(), "classes": classes,
            "scores": np.take_along_axis(p, order, 1).tolist(), "valid": [True] * len(p),
            "error": [""] * len(p), "confidence": answer["confidence"].tolist(),
            "needs_review": answer["needs_review"].tolist(),
            "unknown_score": answer["unknown_score"].tolist()}


def keras_embedding(run, encoded: list[bytes]) -> np.ndarray:
    """``jewelclf index``'s embedding (``embedding_model``, layer pool) of the decoded bytes."""
    from jewelclf.modeling.embedding import embedding_model

    pixels = np.stack([load_image(tf.constant(b), run.image_size, run.resize).numpy() for b in encoded])
    return np.asarray(embedding_model(run.model, "pool")(pixels.astype(np.float32), training=False))


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- layout and report


def test_layout_report_and_server_files(exported, run):
    version = exported / "1"
    assert (version / "saved_model.pb").is_file()
    assert (version / "variables" / "variables.index").is_file()
    assert layout.list_versions(exported) == [1]
    assert not [p for p in exported.iterdir() if p.name.startswith(staging.TMP_PREFIX)]

    report = json.loads((version / layout.REPORT).read_text())
    assert report["version"] == 1 and report["model_name"] == "tiny"
    assert report["class_names"] == run.class_names == ["necklace", "ring", "watch"]
    parity = report["parity"]
    assert parity["passed"] and parity["fresh_process"]
    assert parity["jewelclf_imported_in_fresh_process"] is False
    assert len(parity["images"]) == layout.PARITY_IMAGES
    for name in (layout.SERVING_DEFAULT, layout.SERVING_PIXELS):
        sig = parity["signatures"][name]
        assert sig["top1_agree"] == sig["images"] == layout.PARITY_IMAGES
        assert sig["max_abs_diff"] <= 1e-4
    embed = parity["signatures"][layout.SERVING_EMBED]  # checked in the same fresh process
    assert embed["images"] == layout.PARITY_IMAGES and embed["layer"] == "pool" and embed["dim"] == 16
    assert embed["max_abs_diff"] <= 1e-4 and embed["min_cosine"] >= 1 - 1e-4
    assert embed["max_norm_error"] <= 1e-4 and embed["all_valid"]
    assert set(report["signatures"]) == {"serving_default", "serving_pixels", "embed"}
    model_sha = hashlib.sha256((run.run_dir / "model.keras").read_bytes()).hexdigest()
    assert report["embedding"] == {"layer": "pool", "dim": 16, "model_sha256": model_sha,
                                   "metric": "cosine (dot product of unit vectors)"}
    acc = report["test_accuracy"]
    assert acc["num_examples"] == 12
    assert acc["savedmodel_accuracy"] == acc["keras_accuracy"]
    assert acc["top1_agreement"] == 1.0

    info = json.loads((version / "assets.extra" / layout.INFO).read_text())
    assert info["class_names"] == run.class_names and info["image_size"] == 32
    assert info["embedding"] == report["embedding"] and "embed" in info["signatures"]

    config = (exported / layout.MODELS_CONFIG).read_text()
    batching = (exported / layout.BATCHING_PARAMETERS).read_text()
    assert "name: 'tiny'" in config and "base_path: '/models/tiny'" in config
    assert oct(os.stat(exported / layout.MODELS_CONFIG).st_mode & 0o777) == "0o644"
    _parse_text_protos(config, batching)


def _parse_text_protos(models_config: str, batching: str) -> None:
    """Parse both files as the text protos TF Serving reads. ModelServerConfig comes from
    tensorflow-serving-api when installed; BatchingParameters is rebuilt from its documented
    fields (tensorflow_serving/servables/tensorflow/session_bundle_config.proto)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

    assert wrappers_pb2.Int64Value  # importing it puts wrappers.proto in the default pool

    try:
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError:
        assert re.search(r"model_config_list\s*\{\s*config\s*\{", models_config)
    else:
        parsed = text_format.Parse(models_config, model_server_config_pb2.ModelServerConfig())
        (cfg,) = parsed.model_config_list.config
        assert (cfg.name, cfg.base_path, cfg.model_platform) == ("tiny", "/models/tiny", "tensorflow")

    f = descriptor_pb2.FileDescriptorProto(name="jewelclf_test_batching.proto", package="t",
                                           syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    msg = f.message_type.add(name="BatchingParameters")
    fields = [("max_batch_size", "Int64Value"), ("batch_timeout_micros", "Int64Value"),
              ("max_enqueued_batches", "Int64Value"), ("num_batch_threads", "Int64Value"),
              ("thread_pool_name", "StringValue"), ("enable_large_batch_splitting", "BoolValue"),
              ("max_execution_batch_size", "Int64Value")]
    for i, (name, wrapper) in enumerate(fields, start=1):
        msg.field.add(name=name, number=i, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                      type_name=f".google.protobuf.{wrapper}",
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.Default()
    try:
        pool.Add(f)
    except TypeError:  # already added by an earlier call in this process
        pass
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.BatchingParameters"))
    params = text_format.Parse(batching, cls())
    assert params.num_batch_threads.value >= 1
    assert params.batch_timeout_micros.value == 0
    assert params.enable_large_batch_splitting.value is True
    assert params.max_execution_batch_size.value <= params.max_batch_size.value


def test_next_version_and_refusal_to_overwrite(exported, tiny_run, tmp_path):
    base = tmp_path / "models" / "tiny"
    base.mkdir(parents=True)
    shutil.copytree(exported / "1", base / "1")
    (base / "notes").mkdir()  # not a version: TF Serving only takes integer names
    (base / "9.bak").mkdir()
    before = tree_digest(base / "1")

    r = CliRunner().invoke(main, ["export", str(tiny_run), "--output", str(base)])
    assert r.exit_code == 0, r.output
    assert layout.list_versions(base) == [1, 2]
    assert "version 2" in r.output and "top-1 agrees with Keras on 8/8" in r.output
    assert "embed: 16-d 'pool' vectors, max |diff| with the Keras embedding" in r.output
    assert json.loads((base / "2" / layout.REPORT).read_text())["version"] == 2

    for v in ("1", "2"):
        digest = tree_digest(base / v)
        r = CliRunner().invoke(main, ["export", str(tiny_run), "--output", str(base), "--version", v])
        assert r.exit_code == 2
        assert "never overwritten" in r.output and "--version 3" in r.output
        assert tree_digest(base / v) == digest
    assert tree_digest(base / "1") == before
    assert layout.list_versions(base) == [1, 2]


def test_parity_holds_for_large_jpegs_that_training_decodes_at_reduced_scale(tiny_run, run, tmp_path):
    """A JPEG with a short side of at least twice the input side is decoded at a DCT scale by
    training and by serving_default, but serving_pixels gets it fully decoded: each signature is
    held to the Keras model on its own pixels, and both checks pass."""
    data = tmp_path / "big"
    colours = {"necklace": (200, 200, 60), "ring": (200, 60, 60), "watch": (60, 60, 200)}
    big = []
    for i, label in enumerate(run.class_names):
        (data / label).mkdir(parents=True)
        for j in range(2):
            b = encode(noisy((150, 170, 3), 100 * i + j, colours.get(label, (128, 128, 128))), "JPEG",
                       quality=90)
            (data / label / f"{j}.jpg").write_bytes(b)
            big.append(b)
    scaled = np.stack([load_image(tf.constant(b), run.image_size, run.resize).numpy() for b in big])
    full = np.stack([resize_rgb(decode_rgb(tf.constant(b)), run.image_size, run.resize).numpy()
                     for b in big])
    assert not np.array_equal(scaled, full)  # the two paths do see different pixels here
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--output", str(tmp_path / "m"),
                                  "--parity-data", str(data)])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "m" / "1" / layout.REPORT).read_text())
    signatures = report["parity"]["signatures"]
    for name in ("serving_default", "serving_pixels"):
        assert signatures[name]["top1_agree"] == signatures[name]["images"] == len(big)
        assert signatures[name]["max_abs_diff"] <= 1e-4


def test_list_versions_and_stale_temp_cleanup(tmp_path):
    for name in ("3", "10", "notes", "7.bak", f"{staging.TMP_PREFIX}999999-ab"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a version")
    assert layout.list_versions(tmp_path) == [3, 10]
    assert layout.list_versions(tmp_path / "missing") == []
    live = Staging(tmp_path)  # a live export's: locked (tests/test_export_storage.py has more)
    try:
        later = time.time() + 3600  # every folder's heartbeat is an hour old by then
        assert ex.cleanup_stale_temp(tmp_path, log=lambda _: None) == []  # all fresh
        removed = ex.cleanup_stale_temp(tmp_path, log=lambda _: None, now=later)
        assert removed == [f"{staging.TMP_PREFIX}999999-ab"]  # unlocked and old; the live one is kept
        assert live.path.is_dir()
    finally:
        live.close()


def test_export_killed_midway_leaves_no_version(tiny_run, tmp_path):
    """Kill the export (and its parity process) once the SavedModel is written but not yet
    checked: nothing may appear where TF Serving polls, and the next export cleans up."""
    base = tmp_path / "tiny"
    proc = subprocess.Popen([sys.executable, "-m", "jewelclf", "export", str(tiny_run), "--output", str(base)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        deadline = time.monotonic() + 120
        written = None
        while time.monotonic() < deadline and proc.poll() is None:
            pattern = f"{staging.TMP_PREFIX}*/model/saved_model.pb"
            written = next(iter(base.glob(pattern)), None) if base.is_dir() else None
            if written is not None:
                break
            time.sleep(0.02)
        assert written is not None, "the export never reached the written-but-unchecked state"
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert layout.list_versions(base) == []
    leftovers = [p.name for p in base.iterdir()]
    assert leftovers and all(name.startswith(".") for name in leftovers), leftovers
    assert ex.cleanup_stale_temp(base, log=lambda _: None, now=time.time() + 3600) == leftovers
    assert list(base.iterdir()) == []


def test_failed_parity_raises_and_leaves_nothing(exported, tiny_run, tmp_path, monkeypatch):
    """A parity failure leaves no version and no temp folder, only the failed report. (The
    SavedModel is the fixture's and the fresh process's answer is the Keras model's, perturbed:
    the real write and fresh process are what the other tests run.)"""
    run = runs.load_run(tiny_run)

    def fake_child(saved_model, images, work, timeout=600):
        assert saved_model.parent.name.startswith(staging.TMP_PREFIX) and (saved_model / "saved_model.pb").is_file()
        answer = keras_answer(run, [im.data for im in images])
        probs = answer["probabilities"]
        full = full_outputs(run, answer)
        pixels = [{k: [np.asarray(v[i]).tolist()] for k, v in full.items()} for i in range(len(probs))]
        bad = dict(full, probabilities=(probs + np.array([1e-3, 0, 0])).tolist())
        return {"signatures": {}, "serving_default": bad, "serving_pixels": pixels, "jewelclf_imported": False}

    monkeypatch.setattr(ex, "write_savedmodel", lambda run, path, policy: shutil.copytree(exported / "1", path))
    monkeypatch.setattr(ex, "run_in_fresh_process", fake_child)
    base = tmp_path / "tiny"
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--output", str(base)])
    assert r.exit_code == 2
    assert "parity check failed" in r.output and "serving_default: probabilities differ" in r.output
    assert layout.list_versions(base) == []
    assert [p.name for p in base.iterdir()] == [layout.FAILED_REPORT]
    failed = json.loads((base / layout.FAILED_REPORT).read_text())
    assert failed["parity"]["passed"] is False
    assert failed["parity"]["signatures"]["serving_pixels"]["max_abs_diff"] <= 1e-4
    assert any("signature serving_default is missing" in p for p in failed["parity"]["problems"])


def test_compare_parity_catches_top1_and_name_mismatches(run):
    images = [samples.LabelledImage(f"k{i}", "ring", encode(noisy((20 + i, 30, 3), i), "PNG")) for i in range(3)]
    answer = keras_answer(run, [im.data for im in images])
    probs = answer["probabilities"]
    rules = policy.for_run(run)

    def outputs(p, names_ok=True):
        return full_outputs(run, {**answer, "probabilities": p}, names_ok)

    def pixels_rows(p):
        full = outputs(p)
        return [{key: [full[key][i]] for key in full} for i in range(len(p))]

    vectors = keras_embedding(run, [im.data for im in images])
    embed = {"embedding": vectors.tolist(), "valid": [True] * 3, "error": [""] * 3}
    good = {"serving_default": outputs(probs), "serving_pixels": pixels_rows(probs), "embed": embed,
            "jewelclf_imported": False}
    passed = parity_check.compare_parity(run, images, good, rules)
    assert passed["passed"], passed["problems"]
    assert passed["signatures"]["embed"]["max_abs_diff"] <= 1e-6

    # embed: a vector off by more than the tolerance, a missing signature, an invalid row
    off = vectors.copy()
    off[2] = np.roll(off[2], 1)
    result = parity_check.compare_parity(run, images, {**good, "embed": {**embed, "embedding": off.tolist()}}, rules)
    assert not result["passed"]
    assert any(p.startswith("embed: embeddings differ from the Keras embedding") for p in result["problems"])
    assert any(p.startswith("embed: cosine with the Keras embedding") for p in result["problems"])
    result = parity_check.compare_parity(run, images, {k_: v for k_, v in good.items() if k_ != "embed"}, rules)
    assert not result["passed"] and any("embed: the fresh process got no output" in p for p in result["problems"])
    result = parity_check.compare_parity(run, images, {**good, "embed": {**embed, "valid": [True, False, True]}}, rules)
    assert result["problems"] == ["embed: vectors are not all valid unit vectors"]

    rolled = probs.copy()
    rolled[1] = np.roll(probs[1], 1)  # same values, another top-1
    assert rolled[1].argmax() != probs[1].argmax()
    result = parity_check.compare_parity(run, images, {**good, "serving_pixels": pixels_rows(rolled)}, rules)
    assert not result["passed"]
    assert "serving_pixels: top-1 differs from the Keras model on 1 of 3 images" in result["problems"]

    swapped = {**good, "serving_default": outputs(probs, names_ok=False)}
    result = parity_check.compare_parity(run, images, swapped, rules)
    assert not result["passed"] and any("disagree" in p for p in result["problems"])
    result = parity_check.compare_parity(run, images, {**good, "jewelclf_imported": True}, rules)
    assert not result["passed"]


# ---------------------------------------------------------------------------- the two signatures


def test_serving_default_matches_keras_on_jpeg_png_gif_bmp_of_odd_sizes(loaded, run):
    arrays = [noisy((17, 91, 3), 1, (200, 40, 40)), noisy((33, 33, 3), 2, (40, 200, 40)),
              noisy((250, 9, 3), 3, (40, 40, 200)), noisy((31, 32, 3), 4)]
    encoded = [encode(arrays[0], "JPEG", quality=90), encode(arrays[1], "PNG"),
               encode(arrays[2], "GIF"), encode(arrays[3], "BMP"),
               encode(np.dstack([arrays[1], np.full((33, 33), 128, np.uint8)]), "PNG"),  # RGBA
               encode(arrays[0][..., 0], "PNG")]  # grayscale
    out = loaded.signatures["serving_default"](images=tf.constant(encoded))
    ref = keras_reference(run, encoded)
    probs = out["probabilities"].numpy()
    assert probs.shape == (6, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, ref, atol=1e-5, rtol=0)
    assert out["valid"].numpy().all()
    assert [e.decode() for e in out["error"].numpy()] == [""] * 6
    classes = out["classes"].numpy()
    scores = out["scores"].numpy()
    assert classes.shape == (6, 3) and scores.shape == (6, 3)
    for i in range(6):
        order = np.argsort(-ref[i], kind="stable")
        assert [c.decode() for c in classes[i]] == [run.class_names[j] for j in order]
        np.testing.assert_allclose(scores[i], ref[i][order], atol=1e-5)
        assert np.all(np.diff(scores[i]) <= 0)


def test_serving_pixels_matches_keras_on_any_size(loaded, run):
    fn = loaded.signatures["serving_pixels"]
    for shape in ((2, 17, 91, 3), (3, 32, 32, 3), (1, 300, 7, 3)):
        batch = np.stack([noisy(shape[1:], 10 * shape[1] + i, (40, 40, 200)) for i in range(shape[0])])
        out = fn(pixels=tf.constant(batch))
        resized = np.stack([resize_rgb(tf.constant(im), run.image_size, run.resize).numpy() for im in batch])
        ref = np.asarray(run.model(resized.astype(np.float32), training=False))
        np.testing.assert_allclose(out["probabilities"].numpy(), ref, atol=1e-5, rtol=0)
        assert out["classes"].shape == (shape[0], 3) and out["valid"].numpy().all()
    # The pixel signature equals the bytes signature on the same decoded image.
    png = encode(noisy((45, 23, 3), 7), "PNG")
    a = loaded.signatures["serving_default"](images=tf.constant([png]))["probabilities"].numpy()
    b = fn(pixels=decode_rgb(tf.constant(png))[None])["probabilities"].numpy()
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_corrupt_images_do_not_fail_the_batch(loaded, run):
    good_jpeg = encode(noisy((40, 48, 3), 1, (200, 40, 40)), "JPEG")
    good_png = encode(noisy((21, 60, 3), 2, (40, 200, 40)), "PNG")
    batch = [good_jpeg, good_jpeg[: len(good_jpeg) // 2], b"hello, not an image", b"",
             good_png, good_png[:100], b"\xff\xd8\xff" + b"\x00" * 50]
    out = loaded.signatures["serving_default"](images=tf.constant(batch))
    valid = out["valid"].numpy()
    assert valid.tolist() == [True, False, False, False, True, False, False]
    errors = [e.decode() for e in out["error"].numpy()]
    assert errors[0] == errors[4] == ""
    assert "truncated JPEG" in errors[1] and "truncated PNG" in errors[5] and "truncated JPEG" in errors[6]
    assert errors[2].startswith("not a supported image") and errors[3].startswith("empty input")
    probs = out["probabilities"].numpy()
    np.testing.assert_allclose(probs[[0, 4]], keras_reference(run, [good_jpeg, good_png]), atol=1e-5)
    assert not probs[~valid].any()
    assert all(c == b"" for row in out["classes"].numpy()[~valid] for c in row)

    all_bad = loaded.signatures["serving_default"](images=tf.constant([b"x", b""]))
    assert not all_bad["valid"].numpy().any()
    empty = loaded.signatures["serving_default"](images=tf.constant([], tf.string))
    assert empty["probabilities"].shape == (0, 3) and empty["classes"].shape == (0, 3)


# ---------------------------------------------------------------------------- embed


def test_embed_matches_the_keras_embedding_and_the_index(loaded, run, tmp_path):
    """``embed`` on bytes of several formats and odd sizes equals ``embedding_model`` on the
    same decoded pixels, and the vectors ``jewelclf index`` stores for the same files, so a
    served query vector finds its own photo in an index of the same model."""
    from jewelclf.search.build import build_index
    from jewelclf.search.index import load_index

    arrays = [noisy((17, 91, 3), 11, (200, 40, 40)), noisy((33, 33, 3), 12, (40, 200, 40)),
              noisy((250, 9, 3), 13, (40, 40, 200)), noisy((64, 48, 3), 14)]
    encoded = [encode(arrays[0], "JPEG", quality=90), encode(arrays[1], "PNG"),
               encode(arrays[2], "GIF"), encode(arrays[3], "BMP")]
    out = loaded.signatures["embed"](images=tf.constant(encoded))
    assert set(out) == {"embedding", "valid", "error"}
    vectors = out["embedding"].numpy()
    assert vectors.shape == (4, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, keras_embedding(run, encoded), atol=1e-5, rtol=0)
    assert out["valid"].numpy().all() and [e.decode() for e in out["error"].numpy()] == [""] * 4

    catalogue = tmp_path / "catalogue"
    for i, (label, data) in enumerate(zip(["ring", "watch", "necklace", "ring"], encoded)):
        (catalogue / label).mkdir(parents=True, exist_ok=True)
        (catalogue / label / f"item{i}.img").write_bytes(data)
    build_index(run.run_dir, str(catalogue), tmp_path / "index", log=lambda _: None)
    index = load_index(tmp_path / "index")
    by_key = {index.item(row).key: np.asarray(index.vectors[row]) for row in range(len(index))}
    stored = np.stack([by_key[f"{label}/item{i}.img"]
                       for i, label in enumerate(["ring", "watch", "necklace", "ring"])])
    np.testing.assert_allclose(vectors, stored, atol=1e-5, rtol=0)
    for i, hits in enumerate(index.search(vectors, k=1)):
        assert index.item(hits[0].row).key.endswith(f"item{i}.img") and hits[0].similarity > 1 - 1e-5


def test_embed_flags_invalid_images_and_answers_the_others(loaded, run):
    good_jpeg = encode(noisy((40, 48, 3), 21, (200, 40, 40)), "JPEG")
    good_png = encode(noisy((21, 60, 3), 22, (40, 200, 40)), "PNG")
    batch = [good_jpeg, good_jpeg[: len(good_jpeg) // 2], b"hello, not an image", b"", good_png]
    out = loaded.signatures["embed"](images=tf.constant(batch))
    valid = out["valid"].numpy()
    assert valid.tolist() == [True, False, False, False, True]
    errors = [e.decode() for e in out["error"].numpy()]
    assert errors[0] == errors[4] == ""
    assert "truncated JPEG" in errors[1] and errors[2].startswith("not a supported image")
    assert errors[3].startswith("empty input")
    # the same reasons as serving_default gives for the same batch
    served = loaded.signatures["serving_default"](images=tf.constant(batch))
    assert errors == [e.decode() for e in served["error"].numpy()]
    vectors = out["embedding"].numpy()
    assert vectors.shape == (5, 16) and not vectors[~valid].any()
    np.testing.assert_allclose(vectors[[0, 4]], keras_embedding(run, [good_jpeg, good_png]), atol=1e-5)

    all_bad = loaded.signatures["embed"](images=tf.constant([b"x", b""]))
    assert not all_bad["valid"].numpy().any() and not all_bad["embedding"].numpy().any()
    empty = loaded.signatures["embed"](images=tf.constant([], tf.string))
    assert empty["embedding"].shape == (0, 16)


# ---------------------------------------------------------------------------- saved_model_cli


def _saved_model_cli() -> list[str]:
    exe = shutil.which("saved_model_cli")
    return [exe] if exe else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def _parse_listing(text: str) -> dict[str, dict]:
    """signature -> {"inputs"/"outputs": {name: (dtype, shape)}, "method": ...} from --all."""
    sigs: dict[str, dict] = {}
    current = None
    for block in re.split(r"\n(?=signature_def\[')", text):
        m = re.match(r"signature_def\['([^']+)'\]", block)
        if not m:
            continue
        current = sigs.setdefault(m.group(1), {"inputs": {}, "outputs": {}})
        for kind, name, dtype, shape in re.findall(
                r"(inputs|outputs)\['([^']+)'\] tensor_info:\s*dtype: (\w+)\s*shape: ([^\n]+)", block):
            current[kind][name] = (dtype, shape.strip())
        method = re.search(r"Method name is: (\S*)", block)
        current["method"] = method.group(1) if method else ""
    return sigs


def test_saved_model_cli_lists_the_three_signatures(exported):
    proc = subprocess.run([*_saved_model_cli(), "show", "--dir", str(exported / "1"), "--all"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    sigs = _parse_listing(proc.stdout)
    outputs = {"probabilities": ("DT_FLOAT", "(-1, 3)"), "classes": ("DT_STRING", "(-1, 3)"),
               "scores": ("DT_FLOAT", "(-1, 3)"), "valid": ("DT_BOOL", "(-1)"), "error": ("DT_STRING", "(-1)"),
               "confidence": ("DT_FLOAT", "(-1)"), "needs_review": ("DT_BOOL", "(-1)"),
               "unknown_score": ("DT_FLOAT", "(-1)")}
    assert sigs["serving_default"]["inputs"] == {"images": ("DT_STRING", "(-1)")}
    assert sigs["serving_default"]["outputs"] == outputs
    assert sigs["serving_pixels"]["inputs"] == {"pixels": ("DT_UINT8", "(-1, -1, -1, 3)")}
    assert sigs["serving_pixels"]["outputs"] == outputs
    assert sigs["embed"]["inputs"] == {"images": ("DT_STRING", "(-1)")}
    assert sigs["embed"]["outputs"] == {"embedding": ("DT_FLOAT", "(-1, 16)"), "valid": ("DT_BOOL", "(-1)"),
                                        "error": ("DT_STRING", "(-1)")}
    assert {sigs[name]["method"] for name in ("serving_default", "serving_pixels", "embed")} == {
        "tensorflow/serving/predict"}


# ---------------------------------------------------------------------------- CLI errors


def test_export_cli_errors(tiny_run, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run, unfinished)
    info = json.loads((unfinished / "run_info.json").read_text())
    (unfinished / "run_info.json").write_text(json.dumps({**info, "status": "running"}))
    r = runner.invoke(main, ["export", str(unfinished), "--output", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not finished" in r.output
    r = runner.invoke(main, ["export", str(tiny_run), "--format", "tflite", "--version", "3"])
    assert r.exit_code == 2 and "--version applies to --format savedmodel" in r.output
    r = runner.invoke(main, ["export", str(tiny_run), "--quantize", "int4"])
    assert r.exit_code == 2 and "int4" in r.output
    assert not (tmp_path / "o").exists() or layout.list_versions(tmp_path / "o") == []


def test_default_output_is_exported_models_run_name(tmp_path):
    assert layout.default_output(tmp_path / "runs" / "vgg16", "savedmodel") == Path("exported_models/vgg16")
    assert layout.default_output(tmp_path / "runs" / "vgg16", "tflite") == Path("exported_models/vgg16_tflite")


def test_embed_layer_hidden_without_a_hidden_layer_is_one_line(tiny_run, tmp_path):
    """``--embed-layer hidden`` on a run trained with head_units 0: a one-line error, no version."""
    out = tmp_path / "models" / "tiny"
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--output", str(out), "--embed-layer", "hidden"])
    assert r.exit_code != 0
    assert r.output.strip().count("\n") == 0 and "head_units" in r.output, r.output
    assert not out.exists() or layout.list_versions(out) == []
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--format", "keras", "--output",
                                  str(tmp_path / "k"), "--embed-layer", "hidden"])
    assert r.exit_code != 0 and "--embed-layer applies to --format savedmodel only" in r.output
