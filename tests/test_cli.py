"""The CLI end to end: a short demo run writes a record; ``report`` tolerates a corrupt file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from d2v_eval.cli import main
from d2v_eval.results import read_records
from d2v_eval.results.records import REQUIRED_FIELDS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT_RUN = [
    "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false", "--data.num_workers=0",
]


def test_demo_fit_writes_record(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    records_dir = tmp_path / "records"
    main(["fit", "--config", str(CONFIGS / "demo.yaml"), *SHORT_RUN, "--model.init_args.warmup_epochs=0",
          f"--recorder.records_dir={records_dir}"])

    records = {r["role"]: r for r in read_records(records_dir)}
    assert sorted(records) == ["test", "validation"]
    validation, record = records["validation"], records["test"]
    assert validation["run_id"] == record["run_id"]
    assert validation["split"] == "validation"
    assert validation["epoch"] == 0
    assert validation["num_samples"] == 64  # limit_val_batches=1 at batch 64
    for field in REQUIRED_FIELDS:
        assert field in record, field
    assert record["benchmark"] == "digits"
    assert record["split"] == "test"
    assert record["num_samples"] == 360
    assert record["protocol"] == "finetune"
    assert record["encoder"]["source"] == "random-init:data2vec_vision_tiny_patch4_16"
    assert 0.0 <= record["metrics"]["top1"] <= 100.0
    assert record["config"]["model"]["init_args"]["num_classes"] == 10
    assert record["config"]["data"]["input_size"] == 16
    assert record["world_size"] == 1
    assert record["global_batch_size"] == 64
    assert record["seed"] == 0
    assert record["role"] == "test"
    assert Path(record["log_dir"]).is_dir()
    assert record["run_id"] in capsys.readouterr().out
    assert list((tmp_path / "runs").rglob("*.ckpt"))


def test_linear_probe_test_subcommand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records_dir = tmp_path / "records"
    main(["test", "--config", str(CONFIGS / "demo_linear_probe.yaml"), "--data.num_workers=0",
          "--trainer.enable_progress_bar=false", f"--recorder.records_dir={records_dir}"])
    (record,) = read_records(records_dir)
    assert record["protocol"] == "linear_probe"
    assert record["num_samples"] == 360


def _record(run_id: str, top1: float) -> dict:
    return {
        "run_id": run_id, "created_at": "2026-01-01T00:00:00+00:00", "benchmark": "digits", "split": "test",
        "num_samples": 360, "protocol": "finetune", "encoder": {"source": "random-init:x", "format": "random-init",
        "sha256": None}, "metrics": {"top1": top1, "top5": 99.0, "loss": 0.1}, "world_size": 1,
        "global_batch_size": 64, "seed": 0, "config": {}, "versions": {}, "git_commit": None, "duration_s": 1.0,
    }


def test_report_skips_corrupt_record(tmp_path, capsys, caplog):
    from d2v_eval.results import write_record

    write_record(_record("run-a", 91.25), tmp_path)
    write_record(_record("run-b", 87.5), tmp_path)
    (tmp_path / "truncated-test.json").write_text('{"run_id": "run-c", "metr')

    with caplog.at_level(logging.WARNING):
        assert main(["report", "--records_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "91.25" in out
    assert "87.50" in out
    assert "run-c" not in out
    assert "truncated-test.json" in caplog.text
