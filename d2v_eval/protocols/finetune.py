"""``FineTune``: every encoder weight trained, with layer-wise learning-rate decay (data2vec-vision recipe)."""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torchmetrics import MeanMetric

from d2v_eval.encoders import load_encoder_with_info
from d2v_eval.encoders.loader import RelPosBiasChoice
from d2v_eval.protocols.base import EVAL_STAGES, ClassificationModule, _eval_metrics
from d2v_eval.protocols.optim import (
    LayerAssignment,
    layer_decay_param_groups,
    param_group_table,
    resolve_peak_lr,
)
from d2v_eval.randomness import derive_seed, run_seed, seed_global_rngs

log = logging.getLogger(__name__)

MixupMode = Literal["batch", "pair", "elem"]


class ThroughputMeter:
    """Images per second and optimizer-step time, measured between consecutive optimizer steps.

    The first step of every epoch is not measured, because its interval would include validation
    and dataloader start-up. Written here rather than with Lightning's ``ThroughputMonitor`` because
    that callback needs a Python ``batch_size_fn`` (not expressible in YAML) and keeps its values
    out of reach of the module, which puts them into the result record.
    """

    def __init__(self):
        self.images = 0
        self.seconds = 0.0
        self.steps = 0
        self._step_started: float | None = None
        self._images_in_step = 0

    def start_epoch(self) -> None:
        self._step_started = None
        self._images_in_step = 0

    def add_batch(self, num_images: int, *, stepped: bool) -> tuple[float, int] | None:
        """Count a training batch; after an optimizer step return (step seconds, images in the step)."""
        self._images_in_step += num_images
        if not stepped:
            return None
        now = time.perf_counter()
        measured = None
        if self._step_started is not None:
            seconds = now - self._step_started
            measured = (seconds, self._images_in_step)
            self.images += self._images_in_step
            self.seconds += seconds
            self.steps += 1
        self._step_started = now
        self._images_in_step = 0
        return measured

    def summary(self, world_size: int) -> dict:
        """Mean over the measured steps; ``images_per_s`` assumes every device runs the same batch."""
        if not self.steps:
            return {"measured_steps": 0}
        per_device = self.images / self.seconds
        return {
            "images_per_s_per_device": per_device,
            "images_per_s": per_device * world_size,
            "step_time_s": self.seconds / self.steps,
            "measured_steps": self.steps,
        }


class FineTune(ClassificationModule):
    """Full fine-tuning of a BEiT encoder with mean pooling into a fresh ``fc_norm`` and a linear head.

    Defaults are the data2vec-vision ViT-B recipe (arXiv 2202.03555 section 4.1, and
    facebookresearch/data2vec_vision beit/run_class_finetuning.py). The optimizer is AdamW (0.9, 0.999)
    with layer decay 0.65. Mixup 0.8 and cutmix 1.0 (prob 1.0, switch prob 0.5, batch mode) mix the
    batches, with label smoothing 0.1 folded into the soft targets. The learning rate warms up from
    ``warmup_lr`` to the peak, then follows a cosine to ``min_lr``, stepped every optimizer step.
    A fresh head is initialised by timm's ``Beit`` as the reference does: truncated normal
    (std 0.02) scaled by 0.001 (``head_init_scale``).

    A non-finite training loss stops the run with ``FloatingPointError`` naming the step, so logged
    loss averages only ever contain finite values. Under ``16-mixed``, steps that the gradient
    scaler skips for overflowing gradients still have a finite loss and are logged as usual.

    Augmentation (RandAugment, colour jitter, random erasing, bicubic resize) belongs to the data
    module; gradient clipping is Lightning's ``trainer.gradient_clip_val`` (the reference leaves it
    off); precision is ``trainer.precision`` (``bf16-mixed`` or ``16-mixed``).

    Randomness: when the run is seeded (``seed_everything``), torch, numpy and ``random`` are
    re-seeded from (seed, epoch, batch index, rank) before every training batch, so drop path and
    mixup never depend on what ran before. With the data module's resumable training loader, a
    run resumed with ``--ckpt_path last`` from a checkpoint saved after any optimizer step ends with
    the same weights as an uninterrupted run (on CPU, with ``trainer.deterministic``).

    Args:
        encoder: encoder source (preset name or Hugging Face directory), see ``load_encoder``.
        num_classes: linked from the data by LightningCLI.
        img_size: input resolution; None keeps the encoder's.
        encoder_format: checkpoint format, overriding detection (see ``d2v_eval.encoders.FORMATS``).
        encoder_use_ema: load the ``model_ema`` weights of an original data2vec_vision checkpoint.
        lr: peak learning rate of the last layer (absolute, data2vec style). Set it to None to use
            ``base_lr`` instead.
        base_lr: peak rate per 256 images (MAE/BEiT style): ``lr = base_lr * global_batch / 256``,
            with the global batch = per-device batch x devices x nodes x gradient accumulation.
        layer_decay: learning-rate decay per layer, in (0, 1]; 1.0 turns it off.
        layer_assignment: ``"reference"`` (data2vec_vision) or ``"timm"`` (shared rel_pos_bias in
            layer 0), see :func:`d2v_eval.protocols.optim.layer_id_for`.
        rel_pos_bias_weight_decay: apply ``weight_decay`` to the relative position bias tables too,
            as data2vec_vision's fine-tuning script does; off by default, like 1-D parameters.
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob, mixup_mode: timm ``Mixup``
            arguments; mixing is off when both alphas are 0. With mixing on, the training loader
            drops its last incomplete batch and the per-device batch size must be even.
        label_smoothing: folded into mixup's soft targets, or given to the cross entropy without mixup.
        model_ema: keep an exponential moving average of the weights (timm ``ModelEmaV3``); every
            evaluation then also reports ``ema_top1``, ``ema_top5``, ``ema_mean_per_class`` and
            ``ema_loss`` beside the raw weights' metrics.
        model_ema_decay: EMA decay per optimizer step.
    """

    protocol = "finetune"

    def __init__(
        self,
        encoder: str = "data2vec_vision_tiny_patch4_16",
        num_classes: int = 10,
        *,
        img_size: int | None = None,
        encoder_format: str | None = None,
        encoder_use_ema: bool = False,
        rel_pos_bias: RelPosBiasChoice = "per_block",
        lr: float | None = 4e-3,
        base_lr: float | None = None,
        weight_decay: float = 0.05,
        layer_decay: float = 0.65,
        layer_assignment: LayerAssignment = "reference",
        rel_pos_bias_weight_decay: bool = False,
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-6,
        drop_path_rate: float = 0.1,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: MixupMode = "batch",
        model_ema: bool = False,
        model_ema_decay: float = 0.9999,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay {layer_decay} is outside (0, 1]; use 1.0 to turn layer decay off")
        if weight_decay < 0:
            raise ValueError(f"weight_decay {weight_decay} is negative; use 0 or a positive value")
        if (lr is None) == (base_lr is None):
            raise ValueError(
                f"set exactly one of lr (absolute, got {lr}) and base_lr (per 256 images, got {base_lr}); "
                "to use base_lr, also set lr to null"
            )
        if min(mixup_alpha, cutmix_alpha) < 0 or not 0.0 <= mixup_prob <= 1.0:
            raise ValueError(
                f"mixup_alpha {mixup_alpha} and cutmix_alpha {cutmix_alpha} must be >= 0 and mixup_prob "
                f"{mixup_prob} must lie in [0, 1]; set both alphas to 0 to turn mixing off"
            )
        if not 0.0 < model_ema_decay < 1.0:
            raise ValueError(f"model_ema_decay {model_ema_decay} must lie in (0, 1), e.g. 0.9999")

        self.model, self.encoder_info = load_encoder_with_info(
            encoder, img_size=img_size, drop_path_rate=drop_path_rate, global_pool="avg",
            rel_pos_bias=rel_pos_bias, num_classes=num_classes, format=encoder_format, use_ema=encoder_use_ema,
        )

        self.mixup: Mixup | None = None
        if self.mixes:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                switch_prob=mixup_switch_prob, mode=mixup_mode, label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            self.soft_target_loss = SoftTargetCrossEntropy()

        self.model_ema: ModelEmaV3 | None = None
        if model_ema:
            self.model_ema = ModelEmaV3(self.model, decay=model_ema_decay)
            self.model_ema.requires_grad_(False)
            # Only evaluation runs the EMA copy, and Lightning switches every module to eval mode for it.
            # Train mode here keeps Lightning from warning about eval-mode modules when training starts.
            self.model_ema.train()
            self.ema_metrics = torch.nn.ModuleDict({stage: _eval_metrics(num_classes) for stage in EVAL_STAGES})
            self.ema_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in EVAL_STAGES})

        self.peak_lr: float | None = None
        self.global_batch_size: int | None = None
        self.throughput = ThroughputMeter()
        self._last_global_step = 0

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def mixes(self) -> bool:
        """Whether training batches go through mixup or cutmix."""
        hp = self.hparams
        return (hp.mixup_alpha > 0 or hp.cutmix_alpha > 0) and hp.mixup_prob > 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, 3, H, W)."""
        return self.model(images)

    # ---- setup -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage != "fit" or not self.mixes:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "hparams") or "drop_last" not in datamodule.hparams:
            return
        batch_size = datamodule.batch_size
        if batch_size % 2:
            raise ValueError(
                f"data.batch_size {batch_size} is odd but mixup/cutmix needs an even batch on every device; "
                "use an even batch size or set model mixup_alpha and cutmix_alpha to 0"
            )
        if not datamodule.hparams.drop_last:
            # timm's Mixup needs an even batch: the last incomplete batch of an epoch may be odd.
            datamodule.hparams.drop_last = True
            log.info("mixup/cutmix is on: the training loader drops its last incomplete batch")

    def on_train_start(self) -> None:
        super().on_train_start()
        self._last_global_step = self.trainer.global_step  # non-zero after a resume

    def on_train_epoch_start(self) -> None:
        self.throughput.start_epoch()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        seed = run_seed()
        if seed is not None:
            seed_global_rngs(derive_seed(seed, self.current_epoch, batch_idx, self.global_rank))

    # ---- training ----------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.mixup is not None:
            if len(images) % 2:
                raise ValueError(
                    f"mixup/cutmix got an odd batch of {len(images)} images at step {self.global_step}; "
                    "use an even batch size and a training loader with drop_last=True"
                )
            images, soft_targets = self.mixup(images, labels)
            loss = self.soft_target_loss(self(images), soft_targets)
        else:
            loss = F.cross_entropy(self(images), labels, label_smoothing=self.hparams.label_smoothing)

        if not torch.isfinite(loss):
            # BEiT's engine_for_finetuning.py, which data2vec_vision builds on, stops here too.
            raise FloatingPointError(
                f"training loss is {loss.item()} at optimizer step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); lower lr, turn on gradient clipping "
                "(trainer.gradient_clip_val) or use bf16-mixed instead of 16-mixed"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Here rather than in on_train_batch_end, which runs after ModelCheckpoint has saved the step.
        if self.model_ema is not None:
            self.model_ema.update(self.model, step=self.trainer.global_step + 1)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        stepped = self.trainer.global_step != self._last_global_step
        self._last_global_step = self.trainer.global_step

        measured = self.throughput.add_batch(len(batch[0]), stepped=stepped)
        if measured is not None:
            seconds, images = measured
            world_size = self.trainer.world_size
            self.log("train/step_time_s", seconds)
            self.log("train/images_per_s_per_device", images / seconds)
            self.log("train/images_per_s", images * world_size / seconds)

    # ---- evaluation of the EMA weights -------------------------------------------------------

    def _evaluation_step(self, batch, stage: str) -> None:
        super()._evaluation_step(batch, stage)
        if self.model_ema is None:
            return
        images, labels = batch
        logits = self.model_ema.module(images)
        self.ema_metrics[stage].update(logits, labels)
        self.ema_loss[stage].update(F.cross_entropy(logits, labels), weight=labels.numel())

    def _evaluation_epoch_end(self, stage: str) -> None:
        super()._evaluation_epoch_end(stage)
        if self.model_ema is None:
            return
        results = {f"ema_{name}": 100.0 * float(value) for name, value in self.ema_metrics[stage].compute().items()}
        results["ema_loss"] = float(self.ema_loss[stage].compute())
        self.ema_metrics[stage].reset()
        self.ema_loss[stage].reset()
        self.eval_results[stage].update(results)
        if self.trainer.sanity_checking:
            return
        for name, value in results.items():
            self.log(f"{stage}/{name}", value, sync_dist=False, rank_zero_only=False)

    def record_extras(self, stage: str) -> dict:
        """Fields that ``ResultRecorder`` adds to each record: the learning rates and the throughput."""
        hp = self.hparams
        extras: dict = {"throughput": self.throughput.summary(self.trainer.world_size)}
        if self.peak_lr is not None:
            known_batch = self.global_batch_size is not None
            extras["learning_rate"] = {
                "peak_lr": self.peak_lr,
                "base_lr": self.peak_lr * 256 / self.global_batch_size if known_batch else None,
                "scaling": "absolute" if hp.lr is not None else "base_lr x global_batch_size / 256",
                "global_batch_size": self.global_batch_size,
            }
        return extras

    # ---- optimizer ---------------------------------------------------------------------------

    def param_groups(self, lr: float | None = None) -> list[dict]:
        """Optimizer groups with the layer decay folded into each group's ``lr`` (peak ``lr``, default ``hparams.lr``)."""
        hp = self.hparams
        return layer_decay_param_groups(
            self.model, lr=hp.lr if lr is None else lr, weight_decay=hp.weight_decay,
            layer_decay=hp.layer_decay, depth=self.depth, assignment=hp.layer_assignment,
            decay_rel_pos_bias=hp.rel_pos_bias_weight_decay,
        )

    def _global_batch_size(self) -> int | None:
        """Per-device batch x devices x nodes x accumulation, or None without a datamodule ``batch_size``."""
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if batch_size is None:
            return None
        return int(batch_size) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        hp = self.hparams
        self.global_batch_size = self._global_batch_size()
        self.peak_lr = resolve_peak_lr(lr=hp.lr, base_lr=hp.base_lr, global_batch_size=self.global_batch_size)
        log.info("peak learning rate %.6g at global batch size %s", self.peak_lr, self.global_batch_size)

        groups = self.param_groups(self.peak_lr)
        log.debug("parameter groups:\n%s", param_group_table(groups))
        optimizer = torch.optim.AdamW(groups, lr=self.peak_lr, betas=tuple(hp.betas), eps=hp.eps)
        scheduler = self.warmup_cosine_scheduler(
            optimizer, lr=self.peak_lr, warmup_lr=hp.warmup_lr, min_lr=hp.min_lr, warmup_epochs=hp.warmup_epochs
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
