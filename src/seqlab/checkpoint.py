"""Checkpoints are folders: `config.json` (the model config) + `model.safetensors` + `manifest.json`.

No pickle anywhere: loading a checkpoint reads JSON and raw tensors, never runs code from it. `manifest.json`
records the format version and a SHA-256 of every file, so a truncated or tampered file is caught before use.
Writes are atomic: everything goes to a temporary folder beside the target, which is then renamed into place, so a
crash never leaves a half-written checkpoint (at worst, a stray temporary folder next to the old, intact one).

Extra files (a trainer's optimizer state, metrics) ride along in the same atomic write through `tensors=` and
`json_files=`; `read_tensors` / `read_json` read them back with the same checks. A model carrying a BPE tokenizer
(`model.tokenizer`, see `seqlab.data.tokenizer`) saves it as `tokenizer.json` + `tokenizer_config.json`, and `load`
attaches it again; a checkpoint without them reads and writes bytes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seqlab.config import ModelConfig
from seqlab.data.tokenizer import CONFIG_FILE, TOKENIZER_FILE, BPETokenizer
from seqlab.errors import InputError
from seqlab.models import build_model
from seqlab.models.int8 import apply_layout, check_dtypes

_LIBC = ctypes.CDLL(None, use_errno=True)  # the C library this process runs on, for renameat2 where it has it
FORMAT = "seqlab-checkpoint"
VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap folders `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system or
    the file system cannot, and nothing was changed."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically: a reader sees the old file or the new one, never half of
    one (run records that a resumed run reads back: the lab's results, a conversion's recipe and metrics)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def atomic_write_dir(path: str | Path, write: Any) -> Path:
    """Call `write(tmp_dir)` to fill a fresh temporary folder, then move it to `path` in one rename.

    An existing folder at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder '{path.parent}': {e.strerror}") from None
    if path.exists() and not path.is_dir():
        raise InputError(f"'{path}' exists and is not a folder; expected a checkpoint folder path")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"output folder '{path.parent}' is not writable")
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists() and _exchange(tmp, path):
            pass  # one atomic swap: `path` was never missing; tmp now holds the old folder, removed below
        elif path.exists():  # no atomic exchange here: an instant without `path` (readers find the .old folder)
            old = path.parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def save(model: torch.nn.Module, path: str | Path, *, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
         json_files: dict[str, Any] | None = None) -> Path:
    """Save `model` (its config and weights) to the folder `path`, atomically.

    tensors: extra safetensors files, {"optimizer.safetensors": {name: tensor}}; json_files: {"trainer.json": obj}.
    """
    cfg: ModelConfig = model.config  # type: ignore[assignment]

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": FORMAT})
        for name, group in (tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, tmp / name)
        for name, obj in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        tokenizer = getattr(model, "tokenizer", None)
        if isinstance(tokenizer, BPETokenizer):
            for name, text in tokenizer.files().items():
                (tmp / name).write_text(text, encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"format": FORMAT, "version": VERSION, "sha256": {f: _sha256(tmp / f) for f in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    return atomic_write_dir(path, write)


def _manifest(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"checkpoint '{path}' does not exist")
    if not path.is_dir():
        raise InputError(f"checkpoint '{path}' is not a folder; expected a folder with config.json and "
                         "model.safetensors")
    file = path / "manifest.json"
    if not file.is_file():
        raise InputError(f"checkpoint '{path}' has no manifest.json; expected a folder written by seqlab.save")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("sha256"), dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        ok = False
    if not ok:
        raise InputError(f"checkpoint '{path}': manifest.json is corrupt (expected a UTF-8 JSON object written by "
                         "seqlab.save)")
    version = manifest.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"checkpoint '{path}': manifest.json has format version {version!r}; expected an integer")
    if version > VERSION:
        raise InputError(f"checkpoint '{path}' has format version {manifest['version']}; this seqlab reads "
                         f"version {VERSION} and older")
    return manifest


def _verified(path: Path, name: str) -> Path:
    """The path of file `name` in checkpoint `path`, after checking it exists and matches its recorded hash."""
    manifest = _manifest(path)
    file = path / name
    if not file.is_file():
        raise InputError(f"checkpoint '{path}' has no {name}")
    expected = manifest["sha256"].get(name)
    if expected is None:
        raise InputError(f"checkpoint '{path}': {name} is not listed in manifest.json")
    if _sha256(file) != expected:
        raise InputError(f"checkpoint '{path}': {name} is truncated or modified (its SHA-256 does not match "
                         "manifest.json)")
    return file


def read_tensors(path: str | Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    file = _verified(Path(path), name)
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise InputError(f"checkpoint '{path}': {name} cannot be read as safetensors: {e}") from None


def read_json(path: str | Path, name: str) -> Any:
    file = _verified(Path(path), name)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"checkpoint '{path}': {name} is not UTF-8 text (byte {e.start}); expected JSON") from None
    except json.JSONDecodeError as e:
        raise InputError(f"checkpoint '{path}': {name} is not valid JSON: {e}") from None


def load_config(path: str | Path) -> ModelConfig:
    data = read_json(path, "config.json")
    try:
        return ModelConfig.from_dict(data)
    except InputError as e:
        raise InputError(f"checkpoint '{path}': config.json: {e}") from None


def _check_weights(path: Path, expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """The checkpoint's tensors are exactly the model's, with the same shapes."""
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise InputError(f"checkpoint '{path}': tensor '{missing[0]}' is missing from model.safetensors "
                         f"({len(missing)} missing in all)")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise InputError(f"checkpoint '{path}': tensor '{unexpected[0]}' in model.safetensors is not part of the "
                         "model its config.json describes")
    for name, t in weights.items():
        if t.shape != expected[name].shape:
            raise InputError(f"checkpoint '{path}': tensor '{name}' has shape {tuple(t.shape)} but config.json "
                             f"implies {tuple(expected[name].shape)}")


def load(path: str | Path, *, map_location: str | torch.device = "cpu", allow_large: bool = False):
    """Load a model saved with `save`. Every problem (missing file, corrupt data, shapes that do not match the
    config, a model too large for the memory available) raises one InputError that names the file or tensor.
    The weights' shapes are compared with a meta-device model first, so a config.json that claims a huge model
    is caught before anything is allocated; allow_large: skip the memory check (`seqlab.models.size`)."""
    path = Path(path)
    cfg = load_config(path)
    weights = read_tensors(path)
    quantized = "quantization.json" in _manifest(path)["sha256"]  # written by seqlab quantize
    if not quantized:  # a quantized layout changes the tensors: compared after apply_layout below
        with torch.device("meta"):
            _check_weights(path, build_model(cfg).state_dict(), weights)
    model = build_model(cfg, allow_large=allow_large)
    if quantized:
        model = apply_layout(model, read_json(path, "quantization.json"), f"checkpoint '{path}'")
        _check_weights(path, model.state_dict(), weights)
        check_dtypes(model, weights, f"checkpoint '{path}'")
    model.load_state_dict(weights)
    model.tokenizer = load_tokenizer(path)
    return model.to(map_location)


def load_tokenizer(path: str | Path) -> BPETokenizer | None:
    """The BPE tokenizer stored in checkpoint `path`, or None when it has none (the model reads bytes)."""
    path = Path(path)
    if TOKENIZER_FILE not in _manifest(path)["sha256"]:
        return None
    text = _verified(path, TOKENIZER_FILE).read_text(encoding="utf-8")
    return BPETokenizer.from_files(text, read_json(path, CONFIG_FILE), f"checkpoint '{path}'")
