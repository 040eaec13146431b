"""One fine-tuning job (spec §2.13), under this server's lease: files checked, then the trainer as a child
process (`python -m glmstack.finetune`), its events file followed into job events, and the adapter served as
`ft:...` once it succeeds.

The trainer is a process of its own so that a crash fails a job, not the server, and so that it can be given
less of the machine than the server: it runs at the lowest CPU priority (nice 19) with GLMSTACK_FINETUNE_THREADS
threads, so interactive requests take the cores whenever they want them. It dies with the server (Linux
PR_SET_PDEATHSIG), so after a kill -9 no orphan trains on while the next server resumes the job from the last
checkpoint (`--resume`): never run twice. SIGTERM (a cancel, or the server draining) makes the trainer finish its
step, checkpoint and exit with 143.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from glmstack.api.deps import Platform
from glmstack.knowledge.jsonl_checks import JsonlError, check_fine_tune
from glmstack.store.files import NewFile
from glmstack.store.fine_tuning import FineTuningJob

log = logging.getLogger(__name__)

NICE = 19
MAX_ATTEMPTS = 5  # starts of one job (each after its server stopped mid-way) before it fails visibly
SIGTERM_EXIT = 143
BASE_LEARNING_RATE = {"lora": 2e-4, "ptuning": 2e-2}
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    os.nice(NICE)
    with contextlib.suppress(Exception):  # Linux only; elsewhere the trainer may outlive a killed server
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def job_dir(platform: Platform, job_id: str) -> Path:
    return Path(platform.settings.home) / "fine_tuning" / job_id


def hhmmss(seconds: float | None) -> str:
    s = int(seconds or 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


async def serve_adapter(platform: Platform, name: str, adapter_dir: str) -> None:
    """Loads an adapter into the engine (on a worker thread: it reads files); from then on `name` is a model the
    API answers to (ModelCatalog asks the engine for its adapters)."""
    loader = getattr(platform.engine, "load_adapter", None)
    if loader is None:
        raise RuntimeError("this engine cannot serve adapters")
    result = await asyncio.to_thread(loader, name, adapter_dir)
    if asyncio.iscoroutine(result):
        await result


def adapter_dir_of(platform: Platform, job: FineTuningJob) -> Path:
    return job_dir(platform, job.id) / "output"


class FineTuneRun:
    def __init__(self, platform: Platform, job: FineTuningJob) -> None:
        self.platform, self.job = platform, job
        self.store = platform.store.fine_tuning
        self.dir = job_dir(platform, job.id)
        self.process: asyncio.subprocess.Process | None = None
        self.cancelled = False
        self.paused = False  # stopped for a shutdown: resumed by the next server
        self._offset = 0  # how much of the trainer's events file has become job events
        self._last_step: int | None = None
        self._done: dict[str, Any] | None = None  # the trainer's "done" event, once read
        self._reading = threading.Lock()  # the follower's last read may still run beside the final one

    def stop(self, *, cancel: bool) -> None:
        """Cancel (the job ends `cancelled`) or pause (a shutdown: left `running` for the next server)."""
        self.cancelled = self.cancelled or cancel
        self.paused = not self.cancelled
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    async def run(self) -> None:
        job = self.job
        if job.attempts > MAX_ATTEMPTS:
            message = f"the job was interrupted {job.attempts - 1} times without finishing"
            await self._finish("failed", {"code": "500", "message": message}, f"Training failed: {message}")
            return
        if job.status in ("created", "validating_files"):
            await asyncio.to_thread(self.store.set_status, job.id, "validating_files")
            problem = await asyncio.to_thread(self._check_files)
            if problem is not None:
                await self._finish("failed", problem, f"Files failed validation: {problem['message']}")
                return
            await asyncio.to_thread(self.store.set_status, job.id, "queued",
                                    "Files validated, moving job to queued state")
        if self.cancelled:
            await self._finish("cancelled", None, "Job cancelled")
            return
        resumed = (self.dir / "output").exists()
        await asyncio.to_thread(self.store.set_status, job.id, "running",
                                "Resuming training from the last checkpoint" if resumed else "Training started")
        code, done = await self._train()
        if self.paused and not self.cancelled:
            return  # the next server resumes it
        if self.cancelled:
            await self._finish("cancelled", None, "Job cancelled")
        elif code == 0 and done is not None:
            await self._succeed(done)
        else:
            message = self._last_error() or f"the trainer exited with status {code}"
            await self._finish("failed", {"code": "500", "message": message}, f"Training failed: {message}")

    # ---- steps -------------------------------------------------------------------------------------------

    def _check_files(self) -> dict[str, Any] | None:
        blobs = self.platform.store.blobs
        for name, blob in (("training_file", self.job.training_blob), ("validation_file", self.job.validation_blob)):
            if name == "validation_file" and self.job.validation_file is None:
                continue
            if blob is None or not blobs.path(blob).exists():
                return {"code": "1214", "message": f"the {name} is gone", "param": name}
            try:
                with open(blobs.path(blob), "rb") as f:
                    check_fine_tune(f)
            except JsonlError as e:
                return {"code": "1214", "message": f"{name}: {e}", "param": name}
        return None

    def _command(self) -> list[str]:
        job, settings = self.job, self.platform.settings
        blobs = self.platform.store.blobs
        hp = job.hyperparameters
        learning_rate = BASE_LEARNING_RATE[job.method] * float(hp["learning_rate_multiplier"])
        command = [sys.executable, "-m", "glmstack.finetune", "--model", settings.model or "smollm2",
                   "--train", str(blobs.path(job.training_blob or "")), "--method", job.method,
                   "--output", str(self.dir / "output"), "--epochs", str(hp["n_epochs"]),
                   "--batch-size", str(hp["batch_size"]), "--learning-rate", f"{learning_rate:g}",
                   "--events", str(self.dir / "events.jsonl"), "--resume",
                   "--threads", str(settings.finetune_threads)]
        if job.validation_blob:
            command += ["--validation", str(blobs.path(job.validation_blob))]
        extra = hp.get("extra") or {}
        for flag in ("max_steps", "save_every", "eval_every", "max_length", "lora_rank", "lora_alpha",
                     "pre_seq_len", "seed", "prefix_init"):
            if flag in extra:
                command += ["--" + flag.replace("_", "-"), str(extra[flag])]
        return command

    async def _train(self) -> tuple[int, dict[str, Any] | None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GLMSTACK_HOME": str(self.platform.settings.home),
               "OMP_NUM_THREADS": str(self.platform.settings.finetune_threads)}
        with open(self.dir / "trainer.log", "ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *self._command(), stdout=log_file, stderr=log_file, env=env, preexec_fn=_child_setup)
            follower = asyncio.create_task(self._follow_events())
            try:
                code = await self.process.wait()
            except asyncio.CancelledError:
                self.stop(cancel=False)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.process.wait(), 30)
                raise
            finally:
                await asyncio.sleep(0)  # let the follower read what the trainer wrote last
                follower.cancel()
        done = await asyncio.to_thread(self._read_events)
        return code, done

    async def _follow_events(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(self._read_events)

    def _read_events(self) -> dict[str, Any] | None:
        """Turns new lines of the trainer's events file into job events; returns its "done" event once read."""
        with self._reading:
            return self._read_new_events()

    def _read_new_events(self) -> dict[str, Any] | None:
        path = self.dir / "events.jsonl"
        if self._last_step is None:
            self._last_step = self.store.last_step(self.job.id)
        if not path.exists():
            return None
        with open(path, "rb") as f:
            f.seek(self._offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a line still being written
                self._offset += len(raw)
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                kind = event.get("type")
                if kind == "step" and int(event.get("step", 0)) > self._last_step:
                    self._last_step = int(event["step"])
                    data = {"epoch": event.get("epoch"), "current_steps": event["step"],
                            "total_steps": event.get("total_steps"), "loss": event.get("loss"),
                            "learning_rate": event.get("learning_rate"), "trained_tokens": event.get("trained_tokens"),
                            "elapsed_time": hhmmss(event.get("elapsed_s")),
                            "remaining_time": hhmmss(event.get("eta_s"))}
                    self.store.add_metrics(self.job.id, {k: v for k, v in data.items() if v is not None},
                                           event.get("trained_tokens"))
                elif kind == "validation":
                    self.store.add_metrics(self.job.id, {"current_steps": event.get("step"),
                                                         "eval_loss": event.get("loss")})
                elif kind == "done":
                    self._done = event
                elif kind == "error":
                    self.store.add_message(self.job.id, str(event.get("message")), "error")
        return self._done

    def _last_error(self) -> str | None:
        log_path = self.dir / "trainer.log"
        if not log_path.exists():
            return None
        lines = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1][-500:] if lines else None

    async def _succeed(self, done: dict[str, Any]) -> None:
        adapter_dir = str(done.get("adapter_dir") or self.dir / "output")
        try:
            await serve_adapter(self.platform, self.job.fine_tuned_model, adapter_dir)
        except Exception as e:
            await self._finish("failed", {"code": "500", "message": f"the adapter could not be loaded: {e}"},
                               f"Training finished but the model could not be served: {e}")
            return
        result = await asyncio.to_thread(self._result_file)
        await self._finish("succeeded", None, f"Training finished: {self.job.fine_tuned_model} is being served",
                           trained_tokens=done.get("trained_tokens"), result_files=[result] if result else [])

    def _result_file(self) -> str | None:
        """The trainer's events (loss per step, validation) as a result file, as the platform gives one."""
        store, source = self.platform.store, self.dir / "events.jsonl"
        if not source.exists():
            return None
        staged = store.blobs.staging_path()
        data = source.read_bytes()
        staged.write_bytes(data)
        blob = store.blobs.adopt(staged)
        record = store.files.create(self.job.key_id, NewFile(
            purpose="fine-tune", filename=f"{self.job.id}_events.jsonl", bytes=len(data), blob=blob,
            file_type="application/jsonl", generated=True))
        return record.id if record is not None else None

    async def _finish(self, status: str, error: dict[str, Any] | None, message: str, *,
                      trained_tokens: int | None = None, result_files: list[str] | None = None) -> None:
        job, blobs = self.job, self.platform.store.blobs
        await asyncio.to_thread(self.store.finish, job.id, status, error=error, message=message,
                                trained_tokens=trained_tokens, result_files=result_files or [])
        for blob in (job.training_blob, job.validation_blob):
            if blob:
                blobs.delete(blob)
