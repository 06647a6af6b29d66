"""Checkpoints: round trip, atomic replace, and one clear error per kind of broken checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny

import seqlab
from seqlab.checkpoint import read_json
from seqlab.errors import InputError


@pytest.mark.parametrize("layers", [("attention", "gru"), ("lstm", "conv")])
def test_round_trip_gives_identical_logits(tmp_path, layers):
    model = tiny(layers=layers)
    seqlab.save(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "manifest.json",
                                                                      "model.safetensors"]
    loaded = seqlab.load(tmp_path / "ckpt").eval()
    tokens = torch.randint(0, 37, (2, 10))
    assert torch.equal(model(tokens)[0], loaded(tokens)[0])
    assert loaded.config == model.config


def test_untied_head_round_trip(tmp_path):
    model = tiny("gru", tie_embeddings=False)
    seqlab.save(model, tmp_path / "c")
    tokens = torch.randint(0, 37, (1, 5))
    assert torch.equal(model(tokens)[0], seqlab.load(tmp_path / "c").eval()(tokens)[0])


def test_save_replaces_an_existing_checkpoint_whole(tmp_path):
    a, b = tiny("gru"), tiny("gru", d_model=16)
    seqlab.save(a, tmp_path / "c", json_files={"extra.json": {"x": 1}})
    seqlab.save(b, tmp_path / "c")
    assert not (tmp_path / "c" / "extra.json").exists()
    assert seqlab.load(tmp_path / "c").config.d_model == 16
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folders left behind


def test_a_failing_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    seqlab.save(tiny("gru"), tmp_path / "c")
    import seqlab.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        seqlab.save(tiny("gru", d_model=16), tmp_path / "c")
    assert seqlab.load(tmp_path / "c").config.d_model == 32
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_extra_files_ride_along(tmp_path):
    seqlab.save(tiny("conv"), tmp_path / "c", json_files={"trainer.json": {"step": 7}})
    assert read_json(tmp_path / "c", "trainer.json") == {"step": 7}


@pytest.fixture
def ckpt(tmp_path):
    seqlab.save(tiny("attention"), tmp_path / "c")
    return tmp_path / "c"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        seqlab.load(tmp_path / "nope")


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(InputError, match="has no model.safetensors"):
        seqlab.load(ckpt)


def test_missing_manifest(ckpt):
    (ckpt / "manifest.json").unlink()
    with pytest.raises(InputError, match="no manifest.json"):
        seqlab.load(ckpt)


def test_truncated_weights(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors is truncated or modified"):
        seqlab.load(ckpt)


def test_tampered_weights(ckpt):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="truncated or modified"):
        seqlab.load(ckpt)


def _rewrite_config(ckpt, **changes):
    """Change config.json and re-sign the manifest, as a user editing a config by hand would not."""
    from seqlab.checkpoint import _sha256

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"]["config.json"] = _sha256(ckpt / "config.json")
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_config_that_does_not_match_the_weights(ckpt):
    _rewrite_config(ckpt, d_model=64)
    with pytest.raises(InputError, match=r"tensor 'blocks.0.mixer.wk.weight' has shape \(32, 32\) but "
                                         r"config.json implies \(64, 64\)"):
        seqlab.load(ckpt)


def test_config_with_a_different_layer_count(ckpt):
    _rewrite_config(ckpt, n_layers=3)
    with pytest.raises(InputError, match="tensor 'blocks.2.*' is missing"):
        seqlab.load(ckpt)


def test_config_with_a_bad_value(ckpt):
    _rewrite_config(ckpt, mixer="rnn")
    with pytest.raises(InputError, match="config.json: config field 'mixer' = 'rnn'"):
        seqlab.load(ckpt)


def test_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        seqlab.load(tmp_path / "file")
