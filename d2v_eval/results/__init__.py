"""Results: record schema, atomic writes, tolerant reads and tables."""

from d2v_eval.results.records import DEFAULT_RECORDS_DIR, read_records, write_json_atomic, write_record
from d2v_eval.results.recorder import ResultRecorder
from d2v_eval.results.tables import runs_table

__all__ = ["DEFAULT_RECORDS_DIR", "ResultRecorder", "read_records", "runs_table", "write_json_atomic", "write_record"]
