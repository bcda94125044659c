"""Plan a sweep and launch its trials: local processes, submitit's local executor, or SLURM.

Every launcher runs ``d2v_eval/sweep/trial.py`` logic for each trial that is not complete yet, so a
second invocation on the same sweep folder resumes: completed trials are skipped, failed, partial
and interrupted ones run again (their previous folder moves to ``SWEEP_DIR/attempts/``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import yaml

from d2v_eval.sweep import trial as trial_module
from d2v_eval.sweep.spec import SweepSpec, SweepSpecError, check_keys, flatten_keys
from d2v_eval.sweep.trial import (
    PLAN_FILE, STATUS_FILE, RunningTrial, is_complete, read_json, trial_dir, write_json_atomic,
)

log = logging.getLogger(__name__)

TRIAL_SCRIPT = Path(trial_module.__file__).resolve()
INTERRUPTED_EXIT = 130
LOGGER_SAVE_DIR_KEY = "trainer.logger.init_args.save_dir"
# Sweep-file ``slurm`` keys -> submitit SlurmExecutor parameter names (submitit 1.5).
SLURM_KEYS = {
    "partition": "partition", "time_min": "time", "nodes": "nodes", "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task", "mem_gb": "mem", "setup": "setup", "sbatch": "additional_parameters",
    "array_parallelism": "array_parallelism", "account": "account", "qos": "qos", "constraint": "constraint",
    "exclude": "exclude", "comment": "comment", "signal_delay_s": "signal_delay_s",
}
SLURM_OPTIONS = {"array"}


# ---- planning ------------------------------------------------------------------------------------


def resolved_config(arguments: list[str]) -> dict:
    """Parse ``arguments`` (``--config`` and overrides) into the resolved ``fit`` config without running it.

    Raises ``SweepSpecError`` with jsonargparse's message when the arguments do not parse.
    """
    from d2v_eval.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        # LightningCLI warns when it gets args while sys.argv contains the sweep's own arguments.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            main(["fit", *arguments, "--print_config"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                message = "\n".join(stderr.getvalue().strip().splitlines()[-12:])
                raise SweepSpecError(f"the trial arguments do not parse as a fit config:\n{message}") from None
    config = yaml.safe_load(stdout.getvalue())
    if not isinstance(config, dict):
        raise SweepSpecError(f"could not read the resolved config for arguments {arguments}")
    return config


def plan_sweep(spec: SweepSpec, sweep_dir: str | Path, *, check: bool = True) -> dict:
    """Expand ``spec`` into trials, check its keys against the base config, and return the plan.

    With ``check``, every swept key must exist in the resolved base config (the error names the
    closest valid keys) and the first trial's arguments must parse.
    """
    cwd = Path.cwd()
    base_config = [str((cwd / path).resolve()) for path in spec.base_config]
    missing = [path for path in base_config if not Path(path).is_file()]
    if missing:
        raise SweepSpecError(f"base config {missing[0]} not found; pass an existing d2v-eval fit config")
    trials = spec.trials()
    plan = {
        "name": spec.name,
        "sweep_dir": str(Path(sweep_dir).resolve()),
        "cwd": str(cwd),
        "python": sys.executable,
        "base_config": base_config,
        "fixed": list(spec.fixed),
        "launcher_args": [],
        "test": spec.test,
        "metric": spec.metric,
        "mode": spec.mode,
        "heatmap": spec.heatmap_keys(),
        "swept_keys": spec.swept_keys,
        "logger_save_dir_key": None,
        "spec": spec.to_dict(),
        "trials": [
            {"trial_id": t.trial_id, "overrides": t.overrides, "arguments": t.arguments()} for t in trials
        ],
    }
    if check:
        config_args = [arg for path in base_config for arg in ("--config", path)] + list(spec.fixed)
        base = resolved_config(config_args)
        check_keys(spec.swept_keys, flatten_keys(base))
        logger = (base.get("trainer") or {}).get("logger")
        if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
            plan["logger_save_dir_key"] = LOGGER_SAVE_DIR_KEY
        else:
            log.warning("trainer.logger has no init_args.save_dir; TensorBoard logs stay where the config puts them")
        # NOTE: only the first trial is parsed in full, which checks the types of its values.
        # Another trial with a value of the wrong type fails when it starts.
        resolved_config(config_args + plan["trials"][0]["arguments"])
    return plan


def write_plan(plan: dict) -> Path:
    path = Path(plan["sweep_dir"]) / PLAN_FILE
    # Key order is kept: it is the order of the axes, which orders table columns and heatmap axes.
    write_json_atomic(path, plan, sort_keys=False)
    return path


def pending_trials(plan: dict) -> list[dict]:
    return [t for t in plan["trials"] if not is_complete(plan, t["trial_id"])]


# ---- local processes -----------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """CUDA device ids this process may hand out (``CUDA_VISIBLE_DEVICES`` if set); empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def device_slots(max_parallel: int, devices_per_trial: int, gpus: list[str]) -> list[dict[str, str]]:
    """Build one environment per concurrent trial: its GPUs (``CUDA_VISIBLE_DEVICES``) or its CPU threads."""
    if max_parallel < 1:
        raise SweepSpecError(f"max_parallel {max_parallel} must be at least 1")
    if devices_per_trial < 1:
        raise SweepSpecError(f"devices_per_trial {devices_per_trial} must be at least 1")
    if gpus:
        count = min(max_parallel, len(gpus) // devices_per_trial)
        if count < 1:
            raise SweepSpecError(
                f"devices_per_trial {devices_per_trial} exceeds the {len(gpus)} visible GPUs ({','.join(gpus)})"
            )
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * devices_per_trial:(i + 1) * devices_per_trial])}
            for i in range(count)
        ]
    threads = str(max(1, (os.cpu_count() or 1) // max_parallel))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(max_parallel)]


def run_local(plan: dict, *, max_parallel: int = 1, devices_per_trial: int = 1, poll_s: float = 0.5) -> int:
    """Run the pending trials as local processes, ``max_parallel`` at a time; return the exit status.

    Returns 0 when every trial completed, 1 when some failed, 130 after Ctrl-C. Ctrl-C launches no
    further trial, interrupts the running ones (recorded as interrupted) and keeps finished records.
    """
    slots = device_slots(max_parallel, devices_per_trial, visible_gpus())
    queue = pending_trials(plan)
    skipped = len(plan["trials"]) - len(queue)
    log.info("sweep %s: %d trials, %d complete, %d to run, %d at a time",
             plan["name"], len(plan["trials"]), skipped, len(queue), len(slots))
    free = list(range(len(slots)))
    running: dict[int, RunningTrial] = {}
    failed = 0
    try:
        while queue or running:
            while queue and free:
                slot = free.pop(0)
                trial = queue.pop(0)
                running[slot] = RunningTrial(plan, trial, env=slots[slot])
                log.info("started trial %s (%s)", trial["trial_id"], " ".join(f"{k}={v}" for k, v in slots[slot].items()))
            time.sleep(poll_s)
            for slot, process in list(running.items()):
                exit_code = process.poll()
                if exit_code is None:
                    continue
                status = process.finish(exit_code)
                del running[slot]
                free.append(slot)
                if status["state"] != "completed":
                    failed += 1
                    log.error("trial %s failed with exit code %s; log: %s", process.trial_id, exit_code, process.log_path)
                else:
                    log.info("trial %s completed in %.1f s", process.trial_id, status["duration_s"])
    except KeyboardInterrupt:
        for process in running.values():
            process.finish(process.interrupt(), interrupted=True)
            log.warning("interrupted trial %s", process.trial_id)
        log.warning("sweep interrupted: %d trials not started; run the same command again to resume", len(queue))
        return INTERRUPTED_EXIT
    return 1 if failed else 0


# ---- submitit -------------------------------------------------------------------------------------


def trial_job_command(plan: dict, trial_id: str | None = None, *, index_expr: str | None = None) -> list[str]:
    """Command that runs one trial through ``trial.py`` as a file, so the job wrapper skips importing torch."""
    command = [plan["python"], "-u", str(TRIAL_SCRIPT), plan["sweep_dir"]]
    return command + ([trial_id] if index_expr is None else ["--index", index_expr])


def slurm_parameters(plan: dict, slurm: dict) -> tuple[dict, bool]:
    """Map the sweep's ``slurm`` section to submitit SlurmExecutor parameters; return (parameters, array)."""
    unknown = sorted(set(slurm) - set(SLURM_KEYS) - SLURM_OPTIONS)
    if unknown:
        raise SweepSpecError(f"slurm keys {unknown} are unknown; valid: {sorted(set(SLURM_KEYS) | SLURM_OPTIONS)}")
    params = {SLURM_KEYS[key]: value for key, value in slurm.items() if key in SLURM_KEYS}
    if "mem" in params:
        params["mem"] = f"{int(params['mem'])}GB"
    for key in ("nodes", "gpus_per_node", "cpus_per_task", "time"):
        minimum = 0 if key == "gpus_per_node" else 1
        if key in params and (not isinstance(params[key], int) or params[key] < minimum):
            raise SweepSpecError(f"slurm {key} {params[key]!r} must be an integer of at least {minimum} (time in minutes)")
    # Lightning's SLURM environment expects one task per device: ntasks-per-node = devices.
    params["ntasks_per_node"] = max(1, params.get("gpus_per_node", 0) or 0)
    params.setdefault("job_name", plan["name"])
    # Trials run from the folder the sweep was planned in, so relative paths in configs still resolve.
    params["setup"] = [f"cd {shlex.quote(plan['cwd'])}", *params.get("setup", [])]
    return params, bool(slurm.get("array", False))


def slurm_trainer_args(plan: dict, params: dict) -> list[str]:
    """Trainer arguments that match the allocation (nodes, devices), unless the sweep sets them itself."""
    nodes = params.get("nodes", 1)
    gpus = params.get("gpus_per_node", 0) or 0
    wanted = {"trainer.num_nodes": nodes}
    if gpus:
        wanted.update({"trainer.accelerator": "gpu", "trainer.devices": gpus})
    if nodes * max(gpus, 1) > 1:
        wanted["trainer.strategy"] = "ddp"
    given = set(plan["swept_keys"]) | {arg.split("=", 1)[0].lstrip("-") for arg in plan["fixed"]}
    return [f"--{key}={value}" for key, value in wanted.items() if key not in given]


def write_slurm_scripts(plan: dict, slurm: dict) -> list[Path]:
    """Write the sbatch scripts (one per pending trial, or one job array) and ``submit.sh``; submit nothing.

    The scripts are rendered by the function submitit's SlurmExecutor uses for its own submissions.
    """
    # NOTE: submitit 1.5 has no public call that renders a script without submitting it;
    # _make_sbatch_string is what SlurmExecutor._make_submission_file_text calls.
    from submitit.slurm.slurm import _make_sbatch_string

    params, array = slurm_parameters(plan, slurm)
    plan["launcher_args"] = slurm_trainer_args(plan, params)
    write_plan(plan)
    folder = Path(plan["sweep_dir"]) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    trials = pending_trials(plan)
    scripts = []
    if array and trials:
        # The array indexes the plan, and trial.py skips complete trials, so the whole plan is listed.
        command = shlex.join(trial_job_command(plan, index_expr="IDX")).replace("IDX", "$SLURM_ARRAY_TASK_ID")
        text = _make_sbatch_string(command=command, folder=folder / "logs", map_count=len(plan["trials"]), **params)
        scripts.append(_write_script(folder / "array.sbatch", text))
    else:
        for trial in trials:
            command = shlex.join(trial_job_command(plan, trial["trial_id"]))
            text = _make_sbatch_string(command=command, folder=folder / "logs", **params)
            scripts.append(_write_script(folder / f"{trial['trial_id']}.sbatch", text))
    submit = ["#!/bin/bash", "# Submit every script of this sweep.", "set -euo pipefail"]
    submit += [f"sbatch {shlex.quote(str(path))}" for path in scripts]
    _write_script(folder / "submit.sh", "\n".join(submit) + "\n")
    return scripts


def _write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_submitit(plan: dict, *, cluster: str, slurm: dict | None = None, wait: bool = True,
                 timeout_min: int = 24 * 60, poll_s: float = 1.0) -> int:
    """Submit the pending trials through submitit (``cluster`` ``local`` or ``slurm``) and optionally wait.

    Returns 0 when every trial completed (or, without ``wait``, once submitted), 1 when some failed,
    130 after Ctrl-C (pending jobs are cancelled and their trials recorded as interrupted).
    """
    import submitit
    from submitit.core.utils import CommandFunction

    folder = Path(plan["sweep_dir"]) / "submitit"
    array = False
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=timeout_min)
    elif cluster == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as error:
            raise SweepSpecError(f"cannot submit to SLURM: {error}; use --no-submit to only write the scripts") from None
        params, array = slurm_parameters(plan, slurm or {})
        executor.update_parameters(**params)
        plan["launcher_args"] = slurm_trainer_args(plan, params)
    else:
        raise SweepSpecError(f"submitit cluster {cluster!r} is unknown; use local or slurm")
    write_plan(plan)

    trials = pending_trials(plan)
    functions = [CommandFunction(trial_job_command(plan, t["trial_id"]), verbose=False) for t in trials]
    if array and functions:
        with executor.batch():
            jobs = [executor.submit(function) for function in functions]
    else:
        jobs = [executor.submit(function) for function in functions]
    for trial, job in zip(trials, jobs):
        log.info("submitted trial %s as job %s", trial["trial_id"], job.job_id)
    if not wait:
        return 0

    try:
        while not all(job.done() for job in jobs):
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for trial, job in zip(trials, jobs):
            if not job.done():
                job.cancel(check=False)
                _record_unfinished(plan, trial, job, state="interrupted")
        log.warning("sweep interrupted; run the same command again to resume")
        return INTERRUPTED_EXIT

    failed = 0
    for trial, job in zip(trials, jobs):
        _record_unfinished(plan, trial, job, state="failed")
        if not is_complete(plan, trial["trial_id"]):
            failed += 1
            log.error("trial %s (job %s) failed; see %s", trial["trial_id"], job.job_id,
                      trial_dir(plan, trial["trial_id"]) / STATUS_FILE)
    return 1 if failed else 0


def _record_unfinished(plan: dict, trial: dict, job, *, state: str) -> None:
    """Record a trial whose job ended without a final status (killed, cancelled, crashed wrapper)."""
    folder = trial_dir(plan, trial["trial_id"])
    status = read_json(folder / STATUS_FILE)
    if status is not None and status.get("state") != "running":
        return
    try:
        job_log = job.stderr() or ""
    except Exception:  # noqa: BLE001 - a missing or unreadable submitit log must not stop the sweep
        job_log = ""
    status = dict(status or {"sweep": plan["name"], "trial_id": trial["trial_id"], "overrides": trial["overrides"]})
    status.update({
        "state": state, "exit_code": None, "job_id": str(job.job_id),
        "log_tail": "\n".join(job_log.splitlines()[-trial_module.LOG_TAIL_LINES:]),
    })
    write_json_atomic(folder / STATUS_FILE, status)
