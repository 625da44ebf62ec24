"""A small PNG decoder that keeps 16-bit samples (PIL truncates 16-bit RGB to 8 bits).

SYNTHIA stores its labels as 16-bit RGB PNGs with the class in the first channel; Pillow
reads such files as 8-bit RGB holding only the high byte of each sample, which is 0 for
every class id. This reader parses the chunks, inflates the IDAT stream with zlib and
undoes the per-row filters with NumPy. Supported: non-interlaced grey / grey+alpha / RGB /
RGBA at 8 or 16 bits per sample, i.e. every label file the datasets here ship.

Undoing the filters is a recurrence (each byte needs its reconstructed left, upper and
upper-left neighbours), so it runs as a wavefront: after shifting row r right by r
pixels, all pixels of one diagonal depend only on the two previous diagonals and are
reconstructed together; H + W - 1 vector steps instead of H * W scalar ones.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


class PngError(ValueError):
    """The bytes are not a PNG this reader supports, or the file is damaged."""


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, C) array, uint16 for 16-bit files and uint8 for 8-bit ones."""
    height, width, bit_depth, color_type, compressed = _parse_chunks(data)
    channels = _CHANNELS[color_type]
    bytes_per_pixel = channels * bit_depth // 8
    stride = width * bytes_per_pixel
    try:
        raw = zlib.decompress(compressed)
    except zlib.error as error:
        raise PngError(f"corrupt image data: {error}") from None
    if len(raw) != height * (stride + 1):
        raise PngError(f"image data holds {len(raw)} bytes, expected {height * (stride + 1)}")
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    filter_types = rows[:, 0]
    if filter_types.max(initial=0) > 4:
        raise PngError(f"unknown row filter type {int(filter_types.max())}")
    pixels = _unfilter(rows[:, 1:].reshape(height, width, bytes_per_pixel), filter_types)
    if bit_depth == 16:
        pixels = pixels.reshape(height, width, channels, 2)
        return (pixels[..., 0].astype(np.uint16) << 8) | pixels[..., 1]
    return pixels


def _parse_chunks(data: bytes) -> tuple[int, int, int, int, bytes]:
    if not data.startswith(_SIGNATURE):
        raise PngError("not a PNG file (bad signature)")
    position, header, idat, ended = len(_SIGNATURE), None, [], False
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        crc = data[position + 8 + length : position + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise PngError(f"truncated in chunk {kind!r}")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise PngError(f"checksum mismatch in chunk {kind!r}")
        position += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            ended = True
            break
    if header is None or not idat or not ended:
        raise PngError("truncated (missing IHDR, IDAT or IEND)")
    width, height, bit_depth, color_type, _, _, interlace = header
    if color_type not in _CHANNELS or bit_depth not in (8, 16):
        raise PngError(f"unsupported PNG: colour type {color_type}, {bit_depth}-bit")
    if interlace:
        raise PngError("interlaced PNGs are not supported")
    return height, width, bit_depth, color_type, b"".join(idat)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter(filtered: np.ndarray, filter_types: np.ndarray) -> np.ndarray:
    """(H, W, bpp) filtered bytes -> reconstructed bytes (PNG spec section 9)."""
    height, width, bpp = filtered.shape
    # skewed[k, r + 1] holds pixel (r, x = k - r): diagonal k is one contiguous row. Row 0
    # (r = -1) and the pixels left of x = 0 stay zero, the PNG boundary values.
    skewed_filtered = np.zeros((height + width + 1, height + 1, bpp), np.int32)
    rows = np.arange(height)
    for x in range(width):
        skewed_filtered[x + rows, rows + 1] = filtered[:, x]
    recon = np.zeros_like(skewed_filtered)
    kind = filter_types.astype(np.int32)[:, None]
    for k in range(height + width - 1):
        left = recon[k - 1, 1:] if k >= 1 else np.zeros((height, bpp), np.int32)
        up = recon[k - 1, :-1] if k >= 1 else left
        up_left = recon[k - 2, :-1] if k >= 2 else np.zeros((height, bpp), np.int32)
        prediction = np.select(
            [kind == 1, kind == 2, kind == 3, kind == 4],
            [left, up, (left + up) >> 1, _paeth(left, up, up_left)],
            0,
        )
        recon[k, 1:] = (skewed_filtered[k, 1:] + prediction) & 0xFF
    out = np.empty((height, width, bpp), np.uint8)
    for x in range(width):
        out[:, x] = recon[x + rows, rows + 1]
    return out
