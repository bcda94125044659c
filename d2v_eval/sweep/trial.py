"""Run one sweep trial as a ``d2v-eval fit`` process and record its status.

    python d2v_eval/sweep/trial.py SWEEP_DIR TRIAL_ID      # what SLURM and submitit jobs run
    python d2v_eval/sweep/trial.py SWEEP_DIR --index 3     # the 4th trial (job arrays)

This module uses the standard library only and is run as a file, not with ``-m``: importing the
``d2v_eval`` package loads torch, and the job wrapper has no use for it (the fit process loads it).

A trial folder ``SWEEP_DIR/trials/TRIAL_ID/`` contains ``records/`` (result records), ``runs/``
(TensorBoard logs and checkpoints), ``trial.log`` (the fit's stdout and stderr) and ``status.json``
(``state`` running | completed | failed | interrupted, ``exit_code``, ``log_tail``, ``command``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

PLAN_FILE = "sweep.json"
STATUS_FILE = "status.json"
LOG_FILE = "trial.log"
LOG_TAIL_LINES = 40
# Same names as d2v_eval.results.recorder.SWEEP_ENV / TRIAL_ENV (this file cannot import that module).
SWEEP_ENV = "D2V_EVAL_SWEEP"
TRIAL_ENV = "D2V_EVAL_TRIAL"
# Role of the validation record that ResultRecorder writes at the end of every fit.
VALIDATION_ROLE = "validation"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload: dict, *, sort_keys: bool = True) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=2, sort_keys=sort_keys, default=str)
            stream.write("\n")
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    """Read the JSON object in ``path``; return None when it is missing or unreadable."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def load_plan(sweep_dir: str | Path) -> dict:
    path = Path(sweep_dir) / PLAN_FILE
    plan = read_json(path)
    if plan is None:
        raise FileNotFoundError(f"sweep plan {path} not found or unreadable; run d2v-eval sweep SPEC first")
    return plan


def trial_dir(plan: dict, trial_id: str) -> Path:
    return Path(plan["sweep_dir"]) / "trials" / trial_id


def find_trial(plan: dict, trial_id: str) -> dict:
    for trial in plan["trials"]:
        if trial["trial_id"] == trial_id:
            return trial
    raise KeyError(f"trial {trial_id!r} is not in sweep {plan['name']!r}; run --dry-run to list the trials")


def trial_records(folder: Path) -> tuple[dict | None, dict | None]:
    """(validation record, test record) in a trial folder; None where missing.

    The validation record carries ``role: validation``; the test record is the other record of the
    same run (a trial's records folder receives only its fit's records).
    """
    validation, test = None, None
    for path in sorted((folder / "records").glob("*.json")):
        if path.name.startswith("."):
            continue
        record = read_json(path)
        if record is None:
            continue
        if record.get("role") == VALIDATION_ROLE:
            validation = record
        else:
            test = record
    if validation is not None and test is not None and test.get("run_id") != validation.get("run_id"):
        test = None
    return validation, test


def is_complete(plan: dict, trial_id: str) -> bool:
    """True when the trial exited 0, wrote every record it should (validation, and test if asked),
    and ran with the plan's current base config and fixed arguments."""
    folder = trial_dir(plan, trial_id)
    status = read_json(folder / STATUS_FILE)
    if status is None or status.get("state") != "completed":
        return False
    if status.get("settings") != run_settings(plan):
        return False
    validation, test = trial_records(folder)
    return validation is not None and (test is not None or not plan.get("test", True))


def run_settings(plan: dict) -> dict:
    """Return the settings shared by all trials; a trial run under other settings counts as not done."""
    return {"base_config": list(plan["base_config"]), "fixed": list(plan.get("fixed", [])),
            "test": plan.get("test", True)}


def build_command(plan: dict, trial: dict, folder: Path) -> list[str]:
    """Build the ``d2v-eval fit`` command line of one trial."""
    command = [plan["python"], "-m", "d2v_eval.cli", "fit"]
    for config in plan["base_config"]:
        command += ["--config", config]
    command += list(plan.get("fixed", []))
    command += list(trial["arguments"])
    command += list(plan.get("launcher_args", []))
    command += [
        f"--recorder.records_dir={folder / 'records'}",
        f"--trainer.default_root_dir={folder / 'runs'}",
        f"--test_after_fit={'true' if plan.get('test', True) else 'false'}",
    ]
    if plan.get("logger_save_dir_key"):
        command.append(f"--{plan['logger_save_dir_key']}={folder / 'runs'}")
    return command


def process_rank() -> int:
    """Rank of this task within a multi-task job (SLURM or submitit's local executor); 0 otherwise."""
    for name in ("SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class RunningTrial:
    """A started trial process; :meth:`finish` records its outcome (rank 0 only)."""

    def __init__(self, plan: dict, trial: dict, *, env: dict[str, str] | None = None, rank: int = 0):
        self.plan = plan
        self.trial = trial
        self.trial_id = trial["trial_id"]
        self.folder = trial_dir(plan, self.trial_id)
        self.rank = rank
        if rank == 0:
            self._set_aside_previous_attempt()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.log_path = self.folder / LOG_FILE
        else:
            self.log_path = Path(plan["sweep_dir"]) / "rank_logs" / f"{self.trial_id}.rank{rank}.log"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.command = build_command(plan, trial, self.folder)
        self.started = time.monotonic()
        self.started_at = now()
        process_env = dict(os.environ)
        process_env.update(env or {})
        process_env[SWEEP_ENV] = plan["name"]
        process_env[TRIAL_ENV] = self.trial_id
        self.env = {key: process_env[key] for key in (env or {})}
        if rank == 0:
            self._write_status("running", exit_code=None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=process_env, cwd=plan["cwd"]
            )

    def _set_aside_previous_attempt(self) -> None:
        # A failed or partial attempt keeps its log and records for inspection, outside trials/.
        # A requeued SLURM job continues in place instead, next to the checkpoints it left.
        if not self.folder.exists() or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            return
        attempts = Path(self.plan["sweep_dir"]) / "attempts"
        attempts.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = attempts / f"{self.trial_id}-{stamp}-{os.getpid()}"
        shutil.move(str(self.folder), str(target))

    def _write_status(self, state: str, *, exit_code: int | None) -> dict:
        status = {
            "sweep": self.plan["name"], "trial_id": self.trial_id, "overrides": self.trial["overrides"],
            "state": state, "exit_code": exit_code, "started_at": self.started_at,
            "settings": run_settings(self.plan),
            "finished_at": None if state == "running" else now(),
            "duration_s": round(time.monotonic() - self.started, 3), "host": socket.gethostname(),
            "command": self.command, "env": self.env, "log": str(self.log_path),
            "log_tail": None if state == "running" else log_tail(self.log_path),
        }
        write_json_atomic(self.folder / STATUS_FILE, status)
        return status

    def poll(self) -> int | None:
        return self.process.poll()

    def interrupt(self, grace_s: float = 20.0) -> int:
        """Send SIGINT, wait up to ``grace_s`` seconds, then kill; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def finish(self, exit_code: int, *, interrupted: bool = False) -> dict | None:
        """Write the final status: completed (exit 0 and all records), failed or interrupted."""
        if self.rank != 0:
            return None
        if interrupted:
            state = "interrupted"
        else:
            validation, test = trial_records(self.folder)
            records_ok = validation is not None and (test is not None or not self.plan.get("test", True))
            state = "completed" if exit_code == 0 and records_ok else "failed"
            if exit_code == 0 and not records_ok:
                with open(self.log_path, "a", encoding="utf-8") as log:
                    log.write(
                        "d2v-eval sweep: the fit exited 0 but did not write the validation"
                        + (" and test" if self.plan.get("test", True) else "") + " records\n"
                    )
        return self._write_status(state, exit_code=exit_code)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            text = log.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _ignore_signal(signum, frame) -> None:
    return None


def run_trial(sweep_dir: str | Path, trial_id: str, *, env: dict[str, str] | None = None) -> int:
    """Run one trial to the end and return its exit code; skip it when already complete."""
    plan = load_plan(sweep_dir)
    trial = find_trial(plan, trial_id)
    # SLURM sends SIGUSR1/SIGUSR2 before the time limit to the whole task (this wrapper and the fit
    # alike). The wrapper only has to outlive the fit to record its status, so it ignores them
    # with a Python handler (unlike SIG_IGN, such a handler is not inherited by the fit process).
    for name in ("SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name) and threading.current_thread() is threading.main_thread():
            signal.signal(getattr(signal, name), _ignore_signal)
    rank = process_rank()
    # Every rank reads the same files, so all tasks of a multi-task job skip together or run together.
    if is_complete(plan, trial_id):
        return 0
    running = RunningTrial(plan, trial, env=env, rank=rank)
    try:
        exit_code = running.process.wait()
    except KeyboardInterrupt:
        running.finish(running.interrupt(), interrupted=True)
        raise
    running.finish(exit_code)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one trial of a planned d2v-eval sweep.")
    parser.add_argument("sweep_dir", help="sweep folder (contains sweep.json)")
    parser.add_argument("trial_id", nargs="?", help="trial id (d2v-eval sweep --dry-run lists them)")
    parser.add_argument("--index", type=int, help="trial position in the plan, from 0 (job array task id)")
    args = parser.parse_args(argv)
    if (args.trial_id is None) == (args.index is None):
        parser.error("give exactly one of TRIAL_ID and --index")
    trial_id = args.trial_id
    if args.index is not None:
        trials = load_plan(args.sweep_dir)["trials"]
        if not 0 <= args.index < len(trials):
            parser.error(f"--index {args.index} is outside 0..{len(trials) - 1}")
        trial_id = trials[args.index]["trial_id"]
    return run_trial(args.sweep_dir, trial_id)


if __name__ == "__main__":
    sys.exit(main())
