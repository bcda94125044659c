"""Architecture presets for Data2Vec-Vision encoders and the timm ``Beit`` builder they feed."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Literal

import torch.nn as nn
from timm.models.beit import Beit

RelPosBias = Literal["shared", "per_block", "none"]


@dataclasses.dataclass(frozen=True)
class BeitArch:
    """Hyperparameters that fix the shapes of a BEiT-style encoder.

    ``img_size`` is the resolution the weights were trained at (square, pixels).
    ``rel_pos_bias`` is the storage layout of the relative position bias tables:
    one table shared by all blocks, one per block, or none.
    """

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden_dim: int
    init_values: float | None
    layer_norm_eps: float
    use_abs_pos_emb: bool
    rel_pos_bias: RelPosBias
    in_chans: int = 3

    def replace(self, **changes) -> "BeitArch":
        return dataclasses.replace(self, **changes)


# Published architectures (data2vec paper, arXiv 2202.03555, section 4.1; BEiT ViT-B/16 and ViT-L/16):
# layer scale 0.1 and per-block relative position bias as in the released fine-tuned models,
# LayerNorm eps 1e-6 as in facebookresearch/data2vec_vision beit/modeling_finetune.py.
# The tiny and micro presets are for CPU demos and tests only.
PRESETS: dict[str, BeitArch] = {
    "data2vec_vision_base_patch16_224": BeitArch(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_hidden_dim=3072,
        init_values=0.1, layer_norm_eps=1e-6, use_abs_pos_emb=False, rel_pos_bias="per_block",
    ),
    "data2vec_vision_large_patch16_224": BeitArch(
        img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096,
        init_values=0.1, layer_norm_eps=1e-6, use_abs_pos_emb=False, rel_pos_bias="per_block",
    ),
    "data2vec_vision_tiny_patch4_16": BeitArch(
        img_size=16, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_hidden_dim=512,
        init_values=0.1, layer_norm_eps=1e-6, use_abs_pos_emb=False, rel_pos_bias="per_block",
    ),
    "data2vec_vision_micro_patch4_16": BeitArch(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64,
        init_values=0.1, layer_norm_eps=1e-6, use_abs_pos_emb=False, rel_pos_bias="per_block",
    ),
}


def get_preset(name: str) -> BeitArch:
    """Return the preset called ``name``; raise ``ValueError`` listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        valid = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown encoder preset {name!r}; valid presets: {valid}") from None


def build_beit(
    arch: BeitArch,
    *,
    drop_path_rate: float = 0.0,
    global_pool: str = "avg",
    num_classes: int = 0,
) -> Beit:
    """Build a randomly initialised timm ``Beit`` with the shapes of ``arch``.

    ``global_pool="avg"`` averages the patch tokens into a fresh ``fc_norm`` (the final ``norm`` is
    then an identity); ``"token"`` takes the CLS token after the final ``norm``.
    """
    mlp_ratio = arch.mlp_hidden_dim / arch.embed_dim
    if int(arch.embed_dim * mlp_ratio) != arch.mlp_hidden_dim:
        # timm sizes the MLP as int(embed_dim * mlp_ratio); a ratio that rounds wrongly cannot be built.
        raise ValueError(
            f"MLP size {arch.mlp_hidden_dim} is not reachable from embed_dim {arch.embed_dim} "
            "with timm's int(embed_dim * mlp_ratio); use an MLP size that is a multiple of embed_dim"
        )
    if arch.embed_dim % arch.num_heads:
        raise ValueError(f"embed_dim {arch.embed_dim} is not divisible by num_heads {arch.num_heads}")
    if arch.img_size % arch.patch_size:
        raise ValueError(
            f"img_size {arch.img_size} is not a multiple of patch_size {arch.patch_size}; "
            f"choose a multiple such as {arch.patch_size * max(1, round(arch.img_size / arch.patch_size))}"
        )

    return Beit(
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        num_classes=num_classes,
        global_pool=global_pool,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        qkv_bias=True,
        mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=arch.layer_norm_eps),
        init_values=arch.init_values,
        use_abs_pos_emb=arch.use_abs_pos_emb,
        use_rel_pos_bias=arch.rel_pos_bias == "per_block",
        use_shared_rel_pos_bias=arch.rel_pos_bias == "shared",
    )
