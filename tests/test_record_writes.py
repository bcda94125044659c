"""Records are never lost: concurrent writers, existing files, unreadable files."""

from __future__ import annotations

import json
import logging
import multiprocessing

import pytest

from d2v_eval.results import read_records, write_record
from d2v_eval.results.records import REQUIRED_FIELDS, new_run_id, write_json_atomic

PROCESSES = 8
RECORDS_PER_PROCESS = 50


def _record(run_id: str, writer: int, index: int) -> dict:
    record = {name: None for name in REQUIRED_FIELDS}
    record.update(run_id=run_id, created_at="2026-01-01T00:00:00+00:00", split="test", benchmark="digits",
                  protocol="finetune", encoder={"source": "random-init:x"}, metrics={"top1": float(index)},
                  config={"writer": writer, "index": index})
    return record


def _write_many(records_dir: str, writer: int) -> list[str]:
    run_ids = []
    for index in range(RECORDS_PER_PROCESS):
        run_id = new_run_id()
        write_record(_record(run_id, writer, index), records_dir)
        run_ids.append(run_id)
    return run_ids


def test_concurrent_writers_keep_every_record(tmp_path):
    # fork: the children inherit the imported modules, so the test times writes, not imports.
    context = multiprocessing.get_context("fork")
    with context.Pool(PROCESSES) as pool:
        results = pool.starmap(_write_many, [(str(tmp_path), writer) for writer in range(PROCESSES)])

    expected = {run_id for run_ids in results for run_id in run_ids}
    assert len(expected) == PROCESSES * RECORDS_PER_PROCESS
    records = read_records(tmp_path)
    assert {record["run_id"] for record in records} == expected
    pairs = {(record["config"]["writer"], record["config"]["index"]) for record in records}
    assert len(pairs) == PROCESSES * RECORDS_PER_PROCESS
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_record_never_replaces(tmp_path):
    first = _record("same-id", 0, 1)
    path = write_record(first, tmp_path)
    with pytest.raises(FileExistsError, match="same-id"):
        write_record(_record("same-id", 0, 2), tmp_path)
    with pytest.raises(FileExistsError, match="left unchanged"):
        write_json_atomic(path, {"other": True}, overwrite=False)
    assert json.loads(path.read_text())["metrics"]["top1"] == 1.0
    assert not list(tmp_path.glob(".*.tmp"))


def test_unreadable_records_skipped(tmp_path, caplog):
    write_record(_record("good", 0, 0), tmp_path)
    (tmp_path / "broken.json").write_bytes(b"\xff\xfe not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "partial.json").write_text('{"run_id": "p"}')
    with caplog.at_level(logging.WARNING):
        records = read_records(tmp_path)
    assert [record["run_id"] for record in records] == ["good"]
    for name in ("broken.json", "list.json", "partial.json"):
        assert name in caplog.text
