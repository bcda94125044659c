"""``d2v-eval convert``: write any encoder source as one timm-layout safetensors file.

    d2v-eval convert facebook/data2vec-vision-base base.safetensors
    d2v-eval convert checkpoint-799.pth d2v-large.safetensors --use-ema

The file keeps the checkpoint's resolution and bias layout. The architecture goes into the
safetensors metadata (``d2v_eval.arch``, JSON), so ``load_encoder(OUT)`` needs no other file. It
gives the same outputs as ``load_encoder(SOURCE)`` with the same arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from d2v_eval.encoders.sources import ARCH_METADATA_KEY, FORMATS, PRETRAINING_ONLY_PREFIXES, read_source

log = logging.getLogger(__name__)


def convert(source: str, out: str | Path, *, format: str | None = None, use_ema: bool = False) -> dict:
    """Convert ``source`` to a timm-layout safetensors file at ``out`` (written atomically); return its metadata."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output {out} must end in .safetensors")
    checkpoint = read_source(source, format=format, use_ema=use_ema)
    state_dict = {
        key: tensor.contiguous()
        for key, tensor in checkpoint.state_dict.items()
        if not key.startswith(PRETRAINING_ONLY_PREFIXES)
    }
    dropped = sorted(set(checkpoint.state_dict) - set(state_dict))
    if dropped:
        log.info("dropped pretraining-only tensors: %s", ", ".join(dropped))

    metadata = {
        "format": "pt",
        ARCH_METADATA_KEY: json.dumps(dataclasses.asdict(checkpoint.arch)),
        "d2v_eval.source": source,
        "d2v_eval.source_format": checkpoint.format,
        "d2v_eval.source_sha256": checkpoint.sha256 or "",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(state_dict, tmp_name, metadata=metadata)
        os.replace(tmp_name, out)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return metadata


def main(argv: list[str] | None = None) -> int:
    """Run ``d2v-eval convert SOURCE OUT.safetensors``; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="d2v-eval convert",
        description="Write an encoder checkpoint (hub id, save_pretrained directory, original .pth, DeepSpeed "
        "file or state dict) as timm-layout safetensors with its architecture in the metadata.",
    )
    parser.add_argument("source", help="encoder source, as accepted by --model.init_args.encoder")
    parser.add_argument("out", help="output file, ending in .safetensors")
    parser.add_argument("--format", choices=FORMATS, default=None, help="skip format detection (default: detect)")
    parser.add_argument("--use-ema", action="store_true", help="take model_ema of an original training checkpoint")
    args = parser.parse_args(argv)
    try:
        metadata = convert(args.source, args.out, format=args.format, use_ema=args.use_ema)
    except (ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"d2v-eval convert: error: {error}\n")
        return 2
    arch = json.loads(metadata[ARCH_METADATA_KEY])
    sys.stdout.write(
        f"wrote {args.out} from {metadata['d2v_eval.source_format']} source {args.source}: "
        f"embed_dim {arch['embed_dim']}, depth {arch['depth']}, {arch['img_size']} px, "
        f"rel_pos_bias {arch['rel_pos_bias']}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
