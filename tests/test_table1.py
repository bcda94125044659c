"""Table 1 configs through the CLI, global batch size, and resume with ``--ckpt_path last``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from d2v_eval.cli import main
from d2v_eval.results import read_records

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = ROOT / "configs" / "table1"
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
    assert record["batch_limit"] == 1                    # limit_test_batches=1: one batch of the split
    assert record["num_skipped"] is None                 # not "undecodable": the rest was never loaded
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


class CrashAtBatch(pl.Callback):
    """Simulate a crash before training batch ``batch_idx`` of the first epoch."""

    def __init__(self, batch_idx: int):
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            raise RuntimeError(f"simulated crash before batch {self.batch_idx}")


# 2 epochs x 4 batches of 4 images, accumulated in pairs: optimizer steps 1 and 3 end mid-epoch,
# step 2 ends epoch 0. Loader workers, RandAugment, random erasing, mixup, drop path and EMA all draw
# random numbers. A checkpoint is kept for every optimizer step, beside the epoch-end one.
STEP_CHECKPOINTS = json.dumps({
    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
    "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "save_last": True},
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


def test_resume_without_loader_position_warns(tmp_path, monkeypatch, caplog):
    """A mid-epoch checkpoint whose loader position was removed, as one from another data module."""
    resumed = tmp_path / "resumed"
    crash = json.dumps({"class_path": f"{__name__}.CrashAfterStep", "init_args": {"step": 1}})
    with pytest.raises(RuntimeError, match="simulated crash after optimizer step 1"):
        _run(resumed, monkeypatch, f"--trainer.callbacks+={crash}")
    path = resumed / "runs" / "table1" / "data2vec_vit_b_finetune" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["ImageClassificationData"]
    del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(checkpoint, path)

    with caplog.at_level("WARNING", logger="d2v_eval"):
        main([
            "fit", "--config", str(TABLE1 / "data2vec_vit_b_finetune.yaml"), *RESUME_RUN, "--ckpt_path=last",
            f"--recorder.records_dir={resumed / 'records'}",
        ])
    assert "stores no training-loader position" in caplog.text
    assert "after 2 batches of epoch 0" in caplog.text


def test_checkpoint_between_optimizer_steps_warns(tmp_path, monkeypatch, caplog):
    """Lightning's OnExceptionCheckpoint saves mid-accumulation; the warning names the lost batches."""
    crash = json.dumps({"class_path": f"{__name__}.CrashAtBatch", "init_args": {"batch_idx": 3}})
    on_exception = json.dumps({
        "class_path": "pytorch_lightning.callbacks.OnExceptionCheckpoint", "init_args": {"dirpath": str(tmp_path)},
    })
    # With accumulation 2, batches 0 and 1 make step 1 and batch 2 is half of step 2.
    with caplog.at_level("WARNING", logger="d2v_eval"), pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "run", monkeypatch, f"--trainer.callbacks+={crash}", f"--trainer.callbacks+={on_exception}")
    assert (tmp_path / "on_exception.ckpt").exists()
    assert "between optimizer steps (accumulation 2)" in caplog.text


def _launch(run_dir: Path, *args: str) -> subprocess.Popen:
    """Start ``d2v-eval fit`` on the ViT-B config in its own process (DDP needs a fresh interpreter)."""
    run_dir.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "d2v_eval.cli", "fit", "--config", str(TABLE1 / "data2vec_vit_b_finetune.yaml"),
        *RESUME_RUN, "--data.num_workers=0", f"--recorder.records_dir={run_dir / 'records'}", *args,
    ]
    return subprocess.Popen(command, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, *, expect_success: bool = True) -> str:
    output = process.communicate(timeout=600)[0]
    assert (process.returncode == 0) == expect_success, output[-3000:]
    return output


def _step_checkpoints(run_dir: Path) -> dict[int, dict]:
    paths = (run_dir / "runs" / "table1" / "data2vec_vit_b_finetune" / "checkpoints").glob("epoch=*-step=*.ckpt")
    checkpoints = [torch.load(path, weights_only=True) for path in paths]
    return {checkpoint["global_step"]: checkpoint for checkpoint in checkpoints}


TWO_PROCESSES = ["--trainer.strategy=ddp", "--trainer.devices=2"]


def test_lr_same_for_one_and_two_processes(tmp_path):
    """Global batch 8 as 1 process x 4 images x 2 accumulation steps, and as 2 processes x 4 images."""
    base_lr = ["--model.init_args.lr=null", "--model.init_args.base_lr=1e-3"]
    single = _launch(tmp_path / "single", *base_lr)
    # limit_train_batches counts batches per process: 2 per process keep 2 optimizer steps per epoch.
    ddp = _launch(tmp_path / "ddp", *base_lr, *TWO_PROCESSES, "--trainer.limit_train_batches=2")
    _finish(single)
    _finish(ddp)

    single_steps = _step_checkpoints(tmp_path / "single")
    ddp_steps = _step_checkpoints(tmp_path / "ddp")
    assert sorted(single_steps) == sorted(ddp_steps) == [1, 2, 3, 4]
    for step in single_steps:
        assert _group_lrs(ddp_steps[step]) == _group_lrs(single_steps[step]), step
    # Step 1 warms up, step 2 reaches the peak, step 3 is half-way down the cosine.
    assert _group_lrs(single_steps[1]) != _group_lrs(single_steps[2]) != _group_lrs(single_steps[3])

    single_record = _single_record(tmp_path / "single" / "records")
    ddp_record = _single_record(tmp_path / "ddp" / "records")
    assert (single_record["world_size"], ddp_record["world_size"]) == (1, 2)
    assert single_record["config"]["trainer"]["accumulate_grad_batches"] == 2
    assert ddp_record["config"]["trainer"]["accumulate_grad_batches"] == 1
    assert ddp_record["learning_rate"] == single_record["learning_rate"]
    assert single_record["learning_rate"]["peak_lr"] == pytest.approx(1e-3 * 8 / 256)


LAUNCH = ROOT / "experiments" / "table1" / "launch.sh"
# Arguments that launch.sh sets itself: devices and nodes from its environment, the step checkpoints.
LAUNCH_SETS = ("--trainer.devices", "--trainer.num_nodes", f"--trainer.callbacks+={STEP_CHECKPOINTS}")


def _launch_script(run_dir: Path, port: int, *args: str, **env: str) -> subprocess.Popen:
    """Run ``experiments/table1/launch.sh vit_b`` with torchrun: 2 CPU processes, its checkpoint every step."""
    outputs = [f"--recorder.records_dir={run_dir / 'records'}", f"--trainer.logger.init_args.save_dir={run_dir / 'runs'}"]
    environment = {
        **os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
        "GPUS_PER_NODE": "2", "CHECKPOINT_EVERY": "1", "MASTER_PORT": str(port), **env,
    }
    command = [
        "bash", str(LAUNCH), "vit_b", *[arg for arg in RESUME_RUN if not arg.startswith(LAUNCH_SETS)],
        "--data.num_workers=0", "--trainer.strategy=ddp",
        "--trainer.limit_train_batches=2", *outputs, *args,
    ]
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _launched_state(run_dir: Path) -> dict:
    checkpoints = run_dir / "runs" / "table1" / "data2vec_vit_b_finetune" / "checkpoints"
    latest = max(checkpoints.glob("last*.ckpt"), key=lambda path: path.stat().st_mtime)
    return torch.load(latest, weights_only=True)


def test_launch_script_resume_matches_uninterrupted_run(tmp_path):
    """torchrun with 2 processes through launch.sh; the crashed run resumes with RESUME=1."""
    straight = _launch_script(tmp_path / "straight", 29611)
    crash = json.dumps({"class_path": "test_table1.CrashAfterStep", "init_args": {"step": 3}})
    crashed = _launch_script(tmp_path / "resumed", 29612, f"--trainer.callbacks+={crash}")
    _finish(straight)
    assert "simulated crash after optimizer step 3" in _finish(crashed, expect_success=False)

    _finish(_launch_script(tmp_path / "resumed", 29613, RESUME="1"))
    expected, final = _launched_state(tmp_path / "straight"), _launched_state(tmp_path / "resumed")
    assert final["global_step"] == expected["global_step"] == 4
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, final["state_dict"][name]), name
    straight_record = _single_record(tmp_path / "straight" / "records")
    resumed_record = _single_record(tmp_path / "resumed" / "records")
    assert straight_record["world_size"] == resumed_record["world_size"] == 2
    assert resumed_record["metrics"] == straight_record["metrics"]
