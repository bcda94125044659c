"""Resolution change of a timm-layout ``Beit`` state dict: relative position bias tables and ``pos_embed``.

Both resizes are timm's own helpers (timm 1.0.31, ``timm.layers``). ``resize_rel_pos_bias_table`` maps
the (2W-1)^2 offset grid with BEiT's geometric-progression spacing and linear interpolation, and it
copies the 3 class-token rows unchanged. ``resample_abs_pos_embed`` resizes the patch grid bicubically
and keeps the class-token slot. Both keep a constant table constant.
"""

from __future__ import annotations

import logging

from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

from d2v_eval.encoders.checkpoints import StateDict
from d2v_eval.encoders.shapes import SHARED_TABLE, BLOCK_TABLE, table_rows

log = logging.getLogger(__name__)


def check_img_size(img_size: int, patch_size: int) -> None:
    """Raise unless ``img_size`` is a positive multiple of ``patch_size``."""
    if img_size <= 0 or img_size % patch_size:
        nearest = patch_size * max(1, round(img_size / patch_size))
        raise ValueError(
            f"img_size {img_size} is not a multiple of patch_size {patch_size}; choose a multiple such as {nearest}"
        )


def resize_position_tables(state_dict: StateDict, *, patch_size: int, img_size: int) -> list[str]:
    """Resize every position table in ``state_dict`` (in place) to ``img_size``; return the resized keys.

    Tables already at ``img_size`` are left untouched, so loading at the checkpoint's own size is a no-op.
    """
    check_img_size(img_size, patch_size)
    window = img_size // patch_size
    resized = []
    for key in list(state_dict):
        tensor = state_dict[key]
        if key == SHARED_TABLE or BLOCK_TABLE.match(key):
            rows = table_rows(window)
            if tensor.shape[0] != rows:
                # (rows, heads) -> ((2W-1)^2 + 3, heads); the last 3 rows are copied unchanged.
                state_dict[key] = resize_rel_pos_bias_table(
                    tensor, new_window_size=(window, window), new_bias_shape=(rows, tensor.shape[1])
                )
                resized.append(key)
        elif key == "pos_embed" and tensor.shape[1] != 1 + window * window:
            # (1, 1 + w*w, embed_dim) -> (1, 1 + W*W, embed_dim); slot 0 is the class token.
            state_dict[key] = resample_abs_pos_embed(tensor, new_size=[window, window], num_prefix_tokens=1)
            resized.append(key)
    if resized:
        log.info("resized %d position table(s) to %d px (%dx%d patches)", len(resized), img_size, window, window)
    return resized
