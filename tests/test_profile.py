"""The memory/latency profiler: end to end on tiny settings, every documented JSON field, the state formulas, the
crossover logic and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import seqlab
from seqlab.cli import main
from seqlab.config import ModelConfig
from seqlab.infer.profile import (
    CELL_FIELDS,
    CROSSOVER_FIELDS,
    MODEL_FIELDS,
    PLOTS,
    TOP_FIELDS,
    ProfileConfig,
    crossovers,
    format_table,
    run_cell,
    run_profile,
    state_bytes_formula,
)

TINY = dict(d_model=32, n_layers=2, vocab_size=37, chunk=16, decode_steps=3, warmup=1, repeats=2, threads=1,
            model={"attention": {"n_heads": 4, "window": 8}, "mamba": {"chunk_size": 8}, "gla": {"n_heads": 2}})


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """One in-process profile of four mixers at three contexts, with plots (a few seconds); in-process, the models
    are built under inference_mode, as in a real cell."""
    out = tmp_path_factory.mktemp("plots")
    cfg = ProfileConfig(mixers=("attention", "sliding_attention", "gru", "mamba"), contexts=(4, 24, 40), isolate=False,
                        **TINY)
    return run_profile(cfg, plot_dir=out), out


def test_profile_json_has_every_documented_field(profile):
    results, out = profile
    assert set(results) == set(TOP_FIELDS)
    json.loads(json.dumps(results))  # JSON-ready as it is
    assert [m["mixer"] for m in results["models"]] == ["attention", "sliding_attention", "gru", "mamba"]
    for m in results["models"]:
        assert set(MODEL_FIELDS) <= set(m)
    assert len(results["cells"]) == 12
    for c in results["cells"]:
        assert "error" not in c, c
        assert set(c) == set(CELL_FIELDS)
        assert c["decode_latency_p10_s"] <= c["decode_latency_s"] <= c["decode_latency_p90_s"]
        assert 0 <= c["decode_cpu_s"] and 0 <= c["prefill_cpu_seconds"]
        assert c["decode_steps"] == 3 and 1 <= c["prefill_repeats"] <= 2 and c["prefill_chunk"] == 16
        assert c["prefill_tokens_per_s"] == pytest.approx(c["context"] / c["prefill_seconds"])
        assert c["peak_memory_bytes"] == max(c["peak_memory_prefill_bytes"], c["peak_memory_decode_bytes"]) > 0
        assert c["state_allocated_bytes"] >= c["state_bytes"]
    assert [x["mixer"] for x in results["crossover"]] == ["sliding_attention", "gru", "mamba"]
    for x in results["crossover"]:
        assert set(x) == set(CROSSOVER_FIELDS)
    assert sorted(p.split("/")[-1] for p in results["plots"]) == sorted([*PLOTS, "profile.png"])
    for name in [*PLOTS, "profile.png"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(results)
    assert "median of 3 steps" in table and "up to 2 runs" in table


def test_profile_state_bytes_follow_the_formulas(profile):
    results, _ = profile
    cells = {(c["mixer"], c["context"]): c for c in results["cells"]}
    for c in cells.values():
        assert c["state_bytes"] == c["state_bytes_formula"]
    entry = 2 * 2 * 4 * 8 * 4  # K and V x layers x heads x head_dim x fp32 bytes, per token
    assert [cells[("attention", t)]["state_bytes"] for t in (4, 24, 40)] == [entry * t for t in (4, 24, 40)]
    # the sliding window holds the last 8 tokens: flat beyond the window
    assert [cells[("sliding_attention", t)]["state_bytes"] for t in (4, 24, 40)] == [entry * 4, entry * 8, entry * 8]
    assert len({cells[("gru", t)]["state_bytes"] for t in (4, 24, 40)}) == 1


@pytest.mark.parametrize("mixer", seqlab.available_mixers())
def test_state_formula_equals_nbytes(mixer):
    cfg = ModelConfig.from_dict({"mixer": mixer, "vocab_size": 37, "d_model": 48, "n_layers": 2,
                                 "attention": {"n_heads": 4, "n_kv_heads": 2, "window": 6},
                                 "gla": {"n_heads": 2}, "rnn": {"d_hidden": 40}})
    model = seqlab.build_model(cfg, seed=0).eval()
    with torch.inference_mode():
        for T in (1, 9):
            _, state = model(torch.randint(0, 37, (3, T)))
            assert state.nbytes == state_bytes_formula(cfg, T, batch=3)


def test_models_are_matched_in_parameter_count(profile):
    results, _ = profile
    target = results["models"][0]["params"]  # attention sets the target
    for m in results["models"]:
        assert abs(m["params"] - target) / target < 0.2, m


def test_isolated_cell_measures_in_a_fresh_process():
    cfg = ProfileConfig(mixers=("lstm",), contexts=(20,), **TINY)
    model = seqlab.infer.profile.resolve_models(cfg)["lstm"]
    spec = {"mixer": "lstm", "model": model.to_dict(), "context": 20, "batch": 2, "chunk": 8, "decode_steps": 2,
            "warmup": 1, "repeats": 1, "long_prefill_s": 5.0, "threads": 1, "device": "cpu", "seed": 0}
    cell = run_cell(spec, isolate=True, timeout_s=300)
    assert "error" not in cell, cell
    assert set(CELL_FIELDS) <= set(cell) and cell["memory_method"].startswith("peak RSS")
    assert cell["state_bytes"] == cell["state_bytes_formula"] == 2 * 2 * 2 * model.rnn.hidden(model.d_model) * 4
    assert cell["peak_memory_bytes"] > 20 * 2**20  # a whole Python process with torch, not a tensor's bytes


def test_a_failing_cell_is_recorded_not_raised():
    cfg = ProfileConfig(mixers=("gru",), contexts=(8,), **TINY)
    spec = {"mixer": "gru", "model": {**cfg.to_dict()["model"], "mixer": "gru", "d_model": -1}, "context": 8,
            "batch": 1, "chunk": 8, "decode_steps": 2, "warmup": 0, "repeats": 1, "long_prefill_s": 5.0,
            "threads": 1, "device": "cpu", "seed": 0}
    assert "d_model" in run_cell(spec, isolate=False, timeout_s=60)["error"]


def _cells(latencies: dict[str, list[float]], contexts=(256, 1024, 4096)) -> list[dict]:
    return [{"mixer": m, "context": c, "decode_latency_s": t} for m, ts in latencies.items()
            for c, t in zip(contexts, ts)]


def test_crossover_is_interpolated_on_the_log_log_curves():
    cells = _cells({"attention": [1.0, 2.0, 4.0], "gru": [2.0, 2.0, 2.0], "gla": [0.5, 0.5, 0.5],
                    "mamba": [3.0, 3.0, 5.0]})
    cells.append({"mixer": "conv", "context": 256, "error": "killed"})
    x = {c["mixer"]: c for c in crossovers(cells)}
    assert x["gru"]["status"] == "crosses" and x["gru"]["bracket"] == [1024, 4096]
    # ratio gru/attention: 1 at 1024, 0.5 at 4096 -> equal at 1024 exactly (the last context where it is not faster)
    assert x["gru"]["context"] == pytest.approx(1024)
    assert x["gru"]["speedup_at_largest_context"] == pytest.approx(2.0)
    assert x["gla"]["status"] == "faster_at_every_context" and x["gla"]["context"] is None
    assert x["mamba"]["status"] == "slower_at_largest_context" and x["mamba"]["bracket"] is None
    assert "conv" not in x  # no measured context in common with attention
    y = crossovers(_cells({"attention": [1.0, 1.0], "gru": [2.0, 0.5]}, contexts=(100, 10000)))[0]
    assert y["context"] == pytest.approx(1000)  # ratio 2 -> 0.5: geometric midpoint
    assert crossovers(_cells({"gru": [1.0]})) == []


@pytest.mark.parametrize("kwargs, msg", [({"mixers": ("transformer",)}, "mixer 'transformer' is not available"),
                                          ({"contexts": (0,)}, "contexts"), ({"decode_steps": 0}, "decode_steps"),
                                          ({"device": "tpu"}, "device"), ({"warmup": -1}, "warmup")])
def test_profile_config_rejects_bad_values(kwargs, msg):
    with pytest.raises(seqlab.InputError, match=msg):
        ProfileConfig(**kwargs)


def test_cli_profile_json_and_out(tmp_path, capsys):
    argv = ["profile", "--mixers", "gla,attention", "--contexts", "8", "--d-model", "32", "--layers", "1",
            "--vocab-size", "37", "--chunk", "8", "--decode-steps", "2", "--warmup", "0", "--repeats", "1",
            "--threads", "1", "--no-isolate", "--no-progress", "--set", "gla.n_heads=2", "--json",
            "--out", str(tmp_path / "p.json")]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["mixers"] == ["gla", "attention"] and printed["config"]["isolate"] is False
    assert json.loads((tmp_path / "p.json").read_text())["cells"] == printed["cells"]
    assert main(["profile", "--mixers", "rwkv", "--no-progress"]) == 2
    assert "rwkv" in capsys.readouterr().err
