"""``jewelclf export``'s one entry point: the format dispatch and the terminal summary.

:func:`export_run` checks that the options fit the format and calls the format's exporter;
:func:`format_export_summary` turns any format's report into a few lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from jewelclf.errors import JewelclfError
from jewelclf.export.keras_file import export_keras
from jewelclf.export.layout import FORMATS, REPORT, SERVING_EMBED, Log
from jewelclf.export.savedmodel import export_savedmodel
from jewelclf.export.tflite import export_tflite
from jewelclf.modeling.tta import NONE as TTA_NONE
from jewelclf.modeling.tta import VIEWS, check_mode
from jewelclf.runs import DEFAULT_EMBED_LAYER


def export_run(run_dir: Path, fmt: str = "savedmodel", output: Path | None = None,
               version: int | None = None, quantize: Iterable[str] = (), test_data: str | None = None,
               parity_data: str | None = None, overwrite: bool = False, log: Log = print,
               embed_layer: str = DEFAULT_EMBED_LAYER, review_threshold: float | None = None,
               tta: str = TTA_NONE) -> dict[str, Any]:
    """Export ``run_dir`` in ``fmt``; the one entry point of ``jewelclf export``.

    ``embed_layer`` (SavedModel only) picks the embedding of the ``embed`` signature;
    ``review_threshold`` overrides the run's threshold of ``needs_review``; ``tta="flip"``
    (SavedModel and TFLite) bakes the horizontal-flip average into the classifying answer."""
    quantize = list(quantize)
    if fmt not in FORMATS:
        raise JewelclfError(f"unknown --format '{fmt}'; one of {', '.join(FORMATS)}")
    if fmt != "savedmodel" and version is not None:
        raise JewelclfError("--version applies to --format savedmodel only")
    if fmt != "tflite" and quantize:
        raise JewelclfError("--quantize applies to --format tflite only")
    if fmt != "savedmodel" and embed_layer != DEFAULT_EMBED_LAYER:
        raise JewelclfError("--embed-layer applies to --format savedmodel only")
    check_mode(tta)
    if fmt == "keras" and tta != TTA_NONE:
        raise JewelclfError("--tta applies to --format savedmodel and tflite only: the keras format "
                            "is a copy of the run's model.keras as trained; use --format savedmodel "
                            "--tta, or drop --tta")
    if fmt == "savedmodel":
        if overwrite:
            raise JewelclfError("SavedModel versions are never overwritten; omit --overwrite "
                                "(the next version number is used)")
        return export_savedmodel(run_dir, output, version, test_data, parity_data, log, embed_layer,
                                 review_threshold, tta)
    if fmt == "tflite":
        return export_tflite(run_dir, output, quantize or ["none"], test_data, parity_data, overwrite, log,
                             review_threshold, tta)
    if test_data:
        raise JewelclfError("--test-data applies to --format savedmodel and tflite")
    return export_keras(run_dir, output, parity_data, overwrite, log, review_threshold)


def review_line(report: dict[str, Any]) -> str:
    """How the export answers needs_review: its thresholds, and their sources."""
    threshold, source = report.get("review_threshold"), report.get("review_threshold_source")
    parts = [f"temperature {report.get('temperature', 1.0):.3f}",
             "no review threshold" if threshold is None else f"review below confidence {threshold:.4f} ({source})"]
    unknown = report.get("unknown")
    if unknown and unknown.get("threshold") is not None:
        parts.append(f"or unknown_score above {unknown['threshold']:.4f} ({unknown['threshold_rule']})")
    return "needs_review: " + ", ".join(parts)


def tta_line(report: dict[str, Any]) -> str | None:
    """What the classifying answer averages over, when the export has test-time augmentation."""
    tta = report.get("tta", TTA_NONE)
    if tta == TTA_NONE:
        return None
    return (f"test-time augmentation: {tta} (probabilities averaged over {VIEWS[tta]} passes per "
            f"image, then calibrated{'; embed unchanged' if report['format'] == 'savedmodel' else ''})")


def format_export_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = []
    if report["format"] == "savedmodel":
        p = report["parity"]
        lines.append(f"exported {report['path']} (model '{report['model_name']}', version {report['version']})")
        for name, s in p["signatures"].items():
            if name == SERVING_EMBED:
                if "max_abs_diff" in s:
                    lines.append(f"  {name}: {s['dim']}-d '{s['layer']}' vectors, max |diff| with the "
                                 f"Keras embedding {s['max_abs_diff']:.2e}, min cosine "
                                 f"{s['min_cosine']:.6f} on {s['images']} images (fresh process)")
                continue
            lines.append(f"  {name}: top-1 agrees with Keras on {s['top1_agree']}/{s['images']} images, "
                         f"max |diff| {s['max_abs_diff']:.2e} (fresh process, tolerance {p['tolerance']:g})")
        lines.append("  " + review_line(report))
        lines += ["  " + line for line in [tta_line(report)] if line]
        acc = report.get("test_accuracy")
        if acc:
            lines.append(f"  accuracy on {acc['data']} ({acc['num_examples']} images): SavedModel "
                         f"{acc['savedmodel_accuracy']:.4f}, Keras {acc['keras_accuracy']:.4f}")
        lines.append(f"  report: {Path(report['path']) / REPORT}")
    elif report["format"] == "tflite":
        lines.append(f"exported TFLite to {report['path']}")
        for mode, e in report["modes"].items():
            acc = f", test accuracy {e['test_accuracy']:.4f}" if "test_accuracy" in e else ""
            lines.append(f"  {mode:8s} {e['size_mb']:9.3f} MB  top-1 agreement {e['top1_agreement']:.3f}{acc}")
        if "keras_test_accuracy" in report:
            lines.append(f"  keras    {report['keras_size_bytes'] / 2**20:9.3f} MB  test accuracy "
                         f"{report['keras_test_accuracy']:.4f}")
        lines.append("  " + review_line(report))
        lines += ["  " + line for line in [tta_line(report)] if line]
        lines.append(f"  report: {Path(report['path']) / REPORT}")
    else:
        lines.append(f"exported {report['path']} (reload max |diff| {report['reload_max_abs_diff']:.2e})")
    return "\n".join(lines)
