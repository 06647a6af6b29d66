"""Import Hugging Face checkpoints (GPT-2, Llama-style, Mamba-1, Mamba-2) into seqlab models, reading safetensors only.

    model = seqlab.from_hf("path/to/hf-folder")          # config.json + model.safetensors (or a sharded index)
    seqlab import-hf path/to/hf-folder --out ckpt/        # the same, saved as a seqlab checkpoint

`transformers` is not needed: the folder's `config.json` is read as JSON and its weights with `safetensors`, so no
code from the folder ever runs (pickle `.bin` files are refused). Each family maps onto seqlab's blocks exactly,
through config options rather than approximations:

    family   HF model_type   seqlab config
    GPT-2    gpt2            attention, position="learned", norm="layernorm", mlp="gelu_tanh", mlp_bias, attention.bias
    Llama    llama           attention (RoPE, "rotate half" layout, as HF stores q/k), GQA via n_kv_heads, swiglu
    Mamba-1  mamba           mamba, mlp="none" (a Mamba layer is norm -> mixer -> residual), mamba.proj/conv_bias
    Mamba-2  mamba2          mamba2 (heads, n_groups, gated RMSNorm per group), mlp="none", mamba2.proj/conv_bias

GPT-2 stores its linear layers as `Conv1D` with weights (in, out): they are transposed here. Weights are loaded in
fp32 whatever their stored dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from seqlab.checkpoint import save
from seqlab.config import ModelConfig
from seqlab.errors import InputError
from seqlab.models import build_model

FAMILIES = ("gpt2", "llama", "mamba", "mamba2")

# Tensors some HF versions save that are buffers, not weights: skipped without complaint.
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------------------------
# reading the folder


def read_hf_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"Hugging Face folder '{path}' does not exist or is not a folder")
    file = path / "config.json"
    if not file.is_file():
        raise InputError(f"'{path}' has no config.json; expected a Hugging Face model folder (save_pretrained)")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"'{file}' is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"'{file}' must hold a JSON object")
    return cfg


def read_hf_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder: model.safetensors, or the shards that model.safetensors.index.json lists."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise InputError(f"'{index}' is corrupt: expected a JSON object with a 'weight_map'") from None
        for f in files:
            if not f.is_file():
                raise InputError(f"shard '{f.name}' listed in '{index}' is missing")
    elif any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise InputError(f"'{path}' holds pickle weights (.bin/.pt), which seqlab never loads (they can run code); "
                         "convert them to safetensors first (save_pretrained(..., safe_serialization=True))")
    else:
        raise InputError(f"'{path}' has no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise InputError(f"'{f}' cannot be read as safetensors: {e}") from None
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# config mapping


def _get(hf: dict, key: str, kind: type | tuple, default: Any = ...) -> Any:
    if key not in hf or hf[key] is None:
        if default is ...:
            raise InputError(f"config.json: field '{key}' is missing")
        return default
    value = hf[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise InputError(f"config.json: field '{key}' = {value!r} has the wrong type")
    return value


def _require(hf: dict, key: str, allowed: tuple, default: Any) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise InputError(f"config.json: {key} = {value!r} is not supported; seqlab imports "
                         f"{' or '.join(map(repr, allowed))}")


def _gpt2_config(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
    if mlp is None:
        raise InputError(f"config.json: activation_function = {act!r} is not supported; seqlab imports gelu_new, "
                         "gelu_pytorch_tanh or gelu")
    _require(hf, "scale_attn_weights", (True,), True)
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    d = _get(hf, "n_embd", int)
    return ModelConfig.from_dict(dict(
        mixer="attention", vocab_size=_get(hf, "vocab_size", int), d_model=d, n_layers=_get(hf, "n_layer", int),
        mlp=mlp, d_ff=_get(hf, "n_inner", int, None), mlp_bias=True, norm="layernorm",
        norm_eps=float(_get(hf, "layer_norm_epsilon", (int, float), 1e-5)), position="learned",
        max_positions=_get(hf, "n_positions", int, 1024), tie_embeddings=hf.get("tie_word_embeddings", True),
        attention={"n_heads": _get(hf, "n_head", int), "bias": True},
    ))


def _llama_config(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise InputError(f"config.json: rope type {rope_type!r} is not supported; seqlab imports plain RoPE "
                         "(rope_type 'default', no rope_scaling)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    d, heads = _get(hf, "hidden_size", int), _get(hf, "num_attention_heads", int)
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise InputError(f"config.json: head_dim = {head_dim} with num_attention_heads = {heads} does not make "
                         f"hidden_size = {d}; seqlab needs head_dim = hidden_size / num_attention_heads")
    return ModelConfig.from_dict(dict(
        mixer="attention", vocab_size=_get(hf, "vocab_size", int), d_model=d,
        n_layers=_get(hf, "num_hidden_layers", int), mlp="swiglu", d_ff=_get(hf, "intermediate_size", int),
        mlp_bias=bool(hf.get("mlp_bias", False)), norm="rmsnorm",
        norm_eps=float(_get(hf, "rms_norm_eps", (int, float), 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention={"n_heads": heads, "n_kv_heads": _get(hf, "num_key_value_heads", int, heads),
                   "rope_theta": float(theta), "bias": bool(hf.get("attention_bias", False))},
    ))


def _mamba_config(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    d, expand = _get(hf, "hidden_size", int), _get(hf, "expand", int, 2)
    inner = hf.get("intermediate_size", expand * d)
    if inner != expand * d:
        raise InputError(f"config.json: intermediate_size = {inner} is not expand * hidden_size = {expand * d}")
    rank = hf.get("time_step_rank", "auto")
    rank = math.ceil(d / 16) if rank == "auto" else rank
    return ModelConfig.from_dict(dict(
        mixer="mamba", vocab_size=_get(hf, "vocab_size", int), d_model=d,
        n_layers=_get(hf, "num_hidden_layers", int), mlp="none", norm="rmsnorm",
        norm_eps=float(_get(hf, "layer_norm_epsilon", (int, float), 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        mamba={"d_state": _get(hf, "state_size", int, 16), "d_conv": _get(hf, "conv_kernel", int, 4),
               "expand": expand, "dt_rank": rank, "proj_bias": bool(hf.get("use_bias", False)),
               "conv_bias": bool(hf.get("use_conv_bias", True))},
    ))


def _json_float(v: Any) -> Any:
    """A number as transformers writes it to JSON: plain, or {"__float__": "Infinity"} for the non-finite ones."""
    if isinstance(v, dict) and isinstance(v.get("__float__"), str):
        try:
            return float(v["__float__"])
        except ValueError:
            return v
    return v


def _mamba2_config(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    limit = hf.get("time_step_limit", (0.0, math.inf))
    # transformers writes inf as {"__float__": "Infinity"} (JSON has no inf); the default (0, inf) clamps nothing,
    # which is all seqlab's scan and step do
    if not isinstance(limit, list | tuple) or [_json_float(v) for v in limit] != [0.0, math.inf]:
        raise InputError(f"config.json: time_step_limit = {limit!r} is not supported; seqlab imports (0.0, inf)")
    d, expand = _get(hf, "hidden_size", int), _get(hf, "expand", int, 2)
    heads, head_dim = _get(hf, "num_heads", int), _get(hf, "head_dim", int, 64)
    if heads * head_dim != expand * d:
        raise InputError(f"config.json: num_heads * head_dim = {heads * head_dim} is not expand * hidden_size = "
                         f"{expand * d}")
    eps = float(_get(hf, "layer_norm_epsilon", (int, float), 1e-5))
    return ModelConfig.from_dict(dict(
        mixer="mamba2", vocab_size=_get(hf, "vocab_size", int), d_model=d,
        n_layers=_get(hf, "num_hidden_layers", int), mlp="none", norm="rmsnorm", norm_eps=eps,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mamba2={"d_state": _get(hf, "state_size", int, 128), "d_conv": _get(hf, "conv_kernel", int, 4),
                "expand": expand, "head_dim": head_dim, "n_groups": _get(hf, "n_groups", int, 8),
                "proj_bias": bool(hf.get("use_bias", False)), "conv_bias": bool(hf.get("use_conv_bias", True)),
                "norm_eps": eps},
    ))


def hf_to_config(hf: dict) -> ModelConfig:
    """The seqlab ModelConfig equivalent to a Hugging Face config.json (as a dict)."""
    family = hf.get("model_type")
    build = {"gpt2": _gpt2_config, "llama": _llama_config, "mamba": _mamba_config,  # type: ignore
             "mamba2": _mamba2_config}.get(family)
    if build is None:
        raise InputError(f"config.json: model_type {family!r} is not supported; seqlab imports "
                         f"{', '.join(FAMILIES)}")
    try:
        return build(hf)
    except InputError as e:
        if str(e).startswith("config.json"):
            raise
        raise InputError(f"config.json ({family}) maps to an invalid seqlab config: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# weight mapping: seqlab name -> (HF name, transform)

_T = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _part(i: int, n: int, transpose: bool) -> _T:
    """Piece i of n of GPT-2's fused q|k|v tensor (split along the output dimension)."""
    def take(t: torch.Tensor) -> torch.Tensor:
        t = t.t() if transpose else t
        return t.chunk(n, dim=0)[i]
    return take


def _gpt2_map(cfg: ModelConfig) -> dict[str, tuple[str, _T]]:
    m = {"embed.weight": ("wte.weight", _same), "pos_embed.weight": ("wpe.weight", _same),
         "norm.weight": ("ln_f.weight", _same), "norm.bias": ("ln_f.bias", _same)}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            m[f"{b}{ours}.weight"] = (f"{h}{theirs}.weight", _same)
            m[f"{b}{ours}.bias"] = (f"{h}{theirs}.bias", _same)
        for j, name in enumerate(("wq", "wk", "wv")):
            m[f"{b}mixer.{name}.weight"] = (f"{h}attn.c_attn.weight", _part(j, 3, True))
            m[f"{b}mixer.{name}.bias"] = (f"{h}attn.c_attn.bias", _part(j, 3, False))
        for ours, theirs in (("mixer.wo", "attn.c_proj"), ("mlp.w1", "mlp.c_fc"), ("mlp.w2", "mlp.c_proj")):
            m[f"{b}{ours}.weight"] = (f"{h}{theirs}.weight", _transposed)
            m[f"{b}{ours}.bias"] = (f"{h}{theirs}.bias", _same)
    if not cfg.tie_embeddings:
        m["head.weight"] = ("lm_head.weight", _same)
    return m


def _llama_map(cfg: ModelConfig) -> dict[str, tuple[str, _T]]:
    m = {"embed.weight": ("embed_tokens.weight", _same), "norm.weight": ("norm.weight", _same)}
    for i in range(cfg.n_layers):
        h, b = f"layers.{i}.", f"blocks.{i}."
        m[f"{b}norm1.weight"] = (f"{h}input_layernorm.weight", _same)
        m[f"{b}norm2.weight"] = (f"{h}post_attention_layernorm.weight", _same)
        pairs = [("mixer.wq", "self_attn.q_proj"), ("mixer.wk", "self_attn.k_proj"), ("mixer.wv", "self_attn.v_proj"),
                 ("mixer.wo", "self_attn.o_proj"), ("mlp.w1", "mlp.gate_proj"), ("mlp.w3", "mlp.up_proj"),
                 ("mlp.w2", "mlp.down_proj")]
        for ours, theirs in pairs:
            m[f"{b}{ours}.weight"] = (f"{h}{theirs}.weight", _same)
            m[f"{b}{ours}.bias"] = (f"{h}{theirs}.bias", _same)  # only used when the config has biases
    if not cfg.tie_embeddings:
        m["head.weight"] = ("lm_head.weight", _same)
    return m


def _mamba_map(cfg: ModelConfig) -> dict[str, tuple[str, _T]]:
    m = {"embed.weight": ("embeddings.weight", _same), "norm.weight": ("norm_f.weight", _same)}
    for i in range(cfg.n_layers):
        h, b = f"layers.{i}.", f"blocks.{i}."
        m[f"{b}norm1.weight"] = (f"{h}norm.weight", _same)
        for ours, theirs in (("in_proj", "in_proj"), ("conv", "conv1d"), ("x_proj", "x_proj"),
                             ("dt_proj", "dt_proj"), ("out_proj", "out_proj")):
            m[f"{b}mixer.{ours}.weight"] = (f"{h}mixer.{theirs}.weight", _same)
            m[f"{b}mixer.{ours}.bias"] = (f"{h}mixer.{theirs}.bias", _same)
        m[f"{b}mixer.A_log"] = (f"{h}mixer.A_log", _same)
        m[f"{b}mixer.D"] = (f"{h}mixer.D", _same)
    if not cfg.tie_embeddings:
        m["head.weight"] = ("lm_head.weight", _same)
    return m


def _mamba2_map(cfg: ModelConfig) -> dict[str, tuple[str, _T]]:
    m = {"embed.weight": ("embeddings.weight", _same), "norm.weight": ("norm_f.weight", _same)}
    for i in range(cfg.n_layers):
        h, b = f"layers.{i}.", f"blocks.{i}."
        m[f"{b}norm1.weight"] = (f"{h}norm.weight", _same)
        for ours, theirs in (("in_proj", "in_proj"), ("conv", "conv1d"), ("out_proj", "out_proj")):
            m[f"{b}mixer.{ours}.weight"] = (f"{h}mixer.{theirs}.weight", _same)
            m[f"{b}mixer.{ours}.bias"] = (f"{h}mixer.{theirs}.bias", _same)
        for name in ("dt_bias", "A_log", "D"):
            m[f"{b}mixer.{name}"] = (f"{h}mixer.{name}", _same)
        m[f"{b}mixer.norm_weight"] = (f"{h}mixer.norm.weight", _same)
    if not cfg.tie_embeddings:
        m["head.weight"] = ("lm_head.weight", _same)
    return m


_MAPS = {"gpt2": (_gpt2_map, "transformer."), "llama": (_llama_map, "model."), "mamba": (_mamba_map, "backbone."),
         "mamba2": (_mamba2_map, "backbone.")}


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Names without the task-model prefix (`transformer.h.0...` -> `h.0...`); lm_head.weight stays as it is."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def convert_weights(family: str, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                    expected: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """HF tensors -> a seqlab state dict matching `expected` (names and shapes), fp32. Errors name the HF tensor."""
    make_map, prefix = _MAPS[family]
    original = {k[len(prefix):] if k.startswith(prefix) else k: k for k in tensors}  # stripped -> stored name
    tensors = _strip_prefix(tensors, prefix)
    mapping = make_map(cfg)
    out, used = {}, set()
    for name, want in expected.items():
        if name not in mapping:
            raise InputError(f"{where}: no Hugging Face tensor maps to seqlab's '{name}' (importer bug)")
        hf_name, transform = mapping[name]
        if hf_name not in tensors:
            prefixed = hf_name != "lm_head.weight" and any(k.startswith(prefix) for k in original.values())
            stored = prefix + hf_name if prefixed else hf_name
            raise InputError(f"{where}: tensor '{stored}' is missing from the safetensors files")
        t = transform(tensors[hf_name]).to(torch.float32).contiguous()
        if t.shape != want.shape:
            raise InputError(f"{where}: tensor '{original[hf_name]}' has shape {tuple(tensors[hf_name].shape)}, "
                             f"which does not match config.json (seqlab's '{name}' needs {tuple(want.shape)})")
        out[name] = t
        used.add(hf_name)
    tied = cfg.tie_embeddings and "lm_head.weight" in tensors
    if tied and not torch.equal(tensors["lm_head.weight"], tensors[mapping["embed.weight"][0]]):
        raise InputError(f"{where}: tie_word_embeddings is true but tensor 'lm_head.weight' differs from the "
                         "embedding")
    extra = sorted(k for k in set(tensors) - used - ({"lm_head.weight"} if tied else set())
                   if not k.endswith(_BUFFERS))
    if extra:
        raise InputError(f"{where}: tensor '{original[extra[0]]}' is not part of a {family} model as config.json "
                         f"describes it ({len(extra)} unexpected in all)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# entry points


def from_hf(path: str | Path):
    """A seqlab LanguageModel (fp32, eval mode) with the weights of the Hugging Face folder `path`."""
    hf = read_hf_config(path)
    cfg = hf_to_config(hf)
    tensors = read_hf_tensors(path)
    model = build_model(cfg, seed=0)
    weights = convert_weights(hf["model_type"], cfg, tensors, model.state_dict(), f"'{path}'")
    model.load_state_dict(weights)
    return model.eval()


def import_hf(path: str | Path, out: str | Path):
    """Import the Hugging Face folder `path` and save it as the seqlab checkpoint `out`; returns the model."""
    model = from_hf(path)
    hf = read_hf_config(path)
    source = {"source": str(Path(path).resolve()), "model_type": hf.get("model_type"),
              "architectures": hf.get("architectures"), "parameters": model.num_parameters()}
    save(model, out, json_files={"import.json": source})
    return model
