"""seqlab.convert: a Transformer teacher -> hybrid / recurrent students by a per-layer plan (weights copied or
mapped as documented, the record of what moved, the model contract), and stage (a), attention transfer, on fit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_states_close

import seqlab
from seqlab.checkpoint import read_tensors
from seqlab.cli import main
from seqlab.config import TrainConfig
from seqlab.convert import (
    RECURRENT,
    AttentionTransferLoss,
    attention_transfer,
    parse_plan,
    set_trainable,
    teacher_attention_io,
)
from seqlab.data import CorpusTask
from seqlab.data.tokenizer import byte_alphabet
from seqlab.distill import DistillConfig, distill
from seqlab.errors import InputError
from seqlab.interop.gguf import gguf_tokenizer

H, HKV, HD, D = 4, 2, 8, 32  # the teacher's query heads, key/value heads (grouped-query), head width, d_model


def llama(n_layers: int = 4, vocab_size: int = 37, seed: int = 1):
    """A tiny Llama-like teacher: RoPE, SwiGLU, RMSNorm, grouped-query attention, an untied head."""
    return seqlab.build_model(dict(vocab_size=vocab_size, d_model=D, n_layers=n_layers, position="rope",
                                   mlp="swiglu", tie_embeddings=False, init_std=0.1,
                                   attention={"n_heads": H, "n_kv_heads": HKV}), seed=seed).eval()


def repeat_kv(w: torch.Tensor) -> torch.Tensor:
    """(HKV * HD, D) -> (H * HD, D): query head h reads kv head h // (H / HKV)."""
    return torch.cat([w[(h // (H // HKV)) * HD:(h // (H // HKV) + 1) * HD] for h in range(H)])


def test_all_attention_student_equals_the_teacher():
    teacher = llama()
    student, record = seqlab.convert(teacher, "attention")
    tokens = torch.randint(0, 37, (2, 11))
    assert torch.equal(student(tokens)[0], teacher(tokens)[0])
    statuses = [t["status"] for layer in record["layers"] for t in layer["tensors"].values()]
    assert set(statuses) == {"copied"} and set(t["status"] for t in record["model"].values()) == {"copied"}
    assert record["fraction_transferred"] == 1.0


@pytest.mark.parametrize("mixer", RECURRENT)
def test_mapped_tensors_equal_the_teachers(mixer):
    teacher = llama(n_layers=2)
    student, record = seqlab.convert(teacher, mixer)
    for i in range(2):
        att, m = teacher.blocks[i].mixer, student.blocks[i].mixer
        wq, wk, wv, wo = att.wq.weight, repeat_kv(att.wk.weight), repeat_kv(att.wv.weight), att.wo.weight
        width = H * HD
        if mixer in ("gla", "gated_deltanet", "deltanet"):
            for got, want in ((m.q_proj, wq), (m.k_proj, wk), (m.v_proj, wv), (m.out_proj, wo)):
                assert torch.equal(got.weight, want)
        if mixer in ("gated_deltanet", "deltanet"):
            assert torch.equal(m.conv.weight[:, 0, -1], torch.ones(3 * width)) and not m.conv.weight[:, 0, :-1].any()
        if mixer == "mamba2":
            x0 = m.d_inner
            assert m.d_inner == width and m.G == H and m.N == HD
            assert torch.equal(m.in_proj.weight[x0:2 * x0], wv)
            assert torch.equal(m.in_proj.weight[2 * x0:2 * x0 + width], wk)
            assert torch.equal(m.in_proj.weight[2 * x0 + width:2 * x0 + 2 * width], wq)
            assert torch.equal(m.out_proj.weight, wo) and not m.conv.bias.any()
        if mixer == "mamba":
            assert torch.equal(m.in_proj.weight[:width], wv) and torch.equal(m.out_proj.weight[:, :width], wo)
        layer = record["layers"][i]["tensors"]
        for key in ("norm1.weight", "norm2.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight"):
            assert layer[f"blocks.{i}.{key}"] == {"status": "copied", "from": f"blocks.{i}.{key}"}
            assert torch.equal(student.state_dict()[f"blocks.{i}.{key}"], teacher.state_dict()[f"blocks.{i}.{key}"])
        mapped = {k for k, v in layer.items() if v["status"] == "mapped"}
        fresh = {k for k, v in layer.items() if v["status"] == "initialized"}
        assert f"blocks.{i}.mixer.out_proj.weight" in mapped and fresh  # gates, decays: their own init
        assert all(".mixer." in k for k in mapped | fresh)
    assert record["model"]["head.weight"]["status"] == "copied" and not record["notes"]


def run_in_pieces(model, tokens, cuts):
    state, outs, edges = None, [], [0, *cuts, tokens.shape[1]]
    for a, b in zip(edges, edges[1:]):
        logits, state = model(tokens[:, a:b], state)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


def test_hybrid_plans_build_and_keep_the_model_contract():
    teacher = llama()
    student, record = seqlab.convert(teacher, "3:1 gated_deltanet:attention")
    assert record["plan"] == ["gated_deltanet"] * 3 + ["attention"]
    assert parse_plan("gated_deltanet every4:attention", 4) == tuple(record["plan"])
    assert parse_plan("attention, gla,mamba2 ,sliding_attention", 4) == ("attention", "gla", "mamba2",
                                                                         "sliding_attention")
    windowed, _ = seqlab.convert(teacher, "sliding_attention,gla,mamba2,mamba", window=3)
    tokens = torch.randint(0, 37, (2, 13))
    for model in (student, windowed):
        full, full_state = model(tokens)
        two, two_state = run_in_pieces(model, tokens, [5])
        steps, step_state = run_in_pieces(model, tokens, list(range(1, 13)))
        torch.testing.assert_close(two, full, atol=1e-4, rtol=0)
        torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)
        assert_states_close(two_state, full_state)
        assert_states_close(step_state, full_state)
    assert windowed.blocks[0].mixer.window == 3


@pytest.mark.parametrize("plan, window, message", [
    ("lstm", None, "'lstm' (a mixer seqlab has, but no map"),
    ("3:1 gla:nope", None, "mixer 'nope' is not available"),
    ("gla,gla", None, "names 2 layers; the teacher has n_layers = 4"),
    ("gla every0:attention", None, "every0 needs 1 <= 0"),
    ("gla every9:attention", None, "every9 needs 1 <= 9"),
    ("", None, "layer spec ''"),
    ("attention,gla,gla,sliding_attention", None, "give their window"),
    ("gla", 0, "window = 0"),
    (["gla", 3, "gla", "gla"], None, "expected a layer spec"),
])
def test_bad_plans_are_one_clear_error(plan, window, message):
    with pytest.raises(InputError, match=None) as err:
        seqlab.convert(llama(), plan, window=window)
    assert message in str(err.value)


def test_a_teacher_that_is_not_all_attention_is_refused():
    with pytest.raises(InputError, match="every layer is attention"):
        seqlab.convert(seqlab.build_model(dict(vocab_size=37, d_model=D, layers=("gla", "attention"))), "gla")


def bpe():
    """A small byte-level BPE tokenizer (259 single tokens and a few merges)."""
    merges = ["Ġ t", "h e", "d e", "de f", "r e", "re t", "u r", "ret ur"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [byte_alphabet()[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in merges]
    return gguf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
                           "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
                           "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
                           "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 0})


def test_convert_command_writes_the_student_its_record_and_the_tokenizer(tmp_path, capsys):
    teacher = llama(vocab_size=300)
    teacher.tokenizer = bpe()
    seqlab.save(teacher, tmp_path / "teacher")
    assert main(["convert", str(tmp_path / "teacher"), "--plan", "gated_deltanet every2:attention", "--out",
                 str(tmp_path / "student"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "student" / "convert.json").read_text())
    assert printed == saved and saved["plan"] == ["gated_deltanet", "attention"] * 2
    student = seqlab.load(tmp_path / "student")
    assert student.config.layer_mixers == tuple(saved["plan"])
    assert student.tokenizer.encode("def return the") == teacher.tokenizer.encode("def return the")
    assert main(["convert", str(tmp_path / "teacher"), "--plan", "gru", "--out", str(tmp_path / "bad")]) == 2
    assert "seqlab: error: plan 'gru'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------------------
# stage (a): attention transfer


def corpus(tmp_path) -> CorpusTask:
    root = tmp_path / "src"
    for i in range(24):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"m{i}.py").write_text(f"def f{i}(x):\n    return the(x) * {i} + x\n" * 6)
    return CorpusTask(seq_len=24, split="train", root=root, cache_dir=tmp_path / "cache")


def test_the_loss_reads_each_replaced_attention_on_the_teachers_own_input():
    teacher = llama()
    student, _ = seqlab.convert(teacher, "3:1 gla:attention")
    loss = AttentionTransferLoss(teacher, student)
    assert loss.layers == [0, 1, 2]
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[:3] in (["blocks", str(i), "mixer"] for i in range(3)) for n in trainable)
    tokens = torch.randint(0, 37, (2, 7))
    caught = teacher_attention_io(teacher, tokens, [1])
    x = teacher.blocks[0](teacher.embed(tokens))[0]
    torch.testing.assert_close(caught[1][0], teacher.blocks[1].norm1(x))
    torch.testing.assert_close(caught[1][1], teacher.blocks[1].mixer(teacher.blocks[1].norm1(x))[0])
    gpt2 = seqlab.build_model(dict(vocab_size=37, d_model=D, n_layers=3, position="learned", mlp="gelu_tanh",
                                   norm="layernorm", attention={"n_heads": H, "bias": True}), seed=0).eval()
    seen = {}  # the same layers' input and output, caught in the model's own full forward
    hooks = [gpt2.blocks[i].mixer.register_forward_hook(lambda _m, a, o, i=i: seen.__setitem__(i, (a[0], o[0])))
             for i in (0, 1)]
    gpt2(tokens)
    for hook in hooks:
        hook.remove()
    caught = teacher_attention_io(gpt2, tokens, [0, 1])
    assert all(torch.equal(caught[i][j], seen[i][j]) for i in (0, 1) for j in (0, 1))


def transfer_run(tmp_path, teacher_tokens, log=None, resume=False, **train):
    teacher = llama(vocab_size=300)
    teacher.tokenizer = teacher_tokens
    student, _ = seqlab.convert(teacher, "3:1 gated_deltanet:attention")
    cfg = TrainConfig(**{"steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                         "eval_batches": 1, **train})
    out = tmp_path / "run"
    result = attention_transfer(teacher, student, corpus(tmp_path), cfg, progress=False, log=log,
                                checkpoint_dir=out, resume_from=out / "checkpoint" if resume else None)
    return result, teacher, student


def test_attention_transfer_loss_falls_and_trains_only_the_new_mixers(tmp_path):
    result, teacher, student = transfer_run(tmp_path, bpe())
    before = seqlab.convert(teacher, "3:1 gated_deltanet:attention")[0].state_dict()  # the same seed: the start
    losses = [row["loss"] for row in result["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert {"mse_0", "mse_1", "mse_2"} <= set(result["history"][-1])
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.split(".")[1] in "012" and ".mixer." in k for k in changed)  # layer 3, MLPs: as copied
    assert "bits_per_byte" in result["eval"]  # the corpus was read through the teacher's BPE tokenizer


def test_attention_transfer_resumes_bit_identically(tmp_path):
    tok = bpe()
    train = {"steps": 4, "checkpoint_every": 2}
    transfer_run(tmp_path / "whole", tok, **train)

    def crash_in_step_3(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        transfer_run(tmp_path / "cut", tok, log=crash_in_step_3, **train)
    transfer_run(tmp_path / "cut", tok, resume=True, **train)
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = read_tensors(tmp_path / "whole" / "run" / "checkpoint", name)
        b = read_tensors(tmp_path / "cut" / "run" / "checkpoint", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_stage_b_distills_the_converted_student_training_only_what_is_trainable(tmp_path):
    teacher = llama(vocab_size=300)
    teacher.tokenizer = bpe()
    student, _ = seqlab.convert(teacher, "gla every2:attention")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    set_trainable(student, "mixers")
    cfg = DistillConfig(train=TrainConfig(steps=20, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1,
                                          eval_batches=1))  # KL alone: this random teacher's data CE would pull away
    result = distill(teacher, student, corpus(tmp_path), cfg, progress=False)
    kl = [row["kl"] for row in result["history"]]
    assert sum(kl[-5:]) < 0.5 * 5 * kl[0], kl
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.split(".")[1] in ("0", "2") and ".mixer." in k for k in changed)
    set_trainable(student, "all")
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(InputError, match="trainable = 'lora'"):
        set_trainable(student, "lora")
