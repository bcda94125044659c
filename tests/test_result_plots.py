"""Each plot kind writes a non-empty PNG and SVG from hand-made records and a small event file."""

from __future__ import annotations

import pytest
from torch.utils.tensorboard import SummaryWriter

from d2v_eval.cli import main
from d2v_eval.results import write_record
from test_result_tables import TINY, make_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_images(folder, name: str) -> None:
    png = folder / f"{name}.png"
    svg = folder / f"{name}.svg"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 1000
    assert "<svg" in svg.read_text()


def test_transfer_plot(tmp_path):
    records_dir = tmp_path / "records"
    for seed, top1 in enumerate([70.0, 72.0]):
        write_record(make_record(f"d{seed}", top1, benchmark="digits", split="test", arch=TINY, seed=seed), records_dir)
    write_record(make_record("c10", 95.0, benchmark="cifar10", split="test", arch=TINY), records_dir)
    write_record(make_record("lp", 60.0, benchmark="digits", split="test", arch=TINY, protocol="linear_probe"),
                 records_dir)

    assert main(["report", "--records_dir", str(records_dir), "--plot", "transfer", "--out", str(tmp_path)]) == 0
    _assert_images(tmp_path, "transfer")


def test_heatmap_plot(tmp_path, capsys):
    records_dir = tmp_path / "records"
    for lr in (1e-3, 2e-3):
        for layer_decay in (0.65, 0.75, 0.9):
            record = make_record(f"lr{lr}-ld{layer_decay}", 50 + 1e4 * lr + 10 * layer_decay, benchmark="digits",
                                 split="validation", role="validation", lr=lr)
            record["config"]["model"]["init_args"]["layer_decay"] = layer_decay
            write_record(record, records_dir)
    write_record(make_record("test-only", 99.0, benchmark="digits", split="test", lr=5e-3), records_dir)

    assert main(["report", "--records_dir", str(records_dir), "--plot", "heatmap", "--x", "model.lr",
                 "--y", "model.layer_decay", "--out", str(tmp_path)]) == 0
    _assert_images(tmp_path, "heatmap")

    assert main(["report", "--records_dir", str(records_dir), "--plot", "heatmap", "--x", "model.lr",
                 "--y", "model.missing_key", "--out", str(tmp_path)]) == 2
    assert "model.missing_key" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_curves_plot(tmp_path):
    log_dir = tmp_path / "tb" / "version_0"
    writer = SummaryWriter(str(log_dir))
    for step in range(20):
        writer.add_scalar("train/loss", 2.0 / (step + 1), step)
        if step % 5 == 4:
            writer.add_scalar("val/top1", 10.0 * step, step)
    writer.close()
    record = make_record("with-curves", 80.0, benchmark="digits", split="test", arch=TINY)
    record["log_dir"] = str(log_dir)
    write_record(record, tmp_path / "records")

    assert main(["report", "--records_dir", str(tmp_path / "records"), "--plot", "curves",
                 "--out", str(tmp_path)]) == 0
    _assert_images(tmp_path, "curves")
