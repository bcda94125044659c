"""Plots of result records with matplotlib (Agg backend), each written as PNG and SVG.

- ``transfer``: bar chart of the transfer table (measured rows, error bars = sample std).
- ``heatmap``: a sweep's mean validation metric over two config keys.
- ``curves``: learning curves read from TensorBoard event files of selected runs.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

from d2v_eval.results.query import MISSING, format_value, lookup, metric_value, record_role  # noqa: E402
from d2v_eval.results.tables import Table  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_SCALARS = ("train/loss", "val/top1")


def save_figure(figure, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``figure`` as ``name.png`` and ``name.svg`` in ``out_dir``; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    # A fixed hash salt and no date make the SVG byte-identical when rebuilt from the same records.
    with matplotlib.rc_context({"svg.hashsalt": "d2v-eval"}):
        figure.savefig(paths[0], dpi=150, bbox_inches="tight")
        figure.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    return paths


def plot_transfer(table: Table, out_dir: str | Path, *, name: str = "transfer") -> list[Path]:
    """Grouped bars: one group per benchmark column, one bar per measured row, error bars = std.

    Published reference rows are drawn hatched and labelled "(published)".
    """
    columns = [column for column in table.columns if column != "mean"]
    rows = [row for row in table.rows if any(cell.value is not None for cell in row.cells[: len(columns)])]
    if not rows:
        raise ValueError("the transfer table has no measured or published values to plot; check the filters")
    figure, axes = plt.subplots(figsize=(max(5.0, 1.6 * len(columns) * max(1, len(rows)) ** 0.5), 4.0))
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        offset = (index - (len(rows) - 1) / 2) * width
        # Cells without a value ("not run") get no bar rather than a bar of height 0.
        present = [(column, cell) for column, cell in enumerate(row.cells[: len(columns)]) if cell.value is not None]
        is_reference = row.kind == "reference"
        label = row.label + (" (published)" if is_reference else "")
        axes.bar([column + offset for column, _ in present], [cell.value for _, cell in present], width,
                 yerr=[cell.std or 0.0 for _, cell in present], capsize=3, label=label,
                 hatch="//" if is_reference else None, alpha=0.6 if is_reference else 1.0)
        for column, cell in present:
            axes.annotate(f"{cell.value:.1f}", (column + offset, cell.value + (cell.std or 0.0)),
                          xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    axes.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    axes.set_ylabel("score (%)")
    axes.set_ylim(0, 105)
    axes.set_title(table.title)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=1, frameon=False)
    return save_figure(figure, out_dir, name)


def plot_heatmap(records: list[dict], x_key: str, y_key: str, out_dir: str | Path, *, metric: str = "top1",
                 name: str = "heatmap") -> list[Path]:
    """Mean validation ``metric`` for each (``x_key``, ``y_key``) value pair; pairs never run are grey.

    Only validation-role records count, so the heatmap never shows test scores.
    """
    cells: dict[tuple[str, str], list[float]] = {}
    for record in records:
        if record_role(record) != "validation":
            continue
        x_value, y_value, score = lookup(record, x_key), lookup(record, y_key), metric_value(record, metric)
        if x_value is MISSING or y_value is MISSING or score is None:
            continue
        cells.setdefault((x_value, y_value), []).append(score)
    if not cells:
        raise ValueError(
            f"no validation records with {x_key!r}, {y_key!r} and metric {metric!r}; "
            "run `d2v-eval validate` on the sweep's trials or check the keys with `report --table runs`"
        )
    x_values = sorted({x for x, _ in cells}, key=_sort_key)
    y_values = sorted({y for _, y in cells}, key=_sort_key)
    grid = [[float("nan")] * len(x_values) for _ in y_values]
    for (x_value, y_value), scores in cells.items():
        grid[y_values.index(y_value)][x_values.index(x_value)] = statistics.fmean(scores)

    figure, axes = plt.subplots(figsize=(1.2 * len(x_values) + 2.5, 0.8 * len(y_values) + 2.0))
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = axes.imshow(grid, cmap=colormap, aspect="auto", origin="lower")
    for row, y_value in enumerate(y_values):
        for column, x_value in enumerate(x_values):
            scores = cells.get((x_value, y_value))
            if scores:
                # Dark text on the light (high) end of viridis, white on the dark end.
                color = "black" if image.norm(grid[row][column]) > 0.6 else "white"
                axes.text(column, row, f"{statistics.fmean(scores):.1f}\nn={len(scores)}",
                          ha="center", va="center", fontsize=7, color=color)
    axes.set_xticks(range(len(x_values)), [format_value(v) for v in x_values])
    axes.set_yticks(range(len(y_values)), [format_value(v) for v in y_values])
    axes.set_xlabel(x_key)
    axes.set_ylabel(y_key)
    axes.set_title(f"validation {metric}")
    figure.colorbar(image, ax=axes, label=f"validation {metric}")
    return save_figure(figure, out_dir, name)


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def read_scalars(log_dir: str | Path, tags: tuple[str, ...] | list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """Steps and values of each of ``tags`` in the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    available = set(accumulator.Tags().get("scalars", []))
    curves = {}
    for tag in tags:
        if tag in available:
            events = accumulator.Scalars(tag)
            curves[tag] = ([event.step for event in events], [event.value for event in events])
    return curves


def plot_curves(runs: dict[str, str | Path], out_dir: str | Path, *, tags=DEFAULT_SCALARS,
                name: str = "curves") -> list[Path]:
    """Plot one panel per scalar tag and one line per run; ``runs`` maps a label to a TensorBoard log folder."""
    tags = list(tags)
    curves = {label: read_scalars(log_dir, tags) for label, log_dir in runs.items()}
    found = [tag for tag in tags if any(tag in by_tag for by_tag in curves.values())]
    if not found:
        raise ValueError(
            f"none of the scalars {tags} is in the event files of {sorted(map(str, runs.values()))}; "
            "choose tags with --scalar"
        )
    figure, axes_list = plt.subplots(1, len(found), figsize=(4.5 * len(found), 3.5), squeeze=False)
    for axes, tag in zip(axes_list[0], found):
        for label, by_tag in curves.items():
            if tag in by_tag:
                steps, values = by_tag[tag]
                axes.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        axes.set_title(tag)
        axes.set_xlabel("step")
        axes.legend(fontsize=7)
    return save_figure(figure, out_dir, name)


def curve_runs(records: list[dict]) -> dict[str, str]:
    """Label -> TensorBoard log folder for records that name an existing ``log_dir`` (one per run id)."""
    runs = {}
    for record in records:
        log_dir = record.get("log_dir")
        if not log_dir:
            continue
        if not Path(log_dir).is_dir():
            log.warning("run %s: log_dir %s not found; its curves are skipped", record["run_id"], log_dir)
            continue
        label = f"{record.get('protocol')} {record['run_id']}"
        runs.setdefault(label, log_dir)
    return runs
