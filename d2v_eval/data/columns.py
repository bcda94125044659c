"""Choice of the image and label columns of a Hugging Face dataset from its features."""

from __future__ import annotations

from datasets import ClassLabel, Features, Image, Value

INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _check_named(features: Features, name: str, kind: str, source: str) -> str:
    if name not in features:
        raise ValueError(
            f"{kind} column {name!r} ({source}) not found; available columns: {', '.join(features)}; "
            f"set data.{kind}_column to one of them"
        )
    return name


def _pick_one(candidates: list[str], features: Features, kind: str, what: str) -> str:
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"no {what} column found; available columns: {', '.join(features)}; "
            f"set data.{kind}_column to the {kind} column"
        )
    raise ValueError(
        f"several {what} columns: {', '.join(candidates)}; set data.{kind}_column to choose one "
        f"(available columns: {', '.join(features)})"
    )


def resolve_columns(
    features: Features,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    source: str = "requested",
) -> tuple[str, str]:
    """Return ``(image_column, label_column)`` for a dataset with ``features``.

    A name given here wins and must exist. Otherwise the image column is the only ``Image`` feature
    and the label column the only ``ClassLabel`` feature, falling back to an integer column named
    ``label``. Raises ``ValueError`` listing the available columns when a name is missing or the
    choice is ambiguous (e.g. CIFAR-100's ``fine_label`` and ``coarse_label``).
    """
    if image_column is not None:
        image = _check_named(features, image_column, "image", source)
    else:
        images = [name for name, feature in features.items() if isinstance(feature, Image)]
        image = _pick_one(images, features, "image", "Image")

    if label_column is not None:
        label = _check_named(features, label_column, "label", source)
    else:
        labels = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
        fallback = features.get("label")
        if not labels and isinstance(fallback, Value) and fallback.dtype in INTEGER_DTYPES:
            labels = ["label"]
        label = _pick_one(labels, features, "label", "ClassLabel")
    return image, label
