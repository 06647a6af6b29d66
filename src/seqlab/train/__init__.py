"""Training: one loop for every architecture."""

from seqlab.train.trainer import evaluate, fit, train

__all__ = ["evaluate", "fit", "train"]
