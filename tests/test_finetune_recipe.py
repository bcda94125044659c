"""The fine-tuning recipe: layer-decay learning-rate table, mixup batches, EMA, failures and bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from datasets import DatasetDict, load_from_disk
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import MixedPrecision
from timm.models.beit import Beit
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset

from d2v_eval import FineTune, ImageClassificationData
from d2v_eval.data.digits import digits_path
from d2v_eval.protocols.base import WarmupCosineFactor
from d2v_eval.protocols.optim import layer_decay_param_groups, warmup_cosine
from d2v_eval.results import ResultRecorder

DEPTH, DECAY = 12, 0.65
LR, WARMUP_LR, MIN_LR = 4e-3, 1e-6, 1e-6
TOTAL_STEPS, WARMUP_STEPS = 20, 5
# Scale per parameter for a 12-block encoder with decay 0.65 (data2vec_vision assignment).
EXPECTED_SCALES = {
    "cls_token": 0.65 ** 13,                    # ~0.003697: layer 0
    "patch_embed.proj.weight": 0.65 ** 13,
    "patch_embed.proj.bias": 0.65 ** 13,
    "blocks.0.attn.qkv.weight": 0.65 ** 12,     # ~0.005688: block 0 = layer 1
    "blocks.0.attn.q_bias": 0.65 ** 12,
    "blocks.5.mlp.fc1.weight": 0.65 ** 7,
    "blocks.11.mlp.fc2.weight": 0.65,           # block 11 = layer 12
    "blocks.11.norm2.weight": 0.65,
    "fc_norm.weight": 1.0,                      # layer 13
    "head.weight": 1.0,
    "head.bias": 1.0,
}


def narrow_beit(*, shared: bool) -> Beit:
    """A 12-block BEiT of width 16: the layer structure of ViT-B at a fraction of the cost."""
    return Beit(
        img_size=16, patch_size=8, embed_dim=16, depth=DEPTH, num_heads=2, num_classes=5, mlp_ratio=2.0,
        init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared,
    )


def lrs_at(groups: list[dict], steps: list[int]) -> dict[int, dict[str, float]]:
    """Each parameter's lr after the optimizer and the per-step LambdaLR have stepped ``step`` times."""
    optimizer = torch.optim.AdamW(groups, lr=LR)
    factor = WarmupCosineFactor(
        total_steps=TOTAL_STEPS, warmup_steps=WARMUP_STEPS, lr=LR, warmup_lr=WARMUP_LR, min_lr=MIN_LR
    )
    scheduler = LambdaLR(optimizer, factor)
    seen = {}
    for step in range(max(steps) + 1):
        if step in steps:
            seen[step] = {name: g["lr"] for g in optimizer.param_groups for name in g["param_names"]}
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("shared", [False, True], ids=["per_block_bias", "shared_bias"])
def test_layer_decay_lr_table(weight_decay, shared):
    model = narrow_beit(shared=shared)
    groups = layer_decay_param_groups(model, lr=LR, weight_decay=weight_decay, layer_decay=DECAY, depth=DEPTH)
    expected_scales = dict(EXPECTED_SCALES)
    if shared:
        expected_scales["rel_pos_bias.relative_position_bias_table"] = 1.0  # layer depth + 1
    else:
        expected_scales["blocks.0.attn.relative_position_bias_table"] = 0.65 ** 12

    warmup_step, cosine_step = 2, 12
    seen = lrs_at(groups, [warmup_step, cosine_step])
    assert EXPECTED_SCALES["cls_token"] == pytest.approx(0.003697, abs=1e-6)
    assert EXPECTED_SCALES["blocks.0.attn.qkv.weight"] == pytest.approx(0.005688, abs=1e-6)
    for step in (warmup_step, cosine_step):
        schedule = warmup_cosine(
            step, total_steps=TOTAL_STEPS, warmup_steps=WARMUP_STEPS, lr=LR, warmup_lr=WARMUP_LR, min_lr=MIN_LR
        )
        for name, scale in expected_scales.items():
            assert seen[step][name] == pytest.approx(schedule * scale, rel=1e-9), (step, name)

    decay_of = {name: g["weight_decay"] for g in groups for name in g["param_names"]}
    assert decay_of["blocks.3.attn.qkv.weight"] == weight_decay
    assert decay_of["head.weight"] == weight_decay
    for no_decay in ("cls_token", "head.bias", "blocks.3.attn.q_bias", "blocks.3.norm1.weight", "fc_norm.weight"):
        assert decay_of[no_decay] == 0.0, no_decay


def test_timm_assignment_puts_shared_bias_first():
    model = narrow_beit(shared=True)
    groups = layer_decay_param_groups(model, lr=LR, weight_decay=0.05, layer_decay=DECAY, depth=DEPTH, assignment="timm")
    scale_of = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    assert scale_of["rel_pos_bias.relative_position_bias_table"] == pytest.approx(0.65 ** 13)
    assert scale_of["head.weight"] == 1.0


def test_fresh_head_init_scaled():
    torch.manual_seed(0)
    model = FineTune("data2vec_vision_tiny_patch4_16", num_classes=1000)
    head = model.model.head
    # trunc_normal(std=0.02) x 0.001 gives std 2e-5. timm truncates at absolute bounds +-2, so |w| <= 0.002.
    assert head.weight.std().item() == pytest.approx(2e-5, rel=0.05)
    assert head.weight.abs().max().item() <= 2e-3
    assert torch.count_nonzero(head.bias) == 0


@pytest.fixture
def odd_digits(tmp_path):
    """digits cut to 21 train, 10 validation and 11 test images: batch 8 leaves odd last batches."""
    splits = load_from_disk(str(digits_path()))
    small = DatasetDict({
        "train": splits["train"].select(range(21)),
        "validation": splits["validation"].select(range(10)),
        "test": splits["test"].select(range(11)),
    })
    small.save_to_disk(str(tmp_path / "odd_digits"))
    return str(tmp_path / "odd_digits")


def small_trainer(**overrides) -> pl.Trainer:
    options = dict(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
    )
    options.update(overrides)
    return pl.Trainer(**options)


def test_mixup_drops_odd_last_batch(odd_digits):
    pl.seed_everything(0)
    model = FineTune("data2vec_vision_micro_patch4_16", num_classes=10, warmup_epochs=0)
    data = ImageClassificationData(odd_digits, input_size=16, batch_size=8, num_workers=0, hflip=0.0)
    trainer = small_trainer()
    trainer.fit(model, data)

    assert data.hparams.drop_last is True
    assert trainer.num_training_batches == 2  # 21 images: 8 + 8, the odd 5 dropped
    assert trainer.global_step == 2
    assert model.eval_results["val"]["num_samples"] == 10  # validation neither mixes nor drops
    trainer.test(model, data)
    assert model.eval_results["test"]["num_samples"] == 11


def test_mixup_rejects_odd_batch_size(odd_digits):
    model = FineTune("data2vec_vision_micro_patch4_16", num_classes=10, warmup_epochs=0)
    data = ImageClassificationData(odd_digits, input_size=16, batch_size=7, num_workers=0)
    with pytest.raises(ValueError, match="batch_size 7 is odd"):
        small_trainer().fit(model, data)


def test_ema_weights_evaluated_and_recorded(odd_digits, tmp_path):
    pl.seed_everything(0)
    model = FineTune(
        "data2vec_vision_micro_patch4_16", num_classes=10, warmup_epochs=0, lr=1e-2,
        model_ema=True, model_ema_decay=0.5,
    )
    initial = {k: v.clone() for k, v in model.model.state_dict().items()}
    data = ImageClassificationData(odd_digits, input_size=16, batch_size=4, num_workers=0, hflip=0.0)
    recorder = ResultRecorder(records_dir=str(tmp_path / "records"))
    trainer = small_trainer(callbacks=[recorder])
    trainer.fit(model, data)

    raw = model.model.state_dict()
    ema = model.model_ema.module.state_dict()
    name = "blocks.0.attn.qkv.weight"
    assert not torch.equal(ema[name], raw[name])        # EMA lags the raw weights
    assert not torch.equal(ema[name], initial[name])    # and has moved from the start
    assert all(not p.requires_grad for p in model.model_ema.parameters())

    trainer.test(model, data)
    record = recorder.build_record(trainer, model, stage="test", role="test")
    metrics = record["metrics"]
    for key in ("top1", "ema_top1", "ema_top5", "ema_mean_per_class", "ema_loss"):
        assert key in metrics, key
    assert metrics["ema_loss"] != metrics["loss"]


def test_nan_loss_names_step():
    model = FineTune("data2vec_vision_micro_patch4_16", num_classes=10, warmup_epochs=0, mixup_alpha=0, cutmix_alpha=0)
    images = torch.full((4, 3, 16, 16), float("nan"))
    loader = DataLoader(TensorDataset(images, torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(FloatingPointError, match="at optimizer step 0 .epoch 0, batch 0"):
        small_trainer().fit(model, train_dataloaders=loader)


def test_bf16_mixed_trains(odd_digits):
    pl.seed_everything(0)
    model = FineTune("data2vec_vision_micro_patch4_16", num_classes=10, warmup_epochs=0)
    data = ImageClassificationData(odd_digits, input_size=16, batch_size=8, num_workers=0)
    trainer = small_trainer(precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(model, data)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_fp16_overflow_steps_not_logged_as_nan(odd_digits, tmp_path):
    """fp16 autocast on the CPU, with a gradient scaler whose first scales overflow fp16 gradients."""
    pl.seed_everything(0)
    model = FineTune("data2vec_vision_micro_patch4_16", num_classes=10, warmup_epochs=0, mixup_alpha=0, cutmix_alpha=0)
    initial = {name: tensor.clone() for name, tensor in model.model.state_dict().items()}
    init_scale = 2.0**24  # a loss near 2.3 times 2**24 overflows fp16 (max 65504) in the backward pass
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    data = ImageClassificationData(odd_digits, input_size=16, batch_size=4, num_workers=0)
    trainer = small_trainer(
        max_epochs=2, limit_val_batches=0, log_every_n_steps=1, logger=CSVLogger(tmp_path),
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    trainer.fit(model, data)

    assert scaler.get_scale() < init_scale  # the scaler skipped overflowing steps and backed off
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        losses = [float(row["train/loss"]) for row in csv.DictReader(file) if row["train/loss"]]
    assert len(losses) == trainer.global_step == 12
    assert all(math.isfinite(loss) for loss in losses)
    weights = model.model.state_dict()
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not torch.equal(weights["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])  # later steps ran


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"weight_decay": -0.01}, "weight_decay -0.01 is negative"),
        ({"layer_decay": 1.2}, r"layer_decay 1.2 is outside \(0, 1\]"),
        ({"base_lr": 1e-3}, "set exactly one of lr"),
        ({"lr": None}, "set exactly one of lr"),
        ({"mixup_alpha": -1.0}, "mixup_alpha -1.0"),
    ],
)
def test_bad_hyperparameters(overrides, message):
    with pytest.raises(ValueError, match=message):
        FineTune("data2vec_vision_micro_patch4_16", num_classes=10, **overrides)


def test_warmup_longer_than_training(odd_digits):
    model = FineTune("data2vec_vision_micro_patch4_16", num_classes=10, warmup_epochs=3)
    data = ImageClassificationData(odd_digits, input_size=16, batch_size=8, num_workers=0)
    with pytest.raises(ValueError, match="warmup of 6 steps is longer than training .2 steps"):
        small_trainer().fit(model, data)


def test_randaugment_posterize_at_max_magnitude():
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    import d2v_eval.data.datamodule  # noqa: F401  (installs the posterize fix)

    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)  # keeps 0 bits
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(image).getpixel((0, 0)) == (0, 0, 0)
