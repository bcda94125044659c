"""``LinearProbe``: frozen encoder, head selection on validation only, grid equals single heads."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from datasets import DatasetDict, load_from_disk

from d2v_eval import ImageClassificationData, LinearProbe
from d2v_eval.data.digits import digits_path
from d2v_eval.protocols.features import FeatureSpec, extract_features
from d2v_eval.protocols.linear_probe import FewShot
from d2v_eval.results import ResultRecorder

MICRO = "data2vec_vision_micro_patch4_16"


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(**overrides) -> pl.Trainer:
    options = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )
    options.update(overrides)
    return pl.Trainer(**options)


class EncoderModeProbe(pl.Callback):
    def __init__(self):
        self.training_flags: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.training_flags.append(any(m.training for m in pl_module.encoder.modules()))


def test_encoder_bit_identical_and_head_trained():
    pl.seed_everything(0)
    # No cache: the encoder runs on every training batch, with validation between epochs.
    probe = LinearProbe(
        MICRO, num_classes=10, features=[FeatureSpec("mean")], lrs=[0.1], batch_norm=[True],
        lr_rule="absolute", use_cache=False,
    )
    encoder_before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    head_before = probe.heads.weights[0].detach().clone()
    norm = next(iter(probe.heads.norms.values()))
    running_mean_before = norm.running_mean.clone()

    data = ImageClassificationData("digits", input_size=16, batch_size=16, num_workers=0)
    modes = EncoderModeProbe()
    trainer = _trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=1,
                       callbacks=[modes])
    trainer.fit(probe, data)

    for name, tensor in probe.encoder.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), name
    assert not torch.equal(probe.heads.weights[0], head_before)
    assert not torch.equal(norm.running_mean, running_mean_before)
    assert len(modes.training_flags) == 12
    assert not any(modes.training_flags)
    assert all(not p.requires_grad for p in probe.encoder.parameters())
    assert all(p.requires_grad for p in probe.heads.parameters())


def _fit(probe: LinearProbe, data: ImageClassificationData, **trainer_options) -> pl.Trainer:
    trainer = _trainer(**trainer_options)
    trainer.fit(probe, data)
    return trainer


def test_grid_matches_single_head_runs():
    lrs = [0.01, 0.1, 0.5]
    options = dict(features=[FeatureSpec("cls")], batch_norm=[True], lr_rule="absolute", cache_dtype="float32")
    data_options = dict(input_size=16, batch_size=32, num_workers=0)

    pl.seed_everything(0)
    grid = LinearProbe(MICRO, num_classes=10, lrs=lrs, **options)
    _fit(grid, ImageClassificationData("digits", **data_options), max_epochs=2, limit_train_batches=10, limit_val_batches=0)

    pl.seed_everything(0)
    single = LinearProbe(MICRO, num_classes=10, lrs=[lrs[1]], **options)
    _fit(single, ImageClassificationData("digits", **data_options), max_epochs=2, limit_train_batches=10, limit_val_batches=0)

    assert not torch.equal(grid.heads.weights[0], grid.heads.weights[1])
    torch.testing.assert_close(grid.heads.weights[1], single.heads.weights[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grid.heads.biases[1], single.heads.biases[0], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def val_test_disagree(tmp_path_factory):
    """digits with a test split whose labels are shifted by one class, so test and validation disagree."""
    digits = load_from_disk(str(digits_path()))
    shifted = digits["validation"].map(lambda row: {"label": (row["label"] + 1) % 10})
    target = tmp_path_factory.mktemp("disagree") / "data"
    DatasetDict({"train": digits["train"], "validation": digits["validation"], "test": shifted}).save_to_disk(str(target))
    return target


def test_selection_uses_validation_only(val_test_disagree, tmp_path):
    pl.seed_everything(0)
    probe = LinearProbe(
        MICRO, num_classes=10, features=[FeatureSpec("cls"), FeatureSpec("mean")], lrs=[1e-3, 1e-2, 0.1, 1.0],
        batch_norm=[True, False], lr_rule="absolute",
    )
    data = ImageClassificationData(str(val_test_disagree), input_size=16, batch_size=64, num_workers=0)
    recorder = ResultRecorder(records_dir=str(tmp_path))
    trainer = _fit(probe, data, max_epochs=3, callbacks=[recorder])
    trainer.test(probe, data)

    # Every head's accuracy on test, computed here from the cached test features.
    test_set = data.datasets["test"]
    features, labels = test_set.__getitems__(list(range(len(test_set)))), None
    batch = torch.utils.data.default_collate(features)
    with torch.no_grad():
        probe.eval()
        logits = probe.heads(batch[0])  # (N, H, C)
    labels = batch[1][:, 0]
    test_top1 = (logits.argmax(-1) == labels[:, None]).float().mean(0)
    val_top1 = torch.tensor([r["top1"] for r in probe.head_val_results])

    best_on_validation = int(val_top1.argmax())
    best_on_test = int(test_top1.argmax())
    assert best_on_test != best_on_validation, "test data must make the two choices differ"
    assert probe.selected == [best_on_validation]

    record = json.loads(next(tmp_path.glob("*-test.json")).read_text())
    extras = record["linear_probe"]
    assert extras["selected"][0]["index"] == best_on_validation
    assert len(extras["heads"]) == 16
    assert all("val" in head for head in extras["heads"])
    assert extras["selection_split"] == "validation"
    assert record["metrics"]["top1"] == pytest.approx(100 * float(test_top1[best_on_validation]))


def test_no_held_out_split_raises():
    probe = LinearProbe(MICRO, num_classes=10, lrs=[0.01, 0.1])
    data = ImageClassificationData("digits", input_size=16)
    data.splits["validation"] = None  # as for a benchmark that ships only train and test
    with pytest.raises(ValueError, match="val_fraction"):
        probe._check_selection_split(data)
    data.splits["validation"] = data.splits["test"]
    with pytest.raises(ValueError, match="also the reported test split"):
        probe._check_selection_split(data)


def test_few_shot_draws_train_on_subsets(tmp_path):
    pl.seed_everything(0)
    probe = LinearProbe(
        MICRO, num_classes=10, features=[FeatureSpec("cls")], lrs=[0.05, 0.5], batch_norm=[True],
        lr_rule="absolute", few_shot=FewShot(k=2, draws=3, seed=0),
    )
    data = ImageClassificationData("digits", input_size=16, batch_size=8, num_workers=0, val_fraction=0.1)
    trainer = _fit(probe, data, max_epochs=2, callbacks=[ResultRecorder(records_dir=str(tmp_path))])
    train_set = data.datasets["train"]
    assert len(train_set) == 20
    assert train_set.subsets.shape == (3, 20)
    assert len({tuple(row) for row in train_set.subsets.tolist()}) == 3
    trainer.test(probe, data)

    record = json.loads(next(tmp_path.glob("*-test.json")).read_text())
    assert record["protocol"] == "linear_probe_2shot"
    few_shot = record["linear_probe"]["few_shot"]
    assert len(few_shot["top1_per_draw"]) == 3
    assert few_shot["top1_mean"] == pytest.approx(sum(few_shot["top1_per_draw"]) / 3)
    assert "top1_std" in few_shot
    assert [s["draw"] for s in record["linear_probe"]["selected"]] == [0, 1, 2]


def test_feature_spec_errors():
    with pytest.raises(ValueError, match="pooling 'max' is invalid; choose one of cls, mean, cls\\+mean"):
        FeatureSpec("max")
    with pytest.raises(ValueError, match="last 3 blocks but the encoder has 2; use blocks in 1..2"):
        LinearProbe(MICRO, num_classes=10, features=[FeatureSpec("cls", blocks=3)])


def test_feature_spec_shapes():
    probe = LinearProbe(MICRO, num_classes=10)
    specs = [FeatureSpec("cls"), FeatureSpec("cls+mean", blocks=2, final_norm=False)]
    features = extract_features(probe.encoder, torch.randn(3, 3, 16, 16), specs)
    assert features["cls-last1-norm"].shape == (3, 32)
    assert features["cls+mean-last2-raw"].shape == (3, 128)
    # The last block's raw CLS token, normed, is the normed CLS feature.
    last_raw_cls = features["cls+mean-last2-raw"][:, 64:96]
    torch.testing.assert_close(probe.encoder.norm(last_raw_cls), features["cls-last1-norm"])


def test_cli_config_records_every_head(tmp_path, monkeypatch):
    from pathlib import Path

    from d2v_eval.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "protocols" / "linear_probe.yaml"
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(config), f"--model.init_args.encoder={MICRO}", "--trainer.max_epochs=2",
          "--trainer.enable_progress_bar=false",
          f"--recorder.records_dir={tmp_path / 'records'}"])
    records = [json.loads(path.read_text()) for path in (tmp_path / "records").glob("*.json")]
    assert sorted(r["role"] for r in records) == ["test", "validation"]
    (record,) = [r for r in records if r["role"] == "test"]
    extras = record["linear_probe"]
    assert record["protocol"] == "linear_probe"
    assert len(extras["heads"]) == 13 * 2 * 2
    assert all(0.0 <= head["val"]["top1"] <= 100.0 for head in extras["heads"])
    assert extras["lr_rule"] == "linear_scaling"
    assert extras["lr_scale"] == 64 / 256
    assert extras["selection_split"] == "validation_from_train"
    chosen = extras["selected"][0]["index"]
    assert extras["heads"][chosen]["val"]["top1"] == max(head["val"]["top1"] for head in extras["heads"])


@pytest.mark.parametrize(
    ("optimizer", "train_augmentation"), [("adamw", False), ("lars", False), ("sgd", True)],
)
def test_optimizers_and_augmented_training(optimizer, train_augmentation):
    from d2v_eval.data.datamodule import TransformedSplit
    from d2v_eval.protocols.feature_cache import CachedFeatures

    pl.seed_everything(0)
    probe = LinearProbe(
        MICRO, num_classes=10, features=[FeatureSpec("cls")], lrs=[0.01, 0.1], batch_norm=[True, False],
        optimizer=optimizer, weight_decay=0.05, train_augmentation=train_augmentation,
    )
    weights_before = [weight.detach().clone() for weight in probe.heads.weights]
    data = ImageClassificationData("digits", input_size=16, batch_size=32, num_workers=0, hflip=0.0)
    trainer = _fit(probe, data, max_epochs=1, limit_train_batches=3)

    expected_train = TransformedSplit if train_augmentation else CachedFeatures
    assert isinstance(data.datasets["train"], expected_train)
    assert isinstance(data.datasets["validation"], CachedFeatures)
    assert all(not torch.equal(before, after) for before, after in zip(weights_before, probe.heads.weights))
    optimizer_groups = trainer.optimizers[0].param_groups
    assert len(optimizer_groups) == 2 * len(probe.heads)
    assert {group["weight_decay"] for group in optimizer_groups} == {0.0, 0.05}
    assert probe.selected is not None


def test_checkpoint_restores_encoder_and_selection(tmp_path):
    options = dict(features=[FeatureSpec("cls")], lrs=[0.01, 0.1], batch_norm=[True], lr_rule="absolute")
    data = ImageClassificationData("digits", input_size=16, batch_size=64, num_workers=0)
    pl.seed_everything(0)
    fitted = LinearProbe(MICRO, num_classes=10, **options)
    trainer = _fit(fitted, data, max_epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path))
    expected = trainer.test(fitted, data)[0]["test/top1"]
    ckpt_path = trainer.checkpoint_callback.best_model_path

    pl.seed_everything(1)  # another random encoder, replaced by the checkpoint's before features are read
    restored = LinearProbe(MICRO, num_classes=10, **options)
    result = _trainer().test(restored, data, ckpt_path=ckpt_path)[0]["test/top1"]
    assert restored.selected == fitted.selected
    assert result == pytest.approx(expected)
