"""Text for one terminal line: names that cannot forge lines, and errors without TensorFlow's
internals. No TensorFlow here (``predict --server`` prints through it)."""

from __future__ import annotations

import re
import unicodedata

# Line and paragraph separators are not control characters (Cc) but still break a line.
_BREAKING = {"Cc", "Zl", "Zp", "Cs"}


def quote_name(name: str) -> str:
    """``name`` unchanged, or ``repr``-quoted (``'a\\nb.jpg'``) when it holds a control character,
    a line separator or a lone surrogate: a file named ``"x\\nring 0.99"`` must not print as a
    forged second line."""
    if any(unicodedata.category(ch) in _BREAKING for ch in name):
        return repr(name)
    return name


def printable(text: str) -> str:
    """A name that can be printed and saved as UTF-8: bytes of a file name that are not UTF-8
    (kept by Python as lone surrogates) are written as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of ``text`` with every control character replaced by a space,
    at most ``limit`` characters: for text from elsewhere (a server's error message)."""
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    line = "".join(" " if unicodedata.category(ch) in _BREAKING else ch for ch in line)
    return line.strip()[:limit]


_TF_NOISE = (
    (re.compile(r"\{\{[^}]*\}\}\s*"), ""),  # "{{function_node __wrapped__DecodeImage_device_...}}"
    (re.compile(r"\s*\[\[[^\]]*\]\]"), ""),  # "[[{{node DecodeImage}}]]"
    (re.compile(r"\s*\[Op:[^\]]*\].*$", re.MULTILINE), ""),  # "[Op:DecodeImage] name: "
    (re.compile(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>"), ""),  # PIL names its buffer
)
_TF_FRAME = re.compile(r"^\s*(File \"|Detected at node|Graph execution error|Traceback|\^)")


def error_text(e: BaseException, limit: int = 200) -> str:
    """One clean line from an exception, TensorFlow's ``{{function_node ...}}``, ``[[node]]``
    and ``[Op:...]`` decorations and graph-trace lines removed."""
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    for pattern, repl in _TF_NOISE:
        text = pattern.sub(repl, text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _TF_FRAME.match(ln)]
    return one_line(lines[-1] if lines else type(e).__name__, limit)
