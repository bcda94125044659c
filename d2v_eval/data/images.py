"""Decoding of stored images (bytes, files, any PIL mode) to 8-bit RGB."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Exceptions PIL raises on unreadable, truncated or hostile files. UnidentifiedImageError and
# truncation are OSError, and some plugins raise SyntaxError, ValueError or EOFError on bad headers.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# Background for transparent pixels: white, so that transparent regions of RGBA/LA/P images do not
# turn black by accident when the alpha channel is dropped.
ALPHA_BACKGROUND = (255, 255, 255)


def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Map the observed range of a high-bit-depth array linearly onto 0..255 (no clipping)."""
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as an 8-bit RGB PIL image.

    EXIF orientation is applied first. Transparent modes (RGBA, LA, PA, P with a transparency entry)
    are composited on ``ALPHA_BACKGROUND``. 16- and 32-bit integer and float greyscale (I;16, I, F)
    are rescaled from their observed range to 8 bits rather than clipped. CMYK and YCbCr use PIL's
    conversion.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image

    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")

    if mode.startswith("I") or mode == "F":
        grey = _rescale_to_uint8(np.asarray(image))
        return Image.fromarray(grey, mode="L").convert("RGB")

    return image.convert("RGB")


def decode_image(value) -> Image.Image:
    """Decode one stored image and return it as 8-bit RGB (see :func:`to_rgb`).

    ``value`` is a PIL image, a ``{"bytes", "path"}`` dict (a ``datasets.Image(decode=False)`` cell),
    raw bytes or a file path. The pixels are read in full here, so a truncated file raises here and
    not later inside a transform. Raises one of ``DECODE_ERRORS`` for an unreadable image.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise ValueError("image cell has neither bytes nor a path")
        value = data if data is not None else path
    if isinstance(value, Image.Image):
        image = value
        image.load()
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
        image.load()
    elif isinstance(value, (str, Path)):
        with open(value, "rb") as file:
            image = Image.open(file)
            image.load()
    else:
        raise ValueError(f"cannot decode an image from a {type(value).__name__}")
    return to_rgb(image)
