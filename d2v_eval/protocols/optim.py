"""Optimizer parameter groups with layer-wise learning-rate decay, and the warmup-cosine schedule.

Layer assignment follows facebookresearch/data2vec_vision, beit/optim_factory.py (``get_num_layer_for_vit``):
layer 0 contains cls_token, patch_embed and pos_embed, and block i is layer i + 1. Everything else (a
shared rel_pos_bias, fc_norm, head) is layer depth + 1. A group's scale is ``layer_decay ** (depth + 1 - layer)``.

Written here rather than taken from timm's ``param_groups_layer_decay`` for two reasons: timm puts a
shared rel_pos_bias in layer 0, and timm stores the decay as ``lr_scale``, which only timm's own
schedulers apply. Here the scale is folded into each group's ``lr``, so any scheduler that multiplies
the initial learning rate (``LambdaLR``) keeps it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn as nn

LayerAssignment = Literal["reference", "timm"]


def layer_id_for(name: str, depth: int, assignment: LayerAssignment = "reference") -> int:
    """Layer index of parameter ``name`` in a BEiT model with ``depth`` blocks.

    ``assignment="reference"`` (the default) follows data2vec_vision's ``get_num_layer_for_vit``:
    cls_token, pos_embed and patch_embed are layer 0, ``blocks.i`` is layer i + 1, and everything
    else, including a shared ``rel_pos_bias``, ``fc_norm`` and ``head``, is layer depth + 1 (scale 1.0).
    ``assignment="timm"`` reproduces timm's BEiT group matcher (``Beit.group_matcher`` with
    ``param_groups_layer_decay``, timm 1.0), which differs only in putting a shared ``rel_pos_bias``
    in layer 0, where it gets the smallest learning rate. With per-block tables the two agree.
    """
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token")):
        return 0
    if name.startswith("rel_pos_bias") and assignment == "timm":
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def skips_weight_decay(name: str, param: nn.Parameter, *, decay_rel_pos_bias: bool = False) -> bool:
    """True for parameters trained without weight decay: 1-D tensors, biases, position tables, CLS token.

    With ``decay_rel_pos_bias`` the (2-D) relative position bias tables are decayed like weights, as
    data2vec_vision's run_class_finetuning.py does unless ``--disable_weight_decay_on_rel_pos_bias``
    is given (and that flag skips only per-block tables).
    """
    if "relative_position_bias_table" in name:
        return not decay_rel_pos_bias
    return param.ndim <= 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")


def layer_decay_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    depth: int,
    assignment: LayerAssignment = "reference",
    prefix: str = "",
    decay_rel_pos_bias: bool = False,
) -> list[dict]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Each group has ``lr = lr * scale`` with ``scale = layer_decay ** (depth + 1 - layer)``, also when
    ``weight_decay`` is 0, and keeps ``lr_scale``, ``layer_id`` and ``param_names`` for inspection.
    ``prefix`` is stripped from parameter names before the layer is assigned (e.g. ``"encoder."``).
    ``decay_rel_pos_bias`` applies weight decay to relative position bias tables (see
    :func:`skips_weight_decay`).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay {layer_decay} is outside (0, 1]; use 1.0 to turn layer decay off")
    if weight_decay < 0:
        raise ValueError(f"weight_decay {weight_decay} is negative; use 0 or a positive value")

    groups: dict[tuple[int, bool], dict] = {}
    for full_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = full_name[len(prefix):] if prefix and full_name.startswith(prefix) else full_name
        layer = layer_id_for(name, depth, assignment)
        no_decay = skips_weight_decay(name, param, decay_rel_pos_bias=decay_rel_pos_bias)
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr": lr * scale,
                "lr_scale": scale,
                "layer_id": layer,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(full_name)
    return [groups[key] for key in sorted(groups)]


def param_group_table(groups: list[dict]) -> str:
    """Markdown table of parameter groups (layer, scale, lr, weight decay, tensor count), for logging."""
    lines = ["| layer | lr_scale | lr | weight_decay | tensors |", "| --- | --- | --- | --- | --- |"]
    for group in groups:
        lines.append(
            f"| {group.get('layer_id', '-')} | {group.get('lr_scale', 1.0):.6g} | {group['lr']:.6g} "
            f"| {group['weight_decay']} | {len(group['params'])} |"
        )
    return "\n".join(lines)


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of a linear-warmup, cosine-decay schedule.

    Warmup rises linearly from ``warmup_lr`` to ``lr`` over ``warmup_steps``. The cosine then falls from
    ``lr`` to ``min_lr`` over the remaining steps, stepped every iteration, as ``cosine_scheduler`` in
    data2vec_vision's beit/utils.py does.
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def check_schedule(*, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int) -> None:
    """Raise ``ValueError`` for schedules that cannot be run as written."""
    if lr <= 0:
        raise ValueError(f"lr {lr} must be positive")
    if min_lr < 0 or min_lr > lr:
        raise ValueError(f"min_lr {min_lr} must lie in [0, lr={lr}]")
    if warmup_lr < 0 or warmup_lr > lr:
        raise ValueError(f"warmup_lr {warmup_lr} must lie in [0, lr={lr}]")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup of {warmup_steps} steps is longer than training ({total_steps} steps); "
            "shorten warmup_epochs or train for more epochs"
        )


def resolve_peak_lr(*, lr: float | None, base_lr: float | None, global_batch_size: int | None) -> float:
    """Peak learning rate: ``lr`` when given (absolute), else ``base_lr * global_batch_size / 256``.

    The linear scaling rule with reference batch 256 is the one MAE's main_finetune.py applies to its
    ``blr`` (facebookresearch/mae). data2vec-vision gives its peak rate as an absolute value instead.
    """
    if (lr is None) == (base_lr is None):
        raise ValueError(
            f"set exactly one of lr (absolute, got {lr}) and base_lr (per 256 images, got {base_lr}); "
            "to use base_lr, also set lr to null"
        )
    if lr is not None:
        return float(lr)
    if global_batch_size is None:
        raise ValueError("base_lr needs the global batch size; set an absolute lr or fit with a datamodule")
    return float(base_lr) * global_batch_size / 256
