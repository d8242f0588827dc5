"""The run's unknown reference: what ``fit`` writes, rebuilt for a run that has none, and a damaged file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from jewelclf import runs
from jewelclf.errors import JewelclfError
from jewelclf.evaluation import reference


def test_a_run_without_a_reference_gets_the_one_fit_writes(tiny_run, tmp_path):
    written = reference.read(tiny_run / "unknown_reference.npz")
    assert written is not None and len(written.train) > 0
    old = shutil.copytree(tiny_run, tmp_path / "old_run")
    (old / "unknown_reference.npz").unlink()
    lines = []
    built = reference.ensure(runs.load_run(old), log=lines.append)
    assert "has no unknown_reference.npz" in lines[0]
    np.testing.assert_allclose(built.train, written.train, atol=1e-5)
    np.testing.assert_allclose(built.val_distances, written.val_distances, atol=1e-5)
    assert built.threshold == pytest.approx(written.threshold, abs=1e-5)
    # Saved in the run: the next use reads it, with no pass over the images.
    again = reference.ensure(runs.load_run(old), log=lines.append)
    assert len(lines) == 2 and np.array_equal(again.train, built.train)


def test_a_damaged_reference_is_one_line_naming_the_file(tiny_run, tmp_path):
    damaged = tmp_path / "unknown_reference.npz"
    damaged.write_bytes(b"not an npz")
    with pytest.raises(JewelclfError, match="unknown_reference.npz' cannot be read") as e:
        reference.read(damaged)
    assert "\n" not in str(e.value) and "delete it" in str(e.value)
