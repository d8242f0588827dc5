"""Shared by the export and predict tests: one SavedModel export of ``tiny_run`` per session."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

_CACHE: dict[str, Path] = {}


def exported_tiny(tiny_run: Path, tmp_path_factory) -> Path:
    """``<tmp>/exported/tiny`` holding version 1 of ``tiny_run`` (exported once, with
    ``--test-data`` on the run's own data)."""
    if "base" not in _CACHE:
        from jewelclf.export.run import export_run

        base = tmp_path_factory.mktemp("exported") / "tiny"
        data = json.loads((tiny_run / "run_info.json").read_text())["data"]
        export_run(tiny_run, "savedmodel", output=base, test_data=data, log=lambda _: None)
        _CACHE["base"] = base
    return _CACHE["base"]


def encode(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kwargs)
    return buf.getvalue()


def noisy(shape, seed: int, base=(128, 128, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.array(base, np.int16) + rng.integers(-60, 60, shape), 0, 255).astype(np.uint8)
