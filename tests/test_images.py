"""Every PIL mode becomes 8-bit RGB with its content intact."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from d2v_eval.data import ImageClassificationData, to_rgb


def _modes() -> dict[str, Image.Image]:
    gradient = np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 8:, 3] = 255  # left half fully transparent
    palette = Image.fromarray(gradient, mode="L").convert("P")
    palette.info["transparency"] = 0
    return {
        "L": Image.fromarray(gradient, mode="L"),
        "LA": Image.fromarray(gradient, mode="L").convert("LA"),
        "P": palette,
        "RGBA": Image.fromarray(rgba, mode="RGBA"),
        "CMYK": Image.fromarray(gradient, mode="L").convert("CMYK"),
        "I;16": Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 4 + 1000),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_mode_becomes_rgb_tensor(mode):
    image = _modes()[mode]
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"

    data = ImageClassificationData("digits", input_size=16, num_workers=0)
    tensor = data.build_transform(is_training=False)(rgb)
    assert tensor.shape == (3, 16, 16)
    assert bool(np.isfinite(tensor.numpy()).all())


def test_transparent_pixels_on_white():
    rgb = np.asarray(to_rgb(_modes()["RGBA"]))
    assert (rgb[:, :8] == 255).all()
    assert (rgb[:, 8:, 0] == 200).all()


def test_sixteen_bit_keeps_contrast():
    rgb = np.asarray(to_rgb(_modes()["I;16"]))
    assert rgb.min() == 0
    assert rgb.max() == 255


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*digits"):
        ImageClassificationData("not-a-benchmark")


def test_carved_validation_is_stratified_and_disjoint():
    data = ImageClassificationData("digits", input_size=16, num_workers=0, val_fraction=0.2, split_seed=3)
    splits = data.load_splits()
    train, validation = splits["train"], splits[data.split_name("validation")]
    assert data.split_name("validation") == "validation_from_train"
    assert abs(len(validation) - 0.2 * (len(train) + len(validation))) <= 1
    counts = np.bincount(validation["label"], minlength=10)
    assert counts.min() >= 20  # each of the 10 classes appears about 25 times
    train_pixels = {np.asarray(img).tobytes() + bytes([lbl]) for img, lbl in zip(train["image"], train["label"])}
    overlap = sum(np.asarray(img).tobytes() + bytes([lbl]) in train_pixels
                  for img, lbl in zip(validation["image"], validation["label"]))
    assert overlap < 5  # digits has a few duplicate scans, never a shared row


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_int32_mode_rescaled_not_clipped():
    values = np.linspace(-70000, 70000, 256).reshape(16, 16).astype(np.int32)
    rgb = np.asarray(to_rgb(Image.fromarray(values, mode="I")))
    assert rgb.min() == 0
    assert rgb.max() == 255
    assert len(np.unique(rgb[..., 0])) > 200


def test_palette_transparency_on_white():
    image = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1)), mode="L").convert("P")
    image.info["transparency"] = int(np.asarray(image)[0, 0])
    rgb = np.asarray(to_rgb(image))
    assert (rgb[:, 0] == 255).all()
    assert rgb[:, 1:].min() < 255


def test_la_transparency_on_white():
    grey = np.zeros((8, 8), dtype=np.uint8)
    alpha = np.zeros((8, 8), dtype=np.uint8)
    alpha[:, 4:] = 255
    image = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
    rgb = np.asarray(to_rgb(image))
    assert (rgb[:, :4] == 255).all()
    assert (rgb[:, 4:] == 0).all()


def test_exif_orientation_applied():
    from d2v_eval.data.images import decode_image

    wide = Image.new("RGB", (8, 4), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    assert decode_image(_encoded(wide, "JPEG", exif=exif)).size == (4, 8)


@pytest.mark.parametrize("mode,format", [
    ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("CMYK", "TIFF"),
])
def test_encoded_mode_through_dataset(mode, format):
    from datasets import ClassLabel, Dataset, Features, Image as ImageFeature

    from d2v_eval.data.datamodule import TransformedSplit

    encoded = _encoded(_modes()[mode], format)
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=2)})
    split = Dataset.from_dict({"image": [{"bytes": encoded, "path": None}], "label": [1]}, features=features)
    data = ImageClassificationData("digits", input_size=16, num_workers=0)
    for is_training in (True, False):
        dataset = TransformedSplit(split, data.build_transform(is_training), "image", "label", split_name="x")
        tensor, label = dataset[0]
        assert tuple(tensor.shape) == (3, 16, 16)
        assert bool(np.isfinite(tensor.numpy()).all())
        assert label == 1


def test_sixteen_bit_contrast_after_transform():
    data = ImageClassificationData("digits", input_size=16, num_workers=0)
    tensor = data.build_transform(is_training=False)(to_rgb(_modes()["I;16"]))
    # mean = std = 0.5 maps 8-bit 0..255 to -1..1; a clipped 16-bit image would be flat at 1.
    # The centre crop (crop_pct 0.875) cuts the extreme pixels of the gradient.
    assert float(tensor.min()) < -0.8
    assert float(tensor.max()) > 0.8
