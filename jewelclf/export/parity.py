"""The export checks: parity of the SavedModel with the Keras model, and accuracy on test data.

The SavedModel's signatures are run in a fresh Python process that does not import jewelclf
(:mod:`jewelclf.export.parity_child`, run by its path) and compared with the Keras model on the
same images; an export's accuracy on a labelled folder is compared with the Keras model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jewelclf.errors import JewelclfError
from jewelclf.export import parity_child
from jewelclf.export.layout import (
    EMBED_OUTPUT,
    OUTPUT_KEYS,
    PARITY_TOLERANCE,
    SERVING_DEFAULT,
    SERVING_EMBED,
    SERVING_PIXELS,
    Log,
)
from jewelclf.export.samples import LabelledImage, labelled_test_images
from jewelclf.export.staging import PARENT_ENV
from jewelclf.inference.policy import ReviewPolicy
from jewelclf.inference.runtime import (
    keras_embeddings,
    keras_pixels,
    keras_probabilities,
    keras_probabilities_and_features,
)
from jewelclf.runs import RunModel


def keras_pixels_from_decoded(encoded: list[bytes], size: int, resize: str) -> np.ndarray:
    """uint8 ``[n, size, size, 3]``: what ``serving_pixels`` feeds the model when a client sends
    the images fully decoded. It equals :func:`keras_pixels` except for a JPEG with a short side
    of at least ``2 * size``, which training (and ``serving_default``) decodes at a reduced DCT
    scale: pixels that are already decoded can only be resized."""
    import tensorflow as tf

    from jewelclf.data.images import decode_rgb, resize_rgb

    if not encoded:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([resize_rgb(decode_rgb(tf.constant(b)), size, resize).numpy() for b in encoded])


def run_in_fresh_process(saved_model: Path, images: list[LabelledImage], work: Path,
                         timeout: float = 600) -> dict[str, Any]:
    """Run the signatures of ``saved_model`` on ``images`` in a new Python process.

    The child imports only TensorFlow and NumPy; the decoded full-size pixels for
    ``serving_pixels`` are prepared here with jewelclf's decoder and handed over in an ``.npz``.
    """
    import tensorflow as tf

    from jewelclf.data.images import decode_rgb

    work = Path(work).resolve()  # the child runs in it: a relative path would not be found
    arrays = {"n": np.array(len(images))}
    for i, im in enumerate(images):
        arrays[f"encoded_{i}"] = np.frombuffer(im.data, np.uint8)
        arrays[f"pixels_{i}"] = decode_rgb(tf.constant(im.data)).numpy()
    npz = work / "parity_inputs.npz"
    np.savez(npz, **arrays)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env[PARENT_ENV] = str(os.getpid())  # the child kills itself when this process dies
    request = json.dumps({"saved_model": str(saved_model), "arrays": str(npz)})
    try:
        child = str(Path(parity_child.__file__).resolve())  # by path: the child must not import jewelclf
        proc = subprocess.run([sys.executable, child], input=request, text=True, check=False, capture_output=True,
                              timeout=timeout, env=env, cwd=str(work))
    finally:
        npz.unlink(missing_ok=True)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("PARITY-JSON ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise JewelclfError(f"the exported SavedModel failed to load or run in a fresh Python "
                            f"process (exit {proc.returncode}: {tail[0][:200]}); nothing was "
                            f"exported")
    return json.loads(line[len("PARITY-JSON "):])


def compare_parity(run: RunModel, images: list[LabelledImage], child: dict[str, Any],
                   policy: ReviewPolicy, tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Compare the fresh process's signature outputs with the Keras model on the same images.

    ``serving_default`` gets the image bytes and is held to the Keras model on training's own
    pixels; ``serving_pixels`` gets the fully decoded images and is held to the Keras model on
    those pixels resized as training resizes (:func:`keras_pixels_from_decoded`). Both are held
    to ``policy``'s answer (:class:`jewelclf.inference.policy.ReviewPolicy`): calibrated
    probabilities, confidence, unknown score and needs-review, with its test-time augmentation
    (``policy.tta``: the Keras answer comes from the same :mod:`jewelclf.modeling.tta` model).
    """
    encoded = [im.data for im in images]
    keras_answer = policy.answer(*keras_probabilities_and_features(
        run.model, keras_pixels(encoded, run.image_size, run.resize), tta=policy.tta))
    pixels_answer = policy.answer(*keras_probabilities_and_features(
        run.model, keras_pixels_from_decoded(encoded, run.image_size, run.resize), tta=policy.tta))
    candidates = {
        SERVING_DEFAULT: (child["serving_default"], keras_answer),
        SERVING_PIXELS: ({key: [row[key][0] for row in child["serving_pixels"]] for key in OUTPUT_KEYS
                          if all(key in row for row in child["serving_pixels"])}, pixels_answer),
    }
    results: dict[str, Any] = {}
    problems: list[str] = []
    for name, (out, ref) in candidates.items():
        results[name], found = _compare_signature(name, out, ref, run.class_names, policy, tolerance)
        problems += found
    embed = compare_embed_parity(run, images, child.get(SERVING_EMBED), tolerance)
    results[SERVING_EMBED] = embed
    problems += embed.pop("problems")
    if child.get("jewelclf_imported"):
        problems.append("the fresh process imported jewelclf, so it did not test a standalone load")
    keras_top1 = keras_answer["probabilities"].argmax(axis=1)
    return {"passed": not problems, "problems": problems, "tolerance": tolerance,
            "fresh_process": True, "jewelclf_imported_in_fresh_process": bool(child.get("jewelclf_imported")),
            "images": [{"key": im.key, "label": im.label,
                        "keras_top1": run.class_names[int(t)]} for im, t in zip(images, keras_top1)],
            "signatures": results}


def _max_diff(got, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max()) if len(want) else 0.0


def _near(values: np.ndarray, threshold: float | None, tolerance: float) -> np.ndarray:
    if threshold is None:
        return np.zeros(len(values), bool)
    return np.abs(np.asarray(values, np.float64) - threshold) <= tolerance


def _compare_signature(name: str, out: dict[str, Any], ref: dict[str, np.ndarray], class_names: list[str],
                       policy: ReviewPolicy, tolerance: float) -> tuple[dict[str, Any], list[str]]:
    """One classifying signature's outputs against the Keras answer ``ref``: the entry and the problems."""
    missing = [key for key in OUTPUT_KEYS if key not in out]
    if missing:
        return {"missing_outputs": missing}, [f"{name}: outputs {', '.join(missing)} are missing"]
    want = ref["probabilities"]
    n = len(want)
    ref_top1 = want.argmax(axis=1)
    probs = np.asarray(out["probabilities"], np.float32).reshape(want.shape)
    diff = _max_diff(probs, want)
    agree = int((probs.argmax(axis=1) == ref_top1).sum())
    names_ok = all(row[0] == class_names[t] for row, t in zip(out["classes"], ref_top1))
    scores_ok = bool(np.allclose(np.asarray(out["scores"], np.float32)[:, 0], want.max(axis=1),
                                 atol=tolerance, rtol=0))
    valid_ok = all(bool(v) for v in out["valid"])
    confidence_diff = _max_diff(out["confidence"], ref["confidence"])
    unknown_diff = _max_diff(out["unknown_score"], ref["unknown_score"])
    # An image within float error of a threshold may fall either side of it in float32.
    borderline = _near(ref["confidence"], policy.review_threshold, tolerance) | _near(
        ref["unknown_score"], policy.unknown_threshold, tolerance)
    review = np.asarray(out["needs_review"], bool)
    review_ok = bool(np.array_equal(review[~borderline], ref["needs_review"][~borderline]))
    entry = {"max_abs_diff": diff, "top1_agree": agree, "images": n, "class_names_match": names_ok,
             "scores_match": scores_ok, "all_valid": valid_ok, "confidence_max_abs_diff": confidence_diff,
             "unknown_score_max_abs_diff": unknown_diff, "needs_review_match": review_ok,
             "needs_review": int(review.sum())}
    problems = []
    if agree != n:
        problems.append(f"{name}: top-1 differs from the Keras model on {n - agree} of {n} images")
    if not diff <= tolerance:
        problems.append(f"{name}: probabilities differ by up to {diff:.2e} (> {tolerance:g})")
    if not (names_ok and scores_ok and valid_ok):
        problems.append(f"{name}: classes/scores/valid outputs disagree with the probabilities")
    if not (confidence_diff <= tolerance and unknown_diff <= tolerance and review_ok):
        problems.append(f"{name}: confidence/unknown_score/needs_review differ from the Keras "
                        f"model's (up to {max(confidence_diff, unknown_diff):.2e})")
    return entry, problems


def compare_embed_parity(run: RunModel, images: list[LabelledImage], out: dict[str, Any] | None,
                         tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """The ``embed`` signature's vectors against the Keras embedding ``jewelclf index`` uses:
    largest absolute difference, smallest cosine, unit norms, all rows valid. The entry's
    ``problems`` list is for the caller to take out."""
    embedder = run.embedder()
    dim = int(embedder.output.shape[-1])
    entry: dict[str, Any] = {"layer": run.embed_layer, "dim": dim, "images": len(images)}
    if out is None:
        entry["problems"] = [f"{SERVING_EMBED}: the fresh process got no output from it (signature missing?)"]
        return entry
    ref = keras_embeddings(embedder, keras_pixels([im.data for im in images], run.image_size, run.resize))
    got = np.asarray(out[EMBED_OUTPUT], np.float32)
    problems: list[str] = []
    if got.shape != ref.shape:
        entry["problems"] = [f"{SERVING_EMBED}: embedding has shape {list(got.shape)}, expected "
                             f"{list(ref.shape)}"]
        return entry
    diff = float(np.abs(got - ref).max()) if got.size else 0.0
    cosine = (got * ref).sum(axis=1) / np.maximum(
        np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    min_cos = float(cosine.min()) if len(cosine) else 1.0
    norm_err = float(np.abs(np.linalg.norm(got, axis=1) - 1.0).max()) if len(got) else 0.0
    valid_ok = all(bool(v) for v in out["valid"])
    entry.update({"max_abs_diff": diff, "min_cosine": min_cos, "max_norm_error": norm_err,
                  "all_valid": valid_ok})
    if not diff <= tolerance:
        problems.append(f"{SERVING_EMBED}: embeddings differ from the Keras embedding by up to "
                        f"{diff:.2e} (> {tolerance:g})")
    if not 1.0 - min_cos <= tolerance:
        problems.append(f"{SERVING_EMBED}: cosine with the Keras embedding down to {min_cos:.6f} "
                        f"(< 1 - {tolerance:g})")
    if not (norm_err <= tolerance and valid_ok):
        problems.append(f"{SERVING_EMBED}: vectors are not all valid unit vectors")
    entry["problems"] = problems
    return entry


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    """Top-1 accuracy of ``probs`` against the label indices ``y`` (0 when empty)."""
    return float((probs.argmax(axis=1) == y).mean()) if len(y) else 0.0


def keras_test_probabilities(run: RunModel, encoded: list[bytes], batch_size: int = 32,
                             tta: str = "none") -> np.ndarray:
    """The Keras model's calibrated probabilities (the run's temperature) on encoded images,
    decoded as training does, in batches: what an export answers (with its ``tta``)."""
    from jewelclf.evaluation.calibration import scale
    from jewelclf.modeling.tta import with_tta

    model = with_tta(run.model, tta)
    chunks = [keras_probabilities(model, keras_pixels(encoded[i:i + batch_size], run.image_size, run.resize))
              for i in range(0, len(encoded), batch_size)]
    raw = np.concatenate(chunks) if chunks else np.zeros((0, len(run.class_names)), np.float32)
    return np.asarray(scale(raw, run.temperature), np.float32)


def savedmodel_probabilities(saved_model: Path, encoded: list[bytes], batch_size: int = 32) -> np.ndarray:
    """The SavedModel's ``serving_default`` probabilities on encoded images, in batches."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(saved_model)).signatures[SERVING_DEFAULT]
    out = [fn(images=tf.constant(encoded[i:i + batch_size]))["probabilities"].numpy()
           for i in range(0, len(encoded), batch_size)]
    return np.concatenate(out)


def compare_accuracy(run: RunModel, spec: str, export_probs: Callable[[list[bytes]], np.ndarray],
                     name: str, log: Log, tta: str = "none") -> dict[str, Any]:
    """Accuracy of the Keras model (with the export's ``tta``) and of the export
    (``export_probs``) on the labelled ``spec``."""
    _, encoded, y, rejected = labelled_test_images(spec, run.class_names, run.config.data)
    log(f"accuracy check on {len(encoded)} images of '{spec}'...")
    kp = keras_test_probabilities(run, encoded, tta=tta)
    ep = export_probs(encoded)
    return {"data": spec, "num_examples": len(y), "rejected_files": rejected,
            "keras_accuracy": accuracy(y, kp), f"{name}_accuracy": accuracy(y, ep),
            "top1_agreement": float((kp.argmax(1) == ep.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(kp - ep).max())}
