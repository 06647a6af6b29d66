"""Configs: JSON round trip, and one clear error per kind of bad value."""

from __future__ import annotations

import json

import pytest

from seqlab.config import MIXERS, ModelConfig, RunConfig, TrainConfig, layer_plan
from seqlab.errors import InputError
from seqlab.models import as_config


def test_json_round_trip(tmp_path):
    cfg = ModelConfig.from_dict({"d_model": 48, "layers": ["gru", "attention", "conv"],
                                 "attention": {"n_heads": 6, "window": 16}})
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["layers"] == ["gru", "attention", "conv"]


def test_layers_alone_fix_the_depth():
    cfg = as_config(layers=["lstm", "attention", "lstm"])
    assert cfg.n_layers == 3 and cfg.layer_mixers == ("lstm", "attention", "lstm")


@pytest.mark.parametrize("fields, match", [
    ({"mixr": "gru"}, r"unknown config key 'mixr'; allowed keys: .*mixer"),
    ({"mixer": "transformer"}, r"'mixer' = 'transformer': expected one of attention, sliding_attention"),
    ({"d_model": 0}, r"'d_model' = 0: must be > 0"),
    ({"d_model": -8}, r"'d_model' = -8: must be > 0"),
    ({"d_model": 30}, r"'d_model' = 30: must be divisible by attention.n_heads = 4"),
    ({"d_model": "big"}, r"'d_model' = 'big': expected int"),
    ({"n_layers": 2.5}, r"'n_layers' = 2.5: expected int"),
    ({"layers": ["gru", "nope"]}, r"'layers\[1\]' = 'nope'"),
    ({"layers": ["gru"], "n_layers": 2}, r"'layers' has 1 entries but n_layers = 2"),
    ({"attention": {"n_heads": 4, "n_kv_heads": 3}}, r"'attention.n_kv_heads' = 3: must divide"),
    ({"attention": {"window": 0}}, r"'attention.window' = 0"),
    ({"attention": {"heads": 4}}, r"unknown config key 'attention.heads'"),
    ({"attention": 4}, r"section 'attention' must be an object"),
    ({"norm": "batchnorm"}, r"'norm' = 'batchnorm': expected one of rmsnorm, layernorm"),
    ({"mamba": {"impl": "cuda"}}, r"'mamba.impl' = 'cuda': expected one of auto, chunked, ref, kernel"),
    ({"tie_embeddings": 1}, r"'tie_embeddings' = 1: expected bool"),
    ({"init": "xavier"}, r"'init' = 'xavier': expected one of gpt2, torch"),
])
def test_invalid_model_config(fields, match):
    with pytest.raises(InputError, match=match):
        ModelConfig.from_dict(fields)


@pytest.mark.parametrize("fields, match", [
    ({"lr": 0}, r"'train.lr' = 0: must be > 0"),
    ({"beta2": 1.0}, r"'train.beta2' = 1.0: must be in \[0, 1\)"),
    ({"warmup_steps": -1}, r"'train.warmup_steps' = -1: must be >= 0"),
])
def test_invalid_train_config(fields, match):
    with pytest.raises(InputError, match=match):
        TrainConfig.from_dict(fields)


def test_run_config_needs_a_task_name():
    with pytest.raises(InputError, match="task.name"):
        RunConfig.from_dict({"task": {"seq_len": 8}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ModelConfig.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        ModelConfig.load(tmp_path / "bad.json")


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        ModelConfig().d_model = 3  # type: ignore[misc]


def test_layer_plan_plus_form_cycles_the_names_over_the_layers():
    assert layer_plan("gru", 3) == ("gru", "gru", "gru")
    assert layer_plan("lstm+attention", 4) == ("lstm", "attention", "lstm", "attention")
    assert layer_plan("lstm+attention", 3) == ("lstm", "attention", "lstm")
    assert layer_plan("mamba+gla+attention", 3) == ("mamba", "gla", "attention")


def test_layer_plan_ratio_form_repeats_the_pattern():
    assert layer_plan("3:1 mamba:attention", 8) == ("mamba",) * 3 + ("attention",) + ("mamba",) * 3 + ("attention",)
    assert layer_plan("3:1 mamba:attention", 5) == ("mamba", "mamba", "mamba", "attention", "mamba")
    assert layer_plan("1:2 gru:conv", 3) == ("gru", "conv", "conv")
    assert layer_plan("2 gla", 3) == ("gla", "gla", "gla")
    assert layer_plan(":".join("1" * len(MIXERS)) + " " + ":".join(MIXERS), len(MIXERS)) == tuple(MIXERS)


@pytest.mark.parametrize("spec, says", [
    ("transformer", "mixer 'transformer' is not available"),
    ("lstm+", "mixer '' is not available"),
    ("3:1 mamba:transformer", "mixer 'transformer' is not available"),
    ("3:1 mamba", "one count >= 1 per name"),
    ("3:0 mamba:attention", "one count >= 1 per name"),
    ("x:1 mamba:attention", "one count >= 1 per name"),
    ("3:1 mamba attention", "counts and names joined by ':'"),
    ("", "expected a mixer name"),
])
def test_layer_plan_bad_spec_names_the_spec_and_what_was_expected(spec, says):
    with pytest.raises(InputError) as err:
        layer_plan(spec, 4)
    assert f"layer spec {spec!r}" in str(err.value) and says in str(err.value)
    assert "'3:1 mamba:attention'" in str(err.value)  # the ratio form is shown as an example


def test_a_run_config_parses_its_model_like_a_model_config():
    """Nested in a run config, a model gets the same conveniences as ModelConfig.from_dict (it used to be parsed
    field by field, so a recurrent-depth model without n_layers failed with 'n_layers' = 2 ... leave it out)."""
    run = RunConfig.from_dict({"model": {"arch": "recurrent_depth", "mixer": "gru", "depth": {"core": 3}}})
    assert run.model == ModelConfig.from_dict({"arch": "recurrent_depth", "mixer": "gru", "depth": {"core": 3}})
    assert run.model.n_layers == 5 and run.model.sandwich_norm
    assert RunConfig.from_dict(run.to_dict()) == run
    with pytest.raises(InputError, match="unknown config key 'model.mamba_x'"):
        RunConfig.from_dict({"model": {"mamba_x": {}}})
    with pytest.raises(InputError, match="config field 'mamba.d_state' = 0: must be > 0"):
        RunConfig.from_dict({"model": {"mamba": {"d_state": 0}}})


def test_a_ratio_the_depth_never_reaches_is_refused():
    with pytest.raises(InputError, match="'3:1 gated_deltanet:attention' with n_layers = 2 never reaches mixer "
                                         "'attention'"):
        layer_plan("3:1 gated_deltanet:attention", 2)
    assert layer_plan("3:1 gated_deltanet:attention", 4)[-1] == "attention"
    with pytest.raises(InputError, match="'lstm\\+gru\\+attention' with n_layers = 2 never reaches mixer 'attention'"):
        layer_plan("lstm+gru+attention", 2)  # the '+' form used to drop attention silently
    assert layer_plan("lstm+gru+attention", 3) == ("lstm", "gru", "attention")
