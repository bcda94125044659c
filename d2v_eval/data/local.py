"""Loading of local datasets: class-folder trees, ``save_to_disk`` folders and parquet files.

Every layout ends as a ``datasets.DatasetDict`` so that local and hub data take one path afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset, load_from_disk

log = logging.getLogger(__name__)

# Folder names of a class-folder tree that name a split; ``val`` is the ILSVRC-2012 spelling.
SPLIT_FOLDERS = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation",
                 "test": "test"}


def load_local(path: str | Path, *, cache_dir: str | None = None) -> DatasetDict:
    """Load the dataset at ``path`` as a ``DatasetDict``.

    ``path`` may be a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, a
    parquet file, a folder of parquet files (split names from the file names, e.g. ``train-*.parquet``,
    as ``datasets`` infers them), or a class-folder tree (see :func:`load_class_folders`). A single
    dataset becomes the split ``train``. ``cache_dir`` receives the Arrow cache of parquet input.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"local dataset {str(root)!r} not found")

    if root.is_file():
        if root.suffix != ".parquet":
            raise ValueError(f"{str(root)!r} is not a parquet file; pass a parquet file or a dataset folder")
        return load_dataset("parquet", data_files={"train": str(root)}, cache_dir=cache_dir)

    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = load_from_disk(str(root))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})

    if any(root.rglob("*.parquet")):
        return load_dataset("parquet", data_dir=str(root), cache_dir=cache_dir)

    return load_class_folders(root)


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Map each class folder under ``split_dir`` to its files (hidden files are skipped)."""
    stray = sorted(p.name for p in split_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise ValueError(
            f"{split_dir} contains files outside any class folder ({', '.join(stray[:3])}"
            f"{', ...' if len(stray) > 3 else ''}); move each file into a folder named after its class"
        )
    classes: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"class folder {class_dir} is empty; add its images or remove the folder")
        classes[class_dir.name] = files
    if not classes:
        raise ValueError(f"{split_dir} has no class folders; expected SPLIT/CLASS/IMAGE or CLASS/IMAGE")
    return classes


def load_class_folders(root: str | Path) -> DatasetDict:
    """Load a tree ``root/[train|val|validation|test/]CLASS/IMAGE`` as a ``DatasetDict``.

    Without split folders the whole tree is the split ``train`` (carve the others with the data
    module's ``val_fraction`` and ``test_fraction``). Class names are the folder names, sorted, shared
    by every split. Every file in a class folder is a sample, so that a non-image file meets the
    corrupt-file policy at decoding time instead of vanishing. Hidden files are ignored.

    Hand-written rather than ``load_dataset("imagefolder")`` because that builder drops files by
    extension and silently drops empty class folders, both of which must be reported here.
    """
    root = Path(root).expanduser()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = {SPLIT_FOLDERS[p.name]: p for p in folders if p.name in SPLIT_FOLDERS}
    others = [p.name for p in folders if p.name not in SPLIT_FOLDERS]
    if split_dirs and others:
        raise ValueError(
            f"{root} mixes split folders ({', '.join(p.name for p in split_dirs.values())}) with other "
            f"folders ({', '.join(others)}); use either SPLIT/CLASS/IMAGE or CLASS/IMAGE"
        )
    if not split_dirs:
        split_dirs = {"train": root}

    files_by_split = {split: _class_files(folder) for split, folder in split_dirs.items()}
    names = sorted({name for classes in files_by_split.values() for name in classes})
    index = {name: i for i, name in enumerate(names)}
    features = Features({"image": Image(), "label": ClassLabel(names=names)})

    splits = {}
    for split, classes in files_by_split.items():
        images, labels = [], []
        for name, files in classes.items():
            images.extend({"path": str(path), "bytes": None} for path in files)
            labels.extend([index[name]] * len(files))
        splits[split] = Dataset.from_dict({"image": images, "label": labels}, features=features)
        log.info("class folders %s: %d files in %d classes", split_dirs[split], len(images), len(classes))
    return DatasetDict(splits)
