"""Loading a checkpoint at another resolution: relative position bias tables and absolute position embeddings."""

from __future__ import annotations

import pytest
import torch

from conftest import randomise_
from d2v_eval.encoders import BeitArch, build_beit, encoder_img_size, load_encoder, load_encoder_with_info

# Patch 16 at 224 px like the released models, but one narrow block so the test stays fast.
ARCH_224 = BeitArch(
    img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_hidden_dim=64,
    init_values=0.1, layer_norm_eps=1e-6, use_abs_pos_emb=False, rel_pos_bias="per_block",
)
TABLE = "blocks.0.attn.relative_position_bias_table"


@pytest.fixture(scope="module")
def checkpoint_224(tmp_path_factory):
    model = randomise_(build_beit(ARCH_224, global_pool="token"), seed=4)
    path = tmp_path_factory.mktemp("resize") / "beit-224.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


@pytest.mark.parametrize("img_size, rows", [(224, 732), (384, 2212), (512, 3972)])
def test_table_rows_at_resolution(checkpoint_224, img_size, rows):
    path, stored = checkpoint_224
    encoder, info = load_encoder_with_info(str(path), img_size=img_size, global_pool="token")
    table = encoder.state_dict()[TABLE]

    assert table.shape == (rows, ARCH_224.num_heads)
    assert torch.equal(table[-3:], stored[TABLE][-3:]), "the 3 class-token rows must be copied unchanged"
    assert info.arch.img_size == img_size
    assert info.resized == ([] if img_size == 224 else [TABLE])


def test_same_resolution_is_a_no_op(checkpoint_224):
    path, stored = checkpoint_224
    encoder = load_encoder(str(path), img_size=224, global_pool="token")
    assert torch.equal(encoder.state_dict()[TABLE], stored[TABLE])


def test_output_shape_at_new_resolution(checkpoint_224):
    path, _ = checkpoint_224
    encoder = load_encoder(str(path), img_size=384, global_pool="token").eval()
    with torch.no_grad():
        tokens = encoder.forward_features(torch.randn(1, 3, 384, 384))
    assert tokens.shape == (1, 1 + 24 * 24, ARCH_224.embed_dim)
    assert encoder_img_size(str(path), 384) == 384
    assert encoder_img_size(str(path)) == 224


def test_constant_table_stays_constant(tmp_path, checkpoint_224):
    _, stored = checkpoint_224
    state = dict(stored)
    state[TABLE] = torch.full_like(state[TABLE], 0.25)
    path = tmp_path / "constant.pth"
    torch.save(state, path)

    encoder = load_encoder(str(path), img_size=384, global_pool="token")
    table = encoder.state_dict()[TABLE]
    assert torch.allclose(table, torch.full_like(table, 0.25), atol=1e-6, rtol=0), table.unique()


def test_smaller_resolution_shrinks_table(checkpoint_224):
    path, _ = checkpoint_224
    encoder = load_encoder(str(path), img_size=112, global_pool="token")
    assert encoder.state_dict()[TABLE].shape == ((2 * 7 - 1) ** 2 + 3, ARCH_224.num_heads)


def test_resolution_not_multiple_of_patch_is_an_error(checkpoint_224):
    path, _ = checkpoint_224
    with pytest.raises(ValueError, match="img_size 200 is not a multiple of patch_size 16"):
        load_encoder(str(path), img_size=200)


def test_absolute_pos_embed_keeps_class_slot(tmp_path):
    arch = ARCH_224.replace(img_size=64, use_abs_pos_emb=True, rel_pos_bias="none")
    model = randomise_(build_beit(arch, global_pool="token"), seed=5)
    path = tmp_path / "abs-pos.pth"
    torch.save(model.state_dict(), path)

    encoder, info = load_encoder_with_info(str(path), img_size=96, global_pool="token")
    assert info.arch.use_abs_pos_emb
    assert encoder.pos_embed.shape == (1, 1 + 6 * 6, arch.embed_dim)
    assert torch.equal(encoder.pos_embed[:, 0], model.pos_embed[:, 0])
    assert info.resized == ["pos_embed"]
