"""Training: one loop for every architecture (`fit`), a whole run into a folder (`train`), evaluation."""

from seqlab.train.trainer import TrainingDiverged, evaluate, fit, train

__all__ = ["TrainingDiverged", "evaluate", "fit", "train"]
