"""Writing an export's files: readable by the serving user, atomic, never clobbered by accident.

A server may run as another user, so every file is made world-readable; an existing output file
is replaced only with ``--overwrite``, and a TF Serving config the user may have edited is kept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jewelclf.errors import JewelclfError
from jewelclf.export.layout import Log


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write, readable by others (a server may run as another user)."""
    from jewelclf.fsio import atomic_write_json

    atomic_write_json(path, obj)
    os.chmod(path, 0o644)


def write_if_absent(path: Path, text: str, log: Log) -> None:
    from jewelclf.fsio import atomic_write_text

    if path.exists():
        log(f"kept the existing {path}")
        return
    atomic_write_text(path, text)
    os.chmod(path, 0o644)  # the server may run as another user
    log(f"wrote {path}")


def prepare_folder(out_dir: Path, files: list[str], overwrite: bool) -> None:
    """Create ``out_dir`` for ``files``, refusing a file there or an existing one without ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise JewelclfError(f"--output '{out_dir}' is a file; pass a folder")
    clash = [f for f in files if (out_dir / f).exists()]
    if clash and not overwrite:
        raise JewelclfError(f"'{out_dir / clash[0]}' already exists; pass --overwrite to replace "
                            f"it, or another --output")
    out_dir.mkdir(parents=True, exist_ok=True)
