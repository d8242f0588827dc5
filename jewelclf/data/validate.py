"""Check every file once before training: what cannot be decoded is quarantined, with a reason.

Each file is decoded with the very decoder that training and the serving signature use
(:func:`jewelclf.data.images.decode_rgb`), after a header read that refuses decode bombs.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import tensorflow as tf
from PIL import Image

from jewelclf import bars
from jewelclf.data.formats import (  # noqa: F401  (DECODER_MAX_PIXELS, MAX_FILE_BYTES: re-exported)
    ANIMATED_WEBP_REASON,
    DECODER_MAX_PIXELS,
    MAX_FILE_BYTES,
    is_animated_webp,
    size_problem,
    sniff_format,
    unsupported_reason,
)
from jewelclf.data.images import decode_rgb
from jewelclf.data.sources import Record
from jewelclf.display import error_text

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


def gif_frame_sizes(data: bytes) -> list[tuple[int, int]]:
    """``(width, height)`` of every frame of a GIF, read from its image descriptors, undecoded.

    TensorFlow's GIF decoder slurps every frame (whatever ``expand_animations`` says) into a
    canvas as wide and tall as the largest frame, while PIL's header size is the first frame's:
    a GIF with a small first frame and huge later ones would pass a header check and then
    allocate gigabytes.
    """
    sizes: list[tuple[int, int]] = []
    n = len(data)
    if n < 13:
        return sizes
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the global colour table
    while pos < n:
        block = data[pos]
        if block == 0x2C:  # image descriptor, then an optional local colour table and the LZW size
            if pos + 10 > n:
                break
            sizes.append(struct.unpack_from("<HH", data, pos + 5))
            flags = data[pos + 9]
            pos += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        elif block == 0x21:  # extension: introducer and label
            pos += 2
        else:  # trailer or junk
            break
        while pos < n and data[pos]:  # data sub-blocks, up to the zero-length terminator
            pos += data[pos] + 1
        pos += 1
    return sizes


def check_bytes(record: Record, data: bytes, max_pixels: int, min_side: int) -> FileCheck:
    """Check encoded bytes: format, header, size limits, then a full decode."""
    if not data:
        return FileCheck(record, False, "empty file (0 bytes)")
    fmt = sniff_format(data[:16])
    if fmt is None:
        return FileCheck(record, False, unsupported_reason(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Exception as e:
        return FileCheck(record, False, f"corrupt {fmt}: unreadable header ({error_text(e)})", fmt)
    if fmt == "WEBP" and is_animated_webp(data):
        # TensorFlow 2.21 corrupts its heap decoding animated WebP (the process aborts).
        return FileCheck(record, False, ANIMATED_WEBP_REASON, fmt, width, height)
    if fmt == "GIF":
        frames = gif_frame_sizes(data)
        if frames:  # the size TensorFlow decodes to: the largest frame's
            width, height = max(w for w, _ in frames), max(h for _, h in frames)
            total = sum(w * h for w, h in frames)
            if total > max_pixels and len(frames) > 1:
                return FileCheck(record, False, f"too large: an animated GIF of {len(frames)} frames, "
                                                f"{total} px in all, is over data.max_pixels={max_pixels}; "
                                                f"save its first frame as a still image", fmt, width, height)
    problem = size_problem(width, height, max_pixels, min_side)
    if problem:
        return FileCheck(record, False, problem, fmt, width, height)
    try:
        decode_rgb(tf.constant(data))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return FileCheck(record, False, f"corrupt {fmt}: the image data is damaged or cut short "
                                        f"({error_text(e)})", fmt, width, height)
    return FileCheck(replace(record, format=fmt), True, "", fmt, width, height)


def read_file_bytes(record: Record) -> tuple[bytes | None, FileCheck | None]:
    """The bytes of a file record, or ``(None, failed FileCheck)`` saying why they cannot be had.

    Only regular files are opened: a folder, a FIFO (which would block forever), a device or a
    symlink loop is refused by its ``stat``, and a file over :data:`MAX_FILE_BYTES` unread.
    """
    path = record.path

    def fail(reason: str):
        return None, FileCheck(record, False, reason)

    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # bytes from another encoding, kept by os.fsdecode as surrogates
        return fail("the file name is not valid UTF-8, which TensorFlow cannot open; rename the file")
    try:
        st = os.stat(path)
    except PermissionError:
        return fail("cannot be read (permission denied); fix its permissions")
    except FileNotFoundError:
        return fail("file not found (a broken symlink or a missing manifest entry)")
    except ValueError:  # an embedded NUL byte
        return fail("the path contains a NUL byte")
    except OSError as e:
        if e.errno == errno.ELOOP:
            return fail("a symlink loop (the link points back to itself); fix or remove the link")
        return fail(f"cannot be read: {error_text(e)}")
    if stat.S_ISDIR(st.st_mode):
        return fail("a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        return fail("not a regular file (a FIFO, socket or device); replace it with an image file")
    if st.st_size > MAX_FILE_BYTES:
        return fail(f"file too large: {st.st_size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES // 2**20} "
                    f"MiB limit for one image; is it really an image?")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except PermissionError:
        return fail("cannot be read (permission denied); fix its permissions")
    except FileNotFoundError:
        return fail("file not found (a broken symlink or a missing manifest entry)")
    except OSError as e:
        return fail(f"cannot be read: {error_text(e)}")
    if len(data) > MAX_FILE_BYTES:  # it grew after the stat
        return fail(f"file too large: over the {MAX_FILE_BYTES // 2**20} MiB limit for one image")
    return data, None


def check_file(record: Record, max_pixels: int, min_side: int, on_bytes=None) -> FileCheck:
    """Read and check one file. ``on_bytes(record, data, check)``, if given, is called with the
    bytes that were read and the result, so callers can reuse the one read."""
    data, failed = read_file_bytes(record)
    if failed is not None:
        return failed
    check = check_bytes(record, data, max_pixels, min_side)
    if on_bytes is not None:
        on_bytes(record, data, check)
    return check


def check_records(records: list[Record], max_pixels: int, min_side: int, workers: int = 4,
                  read_bytes=None, on_bytes=None, desc: str = "checking files") -> list[FileCheck]:
    """Check each record, in parallel threads; results come back in the records' order.

    ``read_bytes`` maps records to their encoded bytes for sources that are not files (TFDS).
    ``on_bytes(record, data, check)``, if given, is called (in the worker thread) for every
    record whose bytes could be read; :mod:`jewelclf.data.audit` hashes them there. A progress
    bar named ``desc`` shows on a terminal (:mod:`jewelclf.bars`).
    """
    out: list[FileCheck] = []
    with bars.bar(len(records), desc) as progress:
        if read_bytes is not None:
            for r, b in read_bytes(records):
                c = check_bytes(r, b, max_pixels, min_side)
                if on_bytes is not None:
                    on_bytes(r, b, c)
                out.append(c)
                progress.update()
            return out
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for c in pool.map(lambda r: check_file(r, max_pixels, min_side, on_bytes), records):
                out.append(c)
                progress.update()
    return out


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
