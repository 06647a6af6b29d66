"""ONNX export: the graphs equal the model in PyTorch (always) and in onnxruntime (when installed), for every
mixer's step and for the prefill graph, with a batch other than the traced one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import need_onnx

import seqlab
from seqlab.cli import main
from seqlab.errors import InputError
from seqlab.interop.export import ExportGraph, export_onnx, onnx_session, run_session, verify_onnx

MIXERS = tuple(seqlab.available_mixers())  # a new mixer is exported and checked here with no change to this file


@pytest.fixture(scope="module")
def hybrid():
    """One layer of every mixer, so one export covers every step; a short window so the sliding mask matters."""
    return seqlab.build_model(layers=MIXERS, d_model=16, vocab_size=23, attention={"n_heads": 2, "window": 3},
                              gla={"n_heads": 2, "gate_low_rank": 4}, mamba={"d_state": 4}, seed=0).eval()


def test_graph_in_pytorch_equals_model_prefill_then_steps(hybrid):
    """Prefill 5 tokens, then decode 6 one at a time, through the graph's tensors: same logits as the model."""
    graph = ExportGraph(hybrid, cache_size=16)
    tokens = torch.randint(0, 23, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = hybrid(tokens)
        out, *state = graph(tokens[:, :5], torch.tensor([0]), *graph.zero_state(2))
        logits = [out]
        for p in range(5, 11):
            out, *state = graph(tokens[:, p:p + 1], torch.tensor([p]), *state)
            logits.append(out)
    assert (torch.cat(logits, dim=1) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["step", "prefill"])
def test_onnxruntime_equals_pytorch_every_mixer(hybrid, tmp_path, mode):
    need_onnx()
    info = export_onnx(hybrid, tmp_path / "m.onnx", mode=mode, length=4, cache_size=16)
    assert info["length"] == (1 if mode == "step" else 4)
    attention, lstm = MIXERS.index("attention"), MIXERS.index("lstm")
    assert info["state_shapes"][f"state.{attention}.k"] == ["batch", 2, "cache", 8]  # the fixed-size cache
    assert info["state_shapes"][f"state.{lstm}.h"] == [1, "batch", 16]  # lstm: torch's (1, B, Dh) layout
    check = verify_onnx(hybrid, tmp_path / "m.onnx", info, batch=3, cache_size=11)  # traced with 2 and 16
    assert check["calls"] == 2
    assert check["max_abs_diff_logits"] <= 1e-4 and check["max_abs_diff_state"] <= 1e-4


def test_learned_positions_and_biases_export(tmp_path):
    need_onnx()
    model = seqlab.build_model(mixer="attention", d_model=16, n_layers=1, vocab_size=19, position="learned",
                               max_positions=32, norm="layernorm", mlp="gelu_tanh", mlp_bias=True,
                               attention={"n_heads": 2, "bias": True, "n_kv_heads": 1}, seed=1).eval()
    info = export_onnx(model, tmp_path / "g.onnx", mode="prefill", length=3, cache_size=8)
    check = verify_onnx(model, tmp_path / "g.onnx", info)
    assert check["max_abs_diff_logits"] <= 1e-4


def test_cli_exports_and_verifies(tmp_path, capsys):
    need_onnx()
    model = seqlab.build_model(mixer="mamba", d_model=16, n_layers=1, vocab_size=11, seed=0).eval()
    seqlab.save(model, tmp_path / "c")
    assert main(["export-onnx", str(tmp_path / "c"), "--out", str(tmp_path / "s.onnx"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["verified"]["max_abs_diff_logits"] <= 1e-4, printed
    # the printed check, recomputed here: 3 rows of random tokens (seed 0), a step from the zero state and a step
    # from the state reached, the largest difference of the logits over both
    session, g = onnx_session(tmp_path / "s.onnx"), torch.Generator().manual_seed(0)
    ort_state, torch_state, worst = ExportGraph(model, 1024).zero_state(3), None, 0.0
    for pos in range(printed["verified"]["calls"]):
        tokens = torch.randint(0, 11, (3, 1), generator=g)
        logits, ort_state = run_session(session, tokens, pos, ort_state)
        with torch.no_grad():
            ref, torch_state = model(tokens, torch_state)
        worst = max(worst, float(np.abs(logits - ref.numpy()).max()))
    assert printed["verified"]["calls"] == 2 and printed["verified"]["max_abs_diff_logits"] == worst
    # the file runs in onnxruntime on its own and gives this model's logits, token after token
    session, tokens = onnx_session(tmp_path / "s.onnx"), torch.tensor([[3, 1, 4, 1, 5]])
    state, got = ExportGraph(model, 8).zero_state(1), []
    for p in range(tokens.shape[1]):
        logits, state = run_session(session, tokens[:, p:p + 1], p, state)
        got.append(logits)
    with torch.no_grad():
        expected = model(tokens)[0].numpy()
    assert np.abs(np.concatenate(got, axis=1) - expected).max() <= 1e-4


def test_bad_input(tmp_path, capsys, hybrid):
    seqlab.save(hybrid, tmp_path / "c")
    cases = [
        (["--mode", "decode"], "mode 'decode' is not supported"),
        (["--mode", "prefill", "--length", "40", "--cache-size", "16"], "larger than cache_size = 16"),
        (["--cache-size", "0"], "cache_size = 0: must be a positive integer"),
    ]
    for extra, message in cases:
        assert main(["export-onnx", str(tmp_path / "c"), "--out", str(tmp_path / "x.onnx"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("seqlab: error:") and message in err, err
    assert main(["export-onnx", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    depth = seqlab.build_model(arch="recurrent_depth", d_model=16, vocab_size=11, seed=0)
    with pytest.raises(InputError, match="recurrent-depth models"):
        ExportGraph(depth, cache_size=8)
