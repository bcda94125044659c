"""Memory-mapped cache of frozen-encoder features, one entry per (encoder weights, benchmark, split, transform, spec).

An entry is a folder ``<cache_root>/features/<key>/`` holding ``features.npy`` (N, dim) in float16 or
float32, ``labels.npy`` (N,) int64 and ``meta.json``, written last as the commit marker. Rows are in
the split's sample order. Each process extracts the rows ``rank, rank + world_size, ...`` into a
shard with their sample indices; rank 0 then assembles the shards in order. An entry whose key,
shape or byte size does not match is rebuilt with a warning, never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from d2v_eval.data.digits import cache_root
from d2v_eval.protocols.features import FeatureSpec, extract_features
from d2v_eval.results.records import write_json_atomic

log = logging.getLogger(__name__)

CacheDtype = Literal["float16", "float32"]
# Bump when the layout or the extraction changes, so an old entry is never reused.
FORMAT_VERSION = 1


def feature_cache_dir() -> Path:
    """Folder of all feature cache entries: ``<D2V_EVAL_CACHE or ~/.cache/d2v_eval>/features``."""
    return cache_root() / "features"


def feature_cache_key(
    *,
    encoder_fingerprint: str,
    benchmark: str,
    split: str,
    split_fingerprint: str | None,
    num_samples: int,
    transform: str,
    spec: FeatureSpec,
    dtype: CacheDtype,
) -> tuple[str, dict[str, Any]]:
    """Return ``(hex key, key fields)``; any change of weights, data, split, transform, spec or dtype changes the key.

    ``transform`` is the transform's ``repr``, in which timm's transforms print their sizes,
    interpolation and normalisation. ``split_fingerprint`` is the Hugging Face dataset's
    fingerprint, which changes when a carved validation split is drawn with another seed or fraction.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"cache dtype {dtype!r} is invalid; choose 'float16' or 'float32'")
    fields = {
        "format_version": FORMAT_VERSION,
        "encoder_fingerprint": encoder_fingerprint,
        "benchmark": benchmark,
        "split": split,
        "split_fingerprint": split_fingerprint,
        "num_samples": int(num_samples),
        "transform": transform,
        "spec": dataclasses.asdict(spec),
        "dtype": dtype,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
    return key, fields


@dataclasses.dataclass
class ProcessView:
    """This process's place in a (possibly distributed) job, with the collectives the cache needs."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[str], None] = lambda name: None
    broadcast: Callable[[Any], Any] = lambda value: value

    @classmethod
    def from_trainer(cls, trainer) -> "ProcessView":
        strategy = trainer.strategy
        return cls(
            rank=trainer.global_rank, world_size=trainer.world_size,
            barrier=lambda name: strategy.barrier(name), broadcast=lambda value: strategy.broadcast(value, src=0),
        )


@dataclasses.dataclass
class CacheEntry:
    """A valid, opened cache entry: ``features`` (N, dim) memory map and ``labels`` (N,)."""

    path: Path
    features: np.ndarray
    labels: np.ndarray


def open_entry(path: Path, key: str, fields: dict, dim: int) -> tuple[CacheEntry | None, str]:
    """Open the entry at ``path`` if its meta key, shapes and byte sizes all match; else ``(None, reason)``."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None, "no meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"unreadable meta.json ({error})"
    if meta.get("key") != key or meta.get("fields") != fields:
        return None, f"it belongs to key {meta.get('key')!r}, not {key!r}"
    num_samples = fields["num_samples"]
    dtype = fields["dtype"]
    features_path, labels_path = path / "features.npy", path / "labels.npy"
    for file, size in ((features_path, meta.get("features_bytes")), (labels_path, meta.get("labels_bytes"))):
        if not file.is_file():
            return None, f"{file.name} is missing"
        if file.stat().st_size != size:
            return None, f"{file.name} has {file.stat().st_size} bytes, meta.json says {size}"
    try:
        features = np.load(features_path, mmap_mode="r")
        labels = np.load(labels_path, mmap_mode="r")
    except (OSError, ValueError) as error:
        return None, f"unreadable array ({error})"
    if features.shape != (num_samples, dim) or features.dtype != np.dtype(dtype):
        return None, f"features are {features.dtype}{features.shape}, expected {dtype}{(num_samples, dim)}"
    if labels.shape != (num_samples,):
        return None, f"labels have shape {labels.shape}, expected {(num_samples,)}"
    return CacheEntry(path, features, np.asarray(labels)), ""


def _write_shards(
    encoder, dataset: Dataset, specs: list[FeatureSpec], paths: dict[str, Path], dims: dict[str, int],
    dtype: str, *, batch_size: int, num_workers: int, device: torch.device, process: ProcessView,
) -> None:
    """Extract this process's rows of ``dataset`` into one shard per spec, with their sample indices."""
    indices = np.arange(process.rank, len(dataset), process.world_size, dtype=np.int64)
    tag = f"shard-{process.rank}-of-{process.world_size}"
    shards = {
        spec.name: np.lib.format.open_memmap(
            paths[spec.name] / f"{tag}.npy", mode="w+", dtype=dtype, shape=(len(indices), dims[spec.name])
        )
        for spec in specs
    }
    labels = np.empty(len(indices), dtype=np.int64)
    loader = DataLoader(
        Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Its own generator: an iterator draws a worker seed, which must not shift the global RNG
        # (training would then shuffle differently depending on whether the cache was warm).
        generator=torch.Generator().manual_seed(0),
    )
    row = 0
    for images, batch_labels in loader:
        batch = extract_features(encoder, images.to(device, non_blocking=True), specs)
        size = len(batch_labels)
        for spec in specs:
            shards[spec.name][row:row + size] = batch[spec.name].cpu().numpy().astype(dtype, copy=False)
        labels[row:row + size] = np.asarray(batch_labels)
        row += size
    for spec in specs:
        shards[spec.name].flush()
        np.save(paths[spec.name] / f"{tag}.indices.npy", indices)
        np.save(paths[spec.name] / f"{tag}.labels.npy", labels)
    del shards


def _assemble(path: Path, key: str, fields: dict, dim: int, world_size: int) -> None:
    """Merge the shards of every rank into ``features.npy`` and ``labels.npy`` in sample order (rank 0)."""
    num_samples, dtype = fields["num_samples"], fields["dtype"]
    temp_features = path / ".features.npy.tmp"
    features = np.lib.format.open_memmap(temp_features, mode="w+", dtype=dtype, shape=(num_samples, dim))
    labels = np.full(num_samples, -1, dtype=np.int64)
    for rank in range(world_size):
        tag = f"shard-{rank}-of-{world_size}"
        indices = np.load(path / f"{tag}.indices.npy")
        features[indices] = np.load(path / f"{tag}.npy", mmap_mode="r")
        labels[indices] = np.load(path / f"{tag}.labels.npy")
    if (labels < 0).any():
        raise RuntimeError(f"feature cache {path}: shards cover {int((labels >= 0).sum())} of {num_samples} rows")
    features.flush()
    del features
    os.replace(temp_features, path / "features.npy")
    np.save(path / ".labels.npy.tmp.npy", labels)
    os.replace(path / ".labels.npy.tmp.npy", path / "labels.npy")
    for rank in range(world_size):
        for suffix in (".npy", ".indices.npy", ".labels.npy"):
            (path / f"shard-{rank}-of-{world_size}{suffix}").unlink(missing_ok=True)
    write_json_atomic(path / "meta.json", {
        "key": key, "fields": fields, "shape": [num_samples, dim],
        "features_bytes": (path / "features.npy").stat().st_size,
        "labels_bytes": (path / "labels.npy").stat().st_size,
    })


def cached_features(
    encoder,
    dataset: Dataset,
    specs: list[FeatureSpec],
    keys: dict[str, tuple[str, dict]],
    *,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    process: ProcessView | None = None,
) -> dict[str, CacheEntry]:
    """Return a valid cache entry per spec, extracting (in one encoder pass) every spec that has none.

    ``dataset`` yields ``(image tensor (3, H, W), label)`` with a deterministic transform; ``keys``
    maps each spec name to ``feature_cache_key(...)``. Every process must call this together.
    """
    process = process or ProcessView()
    device = torch.device(device)
    embed_dim = encoder.embed_dim
    dims = {spec.name: spec.dim(embed_dim) for spec in specs}
    paths = {spec.name: feature_cache_dir() / keys[spec.name][0] for spec in specs}

    entries: dict[str, CacheEntry] = {}
    missing = []
    for spec in specs:
        key, fields = keys[spec.name]
        entry, reason = open_entry(paths[spec.name], key, fields, dims[spec.name])
        if entry is not None:
            entries[spec.name] = entry
            continue
        if paths[spec.name].exists():
            log.warning("feature cache %s is invalid (%s); rebuilding it", paths[spec.name], reason)
        missing.append(spec)
    # Every rank must agree on what to rebuild, whatever it saw on a shared file system.
    # NOTE: tested with two gloo processes on one machine; ranks on several machines need the cache
    # folder on a file system they all share.
    missing_names = process.broadcast([spec.name for spec in missing])
    missing = [spec for spec in specs if spec.name in missing_names]
    if not missing:
        return entries
    for spec in missing:
        entries.pop(spec.name, None)

    process.barrier("feature-cache-check")
    if process.rank == 0:
        for spec in missing:
            shutil.rmtree(paths[spec.name], ignore_errors=True)
            paths[spec.name].mkdir(parents=True)
    process.barrier("feature-cache-clean")
    log.info(
        "extracting %s features of %d samples into %s",
        ", ".join(spec.name for spec in missing), len(dataset), feature_cache_dir(),
    )
    dtype = keys[missing[0].name][1]["dtype"]
    _write_shards(
        encoder, dataset, missing, paths, dims, dtype,
        batch_size=batch_size, num_workers=num_workers, device=device, process=process,
    )
    process.barrier("feature-cache-shards")
    if process.rank == 0:
        for spec in missing:
            key, fields = keys[spec.name]
            _assemble(paths[spec.name], key, fields, dims[spec.name], process.world_size)
    process.barrier("feature-cache-assembled")

    for spec in missing:
        key, fields = keys[spec.name]
        entry, reason = open_entry(paths[spec.name], key, fields, dims[spec.name])
        if entry is None:
            raise RuntimeError(f"feature cache {paths[spec.name]} is invalid right after it was written: {reason}")
        entries[spec.name] = entry
    return entries


class CachedFeatures(Dataset):
    """Cached features as ``({spec name: (draws, dim) float32}, labels (draws,))`` samples.

    Without ``subsets`` there is one draw and sample ``i`` is row ``i``. With ``subsets`` (draws, n),
    sample ``i`` is row ``subsets[d, i]`` for every draw ``d``, so heads of different few-shot draws
    each see their own subset, in the same shuffled order.
    """

    def __init__(self, entries: dict[str, CacheEntry], subsets: np.ndarray | None = None):
        if not entries:
            raise ValueError("CachedFeatures needs at least one cache entry")
        self.entries = entries
        self.labels = next(iter(entries.values())).labels
        if subsets is None:
            subsets = np.arange(len(self.labels), dtype=np.int64)[None, :]
        self.subsets = np.asarray(subsets, dtype=np.int64)  # (draws, n)

    def __len__(self) -> int:
        return self.subsets.shape[1]

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        rows = self.subsets[:, indices]  # (draws, B)
        # np.take on a memory map reads only the requested rows.
        features = {
            name: torch.from_numpy(np.take(entry.features, rows.T, axis=0).astype(np.float32))  # (B, draws, dim)
            for name, entry in self.entries.items()
        }
        labels = torch.from_numpy(np.asarray(self.labels)[rows.T])  # (B, draws)
        return [({name: tensor[i] for name, tensor in features.items()}, labels[i]) for i in range(len(indices))]


def split_cache_entries(
    encoder, encoder_fingerprint: str, datamodule, role: str, specs: list[FeatureSpec], dtype: CacheDtype, trainer,
) -> dict[str, CacheEntry]:
    """Cache entries (one per spec) of ``role``'s split of an ``ImageClassificationData``, extracted if missing.

    Features are taken under the evaluation transform (resize, centre crop), with the encoder moved to
    the trainer's device and run under its precision plugin. Every process must call this together.
    """
    from d2v_eval.data.datamodule import TransformedSplit

    if getattr(datamodule, "corrupt_policy", "error") == "skip":
        raise ValueError(
            "cached features need one row per sample, so data.corrupt_policy=skip cannot be used here; "
            "fix or remove the undecodable files, or use LinearProbe with use_cache=false"
        )
    split_name = datamodule.split_name(role)
    split = datamodule.load_splits()[split_name]
    transform = datamodule.build_transform(is_training=False)
    keys = {
        spec.name: feature_cache_key(
            encoder_fingerprint=encoder_fingerprint, benchmark=datamodule.entry.name, split=split_name,
            split_fingerprint=getattr(split, "_fingerprint", None), num_samples=len(split),
            transform=repr(transform), spec=spec, dtype=dtype,
        )
        for spec in specs
    }
    device = trainer.strategy.root_device
    encoder.to(device)
    dataset = TransformedSplit(split, transform, datamodule.image_column, datamodule.label_column)
    with trainer.precision_plugin.forward_context():
        return cached_features(
            encoder, dataset, specs, keys, batch_size=datamodule.batch_size,
            num_workers=datamodule.num_workers, device=device, process=ProcessView.from_trainer(trainer),
        )
