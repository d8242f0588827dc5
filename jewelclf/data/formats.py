"""What an image file is, from its bytes alone: no TensorFlow, so that commands which only
look at files (``predict --server``) start in a fraction of a second."""

from __future__ import annotations

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")

MAX_FILE_BYTES = 256 * 2**20
"""Files larger than this are refused unread: no product photo is this big, and reading one
whole would cost that much memory per worker."""

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


DECODER_MAX_PIXELS = 2**29 - 1
"""The most pixels TensorFlow 2.21's PNG, JPEG and GIF decoders take ("PNG size too large for
int" at 2**29): a larger image is too large whatever ``data.max_pixels`` says."""

JPEG_MAX_STEPS = 1024
"""How many steps (a marker segment, a fill byte or a byte of junk, which libjpeg skips too) are
walked looking for a JPEG's frame header (SOF): a real photo takes a dozen; past this many the
size is unknown and the image refused, here and in the serving graphs alike."""

JPEG_SOF_MARKERS = tuple(sorted(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}))  # not DHT, JPG, DAC
JPEG_BARE_MARKERS = (0x01, *range(0xD0, 0xD8))  # TEM and RST0-7 have no length field


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The first frame header's size, walking markers as libjpeg does (junk before a marker and
    fill bytes are skipped); ``None`` at the end, the scan or the step limit before one."""
    pos, n = 2, len(data)
    for _ in range(JPEG_MAX_STEPS):
        if pos + 2 > n:
            return None
        if data[pos] != 0xFF:
            pos += 1
            continue
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
        elif marker == 0x00 or marker in JPEG_BARE_MARKERS:  # 0x00: a stuffed byte, junk here
            pos += 2
        elif marker in JPEG_SOF_MARKERS:
            if pos + 9 > n:
                return None
            return int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
        elif marker in (0xD9, 0xDA):  # the end, or the scan, before any frame header
            return None
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    return None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` that an image's header claims, read before any decoding; ``None``
    when the format is unknown or the header is cut short or unreadable.

    JPEG: the first frame header (SOF) within :data:`JPEG_MAX_STEPS` steps; PNG: IHDR;
    GIF: the logical screen; BMP: the info header; WebP: the VP8, VP8L or VP8X header. The
    exported serving graphs read the very same fields (:func:`jewelclf.data.images.header_dimensions`).
    """
    fmt = sniff_format(data[:16])
    if fmt == "JPEG":
        return _jpeg_size(data)
    if fmt == "PNG":
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if fmt == "GIF":
        return (int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")) if len(data) >= 10 else None
    if fmt == "BMP":
        if len(data) < 26:
            return None
        if int.from_bytes(data[14:18], "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sides
            return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
        return (abs(int.from_bytes(data[18:22], "little", signed=True)),
                abs(int.from_bytes(data[22:26], "little", signed=True)))
    if fmt == "WEBP":
        return _webp_size(data)
    return None


def size_problem(width: int, height: int, max_pixels: int, min_side: int) -> str | None:
    """Why an image of ``width`` x ``height`` is refused under ``data.max_pixels`` and
    ``data.min_image_side`` (and TensorFlow's own decoder limit), or ``None``: the one rule of
    the data check, ``predict``, ``similar`` and the exported serving graphs."""
    if width * height > max_pixels:
        return (f"too large: {width}x{height} px is over data.max_pixels={max_pixels}; "
                f"downscale it or raise the limit")
    if width * height > DECODER_MAX_PIXELS:
        return (f"too large: {width}x{height} px is over the {DECODER_MAX_PIXELS} px TensorFlow "
                f"can decode; downscale it")
    if min(width, height) < min_side:
        return f"too small: {width}x{height} px, under data.min_image_side={min_side}"
    return None


NO_SIZE_REASON = "its header names no image size (cut short or damaged); it was not decoded"


def header_problem(data: bytes, max_pixels: int, min_side: int) -> str | None:
    """Why encoded image bytes are refused from their header alone (:func:`image_dimensions`
    then :func:`size_problem`), or ``None`` when they may be decoded. Bytes of no supported
    format are left to the caller."""
    if sniff_format(data[:16]) is None:
        return None
    size = image_dimensions(data)
    if size is None:
        return f"corrupt or truncated {sniff_format(data[:16])} image: {NO_SIZE_REASON}"
    return size_problem(*size, max_pixels, min_side)


def recorded_limits(info: object) -> tuple[int, int] | None:
    """``(max_pixels, min_image_side)`` that an export's ``jewelclf.json`` (or a run's settings
    in that shape) records, or ``None`` when it records none (an export of an older jewelclf)."""
    if not isinstance(info, dict):
        return None
    try:
        return int(info["max_pixels"]), int(info["min_image_side"])
    except (KeyError, TypeError, ValueError):
        return None


def default_limits() -> tuple[int, int]:
    """``(data.max_pixels, data.min_image_side)`` of the default configuration."""
    from jewelclf.config import DataConfig

    cfg = DataConfig()
    return int(cfg.max_pixels), int(cfg.min_image_side)
