"""Pictures for the screen tests: read X window dumps (xwd) and PPM screendumps, write PNGs.

Only numpy and the standard library: what is captured is decoded here, field by field, so a
pixel-format or stride bug on the screen shows up as a wrong picture, not as a decoder quirk.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_xwd", "read_ppm", "write_png"]


def read_xwd(data: bytes) -> np.ndarray:
    """An ``xwd -root`` dump (ZPixmap, 24/32 bits per pixel) as RGB (h, w, 3) uint8."""
    fields = struct.unpack(">25I", data[:100])
    header_size, _version, pixmap_format, depth, width, height = fields[:6]
    byte_order, bits_per_pixel, bytes_per_line = fields[7], fields[11], fields[12]
    red_mask, green_mask, blue_mask = fields[14:17]
    ncolors = fields[19]
    if pixmap_format != 2 or bits_per_pixel != 32 or depth < 24:
        raise ValueError(f"xwd: format {pixmap_format}, {bits_per_pixel} bpp, depth {depth}: not handled")
    start = header_size + 12 * ncolors
    rows = np.frombuffer(data, np.uint8, height * bytes_per_line, start).reshape(height, bytes_per_line)
    pixels = rows[:, : width * 4].copy().view(">u4" if byte_order else "<u4").reshape(height, width)
    out = np.empty((height, width, 3), np.uint8)
    for i, mask in enumerate((red_mask, green_mask, blue_mask)):
        shift = (mask & -mask).bit_length() - 1
        out[..., i] = (pixels & mask) >> shift
    return out


def read_ppm(data: bytes) -> np.ndarray:
    """A binary PPM (P6, maxval 255; QEMU's screendump) as RGB (h, w, 3) uint8."""
    parts: list[bytes] = []
    pos = 0
    while len(parts) < 4:  # magic, width, height, maxval; then one whitespace byte
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        parts.append(data[pos:end])
        pos = end
    magic, w, h, maxval = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
    if magic != b"P6" or maxval != 255:
        raise ValueError(f"ppm: {magic!r} maxval {maxval}: not handled")
    return np.frombuffer(data, np.uint8, w * h * 3, pos + 1).reshape(h, w, 3).copy()


def write_png(path: Path, image: np.ndarray) -> Path:
    """RGB (h, w, 3) uint8 to a PNG file (to look at what the screen showed)."""
    h, w = image.shape[:2]
    raw = b"".join(b"\0" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path
