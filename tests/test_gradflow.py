"""Gradient flow over distance: the receptive field of a causal convolution, per-row gradients, the plot."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from seqlab.analysis.gradflow import GradFlow, gradient_flow, gradient_flow_on_task, plot_gradient_flow
from seqlab.data import Batch, make_task
from seqlab.errors import InputError


def test_causal_conv_gradient_stops_at_its_receptive_field():
    # 2 layers of kernel 3 see exactly 2 * (3 - 1) = 4 positions back.
    model = tiny("conv", vocab_size=2, conv={"kernel_size": 3})
    curve = gradient_flow_on_task(model, make_task("prefix_parity", seq_len=12), batches=2, batch_size=4)
    assert (curve.norm[:5] > 0).all()
    assert (curve.norm[5:] == 0).all()
    assert curve.count.tolist() == [8] * 12


def test_matches_autograd_on_one_row_and_uses_the_last_counted_position():
    model = tiny("gru")
    inputs = torch.randint(0, 37, (2, 6))
    targets = torch.randint(0, 37, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5:] = False  # row 1's last counted position is 4
    curve = gradient_flow(model, [Batch(inputs, targets, mask)])
    expected = torch.zeros(6, dtype=torch.float64)
    for b, last in ((0, 5), (1, 4)):
        e = model.embed(inputs[b : b + 1]).detach().requires_grad_(True)
        x = e
        for block in model.blocks:
            x, _ = block(x)
        loss = torch.nn.functional.cross_entropy(model.logits(model.norm(x))[0, last], targets[b, last])
        (g,) = torch.autograd.grad(loss, e)
        for t in range(last + 1):
            expected[last - t] += g[0, t].norm().item()
    counts = torch.tensor([2, 2, 2, 2, 2, 1])
    assert curve.count.tolist() == counts.tolist()
    torch.testing.assert_close(curve.norm, expected / counts, rtol=1e-5, atol=1e-7)


def test_attention_reaches_every_position_and_the_plot_is_written(tmp_path):
    task = make_task("prefix_parity", seq_len=10)
    curves = {m: gradient_flow_on_task(tiny(m, vocab_size=2), task, batches=1, batch_size=4)
              for m in ("attention", "lstm")}
    assert (curves["attention"].norm > 0).all()
    assert GradFlow.from_dict(curves["lstm"].to_dict()).norm.tolist() == curves["lstm"].norm.tolist()
    path = plot_gradient_flow(curves, tmp_path / "gf.png")
    assert path.stat().st_size > 0


def test_bad_input():
    with pytest.raises(InputError, match="batches >= 1"):
        gradient_flow_on_task(tiny("gru"), make_task("prefix_parity"), batches=0)
    with pytest.raises(InputError, match="embed"):
        gradient_flow(torch.nn.Linear(2, 2), [])
