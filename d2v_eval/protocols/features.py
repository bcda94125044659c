"""Feature specifications for frozen-encoder protocols and their extraction from a timm ``Beit``.

A :class:`FeatureSpec` names one feature vector per image: the CLS token, the mean of the patch
tokens, or both concatenated, taken from the last block or the last ``blocks`` blocks concatenated,
with or without the encoder's final norm. The grid of choices follows the linear evaluations of
BEiT (``run_linear_eval.py``: CLS and mean of raw block outputs) and DINOv2 (``eval/linear.py``:
last 1 or 4 blocks, with or without average pooling, after the final norm).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from timm.models.beit import Beit

Pooling = Literal["cls", "mean", "cls+mean"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "cls+mean")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One feature vector per image.

    Args:
        pooling: ``"cls"`` (CLS token), ``"mean"`` (mean of the patch tokens, CLS excluded) or
            ``"cls+mean"`` (both concatenated, CLS first).
        blocks: concatenate the outputs of the last ``blocks`` transformer blocks, oldest first.
        final_norm: apply the encoder's final LayerNorm to every token before pooling; False takes
            the raw block outputs.
    """

    pooling: Pooling = "cls"
    blocks: int = 1
    final_norm: bool = True

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is invalid; choose one of {', '.join(POOLINGS)}")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"blocks {self.blocks!r} is invalid; use a whole number of last blocks >= 1")

    @property
    def name(self) -> str:
        """Stable name used in cache keys, head names and records, e.g. ``"cls-last1-norm"``."""
        return f"{self.pooling}-last{self.blocks}-{'norm' if self.final_norm else 'raw'}"

    def dim(self, embed_dim: int) -> int:
        """Length of the feature vector for an encoder of width ``embed_dim``."""
        per_block = 2 if self.pooling == "cls+mean" else 1
        return per_block * self.blocks * embed_dim


DEFAULT_SPECS: tuple[FeatureSpec, ...] = (FeatureSpec("cls"), FeatureSpec("mean"))


def check_specs(specs: list[FeatureSpec] | tuple[FeatureSpec, ...], depth: int) -> None:
    """Raise ``ValueError`` for an empty list, duplicates, or a spec that needs more blocks than ``depth``."""
    if not specs:
        raise ValueError("features is empty; give at least one feature spec, e.g. [{pooling: cls}]")
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"feature specs {duplicates} are given more than once; list each spec once")
    for spec in specs:
        if spec.blocks > depth:
            raise ValueError(
                f"feature spec {spec.name!r} asks for the last {spec.blocks} blocks but the encoder has "
                f"{depth}; use blocks in 1..{depth}"
            )


@torch.no_grad()
def extract_features(encoder: Beit, images: torch.Tensor, specs: list[FeatureSpec]) -> dict[str, torch.Tensor]:
    """Run ``encoder`` once on ``images`` (B, 3, H, W) and return ``{spec.name: (B, spec.dim) float tensor}``.

    The caller keeps the encoder in eval mode; this function only disables gradients.
    """
    depth = len(encoder.blocks)
    check_specs(specs, depth)
    max_blocks = max(spec.blocks for spec in specs)
    # Each entry: (patch tokens (B, N, D), prefix tokens (B, 1, D)) for one of the last max_blocks blocks.
    outputs = encoder.forward_intermediates(
        images, indices=max_blocks, return_prefix_tokens=True, norm=False, stop_early=True,
        output_fmt="NLC", intermediates_only=True,
    )
    raw = [(prefix[:, 0], patches) for patches, prefix in outputs]
    normed = None
    if any(spec.final_norm for spec in specs):
        # LayerNorm acts per token, so norming CLS and patch tokens separately equals norming them together.
        normed = [(encoder.norm(cls), encoder.norm(patches)) for cls, patches in raw]

    features = {}
    for spec in specs:
        tokens = normed if spec.final_norm else raw
        parts = []
        for cls, patches in tokens[len(tokens) - spec.blocks:]:
            if spec.pooling in ("cls", "cls+mean"):
                parts.append(cls)  # (B, D)
            if spec.pooling in ("mean", "cls+mean"):
                parts.append(patches.mean(dim=1))  # (B, N, D) -> (B, D)
        features[spec.name] = torch.cat(parts, dim=1).float()  # (B, spec.dim(D))
    return features
