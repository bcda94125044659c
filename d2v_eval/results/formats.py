"""Render a ``tables.Table`` as Markdown, CSV, LaTeX (booktabs) or JSON."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

from d2v_eval.results.tables import Table

FORMATS = ("markdown", "csv", "latex", "json")


def render(table: Table, fmt: str = "markdown") -> str:
    """Render ``table`` in ``fmt`` (one of ``FORMATS``); raise ValueError naming a wrong format."""
    renderers = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex, "json": to_json}
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](table)


def _header(table: Table) -> list[str]:
    return [table.row_header, *table.columns] + (["source"] if table.show_source else [])


def _row_values(table: Table, row) -> list[str]:
    return [row.label, *(cell.text for cell in row.cells)] + ([row.source] if table.show_source else [])


def _cell_runs(table: Table) -> list[str]:
    lines = []
    for row in table.rows:
        for column, cell in zip(table.columns, row.cells):
            if cell.run_ids:
                lines.append(f"{row.label} / {column}: {', '.join(cell.run_ids)}")
    return lines


def _markdown_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table, *, with_title: bool = True) -> str:
    """Markdown table; with ``with_title``, a title line above and notes, runs and warnings below."""
    header = _header(table)
    if table.align is not None:
        align = ["---:" if side == "right" else "---" for side in table.align]
    else:
        align = ["---"] + ["---:"] * len(table.columns) + (["---"] if table.show_source else [])
    lines = ["| " + " | ".join(map(_markdown_escape, header)) + " |", "| " + " | ".join(align) + " |"]
    for row in table.rows:
        lines.append("| " + " | ".join(_markdown_escape(value) for value in _row_values(table, row)) + " |")
    if not with_title:
        return "\n".join(lines)

    out = [f"**{table.title}**", "", *lines]
    if table.notes:
        out += ["", *(f"- {note}" for note in table.notes)]
    runs = _cell_runs(table)
    if runs:
        out += ["", "Runs behind measured cells:", "", *(f"- {line}" for line in runs)]
    if table.warnings:
        out += ["", "**Comparability warnings** (cells side by side differ in a setting that changes the number):",
                "", *(f"- {warning}" for warning in table.warnings)]
    return "\n".join(out)


def to_csv(table: Table) -> str:
    """Render CSV: the header, one line per table row, and a ``runs`` column with the cells' run ids.

    Tables without run ids in their cells (the runs table, whose rows are records) have no ``runs`` column.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    with_runs = any(cell.run_ids for row in table.rows for cell in row.cells)
    writer.writerow([*_header(table), "runs"] if with_runs else _header(table))
    for row in table.rows:
        runs = "; ".join(
            f"{column}: {' '.join(cell.run_ids)}" for column, cell in zip(table.columns, row.cells) if cell.run_ids
        )
        writer.writerow([*_row_values(table, row), runs] if with_runs else _row_values(table, row))
    return buffer.getvalue().rstrip("\n")


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters; ``±`` and ``–`` become math/text commands."""
    escaped = "".join(LATEX_SPECIALS.get(char, char) for char in text)
    return escaped.replace("±", r"$\pm$").replace("–", "--")


def to_latex(table: Table) -> str:
    """Render a booktabs ``tabular`` (``\\toprule``, ``\\midrule``, ``\\bottomrule``); notes and warnings as comments.

    A ``\\midrule`` separates published reference rows from measured rows.
    """
    header = _header(table)
    if table.align is not None:
        spec = "".join("r" if side == "right" else "l" for side in table.align)
    else:
        spec = "l" + "r" * len(table.columns) + ("l" if table.show_source else "")
    lines = [f"% {latex_escape(table.title)}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(value) for value in header) + r" \\", r"\midrule"]
    previous_kind = None
    for row in table.rows:
        if previous_kind is not None and row.kind != previous_kind:
            lines.append(r"\midrule")
        previous_kind = row.kind
        lines.append(" & ".join(latex_escape(value) for value in _row_values(table, row)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% note: {note}" for note in table.notes]
    lines += [f"% runs: {line}" for line in _cell_runs(table)]
    lines += [f"% comparability warning: {warning}" for warning in table.warnings]
    return "\n".join(lines)


def to_json(table: Table) -> str:
    """JSON with every cell's text, kind, mean, std, n, run ids and source, plus notes and warnings."""
    return json.dumps(dataclasses.asdict(table), indent=2)
