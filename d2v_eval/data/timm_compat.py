"""Keep timm's RandAugment ``inc1`` posterize working with Pillow versions that reject 0 bits.

timm's ``PosterizeIncreasing`` (the ``inc1`` RandAugment variant of the data2vec-vision recipe) keeps
``4 - int(magnitude / 10 * 4)`` bits, which is 0 at magnitude 10. With ``rand-m9-mstd0.5`` about 2%
of the sampled magnitudes are clipped to 10. Older Pillow turned 0 bits into a black image; Pillow
13.0 raises ``ValueError: bits must be between or equal to 1 and 8`` instead, which stops training
(seen with timm 1.0.31). ``install()`` swaps timm's posterize op for one that keeps the old result.
"""

from __future__ import annotations

from PIL import Image, ImageOps
from timm.data import auto_augment

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with 0 bits giving a black image, as Pillow did before it rejected 0."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def install() -> None:
    """Point timm's RandAugment/AutoAugment posterize entries at :func:`posterize` (idempotent)."""
    for name in POSTERIZE_OPS:
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize


install()
