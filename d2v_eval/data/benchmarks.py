"""Registry of named benchmarks: where each lives, its splits, columns, classes and standard metric."""

from __future__ import annotations

import dataclasses
from typing import Literal

Metric = Literal["top1", "mean_per_class"]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One registry entry.

    ``splits`` maps the roles ``train``, ``validation`` and ``test`` to the dataset's split names;
    ``validation`` is None where the dataset has no held-out split besides the reported one.
    ``hub_id`` is None for benchmarks that are built locally (``digits``).
    """

    name: str
    hub_id: str | None
    num_classes: int
    splits: dict[str, str | None]
    image_column: str = "image"
    label_column: str = "label"
    hub_config: str | None = None
    metric: Metric = "top1"
    note: str = ""


# Hub ids and split sizes from the dataset cards on the Hugging Face hub; where the hub split is not
# the official protocol, `note` says so.
BENCHMARKS: dict[str, Benchmark] = {
    "digits": Benchmark(
        name="digits", hub_id=None, num_classes=10,
        splits={"train": "train", "validation": "validation", "test": "test"},
        note="scikit-learn's 1,797 8x8 scans; seeded stratified split 70/10/20, built locally",
    ),
    "imagenet-1k": Benchmark(
        name="imagenet-1k", hub_id="ILSVRC/imagenet-1k", num_classes=1000,
        splits={"train": "train", "validation": None, "test": "validation"},
        note="gated on the hub: log in with a token, or point at a local ILSVRC-2012 copy",
    ),
    "cifar10": Benchmark(
        name="cifar10", hub_id="uoft-cs/cifar10", num_classes=10,
        splits={"train": "train", "validation": None, "test": "test"}, image_column="img",
    ),
    "cifar100": Benchmark(
        name="cifar100", hub_id="uoft-cs/cifar100", num_classes=100,
        splits={"train": "train", "validation": None, "test": "test"},
        image_column="img", label_column="fine_label",
    ),
}


def get_benchmark(name: str) -> Benchmark:
    """Return the registry entry ``name``; raise ``ValueError`` listing the valid names otherwise."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        valid = ", ".join(sorted(BENCHMARKS))
        raise ValueError(
            f"unknown benchmark {name!r}; valid names: {valid}, or a path to a local dataset"
        ) from None
