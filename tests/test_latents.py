"""Latent trajectories: the classifier on synthetic trajectories, PCA, capture, and `seqlab latents`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny

import seqlab
from seqlab.analysis.latents import KINDS, Rules, analyze, capture, classify, fit_pca, spearman, synthetic
from seqlab.cli import main
from seqlab.config import ARCHS
from seqlab.data import make_task
from seqlab.errors import InputError

S, D = 32, 16
needs_depth = pytest.mark.skipif("recurrent_depth" not in ARCHS, reason="the recurrent-depth model has not landed")


def _gen():
    return torch.Generator().manual_seed(0)


def contraction(rate: float, steps: int = S) -> torch.Tensor:
    """One trajectory (steps + 1, 1, D): s_i = c + rate^i (s_0 - c)."""
    g = _gen()
    c, x = torch.randn(D, generator=g) * 3, torch.randn(D, generator=g) * 3
    return torch.stack([c + rate**i * (x - c) for i in range(steps + 1)])[:, None]


@pytest.mark.parametrize("noise", [0.0, 0.003])
def test_classifier_labels_the_synthetic_generators(noise):
    for kind in KINDS:
        c = classify(synthetic(kind, 64, n=48, noise=noise, seed=2))
        assert c.shares()[kind] >= 0.95, (kind, c.shares())
    orbits = classify(synthetic("orbit", 32, n=8, period=12, seed=3))  # period 12 within 32 steps: seen twice
    assert orbits.labels == ["orbit"] * 8 and orbits.period.tolist() == [12] * 8
    two = classify(synthetic("orbit", 32, n=8, period=2, noise=noise, seed=4))
    assert two.period.tolist() == [2] * 8
    fixed = classify(synthetic("fixed_point", 64, n=8, seed=5))
    assert (fixed.converge_step > 0).all() and (fixed.converge_step < 64).all() and (fixed.period == 0).all()


def test_classifier_is_scale_free_and_sees_slow_motion():
    drift = synthetic("slider", 64, n=16, seed=6)
    labels = classify(drift).labels
    for scale in (1e-3, 1e3):
        assert classify(drift * scale).labels == labels
    # a drift of 0.2% of the norm per step, and one of 5% per step over 256 steps, are sliders
    c = torch.randn(D, generator=_gen())
    v = torch.randn(D, generator=_gen())
    for rate, steps in ((0.002, 32), (0.05, 256)):
        line = torch.stack([c + i * rate * c.norm() * v / v.norm() for i in range(steps + 1)])[:, None]
        assert classify(line).labels == ["slider"]
    # at 1% noise a contraction is still a fixed point and a drift still a slider
    assert classify(synthetic("fixed_point", 64, n=32, noise=0.01, seed=7)).shares()["fixed_point"] >= 0.95
    assert classify(synthetic("slider", 128, n=32, noise=0.01, seed=8)).shares()["slider"] >= 0.95


def test_classifier_asks_for_more_steps_when_it_cannot_tell():
    # a period longer than half the trajectory (seen once), a contraction still slowing down: undecided
    assert set(classify(synthetic("orbit", 16, n=8, period=12, seed=9)).labels) == {"undecided"}
    assert classify(contraction(0.9, 16)).labels == ["undecided"]
    assert classify(contraction(0.9, 256)).labels == ["fixed_point"]
    # slower than slide_keep per half tail, a contraction cannot be told from a drift: it reads as a slider
    assert classify(contraction(0.97, 16)).labels == ["slider"]
    # a converged latent jittering by float32 rounding in a period-2 pattern is a fixed point, not an orbit
    c = contraction(0.5, 64)
    c[-40:] += 1e-7 * torch.randn(D, generator=_gen()) * torch.tensor([(-1) ** i for i in range(40)])[:, None, None]
    assert classify(c).labels == ["fixed_point"]
    # fewer tail steps than `hold`: undecided; noise with no structure: other
    assert classify(contraction(0.5, 6)).labels == ["undecided"]
    noise = torch.randn(65, 4, D, generator=_gen())
    assert set(classify(noise).labels) == {"other"}
    with pytest.raises(InputError, match="tol"):
        Rules(tol=0)
    with pytest.raises(InputError, match="max_period"):
        Rules(max_period=1)
    with pytest.raises(InputError, match="at least 2 steps"):
        classify(torch.zeros(2, 1, D))
    with pytest.raises(InputError, match="kind"):
        synthetic("spiral", 8)


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
