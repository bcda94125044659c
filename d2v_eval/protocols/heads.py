"""A bank of linear heads trained together on shared frozen features, their exact metrics and selection.

Every head is an optional BatchNorm without affine parameters (MAE ``main_linprobe.py``) followed by
a linear layer. Heads that read the same features share one BatchNorm, whose output and running
statistics depend only on its input, so sharing changes no head's result.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import Metric

from d2v_eval.protocols.features import FeatureSpec


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One head of the grid: few-shot draw, feature spec, BatchNorm in front or not, base learning rate."""

    draw: int
    features: FeatureSpec
    batch_norm: bool
    base_lr: float

    @property
    def name(self) -> str:
        draw = f"draw{self.draw}/" if self.draw else ""
        return f"{draw}{self.features.name}/{'bn' if self.batch_norm else 'nobn'}/lr{self.base_lr:g}"

    @property
    def init_key(self) -> str:
        """Heads with equal keys start from equal weights, whatever the learning rate or grid size."""
        return f"{self.draw}/{self.features.name}/{self.batch_norm}"


def head_grid(specs, batch_norm, base_lrs, draws: int = 1) -> list[HeadSpec]:
    """Build every head of draws x feature specs x BatchNorm choices x learning rates, nested in that order."""
    return [
        HeadSpec(draw, spec, bool(norm), float(lr))
        for draw in range(draws) for spec in specs for norm in batch_norm for lr in base_lrs
    ]


class HeadBank(nn.Module):
    """Linear heads over named features; ``forward`` returns logits (B, num_heads, num_classes).

    Args:
        heads: the grid from :func:`head_grid`.
        dims: feature length per spec name.
        num_classes: output classes of every head.
        init_seed: weights are drawn from ``trunc_normal(std=0.01)`` (MAE ``main_linprobe.py``) with a
            generator seeded by ``init_seed`` and the head's ``init_key``, so a head starts from the
            same weights in a one-head run and in a grid.
    """

    def __init__(self, heads: list[HeadSpec], dims: dict[str, int], num_classes: int, init_seed: int = 0):
        super().__init__()
        self.heads = list(heads)
        self.num_classes = num_classes
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for head in self.heads:
            dim = dims[head.features.name]
            generator = torch.Generator().manual_seed(init_seed + zlib.crc32(head.init_key.encode()))
            weight = torch.empty(num_classes, dim)
            nn.init.trunc_normal_(weight, std=0.01, generator=generator)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.zeros(num_classes)))

        # Heads reading the same (draw, spec, norm) input are evaluated with one matrix product.
        self.groups: dict[tuple[int, str, bool], list[int]] = {}
        for index, head in enumerate(self.heads):
            self.groups.setdefault((head.draw, head.features.name, head.batch_norm), []).append(index)
        order = [index for indices in self.groups.values() for index in indices]
        # head_grid lists each group's heads next to each other, so no reordering is needed there.
        self.group_order = None if order == list(range(len(order))) else torch.argsort(torch.tensor(order)).tolist()
        self.norms = nn.ModuleDict({
            self.norm_name(draw, spec_name): nn.BatchNorm1d(dims[spec_name], affine=False, eps=1e-6)
            for (draw, spec_name, norm) in self.groups if norm
        })

    @staticmethod
    def norm_name(draw: int, spec_name: str) -> str:
        return f"draw{draw}_{spec_name}".replace(".", "_")

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_heads, num_classes) from ``features[name]`` of shape (B, draws, dim).

        A features tensor with one draw (evaluation data) feeds the heads of every draw.
        """
        batch = next(iter(features.values())).shape[0]
        outputs = []
        for (draw, spec_name, norm), indices in self.groups.items():
            x = features[spec_name]
            x = x[:, draw if x.shape[1] > 1 else 0]  # (B, dim)
            if norm:
                x = self.norms[self.norm_name(draw, spec_name)](x)
            weight = torch.cat([self.weights[i] for i in indices])  # (L * C, dim)
            bias = torch.cat([self.biases[i] for i in indices])  # (L * C,)
            outputs.append(F.linear(x, weight, bias).view(batch, len(indices), self.num_classes))  # (B, L, C)
        logits = torch.cat(outputs, dim=1)  # (B, H, C), heads in group order
        if self.group_order is not None:
            logits = logits[:, self.group_order]  # back to grid order
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over heads of each head's mean cross-entropy; ``labels`` (B, draws) or (B, 1).

        Heads have disjoint parameters, so each head's gradient equals that of its own mean loss.
        """
        batch, num_heads, num_classes = logits.shape
        draw_of_head = torch.tensor([h.draw if labels.shape[1] > 1 else 0 for h in self.heads], device=labels.device)
        targets = labels[:, draw_of_head]  # (B, H)
        losses = F.cross_entropy(logits.reshape(-1, num_classes), targets.reshape(-1), reduction="none")
        return losses.view(batch, num_heads).mean(dim=0).sum()


class MultiHeadMetrics(Metric):
    """Exact top-1, top-5, mean per-class accuracy and mean loss of every head, summed over processes.

    Written here because torchmetrics' accuracies take one prediction per sample; one metric object
    per head would repeat the same update dozens of times per batch. Results are in percent.
    """

    full_state_update = False

    def __init__(self, num_heads: int, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.add_state("correct_top1", torch.zeros(num_heads, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct_top5", torch.zeros(num_heads, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_correct", torch.zeros(num_heads, num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_total", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("loss_sum", torch.zeros(num_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``logits`` (B, H, C), ``labels`` (B,)."""
        batch, num_heads, num_classes = logits.shape
        k = min(5, num_classes)
        top = logits.topk(k, dim=-1).indices  # (B, H, k)
        hits = top == labels[:, None, None]  # (B, H, k)
        self.correct_top1 += hits[..., 0].sum(dim=0)
        self.correct_top5 += hits.any(dim=-1).sum(dim=0)
        one_hot = F.one_hot(labels, num_classes)  # (B, C)
        self.class_correct += (hits[..., 0].long().T @ one_hot)  # (H, C)
        self.class_total += one_hot.sum(dim=0)
        losses = F.cross_entropy(
            logits.reshape(-1, num_classes).float(), labels.repeat_interleave(num_heads), reduction="none"
        ).view(batch, num_heads)
        self.loss_sum += losses.sum(dim=0).double()
        self.count += batch

    def compute(self) -> dict[str, torch.Tensor]:
        """Per-head tensors (H,) ``top1``, ``top5``, ``mean_per_class`` (classes with samples), ``loss``."""
        count = self.count.clamp(min=1).double()
        present = self.class_total > 0
        per_class = self.class_correct[:, present].double() / self.class_total[present].double()  # (H, C')
        return {
            "top1": 100.0 * self.correct_top1.double() / count,
            "top5": 100.0 * self.correct_top5.double() / count,
            "mean_per_class": 100.0 * per_class.mean(dim=1),
            "loss": self.loss_sum / count,
            "num_samples": self.count.clone(),
        }


def head_results(metrics: dict[str, torch.Tensor], index: int) -> dict[str, float]:
    """Metrics of head ``index`` as plain floats, plus ``num_samples``."""
    # torchmetrics squeezes one-element results to 0-d tensors, hence the reshape.
    results = {name: float(metrics[name].reshape(-1)[index]) for name in ("top1", "top5", "mean_per_class", "loss")}
    results["num_samples"] = int(metrics["num_samples"])
    return results


def select_heads(heads: list[HeadSpec], top1: list[float], loss: list[float]) -> list[int]:
    """Index of the best head of every draw: highest top-1, then lowest loss, then first in the grid."""
    best: dict[int, int] = {}
    for index, head in enumerate(heads):
        current = best.get(head.draw)
        if current is None or (-top1[index], loss[index]) < (-top1[current], loss[current]):
            best[head.draw] = index
    return [best[draw] for draw in sorted(best)]
