"""Seeded few-shot subsets: exactly ``k`` training samples per class, one subset per draw."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def few_shot_indices(
    labels: Sequence[int] | np.ndarray,
    k: int,
    *,
    seed: int,
    draw: int = 0,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Return sorted sample indices with exactly ``k`` per class, drawn without replacement.

    The draw depends only on ``(seed, draw)`` and the labels, so it is the same in every process.
    Raises ``ValueError`` when ``k`` exceeds the sample count of a class (naming the class and its
    count), or when a class among ``num_classes`` has no sample at all.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"few-shot k {k!r} is invalid; use a whole number of samples per class >= 1")
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
    counts = np.bincount(labels, minlength=num_classes)

    smallest = int(np.argmin(counts))
    if counts[smallest] < k:
        name = f"{class_names[smallest]!r} (index {smallest})" if class_names else f"{smallest}"
        raise ValueError(
            f"few-shot k={k} exceeds the {int(counts[smallest])} training samples of class {name}, "
            f"the smallest class; use k <= {int(counts[smallest])}"
        )

    rng = np.random.default_rng([seed, draw])
    chosen = [rng.choice(np.flatnonzero(labels == label), size=k, replace=False) for label in range(num_classes)]
    return np.sort(np.concatenate(chosen))
