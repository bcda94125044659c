"""Hugging Face hub ids resolved through huggingface_hub's cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE apply)."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

# Weight files of a save_pretrained directory, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# "org/name", optionally "@revision"; names follow the hub's rules (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
HUB_PREFIX = "hf-hub:"


def parse_hub_id(source: str) -> tuple[str, str | None] | None:
    """Split ``org/name[@revision]`` (an optional ``hf-hub:`` prefix is allowed); None if it is not one."""
    source = source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source
    match = _HUB_ID.match(source)
    if match is None:
        return None
    return match.group("repo"), match.group("revision")


def _not_cached(repo_id: str, filename: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Hugging Face model {repo_id!r} ({filename}) is not in the local cache {constants.HF_HUB_CACHE} "
        "and the hub could not be reached (HF_HUB_OFFLINE is set or there is no network). Pre-download it on "
        f"a machine with network access with `hf download {repo_id}` using the same HF_HOME, or pass the "
        "path of a local directory written by save_pretrained instead"
    )


def _download(repo_id: str, filename: str, revision: str | None) -> Path:
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"Hugging Face model {repo_id!r} was not found on the hub (or is private/gated: log in with `hf auth login`)"
        ) from error
    except LocalEntryNotFoundError as error:
        raise _not_cached(repo_id, filename) from error


def fetch_hf_config(repo_id: str, revision: str | None = None) -> Path:
    """Return the local path of ``config.json`` of ``repo_id``, downloading it unless offline."""
    return _download(repo_id, "config.json", revision)


def fetch_hf_model(repo_id: str, revision: str | None = None) -> Path:
    """Return the snapshot directory of ``repo_id`` holding ``config.json`` and one weights file.

    Only the preferred weights file is fetched: ``model.safetensors``, else ``pytorch_model.bin``.
    """
    config_path = fetch_hf_config(repo_id, revision)
    offline_misses = []
    for filename in HF_WEIGHT_FILES:
        try:
            weights_path = Path(hf_hub_download(repo_id, filename, revision=revision))
        except LocalEntryNotFoundError:
            offline_misses.append(filename)
            continue
        except EntryNotFoundError:  # the repository has no such file
            continue
        if weights_path.parent != config_path.parent:
            raise FileNotFoundError(
                f"Hugging Face model {repo_id!r}: config.json and {filename} resolve to different snapshots "
                f"({config_path.parent} and {weights_path.parent}); pin a revision with {repo_id}@COMMIT"
            )
        return config_path.parent
    if offline_misses:
        raise _not_cached(repo_id, " or ".join(offline_misses))
    raise FileNotFoundError(
        f"Hugging Face model {repo_id!r} has no weights file; expected one of {', '.join(HF_WEIGHT_FILES)}"
    )
