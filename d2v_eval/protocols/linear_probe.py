"""``LinearProbe``: a linear head trained on the features of a frozen encoder."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2v_eval.encoders import load_encoder_with_info
from d2v_eval.protocols.base import ClassificationModule

Pooling = Literal["avg", "token"]


class LinearProbe(ClassificationModule):
    """Linear classification on frozen encoder features.

    The encoder is frozen for real: its parameters have ``requires_grad=False``, it runs under
    ``torch.no_grad``, and it stays in eval mode (dropout and drop path inert) even when Lightning
    switches the module back to train mode after validation.

    Args:
        encoder: encoder source (preset name or Hugging Face directory), see ``load_encoder``.
        num_classes: linked from the data by LightningCLI.
        pooling: ``"avg"`` = mean of patch tokens, ``"token"`` = CLS token; both after the final norm.
        use_bn: put a BatchNorm without affine parameters before the linear layer (MAE's linear probe).
        optimizer: ``"sgd"`` (momentum) or ``"adamw"``.
        lr: peak learning rate (absolute); the schedule is linear warmup then cosine to ``min_lr``.
    """

    protocol = "linear_probe"

    def __init__(
        self,
        encoder: str = "data2vec_vision_tiny_patch4_16",
        num_classes: int = 10,
        *,
        img_size: int | None = None,
        pooling: Pooling = "avg",
        use_bn: bool = True,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        if pooling not in ("avg", "token"):
            raise ValueError(f"pooling {pooling!r} is invalid; choose 'avg' (mean of patch tokens) or 'token' (CLS)")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer {optimizer!r} is invalid; choose 'sgd' or 'adamw'")
        # global_pool="token" keeps the encoder's final norm, applied to every token.
        self.encoder, self.encoder_info = load_encoder_with_info(
            encoder, img_size=img_size, global_pool="token", num_classes=0
        )
        self.encoder.requires_grad_(False)
        self.encoder.eval()

        embed_dim = self.encoder.embed_dim
        linear = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)  # MAE main_linprobe.py head init
        nn.init.zeros_(linear.bias)
        norm = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6) if use_bn else nn.Identity()
        self.head = nn.Sequential(norm, linear)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features (B, embed_dim) for images (B, 3, H, W)."""
        with torch.no_grad():
            tokens = self.encoder.forward_features(images)  # (B, 1 + num_patches, embed_dim)
        if self.hparams.pooling == "token":
            return tokens[:, 0]
        return tokens[:, 1:].mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        params = list(self.head.parameters())
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = self.warmup_cosine_scheduler(
            optimizer, lr=hp.lr, warmup_lr=0.0, min_lr=hp.min_lr, warmup_epochs=hp.warmup_epochs
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
