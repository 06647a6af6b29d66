"""ssd (Mamba-2's state-space duality): the chunked scan, the step and the lean update against the naive twin
(ops/naive.py, which shares no helper with them: outputs, final state, every gradient), the twin against the equation
in plain Python floats, groups, strong decay, bf16, tracing, and bad input; the mamba2 mixer's head width, init and
config errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches, need_onnx, outputs_and_grads, rel_err, tiny
from hypothesis import example, given, settings
from hypothesis import strategies as st

import seqlab
from seqlab.errors import InputError
from seqlab.interop.export import export_onnx, verify_onnx
from seqlab.ops import ssd, ssd_ref, ssd_step, ssd_update


def make_inputs(b, L, H, P, G, N, seed, *, init=True, strong=False, bias=True, skip=True, dtype=torch.float64):
    """Random inputs with raw dt (the scan applies dt_bias and softplus). strong: decay rates up to ~e^6 per unit
    step and large steps, so most per-step decays underflow to 0 and the chunk's exponents span hundreds."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = dict(x=r(b, L, H, P), dt=r(b, L, H) + (3 if strong else 0),
             A=-torch.exp(r(H) * (3 if strong else 0.5)), B=r(b, L, G, N), C=r(b, L, G, N))
    if skip:
        x["D"] = r(H)
    if bias:
        x["dt_bias"] = r(H) * 0.5
    if init:
        x["initial_state"] = r(b, H, P, N)
    return {k: v.to(dtype) for k, v in x.items()}


def run(x, impl, chunk_size=64, seed=1):
    """y, final state and the gradient of every input for a fixed random cotangent. impl "ref" calls the naive twin
    itself, "chunked" the fast scan."""
    soft = "dt_bias" in x
    if impl == "ref":
        return outputs_and_grads(lambda **k: ssd_ref(**k, dt_softplus=soft, return_final_state=True), x, seed)
    return outputs_and_grads(lambda **k: ssd(**k, dt_softplus=soft, return_final_state=True, chunk_size=chunk_size),
                             x, seed)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), L=st.integers(1, 45), heads=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (6, 3)]),
       P=st.integers(1, 4), N=st.integers(1, 4), chunk=st.sampled_from([1, 2, 3, 5, 8, 16, 64]), init=st.booleans(),
       strong=st.booleans(), bias=st.booleans(), skip=st.booleans(), seed=st.integers(0, 2**16))
@example(b=1, L=1, heads=(2, 1), P=3, N=2, chunk=64, init=True, strong=False, bias=True, skip=True, seed=0)  # L = 1
@example(b=2, L=37, heads=(4, 2), P=3, N=4, chunk=16, init=True, strong=False, bias=True, skip=True,
         seed=1)  # 37 = 2 * 16 + 5: not a multiple of the chunk; groups < heads
@example(b=1, L=29, heads=(6, 3), P=2, N=3, chunk=8, init=True, strong=True, bias=True, skip=True, seed=2)  # strong
@example(b=1, L=32, heads=(2, 2), P=2, N=2, chunk=8, init=False, strong=False, bias=False, skip=False,
         seed=3)  # an exact multiple; raw dt, no skip, zero initial state
def test_chunked_matches_the_naive_twin_fp64(b, L, heads, P, N, chunk, init, strong, bias, skip, seed):
    """In fp64 the two forms differ only by rounding, so a tight tolerance sees any difference in the math: the
    decay mask, the chunk boundaries, the groups, the skip, the initial state, and every gradient."""
    H, G = heads
    x = make_inputs(b, L, H, P, G, N, seed, init=init, strong=strong, bias=bias, skip=skip)
    if not bias:  # a raw dt must already be a step (>= 0)
        x["dt"] = x["dt"].abs()
    got, want = run(x, "chunked", chunk_size=chunk), run(x, "ref")
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    assert_matches(got, want, 1e-10)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(L=st.integers(1, 40), heads=st.sampled_from([(2, 1), (4, 2)]), chunk=st.sampled_from([4, 8, 16]),
       strong=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_fp32_matches_fp64_ref(L, heads, chunk, strong, seed):
    """The fast path in fp32 against the truth in fp64: fp32 states and outputs, errors at the fp32 rounding level."""
    H, G = heads
    x = make_inputs(2, L, H, 3, G, 4, seed, strong=strong)
    want = run(x, "ref")
    got = run({k: v.float() for k, v in x.items()}, "chunked", chunk_size=chunk)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_matches(got, want, 1e-4)


def naive_by_hand(x):
    """The equation in plain Python floats (math.exp, loops over batch, head, time, and the state matrix)."""
    v = {n: t.tolist() for n, t in x.items()}
    b, L, H, P = x["x"].shape
    G, N = x["B"].shape[2], x["B"].shape[3]
    y = [[[[0.0] * P for _ in range(H)] for _ in range(L)] for _ in range(b)]
    h = [[[list(row) for row in v["initial_state"][i][j]] for j in range(H)] for i in range(b)]
    for i in range(b):
        for j in range(H):
            g = j // (H // G)
            for t in range(L):
                s = v["dt"][i][t][j] + v["dt_bias"][j]
                s = math.log1p(math.exp(s))  # softplus
                a = math.exp(s * v["A"][j])
                for p in range(P):
                    for n in range(N):
                        h[i][j][p][n] = a * h[i][j][p][n] + s * v["x"][i][t][j][p] * v["B"][i][t][g][n]
                    y[i][t][j][p] = (sum(h[i][j][p][n] * v["C"][i][t][g][n] for n in range(N))
                                     + v["D"][j] * v["x"][i][t][j][p])
    return torch.tensor(y, dtype=torch.float64), torch.tensor(h, dtype=torch.float64)


def test_naive_twin_follows_the_equation():
    """The twin itself, and ssd(impl="ref") (which must run it), against a third form that shares nothing with
    either: what catches a mistake the fast path and the naive twin would make alike (the group a head reads)."""
    x = make_inputs(2, 5, 4, 2, 2, 3, seed=16)
    y0, h0 = naive_by_hand(x)
    for f in (ssd_ref, lambda **kw: ssd(**kw, impl="ref")):
        y, h = f(**x, dt_softplus=True, return_final_state=True)
        assert rel_err(y, y0) <= 1e-12 and rel_err(h, h0) <= 1e-12


@pytest.mark.parametrize("heads", [(2, 1), (4, 2), (3, 3)])
def test_step_and_update_equal_the_twin_token_by_token(heads):
    """ssd_step (checks, casts, discretization) and ssd_update (lean, dt already discretized), fed token by token,
    give the twin's outputs and final state; the step returns fp32 states for bf16 inputs."""
    H, G = heads
    x = make_inputs(2, 7, H, 3, G, 4, seed=5)
    y0, h0 = ssd_ref(**x, dt_softplus=True, return_final_state=True)
    dts = F.softplus(x["dt"] + x["dt_bias"])
    h_step = h_upd = x["initial_state"]
    for t in range(7):
        tok = {n: x[n][:, t] for n in ("x", "dt", "B", "C")}
        y, h_step = ssd_step(**tok, A=x["A"], state=h_step, D=x["D"], dt_bias=x["dt_bias"], dt_softplus=True)
        y_u, h_upd = ssd_update(h_upd, x["x"][:, t], dts[:, t], x["A"], x["B"][:, t], x["C"][:, t], x["D"])
        assert rel_err(y, y0[:, t]) <= 1e-12 and rel_err(y_u, y0[:, t]) <= 1e-12
    assert rel_err(h_step, h0) <= 1e-12 and rel_err(h_upd, h0) <= 1e-12
    half = {k: v.to(torch.bfloat16) for k, v in x.items() if k != "initial_state"}
    y, h = ssd_step(**{n: half[n][:, 0] for n in ("x", "dt", "B", "C")}, A=half["A"],
                    state=x["initial_state"].float(), D=half["D"], dt_bias=half["dt_bias"], dt_softplus=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32


def test_strong_decay_stays_finite_and_forgets():
    """Decays of e^-1000 per step: every exponent the chunked form takes is a range sum <= 0, so no inf or NaN in
    the output or any gradient, and the state at the end holds only the last step."""
    x = make_inputs(1, 20, 2, 2, 1, 3, seed=7, bias=False)
    x["dt"] = torch.full_like(x["dt"], 10.0)
    x["A"] = torch.full_like(x["A"], -100.0)
    got, want = run(x, "chunked", chunk_size=8), run(x, "ref")
    assert_matches(got, want, 1e-10)
    last = 10.0 * x["x"][0, -1][..., None] * x["B"][0, -1, 0][None, None, :]  # dt x_T B_T^T
    torch.testing.assert_close(got[1][0], last, atol=1e-12, rtol=0)


def test_bf16_inputs_keep_fp32_states():
    x = {k: v.to(torch.bfloat16) for k, v in make_inputs(1, 10, 2, 2, 1, 3, seed=8).items()}
    y, h = ssd(**x, dt_softplus=True, return_final_state=True, chunk_size=4)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32


def test_gradcheck_float64():
    """The chunked form's gradients are the true derivatives (finite differences), not only equal to the ref's."""
    x = make_inputs(1, 7, 2, 2, 1, 2, seed=3)
    names = list(x)
    inputs = tuple(x[n].requires_grad_() for n in names)

    def f(*t):  # chunk 3: two full chunks and a padded one
        return ssd(**dict(zip(names, t)), dt_softplus=True, return_final_state=True, chunk_size=3)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_update_is_traceable():
    """The mixer's step calls ssd_update and ONNX export traces it: a trace must replay on new values and on another
    batch size (the exported graph's batch axis is dynamic)."""
    x, x2 = make_inputs(2, 1, 4, 3, 2, 2, seed=17), make_inputs(3, 1, 4, 3, 2, 2, seed=18)

    def args(v):
        return (v["initial_state"], v["x"][:, 0], v["dt"][:, 0].abs(), v["A"], v["B"][:, 0], v["C"][:, 0], v["D"])

    traced = torch.jit.trace(ssd_update, args(x))
    for got, want in zip(traced(*args(x2)), ssd_update(*args(x2))):
        assert torch.equal(got, want)


def test_bad_input_names_the_problem():
    x = make_inputs(1, 4, 4, 2, 2, 3, seed=9)
    with pytest.raises(InputError, match="unknown impl 'fast'"):
        ssd(**x, impl="fast")
    with pytest.raises(InputError, match="chunk_size must be a positive int"):
        ssd(**x, chunk_size=0)
    with pytest.raises(InputError, match=r"ssd: dt must have shape \(1, 4, 4\), got \(1, 4, 3\)"):
        ssd(**{**x, "dt": x["dt"][..., :3]})
    with pytest.raises(InputError, match="3 groups, which must divide the 4 heads"):
        ssd_ref(**{**x, "B": torch.zeros(1, 4, 3, 3, dtype=torch.float64),
                   "C": torch.zeros(1, 4, 3, 3, dtype=torch.float64)})
    with pytest.raises(InputError, match=r"initial_state must have shape \(1, 4, 2, 3\)"):
        ssd(**{**x, "initial_state": torch.zeros(1, 4, 3, 2, dtype=torch.float64)})
    with pytest.raises(InputError, match=r"ssd_step: state must have shape \(1, 4, 2, 3\)"):
        ssd_step(x["x"][:, 0], x["dt"][:, 0], x["A"], x["B"][:, 0], x["C"][:, 0], torch.zeros(1, 4, 2, 2))
    with pytest.raises(InputError, match="x must be a floating-point tensor"):
        ssd(**{**x, "x": torch.zeros(1, 4, 4, 2, dtype=torch.long)})


# ---------------------------------------------------------------------------------------------------------------
# the mamba2 mixer's own choices (its contract, steps, export and HF parity are checked by the generic tests)


def test_mamba2_head_width_init_and_bad_config():
    """head_dim None: 64 where it divides d_inner (as published), else the widest divisor below it; the published
    init (A in [-16, -1], dt = softplus(dt_bias) in [dt_min, dt_max], D = 1); heads and groups that do not divide
    are refused by name."""
    widths = {d: seqlab.build_model(mixer="mamba2", d_model=d, n_layers=1, vocab_size=11).config.mamba2.head_width(d)
              for d in (16, 48, 64, 96)}
    assert widths == {16: 32, 48: 48, 64: 64, 96: 64}
    mixer = seqlab.build_model(mixer="mamba2", d_model=128, n_layers=1, vocab_size=11, seed=0).blocks[0].mixer
    A, dt = -torch.exp(mixer.A_log), F.softplus(mixer.dt_bias)
    assert mixer.H == 4 and (A <= -1).all() and (A >= -16).all() and A.unique().numel() == 4
    assert (dt >= 0.001 - 1e-7).all() and (dt <= 0.1 + 1e-7).all() and (mixer.D == 1).all()
    with pytest.raises(InputError, match="'mamba2.head_dim' = 24: d_inner = expand \\* d_model = 64"):
        seqlab.build_model(mixer="mamba2", d_model=32, mamba2={"head_dim": 24})
    with pytest.raises(InputError, match="'mamba2.n_groups' = 3: must divide the 4 heads"):
        seqlab.build_model(mixer="mamba2", d_model=32, mamba2={"head_dim": 16, "n_groups": 3})


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning", "ignore::UserWarning")
def test_mamba2_with_groups_exports_with_a_dynamic_batch(tmp_path):
    """The generic ONNX test builds mamba2 with one head; here 8 heads in 2 groups, traced at batch 2 and run by
    onnxruntime at batch 3 (a traced batch constant in the step would break the reshape of the heads)."""
    need_onnx()
    model = tiny("mamba2")
    assert (model.blocks[0].mixer.H, model.blocks[0].mixer.G) == (8, 2)
    for mode in ("step", "prefill"):
        info = export_onnx(model, tmp_path / f"{mode}.onnx", mode=mode, length=6)
        diffs = verify_onnx(model, tmp_path / f"{mode}.onnx", info)
        assert diffs["batch"] == 3 and diffs["max_abs_diff_logits"] <= 1e-5 and diffs["max_abs_diff_state"] <= 1e-5
