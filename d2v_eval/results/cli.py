"""``d2v-eval report``: print tables and write plots built from the result records.

    d2v-eval report                                         # runs table of results/runs/
    d2v-eval report --table table1 --format latex           # data2vec Table 1 layout, booktabs
    d2v-eval report --table transfer --best-by top1         # best trial by validation top-1
    d2v-eval report --table transfer --group-by model.lr --tag demo --since 2026-01-01
    d2v-eval report --plot heatmap --x model.lr --y model.layer_decay --out plots/
    d2v-eval report --plot curves --protocol finetune --out plots/

Records are only read, never modified.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from d2v_eval.results.formats import FORMATS, render
from d2v_eval.results.query import RecordFilter, parse_time
from d2v_eval.results.records import DEFAULT_RECORDS_DIR, read_records
from d2v_eval.results import tables

log = logging.getLogger(__name__)

TABLES = ("runs", "table1", "transfer")
PLOT_KINDS = ("transfer", "heatmap", "curves")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2v-eval report", description="Print a table or write a plot built from result records.",
    )
    parser.add_argument("--records_dir", "--records-dir", default=DEFAULT_RECORDS_DIR,
                        help=f"folder of JSON result records (default: {DEFAULT_RECORDS_DIR})")
    parser.add_argument("--table", choices=TABLES, default="runs", help="table layout (default: runs)")
    parser.add_argument("--format", choices=FORMATS, default="markdown", help="output format (default: markdown)")
    parser.add_argument("--output", help="write the table to this file instead of stdout")
    parser.add_argument("--metric", default=None,
                        help="metric in the records' `metrics` (default: top1; transfer: each benchmark's standard metric)")
    parser.add_argument("--best-by", "--best_by", dest="best_by", metavar="METRIC",
                        help="fill each cell with the test score of the trial with the best validation METRIC")
    parser.add_argument("--group-by", "--group_by", dest="group_by", action="append", default=[], metavar="KEY",
                        help="split rows by a record or config key, e.g. model.lr (= config.model.init_args.lr); repeatable")

    filters = parser.add_argument_group("filters (repeat an option to accept several values)")
    filters.add_argument("--benchmark", action="append", default=[], help="keep records of this benchmark")
    filters.add_argument("--protocol", action="append", default=[], help="keep records of this protocol")
    filters.add_argument("--encoder", action="append", default=[], help="keep records whose encoder source contains this text")
    filters.add_argument("--tag", action="append", default=[], help="keep records carrying this tag")
    filters.add_argument("--since", help="keep records created at or after this ISO date or time (UTC)")
    filters.add_argument("--until", help="keep records created at or before this ISO date or time (UTC; a date includes its whole day)")

    plots = parser.add_argument_group("plots")
    plots.add_argument("--plot", choices=PLOT_KINDS, help="write this plot as PNG and SVG instead of a table")
    plots.add_argument("--out", default="plots", help="folder for the plot files (default: plots)")
    plots.add_argument("--x", help="heatmap: config key on the x axis, e.g. model.lr")
    plots.add_argument("--y", help="heatmap: config key on the y axis, e.g. model.layer_decay")
    plots.add_argument("--logdir", action="append", default=[],
                       help="curves: a TensorBoard log folder to plot besides the records' own log_dir; repeatable")
    plots.add_argument("--scalar", action="append", default=[],
                       help="curves: TensorBoard scalar tag to plot (default: train/loss and val/top1); repeatable")
    return parser


def record_filter(args: argparse.Namespace) -> RecordFilter:
    return RecordFilter(
        benchmarks=args.benchmark, protocols=args.protocol, encoders=args.encoder, tags=args.tag,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until, end_of_day=True) if args.until else None,
    )


def build_table(records: list[dict], args: argparse.Namespace) -> tables.Table:
    if args.table == "table1":
        options = {"benchmark": args.benchmark[0]} if len(args.benchmark) == 1 else {}
        if len(args.protocol) == 1:
            options["protocol"] = args.protocol[0]
        return tables.table1(records, metric=args.metric or "top1", best_by=args.best_by,
                             group_by=args.group_by, **options)
    if args.table == "transfer":
        return tables.transfer(records, metric=args.metric, best_by=args.best_by, group_by=args.group_by)
    return tables.runs(records)


def write_plot(records: list[dict], args: argparse.Namespace) -> list[Path]:
    from d2v_eval.results import plots

    if args.plot == "transfer":
        table = tables.transfer(records, metric=args.metric, best_by=args.best_by, group_by=args.group_by)
        return plots.plot_transfer(table, args.out)
    if args.plot == "heatmap":
        if not args.x or not args.y:
            raise ValueError("--plot heatmap needs --x KEY and --y KEY, e.g. --x model.lr --y model.layer_decay")
        return plots.plot_heatmap(records, args.x, args.y, args.out, metric=args.metric or "top1")
    runs = plots.curve_runs(records)
    runs.update({f"logdir {path}": path for path in args.logdir})
    if not runs:
        raise ValueError("no run with TensorBoard event files: the selected records name no existing log_dir; "
                         "pass a log folder with --logdir")
    return plots.plot_curves(runs, args.out, tags=args.scalar or plots.DEFAULT_SCALARS)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        records = record_filter(args).apply(read_records(args.records_dir))
        if not records:
            sys.stderr.write(f"no readable records in {args.records_dir} match the filters\n")
        if args.plot:
            for path in write_plot(records, args):
                sys.stdout.write(f"wrote {path}\n")
            return 0
        table = build_table(records, args)
    except ValueError as error:
        sys.stderr.write(f"d2v-eval report: {error}\n")
        return 2

    for warning in table.warnings:
        log.warning("comparability: %s", warning)
    text = render(table, args.format) if args.table != "runs" or args.format != "markdown" else tables.runs_table(records)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
        sys.stdout.write(f"wrote {args.output}\n")
    else:
        sys.stdout.write(text + "\n")
    return 0
