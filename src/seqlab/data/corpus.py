"""A real-text corpus every machine has: the Python standard library's source, as bytes (vocabulary 256).

How it is built (deterministic: the same Python installation gives the same bytes):
    1. Walk `sysconfig.get_paths()["stdlib"]` in sorted order and keep every `*.py` file, skipping the
       folders in `SKIP_DIRS` (third-party packages, the test suites, caches).
    2. Assign each file to train / validation / test by a hash of its relative path (90% / 5% / 5%), so a
       file never changes split when others are added or removed, and no file is in two splits.
    3. Concatenate each split's files in sorted order, each followed by one NUL byte (0x00, which Python
       source never contains) that marks the end of a file.
    4. Store each split as `<split>.bin` (raw uint8) beside `manifest.json` (sizes, SHA-256 checksums, the
       file lists and a fingerprint of the source listing) in a cache folder, and memory-map it from then on.
       A cache that is missing, corrupt (size or checksum) or stale (the source listing changed) is rebuilt;
       every file is written under a temporary name and renamed, the manifest last, so a crash never leaves
       a cache that passes the checks.

Reading it: `CorpusTask.batch` samples random windows (for training without state); `CorpusTask.stream` cuts a
split into consecutive segments for stateful training with truncated backpropagation through time. Report
bits per byte: the mean cross-entropy in nats divided by ln 2 (an order-0 byte model of this text is ~4.5-5).

A model with a BPE tokenizer reads the same text as tokens: `task.with_tokenizer(tokenizer)` encodes the split
(each file, then the end-of-file byte) and carries, for every token, the UTF-8 bytes it stands for, so bits per
byte is total nats / total bytes / ln 2 of the same text whatever the tokenizer (`seqlab.data.batch.Metrics`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from copy import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from seqlab.data.batch import Batch
from seqlab.data.tokenizer import Tokenizer
from seqlab.errors import InputError

SPLITS = ("train", "validation", "test")
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
FORMAT = 1  # bump when the layout of the cache changes
END_OF_FILE = b"\x00"


def default_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "seqlab" / "corpus"


def source_files(root: Path) -> list[tuple[str, int]]:
    """(relative POSIX path, size) of every `*.py` file under `root`, sorted, skipping `SKIP_DIRS`."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                found.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return sorted(found)


def split_of(relative_path: str) -> str:
    """The split of a file: the first 8 bytes of SHA-256 of its relative path, as a fraction of 2**64."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if u < 0.90 else "validation" if u < 0.95 else "test"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Corpus:
    """A built, verified corpus cache. `split(name)` is a read-only memory-mapped uint8 array."""

    root: Path
    directory: Path
    manifest: dict

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise InputError(f"unknown corpus split {name!r}; expected one of {', '.join(SPLITS)}")
        return np.memmap(self.directory / f"{name}.bin", dtype=np.uint8, mode="r")

    def files(self, name: str) -> list[str]:
        return list(self.manifest["splits"][name]["files"])

    def num_bytes(self, name: str) -> int:
        return int(self.manifest["splits"][name]["bytes"])


def _cache_folder(root: Path, cache_dir: Path, max_bytes: int | None) -> Path:
    key = json.dumps({"root": str(root), "max_bytes": max_bytes, "format": FORMAT}, sort_keys=True)
    return cache_dir / hashlib.sha256(key.encode()).hexdigest()[:16]


def _listing_fingerprint(listing: list[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _verified_manifest(folder: Path, fingerprint: str) -> dict | None:
    """The folder's manifest if the cache is complete, intact and from the current listing; else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != FORMAT or manifest.get("listing") != fingerprint:
            return None
        for name in SPLITS:
            entry = manifest["splits"][name]
            path = folder / f"{name}.bin"
            if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _split_caps(max_bytes: int | None) -> dict[str, int]:
    """Bytes each split may hold: `max_bytes` shared 90 / 5 / 5 (the split fractions), or unlimited."""
    if max_bytes is None:
        return {name: sys.maxsize for name in SPLITS}
    train, validation = int(0.90 * max_bytes), int(0.05 * max_bytes)
    return {"train": train, "validation": validation, "test": max_bytes - train - validation}


def _build(root: Path, folder: Path, listing: list[tuple[str, int]], max_bytes: int | None) -> dict:
    parts: dict[str, list[bytes]] = {name: [] for name in SPLITS}
    files: dict[str, list[str]] = {name: [] for name in SPLITS}
    room = _split_caps(max_bytes)
    for rel, _ in listing:
        name = split_of(rel)
        if room[name] <= 0:
            continue
        data = ((root / rel).read_bytes() + END_OF_FILE)[: room[name]]  # the last file may be cut short
        room[name] -= len(data)
        parts[name].append(data)
        files[name].append(rel)
    empty = [name for name in SPLITS if not files[name]]
    if empty:
        raise InputError(
            f"corpus under '{root}' (max_bytes = {max_bytes}) has no file in split(s) {', '.join(empty)}; "
            "use a larger max_bytes or a folder with more *.py files"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)  # the cache is invalid until the new manifest lands
    splits = {}
    for name in SPLITS:
        blob = b"".join(parts[name])
        _write_atomic(folder / f"{name}.bin", blob)
        splits[name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "files": files[name]}
    manifest = {
        "format": FORMAT,
        "root": str(root),
        "max_bytes": max_bytes,
        "listing": _listing_fingerprint(listing),
        "splits": splits,
    }
    _write_atomic(folder / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def load_corpus(
    root: str | Path | None = None, cache_dir: str | Path | None = None, max_bytes: int | None = None
) -> Corpus:
    """Open the corpus cache for `root` (default: the standard library), building or rebuilding it when
    needed.

    `cache_dir` defaults to ~/.cache/seqlab/corpus; `max_bytes` caps the total size,
    shared 90 / 5 / 5 among the splits (for quick tests and benchmarks).
    """
    root = Path(root).resolve() if root is not None else default_root()
    if not root.is_dir():
        raise InputError(f"corpus root '{root}' is not a folder")
    bad_cap = not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1
    if max_bytes is not None and bad_cap:
        raise InputError(f"task 'corpus': max_bytes = {max_bytes!r} must be a positive integer or None")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    listing = source_files(root)
    if not listing:
        raise InputError(f"corpus root '{root}' holds no *.py files")
    folder = _cache_folder(root, cache_dir, max_bytes)
    manifest = _verified_manifest(folder, _listing_fingerprint(listing))
    if manifest is None:
        try:
            manifest = _build(root, folder, listing, max_bytes)
        except PermissionError as e:
            raise InputError(f"cannot write the corpus cache in '{cache_dir}': {e.strerror}") from None
    return Corpus(root, folder, manifest)


class CorpusStream:
    """Consecutive segments of one split, for truncated backpropagation through time.

    The split is cut into `batch_size` contiguous streams, one per row (row b reads bytes [b*n, (b+1)*n) with
    n = (N - 1) // batch_size); segment i holds positions [i*T, (i+1)*T) of every stream, targets shifted by
    one. Carry the model state from segment i to segment i + 1 (detached), and reset it at segment 0.
    `segment(i)` is a pure function of i, so a trainer saves its position as one integer. """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, nbytes: np.ndarray | None = None) -> None:
        self.data, self.batch_size, self.seq_len, self.nbytes = data, batch_size, seq_len, nbytes
        self.row_length = (len(data) - 1) // batch_size
        self.num_segments = self.row_length // seq_len
        if self.num_segments < 1:
            raise InputError(
                f"task 'corpus': the split holds {len(data)} tokens, too few for {batch_size} streams of at "
                f"least seq_len = {seq_len} tokens; use a smaller batch size or seq_len"
            )

    def __len__(self) -> int:
        return self.num_segments

    def segment(self, i: int) -> Batch:
        if not 0 <= i < self.num_segments:
            raise IndexError(f"segment {i} out of range [0, {self.num_segments})")
        starts = np.arange(self.batch_size) * self.row_length + i * self.seq_len
        return _windows(self.data, starts, self.seq_len, self.nbytes)

    def __iter__(self) -> Iterator[Batch]:
        return (self.segment(i) for i in range(self.num_segments))


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int, nbytes: np.ndarray | None = None) -> Batch:
    """Windows of seq_len + 1 tokens; nbytes (per token of `data`, BPE text only): the bytes of each target."""
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T + 1)
    window = torch.from_numpy(data[idx].astype(np.int64))
    inputs, targets = window[:, :-1], window[:, 1:]
    mask = torch.ones_like(inputs, dtype=torch.bool)
    if nbytes is None:
        return Batch(inputs, targets.contiguous(), mask, byte_level=True)
    return Batch(inputs, targets.contiguous(), mask, nbytes=torch.from_numpy(nbytes[idx[:, 1:]].astype(np.int64)))


class CorpusTask:
    """Byte-level language modelling on one split of the standard-library corpus (see the module docstring).

    Worked example: the file text `import os\\n` followed by the end-of-file byte is the byte sequence
    105 109 112 111 114 116 32 111 115 10 0; a window of T = 4 starting at 0 gives

        inputs     105 109 112 111        ("impo")
        targets    109 112 111 114        ("mpor")
        mask         1   1   1   1        (every byte counts)
    """

    name: ClassVar[str] = "corpus"
    vocab_size: int = 256  # bytes; a tokenized task (with_tokenizer) has its tokenizer's
    nbytes: np.ndarray | None = None  # tokenized task: UTF-8 bytes of each token of `data`
    tokenizer: Tokenizer | None = None  # tokenized task: the BPE tokenizer `data` was encoded with

    def __init__(
        self,
        seq_len: int = 256,
        split: str = "train",
        root: str | Path | None = None,
        cache_dir: str | Path | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise InputError(f"task 'corpus': parameter seq_len = {seq_len!r} must be an integer >= 1")
        if split not in SPLITS:
            raise InputError(f"task 'corpus': split = {split!r}; expected one of {', '.join(SPLITS)}")
        self.seq_len, self.split = seq_len, split
        self.corpus = load_corpus(root, cache_dir, max_bytes)
        self.data = self.corpus.split(split)
        if len(self.data) < seq_len + 1:
            raise InputError(
                f"task 'corpus': split {split!r} holds {len(self.data)} bytes, fewer than seq_len + 1 = "
                f"{seq_len + 1}"
            )

    def __repr__(self) -> str:
        return f"CorpusTask(seq_len={self.seq_len}, split={self.split!r}, bytes={len(self.data)})"

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Random windows of seq_len + 1 bytes, uniform over the split."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"task 'corpus': batch_size = {batch_size!r} must be an integer >= 1")
        starts = torch.randint(0, len(self.data) - self.seq_len, (batch_size,), generator=generator)
        return _windows(self.data, starts.numpy(), self.seq_len, self.nbytes)

    def stream(self, batch_size: int, seq_len: int | None = None) -> CorpusStream:
        """Consecutive segments of this split for truncated BPTT (segment length: the task's seq_len)."""
        return CorpusStream(self.data, batch_size, seq_len or self.seq_len, self.nbytes)

    def with_tokenizer(self, tokenizer: Tokenizer) -> CorpusTask:
        """This split read through `tokenizer`: itself for bytes; for BPE, a copy whose data are token ids (each
        file encoded alone, then the end-of-file byte) with the UTF-8 bytes of every token beside them. A file that
        is not valid UTF-8 is read with U+FFFD for its bad bytes."""
        if tokenizer.kind == "bytes" or self.tokenizer is tokenizer:
            return self
        if self.tokenizer is not None:
            raise InputError("task 'corpus' is already tokenized with another tokenizer; start from the byte task")
        files = bytes(self.data).split(END_OF_FILE)  # the last piece: b"", or a file cut short by max_bytes
        end = tokenizer.encode(END_OF_FILE.decode())
        ids: list[int] = []
        for k, piece in enumerate(tokenizer.encode_batch([f.decode("utf-8", errors="replace") for f in files])):
            ids += piece + (end if k < len(files) - 1 else [])
        task = copy(self)
        task.tokenizer = tokenizer
        task.data = np.asarray(ids, dtype=np.int64)
        task.nbytes = np.asarray([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)],
                                 dtype=np.int64)[task.data]
        task.vocab_size = tokenizer.vocab_size
        if len(task.data) < self.seq_len + 1:
            raise InputError(f"task 'corpus': split {self.split!r} holds {len(task.data)} tokens, fewer than "
                             f"seq_len + 1 = {self.seq_len + 1}")
        return task
