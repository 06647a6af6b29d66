"""Tasks and data: synthetic tasks that separate architectures, and a byte-level corpus of real text.

    task = make_task("mqar", vocab_size=64, seq_len=64, num_pairs=8)
    batch = task.batch(32, torch.Generator().manual_seed(0))   # Batch(inputs, targets, mask)
    loss = masked_cross_entropy(logits, batch)
"""

from seqlab.data.batch import Batch, Metrics, Task, accuracy_by_length, masked_cross_entropy, task_metrics
from seqlab.data.corpus import Corpus, CorpusStream, CorpusTask, load_corpus
from seqlab.data.tasks import MQAR, Copy, Induction, PrefixParity, SelectiveCopy, available_tasks, make_task, task_class

__all__ = [
    "MQAR",
    "Batch",
    "Copy",
    "Corpus",
    "CorpusStream",
    "CorpusTask",
    "Induction",
    "Metrics",
    "PrefixParity",
    "SelectiveCopy",
    "Task",
    "accuracy_by_length",
    "available_tasks",
    "load_corpus",
    "make_task",
    "masked_cross_entropy",
    "task_class",
    "task_metrics",
]
