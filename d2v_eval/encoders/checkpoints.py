"""Safe reading of checkpoint files: safetensors first, ``torch.load(weights_only=True)`` otherwise.

No code path here calls ``torch.load`` with ``weights_only=False``. The only global allowed beyond
torch's own weights-only allow-list is ``argparse.Namespace``, which the original data2vec_vision and
BEiT training scripts store under ``args``.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]

# Globals a checkpoint may reference beyond torch's weights-only allow-list, by qualified name.
EXTRA_SAFE_GLOBALS = {"argparse.Namespace": argparse.Namespace}

# torch's UnpicklingError message names the rejected global as "GLOBAL module.name" (checked on torch 2.14.1).
_REJECTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UntrustedCheckpointError(ValueError):
    """A checkpoint's pickle references a Python global outside the allow-list; it was not loaded."""


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint file {path} is empty (0 bytes); re-download or re-save it")


def _untrusted(path: Path, names: list[str]) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"checkpoint file {path} references the Python global(s) {', '.join(names)}, which are not allowed: "
        "the file is not trusted and was not loaded. Only tensors, plain containers and argparse.Namespace "
        "are accepted; re-save the weights as a state dict (or safetensors) from a trusted environment"
    )


def read_safetensors(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Read all tensors and the string metadata of a safetensors file."""
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as error:
        raise ValueError(f"checkpoint file {path} is not a readable safetensors file: {error}") from error


def read_torch_checkpoint(path: str | Path, *, mmap: bool = False) -> Any:
    """Unpickle a PyTorch checkpoint with ``weights_only=True``, allowing ``argparse.Namespace`` as well.

    Zip-format files (``torch.save`` since torch 1.6) are scanned for globals before unpickling, so
    every disallowed global is named at once. Any other global raises :class:`UntrustedCheckpointError`.
    ``mmap=True`` maps tensor storage instead of reading it (zip-format files only).
    """
    path = Path(path)
    _check_file(path)
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile):
            # The scan rejects opcodes torch.load's unpickler never reaches; torch.load below reports the cause.
            found = []
        rejected = [name for name in found if name not in EXTRA_SAFE_GLOBALS]
        if rejected:
            raise _untrusted(path, rejected)

    try:
        with torch.serialization.safe_globals(list(EXTRA_SAFE_GLOBALS.values())):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as error:
        rejected = _REJECTED_GLOBAL.findall(str(error))
        if rejected:
            raise _untrusted(path, sorted(set(rejected))) from error
        raise ValueError(f"checkpoint file {path} is not a PyTorch checkpoint: {error}") from error
    # For files that are not checkpoints at all, torch's legacy reader raises any of these.
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise ValueError(
            f"checkpoint file {path} could not be read as a PyTorch checkpoint; it may be truncated or damaged: {error}"
        ) from error


def is_state_dict(obj: Any) -> bool:
    """Return whether ``obj`` is a non-empty flat ``{str: tensor}`` mapping."""
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())
    )


def read_state_dict(path: str | Path) -> StateDict:
    """Read a flat ``{name: tensor}`` mapping from a safetensors or PyTorch file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    loaded = read_torch_checkpoint(path)
    if not is_state_dict(loaded):
        raise ValueError(f"checkpoint file {path} does not contain a flat state dict of tensors")
    return loaded
