"""Encoders: architecture presets, safe checkpoint reading and conversion to timm's ``Beit``."""

from d2v_eval.encoders.loader import EncoderInfo, encoder_img_size, load_encoder, load_encoder_with_info
from d2v_eval.encoders.presets import PRESETS, BeitArch, build_beit, get_preset

__all__ = [
    "PRESETS", "BeitArch", "EncoderInfo", "build_beit", "encoder_img_size", "get_preset",
    "load_encoder", "load_encoder_with_info",
]
