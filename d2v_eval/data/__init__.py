"""Data: benchmark registry, image decoding, transforms and the LightningDataModule."""

from d2v_eval.data.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from d2v_eval.data.datamodule import ImageClassificationData
from d2v_eval.data.images import to_rgb

__all__ = ["BENCHMARKS", "Benchmark", "ImageClassificationData", "get_benchmark", "to_rgb"]
