"""Check every file once before training: what cannot be decoded is quarantined, with a reason.

Each file is decoded with the very decoder that training and the serving signature use
(:func:`jewelclf.data.images.decode_rgb`), after a header read that refuses decode bombs.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from PIL import Image

from jewelclf.data.images import SUPPORTED_FORMATS, decode_rgb, describe_unsupported, sniff_format
from jewelclf.data.sources import Record

# jewelclf applies its own pixel limit (data.max_pixels) with a clearer message than PIL's.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class FileCheck:
    record: Record
    ok: bool
    reason: str = ""
    format: str = ""
    width: int = 0
    height: int = 0


def _first_line(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    return text.strip().splitlines()[-1][:200]


def check_bytes(record: Record, data: bytes, max_pixels: int, min_side: int) -> FileCheck:
    """Check encoded bytes: format, header, size limits, then a full decode."""
    if not data:
        return FileCheck(record, False, "empty file (0 bytes)")
    fmt = sniff_format(data[:16])
    if fmt is None:
        what = describe_unsupported(data[:64])
        return FileCheck(record, False, f"unsupported format ({what}); supported: "
                                        f"{', '.join(SUPPORTED_FORMATS)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Exception as e:
        return FileCheck(record, False, f"corrupt {fmt}: unreadable header ({_first_line(e)})", fmt)
    if width * height > max_pixels:
        return FileCheck(record, False, f"too large: {width}x{height} px is over data.max_pixels="
                                        f"{max_pixels}; downscale it or raise the limit",
                         fmt, width, height)
    if min(width, height) < min_side:
        return FileCheck(record, False, f"too small: {width}x{height} px, under "
                                        f"data.min_image_side={min_side}", fmt, width, height)
    try:
        decode_rgb(tf.constant(data))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return FileCheck(record, False, f"corrupt {fmt}: {_first_line(e)}", fmt, width, height)
    return FileCheck(record, True, "", fmt, width, height)


def check_file(record: Record, max_pixels: int, min_side: int) -> FileCheck:
    path = record.path
    if os.path.isdir(path):
        return FileCheck(record, False, "a folder, not an image file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError:
        return FileCheck(record, False, "cannot be read (permission denied); fix its permissions")
    except FileNotFoundError:
        return FileCheck(record, False, "file not found (a broken symlink or a missing manifest entry)")
    except OSError as e:
        return FileCheck(record, False, f"cannot be read: {_first_line(e)}")
    return check_bytes(record, data, max_pixels, min_side)


def check_records(records: list[Record], max_pixels: int, min_side: int, workers: int = 4,
                  read_bytes=None) -> list[FileCheck]:
    """Check each record, in parallel threads; results come back in the records' order.

    ``read_bytes`` maps records to their encoded bytes for sources that are not files (TFDS).
    """
    if read_bytes is not None:
        return [check_bytes(r, b, max_pixels, min_side) for r, b in read_bytes(records)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda r: check_file(r, max_pixels, min_side), records))


def write_rejected(checks: list[FileCheck], path: Path) -> int:
    """Write ``rejected_files.csv`` (always, with a header, so an empty file means none)."""
    rejected = [c for c in checks if not c.ok]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "reason"])
        for c in rejected:
            w.writerow([c.record.path, c.record.label, c.record.split or "", c.reason])
    tmp.replace(path)
    return len(rejected)
