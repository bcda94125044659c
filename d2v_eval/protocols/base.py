"""Evaluation logic shared by every protocol: metrics, per-split results and the learning-rate schedule."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from d2v_eval.data.sampler import warn_if_position_missing
from d2v_eval.protocols.optim import check_schedule, warmup_cosine

EVAL_STAGES = ("val", "test")


class WarmupCosineFactor:
    """``LambdaLR`` factor: ``warmup_cosine(step) / lr``, so each group keeps its own (layer-decayed) scale.

    A class rather than a closure so that its fields travel in the scheduler's state dict on resume.
    """

    def __init__(self, *, total_steps: int, warmup_steps: int, lr: float, warmup_lr: float, min_lr: float):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.lr = lr
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr

    def __call__(self, step: int) -> float:
        return warmup_cosine(
            step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
            lr=self.lr, warmup_lr=self.warmup_lr, min_lr=self.min_lr,
        ) / self.lr


def _eval_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection({
        "top1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
        "top5": MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro"),
        "mean_per_class": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="macro"),
    })


class ClassificationModule(pl.LightningModule):
    """Base for protocols: subclasses define ``forward`` (images -> logits), training and optimizers.

    After each validation or test epoch, ``eval_results[stage]`` contains ``top1``, ``top5`` and
    ``mean_per_class`` in percent, the mean ``loss`` and ``num_samples``, synchronised over processes.
    """

    protocol = "classification"

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes {num_classes} must be at least 2")
        self.eval_metrics = torch.nn.ModuleDict({stage: _eval_metrics(num_classes) for stage in EVAL_STAGES})
        self.eval_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in EVAL_STAGES})
        self.eval_count = torch.nn.ModuleDict({stage: SumMetric() for stage in EVAL_STAGES})
        self.eval_results: dict[str, dict[str, float]] = {}

    def on_train_start(self) -> None:
        warn_if_position_missing(self.trainer)

    # ---- evaluation --------------------------------------------------------------------------

    def _evaluation_step(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.eval_metrics[stage].update(logits, labels)
        self.eval_loss[stage].update(loss, weight=labels.numel())
        self.eval_count[stage].update(torch.tensor(float(labels.numel()), device=self.device))

    def _evaluation_epoch_end(self, stage: str) -> None:
        results = {name: 100.0 * float(value) for name, value in self.eval_metrics[stage].compute().items()}
        results["loss"] = float(self.eval_loss[stage].compute())
        results["num_samples"] = int(self.eval_count[stage].compute())
        for metric in (self.eval_metrics[stage], self.eval_loss[stage], self.eval_count[stage]):
            metric.reset()
        self.eval_results[stage] = results
        if self.trainer.sanity_checking:
            return
        for name in ("top1", "top5", "mean_per_class", "loss"):
            self.log(f"{stage}/{name}", results[name], sync_dist=False, rank_zero_only=False)

    def validation_step(self, batch, batch_idx):
        self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self):
        self._evaluation_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._evaluation_step(batch, "test")

    def on_test_epoch_end(self):
        self._evaluation_epoch_end("test")

    def predict_step(self, batch, batch_idx):
        images, _ = batch
        return self(images).softmax(dim=-1)

    # ---- schedule ----------------------------------------------------------------------------

    def steps_per_epoch(self) -> int:
        """Optimizer steps per training epoch."""
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)
        if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(trainer.num_training_batches):
            return max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        return max(1, total)

    def warmup_cosine_scheduler(self, optimizer, *, lr: float, warmup_lr: float, min_lr: float, warmup_epochs: float) -> dict:
        """Per-step ``LambdaLR`` following :func:`warmup_cosine`, for ``configure_optimizers``."""
        total_steps = int(self.trainer.estimated_stepping_batches)
        warmup_steps = int(round(warmup_epochs * self.steps_per_epoch()))
        check_schedule(lr=lr, min_lr=min_lr, warmup_lr=warmup_lr, warmup_steps=warmup_steps, total_steps=total_steps)
        factor = WarmupCosineFactor(
            total_steps=total_steps, warmup_steps=warmup_steps, lr=lr, warmup_lr=warmup_lr, min_lr=min_lr
        )
        return {"scheduler": LambdaLR(optimizer, factor), "interval": "step", "frequency": 1}
