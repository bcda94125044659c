"""Evaluation protocols as LightningModules."""

from d2v_eval.protocols.base import ClassificationModule
from d2v_eval.protocols.finetune import FineTune
from d2v_eval.protocols.knn import KNN
from d2v_eval.protocols.linear_probe import LinearProbe

__all__ = ["KNN", "ClassificationModule", "FineTune", "LinearProbe"]
