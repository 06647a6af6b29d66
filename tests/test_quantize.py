"""Weight-only int8: about a quarter of the fp32 linear weights on disk, logits close to fp32, recurrence
parameters and states kept fp32, and a checkpoint `seqlab.load` reads back exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import need_onnx

import seqlab
from seqlab.cli import main
from seqlab.errors import InputError
from seqlab.interop.quantize import Int8Linear, linear_bytes, quantize, save_quantized


@pytest.fixture(scope="module")
def model():
    return seqlab.build_model(layers=("mamba", "gla", "attention", "lstm"), d_model=64, vocab_size=32,
                              gla={"n_heads": 2}, seed=0).eval()


def _tokens(V=32, B=2, T=24):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))


def test_int8_is_a_quarter_of_the_linear_weights_and_logits_stay_close(model, tmp_path):
    seqlab.save(model, tmp_path / "fp32")
    q = quantize(copy.deepcopy(model))
    save_quantized(q, tmp_path / "int8")
    before, after = linear_bytes(model), linear_bytes(q)
    assert 0.25 <= after["held"] / before["fp32"] <= 0.25 + 1 / 64 + 1e-9  # int8 + one fp32 scale per row of 64
    fp32_size = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    int8_size = (tmp_path / "int8" / "model.safetensors").stat().st_size
    saved = fp32_size - int8_size
    assert abs(saved - (before["fp32"] - after["held"])) < 0.02 * fp32_size  # the whole saving is the linears
    tokens = _tokens()
    with torch.no_grad():
        a, b = model(tokens)[0], q(tokens)[0]
    assert (a - b).abs().max() <= 0.02 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_recurrence_parameters_and_states_stay_fp32(model):
    q = quantize(copy.deepcopy(model))
    mamba, gla = q.blocks[0].mixer, q.blocks[1].mixer
    assert isinstance(mamba.in_proj, Int8Linear) and isinstance(gla.q_proj, Int8Linear)
    for kept in (mamba.dt_proj, gla.gk_down, gla.gk_up):
        assert type(kept) is torch.nn.Linear and kept.weight.dtype == torch.float32
    assert mamba.A_log.dtype == torch.float32 and q.blocks[3].mixer.rnn.weight_hh_l0.dtype == torch.float32
    assert torch.equal(mamba.A_log, model.blocks[0].mixer.A_log)
    with torch.no_grad():
        _, state = q(_tokens())
    assert all(t.dtype == torch.float32 for s in state.layers for t in s.tensors().values())


def test_load_round_trip_is_exact_and_streams(model, tmp_path):
    q = quantize(copy.deepcopy(model))
    save_quantized(q, tmp_path / "int8")
    loaded = seqlab.load(tmp_path / "int8").eval()
    assert loaded.blocks[2].mixer.wq.weight.dtype == torch.int8
    tokens = _tokens()
    with torch.no_grad():
        expected, _ = q(tokens)
        got, _ = loaded(tokens)
        head, state = loaded(tokens[:, :10])
        tail, _ = loaded(tokens[:, 10:], state)  # a state carried across calls, as for any model
    assert torch.equal(got, expected)
    assert (torch.cat([head, tail], 1) - expected).abs().max() <= 1e-4


def test_cli_reports_size_and_task_quality(tmp_path, capsys):
    model = seqlab.build_model(layers=("mamba", "attention"), d_model=64, vocab_size=32, seed=0)
    seqlab.save(model, tmp_path / "fp32")
    args = ["quantize", str(tmp_path / "fp32"), "--out", str(tmp_path / "int8"), "--task", "mqar",
            "--set", "vocab_size=32", "--set", "seq_len=32", "--set", "num_pairs=4", "--batches", "1",
            "--batch-size", "8", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_file_bytes"]["int8"] < 0.45 * report["model_file_bytes"]["fp32"]
    assert set(report["task"]["change"]) >= {"loss", "accuracy"}
    assert abs(report["task"]["change"]["loss"]) < 0.05
    assert seqlab.load(tmp_path / "int8").quantization["scheme"] == "int8"


def test_quantized_model_exports_to_onnx(model, tmp_path):
    need_onnx()
    from seqlab.interop.export import export_onnx, verify_onnx

    fp32 = seqlab.build_model(mixer="mamba", d_model=64, n_layers=1, vocab_size=16, seed=0).eval()
    q = quantize(copy.deepcopy(fp32))
    info = export_onnx(q, tmp_path / "q.onnx", mode="step")
    assert verify_onnx(q, tmp_path / "q.onnx", info)["max_abs_diff_logits"] <= 1e-4
    export_onnx(fp32, tmp_path / "f.onnx", mode="step")
    assert (tmp_path / "q.onnx").stat().st_size < 0.5 * (tmp_path / "f.onnx").stat().st_size  # int8 kept in ONNX


def test_bad_input(model, tmp_path, capsys):
    seqlab.save(model, tmp_path / "fp32")
    ck = str(tmp_path / "fp32")
    for argv, message in [
        ([ck, "--out", str(tmp_path / "o"), "--scheme", "int4"], "--scheme 'int4' is not supported"),
        ([str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist"),
        ([ck, "--out", ck], "is the input checkpoint"),
        ([ck, "--out", str(tmp_path / "o"), "--set", "seq_len=8"], "--set needs --task"),
    ]:
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("seqlab: error:") and message in err, err
    assert not (tmp_path / "o").exists()
    save_quantized(quantize(copy.deepcopy(model)), tmp_path / "int8")
    assert main(["quantize", str(tmp_path / "int8"), "--out", str(tmp_path / "o")]) == 2
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(InputError, match="not supported"):
        quantize(copy.deepcopy(model), "fp4")


def test_load_rejects_a_corrupt_quantized_checkpoint(model, tmp_path):
    q = quantize(copy.deepcopy(model))
    bad = copy.deepcopy(q)
    bad.blocks[2].mixer.wq.weight = bad.blocks[2].mixer.wq.weight.float()  # an int8 weight stored as float
    save_quantized(bad, tmp_path / "a")
    with pytest.raises(InputError, match=r"tensor 'blocks.2.mixer.wq.weight' has dtype torch.float32"):
        seqlab.load(tmp_path / "a")
    q.quantization = {"scheme": "int8", "layers": ["blocks.0.mixer.A_log"]}
    save_quantized(q, tmp_path / "b")
    with pytest.raises(InputError, match="names layer 'blocks.0.mixer.A_log', which is not a linear layer"):
        seqlab.load(tmp_path / "b")


def test_cli_defaults_to_the_task_a_train_checkpoint_records(tmp_path, capsys):
    assert main(["train", "--task", "mqar", "--out", str(tmp_path / "run"), "--set", "train.steps=1",
                 "--set", "model.d_model=32", "--set", "train.batch_size=4", "--set", "train.eval_batches=1",
                 "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "run" / "checkpoint"), "--out", str(tmp_path / "q"), "--batches", "1",
                 "--batch-size", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"]["params"]["name"] == "mqar" and "accuracy" in report["task"]["int8"]
