"""``d2v-eval report``: print tables built from the result records."""

from __future__ import annotations

import argparse
import sys

from d2v_eval.results.records import DEFAULT_RECORDS_DIR, read_records
from d2v_eval.results.tables import runs_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2v-eval report", description="Print a table built from result records.")
    parser.add_argument(
        "--records_dir", default=DEFAULT_RECORDS_DIR,
        help=f"folder of JSON result records (default: {DEFAULT_RECORDS_DIR})",
    )
    parser.add_argument("--table", choices=["runs"], default="runs", help="table layout (default: runs)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    records = read_records(args.records_dir)
    if not records:
        sys.stderr.write(f"no readable records in {args.records_dir}\n")
    sys.stdout.write(runs_table(records) + "\n")
    return 0
