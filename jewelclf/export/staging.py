"""The hidden folder an export is written and checked in, before it is renamed into place.

The base folder may be shared storage that exports from other hosts or containers write into
at the same time, so nothing here is decided from a process id: a live export holds an
``flock`` on ``lock`` inside its folder and touches that file every
:data:`HEARTBEAT_SECONDS`; a folder is abandoned only when its lock is free *and* its heartbeat
is older than :data:`STALE_SECONDS` (the age covers filesystems whose locks are not shared
between hosts). Ages are measured against the cleaner's own freshly touched lock file, so the
clocks of the hosts need not agree.

Everything the export writes goes inside the folder: the SavedModel (``model/``) and the
parity check's scratch files (``parity/``), so a killed export leaves one folder, which the
next export's cleanup removes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from jewelclf.errors import JewelclfError

Log = Callable[[str], None]

TMP_PREFIX = ".tmp-export-"
LOCK = "lock"
MODEL = "model"
PARITY = "parity"
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 300.0
"""A folder whose lock is free is left alone until its heartbeat is this old."""

_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive ``flock`` without waiting: True if taken, False if another holds it,
    None where the filesystem has no locks (then only the age decides)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return False if e.errno in _BUSY else None
    return True


class Staging:
    """A new ``<base>/.tmp-export-<random>/``, locked and kept fresh until :meth:`close`."""

    def __init__(self, base: Path):
        self.path = Path(base) / f"{TMP_PREFIX}{secrets.token_hex(6)}"
        self.path.mkdir()
        self._fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        self.locked = _try_lock(self._fd)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="jewelclf-export-heartbeat", daemon=True)
        self._beat.start()

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def parity(self) -> Path:
        """The parity check's scratch folder (created)."""
        (self.path / PARITY).mkdir(exist_ok=True)
        return self.path / PARITY

    def now(self) -> float:
        """The storage's "now": the mtime of this folder's lock, just touched."""
        os.utime(self.path / LOCK)
        return os.stat(self.path / LOCK).st_mtime

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path / LOCK)
            except OSError:  # the folder is being removed: nothing left to keep fresh
                return

    def close(self) -> None:
        """Remove the folder (whatever is left in it) and release the lock."""
        self._stop.set()
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)


def cleanup_stale(base: Path, log: Log = print, now: float | None = None,
                  keep: Path | None = None) -> list[str]:
    """Delete the temp folders of exports that are gone (killed, crashed, their host down):
    lock free and heartbeat older than :data:`STALE_SECONDS` before ``now`` (default: the
    clock here). ``keep`` (the caller's own folder) is never touched."""
    import time

    now = time.time() if now is None else now
    removed: list[str] = []
    if not Path(base).is_dir():
        return removed
    for p in sorted(Path(base).iterdir()):
        if not (p.name.startswith(TMP_PREFIX) and p.is_dir()) or (keep is not None and p == keep):
            continue
        lock = p / LOCK
        try:
            age = now - (lock if lock.exists() else p).stat().st_mtime
            if age < STALE_SECONDS:
                continue
            fd = os.open(lock, os.O_RDWR) if lock.exists() else None
        except OSError:  # removed meanwhile by another cleaner
            continue
        try:
            if fd is not None and _try_lock(fd) is False:
                continue  # alive, though its heartbeat stalled
            shutil.rmtree(p, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
        removed.append(p.name)
        log(f"removed '{p}', left by an export that did not finish")
    return removed


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with one line if ``dst`` exists, even when it appears
    at the same instant (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere a check first)."""
    try:
        _rename_noreplace(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise JewelclfError(f"'{dst}' appeared while exporting (another export of the same "
                                f"version?) and was left as it is; run the export again for the "
                                f"next version") from None
        raise JewelclfError(f"cannot rename the checked export into '{dst}' "
                            f"({e.strerror or e}); nothing was published") from None


def _rename_noreplace(src: Path, dst: Path) -> None:
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) \
        if sys.platform.startswith("linux") else None
    if renameat2 is not None:
        at_fdcwd, noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: this filesystem lacks the flag
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


PARENT_ENV = "JEWELCLF_EXPORT_PID"
"""The child's environment variable naming the export's pid: the parity process
(:mod:`jewelclf.export.parity_child`) kills itself when that process dies."""
