"""``jewelclf predict``: class names for images, from a local model or a TF Serving server.

Local models: an exported SavedModel (a version folder, or the base folder whose highest
version is used), a ``.keras`` or ``.tflite`` file (with the ``jewelclf.json`` or run files
beside it), or a run dir. With ``--server``, the images go to TensorFlow Serving's REST API
exactly as its documentation describes::

    POST {server}/v1/models/{name}[/versions/{N}]:predict
    {"signature_name": "serving_default", "instances": [{"b64": "<base64 image bytes>"}, ...]}

and the row-format answer ``{"predictions": [{"classes": [...], "scores": [...], ...}, ...]}``
is printed as the same table (:mod:`jewelclf.inference.serving_client` checks every reply). A file that
cannot be read or decoded is reported on its own line; the other images are still predicted.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any, Iterable

from jewelclf.data.formats import MAX_FILE_BYTES, recorded_limits
from jewelclf.display import error_text, quote_name
from jewelclf.errors import JewelclfError
from jewelclf.evaluation import reference as reference_mod
from jewelclf.export.layout import INFO, list_versions
from jewelclf.inference.policy import for_run, from_info
from jewelclf.inference.predictors import KerasPredictor, Prediction, Predictor, SavedModelPredictor, TFLitePredictor
from jewelclf.layout import CLASS_NAMES, CONFIG, MODEL, UNKNOWN_REFERENCE

DEFAULT_BATCH = 32


def collect_images(paths: Iterable[str]) -> list[Path]:
    """Files as given, and every visible file under folders (sorted), in argument order: the
    one walker of :func:`jewelclf.data.sources.collect_files`, whose loop guard ends on
    symlink loops."""
    from jewelclf.data.sources import collect_files

    return collect_files(paths)


def read_image_file(path: Path, limits: tuple[int, int] | None = None) -> tuple[bytes | None, str | None]:
    """The file's bytes, or ``None`` and a one-line reason when it is no supported image or its
    header claims a size outside ``limits`` (``(max_pixels, min_image_side)``; default: the
    default configuration's), so that it is never decoded."""
    from jewelclf.data.formats import (
        ANIMATED_WEBP_REASON,
        default_limits,
        header_problem,
        is_animated_webp,
        sniff_format,
        unsupported_reason,
    )

    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever
            return None, "not a regular file (a FIFO, socket or device)"
        if st.st_size > MAX_FILE_BYTES:  # the data check's limit
            return None, f"too large ({st.st_size / 2**20:.0f} MB); no photo is that big"
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot be read ({e.strerror or type(e).__name__})"
    if not data:
        return None, "empty file (0 bytes)"
    if sniff_format(data[:16]) is None:
        return None, unsupported_reason(data)
    if is_animated_webp(data):  # TensorFlow (and a TF Serving server) would abort on it
        return None, ANIMATED_WEBP_REASON
    problem = header_problem(data, *(limits or default_limits()))
    if problem:
        return None, problem
    return data, None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JewelclfError(f"'{path}' cannot be read as JSON ({error_text(e)}); export the "
                            f"model again, or point at the run dir") from None


def _pixel_model_info(folder: Path) -> dict[str, Any]:
    """image_size, resize, class_names and top_k from ``jewelclf.json`` or a run dir."""
    info_path = folder / INFO
    if info_path.is_file():
        info = _read_json(info_path)
        if not isinstance(info, dict) or not isinstance(info.get("class_names"), list):
            raise JewelclfError(f"'{info_path}' names no class_names; export the run again with "
                                f"jewelclf export")
        return info
    if (folder / CONFIG).is_file() and (folder / CLASS_NAMES).is_file():
        from jewelclf.evaluation import calibration
        from jewelclf.runs import load_run

        run = load_run(folder, instead="predict with another run", model=False)
        names = run.class_names
        return {"class_names": names, "image_size": run.image_size, "resize": run.resize,
                "top_k": min(run.top_k, len(names)), **run.limits,
                **for_run(run, reference=False).describe(),
                "calibration_note": "" if run.calibration is not None else calibration.MISSING_NOTE.format(run=folder)}
    raise JewelclfError(f"no {INFO} (from jewelclf export) or run files (config.yaml, "
                        f"class_names.json) beside the model in '{folder}'; export it with "
                        f"jewelclf export, or point at the run dir")


def with_tta(predictor: Predictor, tta: str) -> Predictor:
    """``predictor`` answering with ``tta`` (``predict --tta``): a Keras model averages over the
    flip here; an export answers with the test-time augmentation baked into it, so it must
    record the same ``tta`` (:mod:`jewelclf.modeling.tta`)."""
    from dataclasses import replace

    from jewelclf.modeling.tta import NONE, check_mode

    if check_mode(tta) == NONE:
        return predictor
    if isinstance(predictor, KerasPredictor):
        predictor.policy = replace(predictor.policy, tta=tta)
        return predictor
    recorded = predictor.policy.tta if isinstance(predictor, TFLitePredictor) else getattr(predictor, "tta", NONE)
    if recorded != tta:
        raise JewelclfError(f"--tta {tta} applies to a .keras model or a run dir; {predictor.description} "
                            f"has no test-time augmentation baked in: export it with jewelclf export --tta, "
                            f"or drop --tta")
    return predictor


def load_predictor(model: str | Path) -> Predictor:
    """A predictor for MODEL: a SavedModel (version or base folder), a run dir, an export
    folder of ``--format keras``/``tflite``, or a ``.keras``/``.tflite`` file."""
    path = Path(model).expanduser()
    if not path.exists():
        raise JewelclfError(f"model '{model}' does not exist; pass an exported SavedModel folder, "
                            f"a .keras or .tflite file, or a run dir")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return SavedModelPredictor(path)
        versions = [v for v in list_versions(path) if (path / str(v) / "saved_model.pb").is_file()]
        if versions:
            return SavedModelPredictor(path / str(max(versions)))
        if (path / MODEL).is_file():
            return load_predictor(path / MODEL)
        tflites = sorted(path.glob("*.tflite"))
        if len(tflites) == 1:
            return load_predictor(tflites[0])
        if tflites:
            raise JewelclfError(f"'{path}' holds {len(tflites)} .tflite files; pass one of them, "
                                f"e.g. {tflites[0]}")
        raise JewelclfError(f"'{path}' holds no SavedModel, model.keras or .tflite file")
    suffix = path.suffix.lower()
    if suffix not in (".keras", ".tflite"):
        raise JewelclfError(f"'{path}' is not a .keras or .tflite file nor a SavedModel folder")
    info = _pixel_model_info(path.parent)
    names = [str(c) for c in info["class_names"]]
    k = int(info.get("top_k") or min(3, len(names)))
    policy = from_info(info, reference_mod.read(path.parent / UNKNOWN_REFERENCE))
    if suffix == ".keras":
        pred = KerasPredictor(path, info.get("image_size") or 0, info.get("resize", "squash"), names, k, policy)
        if info.get("calibration_note"):  # after the load: a broken model stays one line
            print(info["calibration_note"], file=sys.stderr)
        if not pred.image_size:
            pred.image_size = int(pred.model.input_shape[1])
        pred.limits = recorded_limits(info)
        return pred
    pred = TFLitePredictor(path, info.get("image_size") or 0, info.get("resize", "squash"), names, k, policy)
    if not pred.image_size:
        pred.image_size = int(pred.interpreter.get_input_details()[0]["shape"][1])
    pred.limits = recorded_limits(info)
    return pred


def predict_files(predictor: Predictor, files: list[Path], top_k: int | None = None,
                  batch_size: int = DEFAULT_BATCH) -> list[Prediction]:
    """Predict each file; unreadable or undecodable files get an ``error`` instead."""
    from jewelclf import bars

    k = top_k or predictor.k or 3
    results: list[Prediction] = []
    pending: list[tuple[int, bytes]] = []
    progress = bars.bar(len(files), "predicting", unit="image")

    def flush():
        rows = predictor.predict([b for _, b in pending], k)
        for (i, _), (top, err, review) in zip(pending, rows):
            results[i].top = top or []
            results[i].error = err
            results[i].review = review
        progress.update(len(pending))
        pending.clear()

    with progress:
        for path in files:
            data, reason = read_image_file(path, predictor.limits)
            results.append(Prediction(str(path), error=reason))
            if data is None:
                progress.update()
                continue
            pending.append((len(results) - 1, data))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    return results


def format_table(results: list[Prediction]) -> str:
    """One line per image: the image, the best class and its score, then the other top classes;
    ``[needs review]`` at the end of the images the review policy sends to a person."""
    ok = [r for r in results if r.error is None]
    if not ok:
        return ""
    names = [quote_name(r.image) for r in ok]  # a newline in a file name must not forge a row
    width = min(60, max(len("image"), *map(len, names)))
    cls_width = max(len("class"), *(len(r.top[0][0]) for r in ok))
    k = max(len(r.top) for r in ok)
    lines = [f"{'image':<{width}}  {'class':<{cls_width}}  {'score':>6}" + (f"  top-{k}" if k > 1 else "")]
    for r, name in zip(ok, names):
        image = name if len(name) <= width else "..." + name[-(width - 3):]
        line = f"{image:<{width}}  {r.top[0][0]:<{cls_width}}  {r.top[0][1]:6.4f}"
        if k > 1:
            line += "  " + ", ".join(f"{c} {s:.3f}" for c, s in r.top)
        if r.review and r.review.get("needs_review"):
            line += "  [needs review]"
        lines.append(line)
    return "\n".join(lines)


def run_predict(model: str | None, images: list[str], top_k: int | None = None,
                server: str | None = None, server_model: str | None = None,
                version: int | None = None, batch_size: int = DEFAULT_BATCH,
                timeout: float = 60.0, tta: str = "none") -> tuple[list[Prediction], str]:
    """The ``jewelclf predict`` command: returns the results and what predicted them; ``tta``
    (``flip``) averages a Keras model's probabilities over a horizontal flip (:func:`with_tta`)."""
    if server:
        if not server_model:
            raise JewelclfError("--server needs --model NAME, the model name TF Serving serves")
        if tta != "none":
            raise JewelclfError("--tta does not apply with --server: the server answers as its model "
                                "was exported; export it with jewelclf export --tta, or drop --tta")
        paths = ([model] if model else []) + list(images)
        from jewelclf.inference.serving_client import ServerPredictor  # the REST client: only with --server

        predictor: Predictor = ServerPredictor(server, server_model, version, timeout=timeout)
    else:
        if server_model or version is not None:
            raise JewelclfError("--model and --version are for --server; pass a local MODEL path first")
        if not model or not images:
            raise JewelclfError("pass MODEL and at least one IMAGE_OR_DIR (or --server URL --model NAME IMAGE...)")
        paths = list(images)
        predictor = with_tta(load_predictor(model), tta)
    if top_k is not None and top_k < 1:
        raise JewelclfError(f"--top-k must be at least 1, got {top_k}")
    files = collect_images(paths)
    results = predict_files(predictor, files, top_k, batch_size)
    return results, predictor.description
