"""Tables built from result records (never edited by hand): runs, data2vec's Table 1, transfer.

Every measured cell keeps the run ids of the records behind it. Published numbers come from
``references.py`` and sit in rows of their own, labelled with their source.
"""

from __future__ import annotations

import dataclasses
import statistics

from d2v_eval.data.benchmarks import BENCHMARKS
from d2v_eval.results.query import (
    MISSING, arch_label, format_value, lookup, metric_value, record_role, select_test_records,
)
from d2v_eval.results.references import Reference, find_references, table1_methods

TABLE1_ARCHS = ("ViT-B/16", "ViT-L/16")
METRIC_LABELS = {"top1": "top-1 (%)", "top5": "top-5 (%)", "mean_per_class": "mean per-class acc. (%)"}

# Settings that change the number: cells put side by side that differ in one get a warning.
# Keys are ``query.lookup`` keys; augmentation combines every key that is set.
COMPARABILITY_SETTINGS: dict[str, tuple[str, ...]] = {
    "resolution": ("data.input_size", "model.img_size"),
    "pooling": ("model.pooling", "model.global_pool"),
    "epochs": ("trainer.max_epochs",),
    "augmentation": (
        "data.hflip", "data.scale", "data.auto_augment", "data.color_jitter", "data.re_prob",
        "data.interpolation", "model.mixup", "model.cutmix", "model.mixup_alpha", "model.cutmix_alpha",
        "model.mixup_prob", "model.mixup_switch_prob", "model.mixup_mode",
    ),
    "global batch": ("global_batch_size",),
}
# Pooling of protocols that take no pooling argument: FineTune always averages the patch tokens.
PROTOCOL_POOLING = {"finetune": "avg"}


@dataclasses.dataclass
class Cell:
    """One table cell. ``kind`` is ``measured`` (mean of records), ``reference`` (published) or ``text``.

    ``value`` is the mean, ``std`` the sample standard deviation (None for n < 2), ``n`` the number of
    records averaged, ``run_ids`` their run ids; ``source`` cites a reference value.
    """

    text: str
    kind: str = "text"
    value: float | None = None
    std: float | None = None
    n: int = 0
    run_ids: list[str] = dataclasses.field(default_factory=list)
    source: str | None = None


@dataclasses.dataclass
class Row:
    """A table row; ``kind`` is ``measured`` or ``reference``, ``source`` its citation or ``measured``."""

    label: str
    cells: list[Cell]
    kind: str = "measured"
    source: str = "measured"


@dataclasses.dataclass
class Table:
    """A rendered-format-independent table: header labels, rows, footnotes and comparability warnings."""

    title: str
    row_header: str
    columns: list[str]
    rows: list[Row]
    notes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    show_source: bool = True
    # Markdown alignment per column (``left``/``right``); None right-aligns every value column.
    align: list[str] | None = None


def measured_cell(records: list[dict], metric: str, *, digits: int = 2, empty: str = "not run") -> Cell:
    """Mean ± sample standard deviation of ``metric`` over ``records``, with n and the run ids."""
    pairs = [(metric_value(record, metric), record["run_id"]) for record in records]
    pairs = [(value, run_id) for value, run_id in pairs if value is not None]
    if not pairs:
        return Cell(empty if not records else f"no {metric}")
    values = [value for value, _ in pairs]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    text = f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"
    return Cell(text, "measured", mean, std, len(values), [run_id for _, run_id in pairs])


def reference_cell(reference: Reference | None) -> Cell:
    if reference is None:
        return Cell("–")
    return Cell(reference.text, "reference", reference.value, source=reference.source.cite())


def short_citation(reference: Reference) -> str:
    return f"published: arXiv {reference.source.arxiv}, {reference.source.table}"


def reference_notes(rows: list[Row], references: list[Reference]) -> list[str]:
    """Build one note with the full citation of each source that a reference row of ``rows`` cites."""
    shown = {row.source for row in rows if row.kind == "reference"}
    sources = {ref.source.cite(): short_citation(ref) for ref in references}
    return [f"Published rows: {cite}." for cite, short in sources.items() if short in shown]


def setting_value(record: dict, setting: str) -> str:
    """Text of one comparability setting of ``record`` (``default`` where no key of it is set)."""
    keys = COMPARABILITY_SETTINGS[setting]
    if setting == "augmentation":
        parts = [f"{key.split('.')[-1]}={format_value(lookup(record, key))}" for key in keys
                 if lookup(record, key) is not MISSING]
        return ", ".join(parts) if parts else "default"
    for key in keys:
        value = lookup(record, key)
        if value is not MISSING and value is not None:
            return format_value(value)
    if setting == "pooling" and record.get("protocol") in PROTOCOL_POOLING:
        return PROTOCOL_POOLING[record["protocol"]]
    return "default"


def comparability_warnings(records: list[dict], *, max_ids: int = 3) -> list[str]:
    """Build one warning per setting in which ``records`` (the records behind cells side by side) differ.

    Each warning lists every value with the runs that have it, e.g.
    ``resolution differs: 16 (runs a); 224 (runs b, c)``.
    """
    warnings = []
    for setting in COMPARABILITY_SETTINGS:
        runs_by_value: dict[str, list[str]] = {}
        for record in records:
            runs_by_value.setdefault(setting_value(record, setting), []).append(str(record["run_id"]))
        if len(runs_by_value) < 2:
            continue
        parts = []
        for value, run_ids in sorted(runs_by_value.items()):
            shown = ", ".join(run_ids[:max_ids]) + (f" +{len(run_ids) - max_ids} more" if len(run_ids) > max_ids else "")
            parts.append(f"{value} (runs {shown})")
        warnings.append(f"{setting} differs: " + "; ".join(parts))
    return warnings


def group_label(record: dict, group_by: list[str]) -> tuple[str, ...]:
    return tuple(f"{key}={format_value(lookup(record, key))}" for key in group_by)


def _records_behind(rows: list[Row], by_run: dict[str, dict]) -> list[dict]:
    run_ids = [run_id for row in rows for cell in row.cells for run_id in cell.run_ids]
    return [by_run[run_id] for run_id in dict.fromkeys(run_ids) if run_id in by_run]


def _common_notes(records: list[dict], best_by: str | None) -> list[str]:
    notes = []
    random_init = sorted({r["encoder"].get("source") for r in records if r["encoder"].get("format") == "random-init"})
    if random_init:
        notes.append(
            "Random-init encoders (" + ", ".join(map(str, random_init)) + "): these numbers check the "
            "pipeline and say nothing about pretrained weights."
        )
    notes.append("Measured cells: mean over records; with n > 1, ± is the sample standard deviation.")
    if best_by:
        notes.append(f"Each measured cell is the test score of the trial with the best validation {best_by}.")
    return notes


def table1(records: list[dict], *, benchmark: str = "imagenet-1k", protocol: str = "finetune",
           metric: str = "top1", best_by: str | None = None, group_by: list[str] | None = None) -> Table:
    """Build data2vec's Table 1 layout: methods x (ViT-B/16, ViT-L/16), published rows then "this run" rows.

    Measured rows take the ``benchmark``/``protocol`` records, one row per ``group_by`` value
    combination; a cell without records reads "not run".
    """
    group_by = list(group_by or [])
    references = find_references(benchmark=benchmark, protocol=protocol)
    rows = []
    for method in table1_methods():
        by_arch = {ref.arch: ref for ref in references if ref.method == method and ref.metric == metric}
        if by_arch:
            cells = [reference_cell(by_arch.get(arch)) for arch in TABLE1_ARCHS]
            rows.append(Row(method, cells, "reference", short_citation(next(iter(by_arch.values())))))

    chosen = [r for r in records if r.get("benchmark") == benchmark and r.get("protocol") == protocol]
    in_layout = [r for r in chosen if arch_label(r) in TABLE1_ARCHS]
    groups: dict[tuple, list[dict]] = {}
    for record in in_layout:
        groups.setdefault(group_label(record, group_by), []).append(record)
    for labels in sorted(groups) or [()]:
        group = groups.get(labels, [])
        cells = []
        for arch in TABLE1_ARCHS:
            selection = select_test_records([r for r in group if arch_label(r) == arch], best_by=best_by)
            cells.append(measured_cell(selection.records, metric, empty=selection.note or "not run"))
        label = "this run" + (f" ({', '.join(labels)})" if labels else "")
        rows.append(Row(label, cells))

    notes = reference_notes(rows, references) + _common_notes(chosen, best_by)
    other_archs = sorted({arch_label(r) for r in chosen} - set(TABLE1_ARCHS))
    if other_archs:
        notes.append(f"Records of other architectures are not in this layout: {'; '.join(other_archs)}.")
    by_run = {r["run_id"]: r for r in in_layout}
    measured_rows = [row for row in rows if row.kind == "measured"]
    title = f"Table 1 layout: {benchmark} {METRIC_LABELS.get(metric, metric)}, protocol {protocol}"
    return Table(title, "method", list(TABLE1_ARCHS), rows, notes,
                 comparability_warnings(_records_behind(measured_rows, by_run)))


def _benchmark_order(names: set[str]) -> list[str]:
    registered = [name for name in BENCHMARKS if name in names]
    return registered + sorted(names - set(registered))


def benchmark_metric(benchmark: str) -> str:
    """Return the standard metric of ``benchmark`` from the registry (``top1`` for unregistered benchmarks)."""
    entry = BENCHMARKS.get(benchmark)
    return entry.metric if entry is not None else "top1"


def transfer(records: list[dict], *, metric: str | None = None, best_by: str | None = None,
             group_by: list[str] | None = None, with_references: bool = True) -> Table:
    """Encoders x benchmarks with each benchmark's standard metric (or ``metric``) and the row mean.

    Rows are (encoder source, protocol, ``group_by`` values). The mean is shown only for rows with
    every benchmark measured. Published numbers for the same benchmarks follow as reference rows.
    """
    group_by = list(group_by or [])
    benchmarks = _benchmark_order({str(r.get("benchmark")) for r in records})
    metrics = {name: metric or benchmark_metric(name) for name in benchmarks}
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (str(record["encoder"].get("source")), str(record.get("protocol")), *group_label(record, group_by))
        groups.setdefault(key, []).append(record)

    rows = []
    for key in sorted(groups):
        cells = []
        for name in benchmarks:
            in_cell = [r for r in groups[key] if str(r.get("benchmark")) == name]
            selection = select_test_records(in_cell, best_by=best_by)
            cells.append(measured_cell(selection.records, metrics[name], empty=selection.note or "not run"))
        if benchmarks and all(cell.kind == "measured" for cell in cells):
            cells.append(Cell(f"{statistics.fmean(cell.value for cell in cells):.2f}", "measured"))
        else:
            cells.append(Cell("–"))
        source, protocol, *labels = key
        label = f"{source} ({protocol}" + "".join(f", {text}" for text in labels) + ")"
        rows.append(Row(label, cells))

    protocols = {str(r.get("protocol")) for r in records}
    if with_references:
        for ref_key, refs in _references_by_row(benchmarks, protocols).items():
            method, arch, protocol = ref_key
            by_benchmark = {ref.benchmark: ref for ref in refs}
            cells = [reference_cell(by_benchmark.get(name)) for name in benchmarks] + [Cell("–")]
            rows.append(Row(f"{method} {arch} ({protocol})", cells, "reference", short_citation(refs[0])))

    columns = [f"{name} {METRIC_LABELS.get(metrics[name], metrics[name])}" for name in benchmarks] + ["mean"]
    cited = [ref for refs in _references_by_row(benchmarks, protocols).values() for ref in refs] if with_references else []
    notes = reference_notes(rows, cited) + _common_notes(records, best_by)
    notes.append("The mean is shown only where every benchmark of the row is measured.")
    by_run = {r["run_id"]: r for r in records}
    measured_rows = [row for row in rows if row.kind == "measured"]
    return Table("Transfer: encoders x benchmarks", "encoder (protocol)", columns, rows, notes,
                 comparability_warnings(_records_behind(measured_rows, by_run)))


def _references_by_row(benchmarks: list[str], protocols: set[str]) -> dict[tuple, list[Reference]]:
    by_row: dict[tuple, list[Reference]] = {}
    for name in benchmarks:
        for ref in find_references(benchmark=name):
            if ref.protocol in protocols and ref.metric == benchmark_metric(name):
                by_row.setdefault((ref.method, ref.arch, ref.protocol), []).append(ref)
    return by_row


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def runs(records: list[dict]) -> Table:
    """Build a table with one row per record: benchmark, split, role, protocol, encoder, top-1, top-5, samples, date, run id."""
    rows = []
    for record in records:
        metrics = record.get("metrics", {})
        values = [
            record["split"], record_role(record), record["protocol"], record["encoder"].get("source"),
            _fmt(metrics.get("top1")), _fmt(metrics.get("top5")), _fmt(record["num_samples"]),
            str(record["created_at"])[:19], record["run_id"],
        ]
        rows.append(Row(str(record["benchmark"]), [Cell(str(value)) for value in values]))
    columns = ["split", "role", "protocol", "encoder", "top-1 (%)", "top-5 (%)", "samples", "date", "run"]
    align = ["left"] * 5 + ["right"] * 3 + ["left"] * 2
    return Table("Runs", "benchmark", columns, rows, show_source=False, align=align)


def runs_table(records: list[dict]) -> str:
    """Markdown table with one row per record: benchmark, split, protocol, encoder, top-1, top-5, samples, date."""
    from d2v_eval.results.formats import to_markdown

    return to_markdown(runs(records), with_title=False)
