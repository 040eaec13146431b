"""`glmstack quantize MODEL --bits 4|8 -o DIR`: write a checkpoint in the kernels' int4/int8 forms.

The weights are quantized as they are read (`load_model(quantize=...)`), so a 9B bf16 checkpoint quantizes in
about the memory of its int4 result; the folder written records its quantization in config.json
(engine/loading/quantized_checkpoint.py) and loads straight into place.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from glmstack.settings import Settings

COMMANDS = {"quantize"}


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quantize", help="write an int4 or int8 copy of a checkpoint")
    parser.add_argument("model", help="model path or name (a safetensors or .bin checkpoint folder)")
    parser.add_argument("--bits", type=int, choices=(4, 8), required=True, help="4 (int4) or 8 (int8)")
    parser.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128, 256),
                        help="int4 inputs per scale (default 32; larger is smaller and less exact)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="new folder to write (never overwritten)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from glmstack.engine import native
    from glmstack.engine.loading.catalog import resolve_model_path
    from glmstack.engine.loading.checkpoint import load_model, open_checkpoint
    from glmstack.engine.loading.quantized_checkpoint import save_quantized, saved_quantization
    from glmstack.engine.quant.int4 import DEFAULT_GROUP_SIZE

    native.configure(native.NativeOptions(settings.native, settings.native_dir, settings.vnni))
    source = resolve_model_path(args.model, settings)
    output = args.output.expanduser()
    if output.exists():
        raise ValueError(f"{output} already exists; choose a new folder")
    ckpt = open_checkpoint(source)
    if ckpt.format == "gguf":
        raise ValueError(f"{source} is a GGUF file: it is already quantized, and glmstack runs it as it is")
    if saved_quantization(ckpt.config) is not None:
        raise ValueError(f"{source} is already a quantized glmstack checkpoint")
    if args.bits == 4 and not native.available():
        raise ValueError(f"int4 checkpoints are written in the native kernels' layout, not available here "
                         f"({native.unavailable_reason()}); --bits 8 works everywhere")
    group_size = args.group_size or DEFAULT_GROUP_SIZE
    started = time.perf_counter()
    loaded = load_model(ckpt, device="cpu", dtype="bfloat16", progress=sys.stderr.isatty(), quantize=args.bits,
                        group_size=group_size)
    written = save_quantized(loaded, args.bits, group_size, output)
    print(f"wrote {output} (int{args.bits}, {written / 1e9:.2f} GB of weights) in "
          f"{time.perf_counter() - started:.1f} s")
    return 0
