"""``LinearProbe``: a grid of linear heads trained together on frozen encoder features, one chosen on validation.

One run trains every combination of learning rate, feature spec, BatchNorm choice (and few-shot
draw) on the same frozen features, picks the best head of each draw on a held-out validation split,
and evaluates only that head on test. The grid follows DINOv2 ``eval/linear.py`` (13 learning
rates x feature choices, trained from one frozen forward pass); the BatchNorm-without-affine head
and LARS follow MAE ``main_linprobe.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import numpy as np
import torch
from timm.optim import Lars

from d2v_eval.data.fewshot import few_shot_indices
from d2v_eval.encoders import load_encoder_with_info
from d2v_eval.encoders.loader import weights_fingerprint
from d2v_eval.protocols.base import ClassificationModule
from d2v_eval.protocols.feature_cache import CacheDtype, CachedFeatures, split_cache_entries
from d2v_eval.protocols.features import DEFAULT_SPECS, FeatureSpec, check_specs, extract_features
from d2v_eval.protocols.heads import HeadBank, MultiHeadMetrics, head_grid, head_results, select_heads

log = logging.getLogger(__name__)

# DINOv2 eval/linear.py default --learning-rates: 13 values, 1-2-5 steps from 1e-5 to 0.1, each
# multiplied by global batch / 256 there (our lr_rule="linear_scaling").
DEFAULT_LRS: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
LrRule = Literal["absolute", "linear_scaling"]
METRIC_NAMES = ("top1", "top5", "mean_per_class", "loss")


@dataclasses.dataclass(frozen=True)
class FewShot:
    """Train each head on ``k`` samples per class; ``draws`` seeded subsets, each with its own head grid."""

    k: int
    draws: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.draws < 1:
            raise ValueError(f"few_shot.draws {self.draws} must be at least 1")


def _mean_results(results: list[dict[str, float]]) -> dict[str, float]:
    merged = {name: float(np.mean([r[name] for r in results])) for name in METRIC_NAMES}
    merged["num_samples"] = results[0]["num_samples"]
    return merged


class LinearProbe(ClassificationModule):
    """Linear classification on a frozen encoder, many heads per run, the best chosen on validation.

    The encoder is frozen for real: ``requires_grad=False``, features are computed under
    ``torch.no_grad``, and it is put back in eval mode before every training step and whenever
    Lightning switches the module to train mode, so dropout and drop path stay inert.

    Without training augmentation, the features of every split are extracted once into a
    memory-mapped cache (see ``feature_cache``) and the heads train on the cache. With
    ``train_augmentation=True`` the encoder runs on every augmented training batch, once for all heads.

    Args:
        encoder: encoder source (preset name or Hugging Face directory), see ``load_encoder``.
        num_classes: linked from the data by LightningCLI.
        img_size: input resolution; None keeps the encoder's.
        encoder_format: checkpoint format, overriding detection (see ``d2v_eval.encoders.FORMATS``).
        encoder_use_ema: load the ``model_ema`` weights of an original data2vec_vision checkpoint.
        features: feature specs to compare (default: CLS token; mean of patch tokens; last block, final norm).
        lrs: learning rates of the grid (default: DINOv2's 13 rates from 1e-5 to 0.1).
        lr_rule: ``"absolute"`` uses ``lrs`` as given; ``"linear_scaling"`` multiplies them by global batch / 256.
        batch_norm: for each value, a copy of the grid with (True) or without (False) a BatchNorm
            without affine parameters before the linear layer.
        optimizer: ``"sgd"`` (momentum), ``"adamw"`` or ``"lars"`` (timm's LARS, trust ratio on weights only).
        weight_decay: applied to head weights, never to biases.
        warmup_epochs: linear warmup from 0, then cosine to 0, stepped every optimizer step.
        train_augmentation: train on the datamodule's augmented training transform (features every step).
        use_cache: extract non-augmented features once; False runs the encoder on every batch.
        cache_dtype: storage type of cached features.
        few_shot: train on ``k`` samples per class instead of the whole training split.
        init_seed: seed of the head weights (see ``HeadBank``).
    """

    @property
    def protocol(self) -> str:
        """Record protocol: ``linear_probe``, or ``linear_probe_<k>shot`` so few-shot runs never share a table row."""
        return f"linear_probe_{self.few_shot.k}shot" if self.few_shot is not None else "linear_probe"

    def __init__(
        self,
        encoder: str = "data2vec_vision_tiny_patch4_16",
        num_classes: int = 10,
        *,
        img_size: int | None = None,
        encoder_format: str | None = None,
        encoder_use_ema: bool = False,
        features: list[FeatureSpec] | None = None,
        lrs: list[float] | None = None,
        lr_rule: LrRule = "linear_scaling",
        batch_norm: list[bool] | None = None,
        optimizer: Literal["sgd", "adamw", "lars"] = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_epochs: float = 0.0,
        train_augmentation: bool = False,
        use_cache: bool = True,
        cache_dtype: CacheDtype = "float16",
        few_shot: FewShot | None = None,
        init_seed: int = 0,
    ):
        super().__init__(num_classes)
        # Dataclasses are saved as plain dicts, which checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["features", "few_shot"])
        if isinstance(few_shot, dict):
            few_shot = FewShot(**few_shot)
        self.few_shot = few_shot
        specs = features if features else DEFAULT_SPECS
        self.specs = [FeatureSpec(**spec) if isinstance(spec, dict) else spec for spec in specs]
        self.hparams["features"] = [dataclasses.asdict(spec) for spec in self.specs]
        self.hparams["few_shot"] = dataclasses.asdict(few_shot) if few_shot is not None else None
        self.base_lrs = [float(lr) for lr in (lrs if lrs else DEFAULT_LRS)]
        self.batch_norm = [bool(b) for b in (batch_norm if batch_norm is not None else (True, False))]
        self._check_arguments()

        # global_pool="token" keeps the encoder's final norm, which feature specs with final_norm use.
        self.encoder, self.encoder_info = load_encoder_with_info(
            encoder, img_size=img_size, global_pool="token", num_classes=0,
            format=encoder_format, use_ema=encoder_use_ema,
        )
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        check_specs(self.specs, len(self.encoder.blocks))

        self.draws = few_shot.draws if few_shot else 1
        dims = {spec.name: spec.dim(self.encoder.embed_dim) for spec in self.specs}
        self.heads = HeadBank(
            head_grid(self.specs, self.batch_norm, self.base_lrs, self.draws), dims, num_classes, init_seed
        )
        self.val_heads = MultiHeadMetrics(len(self.heads), num_classes)
        self.test_heads = MultiHeadMetrics(self.draws, num_classes)

        self.lr_scale: float | None = None
        self.selected: list[int] | None = None
        self.selected_at_step: int | None = None
        self.head_val_results: list[dict[str, float]] | None = None
        self.test_per_draw: list[dict[str, float]] | None = None
        self.cache_entries: dict[str, dict[str, str]] = {}
        self._encoder_fingerprint: str | None = None
        self._cached_roles: list[str] = []

    def _check_arguments(self) -> None:
        hp = self.hparams
        if hp.optimizer not in ("sgd", "adamw", "lars"):
            raise ValueError(f"optimizer {hp.optimizer!r} is invalid; choose 'sgd', 'adamw' or 'lars'")
        if hp.lr_rule not in ("absolute", "linear_scaling"):
            raise ValueError(f"lr_rule {hp.lr_rule!r} is invalid; choose 'absolute' or 'linear_scaling'")
        bad = [lr for lr in self.base_lrs if not (lr > 0 and math.isfinite(lr))]
        if bad:
            raise ValueError(f"learning rates {bad} are invalid; every rate in lrs must be positive and finite")
        if not self.batch_norm or len(set(self.batch_norm)) != len(self.batch_norm):
            raise ValueError(f"batch_norm {self.batch_norm} is invalid; use [true], [false] or [true, false]")
        if hp.weight_decay < 0:
            raise ValueError(f"weight_decay {hp.weight_decay} is negative; use 0 or a positive value")
        if self.few_shot is not None and (hp.train_augmentation or not hp.use_cache):
            raise ValueError(
                "few_shot trains on cached features; set train_augmentation=false and use_cache=true"
            )

    # ---- frozen encoder ----------------------------------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def on_train_batch_start(self, batch, batch_idx):
        self.encoder.eval()

    def _batch_features(self, inputs, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Features ``{spec: (B, draws, dim)}`` and labels (B, draws) from images or from cached features."""
        if isinstance(inputs, dict):
            return inputs, labels
        features = extract_features(self.encoder, inputs, self.specs)
        return {name: value.unsqueeze(1) for name, value in features.items()}, labels.unsqueeze(1)

    # ---- data: extract once ------------------------------------------------------------------

    def encoder_fingerprint(self) -> str:
        """SHA-256 of the encoder's weights, computed once because frozen weights never change."""
        if self._encoder_fingerprint is None:
            self._encoder_fingerprint = weights_fingerprint(self.encoder)
        return self._encoder_fingerprint

    def cached_entries(self, datamodule, role: str, specs: list[FeatureSpec], dtype: CacheDtype):
        """Cache entries (one per spec) of ``role``'s split, extracted if missing; paths go in the record."""
        entries = split_cache_entries(
            self.encoder, self.encoder_fingerprint(), datamodule, role, specs, dtype, self.trainer
        )
        self.cache_entries[role] = {name: str(entry.path) for name, entry in entries.items()}
        return entries

    def _check_selection_split(self, datamodule) -> None:
        if len(self.heads) == self.draws:
            return  # one head per draw: nothing to select
        try:
            validation = datamodule.split_name("validation")
        except ValueError as error:
            raise ValueError(f"LinearProbe selects among {len(self.heads)} heads on validation data, but {error}") from None
        if validation == datamodule.split_name("test"):
            raise ValueError(
                f"the validation split {validation!r} is also the reported test split, so selecting on it "
                "would tune on test; set data.val_fraction (e.g. 0.1) to carve a validation split from train"
            )

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "datasets"):
            if self.hparams.use_cache or self.few_shot is not None:
                raise ValueError(
                    "LinearProbe with use_cache=true needs an ImageClassificationData datamodule; pass one to "
                    "the Trainer, or set use_cache=false to train on the loaders you give"
                )
            return
        if stage == "fit":
            self._check_selection_split(datamodule)
        if not self.hparams.use_cache:
            return
        if getattr(datamodule, "corrupt_policy", "error") == "skip" and self.few_shot is None:
            # A cache has one row per sample of a split, so it cannot leave undecodable samples out.
            log.warning(
                "data.corrupt_policy=skip: features are computed on every batch instead of cached, "
                "so that undecodable samples can be left out"
            )
            return
        roles = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"]}.get(stage, [])
        if self.hparams.train_augmentation and "train" in roles:
            roles.remove("train")
        self._cached_roles = [role for role in roles if role in datamodule.datasets]
        self._cache_roles(datamodule)

    def _cache_roles(self, datamodule) -> None:
        for role in self._cached_roles:
            entries = self.cached_entries(datamodule, role, self.specs, self.hparams.cache_dtype)
            subsets = self._few_shot_subsets(datamodule, entries) if role == "train" else None
            datamodule.datasets[role] = CachedFeatures(entries, subsets)

    def _few_shot_subsets(self, datamodule, entries) -> np.ndarray | None:
        few_shot = self.few_shot
        if few_shot is None:
            return None
        labels = next(iter(entries.values())).labels
        feature = datamodule.load_splits()[datamodule.split_name("train")].features.get(datamodule.label_column)
        names = getattr(feature, "names", None)
        subsets = [
            few_shot_indices(labels, few_shot.k, seed=few_shot.seed, draw=draw,
                             num_classes=self.hparams.num_classes, class_names=names)
            for draw in range(few_shot.draws)
        ]
        return np.stack(subsets)  # (draws, k * num_classes)

    # ---- training ----------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of the selected head (of draw 0) for images (B, 3, H, W)."""
        features, _ = self._batch_features(images, torch.zeros(len(images), dtype=torch.long, device=images.device))
        return self.heads(features)[:, self.selected_heads()[0]]

    def training_step(self, batch, batch_idx):
        features, labels = self._batch_features(*batch)
        logits = self.heads(features)
        loss = self.heads.loss(logits, labels)
        self.log("train/loss", loss / len(self.heads), prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        trainer = self.trainer
        batch_size = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if hp.lr_rule == "linear_scaling":
            if batch_size is None:
                raise ValueError("lr_rule='linear_scaling' needs the datamodule's batch_size; use lr_rule='absolute'")
            self.lr_scale = batch_size * trainer.world_size * trainer.accumulate_grad_batches / 256
        else:
            self.lr_scale = 1.0

        groups = []
        for index, head in enumerate(self.heads.heads):
            lr = head.base_lr * self.lr_scale
            weight, bias = self.heads.weights[index], self.heads.biases[index]
            if hp.optimizer != "lars" and hp.weight_decay == 0:
                # One group per head where weight and bias are treated alike: optimizer steps cost per group.
                groups.append({"params": [weight, bias], "lr": lr, "weight_decay": 0.0})
                continue
            weight_group = {"params": [weight], "lr": lr, "weight_decay": hp.weight_decay}
            bias_group = {"params": [bias], "lr": lr, "weight_decay": 0.0}
            if hp.optimizer == "lars":
                # MAE's LARS adapts weights only: biases get neither the trust ratio nor weight decay.
                weight_group["always_adapt"] = True
                bias_group["always_adapt"] = False
            groups += [weight_group, bias_group]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=hp.momentum)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"])
        else:
            optimizer = Lars(groups, lr=groups[0]["lr"], momentum=hp.momentum)
        # lr=1 makes the factor the schedule's shape, which scales each group's own rate.
        scheduler = self.warmup_cosine_scheduler(
            optimizer, lr=1.0, warmup_lr=0.0, min_lr=0.0, warmup_epochs=hp.warmup_epochs
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ---- validation: every head; selection ---------------------------------------------------

    def on_validation_epoch_start(self):
        # A fresh state per epoch: under ddp_spawn on CPU the states arrive in memory shared by all ranks.
        self.val_heads.reset()

    def validation_step(self, batch, batch_idx):
        features, labels = self._batch_features(*batch)
        self.val_heads.update(self.heads(features), labels[:, 0])

    def on_validation_epoch_end(self):
        metrics = self.val_heads.compute()
        self.val_heads.reset()
        if self.trainer.sanity_checking:
            return
        results = [head_results(metrics, index) for index in range(len(self.heads))]
        self.head_val_results = results
        self.selected = select_heads(self.heads.heads, [r["top1"] for r in results], [r["loss"] for r in results])
        self.selected_at_step = self.global_step
        self.eval_results["val"] = _mean_results([results[index] for index in self.selected])
        for name in METRIC_NAMES:
            self.log(f"val/{name}", self.eval_results["val"][name], sync_dist=False, rank_zero_only=False)

    def selected_heads(self) -> list[int]:
        """Index of the chosen head of every draw; raises if several heads were never compared on validation."""
        if self.selected is not None:
            return self.selected
        per_draw = len(self.heads) // self.draws
        if per_draw == 1:
            return list(range(self.draws))
        raise RuntimeError(
            f"no head has been selected among {len(self.heads)}: selection happens on validation during "
            "fit; run `d2v-eval fit`, or test with --ckpt_path of a fitted probe"
        )

    def on_train_end(self):
        if len(self.heads) > self.draws and self.selected_at_step != self.global_step:
            log.warning(
                "the heads were last compared on validation at step %s but training ended at step %d, so the "
                "selection misses the final weights; set trainer.check_val_every_n_epoch to a divisor of "
                "max_epochs", self.selected_at_step, self.global_step,
            )
        for index in self.selected or []:
            head = self.heads.heads[index]
            if len(self.base_lrs) > 1 and head.base_lr in (min(self.base_lrs), max(self.base_lrs)):
                log.warning(
                    "selected head %s has the %s learning rate of the grid (%g), so a better rate may lie "
                    "outside it; extend lrs", head.name, "largest" if head.base_lr == max(self.base_lrs) else "smallest",
                    head.base_lr,
                )

    # ---- test: the selected head only --------------------------------------------------------

    def on_test_epoch_start(self):
        self.test_heads.reset()

    def test_step(self, batch, batch_idx):
        features, labels = self._batch_features(*batch)
        logits = self.heads(features)[:, self.selected_heads()]  # (B, draws, C)
        self.test_heads.update(logits, labels[:, 0])

    def on_test_epoch_end(self):
        metrics = self.test_heads.compute()
        self.test_heads.reset()
        self.test_per_draw = [head_results(metrics, draw) for draw in range(self.draws)]
        self.eval_results["test"] = _mean_results(self.test_per_draw)
        for name in METRIC_NAMES:
            self.log(f"test/{name}", self.eval_results["test"][name], sync_dist=False, rank_zero_only=False)

    def predict_step(self, batch, batch_idx):
        images, _ = batch
        if isinstance(images, dict):
            return self.heads(images)[:, self.selected_heads()[0]].softmax(dim=-1)
        return self(images).softmax(dim=-1)

    # ---- record and checkpoint ---------------------------------------------------------------

    def record_extras(self, stage: str) -> dict:
        """Record fields: the lr rule, every head's validation metrics, the chosen heads, few-shot spread."""
        hp = self.hparams
        datamodule = self.trainer.datamodule
        selection_split = None
        if datamodule is not None and hasattr(datamodule, "splits"):
            selection_split = datamodule.splits.get("validation")

        heads = []
        for index, head in enumerate(self.heads.heads):
            entry = {
                "index": index, "name": head.name, "draw": head.draw, "features": dataclasses.asdict(head.features),
                "batch_norm": head.batch_norm, "base_lr": head.base_lr,
                "lr": head.base_lr * self.lr_scale if self.lr_scale is not None else None,
            }
            if self.head_val_results is not None:
                entry["val"] = self.head_val_results[index]
            heads.append(entry)

        selected = self.selected if self.selected is not None else []
        extras = {
            "lr_rule": hp.lr_rule,
            "lr_scale": self.lr_scale,
            "optimizer": hp.optimizer,
            "momentum": hp.momentum,
            "weight_decay": hp.weight_decay,
            "train_augmentation": hp.train_augmentation,
            "feature_cache": {"used": bool(self.cache_entries), "dtype": hp.cache_dtype, "entries": self.cache_entries},
            "selection_split": selection_split,
            "selected_at_step": self.selected_at_step,
            "heads": heads,
            "selected": [{"index": i, "name": self.heads.heads[i].name, "draw": self.heads.heads[i].draw} for i in selected],
        }

        if stage == "test" and self.test_per_draw is not None:
            extras["test_per_draw"] = self.test_per_draw
        if self.few_shot is not None:
            few_shot = dataclasses.asdict(self.few_shot)
            if stage == "test" and self.test_per_draw is not None:
                top1 = [r["top1"] for r in self.test_per_draw]
                few_shot.update(
                    top1_per_draw=top1, top1_mean=float(np.mean(top1)),
                    top1_std=float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0,
                )
            extras["few_shot"] = few_shot
        return {"linear_probe": extras}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["linear_probe_selection"] = {
            "selected": self.selected, "selected_at_step": self.selected_at_step,
            "head_val_results": self.head_val_results, "lr_scale": self.lr_scale,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning restores a checkpoint after ``setup`` has extracted features. If the checkpoint's
        # encoder differs from the one built from ``encoder`` (e.g. another random init), load it now
        # and extract again, before any data loader reads the cache.
        prefix = "encoder."
        encoder_state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        current = self.encoder.state_dict()
        if encoder_state and any(not torch.equal(value.cpu(), current[key].cpu()) for key, value in encoder_state.items()):
            log.info("the checkpoint's encoder weights differ from %s; extracting features again", self.hparams.encoder)
            self.encoder.load_state_dict(encoder_state)
            self._encoder_fingerprint = None
            if self._cached_roles and self._trainer is not None:
                self._cache_roles(self.trainer.datamodule)

        state = checkpoint.get("linear_probe_selection") or {}
        self.selected = state.get("selected")
        self.selected_at_step = state.get("selected_at_step")
        self.head_val_results = state.get("head_val_results")
        self.lr_scale = state.get("lr_scale")
