"""Sweep summary: trials ranked by a validation metric, the best trial's test metric, a heatmap.

Trials are ranked on their validation record (``role: validation``). The test metric is shown
beside each row and reported for the best trial, but it never decides the ranking.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from d2v_eval.sweep.spec import SEED_KEY, format_value
from d2v_eval.sweep.trial import STATUS_FILE, read_json, trial_dir, trial_records, write_json_atomic

log = logging.getLogger(__name__)

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
HEATMAP_PNG = "heatmap.png"


def collect_rows(plan: dict) -> list[dict]:
    """Build one row per planned trial: state, overrides, validation and test metric, run id."""
    metric = plan["metric"]
    rows = []
    for trial in plan["trials"]:
        folder = trial_dir(plan, trial["trial_id"])
        status = read_json(folder / STATUS_FILE) or {}
        validation, test = trial_records(folder)
        rows.append({
            "trial_id": trial["trial_id"],
            "overrides": trial["overrides"],
            "state": status.get("state", "not started"),
            "exit_code": status.get("exit_code"),
            "val": (validation or {}).get("metrics", {}).get(metric),
            "test": (test or {}).get("metrics", {}).get(metric),
            "val_split": (validation or {}).get("split"),
            "test_split": (test or {}).get("split"),
            "run_id": (validation or test or {}).get("run_id"),
        })
    return rows


def rank_rows(rows: list[dict], mode: str) -> list[dict]:
    """Rows with a validation metric first, best first (``mode`` max or min); the others keep plan order."""
    scored = [row for row in rows if isinstance(row["val"], (int, float)) and math.isfinite(row["val"])]
    unscored = [row for row in rows if row not in scored]
    scored.sort(key=lambda row: row["val"], reverse=mode == "max")
    for rank, row in enumerate(scored, start=1):
        row["rank"] = rank
    for row in unscored:
        row["rank"] = None
    return scored + unscored


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def ranking_table(plan: dict, rows: list[dict]) -> str:
    """Markdown table: rank, trial, each swept key, state, validation and test metric."""
    keys = plan["swept_keys"]
    metric = plan["metric"]
    header = ["rank", "trial", *keys, "state", f"val {metric}", f"test {metric}"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [_fmt(row["rank"]), row["trial_id"]]
        cells += [format_value(row["overrides"][key]) if key in row["overrides"] else "-" for key in keys]
        state = row["state"] if row["exit_code"] in (0, None) else f"{row['state']} (exit {row['exit_code']})"
        cells += [state, _fmt(row["val"]), _fmt(row["test"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_groups(plan: dict, rows: list[dict]) -> str | None:
    """Markdown table of mean and standard deviation over seeds, per setting of the other keys."""
    if SEED_KEY not in plan["swept_keys"]:
        return None
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        setting = tuple((k, v) for k, v in row["overrides"].items() if k != SEED_KEY)
        groups.setdefault(setting, []).append(row)
    metric = plan["metric"]
    lines = [f"| setting | seeds done | val {metric} mean | val std | test {metric} mean | test std |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for setting, members in groups.items():
        vals = [r["val"] for r in members if r["val"] is not None]
        tests = [r["test"] for r in members if r["test"] is not None]
        label = ", ".join(f"{k}={format_value(v)}" for k, v in setting) or "(base)"
        lines.append(
            f"| {label} | {len(vals)}/{len(members)} | {_fmt(statistics.fmean(vals) if vals else None)} | "
            f"{_fmt(statistics.stdev(vals) if len(vals) > 1 else None)} | "
            f"{_fmt(statistics.fmean(tests) if tests else None)} | "
            f"{_fmt(statistics.stdev(tests) if len(tests) > 1 else None)} |"
        )
    return "\n".join(lines)


def write_heatmap(plan: dict, rows: list[dict], path: Path) -> Path | None:
    """Heatmap of the validation metric over the two heatmap keys (mean over the other axes).

    Drawn here with matplotlib rather than through a shared plotting module, so the sweep
    package depends on nothing but matplotlib.
    """
    keys = plan.get("heatmap")
    if not keys or len(keys) != 2:
        return None
    cells: dict[tuple, list[float]] = {}
    for row in rows:
        if row["val"] is None or not all(k in row["overrides"] for k in keys):
            continue
        cells.setdefault((row["overrides"][keys[0]], row["overrides"][keys[1]]), []).append(row["val"])
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted({x for x, _ in cells}, key=_sort_key)
    ys = sorted({y for _, y in cells}, key=_sort_key)
    grid = [[statistics.fmean(cells[(x, y)]) if (x, y) in cells else math.nan for x in xs] for y in ys]
    figure, axes = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.8 * len(ys) + 2))
    image = axes.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    axes.set_xticks(range(len(xs)), [format_value(x) for x in xs])
    axes.set_yticks(range(len(ys)), [format_value(y) for y in ys])
    axes.set_xlabel(keys[0])
    axes.set_ylabel(keys[1])
    for j, line in enumerate(grid):
        for i, value in enumerate(line):
            if not math.isnan(value):
                axes.text(i, j, f"{value:.1f}", ha="center", va="center", color="white", fontsize=8)
    figure.colorbar(image, ax=axes, label=f"validation {plan['metric']}")
    axes.set_title(f"sweep {plan['name']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def summarize(plan: dict) -> str:
    """Build the summary, write ``summary.md``, ``summary.json`` and the heatmap; return the Markdown."""
    sweep_dir = Path(plan["sweep_dir"])
    rows = rank_rows(collect_rows(plan), plan["mode"])
    best = next((row for row in rows if row["rank"] == 1), None)
    counts = {state: sum(row["state"] == state for row in rows) for state in dict.fromkeys(r["state"] for r in rows)}

    parts = [
        f"# Sweep {plan['name']}",
        "",
        f"{len(rows)} trials: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + ".",
        f"Ranked by validation {plan['metric']} ({plan['mode']}).",
        "",
        ranking_table(plan, rows),
    ]
    if best is not None:
        parts += ["", f"Best trial: {best['trial_id']} with validation {plan['metric']} {_fmt(best['val'])} "
                      f"(split {best['val_split']}); its test {plan['metric']}: {_fmt(best['test'])} "
                      f"(split {best['test_split']})."]
    else:
        parts += ["", "No trial has a validation record yet."]

    groups = seed_groups(plan, rows)
    if groups:
        parts += ["", "## Over seeds", "", groups]
    heatmap = write_heatmap(plan, rows, sweep_dir / HEATMAP_PNG)
    if heatmap is not None:
        parts += ["", f"Heatmap of validation {plan['metric']}: {heatmap}"]

    text = "\n".join(parts) + "\n"
    (sweep_dir / SUMMARY_MD).write_text(text)
    write_json_atomic(sweep_dir / SUMMARY_JSON, {"name": plan["name"], "metric": plan["metric"],
                                                 "mode": plan["mode"], "best": best, "rows": rows})
    return text
