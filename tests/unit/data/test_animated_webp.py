"""Animated WebP never reaches TensorFlow's decoder: TF 2.21's ``decode_image(channels=0)``
corrupts the heap on one and the process aborts. If a guard here regressed, the in-process tests
would kill pytest (a failure too); the serving test runs the SavedModel in a child process, so a
regression there fails on its exit status."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from jewelclf import runs
from jewelclf.data.images import (
    ANIMATED_WEBP_REASON,
    AnimatedWebPError,
    animated_webp_mask,
    decode_rgb,
    is_animated_webp,
    load_image,
    load_other,
)
from jewelclf.errors import JewelclfError

from export_helpers import encode, exported_tiny, noisy


def animated_webp(frames: int = 3, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buf.getvalue()


def still_webp(mode="RGB") -> bytes:
    channels = 4 if mode == "RGBA" else 3
    arr = np.random.default_rng(1).integers(0, 255, (20, 24, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="WEBP")
    return buf.getvalue()


ANIM = animated_webp()


def test_the_sample_is_what_crashes_tensorflow():
    # RIFF....WEBP, then a VP8X chunk whose flags byte (offset 20) has the animation bit, ANIM, ANMF...
    assert ANIM[:4] == b"RIFF" and ANIM[8:16] == b"WEBPVP8X" and ANIM[20] & 0x02
    assert ANIM[30:34] == b"ANIM" and b"ANMF" in ANIM
    with Image.open(io.BytesIO(ANIM)) as im:
        assert im.n_frames == 3


def test_decode_rgb_and_load_image_refuse_an_animated_webp_by_name():
    with pytest.raises(AnimatedWebPError) as e:
        decode_rgb(tf.constant(ANIM), source="photos/spin.webp")
    msg = str(e.value)
    assert msg == ("'photos/spin.webp' is an animated WebP, which TensorFlow cannot decode safely; "
                   "save its first frame as a still image")
    # one line for the CLI, and a decode error for the callers that go on image by image (predict)
    assert isinstance(e.value, JewelclfError) and isinstance(e.value, tf.errors.InvalidArgumentError)
    with pytest.raises(AnimatedWebPError, match="^animated WebP, which TensorFlow cannot decode safely"):
        load_image(tf.constant(ANIM), 32)
    with pytest.raises(AnimatedWebPError, match="^'spin.webp' is an animated WebP"):
        load_other(tf.constant(ANIM), 32, source="spin.webp")  # the loader of checked non-JPEGs
    with pytest.raises(AnimatedWebPError):
        decode_rgb(ANIM)  # plain bytes too
    # still WebPs (plain VP8, and VP8X with alpha, whose flags lack the animation bit) decode
    assert decode_rgb(tf.constant(still_webp())).shape == (20, 24, 3)
    assert load_image(tf.constant(still_webp("RGBA")), 32).shape == (32, 32, 3)


def test_in_graph_guard_fails_before_decoding_and_tf_data_drops_it():
    fn = tf.function(lambda b: decode_rgb(b), input_signature=[tf.TensorSpec([], tf.string)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="animated WebP, which TensorFlow cannot decode safely"):
        fn(tf.constant(ANIM))
    assert fn(tf.constant(still_webp())).shape == (20, 24, 3)
    png = encode(noisy((16, 18, 3), 3), "PNG")
    for load in (load_image, load_other):
        ds = tf.data.Dataset.from_tensor_slices([png, ANIM, still_webp()]).map(lambda b, load=load: load(b, 8))
        assert len(list(ds.ignore_errors())) == 2


def test_header_checks_in_python_and_in_graph():
    no_flag = bytearray(ANIM)
    no_flag[20] &= ~0x02  # animation bit cleared: TF's decoder then fails cleanly, no abort
    first_anmf = ANIM[:12] + ANIM[44:]  # VP8X and ANIM dropped: the first chunk is an ANMF
    samples = {
        "animated": (ANIM, True, True),
        "first chunk ANMF": (first_anmf, True, True),
        "flag cleared, ANIM chunk kept": (bytes(no_flag), True, False),
        "still": (still_webp(), False, False),
        "still with alpha (VP8X)": (still_webp("RGBA"), False, False),
        "png": (encode(noisy((8, 8, 3), 0), "PNG"), False, False),
        "jpeg": (encode(noisy((8, 8, 3), 0), "JPEG"), False, False),
        "riff header only": (ANIM[:21], True, True),
        "short": (b"RIFF", False, False),
        "empty": (b"", False, False),
    }
    names = list(samples)
    in_graph = animated_webp_mask(tf.constant([samples[n][0] for n in names])).numpy().tolist()
    for name, graph in zip(names, in_graph):
        data, python_says, graph_says = samples[name]
        assert is_animated_webp(data) is python_says, name
        assert graph is graph_says, name
    assert animated_webp_mask(tf.constant(ANIM)).numpy()  # a scalar works too
    # where only the Python walk sees an animation, TF's decoder refuses cleanly (no abort)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(bytes(no_flag), channels=0, expand_animations=False)


def test_predict_refuses_the_file_before_any_model_sees_it(tmp_path):
    from jewelclf.inference.predict import read_image_file

    (tmp_path / "spin.webp").write_bytes(ANIM)
    (tmp_path / "still.webp").write_bytes(still_webp())
    assert read_image_file(tmp_path / "spin.webp") == (None, ANIMATED_WEBP_REASON)
    assert read_image_file(tmp_path / "still.webp")[1] is None


SERVE = textwrap.dedent(r'''
    import json, sys
    import tensorflow as tf
    images = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
    loaded = tf.saved_model.load(sys.argv[1])
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    alone = loaded.signatures["serving_default"](images=tf.constant(images[1:2]))
    print("SERVE-JSON " + json.dumps({
        "alone": [alone["valid"].numpy().tolist(), [e.decode() for e in alone["error"].numpy()]],
        "valid": out["valid"].numpy().tolist(),
        "error": [e.decode() for e in out["error"].numpy()],
        "classes": [[c.decode() for c in row] for row in out["classes"].numpy()],
        "probabilities": out["probabilities"].numpy().tolist(),
        "jewelclf_imported": any(m.split(".")[0] == "jewelclf" for m in sys.modules)}))
''')


def test_serving_signature_flags_an_animated_webp_and_classifies_the_rest(tiny_run, tmp_path_factory, tmp_path):

    exported = exported_tiny(tiny_run, tmp_path_factory)
    png = encode(noisy((40, 48, 3), 1, (40, 200, 40)), "PNG")
    webp = still_webp()
    batch = [png, ANIM, webp, animated_webp(2, (300, 200))]
    # a fresh process that imports TensorFlow only, as TF Serving would: it must survive
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([sys.executable, "-c", SERVE, str(exported / "1")],
                          input=json.dumps([b.hex() for b in batch]),
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SERVE-JSON "))
    out = json.loads(line[len("SERVE-JSON "):])
    assert out["jewelclf_imported"] is False
    assert out["valid"] == [True, False, True, False]
    assert out["error"] == ["", ANIMATED_WEBP_REASON, "", ANIMATED_WEBP_REASON]
    assert out["classes"][1] == out["classes"][3] == ["", "", ""]
    assert out["alone"] == [[False], [ANIMATED_WEBP_REASON]]  # a batch of nothing else
    probs = np.array(out["probabilities"], np.float32)
    assert not probs[[1, 3]].any()
    run = runs.load_run(tiny_run)
    pixels = np.stack([load_image(tf.constant(b), run.image_size, run.resize).numpy() for b in (png, webp)])
    expected = np.asarray(run.model(pixels.astype(np.float32), training=False))
    np.testing.assert_allclose(probs[[0, 2]], expected, atol=1e-5)
    assert out["classes"][0][0] == run.class_names[int(expected[0].argmax())]


def test_mask_of_an_empty_batch():
    assert animated_webp_mask(tf.constant([], tf.string)).shape == (0,)
    assert animated_webp_mask(tf.constant([[ANIM, b""]])).numpy().tolist() == [[True, False]]
