"""Importing TensorFlow quietly: its C++ start-up lines are hidden unless ``--verbose``.

TensorFlow 2.21 writes its start-up lines (oneDNN, CUDA probing, CPU features) through absl
before any logging setting applies, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them; only the
process's stderr can. The commands that need TensorFlow import it here, after their cheap
checks (a typo'd path is reported without paying for the import), and commands that need no
TensorFlow (``--help``, ``predict --server``) never import it.
"""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow and Keras, hiding their C++ log lines unless ``verbose``.

    A failed import still raises, after stderr is back, so its error is seen."""
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return
    with contextlib.nullcontext() if verbose else _stderr_silenced():
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
