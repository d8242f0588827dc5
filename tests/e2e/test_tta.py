"""Test-time augmentation (issue 19): ``evaluate --tta`` scores the flip-averaged probabilities,
``export --tta`` bakes the same average into the SavedModel and TFLite answers (held to the
Keras TTA model in a fresh process), ``embed`` and the unknown score stay as they were, and
the flag is refused, in one line, where it cannot apply."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from jewelclf import runs
from jewelclf.cli import main
from jewelclf.evaluation.calibration import scale
from jewelclf.export import layout
from jewelclf.export.parity import run_in_fresh_process
from jewelclf.export.samples import LabelledImage
from jewelclf.inference.policy import for_run
from jewelclf.inference.runtime import keras_pixels, keras_probabilities_and_features

from conftest import TEXTURES, make_texture
from export_helpers import encode


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.output.startswith("error: ") and text in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.fixture(scope="module")
def run(tiny_run):
    return runs.load_run(tiny_run)


@pytest.fixture(scope="module")
def data(tiny_run) -> Path:
    return Path(json.loads((tiny_run / "run_info.json").read_text())["data"])


@pytest.fixture(scope="module")
def lopsided() -> list[bytes]:
    """Photos nothing like their mirror image: one class colour on the left, another on the right."""
    rng = np.random.default_rng(3)
    out = []
    for left, right in (((200, 40, 40), (40, 40, 200)), ((40, 200, 40), (200, 40, 40)),
                        ((40, 40, 200), (40, 200, 40))):
        img = np.empty((40, 48, 3), np.int16)
        img[:, :30], img[:, 30:] = left, right
        out.append(encode(np.clip(img + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8), "PNG"))
    return out


@pytest.fixture(scope="module")
def tta_export(tiny_run, data, tmp_path_factory):
    """One SavedModel export of ``tiny_run`` with ``--tta`` (and ``--test-data``), shared by this module."""
    base = tmp_path_factory.mktemp("tta_export") / "tiny"
    result = cli("export", tiny_run, "--output", base, "--tta", "--test-data", data)
    assert result.exit_code == 0, result.output
    return base / "1", result.output


def keras_answer(run, encoded: list[bytes], tta: str) -> dict[str, np.ndarray]:
    pixels = keras_pixels(encoded, run.image_size, run.resize)
    return for_run(run, tta=tta).answer(*keras_probabilities_and_features(run.model, pixels, tta=tta))


def test_tta_export_passes_parity_and_records_tta(tta_export):
    version, output = tta_export
    report = json.loads((version / layout.REPORT).read_text())
    info = json.loads((version / "assets.extra" / layout.INFO).read_text())
    assert report["tta"] == info["tta"] == "flip"
    parity = report["parity"]
    assert parity["passed"] and parity["fresh_process"]
    for name in (layout.SERVING_DEFAULT, layout.SERVING_PIXELS, layout.SERVING_EMBED):
        assert parity["signatures"][name]["max_abs_diff"] <= parity["tolerance"], name
    assert report["test_accuracy"]["savedmodel_accuracy"] == report["test_accuracy"]["keras_accuracy"]
    assert "test-time augmentation: flip (probabilities averaged over 2 passes" in output


def test_tta_signatures_answer_the_keras_tta_model_not_the_plain_one(tta_export, run, lopsided, tmp_path):
    version, _ = tta_export
    images = [LabelledImage(f"lopsided{i}.png", "", b) for i, b in enumerate(lopsided)]
    child = run_in_fresh_process(version, images, tmp_path)  # the export's own parity machinery
    assert child["jewelclf_imported"] is False
    tta, plain = keras_answer(run, lopsided, "flip"), keras_answer(run, lopsided, "none")
    served = np.array(child["serving_default"]["probabilities"])
    by_pixels = np.array([row["probabilities"][0] for row in child["serving_pixels"]])
    tolerance = layout.PARITY_TOLERANCE
    for got in (served, by_pixels):  # PNGs: decoded pixels are the bytes' pixels
        assert np.abs(got - tta["probabilities"]).max() <= tolerance
        assert np.abs(got - plain["probabilities"]).max() > 20 * tolerance  # TTA was not left out
    np.testing.assert_allclose(child["serving_default"]["confidence"], tta["confidence"], atol=tolerance)
    # The unknown score is the unflipped features', as without TTA, and embed is unchanged.
    np.testing.assert_allclose(child["serving_default"]["unknown_score"], plain["unknown_score"], atol=tolerance)
    from jewelclf.inference.runtime import keras_embeddings

    want = keras_embeddings(run.embedder(), keras_pixels(lopsided, run.image_size, run.resize))
    np.testing.assert_allclose(child["embed"]["embedding"], want, atol=tolerance)


def test_predict_with_tta(tta_export, tiny_run, run, lopsided, tmp_path):
    version, _ = tta_export
    photo = tmp_path / "lopsided.png"
    photo.write_bytes(lopsided[0])
    tta, plain = keras_answer(run, lopsided[:1], "flip"), keras_answer(run, lopsided[:1], "none")
    scores = {}
    for name, args in {"export": [version, photo], "run --tta": [tiny_run, photo, "--tta"],
                       "export --tta": [version, photo, "--tta"], "run": [tiny_run, photo]}.items():
        r = cli("predict", *args, "--json")
        assert r.exit_code == 0, (name, r.output)
        scores[name] = json.loads(r.output)[0]["score"]
    for name in ("export", "run --tta", "export --tta"):
        assert scores[name] == pytest.approx(tta["confidence"][0], abs=1e-4), name
    assert scores["run"] == pytest.approx(plain["confidence"][0], abs=1e-4)
    assert abs(scores["run"] - scores["run --tta"]) > 1e-3


def test_evaluate_tta_scores_the_flip_averaged_probabilities(tiny_run, run, data, tmp_path):
    from jewelclf.modeling.tta import flip_tta

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    rng = np.random.default_rng(9)
    for i, label in enumerate(TEXTURES):
        (unknown / f"{i}.png").write_bytes(encode(make_texture(label, rng), "PNG"))
    metrics, outputs = {}, {}
    for tta in ("none", "flip"):
        out = tmp_path / tta
        flag = ["--tta"] if tta == "flip" else []
        r = cli("evaluate", tiny_run, data, "--output", out, "--unknown", unknown, *flag)
        assert r.exit_code == 0, r.output
        metrics[tta], outputs[tta] = json.loads((out / "metrics.json").read_text()), r.output
    assert metrics["none"]["tta"] == "none" and metrics["flip"]["tta"] == "flip"
    assert "test-time augmentation: flip" in outputs["flip"] and "test-time" not in outputs["none"]

    with open(tmp_path / "flip" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    encoded = [(data / r["path"]).read_bytes() for r in rows]
    pixels = keras_pixels(encoded, run.image_size, run.resize).astype(np.float32)
    by_hand = (np.asarray(run.model(pixels)) + np.asarray(run.model(pixels[:, :, ::-1]))) / 2
    np.testing.assert_allclose(np.asarray(flip_tta(run.model)(pixels)), by_hand, atol=1e-6)
    probs = scale(by_hand, run.temperature)  # calibrated after the average, as without TTA
    y = np.array([run.class_names.index(r["label"]) for r in rows])
    assert metrics["flip"]["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], probs.max(axis=1), atol=6e-5)
    plain = scale(np.asarray(run.model(pixels)), run.temperature)
    # ECE is measured on the averaged probabilities: it moves with them.
    assert abs(metrics["flip"]["ece"] - metrics["none"]["ece"]) > 1e-6
    assert np.abs(plain - probs).max() > 1e-3
    # The unknown score is on the unflipped features, which the run's threshold was chosen on.
    assert (tmp_path / "flip" / "unknown_scores.csv").read_text() == (
        tmp_path / "none" / "unknown_scores.csv").read_text()


def test_tflite_bakes_tta_in(tiny_run, run, tmp_path):
    from jewelclf.inference.runtime import tflite_interpreter, tflite_probabilities
    from jewelclf.modeling.tta import flip_tta

    r = cli("export", tiny_run, "--format", "tflite", "--output", tmp_path / "t", "--tta")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "t" / layout.INFO).read_text())["tta"] == "flip"
    assert "test-time augmentation: flip" in r.output
    pixels = np.random.default_rng(4).uniform(0, 255, (3, run.image_size, run.image_size, 3))
    pixels[:, :, : run.image_size // 3] = 0  # a black left third: nothing like its mirror image
    pixels = pixels.astype(np.uint8)
    got = tflite_probabilities(tflite_interpreter(tmp_path / "t" / "model_none.tflite"), pixels)
    want = scale(np.asarray(flip_tta(run.model)(pixels.astype(np.float32))), run.temperature)
    plain = scale(np.asarray(run.model(pixels.astype(np.float32))), run.temperature)
    assert np.abs(got - want).max() <= layout.PARITY_TOLERANCE
    assert np.abs(got - plain).max() > 20 * layout.PARITY_TOLERANCE


def test_tta_refusals_are_one_line(tiny_run, tmp_path):
    one_line_error(cli("export", tiny_run, "--format", "keras", "--tta", "--output", tmp_path / "k"),
                   "--tta applies to --format savedmodel and tflite only")
    assert not (tmp_path / "k").exists()
    one_line_error(cli("predict", "--server", "http://localhost:1", "--model", "m", "x.jpg", "--tta"),
                   "--tta does not apply with --server")


def test_predict_tta_on_an_export_without_it_is_refused():
    from jewelclf.errors import JewelclfError
    from jewelclf.inference.predict import with_tta
    from jewelclf.inference.predictors import SavedModelPredictor

    plain = SavedModelPredictor.__new__(SavedModelPredictor)  # as loaded from an export without tta
    plain.description, plain.tta = "SavedModel exported_models/tiny/1", "none"
    with pytest.raises(JewelclfError, match=r"has no test-time augmentation baked in: export it with "
                                            r"jewelclf export --tta") as e:
        with_tta(plain, "flip")
    assert "\n" not in str(e.value)
    assert with_tta(plain, "none") is plain
