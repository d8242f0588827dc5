"""Run directories: one per run, never overwritten silently, written atomically."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jewelclf.errors import JewelclfError
from jewelclf.layout import (  # noqa: F401  (the run layout, read through runs)
    BEST_CHECKPOINT,
    CALIBRATION,
    CLASS_NAMES,
    CONFIG,
    CURVES,
    HISTORY,
    LEAKAGE,
    METRICS,
    MODEL,
    REJECTED,
    RUN_INFO,
    SPLITS,
    UNKNOWN_REFERENCE,
)


def environment() -> dict[str, str]:
    """Versions that decide whether a run can be reproduced."""
    import keras
    import numpy
    import tensorflow as tf

    import jewelclf

    return {
        "jewelclf": jewelclf.__version__,
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
"""How run info, export reports and index metadata write a moment: local ISO 8601 with offset."""


def timestamp() -> str:
    """Now, in :data:`TIME_FORMAT`."""
    return time.strftime(TIME_FORMAT)


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / RUN_INFO
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"status": "unknown"}


def prepare_run_dir(run_dir: Path, overwrite: bool = False, log=print) -> Path:
    """Create ``run_dir`` for a new run.

    A folder holding a run (finished or not) is refused unless ``overwrite`` is given; a
    non-empty folder that is not a run is always refused, so nothing is deleted by accident.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise JewelclfError(f"run dir '{run_dir}' is a file; choose a folder path for --run-dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        info = read_run_info(run_dir)
        if info is None:
            raise JewelclfError(
                f"run dir '{run_dir}' is not empty and holds no jewelclf run; choose a new --run-dir"
            )
        if info.get("status") == "failed":
            log(f"replacing the run in '{run_dir}' that failed before training")
        elif not overwrite:
            state = "a finished run" if info.get("status") == "finished" else "an unfinished run"
            raise JewelclfError(
                f"run dir '{run_dir}' already holds {state}; choose a new --run-dir, or pass "
                f"--overwrite to replace it"
            )
        # Move the old run aside first, then delete it: a crash never leaves a half-deleted run.
        trash = run_dir.with_name(f".{run_dir.name}.replaced-{int(time.time())}")
        os.replace(run_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def require_finished_run(run_dir: Path) -> dict[str, Any]:
    """Check that ``run_dir`` holds a finished run with a model; return its run info."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise JewelclfError(f"run dir '{run_dir}' does not exist; pass the --run-dir of a finished fit")
    info = read_run_info(run_dir)
    if info is None or not (run_dir / MODEL).is_file():
        raise JewelclfError(
            f"'{run_dir}' holds no finished jewelclf run (no {MODEL}); run jewelclf fit first or "
            f"check the path"
        )
    return info


def read_class_names(run_dir: Path) -> list[str]:
    """The run's ``class_names.json``; missing or unreadable is a one-line error."""
    path = Path(run_dir) / CLASS_NAMES
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        names = None
    if not isinstance(names, list):
        raise JewelclfError(f"'{path}' is missing or not JSON; the run is incomplete, train it again")
    return [str(c) for c in names]


def load_model_file(path: Path, num_classes: int | None = None):
    """Load a ``.keras`` model saved by ``jewelclf fit`` (``compile=False``).

    A corrupt or foreign file, a model that does not take square RGB pixels, or (when
    ``num_classes`` is given) one with another number of outputs is a one-line
    :class:`JewelclfError` naming the file; callers load before reading any data, so a bad
    model costs no decoding.
    """
    import keras

    from jewelclf.modeling.registry import custom_objects

    path = Path(path)
    try:
        model = keras.saving.load_model(path, compile=False, custom_objects=custom_objects())
    except Exception as e:  # a corrupt or foreign file surfaces as many exception types
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise JewelclfError(
            f"cannot load '{path}' ({type(e).__name__}: {lines[0][:150] if lines else ''}); it is "
            f"not a Keras model saved by jewelclf fit: train the run again or pass the right file"
        ) from None
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):  # a model never built on an input
        shape = None
    if (not isinstance(shape, tuple) or len(shape) != 4 or shape[1] is None
            or shape[1] != shape[2] or shape[3] != 3):
        raise JewelclfError(f"'{path}' takes input {shape}, not square RGB pixels; it is not a "
                            f"model saved by jewelclf fit: train the run again or pass the right file")
    if num_classes is not None and model.output_shape[-1] != num_classes:
        raise JewelclfError(f"'{path}' has {model.output_shape[-1]} outputs but '{CLASS_NAMES}' "
                            f"beside it names {num_classes} classes; the run is inconsistent: "
                            f"train it again")
    return model


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on ``run_dir`` for the life of a command.

    The lock is an ``flock`` on ``.<name>.lock`` beside the run dir, so it survives the run dir
    being replaced, and the kernel releases it when the process dies: a killed run never leaves
    a held lock behind. A second process asking for the same run dir is refused at once. The
    file is removed when the command ends (see :func:`_lock_file`), so none pile up.
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    fd = _lock_file(lock_path, run_dir)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        # Unlinked while still locked: a process that opened the file meanwhile gets the flock
        # only after this, and then sees that the path no longer names its file (_lock_file).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)  # closing releases the flock


def _lock_file(lock_path: Path, run_dir: Path) -> int:
    """An fd holding the flock on the file that ``lock_path`` names now. A holder removes the
    file when it ends, so the file locked here may have been unlinked (or replaced) between
    the open and the flock: then it guards nothing, and the open is tried again."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise JewelclfError(
                f"run dir '{run_dir}' is in use by {holder}; wait for it to finish or choose "
                f"another --run-dir"
            ) from None
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        st = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)


# --- the one loader of a finished run -----------------------------------------------------------

DEFAULT_EMBED_LAYER = "pool"


@dataclass
class RunModel:
    """A finished run: its resolved config, class names, calibration and Keras model.

    Every command that opens a finished run (evaluate, export, predict, index, review) gets it
    from :func:`load_run`, so the image size, resize mode and limits are read in one place.
    """

    run_dir: Path
    model: Any  # keras.Model
    class_names: list[str]
    image_size: int
    resize: str
    top_k: int
    config: Any  # jewelclf.config.Config
    info: dict[str, Any]
    embed_layer: str = DEFAULT_EMBED_LAYER
    calibration: Any = None  # jewelclf.evaluation.calibration.Calibration, or None

    @property
    def k(self) -> int:
        return max(1, min(self.top_k, len(self.class_names)))

    @property
    def temperature(self) -> float:
        return float(self.calibration.temperature) if self.calibration is not None else 1.0

    def embedder(self):
        """The Keras embedding (float32 pixels -> unit vectors) that ``jewelclf index`` uses."""
        from jewelclf.modeling.embedding import embedding_model

        return embedding_model(self.model, self.embed_layer)

    def describe(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "image_size": self.image_size,
                "resize": self.resize, "top_k": self.k, "run_dir": str(self.run_dir.resolve()),
                "backbone": self.config.model.backbone, **self.limits}

    def training_source(self, fix: str):
        """The data source the run trained on, read again from where ``run_info.json`` says;
        a one-line error ending in ``fix`` when it names none or it cannot be read."""
        from jewelclf.data.sources import load_source

        # data_path is absolute (fit's "data" may be relative to the folder fit ran in)
        spec = self.info.get("data_path") or self.info.get("data")
        if not spec:
            raise JewelclfError(f"'{self.run_dir / RUN_INFO}' does not name the training data; {fix}")
        try:
            return load_source(spec)
        except JewelclfError as e:
            raise JewelclfError(f"the run's data '{spec}' cannot be read ({e}); {fix}") from None

    @property
    def limits(self) -> dict[str, int]:
        """The run's data limits, which the serving graphs and ``predict`` apply to each image."""
        return {"max_pixels": int(self.config.data.max_pixels),
                "min_image_side": int(self.config.data.min_image_side)}


def read_splits(run_dir: Path, fields: tuple[str, ...] = ("path", "split")) -> list[dict[str, str]]:
    """The rows of the run's ``splits.csv`` (one per file: ``path``, ``label``, ``split``); an
    empty list when it is missing, unreadable, or a row lacks one of ``fields``."""
    try:
        with open(Path(run_dir) / SPLITS, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return rows if all(all(r.get(k) is not None for k in fields) for r in rows) else []


def read_config(run_dir: Path):
    """The run's saved ``config.yaml`` as a resolved :class:`~jewelclf.config.Config`."""
    from jewelclf import config as config_mod

    path = Path(run_dir) / CONFIG
    return config_mod.from_dict(config_mod.load_yaml(path), source=str(path))


def require_status_finished(run_dir: Path, info: dict[str, Any], instead: str) -> None:
    """Refuse a run that is still training or was interrupted; ``instead`` names the way out."""
    if info.get("status") != "finished":
        raise JewelclfError(
            f"the run in '{run_dir}' is not finished (status: {info.get('status', 'unknown')}); "
            f"wait for jewelclf fit to end, or {instead}"
        )


def load_run(run_dir: Path, instead: str = "export another run", model: bool = True) -> RunModel:
    """Open a finished run: its info, config, class names, calibration and (``model``) its model.

    The model is loaded before any data is read, so a corrupt model costs no decoding.
    """
    from jewelclf.evaluation import calibration as calibration_mod

    run_dir = Path(run_dir)
    info = require_finished_run(run_dir)
    require_status_finished(run_dir, info, instead)
    class_names = read_class_names(run_dir)
    config = read_config(run_dir)
    keras_model = load_model_file(run_dir / MODEL, len(class_names)) if model else None
    size = int(keras_model.input_shape[1]) if keras_model is not None else int(config.data.image_size)
    return RunModel(run_dir, keras_model, class_names, size, config.data.resize,
                    int(config.train.top_k), config, info,
                    calibration=calibration_mod.read(run_dir / CALIBRATION))
