"""Converted Hugging Face checkpoints against transformers, the reference implementation."""

from __future__ import annotations

import json

import pytest
import torch

from d2v_eval.encoders import PRESETS, load_encoder, load_encoder_with_info


@pytest.mark.parametrize("shared", [True, False], ids=["shared-bias", "per-block-bias"])
def test_tokens_match_transformers(hf_model_dir, shared):
    model_dir, reference = hf_model_dir(shared=shared)
    encoder = load_encoder(str(model_dir), global_pool="token").eval()

    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder.forward_features(images)
        theirs = reference(pixel_values=images).last_hidden_state

    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()


def test_layer_norm_eps_read_from_config(hf_model_dir):
    model_dir, _ = hf_model_dir(shared=True, layer_norm_eps=1e-5)
    encoder = load_encoder(str(model_dir), global_pool="token")
    assert encoder.blocks[0].norm1.eps == 1e-5
    assert encoder.norm.eps == 1e-5


def test_architecture_read_from_config(hf_model_dir):
    model_dir, _ = hf_model_dir(shared=False, layer_scale_init_value=0.0, intermediate_size=96)
    encoder, info = load_encoder_with_info(str(model_dir), rel_pos_bias="auto")
    assert info.format == "hf-dir"
    assert info.arch.init_values is None
    assert encoder.blocks[0].gamma_1 is None
    assert encoder.blocks[0].mlp.fc1.out_features == 96
    assert len(info.sha256) == 64


def test_shared_bias_expanded_per_block(hf_model_dir):
    model_dir, reference = hf_model_dir(shared=True)
    encoder = load_encoder(str(model_dir), rel_pos_bias="per_block")
    table = reference.encoder.relative_position_bias.relative_position_bias_table
    assert encoder.rel_pos_bias is None
    for block in encoder.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, table)


def test_missing_config_is_an_error(hf_model_dir):
    model_dir, _ = hf_model_dir(shared=True)
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(str(model_dir))


def test_missing_weights_is_an_error(hf_model_dir):
    model_dir, _ = hf_model_dir(shared=True)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_encoder(str(model_dir))


def test_mismatched_keys_list_missing_and_unexpected(hf_model_dir):
    model_dir, _ = hf_model_dir(shared=True)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = 3  # the weights hold 2 blocks
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.2\."):
        load_encoder(str(model_dir))


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="data2vec_vision_base_patch16_224"):
        load_encoder("data2vec_vision_huge_patch14_224")


@pytest.mark.parametrize(
    "name, embed_dim, depth, num_heads",
    [("data2vec_vision_base_patch16_224", 768, 12, 12), ("data2vec_vision_large_patch16_224", 1024, 24, 16)],
)
def test_published_presets(name, embed_dim, depth, num_heads):
    with torch.device("meta"):
        encoder = load_encoder(name)
    assert encoder.embed_dim == embed_dim
    assert len(encoder.blocks) == depth
    assert encoder.blocks[0].attn.num_heads == num_heads
    assert encoder.blocks[0].mlp.fc1.out_features == 4 * embed_dim
    assert encoder.pos_embed is None
    assert encoder.blocks[0].attn.relative_position_bias_table.shape == (732, num_heads)
    assert encoder.blocks[0].gamma_1 is not None


@pytest.fixture
def hf_classifier_dir(tmp_path):
    """A fine-tuned-style transformers classifier (per-block bias, mean pooling, 5 labels) saved to disk."""
    from transformers import Data2VecVisionForImageClassification

    from conftest import randomise_, small_hf_config

    config = small_hf_config(shared=False, mean_pooling=True, num_labels=5)
    model = randomise_(Data2VecVisionForImageClassification(config), seed=2).eval()
    model.save_pretrained(tmp_path / "hf-ft")
    return tmp_path / "hf-ft", model


def test_finetune_logits_match_transformers(hf_classifier_dir):
    from d2v_eval.protocols import FineTune

    model_dir, reference = hf_classifier_dir
    module = FineTune(encoder=str(model_dir), num_classes=5).eval()

    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = module(images)
        theirs = reference(pixel_values=images).logits

    assert module.encoder_info.reinitialised == []
    assert module.encoder_info.format == "hf-dir"
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def test_head_class_mismatch_reinitialises(hf_classifier_dir, caplog):
    model_dir, reference = hf_classifier_dir
    with caplog.at_level("WARNING", logger="d2v_eval.encoders"):
        encoder, info = load_encoder_with_info(str(model_dir), num_classes=3)

    assert "5 classes but 3 were requested" in caplog.text
    assert set(info.reinitialised) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert encoder.head.weight.shape == (3, 32)
    assert not torch.equal(encoder.fc_norm.weight, reference.data2vec_vision.pooler.layernorm.weight)


def test_large_preset_matches_transformers_layout():
    """The large preset has transformers' data2vec-vision-large tensors, key for key, after conversion.

    The configuration is that of facebook/data2vec-vision-large (hidden 1024, 24 layers, 16 heads,
    MLP 4096, patch 16 at 224 px, shared relative position bias, layer scale 0.1, CLS pooling),
    written out by hand from transformers' Data2VecVisionConfig fields.
    """
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    from d2v_eval.encoders.hf import arch_from_hf_config, convert_hf_state_dict
    from d2v_eval.encoders.loader import build_from_checkpoint
    from d2v_eval.encoders.sources import Checkpoint

    config = Data2VecVisionConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        image_size=224, patch_size=16, use_shared_relative_position_bias=True,
        use_relative_position_bias=False, use_mean_pooling=False, layer_scale_init_value=0.1,
    )
    with torch.device("meta"):
        reference = Data2VecVisionModel(config)
        converted, unknown = convert_hf_state_dict(reference.state_dict())
        checkpoint = Checkpoint(source="meta", format="hf-dir", arch=arch_from_hf_config(config.to_dict()),
                                state_dict=converted)
        loaded, info = build_from_checkpoint(checkpoint, global_pool="token")
        preset = load_encoder("data2vec_vision_large_patch16_224", global_pool="token")

    assert unknown == []
    assert info.arch == PRESETS["data2vec_vision_large_patch16_224"].replace(layer_norm_eps=config.layer_norm_eps)
    expected = {key: tuple(value.shape) for key, value in preset.state_dict().items()}
    actual = {key: tuple(value.shape) for key, value in loaded.state_dict().items()}
    assert sorted(actual) == sorted(expected)
    assert actual == expected
    assert info.dropped == []
    assert info.reinitialised == []
    stored = {key: tuple(value.shape) for key, value in converted.items()}
    assert stored["rel_pos_bias.relative_position_bias_table"] == (732, 16)
    assert len(stored) == len(expected) - 24 + 1  # one shared table in place of 24 per-block copies


def test_safetensors_preferred_over_bin(hf_model_dir):
    model_dir, _ = hf_model_dir(shared=True)
    (model_dir / "pytorch_model.bin").write_bytes(b"not read: safetensors comes first")
    _, info = load_encoder_with_info(str(model_dir))
    assert info.weights_path == str(model_dir / "model.safetensors")


def test_hf_state_dict_without_config(hf_model_dir):
    """A transformers-layout weights file alone: the architecture comes from tensor shapes, eps 1e-12."""
    model_dir, reference = hf_model_dir(shared=False)
    encoder, info = load_encoder_with_info(str(model_dir / "model.safetensors"), global_pool="token")

    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = encoder.eval().forward_features(images)
        theirs = reference(pixel_values=images).last_hidden_state

    assert info.format == "hf-state-dict"
    assert info.arch.layer_norm_eps == 1e-12
    assert info.arch.num_heads == 2
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()


def test_non_transformers_config_is_an_error(hf_model_dir):
    model_dir, _ = hf_model_dir(shared=True)
    (model_dir / "config.json").write_text(json.dumps({"architecture": "beit_base_patch16_224", "num_classes": 1000}))
    with pytest.raises(ValueError, match="is not a transformers Data2VecVision or BEiT config: it has no hidden_size"):
        load_encoder(str(model_dir))
