"""Smaller hostile inputs of issue 20, item 9: file names that forge output lines, TensorFlow's
internals in ``check`` reasons, a decoder-sized PNG called corrupt, and lock files left behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import tensorflow as tf
from click.testing import CliRunner

from jewelclf import runs as rundir
from jewelclf.cli import main
from jewelclf.data.sources import Record
from jewelclf.data.validate import check_bytes
from jewelclf.display import error_text, quote_name
from jewelclf.errors import JewelclfError
from jewelclf.inference import predictors

from conftest import make_image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR says ``width`` x ``height`` (RGBA) and whose data holds one row: enough
    for every header reader, and for TensorFlow's size check, which comes before the data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 4 * width))) + chunk(b"IEND", b""))


# ------------------------------------------------------------------ names that forge lines


def test_quote_name():
    assert quote_name("ring/a b é.jpg") == "ring/a b é.jpg"
    assert quote_name("a\nb.jpg") == "'a\\nb.jpg'"
    for bad in ("a\rb", "a\x1b[2Jb", "a\u2028b", "a\x00b", "a\udcffb"):
        assert "\n" not in quote_name(bad) and quote_name(bad) != bad
        assert quote_name(bad).isprintable()


def test_check_quotes_names_with_newlines(tmp_path):
    data = tmp_path / "data"
    for label in ("ring", "watch"):
        for i in range(3):
            make_image(label, 10 * len(label) + i, path=data / label / f"{label}{i}.jpg")
    # A copy (an exact duplicate, listed) and a truncated file (rejected, listed with its reason).
    shutil.copy(data / "watch" / "watch0.jpg", data / "watch" / "evil\nFORGED x.jpg: ok.jpg")
    whole = (data / "ring" / "ring0.jpg").read_bytes()
    (data / "ring" / "cut\nFORGED y.jpg: ok.jpg").write_bytes(whole[: len(whole) // 3])
    r = CliRunner().invoke(main, ["check", str(data), "--image-size", "32"])
    assert r.exit_code in (0, 1), r.output
    lines = r.stdout.splitlines()
    assert not [ln for ln in lines if ln.lstrip().startswith("FORGED")], r.stdout
    assert any("'watch/evil\\nFORGED x.jpg: ok.jpg'" in ln for ln in lines), r.stdout
    assert any(ln.startswith("  'ring/cut\\nFORGED y.jpg: ok.jpg': corrupt JPEG") for ln in lines), r.stdout


class _Answer(BaseHTTPRequestHandler):
    """A TF Serving stand-in that answers every image with one valid row."""

    def do_POST(self):
        n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["instances"])
        body = json.dumps({"predictions": [{"classes": ["ring", "watch"], "scores": [0.75, 0.25],
                                            "valid": True, "error": ""}] * n}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_predict_quotes_names_with_newlines(tmp_path):
    folder = tmp_path / "imgs"
    make_image("ring", 1, path=folder / "a.jpg")
    shutil.copy(folder / "a.jpg", folder / "evil\nforged.jpg  ring  1.0000.jpg")
    (folder / "notes\nb.jpg: ok.jpg").write_text("not an image")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = CliRunner().invoke(main, ["predict", "--server", f"http://127.0.0.1:{server.server_address[1]}",
                                      "--model", "m", str(folder)])
    finally:
        server.shutdown()
        server.server_close()
    assert r.exit_code == 0, r.output
    table = r.stdout.strip().splitlines()
    assert len(table) == 1 + 2, r.stdout  # the header and two images, no forged row
    assert any("evil\\nforged.jpg  ring  1.0000.jpg'" in ln for ln in table), r.stdout
    (skipped,) = r.stderr.strip().splitlines()
    assert skipped.startswith(f"skipped '{folder}/notes\\nb.jpg: ok.jpg': not a supported image"), skipped


# ------------------------------------------------------------ clean reasons, the right reason


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_check_reasons_hold_no_tensorflow_internals(tmp_path, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    make_image("ring", 3, (40, 48), fmt, path)
    whole = path.read_bytes()
    check = check_bytes(Record(str(path), path.name, "ring"), whole[: len(whole) // 2], 50_000_000, 8)
    assert not check.ok
    assert check.reason.startswith(f"corrupt {fmt}: "), check.reason
    for internal in ("{{", "function_node", "[Op:", "__wrapped__", "device:CPU", "name:"):
        assert internal not in check.reason, check.reason


def test_error_text_of_a_graph_error():
    text = ("Graph execution error:\n\nDetected at node DecodeImage defined at (most recent call last):\n"
            '  File "x.py", line 3, in <module>\n\n{{function_node __wrapped__DecodeImage_device_/job:'
            "localhost/replica:0/task:0/device:CPU:0}} Invalid PNG data, size 2610\n"
            "\t [[{{node DecodeImage}}]] [Op:__inference_signature_wrapper_123]")
    assert error_text(tf.errors.InvalidArgumentError(None, None, text)) == "Invalid PNG data, size 2610"


def test_a_png_past_the_decoder_limit_is_too_large_not_corrupt():
    """30000x30000 is 900M px: TensorFlow's decoder refuses it from the header ("PNG size too
    large for int"); with data.max_pixels raised past it, check and predict still say "too large"."""
    data = png_header_only(30000, 30000)
    check = check_bytes(Record("big.png", "big.png", "ring"), data, 10**9, 8)
    assert not check.ok and check.reason.startswith("too large: 30000x30000 px"), check.reason
    assert "TensorFlow can decode" in check.reason
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        tf.io.decode_image(data, channels=0, expand_animations=False)
    reason = predictors._decode_failure(data, e.value)
    assert reason.startswith("too large") and "{{" not in reason, reason
    # Under the default limit the data.max_pixels message comes first, as before.
    assert "data.max_pixels=50000000" in check_bytes(Record("big.png", "big.png", "ring"), data, 50_000_000, 8).reason


# ----------------------------------------------------------------------------- lock files


def test_the_lock_file_goes_when_the_run_ends(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    lock = tmp_path / "runs" / ".r1.lock"
    lock.parent.mkdir()
    lock.write_text("pid 1")  # left by a run killed with -9, which cannot clean up
    with rundir.run_lock(run_dir):
        assert lock.read_text() == f"pid {os.getpid()}"
        with pytest.raises(JewelclfError, match=f"in use by pid {os.getpid()}"), rundir.run_lock(run_dir):
            pass
    assert not lock.exists()
    for _ in range(3):
        with rundir.run_lock(run_dir):
            pass
    assert sorted(p.name for p in lock.parent.iterdir()) == []


def test_a_lock_on_a_file_unlinked_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """Between this process's open and its flock, the holder ends (unlinking the file) and a
    newcomer creates a new one: the flock won on the old file guards nothing, so run_lock must
    lock the file now at the path."""
    run_dir = tmp_path / "r"
    lock = tmp_path / ".r.lock"
    real_flock = fcntl.flock
    calls = []

    def flock(fd, op):
        if not calls:
            os.unlink(lock)
            lock.write_text("")
        calls.append(op)
        return real_flock(fd, op)

    monkeypatch.setattr(rundir.fcntl, "flock", flock)
    with rundir.run_lock(run_dir):
        monkeypatch.setattr(rundir.fcntl, "flock", real_flock)
        assert len(calls) == 2
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the file at the path is the one held
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not lock.exists()


_WORKER = """
import sys
from pathlib import Path
from jewelclf.errors import JewelclfError
from jewelclf.runs import run_lock
run_dir, counter = Path(sys.argv[1]), Path(sys.argv[2])
won = 0
for _ in range(int(sys.argv[3])):
    try:
        with run_lock(run_dir):
            n = int(counter.read_text())
            counter.write_text(str(n + 1))
            won += 1
    except JewelclfError:
        pass
print(won)
"""


def test_run_lock_still_excludes_with_the_file_coming_and_going(tmp_path):
    """Processes taking and dropping the lock as fast as they can: each increment of the shared
    counter happens under the lock, so none is lost."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "run"), str(counter), "150"],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    won = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert int(counter.read_text()) == sum(won) > 0
    assert not (tmp_path / ".run.lock").exists()
