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


class CrashAfterStep(pl.Callback):
    """Simulate a crash right after optimizer step ``step`` and the checkpoint saved with it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash after optimizer step {self.step}")


# 2 epochs x 4 batches of 4 images, accumulated in pairs: optimizer steps 1 and 3 end mid-epoch,
# step 2 ends epoch 0. Loader workers, RandAugment, random erasing, mixup, drop path and EMA all draw
# random numbers. A checkpoint is written after every optimizer step, beside the epoch-end one.
STEP_CHECKPOINTS = json.dumps({
    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
    "init_args": {"every_n_train_steps": 1, "save_last": True},
})
RESUME_RUN = [
    "--model.init_args.encoder=data2vec_vision_micro_patch4_16", "--data.benchmark=digits",
    "--data.num_workers=2", "--data.batch_size=4", "--global_batch_size=8", "--trainer.accelerator=cpu",
    "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
    "--trainer.deterministic=true", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
    "--model.init_args.warmup_epochs=1", "--model.init_args.img_size=null", "--model.init_args.model_ema=true",
    f"--trainer.callbacks+={STEP_CHECKPOINTS}",
]


def _final_state(run_dir: Path) -> dict:
    return torch.load(
        run_dir / "runs" / "table1" / "data2vec_vit_b_finetune" / "checkpoints" / "last.ckpt", weights_only=True
    )


def _group_lrs(checkpoint: dict) -> list[float]:
    return [group["lr"] for group in checkpoint["optimizer_states"][0]["param_groups"]]


def _run(run_dir: Path, monkeypatch, *extra: str) -> None:
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    main([
        "fit", "--config", str(TABLE1 / "data2vec_vit_b_finetune.yaml"), *RESUME_RUN, *extra,
        f"--recorder.records_dir={run_dir / 'records'}",
    ])


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _run(run_dir, monkeypatch)
    return run_dir


@pytest.mark.parametrize("crash_step", [1, 2, 3], ids=["mid_epoch_0", "epoch_boundary", "mid_epoch_1"])
def test_resume_matches_uninterrupted_run(crash_step, uninterrupted_run, tmp_path, monkeypatch):
    resumed = tmp_path / "resumed"
    crash = json.dumps({"class_path": f"{__name__}.CrashAfterStep", "init_args": {"step": crash_step}})
    with pytest.raises(RuntimeError, match=f"simulated crash after optimizer step {crash_step}"):
        _run(resumed, monkeypatch, f"--trainer.callbacks+={crash}")
    assert not (resumed / "records").exists()
    interrupted = _final_state(resumed)
    assert interrupted["global_step"] == crash_step

    # The resumed run reuses the interrupted run's folder, as a restarted job does.
    monkeypatch.chdir(resumed)
    main([
        "fit", "--config", str(TABLE1 / "data2vec_vit_b_finetune.yaml"), *RESUME_RUN, "--ckpt_path=last",
        f"--recorder.records_dir={resumed / 'records'}",
    ])

    straight = _final_state(uninterrupted_run)
    final = _final_state(resumed)
    assert final["global_step"] == straight["global_step"] == 4
    assert _group_lrs(final) == _group_lrs(straight)
    assert _group_lrs(straight)[0] < _group_lrs(straight)[-1]  # layer decay survives the resume
    assert final["state_dict"].keys() == straight["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, final["state_dict"][name]), name
    straight_moments = straight["optimizer_states"][0]["state"]
    for index, moments in final["optimizer_states"][0]["state"].items():
        assert torch.equal(moments["exp_avg"], straight_moments[index]["exp_avg"]), index
    straight_metrics = _single_record(uninterrupted_run / "records")["metrics"]
    assert _single_record(resumed / "records")["metrics"] == straight_metrics
