"""``ResumableSampler`` and ``ResumableLoader``: seeded order, sharding, mid-epoch resume, per-sample seeds."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from d2v_eval.data import ImageClassificationData
from d2v_eval.data.sampler import ResumableLoader, ResumableSampler


def _epoch(sampler: ResumableSampler, epoch: int) -> list:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_shards_cover_dataset_once():
    dataset = list(range(10))
    shards = [_epoch(ResumableSampler(dataset, seed=3, num_replicas=3, rank=rank), 0) for rank in range(3)]
    assert [len(shard) for shard in shards] == [4, 4, 4]  # 10 padded to 12
    merged = [index for shard in shards for index in shard]
    assert sorted(set(merged)) == dataset
    assert len(merged) - len(set(merged)) == 2  # only the padding repeats


def test_order_depends_on_seed_and_epoch():
    dataset = list(range(50))
    sampler = ResumableSampler(dataset, seed=3)
    assert _epoch(sampler, 0) == _epoch(ResumableSampler(dataset, seed=3), 0)
    assert _epoch(sampler, 0) != _epoch(sampler, 1)
    assert _epoch(sampler, 0) != _epoch(ResumableSampler(dataset, seed=4), 0)
    assert sorted(_epoch(sampler, 1)) == dataset


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_resume_continues_epoch(num_replicas):
    dataset = list(range(23))
    batch_size, batches_done = 3, 2
    for rank in range(num_replicas):
        uninterrupted = _epoch(ResumableSampler(dataset, seed=7, num_replicas=num_replicas, rank=rank, with_seeds=True), 4)

        resumed = ResumableSampler(dataset, seed=0, num_replicas=num_replicas, rank=rank, with_seeds=True)
        resumed.resume(seed=7, epoch=4, consumed_samples=batches_done * batch_size * num_replicas)
        assert list(resumed) == uninterrupted[batches_done * batch_size:]
        # The skip applies once: the next pass over the same epoch is whole again.
        assert list(resumed) == uninterrupted


def test_resume_for_other_epoch_starts_at_first_batch(caplog):
    dataset = list(range(12))
    sampler = ResumableSampler(dataset, seed=1)
    sampler.resume(seed=1, epoch=2, consumed_samples=6)
    sampler.set_epoch(3)
    with caplog.at_level("WARNING"):
        assert list(sampler) == _epoch(ResumableSampler(dataset, seed=1), 3)
    assert "stopped in epoch 2 but training resumes in epoch 3" in caplog.text


def test_negative_consumed_samples_rejected():
    with pytest.raises(ValueError, match="consumed_samples -4 is negative"):
        ResumableSampler(list(range(4)), seed=0).resume(seed=0, epoch=0, consumed_samples=-4)


def test_sample_seeds_ignore_world_size():
    dataset = list(range(9))
    alone = dict(_epoch(ResumableSampler(dataset, seed=5, with_seeds=True), 2))
    for rank in range(2):
        shard = _epoch(ResumableSampler(dataset, seed=5, num_replicas=2, rank=rank, with_seeds=True), 2)
        assert all(alone[index] == seed for index, seed in shard)
    other_epoch = dict(_epoch(ResumableSampler(dataset, seed=5, with_seeds=True), 3))
    assert any(alone[index] != other_epoch[index] for index in dataset)


def test_loader_state_round_trip():
    dataset = list(range(20))
    loader = ResumableLoader(dataset, batch_size=4, sampler=ResumableSampler(dataset, seed=11))
    loader.position = lambda: (1, 2)  # epoch 1, two batches trained
    state = loader.state_dict()
    assert state == {"seed": 11, "epoch": 1, "consumed_samples": 8, "batch_size": 4, "num_replicas": 1}

    fresh = ResumableLoader(dataset, batch_size=4, sampler=ResumableSampler(dataset, seed=99))
    fresh.load_state_dict(state)
    fresh.load_state_dict(state)  # loading twice is harmless
    uninterrupted = ResumableLoader(dataset, batch_size=4, sampler=ResumableSampler(dataset, seed=11))
    uninterrupted.sampler.set_epoch(1)
    assert [batch.tolist() for batch in fresh] == [batch.tolist() for batch in uninterrupted][2:]


@pytest.fixture
def augmented_digits():
    """Digits with the data2vec training augmentation: RandAugment, colour jitter, random erasing."""
    data = ImageClassificationData(
        "digits", input_size=16, batch_size=4, num_workers=0, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
    )
    data.setup("fit")
    return data.datasets["train"]


def test_sample_seed_fixes_augmentation(augmented_digits):
    first, label = augmented_digits[(5, 1234)]
    again, _ = augmented_digits[(5, 1234)]
    other, _ = augmented_digits[(5, 1235)]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert label == augmented_digits[5][1]


def test_sample_seed_leaves_global_rngs(augmented_digits):
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    augmented_digits[(5, 1234)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_train_loader_same_batches_with_workers(augmented_digits, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "17")
    batches = {}
    for num_workers in (0, 2):
        data = ImageClassificationData(
            "digits", input_size=16, batch_size=8, num_workers=num_workers,
            auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
        )
        data.setup("fit")
        loader = data.train_dataloader()
        assert loader.sampler.seed == 17
        batches[num_workers] = [batch for batch, _ in zip(loader, range(3))]
    for without_workers, with_workers in zip(batches[0], batches[2]):
        assert torch.equal(without_workers[0], with_workers[0])
        assert torch.equal(without_workers[1], with_workers[1])
