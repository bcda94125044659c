"""Result records: one JSON file per (run, split), written atomically and read tolerantly."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_RECORDS_DIR = "results/runs"
REQUIRED_FIELDS = (
    "run_id", "created_at", "benchmark", "split", "num_samples", "protocol", "encoder", "metrics",
    "world_size", "global_batch_size", "seed", "config", "versions", "git_commit", "duration_s",
)


def new_run_id() -> str:
    """Unique, time-sortable run id: UTC timestamp plus 8 random hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def write_json_atomic(path: str | Path, payload: dict, *, overwrite: bool = True) -> Path:
    """Write ``payload`` as JSON to ``path`` so that readers see the whole file or none of it.

    The data goes to a hidden temporary file in the same folder, is flushed to disk, then renamed
    (``overwrite=True``) or hard-linked into place (``overwrite=False``). A hard link fails when ``path``
    exists, so with ``overwrite=False`` two concurrent writers of one path never clobber each other:
    the second one gets ``FileExistsError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=2, sort_keys=True, default=str)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        if overwrite:
            os.replace(temp_name, path)
        else:
            _link_exclusive(temp_name, path)
    finally:
        Path(temp_name).unlink(missing_ok=True)
    return path


def _link_exclusive(temp_name: str, path: Path) -> None:
    try:
        os.link(temp_name, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; it was left unchanged") from None
    except OSError as error:
        # NOTE: filesystems without hard links (some network and FUSE mounts) fall back to a rename
        # after an existence check, which a writer racing on the same path could still overwrite.
        log.debug("hard link into %s failed (%s); falling back to rename", path, error)
        if path.exists():
            raise FileExistsError(f"{path} already exists; it was left unchanged") from None
        os.replace(temp_name, path)


def write_record(record: dict, records_dir: str | Path = DEFAULT_RECORDS_DIR) -> Path:
    """Write one record as ``<run_id>-<split>.json`` in ``records_dir``; return its path.

    Raises ``FileExistsError`` rather than replacing an existing record, also when another process
    creates the same file at the same moment.
    """
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"record is missing fields {missing}")
    path = Path(records_dir) / f"{record['run_id']}-{record['split']}.json"
    if path.exists():
        raise FileExistsError(f"record {path} already exists; run ids must be unique")
    return write_json_atomic(path, record, overwrite=False)


def read_records(records_dir: str | Path = DEFAULT_RECORDS_DIR) -> list[dict]:
    """Read every record in ``records_dir``, oldest first.

    A file that is not valid JSON, not an object, or lacks required fields is skipped with a warning
    naming it. Hidden files (temporary files of writes in progress) are ignored.
    """
    records = []
    folder = Path(records_dir)
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            log.warning("skipping unreadable record %s: %s", path, error)
            continue
        if not isinstance(record, dict):
            log.warning("skipping record %s: it contains a JSON %s, not an object", path, type(record).__name__)
            continue
        missing = [name for name in REQUIRED_FIELDS if name not in record]
        if missing:
            log.warning("skipping record %s: missing fields %s", path, ", ".join(missing))
            continue
        record["_path"] = str(path)
        records.append(record)
    records.sort(key=lambda r: (str(r.get("created_at")), str(r.get("run_id"))))
    return records
