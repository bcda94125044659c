"""Shared fixtures: a private d2v-eval cache and small Hugging Face checkpoints made on the fly."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Run tiny models on one thread: faster than threads competing for a few shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the digits dataset and feature caches out of the user's home during tests."""
    cache = tmp_path_factory.mktemp("d2v_cache")
    previous = os.environ.get("D2V_EVAL_CACHE")
    os.environ["D2V_EVAL_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("D2V_EVAL_CACHE", None)
    else:
        os.environ["D2V_EVAL_CACHE"] = previous


def small_hf_config(*, shared: bool, mean_pooling: bool = False, num_labels: int | None = None, **overrides):
    """A tiny ``Data2VecVisionConfig`` (2 blocks, width 32, 16 px, patch 4)."""
    from transformers import Data2VecVisionConfig

    kwargs = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=4, use_shared_relative_position_bias=shared,
        use_relative_position_bias=not shared, use_mean_pooling=mean_pooling,
    )
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    kwargs.update(overrides)
    return Data2VecVisionConfig(**kwargs)


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so that zero-initialised tensors (bias tables, biases) matter too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture
def hf_model_dir(tmp_path):
    """Factory: save a random-weight transformers ``Data2VecVisionModel`` and return (dir, model)."""
    from transformers import Data2VecVisionModel

    def make(*, shared: bool, **overrides):
        model = randomise_(Data2VecVisionModel(small_hf_config(shared=shared, **overrides))).eval()
        target = tmp_path / f"hf-{'shared' if shared else 'per-block'}"
        model.save_pretrained(target)
        return target, model

    return make
