"""Results: record schema, atomic writes, tolerant reads, tables, published references and plots."""

from d2v_eval.results.records import DEFAULT_RECORDS_DIR, read_records, write_json_atomic, write_record
from d2v_eval.results.recorder import ResultRecorder
from d2v_eval.results.references import REFERENCES
from d2v_eval.results.tables import runs_table, table1, transfer

__all__ = [
    "DEFAULT_RECORDS_DIR", "REFERENCES", "ResultRecorder", "read_records", "runs_table", "table1", "transfer",
    "write_json_atomic", "write_record",
]
