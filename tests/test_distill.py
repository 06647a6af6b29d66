"""Distillation: the losses, weight transfer, the loop, and `seqlab distill`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny

import seqlab
from seqlab.checkpoint import read_tensors
from seqlab.cli import main
from seqlab.config import TrainConfig
from seqlab.data import make_task
from seqlab.distill import (
    DistillConfig,
    block_outputs,
    decode_cost,
    distill,
    kd_loss,
    layer_map,
    transfer_weights,
)
from seqlab.errors import InputError
from seqlab.models.conv import causal_conv1d


def test_kl_is_zero_for_a_copy_of_the_teacher():
    teacher = tiny("attention", init_std=0.3)
    student = tiny("attention", n_layers=2, init_std=0.02)
    moved = transfer_weights(teacher, student)
    assert not moved.fresh and not moved.mapped  # same architecture: every tensor copied
    tokens = torch.randint(0, 37, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    for t in (1.0, 2.0):
        assert kd_loss(student(tokens)[0], teacher(tokens)[0], mask, t).item() == 0.0
    assert kd_loss(tiny("gru")(tokens)[0], teacher(tokens)[0], mask, 2.0).item() > 0


def test_block_outputs_match_the_model():
    model = tiny("lstm")
    tokens = torch.randint(0, 37, (2, 7))
    logits, hs = block_outputs(model, tokens)
    torch.testing.assert_close(logits, model(tokens)[0])
    assert len(hs) == 2 and hs[0].shape == (2, 7, 32)


def test_layer_map():
    assert layer_map(4, 2) == [0, 3]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(7, 3) == [0, 3, 6]
    assert layer_map(3, 1) == [2]


def test_weight_transfer_copies_exactly_what_it_says():
    teacher = tiny("attention", n_layers=4, init_std=0.2)
    student = seqlab.build_model(dict(vocab_size=37, d_model=32, layers=["attention", "lstm"],
                                      attention={"n_heads": 4}), seed=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    moved = transfer_weights(teacher, student)
    assert moved.layer_map == [0, 3]
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert set(moved.copied) | set(moved.fresh) == set(s_sd) and not moved.mapped
    for s_name, t_name in moved.copied.items():
        assert torch.equal(s_sd[s_name], t_sd[t_name]), s_name
    for name in moved.fresh:
        assert torch.equal(s_sd[name], before[name]), name
    # what moved: embedding, final norm, every norm and MLP, block 0's attention (from teacher block 0)
    assert moved.copied["embed.weight"] == "embed.weight"
    assert moved.copied["blocks.1.mlp.w1.weight"] == "blocks.3.mlp.w1.weight"
    assert moved.copied["blocks.0.mixer.wq.weight"] == "blocks.0.mixer.wq.weight"
    assert all(k.startswith("blocks.1.mixer.") for k in moved.fresh)  # the LSTM has no teacher counterpart
    assert any("lstm" in note for note in moved.notes)


@pytest.mark.skipif("gla" not in seqlab.available_mixers(), reason="gla has not landed")
def test_attention_maps_onto_gla():
    teacher = tiny("attention", n_layers=2, init_std=0.2, attention={"n_heads": 2, "n_kv_heads": 1})
    student = tiny("gla", n_layers=2, gla={"n_heads": 2, "expand_k": 1.0, "expand_v": 1.0})
    moved = transfer_weights(teacher, student)
    s, t = student.blocks[1].mixer, teacher.blocks[1].mixer
    assert torch.equal(s.q_proj.weight, t.wq.weight) and torch.equal(s.out_proj.weight, t.wo.weight)
    torch.testing.assert_close(s.k_proj.weight, t.wk.weight.repeat(2, 1))  # one kv head serves both query heads
    assert "blocks.1.mixer.gk_up.weight" in moved.fresh and "blocks.1.mixer.v_proj.weight" in moved.mapped


@pytest.mark.skipif("mamba" not in seqlab.available_mixers(), reason="mamba has not landed")
def test_attention_maps_onto_mamba_as_linear_attention():
    teacher = tiny("attention", n_layers=1, init_std=0.2)
    student = tiny("mamba", n_layers=1, mamba={"d_state": 4, "expand": 2})
    moved = transfer_weights(teacher, student)
    m, a = student.blocks[0].mixer, teacher.blocks[0].mixer
    width, R, N = 32, m.dt_rank, m.N
    assert torch.equal(m.in_proj.weight[:width], a.wv.weight)
    assert torch.equal(m.out_proj.weight[:, :width], a.wo.weight)
    M = m.in_proj.weight[: m.d_inner]  # the x branch
    # before the SiLU, B_t = W_K[:N] u_t and C_t = W_Q[:N] u_t
    torch.testing.assert_close(m.x_proj.weight[R : R + N] @ M, a.wk.weight[:N], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.x_proj.weight[R + N :] @ M, a.wq.weight[:N], atol=1e-5, rtol=1e-4)
    assert "blocks.0.mixer.A_log" in moved.fresh and "blocks.0.mixer.dt_proj.weight" in moved.fresh
    # the short convolution passes x_t through unchanged
    x = torch.randn(2, m.d_inner, 5)
    y, _ = causal_conv1d(x, m.conv.weight, m.conv.bias, None)
    torch.testing.assert_close(y, x)
    # without biases on the conv and with biases on the projections, the map still holds
    student = tiny("mamba", n_layers=1, mamba={"d_state": 4, "expand": 2, "conv_bias": False, "proj_bias": True})
    moved = transfer_weights(teacher, student)
    m = student.blocks[0].mixer
    assert "blocks.0.mixer.conv.bias" not in student.state_dict()
    assert torch.equal(m.in_proj.bias[:width], torch.zeros(width)) and torch.equal(m.out_proj.bias, torch.zeros(32))
    assert torch.equal(m.in_proj.weight[:width], a.wv.weight)
    # a teacher with biases (GPT-2 style) hands W_V's and W_O's biases on too
    teacher = tiny("attention", n_layers=1, init_std=0.2, attention={"bias": True})
    torch.nn.init.normal_(teacher.blocks[0].mixer.wv.bias)
    transfer_weights(teacher, student)
    a = teacher.blocks[0].mixer
    assert torch.equal(m.in_proj.bias[:width], a.wv.bias) and torch.equal(m.out_proj.bias, a.wo.bias)


def test_distillation_loss_decreases_on_a_tiny_pair():
    teacher = tiny("attention", init_std=0.3)  # peaky random distributions to imitate
    student = seqlab.build_model(dict(mixer="gru", vocab_size=37, d_model=16, n_layers=1), seed=0)
    task = make_task("prefix_parity", seq_len=12)
    cfg = DistillConfig(temperature=2.0, ce_weight=0.1, hidden_weight=0.5, transfer=False,
                        train=TrainConfig(steps=25, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1,
                                          eval_batches=1))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = distill(teacher, student, task, cfg, progress=False)
    h = result["history"]
    assert h[-1]["kl"] < 0.5 * h[0]["kl"]
    assert h[-1]["hidden"] < h[0]["hidden"]  # through the learned 16 -> 32 projection
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched


def distill_run(tmp_path=None, log=None, resume=False, hidden_weight=0.5, **train):
    """A tiny distillation (copy task: rows with different mask counts) from a fixed ambient RNG (the hidden
    projections' init reads it); returns fit's result and the student."""
    teacher = tiny("attention", init_std=0.3)
    student = seqlab.build_model(dict(mixer="gru", vocab_size=37, d_model=16, n_layers=1), seed=0)
    task = make_task("copy", vocab_size=16, seq_len=17)
    tc = {"steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "log_every": 1, "eval_batches": 1,
          "weight_decay": 0.0, **train}
    cfg = DistillConfig(temperature=2.0, ce_weight=0.5, hidden_weight=hidden_weight, transfer=False,
                        train=TrainConfig(**tc))
    torch.manual_seed(0)
    result = distill(teacher, student, task, cfg, progress=False, log=log, checkpoint_dir=tmp_path,
                     resume_from=tmp_path / "checkpoint" if resume else None)
    return result, student


def without_speed(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_distillation_with_gradient_accumulation_equals_one_big_batch():
    """Each micro-batch's loss terms are sums over the global batch's masked positions, as in `seqlab train`."""
    one, a = distill_run(steps=3)
    two, b = distill_run(steps=3, grad_accum=2)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    for r1, r2 in zip(one["history"], two["history"]):
        for key in ("loss", "kl", "ce", "hidden", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-6, abs=1e-6), key


def test_interrupted_distillation_resumes_bit_identically(tmp_path):
    """Checkpoints every 2 steps; a crash in step 3, then resume: the student, the hidden projections, the
    optimizer state and every logged row equal the uninterrupted run's (bit for bit)."""
    whole, _ = distill_run(tmp_path / "whole", checkpoint_every=2, grad_accum=2)

    def crash_in_step_3(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_run(tmp_path / "cut", log=crash_in_step_3, checkpoint_every=2, grad_accum=2)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "trainer.json").read_text())["step"] == 2
    resumed, _ = distill_run(tmp_path / "cut", resume=True, checkpoint_every=2, grad_accum=2)

    for name in ("model.safetensors", "optimizer.safetensors", "trainer.safetensors"):
        a = read_tensors(tmp_path / "whole" / "checkpoint", name)
        b = read_tensors(tmp_path / "cut" / "checkpoint", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.startswith("loss.align.") for k in a)  # the projections are saved (and were restored)
    assert without_speed(resumed["history"]) == without_speed(whole["history"][2:])
    assert resumed["eval"] == whole["eval"]


def test_different_vocabularies_are_one_clear_error(tmp_path, capsys):
    teacher = tiny("attention")
    student = tiny("gru", vocab_size=40)
    with pytest.raises(InputError, match="teacher vocab_size 37 and student vocab_size 40 differ"):
        transfer_weights(teacher, student)
    seqlab.save(teacher, tmp_path / "t")
    (tmp_path / "s.json").write_text(json.dumps({"mixer": "gru", "vocab_size": 40, "d_model": 16}))
    code = main(["distill", "--teacher", str(tmp_path / "t"), "--student-config", str(tmp_path / "s.json"),
                 "--task", "prefix_parity", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab_size 37 but the student config has vocab_size 40" in err[0]
    assert not (tmp_path / "o").exists()


def test_distill_command_end_to_end(tmp_path, capsys):
    seqlab.save(tiny("attention", init_std=0.3), tmp_path / "t")
    (tmp_path / "s.json").write_text(json.dumps({"model": {"mixer": "gru", "vocab_size": 37, "d_model": 32},
                                                  "train": {"warmup_steps": 1, "eval_batches": 1}}))
    code = main(["distill", "--teacher", str(tmp_path / "t"), "--student-config", str(tmp_path / "s.json"),
                 "--task", "prefix_parity", "--set", "seq_len=8", "--out", str(tmp_path / "o"), "--steps", "3",
                 "--batch-size", "4", "--context", "16", "--no-progress", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metric"] == "accuracy" and report["train"]["steps"] == 3
    for name in ("teacher", "distilled", "scratch"):
        assert set(report[name]["decode"]) >= {"state_bytes", "decode_ms"}
    assert report["teacher"]["decode"]["state_bytes"] > report["distilled"]["decode"]["state_bytes"]
    assert not report["teacher"]["decode"]["constant_state"]  # the KV cache grows with the context
    assert report["distilled"]["decode"]["constant_state"] and report["scratch"]["decode"]["constant_state"]
    assert seqlab.load(tmp_path / "o" / "student").config.mixer == "gru"
    assert (tmp_path / "o" / "scratch" / "config.json").is_file()
    assert "keeps" in (tmp_path / "o" / "report.md").read_text()


def test_decode_cost_tells_a_growing_cache_from_a_constant_state():
    att = decode_cost(tiny("attention"), context=64, decode_steps=4)
    gru = decode_cost(tiny("gru"), context=64, decode_steps=4)
    assert att["short_context"] == 32 and att["state_bytes"] == 2 * att["state_bytes_short"] > 0
    assert not att["constant_state"]
    assert gru["constant_state"] and gru["state_bytes"] == gru["state_bytes_short"] > 0
    assert gru["decode_ms"] > 0
    with pytest.raises(InputError, match="decode context = 1"):
        decode_cost(tiny("gru"), context=1)
