"""seqlab.convert's stage runner: a recipe's stages on fit (what trains, what stays frozen), LoRA adapters merged
into plain weights, resume of a stage, the training FLOPs count, and `seqlab convert --stages` flags and errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_convert import bpe, corpus, llama

import seqlab
from seqlab.checkpoint import read_tensors
from seqlab.cli import main
from seqlab.commands import convert as convert_command
from seqlab.config import TrainConfig
from seqlab.convert import Recipe, forward_flops, kept_linears, run_conversion, training_flops
from seqlab.errors import InputError
from seqlab.models.lora import LoRALinear, add_lora, merge_lora

PLAN = "3:1 gated_deltanet:attention"  # 4 layers: 0-2 gated_deltanet, 3 attention


def tiny(**changes) -> Recipe:
    train = TrainConfig(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1, eval_batches=1,
                        checkpoint_every=2)
    return Recipe(**{"a": train, "b": train, "seq_len_a": 16, "seq_len_b": 16, "eval_windows": 2,
                     "eval_seq_len": 16, **changes})


def teacher_300():
    teacher = llama(vocab_size=300)
    teacher.tokenizer = bpe()
    return teacher


def changed_tensors(student, teacher, plan=PLAN):
    start = seqlab.convert(teacher, plan)[0].state_dict()  # the same seed: the student before training
    got = student.state_dict()
    assert got.keys() == start.keys()  # adapters merged: the plain layout
    return {k for k in got if not torch.equal(got[k], start[k])}


def test_both_stages_train_only_the_new_mixers_and_write_the_run(tmp_path):
    teacher = teacher_300()
    student, metrics = run_conversion(teacher, PLAN, corpus(tmp_path), tiny(), out=tmp_path / "run", progress=False)
    changed = changed_tensors(student, teacher)
    assert changed and all(k.split(".")[1] in "012" and ".mixer." in k for k in changed)
    assert set(metrics["stages"]) == {"a", "b"} and metrics["transfer"]["test"]["tokens"] == 32
    a, b = metrics["stages"]["a"], metrics["stages"]["b"]
    assert "mse_0" in a["history"][0] and "kl" in b["history"][0] and len(b["history"]) == 6
    assert b["test"]["bits_per_byte"] < metrics["transfer"]["test"]["bits_per_byte"]
    assert a["flops"] == a["flops_per_token"] * 6 * 2 * 16 and b["lora_adapters"] == 0
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert json.loads((run / "recipe.json").read_text())["recipe"]["stages"] == ["a", "b"]
    saved = seqlab.load(run / "student")
    tokens = torch.randint(0, 300, (1, 9))
    torch.testing.assert_close(saved(tokens)[0], student(tokens)[0])
    assert (run / "stage_a" / "checkpoint").is_dir() and (run / "stage_b" / "checkpoint").is_dir()
    with pytest.raises(InputError, match="is not empty; pass --resume"):
        run_conversion(teacher, PLAN, corpus(tmp_path), tiny(), out=run, progress=False)
    with pytest.raises(InputError, match="plan or recipe differs"):
        run_conversion(teacher, PLAN, corpus(tmp_path), tiny(ce_weight=0.5), out=run, resume=True, progress=False)


def test_stage_b_with_lora_trains_adapters_on_the_kept_linears_and_merges_them(tmp_path):
    teacher = teacher_300()
    student, metrics = run_conversion(teacher, PLAN, corpus(tmp_path), tiny(stages=("b",), train="lora",
                                                                             lora_rank=2), progress=False)
    kept = kept_linears(seqlab.convert(teacher, PLAN)[0])
    assert "blocks.3.mixer.wq" in kept and "blocks.0.mlp.w1" in kept and "blocks.0.mixer.q_proj" not in kept
    assert metrics["stages"]["b"]["lora_adapters"] == len(kept)
    changed = changed_tensors(student, teacher)
    assert {f"{name}.weight" for name in kept} <= changed  # each adapter merged into its base weight
    assert not any(k.startswith(("embed.", "head.", "norm.")) or k.split(".")[2].startswith("norm") for k in changed)
    everything, _ = run_conversion(teacher, PLAN, corpus(tmp_path), tiny(stages=("b",), train="all"), progress=False)
    assert {"embed.weight", "head.weight", "blocks.3.norm1.weight"} <= changed_tensors(everything, teacher)


def test_a_merged_adapter_gives_the_adapted_models_logits():
    model = llama(vocab_size=37)
    names = ["blocks.0.mixer.wq", "blocks.1.mlp.w2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, names, rank=3, alpha=6.0, seed=0)
    tokens = torch.randint(0, 37, (2, 7))
    assert torch.equal(model(tokens)[0], llama(vocab_size=37)(tokens)[0])  # B = 0: nothing changed yet
    for name in names:
        torch.nn.init.normal_(model.get_submodule(name).B)
    adapted = model(tokens)[0]
    assert isinstance(model.get_submodule(names[0]), LoRALinear)
    assert merge_lora(model) == names and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    torch.testing.assert_close(model(tokens)[0], adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="lora rank = 0"):
        add_lora(model, names, rank=0, alpha=1.0)
    with pytest.raises(InputError, match="not a linear layer"):
        add_lora(model, ["blocks.0.norm1"], rank=1, alpha=1.0)


def test_a_stage_resumes_to_the_same_student(tmp_path):
    recipe = tiny(train="lora", lora_rank=2)
    whole, _ = run_conversion(teacher_300(), PLAN, corpus(tmp_path), recipe, out=tmp_path / "whole", progress=False)

    def crash_in_stage_b(row):
        if "kl" in row and row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_conversion(teacher_300(), PLAN, corpus(tmp_path), recipe, out=tmp_path / "cut", progress=False,
                       log=crash_in_stage_b)
    assert not (tmp_path / "cut" / "student").exists()
    resumed, metrics = run_conversion(teacher_300(), PLAN, corpus(tmp_path), recipe, out=tmp_path / "cut",
                                      resume=True, progress=False)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(metrics["stages"]["a"]["history"]) == 6  # stage a had finished: its history kept from metrics.json
    saved = read_tensors(tmp_path / "cut" / "student")
    assert all(torch.equal(saved[k], b[k]) for k in b)


def test_training_flops_follow_the_stated_count():
    teacher = llama(vocab_size=37)
    student, _ = seqlab.convert(teacher, PLAN)
    F_t, F_s = forward_flops(teacher, 16), forward_flops(student, 16)
    assert training_flops(teacher, student, "scratch", 16) == 3 * F_s
    student.requires_grad_(False)
    assert training_flops(teacher, student, "b", 16) == F_t + 2 * F_s
    mixers = sum(p.numel() for i in range(3) for p in student.blocks[i].mixer.parameters())
    assert training_flops(teacher, student, "a", 16) > 6 * mixers
    with pytest.raises(InputError, match="stage 'c'"):
        training_flops(teacher, student, "c", 16)


@pytest.mark.parametrize("changes, message", [
    ({"stages": ("b", "a")}, "expected 'a', 'b' or 'a', 'b'"),
    ({"stages": ("c",)}, "'recipe.stages[0]' = 'c'"),
    ({"train": "heads"}, "'recipe.train' = 'heads'"),
    ({"lora_rank": 0}, "'recipe.lora_rank' = 0"),
    ({"ce_weight": -1.0}, "'recipe.ce_weight' = -1.0"),
])
def test_bad_recipes_are_one_clear_error(changes, message):
    with pytest.raises(InputError) as err:
        tiny(**changes)
    assert message in str(err.value)


@pytest.fixture
def teacher_dir(tmp_path, monkeypatch):
    seqlab.save(teacher_300(), tmp_path / "teacher")
    small = corpus(tmp_path)
    monkeypatch.setattr(convert_command, "CorpusTask", lambda seq_len, split: small)  # not the whole stdlib
    return tmp_path / "teacher"


def test_convert_command_runs_the_stages(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["convert", str(teacher_dir), "--plan", PLAN, "--out", str(out), "--stages", "a,b", "--steps-a", "2",
            "--steps-b", "3", "--batch-size", "2", "--seq-len", "16", "--train", "lora", "--lora-rank", "2",
            "--no-progress", "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    recipe = json.loads((out / "recipe.json").read_text())["recipe"]
    assert (recipe["a"]["steps"], recipe["b"]["steps"], recipe["train"], recipe["lora_rank"]) == (2, 3, "lora", 2)
    assert recipe["a"]["batch_size"] == 2 and recipe["seq_len_b"] == 16 and recipe["b"]["lr"] == 3e-4  # default
    assert printed["stages"]["b"]["steps"] == 3 and seqlab.load(out / "student").config.layer_mixers[0] == \
        "gated_deltanet"
    assert main(args) == 2 and "is not empty; pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--stages", "b,a"], "--stages 'b,a': expected a, b or a,b"),
    (["--stages", "a,c"], "--stages 'a,c'"),
    (["--steps-a", "3"], "--steps-a sets up training: give --stages"),
    (["--stages", "b", "--lora-rank", "4"], "--lora-rank applies to --train lora only"),
    (["--stages", "a", "--steps-a", "0"], "--steps-a 0: expected a whole number >= 1"),
    (["--preset", "cpu", "--lr-b", "-1"], "--lr-b -1.0: expected a number > 0"),
])
def test_convert_command_flag_errors(teacher_dir, tmp_path, capsys, flags, message):
    assert main(["convert", str(teacher_dir), "--plan", PLAN, "--out", str(tmp_path / "x"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()
