"""The ``d2v-eval`` entry point.

    d2v-eval fit --config configs/demo.yaml           # fine-tune, test, write the record, print it
    d2v-eval test --config CONFIG --ckpt_path CKPT    # evaluate a checkpoint on the test split
    d2v-eval report                                   # table of every record in results/runs/

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI; ``report`` is our own subcommand.
"""

from __future__ import annotations

import importlib
import logging
import sys

import yaml
from jsonargparse import lazy_instance
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from d2v_eval.data import ImageClassificationData
from d2v_eval.encoders import encoder_img_size
from d2v_eval.protocols import ClassificationModule
from d2v_eval.results import ResultRecorder, runs_table

# Subcommands that are not LightningCLI: name -> module with ``main(argv) -> int``.
EXTRA_SUBCOMMANDS = {
    "report": "d2v_eval.results.cli",
    "sweep": "d2v_eval.sweep.cli",
}



def trainer_defaults() -> dict:
    """Fresh Trainer defaults: TensorBoard logging, a rich progress bar, checkpoints in the run folder."""
    return {
        "default_root_dir": "runs",
        "logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="d2v_eval"),
        "callbacks": [
            RichProgressBar(),
            LearningRateMonitor(logging_interval="step"),
            ModelCheckpoint(save_last=True),
        ],
    }


class D2VEvalCLI(LightningCLI):
    """LightningCLI with result recording, encoder/data argument links and an optional test after fit."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ResultRecorder, "recorder")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="after fit, evaluate the final weights on the test split and write its record",
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
        self._recorder().config = resolved

    def before_fit(self) -> None:
        self._attach_config()

    def before_validate(self) -> None:
        self._attach_config()

    def before_test(self) -> None:
        self._attach_config()

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
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
            + ", ".join(sorted(EXTRA_SUBCOMMANDS)) + " (run `d2v-eval report --help`)."
        },
        auto_configure_optimizers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
