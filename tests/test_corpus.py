"""The byte-level corpus: deterministic split by file, the cache (built once, rebuilt when missing, corrupt or
stale), random windows, consecutive segments for truncated BPTT, and bad input."""

import json
import re

import numpy as np
import pytest
import torch

from seqlab.data import CorpusTask, load_corpus, make_task, task_metrics
from seqlab.data.corpus import END_OF_FILE, SPLITS, split_of
from seqlab.errors import InputError


@pytest.fixture
def root(tmp_path):
    """A small fake source tree: 60 modules in two packages, plus folders the corpus must skip."""
    src = tmp_path / "lib"
    for i in range(60):
        folder = src / ("pkg_a" if i % 2 else "pkg_b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod_{i:02d}.py").write_text(f"import os\nx = {i}\n" + "# padding line\n" * (i % 7))
    for skipped in ("site-packages/thirdparty", "test", "pkg_a/tests", "__pycache__"):
        (src / skipped).mkdir(parents=True, exist_ok=True)
        (src / skipped / "skip_me.py").write_text("SKIPPED = True\n")
    (src / "notes.txt").write_text("not python\n")
    return src


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def all_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("mod_*.py"))


def test_split_is_by_file_deterministic_and_disjoint(root, tmp_path):
    a = load_corpus(root, tmp_path / "cache_a")
    b = load_corpus(root, tmp_path / "cache_b")
    files = {name: a.files(name) for name in SPLITS}
    assert files == {name: b.files(name) for name in SPLITS}
    for name in SPLITS:
        assert files[name], f"split {name} is empty"
        assert np.array_equal(a.split(name), b.split(name))
        assert all(split_of(f) == name for f in files[name])
    flat = [f for name in SPLITS for f in files[name]]
    assert len(flat) == len(set(flat))  # no file in two splits
    assert sorted(flat) == all_files(root)  # every module, nothing from the skipped folders
    assert not any("skip_me" in f for f in flat)


def test_split_contents_are_the_files_in_order(root, tmp_path):
    corpus = load_corpus(root, tmp_path / "cache")
    for name in SPLITS:
        expected = b"".join((root / f).read_bytes() + END_OF_FILE for f in corpus.files(name))
        assert corpus.split(name).tobytes() == expected
        assert corpus.num_bytes(name) == len(expected)


def test_real_stdlib_corpus(tmp_path):
    corpus = load_corpus(cache_dir=tmp_path / "cache")
    sizes = {name: corpus.num_bytes(name) for name in SPLITS}
    assert sizes["train"] > 1_000_000 and sizes["validation"] > 50_000 and sizes["test"] > 50_000
    flat = [f for name in SPLITS for f in corpus.files(name)]
    assert len(flat) == len(set(flat))
    assert not any(part in ("site-packages", "test", "tests") for f in flat for part in f.split("/"))
    assert "os.py" in flat and all(split_of(f) == name for name in SPLITS for f in corpus.files(name))


def test_cache_is_reused_when_intact(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_corpus(root, cache)
    import seqlab.data.corpus as corpus_module

    def fail(*args):
        raise AssertionError("an intact cache was rebuilt")

    monkeypatch.setattr(corpus_module, "_build", fail)
    load_corpus(root, cache)


@pytest.mark.parametrize(
    "damage", ["delete_split", "flip_byte", "truncate", "garbage_manifest", "no_manifest"]
)
def test_cache_is_rebuilt_when_missing_or_corrupt(root, tmp_path, damage):
    cache = tmp_path / "cache"
    first = load_corpus(root, cache)
    good = first.split("train").tobytes()
    folder = first.directory
    if damage == "delete_split":
        (folder / "test.bin").unlink()
    elif damage == "flip_byte":
        data = bytearray((folder / "train.bin").read_bytes())
        data[10] ^= 0xFF  # same size, different content: only the checksum notices
        (folder / "train.bin").write_bytes(bytes(data))
    elif damage == "truncate":
        (folder / "validation.bin").write_bytes((folder / "validation.bin").read_bytes()[:-5])
    elif damage == "garbage_manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        (folder / "manifest.json").unlink()
    again = load_corpus(root, cache)
    assert again.split("train").tobytes() == good
    for name in SPLITS:
        assert again.num_bytes(name) == first.num_bytes(name)
    assert json.loads((folder / "manifest.json").read_text())["splits"] == first.manifest["splits"]


def test_cache_is_rebuilt_when_the_source_changes(root, tmp_path):
    cache = tmp_path / "cache"
    before = load_corpus(root, cache)
    (root / "pkg_a" / "new_module.py").write_text("print('new')\n")
    after = load_corpus(root, cache)
    assert "pkg_a/new_module.py" in after.files(split_of("pkg_a/new_module.py"))
    assert sum(after.num_bytes(s) for s in SPLITS) == sum(before.num_bytes(s) for s in SPLITS) + 14


def test_max_bytes_caps_the_corpus(tmp_path):
    corpus = load_corpus(cache_dir=tmp_path / "cache", max_bytes=300_000)
    assert sum(corpus.num_bytes(s) for s in SPLITS) == 300_000


def test_random_windows(root, tmp_path):
    task = make_task("corpus", seq_len=16, root=root, cache_dir=tmp_path / "cache")
    assert isinstance(task, CorpusTask) and task.vocab_size == 256
    batch = task.batch(8, gen(1))
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (8, 16)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64 and batch.mask.all() and batch.byte_level
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # next-byte targets
    assert torch.equal(task.batch(8, gen(1)).inputs, batch.inputs)
    assert not torch.equal(task.batch(8, gen(2)).inputs, batch.inputs)
    text = task.data.tobytes()
    for row in batch.inputs:
        assert bytes(row.tolist()) in text
    assert "bits_per_byte" in task_metrics(torch.zeros(8, 16, 256), batch)


def test_stream_segments_are_consecutive(root, tmp_path):
    task = make_task("corpus", seq_len=8, split="train", root=root, cache_dir=tmp_path / "cache")
    stream = task.stream(batch_size=3, seq_len=5)
    assert len(stream) == stream.num_segments == ((len(task.data) - 1) // 3) // 5
    segments = list(stream)
    inputs = torch.cat([s.inputs for s in segments], dim=1)  # (3, num_segments * 5)
    targets = torch.cat([s.targets for s in segments], dim=1)
    data = torch.from_numpy(np.asarray(task.data, dtype=np.int64))
    n = stream.row_length
    for b in range(3):
        assert torch.equal(inputs[b], data[b * n : b * n + inputs.shape[1]])
        assert torch.equal(targets[b], data[b * n + 1 : b * n + 1 + inputs.shape[1]])
    assert torch.equal(stream.segment(2).inputs, segments[2].inputs)
    with pytest.raises(IndexError):
        stream.segment(len(stream))


def test_worked_example_by_value(tmp_path):
    """The docstring example: `import os\\n` + end-of-file byte, a window of 4 at offset 0."""
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(40):
        (root / f"m{i:02d}.py").write_text("import os\n")
    task = make_task("corpus", seq_len=4, root=root, cache_dir=tmp_path / "cache")
    assert task.data[:11].tobytes() == b"import os\n\x00"
    first = task.stream(batch_size=1).segment(0)
    assert first.inputs.tolist() == [[105, 109, 112, 111]]
    assert first.targets.tolist() == [[109, 112, 111, 114]]
    assert first.mask.tolist() == [[True] * 4]


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(split="dev"), "split = 'dev'; expected one of train, validation, test"),
        (dict(seq_len=0), "seq_len = 0 must be an integer >= 1"),
        (dict(seq_len=10**9), "fewer than seq_len + 1"),
        (dict(max_bytes=10), "has no file in split(s)"),
        (dict(max_bytes=-1), "max_bytes = -1 must be a positive integer"),
    ],
)
def test_bad_parameters(root, tmp_path, params, message):
    with pytest.raises(InputError, match=re.escape(message)):
        make_task("corpus", root=root, cache_dir=tmp_path / "cache", **params)


def test_bad_root_and_stream_sizes(root, tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        load_corpus(tmp_path / "missing", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"holds no \*.py files"):
        load_corpus(tmp_path / "empty", tmp_path / "cache")
    task = make_task("corpus", seq_len=8, root=root, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="too few"):
        task.stream(batch_size=10_000)
