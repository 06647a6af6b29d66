"""Bad input, as a careless or hostile user gives it: one clear error each (CLI: one line, exit status 2; API:
`InputError` naming the value), never a traceback, a model trained on NaN or an allocation that cannot fit."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

import seqlab
from seqlab.cli import main
from seqlab.config import ModelConfig, RunConfig
from seqlab.errors import InputError
from seqlab.models import size

TINY_RUN = {
    "model": {"mixer": "gru", "d_model": 16, "n_layers": 1, "vocab_size": 16},
    "task": {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2},
    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_batches": 1, "log_every": 1},
}


def cli_error(capsys, *argv) -> str:
    """Run the CLI in this process; assert exit status 2 and exactly one line on stderr; return that line."""
    assert main(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqlab: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny byte-level checkpoint (vocab 256, so --prompt works)."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    seqlab.save(seqlab.build_model(mixer="gru", vocab_size=256, d_model=16, n_layers=1, seed=0), path)
    return path


def copy_ckpt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite(ckpt_dir, name: str, data: bytes) -> None:
    """Replace file `name` of a checkpoint and record its new hash, as a careless edit by hand would not."""
    (ckpt_dir / name).write_bytes(data)
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["sha256"][name] = hashlib.sha256(data).hexdigest()
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------------------------
# 1. non-finite and out-of-range config values


@pytest.mark.parametrize("make", [
    lambda: RunConfig.from_dict({"train": {"lr": math.nan}}),
    lambda: RunConfig.from_dict({"train": {"lr": math.inf}}),
    lambda: RunConfig.from_dict({"train": {"weight_decay": -math.inf}}),
    lambda: RunConfig.from_dict({"train": {"beta1": math.nan}}),
    lambda: seqlab.build_model(norm_eps=math.nan),
    lambda: seqlab.build_model(init_std=math.nan),
    lambda: seqlab.build_model(init_std=math.inf),
    lambda: ModelConfig.from_dict({"arch": "recurrent_depth", "depth": {"mean_steps": math.inf}}),
], ids=["lr-nan", "lr-inf", "wd-neg-inf", "beta1-nan", "norm_eps-nan", "init_std-nan", "init_std-inf",
        "mean_steps-inf"])
def test_non_finite_config_values_are_refused(make):
    with pytest.raises(InputError, match="expected a finite number|must be"):
        make()


def test_every_mixer_section_refuses_non_finite_floats():
    """Mixer sections get the check from check_types: every float field of every section refuses NaN."""
    import dataclasses
    import typing

    from seqlab.config import SECTIONS

    checked = 0
    for key, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (float, float | None):
                with pytest.raises(InputError, match=f"{key}.{f.name}"):
                    ModelConfig.from_dict({key: {f.name: math.nan}})
                checked += 1
    assert checked > 0


def test_cli_nan_and_infinity_in_a_config_file(tmp_path, capsys):
    for value in ("NaN", "Infinity"):
        cfg = tmp_path / f"{value}.json"
        cfg.write_text(json.dumps(TINY_RUN).replace('"warmup_steps": 1', f'"warmup_steps": 1, "lr": {value}'))
        line = cli_error(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / value), "--no-progress")
        assert "'train.lr'" in line and "finite" in line
        assert not (tmp_path / value / "checkpoint").exists()


# ------------------------------------------------------------------------------------------------------------
# 2-4. files that are not UTF-8, a manifest version that is not a number, a config that is not an object


def test_binary_config_file(tmp_path, capsys):
    cfg = tmp_path / "bin.json"
    cfg.write_bytes(b"\xff\xfe\x00\x81binary")
    line = cli_error(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert str(cfg) in line and "UTF-8" in line


@pytest.mark.parametrize("name", ["config.json", "manifest.json"])
def test_binary_files_in_a_checkpoint(ckpt, tmp_path, capsys, name):
    bad = copy_ckpt(ckpt, tmp_path / "bad")
    if name == "manifest.json":
        (bad / name).write_bytes(b"\xff\xfe\x00\x81")
    else:
        rewrite(bad, name, b"\xff\xfe\x00\x81")
    with pytest.raises(InputError, match=name):
        seqlab.load(bad)
    for argv in (["eval", str(bad), "--task", "mqar"], ["generate", str(bad), "--tokens", "1,2"]):
        assert name in cli_error(capsys, *argv)


def test_manifest_version_as_a_string(ckpt, tmp_path):
    bad = copy_ckpt(ckpt, tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "version": "2"}))
    with pytest.raises(InputError, match="format version '2'"):
        seqlab.load(bad)


@pytest.mark.parametrize("text", ["[1, 2, 3]", "[]", "3", '"model"', "null"])
def test_a_config_must_be_a_json_object(tmp_path, capsys, text):
    cfg = tmp_path / "c.json"
    cfg.write_text(text)
    line = cli_error(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress")
    assert "expected an object" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------------------
# 5. sizes checked before allocating


@pytest.fixture
def machine_64gb(monkeypatch):
    """The refusals below hold on any machine with less than ~190 GB; pin what seqlab sees to 64 GiB."""
    monkeypatch.setattr(size, "available_bytes", lambda device="cpu": 64 << 30)


def test_a_model_too_large_is_refused_before_allocating(machine_64gb):
    with pytest.raises(InputError, match="needs about .* GB .* available is"):
        seqlab.build_model(mixer="attention", d_model=32768, n_layers=8)
    with pytest.raises(InputError, match="too large|available is"):
        seqlab.build_model(vocab_size=2**62)


def test_allow_large_overrides_the_memory_check(monkeypatch):
    monkeypatch.setattr(size, "available_bytes", lambda device="cpu": 1000)
    with pytest.raises(InputError, match="allow_large"):
        seqlab.build_model(mixer="gru", d_model=16, n_layers=1)
    assert seqlab.build_model(mixer="gru", d_model=16, n_layers=1, allow_large=True) is not None


def test_the_estimate_counts_parameters_and_states():
    cfg = ModelConfig.from_dict({"mixer": "attention", "d_model": 32, "n_layers": 2, "vocab_size": 37,
                                 "attention": {"n_heads": 4}})
    model = seqlab.build_model(cfg)
    est = seqlab.models.estimate_bytes(cfg, batch=3, tokens=50)
    real = 4 * model.num_parameters()
    assert real <= est.parameters <= 1.01 * real
    assert est.state == model.state_bytes(50, 3)


@pytest.mark.parametrize("sets", [["model.d_model=65536"], ["train.batch_size=2147483648"],
                                  ["model.vocab_size=68719476736"],
                                  ["model.mixer=attention", "model.d_model=32768", "model.n_layers=8"]])
def test_cli_train_too_large(tmp_path, capsys, sets, machine_64gb):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({**TINY_RUN, "model": {"mixer": "gru", "n_layers": 1}}))
    argv = ["train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert "available is" in cli_error(capsys, *argv)


def test_a_checkpoint_claiming_a_huge_model(ckpt, tmp_path, capsys):
    bad = copy_ckpt(ckpt, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    rewrite(bad, "config.json", json.dumps({**cfg, "mixer": "attention", "d_model": 32768, "n_layers": 8}).encode())
    line = cli_error(capsys, "eval", str(bad), "--task", "mqar")
    assert "config.json implies" in line or "is missing" in line or "not part of the model" in line


def test_generate_too_many_tokens(ckpt, capsys, machine_64gb):
    line = cli_error(capsys, "generate", str(ckpt), "--tokens", "1,2", "--max-new-tokens", "1000000000000")
    assert "decoding up to 1,000,000,000,002 tokens" in line and "available is" in line
    model = seqlab.load(ckpt)
    with pytest.raises(InputError, match="available is"):
        seqlab.generate(model, [1, 2], max_new_tokens=10**12)
    stream = seqlab.Stream(model)
    stream.feed([1, 2])
    with pytest.raises(InputError, match="available is"):
        stream.generate(10**12)


# ------------------------------------------------------------------------------------------------------------
# 6-7. values entering through the CLI and the API


@pytest.mark.parametrize("argv, expected", [
    (["--tokens", "1,99999999999999999999"], "out of range"),
    (["--tokens", "1,,2"], "expected comma-separated integers"),
    (["--tokens", "1,2,"], "expected comma-separated integers"),
    (["--tokens", "-1"], "expected comma-separated integers"),
    (["--tokens", "1", "--temperature", "nan"], "temperature = nan"),
    (["--tokens", "1", "--temperature", "inf"], "temperature = inf"),
    (["--tokens", "1", "--top-p", "nan"], "top_p = nan"),
])
def test_cli_generate_values(ckpt, capsys, argv, expected):
    assert expected in cli_error(capsys, "generate", str(ckpt), *argv)


def test_cli_profile_empty_mixers(capsys):
    assert "--mixers ''" in cli_error(capsys, "profile", "--mixers", "", "--contexts", "8")


def test_api_temperature_nan(ckpt):
    model = seqlab.load(ckpt)
    for t in (math.nan, math.inf, -1.0):
        with pytest.raises(InputError, match="temperature"):
            seqlab.generate(model, [1, 2], max_new_tokens=2, temperature=t)


def test_float_prompts_are_refused_like_the_model_does(ckpt):
    model = seqlab.load(ckpt)
    with pytest.raises(InputError, match="dtype"):
        model(torch.tensor([[1.5, 2.7]]))
    with pytest.raises(InputError, match="dtype"):
        seqlab.generate(model, torch.tensor([[1.5, 2.7]]), max_new_tokens=2)
    with pytest.raises(InputError, match="dtype"):
        seqlab.Stream(model).feed(torch.tensor([1.5, 2.7]))
    with pytest.raises(InputError, match="prompt token 1.5"):
        seqlab.Stream(model).feed([1.5, 2])
    with pytest.raises(InputError, match="prompt token"):
        seqlab.generate(model, [1, 2**70], max_new_tokens=1)


# ------------------------------------------------------------------------------------------------------------
# 8. a state from another model


def test_a_state_from_another_model_is_named():
    a = seqlab.build_model(mixer="gru", d_model=16, n_layers=1, vocab_size=32)
    b = seqlab.build_model(mixer="gru", d_model=24, n_layers=1, vocab_size=32)
    c = seqlab.build_model(mixer="attention", d_model=16, n_layers=1, vocab_size=32)
    x = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(InputError, match=r"state layer 0 \(gru\): GRUState.h has shape \(1, 1, 24\)"):
        a(x, b(x)[1])
    with pytest.raises(InputError, match="got a KVCache.*keeps a GRUState"):
        a(x, c(x)[1])
    with pytest.raises(InputError, match="holds 2 sequences"):
        a(x, a(torch.zeros(2, 2, dtype=torch.long))[1])
    a(x, a(x)[1])  # its own state still works


def test_state_checks_cover_every_mixer():
    """Every registered mixer's state is checked (generic: no mixer is named), against a model 8 wider."""
    for mixer in seqlab.available_mixers():
        fields = {"mixer": mixer, "n_layers": 1, "vocab_size": 32}
        small, wide = (seqlab.build_model({**fields, "d_model": d}) for d in (32, 64))
        x = torch.zeros(1, 3, dtype=torch.long)
        with pytest.raises(InputError, match="state layer 0"):
            small(x, wide(x)[1])


def test_a_long_generation_is_refused_for_its_cache_not_for_a_fixed_state(machine_64gb):
    """Decoding feeds one token at a time: a recurrent model's 10^7 tokens need their token buffer and a fixed
    state, while attention's KV cache for 10^8 tokens (~190 GB here) is refused."""
    from seqlab.models.size import check_decode_fits

    fields = {"d_model": 128, "n_layers": 2, "vocab_size": 256}
    check_decode_fits(seqlab.build_model(mixer="gru", **fields), 1, 10**7, torch.device("cpu"), prefill=10)
    with pytest.raises(InputError, match=r"state 190\.7 GB"):
        check_decode_fits(seqlab.build_model(mixer="attention", **fields), 1, 10**8, torch.device("cpu"))


def test_a_recurrent_depth_state_from_another_model_is_named():
    fields = {"arch": "recurrent_depth", "mixer": "gru", "vocab_size": 8}
    a, b = (seqlab.build_model({**fields, "d_model": d}).eval() for d in (16, 24))
    x = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(InputError, match=r"state layer 0 \(gru\): GRUState.h has shape \(1, 1, 24\)"):
        a(x, b(x, steps=2)[1], steps=2)
    a(x, a(x, steps=2)[1], steps=2)
