"""Tables from hand-made records: Table 1 layout, seeds, best-by, comparability, CSV/LaTeX/JSON output."""

from __future__ import annotations

import csv
import io
import json
import logging
import re

import pytest

from d2v_eval.cli import main
from d2v_eval.results import read_records, write_record
from d2v_eval.results.formats import render
from d2v_eval.results.query import lookup, record_role
from d2v_eval.results.references import find_references
from d2v_eval.results.tables import table1, transfer

VIT_B = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4}


def make_record(run_id: str, top1: float, *, benchmark: str = "imagenet-1k", split: str = "validation",
                role: str = "test", protocol: str = "finetune", arch: dict = VIT_B, seed: int = 0,
                source: str = "facebook/data2vec-vision-base", input_size: int = 224, lr: float = 4e-3,
                created_at: str = "2026-01-01T00:00:00+00:00", tags=("demo",), sweep=None, trial=None) -> dict:
    """A record with the schema's fields and a LightningCLI-style resolved config."""
    return {
        "run_id": run_id, "created_at": created_at, "benchmark": benchmark, "split": split, "role": role,
        "num_samples": 50000, "protocol": protocol,
        "encoder": {"source": source, "format": "hf-dir", "sha256": "ab" * 32, "arch": arch},
        "metrics": {"top1": top1, "top5": 97.0, "loss": 0.7}, "world_size": 8, "global_batch_size": 1024,
        "seed": seed, "tags": list(tags), "sweep": sweep, "trial": trial,
        "config": {
            "model": {"class_path": "d2v_eval.FineTune", "init_args": {"lr": lr, "layer_decay": 0.65}},
            "data": {"benchmark": benchmark, "input_size": input_size, "hflip": 0.5},
            "trainer": {"max_epochs": 100},
        },
        "versions": {}, "git_commit": None, "duration_s": 1.0,
    }


def test_table1_layout_from_records():
    records = [make_record("run-b", 84.1)]
    table = table1(records)
    by_label = {row.label: row for row in table.rows}

    for reference in find_references(benchmark="imagenet-1k", protocol="finetune"):
        row = by_label[reference.method]
        column = table.columns.index(reference.arch)
        assert row.kind == "reference"
        assert row.cells[column].text == reference.text
        assert row.cells[column].kind == "reference"
    assert by_label["data2vec"].cells[0].text == "84.2"
    assert by_label["data2vec"].cells[1].text == "86.6"
    assert by_label["DINO"].cells[1].text == "–"

    this_run = by_label["this run"]
    assert this_run.kind == "measured"
    assert this_run.cells[0].text == "84.10"
    assert this_run.cells[0].run_ids == ["run-b"]
    assert this_run.cells[1].text == "not run"
    assert [row.label for row in table.rows][-1] == "this run"


def test_table1_ignores_validation_records():
    records = [make_record("run-v", 99.0, split="validation_from_train", role="validation")]
    this_run = table1(records).rows[-1]
    assert this_run.cells[0].text == "not run"


def test_mean_std_over_three_seeds():
    records = [make_record(f"seed-{seed}", top1, seed=seed) for seed, top1 in enumerate([84.0, 84.2, 84.4])]
    cell = table1(records).rows[-1].cells[0]
    assert cell.n == 3
    assert cell.value == pytest.approx(84.2)
    assert cell.std == pytest.approx(0.2)
    assert cell.text == "84.20 ± 0.20 (n=3)"
    assert sorted(cell.run_ids) == ["seed-0", "seed-1", "seed-2"]


def test_best_by_uses_validation_not_test():
    # Trial "good-val" wins on validation but loses on test: the cell must show its test score.
    records = [
        make_record("a-val", 80.0, split="validation_from_train", role="validation", sweep="s", trial="good-val"),
        make_record("a-test", 70.0, sweep="s", trial="good-val"),
        make_record("b-val", 60.0, split="validation_from_train", role="validation", sweep="s", trial="good-test"),
        make_record("b-test", 90.0, sweep="s", trial="good-test"),
    ]
    best = table1(records, best_by="top1").rows[-1].cells[0]
    assert best.text == "70.00"
    assert best.run_ids == ["a-test"]

    averaged = table1(records).rows[-1].cells[0]
    assert averaged.n == 2


def test_best_by_without_validation_stays_empty():
    cell = table1([make_record("only-test", 90.0)], best_by="top1").rows[-1].cells[0]
    assert cell.kind == "text"
    assert cell.text == "no validation top1"


def test_comparability_warning_on_resolution():
    records = [
        make_record("low-res", 80.0, input_size=224),
        make_record("high-res", 85.0, input_size=384, arch={**VIT_B, "embed_dim": 1024, "depth": 24}),
    ]
    table = table1(records)
    assert len(table.warnings) == 1
    assert table.warnings[0].startswith("resolution differs")
    assert "224 (runs low-res)" in table.warnings[0]
    assert "384 (runs high-res)" in table.warnings[0]

    same = table1([make_record("one", 80.0), make_record("two", 81.0)])
    assert same.warnings == []


def test_transfer_mean_and_group_by():
    records = [
        make_record("c10", 98.0, benchmark="cifar10", split="test", lr=1e-3),
        make_record("c100", 88.0, benchmark="cifar100", split="test", lr=1e-3),
        make_record("c10-hi", 97.0, benchmark="cifar10", split="test", lr=2e-3),
    ]
    table = transfer(records, group_by=["model.lr"])
    assert table.columns == ["cifar10 top-1 (%)", "cifar100 top-1 (%)", "mean"]
    by_label = {row.label: row for row in table.rows}
    low = by_label["facebook/data2vec-vision-base (finetune, model.lr=0.001)"]
    assert low.cells[2].text == "93.00"
    high = by_label["facebook/data2vec-vision-base (finetune, model.lr=0.002)"]
    assert high.cells[1].text == "not run"
    assert high.cells[2].text == "–"


def test_lookup_short_alias_and_role():
    record = make_record("r", 1.0)
    assert lookup(record, "model.lr") == 4e-3
    assert lookup(record, "config.model.init_args.lr") == 4e-3
    assert lookup(record, "data.input_size") == 224
    assert lookup(record, "encoder.source") == "facebook/data2vec-vision-base"
    legacy = {k: v for k, v in record.items() if k != "role"}
    assert record_role(legacy) == "test"  # imagenet-1k reports on its validation split
    assert record_role({**legacy, "benchmark": "digits"}) == "validation"
    assert record_role({**legacy, "split": "validation_from_train"}) == "validation"


def test_csv_parses():
    records = [make_record(f"s{seed}", 84.0 + seed, seed=seed) for seed in range(2)]
    text = render(table1(records), "csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["method", "ViT-B/16", "ViT-L/16", "source", "runs"]
    assert all(len(row) == len(rows[0]) for row in rows)
    this_run = rows[-1]
    assert this_run[0] == "this run"
    assert this_run[1] == "84.50 ± 0.71 (n=2)"
    assert "s0" in this_run[4]


def test_latex_balanced_with_booktabs():
    records = [make_record("run_1", 84.0, source="path/with_under%score")]
    text = render(transfer(records), "latex")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("%"))
    assert body.count(r"\toprule") == 1
    assert body.count(r"\midrule") >= 1
    assert body.count(r"\bottomrule") == 1
    assert body.count(r"\begin{tabular}") == body.count(r"\end{tabular}") == 1
    unescaped = re.sub(r"\\[{}]", "", body)
    assert unescaped.count("{") == unescaped.count("}")
    assert re.search(r"(?<!\\)[_%#]", body) is None
    columns = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", body).group(1))
    for line in body.splitlines():
        if line.endswith(r"\\"):
            assert len(re.findall(r"(?<!\\)&", line)) == columns - 1


def test_json_lists_run_ids():
    payload = json.loads(render(table1([make_record("run-j", 84.0)]), "json"))
    this_run = payload["rows"][-1]
    assert this_run["cells"][0]["run_ids"] == ["run-j"]
    assert payload["rows"][0]["kind"] == "reference"


def test_report_cli_filters_and_formats(tmp_path, capsys, caplog):
    write_record(make_record("old", 80.0, created_at="2025-06-01T00:00:00+00:00"), tmp_path)
    write_record(make_record("new", 84.0, created_at="2026-02-01T00:00:00+00:00", input_size=384), tmp_path)
    write_record(make_record("untagged", 10.0, tags=()), tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    assert main(["report", "--records_dir", str(tmp_path), "--table", "table1", "--tag", "demo",
                 "--since", "2026-01-01"]) == 0
    out = capsys.readouterr().out
    assert "| this run | 84.00 | not run | measured |" in out
    assert "new" in out

    with caplog.at_level(logging.WARNING):
        assert main(["report", "--records_dir", str(tmp_path), "--table", "table1", "--tag", "demo",
                     "--format", "csv"]) == 0
    assert "resolution differs" in caplog.text
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[-1][1] == "82.00 ± 2.83 (n=2)"

    assert main(["report", "--records_dir", str(tmp_path), "--until", "2025-06-01"]) == 0
    out = capsys.readouterr().out
    assert "old" in out
    assert "untagged" not in out

    assert main(["report", "--records_dir", str(tmp_path), "--since", "June"]) == 2
    assert "invalid date 'June'" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert len(read_records(tmp_path)) == 3


def test_table1_group_by_rows():
    records = [make_record("lr-low", 83.0, lr=1e-3), make_record("lr-high", 84.0, lr=4e-3)]
    labels = [row.label for row in table1(records, group_by=["model.lr"]).rows if row.kind == "measured"]
    assert labels == ["this run (model.lr=0.001)", "this run (model.lr=0.004)"]


def test_best_by_stored_validation_metrics():
    # A protocol may store its validation scores in the test record itself.
    first = make_record("stored-a", 70.0)
    first["validation_metrics"] = {"top1": 90.0}
    second = make_record("stored-b", 95.0)
    second["validation_metrics"] = {"top1": 50.0}
    cell = table1([first, second], best_by="top1").rows[-1].cells[0]
    assert cell.run_ids == ["stored-a"]
    assert cell.text == "70.00"
