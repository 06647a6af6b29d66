"""Streams: token-by-token feeding, snapshots that resume exactly, their size, and every broken-blob case."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import seqlab
from seqlab import Stream
from seqlab.infer.stream import header_nbytes, read_snapshot

ALL = seqlab.available_mixers()
RECURRENT = [m for m in ALL if "attention" not in m]
LAYERS = [(m, m) for m in ALL] + [("gru", "attention")]


@pytest.mark.parametrize("layers", LAYERS, ids="+".join)
def test_token_by_token_equals_one_parallel_call(layers):
    model = tiny(layers=layers)
    tokens = torch.randint(0, 37, (2, 15))
    full, _ = model(tokens)
    stream = Stream(model)
    steps = torch.cat([stream.feed(tokens[:, t:t + 1]) for t in range(15)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)
    assert stream.pos == 15


@pytest.mark.parametrize("layers", LAYERS, ids="+".join)
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 12, "seed": 7}], ids=["greedy", "sampled"])
def test_snapshot_restore_continue_equals_uninterrupted(layers, sampling):
    model = tiny(layers=layers)
    prompt = torch.randint(0, 37, (1, 6))
    whole = Stream(model, **sampling)
    whole.feed(prompt)
    expected = whole.generate(16)
    paused = Stream(model, **sampling)
    paused.feed(prompt)
    first = paused.generate(9)
    blob = paused.snapshot()
    del paused
    resumed = Stream.restore(model, blob)
    assert resumed.pos == 6 + 9 and resumed.sampler == whole.sampler
    rest = resumed.generate(7)
    assert torch.equal(torch.cat([first, rest], dim=1), expected)
    torch.testing.assert_close(resumed.logits, whole.logits, atol=0, rtol=0)


def test_restore_in_another_process(tmp_path):
    model = tiny("lstm")
    seqlab.save(model, tmp_path / "ckpt")
    stream = Stream(model, temperature=1.0, seed=1)
    stream.feed([3, 1, 4, 1, 5])
    (tmp_path / "snap").write_bytes(stream.snapshot())
    expected = stream.generate(12)[0].tolist()
    code = ("import sys, seqlab; from pathlib import Path; m = seqlab.load(sys.argv[1]); "
            "s = seqlab.Stream.restore(m, Path(sys.argv[2]).read_bytes()); print(s.generate(12)[0].tolist())")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt"), str(tmp_path / "snap")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == expected


@pytest.mark.parametrize("mixer", RECURRENT)
def test_recurrent_snapshot_size_is_constant(mixer):
    model = tiny(mixer)
    stream = Stream(model)
    sizes = set()
    for n in (1, 20, 150):
        stream.feed(torch.randint(0, 37, (1, n)))
        blob = stream.snapshot()
        assert len(blob) == stream.nbytes + header_nbytes(blob)
        sizes.add(len(blob))
    assert len(sizes) == 1


@pytest.mark.parametrize("mixer", ["attention", "sliding_attention"])
def test_attention_snapshot_is_cache_plus_header(mixer):
    model = tiny(mixer, attention={"n_heads": 4, "n_kv_heads": 2, "window": 5})
    stream = Stream(model)
    for n in (1, 3, 40):
        stream.feed(torch.randint(0, 37, (1, n)))
        blob = stream.snapshot()
        entries = stream.pos if mixer == "attention" else min(stream.pos, 5)
        assert stream.nbytes == 2 * 2 * 2 * 8 * entries * 4  # 2 x layers x kv_heads x head_dim x T x 4
        assert len(blob) == stream.nbytes + header_nbytes(blob)
        assert header_nbytes(blob) < 2048 + 37 * 4  # JSON header + the logits row: small and context-free


@pytest.fixture(scope="module")
def blob_and_model():
    model = tiny("gru")
    stream = Stream(model)
    stream.feed([1, 2, 3, 4])
    return stream.snapshot(), model


def rewrite(blob, change_header=None, change_tensors=None, fix_checksum=True):
    """A snapshot with its header or tensors edited (the checksum recomputed unless fix_checksum is False)."""
    from seqlab.infer.stream import _metadata, _tensors_sha256

    meta, tensors = _metadata(blob), dict(load_safetensors(blob))
    header = json.loads(meta["header"])
    if change_header:
        change_header(header)
    if change_tensors:
        change_tensors(tensors)
    if fix_checksum:
        header["tensors_sha256"] = _tensors_sha256(tensors)
    return save_safetensors(tensors, metadata={**meta, "header": json.dumps(header)})


def test_restore_into_a_mismatched_model_is_one_clear_error(blob_and_model):
    blob, model = blob_and_model
    for other, msg in [(tiny("lstm"), "different model .*gru.* than this one .*lstm"),
                       (tiny("gru", d_model=48), "different model"),
                       (seqlab.build_model(model.config, seed=1), "same config but different weights")]:
        with pytest.raises(seqlab.InputError, match=msg):
            Stream.restore(other, blob)
    assert Stream.restore(model, blob).pos == 4  # the right model still works


@pytest.mark.parametrize("cut", [0, 5, 8, 100, -1, -40])
def test_truncated_blob_is_one_clear_error(blob_and_model, cut):
    blob, model = blob_and_model
    with pytest.raises(seqlab.InputError, match="truncated or corrupt"):
        Stream.restore(model, blob[:cut])


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_one_clear_error(blob_and_model, seed):
    _, model = blob_and_model
    junk = torch.randint(0, 256, (64 + 300 * seed,), generator=torch.Generator().manual_seed(seed))
    with pytest.raises(seqlab.InputError, match="not a readable seqlab stream snapshot"):
        Stream.restore(model, bytes(junk.to(torch.uint8).tolist()))


def test_corrupt_or_foreign_blobs_are_one_clear_error(blob_and_model):
    blob, model = blob_and_model
    flipped = bytearray(blob)
    flipped[-3] ^= 0x10  # a bit of the state's data
    cases = [
        (bytes(flipped), "do not match the SHA-256"),
        ("not bytes", "a snapshot is bytes"),
        (save_safetensors({"x": torch.zeros(2)}), "no 'seqlab-stream' header"),
        (rewrite(blob, lambda h: h.update(version=99)), "format version 99"),
        (rewrite(blob, lambda h: h.pop("layout")), "header is malformed"),
        (rewrite(blob, lambda h: h["layout"]["fields"]["layers"]["tuple"][0].update(
            {"class": "os.system"})), "does not know"),
        (rewrite(blob, change_tensors=lambda t: t.update({"state.layers.0.h": torch.zeros(1, 1, 33)})),
         "does not fit this model"),
        (rewrite(blob, change_tensors=lambda t: t.update({"extra": torch.zeros(1)})), "not part of the state"),
        (rewrite(blob, lambda h: h.update(pos=3)), "disagree"),
    ]
    for bad, msg in cases:
        with pytest.raises(seqlab.InputError, match=msg):
            Stream.restore(model, bad)


def test_snapshot_header_describes_the_state(blob_and_model):
    blob, model = blob_and_model
    header, tensors = read_snapshot(blob)
    assert header["version"] == 1 and header["pos"] == 4 and header["batch"] == 1
    assert header["model"]["summary"] == "2 layers of gru, d_model 32, vocab 37"
    assert sorted(tensors) == ["logits", "state.layers.0.h", "state.layers.1.h"]
    assert header["state_nbytes"] == 2 * 32 * 4


def test_stream_usage_errors():
    model = tiny("gru")
    stream = Stream(model)
    with pytest.raises(seqlab.InputError, match="feed the stream some tokens first"):
        stream.sample()
    empty = Stream.restore(model, stream.snapshot())  # a stream with nothing fed round-trips too
    assert empty.pos == 0 and empty.state is None
    stream.feed(torch.randint(0, 37, (2, 3)))
    with pytest.raises(seqlab.InputError, match="holds 2 sequences"):
        stream.feed([1, 2])
    with pytest.raises(seqlab.InputError, match="token id 40"):
        stream.feed(torch.tensor([[1], [40]]))
    assert stream.sample().shape == (2, 1)
    with pytest.raises(seqlab.InputError, match="temperature"):
        Stream(model, temperature=-1)


def test_reserve_makes_room_up_front():
    model = tiny("attention")
    stream = Stream(model, reserve=64)
    stream.feed([1, 2, 3])
    buffers = [s.buffer for s in stream.state.layers]
    stream.generate(60)
    assert [s.buffer for s in stream.state.layers] == buffers  # no reallocation while decoding
    assert stream.state.layers[0].capacity == 64
