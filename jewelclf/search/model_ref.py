"""The model behind a search index: where it is, how to feed it, and what identifies it.

A finished run dir is opened through :func:`jewelclf.runs.load_run` (without its Keras model);
a bare ``.keras`` file gets the config's preprocessing defaults and whatever class names lie
beside it. A model file is identified by its SHA-256, with its size and mtime recorded so that
an unchanged file is not hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jewelclf import runs as rd
from jewelclf.errors import JewelclfError


@dataclass
class ModelRef:
    """Where a model is and how to feed it."""

    model_file: Path
    run_dir: Path | None
    image_size: int | None
    resize: str
    batch_size: int
    max_pixels: int
    min_image_side: int
    class_names: list[str] | None
    backbone: str | None


def resolve_model(spec: str | Path) -> ModelRef:
    """A finished run dir, or a ``.keras`` model file (with its preprocessing defaults)."""
    from jewelclf import config as config_mod

    path = Path(spec).expanduser()
    if path.is_dir():
        run = rd.load_run(path, instead="index with another run", model=False)
        data = run.config.data
        return ModelRef(path / rd.MODEL, path, data.image_size, data.resize,
                        data.batch_size, data.max_pixels, data.min_image_side,
                        run.class_names, run.config.model.backbone)
    if path.is_file() and path.suffix == ".keras":
        cfg = config_mod.Config()
        class_names = None
        resize = cfg.data.resize
        for side in (path.with_name("jewelclf.json"), path.with_name(rd.CLASS_NAMES)):
            try:
                found = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(found, list):
                class_names = class_names or found
            elif isinstance(found, dict):
                class_names = class_names or found.get("class_names")
                resize = found.get("resize", resize)
        return ModelRef(path, None, None, resize, cfg.data.batch_size, cfg.data.max_pixels,
                        cfg.data.min_image_side, class_names, None)
    raise JewelclfError(
        f"'{spec}' is neither a finished run dir nor a .keras model file; pass the --run-dir of "
        f"a finished jewelclf fit"
    )


def sha256_file(path: Path | str) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model_file: Path) -> dict[str, Any]:
    """What identifies a model file: its SHA-256 (plus size and mtime, to skip re-hashing)."""
    st = os.stat(model_file)
    return {"path": str(Path(model_file).resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(model_file)}


def same_model(recorded: dict[str, Any], model_file: Path) -> bool:
    """Whether ``model_file`` is the model of ``recorded`` (hashing only when its stat differs)."""
    try:
        st = os.stat(model_file)
    except OSError:
        return False
    if st.st_size != recorded.get("size"):
        return False
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return True
    return sha256_file(model_file) == recorded.get("sha256")
