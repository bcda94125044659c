"""kNN on separable features, kNN through the CLI, and seeded few-shot subsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2v_eval.cli import main
from d2v_eval.data.fewshot import few_shot_indices
from d2v_eval.protocols.knn import knn_scores

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_knn_separable_features_all_correct():
    generator = torch.Generator().manual_seed(0)
    num_classes, per_class, dim = 5, 60, 16
    centres = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1) * 10
    bank_labels = torch.arange(num_classes).repeat_interleave(per_class)
    bank = F.normalize(centres[bank_labels] + torch.randn(len(bank_labels), dim, generator=generator), dim=1)
    query_labels = torch.arange(num_classes).repeat(8)
    queries = F.normalize(centres[query_labels] + torch.randn(len(query_labels), dim, generator=generator), dim=1)

    scores = knn_scores(queries, bank, bank_labels, [10, 20, 100, 200], num_classes=num_classes, chunk_size=7)
    assert scores.shape == (40, 4, num_classes)
    torch.testing.assert_close(scores.sum(-1), torch.ones(40, 4))
    for position, k in enumerate([10, 20, 100, 200]):
        accuracy = (scores[:, position].argmax(-1) == query_labels).float().mean()
        assert accuracy == 1.0, f"k={k}"


def test_knn_cli_records_every_k(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "protocols" / "knn.yaml"),
          "--model.init_args.encoder=data2vec_vision_micro_patch4_16", "--trainer.enable_progress_bar=false",
          f"--recorder.records_dir={tmp_path / 'records'}"])
    (path,) = (tmp_path / "records").glob("*.json")
    record = json.loads(path.read_text())
    assert record["protocol"] == "knn"
    assert record["num_samples"] == 360
    knn = record["knn"]
    assert set(knn["per_k"]["val"]) == {"10", "20", "100", "200"}
    assert set(knn["per_k"]["test"]) == {"10", "20", "100", "200"}
    best_val = max(knn["per_k"]["val"].items(), key=lambda item: item[1]["top1"])
    assert knn["reported_k"] == int(best_val[0])
    assert record["metrics"]["top1"] == knn["per_k"]["test"][str(knn["reported_k"])]["top1"]


def test_few_shot_exactly_k_per_class():
    labels = np.repeat(np.arange(4), [7, 9, 5, 12])
    subset = few_shot_indices(labels, 5, seed=0)
    assert np.bincount(labels[subset], minlength=4).tolist() == [5, 5, 5, 5]
    assert len(np.unique(subset)) == 20


def test_few_shot_differs_across_seeds_and_draws():
    labels = np.repeat(np.arange(4), 20)
    first = few_shot_indices(labels, 3, seed=0)
    assert np.array_equal(first, few_shot_indices(labels, 3, seed=0))
    assert not np.array_equal(first, few_shot_indices(labels, 3, seed=1))
    assert not np.array_equal(first, few_shot_indices(labels, 3, seed=0, draw=1))


def test_few_shot_k_above_smallest_class():
    labels = np.repeat(np.arange(3), [10, 4, 10])
    with pytest.raises(ValueError, match="k=5 exceeds the 4 training samples of class 'cat' \\(index 1\\)"):
        few_shot_indices(labels, 5, seed=0, class_names=["dog", "cat", "bird"])
