"""Safe reading of checkpoint files: safetensors first, ``torch.load(weights_only=True)`` otherwise."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> StateDict:
    """Read a flat ``{name: tensor}`` mapping from a safetensors or PyTorch file.

    PyTorch files are opened with ``weights_only=True``: a pickle that names any global outside
    torch's allow-list is rejected, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint file {path} is empty")

    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"checkpoint file {path} is not a readable safetensors file: {error}") from error

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        raise ValueError(f"checkpoint file {path} could not be read as a PyTorch checkpoint: {error}") from error
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"checkpoint file {path} does not hold a flat state dict of tensors")
    return loaded
