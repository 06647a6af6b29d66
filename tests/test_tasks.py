"""Synthetic tasks: shapes, determinism, masks, the docstring worked examples, metrics and bad parameters."""

import math
import re

import pytest
import torch

from seqlab.data import (
    MQAR,
    Batch,
    Copy,
    Induction,
    Metrics,
    PrefixParity,
    SelectiveCopy,
    Task,
    accuracy_by_length,
    available_tasks,
    make_task,
    masked_cross_entropy,
    task_metrics,
)
from seqlab.errors import InputError

SMALL = {
    "mqar": dict(vocab_size=32, seq_len=40, num_pairs=6),
    "selective_copy": dict(vocab_size=10, seq_len=30, num_tokens=5),
    "induction": dict(vocab_size=12, seq_len=20),
    "copy": dict(vocab_size=10, seq_len=21),
    "prefix_parity": dict(seq_len=17),
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# reference checkers: plain Python loops that say what each encoding must be


def check_mqar(inputs, targets, mask, V, P):
    half, context = V // 2, inputs[: 2 * P]
    keys, values = context[0::2], context[1::2]
    assert len(set(keys)) == P and all(0 <= k < half for k in keys)
    assert all(half <= v < V for v in values)
    value_of = dict(zip(keys, values, strict=True))
    queried = [t for t in range(len(inputs)) if mask[t]]
    assert sorted(inputs[t] for t in queried) == sorted(keys)  # every key queried exactly once
    for t in queried:
        assert t >= 2 * P and (t - 2 * P) % 2 == 0
        assert targets[t] == value_of[inputs[t]]


def check_selective_copy(inputs, targets, mask, V, K):
    T = len(inputs)
    data = [x for x in inputs[: T - K] if x != SelectiveCopy.NOISE]
    assert len(data) == K and all(2 <= x < V for x in data)
    assert inputs[T - K :] == [SelectiveCopy.MARKER] * K
    assert mask == [False] * (T - K) + [True] * K
    assert targets[T - K :] == data


def check_induction(inputs, targets, mask, V):
    trigger, T = V - 1, len(inputs)
    where = [t for t in range(T - 1) if inputs[t] == trigger]
    assert len(where) == 1 and where[0] <= T - 3 and inputs[-1] == trigger
    assert mask == [False] * (T - 1) + [True]
    assert targets[-1] == inputs[where[0] + 1]


def check_copy(inputs, targets, mask, V):
    n = inputs.index(Copy.SEP)
    string = inputs[:n]
    assert all(2 <= x < V for x in string)
    assert inputs[n + 1 : 2 * n + 1] == string
    assert all(x == Copy.PAD for x in inputs[2 * n + 1 :])
    assert mask == [n <= t < 2 * n for t in range(len(inputs))]
    assert targets[n : 2 * n] == string


def check_prefix_parity(inputs, targets, mask):
    parity = 0
    for x, y in zip(inputs, targets, strict=True):
        parity ^= x
        assert y == parity
    assert all(mask)


def check(name, params, inputs, targets, mask):
    V = params.get("vocab_size")
    if name == "mqar":
        check_mqar(inputs, targets, mask, V, params["num_pairs"])
    elif name == "selective_copy":
        check_selective_copy(inputs, targets, mask, V, params["num_tokens"])
    elif name == "induction":
        check_induction(inputs, targets, mask, V)
    elif name == "copy":
        check_copy(inputs, targets, mask, V)
    else:
        check_prefix_parity(inputs, targets, mask)


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL))
def test_shapes_dtypes_and_protocol(name):
    task = make_task(name, **SMALL[name])
    assert isinstance(task, Task) and task.name == name
    batch = task.batch(5, gen())
    for t in (batch.inputs, batch.targets):
        assert t.shape == (5, task.seq_len) and t.dtype == torch.int64
    assert batch.mask.shape == (5, task.seq_len) and batch.mask.dtype == torch.bool
    assert 0 <= batch.inputs.min() and batch.inputs.max() < task.vocab_size
    assert 0 <= batch.targets[batch.mask].min() and batch.targets[batch.mask].max() < task.vocab_size


@pytest.mark.parametrize("name", list(SMALL))
def test_deterministic_under_a_seed(name):
    task = make_task(name, **SMALL[name])
    a, b, c = task.batch(8, gen(1)), task.batch(8, gen(1)), task.batch(8, gen(2))
    for x, y in ((a.inputs, b.inputs), (a.targets, b.targets), (a.mask, b.mask)):
        assert torch.equal(x, y)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", list(SMALL))
def test_encoding_matches_the_reference_loop(name):
    """Every row of a seeded batch follows the encoding (and the mask covers exactly the answers)."""
    params = SMALL[name]
    batch = make_task(name, **params).batch(64, gen(3))
    for row in range(64):
        check(name, params, batch.inputs[row].tolist(), batch.targets[row].tolist(), batch.mask[row].tolist())


def parse_docstring_example(cls):
    """The inputs / targets / mask rows of a task's docstring table ('.' = not counted, 'f' = filler)."""
    rows = {}
    for line in cls.__doc__.splitlines():
        words = line.split()
        if words and words[0] in ("inputs", "targets", "mask"):
            cells = [w for w in re.sub(r"\(.*\)", "", line).split()[1:] if w != "|"]
            rows[words[0]] = cells
    inputs = [int(x) if x != "f" else None for x in rows["inputs"]]
    targets = [int(x) if x != "." else 0 for x in rows["targets"]]
    mask = [x == "1" for x in rows["mask"]]
    return inputs, targets, mask


@pytest.mark.parametrize(
    "cls, params",
    [
        (MQAR, dict(vocab_size=16, num_pairs=2)),
        (SelectiveCopy, dict(vocab_size=8, num_tokens=3)),
        (Induction, dict(vocab_size=8)),
        (Copy, dict(vocab_size=8)),
        (PrefixParity, dict()),
    ],
)
def test_docstring_worked_example(cls, params):
    inputs, targets, mask = parse_docstring_example(cls)
    inputs = [x if x is not None else 1 for x in inputs]  # MQAR filler: any non-query token will do
    assert len(inputs) == len(targets) == len(mask)
    check(cls.name, params, inputs, targets, mask)
    make_task(cls.name, seq_len=len(inputs), **params)  # the example's sizes are valid parameters


def test_mqar_examples_by_value():
    """A fixed example: the context defines the pairs, targets appear only at the query positions."""
    V, P = 16, 2
    inputs = [3, 12, 6, 9, 6, 1, 1, 1, 3, 1, 1, 1]
    targets = [0, 0, 0, 0, 9, 0, 0, 0, 12, 0, 0, 0]
    mask = [t in (4, 8) for t in range(12)]
    check_mqar(inputs, targets, mask, V, P)
    with pytest.raises(AssertionError):
        check_mqar(inputs, [0, 0, 0, 0, 12, 0, 0, 0, 9, 0, 0, 0], mask, V, P)  # swapped values are wrong


def test_mqar_queries_are_biased_toward_the_context():
    task = make_task("mqar", vocab_size=64, seq_len=256, num_pairs=8)
    batch = task.batch(256, gen())
    where = batch.mask.nonzero()[:, 1].float()
    first_half_of_queries = (where < 2 * 8 + (256 - 16) / 2).float().mean()
    assert first_half_of_queries > 0.6  # uniform gaps would give ~0.5


def test_parity_and_induction_lengths_are_free():
    for T in (8, 32, 128):
        b = make_task("prefix_parity", seq_len=T).batch(3, gen())
        assert b.inputs.shape == (3, T) and torch.equal(b.targets, b.inputs.cumsum(1) % 2)
    short, long = make_task("induction", seq_len=16), make_task("induction", seq_len=64)
    assert long.batch(2, gen()).inputs.shape == (2, 64) and short.vocab_size == long.vocab_size


def test_copy_lengths_cover_the_range_and_by_length_metric():
    task = make_task("copy", vocab_size=10, seq_len=21, min_len=2, max_len=6)
    batch = task.batch(200, gen())
    lengths = batch.mask.sum(1)
    assert set(lengths.tolist()) == {2, 3, 4, 5, 6}
    logits = torch.nn.functional.one_hot(batch.targets, 10).float() * 10
    logits[lengths == 6, :, :] = 0  # every length-6 string wrong (uniform logits pick token 0)
    by_length = accuracy_by_length(logits, batch)
    assert by_length == {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 0.0}
    fixed = make_task("copy", vocab_size=10, seq_len=21, min_len=10, max_len=10).batch(4, gen())
    assert (fixed.mask.sum(1) == 10).all()


# ---------------------------------------------------------------------------------------------------------
# loss and metrics


def test_masked_cross_entropy_counts_only_masked_positions():
    batch = make_task("mqar", **SMALL["mqar"]).batch(4, gen())
    logits = torch.randn(4, 40, 32, generator=gen(5))
    loss = masked_cross_entropy(logits, batch)
    manual = torch.nn.functional.cross_entropy(logits[batch.mask], batch.targets[batch.mask])
    assert torch.allclose(loss, manual)
    noisy = logits.clone()
    noisy[~batch.mask] = torch.randn_like(noisy[~batch.mask])
    assert torch.equal(masked_cross_entropy(noisy, batch), loss)
    assert masked_cross_entropy(logits.bfloat16(), batch).dtype == torch.float32


def test_masked_cross_entropy_with_nothing_masked_is_zero_and_differentiable():
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                  torch.zeros(2, 3, dtype=torch.bool))
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = masked_cross_entropy(logits, batch)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_task_metrics_accuracy_and_sequence_accuracy():
    batch = make_task("selective_copy", **SMALL["selective_copy"]).batch(4, gen())
    perfect = torch.nn.functional.one_hot(batch.targets, 10).float() * 20
    m = task_metrics(perfect, batch)
    assert m["accuracy"] == 1.0 and m["seq_accuracy"] == 1.0 and m["loss"] < 1e-6
    assert "bits_per_byte" not in m
    wrong_unmasked = perfect.clone()
    wrong_unmasked[0, 0] = wrong_unmasked[0, 0].roll(1)  # position 0 is never masked here
    assert task_metrics(wrong_unmasked, batch)["accuracy"] == 1.0
    one_wrong = perfect.clone()
    one_wrong[0, -1] = one_wrong[0, -1].roll(1)
    m = task_metrics(one_wrong, batch)
    assert m["accuracy"] == pytest.approx(1 - 1 / 20) and m["seq_accuracy"] == 0.75


def test_metrics_accumulate_weighted_by_tokens():
    task = make_task("copy", **SMALL["copy"])
    a, b = task.batch(3, gen(1)), task.batch(5, gen(2))
    la, lb = torch.randn(3, 21, 10, generator=gen(3)), torch.randn(5, 21, 10, generator=gen(4))
    both = Batch(*(torch.cat([getattr(a, k), getattr(b, k)]) for k in ("inputs", "targets", "mask")))
    joint = task_metrics(torch.cat([la, lb]), both)
    acc = Metrics().update(la, a).update(lb, b).compute()
    for key in joint:
        assert acc[key] == pytest.approx(joint[key], rel=1e-5)


def test_bits_per_byte_for_byte_level_batches():
    batch = Batch(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                  torch.ones(2, 4, dtype=torch.bool), byte_level=True)
    m = task_metrics(torch.zeros(2, 4, 256), batch)  # uniform over 256 bytes: 8 bits per byte
    assert m["bits_per_byte"] == pytest.approx(8.0) and m["loss"] == pytest.approx(math.log(256))


def test_batch_row_slice():
    batch = make_task("prefix_parity", seq_len=5).batch(6, gen())
    part = batch[2:4]
    assert len(part) == 2 and torch.equal(part.inputs, batch.inputs[2:4])


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_available_tasks():
    names = {"mqar", "selective_copy", "induction", "copy", "prefix_parity", "corpus"}
    assert set(available_tasks()) == names


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(InputError, match="unknown task 'mqra'.*mqar.*corpus"):
        make_task("mqra")


def test_unknown_parameter_is_an_input_error():
    with pytest.raises(InputError, match="unknown parameter 'pairs'.*num_pairs"):
        make_task("mqar", pairs=4)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("mqar", dict(vocab_size=64, seq_len=64, num_pairs=17), "does not fit in seq_len = 64"),
        ("mqar", dict(vocab_size=16, seq_len=256, num_pairs=9), "only 8"),
        ("mqar", dict(vocab_size=64, seq_len=64, num_pairs=0), "num_pairs = 0 must be >= 1"),
        ("mqar", dict(vocab_size=64, seq_len=64.0), "seq_len = 64.0 must be an integer"),
        ("selective_copy", dict(seq_len=10, num_tokens=6), "does not fit"),
        ("copy", dict(seq_len=10, max_len=5), "does not fit"),
        ("copy", dict(seq_len=21, min_len=8, max_len=5), "min_len = 8 must be <= max_len = 5"),
        ("induction", dict(seq_len=2), "seq_len = 2 must be >= 3"),
        ("prefix_parity", dict(seq_len=True), "must be an integer"),
    ],
)
def test_impossible_parameters(name, params, message):
    with pytest.raises(InputError, match=re.escape(message)):
        make_task(name, **params)


def test_bad_batch_size_and_logits_shape():
    task = make_task("induction", seq_len=8)
    with pytest.raises(InputError, match="batch_size = 0"):
        task.batch(0, gen())
    batch = task.batch(2, gen())
    with pytest.raises(InputError, match="do not match the batch"):
        masked_cross_entropy(torch.zeros(2, 7, 16), batch)
