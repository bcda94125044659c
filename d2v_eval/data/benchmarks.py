"""Registry of named benchmarks: where each lives, its splits, columns, classes and standard metric.

Hub ids, split names and sizes were checked against the dataset cards and viewers on the Hugging Face
hub (read through a stored copy, not live); ``unverified`` on an entry lists what could not be checked.
The twelve transfer datasets and their metrics follow Kornblith, Shlens and Le, "Do Better ImageNet
Models Transfer Better?" (CVPR 2019, arXiv 1805.08974, Table 1): Pets, Flowers-102, Caltech-101 and
FGVC Aircraft are reported as mean per-class accuracy, the others as top-1 accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Metric = Literal["top1", "mean_per_class"]
ROLES = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One registry entry.

    ``splits`` maps the roles ``train``, ``validation`` and ``test`` to the dataset's split names;
    ``validation`` is None where the dataset has no held-out split besides the reported one (carve one
    from train with ``val_fraction``). ``hub_id`` is None for benchmarks without a hub copy (``digits``
    is built locally; a local path is described by an entry made on the fly). ``image_column`` and
    ``label_column`` None mean "detect from the features". ``class_names`` None means "read from the
    label column's ``ClassLabel`` feature once loaded".
    """

    name: str
    hub_id: str | None
    num_classes: int
    splits: dict[str, str | None]
    image_column: str | None = "image"
    label_column: str | None = "label"
    hub_config: str | None = None
    metric: Metric = "top1"
    class_names: tuple[str, ...] | None = None
    note: str = ""
    unverified: str = ""


_TRAIN_TEST = {"train": "train", "validation": None, "test": "test"}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100 superclasses in the order of the dataset's meta file (Krizhevsky 2009), which the hub
# card's ``coarse_label`` ClassLabel follows.
CIFAR100_COARSE_CLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)

BENCHMARKS: dict[str, Benchmark] = {
    "digits": Benchmark(
        name="digits", hub_id=None, num_classes=10,
        splits={"train": "train", "validation": "validation", "test": "test"},
        class_names=tuple(str(d) for d in range(10)),
        note="scikit-learn's 1,797 8x8 scans; seeded stratified split 70/10/20, built locally",
    ),
    "imagenet-1k": Benchmark(
        name="imagenet-1k", hub_id="ILSVRC/imagenet-1k", num_classes=1000,
        splits={"train": "train", "validation": None, "test": "validation"},
        note="gated on the hub: accept the terms and log in (`hf auth login`), or pass data.data_path "
             "with a local ILSVRC-2012 copy (train/ and val/ class folders); the official validation "
             "set (50,000) is the reported test split, the hub's test split has no labels",
        unverified="hub card not readable here (gated); split names and columns taken from public "
                   "descriptions of the dataset",
    ),
    "cifar10": Benchmark(
        name="cifar10", hub_id="uoft-cs/cifar10", num_classes=10, splits=_TRAIN_TEST,
        image_column="img", class_names=CIFAR10_CLASSES,
        note="train 50,000 / test 10,000, the official split",
    ),
    "cifar100": Benchmark(
        name="cifar100", hub_id="uoft-cs/cifar100", num_classes=100, splits=_TRAIN_TEST,
        image_column="img", label_column="fine_label",
        note="train 50,000 / test 10,000, the official split; the 100 fine labels",
    ),
    "cifar100-coarse": Benchmark(
        name="cifar100-coarse", hub_id="uoft-cs/cifar100", num_classes=20, splits=_TRAIN_TEST,
        image_column="img", label_column="coarse_label", class_names=CIFAR100_COARSE_CLASSES,
        note="CIFAR-100 images with the 20 superclass labels",
    ),
    "food101": Benchmark(
        name="food101", hub_id="ethz/food101", num_classes=101,
        splits={"train": "train", "validation": None, "test": "validation"},
        note="the hub's validation split (25,250) is the official test set (250 per class); "
             "train 75,750",
    ),
    "flowers102": Benchmark(
        name="flowers102", hub_id="nelorth/oxford-flowers", num_classes=102, splits=_TRAIN_TEST,
        metric="mean_per_class",
        note="NOT the official split (train 1,020 / val 1,020 / test 6,149): the hub copy has train "
             "7,169 / test 1,020; class names are the original ids 1..102 sorted as strings",
    ),
    "pets": Benchmark(
        name="pets", hub_id="timm/oxford-iiit-pet", num_classes=37, splits=_TRAIN_TEST,
        metric="mean_per_class",
        # Dataset card at commit 10b6888: image, label (ClassLabel '0' abyssinian ... '36' yorkshire_terrier),
        # image_id, label_cat_dog; splits train and test.
        note="official trainval 3,680 / test 3,669, standard label order",
    ),
    "dtd": Benchmark(
        name="dtd", hub_id="tanganke/dtd", num_classes=47, splits=_TRAIN_TEST,
        # Dataset card at commit cd52f56: image, label (ClassLabel '0' banded ... '46' zigzagged),
        # train 3,760 / test 1,880.
        note="split 1: train 3,760 (official train + val) / test 1,880",
    ),
    "stanford_cars": Benchmark(
        name="stanford_cars", hub_id="tanganke/stanford_cars", num_classes=196, splits=_TRAIN_TEST,
        # Dataset card at commit eecb78e: image, label (196 ClassLabel names), train 8,144 / test 8,041,
        # plus seven corrupted copies of test (contrast, gaussian_noise, ...) in the same repository.
        note="official train 8,144 / test 8,041; the hub repository also holds seven corrupted "
             "copies of the test split, so a full download is about 6 GB",
    ),
    "sun397": Benchmark(
        name="sun397", hub_id="tanganke/sun397", num_classes=397, splits=_TRAIN_TEST,
        # Dataset card at commit 4382ca2: image, label (ClassLabel '0' abbey, '1' airplane cabin, ...),
        # train and test of 19,850 each, about 14 GB.
        note="partition 1 (about 19,850 train / 19,850 test); Kornblith et al. use the same partition",
        unverified="the card's class list was read only in part (397 names inferred from its length) "
                   "and the hub viewer reports 287 classes; loading compares the ClassLabel with 397",
    ),
    "fgvc_aircraft": Benchmark(
        name="fgvc_aircraft", hub_id="HuggingFaceM4/FGVC-Aircraft", num_classes=100,
        splits={"train": "train", "validation": "validation", "test": "test"},
        label_column="variant", metric="mean_per_class",
        note="official train / val / test thirds (3,334 / 3,333 / 3,333), 100 variants",
        unverified="the main branch holds only a loading script, which datasets 4 and later do not "
                   "run; a parquet conversion (columns image, bbox, family, manufacturer, variant) "
                   "waits in the hub pull request refs/pr/1, and the number of `variant` names was "
                   "not readable; pass a local copy with data.data_path",
    ),
    "caltech101": Benchmark(
        name="caltech101", hub_id="HuggingFaceM4/Caltech-101", hub_config="with_background_category",
        num_classes=102, splits=_TRAIN_TEST, metric="mean_per_class",
        note="101 categories plus background (102 classes, as in Kornblith et al.); there is no "
             "official split: the hub copy's loading script draws train/test with the seed used by "
             "facebookresearch/vissl",
        unverified="the hub copy is built by a loading script, which datasets 4 and later no longer "
                   "run, and the descriptions of its two configs look swapped; the parquet copy "
                   "dpdl-benchmark/caltech101 has image and label with the same 102 class names in "
                   "the same order, but its splits were not readable; pass a local copy with "
                   "data.data_path",
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


def local_entry(path: str) -> Benchmark:
    """Registry-shaped entry for a local dataset: columns, classes and splits are read once loaded."""
    return Benchmark(
        name=str(path), hub_id=None, num_classes=-1,
        splits={"train": "train", "validation": "validation", "test": "test"},
        image_column=None, label_column=None,
    )
