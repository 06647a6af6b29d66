"""The `seqlab` command line. Each subcommand lives in `seqlab.commands.<name>` and calls a plain function.

Bad input (an `InputError`, a missing file) prints one line, `seqlab: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from seqlab import __version__
from seqlab.errors import InputError

# One module per subcommand, each with `register(subparsers)`; the order is the order of `seqlab --help`.
COMMANDS = ("lab", "report", "train", "eval", "generate", "profile", "think", "latents", "distill", "convert",
            "import-hf", "import-gguf", "export-onnx", "quantize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqlab",
        description="Train, stream and measure sequence models side by side: recurrent networks, Transformers, "
                    "hybrids and recurrent-depth reasoners.",
        epilog="Run 'seqlab COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"seqlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"seqlab.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (InputError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"seqlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
