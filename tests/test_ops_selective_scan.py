"""selective_scan: the chunked scan and the step against the naive twin (ops/naive.py, which shares no helper with
them: outputs, final state, every gradient), the naive twin against the equation in plain Python floats, carried
states, bf16, strong decay, tracing, and bad input."""

import importlib
import math

import pytest
import torch
from helpers import assert_matches, outputs_and_grads, rel_err
from hypothesis import example, given, settings
from hypothesis import strategies as st

from seqlab.errors import InputError
from seqlab.ops import selective_scan, selective_scan_ref, selective_scan_step, selective_scan_update

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(b, d, N, L, seed, *, optional=True, strong=False, dtype=torch.float32):
    """Random inputs as a dict (all of NAMES when optional, else the required five)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if strong:  # long steps and fast decays: exp(delta * A) underflows to 0 for most pairs
        delta = r(b, d, L) * 3 + 6  # softplus of this is ~ 1 .. 15
        A = -(torch.rand(d, N, generator=gen, dtype=torch.float64) * 500 + 1)
    else:
        delta = r(b, d, L) * 0.5
        A = -(torch.rand(d, N, generator=gen, dtype=torch.float64) * 2 + 0.1)
    x = dict(u=r(b, d, L), delta=delta, A=A, B=r(b, N, L), C=r(b, N, L))
    if optional:
        x.update(D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.3, initial_state=r(b, d, N))
    return {k: v.to(dtype) for k, v in x.items()}


def run(x, impl, softplus=True, chunk_size=64, seed=1):
    """y, final state and the gradient of every input for a fixed random cotangent. impl "ref" calls the naive twin
    itself, "chunked" the fast scan."""
    if impl == "ref":
        return outputs_and_grads(lambda **k: selective_scan_ref(**k, delta_softplus=softplus, return_final_state=True),
                                 x, seed)
    return outputs_and_grads(lambda **k: selective_scan(**k, delta_softplus=softplus, return_final_state=True,
                                                        chunk_size=chunk_size), x, seed)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), d=st.integers(1, 4), N=st.integers(1, 4), L=st.integers(1, 40),
       chunk=st.sampled_from([1, 2, 3, 4, 8, 16, 64]), optional=st.booleans(), softplus=st.booleans(),
       seed=st.integers(0, 2**16))
@example(b=1, d=2, N=3, L=1, chunk=64, optional=True, softplus=True, seed=0)  # length 1
@example(b=2, d=3, N=2, L=17, chunk=8, optional=True, softplus=True, seed=1)  # not a multiple of the chunk
@example(b=1, d=2, N=2, L=16, chunk=4, optional=False, softplus=False, seed=2)  # an exact multiple
def test_chunked_matches_ref_fp32(b, d, N, L, chunk, optional, softplus, seed):
    x = make_inputs(b, d, N, L, seed, optional=optional)
    if not softplus:  # a step size must be positive when it is used as given
        x["delta"] = x["delta"].abs() + 0.01
    want = run({k: v.double() for k, v in x.items()}, "ref", softplus)  # the truth, in float64
    got = run(x, "chunked", softplus, chunk_size=chunk)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_matches(got, want, 1e-4)


OPTIONAL = ("D", "z", "delta_bias", "initial_state")


@settings(max_examples=30, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), d=st.integers(1, 3), N=st.integers(1, 3), L=st.integers(1, 30),
       chunk=st.sampled_from([1, 3, 4, 8, 64]), present=st.sets(st.sampled_from(OPTIONAL)), softplus=st.booleans(),
       strong=st.booleans(), seed=st.integers(0, 2**16))
@example(b=1, d=2, N=3, L=1, chunk=64, present=set(OPTIONAL), softplus=True, strong=False, seed=0)  # length 1
@example(b=2, d=3, N=2, L=19, chunk=8, present=set(OPTIONAL), softplus=True, strong=False, seed=1)  # 19 = 2 * 8 + 3
@example(b=2, d=2, N=3, L=23, chunk=4, present=set(OPTIONAL), softplus=True, strong=True, seed=2)  # strong decay
@example(b=1, d=2, N=2, L=9, chunk=4, present={"delta_bias"}, softplus=False, strong=False, seed=3)  # bias alone
def test_chunked_matches_the_naive_twin_fp64(b, d, N, L, chunk, present, softplus, strong, seed):
    """In fp64 the two forms differ only by rounding, so a tight tolerance sees any difference in the math: the
    discretization (bias, softplus), the skip, the gate, the initial state, and every gradient."""
    x = make_inputs(b, d, N, L, seed, strong=strong, dtype=torch.float64)
    x = {k: v for k, v in x.items() if k not in OPTIONAL or k in present}
    if not softplus:  # a step size must be positive when it is used as given
        x["delta"] = x["delta"].abs() + 0.01
    got, want = run(x, "chunked", softplus, chunk_size=chunk), run(x, "ref", softplus)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    assert set(got[2]) == set(x)
    assert_matches(got, want, 1e-10)


def naive_by_hand(x, softplus):
    """The equation in plain Python floats (math.exp, nested loops over batch, channel, state and time)."""
    v = {k: t.tolist() for k, t in x.items()}
    b, d, L = x["u"].shape
    N = x["A"].shape[1]
    y = [[[0.0] * L for _ in range(d)] for _ in range(b)]
    state = [[list(v["initial_state"][i][c]) for c in range(d)] for i in range(b)]
    for i in range(b):
        for c in range(d):
            for l in range(L):
                dt = v["delta"][i][c][l] + v["delta_bias"][c]
                if softplus:
                    dt = math.log1p(math.exp(dt))
                acc = 0.0
                for n in range(N):
                    h = math.exp(dt * v["A"][c][n]) * state[i][c][n] + dt * v["B"][i][n][l] * v["u"][i][c][l]
                    state[i][c][n] = h
                    acc += h * v["C"][i][n][l]
                zz = v["z"][i][c][l]
                y[i][c][l] = (acc + v["D"][c] * v["u"][i][c][l]) * zz / (1 + math.exp(-zz))
    return torch.tensor(y, dtype=torch.float64), torch.tensor(state, dtype=torch.float64)


@pytest.mark.parametrize("softplus", [True, False])
def test_naive_twin_follows_the_equation(softplus):
    """The twin itself, and selective_scan(impl="ref") (which must run it), against a third form that shares
    nothing with either: what catches a mistake the fast path and the naive twin would make alike."""
    x = make_inputs(2, 2, 3, 5, seed=16, dtype=torch.float64)
    if not softplus:
        x["delta"] = x["delta"].abs() + 0.01
    y0, s0 = naive_by_hand(x, softplus)
    for f in (selective_scan_ref, lambda **kw: selective_scan(**kw, impl="ref")):
        y, s = f(**x, delta_softplus=softplus, return_final_state=True)
        assert rel_err(y, y0) <= 1e-12 and rel_err(s, s0) <= 1e-12


def test_gradcheck_float64():
    """The chunked form's gradients are the true derivatives (finite differences), not only equal to the ref's."""
    x = make_inputs(1, 2, 2, 7, seed=3, dtype=torch.float64)
    names = list(x)
    inputs = tuple(x[n].requires_grad_() for n in names)

    def f(*t):
        y, s = selective_scan(**dict(zip(names, t)), delta_softplus=True, return_final_state=True, chunk_size=3)
        return y, s

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("L, b, d", [(1, 2, 3), (100, 2, 3), (300, 2, 3), (1200, 1, 2)])
def test_strong_decay_is_finite_and_matches(L, b, d):
    x = make_inputs(b, d, 4, L, seed=4, strong=True)
    x["delta"][:, :, ::7] = -30.0  # mixed with near-zero steps (softplus(-30) ~ 1e-13): decay ~ 1
    got = run(x, "chunked", chunk_size=64)
    assert all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2].values()))
    want = run({k: v.double() for k, v in x.items()}, "ref")
    assert_matches(got, want, 1e-4, "strong decay")


def test_automatic_chunk_size_takes_longer_chunks_for_large_inputs(monkeypatch):
    """chunk_size=None doubles the chunk from 64 while one step of all chunks exceeds SLAB values: the same
    numbers as that explicit chunk size, and as the loop."""
    ss = importlib.import_module("seqlab.ops.selective_scan")  # the module (seqlab.ops exports the function)
    monkeypatch.setattr(ss, "SLAB", 64)  # b * chunks * d * N = 2 * chunks * 3 * 4 > 64 until chunks <= 2: 256
    x = make_inputs(2, 3, 4, 300, seed=15)
    y, s = selective_scan(**x, delta_softplus=True, return_final_state=True)
    y256, s256 = selective_scan(**x, delta_softplus=True, return_final_state=True, chunk_size=256)
    y64, _ = selective_scan(**x, delta_softplus=True, return_final_state=True, chunk_size=64)
    assert torch.equal(y, y256) and torch.equal(s, s256) and not torch.equal(y, y64)
    y0, s0 = selective_scan_ref(**x, delta_softplus=True, return_final_state=True)
    assert rel_err(y, y0) <= 1e-5 and rel_err(s, s0) <= 1e-5


def test_returns_a_tuple_always():
    x = make_inputs(1, 2, 2, 5, seed=5)
    for impl in ("ref", "chunked"):
        out = selective_scan(**x, impl=impl)
        assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
        out = selective_scan(**x, impl=impl, return_final_state=True)
        assert out[1].shape == (1, 2, 2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_naive_twin_is_traceable():
    """ONNX export traces impl="ref" (unrolled over T): a trace must replay on new values of the same shapes."""
    x, x2 = make_inputs(2, 3, 2, 6, seed=6), make_inputs(2, 3, 2, 6, seed=17)
    names = list(x)

    def f(*t):
        return selective_scan(**dict(zip(names, t)), delta_softplus=True, return_final_state=True, impl="ref")

    traced = torch.jit.trace(f, tuple(x[n] for n in names))
    for got, want in zip(traced(*(x2[n] for n in names)), f(*(x2[n] for n in names))):
        assert torch.equal(got, want)


def test_bf16_inputs_fp32_state():
    x = make_inputs(2, 4, 3, 37, seed=7)
    x16 = {k: v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    for impl in ("ref", "chunked"):
        y, s = selective_scan(**x16, delta_softplus=True, return_final_state=True, impl=impl, chunk_size=8)
        assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
        # the truth for the same (bf16-rounded) values, in fp32
        y0, s0 = selective_scan_ref(**{k: v.float() for k, v in x16.items()}, delta_softplus=True,
                                    return_final_state=True)
        assert rel_err(s, s0) <= 1e-4  # the state never went through bf16
        assert rel_err(y, y0) <= 1e-2  # the output is rounded to bf16 once, at the end


@pytest.mark.parametrize("impl", ["ref", "chunked"])
@pytest.mark.parametrize("L, cut", [(23, 9), (16, 8), (5, 1), (40, 39)])
def test_split_sequence_with_carried_state_equals_one_call(impl, L, cut):
    x = make_inputs(2, 3, 4, L, seed=8)
    full_y, full_s = selective_scan(**x, delta_softplus=True, return_final_state=True, impl=impl, chunk_size=4)
    seq = ("u", "delta", "B", "C", "z")
    first = {k: v[..., :cut] if k in seq else v for k, v in x.items()}
    second = {k: v[..., cut:] if k in seq else v for k, v in x.items()}
    y1, s1 = selective_scan(**first, delta_softplus=True, return_final_state=True, impl=impl, chunk_size=4)
    second["initial_state"] = s1
    y2, s2 = selective_scan(**second, delta_softplus=True, return_final_state=True, impl=impl, chunk_size=4)
    assert rel_err(torch.cat([y1, y2], -1), full_y) <= 1e-5
    assert rel_err(s2, full_s) <= 1e-5


def step_args(x, l):
    """The step's arguments for time step l of a scan's inputs."""
    return dict(u=x["u"][..., l], delta=x["delta"][..., l], A=x["A"], B=x["B"][..., l], C=x["C"][..., l],
                D=x["D"], z=x["z"][..., l], delta_bias=x["delta_bias"])


def test_step_equals_naive_scan_of_length_one():
    """The step (its own discretization, skip, gate and `_step`) against the naive twin at L = 1, in fp64: output,
    new state and every gradient."""
    x = make_inputs(2, 3, 4, 1, seed=9, dtype=torch.float64)
    want = run(x, "ref")
    xs = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    y1, s1 = selective_scan_step(**step_args(xs, 0), state=xs["initial_state"], delta_softplus=True)
    assert y1.shape == (2, 3) and s1.dtype == torch.float64
    gen = torch.Generator().manual_seed(1)  # the cotangents `run` uses
    gy = torch.randn(y1.shape, generator=gen, dtype=torch.float64)
    gs = torch.randn(s1.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((y1 * gy).sum() + (s1 * gs).sum(), list(xs.values()))
    assert_matches((y1[..., None].detach(), s1.detach(), dict(zip(xs, grads))), want, 1e-12)


def test_update_equals_naive_scan():
    """The lean update (delta already discretized, no checks, no casts), iterated, against the naive twin."""
    x = make_inputs(2, 3, 4, 6, seed=18, dtype=torch.float64)
    y0, s0 = selective_scan_ref(**x, delta_softplus=True, return_final_state=True)
    delta = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])
    state, ys = x["initial_state"], []
    for l in range(6):
        y_l, state = selective_scan_update(state, x["u"][..., l], delta[..., l], x["A"], x["B"][..., l],
                                           x["C"][..., l], x["D"], x["z"][..., l])
        ys.append(y_l)
    assert rel_err(torch.stack(ys, -1), y0) <= 1e-12 and rel_err(state, s0) <= 1e-12


def test_iterating_the_step_equals_the_scan():
    x = make_inputs(2, 3, 4, 19, seed=10)
    y, s = selective_scan(**x, delta_softplus=True, return_final_state=True, chunk_size=8)
    state, ys = x["initial_state"], []
    for l in range(19):
        y_l, state = selective_scan_step(**step_args(x, l), state=state, delta_softplus=True)
        ys.append(y_l)
    assert rel_err(torch.stack(ys, -1), y) <= 1e-5 and rel_err(state, s) <= 1e-5


def test_step_keeps_bf16_output_and_fp32_state():
    x = make_inputs(1, 2, 3, 1, seed=11)
    args = {k: v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v for k, v in step_args(x, 0).items()}
    y, s = selective_scan_step(**args, state=x["initial_state"].to(torch.bfloat16), delta_softplus=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_unknown_impl():
    x = make_inputs(1, 2, 2, 3, seed=12)
    with pytest.raises(InputError, match=r"'fast'.*'ref', 'chunked'"):
        selective_scan(**x, impl="fast")
    with pytest.raises(InputError, match="impl='ref'"):
        selective_scan_ref(**x, impl="chunked")
    with pytest.raises(InputError, match="chunk_size"):
        selective_scan(**x, chunk_size=0)


@pytest.mark.parametrize("name, shape", [("u", (2, 3)), ("delta", (2, 3, 6)), ("A", (4, 2)), ("B", (2, 3, 5)),
                                         ("C", (2, 2, 4)), ("D", (4,)), ("z", (1, 3, 5)), ("delta_bias", (3, 1)),
                                         ("initial_state", (2, 3, 3))])
def test_wrong_shape_names_the_tensor(name, shape):
    x = make_inputs(2, 3, 2, 5, seed=13)
    x[name] = torch.zeros(shape)
    with pytest.raises(InputError, match=rf"{name} must have shape"):
        selective_scan(**x)


def test_step_wrong_shape_names_the_tensor():
    x = make_inputs(2, 3, 2, 1, seed=14)
    with pytest.raises(InputError, match="state must have shape"):
        selective_scan_step(**step_args(x, 0), state=torch.zeros(2, 3, 5))
    args = step_args(x, 0)
    args["B"] = torch.zeros(2, 3)
    with pytest.raises(InputError, match="B must have shape"):
        selective_scan_step(**args, state=x["initial_state"])
