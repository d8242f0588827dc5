"""Export a finished run: what the user ships.

``savedmodel``
    TensorFlow Serving's layout, ``<output>/<VERSION>/saved_model.pb`` + ``variables/``, built
    with Keras' :class:`keras.export.ExportArchive`. Two classifying signatures:

    - ``serving_default``: ``images``, a ``[batch]`` string tensor of encoded JPEG/PNG/GIF/BMP/
      WebP bytes. Decoding, resizing and the backbone's preprocessing run inside the graph, with
      the very functions training used (:func:`jewelclf.data.images.load_image`). An animated
      WebP, on which TensorFlow's decoder aborts the process, is recognised from its header
      bytes and answered ``valid`` false without being decoded. So is an image whose header
      claims more pixels than the run's ``data.max_pixels`` or a side under its
      ``data.min_image_side`` (both recorded in ``assets.extra/jewelclf.json``), with the data
      check's reason: a PNG of a few hundred KB can claim 15000x15000, 900 MB decoded.
    - ``serving_pixels``: ``pixels``, uint8 ``[batch, H, W, 3]`` of any size, resized in the graph.

    Both return ``probabilities`` (float32 ``[batch, classes]``), ``classes`` (string
    ``[batch, k]``, class names best first), ``scores`` (float32 ``[batch, k]``), ``valid`` (bool
    ``[batch]``) and ``error`` (string ``[batch]``, empty when valid). The class names are a
    constant of the graph, and also sit in ``assets.extra/jewelclf.json`` for local tools.

    A third signature, ``embed``, serves visual search: the same ``images`` input, decoded like
    ``serving_default``, and ``embedding`` (float32 ``[batch, D]``, L2-normalised), ``valid`` and
    ``error``. The vector is :func:`jewelclf.modeling.embedding.embedding_model` of the run's model, the
    very function ``jewelclf index`` embeds a catalogue with (layer ``pool`` by default), so a
    served query vector can be searched against an index of the same model. Invalid items get a
    zero vector.

    A version is written into a hidden temp folder beside the versions, checked in a fresh
    Python process that does not import jewelclf (parity with the Keras model), and only then
    renamed into place, so TF Serving never sees half a model and a failed check leaves nothing.
    The temp folder is locked while its export lives, so exports from other hosts sharing the
    folder leave it alone, and it holds the parity check's files too; the parity process dies
    with the export (:mod:`jewelclf.export.staging`).

``tflite``
    One ``model_<mode>.tflite`` per quantization mode, through Keras' LiteRT exporter (TF's
    converter). Input: float32 pixels 0..255 ``[batch, S, S, 3]`` (decode and resize on the
    device); output: probabilities.

``keras``
    A copy of ``model.keras`` with the class names and input description beside it.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

from jewelclf import fsio
from jewelclf.errors import JewelclfError
from jewelclf.export.files import write_if_absent, write_json
from jewelclf.export.layout import (
    BATCHING_PARAMETERS,
    EMBED_OUTPUT_KEYS,
    FAILED_REPORT,
    INFO,
    INPUT_IMAGES,
    INPUT_PIXELS,
    MODELS_CONFIG,
    OUTPUT_KEYS,
    PARITY_IMAGES,
    REPORT,
    SERVING_DEFAULT,
    SERVING_EMBED,
    SERVING_PIXELS,
    Log,
    default_output,
    list_versions,
    require_tensorflow_backend,
)
from jewelclf.export.parity import compare_accuracy, compare_parity, run_in_fresh_process, savedmodel_probabilities
from jewelclf.export.samples import run_images
from jewelclf.export.serving import build_archive, check_signature_contract, embedding_info
from jewelclf.export.staging import Staging, cleanup_stale, rename_noreplace
from jewelclf.inference.policy import ReviewPolicy, check_review_threshold, for_run
from jewelclf.modeling.tta import NONE as TTA_NONE
from jewelclf.modeling.tta import check_mode
from jewelclf.runs import DEFAULT_EMBED_LAYER, RunModel, load_run, timestamp


def write_savedmodel(run: RunModel, path: Path, policy: ReviewPolicy) -> None:
    """Write the SavedModel of ``run`` answering by ``policy`` (its test-time augmentation
    included) into ``path`` (a new folder)."""
    build_archive(run, policy.reference, policy.review_threshold, policy.tta).write_out(
        str(path), verbose=False)
    extra = Path(path) / "assets.extra"
    extra.mkdir(exist_ok=True)
    (extra / INFO).write_text(json.dumps({
        "format": "savedmodel", **run.describe(),
        "signatures": {
            SERVING_DEFAULT: f"{INPUT_IMAGES}: string [batch] of encoded JPEG/PNG/GIF/BMP/WebP bytes",
            SERVING_PIXELS: f"{INPUT_PIXELS}: uint8 [batch, height, width, 3] RGB, any size",
            SERVING_EMBED: f"{INPUT_IMAGES}: string [batch] of encoded JPEG/PNG/GIF/BMP/WebP bytes"},
        "outputs": list(OUTPUT_KEYS),
        **policy.describe(),
        "embed_outputs": list(EMBED_OUTPUT_KEYS),
        "embedding": embedding_info(run)}, indent=2) + "\n", encoding="utf-8")


def cleanup_stale_temp(base: Path, log: Log = print, now: float | None = None,
                       keep: Path | None = None) -> list[str]:
    """Delete temp folders left by exports that are gone (killed, crashed, on any host): their
    lock is free and their heartbeat old (:func:`jewelclf.export.staging.cleanup_stale`)."""
    return cleanup_stale(base, log, now, keep)


def models_config_text(name: str) -> str:
    """TF Serving's ``models.config`` for the model ``name`` mounted at ``/models/<name>``."""
    return textwrap.dedent(f"""\
        # TensorFlow Serving ModelServerConfig (text proto), written by jewelclf export.
        # Use with: --model_config_file=/models/{name}/{MODELS_CONFIG}
        # base_path is where the docker command mounts this folder inside the container.
        # The server serves the highest numbered version folder by default.
        model_config_list {{
          config {{
            name: '{name}'
            base_path: '/models/{name}'
            model_platform: 'tensorflow'
          }}
        }}
        """)


def batching_parameters_text(cpus: int | None = None) -> str:
    """TF Serving's batching parameters, one batch thread per core (``cpus``)."""
    cpus = cpus or os.cpu_count() or 1
    return textwrap.dedent(f"""\
        # TensorFlow Serving BatchingParameters (text proto), written by jewelclf export.
        # Use with: --enable_batching --batching_parameters_file=/models/<name>/{BATCHING_PARAMETERS}
        # CPU defaults after TF Serving's batching guide ("CPU-only: one approach"): one batch
        # thread per core ({cpus} on the exporting machine; set the serving machine's count), no
        # batching delay (0; then try 1000-10000 us). Requests of up to 256 images are accepted
        # and run as batches of at most 32, so one batch of decoded images stays small in memory.
        max_batch_size {{ value: 256 }}
        enable_large_batch_splitting {{ value: true }}
        max_execution_batch_size {{ value: 32 }}
        batch_timeout_micros {{ value: 0 }}
        max_enqueued_batches {{ value: 100 }}
        num_batch_threads {{ value: {cpus} }}
        """)


def _version_folder(base: Path, version: int | None) -> tuple[list[int], int, Path]:
    """The versions already under ``base``, the version to write (default: the next) and its
    folder, refusing an ``--output`` that is a file or a SavedModel and an existing version."""
    if base.exists() and not base.is_dir():
        raise JewelclfError(f"--output '{base}' is a file; pass a folder (the model's base path)")
    if (base / "saved_model.pb").exists():
        raise JewelclfError(f"'{base}' is itself a SavedModel; --output names the folder that holds "
                            f"the numbered versions, e.g. exported_models/{base.name}")
    existing = list_versions(base)
    if version is None:
        version = (max(existing) + 1) if existing else 1
    elif version < 1:
        raise JewelclfError(f"--version must be a positive integer, got {version}")
    final = base / str(version)
    if final.exists():
        raise JewelclfError(f"'{final}' already exists and versions are never overwritten; pass "
                            f"--version {max(existing + [version]) + 1} or omit --version for the next one")
    return existing, version, final


def _write_and_check(run: RunModel, policy: ReviewPolicy, staging: Staging, images: list, final: Path,
                     version: int, embed_dim: int, test_data: str | None, log: Log) -> dict[str, Any]:
    """Write the SavedModel into ``staging``, check it in a fresh process (parity, contract and
    ``test_data`` accuracy) and return the report; ``report["parity"]["passed"]`` says whether
    it may be renamed into place."""
    from jewelclf import runs as rd

    tmp, base = staging.model, final.parent
    log(f"writing SavedModel version {version} of '{run.run_dir}' (in {staging.path.name}, "
        f"renamed when checked)")
    write_savedmodel(run, tmp, policy)
    log(f"parity check in a fresh Python process on {len(images)} images...")
    child = run_in_fresh_process(tmp.resolve(), images, staging.parity)
    parity = compare_parity(run, images, child, policy)
    contract = check_signature_contract(child["signatures"], len(run.class_names), run.k, embed_dim)
    if contract:
        parity["passed"] = False
        parity["problems"] += contract
    report: dict[str, Any] = {
        "format": "savedmodel", "model_name": base.resolve().name, "version": version,
        "path": str(final.resolve()), "created": timestamp(),
        **run.describe(), **policy.describe(), "signatures": child["signatures"], "parity": parity,
        "embedding": embedding_info(run),
        "environment": rd.environment()}
    if parity["passed"] and test_data:
        report["test_accuracy"] = compare_accuracy(
            run, test_data, lambda enc: savedmodel_probabilities(tmp, enc), "savedmodel", log, policy.tta)
        acc = report["test_accuracy"]
        if acc["keras_accuracy"] != acc["savedmodel_accuracy"]:
            parity["passed"] = False
            parity["problems"].append(
                f"accuracy on '{test_data}': SavedModel {acc['savedmodel_accuracy']:.4f} != "
                f"Keras {acc['keras_accuracy']:.4f}")
    return report


def _disk_full_error(base: Path, version: int, existing: list[int]) -> fsio.DiskFullError:
    """One line for a full disk, naming the folder TF Serving polls, what is left and the fix."""
    kept = ("nothing was written" if not existing else f"version {existing[0]} is unchanged"
            if len(existing) == 1 else f"versions {', '.join(map(str, existing))} are unchanged")
    return fsio.DiskFullError(
        f"no space left on device while writing SavedModel version {version} into '{base}' "
        f"({fsio.free_space(base)} free on that disk); the half-written copy was removed and "
        f"{kept}; free disk space, then run the command again")


def export_savedmodel(run_dir: Path, output: Path | None = None, version: int | None = None,
                      test_data: str | None = None, parity_data: str | None = None,
                      log: Log = print, embed_layer: str = DEFAULT_EMBED_LAYER,
                      review_threshold: float | None = None, tta: str = TTA_NONE) -> dict[str, Any]:
    """Export ``run_dir`` as version ``version`` (default: the next) under ``output``.

    ``embed_layer`` is the embedding of the ``embed`` signature (``pool`` or ``hidden``, as
    ``jewelclf index --layer``); ``review_threshold`` overrides the run's review threshold
    (:func:`jewelclf.inference.policy.for_run`); ``tta="flip"`` bakes the horizontal-flip
    average into ``serving_default`` and ``serving_pixels`` (:mod:`jewelclf.modeling.tta`), and
    the parity check holds them to the Keras model averaged the same way. Returns the export
    report, also written as ``<output>/<version>/export_report.json``.
    """
    from jewelclf.modeling.embedding import embedding_dim

    require_tensorflow_backend()
    check_review_threshold(review_threshold)
    check_mode(tta)  # before the run is loaded: a typo costs no model load
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    run.embed_layer = embed_layer
    embed_dim = embedding_dim(run.model, embed_layer)  # a one-line error for an absent layer
    base = Path(output) if output is not None else default_output(run_dir, "savedmodel")
    existing, version, final = _version_folder(base, version)
    images = run_images(run, ("test", "val", "train"), PARITY_IMAGES, parity_data)
    policy = for_run(run, review_threshold, log, tta=tta)
    base.mkdir(parents=True, exist_ok=True)
    staging = Staging(base)  # locked and kept fresh: no cleanup on any host removes it
    cleanup_stale_temp(base, log, now=staging.now(), keep=staging.path)
    t0 = time.perf_counter()
    try:
        report = _write_and_check(run, policy, staging, images, final, version, embed_dim, test_data, log)
        parity = report["parity"]
        report["seconds"] = round(time.perf_counter() - t0, 1)
        if not parity["passed"]:
            write_json(base / FAILED_REPORT, report)
            raise JewelclfError(
                f"export parity check failed ({'; '.join(parity['problems'])}); no version was "
                f"written; see {base / FAILED_REPORT}")
        write_json(staging.model / REPORT, report)
        rename_noreplace(staging.model, final)
    except BaseException as e:
        if not fsio.is_disk_full(e):
            raise
        # TensorFlow says ResourceExhaustedError "...; No space left on device [Op:SaveV2]", in
        # several lines: one line instead, naming the folder TF Serving polls and the fix.
        raise _disk_full_error(base, version, existing) from None
    finally:
        staging.close()  # what is left: the lock, the parity scratch, a failed copy
    (base / FAILED_REPORT).unlink(missing_ok=True)
    log(f"wrote {final} (SavedModel, signatures {SERVING_DEFAULT}, {SERVING_PIXELS} and {SERVING_EMBED})")
    write_if_absent(base / MODELS_CONFIG, models_config_text(base.resolve().name), log)
    write_if_absent(base / BATCHING_PARAMETERS, batching_parameters_text(), log)
    return report
