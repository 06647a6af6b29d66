"""Int8 decode (decode="dynamic"): int8 x int8 products in the step path, close to the int8 model's own forward,
the same greedy tokens on a tiny model, the choice kept by save / load, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

import seqlab
from seqlab.errors import InputError
from seqlab.interop.quantize import Int8Linear, quantize, save_quantized, set_decode
from seqlab.models.blocks import linear_fn
from seqlab.models.int8 import apply_layout

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                reason="decode='dynamic' needs torch's fbgemm engine (x86)")


@pytest.fixture(scope="module")
def model():
    return seqlab.build_model(layers=("mamba", "gla", "attention", "lstm"), d_model=64, vocab_size=32,
                              gla={"n_heads": 2}, seed=0).eval()


def _tokens(V=32, B=2, T=24):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))


def _stepped(model, tokens):
    """Logits (B, T - 1, V) of tokens 1 .. T-1 through `step` (bound weights), after the first through forward."""
    w = model.bind()
    _, state = model(tokens[:, :1])
    out = []
    for t in range(1, tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state, w)
        out.append(logits)
    return torch.stack(out, 1)


def test_dynamic_decode_is_close_to_the_int8_forward_and_dequant_matches_it(model):
    tokens = _tokens()
    q = quantize(copy.deepcopy(model), decode="dynamic")
    with torch.inference_mode():
        full = q(tokens)[0][:, 1:]
        dynamic = _stepped(q, tokens)
        exact = _stepped(set_decode(copy.deepcopy(q), "dequant"), tokens)
    torch.testing.assert_close(exact, full, atol=1e-5, rtol=1e-5)  # dequant: the forward's math
    # dynamic: activations rounded to 8 bits per token; stated tolerance 2% of the largest logit
    err = float((dynamic - full).abs().max() / full.abs().max())
    assert 0 < err < 0.02, err


def test_dynamic_decode_gives_the_same_greedy_tokens(model):
    q = quantize(copy.deepcopy(model), decode="dynamic")
    prompt = _tokens(B=1, T=6)
    fast = seqlab.generate(q, prompt, max_new_tokens=16)
    assert torch.equal(fast, seqlab.generate(set_decode(copy.deepcopy(q), "dequant"), prompt, max_new_tokens=16))
    assert torch.equal(fast, seqlab.generate(q, prompt, max_new_tokens=16, plan=False))  # module path: forward


def test_decode_is_saved_and_loaded_and_old_files_mean_dequant(model, tmp_path):
    q = quantize(copy.deepcopy(model), decode="dynamic")
    save_quantized(q, tmp_path / "dyn")
    loaded = seqlab.load(tmp_path / "dyn")
    assert loaded.quantization["decode"] == "dynamic"
    assert {m.decode for m in loaded.modules() if isinstance(m, Int8Linear)} == {"dynamic"}
    save_quantized(quantize(copy.deepcopy(model)), tmp_path / "plain")
    assert seqlab.load(tmp_path / "plain").quantization["decode"] == "dequant"


def test_packed_weights_follow_in_place_changes(model):
    layer = quantize(copy.deepcopy(model), decode="dynamic").blocks[2].mixer.wq
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    before = linear_fn(layer)(x)
    with torch.no_grad():
        layer.scale.mul_(2)
    torch.testing.assert_close(linear_fn(layer)(x), 2 * before)


def test_onnx_export_path_binds_the_dequantizing_module(model):
    layer = quantize(copy.deepcopy(model), decode="dynamic").blocks[2].mixer.wq
    assert linear_fn(layer, portable=True) is layer
    assert linear_fn(layer) is not layer


def test_bad_decode_values_are_refused(model):
    with pytest.raises(InputError, match="int8 decode 'fast'"):
        quantize(copy.deepcopy(model), decode="fast")
    with pytest.raises(InputError, match="no int8 layers"):
        set_decode(copy.deepcopy(model), "dynamic")
    q = quantize(copy.deepcopy(model), decode="dynamic").double()
    with pytest.raises(InputError, match="fp32 activations"):
        q.bind()
    spec = {**quantize(copy.deepcopy(model)).quantization, "decode": "int4"}
    with pytest.raises(InputError, match="decode 'int4'"):
        apply_layout(copy.deepcopy(model), spec, "checkpoint 'x'")


def test_a_tied_head_decodes_as_int8_too_and_follows_the_embedding():
    """The tied embedding stays fp32 (the lookup), but decode='dynamic' multiplies the head by an int8 copy of its
    rows: the logits differ from the dequant path by the rounding, the greedy tokens do not, and an edited
    embedding is repacked."""
    tied = seqlab.build_model(mixer="attention", d_model=64, n_layers=2, vocab_size=48, tie_embeddings=True,
                              seed=1).eval()
    q = quantize(copy.deepcopy(tied), decode="dynamic")
    tokens = _tokens(V=48)
    with torch.inference_mode():
        full = q(tokens)[0][:, 1:]
        dynamic = _stepped(q, tokens)
        err = float((dynamic - full).abs().max() / full.abs().max())
        assert 0 < err < 0.02, err
        prompt = _tokens(V=48, B=1, T=6)
        fast = seqlab.generate(q, prompt, max_new_tokens=12)
        assert torch.equal(fast, seqlab.generate(set_decode(copy.deepcopy(q), "dequant"), prompt, max_new_tokens=12))
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
        before = q.bind().head(x)
        q.embed.weight.mul_(2.0)  # the int8 copy must follow the edit (logits double)
        torch.testing.assert_close(q.bind().head(x), 2 * before, rtol=0.02, atol=0.02 * float(before.abs().max()))
        torch.testing.assert_close(q.bind(portable=True).head(x), x @ q.embed.weight.t())  # export: the fp32 product


def test_an_fp32_head_stays_fp32_tied_or_untied_and_is_saved(tmp_path):
    """head='fp32': an untied head is not quantized (its logits are the fp32 product of the int8 blocks' output),
    a tied head decodes as x E^T in fp32 under decode='dynamic'; the choice survives save / load, old files mean
    int8, and a bad value is refused."""
    model = seqlab.build_model(mixer="gla", d_model=64, n_layers=2, vocab_size=32, tie_embeddings=False,
                               gla={"n_heads": 2}, seed=0).eval()
    q = quantize(copy.deepcopy(model), decode="dynamic", head="fp32")
    assert isinstance(q.head, torch.nn.Linear) and "head" not in q.quantization["layers"]
    assert isinstance(quantize(copy.deepcopy(model)).head, Int8Linear)  # the default quantizes it
    save_quantized(q, tmp_path / "fp32head")
    loaded = seqlab.load(tmp_path / "fp32head")
    assert loaded.quantization["head"] == "fp32" and isinstance(loaded.head, torch.nn.Linear)
    spec = {k: v for k, v in quantize(copy.deepcopy(model)).quantization.items() if k != "head"}
    assert apply_layout(copy.deepcopy(model), spec, "checkpoint 'x'").quantization["head"] == "int8"
    with pytest.raises(InputError, match="head 'int4'"):
        apply_layout(copy.deepcopy(model), {**spec, "head": "int4"}, "checkpoint 'x'")
    with pytest.raises(InputError, match="int8 head 'bf16'"):
        quantize(copy.deepcopy(model), head="bf16")

    tied = seqlab.build_model(mixer="attention", d_model=64, n_layers=2, vocab_size=48, tie_embeddings=True,
                              seed=1).eval()
    fp32_head = quantize(copy.deepcopy(tied), decode="dynamic", head="fp32")
    int8_head = quantize(copy.deepcopy(tied), decode="dynamic")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(fp32_head.bind().head(x), x @ fp32_head.embed.weight.t())  # exact fp32 product
        int8_head = int8_head.bind().head(x)
        assert not torch.allclose(int8_head, x @ tied.embed.weight.t(), rtol=1e-6, atol=1e-6)  # the int8 copy
