"""Learning rates the optimizer really uses carry the layer decay under Lightning's scheduler."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from d2v_eval import FineTune, ImageClassificationData
from d2v_eval.protocols.optim import warmup_cosine

LR, WARMUP_LR, MIN_LR, DECAY = 1e-3, 1e-5, 1e-6, 0.5
STEPS_PER_EPOCH, EPOCHS = 3, 3
# Parameter -> layer id in the data2vec_vision assignment for a 2-block encoder (depth + 1 = 3).
EXPECTED_LAYERS = {
    "cls_token": 0, "patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 1,
    "blocks.1.mlp.fc2.bias": 2, "fc_norm.weight": 3, "head.weight": 3,
}


class LearningRateProbe(pl.Callback):
    """Store every param group's lr at the start of each training batch (after the previous step)."""

    def __init__(self):
        self.by_step: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.by_step[trainer.global_step] = {
            name: group["lr"] for group in optimizer.param_groups for name in group["param_names"]
        }


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_group_lr_includes_layer_decay(weight_decay):
    pl.seed_everything(0)
    model = FineTune(
        "data2vec_vision_micro_patch4_16", num_classes=10, lr=LR, weight_decay=weight_decay,
        layer_decay=DECAY, warmup_epochs=1, warmup_lr=WARMUP_LR, min_lr=MIN_LR,
    )
    data = ImageClassificationData("digits", input_size=16, batch_size=8, num_workers=0)
    probe = LearningRateProbe()
    trainer = pl.Trainer(
        max_epochs=EPOCHS, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, callbacks=[probe], accelerator="cpu",
    )
    trainer.fit(model, data)

    total = STEPS_PER_EPOCH * EPOCHS
    for step in (1, 2, 5, 8):  # warmup steps 1-2, cosine steps 5 and 8
        schedule = warmup_cosine(
            step, total_steps=total, warmup_steps=STEPS_PER_EPOCH, lr=LR, warmup_lr=WARMUP_LR, min_lr=MIN_LR
        )
        for name, layer in EXPECTED_LAYERS.items():
            expected = schedule * DECAY ** (2 + 1 - layer)
            assert probe.by_step[step][name] == pytest.approx(expected, rel=1e-9), (step, name)


def test_weight_decay_skips_biases_and_tables():
    model = FineTune("data2vec_vision_micro_patch4_16", num_classes=10, weight_decay=0.05)
    decay_of = {name: group["weight_decay"] for group in model.param_groups() for name in group["param_names"]}
    assert decay_of["blocks.0.attn.qkv.weight"] == 0.05
    assert decay_of["head.weight"] == 0.05
    assert decay_of["cls_token"] == 0.0
    assert decay_of["blocks.0.attn.q_bias"] == 0.0
    assert decay_of["blocks.0.attn.relative_position_bias_table"] == 0.0
    assert decay_of["blocks.0.norm1.weight"] == 0.0


@pytest.mark.parametrize("rel_pos_bias", ["shared", "per_block"])
def test_rel_pos_bias_weight_decay_option(rel_pos_bias):
    model = FineTune(
        "data2vec_vision_micro_patch4_16", num_classes=10, weight_decay=0.05, rel_pos_bias=rel_pos_bias,
        rel_pos_bias_weight_decay=True,
    )
    decay_of = {name: group["weight_decay"] for group in model.param_groups() for name in group["param_names"]}
    tables = [name for name in decay_of if "relative_position_bias_table" in name]
    assert tables
    assert all(decay_of[name] == 0.05 for name in tables)
    assert decay_of["cls_token"] == 0.0
    assert decay_of["blocks.0.attn.q_bias"] == 0.0


def test_shared_bias_layer_assignment():
    reference = FineTune("data2vec_vision_micro_patch4_16", num_classes=10, rel_pos_bias="shared")
    timm_style = FineTune(
        "data2vec_vision_micro_patch4_16", num_classes=10, rel_pos_bias="shared", layer_assignment="timm"
    )
    name = "rel_pos_bias.relative_position_bias_table"
    layer_of = lambda module: next(g["layer_id"] for g in module.param_groups() if name in g["param_names"])
    assert layer_of(reference) == 3
    assert layer_of(timm_style) == 0


@pytest.mark.parametrize("layer_decay", [0.0, 1.5, -0.1])
def test_layer_decay_out_of_range(layer_decay):
    with pytest.raises(ValueError, match=f"layer_decay {layer_decay}"):
        FineTune("data2vec_vision_micro_patch4_16", num_classes=10, layer_decay=layer_decay)
