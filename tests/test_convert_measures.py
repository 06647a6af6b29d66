"""seqlab.analysis.convert (what bench_convert and the lab's conversion cell measure), on a tiny teacher."""

from __future__ import annotations

import math

import torch
from test_convert import bpe, corpus, llama

import seqlab
from seqlab.analysis.convert import continuations, decode_speed, gap_closed, long_bits_per_byte, scratch_baseline
from seqlab.convert import training_flops
from seqlab.distill import read_as_teacher


def test_gap_closed():
    assert gap_closed(5.0, 3.0, 1.0) == 0.5 and gap_closed(5.0, 1.0, 1.0) == 1.0
    assert gap_closed(None, 3.0, 1.0) is None and gap_closed(1.0, 3.0, 1.0) is None


def test_decode_speed_reports_the_cache_of_the_context_and_a_fixed_recurrent_state():
    teacher = llama(vocab_size=300)
    student, _ = seqlab.convert(teacher, "3:1 gated_deltanet:attention")
    a, b = decode_speed(teacher, 64, 2), decode_speed(teacher, 128, 2)
    assert b["state_bytes"] == 2 * a["state_bytes"] == teacher.state_bytes(128) and b["tokens_per_s"] > 0
    s64, s128 = decode_speed(student, 64, 2)["state_bytes"], decode_speed(student, 128, 2)["state_bytes"]
    assert s128 - s64 == teacher.blocks[3].mixer.state_bytes(64)  # only the attention layer grows


def test_long_bits_per_byte_equals_one_forward_and_the_scratch_baseline_matches_the_flops(tmp_path):
    teacher = llama(vocab_size=300)
    teacher.tokenizer = bpe()
    task = read_as_teacher(teacher, corpus(tmp_path))
    got = long_bits_per_byte(teacher, task, 40, 25, 16)
    ids = torch.from_numpy(task.data[:41])
    with torch.no_grad():
        nats = torch.nn.functional.cross_entropy(teacher(ids[None, :-1])[0][0], ids[1:], reduction="none")
    nb = torch.from_numpy(task.nbytes[1:41])
    assert math.isclose(got["bits_per_byte_after"], float(nats[25:].sum() / nb[25:].sum() / math.log(2)),
                        rel_tol=1e-4)
    rows = continuations(teacher, ("def f",), 3)
    assert rows[0]["prompt"] == "def f" and isinstance(rows[0]["continuation"], str)
    p = {"seq_len": 8, "batch": 2, "lr_scratch": 1e-3, "device": "cpu", "precision": "fp32", "eval_windows": 1,
         "eval_seq_len": 8}
    per_step = training_flops(teacher, teacher, "scratch", 8) * 2 * 8
    out = scratch_baseline(teacher, task, p, 3.4 * per_step, task, False)
    assert out["steps"] == 3 and out["flops"] == 3 * per_step and out["test"]["tokens"] == 8
