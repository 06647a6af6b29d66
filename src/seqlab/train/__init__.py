"""Training: one loop for every architecture and objective (`fit`), a whole run into a folder (`train`),
evaluation; batch sources (`task_batches`) and loss functions (`cross_entropy`, `recurrent_depth`)."""

from seqlab.train.batches import RandomBatches, StreamBatches, task_batches
from seqlab.train.losses import Loss, cross_entropy, recurrent_depth
from seqlab.train.trainer import TrainingDiverged, evaluate, fit, train

__all__ = ["Loss", "RandomBatches", "StreamBatches", "TrainingDiverged", "cross_entropy", "evaluate", "fit",
           "recurrent_depth", "task_batches", "train"]
