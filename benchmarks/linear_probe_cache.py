"""Cost of a cached multi-head linear probe against heads trained one at a time on a running encoder.

    PYTHONPATH=. python benchmarks/linear_probe_cache.py --output benchmarks/linear_probe_cache.json
    PYTHONPATH=. python benchmarks/linear_probe_cache.py --img-size 48 --baseline-heads 2

Cached run: one ``LinearProbe`` fit with 13 learning rates x 2 feature specs (CLS; mean of patch
tokens), BatchNorm in front, for ``--epochs`` epochs on a cold feature cache, validating every
epoch. Inside that one run a callback times the feature extraction (``setup``) and every epoch
(training plus validation on cached features). The reported ratio is

    cached run / (extraction + mean head epoch)

whose target is at most 1.3. Baseline: the same heads, each in its own fit with ``use_cache=False``
(the encoder runs on every batch of every epoch). Only ``--baseline-heads`` of the 26 are run; the
26-head total is projected from their mean and labelled as a projection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from d2v_eval import ImageClassificationData, LinearProbe
from d2v_eval.protocols.features import FeatureSpec
from d2v_eval.protocols.linear_probe import DEFAULT_LRS

SPECS = [FeatureSpec("cls"), FeatureSpec("mean")]


class PhaseTimer(pl.Callback):
    """Wall-clock marks: start of ``setup`` (before the module's), fit start, and every epoch end."""

    def __init__(self):
        self.setup_start = self.fit_start = self.fit_end = None
        self.epoch_ends: list[float] = []

    def setup(self, trainer, pl_module, stage):
        self.setup_start = time.perf_counter()

    def on_fit_start(self, trainer, pl_module):
        self.fit_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_ends.append(time.perf_counter())

    def on_fit_end(self, trainer, pl_module):
        self.fit_end = time.perf_counter()


def fit(args, *, lrs, specs, use_cache: bool) -> PhaseTimer:
    pl.seed_everything(0)
    probe = LinearProbe(
        args.encoder, num_classes=10, img_size=args.img_size, features=specs, lrs=lrs, batch_norm=[True],
        lr_rule="linear_scaling", use_cache=use_cache,
    )
    data = ImageClassificationData(
        "digits", input_size=args.img_size or 16, batch_size=args.batch_size, num_workers=0, crop_pct=1.0,
    )
    timer = PhaseTimer()
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer],
    )
    trainer.fit(probe, data)
    return timer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="data2vec_vision_tiny_patch4_16", help="encoder preset (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=None, help="input size in pixels (default: the preset's)")
    parser.add_argument("--epochs", type=int, default=10, help="head training epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument("--baseline-heads", type=int, default=2, help="heads of the 26 run one at a time (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default: %(default)s)")
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["D2V_EVAL_CACHE"] = tempfile.mkdtemp(prefix="d2v-bench-")  # cold cache

    lrs = list(DEFAULT_LRS)
    cached = fit(args, lrs=lrs, specs=SPECS, use_cache=True)
    extraction_s = cached.fit_start - cached.setup_start
    marks = [cached.fit_start, *cached.epoch_ends]
    epoch_s = [b - a for a, b in zip(marks, marks[1:])]
    head_epoch_s = sum(epoch_s) / len(epoch_s)
    cached_run_s = cached.fit_end - cached.setup_start

    baseline_runs = []
    heads = [(spec, lr) for spec in SPECS for lr in lrs]
    step = max(1, len(heads) // max(1, args.baseline_heads))
    for spec, lr in heads[::step][: args.baseline_heads]:
        timer = fit(args, lrs=[lr], specs=[spec], use_cache=False)
        baseline_runs.append({"spec": spec.name, "lr": lr, "seconds": timer.fit_end - timer.setup_start})
    per_head_s = sum(run["seconds"] for run in baseline_runs) / max(1, len(baseline_runs))

    result = {
        "encoder": args.encoder, "img_size": args.img_size, "epochs": args.epochs, "batch_size": args.batch_size,
        "heads": len(heads), "threads": args.threads, "accelerator": args.accelerator,
        "extraction_s": round(extraction_s, 3),
        "head_epoch_s": round(head_epoch_s, 3),
        "epoch_s": [round(value, 3) for value in epoch_s],
        "cached_run_s": round(cached_run_s, 3),
        "ratio_cached_to_one_pass_plus_one_epoch": round(cached_run_s / (extraction_s + head_epoch_s), 3),
        "target_ratio": 1.3,
        "baseline_runs": baseline_runs,
        "baseline_per_head_s": round(per_head_s, 3),
        "baseline_projected_all_heads_s": round(per_head_s * len(heads), 1),
        "speedup_projected": round(per_head_s * len(heads) / cached_run_s, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__},
    }
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
