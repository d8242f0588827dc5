"""Fuzzing the exported SavedModel's ``serving_default`` signature (issue #6, "Fuzzing").

Random bytes and mutated real JPEG/PNG/GIF/BMP/WebP files (``test_fuzz_data``'s strategies, a
still and an animated WebP among the seeds) go, in batches, through the signature of version 1
of the tiny run's export, loaded in a separate Python process that imports TensorFlow only, as
TF Serving would: never jewelclf. Every batch also holds one known good image.

Properties: the process survives every batch and answers each one; an item marked invalid has
``valid`` false, a one-line non-empty ``error``, zero probabilities and no class names; a valid
one has probabilities that sum to 1 and class names; an item jewelclf's data check accepts is
valid (the server takes what training takes); an item with no image magic number or an
animated WebP gets its documented reason; and the good image's answer never depends on the rest
of its batch. Bounded to ~10 s after the export, the same examples every run;
``JEWELCLF_FUZZ_SCALE=20`` runs 20 times as many, fresh.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz_data import FILES, FUZZ, MAX_PIXELS, SCALE

from jewelclf.data.formats import header_problem, recorded_limits
from jewelclf.data.images import ANIMATED_WEBP_REASON, is_animated_webp, sniff_format
from jewelclf.data.sources import Record
from jewelclf.data.validate import check_bytes

from export_helpers import encode, exported_tiny, noisy

SERVER = textwrap.dedent(r'''
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    print("READY", flush=True)
    for line in sys.stdin:
        batch = [bytes.fromhex(h) for h in json.loads(line)]
        out = serve(images=tf.constant(batch, tf.string))
        print("OUT " + json.dumps({
            "valid": out["valid"].numpy().tolist(),
            "error": [e.decode("utf-8", "replace") for e in out["error"].numpy()],
            "classes": [[c.decode("utf-8") for c in row] for row in out["classes"].numpy()],
            "probabilities": out["probabilities"].numpy().tolist(),
            "jewelclf_imported": any(m == "jewelclf" or m.startswith("jewelclf.") for m in sys.modules),
        }), flush=True)
''')
MEMORY_LIMIT = 12 << 30  # a decode bomb fails the child rather than swapping the machine
ANSWER_TIMEOUT = 120.0
GOOD = encode(noisy((40, 48, 3), 5, (40, 200, 40)), "PNG")


class Server:
    """The SavedModel's serving_default in a child process that never imports jewelclf."""

    def __init__(self, saved_model, work):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        self.stderr = open(work / "server.stderr", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(saved_model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True, cwd=str(work), env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT)))
        assert self._line() == "READY", self.died()

    def _line(self) -> str:
        """The child's next line, or "" if it died or said nothing for ANSWER_TIMEOUT seconds."""
        timer = threading.Timer(ANSWER_TIMEOUT, self.proc.kill)
        timer.start()
        try:
            return self.proc.stdout.readline().strip()
        finally:
            timer.cancel()

    def died(self) -> str:
        self.stderr.seek(0)
        tail = self.stderr.read()[-3000:]
        return f"the serving process died or hung (exit {self.proc.poll()}):\n{tail}"

    def __call__(self, batch: list[bytes]) -> dict:
        self.proc.stdin.write(json.dumps([b.hex() for b in batch]) + "\n")
        self.proc.stdin.flush()
        line = self._line()
        assert line.startswith("OUT ") and self.proc.poll() is None, (self.died(), [b[:40] for b in batch])
        return json.loads(line[4:])

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    exported = exported_tiny(tiny_run, tmp_path_factory)
    s = Server(exported / "1", tmp_path_factory.mktemp("fuzz_serving"))
    alone = s([GOOD])
    assert alone["valid"] == [True] and alone["jewelclf_imported"] is False
    s.good = alone  # the good image's answer in a batch of its own
    class_names = json.loads((tiny_run / "class_names.json").read_text())
    s.class_names = set(class_names)
    s.limits = recorded_limits(json.loads((exported / "1" / "assets.extra" / "jewelclf.json").read_text()))
    yield s
    s.close()


def assert_item(server, data: bytes, valid: bool, error: str, classes: list[str], probs: list[float]) -> None:
    p = np.asarray(probs, np.float64)
    if valid:
        assert error == ""
        assert np.isfinite(p).all() and abs(p.sum() - 1.0) < 1e-4
        assert set(classes) <= server.class_names and len(set(classes)) == len(classes)
    else:
        assert error and "\n" not in error, repr(error)
        assert not p.any() and classes == [""] * len(classes)
    if not data:
        assert error == "empty input: no image bytes"
    elif sniff_format(data[:32]) is None:
        assert not valid and error.startswith("not a supported image"), (data[:16], error)
    elif is_animated_webp(data):
        assert not valid and error == ANIMATED_WEBP_REASON
    # A header whose size is outside the run's limits is refused, in the data check's words;
    # what else jewelclf's data check accepts (and so what training uses), the server must take.
    refused = None if is_animated_webp(data) else header_problem(data, *server.limits)
    if refused:
        assert not valid and error == refused, (data[:32], error)
    elif check_bytes(Record("/fuzz/x", "x", "ring"), data, MAX_PIXELS, 1).ok:
        assert valid, (data[:16], error)


@settings(FUZZ, max_examples=40 * SCALE)
@given(blobs=st.lists(FILES, min_size=1, max_size=6), where=st.integers(0, 6))
def test_fuzz_serving_default_in_a_fresh_process(server, blobs, where):
    where = min(where, len(blobs))
    batch = blobs[:where] + [GOOD] + blobs[where:]
    out = server(batch)
    assert out["jewelclf_imported"] is False
    assert len(out["valid"]) == len(out["error"]) == len(out["classes"]) == len(batch)
    for i, data in enumerate(batch):
        assert_item(server, data, out["valid"][i], out["error"][i], out["classes"][i], out["probabilities"][i])
    # One bad image cannot fail or change the others.
    assert out["valid"][where] is True and out["classes"][where] == server.good["classes"][0]
    np.testing.assert_allclose(out["probabilities"][where], server.good["probabilities"][0], atol=1e-6)
