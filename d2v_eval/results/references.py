"""Published numbers that tables show beside measured ones, each with its source.

Tables print these as labelled reference rows; they are never averaged with, or put in place of,
numbers measured from records.

NOTE: the values were transcribed from a summary of the papers, not re-read from the PDFs here.
Check them against the cited table before publishing a comparison.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Source:
    """Source of a published number: paper, arXiv id and table (``note`` for caveats)."""

    paper: str
    arxiv: str
    table: str
    note: str = ""

    def cite(self) -> str:
        text = f"{self.paper}, arXiv {self.arxiv}, {self.table}"
        return f"{text} ({self.note})" if self.note else text


@dataclasses.dataclass(frozen=True)
class Reference:
    """One published number.

    ``text`` is the value exactly as printed in the source (tables show it unchanged); ``value`` is
    the same number as a float for plots. ``arch`` uses the labels of ``query.arch_label``.
    """

    method: str
    arch: str
    benchmark: str
    protocol: str
    metric: str
    text: str
    source: Source

    @property
    def value(self) -> float:
        return float(self.text)


DATA2VEC_TABLE1 = Source(
    paper="Baevski et al. 2022, data2vec", arxiv="2202.03555", table="Table 1",
    note="ImageNet-1k top-1 after fine-tuning; data2vec pretrained 800 epochs (ViT-B), 1600 (ViT-L)",
)
IJEPA_TABLE1 = Source(
    paper="Assran et al. 2023, I-JEPA", arxiv="2301.08243", table="Table 1",
    note="secondary: quotes data2vec's linear probe, which the data2vec paper does not report",
)

# Methods in the order data2vec's Table 1 lists them; None where the table has no entry ("-").
_TABLE1_ROWS = (
    ("BEiT", "83.2", "85.2"),
    ("PeCo", "84.5", "86.5"),
    ("MoCo v3", "83.2", "84.1"),
    ("DINO", "82.8", None),
    ("MAE", "83.6", "85.9"),
    ("SimMIM", "83.8", None),
    ("iBOT", "83.8", None),
    ("MaskFeat", "84.0", "85.7"),
    ("data2vec", "84.2", "86.6"),
)

REFERENCES: tuple[Reference, ...] = tuple(
    Reference(method, arch, "imagenet-1k", "finetune", "top1", text, DATA2VEC_TABLE1)
    for method, base, large in _TABLE1_ROWS
    for arch, text in (("ViT-B/16", base), ("ViT-L/16", large))
    if text is not None
) + (
    Reference("data2vec", "ViT-L/16", "imagenet-1k", "linear_probe", "top1", "77.3", IJEPA_TABLE1),
)


def table1_methods() -> list[str]:
    """Methods of data2vec's Table 1 in the paper's order."""
    return [method for method, _, _ in _TABLE1_ROWS]


def find_references(*, benchmark: str | None = None, protocol: str | None = None,
                    method: str | None = None, arch: str | None = None) -> list[Reference]:
    """References matching every given field, in the order of ``REFERENCES``."""
    wanted = {"benchmark": benchmark, "protocol": protocol, "method": method, "arch": arch}
    return [
        ref for ref in REFERENCES
        if all(value is None or getattr(ref, name) == value for name, value in wanted.items())
    ]
