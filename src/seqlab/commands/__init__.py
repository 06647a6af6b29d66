"""One module per `seqlab` subcommand; each defines `register(subparsers)`."""

from __future__ import annotations

import json
import sys
from typing import Any

from seqlab.errors import InputError


def emit(result: Any, as_json: bool, text: str) -> None:
    """Print a command's result: as JSON with --json, else as the human-readable `text`."""
    print(json.dumps(result, indent=2) if as_json else text)
    sys.stdout.flush()


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`section.key=value` strings -> nested dict; values parse as JSON when they can (numbers, lists, true)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-3")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def deep_update(base: dict, changes: dict) -> dict:
    """A copy of `base` with nested `changes` applied."""
    out = dict(base)
    for k, v in changes.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
