"""Training-pipeline throughput: JPEG decoding plus the ImageNet-style train transform, images/s per core.

    python benchmarks/data_pipeline.py                          # writes benchmarks/results/data_pipeline.json
    python benchmarks/data_pipeline.py --images 400 --workers 2 --output /tmp/pipeline.json

The images are synthetic JPEGs of ImageNet's typical size (500 x 375, quality 90), stored as bytes in a
Hugging Face dataset so that the measured path is the one training takes: ``TransformedSplit`` decodes
each image (``decode_image``: full decode, EXIF orientation, RGB) and applies the datamodule's timm
train transform at 224 px. Two transforms are timed: the basic one (random resized crop, flip,
normalise) and the data2vec-vision fine-tuning recipe (adds RandAugment ``rand-m9-mstd0.5-inc1``,
colour jitter 0.4 and random erasing 0.25). One process measures images/s per core, once by index and
once with a per-sample seed as the training loader requests them (the transform then runs with
reseeded RNGs, whose states are restored afterwards). The training loader with ``--workers``
persistent workers measures the scaling.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image as ImageFeature
from PIL import Image

from d2v_eval.data.datamodule import ImageClassificationData, TransformedSplit
from d2v_eval.data.sampler import ResumableLoader, ResumableSampler
from d2v_eval.randomness import seeded_rngs

# Typical ILSVRC-2012 image: 500 x 375 pixels (the most common size in the training set).
WIDTH, HEIGHT = 500, 375
RECIPES = {
    "basic": {},
    "d2v_finetune": {"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "re_prob": 0.25},
}


def synthetic_jpegs(count: int, seed: int = 0) -> Dataset:
    """``count`` JPEGs with smooth structure plus noise, so their size and decode cost resemble photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    images = []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        channels = [127 + 100 * np.sin(x / rng.uniform(20, 80) + y / rng.uniform(20, 80) + p) for p in phase]
        pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, (HEIGHT, WIDTH, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=10)})
    return Dataset.from_dict({"image": images, "label": [i % 10 for i in range(count)]}, features=features)


def one_process(dataset: TransformedSplit, *, seeded: bool) -> float:
    """Images per second of decoding plus transform in this process (one core).

    ``seeded`` requests ``(index, sample_seed)`` items, as the training loader does.
    """
    items = [(index, 1000 + index) if seeded else index for index in range(len(dataset))]
    for item in items[:8]:  # warm-up: imports, caches
        dataset[item]
    start = time.perf_counter()
    for item in items:
        dataset[item]
    return len(dataset) / (time.perf_counter() - start)


def data_loader(dataset: TransformedSplit, workers: int, batch_size: int = 32, epochs: int = 2) -> float:
    """Images per second through the training loader with persistent workers (the second epoch is timed)."""
    sampler = ResumableSampler(dataset, seed=0, with_seeds=True)
    loader = ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                             persistent_workers=True, pin_memory=torch.cuda.is_available())
    rate = 0.0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        seen = sum(len(labels) for _, labels in loader)
        rate = seen / (time.perf_counter() - start)
    return rate


def seeding_cost_us(*, restore: bool, calls: int = 2000) -> float:
    """Microseconds per ``seeded_rngs`` context entered and left, with or without restoring the states."""
    start = time.perf_counter()
    for seed in range(calls):
        with seeded_rngs(seed, restore=restore):
            pass
    return (time.perf_counter() - start) / calls * 1e6


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (Linux), else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="synthetic JPEGs to decode per measurement")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--input_size", type=int, default=224, help="crop size in pixels")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "data_pipeline.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    split = synthetic_jpegs(args.images)
    results = {}
    for recipe, augmentation in RECIPES.items():
        data = ImageClassificationData("digits", input_size=args.input_size, num_workers=args.workers, **augmentation)
        dataset = TransformedSplit(split, data.build_transform(is_training=True), "image", "label", split_name="train")
        per_core = one_process(dataset, seeded=False)
        per_core_seeded = one_process(dataset, seeded=True)
        loader = data_loader(dataset, args.workers)
        results[recipe] = {
            "images_per_s_per_core": round(per_core, 1),
            "images_per_s_per_core_seeded": round(per_core_seeded, 1),
            "seeded_over_unseeded": round(per_core_seeded / per_core, 3),
            f"images_per_s_{args.workers}_workers": round(loader, 1),
            "worker_scaling": round(loader / per_core_seeded, 2),
        }
        print(recipe, results[recipe])

    seeding = {"restore_us": round(seeding_cost_us(restore=True), 1),
               "no_restore_us": round(seeding_cost_us(restore=False), 1)}
    print("seeded_rngs per sample", seeding)

    record = {
        "benchmark": "data_pipeline",
        "images": args.images,
        "image_size": [WIDTH, HEIGHT],
        "input_size": args.input_size,
        "workers": args.workers,
        "results": results,
        "seeded_rngs": seeding,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "pillow": Image.__version__},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
