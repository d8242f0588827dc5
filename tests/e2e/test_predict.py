"""``jewelclf predict``: local SavedModel / .keras / .tflite / run dir, and the TF Serving REST
client's wire format.

The REST request body is checked against TF Serving's documented JSON format (api_rest.md:
``POST /v1/models/NAME[/versions/N]:predict``, row format ``{"instances": [...]}``, binary values
as ``{"b64": ...}``, a single named input given as the bare value). The loopback HTTP stub only
checks what the client sends and that it reads the documented row-format answer; it is not a
stand-in for TF Serving.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from jewelclf.cli import main
from jewelclf.inference import predict as pr
from jewelclf.inference import predictors

from conftest import make_image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder: two JPEGs, a PNG, a text file, a truncated JPEG, in a nested layout."""
    root = tmp_path_factory.mktemp("predict_images")
    make_image("ring", 101, (40, 48), "JPEG", root / "a_ring.jpg")
    make_image("watch", 102, (29, 71), "JPEG", root / "b_watch.jpg")
    make_image("necklace", 103, (50, 50), "PNG", root / "sub" / "c_necklace.png")
    (root / "d_notes.txt").write_text("not an image\n")
    whole = (root / "a_ring.jpg").read_bytes()
    (root / "e_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


GOOD = ["a_ring.jpg", "b_watch.jpg", "sub/c_necklace.png"]


def _json_rows(output: str) -> list[dict]:
    return json.loads(output[output.index("["):])


def test_predict_savedmodel_table_json_and_bad_files(exported, images):
    runner = CliRunner()
    r = runner.invoke(main, ["predict", str(exported), str(images)])
    assert r.exit_code == 0, r.output
    assert "skipped" in r.stderr and "d_notes.txt: not a supported image (text)" in r.stderr
    assert "e_truncated.jpg: corrupt or truncated JPEG image" in r.stderr
    table = r.stdout.strip().splitlines()
    assert table[0].split() == ["image", "class", "score", "top-3"]
    assert [line.split()[0].endswith(name) for line, name in zip(table[1:], GOOD)] == [True] * 3
    assert len(table) == 4

    r = runner.invoke(main, ["predict", str(exported / "1"), str(images), "--json", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    rows = _json_rows(r.stdout)
    assert [Path(row["image"]).name for row in rows] == ["a_ring.jpg", "b_watch.jpg", "d_notes.txt",
                                                        "e_truncated.jpg", "c_necklace.png"]
    ok = [row for row in rows if "error" not in row]
    assert len(ok) == 3 and all(len(row["top_k"]) == 2 for row in ok)
    assert all(row["class"] in ("necklace", "ring", "watch") for row in ok)
    assert all(row["top_k"][0]["score"] >= row["top_k"][1]["score"] for row in ok)


def test_local_formats_agree(exported, images, tiny_run, tmp_path):
    """The SavedModel, the run dir's .keras, and a TFLite export give the same answers."""
    from jewelclf.export.tflite import export_tflite

    files = [images / name for name in GOOD]
    saved = pr.predict_files(pr.load_predictor(exported), files, top_k=3)
    keras_run = pr.predict_files(pr.load_predictor(tiny_run), files, top_k=3)
    keras_file = pr.predict_files(pr.load_predictor(tiny_run / "model.keras"), files, top_k=3)
    export_tflite(tiny_run, tmp_path / "t", ["none"], log=lambda _: None)
    tflite = pr.predict_files(pr.load_predictor(tmp_path / "t"), files, top_k=3)
    for other in (keras_run, keras_file, tflite):
        for a, b in zip(saved, other):
            assert a.error is None and b.error is None
            assert [c for c, _ in a.top] == [c for c, _ in b.top]
            np.testing.assert_allclose([s for _, s in a.top], [s for _, s in b.top], atol=1e-5)


def test_keras_predictor_reports_bad_files_and_predicts_the_rest(tiny_run, images):
    results = pr.predict_files(pr.load_predictor(tiny_run), pr.collect_images([str(images)]))
    errors = {Path(r.image).name: r.error for r in results if r.error}
    assert set(errors) == {"d_notes.txt", "e_truncated.jpg"}
    assert errors["e_truncated.jpg"].startswith("corrupt or truncated JPEG image")
    assert "{{" not in errors["e_truncated.jpg"]
    assert sum(r.error is None for r in results) == 3


def test_predict_errors(exported, images, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["predict", str(exported), str(images / "d_notes.txt")])
    assert r.exit_code == 2 and "none of the 1 image(s)" in r.output
    r = runner.invoke(main, ["predict", str(tmp_path / "nothing"), str(images)])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(main, ["predict", str(exported)])
    assert r.exit_code == 2 and "IMAGE_OR_DIR" in r.output
    r = runner.invoke(main, ["predict", "--server", "http://127.0.0.1:9", str(images / "a_ring.jpg")])
    assert r.exit_code == 2 and "--model NAME" in r.output
    (tmp_path / "empty_dir").mkdir()
    r = runner.invoke(main, ["predict", str(tmp_path / "empty_dir"), str(images)])
    assert r.exit_code == 2 and "holds no SavedModel" in r.output


# ---------------------------------------------------------------------------- REST wire format


def tf_serving_row_format_to_tensors(body: dict, signature_inputs: dict[str, tf.TensorSpec]) -> dict:
    """The documented JSON -> tensor mapping of TF Serving's predict API (api_rest.md), for the
    cases a jewelclf client may send; raises AssertionError where the documentation says the
    server answers 400."""
    assert isinstance(body, dict), "top-level JSON must be an object"
    assert set(body) <= {"signature_name", "instances", "inputs"}, set(body)
    assert ("instances" in body) != ("inputs" in body), "exactly one of instances / inputs"
    assert isinstance(body.get("signature_name", ""), str)
    instances = body["instances"]
    assert isinstance(instances, list) and instances, "'instances' must be a non-empty list"
    assert len(signature_inputs) == 1, "a bare-value row needs a single named input"
    (name, spec), = signature_inputs.items()
    values = []
    for item in instances:
        # A binary value is an object with the single key "b64" and a string value.
        assert isinstance(item, dict) and list(item) == ["b64"] and isinstance(item["b64"], str), item
        assert spec.dtype == tf.string, "b64 values only fill DT_STRING tensors"
        try:  # standard alphabet with padding; the server answers "Unable to base64 decode"
            values.append(base64.b64decode(item["b64"], validate=True))
        except binascii.Error as e:
            raise AssertionError(f"Unable to base64 decode: {e}") from None
    tensor = tf.constant(values, tf.string)
    assert spec.shape.is_compatible_with(tensor.shape)
    return {name: tensor}


def test_request_body_matches_documented_format_and_feeds_the_signature(exported, images):
    files = [images / name for name in GOOD]
    data = [f.read_bytes() for f in files]
    body = predictors.predict_request_body(data)
    assert json.loads(json.dumps(body)) == body
    assert body == {"signature_name": "serving_default",
                    "instances": [{"b64": base64.b64encode(d).decode()} for d in data]}
    assert predictors.predict_url("http://h:8501/", "jewellery") == "http://h:8501/v1/models/jewellery:predict"
    assert predictors.predict_url("h:8501", "jewellery", 3) == "http://h:8501/v1/models/jewellery/versions/3:predict"

    loaded = tf.saved_model.load(str(exported / "1"))
    fn = loaded.signatures[body["signature_name"]]
    tensors = tf_serving_row_format_to_tensors(body, fn.structured_input_signature[1])
    out = fn(**tensors)
    direct = fn(images=tf.constant(data))
    np.testing.assert_array_equal(out["probabilities"].numpy(), direct["probabilities"].numpy())
    with pytest.raises(AssertionError):  # the validator does reject what TF Serving rejects
        tf_serving_row_format_to_tensors({"instances": [{"b64": "***"}]}, fn.structured_input_signature[1])
    with pytest.raises(AssertionError):
        tf_serving_row_format_to_tensors({"instances": [{"image": {"b64": "aGk="}}]},
                                         fn.structured_input_signature[1])


class _Stub(BaseHTTPRequestHandler):
    """Records requests; answers in TF Serving's row format (classes/scores/... per image), or
    with 400 {"error": ...} when an instance is not an image, as a server whose model cannot
    decode it would."""

    requests: ClassVar[list] = []

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        body = json.loads(raw)
        type(self).requests.append({"path": self.path, "content_type": self.headers["Content-Type"],
                                    "body": body})
        decoded = [base64.b64decode(i["b64"]) for i in body["instances"]]
        if any(not d.startswith((b"\xff\xd8\xff", b"\x89PNG")) for d in decoded):
            return self._send(400, {"error": "Unknown image file format. One of JPEG, PNG, GIF, BMP required."})
        rows = [{"probabilities": [0.2, 0.1, 0.7], "classes": ["watch", "necklace", "ring"],
                 "scores": [0.7, 0.2, 0.1], "valid": True, "error": "", "confidence": 0.7,
                 "needs_review": False, "unknown_score": 0.125} for _ in decoded]
        if len(decoded) > 1:  # one image in the batch that the model flags as invalid
            rows[1] = {"probabilities": [0.0, 0.0, 0.0], "classes": ["", "", ""],
                       "scores": [0.0, 0.0, 0.0], "valid": False, "error": "corrupt or truncated JPEG image",
                       "confidence": 0.0, "needs_review": True, "unknown_score": 0.0}
        self._send(200, {"predictions": rows})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    _Stub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Stub.requests
    finally:
        server.shutdown()
        server.server_close()


def test_server_client_wire_format(stub, images):
    url, requests = stub
    files = [images / "a_ring.jpg", images / "b_watch.jpg", images / "sub" / "c_necklace.png"]
    r = CliRunner().invoke(main, ["predict", "--server", url, "--model", "jewellery", "--version", "3",
                                  *map(str, files), "--json"])
    assert r.exit_code == 0, r.output
    (req,) = requests
    assert req["path"] == "/v1/models/jewellery/versions/3:predict"
    assert req["content_type"] == "application/json"
    assert req["body"] == predictors.predict_request_body([f.read_bytes() for f in files])
    rows = _json_rows(r.stdout)
    assert rows[0]["class"] == "watch" and rows[0]["score"] == 0.7
    assert [t["class"] for t in rows[0]["top_k"]] == ["watch", "necklace", "ring"]
    assert (rows[0]["confidence"], rows[0]["needs_review"], rows[0]["unknown_score"]) == (0.7, False, 0.125)
    assert rows[1]["error"] == "corrupt or truncated JPEG image" and "b_watch.jpg" in r.stderr
    assert rows[2]["class"] == "watch"


def test_server_client_retries_image_by_image_after_a_400(stub, images):
    url, requests = stub
    files = [images / "a_ring.jpg", images / "d_notes.txt", images / "e_truncated.jpg",
             images / "sub" / "c_necklace.png"]
    bogus = images.parent / "bogus.bmp"
    # A 16x16 BMP info header, then junk: passes the local magic and size checks; the stub rejects it.
    bogus.write_bytes(b"BM" + bytes(12) + (40).to_bytes(4, "little") + (16).to_bytes(4, "little") * 2
                      + b"junk" * 10)
    r = CliRunner().invoke(main, ["predict", "--server", url, "--model", "jewellery",
                                  *map(str, files), str(bogus)])
    assert r.exit_code == 0, r.output
    # d_notes.txt never leaves the machine (no image); the batch of 4 fails, then one by one.
    assert [len(q["body"]["instances"]) for q in requests] == [4, 1, 1, 1, 1]
    assert "d_notes.txt: not a supported image" in r.stderr
    assert "bogus.bmp: Unknown image file format" in r.stderr
    table = r.stdout.strip().splitlines()
    assert table[0].split()[:3] == ["image", "class", "score"]
    assert len(table) == 1 + 3  # a_ring, e_truncated (the stub only checks magic), c_necklace
    assert all(" watch " in line for line in table[1:])


def test_server_unreachable(images):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(main, ["predict", "--server", f"http://127.0.0.1:{port}", "--model", "m",
                                  str(images / "a_ring.jpg")])
    assert r.exit_code == 2 and "cannot reach TF Serving" in r.output


def test_grpc_example_request_feeds_the_signature(exported, images):
    """The request that docs/serving.md's gRPC example builds is what serving_default takes."""
    predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2")
    paths = [images / "a_ring.jpg", images / "sub" / "c_necklace.png"]
    data = [p.read_bytes() for p in paths]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "jewellery"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(data, dtype=tf.string, shape=[len(data)]))
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # over the wire
    fn = tf.saved_model.load(str(exported / "1")).signatures[request.model_spec.signature_name]
    assert list(request.inputs) == list(fn.structured_input_signature[1])
    out = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
    direct = fn(images=tf.constant(data))
    np.testing.assert_array_equal(out["classes"].numpy(), direct["classes"].numpy())
    response = {k: tf.make_tensor_proto(v) for k, v in out.items()}  # as the server answers
    assert tf.make_ndarray(response["classes"])[0][0].decode() in ("necklace", "ring", "watch")
    assert tf.make_ndarray(response["valid"]).all()
