"""Proof that fine-tuning learns (issue 19): held-out exact match before and after training the bundled model on
benchmarks/finetune_task.py's manifests, for LoRA and P-Tuning v2, and training speed against peft + the
transformers Trainer on the same model and data.

    python benchmarks/bench_finetune.py [--method lora --method ptuning] [--max-minutes 10]
                                        [--work bench-data/finetune-run] [--save-plots docs/images]

For each method:
1. exact match on the test split with the base model (greedy, temperature 0, `--max-tokens` 24; computed once,
   the base is the same for both methods). Exact match: the reply with surrounding whitespace stripped equals
   the expected manifest line, character for character;
2. training as `python -m glmstack.finetune` in a subprocess, its peak RSS polled with psutil (the process and
   its children). Its step count is sized to the budget: a probe run of `--probe-steps` steps measures seconds
   per step and the load/save overhead on this machine, and the real run gets as many steps as fit
   `--max-minutes` of wall time (load, training, validation and save included) with a 10% margin.
   `--steps N` skips the probe;
3. exact match again, loading the adapter with `glmstack.load(adapter=DIR)` (the serving engine applies it);
4. the peer: the same method with peft on the transformers model of the same GGUF (`gguf_file=`, dequantized to
   float32 as ours is), trained by `transformers.Trainer` for `--peer-steps` steps in a subprocess, on the very
   token ids and loss masks our trainer used (rendered once here by glmstack's chat format and written to a
   file), with the same batch size, learning rate, LoRA rank/alpha/dropout/targets or prefix length, and thread
   count.

Tokens/s of training, both sides: non-padding tokens processed per second of training steps, over steps 2..N
(step 1 warms up allocators and kernels and is left out of both).

Everything runs on the CPU; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_task  # the sibling script, importable when run as a file

HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    # LoRA on every linear of the decoder: the codebook is facts, which the MLPs hold better than q/v alone
    "lora": {"learning_rate": 2e-3, "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05,
             "target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
    # the prefix starts as the base's own keys/values of the first 512 training tokens, a dozen worked examples
    # placed before every conversation (random N(0, 1), THUDM's start, stayed at 0% exact match after 241
    # steps; 32 data tokens plateaued at 10%: BENCHMARKS.md)
    "ptuning": {"learning_rate": 2e-2, "pre_seq_len": 512, "prefix_init": "data"},
}
BATCH_SIZE = 4
WARMUP_STEPS = 5
SAFETY = 0.9  # of the budget left after load and save, what the steps may use


# ---- measuring a subprocess ---------------------------------------------------------------------------

def run_measured(command: list[str], log: Path) -> tuple[int, float, int]:
    """Run `command` (stdout and stderr to `log`); returns (exit status, wall seconds, peak RSS bytes of the
    process tree, polled every 0.2 s)."""
    peak = 0
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        handle = psutil.Process(process.pid)
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                try:
                    rss = handle.memory_info().rss + sum(c.memory_info().rss for c in handle.children(recursive=True))
                    peak = max(peak, rss)
                except psutil.Error:
                    pass
                done.wait(0.2)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        status = process.wait()
        done.set()
        poller.join()
    return status, time.monotonic() - started, peak


def step_events(path: Path) -> list[dict[str, Any]]:
    last: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event["type"] == "step":
            last[event["step"]] = event  # a resumed run repeats steps: the last record counts
    return [last[step] for step in sorted(last)]


def steady_rate(times: list[float], tokens: list[int]) -> float:
    """Tokens per second over steps 2..N: `times` are the cumulative seconds at the end of each step, `tokens`
    the cumulative tokens."""
    if len(times) < 2:
        return float("nan")
    return (tokens[-1] - tokens[0]) / max(times[-1] - times[0], 1e-9)


# ---- ours ---------------------------------------------------------------------------------------------

def finetune_command(method: str, data: dict[str, Path], output: Path, steps: int, threads: int,
                     validation: bool) -> list[str]:
    settings = HYPERPARAMETERS[method]
    command = [sys.executable, "-m", "glmstack.finetune", "--model", "smollm2", "--method", method,
               "--train", str(data["train"]), "--output", str(output), "--max-steps", str(steps),
               "--batch-size", str(BATCH_SIZE), "--warmup-steps", str(min(WARMUP_STEPS, steps - 1)),
               "--threads", str(threads), "--learning-rate", str(settings["learning_rate"])]
    if validation:
        command += ["--validation", str(data["validation"])]
    if method == "lora":
        command += ["--lora-rank", str(settings["lora_rank"]), "--lora-alpha", str(settings["lora_alpha"]),
                    "--lora-dropout", str(settings["lora_dropout"]), "--target-modules", settings["target_modules"]]
    else:
        command += ["--pre-seq-len", str(settings["pre_seq_len"]), "--prefix-init", settings["prefix_init"]]
    return command


def size_steps(method: str, data: dict[str, Path], work: Path, budget_s: float, probe_steps: int,
               threads: int) -> tuple[int, dict[str, float]]:
    """Steps that fit `budget_s` of wall time, from a probe run of `probe_steps` steps."""
    probe = work / f"{method}-probe"
    shutil.rmtree(probe, ignore_errors=True)
    status, wall, _ = run_measured(finetune_command(method, data, probe, probe_steps, threads, validation=False),
                                   work / f"{method}-probe.log")
    if status != 0:
        raise RuntimeError(f"the probe run failed (exit {status}); see {work / f'{method}-probe.log'}")
    steps = step_events(probe / "events.jsonl")
    per_step = (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / max(len(steps) - 1, 1)
    overhead = wall - steps[-1]["elapsed_s"] + steps[0]["elapsed_s"] - per_step  # load, save, step 1's warm-up
    # the final validation pass: forward only over the validation split, about a third of a training step's work
    validation = sum(1 for _ in data["validation"].open(encoding="utf-8")) / BATCH_SIZE * per_step / 3
    fitted = int((budget_s - overhead - validation) * SAFETY / per_step)
    return max(fitted, 1), {"probe_s_per_step": per_step, "probe_overhead_s": overhead, "probe_wall_s": wall}


# ---- exact match --------------------------------------------------------------------------------------

def load_split(path: Path) -> list[tuple[list[dict[str, str]], str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        rows.append((messages[:-1], messages[-1]["content"]))
    return rows


def exact_match(adapter: Path | None, test: Path, max_tokens: int, threads: int) -> tuple[float, list[str]]:
    """Share of test prompts whose greedy reply, stripped, equals the answer; and the replies. All requests go
    to the serving engine at once (it batches them), the adapter applied by the engine."""
    import torch

    from glmstack.engine.classic import load
    from glmstack.protocol import SamplingParams

    torch.set_num_threads(threads)
    model, _ = load("smollm2", device="cpu", adapter=adapter)
    params = SamplingParams(max_tokens=max_tokens, do_sample=False, temperature=0.0)
    rows = load_split(test)
    streams = [model.stream_messages(messages, params) for messages, _ in rows]  # all queued before any step
    replies = ["".join(event.text for event in stream) for stream in streams]
    hits = sum(reply.strip() == answer for reply, (_, answer) in zip(replies, rows, strict=True))
    return hits / len(rows), replies


# ---- the peer: peft + transformers Trainer ------------------------------------------------------------

def write_rendered(data: dict[str, Path], path: Path) -> None:
    """The training examples as our trainer sees them (ids and loss masks from glmstack's chat format)."""
    from glmstack.engine.classic import load
    from glmstack.finetune.data import load_examples

    model, tokenizer = load("smollm2", device="cpu")
    examples = load_examples(data["train"], model.chat_format, tokenizer, model.context_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    path.write_text(json.dumps({"pad_id": pad, "examples": [{"input_ids": e.input_ids, "labels": e.labels}
                                                           for e in examples]}), encoding="utf-8")


def peer_worker(args: argparse.Namespace) -> None:
    """Runs in its own process: peft + Trainer for `args.steps` steps; prints one JSON line of timings."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from glmstack.engine.loading.catalog import bundled_model_path

    torch.set_num_threads(args.threads)
    rendered = json.loads(Path(args.rendered).read_text(encoding="utf-8"))
    pad_id, examples = rendered["pad_id"], rendered["examples"]
    gguf = bundled_model_path()
    assert gguf is not None, "the bundled model is not installed"
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers dequantizes a GGUF's tensors to float32 as it loads; the "quantized with GGUF" mark it leaves
    # on the model only makes Trainer refuse to train it
    model.hf_quantizer, model.is_quantized = None, False
    settings = HYPERPARAMETERS[args.peer]
    if args.peer == "lora":
        config: Any = LoraConfig(r=settings["lora_rank"], lora_alpha=settings["lora_alpha"],
                                 lora_dropout=settings["lora_dropout"], bias="none", task_type="CAUSAL_LM",
                                 target_modules=settings["target_modules"].split(","))
    else:
        config = PrefixTuningConfig(num_virtual_tokens=settings["pre_seq_len"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    counted: list[int] = []  # non-padding tokens of each batch, in the order the Trainer draws them

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = (torch.tensor(example["input_ids"]),
                                                             torch.tensor(example["labels"]), 1)
        counted.append(int(mask.sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    ends: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *_: Any, **__: Any) -> None:
            ends.append(time.monotonic())

    training = TrainingArguments(
        output_dir=args.peer_output, per_device_train_batch_size=BATCH_SIZE, max_steps=args.steps,
        learning_rate=settings["learning_rate"], warmup_steps=min(WARMUP_STEPS, args.steps - 1),
        lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False, seed=42,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=examples, data_collator=collate,
                      callbacks=[Clock()])
    began = time.monotonic()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    cumulative = [sum(counted[: i + 1]) for i in range(len(ends))]  # the loader may draw a batch ahead
    print(json.dumps({"tokens_per_s": steady_rate([t - began for t in ends], cumulative), "steps": len(ends),
                      "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}))


def run_peer(method: str, rendered: Path, work: Path, steps: int, threads: int) -> dict[str, Any]:
    log = work / f"peer-{method}.log"
    command = [sys.executable, __file__, "--peer", method, "--rendered", str(rendered), "--steps", str(steps),
               "--threads", str(threads), "--peer-output", str(work / f"peer-{method}")]
    status, wall, peak = run_measured(command, log)
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("{")]
    if status != 0 or not lines:
        tail = log.read_text(encoding="utf-8").strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {status}: {tail[0][:200]} (see {log})", "wall_s": wall, "peak_rss": peak}
    return {**json.loads(lines[-1]), "wall_s": wall, "peak_rss": peak}


# ---- the whole benchmark ------------------------------------------------------------------------------

def bench_method(method: str, data: dict[str, Path], work: Path, args: argparse.Namespace,
                 rendered: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"method": method}
    if args.steps:
        steps = args.steps
    else:
        steps, probe = size_steps(method, data, work, args.max_minutes * 60, args.probe_steps, args.threads)
        result |= probe
    output = work / method
    shutil.rmtree(output, ignore_errors=True)
    status, wall, peak = run_measured(finetune_command(method, data, output, steps, args.threads, validation=True),
                                      work / f"{method}.log")
    if status != 0:
        raise RuntimeError(f"training failed (exit {status}); see {work / f'{method}.log'}")
    events = step_events(output / "events.jsonl")
    result |= {"steps": steps, "train_wall_s": wall, "peak_rss": peak,
               "tokens_per_s": steady_rate([e["elapsed_s"] for e in events], [e["trained_tokens"] for e in events]),
               "first_loss": events[0]["loss"], "last_loss": events[-1]["loss"],
               "epochs": events[-1]["epoch"], "loss_png": str(output / "loss.png")}
    if args.save_plots:
        args.save_plots.mkdir(parents=True, exist_ok=True)
        plot = args.save_plots / f"finetune-{method}-loss.png"
        shutil.copyfile(output / "loss.png", plot)
        result["loss_png"] = str(plot)
    result["after_em"], replies = exact_match(output, data["test"], args.max_tokens, args.threads)
    (work / f"{method}-replies.json").write_text(json.dumps(replies, ensure_ascii=False, indent=0), encoding="utf-8")
    if args.peer_steps:
        result["peer"] = run_peer(method, rendered, work, args.peer_steps, args.threads)
    return result


def print_table(before: float, results: list[dict[str, Any]]) -> None:
    print(f"\n{'method':8} {'before EM':>9} {'after EM':>8} {'train min':>9} {'steps':>5} {'epochs':>6} "
          f"{'tok/s':>7} {'peak RSS':>9} {'loss first→last':>16}  loss.png")
    for r in results:
        print(f"{r['method']:8} {before:9.1%} {r['after_em']:8.1%} {r['train_wall_s'] / 60:9.2f} {r['steps']:5d} "
              f"{r['epochs']:6.2f} {r['tokens_per_s']:7.1f} {r['peak_rss'] / 2**30:7.2f} G "
              f"{r['first_loss']:7.3f}→{r['last_loss']:<7.3f}  {r['loss_png']}")
    for r in results:
        peer = r.get("peer")
        if not peer:
            continue
        if "error" in peer:
            print(f"{r['method']}: peft + Trainer failed: {peer['error']}")
            continue
        print(f"{r['method']}: ours {r['tokens_per_s']:.1f} tok/s, peft + Trainer {peer['tokens_per_s']:.1f} tok/s "
              f"({peer['steps']} steps, peak RSS {peer['peak_rss'] / 2**30:.2f} G): "
              f"ours/peft {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", choices=sorted(HYPERPARAMETERS),
                        help="repeatable (default: both)")
    parser.add_argument("--max-minutes", type=float, default=10.0, help="wall-time budget of each training run")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps (no probe, no budget)")
    parser.add_argument("--probe-steps", type=int, default=3)
    parser.add_argument("--peer-steps", type=int, default=12, help="peft + Trainer steps (0: no peer)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work", type=Path, default=Path("bench-data/finetune-run"))
    parser.add_argument("--save-plots", type=Path, default=None, help="copy each loss.png here")
    parser.add_argument("--seed", type=int, default=19, help="the task's seed")
    # the peer's own process (internal)
    parser.add_argument("--peer", choices=sorted(HYPERPARAMETERS), help=argparse.SUPPRESS)
    parser.add_argument("--rendered", help=argparse.SUPPRESS)
    parser.add_argument("--peer-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer_worker(args)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    data = finetune_task.write(args.work / "data", seed=args.seed)
    rendered = args.work / "rendered.json"
    write_rendered(data, rendered)
    started = time.monotonic()
    before, replies = exact_match(None, data["test"], args.max_tokens, args.threads)
    print(f"base model: exact match {before:.1%} on {len(replies)} held-out requests "
          f"({time.monotonic() - started:.0f} s); first reply: {replies[0]!r}", flush=True)
    results = []
    for method in args.method or ["lora", "ptuning"]:
        results.append(bench_method(method, data, args.work, args, rendered))
        r = results[-1]
        print(f"{method}: {r['steps']} steps in {r['train_wall_s'] / 60:.2f} min, exact match "
              f"{before:.1%} -> {r['after_em']:.1%}", flush=True)
    (args.work / "results.json").write_text(json.dumps({"before_em": before, "threads": args.threads,
                                                        "results": results}, indent=1), encoding="utf-8")
    print_table(before, results)


if __name__ == "__main__":
    main()
