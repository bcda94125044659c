"""The embedded ``digits`` benchmark: scikit-learn's 1,797 handwritten 8x8 digit scans as RGB images.

It needs no network, so the whole suite can run end to end on a fresh machine. The dataset is built
once into a Hugging Face ``DatasetDict`` (``save_to_disk``) so it takes the same loading path as hub
benchmarks.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as ImageFeature
from PIL import Image

log = logging.getLogger(__name__)

SPLIT_SEED = 0
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1
# Bump when the images or the split change, so an old cache is never reused.
FORMAT_VERSION = 1


def cache_root() -> Path:
    """Folder for d2v-eval's own caches: ``$D2V_EVAL_CACHE``, else ``~/.cache/d2v_eval``."""
    return Path(os.environ.get("D2V_EVAL_CACHE", Path.home() / ".cache" / "d2v_eval")).expanduser()


def _build() -> DatasetDict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are ink counts 0..16; scale to 0..255 and invert so digits are dark on white.
    pixels = 255 - np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    indices = np.arange(len(labels))

    train_val, test = train_test_split(
        indices, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    val_size = VALIDATION_FRACTION / (1.0 - TEST_FRACTION)
    train, validation = train_test_split(
        train_val, test_size=val_size, stratify=labels[train_val], random_state=SPLIT_SEED
    )

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def make(split_indices: np.ndarray) -> Dataset:
        split_indices = np.sort(split_indices)
        images = [Image.fromarray(pixels[i], mode="L").convert("RGB") for i in split_indices]
        return Dataset.from_dict({"image": images, "label": labels[split_indices].tolist()}, features=features)

    return DatasetDict({"train": make(train), "validation": make(validation), "test": make(test)})


def digits_path() -> Path:
    """Return the on-disk location of the ``digits`` DatasetDict, building it on first use."""
    target = cache_root() / f"digits-v{FORMAT_VERSION}"
    if (target / "dataset_dict.json").is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    try:
        _build().save_to_disk(str(staging))
        try:
            os.rename(staging, target)  # atomic: readers see the whole dataset or none
        except OSError:
            if not (target / "dataset_dict.json").is_file():
                raise
            # Another process finished first; its copy is identical.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built the digits benchmark at %s", target)
    return target
