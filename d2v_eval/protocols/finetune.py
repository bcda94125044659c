"""``FineTune``: every encoder weight trained, with layer-wise learning-rate decay (data2vec-vision recipe)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from d2v_eval.encoders import load_encoder_with_info
from d2v_eval.encoders.loader import RelPosBiasChoice
from d2v_eval.protocols.base import ClassificationModule
from d2v_eval.protocols.optim import LayerAssignment, layer_decay_param_groups, param_group_table

log = logging.getLogger(__name__)


class FineTune(ClassificationModule):
    """Full fine-tuning of a BEiT encoder with mean pooling into a fresh ``fc_norm`` and a linear head.

    Defaults are the data2vec-vision ViT-B recipe (arXiv 2202.03555 section 4.1, and
    facebookresearch/data2vec_vision beit/run_class_finetuning.py): AdamW (0.9, 0.999), layer decay
    0.65, drop path 0.1, label smoothing 0.1, warmup from ``warmup_lr`` to ``lr`` then cosine to
    ``min_lr``, stepped every optimizer step.

    Args:
        encoder: encoder source (preset name or Hugging Face directory), see ``load_encoder``.
        num_classes: linked from the data by LightningCLI.
        img_size: input resolution; None keeps the encoder's.
        lr: peak learning rate of the last layer (absolute).
        layer_decay: learning-rate decay per layer, in (0, 1]; 1.0 turns it off.
        layer_assignment: ``"reference"`` (data2vec_vision) or ``"timm"`` (shared rel_pos_bias in layer 0).
        warmup_epochs: linear warmup length in epochs (fractions allowed).
    """

    protocol = "finetune"

    def __init__(
        self,
        encoder: str = "data2vec_vision_tiny_patch4_16",
        num_classes: int = 10,
        *,
        img_size: int | None = None,
        rel_pos_bias: RelPosBiasChoice = "per_block",
        lr: float = 4e-3,
        weight_decay: float = 0.05,
        layer_decay: float = 0.65,
        layer_assignment: LayerAssignment = "reference",
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-6,
        drop_path_rate: float = 0.1,
        label_smoothing: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay {layer_decay} is outside (0, 1]; use 1.0 to turn layer decay off")
        if weight_decay < 0:
            raise ValueError(f"weight_decay {weight_decay} is negative; use 0 or a positive value")
        self.model, self.encoder_info = load_encoder_with_info(
            encoder, img_size=img_size, drop_path_rate=drop_path_rate, global_pool="avg",
            rel_pos_bias=rel_pos_bias, num_classes=num_classes,
        )

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, 3, H, W)."""
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        return loss

    def param_groups(self) -> list[dict]:
        hp = self.hparams
        return layer_decay_param_groups(
            self.model, lr=hp.lr, weight_decay=hp.weight_decay, layer_decay=hp.layer_decay,
            depth=self.depth, assignment=hp.layer_assignment,
        )

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.param_groups()
        log.debug("parameter groups:\n%s", param_group_table(groups))
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        scheduler = self.warmup_cosine_scheduler(
            optimizer, lr=hp.lr, warmup_lr=hp.warmup_lr, min_lr=hp.min_lr, warmup_epochs=hp.warmup_epochs
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
