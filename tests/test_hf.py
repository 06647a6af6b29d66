"""Hugging Face import: tiny random GPT-2, Llama (GQA), Mamba and Mamba-2 models built with transformers match
seqlab's import (logits and greedy tokens); bad folders get one clear error. The parity tests need the `hf` extra
(transformers)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import seqlab
from seqlab.cli import main
from seqlab.errors import InputError
from seqlab.interop.hf import from_hf, hf_to_config

V = 97


def _hf_models():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install "
                                                              "'seqlab[hf]'): Hugging Face parity tests skipped")
    torch.manual_seed(0)
    common = {"vocab_size": V, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_positions=64, n_embd=32, n_layer=2, n_head=4, **common)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, rope_theta=500.0, **common)),
        "mamba": transformers.MambaForCausalLM(transformers.MambaConfig(
            hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, **common)),
        # 4 heads of 16 in 2 groups; chunk 8, so a 24-token prompt runs transformers' chunked path over 3 chunks
        "mamba2": transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, num_heads=4, head_dim=16,
            n_groups=2, chunk_size=8, **common)),
    }


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model in _hf_models().items():
        model.eval()
        with torch.no_grad():  # random biases and norm weights, so a missed bias or norm mapping would show
            for n, p in model.named_parameters():  # (Mamba-2: also its per-head decay and skip)
                if n.endswith("bias") or "norm" in n or "ln_" in n or name == "mamba2" and n.endswith((".D", "A_log")):
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "mamba", "mamba2"])
def test_logits_and_greedy_tokens_match_transformers(hf_folders, family):
    hf, folder = hf_folders[family]
    ours = from_hf(folder)
    assert ours.config.mixer == (family if family.startswith("mamba") else "attention")
    tokens = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got, _ = ours(tokens)
    assert (got - expected).abs().max().item() <= 1e-4
    prompt = tokens[:1, :8]
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                attention_mask=torch.ones_like(prompt))
    assert torch.equal(seqlab.generate(ours, prompt, max_new_tokens=16), hf_tokens)


def test_llama_config_maps_gqa_and_rope(hf_folders):
    cfg = from_hf(hf_folders["llama"][1]).config
    assert (cfg.attention.n_heads, cfg.attention.kv_heads, cfg.attention.rope_theta) == (4, 2, 500.0)
    assert cfg.tie_embeddings is False and cfg.mlp == "swiglu" and cfg.d_ff == 48


def test_sharded_folder_and_cli_checkpoint(hf_folders, tmp_path):
    hf, folder = hf_folders["gpt2"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert main(["import-hf", str(tmp_path / "sharded"), "--out", str(tmp_path / "ckpt")]) == 0
    loaded = seqlab.load(tmp_path / "ckpt")
    tokens = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        assert (loaded(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-4
    assert json.loads((tmp_path / "ckpt" / "import.json").read_text())["model_type"] == "gpt2"


# ---------------------------------------------------------------------------------------------------------------
# bad folders (no transformers needed): a hand-written Mamba folder


def _mamba_folder(path, tensors=None, **config):
    path.mkdir()
    cfg = {"model_type": "mamba", "hidden_size": 16, "num_hidden_layers": 1, "state_size": 4, "expand": 2,
           "conv_kernel": 4, "vocab_size": 11, **config}
    (path / "config.json").write_text(json.dumps(cfg))
    if tensors is None:
        model = seqlab.build_model(mixer="mamba", d_model=16, n_layers=1, vocab_size=11, mlp="none",
                                   mamba={"d_state": 4, "dt_rank": 1}, seed=0)
        names = {"embed.weight": "embeddings.weight", "norm.weight": "norm_f.weight",
                 "blocks.0.norm1.weight": "layers.0.norm.weight"}
        tensors = {}
        for k, v in model.state_dict().items():
            hf = names.get(k, k.replace("blocks.0.mixer.", "layers.0.mixer.").replace("mixer.conv.", "mixer.conv1d."))
            tensors["backbone." + hf] = v.contiguous()
    save_file(tensors, path / "model.safetensors")
    return path


def test_handwritten_folder_imports(tmp_path):
    model = from_hf(_mamba_folder(tmp_path / "m"))
    assert model.config.mamba.dt_rank == 1 and model(torch.tensor([[1, 2, 3]]))[0].shape == (1, 3, 11)


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="model_type 'bert' is not supported"):
        from_hf(_mamba_folder(tmp_path / "a", model_type="bert"))
    ok = _mamba_folder(tmp_path / "ok")
    from safetensors.torch import load_file
    tensors = load_file(ok / "model.safetensors")
    missing = dict(tensors)
    del missing["backbone.layers.0.mixer.A_log"]
    with pytest.raises(InputError, match="tensor 'backbone.layers.0.mixer.A_log' is missing"):
        from_hf(_mamba_folder(tmp_path / "b", missing))
    wrong = {**tensors, "backbone.layers.0.mixer.x_proj.weight": torch.zeros(5, 32)}
    with pytest.raises(InputError, match=r"tensor 'backbone.layers.0.mixer.x_proj.weight' has shape \(5, 32\)"):
        from_hf(_mamba_folder(tmp_path / "c", wrong))
    extra = {**tensors, "backbone.layers.0.mixer.extra": torch.zeros(2)}
    with pytest.raises(InputError, match="tensor 'backbone.layers.0.mixer.extra' is not part"):
        from_hf(_mamba_folder(tmp_path / "d", extra))
    (_mamba_folder(tmp_path / "e") / "model.safetensors").unlink()
    (tmp_path / "e" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InputError, match="pickle weights"):
        from_hf(tmp_path / "e")


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["import-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqlab: error:") and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_new_options_keep_defaults_and_learned_positions_bound():
    with pytest.raises(InputError, match="max_positions = 8"):
        seqlab.build_model(position="learned", max_positions=8, d_model=16, n_layers=1)(torch.zeros(1, 9).long())
    with pytest.raises(InputError, match="config field 'position'"):
        seqlab.build_model(position="alibi")
    names = list(seqlab.build_model(d_model=16, n_layers=1, seed=0).state_dict())
    assert not [n for n in names if n.endswith("bias") or "pos_embed" in n]  # the defaults add no tensor


def test_mamba2_config_refuses_what_it_cannot_match():
    """A dt clamp other than transformers' default (0, inf), and heads that do not make expand * hidden_size, are
    refused by name; the default limit, as transformers writes it to JSON, is accepted."""
    base = {"model_type": "mamba2", "hidden_size": 16, "num_hidden_layers": 1, "vocab_size": 11, "num_heads": 2,
            "head_dim": 16, "n_groups": 1, "state_size": 4}
    cfg = hf_to_config({**base, "time_step_limit": [0.0, {"__float__": "Infinity"}]})
    assert (cfg.mixer, cfg.mamba2.n_heads(16), cfg.mamba2.n_groups, cfg.mlp) == ("mamba2", 2, 1, "none")
    with pytest.raises(InputError, match=r"time_step_limit = \[0.0, 0.1\] is not supported"):
        hf_to_config({**base, "time_step_limit": [0.0, 0.1]})
    with pytest.raises(InputError, match="num_heads \\* head_dim = 48 is not expand \\* hidden_size = 32"):
        hf_to_config({**base, "num_heads": 3})
