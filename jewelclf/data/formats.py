"""What an image file is, from its bytes alone: no TensorFlow, so that commands which only
look at files (``predict --server``) start in a fraction of a second."""

from __future__ import annotations

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")

ANIMATED_WEBP_REASON = ("animated WebP, which TensorFlow cannot decode safely; save its first "
                        "frame as a still image")
"""Why an animated WebP is refused: TensorFlow 2.21's ``decode_image`` (``channels=0``, as
:func:`decode_rgb` calls it) corrupts the heap on one and the whole process aborts."""


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes (its magic number), or ``None``."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def describe_unsupported(head: bytes) -> str:
    """A short name for a format jewelclf does not read, for error messages."""
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftyphevc"):
        return "HEIC/AVIF"
    if head.lstrip()[:5] in (b"<?xml", b"<svg ") or head.lstrip()[:4] == b"<svg":
        return "SVG"
    if head[:4] == b"%PDF":
        return "PDF"
    stripped = head.strip()
    if stripped and all(32 <= b < 127 or b in (9, 10, 13) for b in stripped[:64]):
        return "text"
    return "unknown binary"


def is_animated_webp(data: bytes) -> bool:
    """Whether a WebP holds an animation (a VP8X animation flag, or ANIM/ANMF chunks), read
    from its chunk headers; ``False`` for anything that is not a RIFF WebP."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    pos = 12
    while pos + 8 <= len(data):
        tag = data[pos:pos + 4]
        if tag in (b"ANIM", b"ANMF") or (tag == b"VP8X" and pos + 8 < len(data) and data[pos + 8] & 0x02):
            return True
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += 8 + size + (size & 1)
    return False


def unsupported_reason(data: bytes) -> str:
    """The one wording, for every command, of a file that is no supported image."""
    return (f"not a supported image ({describe_unsupported(data[:64])}); supported: "
            f"{', '.join(SUPPORTED_FORMATS)}")
