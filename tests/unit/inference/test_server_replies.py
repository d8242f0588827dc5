"""``predict --server`` against a server that answers anything (issue 20, item 6).

A loopback TCP server writes each scripted reply byte for byte: malformed JSON types, missing
keys, wrong lengths, ``NaN``/``Infinity`` scores (JSON that TF Serving's REST page allows, but no
probability), no JSON at all, a body shorter than its ``Content-Length``, a broken status line, a
server that drip-feeds bytes. Each must end in one line on stderr naming the server and what was
wrong, exit status 2 (a ``JewelclfError``; an uncaught exception exits 1), and within
``--timeout`` plus a little slack: the timeout bounds the whole request. It is not TF Serving:
the documented shapes (api_rest "Response format") are written out by hand below.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jewelclf.cli import main
from jewelclf.inference import serving_client

from conftest import make_image

TIMEOUT = 2.0
SLACK = 1.5  # thread start-up and a busy 2-core machine, not a benchmark


def http_reply(body: bytes | str, status: str = "200 OK", headers: str | None = None) -> bytes:
    body = body.encode() if isinstance(body, str) else body
    head = headers if headers is not None else f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return f"HTTP/1.1 {status}\r\n{head}Connection: close\r\n\r\n".encode() + body


def row(classes=("ring", "watch"), scores=(0.9, 0.1), **extra) -> dict:
    return {"classes": classes if isinstance(classes, str) else list(classes), "scores": list(scores),
            "probabilities": [0.1, 0.9],
            "valid": True, "error": "", **extra}


def predictions(*rows) -> bytes:
    return http_reply(json.dumps({"predictions": list(rows)}))


class _Script:
    """What the server does with the next request: a callable ``(wfile) -> None``."""

    action = None


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        length = 0
        while True:  # the request's head, then its body, so the client's send completes
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        self.rfile.read(length)
        try:
            _Script.action(self.wfile)
        except OSError:  # the client gave up (the timeout cases): nothing to tell
            pass


@pytest.fixture(scope="module")
def server():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("replies") / "a_ring.jpg"
    make_image("ring", 1, (40, 48), "JPEG", path)
    return path


def run(server: str, image: Path, action, *extra: str):
    _Script.action = action
    start = time.monotonic()
    r = CliRunner().invoke(main, ["predict", "--server", server, "--model", "m", str(image),
                                  "--timeout", str(TIMEOUT), *extra])
    return r, time.monotonic() - start


def send(data: bytes):
    return lambda w: w.write(data)


def drip(data: bytes, every: float = 0.25, seconds: float = 30):
    """Send ``data`` a byte at a time, ``every`` seconds, for at most ``seconds``."""
    def action(w):
        end = time.monotonic() + seconds
        for i in range(len(data)):
            if time.monotonic() > end:
                return
            w.write(data[i:i + 1])
            w.flush()
            time.sleep(every)
    return action


def _never(w):
    time.sleep(TIMEOUT + 3)


BAD_REPLIES = {
    # wrong JSON types
    "top-level list": (http_reply("[1, 2]"), "a list in JSON, not an object"),
    "predictions an object": (http_reply('{"predictions": {"classes": ["ring"]}}'), "'predictions' as an object"),
    "row a list": (http_reply('{"predictions": [[0.1, 0.9]]}'), "prediction 1 as a list"),
    "classes a string": (predictions(row(classes="ring")), "'classes' of image 1 as a string"),
    "classes numbers": (predictions(row(classes=(1, 2))), "not a list of class names"),
    "scores strings": (predictions(row(scores=("0.9", "0.1"))), "a score of image 1 as a string"),
    "score a boolean": (predictions(row(scores=(True, 0.1))), "a score of image 1 as a boolean"),
    "valid a string": (predictions(row(valid="yes")), "'valid' of image 1 as a string"),
    "error a number": (predictions(row(error=3)), "'error' of image 1 as a number"),
    "needs_review a string": (predictions(row(needs_review="yes")), "'needs_review' of image 1 as a string"),
    "confidence a boolean": (predictions(row(confidence=True)), "'confidence' of image 1 as a boolean"),
    "unknown_score NaN": (http_reply('{"predictions": [{"classes": ["ring"], "scores": [0.9], '
                                     '"unknown_score": NaN}]}'), "'unknown_score' of image 1 as a number"),
    "outputs a list": (http_reply('{"outputs": [0.1, 0.9]}'), "'outputs' as a list"),
    # missing keys
    "no predictions": (http_reply('{"result": []}'), "without 'predictions' or 'outputs' (keys: result)"),
    "no scores": (http_reply('{"predictions": [{"classes": ["ring"]}]}'), "prediction 1 without 'scores'"),
    "outputs no classes": (http_reply('{"outputs": {"scores": [[0.9]]}}'), "'outputs' without 'classes'"),
    "an error object with 200": (http_reply('{"error": "model is warming up"}'),
                                 "an error with status 200: model is warming up"),
    # wrong lengths
    "two rows for one image": (predictions(row(), row()), "2 'predictions' for the 1 image(s) sent"),
    "no rows": (predictions(), "0 'predictions' for the 1 image(s) sent"),
    "scores shorter than classes": (predictions(row(scores=(0.9,))), "not a list of 2 numbers"),
    "empty classes": (predictions(row(classes=(), scores=())), "'classes' of image 1 as a list []"),
    "outputs column too short": (http_reply('{"outputs": {"classes": [], "scores": []}}'),
                                 "'outputs.classes' as 0 rows for the 1 image(s) sent"),
    # numbers that are no probability
    "NaN": (http_reply('{"predictions": [{"classes": ["ring", "watch"], "scores": [NaN, 0.1]}]}'),
            "a score of image 1 that is nan"),
    "Infinity": (http_reply('{"predictions": [{"classes": ["ring", "watch"], "scores": [Infinity, 0.1]}]}'),
                 "a score of image 1 that is inf"),
    "-Infinity": (http_reply('{"outputs": {"classes": [["ring"]], "scores": [[-Infinity]]}}'),
                  "a score of image 1 that is -inf"),
    "score 7.5": (predictions(row(scores=(7.5, 0.1))), "not a probability in [0, 1]"),
    # not JSON, or not HTTP
    "HTML": (http_reply("<html><body>Bad gateway</body></html>"), "text that is not JSON"),
    "empty body": (http_reply(""), "an empty body"),
    "not UTF-8": (http_reply(b"\xff\xfe\x00{"), "not UTF-8"),
    "nested 100000 deep": (http_reply("[" * 100_000 + "]" * 100_000), "text that is not JSON"),
    "body shorter than Content-Length": (
        http_reply(b'{"predictions": [', headers="Content-Length: 5000\r\n"),
        "cut its reply off after 17 bytes of the 5000 announced"),
    "bad status line": (b"HELLO THERE\r\n\r\n", "no valid HTTP status line"),
    "closed without a reply": (b"", "closed the connection without an answer"),
    "header line over 64 KiB": (b"HTTP/1.1 200 OK\r\nX-Junk: " + b"a" * 70_000 + b"\r\n\r\n",
                                "malformed HTTP reply (LineTooLong"),
    "HTTP 500 with HTML": (http_reply("<h1>oops</h1>", "500 Internal Server Error"),
                           "answered HTTP 500 Internal Server Error; check --model"),
    "HTTP 404 TF Serving error": (http_reply('{"error": "Servable not found for request: Latest(m)"}',
                                             "404 Not Found"),
                                  "HTTP 404 Not Found: Servable not found for request: Latest(m)"),
}


def assert_one_line_error(r, server: str, needle: str) -> None:
    assert "Traceback" not in r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and f"{server}/v1/models/m:predict" in lines[0], lines[0]
    assert needle in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_a_malformed_reply_is_one_line_naming_the_server(server, image, case):
    reply, needle = BAD_REPLIES[case]
    r, elapsed = run(server, image, send(reply))
    assert_one_line_error(r, server, needle)
    assert elapsed < TIMEOUT + SLACK


@pytest.mark.parametrize("case", ["drip-fed body", "drip-fed status line", "silent"])
def test_the_timeout_bounds_the_whole_request(server, image, case):
    """Each byte comes well within the timeout, so a per-read socket timeout never fires; the
    deadline over the whole request does."""
    body = json.dumps({"predictions": [row()]}).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()

    def drip_body(w):
        w.write(head)
        w.flush()
        drip(body)(w)

    action = {"drip-fed body": drip_body, "drip-fed status line": drip(http_reply(body)),
              "silent": _never}[case]
    r, elapsed = run(server, image, action)
    assert_one_line_error(r, server, f"did not answer within --timeout {TIMEOUT:g} s")
    assert elapsed < TIMEOUT + SLACK, elapsed


def test_a_reply_over_the_size_cap_is_refused_unread(server, image, monkeypatch):
    monkeypatch.setattr(serving_client, "MAX_REPLY_BYTES", 1000)
    r, _ = run(server, image, send(predictions(*[row()] * 50)))
    assert_one_line_error(r, server, "sent a reply over 0 MiB")


def test_both_documented_shapes_are_read(server, image):
    """Row format ("predictions") and columnar ("outputs"), as the api_rest page writes them."""
    r, _ = run(server, image, send(predictions(row(classes=("watch", "ring"), scores=(0.75, 0.25)))), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["class"] == "watch"
    columns = {"classes": [["ring", "watch"]], "scores": [[0.625, 0.375]], "valid": [True], "error": [""],
               "confidence": [0.625], "needs_review": [True], "unknown_score": [0.25]}
    r, _ = run(server, image, send(http_reply(json.dumps({"outputs": columns}))), "--json")
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)[0]
    assert answer["top_k"] == [{"class": "ring", "score": 0.625}, {"class": "watch", "score": 0.375}]
    assert (answer["confidence"], answer["needs_review"], answer["unknown_score"]) == (0.625, True, 0.25)


def test_server_text_cannot_forge_lines(server, image):
    """A 400's message and class names come from the server: no newline or escape reaches the
    terminal from them."""
    r, _ = run(server, image, send(http_reply('{"error": "bad image\\n\\u001b[2Jok a_ring.jpg ring 1.0"}',
                                              "400 Bad Request")))
    assert r.exit_code == 2
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped")]
    assert skipped == [f"skipped {image}: bad image"], r.stderr
    r, _ = run(server, image, send(predictions(row(classes=("ring\nforged.jpg  watch  1.0000", "watch")))))
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 2 and "\x1b" not in r.stdout


def test_timeout_must_be_positive(server, image):
    r = CliRunner().invoke(main, ["predict", "--server", server, "--model", "m", str(image), "--timeout", "0"])
    assert r.exit_code == 2 and "--timeout must be a positive number" in r.stderr
