"""``KNN``: weighted k-nearest-neighbour classification on L2-normalised frozen features.

The algorithm is DINO's (Caron et al. 2021, arXiv 2104.14294; facebookresearch/dino ``eval_knn.py``,
``knn_classifier``): cosine similarity to every training feature, the top k neighbours vote with
weight ``exp(similarity / T)``, T = 0.07, for k in {10, 20, 100, 200}. One top-k search with the
largest k serves every k. Training features come from the same cache as ``LinearProbe``'s.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from d2v_eval.encoders import load_encoder_with_info
from d2v_eval.encoders.loader import weights_fingerprint
from d2v_eval.protocols.base import ClassificationModule
from d2v_eval.protocols.feature_cache import CacheDtype, CachedFeatures, split_cache_entries
from d2v_eval.protocols.features import FeatureSpec, check_specs, extract_features
from d2v_eval.protocols.heads import MultiHeadMetrics, head_results

log = logging.getLogger(__name__)

DEFAULT_K: tuple[int, ...] = (10, 20, 100, 200)
METRIC_NAMES = ("top1", "top5", "mean_per_class", "loss")


def knn_scores(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    ks: list[int],
    *,
    num_classes: int,
    temperature: float = 0.07,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Class scores (Q, len(ks), num_classes) of queries (Q, D) against a bank (N, D); both L2-normalised.

    Scores of each k are the sums of ``exp(similarity / temperature)`` over the k nearest bank
    entries of each class, normalised to sum to 1 (so ``log`` of them is a log-probability).
    A k above N uses all N entries.
    """
    max_k = min(max(ks), bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk_size):
        similarity = queries[start:start + chunk_size].float() @ bank.float().T  # (q, N)
        top_similarity, top_index = similarity.topk(max_k, dim=1)  # (q, max_k), sorted descending
        weights = (top_similarity / temperature).exp()  # (q, max_k)
        votes = F.one_hot(bank_labels[top_index], num_classes).float() * weights[..., None]  # (q, max_k, C)
        cumulative = votes.cumsum(dim=1)  # (q, max_k, C): votes of the first j + 1 neighbours
        scores = torch.stack([cumulative[:, min(k, max_k) - 1] for k in ks], dim=1)  # (q, K, C)
        out.append(scores / scores.sum(dim=-1, keepdim=True))
    return torch.cat(out)


class KNN(ClassificationModule):
    """Weighted kNN evaluation of a frozen encoder; k is chosen on validation, every k is recorded.

    ``fit`` trains nothing: run it with ``trainer.max_epochs=0`` (then ``test_after_fit`` tests), or use
    ``d2v-eval test`` directly. The train split's features form the bank. The k with the best
    validation top-1 gives the record's headline metrics, and the record also lists every k's metrics.

    Args:
        encoder: encoder source (preset name or Hugging Face directory), see ``load_encoder``.
        num_classes: linked from the data by LightningCLI.
        img_size: input resolution; None keeps the encoder's.
        encoder_format: checkpoint format, overriding detection (see ``d2v_eval.encoders.FORMATS``).
        encoder_use_ema: load the ``model_ema`` weights of an original data2vec_vision checkpoint.
        features: the feature spec (default: CLS token of the last block after the final norm, as DINO).
        k: neighbour counts to evaluate, all from one top-k search.
        temperature: softmax temperature of the neighbour weights.
        default_k: the k reported when no validation split is available.
        cache_dtype: storage type of cached features.
    """

    protocol = "knn"

    def __init__(
        self,
        encoder: str = "data2vec_vision_tiny_patch4_16",
        num_classes: int = 10,
        *,
        img_size: int | None = None,
        encoder_format: str | None = None,
        encoder_use_ema: bool = False,
        features: FeatureSpec | None = None,
        k: list[int] | None = None,
        temperature: float = 0.07,
        default_k: int = 20,
        cache_dtype: CacheDtype = "float16",
    ):
        super().__init__(num_classes)
        # The dataclass is saved as a plain dict, which checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["features"])
        if isinstance(features, dict):
            features = FeatureSpec(**features)
        self.spec = features or FeatureSpec("cls")
        self.hparams["features"] = dataclasses.asdict(self.spec)
        self.ks = sorted({int(value) for value in (k or DEFAULT_K)})
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"k {k} is invalid; give neighbour counts >= 1, e.g. [10, 20, 100, 200]")
        if default_k not in self.ks:
            raise ValueError(f"default_k {default_k} is not among k {self.ks}; add it to k or pick one of them")
        if temperature <= 0:
            raise ValueError(f"temperature {temperature} must be positive, e.g. 0.07")
        self.encoder, self.encoder_info = load_encoder_with_info(
            encoder, img_size=img_size, global_pool="token", num_classes=0,
            format=encoder_format, use_ema=encoder_use_ema,
        )
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        check_specs([self.spec], len(self.encoder.blocks))
        self.val_ks = MultiHeadMetrics(len(self.ks), num_classes)
        self.test_ks = MultiHeadMetrics(len(self.ks), num_classes)
        self.bank: torch.Tensor | None = None
        self.bank_labels: torch.Tensor | None = None
        self.per_k: dict[str, list[dict[str, float]]] = {}
        self.selected_k: int | None = None
        self.cache_entries: dict[str, str] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    # ---- data --------------------------------------------------------------------------------

    def _entries(self, role: str):
        datamodule = self.trainer.datamodule
        entries = split_cache_entries(
            self.encoder, self._fingerprint, datamodule, role, [self.spec], self.hparams.cache_dtype, self.trainer
        )
        self.cache_entries[role] = str(entries[self.spec.name].path)
        return entries

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "datasets"):
            raise ValueError("KNN needs an ImageClassificationData datamodule (it reads the train split as its bank)")
        if stage == "fit" and self.trainer.max_epochs != 0:
            raise ValueError(
                f"KNN has nothing to train but trainer.max_epochs is {self.trainer.max_epochs}; "
                "set trainer.max_epochs=0 (test_after_fit then tests), or run `d2v-eval test`"
            )
        self._fingerprint = weights_fingerprint(self.encoder)
        device = self.trainer.strategy.root_device
        if self.bank is None:
            entry = self._entries("train")[self.spec.name]
            self.bank = F.normalize(torch.from_numpy(entry.features[:].astype("float32")), dim=1).to(device)
            self.bank_labels = torch.from_numpy(entry.labels.astype("int64")).to(device)
        roles = {"validate": ["validation"], "test": ["test"]}.get(stage, [])
        for role in roles:
            if role in datamodule.datasets:
                datamodule.datasets[role] = CachedFeatures(self._entries(role))
        if stage in ("fit", "test") and self.selected_k is None and datamodule.splits.get("validation"):
            self._select_k_on_validation(device)

    def _select_k_on_validation(self, device: torch.device) -> None:
        """Score every k on the whole validation split (every process alike) and keep the best top-1."""
        entry = self._entries("validation")[self.spec.name]
        # Every process scores the whole split, so the counts are not summed over processes.
        metrics = MultiHeadMetrics(len(self.ks), self.hparams.num_classes, sync_on_compute=False).to(device)
        features = torch.from_numpy(entry.features[:].astype("float32")).to(device)
        labels = torch.from_numpy(entry.labels.astype("int64")).to(device)
        metrics.update(self._scores(features).clamp_min(1e-12).log(), labels)
        results = self._results(metrics)
        self.per_k["val"] = results
        best = max(range(len(self.ks)), key=lambda i: (results[i]["top1"], -results[i]["loss"], -i))
        self.selected_k = self.ks[best]
        self.eval_results["val"] = results[best]

    def _results(self, metrics: MultiHeadMetrics) -> list[dict[str, float]]:
        computed = metrics.compute()
        metrics.reset()
        return [head_results(computed, index) for index in range(len(self.ks))]

    # ---- evaluation --------------------------------------------------------------------------

    def _scores(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised kNN scores (B, len(ks), C) for features (B, D)."""
        queries = F.normalize(features.float(), dim=1)
        return knn_scores(
            queries, self.bank, self.bank_labels, self.ks, num_classes=self.hparams.num_classes,
            temperature=self.hparams.temperature,
        )

    def _batch_logits(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = batch
        if isinstance(inputs, dict):
            features, labels = inputs[self.spec.name][:, 0], labels[:, 0]
        else:
            features = extract_features(self.encoder, inputs, [self.spec])[self.spec.name]
        # The log of the normalised vote shares serves as logits, so the loss is a cross-entropy.
        return self._scores(features).clamp_min(1e-12).log(), labels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Log vote shares (B, num_classes) of the reported k for images (B, 3, H, W)."""
        logits, _ = self._batch_logits((images, None))
        return logits[:, self.ks.index(self.reported_k())]

    def reported_k(self) -> int:
        return self.selected_k if self.selected_k is not None else self.hparams.default_k

    def training_step(self, batch, batch_idx):
        raise RuntimeError("KNN has no trainable parameters; set trainer.max_epochs=0 or run `d2v-eval test`")

    def configure_optimizers(self):
        return None

    def on_validation_epoch_start(self):
        # A fresh state per epoch: under ddp_spawn on CPU the states arrive in memory shared by all ranks.
        self.val_ks.reset()

    def on_test_epoch_start(self):
        self.test_ks.reset()

    def validation_step(self, batch, batch_idx):
        self.val_ks.update(*self._batch_logits(batch))

    def on_validation_epoch_end(self):
        results = self._results(self.val_ks)
        if self.trainer.sanity_checking:
            return
        self.per_k["val"] = results
        best = max(range(len(self.ks)), key=lambda i: (results[i]["top1"], -results[i]["loss"], -i))
        self.selected_k = self.ks[best]
        self._publish("val", results[best])

    def test_step(self, batch, batch_idx):
        self.test_ks.update(*self._batch_logits(batch))

    def on_test_epoch_end(self):
        results = self._results(self.test_ks)
        self.per_k["test"] = results
        self._publish("test", results[self.ks.index(self.reported_k())])

    def _publish(self, stage: str, results: dict[str, float]) -> None:
        self.eval_results[stage] = results
        for name in METRIC_NAMES:
            self.log(f"{stage}/{name}", results[name], sync_dist=False, rank_zero_only=False)

    def record_extras(self, stage: str) -> dict:
        """Record fields: the feature spec, temperature, every k's metrics and the reported k."""
        datamodule = self.trainer.datamodule
        return {"knn": {
            "features": {"pooling": self.spec.pooling, "blocks": self.spec.blocks, "final_norm": self.spec.final_norm},
            "temperature": self.hparams.temperature,
            "k": self.ks,
            "reported_k": self.reported_k(),
            "selection_split": datamodule.splits.get("validation") if self.selected_k is not None else None,
            "per_k": {stage_name: {str(k): r for k, r in zip(self.ks, results)} for stage_name, results in self.per_k.items()},
            "feature_cache": {"dtype": self.hparams.cache_dtype, "entries": self.cache_entries},
        }}
