"""Table 1 configs through the CLI, global batch size, and resume with ``--ckpt_path last``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from d2v_eval.cli import main
from d2v_eval.results import read_records

TABLE1 = Path(__file__).resolve().parents[1] / "configs" / "table1"
# The recipe's encoder, data and cluster swapped for the tiny preset, digits and one CPU process.
TINY_CPU = [
    "--model.init_args.encoder=data2vec_vision_tiny_patch4_16", "--model.init_args.img_size=null",
    "--data.benchmark=digits", "--data.num_workers=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
    "--trainer.num_nodes=1", "--trainer.strategy=auto", "--trainer.enable_progress_bar=false",
    "--model.init_args.warmup_epochs=0", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
]


@pytest.mark.parametrize("name", ["data2vec_vit_b_finetune", "data2vec_vit_l_finetune"])
def test_table1_config_parses_with_hub_id(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(TABLE1 / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "facebook/data2vec-vision-" in printed
    assert "global_batch_size: 1024" in printed


def _single_record(records_dir: Path) -> dict:
    """The test record of the one run in ``records_dir`` (fit also writes a validation record)."""
    records = read_records(records_dir)
    assert len({r["run_id"] for r in records}) == 1
    (record,) = [r for r in records if r["role"] == "test"]
    return record


def test_vit_b_config_runs_two_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(TABLE1 / "data2vec_vit_b_finetune.yaml"), *TINY_CPU,
        "--trainer.precision=bf16-mixed", "--data.batch_size=8", "--global_batch_size=16",
        "--trainer.limit_train_batches=4", f"--recorder.records_dir={tmp_path / 'records'}",
    ])
    record = _single_record(tmp_path / "records")
    assert record["config"]["trainer"]["accumulate_grad_batches"] == 2  # 16 = 8 x 1 process x 2
    assert record["config"]["data"]["drop_last"] is True                # mixup is on
    assert record["global_batch_size"] == 16
    assert record["learning_rate"]["peak_lr"] == pytest.approx(4e-3)
    assert record["learning_rate"]["base_lr"] == pytest.approx(4e-3 * 256 / 16)
    assert record["learning_rate"]["scaling"] == "absolute"
    assert record["throughput"]["measured_steps"] == 1  # 2 optimizer steps, the first one unmeasured
    assert record["throughput"]["images_per_s"] > 0
    assert record["throughput"]["step_time_s"] > 0
    assert list((tmp_path / "runs" / "table1" / "data2vec_vit_b_finetune" / "checkpoints").glob("*step=2.ckpt"))


def test_vit_l_config_base_lr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(TABLE1 / "data2vec_vit_l_finetune.yaml"), *TINY_CPU,
        "--data.batch_size=4", "--global_batch_size=8", "--trainer.limit_train_batches=4",
        "--model.init_args.lr=null", "--model.init_args.base_lr=1e-3",
        f"--recorder.records_dir={tmp_path / 'records'}",
    ])
    record = _single_record(tmp_path / "records")
    assert record["config"]["trainer"]["accumulate_grad_batches"] == 2
    assert record["learning_rate"]["peak_lr"] == pytest.approx(1e-3 * 8 / 256)
    assert record["learning_rate"]["base_lr"] == pytest.approx(1e-3)


def test_global_batch_not_divisible(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="global_batch_size 20 is not a positive multiple of data.batch_size 8"):
        main([
            "fit", "--config", str(TABLE1 / "data2vec_vit_b_finetune.yaml"), *TINY_CPU,
            "--data.batch_size=8", "--global_batch_size=20", f"--recorder.records_dir={tmp_path / 'records'}",
        ])


class CrashAtEpoch(pl.Callback):
    """Simulate a crash at the start of training epoch ``epoch``, after the previous epoch's checkpoint."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at epoch {self.epoch}")


RESUME_RUN = [
    "--model.init_args.encoder=data2vec_vision_micro_patch4_16", "--data.benchmark=digits",
    "--data.num_workers=0", "--data.batch_size=8", "--trainer.accelerator=cpu", "--trainer.devices=1",
    "--trainer.num_nodes=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
    "--trainer.deterministic=true", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
    "--model.init_args.warmup_epochs=1", "--model.init_args.img_size=null", "--global_batch_size=8",
    "--model.init_args.model_ema=true",
]


def _final_state(run_dir: Path) -> tuple[dict, list[float]]:
    checkpoint = torch.load(
        run_dir / "runs" / "table1" / "data2vec_vit_b_finetune" / "checkpoints" / "last.ckpt", weights_only=True
    )
    lrs = [group["lr"] for group in checkpoint["optimizer_states"][0]["param_groups"]]
    return checkpoint["state_dict"], lrs


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    config = ["fit", "--config", str(TABLE1 / "data2vec_vit_b_finetune.yaml"), *RESUME_RUN]

    straight = tmp_path / "straight"
    straight.mkdir()
    monkeypatch.chdir(straight)
    main([*config, f"--recorder.records_dir={straight / 'records'}"])

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    monkeypatch.chdir(resumed)
    crash = json.dumps({"class_path": f"{__name__}.CrashAtEpoch", "init_args": {"epoch": 1}})
    with pytest.raises(RuntimeError, match="simulated crash at epoch 1"):
        main([*config, f"--trainer.callbacks+={crash}", f"--recorder.records_dir={resumed / 'records'}"])
    assert not (resumed / "records").exists()
    main([*config, "--ckpt_path=last", f"--recorder.records_dir={resumed / 'records'}"])

    straight_weights, straight_lrs = _final_state(straight)
    resumed_weights, resumed_lrs = _final_state(resumed)
    assert resumed_lrs == straight_lrs
    assert straight_lrs[0] < straight_lrs[-1]  # layer decay survives the resume
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    straight_metrics = _single_record(straight / "records")["metrics"]
    resumed_metrics = _single_record(resumed / "records")["metrics"]
    assert resumed_metrics == straight_metrics
