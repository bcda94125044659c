"""Tables built from result records (never edited by hand)."""

from __future__ import annotations


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def runs_table(records: list[dict]) -> str:
    """Markdown table with one row per record: benchmark, split, protocol, encoder, top-1, top-5, samples, date."""
    header = "| benchmark | split | protocol | encoder | top-1 (%) | top-5 (%) | samples | date | run |"
    lines = [header, "| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    for record in records:
        metrics = record.get("metrics", {})
        lines.append(
            "| " + " | ".join([
                str(record["benchmark"]), str(record["split"]), str(record["protocol"]),
                str(record["encoder"].get("source")), _fmt(metrics.get("top1")), _fmt(metrics.get("top5")),
                _fmt(record["num_samples"]), str(record["created_at"])[:19], str(record["run_id"]),
            ]) + " |"
        )
    return "\n".join(lines)
