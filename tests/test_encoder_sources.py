"""Every checkpoint form load_encoder accepts, round-tripped against the model that wrote it, and bad input."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from conftest import randomise_
from d2v_eval.cli import main as cli_main
from d2v_eval.encoders import (
    PRESETS, UntrustedCheckpointError, build_beit, detect_format, encoder_img_size, load_encoder,
    load_encoder_with_info,
)
from d2v_eval.encoders.checkpoints import sha256_file

ARCH = PRESETS["data2vec_vision_micro_patch4_16"].replace(rel_pos_bias="shared")
IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _source_model(seed: int) -> torch.nn.Module:
    return randomise_(build_beit(ARCH, global_pool="token"), seed=seed).eval()


@pytest.fixture(scope="module")
def source():
    """A shared-bias micro encoder, its EMA twin, their tokens, and an original-layout state dict."""
    model, ema = _source_model(0), _source_model(1)
    with torch.no_grad():
        tokens, ema_tokens = model.forward_features(IMAGES), ema.forward_features(IMAGES)

    def original_layout(encoder):
        state = dict(encoder.state_dict())
        state["mask_token"] = torch.randn(1, 1, ARCH.embed_dim)
        state["lm_head.weight"] = torch.randn(ARCH.embed_dim, ARCH.embed_dim)
        state["lm_head.bias"] = torch.randn(ARCH.embed_dim)
        # A wrong index buffer: the loader must rebuild it, never load it.
        state["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
        return state

    return {"tokens": tokens, "ema_tokens": ema_tokens, "state": original_layout(model), "ema_state": original_layout(ema)}


def _namespace() -> argparse.Namespace:
    return argparse.Namespace(model="beit_base_patch16_224", input_size=16, lr=4e-3, layer_decay=0.65, seed=0)


def write_original(path, src):
    torch.save({"model": src["state"], "model_ema": src["ema_state"], "optimizer": {"state": {}, "param_groups": []},
                "epoch": 799, "scaler": {"scale": 65536.0}, "args": _namespace()}, path)


def write_deepspeed(path, src):
    torch.save({"module": src["state"], "buffer_names": [], "optimizer": None, "lr_scheduler": None,
                "ds_config": {"train_batch_size": 1024}, "ds_version": "0.5.8", "epoch": 99,
                "args": _namespace()}, path)


def write_prefixed(prefix):
    def write(path, src):
        torch.save({prefix + key: value for key, value in src["state"].items()}, path)
    return write


def write_timm_safetensors(path, src):
    save_file({k: v.contiguous() for k, v in src["state"].items()}, str(path))


WRITERS = {
    "original.pth": (write_original, "original"),
    "mp_rank_00_model_states.pt": (write_deepspeed, "deepspeed"),
    "module-prefixed.pth": (write_prefixed("module."), "prefixed"),
    "backbone-prefixed.pth": (write_prefixed("backbone."), "prefixed"),
    "timm.safetensors": (write_timm_safetensors, "timm"),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_round_trip_gives_source_tokens(tmp_path, source, name):
    writer, expected_format = WRITERS[name]
    path = tmp_path / name
    writer(path, source)

    assert detect_format(str(path)) == expected_format
    encoder, info = load_encoder_with_info(str(path), global_pool="token", rel_pos_bias="auto")
    with torch.no_grad():
        tokens = encoder.eval().forward_features(IMAGES)

    assert info.format == expected_format
    assert info.sha256 == sha256_file(path)
    assert info.arch == ARCH
    assert {"mask_token", "lm_head.weight", "lm_head.bias"} <= set(info.dropped)
    assert torch.allclose(tokens, source["tokens"], atol=1e-6, rtol=0), (tokens - source["tokens"]).abs().max()


def test_original_use_ema_loads_model_ema(tmp_path, source):
    path = tmp_path / "checkpoint-799.pth"
    write_original(path, source)
    encoder = load_encoder(str(path), global_pool="token", rel_pos_bias="auto", use_ema=True).eval()
    with torch.no_grad():
        tokens = encoder.forward_features(IMAGES)
    assert torch.allclose(tokens, source["ema_tokens"], atol=1e-6, rtol=0)


def test_probe_takes_encoder_use_ema(tmp_path, source):
    from d2v_eval import LinearProbe

    path = tmp_path / "checkpoint-799.pth"
    write_original(path, source)
    probe = LinearProbe(str(path), num_classes=10, encoder_format="original", encoder_use_ema=True)
    with torch.no_grad():
        tokens = probe.encoder.forward_features(IMAGES)
    assert probe.encoder_info.format == "original"
    assert torch.allclose(tokens, source["ema_tokens"], atol=1e-6, rtol=0)


def test_use_ema_needs_model_ema(tmp_path, source):
    path = tmp_path / "mp_rank_00_model_states.pt"
    write_deepspeed(path, source)
    with pytest.raises(ValueError, match="use_ema=True needs an original training checkpoint"):
        load_encoder(str(path), use_ema=True)


def test_convert_output_reproduces_outputs(tmp_path, source, capsys):
    original = tmp_path / "checkpoint-799.pth"
    write_original(original, source)
    out = tmp_path / "converted.safetensors"
    assert cli_main(["convert", str(original), str(out)]) == 0
    assert "original" in capsys.readouterr().out

    for rel_pos_bias in ("auto", "per_block"):
        reference = load_encoder(str(original), global_pool="token", rel_pos_bias=rel_pos_bias).eval()
        encoder, info = load_encoder_with_info(str(out), global_pool="token", rel_pos_bias=rel_pos_bias)
        with torch.no_grad():
            expected = reference.forward_features(IMAGES)
            tokens = encoder.eval().forward_features(IMAGES)
        assert info.format == "timm"
        assert info.arch.layer_norm_eps == ARCH.layer_norm_eps
        assert torch.equal(tokens, expected)
        assert torch.allclose(tokens, source["tokens"], atol=1e-6, rtol=0)


def test_convert_rejects_other_suffix(tmp_path, source, capsys):
    original = tmp_path / "checkpoint-799.pth"
    write_original(original, source)
    assert cli_main(["convert", str(original), str(tmp_path / "out.pth")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_original_shared_bias_expanded(tmp_path, source):
    path = tmp_path / "checkpoint.pth"
    write_original(path, source)
    encoder = load_encoder(str(path), global_pool="token", rel_pos_bias="per_block").eval()
    shared = source["state"]["rel_pos_bias.relative_position_bias_table"]

    assert encoder.rel_pos_bias is None
    for block in encoder.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, shared)
        assert block.attn.relative_position_index.max() == shared.shape[0] - 1
    with torch.no_grad():
        tokens = encoder.forward_features(IMAGES)
    assert torch.allclose(tokens, source["tokens"], atol=1e-6, rtol=0)


def test_shared_from_per_block_rejected(tmp_path, source):
    path = tmp_path / "per-block.pth"
    per_block = build_beit(ARCH.replace(rel_pos_bias="per_block"), global_pool="token")
    torch.save(per_block.state_dict(), path)
    with pytest.raises(ValueError, match="rel_pos_bias='shared' was requested"):
        load_encoder(str(path), rel_pos_bias="shared")


def test_encoder_img_size_for_every_form(tmp_path, source):
    for name, (writer, _) in WRITERS.items():
        path = tmp_path / name
        writer(path, source)
        assert encoder_img_size(str(path)) == 16, name
        assert encoder_img_size(str(path), 32) == 32, name
    assert encoder_img_size("data2vec_vision_base_patch16_224") == 224


# ---- format override ----------------------------------------------------------------------------


def test_format_override_must_fit_the_file(tmp_path, source):
    path = tmp_path / "checkpoint.pth"
    write_original(path, source)
    with pytest.raises(ValueError, match="no state dict under 'module'"):
        load_encoder(str(path), format="deepspeed")
    with pytest.raises(ValueError, match="format 'timm' expects a flat state dict"):
        load_encoder(str(path), format="timm")
    with pytest.raises(ValueError, match="format 'nope' is invalid"):
        load_encoder(str(path), format="nope")


def test_format_override_timm_keeps_prefix(tmp_path, source):
    path = tmp_path / "prefixed.pth"
    write_prefixed("model.")(path, source)
    with pytest.raises(ValueError, match="has no tensor patch_embed.proj.weight"):
        load_encoder(str(path), format="timm")
    assert load_encoder_with_info(str(path), format="prefixed", rel_pos_bias="auto")[1].format == "prefixed"


# ---- bad input -----------------------------------------------------------------------------------


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{path}.*empty"):
        load_encoder(str(path))


def test_truncated_pth_is_an_error(tmp_path, source):
    path = tmp_path / "truncated.pth"
    write_original(path, source)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=str(path)):
        load_encoder(str(path))


def test_truncated_safetensors_is_an_error(tmp_path, source):
    path = tmp_path / "truncated.safetensors"
    write_timm_safetensors(path, source)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{path}.*not a readable safetensors file"):
        load_encoder(str(path))


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", pickle.dumps([1, 2, 3], protocol=2)], ids=["text", "list"])
def test_non_checkpoint_file_is_an_error(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        load_encoder(str(path))


def test_other_model_weights_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(ValueError, match="not a recognised encoder checkpoint.*conv1.weight"):
        load_encoder(str(path))


def test_inconsistent_shape_names_the_tensor(tmp_path, source):
    state = dict(source["state"])
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(ARCH.mlp_hidden_dim + 8, ARCH.embed_dim)
    path = tmp_path / "bad-shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight is \(72, 32\), expected \(64, 32\)"):
        load_encoder(str(path))


def test_impossible_table_rows_name_the_tensor(tmp_path, source):
    state = dict(source["state"])
    state["rel_pos_bias.relative_position_bias_table"] = torch.zeros(50, ARCH.num_heads)
    path = tmp_path / "bad-table.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="rel_pos_bias.relative_position_bias_table has 50 rows"):
        load_encoder(str(path))


def test_missing_and_unexpected_keys_are_listed(tmp_path, source):
    state = dict(source["state"])
    del state["blocks.1.norm2.weight"]
    state["blocks.0.attn.extra"] = torch.zeros(1)
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.1\.norm2\.weight\].*unexpected keys \[blocks\.0\.attn\.extra\]"):
        load_encoder(str(path), rel_pos_bias="auto")


# ---- safety --------------------------------------------------------------------------------------


def _malicious_pickle(marker) -> bytes:
    """Protocol-0 pickle bytes that would call os.system(f"touch {marker}") if unpickled unsafely."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def test_raw_pickle_calling_os_system_is_rejected(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    path.write_bytes(_malicious_pickle(marker))
    with pytest.raises(UntrustedCheckpointError, match=r"os\.system.*not trusted"):
        load_encoder(str(path))
    assert not marker.exists()


def test_zip_checkpoint_calling_os_system_is_rejected(tmp_path):
    marker = tmp_path / "executed"
    benign = io.BytesIO()
    torch.save({"model": {"x": torch.zeros(1)}}, benign)
    path = tmp_path / "evil-zip.pth"
    with zipfile.ZipFile(benign) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, _malicious_pickle(marker) if item.filename.endswith("data.pkl") else data)
    with pytest.raises(UntrustedCheckpointError, match=r"os\.system.*not trusted"):
        load_encoder(str(path))
    assert not marker.exists()


# ---- Hugging Face hub cache ----------------------------------------------------------------------


@pytest.fixture
def offline_hf_home(tmp_path, monkeypatch):
    """HF_HOME in tmp_path with HF_HUB_OFFLINE=1; huggingface_hub re-reads its environment constants."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    importlib.reload(constants)
    yield tmp_path / "hf-home" / "hub"
    monkeypatch.undo()
    importlib.reload(constants)


def _populate_cache(hub_cache, repo_id: str, model_dir, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay out ``model_dir``'s files as huggingface_hub's cache does: refs/main -> snapshots/<revision>/."""
    from huggingface_hub.file_download import repo_folder_name

    repo = hub_cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for file in model_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


def test_hub_id_loads_from_offline_cache(offline_hf_home, hf_model_dir):
    model_dir, reference = hf_model_dir(shared=True)
    _populate_cache(offline_hf_home, "facebook/data2vec-vision-base", model_dir)

    assert encoder_img_size("facebook/data2vec-vision-base") == 16
    encoder, info = load_encoder_with_info("facebook/data2vec-vision-base", global_pool="token")
    with torch.no_grad():
        ours = encoder.eval().forward_features(IMAGES[:1])
        theirs = reference(pixel_values=IMAGES[:1]).last_hidden_state

    assert info.format == "hf-hub"
    assert info.weights_path.startswith(str(offline_hf_home))
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_uncached_hub_id_names_fix(offline_hf_home):
    with pytest.raises(FileNotFoundError, match=r"'facebook/data2vec-vision-large'.*hf download facebook/data2vec-vision-large"):
        load_encoder("facebook/data2vec-vision-large")


def test_unknown_source_lists_accepted_forms():
    with pytest.raises(ValueError, match="hub id.*save_pretrained directory"):
        load_encoder("not a path or id")


def test_record_carries_provenance(tmp_path, source):
    path = tmp_path / "checkpoint.pth"
    write_original(path, source)
    _, info = load_encoder_with_info(str(path), global_pool="avg", num_classes=0)
    record = json.loads(json.dumps(info.as_record()))
    assert record["format"] == "original"
    assert record["sha256"] == sha256_file(path)
    assert "norm.weight" in record["dropped"]
    assert record["reinitialised"] == ["fc_norm.bias", "fc_norm.weight"]


def test_cli_links_input_size_from_checkpoint(tmp_path, monkeypatch):
    """`--model.init_args.encoder FILE` sets the data's input size from the file's own resolution (32 px)."""
    from pathlib import Path

    model = build_beit(ARCH.replace(img_size=32, rel_pos_bias="per_block"), global_pool="token")
    checkpoint = tmp_path / "checkpoint-32px.pth"
    torch.save({"model": model.state_dict(), "epoch": 1, "args": _namespace()}, checkpoint)
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "demo_linear_probe.yaml"
    cli_main(["test", "--config", str(config), "--model.init_args.encoder", str(checkpoint),
              "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--data.num_workers=0",
              f"--recorder.records_dir={tmp_path / 'records'}"])

    (record_path,) = (tmp_path / "records").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["config"]["data"]["input_size"] == 32
    assert record["encoder"]["format"] == "original"
    assert record["encoder"]["sha256"] == sha256_file(checkpoint)
