"""Data: benchmark registry, local datasets, image decoding, transforms and the LightningDataModule."""

from d2v_eval.data.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from d2v_eval.data.columns import resolve_columns
from d2v_eval.data.datamodule import CorruptImageError, ImageClassificationData
from d2v_eval.data.images import decode_image, to_rgb
from d2v_eval.data.local import load_local

__all__ = [
    "BENCHMARKS", "Benchmark", "CorruptImageError", "ImageClassificationData", "decode_image", "get_benchmark",
    "load_local", "resolve_columns", "to_rgb",
]
