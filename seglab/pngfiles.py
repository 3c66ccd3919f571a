"""Whether the bytes of a PNG file are whole, and whether a PNG can hold labels.

torchvision's decoder crashes the whole process on some damaged files (a failing checksum,
a broken compressed stream) instead of raising, so data.read_png asks `png_problem` first: a
run of many hours then stops at a damaged file with its name, or skips it (--skip-bad).
Nothing here imports the lab's files.
"""

from __future__ import annotations

import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_damage(raw: bytes) -> str | None:
    """Why the bytes of a PNG file are damaged (no PNG signature, cut short, a chunk whose
    CRC-32 fails), or None when every chunk up to IEND is whole.

    torchvision's decoder crashes the whole process on some damaged files (a failing
    checksum, a broken compressed stream) instead of raising, so read_png checks first.
    The checksums catch flipped or zeroed bytes for a few percent of the decoding time.
    """
    if not raw.startswith(PNG_SIGNATURE):
        return f"not a PNG file (its {len(raw)} bytes do not start with the PNG signature)"
    view = memoryview(raw)
    position = len(PNG_SIGNATURE)
    # A chunk: 4-byte big-endian data length, 4-byte type, the data, CRC-32 of type + data.
    while position + 12 <= len(raw):
        length = int.from_bytes(view[position : position + 4], "big")
        crc_position = position + 8 + length
        if crc_position + 4 > len(raw):
            break
        chunk_type = bytes(view[position + 4 : position + 8])
        stored_crc = int.from_bytes(view[crc_position : crc_position + 4], "big")
        if zlib.crc32(view[position + 4 : crc_position]) != stored_crc:
            name = chunk_type.decode("ascii", "replace")
            return f"its {name} chunk at byte {position} fails its checksum (damaged file)"
        if chunk_type == b"IEND":
            return None
        position = crc_position + 4
    return f"it ends after {len(raw)} bytes, before its IEND chunk (truncated file)"


# PNG color types (byte 25 of the file, in the IHDR chunk) whose colors survive decoding
# to RGB unchanged: truecolor, and truecolor with alpha.
RGB_COLOR_TYPES = {2: "RGB", 6: "RGBA"}
OTHER_COLOR_TYPES = {0: "grayscale", 3: "palette", 4: "grayscale with alpha"}


def label_png_problem(raw: bytes) -> str | None:
    """Why a whole PNG cannot hold labels, or None: each label is a 24-bit color, so a
    semantic PNG must be 8-bit RGB; a grayscale or palette copy decodes to no label at all."""
    bit_depth, color_type = raw[24], raw[25]  # IHDR, the first chunk, after width and height
    if color_type in RGB_COLOR_TYPES and bit_depth == 8:
        return None
    kind = RGB_COLOR_TYPES.get(color_type) or OTHER_COLOR_TYPES.get(color_type, "unknown")
    return (
        f"it is a {bit_depth}-bit {kind} PNG, but the labels are 8-bit RGB colors (the file "
        "was converted or is not a semantic PNG of 2D-3D-S)"
    )


# The most pixels a PNG may have: Pillow's decompression-bomb limit (a 2D-3D-S frame has
# 1.2 million). A 20000 x 20000 frame would take 4.8 GB per copy in the loader.
MAX_PNG_PIXELS = 89_478_485


def png_size_problem(raw: bytes) -> str | None:
    """Why a whole PNG is too large to decode (from the width and height of its IHDR chunk,
    before anything is decoded), or None."""
    if raw[12:16] != b"IHDR":
        return "its first chunk is not IHDR (not a valid PNG)"
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if width * height > MAX_PNG_PIXELS:
        return (
            f"too large: {width} x {height} pixels, more than the {MAX_PNG_PIXELS:,} a PNG may "
            "have here; scale it down or remove it"
        )
    return None


def png_problem(raw: bytes, labels: bool = False) -> str | None:
    """What is wrong with the bytes of a PNG file (with `labels`, of a semantic PNG, which
    must be 8-bit RGB), or None when nothing is."""
    return png_damage(raw) or png_size_problem(raw) or (label_png_problem(raw) if labels else None)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC-32 of type and data."""
    crc = zlib.crc32(payload, zlib.crc32(kind))
    return len(payload).to_bytes(4, "big") + kind + payload + crc.to_bytes(4, "big")


def write_rgb_png(path, width: int, height: int, bands) -> None:
    """Write an 8-bit RGB PNG from `bands`, numpy arrays `(rows, width, 3)` uint8 from top to
    bottom, compressed as they come: a whole-picture encoder (Pillow's) holds the picture in
    memory at 4 bytes a pixel. Each row uses the filter Sub (its bytes less those of the
    pixel to its left), which compresses pictures far better than no filter."""
    import numpy as np

    compressor = zlib.compressobj(6)
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    with open(path, "wb") as file:
        file.write(PNG_SIGNATURE + png_chunk(b"IHDR", header))
        for band in bands:
            rows = band.reshape(band.shape[0], width * 3)
            filtered = np.empty((rows.shape[0], width * 3 + 1), dtype=np.uint8)
            filtered[:, 0] = 1  # the filter type Sub
            filtered[:, 1:4] = rows[:, :3]
            np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])  # modulo 256
            file.write(png_chunk(b"IDAT", compressor.compress(filtered.tobytes())))
        file.write(png_chunk(b"IDAT", compressor.flush()))
        file.write(png_chunk(b"IEND", b""))
