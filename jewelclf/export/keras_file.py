"""``jewelclf export --format keras``: a checked copy of the run's ``model.keras``.

The copy gets the class names and the input description beside it, and is reloaded and run on a
few of the run's images to check it matches the run's model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jewelclf import fsio
from jewelclf.evaluation import reference as reference_mod
from jewelclf.export.files import prepare_folder, write_json
from jewelclf.export.layout import CLASS_NAMES, INFO, PARITY_IMAGES, REPORT, Log, default_output
from jewelclf.export.samples import run_images
from jewelclf.inference.policy import check_review_threshold, for_run
from jewelclf.inference.runtime import keras_pixels, keras_probabilities
from jewelclf.runs import load_run, timestamp


def export_keras(run_dir: Path, output: Path | None = None, parity_data: str | None = None,
                 overwrite: bool = False, log: Log = print,
                 review_threshold: float | None = None) -> dict[str, Any]:
    """Copy ``model.keras`` with its class names, input description and review policy (the
    temperature, the review threshold, and the unknown reference beside it); check the copy loads."""
    from jewelclf import runs as rd

    check_review_threshold(review_threshold)
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out_dir = Path(output) if output is not None else default_output(run_dir, "keras")
    prepare_folder(out_dir, [rd.MODEL, rd.UNKNOWN_REFERENCE], overwrite)
    policy = for_run(run, review_threshold, log)
    fsio.atomic_save(out_dir / rd.MODEL, lambda tmp: shutil.copyfile(run_dir / rd.MODEL, tmp))
    reference_mod.write(out_dir / rd.UNKNOWN_REFERENCE, policy.reference)
    images = run_images(run, ("test", "val", "train"), PARITY_IMAGES, parity_data)
    pixels = keras_pixels([im.data for im in images], run.image_size, run.resize)
    copy = rd.load_model_file(out_dir / rd.MODEL, len(run.class_names))
    diff = float(np.abs(keras_probabilities(copy, pixels) - keras_probabilities(run.model, pixels)).max())
    info = {"format": "keras", **run.describe(), **policy.describe(),
            "input": f"float32 [batch, {run.image_size}, {run.image_size}, 3] RGB pixels 0..255, "
                     f"resized with '{run.resize}'; import jewelclf.modeling.registry before loading",
            "output": "float32 [batch, classes] uncalibrated probabilities in class_names order: "
                      "calibrate as softmax(log(p) / temperature); jewelclf predict does"}
    write_json(out_dir / INFO, info)
    write_json(out_dir / CLASS_NAMES, run.class_names)
    report = {"format": "keras", "path": str((out_dir / rd.MODEL).resolve()),
              "created": timestamp(), **run.describe(),
              "size_bytes": (out_dir / rd.MODEL).stat().st_size,
              "reload_max_abs_diff": diff, "environment": rd.environment()}
    write_json(out_dir / REPORT, report)
    log(f"wrote {out_dir / rd.MODEL}")
    return report
