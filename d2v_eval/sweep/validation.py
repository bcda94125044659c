"""``FinalValidationRecord``: write the last validation epoch of a fit as a result record.

A fit logs ``val/top1`` to TensorBoard but writes records only for test. Sweeps rank trials on
validation data, so each trial's fit gets this callback (``--trainer.callbacks+=...``). It reuses the
metrics the protocol has already synchronised over processes, so it costs no second process and no
checkpoint reload, and the record shares its ``run_id`` with the test record written after the fit.
"""

from __future__ import annotations

import logging

from pytorch_lightning import Callback, LightningModule, Trainer

from d2v_eval.results.recorder import ResultRecorder
from d2v_eval.results.records import write_record

log = logging.getLogger(__name__)

VALIDATION_ROLE = "validation"


class FinalValidationRecord(Callback):
    """At the end of ``fit``, write the metrics of the last validation epoch (rank 0 only).

    The record is the one ``ResultRecorder`` builds for a ``validate`` run, plus ``role: validation``
    and ``epoch`` (the epoch whose validation it contains). The trainer must also have a ``ResultRecorder``,
    which the d2v-eval CLI always adds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.validated_epoch: int | None = None
        self.trained_epoch: int | None = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trained_epoch = trainer.current_epoch

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_epoch = trainer.current_epoch

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.validated_epoch is None or "val" not in getattr(pl_module, "eval_results", {}):
            log.warning("the fit ran no validation epoch, so no validation record was written")
            return
        if self.trained_epoch is not None and self.validated_epoch != self.trained_epoch:
            log.warning(
                "the last validation ran at epoch %d, before the final epoch %d; its metrics do not "
                "describe the final weights (set trainer.check_val_every_n_epoch to 1)",
                self.validated_epoch, self.trained_epoch,
            )
        if not trainer.is_global_zero:
            return
        recorder = next((cb for cb in trainer.callbacks if isinstance(cb, ResultRecorder)), None)
        if recorder is None:
            raise RuntimeError("FinalValidationRecord needs a ResultRecorder callback on the same trainer")
        record = recorder.build_record(trainer, pl_module, stage="val", role="validation")
        record["role"] = VALIDATION_ROLE
        record["epoch"] = self.validated_epoch
        path = write_record(record, recorder.records_dir)
        recorder.written.append(path)
        log.info("wrote validation record %s", path)
