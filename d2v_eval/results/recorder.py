"""``ResultRecorder``: a Lightning callback that writes one record per evaluated split."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.trainer.states import TrainerFn

from d2v_eval.results.records import DEFAULT_RECORDS_DIR, new_run_id, write_record

log = logging.getLogger(__name__)

# Set by the sweep launcher for each trial process; stored in the records.
SWEEP_ENV = "D2V_EVAL_SWEEP"
TRIAL_ENV = "D2V_EVAL_TRIAL"
VERSIONED_PACKAGES = ("d2v-eval", "torch", "timm", "pytorch-lightning", "torchmetrics", "datasets", "transformers")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """Commit of the d2v-eval source tree, or None where it is not a git checkout."""
    source_dir = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


class ResultRecorder(Callback):
    """Write a result record after every ``test`` and every ``validate`` run (rank 0 only).

    Metrics come from ``pl_module.eval_results``, which the protocols synchronise over processes
    before this callback reads them. ``config`` is the fully resolved run configuration, set by the CLI.

    At the end of ``fit`` it also writes the last validation epoch (``role: validation`` and its
    ``epoch``) under the run id of the test record that follows. Tables and sweeps then select on
    validation without another process or a checkpoint reload.

    Args:
        records_dir: folder that receives one JSON file per evaluated split.
        tags: free-form labels stored in each record (for filtering tables).
        validation_after_fit: write the record of the last validation epoch when ``fit`` ends.
    """

    def __init__(
        self, records_dir: str = DEFAULT_RECORDS_DIR, tags: list[str] | None = None, validation_after_fit: bool = True
    ):
        super().__init__()
        self.records_dir = records_dir
        self.tags = list(tags or [])
        self.validation_after_fit = validation_after_fit
        self._validated_epoch: int | None = None
        self._trained_epoch: int | None = None
        self.config: dict | None = None
        self.run_id = new_run_id()
        self.written: list[Path] = []
        self._started = time.monotonic()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, stage="test", role="test")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validated_epoch = trainer.current_epoch
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._write(trainer, pl_module, stage="val", role="validation")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trained_epoch = trainer.current_epoch

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.validation_after_fit:
            return
        if self._validated_epoch is None or "val" not in getattr(pl_module, "eval_results", {}):
            log.warning("the fit ran no validation epoch, so no validation record was written")
            return
        if self._trained_epoch is not None and self._validated_epoch != self._trained_epoch:
            log.warning(
                "the last validation ran at epoch %d, before the final epoch %d, so its record does not "
                "describe the final weights; set trainer.check_val_every_n_epoch to 1",
                self._validated_epoch, self._trained_epoch,
            )
        self._write(trainer, pl_module, stage="val", role="validation", extra={"epoch": self._validated_epoch})

    def build_record(self, trainer: Trainer, pl_module: LightningModule, *, stage: str, role: str) -> dict:
        results = dict(pl_module.eval_results[stage])
        num_samples = results.pop("num_samples")
        datamodule = trainer.datamodule
        batch_size = getattr(datamodule, "batch_size", None)
        global_batch = batch_size * trainer.world_size * trainer.accumulate_grad_batches if batch_size else None
        seed = os.environ.get("PL_GLOBAL_SEED")
        record = {
            "run_id": self.run_id,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "benchmark": getattr(datamodule, "benchmark", None),
            "split": datamodule.split_name(role) if hasattr(datamodule, "split_name") else role,
            # "validation" or "test": what the split was evaluated as (imagenet-1k's "validation" is its test).
            "role": role,
            "num_samples": num_samples,
            "protocol": getattr(pl_module, "protocol", type(pl_module).__name__),
            "encoder": pl_module.encoder_info.as_record(),
            "metrics": results,
            "world_size": trainer.world_size,
            "global_batch_size": global_batch,
            "seed": int(seed) if seed is not None else None,
            "config": self.config,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "duration_s": round(time.monotonic() - self._started, 3),
            "checkpoint": trainer.ckpt_path,
            # Folder of the TensorBoard event files for this run (None without a logger).
            # The logger's own log_dir: trainer.log_dir broadcasts, which would hang when only rank 0 writes.
            "log_dir": getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None,
            "tags": self.tags,
            "sweep": os.environ.get(SWEEP_ENV),
            "trial": os.environ.get(TRIAL_ENV),
        }
        # The data module adds split facts (split size, samples skipped as undecodable, standard metric).
        data_extras = getattr(datamodule, "record_extras", None)
        if callable(data_extras):
            record.update(data_extras(role, num_samples))
        # Protocols add their own fields (e.g. every head's validation score) through record_extras.
        extras = getattr(pl_module, "record_extras", None)
        if callable(extras):
            record.update(extras(stage))
        return record

    def _write(
        self, trainer: Trainer, pl_module: LightningModule, *, stage: str, role: str, extra: dict | None = None
    ) -> None:
        if not trainer.is_global_zero:
            return
        record = self.build_record(trainer, pl_module, stage=stage, role=role)
        record.update(extra or {})
        if any(path.name == f"{self.run_id}-{record['split']}.json" for path in self.written):
            # A second evaluation of the same split in one process (e.g. test after fit, then again)
            # gets a run id of its own rather than overwriting the first record.
            self.run_id = new_run_id()
            record["run_id"] = self.run_id
        path = write_record(record, self.records_dir)
        self.written.append(path)
        log.info("wrote result record %s", path)
