"""Files written so that a crash or a full disk never leaves half a file: atomic replace,
fsync, and disk-full detection with one-line messages."""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jewelclf import compat
from jewelclf.errors import JewelclfError
from jewelclf.layout import CONFIG, RUN_INFO

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


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def free_space(path: Path) -> str:
    """The free space on the disk holding ``path`` (or its nearest existing parent), for people."""
    for folder in (Path(path), *Path(path).parents):
        try:
            return human_bytes(shutil.disk_usage(folder).free)
        except OSError:
            continue
    return "unknown space"


def _next_step(path: Path | None) -> str:
    """What to run once space is freed: ``fit --resume`` when ``path`` lies in a fit's run dir."""
    if path is not None:
        path = Path(path)
        for folder in [path, *list(path.parents)[:3]]:
            try:
                info = json.loads((folder / RUN_INFO).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(info, dict):
                continue
            if info.get("kind") != "tune" and (folder / CONFIG).is_file():
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


def _as_disk_full(exc: BaseException, path: Path, existed: bool) -> DiskFullError:
    """The one-line :class:`DiskFullError` for a write of ``path`` that ``exc`` ended.

    The failed writer's frames are dropped first, so that the files it left open are closed
    (and the space they held freed) now rather than at exit.
    """
    compat.quiet_h5py_disk_full_reports(is_disk_full)
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
            f"no space left on device for '{path}': it needs about {human_bytes(needed)}, "
            f"{human_bytes(free)} is free on that disk; "
            + ("its previous version is kept unchanged" if path.exists() else "nothing was written there")
            + f"; free disk space, {_next_step(path)}")


def fsync_dir(folder: Path) -> None:
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
    fsync_dir(path.parent)


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
    fsync_dir(path.parent)
