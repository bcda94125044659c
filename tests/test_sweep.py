"""``d2v-eval sweep`` end to end: local and submitit launchers, failures, resume, SLURM scripts, DDP fit.

Each trial is a real ``d2v-eval fit`` process that imports torch before it trains, so the grids are
small and the runs are two training steps long.
"""

from __future__ import annotations

import _thread
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from d2v_eval.cli import main
from d2v_eval.sweep.spec import Distribution, SweepSpecError, load_spec
from d2v_eval.sweep.trial import STATUS_FILE, read_json

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SHORT_RUN = [
    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--data.num_workers=0", "--model.init_args.warmup_epochs=0",
    "--model.init_args.encoder=data2vec_vision_micro_patch4_16",
]
GRID = ["--grid", "model.init_args.lr=[1e-3,2e-3]", "--grid", "model.init_args.layer_decay=[0.65,0.75]"]


def _statuses(sweep_dir: Path) -> dict[str, dict]:
    return {path.parent.name: read_json(path) for path in (sweep_dir / "trials").glob(f"*/{STATUS_FILE}")}


def _records(trial_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((trial_dir / "records").glob("*.json"))]


def _summary_rows(sweep_dir: Path) -> list[str]:
    lines = (sweep_dir / "summary.md").read_text().splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith(("| rank", "| ---"))]


def _interrupt_after_first_trial(sweep_dir: Path) -> threading.Thread:
    """Ctrl-C the main thread once one trial has completed and another one is running."""

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            states = [s.get("state") for s in _statuses(sweep_dir).values() if s]
            if "completed" in states and "running" in states:
                time.sleep(1.0)
                _thread.interrupt_main()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_local_grid_interrupt_resume_rerun(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "sweep"
    command = ["sweep", "--config", str(DEMO), *GRID, "--name", "grid", "--sweep_dir", str(sweep_dir),
               "--max_parallel", "2", "--", *SHORT_RUN]

    # First invocation: Ctrl-C once a trial has completed; running trials are recorded as interrupted.
    watcher = _interrupt_after_first_trial(sweep_dir)
    assert main(command) == 130
    watcher.join(timeout=5)
    states = [s["state"] for s in _statuses(sweep_dir).values()]
    interrupted = states.count("interrupted")
    assert interrupted >= 1
    assert states.count("completed") >= 1
    assert states.count("completed") + interrupted == len(states)
    first_id = next(trial for trial, s in _statuses(sweep_dir).items() if s["state"] == "completed")
    first_records = sorted(p.name for p in (sweep_dir / "trials" / first_id / "records").glob("*.json"))
    assert len(first_records) == 2

    # Second invocation resumes: the remaining trials run, the finished ones are skipped.
    assert main(command) == 0
    statuses = _statuses(sweep_dir)
    assert len(statuses) == 4
    assert all(s["state"] == "completed" for s in statuses.values())
    assert sorted(p.name for p in (sweep_dir / "trials" / first_id / "records").glob("*.json")) == first_records
    assert len(list((sweep_dir / "attempts").iterdir())) == interrupted  # interrupted attempts, set aside

    for trial_id, status in statuses.items():
        folder = sweep_dir / "trials" / trial_id
        records = _records(folder)
        assert sorted(r["split"] for r in records) == ["test", "validation"]
        assert {r["sweep"] for r in records} == {"grid"}
        assert {r["trial"] for r in records} == {trial_id}
        assert len({r["run_id"] for r in records}) == 1
        assert list((folder / "runs").rglob("events.out.tfevents*"))
        assert (folder / "trial.log").stat().st_size > 0
        assert status["env"]["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))

    rows = _summary_rows(sweep_dir)
    assert len(rows) == 4
    assert rows[0].startswith("| 1 |")
    assert "Best trial:" in (sweep_dir / "summary.md").read_text()
    assert (sweep_dir / "heatmap.png").stat().st_size > 0

    # Third invocation, from the stored plan: everything is complete, nothing is launched.
    started = {trial: s["started_at"] for trial, s in statuses.items()}
    caplog.clear()
    assert main(["sweep", "--sweep_dir", str(sweep_dir)]) == 0
    assert {trial: s["started_at"] for trial, s in _statuses(sweep_dir).items()} == started
    assert "0 to run" in caplog.text


def test_submitit_local_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "sweep"
    exit_code = main(["sweep", "--config", str(DEMO), *GRID, "--name", "grid", "--sweep_dir", str(sweep_dir),
                      "--launcher", "submitit-local", "--", *SHORT_RUN])
    assert exit_code == 0
    statuses = _statuses(sweep_dir)
    assert len(statuses) == 4
    assert all(status["state"] == "completed" for status in statuses.values())
    assert len(list((sweep_dir / "submitit").glob("*_log.out"))) == 4
    assert len(_summary_rows(sweep_dir)) == 4


def test_submitit_local_failing_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "sweep"
    # lr -1 parses as a float, then the optimizer rejects it inside the trial: a real crash.
    exit_code = main(["sweep", "--config", str(DEMO), "--grid", "model.init_args.lr=[1e-3,-1.0]",
                      "--name", "submitit", "--sweep_dir", str(sweep_dir), "--launcher", "submitit-local",
                      "--", *SHORT_RUN])
    assert exit_code == 1
    statuses = {s["overrides"]["model.init_args.lr"]: s for s in _statuses(sweep_dir).values()}
    assert statuses[0.001]["state"] == "completed"
    assert statuses[-1.0]["state"] == "failed"
    assert statuses[-1.0]["exit_code"] == 1
    assert "Invalid learning rate: -1.0" in statuses[-1.0]["log_tail"]
    assert list((sweep_dir / "submitit").glob("*_log.out"))
    assert len(_summary_rows(sweep_dir)) == 2
    assert "failed (exit 1)" in (sweep_dir / "summary.md").read_text()


def test_slurm_scripts_without_submitting(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    spec_file = ROOT / "experiments" / "sweeps" / "imagenet_lr_layer_decay.yaml"
    assert (ROOT / load_spec(spec_file).base_config[0]).is_file()
    sweep_dir = tmp_path / "imagenet"
    assert main(["sweep", str(spec_file), "--sweep_dir", str(sweep_dir), "--no-submit"]) == 0

    script = (sweep_dir / "slurm" / "array.sbatch").read_text()
    for line in ["#SBATCH --array=0-8%3", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --nodes=1", "#SBATCH --partition=gpu", "#SBATCH --time=4320", "#SBATCH --requeue",
                 "#SBATCH --cpus-per-task=10", f"cd {ROOT}"]:
        assert line in script, line
    assert "d2v_eval/sweep/trial.py" in script
    assert "--index $SLURM_ARRAY_TASK_ID" in script
    assert "sbatch" in (sweep_dir / "slurm" / "submit.sh").read_text()
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(plan["trials"]) == 9
    for arg in ["--trainer.num_nodes=1", "--trainer.devices=8", "--trainer.accelerator=gpu", "--trainer.strategy=ddp"]:
        assert arg in plan["launcher_args"], arg
    assert not (sweep_dir / "trials").exists()
    assert "wrote 1 sbatch scripts for 9 trials" in capsys.readouterr().out


def test_spec_rejects_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--config", str(DEMO), "--grid", "model.init_args.layer_dekay=[0.6]", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "'model.init_args.layer_dekay' is not in the config" in error
    assert "model.init_args.layer_decay" in error

    assert main(["sweep", "--config", str(DEMO), "--grid", "model.init_args.lr=[]", "--dry-run"]) == 2
    assert "grid for model.init_args.lr is empty" in capsys.readouterr().err

    with pytest.raises(SweepSpecError, match="non-positive bound 0.0"):
        Distribution.parse("model.init_args.lr", "loguniform(0, 1e-3)")
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(f"base_config: {DEMO}\nrandom: {{n_trials: 0, params: {{model.init_args.lr: 'uniform(0, 1)'}}}}\n")
    with pytest.raises(SweepSpecError, match="n_trials 0 must be at least 1"):
        load_spec(spec_file)


def test_random_trials_seeded_and_stable(tmp_path):
    spec_file = tmp_path / "random.yaml"
    spec_file.write_text(
        f"base_config: {DEMO}\n"
        "grid: {model.init_args.layer_decay: [0.65, 0.75]}\n"
        "random: {n_trials: 3, seed: 7, params: {model.init_args.lr: 'loguniform(1e-4, 1e-2)',\n"
        "         data.batch_size: 'choice([32, 64])'}}\n"
        "seeds: [0, 1]\n"
    )
    trials = load_spec(spec_file).trials()
    assert len(trials) == 2 * 3 * 2
    assert [t.trial_id for t in trials] == [t.trial_id for t in load_spec(spec_file).trials()]
    assert len({t.trial_id for t in trials}) == len(trials)
    for trial in trials:
        assert 1e-4 <= trial.overrides["model.init_args.lr"] <= 1e-2
        assert trial.overrides["data.batch_size"] in (32, 64)
        assert trial.overrides["seed_everything"] in (0, 1)


def test_ddp_fit_two_processes_one_record_per_split(tmp_path):
    """2 processes x batch 16 and 1 process x batch 32 have the same global batch (accumulation 1)."""
    base = [sys.executable, "-m", "d2v_eval.cli", "fit", "--config", str(DEMO), *SHORT_RUN,
            "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=null"]
    runs = {
        "ddp": ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--data.batch_size=16"],
        "single": ["--trainer.devices=1", "--data.batch_size=32"],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    processes = {
        name: subprocess.Popen([*base, *args, f"--recorder.records_dir={tmp_path / name}",
                                f"--trainer.default_root_dir={tmp_path / name}",
                                f"--trainer.logger.init_args.save_dir={tmp_path / name}"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, args in runs.items()
    }
    outputs = {name: process.communicate(timeout=600)[0] for name, process in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, outputs[name][-3000:]

    records = {}
    for name in runs:
        found = [json.loads(p.read_text()) for p in (tmp_path / name).glob("*.json")]
        assert sorted(r["split"] for r in found) == ["test", "validation"], name
        records[name] = {r["split"]: r for r in found}
    for split in ("test", "validation"):
        ddp, single = records["ddp"][split], records["single"][split]
        assert ddp["world_size"] == 2
        assert single["world_size"] == 1
        assert ddp["global_batch_size"] == single["global_batch_size"] == 32
        assert ddp["num_samples"] == single["num_samples"]
    assert records["ddp"]["test"]["num_samples"] == 360
