"""Fuzz the config schema: every field of every section (the run, the model, recurrent depth, every registered
mixer's section, training, the task) set to wrong types, non-finite, negative and huge values. A config is either
accepted, with every float finite, and then builds (or is refused for its size) and runs; or refused with one
`InputError`. Nothing else may escape: no TypeError, no allocator error, no torch error.

The field list is read from the dataclasses (`seqlab.config.SECTIONS` included), so a new mixer is fuzzed as soon
as it registers."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqlab
from seqlab.config import SECTIONS, ModelConfig, RecurrentDepthConfig, RunConfig, TrainConfig
from seqlab.data import make_task
from seqlab.data.tasks import task_class
from seqlab.errors import InputError
from seqlab.models import estimate_bytes

BASE_MODEL = {"vocab_size": 16, "d_model": 32, "n_layers": 1, "attention": {"n_heads": 4},
              "mamba": {"chunk_size": 8}, "gla": {"n_heads": 2, "chunk_size": 8}}
BASE_TASK = {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2}
BASE_TRAIN = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_batches": 1}
SMALL = 32 << 20  # configs estimated below this are built and run


def field_paths() -> list[tuple[str, ...]]:
    """Every leaf of the run config schema, as a path into its JSON form."""
    paths = [("train", f.name) for f in dataclasses.fields(TrainConfig)]
    paths += [("model", f.name) for f in dataclasses.fields(ModelConfig) if f.name not in ("sections", "depth")]
    paths += [("model", "depth", f.name) for f in dataclasses.fields(RecurrentDepthConfig)]
    paths += [("model", key, f.name) for key, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    paths += [("task", name) for name in inspect.signature(task_class("mqar")).parameters]
    paths += [("model", key) for key in SECTIONS] + [("model", "depth"), ("train",), ("eval_task",), ("task",)]
    return paths


PATHS = field_paths()
BAD = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1, -1.5, 0, 0.0, 2**31, 2**62, 2**100, -2**63, 1e308, 1e-308,
                     True, False, None, "", "x", "1", [], [1, 2], {}, {"a": 1}]),
    st.integers(-10, 100),
    st.floats(allow_nan=True, allow_infinity=True),
)


def set_path(config: dict, path: tuple[str, ...], value) -> dict:
    node = config
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return config


def floats_finite(obj, where: str = "") -> None:
    if isinstance(obj, float):
        assert math.isfinite(obj), f"accepted a non-finite {where} = {obj}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            floats_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            floats_finite(v, f"{where}[{i}]")


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(mixer=st.sampled_from(seqlab.available_mixers()), arch=st.sampled_from(["lm", "recurrent_depth"]),
       changes=st.lists(st.tuples(st.sampled_from(PATHS), BAD), min_size=1, max_size=3))
def test_bad_values_anywhere_in_the_schema_are_one_input_error(mixer, arch, changes):
    model = {**BASE_MODEL, "mixer": mixer}
    if arch == "recurrent_depth":
        model = {**{k: v for k, v in model.items() if k != "n_layers"}, "arch": arch,
                 "depth": {"prelude": 0, "core": 1, "coda": 0, "mean_steps": 2.0, "backprop_steps": 2}}
    config = copy.deepcopy({"model": model, "task": BASE_TASK, "train": BASE_TRAIN})  # set_path edits in place
    for path, value in changes:
        config = set_path(config, path, value)
    try:
        run = RunConfig.from_dict(config)
        task = make_task(run.task["name"], **{k: v for k, v in run.task.items() if k != "name"})
    except InputError:
        return
    floats_finite(run.to_dict(), "config")
    try:
        est = estimate_bytes(run.model, batch=run.train.batch_size, tokens=task.seq_len, training=True)
    except InputError:
        return
    if est.total > SMALL or run.model.vocab_size < task.vocab_size:
        return
    try:
        net = seqlab.build_model(run.model, seed=0)
    except InputError:
        return
    tokens = torch.randint(0, task.vocab_size, (1, 4))
    with torch.no_grad():
        logits, _ = net(tokens)
    assert logits.shape == (1, 4, run.model.vocab_size)


def test_every_section_is_fuzzed():
    """The derived field list covers every registered mixer section and every field of it."""
    keys = {p[1] for p in PATHS if p[0] == "model"}
    assert set(SECTIONS) <= keys
    assert len(PATHS) > 60
