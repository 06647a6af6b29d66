"""The lab's real-model conversion cell (distill section, `convert`): skipped without the package, a bad key is one
error, and every number its report prints is a results.json field."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from seqlab.document import sourced
from seqlab.errors import InputError
from seqlab.lab.sections import distill

CELL = {
    "cell": "convert", "spec": {**distill.CONVERT_DEFAULTS}, "model": "smollm2.gguf",
    "plan": ["gated_deltanet"] * 3 + ["attention"], "order0_bits_per_byte": 4.714, "eval_tokens": 128,
    "eval_bytes": 431, "flops": 1.5e12, "scratch_steps": 3,
    "recipe": {"a": {"steps": 2}, "b": {"steps": 2, "batch_size": 1}, "seq_len_b": 32},
    "rows": [{"model": "teacher", "bits_per_byte": 0.91, "learned": True, "gap_closed": None},
             {"model": "a+b", "bits_per_byte": 4.61, "learned": False, "gap_closed": 0.375},
             {"model": "scratch", "bits_per_byte": 7.3, "learned": False, "gap_closed": None}],
    "decode": [{"model": "teacher", "context": 1024, "tokens_per_s": 21.5, "state_bytes": 47185920}],
    "continuations": [{"model": "a+b", "prompt": "def f(n):\n", "continuation": "    return n"}],
}


def test_a_missing_package_is_a_skip():
    got = distill.run_convert({**distill.CONVERT_DEFAULTS, "source": "no-such-package-xyz"}, None, False)
    assert "no-such-package-xyz" in got["skipped"]


def test_an_unknown_convert_key_is_one_error():
    with pytest.raises(InputError, match="distill.convert.step"):
        distill.Config(convert={"step": 3})
    assert [c.id for c in distill.plan(distill.Config(convert={"steps_a": 1}), None)][-1] == "convert"
    assert "convert" not in [c.id for c in distill.plan(distill.Config(), None)]


def test_the_report_flags_what_has_not_learned_and_prints_only_fields(tmp_path):
    log: list = []
    results = sourced({"config": distill.Config().to_dict(), "cells": [CELL]}, log)
    sec = distill.render(results, tmp_path)
    text = "\n".join(sec.texts())
    assert "NOT LEARNED" in text and "0.38" in text and "45.0 MiB" in text and "'    return n'" in text
    printed = Counter(n for t in sec.texts() for n in re.findall(r"\d+\.\d+|\d+", t))
    from_fields = Counter(n for s in log for n in re.findall(r"\d+\.\d+|\d+", s.text))
    assert printed - from_fields - Counter(re.findall(r"\d+\.\d+|\d+", "5% (a) (b) 3:1 def f order-0")) == Counter(), \
        printed - from_fields
