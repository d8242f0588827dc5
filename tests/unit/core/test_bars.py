"""Progress bars: drawn on a terminal's stderr, never into captured output, logs or pipes."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from jewelclf import bars
from jewelclf.data.fingerprint import fingerprint_records, hamming_pairs
from jewelclf.data.sources import load_source
from jewelclf.data.validate import check_records

from conftest import make_class_folder


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def terminal(monkeypatch):
    """stderr is a terminal, and bars draw at once. ``screen.made`` lists every bar made."""
    screen = Terminal()
    screen.made = []
    # bars' own view of sys: pytest puts its capture back on sys.stderr after fixture setup
    monkeypatch.setattr(bars, "sys", SimpleNamespace(stderr=screen))
    monkeypatch.setattr(bars, "DELAY", 0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    make = bars.bar

    def recording(*args, **kwargs):
        b = make(*args, **kwargs)
        screen.made.append((b, not b.disable))  # tqdm disables a bar as it closes it
        return b

    monkeypatch.setattr(bars, "bar", recording)
    return screen


def counted(screen, desc):
    """``(n, total)`` of the bar named ``desc``, which must have been drawn, and closed."""
    [(b, shown)] = [(b, shown) for b, shown in screen.made if b.desc == desc]
    assert shown and desc in screen.getvalue()
    return b.n, b.total


@pytest.fixture
def records(tmp_path):
    return load_source(str(make_class_folder(tmp_path / "data", per_class=2))).records


def test_a_bar_shows_on_a_terminal_with_count_and_eta(terminal, records):
    checks = check_records(records, 10**8, 8, workers=2)
    assert len(checks) == 6 and all(c.ok for c in checks)
    assert counted(terminal, "checking files") == (6, 6)
    screen = terminal.getvalue()
    assert "0/6" in screen and "<?" in screen  # a count and an ETA
    assert screen.endswith("\r")  # redrawn in place, and wiped when done
    fingerprint_records(records, workers=2)
    assert counted(terminal, "hashing files") == (6, 6)


def test_no_bar_when_stderr_is_not_a_terminal(records, capsys, monkeypatch):
    monkeypatch.setattr(bars, "DELAY", 0)
    check_records(records, 10**8, 8, workers=2)
    fingerprint_records(records, workers=2)
    hamming_pairs(np.zeros((300, 32), np.uint8), 12)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert bars.bar(10, "x").disable


def test_no_bar_for_nothing_or_a_workload_that_ends_within_the_delay(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(bars, "sys", SimpleNamespace(stderr=screen))
    assert bars.bar(0, "nothing").disable
    with bars.bar(5, "quick") as b:  # the default delay: a fast phase never draws
        b.update(5)
    assert screen.getvalue() == ""


def test_the_near_duplicate_search_counts_every_pair(terminal):
    hashes = np.random.default_rng(0).integers(0, 256, (1200, 32), dtype=np.uint8)  # 2 blocks
    hamming_pairs(hashes, 12)
    assert counted(terminal, "near-duplicate search") == (1200 * 1199 // 2,) * 2


def test_stage1_feature_pass_and_predict_count_images(terminal, tmp_path):
    import keras
    import tensorflow as tf

    from jewelclf.inference.predict import predict_files
    from jewelclf.training.features import _features

    extractor = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.GlobalAveragePooling2D()])
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((10, 4, 4, 3), "float32"),
                                             np.zeros((10, 2), "float32"))).batch(4)
    assert _features(extractor, ds, "stage 1 features (train)", 10).shape == (10, 3)
    assert counted(terminal, "stage 1 features (train)") == (10, 10)
    assert _features(extractor, ds, "by batch").shape == (10, 3)  # no count given: batches
    assert counted(terminal, "by batch") == (3, 3)

    class Fake:
        k, limits = 1, None  # the Predictor interface: top-k, and no recorded pixel limits

        def predict(self, encoded, k):
            return [([("ring", 1.0)], None, None) for _ in encoded]

    folder = make_class_folder(tmp_path / "photos", per_class=1)
    (folder / "broken.jpg").write_bytes(b"")
    files = sorted(folder.rglob("*.jpg"))
    results = predict_files(Fake(), files, batch_size=2)
    assert [r.error is None for r in results].count(True) == 3
    assert counted(terminal, "predicting") == (4, 4)  # the unreadable file counted too


def test_a_bar_draws_on_a_pty_that_reports_no_size(monkeypatch):
    """A pty without a window (``script``, some ``docker exec -t``) says 0x0; tqdm alone then
    takes it for -1 rows and draws nothing."""
    import os

    master, slave = os.openpty()
    assert os.get_terminal_size(slave) == (0, 0)
    with open(slave, "w", encoding="utf-8", closefd=True) as pty:
        # The real sys.stderr (tqdm asks the size only of sys.stderr and sys.stdout), set in
        # the test's body: pytest puts its own back after fixture setup.
        monkeypatch.setattr(sys, "stderr", pty)
        monkeypatch.setattr(bars, "DELAY", 0)
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
        with bars.bar(3, "on a pty") as b:
            b.update(3)
        pty.flush()
        monkeypatch.undo()
    try:
        screen = os.read(master, 65536).decode("utf-8", "replace")
    except OSError:  # EIO: nothing was written, and the other end is closed
        screen = ""
    os.close(master)
    assert "on a pty" in screen and "0/3" in screen
