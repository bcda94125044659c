"""Feature cache: keys track everything features depend on; bad entries are rebuilt, never read."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from d2v_eval.encoders import load_encoder
from d2v_eval.encoders.loader import weights_fingerprint
from d2v_eval.protocols.feature_cache import ProcessView, cached_features, feature_cache_key
from d2v_eval.protocols.features import FeatureSpec, extract_features

MICRO = "data2vec_vision_micro_patch4_16"


pytestmark = pytest.mark.usefixtures("one_thread")


def _key(**changes) -> str:
    fields = dict(
        encoder_fingerprint="a" * 64, benchmark="digits", split="train", split_fingerprint="f0",
        num_samples=100, transform="Compose(Resize(16), CenterCrop(16))", spec=FeatureSpec("cls"), dtype="float16",
    )
    fields.update(changes)
    return feature_cache_key(**fields)[0]


def test_cache_key_changes_with_inputs():
    base = _key()
    assert _key() == base
    assert _key(transform="Compose(Resize(18), CenterCrop(16))") != base
    assert _key(split="validation") != base
    assert _key(split_fingerprint="f1") != base
    assert _key(encoder_fingerprint="b" * 64) != base
    assert _key(spec=FeatureSpec("mean")) != base
    assert _key(dtype="float32") != base


def test_fingerprint_changes_with_weights():
    torch.manual_seed(0)
    first = load_encoder(MICRO, global_pool="token")
    torch.manual_seed(1)
    second = load_encoder(MICRO, global_pool="token")
    assert weights_fingerprint(first) == weights_fingerprint(first)
    assert weights_fingerprint(first) != weights_fingerprint(second)


def _dataset(count: int = 10) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(count, 3, 16, 16, generator=generator), torch.arange(count) % 3)


def _build(encoder, dataset, process=None):
    spec = FeatureSpec("cls")
    keys = {spec.name: feature_cache_key(
        encoder_fingerprint=weights_fingerprint(encoder), benchmark="synthetic", split="train",
        split_fingerprint=None, num_samples=len(dataset), transform="none", spec=spec, dtype="float32",
    )}
    return cached_features(encoder, dataset, [spec], keys, batch_size=4, process=process)[spec.name]


def test_cache_rows_in_order_and_reused():
    encoder = load_encoder(MICRO, global_pool="token").eval()
    dataset = _dataset()
    entry = _build(encoder, dataset)
    expected = extract_features(encoder, dataset.tensors[0], [FeatureSpec("cls")])["cls-last1-norm"]
    np.testing.assert_allclose(entry.features, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(entry.labels, dataset.tensors[1].numpy())
    mtime = (entry.path / "features.npy").stat().st_mtime_ns
    assert (_build(encoder, dataset).path / "features.npy").stat().st_mtime_ns == mtime


def test_shards_of_two_ranks_assemble_in_order():
    encoder = load_encoder(MICRO, global_pool="token").eval()
    dataset = _dataset(9)
    single = np.array(_build(encoder, _dataset(9)).features)
    # Two ranks run one after the other: rank 1 writes its shard, then rank 0 writes and assembles.
    spec = FeatureSpec("cls")
    from d2v_eval.protocols import feature_cache

    key, fields = feature_cache_key(
        encoder_fingerprint="two-ranks", benchmark="synthetic", split="train", split_fingerprint=None,
        num_samples=9, transform="none", spec=spec, dtype="float32",
    )
    path = feature_cache.feature_cache_dir() / key
    path.mkdir(parents=True)
    for rank in (1, 0):
        feature_cache._write_shards(
            encoder, dataset, [spec], {spec.name: path}, {spec.name: 32}, "float32",
            batch_size=2, num_workers=0, device=torch.device("cpu"), process=ProcessView(rank=rank, world_size=2),
        )
    feature_cache._assemble(path, key, fields, 32, world_size=2)
    entry, reason = feature_cache.open_entry(path, key, fields, 32)
    assert reason == ""
    np.testing.assert_allclose(entry.features, single, rtol=1e-6, atol=1e-6)
    assert not list(path.glob("shard-*"))


def test_truncated_entry_rebuilt_with_warning(caplog):
    encoder = load_encoder(MICRO, global_pool="token").eval()
    dataset = _dataset()
    entry = _build(encoder, dataset)
    good = np.array(entry.features)
    features_path = entry.path / "features.npy"
    features_path.write_bytes(features_path.read_bytes()[:-40])

    with caplog.at_level(logging.WARNING):
        rebuilt = _build(encoder, dataset)
    assert "is invalid" in caplog.text
    assert "bytes" in caplog.text
    np.testing.assert_array_equal(np.array(rebuilt.features), good)


def test_foreign_entry_rebuilt_with_warning(caplog):
    encoder = load_encoder(MICRO, global_pool="token").eval()
    dataset = _dataset()
    entry = _build(encoder, dataset)
    meta_path = entry.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["key"] = "0" * 32
    meta["fields"]["encoder_fingerprint"] = "another-encoder"
    meta_path.write_text(json.dumps(meta))

    with caplog.at_level(logging.WARNING):
        rebuilt = _build(encoder, dataset)
    assert "belongs to key '00000000000000000000000000000000'" in caplog.text
    assert json.loads(meta_path.read_text())["key"] == rebuilt.path.name


def test_two_processes_share_one_cache(tmp_path):
    """Two gloo processes extract a shard each of the validation split and count every sample once."""
    import pytorch_lightning as pl

    from d2v_eval import ImageClassificationData, LinearProbe
    from d2v_eval.data.datamodule import TransformedSplit
    from d2v_eval.results import ResultRecorder

    pl.seed_everything(0)
    probe = LinearProbe(MICRO, num_classes=10, features=[FeatureSpec("cls")], lrs=[0.01, 0.1], batch_norm=[True],
                        lr_rule="absolute", cache_dtype="float32")
    data = ImageClassificationData("digits", input_size=16, batch_size=32, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ResultRecorder(records_dir=str(tmp_path / "records"))],
    )
    trainer.validate(probe, data)

    record = json.loads(next((tmp_path / "records").glob("*.json")).read_text())
    assert record["world_size"] == 2
    assert record["num_samples"] == 180
    assert all(head["val"]["num_samples"] == 180 for head in record["linear_probe"]["heads"])

    cache_path = Path(record["linear_probe"]["feature_cache"]["entries"]["validation"]["cls-last1-norm"])
    assert not list(cache_path.glob("shard-*"))
    features = np.load(cache_path / "features.npy")
    split = data.load_splits()["validation"]
    dataset = TransformedSplit(split, data.build_transform(is_training=False), "image", "label")
    images = torch.stack([dataset[index][0] for index in range(4)])
    expected = extract_features(probe.encoder.eval(), images, [FeatureSpec("cls")])["cls-last1-norm"]
    np.testing.assert_allclose(features[:4], expected.numpy(), rtol=1e-4, atol=1e-5)
