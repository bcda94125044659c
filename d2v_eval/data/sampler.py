"""A shuffled training order that a checkpoint can resume in the middle of an epoch.

Written here because neither torch's samplers nor Lightning restore a loader's position. Lightning
only passes the ``state_dict`` of a loader that has one through its checkpoints.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from d2v_eval.randomness import derive_seed

log = logging.getLogger(__name__)

# Key of the per-sample augmentation seeds in ``derive_seed(seed, epoch, key)``; the order uses no key.
_SAMPLE_SEED_KEY = 1


class ResumableSampler(DistributedSampler):
    """Seeded shuffling, sharded over ``num_replicas`` processes, that can start part-way into an epoch.

    The order of an epoch depends only on (``seed``, epoch): a random permutation of the dataset,
    padded by repeating its start to a multiple of ``num_replicas``, of which rank r takes every
    ``num_replicas``-th index from position r (like ``DistributedSampler``). After
    :meth:`resume` the next iteration skips the first ``consumed_samples`` of the padded permutation.
    With ``with_seeds`` every item is a pair ``(index, sample_seed)`` whose seed depends only on
    (``seed``, epoch, index), so a sample is augmented the same way whichever process or loader
    worker loads it.

    Lightning leaves a ``DistributedSampler`` subclass in place instead of wrapping it.
    """

    def __init__(self, dataset: Dataset, *, seed: int, num_replicas: int = 1, rank: int = 0, with_seeds: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.with_seeds = with_seeds
        self._resume_epoch: int | None = None
        self._resume_samples = 0

    def resume(self, *, seed: int, epoch: int, consumed_samples: int) -> None:
        """Make the next iteration continue epoch ``epoch`` of run seed ``seed`` after ``consumed_samples``.

        ``consumed_samples`` counts samples of all processes together; it applies only if the next
        iteration is for ``epoch``.
        """
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples {consumed_samples} is negative; a checkpoint stores a count >= 0")
        self.seed = seed
        self.set_epoch(epoch)
        self._resume_epoch = epoch
        self._resume_samples = consumed_samples

    def _start(self) -> int:
        """Return the position in the padded permutation where this iteration starts (0 unless resuming)."""
        if self._resume_epoch is None:
            return 0

        if self._resume_epoch == self.epoch:
            start = min(self._resume_samples, self.total_size)
        else:
            start = 0
            log.warning(
                "the checkpoint's training loader stopped in epoch %d but training resumes in epoch %d; "
                "starting epoch %d from its first batch", self._resume_epoch, self.epoch, self.epoch,
            )
        self._resume_epoch = None  # the skip applies to one iteration only
        self._resume_samples = 0
        return start

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        size = len(self.dataset)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(size, generator=generator)
        padding = self.total_size - size
        if padding:
            order = torch.cat([order, order.repeat(math.ceil(padding / size))[:padding]])

        shard = order[self._start() + self.rank :: self.num_replicas].tolist()
        if not self.with_seeds:
            return iter(shard)

        seed_generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _SAMPLE_SEED_KEY))
        sample_seeds = torch.randint(0, 2**63 - 1, (size,), generator=seed_generator).tolist()
        return iter([(index, sample_seeds[index]) for index in shard])


def training_position(trainer) -> tuple[int, int]:
    """Return (epoch, batches of that epoch already trained) as a resumed Lightning fit will continue.

    A checkpoint saved after the last batch of an epoch continues at the next epoch's first batch.
    """
    epoch = trainer.current_epoch
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if batches >= trainer.num_training_batches:
        return epoch + 1, 0
    accumulation = trainer.accumulate_grad_batches
    if batches % accumulation:
        log.warning(
            "checkpoint saved after %d batches of epoch %d, between optimizer steps (accumulation %d): a run "
            "resumed from it loses the gradients of the last %d batches; checkpoints saved on optimizer steps "
            "(e.g. ModelCheckpoint every_n_train_steps) resume exactly",
            batches, epoch, accumulation, batches % accumulation,
        )
    return epoch, batches


def warn_if_position_missing(trainer) -> None:
    """Log a warning when a fit resumed mid-epoch without a training-loader position in its checkpoint.

    Such a checkpoint (written by another data module, or edited) makes the loader replay the
    interrupted epoch from its first batch.
    """
    loader = trainer.train_dataloader
    if trainer.ckpt_path is None or not isinstance(loader, ResumableLoader) or loader.restored:
        return
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if 0 < batches < trainer.num_training_batches:
        log.warning(
            "resumed from %s after %d batches of epoch %d, but the checkpoint stores no training-loader "
            "position: the epoch restarts from its first batch, so this run differs from an uninterrupted one",
            trainer.ckpt_path, batches, trainer.current_epoch,
        )


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that saves and restores its position.

    The position comes from ``position`` (a callable returning (epoch, batches trained)), not from
    the iterator, which is ahead of training by the batches Lightning and the loader workers prefetch.
    ``load_state_dict`` must run before the first iteration of the resumed epoch; loading the same
    state twice is harmless.

    Lightning stores the state of a training loader with these methods in its checkpoints, but it
    loads that state only if the loader was built after the checkpoint was restored. A module
    that reads ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` builds it before,
    so ``ImageClassificationData`` also carries the state in its own ``state_dict``.
    """

    position: Callable[[], tuple[int, int]] | None = None
    restored = False  # set once load_state_dict has applied a checkpoint's position

    def state_dict(self) -> dict:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler) or self.position is None:
            return {}
        epoch, batches = self.position()
        return {
            "seed": sampler.seed,
            "epoch": epoch,
            "consumed_samples": batches * self.batch_size * sampler.num_replicas,
            "batch_size": self.batch_size,
            "num_replicas": sampler.num_replicas,
        }

    def load_state_dict(self, state: dict) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        saved = (state["batch_size"], state["num_replicas"])
        if state["consumed_samples"] and saved != (self.batch_size, sampler.num_replicas):
            log.warning(
                "resuming mid-epoch with batch size %d on %d processes, but the checkpoint used %d on %d; "
                "the rest of epoch %d skips the %d samples consumed before, but its batches differ from an "
                "uninterrupted run", self.batch_size, sampler.num_replicas, *saved, state["epoch"],
                state["consumed_samples"],
            )
        sampler.resume(seed=state["seed"], epoch=state["epoch"], consumed_samples=state["consumed_samples"])
        self.restored = True
