"""Exact evaluation: the same counts and accuracies from 1, 2 and 3 processes (Lightning DDP, gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import DatasetDict, load_from_disk

from d2v_eval.cli import main
from d2v_eval.data.digits import digits_path
from d2v_eval.results import read_records

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_linear_probe.yaml"
# Neither 2 nor 3 divides 97, so a padding sampler would count duplicated samples.
TEST_SIZE = 97
COMMON = [
    "--data.num_workers=0", "--data.batch_size=16", "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def digits97(tmp_path_factory) -> Path:
    splits = load_from_disk(str(digits_path()))
    target = tmp_path_factory.mktemp("digits97") / "data"
    DatasetDict({
        "train": splits["train"].select(range(160)),
        "test": splits["test"].select(range(TEST_SIZE)),
    }).save_to_disk(str(target))
    return target


def _test_record(records_dir: Path) -> dict:
    (record,) = [r for r in read_records(records_dir) if r["split"] == "test"]
    return record


def test_metrics_identical_for_1_2_3_processes(digits97, tmp_path, monkeypatch):
    # Train a probe briefly so that its predictions differ between samples.
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIG), *COMMON, f"--data.benchmark={digits97}", "--trainer.max_epochs=2",
          "--test_after_fit=false", f"--recorder.records_dir={tmp_path / 'fit'}"])
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")

    main(["test", "--config", str(CONFIG), *COMMON, f"--data.benchmark={digits97}", f"--ckpt_path={checkpoint}",
          "--trainer.logger=false", f"--recorder.records_dir={tmp_path / 'records1'}"])
    records = {1: _test_record(tmp_path / "records1")}

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for processes in (2, 3):
        run_dir = tmp_path / f"ddp{processes}"
        run_dir.mkdir()
        # Lightning's ddp strategy launches the other ranks by re-running this command line.
        result = subprocess.run(
            [sys.executable, "-m", "d2v_eval.cli", "test", "--config", str(CONFIG), *COMMON,
             f"--data.benchmark={digits97}", f"--ckpt_path={checkpoint}", "--trainer.logger=false", "--trainer.strategy=ddp",
             f"--trainer.devices={processes}", f"--recorder.records_dir={tmp_path / f'records{processes}'}"],
            cwd=run_dir, env=env, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        records[processes] = _test_record(tmp_path / f"records{processes}")

    reference = records[1]["metrics"]
    assert 0.0 < reference["top1"] < 100.0
    assert reference["mean_per_class"] != pytest.approx(10.0), "the probe predicts a single class"
    for processes, record in records.items():
        assert record["world_size"] == processes
        assert record["num_samples"] == TEST_SIZE, processes
        assert record["split_size"] == TEST_SIZE, processes
        assert record["num_skipped"] == 0, processes
        assert record["batch_limit"] is None, processes
        for name in ("top1", "top5", "mean_per_class"):
            assert record["metrics"][name] == reference[name], (processes, name)
        assert record["metrics"]["loss"] == pytest.approx(reference["loss"], rel=1e-5), processes
