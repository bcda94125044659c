"""Architecture inference from the tensor shapes of a timm-layout ``Beit`` state dict, and shape checks."""

from __future__ import annotations

import logging
import math
import re

import torch

from d2v_eval.encoders.checkpoints import StateDict
from d2v_eval.encoders.presets import BeitArch

log = logging.getLogger(__name__)

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
BLOCK_TABLE = re.compile(r"^blocks\.(\d+)\.attn\.relative_position_bias_table$")
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")

# Rows of a relative position bias table beyond the (2W-1)^2 patch offsets: class-to-patch,
# patch-to-class and class-to-class (timm 1.0.31, layers/pos_embed_rel.py gen_relative_position_index).
NUM_CLASS_ROWS = 3
# Head width every released BEiT / data2vec-vision encoder uses (768/12, 1024/16); a fallback only.
DEFAULT_HEAD_DIM = 64


def table_rows(window: int) -> int:
    """Rows of a relative position bias table for a square ``window`` of patches: (2W-1)^2 + 3."""
    return (2 * window - 1) ** 2 + NUM_CLASS_ROWS


def window_from_table(key: str, rows: int) -> int:
    """Invert :func:`table_rows`; an impossible row count is an error naming the tensor."""
    offsets = rows - NUM_CLASS_ROWS
    side = math.isqrt(max(offsets, 0))
    if offsets <= 0 or side * side != offsets or side % 2 == 0:
        raise ValueError(
            f"tensor {key} has {rows} rows, which is not (2W-1)^2 + 3 for any square window W; "
            "the checkpoint is damaged or not a BEiT relative position bias table"
        )
    return (side + 1) // 2


def _require(state_dict: StateDict, key: str, origin: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"{origin} has no tensor {key}; it is not a BEiT / data2vec-vision encoder checkpoint")
    return state_dict[key]


def infer_arch(
    state_dict: StateDict, *, origin: str, layer_norm_eps: float, img_size: int | None = None
) -> BeitArch:
    """Infer a :class:`BeitArch` from timm-layout tensor shapes.

    Width and patch size come from ``patch_embed.proj.weight`` (embed_dim, in_chans, P, P), and depth
    from the block indices. The MLP size comes from ``blocks.0.mlp.fc1.weight``, the head count from
    the relative position bias table (rows, heads), and layer scale from ``gamma_1``. The training
    resolution comes from the table rows or ``pos_embed``. ``layer_norm_eps`` is not stored in a state dict, so the caller
    gives it. ``img_size`` is only used when the checkpoint has no position table at all.
    """
    patch_weight = _require(state_dict, "patch_embed.proj.weight", origin)
    if patch_weight.ndim != 4 or patch_weight.shape[-1] != patch_weight.shape[-2]:
        raise ValueError(
            f"tensor patch_embed.proj.weight of {origin} has shape {tuple(patch_weight.shape)}; "
            "expected (embed_dim, in_chans, P, P) with square patches"
        )
    embed_dim, in_chans, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]

    indices = sorted({int(m.group(1)) for key in state_dict if (m := _BLOCK_INDEX.match(key))})
    if not indices:
        raise ValueError(f"{origin} has no blocks.N.* tensors; it is not a BEiT encoder checkpoint")
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise ValueError(f"{origin} has no tensors for blocks {missing}; the block indices must be 0..depth-1")
    depth = len(indices)

    mlp_hidden_dim = _require(state_dict, "blocks.0.mlp.fc1.weight", origin).shape[0]
    init_values = 0.1 if "blocks.0.gamma_1" in state_dict else None  # the value is overwritten on load

    tables = {key: value for key, value in state_dict.items() if key == SHARED_TABLE or BLOCK_TABLE.match(key)}
    if SHARED_TABLE in tables:
        rel_pos_bias = "shared"
    elif tables:
        rel_pos_bias = "per_block"
    else:
        rel_pos_bias = "none"

    windows = {key: window_from_table(key, value.shape[0]) for key, value in tables.items()}
    heads = {key: value.shape[1] for key, value in tables.items()}
    if len(set(windows.values())) > 1 or len(set(heads.values())) > 1:
        shapes = ", ".join(f"{key} {tuple(tables[key].shape)}" for key in sorted(tables))
        raise ValueError(f"relative position bias tables of {origin} disagree in shape: {shapes}")

    pos_embed = state_dict.get("pos_embed")
    pos_window = None
    if pos_embed is not None:
        patches = pos_embed.shape[1] - 1
        pos_window = math.isqrt(max(patches, 0))
        if pos_embed.ndim != 3 or patches <= 0 or pos_window * pos_window != patches:
            raise ValueError(
                f"tensor pos_embed of {origin} has shape {tuple(pos_embed.shape)}; expected (1, 1 + W*W, embed_dim)"
            )

    window = next(iter(windows.values()), None)
    if window is not None and pos_window is not None and window != pos_window:
        raise ValueError(
            f"tensor pos_embed of {origin} is for a {pos_window}x{pos_window} patch grid but the relative "
            f"position bias tables are for {window}x{window}; the checkpoint is inconsistent"
        )
    window = window or pos_window
    if window is not None:
        checkpoint_img_size = window * patch_size
    else:
        checkpoint_img_size = img_size or 224
        log.info("%s has no position tables; its resolution is taken as %d px", origin, checkpoint_img_size)

    if heads:
        num_heads = next(iter(heads.values()))
    else:
        num_heads = max(1, embed_dim // DEFAULT_HEAD_DIM)
        log.warning(
            "%s has no relative position bias table to read the head count from; assuming %d heads of width %d",
            origin, num_heads, DEFAULT_HEAD_DIM,
        )

    return BeitArch(
        img_size=checkpoint_img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_hidden_dim=mlp_hidden_dim,
        init_values=init_values,
        layer_norm_eps=layer_norm_eps,
        use_abs_pos_emb=pos_embed is not None,
        rel_pos_bias=rel_pos_bias,
        in_chans=in_chans,
    )


def check_shapes(state_dict: StateDict, expected: dict[str, torch.Size], origin: str) -> None:
    """Raise naming every tensor whose shape differs from ``expected`` (keys absent there are skipped)."""
    wrong = [
        f"{key} is {tuple(tensor.shape)}, expected {tuple(expected[key])}"
        for key, tensor in state_dict.items()
        if key in expected and tuple(tensor.shape) != tuple(expected[key])
    ]
    if wrong:
        shown = "; ".join(wrong[:10]) + (f"; ... and {len(wrong) - 10} more" if len(wrong) > 10 else "")
        raise ValueError(f"tensor shapes of {origin} are inconsistent with its architecture: {shown}")
