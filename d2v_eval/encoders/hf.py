"""Conversion of Hugging Face ``Data2VecVision`` checkpoints to timm's ``Beit`` layout.

Key names on both sides are those of transformers' ``modeling_data2vec_vision.py`` and timm's
``models/beit.py``; query/key/value projections are fused into timm's ``qkv`` (key has no bias).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from d2v_eval.encoders.checkpoints import StateDict
from d2v_eval.encoders.presets import BeitArch

# Prefixes of the encoder inside transformers' task models (Data2VecVision*, Beit*).
HF_PREFIXES = ("data2vec_vision.", "beit.")

# Per-block renames: transformers name (after ``encoder.layer.{i}.``) -> timm name (after ``blocks.{i}.``).
_BLOCK_RENAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
}
_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.layernorm.weight": "fc_norm.weight",
    "pooler.layernorm.bias": "fc_norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_BLOCK_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def read_hf_config(model_dir: Path) -> dict:
    """Read ``config.json`` of a Hugging Face model directory."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json; a Hugging Face model directory needs config.json and "
            "model.safetensors or pytorch_model.bin (as written by save_pretrained)"
        )
    with open(config_path, encoding="utf-8") as handle:
        return json.load(handle)


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config {name}={value} is not square; only square inputs are supported")
        value = value[0]
    return int(value)


def arch_from_hf_config(config: dict) -> BeitArch:
    """Read every architecture hyperparameter from a ``Data2VecVisionConfig`` (or ``BeitConfig``) dict."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [name for name in required if name not in config]
    if missing:
        raise ValueError(
            f"config.json (model_type {config.get('model_type')!r}) is not a transformers Data2VecVision or BEiT "
            f"config: it has no {', '.join(missing)}. For a timm repository, pass its weights file "
            "(model.safetensors) instead, whose architecture is read from the tensor shapes"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported; timm's Beit uses exact GELU")
    if config.get("use_shared_relative_position_bias"):
        rel_pos_bias = "shared"
    elif config.get("use_relative_position_bias"):
        rel_pos_bias = "per_block"
    else:
        rel_pos_bias = "none"
    layer_scale = float(config.get("layer_scale_init_value", 0.1))
    return BeitArch(
        img_size=_square(config.get("image_size", 224), "image_size"),
        patch_size=_square(config.get("patch_size", 16), "patch_size"),
        embed_dim=int(config["hidden_size"]),
        depth=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        mlp_hidden_dim=int(config["intermediate_size"]),
        init_values=layer_scale if layer_scale > 0 else None,
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        use_abs_pos_emb=bool(config.get("use_absolute_position_embeddings", False)),
        rel_pos_bias=rel_pos_bias,
        in_chans=int(config.get("num_channels", 3)),
    )


def _convert_block_key(index: str, rest: str, tensor: torch.Tensor, out: StateDict, qkv: dict) -> bool:
    """Place one per-block tensor into ``out`` (or ``qkv`` for fusion); return False if unknown."""
    if rest in ("lambda_1", "lambda_2"):
        out[f"blocks.{index}.gamma_{rest[-1]}"] = tensor
        return True
    match = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
    if match:
        qkv[(int(index), match.group(1), match.group(2))] = tensor
        return True
    for hf_name, timm_name in _BLOCK_RENAMES.items():
        if rest == hf_name or rest.startswith(hf_name + "."):
            out[f"blocks.{index}.{timm_name}{rest[len(hf_name):]}"] = tensor
            return True
    return False


def convert_hf_state_dict(state_dict: StateDict) -> tuple[StateDict, list[str]]:
    """Convert a transformers state dict to timm ``Beit`` key names.

    Returns the converted dict and the transformers keys that have no timm counterpart (left for the
    caller to report). ``relative_position_index`` buffers are skipped: timm rebuilds them.
    """
    out: StateDict = {}
    qkv: dict[tuple[int, str, str], torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        for prefix in HF_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.endswith("relative_position_index"):
            continue
        if key.startswith("lm_head."):  # BeitForMaskedImageModeling; dropped later as pretraining-only
            out[key] = tensor
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = tensor
            continue
        match = _BLOCK_KEY.match(key)
        if match and _convert_block_key(match.group(1), match.group(2), tensor, out, qkv):
            continue
        unknown.append(key)

    for index in sorted({block for block, _, _ in qkv}):
        parts = [qkv.get((index, name, "weight")) for name in ("query", "key", "value")]
        if any(part is None for part in parts):
            unknown.extend(f"encoder.layer.{index}.attention.attention.{n}" for n in ("query", "key", "value"))
            continue
        out[f"blocks.{index}.attn.qkv.weight"] = torch.cat(parts, dim=0)  # (3 * embed_dim, embed_dim)
        if (index, "query", "bias") in qkv:
            out[f"blocks.{index}.attn.q_bias"] = qkv[(index, "query", "bias")]
        if (index, "value", "bias") in qkv:
            out[f"blocks.{index}.attn.v_bias"] = qkv[(index, "value", "bias")]
    return out, unknown


def is_hf_layout(keys) -> bool:
    """Return whether state-dict ``keys`` use transformers' names (``embeddings.patch_embeddings...``)."""
    anchor = "embeddings.patch_embeddings.projection.weight"
    return any(key == anchor or key.endswith("." + anchor) for key in keys)
