"""The encoder under a linear probe stays frozen: eval mode, no gradients, identical weights."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from d2v_eval import ImageClassificationData, LinearProbe


class EncoderModeProbe(pl.Callback):
    def __init__(self):
        self.training_flags: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.training_flags.append(any(m.training for m in pl_module.encoder.modules()))


def test_encoder_bit_identical_and_head_trained():
    pl.seed_everything(0)
    probe = LinearProbe("data2vec_vision_micro_patch4_16", num_classes=10, lr=0.1)
    encoder_before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    head_before = probe.head[1].weight.detach().clone()

    data = ImageClassificationData("digits", input_size=16, batch_size=16, num_workers=0)
    modes = EncoderModeProbe()
    trainer = pl.Trainer(
        max_epochs=3, limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, callbacks=[modes], accelerator="cpu",
    )
    trainer.fit(probe, data)

    for name, tensor in probe.encoder.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), name
    assert not torch.equal(probe.head[1].weight, head_before)
    assert modes.training_flags and not any(modes.training_flags)
    assert all(not p.requires_grad for p in probe.encoder.parameters())
