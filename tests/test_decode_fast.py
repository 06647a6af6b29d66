"""The decode path's shortcuts (cached RoPE tables, the T == 1 views, the no-grad step path) give the plain path's
values, never go stale, and never reach a checkpoint."""

import torch

import seqlab
from seqlab.models.blocks import Rotary


def _rotate_ref(x, pos0, inv_freq):  # x (B, H, T, hd), "rotate half" layout, angles from scratch
    T = x.shape[-2]
    angles = torch.outer(torch.arange(pos0, pos0 + T, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_rotary_tables_grow_on_demand_and_stay_out_of_the_state_dict():
    rot = Rotary(8, 10000.0)
    x = torch.randn(2, 3, 5, 8)
    for pos0 in (0, 7, 300, 5000):  # each beyond the table built so far
        torch.testing.assert_close(rot(x, pos0), _rotate_ref(x, pos0, rot.inv_freq), atol=1e-6, rtol=0)
    assert rot.cos_table.shape[0] >= 5005
    assert list(rot.state_dict()) == []
    model = seqlab.build_model(mixer="attention", vocab_size=32, d_model=32, n_layers=1, seed=0)
    with torch.inference_mode():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert not any("table" in k for k in model.state_dict())
    model.train()  # a table built under inference_mode still trains
    model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()


def test_decoding_sees_weight_updates():
    for mixer in ("attention", "mamba"):
        model = seqlab.build_model(mixer=mixer, vocab_size=32, d_model=32, n_layers=2, seed=0)
        tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            with torch.no_grad():
                _, state = model(tokens[:, :5])
                fast, _ = model(tokens[:, 5:], state)
            slow = model(tokens)[0][:, 5:]  # autograd on: the plain path
            torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
            with torch.no_grad():  # an in-place update, as an optimizer step does
                for p in model.parameters():
                    p.mul_(1.5)
