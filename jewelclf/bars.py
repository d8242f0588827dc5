"""Progress bars for the long phases that Keras' epoch lines do not cover (tqdm, on stderr).

The data check, the leakage hashes and near-duplicate search, the stage-1 feature pass, the
embedding of an index and ``predict`` over a folder each show a bar with a count, a rate and an
ETA, on stderr, so stdout (reports, ``--json``, tables) stays clean. A bar appears only when
stderr is a terminal: in a log file, a pipe, CI or a test's captured output it is disabled, so no
carriage-return redraws end up there. A phase that ends within :data:`DELAY` seconds never shows
one either. tqdm's own ``TQDM_*`` environment variables still apply: ``TQDM_DISABLE=1`` turns
every bar off.

Usage::

    with bar(len(records), "checking files") as b:
        for r in records:
            ...
            b.update()
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm

DELAY = 1.0
"""Seconds a phase runs before its bar is drawn: a tiny workload never flickers one."""


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (False for a file, a pipe, or captured output)."""
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def bar(total: int | None, desc: str, unit: str = "file", **options: Any) -> tqdm:
    """A tqdm bar on stderr for ``total`` items (``None``: count and rate, no ETA).

    Disabled (every call a no-op) unless stderr is a terminal, and when ``total`` is 0; the bar
    is removed when it closes (the caller's own log line says how it went). ``options`` go to
    :class:`tqdm.tqdm` and win over these defaults.
    """
    kwargs: dict[str, Any] = dict(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                                  delay=DELAY, dynamic_ncols=True, mininterval=0.2, smoothing=0.1)
    # Only ever pass disable=True: leaving it unset lets TQDM_DISABLE decide the rest.
    if total == 0 or not stderr_is_terminal():
        kwargs["disable"] = True
    elif _width() <= 0:
        # A terminal that reports a 0x0 size (a pty without a window: `script`, some
        # `docker exec -t`): tqdm would take it for -1 rows and draw nothing.
        kwargs.update(ncols=80, nrows=24, dynamic_ncols=False)
    kwargs.update(options)
    return tqdm(**kwargs)


def keras_callback(progress: tqdm, unit: str = "row"):
    """A Keras callback that moves ``progress`` as ``model.predict`` finishes each batch: by its
    rows (``unit="row"``; by one when the batch's size cannot be read), or by one
    (``unit="batch"``). Keras is imported only here."""
    import keras

    class _PredictBar(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            rows = 1
            if unit == "row":
                try:
                    rows = int(keras.tree.flatten((logs or {}).get("outputs"))[0].shape[0])
                except (IndexError, TypeError, AttributeError):
                    pass
            progress.update(rows)

    return _PredictBar()
