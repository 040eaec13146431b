"""The training loop: AdamW with linear warmup and decay, gradient accumulation, DDP, checkpoints and exact
resume, validation, events.

Batches are a pure function of (seed, step): epoch e's order is a permutation seeded by (seed, e), and step s
takes the next `global_batch` examples of it (an epoch's last partial batch is dropped, so every step has the
same size; the next epoch's shuffle brings those examples back). Dropout draws from the torch RNG reseeded at
every step from (seed, step, rank). So the step number alone is the data position and the RNG state, and a
run resumed from a checkpoint at step k computes exactly what the uninterrupted run computed after step k -
in any process layout, which a saved RNG state would not give under DDP. The checkpoint still records the
RNG states it stopped with, for inspection.

DDP (`torchrun --nproc_per_node N -m glmstack.finetune ...`): every process loads the model and all the data;
each micro-step, rank r takes its `batch_size` slice of the global batch. The loss is the sum over the global
batch's trained tokens divided by their count (known to every rank before the step), so the gradient - and
the loss curve - are those of one process running the whole global batch; DDP's gradient average over ranks
is undone by multiplying by the world size. Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glmstack.engine.classic import load
from glmstack.finetune.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from glmstack.finetune.data import IGNORE, Example, load_examples
from glmstack.finetune.methods import MethodOptions, TrainingMethod, method_for
from glmstack.finetune.progress import EventLog, ProgressBar, plot_losses

log = logging.getLogger(__name__)

SIGTERM_EXIT = 143  # 128 + SIGTERM: what the platform's job runner reads as "cancelled, checkpoint written"
MAX_GRAD_NORM = 1.0  # transformers Trainer's default clipping


@dataclass
class TrainConfig:
    model: str  # a path or a name the models folder knows
    train: Path
    output: Path
    method: str = "lora"
    validation: Path | None = None
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # examples per process per micro-step
    grad_accum: int = 1
    learning_rate: float | None = None  # None: the method's usual rate (LoRA 2e-4, P-Tuning v2 2e-2)
    warmup_steps: int = 0
    max_length: int = 1024
    options: MethodOptions = field(default_factory=MethodOptions)
    save_every: int = 0  # 0: a checkpoint only when stopped by SIGTERM
    eval_every: int = 0  # 0: validation only at the end
    resume: bool = False
    seed: int = 42
    dtype: str = "auto"
    threads: int | None = None
    events: Path | None = None
    progress: bool = True


DEFAULT_LEARNING_RATES = {"lora": 2e-4, "ptuning": 2e-2}


class Stopped(Exception):
    """SIGTERM arrived; a checkpoint of the last finished step was written."""


class _Trainable(nn.Module):
    """The model plus any trainable parameters a method keeps outside it, as one module for DDP."""

    def __init__(self, model: nn.Module, method: TrainingMethod, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.model = model
        inside = {id(p) for p in model.parameters()}
        self.extra = nn.ParameterList([p for p in params if id(p) not in inside])
        self.method = method

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.method.forward(self.model, input_ids, positions, logit_rows)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU (bf16 weights train slower on most CPUs than they save); bfloat16 weights on a
    GPU that has it, with autocast, the LoRA/prefix weights kept in float32 by the method."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _lr_lambda(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _pad(examples: list[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels [B, T]; padding is labelled IGNORE and, being after every real token,
    invisible to them under causal attention."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return ids.to(device), labels.to(device)


def _loss_sum(forward: nn.Module, ids: torch.Tensor, positions: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions: logits at t predict label t+1. The head
    runs only at the positions some row has a label after (the assistant's tokens): with a 49k vocabulary it
    costs a fifth of a small model's forward at every position, and the prompt's logits are never used."""
    rows = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = forward(ids, positions, rows)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, rows + 1].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def _trained(examples: list[Example]) -> int:
    # the first token is never a target (nothing predicts it)
    return sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)


@contextmanager
def _sigterm_flag() -> Iterator[dict[str, bool]]:
    flag = {"stop": False}

    def handler(signum: int, frame: FrameType | None) -> None:
        flag["stop"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(config: TrainConfig) -> Path:
    """Run the whole training; returns the adapter folder (config.output). Raises Stopped after SIGTERM."""
    ddp = _init_distributed()
    events = EventLog(config.events or config.output / "events.jsonl") if ddp.rank == 0 else None
    try:
        return _train(config, ddp, events)
    except Stopped:
        raise
    except BaseException as e:
        if events is not None and not isinstance(e, KeyboardInterrupt):
            events.write("error", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        if events is not None:
            events.close()
        if ddp.enabled:
            dist.destroy_process_group()


def _train(config: TrainConfig, ddp: _Dist, events: EventLog | None) -> Path:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device("cuda", ddp.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = _pick_dtype(config.dtype, device)
    chat_model, tokenizer = load(config.model, device=str(device), dtype=dtype, quantize=None)
    model = chat_model.module
    max_length = min(config.max_length, chat_model.context_length)
    train_set = load_examples(config.train, chat_model.chat_format, tokenizer, max_length)
    validation = (load_examples(config.validation, chat_model.chat_format, tokenizer, max_length)
                  if config.validation else [])
    pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    global_batch = config.batch_size * config.grad_accum * ddp.world
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training examples are fewer than one global batch of {global_batch} "
                         "(batch size x gradient accumulation x processes)")
    total = config.max_steps or config.epochs * steps_per_epoch

    torch.manual_seed(config.seed)  # the method's initial weights: the same in every process and run
    method = method_for(config.method, config.options)
    params = method.attach(model)
    method.warm_start(model, [example.input_ids for example in train_set])
    trainable = _Trainable(model, method, params)
    wrapped: nn.Module = trainable
    if ddp.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(trainable, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
    lr = config.learning_rate or DEFAULT_LEARNING_RATES.get(config.method, 1e-4)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, total))
    plan = {"global_batch": global_batch, "seed": config.seed, "examples": len(train_set), "total": total}

    start, history, val_history = 0, [], []
    trained_tokens = 0  # over the whole job, across resumes (the platform's `trained_tokens`)
    resumed = latest_checkpoint(config.output) if config.resume else None
    if resumed is not None:
        state = load_checkpoint(resumed)
        if state["plan"] != plan:
            raise ValueError(f"{resumed} was written by a run with {state['plan']}; this one has {plan}: "
                             "resuming would not continue the same training")
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, history, val_history = state["step"], state["history"], state["validation"]
        trained_tokens = int(state.get("trained_tokens", 0))
        log.info("resuming from %s (step %d)", resumed, start)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())
    base_path = chat_model.loaded.checkpoint.path
    bar = ProgressBar(total, start, enabled=config.progress and ddp.rank == 0)
    orders: dict[int, list[int]] = {}
    began, tokens_seen = time.monotonic(), 0

    def checkpoint(step: int) -> None:
        if ddp.rank != 0:
            return
        state = {"plan": plan, "step": step, "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "history": history, "validation": val_history,
                 "trained_tokens": trained_tokens,
                 "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}}
        path = save_checkpoint(config.output, step, state, lambda folder: method.save(folder, base_path))
        assert events is not None
        events.write("checkpoint", step=step, path=str(path))

    with _sigterm_flag() as flag:
        model.train()
        for step in range(start + 1, total + 1):
            epoch, index = divmod(step - 1, steps_per_epoch)
            if epoch not in orders:
                g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
                orders = {epoch: torch.randperm(len(train_set), generator=g).tolist()}
            batch = [train_set[i] for i in orders[epoch][index * global_batch: (index + 1) * global_batch]]
            denominator = _trained(batch)
            torch.manual_seed((config.seed << 32) + step * 4096 + ddp.rank)
            loss_total, tokens = 0.0, 0
            for micro in range(config.grad_accum):
                first = (micro * ddp.world + ddp.rank) * config.batch_size
                shard = batch[first: first + config.batch_size]
                ids, labels = _pad(shard, pad_id, device)
                positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
                last = micro == config.grad_accum - 1
                sync = nullcontext() if last or not ddp.enabled else wrapped.no_sync()  # type: ignore[operator]
                with sync, autocast:
                    loss_sum = _loss_sum(wrapped, ids, positions, labels)
                    (loss_sum * (ddp.world / max(denominator, 1))).backward()
                loss_total += loss_sum.item()
                tokens += sum(len(e.input_ids) for e in shard)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            learning_rate = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_total, step_tokens, stop = ddp.all_sum(loss_total, tokens, float(flag["stop"]))
            loss = loss_total / max(denominator, 1)
            history.append([step, loss])
            tokens_seen += int(step_tokens)
            trained_tokens += int(step_tokens)
            elapsed = time.monotonic() - began
            done_here = step - start
            eta = elapsed / done_here * (total - step)
            if events is not None:
                events.write("step", step=step, total_steps=total, trained_tokens=trained_tokens,
                             epoch=round(step / steps_per_epoch, 4), loss=loss,
                             learning_rate=learning_rate, tokens_per_s=round(tokens_seen / max(elapsed, 1e-9), 2),
                             elapsed_s=round(elapsed, 3), eta_s=round(eta, 3))
            bar.update(loss, tokens_seen / max(elapsed, 1e-9), eta)
            # a SIGTERM (a cancel, a shutdown) skips the validation pass: it stops within this step
            if validation and not stop and (step == total or (config.eval_every and step % config.eval_every == 0)):
                if ddp.rank == 0:
                    val_loss = evaluate(trainable, validation, config.batch_size, pad_id, device, autocast)
                    val_history.append([step, val_loss])
                    assert events is not None
                    events.write("validation", step=step, loss=val_loss)
                    bar.write(f"step {step}: validation loss {val_loss:.4f}")
            if stop:
                checkpoint(step)
                bar.close()
                raise Stopped(f"stopped by SIGTERM after step {step}; checkpoint written")
            if config.save_every and step % config.save_every == 0 and step < total:
                checkpoint(step)
    bar.close()
    if ddp.rank == 0:
        method.save(config.output, base_path)
        plot_losses(config.output / "loss.png", [(s, v) for s, v in history],
                    [(s, v) for s, v in val_history])
        assert events is not None
        train_loss = sum(v for _, v in history) / len(history) if history else math.nan
        events.write("done", adapter_dir=str(config.output), steps=total, train_loss=train_loss,
                     trained_tokens=trained_tokens)
    return config.output


@torch.no_grad()
def evaluate(trainable: _Trainable, examples: list[Example], batch_size: int, pad_id: int,
             device: torch.device, autocast: Any) -> float:
    """Mean next-token loss over every trained token of `examples` (token-weighted, like training)."""
    trainable.model.eval()
    total, count = 0.0, 0
    try:
        for first in range(0, len(examples), batch_size):
            chunk = examples[first: first + batch_size]
            ids, labels = _pad(chunk, pad_id, device)
            positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
            with autocast:
                total += _loss_sum(trainable, ids, positions, labels).item()
            count += _trained(chunk)
    finally:
        trainable.model.train()
    return total / max(count, 1)
