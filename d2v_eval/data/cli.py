"""``d2v-eval data``: list the benchmark registry, or download a benchmark ahead of an offline job.

    d2v-eval data list                   # every registry entry: hub id, splits, columns, metric, notes
    d2v-eval data prepare cifar10        # download into the Hugging Face cache (HF_HOME)
"""

from __future__ import annotations

import argparse
import logging
import sys

from d2v_eval.data.benchmarks import BENCHMARKS, get_benchmark

log = logging.getLogger(__name__)


def registry_table() -> str:
    """Format the registry as a Markdown table, one row per benchmark, followed by each entry's notes."""
    header = "| name | hub id (config) | train / validation / test | image, label | classes | metric |"
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    for entry in BENCHMARKS.values():
        hub = entry.hub_id or "built locally"
        if entry.hub_config:
            hub += f" ({entry.hub_config})"
        splits = " / ".join(entry.splits.get(role) or "–" for role in ("train", "validation", "test"))
        columns = f"{entry.image_column or 'detected'}, {entry.label_column or 'detected'}"
        lines.append(f"| {entry.name} | {hub} | {splits} | {columns} | {entry.num_classes} | {entry.metric} |")
    lines.append("")
    for entry in BENCHMARKS.values():
        if entry.note:
            lines.append(f"- {entry.name}: {entry.note}.")
        if entry.unverified:
            lines.append(f"  Not verified: {entry.unverified}.")
    return "\n".join(lines)


def prepare(name: str) -> None:
    """Download benchmark ``name`` into the Hugging Face cache and log its split sizes."""
    from d2v_eval.data.datamodule import load_hub
    from d2v_eval.data.digits import digits_path

    entry = get_benchmark(name)
    if entry.hub_id is None:
        log.info("benchmark %s is built locally at %s", name, digits_path())
        return
    splits = load_hub(entry)
    sizes = ", ".join(f"{split} {len(data)}" for split, data in splits.items())
    log.info("benchmark %s (%s) is in the Hugging Face cache: %s", name, entry.hub_id, sizes)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="d2v-eval data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print the benchmark registry")
    prepare_parser = commands.add_parser(
        "prepare", help="download a benchmark into the Hugging Face cache (set HF_HOME to choose where)"
    )
    prepare_parser.add_argument("name", help=f"registry name: {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)

    if args.command == "list":
        sys.stdout.write(registry_table() + "\n")
        return 0
    try:
        prepare(args.name)
    except (ValueError, ConnectionError) as error:
        log.error("%s", error)
        return 1
    return 0
