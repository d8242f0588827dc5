"""On a model trained on the real jewellery photos: the exported SavedModel's accuracy on the test
split equals the Keras model's. Deselected by default (``-m realdata`` runs it); needs a finished
run trained on that data:

    JEWELCLF_EXPORT_RUN=/tmp/real/runs/vgg16 JEWELCLF_DATA=../shared/data/jewellery \\
        python -m pytest -q -m realdata tests/test_export_realdata.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_savedmodel_accuracy_equals_keras_on_the_test_split(tmp_path):
    run_dir = os.environ.get("JEWELCLF_EXPORT_RUN")
    data = os.environ.get("JEWELCLF_DATA")
    if not run_dir or not data or not Path(run_dir, "model.keras").is_file():
        pytest.skip("set JEWELCLF_EXPORT_RUN to a finished run on JEWELCLF_DATA")
    from jewelclf.evaluation.evaluate import evaluate_run
    from jewelclf.export.run import export_run

    report = export_run(Path(run_dir), "savedmodel", output=tmp_path / "m", test_data=data, log=print)
    acc = report["test_accuracy"]
    assert acc["savedmodel_accuracy"] == acc["keras_accuracy"]
    assert report["parity"]["passed"]
    metrics, _ = evaluate_run(Path(run_dir), data, tmp_path / "eval")
    assert metrics["num_examples"] == acc["num_examples"]
    assert metrics["accuracy"] == acc["savedmodel_accuracy"]
    assert json.loads((tmp_path / "m" / "1" / "export_report.json").read_text())["version"] == 1
