"""``export`` reads the run's own data with the run's own limits, from any folder (issue 15, defect 6).

``run_info.json`` keeps ``data`` as typed (relative to where ``fit`` ran) and ``data_path``
resolved; the export checks use ``data_path`` and ``config.yaml``'s ``data`` limits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from jewelclf import runs
from jewelclf.errors import JewelclfError
from jewelclf.export import samples


@pytest.fixture
def moved_run(tiny_run, tmp_path, monkeypatch):
    """A copy of the tiny run whose ``data`` was typed relative to the folder fit ran in, opened
    from a folder where that relative path does not exist."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run_info.json").read_text())
    assert info["data_path"] == str((tiny_run.parent / "data").resolve())
    info["data"] = "data"
    (run / "run_info.json").write_text(json.dumps(info))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return run


def test_run_images_work_from_another_folder(moved_run):
    images = samples.run_images(runs.load_run(moved_run), ["test", "val", "train"], 4)
    assert len(images) == 4 and all(im.data for im in images)


def test_run_images_use_the_runs_data_limits(moved_run):
    config = yaml.safe_load((moved_run / "config.yaml").read_text())
    config["data"]["min_image_side"] = 1000  # the generated images are 40 x 48
    (moved_run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(JewelclfError, match="no readable images"):
        samples.run_images(runs.load_run(moved_run), ["test"], 4)
