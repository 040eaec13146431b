"""`glmstack pull`, `glmstack models` and `glmstack rm`: the models folder ($GLMSTACK_HOME/models).

    glmstack pull OWNER/NAME[@REVISION] [--source huggingface|modelscope] [--quant Q4_K_M] [--name NAME]
    glmstack models                      name, architecture, quantization, format, size and path of each model
    glmstack rm NAME                     delete a pulled model (and any partial download of it)

A pulled model is found by name afterwards: `glmstack chat --model NAME`, `glmstack serve --model NAME`. Its
default name is the repo's last path part, lowercased; a GGUF's also drops a trailing "-GGUF" and gains the
quantization: THUDM/glm-4-9b-chat-GGUF with --quant Q4_K_M is glm-4-9b-chat-q4_k_m. Hugging Face reads
HF_TOKEN (gated and private repos) and HF_ENDPOINT (a mirror); ModelScope reads MODELSCOPE_API_TOKEN and
MODELSCOPE_ENDPOINT. The download logic is glmstack/engine/loading/download.py; imports stay inside the
commands so that building the parser loads nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from glmstack.cli.keys import print_table
from glmstack.settings import Settings

COMMANDS = ("pull", "models", "rm")
EXIT_INTERRUPTED = 130


def add_subcommands(subparsers: Any) -> None:
    """Adds `pull`, `models` and `rm` to the `glmstack` parser's subparsers."""
    pull = subparsers.add_parser("pull", help="download a model from Hugging Face or ModelScope by repo name")
    pull.add_argument("repo", metavar="OWNER/NAME[@REVISION]",
                      help="the repository, e.g. THUDM/glm-4-9b-chat-hf (revision: a branch, tag or commit)")
    pull.add_argument("--source", default="huggingface", choices=("huggingface", "modelscope"),
                      help="the hub (default huggingface; HF_ENDPOINT selects a mirror)")
    pull.add_argument("--quant", default=None, metavar="QUANT",
                      help="for a GGUF repo, which file: its quantization as in the file name, e.g. Q4_K_M")
    pull.add_argument("--name", default=None,
                      help="the name to load it by (default: the repo's name, lowercased, plus -QUANT for a GGUF)")

    subparsers.add_parser("models", help="list the models glmstack can find")

    rm = subparsers.add_parser("rm", help="delete a pulled model from the models folder")
    rm.add_argument("name", help="a name from `glmstack models`")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "pull":
        return _pull(args, settings)
    if args.command == "rm":
        from glmstack.engine.loading.download import remove_model

        for path in remove_model(args.name, settings.models_dir):
            print(f"removed {path}", file=sys.stderr)
        return 0
    return _models(settings)


def _pull(args: argparse.Namespace, settings: Settings) -> int:
    from glmstack.engine.loading.download import pull

    try:
        result = pull(args.repo, settings.models_dir, source=args.source, quant=args.quant, name=args.name)
    except KeyboardInterrupt:
        print("\nglmstack: pull interrupted; run the same command again to resume it", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"pulled {result.repo}@{result.commit[:12]} ({result.size_bytes / 1e6:,.1f} MB) as {result.name}; "
          f"chat with it: glmstack chat --model {result.name}", file=sys.stderr)
    print(result.path)  # alone on stdout, like `glmstack convert`
    return 0


def _models(settings: Settings) -> int:
    from glmstack.engine.loading.catalog import list_models

    entries = list_models(settings)
    if not entries:
        print(f"no models found (bundled model not installed; {settings.models_dir} is empty); "
              "download one with `glmstack pull OWNER/NAME`", file=sys.stderr)
        return 1
    print_table(
        ["NAME", "ARCHITECTURE", "QUANTIZATION", "FORMAT", "SIZE", "PATH"],
        [[e.name, e.architecture or "?", e.quantization or "-", e.format, f"{e.size_bytes / 1e6:,.1f} MB",
          str(e.path)] for e in entries],
        numeric={4},
    )
    return 0

