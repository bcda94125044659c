"""d2v-eval: evaluate Data2Vec-Vision (BEiT) image encoders by linear probe and fine-tuning."""

from d2v_eval.data import ImageClassificationData
from d2v_eval.protocols import KNN, FineTune, LinearProbe

__version__ = "0.1.0"
__all__ = ["KNN", "FineTune", "ImageClassificationData", "LinearProbe", "__version__"]
