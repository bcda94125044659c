"""``load_encoder``: turn a source string (preset name or Hugging Face directory) into a timm ``Beit``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import torch
from timm.models.beit import Beit

from d2v_eval.encoders.checkpoints import StateDict, read_state_dict, sha256_file
from d2v_eval.encoders.hf import arch_from_hf_config, convert_hf_state_dict, read_hf_config
from d2v_eval.encoders.presets import PRESETS, BeitArch, build_beit

log = logging.getLogger(__name__)

RelPosBiasChoice = Literal["per_block", "shared", "auto"]
GlobalPool = Literal["avg", "token"]

# Tensors that only pretraining uses; dropped with one log line.
PRETRAINING_ONLY_PREFIXES = ("mask_token", "lm_head.")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass
class EncoderInfo:
    """Provenance of a loaded encoder, stored in every result record."""

    source: str
    format: str
    arch: BeitArch
    sha256: str | None = None
    weights_path: str | None = None
    dropped: list[str] = dataclasses.field(default_factory=list)
    reinitialised: list[str] = dataclasses.field(default_factory=list)

    def as_record(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "sha256": self.sha256,
            "weights_path": self.weights_path,
            "arch": dataclasses.asdict(self.arch),
            "dropped": self.dropped,
            "reinitialised": self.reinitialised,
        }


def _summarise_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}] ({len(keys)} in all)"


def _target_rel_pos_bias(stored: str, requested: RelPosBiasChoice) -> str:
    if stored == "none" or requested == "auto":
        return stored
    if stored == "per_block" and requested == "shared":
        raise ValueError(
            "rel_pos_bias='shared' was requested but the checkpoint stores one table per block, which "
            "cannot be merged without changing the model; use rel_pos_bias='per_block' or 'auto'"
        )
    return requested


def expand_shared_rel_pos_bias(state_dict: StateDict, depth: int) -> None:
    """Replace the shared relative position bias table by an identical copy in every block (in place)."""
    table = state_dict.pop("rel_pos_bias.relative_position_bias_table")
    for index in range(depth):
        state_dict[f"blocks.{index}.attn.relative_position_bias_table"] = table.clone()


def _fit_heads(state_dict: StateDict, model: Beit, info: EncoderInfo, num_classes: int) -> None:
    """Drop or flag the pooling norms and the classifier so they match ``model`` (in place)."""
    model_keys = set(model.state_dict())
    for name in ("norm", "fc_norm"):
        stored = [k for k in state_dict if k.startswith(name + ".")]
        if stored and f"{name}.weight" not in model_keys:
            # timm makes `norm` an identity under mean pooling and `fc_norm` one under CLS pooling.
            for key in stored:
                state_dict.pop(key)
            info.dropped.extend(stored)
            log.info("dropped %s: this pooling does not use it", ", ".join(stored))
        elif not stored and f"{name}.weight" in model_keys:
            info.reinitialised.extend([f"{name}.weight", f"{name}.bias"])

    head_keys = [k for k in state_dict if k.startswith("head.")]
    if num_classes == 0:
        for key in head_keys:
            state_dict.pop(key)
        info.dropped.extend(head_keys)
        return
    stored_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else None
    if stored_classes != num_classes:
        for key in head_keys:
            state_dict.pop(key)
        info.reinitialised.extend(["head.weight", "head.bias"])
        if stored_classes is not None:
            log.warning(
                "checkpoint head has %d classes but %d were requested: the head is re-initialised",
                stored_classes, num_classes,
            )


def load_state_dict_strictly(model: Beit, state_dict: StateDict, allowed_missing: list[str], origin: str) -> None:
    """Load ``state_dict`` into ``model``; any missing (not allowed) or unexpected key is an error."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in set(allowed_missing)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"weights from {origin} do not match the architecture: "
            f"missing keys {_summarise_keys(missing)}, unexpected keys {_summarise_keys(unexpected)}"
        )


def _find_hf_weights(model_dir: Path) -> Path:
    for name in HF_WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(
        f"{model_dir} has no weights file; expected one of {', '.join(HF_WEIGHT_FILES)} "
        "(sharded checkpoints: merge them with save_pretrained(max_shard_size='100GB'))"
    )


def _load_hf_directory(
    model_dir: Path, *, img_size, drop_path_rate, global_pool, rel_pos_bias, num_classes
) -> tuple[Beit, EncoderInfo]:
    arch = arch_from_hf_config(read_hf_config(model_dir))
    weights_path = _find_hf_weights(model_dir)
    if img_size is not None and img_size != arch.img_size:
        raise ValueError(
            f"img_size {img_size} differs from the checkpoint's image_size {arch.img_size}; "
            f"load at img_size={arch.img_size} (or leave img_size unset)"
        )

    info = EncoderInfo(
        source=str(model_dir), format="hf-dir", arch=arch,
        sha256=sha256_file(weights_path), weights_path=str(weights_path),
    )
    state_dict, unknown = convert_hf_state_dict(read_state_dict(weights_path))
    if unknown:
        raise ValueError(f"{weights_path} has keys with no timm counterpart: {_summarise_keys(unknown)}")

    dropped = [k for k in state_dict if k.startswith(PRETRAINING_ONLY_PREFIXES)]
    for key in dropped:
        state_dict.pop(key)
    if dropped:
        info.dropped.extend(dropped)
        log.info("dropped pretraining-only tensors: %s", ", ".join(dropped))

    target = _target_rel_pos_bias(arch.rel_pos_bias, rel_pos_bias)
    if arch.rel_pos_bias == "shared" and target == "per_block":
        expand_shared_rel_pos_bias(state_dict, arch.depth)
    model = build_beit(
        arch.replace(rel_pos_bias=target),
        drop_path_rate=drop_path_rate, global_pool=global_pool, num_classes=num_classes,
    )
    _fit_heads(state_dict, model, info, num_classes)
    load_state_dict_strictly(model, state_dict, info.reinitialised, str(weights_path))
    info.arch = arch.replace(rel_pos_bias=target)
    return model, info


def load_encoder_with_info(
    source: str,
    *,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    global_pool: GlobalPool = "avg",
    rel_pos_bias: RelPosBiasChoice = "per_block",
    num_classes: int = 0,
) -> tuple[Beit, EncoderInfo]:
    """Like :func:`load_encoder`, and also return the :class:`EncoderInfo` provenance."""
    if global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool {global_pool!r} is invalid; choose 'avg' or 'token'")
    if rel_pos_bias not in ("per_block", "shared", "auto"):
        raise ValueError(f"rel_pos_bias {rel_pos_bias!r} is invalid; choose 'per_block', 'shared' or 'auto'")

    if source in PRESETS:
        arch = PRESETS[source]
        if img_size is not None:
            arch = arch.replace(img_size=img_size)
        if rel_pos_bias != "auto":
            arch = arch.replace(rel_pos_bias=rel_pos_bias)  # random weights: any layout can be built
        model = build_beit(arch, drop_path_rate=drop_path_rate, global_pool=global_pool, num_classes=num_classes)
        return model, EncoderInfo(source=f"random-init:{source}", format="random-init", arch=arch)

    path = Path(source).expanduser()
    if path.is_dir():
        return _load_hf_directory(
            path, img_size=img_size, drop_path_rate=drop_path_rate, global_pool=global_pool,
            rel_pos_bias=rel_pos_bias, num_classes=num_classes,
        )
    raise ValueError(
        f"encoder source {source!r} is neither a preset nor a Hugging Face model directory; "
        f"valid presets: {', '.join(sorted(PRESETS))}"
    )


def load_encoder(
    source: str,
    *,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    global_pool: GlobalPool = "avg",
    rel_pos_bias: RelPosBiasChoice = "per_block",
    num_classes: int = 0,
) -> Beit:
    """Build a timm ``Beit`` from ``source``.

    ``source`` is a preset name (random initialisation, see ``PRESETS``) or a local Hugging Face
    model directory written by ``save_pretrained``, whose config.json fixes the architecture.
    ``rel_pos_bias`` chooses the bias layout: ``"per_block"`` copies a shared table into every block
    (as the released fine-tuned models do), ``"shared"`` keeps one table, ``"auto"`` keeps the stored
    layout. ``num_classes=0`` gives a head-less encoder whose ``forward`` returns pooled features.
    """
    model, _ = load_encoder_with_info(
        source, img_size=img_size, drop_path_rate=drop_path_rate, global_pool=global_pool,
        rel_pos_bias=rel_pos_bias, num_classes=num_classes,
    )
    return model


def encoder_img_size(source: str, img_size: int | None = None) -> int:
    """Return the input resolution ``load_encoder(source, img_size=img_size)`` will use, without loading weights."""
    if img_size is not None:
        return int(img_size)
    if source in PRESETS:
        return PRESETS[source].img_size
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return arch_from_hf_config(read_hf_config(path)).img_size
    raise ValueError(
        f"encoder source {source!r} is neither a preset nor a Hugging Face model directory; "
        f"valid presets: {', '.join(sorted(PRESETS))}"
    )


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hex SHA-256 over the model's parameters and buffers (names, shapes and bytes), in key order."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
