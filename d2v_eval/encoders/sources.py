"""Encoder sources: detect a checkpoint's format and read it into timm ``Beit`` key names.

Formats (the ``format`` value stored in result records):

- ``hf-hub``: a Hugging Face hub id (``facebook/data2vec-vision-base``), resolved through the cache.
- ``hf-dir``: a ``save_pretrained`` directory (config.json plus model.safetensors or pytorch_model.bin).
- ``hf-state-dict``: a transformers-layout state dict file without config.json.
- ``original``: a data2vec_vision / BEiT training checkpoint, a dict with ``model`` (and optionally
  ``model_ema``, ``optimizer``, ``epoch``, ``scaler``, ``args``).
- ``deepspeed``: a DeepSpeed model-states file with the weights under ``module``.
- ``timm``: a flat timm-layout state dict (.pth, .bin or .safetensors, including ``d2v-eval convert`` output).
- ``prefixed``: a flat timm-layout state dict whose keys carry ``module.``, ``model.``, ``encoder.`` or
  ``backbone.``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from d2v_eval.encoders.checkpoints import (
    StateDict, is_state_dict, read_safetensors, read_state_dict, read_torch_checkpoint, sha256_file,
)
from d2v_eval.encoders.hf import arch_from_hf_config, convert_hf_state_dict, is_hf_layout, read_hf_config
from d2v_eval.encoders.hub import HF_WEIGHT_FILES, fetch_hf_config, fetch_hf_model, parse_hub_id
from d2v_eval.encoders.presets import PRESETS, BeitArch
from d2v_eval.encoders.shapes import infer_arch

log = logging.getLogger(__name__)

FORMATS = ("hf-hub", "hf-dir", "hf-state-dict", "original", "deepspeed", "timm", "prefixed")
STATE_DICT_PREFIXES = ("module.", "model.", "encoder.", "backbone.")
# safetensors metadata keys written by `d2v-eval convert`.
ARCH_METADATA_KEY = "d2v_eval.arch"

# LayerNorm eps is not stored in a state dict. The original code uses 1e-6
# (facebookresearch/data2vec_vision beit/modeling_finetune.py, partial(nn.LayerNorm, eps=1e-6));
# transformers' Data2VecVisionConfig defaults to 1e-12 (transformers 5.25).
ORIGINAL_LAYER_NORM_EPS = 1e-6
HF_LAYER_NORM_EPS = 1e-12
TIMM_ANCHOR = "patch_embed.proj.weight"
# Tensors only pretraining uses (BEiT's masked-image-modeling head and mask token); never loaded.
PRETRAINING_ONLY_PREFIXES = ("mask_token", "lm_head.")


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read into timm names, at its stored resolution and bias layout."""

    source: str
    format: str
    arch: BeitArch
    state_dict: StateDict
    weights_path: Path | None = None
    sha256: str | None = None


def _accepted_forms() -> str:
    return (
        f"accepted sources: a preset name ({', '.join(sorted(PRESETS))}), a Hugging Face hub id (org/name), a save_pretrained directory, "
        "an original data2vec_vision/BEiT .pth, a DeepSpeed model-states file, or a timm-layout state dict "
        "(.pth/.bin/.safetensors, optionally with a module./model./encoder./backbone. prefix)"
    )


def _is_safetensors(path: Path) -> bool:
    """Return whether ``path`` starts like a safetensors file: an 8-byte little-endian header size, then ``{``."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_file(path: Path, *, shapes_only: bool) -> tuple[Any, dict[str, str]]:
    """Read a checkpoint file's object and safetensors metadata (empty for PyTorch files)."""
    if path.stat().st_size > 0 and _is_safetensors(path):
        if not shapes_only:
            return read_safetensors(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"checkpoint file {path} is not a readable safetensors file: {error}") from error
        return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}, metadata
    return read_torch_checkpoint(path, mmap=shapes_only), {}


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = [str(key) for key in list(obj)[:8]]
        return f"a dict with keys {keys}{' ...' if len(obj) > 8 else ''}"
    return f"a {type(obj).__name__}"


def _find_prefix(keys) -> str | None:
    for prefix in STATE_DICT_PREFIXES:
        if prefix + TIMM_ANCHOR in keys:
            return prefix
    return None


def detect_file_format(obj: Any, metadata: dict[str, str], path: Path) -> str:
    """Classify an unpickled (or safetensors) checkpoint object into one of :data:`FORMATS`."""
    if is_state_dict(obj):
        keys = set(obj)
        if ARCH_METADATA_KEY in metadata or TIMM_ANCHOR in keys:
            return "timm"
        if is_hf_layout(keys):
            return "hf-state-dict"
        if _find_prefix(keys) is not None:
            return "prefixed"
    elif isinstance(obj, dict):
        if is_state_dict(obj.get("module")):
            return "deepspeed"
        if is_state_dict(obj.get("model")) or is_state_dict(obj.get("model_ema")):
            return "original"
    raise ValueError(f"checkpoint file {path} is not a recognised encoder checkpoint: it contains {_describe(obj)}; "
                     + _accepted_forms())


def _strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    # Keys outside the prefix stay as they are, so the strict load reports them as unexpected.
    return {(key[len(prefix):] if key.startswith(prefix) else key): value for key, value in state_dict.items()}


def _to_timm_names(state_dict: StateDict, origin: str) -> tuple[StateDict, float]:
    """Rename a flat state dict (timm, prefixed or transformers layout) to timm names; return its LayerNorm eps."""
    keys = set(state_dict)
    if TIMM_ANCHOR not in keys:
        prefix = _find_prefix(keys)
        if prefix is not None:
            return _strip_prefix(state_dict, prefix), ORIGINAL_LAYER_NORM_EPS
        if is_hf_layout(keys):
            converted, unknown = convert_hf_state_dict(state_dict)
            if unknown:
                raise ValueError(f"{origin} has transformers keys with no timm counterpart: {unknown[:10]}")
            return converted, HF_LAYER_NORM_EPS
    return state_dict, ORIGINAL_LAYER_NORM_EPS


def _select_state_dict(obj: Any, fmt: str, path: Path, use_ema: bool) -> StateDict:
    """Pick the weights of format ``fmt`` out of a checkpoint object; raise naming what it contains otherwise."""
    if fmt == "original":
        name = "model_ema" if use_ema else "model"
        if not isinstance(obj, dict) or not is_state_dict(obj.get(name)):
            hint = " (pass use_ema=False for the online weights)" if use_ema else ""
            raise ValueError(
                f"checkpoint file {path} has no state dict under {name!r}{hint}; it contains {_describe(obj)}"
            )
        return obj[name]
    if use_ema:
        raise ValueError(
            f"use_ema=True needs an original training checkpoint with 'model_ema', but {path} is format {fmt!r}"
        )
    if fmt == "deepspeed":
        if not isinstance(obj, dict) or not is_state_dict(obj.get("module")):
            raise ValueError(f"checkpoint file {path} has no state dict under 'module'; it contains {_describe(obj)}")
        return obj["module"]
    if not is_state_dict(obj):
        raise ValueError(f"format {fmt!r} expects a flat state dict of tensors, but {path} contains {_describe(obj)}")
    return obj


def _read_file_checkpoint(
    path: Path, source: str, fmt: str | None, use_ema: bool, img_size: int | None, shapes_only: bool
) -> Checkpoint:
    obj, metadata = _read_file(path, shapes_only=shapes_only)
    detected = detect_file_format(obj, metadata, path)
    fmt = fmt or detected
    raw = _select_state_dict(obj, fmt, path, use_ema)

    if fmt == "timm":
        state_dict, eps = raw, ORIGINAL_LAYER_NORM_EPS
    elif fmt == "prefixed":
        prefix = _find_prefix(set(raw))
        if prefix is None:
            raise ValueError(
                f"format 'prefixed' expects keys like module.{TIMM_ANCHOR}, but {path} has none of the prefixes "
                f"{', '.join(STATE_DICT_PREFIXES)}"
            )
        state_dict, eps = _strip_prefix(raw, prefix), ORIGINAL_LAYER_NORM_EPS
    elif fmt == "hf-state-dict":
        if not is_hf_layout(set(raw)):
            raise ValueError(f"format 'hf-state-dict' expects transformers key names, but {path} has none")
        state_dict, eps = _to_timm_names(raw, str(path))
    else:  # original and deepspeed wrap a state dict of any flat layout
        state_dict, eps = _to_timm_names(raw, str(path))

    # Index buffers are derived from the window size; timm rebuilds them, so stored ones are never loaded.
    state_dict = {key: value for key, value in state_dict.items() if not key.endswith("relative_position_index")}
    if ARCH_METADATA_KEY in metadata:
        arch = BeitArch(**json.loads(metadata[ARCH_METADATA_KEY]))
    else:
        arch = infer_arch(state_dict, origin=str(path), layer_norm_eps=eps, img_size=img_size)
    sha256 = None if shapes_only else sha256_file(path)
    return Checkpoint(source=source, format=fmt, arch=arch, state_dict=state_dict, weights_path=path, sha256=sha256)


def find_hf_weights(model_dir: Path) -> Path:
    """Return the weights file of a save_pretrained directory, preferring safetensors."""
    for name in HF_WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(
        f"{model_dir} has no weights file; expected one of {', '.join(HF_WEIGHT_FILES)} "
        "(sharded checkpoints: merge them with save_pretrained(max_shard_size='100GB'))"
    )


def _read_hf_directory(model_dir: Path, source: str, fmt: str, shapes_only: bool) -> Checkpoint:
    arch = arch_from_hf_config(read_hf_config(model_dir))
    if shapes_only:
        return Checkpoint(source=source, format=fmt, arch=arch, state_dict={})
    weights_path = find_hf_weights(model_dir)
    state_dict, unknown = convert_hf_state_dict(read_state_dict(weights_path))
    if unknown:
        raise ValueError(f"{weights_path} has keys with no timm counterpart: {unknown[:10]} ({len(unknown)} in all)")
    return Checkpoint(
        source=source, format=fmt, arch=arch, state_dict=state_dict,
        weights_path=weights_path, sha256=sha256_file(weights_path),
    )


def read_source(
    source: str,
    *,
    format: str | None = None,
    use_ema: bool = False,
    img_size: int | None = None,
    shapes_only: bool = False,
) -> Checkpoint:
    """Read ``source`` (hub id, directory or file) into a :class:`Checkpoint`, detecting its format.

    ``format`` (one of :data:`FORMATS`) skips detection; a file that does not fit it is an error.
    ``use_ema`` takes ``model_ema`` from an original training checkpoint. ``img_size`` is only used as
    the resolution of a checkpoint without position tables. ``shapes_only`` reads as little as
    needed for the architecture (config.json, safetensors headers, memory-mapped PyTorch files);
    its tensors may then be on the meta device and ``sha256`` is None.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format {format!r} is invalid; choose one of {', '.join(FORMATS)} (or leave it unset)")
    path = Path(source).expanduser()
    local = path.exists() and format != "hf-hub"

    if not local and format in (None, "hf-hub"):
        hub_id = parse_hub_id(source)
        if hub_id is None:
            raise ValueError(f"encoder source {source!r} is not a file, a directory or a hub id; " + _accepted_forms())
        if use_ema:
            raise ValueError(f"use_ema=True needs an original training checkpoint, but {source!r} is a hub id")
        repo_id, revision = hub_id
        try:
            if shapes_only:
                config_dir = fetch_hf_config(repo_id, revision).parent
                arch = arch_from_hf_config(read_hf_config(config_dir))
                return Checkpoint(source=source, format="hf-hub", arch=arch, state_dict={})
            model_dir = fetch_hf_model(repo_id, revision)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"encoder source {source!r} is not a local path; as a hub id: {error}") from error
        return _read_hf_directory(model_dir, source, "hf-hub", shapes_only)
    if not local:
        raise FileNotFoundError(f"encoder source {source!r} does not exist (format {format!r} needs a local path)")

    if path.is_dir():
        if format not in (None, "hf-dir"):
            raise ValueError(f"format {format!r} needs a file, but {path} is a directory; use format='hf-dir'")
        if use_ema:
            raise ValueError(f"use_ema=True needs an original training checkpoint, but {path} is a directory")
        return _read_hf_directory(path, source, "hf-dir", shapes_only)
    if format == "hf-dir":
        raise ValueError(f"format 'hf-dir' needs a directory, but {path} is a file")
    return _read_file_checkpoint(path, source, format, use_ema, img_size, shapes_only)


def detect_format(source: str) -> str:
    """Return the format ``load_encoder(source)`` would detect: ``random-init`` or one of :data:`FORMATS`."""
    if source in PRESETS:
        return "random-init"
    path = Path(source).expanduser()
    if path.is_dir():
        return "hf-dir"
    if path.is_file():
        obj, metadata = _read_file(path, shapes_only=True)
        return detect_file_format(obj, metadata, path)
    if parse_hub_id(source) is not None:
        return "hf-hub"
    raise ValueError(f"encoder source {source!r} is not a file, a directory or a hub id; " + _accepted_forms())
