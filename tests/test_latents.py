"""Latent trajectories: the classifier on synthetic trajectories, PCA, capture, and `seqlab latents`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny

import seqlab
from seqlab.analysis.latents import Rules, analyze, capture, classify, fit_pca, spearman
from seqlab.cli import main
from seqlab.config import ARCHS
from seqlab.data import make_task
from seqlab.errors import InputError

S, D = 32, 16
needs_depth = pytest.mark.skipif("recurrent_depth" not in ARCHS, reason="the recurrent-depth model has not landed")


def _gen():
    return torch.Generator().manual_seed(0)


def contraction(g, rate=0.5):
    """s_i = c + rate^i (s_0 - c): converges to the fixed point c."""
    c, x = torch.randn(D, generator=g) * 3, torch.randn(D, generator=g) * 3
    return torch.stack([c + rate**i * (x - c) for i in range(S + 1)])


def rotation(g, period):
    """A circle of radius 2 in a random plane around a random centre, `period` steps per turn, tiny noise."""
    c = torch.randn(D, generator=g) * 3
    u, v = torch.linalg.qr(torch.randn(D, 2, generator=g))[0].T
    return torch.stack([c + 2 * (math.cos(2 * math.pi * i / period) * u + math.sin(2 * math.pi * i / period) * v)
                        + 0.01 * torch.randn(D, generator=g) for i in range(S + 1)])


def drift(g):
    """s_i = s_0 + i v (+ tiny noise): a slider."""
    x, v = torch.randn(D, generator=g) * 3, torch.randn(D, generator=g) * 0.3
    return torch.stack([x + i * v + 0.01 * torch.randn(D, generator=g) for i in range(S + 1)])


def test_classifier_labels_synthetic_trajectories():
    g = _gen()
    trajs = [contraction(g), contraction(g, 0.7), rotation(g, 3), rotation(g, 5), rotation(g, 8), drift(g),
             torch.randn(S + 1, D, generator=g) * 3]
    c = classify(torch.stack(trajs, 1))
    assert c.labels == ["fixed_point", "fixed_point", "orbit", "orbit", "orbit", "slider", "other"]
    assert c.period.tolist() == [0, 0, 3, 5, 8, 0, 0]
    # contraction by 0.5: the relative step 0.5^i |s_0 - c| / scale drops below tol = 0.01 after a few steps
    steps = c.converge_step.tolist()
    assert 3 <= steps[0] < steps[1] < S - 3 and steps[2:] == [-1] * 5
    assert c.shares() == pytest.approx({"fixed_point": 2 / 7, "orbit": 3 / 7, "slider": 1 / 7, "other": 1 / 7})


def test_classifier_rules_are_the_documented_ones():
    g = _gen()
    # A contraction that has not settled within S steps is not a fixed point, and shrinking steps are no slider.
    slow = contraction(g, 0.95)
    assert classify(slow[:, None]).labels == ["other"]
    # A rotation too slow to close within the tail slides (its period is not measurable there).
    assert classify(rotation(g, 30)[:, None]).labels == ["slider"]
    # A stricter tolerance turns the fast contraction's late steps into "still moving".
    fast = contraction(g)[:, None]
    assert classify(fast, Rules(tol=1e-12)).labels == ["other"]
    with pytest.raises(InputError, match="tol"):
        Rules(tol=0)
    with pytest.raises(InputError, match="at least 2 steps"):
        classify(torch.zeros(2, 1, D))


def test_pca_reconstructs_within_the_explained_variance():
    g = _gen()
    x = torch.randn(500, 3, generator=g) @ torch.randn(3, 12, generator=g) + 0.1 * torch.randn(500, 12, generator=g)
    for k in (1, 3, 6):
        pca = fit_pca(x, k)
        recon = pca.reconstruct(pca.project(x))
        mse = ((recon - x.double()) ** 2).sum(-1).mean().item()
        unexplained = (1 - pca.explained_ratio.sum().item()) * pca.total_variance
        assert mse == pytest.approx(unexplained, rel=1e-6, abs=1e-9)
    pca = fit_pca(x, 3)
    assert pca.explained_ratio.sum() > 0.99  # three directions hold the data
    torch.testing.assert_close(pca.components @ pca.components.T, torch.eye(3, dtype=torch.float64))


def test_spearman():
    a = torch.arange(10.0)
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a[:2], a[:2]) is None


def rd_model(mixer="gru", vocab_size=37):
    return seqlab.build_model({"arch": "recurrent_depth", "mixer": mixer, "vocab_size": vocab_size, "d_model": 16,
                               "depth": {"prelude": 1, "core": 1, "coda": 1, "mean_steps": 3,
                                         "backprop_steps": 3}}, seed=0).eval()


@needs_depth
def test_capture_holds_what_the_coda_reads():
    model = rd_model()
    tokens = torch.randint(0, 37, (2, 5))
    cap = capture(model, tokens, steps=4)
    assert cap.trajectory.shape == (5, 2, 5, 16)
    logits, _ = model(tokens, steps=4)
    torch.testing.assert_close(cap.logits, logits)
    coda_logits, _ = model.logits(cap.trajectory[-1], (None,))  # the coda on s_4 gives the model's output
    torch.testing.assert_close(coda_logits, logits)


@needs_depth
def test_captured_trajectories_reconstruct_within_the_reported_explained_variance():
    model = rd_model(vocab_size=2)
    batch = make_task("prefix_parity", seq_len=10).batch(3, _gen())
    out = analyze(model, batch.inputs, batch.targets, batch.mask, steps=8, components=4)
    p = out["pca"]
    assert p["components"] == 4 and 0 < p["explained_total"] <= 1
    # the mean squared error of the rank-4 reconstruction of all 9 x 30 states is what the PCA left unexplained
    unexplained = (1 - p["explained_total"]) * p["total_variance"]
    assert p["reconstruction_mse"] == pytest.approx(unexplained, rel=1e-6, abs=1e-9)
    assert out["summary"]["tokens"] == 30 == len(out["tokens"])
    assert all(t["loss"] is not None and t["loss"] >= 0 for t in out["tokens"])  # every parity target counts


@needs_depth
def test_capture_with_a_noisy_start_is_reproducible():
    model = seqlab.build_model({"arch": "recurrent_depth", "mixer": "gru", "vocab_size": 37, "d_model": 16,
                                "depth": {"prelude": 1, "core": 1, "coda": 1, "mean_steps": 3,
                                          "backprop_steps": 3, "init_scale": 1.0}}, seed=0)
    tokens = torch.randint(0, 37, (1, 4))
    a, b, c = (capture(model, tokens, steps=3, seed=s).trajectory for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a[0], c[0])  # s_0 is drawn from the seed


def test_capture_rejects_a_model_without_latents():
    with pytest.raises(InputError, match="not a recurrent-depth model"):
        capture(tiny("gru"), torch.zeros(1, 3, dtype=torch.long), steps=4)


@needs_depth
def test_latents_command_writes_the_report(tmp_path, capsys):
    seqlab.save(rd_model(vocab_size=256), tmp_path / "rd")
    seqlab.save(tiny("attention", vocab_size=256), tmp_path / "att")
    seqlab.save(tiny("lstm", vocab_size=256), tmp_path / "lstm")
    out = tmp_path / "out"
    gf = f"{tmp_path / 'att'},{tmp_path / 'lstm'}"
    assert main(["latents", str(tmp_path / "rd"), "--text", "x = 1 + 2", "--steps", "6", "--out", str(out),
                 "--gradflow", gf, "--json"]) == 0
    brief = json.loads(capsys.readouterr().out)
    result = json.loads((out / "latents.json").read_text())
    assert sum(result["latents"]["summary"]["counts"].values()) == 9 == len(result["latents"]["tokens"])
    assert set(brief["gradflow"]["curves"]) == {"att (attention)", "lstm (lstm)"}
    for name in ("report.md", "report.html", "plots/pcs.png", "plots/distance.png", "plots/classes.png",
                 "plots/gradflow.png", "config.json"):
        assert (out / name).is_file(), name
    assert "## Gradient flow over distance" in (out / "report.md").read_text()


def test_latents_command_rejects_a_checkpoint_without_latents(tmp_path, capsys):
    seqlab.save(tiny("gru", vocab_size=256), tmp_path / "gru")
    assert main(["latents", str(tmp_path / "gru"), "--text", "abc", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a recurrent-depth model (arch 'lm', mixer 'gru')" in err[0]
    assert not (tmp_path / "o").exists()  # nothing written for bad input
