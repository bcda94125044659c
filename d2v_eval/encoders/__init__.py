"""Encoders: architecture presets, safe checkpoint reading and conversion to timm's ``Beit``."""

from d2v_eval.encoders.loader import EncoderInfo, encoder_img_size, load_encoder, load_encoder_with_info
from d2v_eval.encoders.presets import PRESETS, BeitArch, build_beit, get_preset
from d2v_eval.encoders.checkpoints import UntrustedCheckpointError
from d2v_eval.encoders.sources import FORMATS, detect_format

__all__ = [
    "FORMATS", "PRESETS", "BeitArch", "UntrustedCheckpointError", "detect_format", "EncoderInfo", "build_beit", "encoder_img_size", "get_preset",
    "load_encoder", "load_encoder_with_info",
]
