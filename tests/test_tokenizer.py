"""Tokenizers on every text path: bytes and byte-level BPE behind one interface, carried by checkpoints, used by
generate / Stream / eval, stopping at end-of-sequence tokens, and bits per byte of the same text whatever the
tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny

import seqlab
from seqlab.cli import main
from seqlab.config import TrainConfig
from seqlab.data import CorpusTask, Metrics
from seqlab.data.tokenizer import BPETokenizer, ByteTokenizer, byte_alphabet, tokenizer_of
from seqlab.distill import DistillConfig, distill_and_compare
from seqlab.errors import InputError
from seqlab.interop.gguf import gguf_tokenizer

TEXT = "naïve café — ✓ 日本語\n\tdef f(x): return x ** 2  # 123"
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "d e", "de f", "r e", "re t", "1 2"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe(pre: str = "default", eos: int = 2) -> BPETokenizer:
    alphabet = byte_alphabet()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [alphabet[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in MERGES]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3), "tokenizer.ggml.merges": MERGES,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": eos, "tokenizer.chat_template": CHATML}
    return gguf_tokenizer(meta)


def test_bytes_and_bpe_round_trip_unicode():
    for tok in (ByteTokenizer(), bpe(), bpe("smollm")):
        ids = tok.encode(TEXT)
        assert tok.decode(ids) == TEXT
        assert sum(len(tok.token_bytes(i)) for i in ids) == len(TEXT.encode("utf-8"))
    assert len(bpe().encode(" the")) == 1 and len(bpe().encode("the")) == 2  # merges apply: t + he
    assert bpe("smollm").encode("123") == [3 + ord(c) for c in "123"]  # StarCoder family: one digit each
    assert len(bpe().encode("123")) == 2  # GPT-2's split keeps the run: "12" + "3"
    special = bpe().encode("<|im_end|>")
    assert special == [2] and bpe().decode(special) == "" and bpe().token_bytes(2) == b""


def test_chat_template_and_errors():
    tok = bpe()
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n" \
                                                                   "<|im_start|>assistant\n"
    with pytest.raises(InputError, match="no chat template"):
        ByteTokenizer().render_chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(InputError, match="pre-tokenizer 'mystery'"):
        bpe("mystery")
    with pytest.raises(InputError, match="tokenizer model 'llama'"):
        gguf_tokenizer({"tokenizer.ggml.model": "llama"})
    with pytest.raises(InputError, match="eos_ids: token 9999"):
        bpe(eos=9999)


def test_checkpoint_carries_the_tokenizer(tmp_path):
    model = tiny("attention", vocab_size=300)
    assert tokenizer_of(model).kind == "bytes"
    seqlab.save(model, tmp_path / "plain")
    assert seqlab.load(tmp_path / "plain").tokenizer is None
    model.tokenizer = bpe()
    seqlab.save(model, tmp_path / "bpe")
    back = seqlab.load(tmp_path / "bpe")
    assert back.tokenizer.encode(TEXT) == model.tokenizer.encode(TEXT)
    assert (back.tokenizer.eos_ids, back.tokenizer.bos_id, back.tokenizer.chat_template) == ((2,), 1, CHATML)
    (tmp_path / "bpe" / "tokenizer.json").write_text("{}")
    with pytest.raises(InputError, match="tokenizer.json is truncated or modified"):
        seqlab.load(tmp_path / "bpe")


def _with_eos_at(model, n: int) -> int:
    """Give `model` a tokenizer whose end-of-sequence token is its n-th greedy token after [5, 6, 7]."""
    free = seqlab.generate(model, [5, 6, 7], n + 1, stop_at_eos=False)[0, 3:].tolist()
    model.tokenizer = bpe(eos=free[n])
    return free.index(free[n])  # the first time that token comes


def test_generation_stops_at_eos(tmp_path):
    model = tiny("attention", vocab_size=300)
    k = _with_eos_at(model, 4)
    out = seqlab.generate(model, [5, 6, 7], 20)
    assert out.shape[1] == 3 + k + 1 and out[0, -1].item() in model.tokenizer.eos_ids
    assert seqlab.generate(model, [5, 6, 7], 20, stop_at_eos=False).shape[1] == 23
    stream = seqlab.Stream(model)
    stream.feed([5, 6, 7])
    assert stream.generate(20).tolist() == out[:, 3:].tolist()
    rows = seqlab.generate_batch(model, [[5, 6, 7], [5, 6, 7, 8]], 20)
    assert rows[0].tolist() == out[0].tolist() and len(rows[1]) <= 24
    seqlab.save(model, tmp_path / "ckpt")
    assert main(["generate", str(tmp_path / "ckpt"), "--tokens", "5,6,7", "--max-new-tokens", "20"]) == 0
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "the", "--max-new-tokens", "3", "--no-stop",
                 "--stream"]) == 0


def test_cli_generate_tokens_output(tmp_path, capsys):
    model = tiny("attention", vocab_size=300)
    k = _with_eos_at(model, 3)
    seqlab.save(model, tmp_path / "ckpt")
    main(["generate", str(tmp_path / "ckpt"), "--tokens", "5,6,7", "--max-new-tokens", "20", "--json"])
    assert len(json.loads(capsys.readouterr().out)["generated"]) == k + 1
    main(["generate", str(tmp_path / "ckpt"), "--tokens", "5,6,7", "--max-new-tokens", "20", "--no-stop", "--json"])
    assert len(json.loads(capsys.readouterr().out)["generated"]) == 20


def test_stream_feeds_text():
    model = tiny("attention", vocab_size=300)
    model.tokenizer = bpe()
    a, b = seqlab.Stream(model), seqlab.Stream(model)
    assert torch.equal(a.feed("the cafe"), b.feed(model.tokenizer.encode("the cafe")))
    with pytest.raises(InputError, match="byte-level model"):
        seqlab.Stream(tiny("attention")).feed("text")


def _corpus(tmp_path) -> CorpusTask:
    root = tmp_path / "src"
    for i in range(40):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"m{i}.py").write_text(f"def f{i}(x):\n    return 'café ✓' * x  # {i}\n" * 8)
    return CorpusTask(seq_len=16, split="test", root=root, cache_dir=tmp_path / "cache")


def test_bits_per_byte_counts_utf8_bytes_of_the_same_text(tmp_path):
    task = _corpus(tmp_path)
    tok = bpe()
    tokenized = task.with_tokenizer(tok)
    assert task.with_tokenizer(ByteTokenizer()) is task and tokenized.with_tokenizer(tok) is tokenized
    assert int(tokenized.nbytes.sum()) == len(task.data)  # every byte of the split, once
    assert len(tokenized.data) < len(task.data)
    batch = tokenized.batch(4, torch.Generator().manual_seed(0))
    logits = torch.randn(4, 16, 300, generator=torch.Generator().manual_seed(1))
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="sum")
    got = Metrics().update(logits, batch).compute()["bits_per_byte"]
    assert math.isclose(got, nats.item() / batch.nbytes.sum().item() / math.log(2), rel_tol=1e-5)
    byte_batch = task.batch(4, torch.Generator().manual_seed(0))
    byte_metrics = Metrics().update(logits[..., :256], byte_batch).compute()
    assert math.isclose(byte_metrics["bits_per_byte"], byte_metrics["loss"] / math.log(2), rel_tol=1e-9)
    stream = tokenized.stream(2)
    assert stream.segment(0).nbytes.shape == (2, 16)


def test_distillation_reads_text_with_the_teachers_tokenizer(tmp_path):
    teacher = tiny("attention", vocab_size=300)
    teacher.tokenizer = bpe()
    cfg = DistillConfig(transfer=False, train=TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=1,
                                                          log_every=1, eval_batches=1))
    comp = distill_and_compare(teacher, dict(mixer="gru", vocab_size=300, d_model=16, n_layers=1), _corpus(tmp_path),
                               cfg, context=0, progress=False)
    assert comp.student.tokenizer is teacher.tokenizer and comp.scratch.tokenizer is teacher.tokenizer
    assert "bits_per_byte" in comp.report["distilled"]["eval"]
    seqlab.save(comp.student, tmp_path / "student")
    assert seqlab.load(tmp_path / "student").tokenizer.encode(TEXT) == teacher.tokenizer.encode(TEXT)


def test_eval_command_reports_bits_per_byte_through_the_checkpoints_tokenizer(tmp_path, capsys):
    task = _corpus(tmp_path)
    model = tiny("attention", vocab_size=300)
    model.tokenizer = bpe()
    seqlab.save(model, tmp_path / "ckpt")
    sets = [f"root={tmp_path / 'src'}", f"cache_dir={tmp_path / 'cache'}", "split=test", "seq_len=16"]
    args = ["eval", str(tmp_path / "ckpt"), "--task", "corpus", "--batches", "2", "--batch-size", "2", "--json"]
    assert main(args + [x for s in sets for x in ("--set", s)]) == 0
    got = json.loads(capsys.readouterr().out)
    tokenized = task.with_tokenizer(model.tokenizer)
    want = seqlab.train.evaluate(model, tokenized, 2, 2, 1234)
    assert math.isclose(got["bits_per_byte"], want["bits_per_byte"], rel_tol=1e-6)
    assert got["bits_per_byte"] < got["loss"] / math.log(2)  # a BPE token covers more than one byte
