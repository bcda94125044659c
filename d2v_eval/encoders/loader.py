"""``load_encoder``: turn a source string (preset, hub id, directory or checkpoint file) into a timm ``Beit``."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Literal

import torch
from timm.models.beit import Beit

from d2v_eval.encoders.checkpoints import StateDict
from d2v_eval.encoders.presets import PRESETS, BeitArch, build_beit
from d2v_eval.encoders.resize import check_img_size, resize_position_tables
from d2v_eval.encoders.shapes import SHARED_TABLE, check_shapes
from d2v_eval.encoders.sources import PRETRAINING_ONLY_PREFIXES, Checkpoint, read_source

log = logging.getLogger(__name__)

RelPosBiasChoice = Literal["per_block", "shared", "auto"]
GlobalPool = Literal["avg", "token"]


@dataclasses.dataclass
class EncoderInfo:
    """Provenance of a loaded encoder, stored in every result record.

    ``dropped``: checkpoint tensors not loaded (pretraining-only, unused by this pooling, or a replaced
    head). ``reinitialised``: model tensors that kept their fresh initialisation. ``resized``: position
    tables interpolated to the requested resolution.
    """

    source: str
    format: str
    arch: BeitArch
    sha256: str | None = None
    weights_path: str | None = None
    dropped: list[str] = dataclasses.field(default_factory=list)
    reinitialised: list[str] = dataclasses.field(default_factory=list)
    resized: list[str] = dataclasses.field(default_factory=list)

    def as_record(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "sha256": self.sha256,
            "weights_path": self.weights_path,
            "arch": dataclasses.asdict(self.arch),
            "dropped": self.dropped,
            "reinitialised": self.reinitialised,
            "resized": self.resized,
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
    """Replace the shared relative position bias table by an identical copy in every block (in place).

    The shared key is removed. ``relative_position_index`` buffers are never loaded because timm rebuilds them.
    """
    table = state_dict.pop(SHARED_TABLE)
    for index in range(depth):
        state_dict[f"blocks.{index}.attn.relative_position_bias_table"] = table.clone()


def _drop_pretraining_only(state_dict: StateDict, info: EncoderInfo) -> None:
    dropped = sorted(key for key in state_dict if key.startswith(PRETRAINING_ONLY_PREFIXES))
    for key in dropped:
        state_dict.pop(key)
    if dropped:
        info.dropped.extend(dropped)
        log.info("dropped pretraining-only tensors: %s", ", ".join(dropped))


def _fit_heads(state_dict: StateDict, model: Beit, info: EncoderInfo, num_classes: int) -> None:
    """Drop or flag the pooling norms and the classifier so they match ``model`` (in place).

    A stored head and ``fc_norm`` load when the class count equals ``num_classes``; otherwise both are
    re-initialised with a warning. With ``num_classes=0`` the head is dropped and ``fc_norm`` loads.
    """
    model_keys = set(model.state_dict())
    stored_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else None
    head_keys = sorted(key for key in state_dict if key.startswith("head."))

    if num_classes == 0:
        for key in head_keys:
            state_dict.pop(key)
        info.dropped.extend(head_keys)
    elif stored_classes is not None and stored_classes != num_classes:
        replaced = head_keys + sorted(key for key in state_dict if key.startswith("fc_norm."))
        for key in replaced:
            state_dict.pop(key)
        info.dropped.extend(replaced)
        log.warning(
            "checkpoint head has %d classes but %d were requested: head and fc_norm are re-initialised",
            stored_classes, num_classes,
        )

    for name in ("norm", "fc_norm", "head"):
        stored = sorted(key for key in state_dict if key.startswith(name + "."))
        if stored and f"{name}.weight" not in model_keys:
            # timm makes `norm` an identity under mean pooling and `fc_norm` one under CLS pooling.
            for key in stored:
                state_dict.pop(key)
            info.dropped.extend(stored)
            log.info("dropped %s: this pooling does not use it", ", ".join(stored))
        elif not stored and f"{name}.weight" in model_keys:
            fresh = sorted(key for key in model_keys if key.startswith(name + "."))
            info.reinitialised.extend(fresh)
            if name == "norm":
                log.warning("the checkpoint has no final norm (as after fine-tuning with mean pooling), so "
                            "CLS pooling uses a freshly initialised norm")


def load_state_dict_strictly(model: Beit, state_dict: StateDict, allowed_missing: list[str], origin: str) -> None:
    """Load ``state_dict`` into ``model``; any missing (not allowed) or unexpected key is an error."""
    check_shapes(state_dict, {key: value.shape for key, value in model.state_dict().items()}, origin)
    result = model.load_state_dict(state_dict, strict=False)
    allowed = set(allowed_missing)
    missing = [k for k in result.missing_keys if k not in allowed]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"weights from {origin} do not match the architecture: "
            f"missing keys {_summarise_keys(missing)}, unexpected keys {_summarise_keys(unexpected)}"
        )


def _stored_shapes(arch: BeitArch, state_dict: StateDict) -> dict[str, torch.Size]:
    """Tensor shapes of ``arch`` as stored (its resolution and bias layout), built on the meta device."""
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    with torch.device("meta"):
        model = build_beit(arch, global_pool="token", num_classes=num_classes)
    return {key: value.shape for key, value in model.state_dict().items()}


def build_from_checkpoint(
    checkpoint: Checkpoint,
    *,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    global_pool: GlobalPool = "avg",
    rel_pos_bias: RelPosBiasChoice = "per_block",
    num_classes: int = 0,
) -> tuple[Beit, EncoderInfo]:
    """Build a ``Beit`` for the requested resolution, bias layout, pooling and head, and load ``checkpoint`` strictly."""
    arch = checkpoint.arch
    origin = str(checkpoint.weights_path or checkpoint.source)
    info = EncoderInfo(
        source=checkpoint.source, format=checkpoint.format, arch=arch, sha256=checkpoint.sha256,
        weights_path=None if checkpoint.weights_path is None else str(checkpoint.weights_path),
    )
    state_dict = dict(checkpoint.state_dict)
    _drop_pretraining_only(state_dict, info)
    check_shapes(state_dict, _stored_shapes(arch, state_dict), origin)

    target_size = arch.img_size if img_size is None else int(img_size)
    check_img_size(target_size, arch.patch_size)
    info.resized = resize_position_tables(state_dict, patch_size=arch.patch_size, img_size=target_size)

    target_layout = _target_rel_pos_bias(arch.rel_pos_bias, rel_pos_bias)
    if arch.rel_pos_bias == "shared" and target_layout == "per_block":
        expand_shared_rel_pos_bias(state_dict, arch.depth)
    target_arch = arch.replace(img_size=target_size, rel_pos_bias=target_layout)

    model = build_beit(target_arch, drop_path_rate=drop_path_rate, global_pool=global_pool, num_classes=num_classes)
    _fit_heads(state_dict, model, info, num_classes)
    load_state_dict_strictly(model, state_dict, info.reinitialised, origin)
    info.arch = target_arch
    return model, info


def load_encoder_with_info(
    source: str,
    *,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    global_pool: GlobalPool = "avg",
    rel_pos_bias: RelPosBiasChoice = "per_block",
    num_classes: int = 0,
    format: str | None = None,
    use_ema: bool = False,
) -> tuple[Beit, EncoderInfo]:
    """Like :func:`load_encoder`, and also return the :class:`EncoderInfo` provenance."""
    if global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool {global_pool!r} is invalid; choose 'avg' or 'token'")
    if rel_pos_bias not in ("per_block", "shared", "auto"):
        raise ValueError(f"rel_pos_bias {rel_pos_bias!r} is invalid; choose 'per_block', 'shared' or 'auto'")
    if num_classes < 0:
        raise ValueError(f"num_classes {num_classes} is negative; use 0 for a head-less encoder")

    if source in PRESETS and format in (None, "random-init"):
        arch = PRESETS[source]
        if img_size is not None:
            arch = arch.replace(img_size=int(img_size))
        if rel_pos_bias != "auto":
            arch = arch.replace(rel_pos_bias=rel_pos_bias)  # random weights: any layout can be built
        model = build_beit(arch, drop_path_rate=drop_path_rate, global_pool=global_pool, num_classes=num_classes)
        return model, EncoderInfo(source=f"random-init:{source}", format="random-init", arch=arch)

    checkpoint = read_source(source, format=format, use_ema=use_ema, img_size=img_size)
    return build_from_checkpoint(
        checkpoint, img_size=img_size, drop_path_rate=drop_path_rate, global_pool=global_pool,
        rel_pos_bias=rel_pos_bias, num_classes=num_classes,
    )


def load_encoder(
    source: str,
    *,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    global_pool: GlobalPool = "avg",
    rel_pos_bias: RelPosBiasChoice = "per_block",
    num_classes: int = 0,
    format: str | None = None,
    use_ema: bool = False,
) -> Beit:
    """Build a timm ``Beit`` from ``source`` and load its weights strictly.

    ``source`` is a preset name (random initialisation, see ``PRESETS``), a Hugging Face hub id
    such as ``facebook/data2vec-vision-base`` (resolved through huggingface_hub's cache), or a local
    ``save_pretrained`` directory. It may also be a checkpoint file: an original data2vec_vision /
    BEiT ``.pth``, a DeepSpeed model-states file, or a timm-layout state dict (optionally prefixed). ``format``
    (one of ``sources.FORMATS``) overrides the detected format; ``use_ema`` loads ``model_ema`` of an
    original checkpoint.

    ``img_size`` (pixels, a multiple of the patch size) resizes the position tables when it differs
    from the checkpoint's resolution. ``rel_pos_bias`` chooses the bias layout: ``"per_block"`` copies
    a shared table into every block (as the released fine-tuned models do), ``"shared"`` keeps one
    table, ``"auto"`` keeps the stored layout. ``num_classes=0`` gives a head-less encoder whose
    ``forward`` returns pooled features; a stored head loads when its class count equals ``num_classes``.
    """
    model, _ = load_encoder_with_info(
        source, img_size=img_size, drop_path_rate=drop_path_rate, global_pool=global_pool,
        rel_pos_bias=rel_pos_bias, num_classes=num_classes, format=format, use_ema=use_ema,
    )
    return model


def encoder_img_size(source: str, img_size: int | None = None) -> int:
    """Return the input resolution ``load_encoder(source, img_size=img_size)`` will use.

    Reads only what the architecture needs: config.json for hub ids and directories, the header of a
    safetensors file, or a memory-mapped PyTorch file.
    """
    if img_size is not None:
        return int(img_size)
    if source in PRESETS:
        return PRESETS[source].img_size
    return read_source(source, shapes_only=True).arch.img_size


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hex SHA-256 over the model's parameters and buffers (names, shapes and bytes), in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

