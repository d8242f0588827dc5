"""``jewelclf predict --server``: TensorFlow Serving's REST predict API, with a server that may
answer anything.

The request is the documented row format (:func:`jewelclf.inference.predictors.predict_request_body`). The
answer must be one of the two documented shapes of a multi-output model's reply
(https://www.tensorflow.org/tfx/serving/api_rest, "Response format")::

    {"predictions": [{"classes": [...], "scores": [...], "valid": true, "error": ""}, ...]}
    {"outputs": {"classes": [[...], ...], "scores": [[...], ...], "valid": [...], "error": [...]}}

with one row per image sent. Anything else (no JSON, other types, other lengths, a score that
is ``NaN`` or ``Infinity``, which that page allows in JSON, a cut-off body, a broken status line)
is a one-line :class:`JewelclfError` naming the server and what was wrong. ``timeout`` bounds
the whole request (connect, send, status, headers and body), not each socket operation: a
server that drip-feeds bytes is cut off at the deadline.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from jewelclf.display import one_line
from jewelclf.errors import JewelclfError
from jewelclf.inference.predictors import (
    REVIEW_KEYS,
    BatchError,
    Predictor,
    predict_request_body,
    predict_url,
    rows_from_outputs,
)

MAX_REPLY_BYTES = 64 * 2**20
"""A reply larger than this is refused unread: a batch of answers is kilobytes."""

_SCORE_SLACK = 1e-3  # float32 softmax outputs may stray this far past [0, 1] when printed


class _Deadline:
    """Shuts down every socket of one request when ``seconds`` have passed, which wakes a read
    that is blocked in the kernel: a per-operation socket timeout alone lets a server that
    sends one byte a second hold the client for ever."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def left(self) -> float:
        return max(0.001, self.end - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        if time.monotonic() >= self.end:
            self.expired = True


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib (so proxies and HTTPS work as before) whose connections report their sockets to
    ``deadline`` as soon as they connect."""

    def watched(base):
        class Connection(base):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)
        return Connection

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req,
                                context=self._context)

    return urllib.request.build_opener(HTTP, HTTPS)


def _read_capped(response) -> bytes:
    data = response.read(MAX_REPLY_BYTES + 1)
    if len(data) > MAX_REPLY_BYTES:
        raise _Bad(f"a reply over {MAX_REPLY_BYTES // 2**20} MiB")
    left = getattr(response, "length", None)  # read(n) returns a body cut short without a word
    if left:
        raise http.client.IncompleteRead(data, left)
    return data


class _Bad(Exception):
    """What was wrong with a reply, in words, for the one-line error, and what to do."""

    def __init__(self, what: str, hint: str = "is the model a jewelclf export (jewelclf export RUN_DIR)?"):
        super().__init__(what)
        self.hint = hint


def post_predict(url: str, body: dict[str, Any], timeout: float) -> Any:
    """POST ``body`` as JSON to ``url`` and return the parsed JSON answer of a 200 reply.

    A 400 (TF Serving's answer to an item it cannot take) is a :class:`BatchError` with the
    server's message; anything else that is not a JSON 200 reply in ``timeout`` seconds in all
    is a :class:`JewelclfError`.
    """
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    where = f"TF Serving at {url}"
    deadline = _Deadline(timeout)
    try:
        with deadline:
            try:
                with _opener(deadline).open(request, timeout=deadline.left()) as response:
                    raw = _read_capped(response)
            except urllib.error.HTTPError as e:
                _raise_http_error(where, e, _error_message(e))
    except (BatchError, JewelclfError):
        raise
    except Exception as e:  # noqa: BLE001 - each kind of failure is named below
        if deadline.expired or _is_timeout(e):
            raise JewelclfError(f"{where} did not answer within --timeout {timeout:g} s; try again "
                                f"or raise --timeout") from None
        if isinstance(e, urllib.error.URLError):
            raise JewelclfError(f"cannot reach {where} ({one_line(str(e.reason), 100)}); is the "
                                f"server running and is --server right?") from None
        raise JewelclfError(f"{where} {_failure(e)}") from None
    return _parse_json(where, raw)


def _is_timeout(e: BaseException) -> bool:
    reason = getattr(e, "reason", None)
    return isinstance(e, TimeoutError) or isinstance(reason, TimeoutError)


def _failure(e: BaseException) -> str:
    """What went wrong in the exchange, for ``TF Serving at URL ...``."""
    if isinstance(e, _Bad):
        return f"sent {e}"
    if isinstance(e, http.client.IncompleteRead):
        expected = f" of the {len(e.partial) + e.expected} announced" if e.expected is not None else ""
        return (f"cut its reply off after {len(e.partial)} bytes{expected}; is a proxy between "
                f"you and the server, or did the server crash?")
    if isinstance(e, http.client.RemoteDisconnected):
        return "closed the connection without an answer; did the server crash?"
    if isinstance(e, http.client.BadStatusLine):
        return (f"answered with no valid HTTP status line ({one_line(repr(e.line), 60)}); is "
                f"--server the REST port (8501), not gRPC (8500)?")
    if isinstance(e, http.client.HTTPException):
        return f"sent a malformed HTTP reply ({type(e).__name__}: {one_line(str(e), 100)})"
    return f"failed the request ({type(e).__name__}: {one_line(str(e), 100)})"


def _error_message(e: urllib.error.HTTPError) -> str:
    """TF Serving's ``{"error": "..."}`` body of an HTTP error, or ``""``."""
    try:
        answer = json.loads(_read_capped(e).decode("utf-8"))
    except Exception:  # noqa: BLE001 - a body that is not the documented error object
        return ""
    message = answer.get("error") if isinstance(answer, dict) else None
    return one_line(message) if isinstance(message, str) else ""


def _raise_http_error(where: str, e: urllib.error.HTTPError, message: str) -> None:
    if e.code == 400:
        raise BatchError(message or "HTTP 400 Bad Request") from None
    raise JewelclfError(f"{where} answered HTTP {e.code} {one_line(str(e.reason), 60)}"
                        f"{': ' + message if message else ''}; check --model and --version") from None


def _parse_json(where: str, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise JewelclfError(f"{where} answered with bytes that are not UTF-8 text, not JSON") from None
    except (ValueError, RecursionError) as e:
        what = "an empty body" if not raw.strip() else f"text that is not JSON ({one_line(str(e), 80)})"
        raise JewelclfError(f"{where} answered with {what}; is --server a TF Serving REST "
                            f"address?") from None


# -------------------------------------------------------------------------- the reply's shape


def reply_columns(answer: Any, n: int, where: str) -> dict[str, list]:
    """The ``classes``, ``scores`` and (if served) ``valid``, ``error``, ``confidence``,
    ``needs_review`` and ``unknown_score`` columns of a predict reply for ``n`` images, in either
    documented shape, every value checked."""
    try:
        columns = _columns(answer, n)
        _check_columns(columns, n)
    except _Bad as e:
        raise JewelclfError(f"{where} answered {e}; {e.hint}") from None
    return columns


def _columns(answer: Any, n: int) -> dict[str, list]:
    if not isinstance(answer, dict):
        raise _Bad(f"{_a(answer)} in JSON, not an object with 'predictions'")
    if isinstance(answer.get("error"), str):
        raise _Bad(f"an error with status 200: {one_line(answer['error'], 200)}",
                   "check --model and --version")
    if "predictions" in answer:
        rows = answer["predictions"]
        if not isinstance(rows, list):
            raise _Bad(f"'predictions' as {_a(rows)}, not a list with one object per image")
        if len(rows) != n:
            raise _Bad(f"{len(rows)} 'predictions' for the {n} image(s) sent")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise _Bad(f"prediction {i + 1} as {_a(row)}, not an object of named outputs")
        keys = [k for k in ("classes", "scores", "valid", "error", *REVIEW_KEYS) if k in rows[0]]
        for i, row in enumerate(rows):
            missing = [k for k in keys if k not in row] + [k for k in ("classes", "scores") if k not in row]
            if missing:
                raise _Bad(f"prediction {i + 1} without '{missing[0]}'")
        return {k: [row[k] for row in rows] for k in keys}
    if "outputs" in answer:
        outputs = answer["outputs"]
        if not isinstance(outputs, dict):
            raise _Bad(f"'outputs' as {_a(outputs)}, not an object of named outputs")
        for k in ("classes", "scores"):
            if k not in outputs:
                raise _Bad(f"'outputs' without '{k}'")
        columns = {k: outputs[k] for k in ("classes", "scores", "valid", "error", *REVIEW_KEYS) if k in outputs}
        for k, column in columns.items():
            if not isinstance(column, list) or len(column) != n:
                size = f"{len(column)} rows" if isinstance(column, list) else _a(column)
                raise _Bad(f"'outputs.{k}' as {size} for the {n} image(s) sent")
        return columns
    raise _Bad(f"without 'predictions' or 'outputs' (keys: {one_line(', '.join(map(str, answer)), 80) or 'none'})")


def _check_columns(columns: dict[str, list], n: int) -> None:
    k = None
    for i in range(n):
        classes, scores = columns["classes"][i], columns["scores"][i]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise _Bad(f"'classes' of image {i + 1} as {_brief(classes)}, not a list of class names")
        if k is None:
            k = len(classes)
        if len(classes) != k:
            raise _Bad(f"{len(classes)} 'classes' for image {i + 1} but {k} for image 1")
        if not isinstance(scores, list) or len(scores) != k:
            raise _Bad(f"'scores' of image {i + 1} as {_brief(scores)}, not a list of {k} numbers")
        for s in scores:
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise _Bad(f"a score of image {i + 1} as {_brief(s)}, not a number")
            if not math.isfinite(s):
                raise _Bad(f"a score of image {i + 1} that is {s}, not a probability",
                           "the served model is broken: try the export locally with "
                           "jewelclf predict EXPORT_DIR IMAGE")
            if not -_SCORE_SLACK <= s <= 1 + _SCORE_SLACK:
                raise _Bad(f"a score of image {i + 1} of {s:g}, not a probability in [0, 1]")
        if "valid" in columns and not isinstance(columns["valid"][i], bool):
            raise _Bad(f"'valid' of image {i + 1} as {_brief(columns['valid'][i])}, not true or false")
        if "error" in columns and not isinstance(columns["error"][i], str):
            raise _Bad(f"'error' of image {i + 1} as {_brief(columns['error'][i])}, not a string")
        _check_review(columns, i)


def _check_review(columns: dict[str, list], i: int) -> None:
    """The review outputs of image ``i``, where served: a boolean and two finite numbers."""
    if "needs_review" in columns and not isinstance(columns["needs_review"][i], bool):
        raise _Bad(f"'needs_review' of image {i + 1} as {_brief(columns['needs_review'][i])}, "
                   f"not true or false")
    for key in ("confidence", "unknown_score"):
        if key in columns:
            v = columns[key][i]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _Bad(f"'{key}' of image {i + 1} as {_brief(v)}, not a finite number")


def _a(value: Any) -> str:
    """What a JSON value is, with its article: ``an object``, ``a list``, ``null``..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), "a value")


def _brief(value: Any) -> str:
    return f"{_a(value)} {one_line(json.dumps(value)[:40], 40)}"


class ServerPredictor(Predictor):
    """TensorFlow Serving over REST; the model must be a jewelclf SavedModel export."""

    def __init__(self, server: str, model: str, version: int | None = None,
                 signature: str = "serving_default", timeout: float = 60.0):
        if not timeout > 0 or not math.isfinite(timeout):
            raise JewelclfError(f"--timeout must be a positive number of seconds, got {timeout:g}")
        self.url = predict_url(server, model, version)
        self.signature = signature
        self.timeout = timeout
        self.k = 0
        self.description = f"TF Serving {self.url}"

    def post(self, body: dict[str, Any]) -> Any:
        """The parsed JSON answer to ``body`` (see :func:`post_predict`)."""
        return post_predict(self.url, body, self.timeout)

    def _predict_batch(self, encoded, top_k):
        answer = self.post(predict_request_body(encoded, self.signature))
        columns = reply_columns(answer, len(encoded), f"TF Serving at {self.url}")
        self.k = len(columns["classes"][0])
        if "valid" not in columns:
            columns.pop("error", None)
        elif "error" in columns:
            columns["error"] = [one_line(e) for e in columns["error"]]
        columns["classes"] = [[one_line(c, 100) for c in row] for row in columns["classes"]]
        return rows_from_outputs(columns, top_k, None)
