"""``ImageClassificationData``: a LightningDataModule over Hugging Face ``datasets``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from datasets import ClassLabel, DatasetDict, load_dataset, load_from_disk
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from d2v_eval.data import timm_compat  # noqa: F401  (RandAugment posterize under Pillow 13)
from d2v_eval.data.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from d2v_eval.data.digits import digits_path
from d2v_eval.data.images import to_rgb

log = logging.getLogger(__name__)

# data2vec-vision normalisation (facebookresearch/data2vec_vision, beit/datasets.py: mean = std = 0.5).
D2V_MEAN = (0.5, 0.5, 0.5)
D2V_STD = (0.5, 0.5, 0.5)
# Name of a validation split carved from train by ``val_fraction``.
CARVED_VALIDATION = "validation_from_train"


class TransformedSplit(Dataset):
    """A Hugging Face split seen as ``(image tensor (3, H, W), label)`` pairs."""

    def __init__(self, split, transform, image_column: str, label_column: str):
        self.split = split
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        row = self.split[index]
        image = to_rgb(row[self.image_column])
        return self.transform(image), int(row[self.label_column])


class ImageClassificationData(pl.LightningDataModule):
    """Image classification data for a named benchmark or a local dataset.

    Args:
        benchmark: a registry name (``d2v-eval data list``) or the path of a dataset saved with
            ``DatasetDict.save_to_disk``.
        input_size: input resolution in pixels (square); LightningCLI links it from the encoder.
        batch_size: samples per device and step.
        hflip, scale, auto_augment, color_jitter, re_prob: training augmentation, passed to timm's
            ``create_transform`` (``auto_augment`` e.g. ``"rand-m9-mstd0.5-inc1"``).
        crop_pct: evaluation resizes to ``img_size / crop_pct`` then centre-crops ``img_size``.
        drop_last: drop the last incomplete training batch (needed by batch-mode mixup).
        val_fraction: when set, carve a validation split of this fraction from train (seeded by
            ``split_seed``, stratified by label when the label column is a ``ClassLabel``) instead of
            using the benchmark's own validation split. Hyperparameters are selected on it, never on test.
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
    ):
        super().__init__()
        self.save_hyperparameters()
        self.benchmark = benchmark
        self.entry = self._resolve_entry(benchmark)
        self.input_size = input_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_column = image_column or self.entry.image_column
        self.label_column = label_column or self.entry.label_column
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction {val_fraction} must lie in (0, 1), e.g. 0.1")
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        # role -> split name; a carved validation split gets its own name.
        self.splits = dict(self.entry.splits)
        if val_fraction is not None:
            self.splits["validation"] = CARVED_VALIDATION
        self._splits: DatasetDict | None = None
        self.datasets: dict[str, TransformedSplit] = {}

    @staticmethod
    def _resolve_entry(benchmark: str) -> Benchmark:
        if benchmark in BENCHMARKS:
            return BENCHMARKS[benchmark]
        if Path(benchmark).expanduser().exists():
            return Benchmark(
                name=str(benchmark), hub_id=None, num_classes=-1,
                splits={"train": "train", "validation": "validation", "test": "test"},
            )
        return get_benchmark(benchmark)  # raises with the list of valid names

    # ---- loading -----------------------------------------------------------------------------

    def load_splits(self) -> DatasetDict:
        """Return the benchmark's splits (loaded once)."""
        if self._splits is None:
            if self.entry.name == "digits":
                self._splits = load_from_disk(str(digits_path()))
            elif self.entry.hub_id is not None:
                self._splits = load_dataset(self.entry.hub_id, self.entry.hub_config)
            else:
                self._splits = load_from_disk(str(Path(self.benchmark).expanduser()))
            if self.val_fraction is not None:
                self._splits = self._carve_validation(self._splits)
        return self._splits

    def _carve_validation(self, splits: DatasetDict) -> DatasetDict:
        train_name = self.entry.splits["train"]
        train = splits[train_name]
        stratify = self.label_column if isinstance(train.features.get(self.label_column), ClassLabel) else None
        parts = train.train_test_split(
            test_size=self.val_fraction, seed=self.split_seed, stratify_by_column=stratify
        )
        return DatasetDict({**splits, train_name: parts["train"], CARVED_VALIDATION: parts["test"]})

    def split_name(self, role: str) -> str:
        """Dataset split used for ``role`` (``train``, ``validation`` or ``test``)."""
        name = self.splits.get(role)
        if name is None:
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
        return int(max(max(splits[name][self.label_column]) for name in splits)) + 1

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
            self.datasets[role] = TransformedSplit(
                splits[self.split_name(role)], self.build_transform(is_training=role == "train"),
                self.image_column, self.label_column,
            )

    # ---- loaders -----------------------------------------------------------------------------

    def _loader(self, role: str, *, shuffle: bool, drop_last: bool = False) -> DataLoader:
        dataset = self.datasets[role]
        sampler = None
        trainer = self.trainer
        if not shuffle and trainer is not None and trainer.world_size > 1:
            # Every evaluation sample counts once: shard without the padding DistributedSampler adds.
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, drop_last=self.hparams.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("validation", shuffle=False) if "validation" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def split_size(self, role: str) -> int:
        return len(self.datasets[role])
