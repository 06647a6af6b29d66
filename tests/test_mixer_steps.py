"""Each mixer's own pieces: the one-token `step` against `forward`, its state-size formula against the state it
returns, and fp32 recurrent states under bf16 weights."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_states_close, state_tensors, tiny

import seqlab

ALL = seqlab.available_mixers()
RECURRENT = [m for m in ALL if "attention" not in m]


@pytest.mark.parametrize("mixer", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_formula_equals_the_state(mixer, dtype):
    model = tiny(mixer, n_layers=3).to(dtype)
    for T in (1, 4, 7, 23):
        for batch in (1, 3):
            with torch.no_grad():
                _, state = model(torch.randint(0, 37, (batch, T)))
            assert model.state_bytes(T, batch, dtype) == state.nbytes, (T, batch)
    block = model.blocks[0].mixer
    assert isinstance(type(block).STATE_FORMULA, str) and type(block).STATE_FORMULA


@pytest.mark.parametrize("mixer", RECURRENT)
def test_bf16_weights_keep_fp32_recurrent_states(mixer):
    model = tiny(mixer).to(torch.bfloat16)
    tokens = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        logits, state = model(tokens)
        step_logits, stepped = model.step(tokens[:, -1], state)
        _, one = model(tokens[:, -1:], state)
    assert logits.dtype == step_logits.dtype == torch.bfloat16
    for s in (state, stepped, one):
        for layer in s.layers:
            for name, t in layer.tensors().items():
                if name not in ("window", "conv"):  # a convolution's window holds inputs, in the model's dtype
                    assert t.dtype == torch.float32, (mixer, name, t.dtype)


@pytest.mark.parametrize("layers", [(m,) for m in ALL] + [("lstm", "attention", "mamba", "gla", "gru")])
def test_model_step_equals_a_one_token_call(layers):
    model = tiny(layers=layers * 2 if len(layers) == 1 else layers)
    tokens = torch.randint(0, 37, (3, 12))
    with torch.no_grad():
        _, state = model(tokens[:, :8])
        ref_state, stepped = state, state
        for t in range(8, 12):
            ref, ref_state = model(tokens[:, t:t + 1], ref_state)
            got, stepped = model.step(tokens[:, t], stepped)
            torch.testing.assert_close(got, ref[:, 0], atol=1e-5, rtol=0)
    assert_states_close(stepped, ref_state, atol=1e-5)


@pytest.mark.parametrize("mixer", RECURRENT)
def test_recurrent_step_is_differentiable_like_forward(mixer):
    """A recurrent mixer's step is plain tensor math: gradients through it equal those through forward."""
    model = tiny(mixer).train()
    tokens = torch.randint(0, 37, (2, 6))
    _, state = model(tokens[:, :5])
    grads = []
    for path in ("forward", "step"):
        model.zero_grad()
        if path == "forward":
            logits = model(tokens[:, 5:], state)[0][:, 0]
        else:
            logits = model.step(tokens[:, 5], state)[0]
        logits.square().sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_plain_cache_concatenates_and_trains_a_buffered_one_appends_in_place():
    model = tiny("attention").train()
    tokens = torch.randint(0, 37, (2, 10))
    _, plain = model(tokens[:, :6])
    logits, after = model(tokens[:, 6:], plain)  # concatenation under autograd: backward works
    logits.sum().backward()
    assert after.layers[0].buffer is None
    with torch.no_grad():
        _, buffered = model.step(tokens[:, 6], plain)
        assert buffered.layers[0].buffer is not None
        _, next_state = model(tokens[:, 7:], buffered)  # appended in place into the same buffer
    assert next_state.layers[0].buffer is buffered.layers[0].buffer
    assert state_tensors(next_state)[0].shape[2] == 10


def test_rotary_tables_stay_put_in_fp64():
    """An fp64 model's RoPE tables are built once in fp64 (they were rebuilt at twice the size on every call)."""
    model = tiny("attention").double()
    tokens = torch.randint(0, 37, (1, 8))
    with torch.no_grad():
        for _ in range(4):
            model(tokens)
    rotary = model.blocks[0].mixer.rotary
    assert rotary.cos_table.dtype == torch.float64 and rotary.cos_table.shape[0] == 64
