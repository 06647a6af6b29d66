"""Decode plans (`seqlab.infer.plan`): one token through the plan gives the model's own logits and state, for every
mixer and every block variant; `generate` with and without a plan gives the same tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_states_close, tiny

import seqlab
from seqlab.errors import InputError
from seqlab.infer.plan import DecodePlan
from seqlab.interop.quantize import quantize

ALL = seqlab.available_mixers()

VARIANTS = {
    "gpt2-like": dict(mixer="attention", position="learned", norm="layernorm", mlp="gelu_tanh", mlp_bias=True),
    "llama-like": dict(mixer="attention", attention={"n_heads": 4, "n_kv_heads": 2, "bias": False}, mlp="swiglu",
                       norm="rmsnorm", tie_embeddings=False),
    "sandwich-gelu": dict(mixer="attention", sandwich_norm=True, mlp="gelu"),
    "mamba-no-mlp": dict(mixer="mamba", mlp="none", norm="rmsnorm"),
    "hybrid": dict(layers=("mamba", "attention", "gla", "sliding_attention")),
    "conv-lstm": dict(layers=("conv", "lstm")),
}


def _model(name_or_mixer: str):
    if name_or_mixer in VARIANTS:
        fields = dict(VARIANTS[name_or_mixer])
        layers = fields.pop("layers", None)
        mixer = fields.pop("mixer", None)
        return tiny(mixer, layers=layers, **fields)
    return tiny(name_or_mixer)


@pytest.mark.parametrize("name", [*ALL, *VARIANTS])
def test_plan_step_equals_the_model_step(name):
    model = _model(name)
    plan = DecodePlan.build(model)
    assert plan is not None
    tokens = torch.randint(0, 37, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, ref_state = model(tokens[:, :5])
        state = ref_state
        for t in range(5, 14):  # past the sliding window (5) and the KV buffers' first spare room
            ref, ref_state = model(tokens[:, t:t + 1], ref_state)
            got, state = plan(tokens[:, t:t + 1], state)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert_states_close(state, ref_state, atol=1e-5)
        full, _ = model(tokens)  # and both equal one parallel call over the whole sequence
    torch.testing.assert_close(got[:, 0], full[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["attention", "mamba", "gla", "gpt2-like", "hybrid"])
def test_generate_with_and_without_a_plan_gives_the_same_tokens(name):
    model = _model(name)
    prompt = torch.randint(0, 37, (2, 4), generator=torch.Generator().manual_seed(1))
    for kwargs in ({}, {"temperature": 0.8, "top_k": 10, "seed": 3}):
        fast = seqlab.generate(model, prompt, max_new_tokens=16, **kwargs)
        slow = seqlab.generate(model, prompt, max_new_tokens=16, plan=False, **kwargs)
        assert torch.equal(fast, slow), kwargs
    assert torch.equal(fast, seqlab.generate(model, prompt, max_new_tokens=16, use_cache=False, **kwargs))


def test_plan_covers_only_what_it_can_and_calls_modules_for_the_rest():
    depth = seqlab.build_model(arch="recurrent_depth", vocab_size=37, d_model=32, seed=0)
    assert DecodePlan.build(depth) is None  # not a LanguageModel: generate calls the model itself
    assert DecodePlan.build(tiny("attention").to(torch.bfloat16)) is None
    model = quantize(tiny("attention"))  # int8 linear layers: called as modules inside the plan
    plan = DecodePlan.build(model)
    tokens = torch.randint(0, 37, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        _, state = model(tokens[:, :5])
        torch.testing.assert_close(plan(tokens[:, 5:], state)[0], model(tokens[:, 5:], state)[0], atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("mixer", ["mamba", "attention"])
def test_plan_sees_in_place_weight_updates(mixer):
    model = tiny(mixer, mamba={"chunk_size": 8, "dt_min": 0.5, "dt_max": 1.0})  # large steps: A_log matters
    plan = DecodePlan.build(model)
    tokens = torch.randint(0, 37, (1, 6), generator=torch.Generator().manual_seed(4))

    def step(f):
        with torch.inference_mode():
            _, state = model(tokens[:, :5])
            return f(tokens[:, 5:], state)[0]

    before = step(model)
    with torch.no_grad():
        for p in model.parameters():  # in place, as an optimizer step does: A_log, D and the biases too
            p.mul_(1.5)
    after = step(model)
    assert (after - before).abs().max() > 1e-3  # the update changes the output
    torch.testing.assert_close(step(plan), after, atol=1e-5, rtol=1e-5)
    if mixer == "mamba":
        with torch.no_grad():
            for block in model.blocks:
                block.mixer.A_log.sub_(3.0)  # A alone (20x slower decay): the plan computes -exp(A_log) again
        torch.testing.assert_close(step(plan), step(model), atol=2e-6, rtol=1e-5)
        assert (step(model) - after).abs().max() > 1e-4


def test_plan_defers_to_the_model_off_its_path():
    model = tiny("mamba")
    plan = DecodePlan.build(model)
    tokens = torch.randint(0, 37, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        _, state = model(tokens[:, :5])
        chunk, _ = plan(tokens[:, 3:], model(tokens[:, :3])[1])  # more than one token: the model's own call
        assert chunk.shape == (1, 3, 37)
        torch.testing.assert_close(plan(tokens[:, :1], None)[0], model(tokens[:, :1])[0])  # no state yet: the same
        for bad in (torch.tensor([[37]]), torch.tensor([[-1]]), torch.tensor([[0.5]])):  # the model's own errors
            with pytest.raises(InputError, match="token"):
                plan(bad, state)
        with pytest.raises(InputError, match="state must be the ModelState"):
            plan(tokens[:, :1], "not a state")
    learned = tiny("attention", position="learned", max_positions=6)
    plan = DecodePlan.build(learned)
    with torch.inference_mode():
        _, state = learned(tokens)
        with pytest.raises(InputError, match="max_positions = 6"):  # the model's error, not an index error
            plan(tokens[:, :1], state)


def test_a_stream_decodes_through_one_plan_and_still_checks_its_input():
    model = tiny("mamba")
    stream = seqlab.Stream(model)
    stream.feed([1, 2, 3])
    logits = stream.feed([4])
    plan = stream._plan
    assert isinstance(plan, DecodePlan)
    stream.generate(5)
    assert stream._plan is plan  # built once, kept
    with torch.inference_mode():
        ref, _ = model(torch.tensor([[1, 2, 3, 4]]))
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="out of range"):
        stream.feed([99])


@pytest.mark.parametrize("name", ["mamba", "gpt2-like", "hybrid"])
def test_a_model_built_under_inference_mode_decodes_through_its_plan(name):
    """Parameters made under inference_mode are inference tensors (no version counter), as in the profiler's cells."""
    with torch.inference_mode():
        model = _model(name)
        tokens = torch.randint(0, 37, (1, 6), generator=torch.Generator().manual_seed(6))
        _, state = model(tokens[:, :5])
        torch.testing.assert_close(DecodePlan.build(model)(tokens[:, 5:], state)[0], model(tokens[:, 5:], state)[0],
                                   atol=1e-5, rtol=1e-5)
