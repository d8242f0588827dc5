"""Run directories: one per run, never overwritten silently, written atomically."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jewelclf.errors import JewelclfError

RUN_INFO = "run_info.json"
CONFIG = "config.yaml"
CLASS_NAMES = "class_names.json"
SPLITS = "splits.csv"
REJECTED = "rejected_files.csv"
HISTORY = "history.csv"
CURVES = "training_curves.png"
BEST_CHECKPOINT = "checkpoints/best.weights.h5"
MODEL = "model.keras"
METRICS = "metrics.json"
LEAKAGE = "leakage.json"
CALIBRATION = "calibration.json"


# --- disk full -------------------------------------------------------------------------------

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the message reads where no errno survives: TensorFlow's file ops (ResourceExhaustedError
# "...; No space left on device [Op:SaveV2]") and h5py's close-time RuntimeError.
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


class DiskFullError(JewelclfError):
    """A write failed for lack of disk space (or quota): one line naming the file and the fix."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk or an exceeded quota."""
    for _ in range(8):  # the __cause__/__context__ chain, bounded
        if exc is None:
            return False
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc) for t in _DISK_FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def free_space(path: Path) -> str:
    """The free space on the disk holding ``path`` (or its nearest existing parent), for people."""
    for folder in (Path(path), *Path(path).parents):
        try:
            return _human(shutil.disk_usage(folder).free)
        except OSError:
            continue
    return "unknown space"


def _next_step(path: Path | None) -> str:
    """What to run once space is freed: ``fit --resume`` when ``path`` lies in a fit's run dir."""
    if path is not None:
        path = Path(path)
        for folder in [path, *list(path.parents)[:3]]:
            info = read_run_info(folder)
            if info is not None and info.get("kind") != "tune" and (folder / CONFIG).is_file():
                if info.get("status") in ("running", "interrupted"):
                    return f"then resume with: jewelclf fit --resume --run-dir {folder}"
                break
    return "then run the command again"


def disk_full_message(exc: BaseException | None = None, path: Path | str | None = None,
                      kept: bool | None = None) -> str:
    """One line: what could not be written (``path``: a file, or the folder being written
    into), whether its previous content is kept (``kept``), the space left, and what to do.
    ``path`` defaults to the exception's file name."""
    if path is None and isinstance(exc, OSError) and exc.filename:
        path = exc.filename
    quota = exc is not None and (getattr(exc, "errno", None) == errno.EDQUOT
                                 or "Disk quota exceeded" in str(exc))
    what = "disk quota exceeded" if quota else "no space left on device"
    if path is None:
        return f"{what}; free disk space, then run the command again"
    path = Path(path)
    where = f"into '{path}'" if path.is_dir() else f"'{path}'"
    state = {None: "", True: "; its previous version is kept unchanged",
             False: "; nothing was written there"}[kept]
    return (f"{what} while writing {where} ({free_space(path)} free on that disk){state}; "
            f"free disk space, {_next_step(path)}")


_h5py_reports_quiet = False


def _from_h5py(exc: BaseException | None, where: Any = None) -> bool:
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if "h5py" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return "h5py" in repr(where)


def _quiet_h5py_disk_full_reports() -> None:
    """Drop the reports h5py prints of a full disk it already raised, for the rest of the process.

    h5py reports a failed write twice: once as the exception, then again from the destructor of
    each object of the file ("Traceback ... RuntimeError: Can't decrement id ref count (file
    write failed ... No space left on device)", through ``sys.excepthook`` and
    ``sys.unraisablehook``), at once or when the interpreter exits. Only those reports (a full
    disk, from h5py's own code) are dropped; every other error is shown as before.
    """
    global _h5py_reports_quiet
    if _h5py_reports_quiet:
        return
    _h5py_reports_quiet = True
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(report):
        if not (is_disk_full(report.exc_value) and _from_h5py(report.exc_value, report.object)):
            previous_unraisable(report)

    def excepthook(kind, value, tb):
        if not (is_disk_full(value) and _from_h5py(value)):
            previous_except(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook


def _as_disk_full(exc: BaseException, path: Path, existed: bool) -> DiskFullError:
    """The one-line :class:`DiskFullError` for a write of ``path`` that ``exc`` ended.

    The failed writer's frames are dropped first, so that the files it left open are closed
    (and the space they held freed) now rather than at exit.
    """
    _quiet_h5py_disk_full_reports()
    chained, seen = exc, set()
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__
    gc.collect()
    return DiskFullError(disk_full_message(exc, path, kept=existed))


def _ensure_space(path: Path, expected_bytes: int | None) -> None:
    """Refuse up front a write of about ``expected_bytes`` that the disk has no room for.

    HDF5 (Keras' ``.weights.h5``) does not recover from a full disk met part-way: the failed
    file stays half-open inside the library, which then crashes the process at exit
    (``H5_term_library``, HDF5 1.14.6). Checking first avoids that in the common case, a
    checkpoint saved again at the same size; another process can still fill the disk between
    the check and the write, and that case is caught (and reported) as it happens.
    """
    if not expected_bytes:
        return
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    needed = expected_bytes + expected_bytes // 100 + 8 * 1024
    if free < needed:
        raise DiskFullError(
            f"no space left on device for '{path}': it needs about {_human(needed)}, "
            f"{_human(free)} is free on that disk; "
            + ("its previous version is kept unchanged" if path.exists() else "nothing was written there")
            + f"; free disk space, {_next_step(path)}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a power cut after it keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- atomic writes ------------------------------------------------------------------------------


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:  # reads it without changing it
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename.

    On a full disk ``path`` keeps its previous content, the temp file is removed and
    :class:`DiskFullError` says so in one line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), new_file_mode())  # mkstemp's 0600 would ignore the umask
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        raise _as_disk_full(e, path, existed) from None
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save(path: Path, save_fn, expected_bytes: int | None = None) -> None:
    """Call ``save_fn(tmp_path)`` then rename onto ``path`` (for models, checkpoints, plots).

    The temp file is flushed to disk before the rename (some file systems report a full disk
    only then). On a full disk ``path`` keeps its previous content, the temp file is removed
    and :class:`DiskFullError` says so in one line. A write the disk has visibly no room for
    (``expected_bytes``; by default the size of the file it replaces) is refused before it starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")  # keeps the suffix that savers check
    existed = path.exists()
    if expected_bytes is None and path.is_file():
        expected_bytes = path.stat().st_size
    _ensure_space(path, expected_bytes)
    try:
        save_fn(tmp)
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        raise _as_disk_full(e, path, existed) from None
    _fsync_dir(path.parent)


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

    import jewelclf.modeling.embedding  # noqa: F401  (registers L2Normalize for loading)
    import jewelclf.modeling.layers  # noqa: F401  (registers BackbonePreprocessing for loading)

    path = Path(path)
    try:
        model = keras.saving.load_model(path, compile=False)
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
