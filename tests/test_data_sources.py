"""Registry entries, local layouts, column detection, label checks and the corrupt-file policy."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as ImageFeature, Value
from PIL import Image
from torch.utils.data import DataLoader

from d2v_eval.cli import main
from d2v_eval.data import BENCHMARKS, ImageClassificationData
from d2v_eval.data.columns import resolve_columns
from d2v_eval.data.datamodule import CollateSkippingNone, CorruptImageError, load_hub
from d2v_eval.data.local import load_local
from d2v_eval.results import read_records

REPO = Path(__file__).resolve().parents[1]


def _image(seed: int, size: int = 12) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _write_tree(root: Path, layout: dict[str, dict[str, int]]) -> None:
    """Write ``layout[split][class] = count`` PNG files under ``root`` ("" split means no split folder)."""
    seed = 0
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _image(seed).save(folder / f"{i}.png")
                seed += 1


# ---- columns -------------------------------------------------------------------------------

CIFAR10_FEATURES = Features({"img": ImageFeature(), "label": ClassLabel(num_classes=10)})
PETS_FEATURES = Features({"image": ImageFeature(), "image_id": Value("string"), "label": ClassLabel(num_classes=37)})
CIFAR100_FEATURES = Features({
    "img": ImageFeature(), "fine_label": ClassLabel(num_classes=100), "coarse_label": ClassLabel(num_classes=20),
})


def test_columns_detected_cifar10_shape():
    assert resolve_columns(CIFAR10_FEATURES) == ("img", "label")


def test_columns_detected_pets_shape():
    assert resolve_columns(PETS_FEATURES) == ("image", "label")


def test_columns_cifar100_needs_choice():
    with pytest.raises(ValueError, match="several ClassLabel columns: fine_label, coarse_label") as info:
        resolve_columns(CIFAR100_FEATURES)
    assert "set data.label_column" in str(info.value)
    assert resolve_columns(CIFAR100_FEATURES, label_column="coarse_label") == ("img", "coarse_label")


def test_columns_wrong_name_lists_available():
    with pytest.raises(ValueError, match="'target'.*available columns: img, label"):
        resolve_columns(CIFAR10_FEATURES, label_column="target")


def test_columns_integer_label_fallback():
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    assert resolve_columns(features) == ("image", "label")


# ---- registry entries from local copies ---------------------------------------------------

def _registry_copy(name: str, root: Path) -> Path:
    """A six-rows-per-split copy of registry entry ``name`` with its split names and features."""
    entry = BENCHMARKS[name]
    features = {entry.image_column: ImageFeature(), entry.label_column: ClassLabel(num_classes=entry.num_classes)}
    if name.startswith("cifar100"):
        features = {"img": ImageFeature(), "fine_label": ClassLabel(num_classes=100),
                    "coarse_label": ClassLabel(num_classes=20)}
    splits = {}
    for role, split in entry.splits.items():
        if split is None:
            continue
        rows = {column: [] for column in features}
        for i in range(6):
            for column, feature in features.items():
                # Two classes of three rows each, so that a stratified carve works.
                value = _image(i) if isinstance(feature, ImageFeature) else (i // 3) * (feature.num_classes - 1)
                rows[column].append(value)
        splits[split] = Dataset.from_dict(rows, features=Features(features))
    target = root / name
    DatasetDict(splits).save_to_disk(str(target))
    return target


@pytest.mark.parametrize("name", [name for name in BENCHMARKS if name != "imagenet-1k"])
def test_registry_entry_loads_local_copy(name, tmp_path):
    data = ImageClassificationData(name, data_path=str(_registry_copy(name, tmp_path)), input_size=16,
                                   num_workers=0, val_fraction=None if BENCHMARKS[name].splits["validation"] else 0.5)
    data.setup("fit")
    data.setup("test")
    entry = BENCHMARKS[name]
    assert data.num_classes == entry.num_classes
    assert data.image_column == entry.image_column
    assert data.label_column == entry.label_column
    for role in ("train", "validation", "test"):
        image, label = data.datasets[role][0]
        assert tuple(image.shape) == (3, 16, 16), role
        assert 0 <= label < entry.num_classes, role
    names = data.class_names
    if entry.class_names is not None:
        assert len(names) == entry.num_classes


def test_imagenet_local_class_folders(tmp_path, caplog):
    _write_tree(tmp_path, {"train": {"n01440764": 2, "n01443537": 2}, "val": {"n01440764": 1, "n01443537": 1}})
    data = ImageClassificationData("imagenet-1k", data_path=str(tmp_path), input_size=16, num_workers=0)
    with caplog.at_level(logging.WARNING):
        data.setup("test")
    assert "has 2 classes but the registry expects 1000; the model keeps 1000 outputs" in caplog.text
    assert data.split_name("test") == "validation"
    assert data.split_size("test") == 2
    assert data.num_classes == 1000
    assert [data.datasets["test"][i][1] for i in range(2)] == [0, 1]


# ---- local layouts -----------------------------------------------------------------------

def test_class_folders_with_split_folders(tmp_path):
    _write_tree(tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 2}})
    splits = load_local(tmp_path)
    assert sorted(splits) == ["test", "train", "validation"]
    assert splits["train"].features["label"].names == ["cat", "dog"]
    assert list(splits["test"]["label"]) == [0, 1, 1]


def test_class_folders_seeded_test_split(tmp_path):
    _write_tree(tmp_path, {"": {"a": 5, "b": 5}})
    data = ImageClassificationData(str(tmp_path), input_size=16, num_workers=0, test_fraction=0.4, split_seed=1)
    data.setup("test")
    assert data.split_name("test") == "test_from_train"
    assert data.split_size("test") == 4
    assert data.num_classes == 2
    assert len(data.load_splits()["train"]) == 6


def test_local_without_test_split_asks_for_fraction(tmp_path):
    _write_tree(tmp_path, {"": {"a": 2, "b": 2}})
    data = ImageClassificationData(str(tmp_path), input_size=16, num_workers=0)
    with pytest.raises(ValueError, match="test_fraction"):
        data.setup("test")


def test_empty_class_folder_is_named(tmp_path):
    _write_tree(tmp_path, {"train": {"cat": 2}})
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*train/dog is empty"):
        load_local(tmp_path)


def test_parquet_folder_and_saved_dataset(tmp_path):
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["x", "y"])})
    table = Dataset.from_dict({"image": [_image(i) for i in range(4)], "label": [0, 1, 0, 1]}, features=features)
    (tmp_path / "pq").mkdir()
    table.to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    table.select(range(2)).to_parquet(str(tmp_path / "pq" / "test-00000-of-00001.parquet"))
    parquet = load_local(tmp_path / "pq", cache_dir=str(tmp_path / "cache"))
    assert {name: len(split) for name, split in parquet.items()} == {"train": 4, "test": 2}
    assert isinstance(parquet["train"].features["image"], ImageFeature)

    table.save_to_disk(str(tmp_path / "saved"))
    saved = load_local(tmp_path / "saved")
    assert list(saved) == ["train"]
    assert len(saved["train"]) == 4


# ---- bad input ---------------------------------------------------------------------------

def test_label_out_of_range_names_sample(tmp_path):
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    rows = {"image": [_image(i) for i in range(4)], "label": [1, 0, 12, -1]}
    DatasetDict({"train": Dataset.from_dict(rows, features=features),
                 "test": Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "d"))
    data = ImageClassificationData("cifar10", data_path=str(tmp_path / "d"), input_size=16, num_workers=0,
                                   image_column="image")
    with pytest.raises(ValueError, match=r"label 12 of sample 2 lies outside \[0, 10\)"):
        data.setup("test")


def test_hub_offline_error_names_dataset():
    # conftest sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, so nothing is downloaded.
    with pytest.raises(ConnectionError) as info:
        load_hub(BENCHMARKS["pets"])
    message = str(info.value)
    assert "timm/oxford-iiit-pet" in message
    assert "d2v-eval data prepare pets" in message
    assert "data.data_path" in message


def test_unknown_split_role_lists_roles():
    data = ImageClassificationData("digits", input_size=16, num_workers=0)
    with pytest.raises(ValueError, match="valid roles: train, validation, test"):
        data.split_name("holdout")


def test_data_list_prints_every_entry(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name, entry in BENCHMARKS.items():
        assert f"| {name} |" in out
    assert "mean_per_class" in out


def test_data_prepare_offline_exit_status(caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["data", "prepare", "cifar10"]) == 1
    assert "uoft-cs/cifar10" in caplog.text


# ---- corrupt files -----------------------------------------------------------------------

@pytest.fixture
def tree_with_bad_files(tmp_path) -> Path:
    root = tmp_path / "tree"
    _write_tree(root, {"train": {"a": 3, "b": 3}, "test": {"a": 3, "b": 3}})
    (root / "test" / "a" / "1.png").write_bytes(b"not an image")  # sample 1
    png = (root / "test" / "b" / "0.png").read_bytes()
    (root / "test" / "b" / "0.png").write_bytes(png[: len(png) // 2])  # truncated, sample 3
    (root / "test" / "b" / "notes.txt").write_text("a stray text file")  # sample 6
    return root


def _test_loader(root: Path, policy: str, workers: int) -> DataLoader:
    data = ImageClassificationData(str(root), input_size=16, num_workers=workers, corrupt_policy=policy, batch_size=4)
    data.setup("test")
    return data.test_dataloader()


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_error_names_sample_and_file(tree_with_bad_files, workers):
    with pytest.raises(CorruptImageError, match=r"sample 1 of split 'test' \(file .*test/a/1\.png\)"):
        for _ in _test_loader(tree_with_bad_files, "error", workers):
            pass


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_skip_drops_bad_samples(tree_with_bad_files, workers, caplog):
    with caplog.at_level(logging.WARNING):
        labels = [label for _, batch in _test_loader(tree_with_bad_files, "skip", workers) for label in batch.tolist()]
    assert len(labels) == 7 - 3
    assert labels == [0, 0, 1, 1]
    if workers == 0:  # worker processes log to their own copies of the handlers
        assert caplog.text.count("skipping sample") == 3


def test_skip_collate_empty_batch():
    images, labels = CollateSkippingNone(16)([None, None])
    assert tuple(images.shape) == (0, 3, 16, 16)
    assert tuple(labels.shape) == (0,)


def test_skip_policy_record_counts(tree_with_bad_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["test", "--config", str(REPO / "configs" / "demo_linear_probe.yaml"),
          f"--data.benchmark={tree_with_bad_files}", "--data.corrupt_policy=skip", "--data.num_workers=0",
          "--model.init_args.encoder=data2vec_vision_micro_patch4_16", "--trainer.enable_progress_bar=false",
          "--trainer.logger=false", f"--recorder.records_dir={tmp_path / 'records'}"])
    (record,) = read_records(tmp_path / "records")
    assert record["num_samples"] == 4
    assert record["split_size"] == 7
    assert record["num_skipped"] == 3
    assert record["metric"] == "top1"
    assert json.dumps(record)


def test_registry_class_count_mismatch(monkeypatch):
    """A hub copy whose ClassLabel disagrees with the registry (sun397's viewer reports 287, not 397)."""
    monkeypatch.setitem(BENCHMARKS, "digits", dataclasses.replace(BENCHMARKS["digits"], num_classes=12))
    data = ImageClassificationData("digits", input_size=16, num_workers=0)
    with pytest.raises(ValueError, match="label column 'label' has 10 classes but the registry expects 12"):
        data.setup("fit")
