"""``ImageClassificationData``: a LightningDataModule over Hugging Face ``datasets``."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from datasets import ClassLabel, DatasetDict, Image as ImageFeature, load_dataset, load_from_disk
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.trainer.states import TrainerFn
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from d2v_eval.data import timm_compat  # noqa: F401  (RandAugment posterize under Pillow 13)
from d2v_eval.data.benchmarks import BENCHMARKS, Benchmark, get_benchmark, local_entry
from d2v_eval.data.columns import resolve_columns
from d2v_eval.data.digits import cache_root, digits_path
from d2v_eval.data.images import DECODE_ERRORS, decode_image
from d2v_eval.data.local import load_local
from d2v_eval.data.sampler import ResumableLoader, ResumableSampler, training_position
from d2v_eval.randomness import fresh_seed, run_seed, seeded_rngs

log = logging.getLogger(__name__)

# data2vec-vision normalisation (facebookresearch/data2vec_vision, beit/datasets.py: mean = std = 0.5).
D2V_MEAN = (0.5, 0.5, 0.5)
D2V_STD = (0.5, 0.5, 0.5)
# Names of validation and test splits carved from train by ``val_fraction`` and ``test_fraction``.
CARVED_VALIDATION = "validation_from_train"
CARVED_TEST = "test_from_train"
CorruptPolicy = Literal["error", "skip"]
CORRUPT_POLICIES = ("error", "skip")


class CorruptImageError(RuntimeError):
    """An image that cannot be decoded under the ``error`` corrupt-file policy."""


class TransformedSplit(Dataset):
    """A Hugging Face split seen as ``(image tensor (3, H, W), label)`` pairs.

    Images are decoded here (the column is read with ``decode=False``) so that a bad file is caught
    with its sample index and path. Under ``corrupt_policy="skip"`` a bad sample logs one warning and
    yields None, which :class:`CollateSkippingNone` drops from its batch.

    An item is requested by index, or by ``(index, sample_seed)`` as :class:`ResumableSampler`
    yields them; then the transform draws its random numbers from ``sample_seed`` alone.
    """

    def __init__(self, split, transform, image_column: str, label_column: str, *,
                 corrupt_policy: CorruptPolicy = "error", split_name: str = ""):
        feature = split.features.get(image_column)
        if isinstance(feature, ImageFeature) and feature.decode:
            split = split.cast_column(image_column, ImageFeature(decode=False))
        self.split = split
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.corrupt_policy = corrupt_policy
        self.split_name = split_name

    def __len__(self) -> int:
        return len(self.split)

    def _describe(self, index: int, cell) -> str:
        path = None
        if isinstance(cell, dict):
            path = cell.get("path")
        elif isinstance(cell, str):
            path = cell
        where = f"file {path}" if path else f"row {index} of the stored table"
        return f"sample {index} of split {self.split_name!r} ({where})"

    def __getitem__(self, item: int | tuple[int, int]):
        index, sample_seed = item if isinstance(item, tuple) else (item, None)
        row = self.split[index]
        cell = row[self.image_column]
        try:
            image = decode_image(cell)
        except DECODE_ERRORS as error:
            where = self._describe(index, cell)
            if self.corrupt_policy == "error":
                raise CorruptImageError(
                    f"cannot decode {where}: {error}; fix or remove the file, or set "
                    "data.corrupt_policy=skip to leave bad samples out (the record counts them)"
                ) from error
            log.warning("skipping %s: %s", where, error)
            return None

        if sample_seed is None:
            return self.transform(image), int(row[self.label_column])
        # In a loader worker no other code draws from the global RNGs, so their states need no restoring.
        with seeded_rngs(sample_seed, restore=get_worker_info() is None):
            return self.transform(image), int(row[self.label_column])


class CollateSkippingNone:
    """``default_collate`` without the samples that ``TransformedSplit`` skipped (None).

    A batch whose samples were all skipped becomes images ``(0, 3, input_size, input_size)`` and
    labels ``(0,)``. A class rather than a closure so that data-loader workers can pickle it.
    """

    def __init__(self, input_size: int):
        self.input_size = input_size

    def __call__(self, batch: list):
        kept = [sample for sample in batch if sample is not None]
        if not kept:
            return torch.empty(0, 3, self.input_size, self.input_size), torch.empty(0, dtype=torch.long)
        return default_collate(kept)


class ImageClassificationData(pl.LightningDataModule):
    """Image classification data for a named benchmark or a local dataset.

    Args:
        benchmark: a registry name (``d2v-eval data list``) or the path of a local dataset (a
            ``save_to_disk`` folder, parquet files or a class-folder tree; see
            :func:`d2v_eval.data.local.load_local`).
        input_size: input resolution in pixels (square); LightningCLI links it from the encoder.
        batch_size: samples per device and step.
        image_column, label_column: column names; they win over the registry entry's names, which
            win over detection from the features (the only ``Image`` and ``ClassLabel`` columns).
        hflip, scale, auto_augment, color_jitter, re_prob: training augmentation, passed to timm's
            ``create_transform`` (``auto_augment`` e.g. ``"rand-m9-mstd0.5-inc1"``).
        crop_pct: evaluation resizes to ``img_size / crop_pct`` then centre-crops ``img_size``.
        drop_last: drop the last incomplete training batch (needed by batch-mode mixup).
        val_fraction: when set, carve a validation split of this fraction from train (seeded by
            ``split_seed``, stratified by label when the label column is a ``ClassLabel``) instead of
            using the benchmark's own validation split. Hyperparameters are selected on it, never on test.
        data_path: a local copy of the registry benchmark ``benchmark`` (same layouts as a local
            ``benchmark`` path, e.g. an ILSVRC-2012 tree with ``train/`` and ``val/`` class folders);
            the registry still fixes split roles, columns, classes and metric.
        test_fraction: for a local dataset without a test split, carve a test split of this
            fraction from train (seeded by ``split_seed``, stratified like ``val_fraction``).
        corrupt_policy: ``error`` stops at the first undecodable image and names its index and file.
            ``skip`` leaves such images out with one warning each, and the result record counts them.
    """

    def __init__(
        self,
        benchmark: str = "digits",
        *,
        input_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 2,
        image_column: str | None = None,
        label_column: str | None = None,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        auto_augment: str | None = None,
        color_jitter: float | None = None,
        re_prob: float = 0.0,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        drop_last: bool = False,
        val_fraction: float | None = None,
        split_seed: int = 0,
        data_path: str | None = None,
        test_fraction: float | None = None,
        corrupt_policy: CorruptPolicy = "error",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.benchmark = benchmark
        self.entry = self._resolve_entry(benchmark)
        if data_path is not None and benchmark not in BENCHMARKS:
            raise ValueError(
                f"data_path {data_path!r} needs a registry benchmark name, got {benchmark!r}; "
                "pass the path as data.benchmark for a dataset outside the registry"
            )
        self.data_path = data_path
        self.input_size = input_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        # Requested names; the resolved names are set by load_splits (None until then for detection).
        self._requested_columns = (image_column or self.entry.image_column, label_column or self.entry.label_column)
        self._column_source = "set in data" if image_column or label_column else f"registry entry {self.entry.name!r}"
        self.image_column, self.label_column = self._requested_columns
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if fraction is not None and not 0.0 < fraction < 1.0:
                raise ValueError(f"{name} {fraction} must lie in (0, 1), e.g. 0.1")
        if corrupt_policy not in CORRUPT_POLICIES:
            raise ValueError(f"corrupt_policy {corrupt_policy!r} is invalid; choose one of {', '.join(CORRUPT_POLICIES)}")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.corrupt_policy = corrupt_policy
        # role -> split name; a carved validation split gets its own name.
        self.splits = dict(self.entry.splits)
        if val_fraction is not None:
            self.splits["validation"] = CARVED_VALIDATION
        self._splits: DatasetDict | None = None
        self.datasets: dict[str, TransformedSplit] = {}
        self._train_loader: ResumableLoader | None = None
        self._train_loader_state: dict = {}  # restored from a checkpoint, applied to the next train loader

    @staticmethod
    def _resolve_entry(benchmark: str) -> Benchmark:
        if benchmark in BENCHMARKS:
            return BENCHMARKS[benchmark]
        if Path(benchmark).expanduser().exists():
            return local_entry(benchmark)
        return get_benchmark(benchmark)  # raises with the list of valid names

    @property
    def is_local(self) -> bool:
        """True for a dataset given by path rather than by registry name."""
        return self.benchmark not in BENCHMARKS

    # ---- loading -----------------------------------------------------------------------------

    def load_splits(self) -> DatasetDict:
        """Return the benchmark's splits (loaded once); resolves the image and label columns."""
        if self._splits is None:
            splits = self._load_raw()
            if self.is_local:
                self._assign_local_roles(splits)
            self._check_split_names(splits)
            features = splits[self.splits["train"]].features
            self.image_column, self.label_column = resolve_columns(
                features, image_column=self._requested_columns[0], label_column=self._requested_columns[1],
                source=self._column_source,
            )
            self._check_class_count(features)
            if self.is_local and self.splits.get("test") is None and self.test_fraction is not None:
                splits = self._carve(splits, self.test_fraction, CARVED_TEST)
                self.splits["test"] = CARVED_TEST
            if self.val_fraction is not None:
                splits = self._carve(splits, self.val_fraction, CARVED_VALIDATION)
            self._splits = splits
        return self._splits

    def _load_raw(self) -> DatasetDict:
        entry = self.entry
        if self.data_path is not None:
            return load_local(self.data_path, cache_dir=str(cache_root() / "hf_datasets"))
        if entry.name == "digits":
            return load_from_disk(str(digits_path()))
        if entry.hub_id is not None:
            return load_hub(entry)
        return load_local(self.benchmark, cache_dir=str(cache_root() / "hf_datasets"))

    def _assign_local_roles(self, splits: DatasetDict) -> None:
        """Map roles to the split names a local dataset actually has."""
        available = set(splits)
        if "train" not in available:
            raise ValueError(
                f"local dataset {self.benchmark!r} has no train split (splits: {', '.join(sorted(available))}); "
                "name the training split 'train'"
            )
        self.splits["validation"] = (
            CARVED_VALIDATION if self.val_fraction is not None
            else "validation" if "validation" in available else None
        )
        self.splits["test"] = "test" if "test" in available else None

    def _check_class_count(self, features) -> None:
        """Compare the label ``ClassLabel`` with the registry's class count.

        A hub copy that disagrees raises ``ValueError``. A local copy (``data_path``) only logs a
        warning, because a subset of the classes is a legitimate local copy.
        """
        feature = features.get(self.label_column)
        expected = self.entry.num_classes
        if expected <= 0 or not isinstance(feature, ClassLabel) or feature.num_classes == expected:
            return
        problem = (
            f"benchmark {self.entry.name!r}: label column {self.label_column!r} has {feature.num_classes} classes "
            f"but the registry expects {expected}"
        )
        if self.data_path is not None:
            log.warning("%s; the model keeps %d outputs", problem, expected)
            return
        raise ValueError(
            f"{problem}; the hub copy may have changed, or the label column is another annotation level; "
            "set data.label_column, or pass the dataset's path as data.benchmark"
        )

    def _check_split_names(self, splits: DatasetDict) -> None:
        for role, name in self.splits.items():
            if name is not None and name not in (CARVED_VALIDATION, CARVED_TEST) and name not in splits:
                raise ValueError(
                    f"benchmark {self.entry.name!r}: the {role} split {name!r} is missing; "
                    f"available splits: {', '.join(splits)}"
                )

    def _carve(self, splits: DatasetDict, fraction: float, name: str) -> DatasetDict:
        train_name = self.splits["train"]
        train = splits[train_name]
        stratify = self.label_column if isinstance(train.features.get(self.label_column), ClassLabel) else None
        parts = train.train_test_split(test_size=fraction, seed=self.split_seed, stratify_by_column=stratify)
        return DatasetDict({**splits, train_name: parts["train"], name: parts["test"]})

    def split_name(self, role: str) -> str:
        """Dataset split used for ``role`` (``train``, ``validation`` or ``test``)."""
        if role not in self.splits:
            raise ValueError(f"unknown role {role!r}; valid roles: {', '.join(self.splits)}")
        name = self.splits.get(role)
        if name is None:
            if role == "test":
                raise ValueError(
                    f"local dataset {self.entry.name!r} has no test split; add a test/ folder or split, "
                    "or set data.test_fraction (e.g. 0.2) to carve a seeded one from train"
                )
            raise ValueError(
                f"benchmark {self.entry.name!r} has no {role} split besides the reported one; "
                "set data.val_fraction (e.g. 0.1) to carve a seeded validation split from train"
            )
        return name

    @property
    def num_classes(self) -> int:
        """Number of classes, read from the label column's ``ClassLabel`` feature where there is one."""
        if self.entry.num_classes > 0:
            return self.entry.num_classes
        splits = self.load_splits()
        feature = splits[self.split_name("train")].features[self.label_column]
        if isinstance(feature, ClassLabel):
            return feature.num_classes
        return int(max(int(np.max(_labels(splits[name], self.label_column))) for name in splits)) + 1

    @property
    def class_names(self) -> list[str] | None:
        """Class names by label index: the registry's, else the ``ClassLabel`` names, else None."""
        if self.entry.class_names is not None:
            return list(self.entry.class_names)
        feature = self.load_splits()[self.split_name("train")].features[self.label_column]
        return list(feature.names) if isinstance(feature, ClassLabel) else None

    @property
    def metric(self) -> str:
        """The benchmark's standard metric name (``top1`` or ``mean_per_class``)."""
        return self.entry.metric

    # ---- transforms --------------------------------------------------------------------------

    def build_transform(self, is_training: bool):
        """timm transform for training (augmented) or evaluation (resize, centre crop)."""
        hp = self.hparams
        return create_transform(
            input_size=self.input_size,
            is_training=is_training,
            scale=tuple(hp.scale),
            hflip=hp.hflip,
            color_jitter=hp.color_jitter,
            auto_augment=hp.auto_augment,
            interpolation=hp.interpolation,
            re_prob=hp.re_prob,
            re_mode="pixel",
            re_count=1,
            crop_pct=hp.crop_pct,
            mean=D2V_MEAN,
            std=D2V_STD,
        )

    def setup(self, stage: str | None = None) -> None:
        splits = self.load_splits()
        roles = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                 "predict": ("test",)}.get(stage, ("train", "validation", "test"))
        for role in roles:
            if role == "validation" and self.splits.get("validation") is None:
                continue
            name = self.split_name(role)
            check_labels(splits[name], self.label_column, self.num_classes, split_name=name)
            self.datasets[role] = TransformedSplit(
                splits[name], self.build_transform(is_training=role == "train"),
                self.image_column, self.label_column,
                corrupt_policy=self.corrupt_policy, split_name=name,
            )

    # ---- loaders -----------------------------------------------------------------------------

    def _loader_options(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "collate_fn": CollateSkippingNone(self.input_size) if self.corrupt_policy == "skip" else None,
        }

    def _evaluation_loader(self, role: str) -> DataLoader:
        dataset = self.datasets[role]
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Every evaluation sample counts once: shard without the padding DistributedSampler adds.
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(dataset, sampler=sampler, shuffle=False, **self._loader_options())

    def _shuffle_seed(self) -> int:
        """Return the run seed (``seed_everything``), else a fresh one, broadcast so every process uses it."""
        seed = run_seed()
        if seed is None:
            seed = fresh_seed()
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            seed = trainer.strategy.broadcast(seed, src=0)
        return seed

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled training batches that resume mid-epoch from a Lightning checkpoint.

        Each augmented image draws its random numbers from a seed fixed by (run seed, epoch, sample
        index). So the batches of a run resumed after any optimizer step, with any ``num_workers``,
        equal those of an uninterrupted run.
        """
        dataset = self.datasets["train"]
        trainer = self.trainer
        distributed = trainer is not None and trainer.world_size > 1
        sampler = ResumableSampler(
            dataset, seed=self._shuffle_seed(),
            num_replicas=trainer.world_size if distributed else 1, rank=trainer.global_rank if distributed else 0,
            with_seeds=isinstance(dataset, TransformedSplit),
        )
        loader = ResumableLoader(dataset, sampler=sampler, drop_last=self.hparams.drop_last, **self._loader_options())
        if trainer is not None:
            loader.position = partial(training_position, trainer)
        if self._train_loader_state:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = {}
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict:
        """Checkpoint state: the training loader's position (see :class:`ResumableLoader`)."""
        if self._train_loader is None or self.trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep a checkpoint's training-loader position for the next ``train_dataloader()``."""
        self._train_loader_state = dict(state_dict.get("train_loader", {}))

    def val_dataloader(self) -> DataLoader | list:
        return self._evaluation_loader("validation") if "validation" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def split_size(self, role: str) -> int:
        return len(self.datasets[role])

    # ---- result records ----------------------------------------------------------------------

    def _batch_limit(self, role: str, split_size: int) -> int | float | None:
        """Return the Trainer's ``limit_val_batches`` or ``limit_test_batches`` if it cuts ``role`` short, else None."""
        trainer = self.trainer
        if trainer is None or role not in ("validation", "test"):
            return None
        limit = trainer.limit_val_batches if role == "validation" else trainer.limit_test_batches
        if isinstance(limit, float):
            return limit if limit < 1.0 else None
        batches_per_process = math.ceil(math.ceil(split_size / trainer.world_size) / self.batch_size)
        return limit if limit < batches_per_process else None

    def record_extras(self, role: str, num_samples: int) -> dict:
        """Record fields for an evaluated ``role``: split size, skipped samples, batch limit and standard metric.

        ``num_samples`` is the count of samples evaluated over all processes. On a whole split, the
        difference to the split size is what the ``skip`` corrupt-file policy left out. Under a
        Trainer batch limit (``batch_limit``), part of the split was never loaded and
        ``num_skipped`` is None.
        """
        if role not in self.datasets:
            return {"split_size": None, "num_skipped": None, "batch_limit": None, "metric": self.metric}
        split_size = self.split_size(role)
        limit = self._batch_limit(role, split_size)
        skipped = None if limit is not None else split_size - num_samples
        if limit is not None:
            log.warning(
                "split %r: evaluated %d of %d samples because the Trainer limits %s batches to %s; the record "
                "does not describe the whole split", self.split_name(role), num_samples, split_size, role, limit,
            )
        elif skipped:
            log.warning(
                "split %r: evaluated %d of %d samples, %d skipped as undecodable",
                self.split_name(role), num_samples, split_size, skipped,
            )
        return {"split_size": split_size, "num_skipped": skipped, "batch_limit": limit, "metric": self.metric}


def _labels(split, label_column: str) -> np.ndarray:
    """Read the label column as a NumPy array, honouring any index mapping (e.g. after a carved split)."""
    return np.asarray(split.with_format("numpy")[label_column])


def check_labels(split, label_column: str, num_classes: int, *, split_name: str) -> None:
    """Raise ``ValueError`` naming the first sample whose label lies outside ``[0, num_classes)``."""
    labels = _labels(split, label_column)
    if labels.size == 0:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        first = int(bad[0])
        raise ValueError(
            f"split {split_name!r}: label {labels[first]} of sample {first} lies outside [0, {num_classes}) "
            f"({bad.size} such samples); check data.label_column ({label_column!r}) and the benchmark's "
            "class count"
        )


def offline_hint(entry: Benchmark) -> str:
    """Describe how to make ``entry`` available on a machine without network access."""
    return (
        f"on a machine with network access run `d2v-eval data prepare {entry.name}` with the same "
        "HF_HOME (or HF_DATASETS_CACHE) as the offline job, then run offline with HF_DATASETS_OFFLINE=1; "
        f"or pass a local copy with data.data_path"
    )


def load_hub(entry: Benchmark) -> DatasetDict:
    """Load ``entry`` from the Hugging Face hub or its cache, with an actionable error when unreachable."""
    try:
        return load_dataset(entry.hub_id, entry.hub_config)
    except (ConnectionError, FileNotFoundError) as error:
        gated = " It is gated: accept its terms on the hub and log in (`hf auth login`) first." if (
            entry.name == "imagenet-1k") else ""
        raise ConnectionError(
            f"benchmark {entry.name!r} (hub dataset {entry.hub_id!r}) is neither reachable nor in the "
            f"Hugging Face cache: {error}.{gated} To prepare it: {offline_hint(entry)}"
        ) from error
