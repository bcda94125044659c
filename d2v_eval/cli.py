"""The ``d2v-eval`` entry point.

    d2v-eval fit --config configs/demo.yaml           # fine-tune, test, write the record, print it
    d2v-eval test --config CONFIG --ckpt_path CKPT    # evaluate a checkpoint on the test split
    d2v-eval report                                   # table of every record in results/runs/
    d2v-eval convert SOURCE OUT.safetensors           # any encoder checkpoint as timm-layout safetensors
    d2v-eval data list                                # the benchmark registry

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI; ``report`` and ``convert`` are our own subcommands.
"""

from __future__ import annotations

import importlib
import logging
import sys

import yaml
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from d2v_eval.data import ImageClassificationData
from d2v_eval.encoders import encoder_img_size
from d2v_eval.protocols import ClassificationModule
from d2v_eval.results import ResultRecorder, runs_table

log = logging.getLogger(__name__)

# Subcommands that are not LightningCLI: name -> module with ``main(argv) -> int``.
EXTRA_SUBCOMMANDS = {
    "report": "d2v_eval.results.cli",
    "convert": "d2v_eval.encoders.cli",
    "data": "d2v_eval.data.cli",
    "sweep": "d2v_eval.sweep.cli",
}



def trainer_defaults() -> dict:
    """Fresh Trainer defaults: TensorBoard logging, a rich progress bar, checkpoints in the run folder."""
    return {
        "default_root_dir": "runs",
        # A class_path dict rather than a lazy instance, so that ddp_spawn can pickle the trainer.
        "logger": {
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "d2v_eval"},
        },
        "callbacks": [
            RichProgressBar(),
            LearningRateMonitor(logging_interval="step"),
            ModelCheckpoint(save_last=True),
        ],
    }


class ResumableSaveConfig(SaveConfigCallback):
    """Lightning's config saving, but a run resumed with ``--ckpt_path`` may replace its own config.yaml.

    A run with a fixed logger version (the Table 1 configs) resumes into the folder that contains the
    interrupted run's config.yaml; Lightning's callback would abort there to protect it.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.config.get("ckpt_path"):
            self.overwrite = True
        super().setup(trainer, pl_module, stage)


class D2VEvalCLI(LightningCLI):
    """LightningCLI with result recording, encoder/data argument links and an optional test after fit."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ResultRecorder, "recorder")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="after fit, evaluate the final weights on the test split and write its record",
        )
        parser.add_argument(
            "--global_batch_size", type=int | None, default=None,
            help="images per optimizer step over all devices and nodes; fit derives "
            "trainer.accumulate_grad_batches = global_batch_size / (data.batch_size x devices x nodes)",
        )
        # The encoder fixes the input size; the data fixes the class count. Neither is typed twice.
        parser.link_arguments(
            ("model.init_args.encoder", "model.init_args.img_size"), "data.input_size", compute_fn=encoder_img_size
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_progress_bar") is False:
            # The default rich bar would make Lightning reject enable_progress_bar=False.
            kept = [cb for cb in self.trainer_defaults.get("callbacks", []) if not isinstance(cb, RichProgressBar)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": kept}
        return super()._instantiate_trainer(config, callbacks)

    def _recorder(self) -> ResultRecorder:
        return next(cb for cb in self.trainer.callbacks if isinstance(cb, ResultRecorder))

    def _attach_config(self) -> None:
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False))
        resolved = resolved.get(self.subcommand, resolved)
        # Values linked at instantiation are not in the parsed config; take them from the objects.
        resolved["model"].setdefault("init_args", {})["num_classes"] = self.model.hparams.num_classes
        # Values set at run time: accumulation derived from global_batch_size, drop_last set by mixup.
        resolved.get("trainer", {})["accumulate_grad_batches"] = self.trainer.accumulate_grad_batches
        drop_last = getattr(self.datamodule, "hparams", {}).get("drop_last")
        if drop_last is not None:
            resolved.get("data", {})["drop_last"] = drop_last
        self._recorder().config = resolved

    def before_fit(self) -> None:
        self._derive_accumulation()
        self._attach_config()

    def _derive_accumulation(self) -> None:
        """Set ``trainer.accumulate_grad_batches`` from ``global_batch_size`` (no-op when it is unset)."""
        global_batch = self.config[self.subcommand].get("global_batch_size")
        if global_batch is None:
            return
        per_device = int(self.datamodule.batch_size)
        world_size = self.trainer.world_size  # devices x nodes, resolved by the Trainer
        per_step = per_device * world_size
        if global_batch <= 0 or global_batch % per_step:
            raise ValueError(
                f"global_batch_size {global_batch} is not a positive multiple of data.batch_size {per_device} x "
                f"{world_size} processes (devices x nodes) = {per_step}; change global_batch_size, "
                "data.batch_size or the number of devices"
            )
        accumulation = global_batch // per_step
        configured = self.trainer.accumulate_grad_batches
        if configured not in (1, accumulation):
            raise ValueError(
                f"trainer.accumulate_grad_batches {configured} contradicts global_batch_size {global_batch} = "
                f"{per_device} per device x {world_size} processes x {accumulation}; leave it unset"
            )
        self.trainer.accumulate_grad_batches = accumulation
        log.info(
            "global batch %d = %d per device x %d processes x %d accumulation steps",
            global_batch, per_device, world_size, accumulation,
        )

    def before_validate(self) -> None:
        self._attach_config()

    def before_test(self) -> None:
        self._attach_config()

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self._attach_config()
            self.trainer.test(self.model, datamodule=self.datamodule)
            self._print_written()

    def after_test(self) -> None:
        self._print_written()

    def after_validate(self) -> None:
        self._print_written()

    def _print_written(self) -> None:
        recorder = self._recorder()
        if not self.trainer.is_global_zero or not recorder.written:
            return
        from d2v_eval.results import read_records

        records = [r for r in read_records(recorder.records_dir) if r["run_id"] == recorder.run_id]
        sys.stdout.write("\n" + runs_table(records) + "\n")
        for path in recorder.written:
            sys.stdout.write(f"record: {path}\n")


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("d2v_eval")
    if not package_logger.handlers:
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    _configure_logging()
    if argv and argv[0] in EXTRA_SUBCOMMANDS:
        module = importlib.import_module(EXTRA_SUBCOMMANDS[argv[0]])
        return module.main(argv[1:])

    D2VEvalCLI(
        ClassificationModule,
        ImageClassificationData,
        subclass_mode_model=True,
        trainer_defaults=trainer_defaults(),
        args=None if from_command_line else argv,
        parser_kwargs={
            "description": "Evaluate Data2Vec-Vision encoders. Other subcommands: "
            + ", ".join(sorted(EXTRA_SUBCOMMANDS)) + " (run `d2v-eval SUBCOMMAND --help`)."
        },
        auto_configure_optimizers=False,
        save_config_callback=ResumableSaveConfig,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
