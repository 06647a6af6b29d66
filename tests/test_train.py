"""The trainer, in process: schedule, optimizer groups, outputs, gradient accumulation, bf16, the non-finite
guard, truncated BPTT, interrupted-and-resumed runs, evaluation, and bad input through the CLI (exit status 2)."""

import json
import math

import pytest
import torch

import seqlab
from seqlab import cli
from seqlab.checkpoint import read_tensors
from seqlab.config import RunConfig, TrainConfig
from seqlab.data import make_task
from seqlab.errors import InputError
from seqlab.models import build_model
from seqlab.train import cross_entropy, losses, recurrent_depth, task_batches
from seqlab.train.trainer import TrainingDiverged, detach_state, evaluate, fit, lr_at, make_optimizer, train

TINY_MODEL = {"mixer": "gru", "vocab_size": 16, "d_model": 16, "n_layers": 1}
TINY_MQAR = {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2}


def run_config(**train):
    base = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_batches": 1}
    return {"model": TINY_MODEL, "task": TINY_MQAR, "train": {**base, **train}}


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    for i in range(40):
        (root / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 4)
    return root


def corpus_config(corpus_root, tmp_path, **train):
    task = {"name": "corpus", "seq_len": 8, "root": str(corpus_root), "cache_dir": str(tmp_path / "cache")}
    model = {**TINY_MODEL, "vocab_size": 256}
    base = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_batches": 1, "stream": True}
    return {"model": model, "task": task, "train": {**base, **train}}


def weights(path):
    return read_tensors(path)


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def rows(out, key="loss"):
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if key in json.loads(r)]


# ---------------------------------------------------------------------------------------------------------


def test_lr_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = build_model(mixer="attention", vocab_size=16, d_model=16, n_layers=1)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_weight_decay_skips_parameters_marked_no_weight_decay():
    model = build_model(mixer="mamba", vocab_size=16, d_model=16, n_layers=1)
    a_log = model.blocks[0].mixer.A_log  # 2-D, but a recurrence parameter: decay would pull A toward -1
    decayed, plain = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert a_log.dim() == 2
    assert not any(p is a_log for p in decayed["params"]) and any(p is a_log for p in plain["params"])


def test_train_writes_config_metrics_and_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = train(run_config(steps=3, eval_every=2), out=out, progress=False)
    assert set(result["eval"]) == {"loss", "accuracy", "seq_accuracy"} and result["steps"] == 3
    assert RunConfig.load(out / "config.json").train.steps == 3  # the resolved config
    log = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("loss", "accuracy", "grad_norm", "lr", "tokens_per_s"):
        assert all(isinstance(r[key], float) for r in train_rows)
    assert [r["step"] for r in log if "eval_loss" in r] == [2, 3]
    model = seqlab.load(out / "checkpoint")
    assert isinstance(model, torch.nn.Module)
    assert json.loads((out / "result.json").read_text())["eval"] == result["eval"]


def test_training_learns_an_easy_task():
    task = make_task("prefix_parity", seq_len=8)
    model = build_model(mixer="gru", vocab_size=2, d_model=32, n_layers=1, seed=0)
    before = evaluate(model, task, 4, 32)
    cfg = TrainConfig(steps=40, batch_size=32, lr=1e-2, warmup_steps=5)
    result = fit(model, task_batches(task, cfg), cross_entropy, cfg, progress=False)
    assert result["eval"]["accuracy"] > 0.9 > before["accuracy"] + 0.2


def test_fit_of_a_recurrent_depth_model_depends_on_its_seed_alone():
    """The depth r is drawn from the global RNG; fit seeds it from the config, so what ran before does not matter."""
    task = make_task("prefix_parity", seq_len=8)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, eval_batches=1)
    runs = []
    for noise in (0, 1):
        torch.manual_seed(noise)  # a different global RNG state before each run
        model = build_model(arch="recurrent_depth", vocab_size=2, d_model=16, seed=0)
        fit(model, task_batches(task, cfg), cross_entropy, cfg, progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_the_recurrent_depth_objective_logs_r_and_trains_as_cross_entropy():
    """It draws r as the model's training-mode forward would (same RNG, same order), so the weights are equal;
    what it adds is r in every logged row."""
    task = make_task("prefix_parity", seq_len=8)
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, eval_batches=1, log_every=1)
    runs = {}
    for objective in (cross_entropy, recurrent_depth):
        model = build_model(arch="recurrent_depth", vocab_size=2, d_model=16, seed=0,
                            depth={"sampler": "progressive", "mean_steps": 4, "backprop_steps": 2})
        result = fit(model, task_batches(task, cfg), objective, cfg, progress=False)
        runs[objective] = (torch.cat([p.detach().flatten() for p in model.parameters()]), result["history"])
    (w_ce, h_ce), (w_rd, h_rd) = runs[cross_entropy], runs[recurrent_depth]
    assert torch.equal(w_ce, w_rd)
    assert [r["loss"] for r in h_ce] == [r["loss"] for r in h_rd]
    rs = [r["r"] for r in h_rd]
    assert all(r == int(r) and 2 <= r <= 6 for r in rs) and len(set(rs)) > 1  # progressive: 2 + U{0..4}
    with pytest.raises(InputError, match="recurrent-depth objective needs a recurrent-depth model"):
        fit(build_model(**TINY_MODEL), task_batches(task, cfg), recurrent_depth, cfg, progress=False)


def test_a_batch_source_of_another_size_is_refused():
    task = make_task("mqar", **{k: v for k, v in TINY_MQAR.items() if k != "name"})
    with pytest.raises(InputError, match="draws 8 rows per step but config field 'train.batch_size' = 4"):
        fit(build_model(**TINY_MODEL), task_batches(task, TrainConfig(batch_size=8)), cross_entropy,
            TrainConfig(batch_size=4), progress=False)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Micro-batch losses are scaled by the global token count, so the split does not change the gradient."""
    config = run_config(steps=3, weight_decay=0.0)
    config["task"] = {"name": "copy", "vocab_size": 16, "seq_len": 17}  # rows have different mask counts
    train(config, out=tmp_path / "one", progress=False)
    config["train"]["grad_accum"] = 4
    train(config, out=tmp_path / "four", progress=False)
    wa, wb = weights(tmp_path / "one" / "checkpoint"), weights(tmp_path / "four" / "checkpoint")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains(tmp_path):
    result = train(run_config(steps=2, precision="bf16"), out=tmp_path / "bf16", progress=False)
    assert math.isfinite(result["eval"]["loss"]) and result["skipped_steps"] == 0


# ---------------------------------------------------------------------------------------------------------
# the non-finite guard


def poison(monkeypatch, bad_calls):
    """Make masked_cross_entropy return NaN on the given (0-based) calls."""
    real, calls = losses.masked_cross_entropy, {"n": 0}

    def patched(logits, batch):
        loss = real(logits, batch)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] - 1 in bad_calls else loss

    monkeypatch.setattr(losses, "masked_cross_entropy", patched)


def test_a_non_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    poison(monkeypatch, bad_calls={1})
    out = tmp_path / "run"
    result = train(run_config(steps=4), out=out, progress=False)
    assert result["skipped_steps"] == 1 and result["steps"] == 4
    log = rows(out)
    assert log[1]["loss"] is None and log[1]["skipped"] == 1
    assert all(math.isfinite(r["loss"]) for r in log if r["step"] != 2)
    assert all(torch.isfinite(w).all() for w in weights(out / "checkpoint").values())


def test_too_many_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison(monkeypatch, bad_calls=set(range(2, 100)))
    with pytest.raises(TrainingDiverged, match="3 steps in a row had a non-finite loss.*last good checkpoint"):
        train(run_config(steps=10, checkpoint_every=2, max_nonfinite=3), out=out, progress=False)
    saved = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert saved["step"] == 2 and saved["skipped"] == 0
    assert all(torch.isfinite(w).all() for w in weights(out / "checkpoint").values())


# ---------------------------------------------------------------------------------------------------------
# truncated BPTT


def test_carried_state_is_detached_and_kv_window_bounded():
    model = build_model(layers=["gru", "attention"], vocab_size=16, d_model=16, seed=0)
    _, state = model(torch.randint(0, 16, (2, 12)))
    assert any(t.grad_fn is not None for layer in state.layers for t in layer.tensors().values())
    carried = detach_state(state, kv_window=5)
    assert all(t.grad_fn is None and not t.requires_grad for layer in carried.layers for t in layer.tensors().values())
    assert carried.layers[1].k.shape[2] == 5 and carried.layers[1].pos == 12 and carried.pos == 12
    logits, _ = model(torch.randint(0, 16, (2, 3)), carried)  # a bounded cache still continues the stream
    assert logits.shape == (2, 3, 16)


def test_carrying_the_state_changes_the_loss(corpus_root, tmp_path):
    """Same weights at step 1, same segments: only the carried state differs from step 2 on."""
    carried = train(corpus_config(corpus_root, tmp_path), out=tmp_path / "carry", progress=False)
    reset = train(corpus_config(corpus_root, tmp_path, carry_state=False), out=tmp_path / "reset", progress=False)
    a, b = rows(tmp_path / "carry"), rows(tmp_path / "reset")
    assert a[0]["loss"] == b[0]["loss"]
    assert a[1]["loss"] != b[1]["loss"]
    assert carried["eval"] != reset["eval"]


def test_stateful_evaluation_reads_the_whole_stream(corpus_root, tmp_path):
    task = make_task("corpus", seq_len=8, root=corpus_root, cache_dir=tmp_path / "cache", split="validation")
    model = build_model(mixer="lstm", vocab_size=256, d_model=16, n_layers=1, seed=0)
    whole = evaluate(model, task, batches=0, batch_size=2, stateful=True)
    first = evaluate(model, task, batches=1, batch_size=2, stateful=True)
    assert 7 < whole["bits_per_byte"] < 9 and whole != first  # untrained: about log2(256) = 8 bits per byte


def test_task_override_replaces_the_configs_task(tmp_path):
    result = train(run_config(steps=1), "prefix_parity", out=tmp_path / "run", progress=False)
    assert RunConfig.load(tmp_path / "run" / "config.json").task == {"name": "prefix_parity"}
    assert result["steps"] == 1


def test_stream_needs_a_streaming_task(tmp_path):
    with pytest.raises(InputError, match="train.stream.*streaming task"):
        train(run_config(stream=True), out=tmp_path / "run", progress=False)


# ---------------------------------------------------------------------------------------------------------
# resume (in process; the SIGKILL version is in test_train_processes.py)


@pytest.mark.parametrize("kind", ["mqar", "corpus"])
def test_interrupted_run_resumes_bit_identically(corpus_root, tmp_path, monkeypatch, kind):
    config = run_config(steps=6, checkpoint_every=2) if kind == "mqar" else corpus_config(
        corpus_root, tmp_path, steps=6, checkpoint_every=2, grad_accum=2)
    train(config, out=tmp_path / "whole", progress=False)

    real, calls = losses.masked_cross_entropy, {"n": 0}

    def crash_in_step_4(logits, batch):
        calls["n"] += 1
        if calls["n"] > 3 * (2 if kind == "corpus" else 1):
            raise KeyboardInterrupt  # dies mid-step, after checkpoint 2 and a logged step 3
        return real(logits, batch)

    monkeypatch.setattr(losses, "masked_cross_entropy", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(config, out=tmp_path / "cut", progress=False)
    assert [r["step"] for r in rows(tmp_path / "cut")] == [1, 2, 3]
    monkeypatch.setattr(losses, "masked_cross_entropy", real)
    train(config, out=tmp_path / "cut", progress=False, resume=True)

    assert_same_weights(tmp_path / "whole" / "checkpoint", tmp_path / "cut" / "checkpoint")
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows(tmp_path / "whole")]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows(tmp_path / "cut")] == strip
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())
    cut = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert whole["eval"] == cut["eval"]


def test_resume_finds_the_checkpoint_a_crash_moved_aside(tmp_path):
    """A kill between the two renames that replace checkpoint/ leaves only the previous one, moved aside."""
    out = tmp_path / "run"
    train(run_config(steps=4, checkpoint_every=2), out=out, progress=False)
    train(run_config(steps=4, checkpoint_every=2), out=tmp_path / "whole", progress=False)
    (out / "checkpoint").rename(out / ".checkpoint.old-1234abcd")
    train(run_config(steps=4, checkpoint_every=2), out=out, progress=False, resume=True)
    assert_same_weights(out / "checkpoint", tmp_path / "whole" / "checkpoint")
    assert not list(out.glob(".checkpoint.old-*"))


def test_resume_with_a_different_config_is_refused(tmp_path):
    train(run_config(steps=2), out=tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="differs from the run's at 'train.lr'"):
        train(run_config(steps=2, lr=0.5), out=tmp_path / "run", progress=False, resume=True)


# ---------------------------------------------------------------------------------------------------------
# the command line: train, eval and bad input (one clear line, exit status 2)


def write_config(tmp_path, config):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    return path


def test_cli_train_with_set_and_eval_json(tmp_path, capsys):
    cfg = write_config(tmp_path, run_config(steps=2))
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(cfg), "--out", str(out), "--set", "train.lr=0.01",
                     "--no-progress"]) == 0
    assert RunConfig.load(out / "config.json").train.lr == 0.01
    capsys.readouterr()
    assert cli.main(["eval", str(out / "checkpoint"), "--task", "mqar", "--set", "vocab_size=16",
                     "--set", "seq_len=16", "--set", "num_pairs=2", "--batches", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"loss", "accuracy", "seq_accuracy"}


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_task", "unknown task 'nope'"),
        ("impossible_params", "num_pairs = 5 does not fit in seq_len = 16"),
        ("resume_missing", "cannot resume: no training checkpoint"),
        ("unwritable_out", "cannot write to output folder"),
        ("existing_run", "already holds a run"),
        ("bad_set", "unknown config key 'train.lrr'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_clear_line(tmp_path, capsys, case, message):
    config = run_config(steps=1)
    out = tmp_path / "run"
    args = []
    if case == "unknown_task":
        args = ["--task", "nope"]
    elif case == "impossible_params":
        config["task"] = {**TINY_MQAR, "num_pairs": 5}
    elif case == "resume_missing":
        args = ["--resume"]
    elif case == "unwritable_out":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    elif case == "existing_run":
        train(config, out=out, progress=False)
    elif case == "bad_set":
        args = ["--set", "train.lrr=1"]
    cfg = write_config(tmp_path, config)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(cfg), "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_eval_missing_checkpoint_exits_2(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "nothing"), "--task", "mqar"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_divergence_exits_1_with_a_message(tmp_path, capsys, monkeypatch):
    poison(monkeypatch, bad_calls=set(range(100)))
    cfg = write_config(tmp_path, run_config(steps=5, max_nonfinite=2))
    assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    assert "non-finite" in capsys.readouterr().err
