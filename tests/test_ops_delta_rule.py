"""delta_rule: the chunked (UT transform) form, the step and the update against the naive twin (ops/naive.py, which
shares no helper with them: outputs, final state, every gradient), the twin against the equation in plain Python
floats, carried states, bf16, strong decay and tiny gates, tracing, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches, outputs_and_grads, rel_err
from hypothesis import example, given, settings
from hypothesis import strategies as st

from seqlab.errors import InputError
from seqlab.ops import delta_rule, delta_rule_ref, delta_rule_step, delta_rule_update


def make_inputs(B, H, L, dk, dv, seed, *, init=True, gate="mild", beta="mid", dtype=torch.float32):
    """Inputs as the mixers make them: L2-normalized keys (so I - beta k k^T is a contraction), beta in (0, 1).
    gate: None (DeltaNet), "mild" (log-sigmoid), "strong" (log gates from ~0 down to ~ -1e3 per step: most decays
    underflow to exactly 0) or "tiny" (g = -1e4 everywhere). beta: "mid" (uniform), "low" (~1e-4), "high" (~1)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = dict(q=r(B, H, L, dk), k=F.normalize(r(B, H, L, dk), dim=-1), v=r(B, H, L, dv))
    x["beta"] = {"mid": torch.sigmoid(r(B, H, L)), "low": torch.sigmoid(r(B, H, L) - 9),
                 "high": torch.sigmoid(r(B, H, L) + 9)}[beta]
    if gate is not None:
        x["g"] = {"mild": F.logsigmoid(r(B, H, L) + 2), "strong": -torch.exp(r(B, H, L) * 3 + 2),
                  "tiny": torch.full((B, H, L), -1e4, dtype=torch.float64)}[gate]
    if init:
        x["initial_state"] = r(B, H, dk, dv)
    return {k: v.to(dtype) for k, v in x.items()}


def run(x, impl, chunk_size=64, scale=None, seed=1):
    """o, final state and the gradient of every input for a fixed random cotangent. impl "ref" calls the naive twin
    itself, "chunked" the fast form."""
    if impl == "ref":
        return outputs_and_grads(lambda **k: delta_rule_ref(**k, return_final_state=True, scale=scale), x, seed)
    return outputs_and_grads(lambda **k: delta_rule(**k, return_final_state=True, chunk_size=chunk_size,
                                                    scale=scale), x, seed)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), H=st.integers(1, 2), L=st.integers(1, 45), dk=st.integers(1, 5), dv=st.integers(1, 4),
       chunk=st.sampled_from([1, 2, 3, 4, 8, 16, 64]), init=st.booleans(),
       gate=st.sampled_from([None, "mild", "strong"]), beta=st.sampled_from(["mid", "low", "high"]),
       scale=st.sampled_from([None, 0.3]), seed=st.integers(0, 2**16))
@example(B=1, H=2, L=1, dk=3, dv=2, chunk=64, init=True, gate="mild", beta="mid", scale=None, seed=0)  # length 1
@example(B=2, H=1, L=37, dk=4, dv=3, chunk=16, init=True, gate="mild", beta="mid", scale=None, seed=1)  # 2 * 16 + 5
@example(B=1, H=2, L=29, dk=3, dv=2, chunk=8, init=True, gate="strong", beta="mid", scale=None, seed=2)  # strong
@example(B=1, H=1, L=20, dk=4, dv=2, chunk=8, init=True, gate="mild", beta="low", scale=None, seed=3)  # beta ~ 0
@example(B=1, H=1, L=20, dk=4, dv=2, chunk=8, init=True, gate=None, beta="high", scale=0.3, seed=4)  # beta ~ 1
def test_chunked_matches_the_naive_twin_fp64(B, H, L, dk, dv, chunk, init, gate, beta, scale, seed):
    """In fp64 the two forms differ only by rounding, so a tight tolerance sees any difference in the math: the
    decays, beta, the scale, the initial state, and every gradient (q, k, v, beta, g, initial_state)."""
    x = make_inputs(B, H, L, dk, dv, seed, init=init, gate=gate, beta=beta, dtype=torch.float64)
    got, want = run(x, "chunked", chunk_size=chunk, scale=scale), run(x, "ref", scale=scale)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    assert set(got[2]) == set(x)
    assert_matches(got, want, 1e-10)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(L=st.integers(1, 70), chunk=st.sampled_from([8, 16, 64]), gate=st.sampled_from([None, "mild", "strong"]),
       seed=st.integers(0, 2**16))
def test_chunked_fp32_matches_fp64_truth(L, chunk, gate, seed):
    x = make_inputs(2, 2, L, 8, 4, seed, gate=gate)
    want = run({k: v.double() for k, v in x.items()}, "ref")
    got = run(x, "chunked", chunk_size=chunk)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_matches(got, want, 1e-4)


def naive_by_hand(x, scale):
    """The equation in plain Python floats, in the delta form (read, correct, write) rather than the matrix form
    the twin uses: S <- a S; u = beta (v - S^T k); S <- S + k u^T; o = S^T (scale q)."""
    t = {n: v.tolist() for n, v in x.items()}
    B, H, L, dk = x["q"].shape
    dv = x["v"].shape[-1]
    o = [[[[0.0] * dv for _ in range(L)] for _ in range(H)] for _ in range(B)]
    S = [[[list(row) for row in t["initial_state"][b][h]] for h in range(H)] for b in range(B)]
    for b in range(B):
        for h in range(H):
            M = S[b][h]
            for s in range(L):
                a = math.exp(t["g"][b][h][s])
                k, q, v, beta = t["k"][b][h][s], t["q"][b][h][s], t["v"][b][h][s], t["beta"][b][h][s]
                M = [[a * M[i][j] for j in range(dv)] for i in range(dk)]
                u = [beta * (v[j] - sum(M[i][j] * k[i] for i in range(dk))) for j in range(dv)]
                M = [[M[i][j] + k[i] * u[j] for j in range(dv)] for i in range(dk)]
                for j in range(dv):
                    o[b][h][s][j] = sum(M[i][j] * q[i] * scale for i in range(dk))
            S[b][h] = M
    return torch.tensor(o, dtype=torch.float64), torch.tensor(S, dtype=torch.float64)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_naive_twin_follows_the_equation(scale):
    """The twin itself, and delta_rule(impl="ref") (which must run it), against a third form that shares nothing
    with either: what catches a mistake the fast path and the naive twin would make alike."""
    x = make_inputs(2, 2, 5, 3, 2, seed=16, dtype=torch.float64)
    o0, s0 = naive_by_hand(x, 3 ** -0.5 if scale is None else scale)
    for f in (delta_rule_ref, lambda **kw: delta_rule(**kw, impl="ref")):
        o, s = f(**x, return_final_state=True, scale=scale)
        assert rel_err(o, o0) <= 1e-12 and rel_err(s, s0) <= 1e-12
    x0 = {**x, "g": torch.zeros_like(x["g"])}  # g = 0 is a_t = 1: what g=None means
    o1, s1 = delta_rule_ref(**{n: v for n, v in x.items() if n != "g"}, return_final_state=True, scale=scale)
    o2, s2 = naive_by_hand(x0, 3 ** -0.5 if scale is None else scale)
    assert rel_err(o1, o2) <= 1e-12 and rel_err(s1, s2) <= 1e-12


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_naive_twin_is_traceable():
    """ONNX export may trace impl="ref" (unrolled over T): a trace must replay on new values of the same shapes."""
    x, x2 = make_inputs(2, 2, 6, 3, 2, seed=17), make_inputs(2, 2, 6, 3, 2, seed=18)
    names = list(x)

    def f(*t):
        return delta_rule(**dict(zip(names, t)), return_final_state=True, impl="ref")

    traced = torch.jit.trace(f, tuple(x[n] for n in names))
    for got, want in zip(traced(*(x2[n] for n in names)), f(*(x2[n] for n in names))):
        assert torch.equal(got, want)


def test_gradcheck_float64():
    """The chunked form's gradients are the true derivatives (finite differences), not only equal to the ref's."""
    x = make_inputs(1, 1, 10, 2, 2, seed=3, dtype=torch.float64)
    names = list(x)
    inputs = tuple(x[n].requires_grad_() for n in names)

    def f(*t):  # chunk 4: three chunks, the last one padded
        return delta_rule(**dict(zip(names, t)), return_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("gate", ["strong", "tiny"])
@pytest.mark.parametrize("L, chunk", [(1, 64), (100, 64), (300, 16)])
def test_strong_decay_and_tiny_gates_are_finite_and_match(gate, L, chunk):
    """g down to -1e4: every decay underflows to 0, and nothing becomes inf or NaN, forward or backward."""
    x = make_inputs(2, 2, L, 4, 3, seed=4, gate=gate)
    got = run(x, "chunked", chunk_size=chunk)
    assert all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2].values()))
    want = run({k: v.double() for k, v in x.items()}, "ref")
    assert_matches(got, want, 1e-4, gate)


def test_returns_a_tuple_always():
    x = make_inputs(1, 2, 5, 3, 2, seed=6)
    for impl in ("ref", "chunked"):
        out = delta_rule(**x, impl=impl)
        assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
        assert delta_rule(**x, impl=impl, return_final_state=True)[1].shape == (1, 2, 3, 2)


def test_bf16_inputs_fp32_state():
    x = make_inputs(2, 2, 37, 4, 3, seed=7)
    x16 = {k: v.to(torch.bfloat16) if k != "initial_state" else v for k, v in x.items()}
    y0, s0 = delta_rule_ref(**{k: v.float() for k, v in x16.items()}, return_final_state=True)
    for impl in ("ref", "chunked"):
        y, s = delta_rule(**x16, return_final_state=True, impl=impl, chunk_size=8)
        assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert rel_err(s, s0) <= 1e-4
        assert rel_err(y, y0) <= 1e-2


@pytest.mark.parametrize("L, cut", [(23, 9), (32, 16), (5, 1), (40, 39)])
def test_split_sequence_with_carried_state_equals_one_call(L, cut):
    x = make_inputs(2, 2, L, 4, 3, seed=8)
    full_o, full_s = delta_rule(**x, return_final_state=True, chunk_size=8)
    first = {k: v[:, :, :cut] if k != "initial_state" else v for k, v in x.items()}
    second = {k: v[:, :, cut:] for k, v in x.items() if k != "initial_state"}
    o1, s1 = delta_rule(**first, return_final_state=True, chunk_size=8)
    o2, s2 = delta_rule(**second, initial_state=s1, return_final_state=True, chunk_size=8)
    assert rel_err(torch.cat([o1, o2], 2), full_o) <= 1e-5
    assert rel_err(s2, full_s) <= 1e-5


def step_args(x, t):
    return {n: x[n][:, :, t] for n in ("q", "k", "v", "beta", "g") if n in x}


@pytest.mark.parametrize("gate", [None, "mild"])
def test_step_equals_naive_scan_of_length_one(gate):
    """The step (its own scale and update) against the naive twin at L = 1, in fp64: output, new state and every
    gradient."""
    x = make_inputs(2, 3, 1, 4, 5, seed=9, gate=gate, dtype=torch.float64)
    want = run(x, "ref", scale=0.7)
    xs = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    o1, s1 = delta_rule_step(**{"g": None, **step_args(xs, 0)}, state=xs["initial_state"], scale=0.7)
    assert o1.shape == (2, 3, 5) and s1.dtype == torch.float64
    gen = torch.Generator().manual_seed(1)  # the cotangents `run` uses
    go = torch.randn(o1.shape, generator=gen, dtype=torch.float64)
    gs = torch.randn(s1.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((o1 * go).sum() + (s1 * gs).sum(), list(xs.values()))
    assert_matches((o1[:, :, None].detach(), s1.detach(), dict(zip(xs, grads))), want, 1e-12)
    o2, _ = delta_rule_step(**{"g": None, **step_args(x, 0)}, state=x["initial_state"])  # default scale dk ** -0.5
    assert rel_err(o2, delta_rule_ref(**x)[0][:, :, 0]) <= 1e-12


@pytest.mark.parametrize("gate", [None, "mild", "strong"])
def test_update_equals_naive_scan(gate):
    """The lean update (q already scaled, no checks, no casts), iterated, against the naive twin."""
    x = make_inputs(2, 2, 6, 4, 3, seed=19, gate=gate, dtype=torch.float64)
    o0, s0 = delta_rule_ref(**x, return_final_state=True)
    state, os_ = x["initial_state"], []
    for t in range(6):
        a = step_args(x, t)
        o_t, state = delta_rule_update(state, a["q"] * 4 ** -0.5, a["k"], a["v"], a["beta"], a.get("g"))
        os_.append(o_t)
    assert rel_err(torch.stack(os_, 2), o0) <= 1e-12 and rel_err(state, s0) <= 1e-12


def test_iterating_the_step_equals_the_scan():
    x = make_inputs(2, 2, 21, 4, 3, seed=10)
    o, s = delta_rule(**x, return_final_state=True, chunk_size=8)
    state, os_ = x["initial_state"], []
    for t in range(21):
        o_t, state = delta_rule_step(**step_args(x, t), state=state)
        os_.append(o_t)
    assert rel_err(torch.stack(os_, 2), o) <= 1e-5 and rel_err(state, s) <= 1e-5


def test_step_keeps_bf16_output_and_fp32_state():
    x = make_inputs(1, 2, 1, 3, 2, seed=11)
    args = {k: v.to(torch.bfloat16) for k, v in step_args(x, 0).items()}
    o, s = delta_rule_step(**args, state=x["initial_state"].to(torch.bfloat16))
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_unknown_impl_and_bad_chunk():
    x = make_inputs(1, 2, 3, 2, 2, seed=12)
    with pytest.raises(InputError, match=r"'fast'.*'ref', 'chunked'"):
        delta_rule(**x, impl="fast")
    with pytest.raises(InputError, match="impl='ref'"):
        delta_rule_ref(**x, impl="chunked")
    with pytest.raises(InputError, match="chunk_size"):
        delta_rule(**x, chunk_size=0)
    with pytest.raises(InputError, match="scale"):
        delta_rule(**x, scale="big")


@pytest.mark.parametrize("name, shape", [("q", (2, 2, 5)), ("k", (2, 2, 5, 4)), ("v", (2, 2, 4, 2)),
                                         ("beta", (2, 2, 5, 1)), ("g", (2, 1, 5)), ("initial_state", (2, 2, 3, 3))])
def test_wrong_shape_names_the_tensor(name, shape):
    x = make_inputs(2, 2, 5, 3, 2, seed=13)
    x[name] = torch.zeros(shape)
    with pytest.raises(InputError, match=rf"{name} must have shape"):
        delta_rule(**x)


def test_step_wrong_shape_names_the_tensor():
    x = make_inputs(2, 2, 1, 3, 2, seed=14)
    with pytest.raises(InputError, match="state must have shape"):
        delta_rule_step(**step_args(x, 0), state=torch.zeros(2, 2, 3, 4))
    with pytest.raises(InputError, match="beta must have shape"):
        delta_rule_step(**{**step_args(x, 0), "beta": torch.zeros(2, 1)}, state=x["initial_state"])
