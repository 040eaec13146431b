"""The `glmstack` command.

    glmstack chat [--model M] [-p "question"]   interactive chat, or one answer and exit
    glmstack pull OWNER/NAME[@REV] [--quant Q]  download a model by name (see glmstack/cli/models.py)
    glmstack models                             what models can be found: architecture, quantization, size
    glmstack rm NAME                            delete a pulled model
    glmstack inspect MODEL                      architecture, size, context, memory per precision
    glmstack convert SRC DST                    rewrite a pickle (.bin) checkpoint as safetensors
    glmstack quantize MODEL --bits 4|8 -o DIR   write an int4/int8 checkpoint (see glmstack/cli/quantize.py)
    glmstack finetune --model M --train F -o DIR   train a LoRA / P-Tuning v2 adapter (glmstack/cli/finetune.py)
    glmstack merge BASE ADAPTER -o OUT             fold a LoRA into a new safetensors checkpoint (cli/merge.py)
    glmstack keys create|list|revoke            API keys (see glmstack/cli/keys.py)
    glmstack conversations list|show|export|rename|delete   saved conversations (glmstack/cli/conversations.py)
    glmstack usage [--key ID]                   requests and tokens per key and model
    glmstack serve [--host H] [--port P]        the HTTP API (see glmstack/cli/serve.py)

Errors on bad input print one line (`glmstack: error: ...`) and exit with status 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from glmstack.cli import conversations as conversations_cli
from glmstack.cli import finetune as finetune_cli
from glmstack.cli import keys as store_cli
from glmstack.cli import merge as merge_cli
from glmstack.cli import models as models_cli
from glmstack.cli import quantize as quantize_cli
from glmstack.cli import serve
from glmstack.settings import DEVICE_CHOICES, DTYPE_CHOICES, QUANTIZE_CHOICES, QUANTIZE_HELP

EXIT_USAGE = 2
# `glmstack chat` sampling for models that recommend none
CHAT_TEMPERATURE = 0.7
CHAT_TOP_P = 0.9


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="path or name of a model (default: $GLMSTACK_MODEL, then the bundled SmolLM2)")
    parser.add_argument("--device", default=None, choices=DEVICE_CHOICES, help="(default: $GLMSTACK_DEVICE, then auto)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="(default: $GLMSTACK_DTYPE, then auto)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                        help=QUANTIZE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmstack", description="The GLM open platform on your own machine.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    _add_model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    chat.add_argument("--temperature", type=float, default=None,
                      help="0 = greedy (default: the model's own recommendation, else 0.7)")
    chat.add_argument("--top-p", type=float, default=None,
                      help="nucleus sampling mass (default: the model's own recommendation, else 0.9)")
    chat.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    chat.add_argument("--adapter", default=None, help="a LoRA or P-Tuning v2 adapter folder trained on the model")
    chat.add_argument("-p", "--prompt", default=None,
                      help="answer this one prompt and exit (reads the prompt from stdin when piped)")
    conversations_cli.add_chat_options(chat)

    inspect = sub.add_parser("inspect", help="architecture, parameters, context and memory of a model")
    inspect.add_argument("model", help="model path or name (a config.json alone is enough)")

    convert = sub.add_parser("convert", help="rewrite a .bin (pickle) checkpoint folder as safetensors")
    convert.add_argument("src", help="checkpoint folder with config.json and pytorch_model*.bin")
    convert.add_argument("dst", help="new folder to write (never overwritten)")
    store_cli.add_subcommands(sub)
    conversations_cli.add_subcommands(sub)
    models_cli.add_subcommands(sub)
    quantize_cli.add_subcommands(sub)
    merge_cli.add_subcommands(sub)
    finetune_cli.add_subcommands(sub)
    serve.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command in store_cli.COMMANDS:
        return store_cli.run(args)
    if args.command in conversations_cli.COMMANDS:
        return conversations_cli.run(args)
    from glmstack.engine.errors import EngineError
    from glmstack.store.errors import StoreError  # glmstack chat --conversation

    try:
        if args.command == "serve":
            return serve.run(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command in models_cli.COMMANDS:
            return models_cli.run(args, serve.settings_from(args))
        if args.command in quantize_cli.COMMANDS:
            return quantize_cli.run(args, serve.settings_from(args))
        if args.command in finetune_cli.COMMANDS:
            return finetune_cli.run(args)
        if args.command in merge_cli.COMMANDS:
            return merge_cli.run(args, serve.settings_from(args))
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "convert":
            from glmstack.engine.loading.convert import convert_checkpoint

            print(convert_checkpoint(args.src, args.dst))
            return 0
    except (EngineError, StoreError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"glmstack: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


# ---- chat ----------------------------------------------------------------------------------------------


def _sampling(args: argparse.Namespace, model: Any) -> Any:
    from glmstack.protocol import SamplingParams

    own = model.generation_defaults
    temperature = next(t for t in (args.temperature, own.temperature, CHAT_TEMPERATURE) if t is not None)
    top_p = next(p for p in (args.top_p, own.top_p, CHAT_TOP_P) if p is not None)
    return SamplingParams(max_tokens=args.max_tokens, do_sample=temperature > 0, temperature=temperature,
                          top_p=top_p, seed=args.seed)


def cmd_chat(args: argparse.Namespace) -> int:
    from glmstack.engine.classic import load

    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ValueError("no prompt: stdin was empty")
    settings = serve.settings_from(args)
    # The conversation is looked up before the model loads, so a bad database fails fast.
    with conversations_cli.chat_log(settings, args.conversation, args.key, args.system) as log:
        model, _ = load(settings.model, device=settings.device, dtype=settings.dtype,
                        progress=sys.stderr.isatty(), quantize=settings.quantize, settings=settings,
                        adapter=args.adapter)
        params = _sampling(args, model)
        system = log.system_prompt if log is not None else args.system
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        history = log.history() if log is not None else []
        if prompt is not None:
            reply, last = "", None
            for event in model.stream_messages(messages + history + [{"role": "user", "content": prompt}], params):
                reply += event.text
                last = event
                sys.stdout.write(event.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if log is not None:
                log.record(prompt, reply, last, model.name)
            return 0
        return _repl(model, messages, params, history=history, log=log)


def _repl(model: Any, system_messages: list[dict[str, Any]], params: Any, *,
          history: list[dict[str, Any]] | None = None, log: conversations_cli.ChatLog | None = None) -> int:
    print(f"glmstack chat · {model.name} · {model.device} {str(model.dtype).removeprefix('torch.')} · "
          f"context {model.context_length}", file=sys.stderr)
    print("Type a message. 'clear' starts over, 'stop' or Ctrl-D quits, Ctrl-C interrupts a reply.",
          file=sys.stderr)
    messages = list(system_messages) + list(history or [])
    while True:
        try:
            query = input("\n>>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        command = query.strip()
        if not command:
            continue
        if command == "stop":
            return 0
        if command == "clear":
            messages = list(system_messages)
            if log is not None:
                log.clear()
            os.system("cls" if os.name == "nt" else "clear") if sys.stdout.isatty() else None
            print("(conversation cleared)", file=sys.stderr)
            continue
        turn = messages + [{"role": "user", "content": query}]
        reply, started, last = "", time.perf_counter(), None
        try:
            for event in model.stream_messages(turn, params):
                reply += event.text
                last = event
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            # The generator is abandoned here; its KV cache is freed with it. The cut-off turn is not kept.
            print("\n(interrupted)", file=sys.stderr)
            continue
        print()
        messages = turn + [{"role": "assistant", "content": reply}]
        if log is not None:
            log.record(query, reply, last, model.name)
        if last is not None:
            _print_stats(last, time.perf_counter() - started)


def _print_stats(event: Any, elapsed: float) -> None:
    tokens = event.usage.completion_tokens
    ttft = event.time_to_first_token or 0.0
    decode_time = max(elapsed - ttft, 1e-9)
    rate = (tokens - 1) / decode_time if tokens > 1 else 0.0
    print(f"[{tokens} tokens · first token {ttft * 1000:.0f} ms · {rate:.1f} tokens/s · "
          f"finish: {event.finish_reason}]", file=sys.stderr)


# ---- inspect -------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from glmstack.engine.describe import default_load, describe
    from glmstack.engine.loading.catalog import resolve_model_path

    path = resolve_model_path(args.model, serve.settings_from(args))
    info = describe(path)
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                shown = f"{v / 1e9:.2f} GB ({v:,} bytes)" if key.startswith("memory") else v
                print(f"  {k}: {shown}")
        elif key.endswith("parameters") and isinstance(value, int):
            print(f"{key}: {value / 1e9:.2f}B ({value:,})")
        else:
            print(f"{key}: {value}")
    if path.is_dir() and not (path / "config.json").is_file() or path.suffix == ".json":
        return 0  # a config alone: nothing is loaded from it
    precision, weights = default_load(path)
    runtime = _runtime_bytes(path)
    print(f"loads as: {precision} by default ({weights / 1e9:.2f} GB of weights); process memory after loading "
          f"~{(weights + runtime) / 1e9:.2f} GB (with {runtime / 1e6:.0f} MB for Python, torch and the tokenizer, "
          f"as measured here)")
    return 0


def _runtime_bytes(path: Any) -> int:
    """What a process loading `path` holds besides the weights, measured in a fresh one: its resident memory
    once the engine's modules and the model's tokenizer are loaded, before any weight is read."""
    import subprocess

    probe = ("import sys, torch; from glmstack.engine import native; native.kernels(); "
             "torch.ones(64, 64) @ torch.ones(64, 64); "  # the kernels and torch's thread pool, as a load has
             "from glmstack.engine.classic import tokenizer_for; "
             "from glmstack.engine.loading.checkpoint import open_checkpoint; "
             "ckpt = open_checkpoint(sys.argv[1]); tokenizer = tokenizer_for(ckpt); "
             "ckpt.gguf is not None and ckpt.gguf.close(); "
             "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmRSS')][0])")
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120,
                              check=True)
        return int(done.stdout.split()[-1]) * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
